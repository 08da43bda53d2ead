//! Qwen2 / Llama-3 students in burn, loaded from and compatible with HF checkpoints.

pub mod attention;
pub mod config;
pub mod lora;
pub mod rope;
pub mod transformer;
pub mod weights;

use std::path::Path;

use burn::module::Module;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};

pub use attention::AttentionMask;
pub use config::{Architecture, ConfigError, ModelConfig};
pub use rope::Rope;
pub use transformer::{CausalLm, ModelCache};
pub use weights::{LoadOptions, WeightsError};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
}

/// A student on a device: its config, its weights and its RoPE tables.
#[derive(Clone)]
pub struct Model {
    pub config: ModelConfig,
    pub net: CausalLm,
    pub rope: Rope,
    pub device: Device,
    /// Compute dtype of the parameters; RoPE tables and masks are made to match.
    pub dtype: DType,
}

impl Model {
    /// Loads an HF checkpoint folder (`config.json` + safetensors).
    pub fn load(dir: &Path, device: &Device, options: LoadOptions) -> Result<Self, ModelError> {
        let config = ModelConfig::from_path(dir)?;
        let net = weights::load(dir, &config, device, options)?;
        Ok(Self::from_parts(config, net, device).with_dtype(options.dtype))
    }

    /// A randomly initialised model of the given architecture.
    pub fn random(config: ModelConfig, device: &Device) -> Self {
        let net = CausalLm::init(&config, device);
        Self::from_parts(config, net, device)
    }

    pub fn from_parts(config: ModelConfig, net: CausalLm, device: &Device) -> Self {
        let rope = Rope::new(&config);
        Model { config, net, rope, device: device.clone(), dtype: DType::F32 }
    }

    /// The same weights off the autodiff graph with training behaviour (LoRA dropout) off: for
    /// evaluation during training.
    pub fn for_inference(&self) -> Model {
        Model { config: self.config.clone(), net: self.net.valid(), rope: self.rope.clone(), device: self.device.clone().inner(), dtype: self.dtype }
    }

    /// Mixed precision: the parameters seen through a cast to `dtype` inside the autodiff
    /// graph, so the forward and backward passes run in `dtype` while gradients arrive at the
    /// (f32) master parameters in their own dtype.
    pub fn compute_copy(&self, dtype: DType) -> Model {
        self.clone().with_dtype(dtype)
    }

    /// Freezes the weights and attaches LoRA adapters (see [`lora`]).
    pub fn with_lora(mut self, config: &lora::LoraConfig) -> Model {
        self.net = lora::attach(self.net, config, &self.device);
        self
    }

    pub fn has_lora(&self) -> bool {
        self.net.layers.first().is_some_and(|l| l.self_attn.lora.is_some() || l.mlp.lora.is_some())
    }

    /// The adapters folded into the weights, checked: the merged model's logits on two probe
    /// rows must equal the adapted model's (to 1e-3 of the largest logit). Returns the merged
    /// model and the largest difference seen.
    pub fn merge_lora(&self) -> Result<(Model, f32), String> {
        let adapted = self.for_inference();
        let merged = Model { net: lora::merge(adapted.net.clone()), ..adapted.clone() };
        let vocab = self.config.vocab_size;
        let rows: Vec<Vec<u32>> = (0..2u64).map(|r| (0..32u64).map(|i| ((r * 32 + i) * 7919 % vocab as u64) as u32).collect()).collect();
        let adapted = adapted.logits(&rows).into_data().convert::<f32>();
        let folded = merged.logits(&rows).into_data().convert::<f32>();
        let (adapted, folded) = (adapted.as_slice::<f32>().unwrap_or_default(), folded.as_slice::<f32>().unwrap_or_default());
        let scale = adapted.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let difference = adapted.iter().zip(folded).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        if !(difference <= 1e-3 * scale) {
            return Err(format!("merging the LoRA adapters changed the logits by {difference:e} (largest logit {scale:e})"));
        }
        Ok((merged, difference))
    }

    /// Casts the parameters to `dtype` (bf16 on flex, CUDA and Metal; f16 on GPUs).
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        if dtype != self.dtype {
            self.net = transformer::cast(self.net, dtype);
            self.dtype = dtype;
        }
        self
    }

    fn rope_tables(&self, positions: &[Vec<usize>]) -> rope::RopeTables {
        let tables = self.rope.tables(positions, &self.device);
        if self.dtype == DType::F32 {
            return tables;
        }
        rope::RopeTables { cos: tables.cos.cast(self.dtype), sin: tables.sin.cast(self.dtype) }
    }

    fn causal_mask(&self, segments: &[Vec<u32>], query_len: usize) -> AttentionMask {
        let mask = AttentionMask::causal(segments, query_len, &self.device);
        AttentionMask { bias: mask.bias.map(|bias| if self.dtype == DType::F32 { bias } else { bias.cast(self.dtype) }) }
    }

    /// Final hidden states `[rows, seq, hidden]` of equal-length rows, each row starting at
    /// position 0 and seeing only itself (causal).
    pub fn hidden(&self, rows: &[Vec<u32>]) -> Tensor<3> {
        let seq = rows.first().map_or(0, Vec::len);
        let positions: Vec<Vec<usize>> = rows.iter().map(|_| (0..seq).collect()).collect();
        let segments: Vec<Vec<u32>> = rows.iter().map(|_| vec![0; seq]).collect();
        let rope = self.rope_tables(&positions);
        let mask = self.causal_mask(&segments, seq);
        self.net.forward_hidden(self.input_ids(rows), &rope, &mask, None)
    }

    /// Final hidden states of one packed block `[1, seq, hidden]`: positions restart and
    /// attention stays within each row, as if every row ran alone.
    pub fn hidden_packed(&self, block: &crate::data::packing::PackedBlock) -> Tensor<3> {
        let rope = self.rope_tables(std::slice::from_ref(&block.positions));
        let mask = self.causal_mask(std::slice::from_ref(&block.segments), block.len());
        self.net.forward_hidden(self.input_ids(std::slice::from_ref(&block.input_ids)), &rope, &mask, None)
    }

    /// Logits `[rows, seq, vocab]` of equal-length rows (see [`Model::hidden`]).
    pub fn logits(&self, rows: &[Vec<u32>]) -> Tensor<3> {
        self.net.logits(self.hidden(rows))
    }

    /// Runs `tokens` through the model after what `cache` already holds, appending to it, and
    /// returns the logits of the last token `[vocab]`.
    pub fn step(&self, tokens: &[u32], cache: &mut ModelCache) -> Tensor<1> {
        let past = cache.len();
        let positions = vec![(past..past + tokens.len()).collect::<Vec<_>>()];
        let visible = vec![vec![true; past + tokens.len()]];
        let logits = self.step_batch(&[tokens.to_vec()], &positions, &visible, cache);
        let vocab = logits.dims()[1];
        logits.reshape([vocab])
    }

    /// One forward pass of a batch of equal-length rows after what `cache` holds, appending to
    /// it: row `b` feeds `tokens[b]` at `positions[b]`, and `visible[b]` says which keys (the
    /// cached ones, then the new ones) belong to the row; the others are left padding that it
    /// must not see. Returns the logits of each row's last token `[batch, vocab]`.
    pub fn step_batch(&self, tokens: &[Vec<u32>], positions: &[Vec<usize>], visible: &[Vec<bool>], cache: &mut ModelCache) -> Tensor<2> {
        let (batch, seq) = (tokens.len(), tokens.first().map_or(0, Vec::len));
        let rope = self.rope_tables(positions);
        // A single new token in rows without padding may see every cached key.
        let mask = if seq == 1 && visible.iter().all(|row| row.iter().all(|&v| v)) {
            AttentionMask::none()
        } else {
            // Padding gets a segment of its own, so rows attend only to their own tokens.
            let segments: Vec<Vec<u32>> = visible.iter().map(|row| row.iter().map(|&v| u32::from(!v)).collect()).collect();
            self.causal_mask(&segments, seq)
        };
        let logits = self.net.forward(self.input_ids(tokens), &rope, &mask, Some(cache));
        let vocab = logits.dims()[2];
        logits.narrow(1, seq - 1, 1).reshape([batch, vocab])
    }

    pub fn input_ids(&self, rows: &[Vec<u32>]) -> Tensor<2, Int> {
        let seq = rows.first().map_or(0, Vec::len);
        let flat: Vec<i64> = rows.iter().flat_map(|row| row.iter().map(|&id| id as i64)).collect();
        Tensor::from_data(TensorData::new(flat, [rows.len(), seq]), &self.device)
    }

    pub fn new_cache(&self) -> ModelCache {
        ModelCache::new(self.config.num_hidden_layers)
    }
}
