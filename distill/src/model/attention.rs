//! Grouped-query self-attention with a KV cache.
//!
//! Whole sequences (training, scoring, prefill) go through [`crate::ops::attention`], which
//! keeps O(seq) per layer; tokens appended to a KV cache attend densely to it, which for
//! one-token decode steps is linear in the cache.
//!
//! GQA is done by viewing the query heads as `[kv_heads, group]` and broadcasting K/V over the
//! group axis in the matmul, so K and V are never repeated per query head (transformers'
//! `repeat_kv` copies them `group` times).

use std::sync::Arc;

use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};

use super::linear::Linear;
use super::lora::{AttentionLora, project};
use super::transformer::Pass;
use crate::ops::attention::Plan;

#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// LoRA adapters (training with `--lora-rank`); `None` for a plain model.
    pub lora: Option<AttentionLora>,
}

/// Keys and values of the tokens seen so far, per layer: `[batch, kv_heads, seq, head_dim]`.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    pub keys: Option<Tensor<4>>,
    pub values: Option<Tensor<4>>,
}

impl LayerCache {
    pub fn len(&self) -> usize {
        self.keys.as_ref().map_or(0, |k| k.dims()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn append(&mut self, keys: Tensor<4>, values: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let keys = match self.keys.take() {
            Some(past) => Tensor::cat(vec![past, keys], 2),
            None => keys,
        };
        let values = match self.values.take() {
            Some(past) => Tensor::cat(vec![past, values], 2),
            None => values,
        };
        self.keys = Some(keys.clone());
        self.values = Some(values.clone());
        (keys, values)
    }
}

/// Which keys each query sees in one forward pass.
#[derive(Debug, Clone)]
pub enum Visibility {
    /// Memory-efficient attention over a [`Layout`] (training, scoring, and prefill into an
    /// empty cache): the queries are the whole sequence.
    Planned(Arc<Plan>),
    /// Queries appended to a KV cache (decoding): an additive bias `[batch, 1, 1, queries,
    /// keys]` (0 = visible, -inf = hidden) on the inner device, or `None` when every query sees
    /// every key. Its size is queries × keys, linear in the keys for one-token steps.
    Cached(Option<Tensor<5>>),
}

impl Visibility {
    /// The bias for `queries` new tokens after what the cache holds: query `i` of row `b` sees
    /// key `j` when `visible[b][j]` and `j` is not after it.
    pub fn cached(visible: &[Vec<bool>], queries: usize, device: &Device) -> Self {
        if queries == 1 && visible.iter().all(|row| row.iter().all(|&v| v)) {
            return Visibility::Cached(None);
        }
        let keys = visible.first().map_or(0, Vec::len);
        let past = keys - queries;
        let bias: Vec<f32> = visible
            .iter()
            .flat_map(|row| (0..queries).flat_map(move |i| row.iter().enumerate().map(move |(j, &v)| if v && j <= past + i { 0.0 } else { f32::NEG_INFINITY })))
            .collect();
        let data = TensorData::new(bias, [visible.len(), 1, 1, queries, keys]);
        Visibility::Cached(Some(Tensor::from_data(data, &device.clone().inner())))
    }
}

impl Attention {
    /// `x`: `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<3>, pass: &Pass, cache: Option<&mut LayerCache>) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        let heads = |t: Tensor<3>, n: usize| t.reshape([batch, seq, n, self.head_dim]).swap_dims(1, 2);

        let lora = self.lora.as_ref();
        let dropout = pass.dropout.is_some();
        let q = project(&self.q_proj, lora.and_then(|l| l.q_proj.as_ref()), x.clone(), dropout);
        let k = project(&self.k_proj, lora.and_then(|l| l.k_proj.as_ref()), x.clone(), dropout);
        let v = project(&self.v_proj, lora.and_then(|l| l.v_proj.as_ref()), x, dropout);
        let q = crate::ops::rope::rope_heads(&pass.rope, q, self.num_heads);
        let k = crate::ops::rope::rope_heads(&pass.rope, k, self.num_kv_heads);
        let v = heads(v, self.num_kv_heads);
        let (k, v) = match cache {
            Some(cache) => cache.append(k, v),
            None => (k, v),
        };
        let context = match &pass.visibility {
            Visibility::Planned(plan) => {
                assert_eq!(k.dims()[2], seq, "planned attention runs on a whole sequence (an empty cache)");
                crate::ops::attention::attention(q, k, v, plan)
            }
            Visibility::Cached(bias) => self.cached_attention(q, k, v, bias.as_ref()),
        };
        project(&self.o_proj, lora.and_then(|l| l.o_proj.as_ref()), context, dropout)
    }

    /// Attention of a few new queries over the cache: `[batch, queries, heads · head_dim]`.
    fn cached_attention(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, bias: Option<&Tensor<5>>) -> Tensor<3> {
        let [batch, _, seq, _] = q.dims();
        let group = self.num_heads / self.num_kv_heads;
        // [b, kv, group, seq, d] @ [b, kv, 1, d, keys]: K/V broadcast over the group.
        let q = q.reshape([batch, self.num_kv_heads, group, seq, self.head_dim]);
        let k = k.unsqueeze_dim::<5>(2);
        let v = v.unsqueeze_dim::<5>(2);
        let scale = (self.head_dim as f64).powf(-0.5);
        let mut scores = q.matmul(k.swap_dims(3, 4)) * scale;
        if let Some(bias) = bias {
            let bias = if scores.dtype() == bias.dtype() { bias.clone() } else { bias.clone().cast(scores.dtype()) };
            scores = scores + bias;
        }
        let context = softmax(scores, 4).matmul(v); // [b, kv, group, seq, d]
        context
            .reshape([batch, self.num_heads, seq, self.head_dim])
            .swap_dims(1, 2)
            .reshape([batch, seq, self.num_heads * self.head_dim])
    }
}
