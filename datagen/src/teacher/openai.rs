//! One chat completion from an OpenAI-compatible server (vLLM, SGLang, the DeepSeek API,
//! OpenRouter…), streamed (SSE) or not.
//!
//! What real servers do that the protocol does not promise, and is handled here: SSE comment
//! and keep-alive lines (`: ping`), `event:` lines, streams that end without `data: [DONE]`,
//! usage only when asked for (`stream_options.include_usage`) or never, error bodies that are
//! plain text or HTML instead of JSON, and `n` ignored (samples are requested one at a time).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use super::{Completion, RequestError};
use crate::reasoning;

/// What is asked of the teacher for one sample.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub model: String,
    /// `{role, content}` messages.
    pub messages: Vec<(String, String)>,
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens: u64,
    pub stream: bool,
    pub seed: Option<u64>,
}

impl ChatRequest {
    fn body(&self) -> Value {
        let messages: Vec<Value> = self.messages.iter().map(|(role, content)| json!({"role": role, "content": content})).collect();
        let mut body = json!({
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "stream": self.stream,
        });
        if self.stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        if let Some(seed) = self.seed {
            body["seed"] = json!(seed);
        }
        body
    }
}

/// `POST {endpoint}/chat/completions`. `endpoint` is the API base (`http://host:8000/v1`).
pub async fn chat(
    http: &reqwest::Client,
    endpoint: &str,
    api_key: Option<&str>,
    request: &ChatRequest,
    deadline: Duration,
    stall: Duration,
) -> Result<Completion, RequestError> {
    let started = Instant::now();
    let url = format!("{}/chat/completions", endpoint.trim_end_matches('/'));
    let mut builder = http.post(&url).json(&request.body()).timeout(deadline);
    if let Some(key) = api_key {
        builder = builder.bearer_auth(key);
    }
    let response = builder.send().await.map_err(transport_error)?;
    let status = response.status();
    if !status.is_success() {
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| super::parse_retry_after(v, chrono::Utc::now()));
        let body = response.text().await.unwrap_or_default();
        return Err(RequestError::Status { status: status.as_u16(), message: error_message(&body), retry_after });
    }
    let mut completion = if request.stream {
        read_stream(response, deadline.saturating_sub(started.elapsed()), stall).await?
    } else {
        let body = response.text().await.map_err(transport_error)?;
        let value: Value = serde_json::from_str(&body)
            .map_err(|e| RequestError::Protocol(format!("response is not JSON ({e}): {}", snippet(&body))))?;
        parse_response(&value)?
    };
    completion.latency_ms = started.elapsed().as_millis() as u64;
    Ok(completion)
}

/// The context length the server advertises for `model`: vLLM's `max_model_len` in
/// `GET /v1/models` (SGLang and the DeepSeek API do not give one). `None` when it is not there.
pub async fn advertised_context(http: &reqwest::Client, endpoint: &str, api_key: Option<&str>, model: &str) -> Option<u64> {
    let url = format!("{}/models", endpoint.trim_end_matches('/'));
    let mut builder = http.get(&url).timeout(Duration::from_secs(10));
    if let Some(key) = api_key {
        builder = builder.bearer_auth(key);
    }
    let response = builder.send().await.ok().filter(|r| r.status().is_success())?;
    let value: Value = response.json().await.ok()?;
    value["data"].as_array()?.iter().find(|m| m["id"].as_str() == Some(model))?["max_model_len"].as_u64()
}

fn transport_error(error: reqwest::Error) -> RequestError {
    if error.is_timeout() {
        RequestError::Timeout
    } else {
        RequestError::Transport(error.to_string())
    }
}

/// The message of an error body: OpenAI's `{"error": {"message"}}`, FastAPI's `{"detail"}`,
/// `{"message"}`, or the text itself.
fn error_message(body: &str) -> String {
    if let Ok(value) = serde_json::from_str::<Value>(body) {
        for pointer in ["/error/message", "/error", "/detail", "/message"] {
            if let Some(text) = value.pointer(pointer).and_then(Value::as_str) {
                return snippet(text);
            }
        }
    }
    snippet(body)
}

fn snippet(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(300) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

/// Reasoning, answer and finish reason accumulated from a response or from stream deltas.
#[derive(Default)]
struct Parts {
    reasoning_content: String,
    reasoning: String,
    content: String,
    finish_reason: Option<String>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

impl Parts {
    fn take_usage(&mut self, value: &Value) {
        if let Some(usage) = value.get("usage").filter(|u| u.is_object()) {
            self.prompt_tokens = usage["prompt_tokens"].as_u64().or(self.prompt_tokens);
            self.completion_tokens = usage["completion_tokens"].as_u64().or(self.completion_tokens);
        }
    }

    fn into_completion(self) -> Completion {
        let split = reasoning::split(Some(&self.reasoning_content), Some(&self.reasoning), &self.content);
        Completion {
            reasoning: split.reasoning,
            content: split.content,
            parser: split.parser,
            finish_reason: self.finish_reason,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            latency_ms: 0,
        }
    }
}

fn first_choice(value: &Value) -> Result<Option<&Value>, RequestError> {
    match value.get("choices") {
        Some(Value::Array(choices)) => Ok(choices.first()),
        Some(_) => Err(RequestError::Protocol("`choices` is not a list".into())),
        None => Ok(None),
    }
}

fn parse_response(value: &Value) -> Result<Completion, RequestError> {
    let choice = first_choice(value)?.ok_or_else(|| RequestError::Protocol(format!("no choices in {}", snippet(&value.to_string()))))?;
    let message = &choice["message"];
    let text = |key: &str| message[key].as_str().unwrap_or_default().to_string();
    let mut parts = Parts {
        reasoning_content: text("reasoning_content"),
        reasoning: text("reasoning"),
        content: text("content"),
        finish_reason: choice["finish_reason"].as_str().map(String::from),
        ..Parts::default()
    };
    parts.take_usage(value);
    Ok(parts.into_completion())
}

/// Reads a server-sent event stream until `[DONE]` or a finish reason, within `deadline` in all
/// and, once the first data chunk has come, `stall` between two chunks (keep-alive comments
/// count: the server is alive).
async fn read_stream(response: reqwest::Response, deadline: Duration, stall: Duration) -> Result<Completion, RequestError> {
    let mut parts = Parts::default();
    let mut pending = Vec::<u8>::new();
    let mut done = false;
    let mut stream = response.bytes_stream();
    let until = tokio::time::Instant::now() + deadline;
    let mut pending_first = true;
    'read: loop {
        // Before the first chunk a request may wait in the server's queue or prefill for long:
        // only the deadline applies. After it, silence longer than `stall` is a stall.
        let next = if pending_first { until } else { tokio::time::Instant::now().checked_add(stall).map_or(until, |t| t.min(until)) };
        let chunk = match tokio::time::timeout_at(next, stream.next()).await {
            Err(_) if next < until => return Err(RequestError::Stalled(stall)),
            Err(_) => return Err(RequestError::Timeout),
            Ok(None) => break,
            Ok(Some(chunk)) => chunk.map_err(transport_error)?,
        };
        pending_first &= !chunk.windows(5).any(|w| w == b"data:");
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            // SSE: comments and keep-alives start with ':'; only `data:` lines carry chunks.
            let Some(data) = line.strip_prefix("data:") else { continue };
            let data = data.trim();
            if data == "[DONE]" {
                done = true;
                break 'read;
            }
            if data.is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(data)
                .map_err(|e| RequestError::Protocol(format!("stream chunk is not JSON ({e}): {}", snippet(data))))?;
            if let Some(error) = value.get("error") {
                return Err(RequestError::Protocol(format!("error in stream: {}", error_message(&error.to_string()))));
            }
            parts.take_usage(&value);
            if let Some(choice) = first_choice(&value)? {
                let delta = &choice["delta"];
                for (key, into) in
                    [("reasoning_content", &mut parts.reasoning_content), ("reasoning", &mut parts.reasoning), ("content", &mut parts.content)]
                {
                    if let Some(text) = delta[key].as_str() {
                        into.push_str(text);
                    }
                }
                if let Some(reason) = choice["finish_reason"].as_str() {
                    parts.finish_reason = Some(reason.to_string());
                }
            }
        }
    }
    // Many servers close the stream without `[DONE]`; a finish reason says it was complete.
    if !done && parts.finish_reason.is_none() {
        return Err(RequestError::Protocol("the stream ended before a finish reason or [DONE]".into()));
    }
    Ok(parts.into_completion())
}
