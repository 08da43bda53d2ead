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
    #[error("connection failed: {0}")]
    Transport(String),
    #[error("malformed response: {0}")]
    Protocol(String),
}

impl RequestError {
    /// Errors that no retry will fix: the key is wrong or missing, the model or route does not
    /// exist, the request itself is invalid. They stop the run with the server's message.
    pub fn is_fatal(&self) -> bool {
        matches!(self, RequestError::Status { status: 400 | 401 | 403 | 404 | 422, .. })
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RequestError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
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
}
