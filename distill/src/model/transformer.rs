//! The decoder-only transformer shared by Qwen2 and Llama 3: pre-norm blocks of GQA attention
//! and a SwiGLU MLP, RMSNorm, rotate-half RoPE. The two differ only in what `ModelConfig`
//! says (biases, RoPE scaling, tied embeddings), so one module serves both, as in transformers.

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::{Device, Int, Tensor};

use crate::ops::rms_norm::rms_norm;

use std::sync::Arc;

use super::attention::{Attention, LayerCache, Visibility};
use super::config::ModelConfig;
use super::linear::Linear;
use super::lora::{MlpLora, project};
use super::rope::RopeTables;

/// What every layer of one forward pass shares.
#[derive(Debug, Clone)]
pub struct Pass {
    /// RoPE tables of the batch's positions, on the inner device (constants of the graph).
    pub rope: RopeTables,
    pub visibility: Visibility,
    /// Training: adapter dropout is on and each layer seeds its draws from this.
    pub dropout: Option<u64>,
    /// Layer-level activation checkpointing (training only).
    pub checkpoint: bool,
    /// With `checkpoint`: the kept layer inputs wait in host memory.
    pub offload: bool,
}

impl Pass {
    /// The seed of layer `index`'s dropout masks.
    fn layer_seed(seed: u64, index: usize) -> u64 {
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(index as u64).rotate_left(17) ^ 0xD1B5_4A32_D192_ED03
    }
}

#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    /// LoRA adapters (training with `--lora-rank`); `None` for a plain model.
    pub lora: Option<MlpLora>,
}

impl Mlp {
    pub fn forward(&self, x: Tensor<3>, training: bool) -> Tensor<3> {
        let lora = self.lora.as_ref();
        let gate = project(&self.gate_proj, lora.and_then(|l| l.gate_proj.as_ref()), x.clone(), training);
        let up = project(&self.up_proj, lora.and_then(|l| l.up_proj.as_ref()), x, training);
        project(&self.down_proj, lora.and_then(|l| l.down_proj.as_ref()), crate::ops::swiglu::swiglu(gate, up), training)
    }
}

#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    /// The seven projections, attention's then the MLP's.
    pub fn projections(&self) -> [&Linear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
    }

    /// [`Self::projections`], to change.
    pub fn projections_mut(&mut self) -> [&mut Linear; 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj, &mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]
    }

    /// Layer `index` of the model. With `pass.checkpoint` (and no cache) only `x` is kept for
    /// the backward pass, which runs the layer again.
    pub fn forward(&self, x: Tensor<3>, pass: &Pass, index: usize, cache: Option<&mut LayerCache>) -> Tensor<3> {
        if pass.checkpoint && cache.is_none() && x.is_autodiff() {
            let offload = pass.offload;
            let pass = pass.clone();
            let forward = Arc::new(move |layer: &DecoderLayer, x: Tensor<3>| layer.forward_whole(x, &pass, index, None));
            return crate::ops::checkpoint::checkpoint(self, x, forward, offload);
        }
        self.forward_whole(x, pass, index, cache)
    }

    fn forward_whole(&self, x: Tensor<3>, pass: &Pass, index: usize, cache: Option<&mut LayerCache>) -> Tensor<3> {
        if let Some(seed) = pass.dropout {
            x.device().seed(Pass::layer_seed(seed, index));
        }
        let x = x.clone() + self.self_attn.forward(rms_norm(&self.input_layernorm, x), pass, cache);
        x.clone() + self.mlp.forward(rms_norm(&self.post_attention_layernorm, x), pass.dropout.is_some())
    }
}

#[derive(Module, Debug)]
pub struct CausalLm {
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `[vocab, hidden]` as in HF; `None` when tied to `embed_tokens`.
    pub lm_head: Option<Param<Tensor<2>>>,
}

/// The KV cache of a whole model.
#[derive(Debug, Clone, Default)]
pub struct ModelCache {
    pub layers: Vec<LayerCache>,
}

impl ModelCache {
    pub fn new(num_layers: usize) -> Self {
        ModelCache { layers: vec![LayerCache::default(); num_layers] }
    }

    /// Tokens already in the cache.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The initialisation transformers uses for these models (`initializer_range` = 0.02).
fn normal_init() -> Initializer {
    Initializer::Normal { mean: 0.0, std: 0.02 }
}

fn linear(d_input: usize, d_output: usize, bias: bool, device: &Device) -> Linear {
    let layer = LinearConfig::new(d_input, d_output)
        .with_bias(bias)
        .with_initializer(normal_init())
        .init(device);
    Linear::dense(layer.weight, layer.bias.map(|bias| Param::from_tensor(bias.val().zeros_like())))
}

impl CausalLm {
    /// A freshly initialised model (`--init random`, tests, the bundled demo).
    pub fn init(config: &ModelConfig, device: &Device) -> Self {
        let hidden = config.hidden_size;
        let q_width = config.num_attention_heads * config.head_dim;
        let kv_width = config.num_key_value_heads * config.head_dim;
        let norm = || RmsNormConfig::new(hidden).with_epsilon(config.rms_norm_eps).init(device);
        let layers = (0..config.num_hidden_layers)
            .map(|_| DecoderLayer {
                self_attn: Attention {
                    q_proj: linear(hidden, q_width, config.qkv_bias, device),
                    k_proj: linear(hidden, kv_width, config.qkv_bias, device),
                    v_proj: linear(hidden, kv_width, config.qkv_bias, device),
                    o_proj: linear(q_width, hidden, config.o_bias, device),
                    num_heads: config.num_attention_heads,
                    num_kv_heads: config.num_key_value_heads,
                    head_dim: config.head_dim,
                    lora: None,
                },
                mlp: Mlp {
                    gate_proj: linear(hidden, config.intermediate_size, config.mlp_bias, device),
                    up_proj: linear(hidden, config.intermediate_size, config.mlp_bias, device),
                    down_proj: linear(config.intermediate_size, hidden, config.mlp_bias, device),
                    lora: None,
                },
                input_layernorm: norm(),
                post_attention_layernorm: norm(),
            })
            .collect();
        let embed_tokens = EmbeddingConfig::new(config.vocab_size, hidden)
            .with_initializer(normal_init())
            .init(device);
        let lm_head = (!config.tie_word_embeddings)
            .then(|| normal_init().init([config.vocab_size, hidden], device));
        CausalLm { embed_tokens, layers, norm: norm(), lm_head }
    }

    /// Final hidden states `[batch, seq, hidden]` for `input_ids` `[batch, seq]`.
    pub fn forward_hidden(&self, input_ids: Tensor<2, Int>, pass: &Pass, mut cache: Option<&mut ModelCache>) -> Tensor<3> {
        let mut x = self.embed_tokens.forward(input_ids);
        for (index, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|cache| &mut cache.layers[index]);
            x = layer.forward(x, pass, index, layer_cache);
        }
        rms_norm(&self.norm, x)
    }

    /// The output layer's weight `[vocab, hidden]` (the embeddings when tied).
    pub fn output_weight(&self) -> Tensor<2> {
        match &self.lm_head {
            Some(head) => head.val(),
            None => self.embed_tokens.weight.val(),
        }
    }

    /// Logits `[batch, seq, vocab]` from hidden states.
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        burn::tensor::module::linear(hidden, self.output_weight().transpose(), None)
    }

    pub fn forward(&self, input_ids: Tensor<2, Int>, pass: &Pass, cache: Option<&mut ModelCache>) -> Tensor<3> {
        self.logits(self.forward_hidden(input_ids, pass, cache))
    }
}

/// Casts every float parameter to `dtype` (bf16/f16 compute on devices that have it). A
/// parameter already in `dtype` is left as it is (a frozen bf16 base is not copied), and a
/// quantized weight's packed values are integers that no cast touches.
pub fn cast(model: CausalLm, dtype: burn::tensor::DType) -> CausalLm {
    struct Cast(burn::tensor::DType);
    impl burn::module::ModuleMapper for Cast {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let dtype = self.0;
            param.map(|tensor| if tensor.dtype() == dtype { tensor } else { tensor.cast(dtype) })
        }
    }
    model.map(&mut Cast(dtype))
}

/// How the frozen base of a LoRA run is held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseStorage {
    /// As loaded (f32 master weights, cast for each micro-batch under mixed precision).
    Full,
    /// Once in the compute dtype (bf16 / f16): no f32 copy and no cast per micro-batch.
    Compute,
    /// The decoder layers' projections quantized per block of 32 values with f16 scales
    /// (`--load-in-4bit`: 4-bit, `--load-in-8bit`: 8-bit), the rest in the compute dtype.
    Quantized { bits: u8 },
}

impl BaseStorage {
    /// A LoRA run's base: quantized when `--load-in-Nbit` says so, else in the compute dtype
    /// under mixed precision, else as loaded.
    pub fn choose(bits: Option<u8>, mixed: bool) -> BaseStorage {
        match (bits, mixed) {
            (Some(bits), _) => BaseStorage::Quantized { bits },
            (None, true) => BaseStorage::Compute,
            (None, false) => BaseStorage::Full,
        }
    }
}

/// Stores the frozen parameters of `model` as `storage` says; trainable ones (the adapters) are
/// left in f32. Under [`BaseStorage::Quantized`] the decoder layers' projections whose outputs
/// split into blocks of 32 are quantized (with scales in `dtype`); everything else frozen is
/// kept in `dtype`.
pub fn store_frozen(mut model: CausalLm, storage: BaseStorage, dtype: burn::tensor::DType) -> CausalLm {
    if storage == BaseStorage::Full {
        return model;
    }
    if let BaseStorage::Quantized { bits } = storage {
        let quantize = |linear: &mut Linear| {
            if !linear.is_quantized() && super::linear::quantizable(linear.dims()) {
                *linear = linear.clone().quantize(bits, dtype);
            }
        };
        for layer in &mut model.layers {
            layer.projections_mut().into_iter().for_each(quantize);
        }
    }
    struct Store(burn::tensor::DType);
    impl burn::module::ModuleMapper for Store {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let dtype = self.0;
            if param.val().is_require_grad() || param.val().dtype() == dtype {
                return param;
            }
            param.map(|tensor| tensor.cast(dtype))
        }
    }
    model.map(&mut Store(dtype))
}

/// Every parameter in f32, quantized weights dequantized: the model a LoRA export merges into.
pub fn full_precision(mut model: CausalLm) -> CausalLm {
    for layer in &mut model.layers {
        for linear in layer.projections_mut() {
            *linear = linear.clone().dequantized();
        }
    }
    cast(model, burn::tensor::DType::F32)
}
