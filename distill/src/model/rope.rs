//! Rotary position embeddings in the rotate-half layout of HF Llama and Qwen2.
//!
//! burn-nn's `RotaryEncoding` rotates interleaved pairs `(x0, x1), (x2, x3)…`; HF checkpoints
//! were trained rotating `(x_i, x_{i + d/2})`, so using burn's would silently scramble the
//! attention of every pretrained student. The tables are computed on the host in f32, as
//! transformers does with autocast disabled, which keeps them bit-close to the reference.

use burn::tensor::{Device, Tensor, TensorData};

use super::config::{ModelConfig, RopeScaling};

#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    head_dim: usize,
}

/// cos and sin for a batch, shaped `[batch, 1, seq, head_dim]` to broadcast over heads. `sin`
/// carries rotate-half's sign: its first half is negated.
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub cos: Tensor<4>,
    pub sin: Tensor<4>,
}

impl Rope {
    pub fn new(config: &ModelConfig) -> Self {
        let dim = config.head_dim;
        let base = config.rope_theta as f32;
        let mut inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
            .collect();
        match &config.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => {
                for f in &mut inv_freq {
                    *f /= *factor as f32;
                }
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let (factor, low, high) = (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32);
                let old_context = *original_max_position_embeddings as f32;
                let low_freq_wavelen = old_context / low;
                let high_freq_wavelen = old_context / high;
                for f in &mut inv_freq {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen > low_freq_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_freq_wavelen {
                        // Medium frequencies are blended between scaled and unscaled.
                        let smooth = (old_context / wavelen - low) / (high - low);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        Rope { inv_freq, head_dim: dim }
    }

    /// Tables for `positions[b][s]`; every row must have the same length.
    pub fn tables(&self, positions: &[Vec<usize>], device: &Device) -> RopeTables {
        let batch = positions.len();
        let seq = positions.first().map_or(0, Vec::len);
        let half = self.head_dim / 2;
        let mut cos = Vec::with_capacity(batch * seq * self.head_dim);
        let mut sin = Vec::with_capacity(batch * seq * self.head_dim);
        for row in positions {
            assert_eq!(row.len(), seq, "ragged position rows");
            for &position in row {
                let angles: Vec<f32> = self.inv_freq.iter().map(|f| position as f32 * f).collect();
                // Both halves share the frequencies: emb = cat(freqs, freqs); the first half of
                // sin is negated for rotate_half.
                for sign in [-1.0f32, 1.0] {
                    cos.extend(angles.iter().map(|a| a.cos()));
                    sin.extend(angles.iter().map(|a| sign * a.sin()));
                }
            }
        }
        debug_assert_eq!(half * 2, self.head_dim);
        let shape = [batch, 1, seq, self.head_dim];
        RopeTables {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
        }
    }
}

impl RopeTables {
    /// `x * cos + rotate_half(x) * sin` for `x` of shape `[batch, heads, seq, head_dim]`.
    /// rotate_half(x) = cat(-x₂, x₁) is the two halves swapped (a flip of the `[2, head_dim / 2]`
    /// view) times the sign that `sin` carries: one copy, and a backward pass without the
    /// zero-filled buffers that slicing and concatenating would need.
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let [batch, heads, seq, head_dim] = x.dims();
        let swapped = x.clone().reshape([batch, heads, seq, 2, head_dim / 2]).flip([3]).reshape([batch, heads, seq, head_dim]);
        x * self.cos.clone() + swapped * self.sin.clone()
    }
}
