//! A real HTTP server on loopback that speaks the OpenAI chat-completions protocol the way
//! vLLM, SGLang and the DeepSeek API do, with faults to inject: what the tests and
//! `datagen bench client` run the client against. It answers math prompts: a problem it knows
//! the answer of gets `\boxed{answer}` on even-numbered requests for that problem and a wrong
//! answer on odd ones.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Where the reasoning goes in a response.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shape {
    /// `reasoning_content` (DeepSeek API, SGLang, older vLLM).
    ReasoningContent,
    /// `reasoning` (newer vLLM).
    Reasoning,
    /// `<think>…</think>` in `content`.
    ThinkTags,
    /// `…</think>` in `content`: the template pre-filled `<think>`.
    Prefilled,
}

/// A fault served instead of (or around) a good response.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// 429 with `Retry-After: seconds`.
    TooManyRequests(u64),
    ServerError,
    /// Wait this long before answering (past a client's deadline).
    Hang(Duration),
    /// A 200 whose body (or first stream chunk) is not JSON.
    MalformedJson,
    /// A stream that stops after a few chunks, with no finish reason.
    CutStream,
    /// 401 with a plain-text body.
    Unauthorized,
    /// 402 as the DeepSeek API answers a spent balance.
    PaymentRequired,
    /// 400 for a bad sampling parameter (the same for every request).
    BadParameter,
    /// A stream that goes silent this long after a few chunks (no keep-alives), then goes on.
    Stall(Duration),
    /// 429 with `Retry-After` as an HTTP date this many seconds ahead.
    TooManyRequestsUntil(u64),
}

pub struct Behaviour {
    pub shape: Shape,
    /// Faults served to the first requests, in order; then good responses.
    pub faults: Vec<Fault>,
    /// Delay before every good response.
    pub delay: Duration,
    /// Omit `usage` (as many servers do when streaming).
    pub omit_usage: bool,
    /// End streams without `data: [DONE]`.
    pub no_done: bool,
    /// Send SSE comments / keep-alives between chunks.
    pub keep_alives: bool,
    /// Answer a prompt longer than this many characters as vLLM answers one past
    /// `--max-model-len`: 400 with its context-length message.
    pub max_prompt_chars: Option<usize>,
    /// Advertise this context in `GET /v1/models` (vLLM's `max_model_len`), for every model
    /// asked about; without it, the route is a 404 as on servers that do not give one.
    pub max_model_len: Option<u64>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            shape: Shape::ReasoningContent,
            faults: Vec::new(),
            delay: Duration::ZERO,
            omit_usage: false,
            no_done: false,
            keep_alives: true,
            max_prompt_chars: None,
            max_model_len: None,
        }
    }
}

pub struct Server {
    pub address: SocketAddr,
    pub requests: Arc<AtomicUsize>,
    pub bodies: Arc<Mutex<Vec<(Value, Option<String>)>>>,
    _runtime: tokio::runtime::Runtime,
}

impl Server {
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.address)
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

struct Shared {
    behaviour: Behaviour,
    answers: HashMap<String, String>,
    faults_served: AtomicUsize,
    per_problem: Mutex<HashMap<String, usize>>,
    requests: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<(Value, Option<String>)>>>,
}

/// Starts a server on 127.0.0.1 (a free port) in its own runtime.
pub fn serve(behaviour: Behaviour, answers: HashMap<String, String>) -> Server {
    serve_at(behaviour, answers, 0)
}

/// [`serve`] on a given port of 127.0.0.1 (0: any free one), e.g. to bring a teacher back where
/// a client has been refused.
pub fn serve_at(behaviour: Behaviour, answers: HashMap<String, String>, port: u16) -> Server {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let listener = runtime.block_on(TcpListener::bind(("127.0.0.1", port))).unwrap();
    let address = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let shared = Arc::new(Shared {
        behaviour,
        answers,
        faults_served: AtomicUsize::new(0),
        per_problem: Mutex::new(HashMap::new()),
        requests: requests.clone(),
        bodies: bodies.clone(),
    });
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let shared = shared.clone();
            tokio::spawn(async move {
                let _ = handle(stream, shared).await;
            });
        }
    });
    Server { address, requests, bodies, _runtime: runtime }
}

/// The math prompts bundled in datasets/: problem → answer.
pub fn bundled_answers(problems: &[(String, String)]) -> HashMap<String, String> {
    problems.iter().cloned().collect()
}

async fn read_request(stream: &mut TcpStream) -> std::io::Result<(String, HashMap<String, String>, Vec<u8>)> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    let header_end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
    };
    let head = String::from_utf8_lossy(&buffer[..header_end]).to_string();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())))
        .collect();
    let length: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut body = buffer[header_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok((request_line, headers, body))
}

/// A whole response; the connection stays open for the next request (HTTP/1.1 keep-alive, as
/// vLLM, SGLang and the hosted APIs keep it).
async fn respond(stream: &mut TcpStream, status: &str, content_type: &str, extra: &str, body: &str) -> std::io::Result<bool> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: keep-alive\r\n{extra}\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    Ok(true)
}

/// One chunk of a chunked (keep-alive) event stream.
async fn chunk(stream: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    stream.write_all(format!("{:x}\r\n", data.len()).as_bytes()).await?;
    stream.write_all(data).await?;
    stream.write_all(b"\r\n").await
}

fn completion_text(shared: &Shared, problem_text: &str) -> (String, String) {
    let problem = shared.answers.keys().find(|p| problem_text.contains(p.as_str())).cloned();
    let (answer, attempt) = match &problem {
        Some(p) => {
            let mut counts = shared.per_problem.lock().unwrap();
            let count = counts.entry(p.clone()).or_insert(0);
            *count += 1;
            (shared.answers[p].clone(), *count - 1)
        }
        None => ("0".to_string(), 0),
    };
    let answer = if attempt % 2 == 0 { answer } else { format!("{answer}1") };
    let reasoning = format!("Let me work through this problem carefully.\nAfter checking each step, the result is {answer}.");
    let content = format!("The answer is $\\boxed{{{answer}}}$.");
    (reasoning, content)
}

/// Answers requests on one connection until the client closes it or a response must end it.
async fn handle(mut stream: TcpStream, shared: Arc<Shared>) -> std::io::Result<()> {
    loop {
        let request = read_request(&mut stream).await?;
        if !answer(&mut stream, &shared, request).await? {
            return stream.shutdown().await;
        }
    }
}

/// Answers one request; `false` when the connection must close after it (a cut or broken stream).
async fn answer(stream: &mut TcpStream, shared: &Shared, request: (String, HashMap<String, String>, Vec<u8>)) -> std::io::Result<bool> {
    let (request_line, headers, body) = request;
    let mut stream = stream;
    // The model list is metadata, not a request for the teacher: it is not counted.
    if request_line.starts_with("GET /v1/models") {
        return match shared.behaviour.max_model_len {
            Some(length) => {
                let models = json!({"object": "list", "data": [
                    {"id": "deepseek-ai/DeepSeek-R1", "object": "model", "owned_by": "vllm", "max_model_len": length}
                ]});
                respond(&mut stream, "200 OK", "application/json", "", &models.to_string()).await
            }
            None => respond(&mut stream, "404 Not Found", "text/plain", "", "no such route").await,
        };
    }
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    shared.bodies.lock().unwrap().push((body.clone(), headers.get("authorization").cloned()));
    if !request_line.starts_with("POST /v1/chat/completions") {
        return respond(&mut stream, "404 Not Found", "text/plain", "", "no such route").await;
    }
    let behaviour = &shared.behaviour;
    let problem = body["messages"].as_array().and_then(|m| m.last()).and_then(|m| m["content"].as_str()).unwrap_or_default().to_string();
    if behaviour.max_prompt_chars.is_some_and(|limit| problem.chars().count() > limit) {
        let max_tokens = body["max_tokens"].as_u64().unwrap_or(0);
        let message = format!(
            "This model's maximum context length is 4096 tokens. However, you requested {} tokens ({} in the messages, {max_tokens} in the completion). Please reduce the length of the messages or completion.",
            problem.len() + max_tokens as usize,
            problem.len()
        );
        let error = json!({"object": "error", "message": message, "type": "BadRequestError", "param": null, "code": 400});
        return respond(&mut stream, "400 Bad Request", "application/json", "", &error.to_string()).await;
    }
    let fault_index = shared.faults_served.fetch_add(1, Ordering::SeqCst);
    let fault = behaviour.faults.get(fault_index).cloned();
    match &fault {
        Some(Fault::TooManyRequests(seconds)) => {
            return respond(&mut stream, "429 Too Many Requests", "application/json", &format!("Retry-After: {seconds}\r\n"),
                r#"{"error": {"message": "rate limited", "type": "rate_limit"}}"#).await;
        }
        Some(Fault::ServerError) => return respond(&mut stream, "500 Internal Server Error", "text/html", "", "<html>upstream died</html>").await,
        Some(Fault::Unauthorized) => return respond(&mut stream, "401 Unauthorized", "text/plain", "", "Invalid API key").await,
        Some(Fault::BadParameter) => {
            let error = json!({"object": "error", "message": "top_p must be in (0, 1], got 1.5.", "type": "BadRequestError", "code": 400});
            return respond(&mut stream, "400 Bad Request", "application/json", "", &error.to_string()).await;
        }
        Some(Fault::PaymentRequired) => {
            return respond(&mut stream, "402 Payment Required", "application/json", "",
                r#"{"error": {"message": "Insufficient Balance", "type": "unknown_error", "param": null, "code": "invalid_request_error"}}"#).await;
        }
        Some(Fault::TooManyRequestsUntil(seconds)) => {
            let at = chrono::Utc::now() + chrono::Duration::seconds(*seconds as i64);
            let date = at.format("%a, %d %b %Y %H:%M:%S GMT");
            return respond(&mut stream, "429 Too Many Requests", "application/json", &format!("Retry-After: {date}\r\n"),
                r#"{"error": {"message": "rate limited", "type": "rate_limit"}}"#).await;
        }
        Some(Fault::Hang(duration)) => tokio::time::sleep(*duration).await,
        _ => {}
    }
    tokio::time::sleep(behaviour.delay).await;
    let (reasoning, answer) = completion_text(shared, &problem);
    let (reasoning_content, reasoning_field, content) = match behaviour.shape {
        Shape::ReasoningContent => (Some(reasoning), None, answer),
        Shape::Reasoning => (None, Some(reasoning), answer),
        Shape::ThinkTags => (None, None, format!("<think>\n{reasoning}\n</think>\n\n{answer}")),
        Shape::Prefilled => (None, None, format!("{reasoning}\n</think>\n\n{answer}")),
    };
    let usage = json!({"prompt_tokens": 20, "completion_tokens": 30, "total_tokens": 50});
    if !body["stream"].as_bool().unwrap_or(false) {
        if fault == Some(Fault::MalformedJson) {
            return respond(&mut stream, "200 OK", "application/json", "", "{\"choices\": [{\"message\": ").await;
        }
        let mut message = json!({"role": "assistant", "content": content});
        if let Some(r) = reasoning_content {
            message["reasoning_content"] = json!(r);
        }
        if let Some(r) = reasoning_field {
            message["reasoning"] = json!(r);
        }
        let mut response = json!({"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]});
        if !behaviour.omit_usage {
            response["usage"] = usage;
        }
        return respond(&mut stream, "200 OK", "application/json", "", &response.to_string()).await;
    }
    stream
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n")
        .await?;
    if fault == Some(Fault::MalformedJson) {
        chunk(stream, b"data: {\"choices\": [{\"delta\": \n\n").await?;
        chunk(stream, b"").await?;
        return Ok(true);
    }
    let mut events: Vec<Value> = vec![json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]})];
    let piece = |key: &str, text: &str| -> Vec<Value> {
        text.split_inclusive(' ').map(|t| json!({"choices": [{"index": 0, "delta": {key: t}, "finish_reason": null}]})).collect()
    };
    if let Some(r) = &reasoning_content {
        events.extend(piece("reasoning_content", r));
    }
    if let Some(r) = &reasoning_field {
        events.extend(piece("reasoning", r));
    }
    events.extend(piece("content", &content));
    events.push(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}));
    if !behaviour.omit_usage {
        events.push(json!({"choices": [], "usage": usage}));
    }
    for (index, event) in events.iter().enumerate() {
        if fault == Some(Fault::CutStream) && index == 4 {
            return Ok(false);
        }
        if let Some(Fault::Stall(silence)) = &fault
            && index == 3
        {
            tokio::time::sleep(*silence).await;
        }
        if behaviour.keep_alives && index % 5 == 2 {
            chunk(stream, b": ping\n\n").await?;
        }
        chunk(stream, format!("data: {event}\n\n").as_bytes()).await?;
    }
    if !behaviour.no_done {
        chunk(stream, b"data: [DONE]\n\n").await?;
    }
    chunk(stream, b"").await?;
    Ok(true)
}

