//! `distill info`: parameter count and the memory a student needs.
//!
//! The estimates count what dominates: parameters, gradients and AdamW moments, the KV cache,
//! and activations after Korthikanti et al., "Reducing Activation Recomputation in Large
//! Transformer Models" (2022), adapted to GQA and SwiGLU. They are estimates for planning
//! (framework buffers and fragmentation come on top), not measurements.

use serde::Serialize;

use crate::model::ModelConfig;

#[derive(Debug, Clone, Serialize)]
pub struct MemoryEstimate {
    pub parameters: u64,
    pub seq_len: usize,
    pub batch_size: usize,
    /// bf16 weights + bf16 KV cache for `batch_size × seq_len` tokens.
    pub inference_bytes: u64,
    pub kv_cache_bytes: u64,
    /// f32 master weights, f32 gradients, AdamW moments, bf16 activations (no checkpointing).
    pub full_training_bytes: u64,
    /// The same with gradient checkpointing at layer boundaries.
    pub full_training_checkpointed_bytes: u64,
    /// Frozen bf16 base + trainable LoRA adapters (rank 16 on all linear layers), checkpointed.
    pub lora_training_bytes: u64,
    pub lora_rank: usize,
    pub lora_parameters: u64,
}

/// Bytes of bf16 activations kept per layer for one token when nothing is recomputed:
/// inputs of both norms, q/k/v, attention output, the MLP's three intermediates, the
/// softmax probabilities (per key), and masks — counted in bf16.
fn activation_bytes_per_token_per_layer(config: &ModelConfig, seq_len: usize) -> u64 {
    let hidden = config.hidden_size as u64;
    let q = (config.num_attention_heads * config.head_dim) as u64;
    let kv = (config.num_key_value_heads * config.head_dim) as u64;
    let intermediate = config.intermediate_size as u64;
    let elements = 4 * hidden + 2 * q + 2 * kv + 4 * intermediate;
    let scores = config.num_attention_heads as u64 * seq_len as u64 * 2; // scores and probabilities
    2 * (elements + scores)
}

pub fn estimate(config: &ModelConfig, seq_len: usize, batch_size: usize, lora_rank: usize) -> MemoryEstimate {
    let parameters = config.num_parameters();
    let tokens = (seq_len * batch_size) as u64;
    let layers = config.num_hidden_layers as u64;
    let kv_width = (config.num_key_value_heads * config.head_dim) as u64;
    let kv_cache_bytes = 2 * layers * kv_width * tokens * 2;
    // Logits in f32 and their gradient dominate the head for 128k–152k vocabularies.
    let logits_bytes = tokens * config.vocab_size as u64 * 4 * 2;
    let per_layer = activation_bytes_per_token_per_layer(config, seq_len) * tokens;
    let all_layers = per_layer * layers;
    // Checkpointing keeps each layer's input and recomputes one layer at a time.
    let checkpointed = layers * tokens * config.hidden_size as u64 * 2 + per_layer;

    // Master f32 weights + f32 gradients + two f32 AdamW moments + a bf16 compute copy.
    let optimizer_state = parameters * (4 + 4 + 8 + 2);

    let hidden = config.hidden_size as u64;
    let q = (config.num_attention_heads * config.head_dim) as u64;
    let intermediate = config.intermediate_size as u64;
    let rank = lora_rank as u64;
    let per_layer_lora = rank * ((hidden + q) + 2 * (hidden + kv_width) + (q + hidden) + 2 * (hidden + intermediate) + (intermediate + hidden));
    let lora_parameters = layers * per_layer_lora;

    MemoryEstimate {
        parameters,
        seq_len,
        batch_size,
        inference_bytes: parameters * 2 + kv_cache_bytes,
        kv_cache_bytes,
        full_training_bytes: optimizer_state + all_layers + logits_bytes,
        full_training_checkpointed_bytes: optimizer_state + checkpointed + logits_bytes,
        lora_training_bytes: parameters * 2 + lora_parameters * 18 + checkpointed + logits_bytes,
        lora_rank,
        lora_parameters,
    }
}

pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// "1.54B"-style parameter count.
pub fn human_count(count: u64) -> String {
    if count >= 1_000_000_000 {
        format!("{:.2}B", count as f64 / 1e9)
    } else if count >= 1_000_000 {
        format!("{:.2}M", count as f64 / 1e6)
    } else {
        format!("{:.1}K", count as f64 / 1e3)
    }
}
