//! Grouped-query self-attention with a KV cache.
//!
//! GQA is done by viewing the query heads as `[kv_heads, group]` and broadcasting K/V over the
//! group axis in the matmul, so K and V are never repeated per query head (transformers'
//! `repeat_kv` copies them `group` times).

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};

use super::lora::{AttentionLora, project};
use super::rope::RopeTables;

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

/// Which keys each query may see, as an additive bias `[batch, 1, 1, query_len, key_len]`
/// (0 = visible, -inf = hidden). `None` means every key is visible (one-token decode steps).
#[derive(Debug, Clone)]
pub struct AttentionMask {
    pub bias: Option<Tensor<5>>,
}

impl AttentionMask {
    /// Causal attention over `past + query_len` keys, with queries restricted to keys of their
    /// own segment (`segments[b][k]` for every key, past and new): a packed row never attends
    /// across its documents. Padding is given its own segment id so it never leaks into rows.
    pub fn causal(segments: &[Vec<u32>], query_len: usize, device: &Device) -> Self {
        let batch = segments.len();
        let key_len = segments.first().map_or(0, Vec::len);
        let past = key_len - query_len;
        let mut bias = Vec::with_capacity(batch * query_len * key_len);
        for row in segments {
            for query in 0..query_len {
                let query_position = past + query;
                for (key, segment) in row.iter().enumerate() {
                    let visible = key <= query_position && *segment == row[query_position];
                    bias.push(if visible { 0.0f32 } else { f32::NEG_INFINITY });
                }
            }
        }
        let data = TensorData::new(bias, [batch, 1, 1, query_len, key_len]);
        AttentionMask { bias: Some(Tensor::from_data(data, device)) }
    }

    pub fn none() -> Self {
        AttentionMask { bias: None }
    }
}

impl Attention {
    /// `x`: `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub fn forward(
        &self,
        x: Tensor<3>,
        rope: &RopeTables,
        mask: &AttentionMask,
        cache: Option<&mut LayerCache>,
    ) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        let group = self.num_heads / self.num_kv_heads;
        let heads = |t: Tensor<3>, n: usize| t.reshape([batch, seq, n, self.head_dim]).swap_dims(1, 2);

        let lora = self.lora.as_ref();
        let q = project(&self.q_proj, lora.and_then(|l| l.q_proj.as_ref()), x.clone());
        let k = project(&self.k_proj, lora.and_then(|l| l.k_proj.as_ref()), x.clone());
        let v = project(&self.v_proj, lora.and_then(|l| l.v_proj.as_ref()), x);
        let q = rope.apply(heads(q, self.num_heads));
        let k = rope.apply(heads(k, self.num_kv_heads));
        let v = heads(v, self.num_kv_heads);
        let (k, v) = match cache {
            Some(cache) => cache.append(k, v),
            None => (k, v),
        };
        let key_len = k.dims()[2];

        // [b, kv, group, seq, d] @ [b, kv, 1, d, keys]: K/V broadcast over the group.
        let q = q.reshape([batch, self.num_kv_heads, group, seq, self.head_dim]);
        let k = k.unsqueeze_dim::<5>(2);
        let v = v.unsqueeze_dim::<5>(2);
        let scale = (self.head_dim as f64).powf(-0.5);
        let mut scores = q.matmul(k.swap_dims(3, 4)) * scale;
        if let Some(bias) = &mask.bias {
            scores = scores + bias.clone();
        }
        let probabilities = softmax(scores, 4);
        debug_assert_eq!(probabilities.dims()[4], key_len);
        let context = probabilities.matmul(v); // [b, kv, group, seq, d]
        let context = context
            .reshape([batch, self.num_heads, seq, self.head_dim])
            .swap_dims(1, 2)
            .reshape([batch, seq, self.num_heads * self.head_dim]);
        project(&self.o_proj, lora.and_then(|l| l.o_proj.as_ref()), context)
    }
}
