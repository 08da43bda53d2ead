//! Autoregressive sampling with the KV cache: greedy, temperature and nucleus (top-p), with
//! the semantics of transformers' `generate` (the first-maximum argmax; top-p keeps the
//! smallest set of tokens whose mass reaches `top_p`, and always at least one).

mod batch;

pub use batch::{BatchGenerator, Finished};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::Model;

#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    /// R1's recommended sampling (temperature 0.6, top-p 0.95).
    fn default() -> Self {
        SamplingParams { max_new_tokens: 256, temperature: 0.6, top_p: 0.95, seed: 0 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token was produced (it is included in the output).
    Stop,
    /// `max_new_tokens` was reached.
    Length,
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let inverse_temperature = 1.0 / self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(id, &logit)| (id as u32, ((logit - max) * inverse_temperature).exp()))
            .collect();
        let total: f32 = candidates.iter().map(|c| c.1).sum();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut kept = 0;
        let mut mass = 0.0;
        for (_, weight) in &candidates {
            kept += 1;
            mass += weight / total;
            if mass >= self.params.top_p {
                break;
            }
        }
        candidates.truncate(kept.max(1));
        let kept_total: f32 = candidates.iter().map(|c| c.1).sum();
        let mut threshold = self.rng.random::<f32>() * kept_total;
        for (id, weight) in &candidates {
            threshold -= weight;
            if threshold <= 0.0 {
                return *id;
            }
        }
        candidates.last().map_or(0, |c| c.0)
    }
}

/// Index of the first maximum, as `torch.argmax`.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (index, value) in values.iter().enumerate() {
        if *value > values[best] {
            best = index;
        }
    }
    best as u32
}

/// Generates after `prompt`; `on_token` sees each new token as it is produced. A batch of one:
/// see [`BatchGenerator`] for many sequences at once.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    params: &SamplingParams,
    eos_token_ids: &[u32],
    mut on_token: impl FnMut(u32),
) -> (Vec<u32>, FinishReason) {
    let mut batch = BatchGenerator::new(eos_token_ids, 1);
    batch.add(0, prompt.to_vec(), params.clone());
    loop {
        if let Some(done) = batch.step(model, |_, token| on_token(token)).pop() {
            return (done.tokens, done.finish_reason);
        }
    }
}

/// Turns a growing list of token ids into text deltas, holding back bytes of a character
/// that is not complete yet (byte-level BPE splits multi-byte characters across tokens).
pub struct TextStream {
    ids: Vec<u32>,
    printed: usize,
}

impl TextStream {
    pub fn new() -> Self {
        TextStream { ids: Vec::new(), printed: 0 }
    }

    pub fn push(&mut self, tokenizer: &crate::text::Tokenizer, token: u32) -> String {
        self.ids.push(token);
        let Ok(text) = tokenizer.decode(&self.ids, true) else {
            return String::new();
        };
        if text.ends_with('\u{FFFD}') || text.len() < self.printed || !text.is_char_boundary(self.printed) {
            return String::new();
        }
        let delta = text[self.printed..].to_string();
        self.printed = text.len();
        // After a newline the next tokens cannot merge with what is printed, so decoding can
        // restart there: each step decodes one line, not the whole generation.
        if delta.ends_with('\n') {
            self.ids.clear();
            self.printed = 0;
        }
        delta
    }
}

impl TextStream {
    /// Whatever is still held back (an incomplete character at the very end).
    pub fn finish(&mut self, tokenizer: &crate::text::Tokenizer) -> String {
        let text = tokenizer.decode(&self.ids, true).unwrap_or_default();
        if text.len() <= self.printed || !text.is_char_boundary(self.printed) {
            return String::new();
        }
        let delta = text[self.printed..].to_string();
        self.printed = text.len();
        delta
    }
}

impl Default for TextStream {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, 1.0]), 1);
        let mut sampler = Sampler::new(SamplingParams { temperature: 0.0, ..Default::default() });
        assert_eq!(sampler.sample(&[0.0, 3.0, 1.0]), 1);
    }

    #[test]
    fn top_p_keeps_the_nucleus_only() {
        // Probabilities ~ [0.88, 0.12, 0.00…]: top_p 0.5 leaves only token 0.
        let mut sampler = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.5, seed: 7, ..Default::default() });
        for _ in 0..100 {
            assert_eq!(sampler.sample(&[2.0, 0.0, -10.0]), 0);
        }
        // With top_p 1.0 both likely tokens appear; the seed makes it reproducible.
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 1.0, seed, ..Default::default() });
            (0..200).map(|_| s.sample(&[2.0, 0.0, -10.0])).collect::<Vec<_>>()
        };
        let a = draw(3);
        assert!(a.contains(&0) && a.contains(&1));
        assert_eq!(a, draw(3));
    }
}
