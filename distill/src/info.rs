//! `distill info`: parameter count and the memory a student needs to serve; the memory to
//! train it is [`crate::plan`].

use serde::Serialize;

use crate::model::ModelConfig;

/// bf16 weights and a bf16 KV cache for `batch × seq_len` tokens: what serving needs.
#[derive(Debug, Clone, Serialize)]
pub struct InferenceMemory {
    pub weights_bytes: u64,
    pub kv_cache_bytes: u64,
}

pub fn inference(config: &ModelConfig, seq_len: usize, batch_size: usize) -> InferenceMemory {
    let tokens = (seq_len * batch_size) as u64;
    let kv_width = (config.num_key_value_heads * config.head_dim) as u64;
    InferenceMemory {
        weights_bytes: config.num_parameters() * 2,
        kv_cache_bytes: 2 * config.num_hidden_layers as u64 * kv_width * tokens * 2,
    }
}

/// `80GB`, `24GiB`, `512MB` → bytes. Memory sizes are read in powers of two whatever the
/// spelling, as GPU memory is sold (an "80GB" card has 80 GiB).
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let upper = text.trim().to_uppercase();
    let split = upper.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(upper.len());
    let (number, unit) = upper.split_at(split);
    let number: f64 = number.parse().map_err(|_| format!("bad memory size `{text}` (e.g. 80GB, 24GiB)"))?;
    let scale = match unit.trim().trim_end_matches('B').trim_end_matches('I') {
        "" => 1u64,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return Err(format!("bad memory size `{text}` (e.g. 80GB, 24GiB)")),
    };
    Ok((number * scale as f64) as u64)
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
