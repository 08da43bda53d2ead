//! `--teacher local:DIR`: a Hugging Face checkpoint run in-process by distill (its chat template,
//! sampling and KV cache), so `datagen run` + `datagen stats` also evaluate a distilled student
//! without a server. Samples are generated one at a time on the chosen device.

use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use distill::generate::{FinishReason, SamplingParams, generate};
use distill::model::LoadOptions;
use distill::pretrained::Pretrained;
use distill::text::Message;

use super::openai::ChatRequest;
use super::{Completion, RequestError};
use crate::reasoning;

pub struct LocalTeacher {
    /// One generation at a time: the model's device work is not shared between samples.
    pretrained: Mutex<Pretrained>,
}

impl LocalTeacher {
    pub fn load(dir: &Path, device: Option<&str>) -> Result<LocalTeacher, String> {
        let (device, _) = distill::device::select(device).map_err(|e| e.to_string())?;
        let pretrained = Pretrained::load(dir, &device, LoadOptions::default()).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(LocalTeacher { pretrained: Mutex::new(pretrained) })
    }

    /// One completion of `request` (its seed picks the sample), with exact token counts.
    pub fn complete(&self, request: &ChatRequest) -> Result<Completion, RequestError> {
        let started = Instant::now();
        let pretrained = self.pretrained.lock().map_err(|_| RequestError::Protocol("the local teacher panicked".into()))?;
        let messages: Vec<Message> = request.messages.iter().map(|(role, content)| Message::new(role.as_str(), content.as_str())).collect();
        let prompt = pretrained.tokenizer.encode_chat(&messages, true).map_err(|e| RequestError::Protocol(e.to_string()))?;
        let params = SamplingParams {
            max_new_tokens: request.max_tokens as usize,
            temperature: request.temperature as f32,
            top_p: request.top_p as f32,
            seed: request.seed.unwrap_or(0),
        };
        let (tokens, finish) = generate(&pretrained.model, &prompt, &params, &pretrained.eos_token_ids, |_| {});
        let text = pretrained.tokenizer.decode(&tokens, true).map_err(|e| RequestError::Protocol(e.to_string()))?;
        let split = reasoning::split(None, None, &text);
        Ok(Completion {
            reasoning: split.reasoning,
            content: split.content,
            parser: split.parser,
            unclosed: split.unclosed,
            finish_reason: Some(match finish {
                FinishReason::Stop => "stop".into(),
                FinishReason::Length => "length".into(),
            }),
            prompt_tokens: Some(prompt.len() as u64),
            completion_tokens: Some(tokens.len() as u64),
            latency_ms: started.elapsed().as_millis() as u64,
        })
    }
}
