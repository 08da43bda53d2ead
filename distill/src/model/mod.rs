//! Qwen2 / Llama-3 students in burn, loaded from and compatible with HF checkpoints.

pub mod attention;
pub mod config;
pub mod linear;
pub mod lora;
pub mod rope;
pub mod transformer;
pub mod weights;

use std::path::Path;

use burn::module::Module;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};

pub use attention::Visibility;
pub use config::{Architecture, ConfigError, ModelConfig};
pub use rope::Rope;
pub use transformer::{BaseStorage, CausalLm, ModelCache, Pass};

use std::sync::Arc;

use crate::data::batch::Batch;
use crate::ops::attention::{Layout, Plan};
pub use weights::{LoadOptions, WeightsError};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
}

/// How a training forward pass runs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Training {
    /// Adapter dropout on, with its masks drawn from this seed (per layer).
    pub dropout_seed: Option<u64>,
    /// Layer-level activation checkpointing.
    pub checkpoint: bool,
    /// With `checkpoint`: the kept layer inputs wait in host memory (activation offloading).
    pub offload: bool,
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

    /// The same weights at another RoPE base and declared context (`--rope-theta`,
    /// `--max-position-embeddings`), which an export then writes into config.json.
    pub fn with_context(mut self, rope_theta: f64, max_position_embeddings: usize) -> Self {
        self.config.rope_theta = rope_theta;
        self.config.max_position_embeddings = max_position_embeddings;
        self.rope = Rope::new(&self.config);
        self
    }

    /// Freezes the weights and attaches LoRA adapters (see [`lora`]).
    pub fn with_lora(mut self, config: &lora::LoraConfig) -> Model {
        self.net = lora::attach(self.net, config, &self.device);
        self
    }

    /// Stores the frozen base of a LoRA model as `storage` says, in `dtype` where it is not
    /// quantized (see [`BaseStorage`]).
    pub fn with_frozen_base(mut self, storage: BaseStorage, dtype: DType) -> Model {
        self.net = transformer::store_frozen(self.net, storage, dtype);
        self
    }

    pub fn has_lora(&self) -> bool {
        self.net.layers.first().is_some_and(|l| l.self_attn.lora.is_some() || l.mlp.lora.is_some())
    }

    /// Whether training draws random masks (LoRA dropout). They come from the device's
    /// generator, which burn keeps per backend for the whole process.
    pub fn draws_dropout(&self) -> bool {
        self.net.layers.iter().any(|layer| {
            let attention = layer.self_attn.lora.iter().flat_map(|l| [&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj]);
            let mlp = layer.mlp.lora.iter().flat_map(|l| [&l.gate_proj, &l.up_proj, &l.down_proj]);
            attention.chain(mlp).flatten().any(|adapter| adapter.dropout > 0.0)
        })
    }

    /// The adapters folded into the weights, checked: the merged model's logits on two probe
    /// rows must equal the adapted model's (to 1e-3 of the largest logit). Returns the merged
    /// model and the largest difference seen.
    pub fn merge_lora(&self) -> Result<(Model, f32), String> {
        // A bf16 or quantized base merges as its values dequantize, in f32.
        let adapted = self.for_inference();
        let adapted = Model { net: transformer::full_precision(adapted.net), dtype: DType::F32, ..adapted };
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

    /// RoPE tables for `positions` on the inner device, in the compute dtype.
    fn rope_tables(&self, positions: &[Vec<usize>]) -> rope::RopeTables {
        let tables = self.rope.tables(positions, &self.device.clone().inner());
        if self.dtype == DType::F32 {
            return tables;
        }
        rope::RopeTables { cos: tables.cos.cast(self.dtype), sin: tables.sin.cast(self.dtype) }
    }

    fn pass(&self, positions: &[Vec<usize>], visibility: Visibility, training: Training) -> Pass {
        Pass { rope: self.rope_tables(positions), visibility, dropout: training.dropout_seed, checkpoint: training.checkpoint, offload: training.offload }
    }

    /// Memory-efficient attention over `layout` (see [`crate::ops::attention`]).
    pub fn plan(&self, layout: Layout) -> Arc<Plan> {
        Arc::new(Plan::new(layout, self.config.num_attention_heads, &self.device))
    }

    /// Final hidden states `[rows, seq, hidden]` of equal-length rows, each row starting at
    /// position 0 and seeing only itself (causal).
    pub fn hidden(&self, rows: &[Vec<u32>]) -> Tensor<3> {
        let seq = rows.first().map_or(0, Vec::len);
        let positions: Vec<Vec<usize>> = rows.iter().map(|_| (0..seq).collect()).collect();
        let plan = self.plan(Layout::causal(rows.len(), seq));
        let pass = self.pass(&positions, Visibility::Planned(plan), Training::default());
        self.net.forward_hidden(self.input_ids(rows), &pass, None)
    }

    /// Final hidden states `[rows, len, hidden]` of a micro-batch: positions restart and
    /// attention stays within each packed row, as if every row ran alone; padding sees only
    /// padding.
    pub fn hidden_batch(&self, batch: &Batch, training: Training) -> Tensor<3> {
        let plan = self.plan(batch.layout());
        let pass = self.pass(&batch.positions, Visibility::Planned(plan), training);
        self.net.forward_hidden(self.input_ids(&batch.input_ids), &pass, None)
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
        let visibility = if cache.is_empty() {
            // A prefill: left padding is a segment of its own before the row's tokens.
            let segments: Vec<Vec<u32>> = visible.iter().map(|row| row.iter().map(|&v| u32::from(v)).collect()).collect();
            Visibility::Planned(self.plan(Layout::from_segments(&segments)))
        } else {
            Visibility::cached(visible, seq, &self.device)
        };
        let pass = self.pass(positions, visibility, Training::default());
        let hidden = self.net.forward_hidden(self.input_ids(tokens), &pass, Some(cache));
        let logits = self.net.logits(hidden.narrow(1, seq - 1, 1));
        let vocab = logits.dims()[2];
        logits.reshape([batch, vocab])
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
