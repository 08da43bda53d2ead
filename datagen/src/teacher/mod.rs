//! The teacher: OpenAI-compatible endpoints, balanced and retried.

pub mod local;
pub mod loopback;
pub mod openai;
pub mod pool;

use std::time::Duration;

use crate::reasoning::ReasoningParser;

/// One sampled completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub reasoning: Option<String>,
    pub content: String,
    pub parser: ReasoningParser,
    pub finish_reason: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub latency_ms: u64,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum RequestError {
    #[error("HTTP {status}: {message}")]
    Status { status: u16, message: String, retry_after: Option<Duration> },
    #[error("no response within the request deadline")]
    Timeout,
    #[error("the stream stalled: nothing for {0:?}")]
    Stalled(Duration),
    #[error("connection failed: {0}")]
    Transport(String),
    #[error("malformed response: {0}")]
    Protocol(String),
}

impl RequestError {
    /// Errors that no prompt can get past: the key is wrong or missing, the balance is spent
    /// (DeepSeek's 402), the model or route does not exist. They stop the run at once with the
    /// server's message.
    pub fn is_fatal(&self) -> bool {
        match self {
            RequestError::Status { status: 401 | 402 | 403 | 404, .. } => true,
            // The DeepSeek API answers an unknown model with a 400.
            RequestError::Status { status: 400, message, .. } => {
                let message = message.to_lowercase();
                message.contains("model") && (message.contains("not exist") || message.contains("not found"))
            }
            _ => false,
        }
    }

    /// Errors of this request alone (a prompt plus `max_tokens` past the context, a bad
    /// parameter): the sample is stored as failed with the server's message and the run goes on.
    /// Sending the same request again would get the same answer, so it is not retried.
    pub fn is_request_error(&self) -> bool {
        matches!(self, RequestError::Status { status: 400 | 413 | 422, .. }) && !self.is_fatal()
    }

    /// The reason class stored with a failed sample (`error_class`), and what
    /// `datagen run --retry-failed CLASSES` selects by.
    pub fn class(&self) -> &'static str {
        match self {
            RequestError::Status { status: 400 | 413 | 422, message, .. } => {
                let message = message.to_lowercase();
                let length = ["context length", "context_length", "maximum context", "max_model_len", "too long", "maximum model length"];
                if length.iter().any(|needle| message.contains(needle)) { "context_length" } else { "invalid_request" }
            }
            RequestError::Status { status: 401 | 403, .. } => "auth",
            RequestError::Status { status: 402, .. } => "balance",
            RequestError::Status { status: 404, .. } => "not_found",
            RequestError::Status { status: 429, .. } => "rate_limit",
            RequestError::Status { .. } => "server",
            RequestError::Timeout => "timeout",
            RequestError::Stalled(_) => "stall",
            RequestError::Transport(_) => "connection",
            RequestError::Protocol(_) => "protocol",
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RequestError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Every reason class [`RequestError::class`] gives.
pub const ERROR_CLASSES: &[&str] =
    &["context_length", "invalid_request", "auth", "balance", "not_found", "rate_limit", "server", "timeout", "stall", "connection", "protocol"];

/// A `Retry-After` header in either of its forms: delay-seconds, or an HTTP date (`Wed, 21 Oct
/// 2015 07:28:00 GMT`), which is turned into the wait from `now`. `None` when it is neither.
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<f64>() {
        // A server's number, however large (`1e20`), is a wait, never a panic.
        return (seconds >= 0.0).then(|| Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX));
    }
    let date = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    Some((date.with_timezone(&chrono::Utc) - now).to_std().unwrap_or(Duration::ZERO))
}

/// Exponential backoff with jitter (`base · 2^attempt`, capped, times a uniform draw in
/// [0.5, 1]), or the server's `Retry-After` when it gave one.
pub fn backoff(attempt: u32, base: Duration, cap: Duration, retry_after: Option<Duration>, jitter: f64) -> Duration {
    if let Some(wait) = retry_after {
        // A server's own word wins over the cap, within reason.
        return wait.min(Duration::from_secs(600));
    }
    let exponential = base.as_secs_f64() * 2f64.powi(attempt.min(30) as i32);
    Duration::from_secs_f64(exponential.min(cap.as_secs_f64()) * (0.5 + 0.5 * jitter.clamp(0.0, 1.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_honours_retry_after() {
        let (base, cap) = (Duration::from_millis(500), Duration::from_secs(30));
        assert_eq!(backoff(0, base, cap, None, 1.0), Duration::from_millis(500));
        assert_eq!(backoff(3, base, cap, None, 1.0), Duration::from_secs(4));
        assert_eq!(backoff(20, base, cap, None, 1.0), cap);
        assert_eq!(backoff(3, base, cap, None, 0.0), Duration::from_secs(2));
        assert_eq!(backoff(0, base, cap, Some(Duration::from_secs(7)), 0.3), Duration::from_secs(7));
        let unauthorized = RequestError::Status { status: 401, message: "bad key".into(), retry_after: None };
        assert!(unauthorized.is_fatal());
        assert!(!RequestError::Status { status: 503, message: String::new(), retry_after: None }.is_fatal());
    }

    fn status(status: u16, message: &str) -> RequestError {
        RequestError::Status { status, message: message.into(), retry_after: None }
    }

    #[test]
    fn errors_by_kind() {
        // vLLM's answer to a prompt plus max_tokens past --max-model-len.
        let overflow = status(400, "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens (904 in the messages, 4096 in the completion).");
        assert!(overflow.is_request_error() && !overflow.is_fatal());
        assert_eq!(overflow.class(), "context_length");
        let bad_parameter = status(422, "temperature must be non-negative");
        assert!(bad_parameter.is_request_error());
        assert_eq!(bad_parameter.class(), "invalid_request");
        // DeepSeek's answer to a max_tokens out of its range is a bad setting, not a long prompt.
        assert_eq!(status(400, "Invalid max_tokens value, the valid range of max_tokens is [1, 8192]").class(), "invalid_request");
        for (code, class) in [(401, "auth"), (402, "balance"), (403, "auth"), (404, "not_found")] {
            let error = status(code, "no");
            assert!(error.is_fatal() && !error.is_request_error(), "{code}");
            assert_eq!(error.class(), class);
        }
        // DeepSeek's unknown model is a 400 that no prompt gets past.
        assert!(status(400, "Model Not Exist").is_fatal());
        assert_eq!(status(503, "").class(), "server");
        assert_eq!(status(429, "").class(), "rate_limit");
        assert_eq!(RequestError::Timeout.class(), "timeout");
        assert!(ERROR_CLASSES.contains(&RequestError::Transport(String::new()).class()));
    }

    #[test]
    fn retry_after_in_seconds_or_as_an_http_date() {
        let now = chrono::DateTime::parse_from_rfc3339("2015-10-21T07:27:00Z").unwrap().with_timezone(&chrono::Utc);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("1.5", now), Some(Duration::from_millis(1500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now), Some(Duration::from_secs(60)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:26:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("-3", now), None);
        assert_eq!(parse_retry_after("1e20", now), Some(Duration::MAX));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
