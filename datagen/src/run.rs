//! `datagen run`: every (prompt, sample index) not yet stored is requested from the teacher,
//! verified, filtered and stored exactly once.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};

use crate::prompts::Prompt;
use crate::schema::{Message, Row};
use crate::scoring::{ScoreOptions, score};
use crate::store::{Store, StoreError};
use crate::teacher::openai::{ChatRequest, advertised_context, chat};
use crate::teacher::pool::{EndpointReport, Pool};
use crate::teacher::{Completion, RequestError, backoff};
use crate::verify::VerifyConfig;

/// The R1 paper's instruction for math prompts, appended to each problem.
pub const DEFAULT_TEMPLATE: &str = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}.";

/// Everything that decides what the teacher is asked; hashed into every sample's key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub model: String,
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens: u64,
    pub prompt_template: String,
    pub system_prompt: Option<String>,
}

impl Sampling {
    /// 16 hex digits of the SHA-256 of the settings: samples drawn with other settings get
    /// other keys, and are never mistaken for finished ones.
    pub fn hash(&self) -> String {
        crate::prompts::hash_id(&serde_json::to_string(self).expect("plain struct"))
    }

    pub fn messages(&self, problem: &str) -> Vec<(String, String)> {
        let mut messages = Vec::new();
        if let Some(system) = &self.system_prompt {
            messages.push(("system".to_string(), system.clone()));
        }
        messages.push(("user".to_string(), self.prompt_template.replace("{problem}", problem)));
        messages
    }
}

pub fn key(prompt_id: &str, sample_index: u32, sampling_hash: &str) -> String {
    format!("{prompt_id}/{sample_index}/{sampling_hash}")
}

#[derive(Clone)]
pub struct RunConfig {
    pub out: PathBuf,
    pub endpoints: Vec<String>,
    pub api_key: Option<String>,
    pub sampling: Sampling,
    pub samples: u32,
    pub concurrency: usize,
    pub stream: bool,
    pub max_retries: u32,
    /// Extra attempts for a completion cut by `max_tokens` (0: keep it, rejected).
    pub length_retries: u32,
    pub request_timeout: Duration,
    /// Longest wait between two streamed chunks.
    pub stall_timeout: Duration,
    /// How long an outage (every endpoint failing) is waited out before retries count again.
    pub max_outage: Duration,
    /// Account limits of hosted APIs: requests and tokens (prompt + completion) per minute.
    pub max_requests_per_minute: Option<u32>,
    pub max_tokens_per_minute: Option<u64>,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub score: ScoreOptions,
    pub verify: VerifyConfig,
    pub shard_rows: usize,
    pub generation: u32,
    /// The teacher's tokenizer, to count tokens when a server sends no `usage`.
    pub tokenizer: Option<Arc<distill::text::Tokenizer>>,
    /// `--teacher local:DIR`: generate in-process instead of calling `endpoints`.
    pub local: Option<Arc<crate::teacher::local::LocalTeacher>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the teacher refused the request ({endpoint}): {error}; fix the request, the model name or the API key (this is not retried)")]
    Fatal { endpoint: String, error: RequestError },
    #[error(
        "--max-tokens {max_tokens} leaves no room for the prompt: {endpoint} serves {model} with a context of {context} tokens (max_model_len); \
         lower --max-tokens, or give --tokenizer (the teacher's tokenizer folder) so that each request asks for what fits after its prompt"
    )]
    NoRoom { endpoint: String, model: String, context: u64, max_tokens: u64 },
}

/// What a run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub requested: usize,
    pub stored: usize,
    pub accepted: usize,
    pub failed: usize,
    pub already_done: usize,
    pub interrupted: bool,
    pub endpoints: Vec<EndpointReport>,
}

/// Tokens left unasked when --max-tokens is fitted to the server's context after the prompt.
const CONTEXT_MARGIN: u64 = 16;

/// Answers in a row that are request errors of class `invalid_request`, with no success before
/// them, after which a fresh run (nothing stored yet) stops: the settings, not the prompts, are
/// wrong. A resume never stops for them: its earlier answers showed the settings work.
const INVALID_BEFORE_STOP: usize = 8;

/// Requests- and tokens-per-minute limits as leaky buckets that refill continuously and hold at
/// most a second's worth (at least one request). A request waits until both have room; it
/// reserves the tokens a request has used on average (the first one goes alone, to learn that
/// average), and the reservation is settled with its real usage when it finishes, so that many
/// requests in flight do not overshoot the tokens limit.
pub struct Limiter {
    requests_per_second: Option<f64>,
    tokens_per_second: Option<f64>,
    state: std::sync::Mutex<Buckets>,
}

struct Buckets {
    requests: f64,
    tokens: f64,
    at: Instant,
    /// Tokens per request so far (a moving average); `None` until one finished.
    mean_tokens: Option<f64>,
    /// The first request is out and its usage not known yet.
    probing: bool,
}

impl Limiter {
    pub fn new(requests_per_minute: Option<u32>, tokens_per_minute: Option<u64>) -> Limiter {
        let requests_per_second = requests_per_minute.filter(|&n| n > 0).map(|n| f64::from(n) / 60.0);
        let tokens_per_second = tokens_per_minute.filter(|&n| n > 0).map(|n| n as f64 / 60.0);
        let buckets = Buckets {
            requests: requests_per_second.map_or(0.0, |r| r.max(1.0)),
            tokens: tokens_per_second.unwrap_or(0.0),
            at: Instant::now(),
            mean_tokens: None,
            probing: false,
        };
        Limiter { requests_per_second, tokens_per_second, state: std::sync::Mutex::new(buckets) }
    }

    /// Waits until one more request fits both limits and takes it; returns the tokens reserved,
    /// to give to [`Limiter::settle`].
    pub async fn admit(&self) -> f64 {
        loop {
            let wait = {
                let mut state = self.state.lock().expect("limiter lock");
                let now = Instant::now();
                let elapsed = now.duration_since(state.at).as_secs_f64();
                state.at = now;
                if let Some(rate) = self.requests_per_second {
                    state.requests = (state.requests + rate * elapsed).min(rate.max(1.0));
                }
                if let Some(rate) = self.tokens_per_second {
                    state.tokens = (state.tokens + rate * elapsed).min(rate);
                }
                let requests_short = self.requests_per_second.map_or(0.0, |rate| ((1.0 - state.requests) / rate).max(0.0));
                let tokens_short = self.tokens_per_second.map_or(0.0, |rate| (-state.tokens / rate).max(0.0));
                let learning = self.tokens_per_second.is_some() && state.mean_tokens.is_none() && state.probing;
                let wait = if learning { 0.05 } else { requests_short.max(tokens_short) };
                if wait <= 0.0 {
                    state.requests -= 1.0;
                    let reserved = if self.tokens_per_second.is_some() { state.mean_tokens.unwrap_or(0.0) } else { 0.0 };
                    state.tokens -= reserved;
                    state.probing |= self.tokens_per_second.is_some() && state.mean_tokens.is_none();
                    return reserved;
                }
                wait
            };
            tokio::time::sleep(Duration::from_secs_f64(wait.min(60.0))).await;
        }
    }

    /// Settles a request's reservation with the tokens it used (`None`: it failed, nothing used).
    pub fn settle(&self, reserved: f64, used: Option<u64>) {
        if self.tokens_per_second.is_none() {
            return;
        }
        let mut state = self.state.lock().expect("limiter lock");
        let used = used.map(|n| n as f64);
        state.tokens += reserved - used.unwrap_or(0.0);
        if let Some(used) = used {
            state.mean_tokens = Some(state.mean_tokens.map_or(used, |mean| 0.8 * mean + 0.2 * used));
        }
        state.probing = false;
    }
}

/// Progress of a run, for a progress bar.
pub trait Progress: Send {
    fn start(&mut self, samples: usize, prompts: usize);
    fn sample(&mut self, row: &Row, prompts_done: usize);
    fn finish(&mut self);
}

/// No feedback (tests, libraries).
pub struct Quiet;

impl Progress for Quiet {
    fn start(&mut self, _: usize, _: usize) {}
    fn sample(&mut self, _: &Row, _: usize) {}
    fn finish(&mut self) {}
}

struct Outcome {
    prompt: usize,
    sample_index: u32,
    /// What the request asked for (below --max-tokens when fitted to the server's context).
    max_tokens: u64,
    result: Result<(Completion, String, u32), (RequestError, Option<String>, u32)>,
}

/// One sample: retried with backoff across the pool until it succeeds, a fatal error, or
/// `max_retries` is spent.
async fn sample(
    http: reqwest::Client,
    pool: Arc<Pool>,
    config: Arc<RunConfig>,
    request: ChatRequest,
    refused: Arc<AtomicBool>,
    limiter: Arc<Limiter>,
) -> Result<(Completion, String, u32), (RequestError, Option<String>, u32)> {
    let mut attempts = 0u32;
    // Retries spent against --max-retries (those waiting out an outage are not).
    let mut counted = 0u32;
    let mut length_retries = 0u32;
    if let Some(teacher) = config.local.clone() {
        let completion = teacher.complete(&request).await.map_err(|e| (e, None, 1))?;
        return Ok((completion, "local".to_string(), 1));
    }
    loop {
        attempts += 1;
        let reserved = limiter.admit().await;
        let lease = pool.acquire();
        let endpoint = lease.url().to_string();
        let answer = chat(&http, &endpoint, config.api_key.as_deref(), &request, config.request_timeout, config.stall_timeout).await;
        if answer.is_err() {
            limiter.settle(reserved, None);
        }
        match answer {
            Ok(completion) => {
                lease.succeeded(completion.latency_ms);
                // Without usage from the server, about four characters a token.
                let text = completion.reasoning.as_deref().unwrap_or("").len() + completion.content.len();
                limiter.settle(reserved, Some(completion.prompt_tokens.unwrap_or(0) + completion.completion_tokens.unwrap_or(text as u64 / 4)));
                if completion.finish_reason.as_deref() == Some("length") && length_retries < config.length_retries {
                    length_retries += 1;
                    continue;
                }
                return Ok((completion, endpoint, attempts));
            }
            Err(error) if error.is_fatal() => {
                lease.failed();
                refused.store(true, Ordering::SeqCst);
                return Err((error, Some(endpoint), attempts));
            }
            // The endpoint is healthy; this request is not (too long, a bad parameter).
            Err(error) if error.is_request_error() => {
                lease.answered();
                return Err((error, Some(endpoint), attempts));
            }
            Err(error) => {
                lease.failed();
                // While every endpoint is failing the teacher is down, not this sample: wait it
                // out (up to --max-outage) without spending the sample's retries.
                let waiting_out = pool.outage_since().is_some_and(|since| since.elapsed() < config.max_outage);
                if !waiting_out {
                    counted += 1;
                }
                if counted > config.max_retries {
                    return Err((error, Some(endpoint), attempts));
                }
                let wait = backoff(attempts - 1, config.backoff_base, config.backoff_cap, error.retry_after(), rand::random::<f64>());
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// The current time as stored in rows and manifests (RFC 3339, milliseconds, UTC).
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn row_for(prompt: &Prompt, sample_index: u32, config: &RunConfig, sampling_hash: &str) -> Row {
    Row {
        key: key(&prompt.id, sample_index, sampling_hash),
        id: prompt.id.clone(),
        source: prompt.source.clone(),
        problem: prompt.problem.clone(),
        reference_answer: prompt.answer.clone(),
        sample_index,
        status: "ok".into(),
        error: None,
        error_class: None,
        reasoning: None,
        content: None,
        messages: None,
        extracted_answer: None,
        correct: None,
        verdict: None,
        verifier: None,
        filters_failed: Vec::new(),
        accepted: false,
        finish_reason: None,
        prompt_tokens: None,
        completion_tokens: None,
        usage_source: None,
        teacher_model: config.sampling.model.clone(),
        endpoint: None,
        temperature: config.sampling.temperature,
        top_p: config.sampling.top_p,
        max_tokens: config.sampling.max_tokens,
        latency_ms: None,
        attempts: 0,
        reasoning_parser: None,
        created_at: now(),
    }
}

/// Runs the whole prompt set; returns when every sample is stored, at a fatal error, or when
/// `stop` resolves (Ctrl-C), always with every finished sample stored.
pub async fn run(
    prompts: &[Prompt],
    config: RunConfig,
    progress: &mut dyn Progress,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Summary, RunError> {
    let sampling_hash = config.sampling.hash();
    let mut store = Store::open(&config.out.join("data"), config.generation, config.shard_rows)?;
    let mut summary = Summary::default();
    let mut remaining_per_prompt: Vec<u32> = vec![0; prompts.len()];
    let mut todo = Vec::new();
    for (index, prompt) in prompts.iter().enumerate() {
        for sample_index in 0..config.samples {
            if store.contains(&key(&prompt.id, sample_index, &sampling_hash)) {
                summary.already_done += 1;
            } else {
                remaining_per_prompt[index] += 1;
                todo.push((index, sample_index));
            }
        }
    }
    let mut prompts_done = remaining_per_prompt.iter().filter(|&&n| n == 0).count();
    summary.requested = todo.len();
    progress.start(todo.len(), prompts.len());

    let config = Arc::new(config);
    let pool = Arc::new(Pool::new(config.endpoints.clone(), 3, Duration::from_secs(30)));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(config.concurrency)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| RunError::Fatal { endpoint: String::new(), error: RequestError::Transport(e.to_string()) })?;
    // The servers' context: --max-tokens must leave room for the prompt (vLLM answers a prompt
    // plus max_tokens past --max-model-len with a 400 on every request).
    let mut context: Option<u64> = None;
    if config.local.is_none() {
        for endpoint in &config.endpoints {
            if let Some(length) = advertised_context(&http, endpoint, config.api_key.as_deref(), &config.sampling.model).await {
                if config.sampling.max_tokens >= length && config.tokenizer.is_none() {
                    return Err(RunError::NoRoom {
                        endpoint: endpoint.clone(),
                        model: config.sampling.model.clone(),
                        context: length,
                        max_tokens: config.sampling.max_tokens,
                    });
                }
                context = Some(context.map_or(length, |c| c.min(length)));
            }
        }
    }
    let limiter = Arc::new(Limiter::new(config.max_requests_per_minute, config.max_tokens_per_minute));
    let (sender, mut receiver) = mpsc::channel::<Outcome>(config.concurrency.max(1) * 2);
    let permits = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    // Set by the first fatal answer (a wrong key): nothing more is sent.
    let refused = Arc::new(AtomicBool::new(false));
    {
        let refused = refused.clone();
        let (config, pool, http, prompts) = (config.clone(), pool.clone(), http.clone(), prompts.to_vec());
        let permits = permits.clone();
        // The dispatcher holds `concurrency` requests in flight and no more.
        tasks.spawn(async move {
            let mut inner = tokio::task::JoinSet::new();
            for (prompt, sample_index) in todo {
                let Ok(permit) = permits.clone().acquire_owned().await else { break };
                if refused.load(Ordering::SeqCst) {
                    break;
                }
                let messages = config.sampling.messages(&prompts[prompt].problem);
                // With the server's context and the tokenizer, ask for what fits after the prompt.
                let max_tokens = match (context, &config.tokenizer) {
                    (Some(context), Some(tokenizer)) => {
                        let chat: Vec<distill::text::Message> = messages.iter().map(|(role, content)| distill::text::Message::new(role.as_str(), content.as_str())).collect();
                        let prompt_tokens = tokenizer.encode_chat(&chat, true).map_or(0, |ids| ids.len() as u64);
                        // A margin for what a local count can miss (a BOS, a template's detail).
                        config.sampling.max_tokens.min(context.saturating_sub(prompt_tokens + CONTEXT_MARGIN).max(1))
                    }
                    _ => config.sampling.max_tokens,
                };
                let request = ChatRequest {
                    model: config.sampling.model.clone(),
                    messages,
                    temperature: config.sampling.temperature,
                    top_p: config.sampling.top_p,
                    max_tokens,
                    stream: config.stream,
                    // Only the local teacher uses it: each sample its own draw, reproducibly.
                    seed: config.local.as_ref().map(|_| sample_index as u64),
                };
                let (http, pool, config, sender, refused, limiter) =
                    (http.clone(), pool.clone(), config.clone(), sender.clone(), refused.clone(), limiter.clone());
                inner.spawn(async move {
                    let result = sample(http, pool, config, request, refused, limiter).await;
                    drop(permit);
                    let _ = sender.send(Outcome { prompt, sample_index, max_tokens, result }).await;
                });
                // Reap finished tasks so the set does not grow with the prompt set.
                while inner.try_join_next().is_some() {}
            }
            drop(sender);
            while inner.join_next().await.is_some() {}
        });
    }

    let score_options = config.score.clone();
    // Answers so far that were all `invalid_request` (0 once anything else came).
    let mut invalid_only = 0usize;
    tokio::pin!(stop);
    let outcome: Result<(), RunError> = loop {
        let outcome = tokio::select! {
            outcome = receiver.recv() => outcome,
            () = &mut stop => {
                summary.interrupted = true;
                break Ok(());
            }
        };
        let Some(Outcome { prompt, sample_index, max_tokens, result }) = outcome else { break Ok(()) };
        let mut row = row_for(&prompts[prompt], sample_index, &config, &sampling_hash);
        row.max_tokens = max_tokens;
        invalid_only = match &result {
            Err((error, _, _)) if error.class() == "invalid_request" && invalid_only == summary.stored => invalid_only + 1,
            _ => 0,
        };
        match result {
            Ok((completion, endpoint, attempts)) => {
                let user = config.sampling.messages(&prompts[prompt].problem);
                let mut messages: Vec<Message> = user.into_iter().map(|(role, content)| Message { role, content }).collect();
                messages.push(Message {
                    role: "assistant".into(),
                    content: crate::reasoning::assistant_turn(completion.reasoning.as_deref(), &completion.content),
                });
                let (mut prompt_tokens, mut completion_tokens) = (completion.prompt_tokens, completion.completion_tokens);
                let counted_by = if config.local.is_some() { "local" } else { "server" };
                row.usage_source = completion_tokens.map(|_| counted_by.to_string());
                if completion_tokens.is_none()
                    && let Some(tokenizer) = &config.tokenizer
                {
                    let chat: Vec<distill::text::Message> =
                        messages[..messages.len() - 1].iter().map(|m| distill::text::Message::new(m.role.as_str(), m.content.as_str())).collect();
                    let assistant = &messages[messages.len() - 1].content;
                    // The reasoning and the answer as generated (the pre-filled `<think>` included).
                    completion_tokens = tokenizer.encode(assistant, false).ok().map(|ids| ids.len() as u64);
                    prompt_tokens = prompt_tokens.or_else(|| tokenizer.encode_chat(&chat, true).ok().map(|ids| ids.len() as u64));
                    row.usage_source = completion_tokens.map(|_| "local".to_string());
                }
                // The trace is stored once, in `messages`; the row's reasoning and answer are what
                // a reader derives from it, so scoring now and rescoring later see the same text.
                row.messages = Some(messages);
                row.derive_trace();
                row.finish_reason = completion.finish_reason;
                row.prompt_tokens = prompt_tokens;
                row.completion_tokens = completion_tokens;
                row.endpoint = Some(endpoint);
                row.latency_ms = Some(completion.latency_ms);
                row.attempts = attempts;
                row.reasoning_parser = Some(completion.parser.as_str().to_string());
                score(&mut row, &score_options, &config.verify);
            }
            Err((error, endpoint, _)) if error.is_fatal() => {
                break Err(RunError::Fatal { endpoint: endpoint.unwrap_or_default(), error });
            }
            Err((error, endpoint, _))
                if error.class() == "invalid_request"
                    && summary.already_done == 0
                    && invalid_only >= INVALID_BEFORE_STOP.min(summary.requested) =>
            {
                // Every answer so far refused the request itself: a setting is wrong for all.
                break Err(RunError::Fatal { endpoint: endpoint.unwrap_or_default(), error });
            }
            Err((error, endpoint, attempts)) => {
                row.status = "failed".into();
                row.error_class = Some(error.class().to_string());
                row.error = Some(error.to_string());
                row.endpoint = endpoint;
                row.attempts = attempts;
                summary.failed += 1;
            }
        }
        summary.stored += 1;
        summary.accepted += row.accepted as usize;
        remaining_per_prompt[prompt] -= 1;
        if remaining_per_prompt[prompt] == 0 {
            prompts_done += 1;
        }
        progress.sample(&row, prompts_done);
        if let Err(error) = store.append(row) {
            break Err(error.into());
        }
    };
    // In-flight requests are abandoned; their samples are asked for again next time.
    permits.close();
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    store.compact()?;
    progress.finish();
    summary.endpoints = pool.report();
    outcome.map(|()| summary)
}

/// `manifest.json`: the run's configuration and provenance (never the API key), written
/// atomically.
pub fn write_manifest(out: &Path, manifest: &serde_json::Value) -> Result<(), StoreError> {
    let text = serde_json::to_string_pretty(manifest).expect("JSON value");
    crate::store::write_atomically(&out.join("manifest.json"), |file| {
        std::io::Write::write_all(file, text.as_bytes()).map_err(|e| e.to_string())
    })
}

/// Reads `manifest.json` of a run folder.
pub fn read_manifest(out: &Path) -> Result<serde_json::Value, StoreError> {
    let path = out.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|e| StoreError::File { path: path.clone(), message: e.to_string() })?;
    serde_json::from_str(&text).map_err(|e| StoreError::File { path, message: e.to_string() })
}
