//! `--teacher local:DIR`: a Hugging Face checkpoint run in-process by distill (its chat template,
//! sampling and KV cache), so `datagen run` + `datagen stats` also evaluate a distilled student
//! without a server.
//!
//! One worker thread owns the model and a [`BatchGenerator`]: requests from the run's tasks
//! queue on a channel, join the batch as soon as there is room (continuous batching, up to
//! `--max-batch-size` sequences), and each gets its completion back as soon as it finishes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;

use distill::generate::{BatchGenerator, FinishReason, SamplingParams};
use distill::model::{LoadOptions, Model};
use distill::pretrained::Pretrained;
use distill::text::{Message, Tokenizer};
use tokio::sync::oneshot;

use super::openai::ChatRequest;
use super::{Completion, RequestError};
use crate::reasoning;

struct Job {
    prompt: Vec<u32>,
    params: SamplingParams,
    reply: oneshot::Sender<(Vec<u32>, FinishReason)>,
}

pub struct LocalTeacher {
    tokenizer: Tokenizer,
    jobs: mpsc::Sender<Job>,
}

impl LocalTeacher {
    /// Loads the checkpoint on `device`, computing in `dtype` (f32, bf16, f16), and starts the
    /// generation thread.
    pub fn load(dir: &Path, device: Option<&str>, dtype: &str, max_batch_size: usize) -> Result<LocalTeacher, String> {
        let (device, name) = distill::device::select(device).map_err(|e| e.to_string())?;
        let dtype = distill::device::dtype(dtype, &device, &name).map_err(|e| e.to_string())?;
        let pretrained = Pretrained::load(dir, &device, LoadOptions::in_dtype(dtype)).map_err(|e| format!("{}: {e}", dir.display()))?;
        let Pretrained { model, tokenizer, eos_token_ids, .. } = pretrained;
        let (jobs, queue) = mpsc::channel();
        std::thread::Builder::new()
            .name("local-teacher".into())
            .spawn(move || generate_forever(&model, BatchGenerator::new(&eos_token_ids, max_batch_size), queue))
            .map_err(|e| format!("starting the local teacher: {e}"))?;
        Ok(LocalTeacher { tokenizer, jobs })
    }

    /// One completion of `request` (its seed picks the sample), with exact token counts.
    pub async fn complete(&self, request: &ChatRequest) -> Result<Completion, RequestError> {
        let started = Instant::now();
        let messages: Vec<Message> = request.messages.iter().map(|(role, content)| Message::new(role.as_str(), content.as_str())).collect();
        let prompt = self.tokenizer.encode_chat(&messages, true).map_err(|e| RequestError::Protocol(e.to_string()))?;
        let prompt_tokens = prompt.len() as u64;
        let params = SamplingParams {
            max_new_tokens: request.max_tokens as usize,
            temperature: request.temperature as f32,
            top_p: request.top_p as f32,
            seed: request.seed.unwrap_or(0),
        };
        let (reply, answer) = oneshot::channel();
        let stopped = || RequestError::Protocol("the local teacher's generation thread stopped (see the error above)".into());
        self.jobs.send(Job { prompt, params, reply }).map_err(|_| stopped())?;
        let (tokens, finish) = answer.await.map_err(|_| stopped())?;
        let text = self.tokenizer.decode(&tokens, true).map_err(|e| RequestError::Protocol(e.to_string()))?;
        let split = reasoning::split(None, None, &text);
        Ok(Completion {
            reasoning: split.reasoning,
            content: split.content,
            parser: split.parser,
            finish_reason: Some(match finish {
                FinishReason::Stop => "stop".into(),
                FinishReason::Length => "length".into(),
            }),
            prompt_tokens: Some(prompt_tokens),
            completion_tokens: Some(tokens.len() as u64),
            latency_ms: started.elapsed().as_millis() as u64,
        })
    }
}

/// The generation thread: admits every queued request, steps the batch, answers the finished
/// ones; sleeps on the queue when there is nothing to do; ends when the teacher is dropped.
fn generate_forever(model: &Model, mut batch: BatchGenerator, queue: mpsc::Receiver<Job>) {
    let mut replies = HashMap::new();
    let mut next_id = 0u64;
    loop {
        let mut arrived: Vec<Job> = Vec::new();
        if batch.is_empty() {
            match queue.recv() {
                Ok(job) => arrived.push(job),
                Err(_) => return,
            }
        }
        arrived.extend(queue.try_iter());
        for job in arrived {
            batch.add(next_id, job.prompt, job.params);
            replies.insert(next_id, job.reply);
            next_id += 1;
        }
        for finished in batch.step(model, |_, _| {}) {
            if let Some(reply) = replies.remove(&finished.id) {
                // The caller may be gone (the run was interrupted); nothing to do then.
                let _ = reply.send((finished.tokens, finished.finish_reason));
            }
        }
    }
}
