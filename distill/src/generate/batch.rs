//! Continuous batching: many sequences decode together in one forward pass per token, and a
//! sequence that finishes leaves the batch at once so a waiting one can take its place, as
//! vLLM's scheduler does (without paged memory: the KV cache is one tensor per layer).
//!
//! Rows are left-padded to a common key length. Each row keeps its own positions (RoPE as if
//! it ran alone) and a mask that hides the padding, so every row produces what it would alone,
//! up to the summation order of the batched matmuls.

use std::collections::VecDeque;

use burn::tensor::{Int, Tensor, TensorData};

use super::{FinishReason, Sampler, SamplingParams};
use crate::model::{Model, ModelCache};

/// A finished sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub id: u64,
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
}

struct Waiting {
    id: u64,
    prompt: Vec<u32>,
    params: SamplingParams,
}

struct Running {
    id: u64,
    sampler: Sampler,
    max_new_tokens: usize,
    generated: Vec<u32>,
    /// Position of the last generated token, which is fed to the model next.
    position: usize,
    /// One entry per cached key: `false` for left padding.
    visible: Vec<bool>,
}

pub struct BatchGenerator {
    eos_token_ids: Vec<u32>,
    max_batch_size: usize,
    cache: ModelCache,
    running: Vec<Running>,
    waiting: VecDeque<Waiting>,
}

impl BatchGenerator {
    /// `max_batch_size` sequences at most run together (vLLM's `--max-num-seqs`).
    pub fn new(eos_token_ids: &[u32], max_batch_size: usize) -> Self {
        BatchGenerator {
            eos_token_ids: eos_token_ids.to_vec(),
            max_batch_size: max_batch_size.max(1),
            cache: ModelCache::default(),
            running: Vec::new(),
            waiting: VecDeque::new(),
        }
    }

    /// Queues a sequence; `id` names it in [`Finished`] and `on_token`.
    pub fn add(&mut self, id: u64, prompt: Vec<u32>, params: SamplingParams) {
        self.waiting.push_back(Waiting { id, prompt, params });
    }

    /// Nothing running and nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// One forward pass: the prompts of waiting sequences while there is room in the batch
    /// (prefill first, as vLLM schedules), otherwise one token for every running sequence.
    /// `on_token(id, token)` sees each new token; returns the sequences that finished.
    pub fn step(&mut self, model: &Model, mut on_token: impl FnMut(u64, u32)) -> Vec<Finished> {
        let mut finished = Vec::new();
        // Sequences that need no forward pass finish at once, as before any batching.
        self.waiting.retain(|w| {
            let trivial = w.prompt.is_empty() || w.params.max_new_tokens == 0;
            if trivial {
                finished.push(Finished { id: w.id, tokens: Vec::new(), finish_reason: FinishReason::Length });
            }
            !trivial
        });
        let room = self.max_batch_size.saturating_sub(self.running.len());
        let (first_stepped, logits) = if room > 0 && !self.waiting.is_empty() {
            let admitted: Vec<Waiting> = self.waiting.drain(..room.min(self.waiting.len())).collect();
            let first = self.running.len();
            (first, self.prefill(model, admitted))
        } else if !self.running.is_empty() {
            (0, self.decode(model))
        } else {
            return finished;
        };

        let vocab = logits.dims()[1];
        let values = logits.into_data().convert::<f32>();
        let values = values.as_slice::<f32>().expect("logits converted to f32");
        let mut keep = Vec::with_capacity(self.running.len());
        for (index, row) in self.running.iter_mut().enumerate() {
            if index < first_stepped {
                keep.push(true);
                continue;
            }
            let offset = (index - first_stepped) * vocab;
            let token = row.sampler.sample(&values[offset..offset + vocab]);
            row.generated.push(token);
            on_token(row.id, token);
            let reason = if self.eos_token_ids.contains(&token) {
                Some(FinishReason::Stop)
            } else if row.generated.len() >= row.max_new_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(finish_reason) = reason {
                finished.push(Finished { id: row.id, tokens: std::mem::take(&mut row.generated), finish_reason });
            }
            keep.push(reason.is_none());
        }
        self.retire(&keep);
        finished
    }

    /// Runs the admitted prompts, left-padded to one length, into a cache of their own and
    /// merges it into the batch's. Returns their last-token logits.
    fn prefill(&mut self, model: &Model, admitted: Vec<Waiting>) -> Tensor<2> {
        let width = admitted.iter().map(|w| w.prompt.len()).max().unwrap_or(0);
        let mut tokens = Vec::with_capacity(admitted.len());
        let mut positions = Vec::with_capacity(admitted.len());
        let mut visible = Vec::with_capacity(admitted.len());
        for waiting in &admitted {
            let padding = width - waiting.prompt.len();
            // Padding holds token 0 at position 0; no real token ever attends to it.
            tokens.push([vec![0; padding], waiting.prompt.clone()].concat());
            positions.push([vec![0; padding], (0..waiting.prompt.len()).collect()].concat());
            visible.push([vec![false; padding], vec![true; waiting.prompt.len()]].concat());
        }
        let mut cache = model.new_cache();
        let logits = model.step_batch(&tokens, &positions, &visible, &mut cache);

        let new_rows: Vec<Running> = admitted
            .into_iter()
            .zip(visible)
            .map(|(waiting, visible)| Running {
                id: waiting.id,
                max_new_tokens: waiting.params.max_new_tokens,
                sampler: Sampler::new(waiting.params),
                generated: Vec::new(),
                position: waiting.prompt.len(),
                visible,
            })
            .collect();
        if self.running.is_empty() {
            self.cache = cache;
        } else {
            let old_length = self.cache.len();
            let length = old_length.max(width);
            let old = left_pad(std::mem::take(&mut self.cache), length - old_length);
            let new = left_pad(cache, length - width);
            self.cache = ModelCache {
                layers: old
                    .layers
                    .into_iter()
                    .zip(new.layers)
                    .map(|(old, new)| crate::model::attention::LayerCache {
                        keys: Some(Tensor::cat(vec![old.keys.expect("cached keys"), new.keys.expect("cached keys")], 0)),
                        values: Some(Tensor::cat(vec![old.values.expect("cached values"), new.values.expect("cached values")], 0)),
                    })
                    .collect(),
            };
            for row in &mut self.running {
                pad_visible(&mut row.visible, length);
            }
        }
        for mut row in new_rows {
            pad_visible(&mut row.visible, self.cache.len());
            self.running.push(row);
        }
        logits
    }

    /// One token for every running sequence.
    fn decode(&mut self, model: &Model) -> Tensor<2> {
        let tokens: Vec<Vec<u32>> = self.running.iter().map(|row| vec![*row.generated.last().expect("a sampled token")]).collect();
        let positions: Vec<Vec<usize>> = self.running.iter().map(|row| vec![row.position]).collect();
        for row in &mut self.running {
            row.visible.push(true);
            row.position += 1;
        }
        let visible: Vec<Vec<bool>> = self.running.iter().map(|row| row.visible.clone()).collect();
        model.step_batch(&tokens, &positions, &visible, &mut self.cache)
    }

    /// Drops finished rows from the batch and the cache, then the padding columns no row needs.
    fn retire(&mut self, keep: &[bool]) {
        if keep.iter().all(|&k| k) {
            return;
        }
        let kept: Vec<i64> = keep.iter().enumerate().filter(|(_, k)| **k).map(|(i, _)| i as i64).collect();
        let mut index = 0;
        self.running.retain(|_| {
            index += 1;
            keep[index - 1]
        });
        if self.running.is_empty() {
            self.cache = ModelCache::default();
            return;
        }
        let unused = self.running.iter().map(|row| row.visible.iter().take_while(|v| !**v).count()).min().unwrap_or(0);
        let length = self.cache.len();
        for layer in &mut self.cache.layers {
            for tensor in [&mut layer.keys, &mut layer.values] {
                if let Some(t) = tensor.take() {
                    let indices = Tensor::<1, Int>::from_data(TensorData::new(kept.clone(), [kept.len()]), &t.device());
                    *tensor = Some(t.select(0, indices).narrow(2, unused, length - unused));
                }
            }
        }
        for row in &mut self.running {
            row.visible.drain(..unused);
        }
    }
}

/// Adds `by` zero keys and values at the start of every row of `cache`.
fn left_pad(mut cache: ModelCache, by: usize) -> ModelCache {
    if by == 0 {
        return cache;
    }
    for layer in &mut cache.layers {
        for tensor in [&mut layer.keys, &mut layer.values] {
            if let Some(t) = tensor.take() {
                let [batch, heads, _, head_dim] = t.dims();
                let zeros = Tensor::<4>::zeros([batch, heads, by, head_dim], (&t.device(), t.dtype()));
                *tensor = Some(Tensor::cat(vec![zeros, t], 2));
            }
        }
    }
    cache
}

fn pad_visible(visible: &mut Vec<bool>, length: usize) {
    let padding = length - visible.len();
    visible.splice(0..0, std::iter::repeat_n(false, padding));
}
