//! Hugging Face safetensors checkpoints (single file or sharded with an index) into
//! [`CausalLm`], and the HF tensor names of every parameter.
//!
//! Files are memory-mapped and converted one tensor at a time, so loading never holds a
//! second full copy of the weights.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::{Embedding, RmsNorm};
use burn::tensor::{DType, Device, Tensor, TensorData};
use memmap2::Mmap;
use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensors};

use super::attention::Attention;
use super::config::ModelConfig;
use super::linear::{Linear, QuantizedWeight};
use super::transformer::{CausalLm, DecoderLayer, Mlp};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{dir}: no {SINGLE_FILE} or {INDEX_FILE} (is this a Hugging Face checkpoint folder?)")]
    NoCheckpoint { dir: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Index { path: PathBuf, message: String },
    #[error("{path}: not a valid safetensors file ({message}); it may be truncated or still downloading")]
    Invalid { path: PathBuf, message: String },
    #[error("tensor `{tensor}` is missing (expected in {file}, shape {expected:?})")]
    Missing { tensor: String, file: PathBuf, expected: Vec<usize> },
    #[error("tensor `{tensor}` in {file} is not part of a {architecture} model with this config")]
    Unexpected { tensor: String, file: PathBuf, architecture: &'static str },
    #[error("tensor `{tensor}` in {file} has shape {found:?}, expected {expected:?} from config.json")]
    Shape { tensor: String, file: PathBuf, expected: Vec<usize>, found: Vec<usize> },
    #[error("tensor `{tensor}` in {file} has dtype {dtype:?}; only BF16, F16 and F32 are supported")]
    Dtype { tensor: String, file: PathBuf, dtype: Dtype },
}

/// Every parameter of the model with its HF name and HF shape, in checkpoint order.
pub fn expected_tensors(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let hidden = config.hidden_size;
    let q_width = config.num_attention_heads * config.head_dim;
    let kv_width = config.num_key_value_heads * config.head_dim;
    let intermediate = config.intermediate_size;
    let mut tensors = vec![("model.embed_tokens.weight".to_string(), vec![config.vocab_size, hidden])];
    for layer in 0..config.num_hidden_layers {
        let prefix = format!("model.layers.{layer}");
        let mut push = |name: &str, shape: Vec<usize>| tensors.push((format!("{prefix}.{name}"), shape));
        push("input_layernorm.weight", vec![hidden]);
        for (projection, width) in [("q_proj", q_width), ("k_proj", kv_width), ("v_proj", kv_width)] {
            push(&format!("self_attn.{projection}.weight"), vec![width, hidden]);
            if config.qkv_bias {
                push(&format!("self_attn.{projection}.bias"), vec![width]);
            }
        }
        push("self_attn.o_proj.weight", vec![hidden, q_width]);
        if config.o_bias {
            push("self_attn.o_proj.bias", vec![hidden]);
        }
        for (projection, shape) in [
            ("gate_proj", vec![intermediate, hidden]),
            ("up_proj", vec![intermediate, hidden]),
            ("down_proj", vec![hidden, intermediate]),
        ] {
            let width = shape[0];
            push(&format!("mlp.{projection}.weight"), shape);
            if config.mlp_bias {
                push(&format!("mlp.{projection}.bias"), vec![width]);
            }
        }
        push("post_attention_layernorm.weight", vec![hidden]);
    }
    tensors.push(("model.norm.weight".to_string(), vec![hidden]));
    if !config.tie_word_embeddings {
        tensors.push(("lm_head.weight".to_string(), vec![config.vocab_size, hidden]));
    }
    tensors
}

/// Tensors that checkpoints carry but that are not parameters of the model.
fn is_ignorable(name: &str, config: &ModelConfig) -> bool {
    name.ends_with("rotary_emb.inv_freq") || (config.tie_word_embeddings && name == "lm_head.weight")
}

/// One mapped safetensors file with its parsed header.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Where the tensor data begins (after the 8-byte length and the JSON header).
    data_start: usize,
    metadata: Metadata,
}

/// The mapped files of a checkpoint and which file holds each tensor.
pub struct Checkpoint {
    files: Vec<Shard>,
    /// tensor name → index into `files`
    locations: BTreeMap<String, usize>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self, WeightsError> {
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let shard_names: Vec<String> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|source| WeightsError::Io { path: index_path.clone(), source })?;
            let index: serde_json::Value = serde_json::from_str(&text).map_err(|e| WeightsError::Index {
                path: index_path.clone(),
                message: format!("not valid JSON: {e}"),
            })?;
            let map = index.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| WeightsError::Index {
                path: index_path.clone(),
                message: "no `weight_map` object".into(),
            })?;
            let names: BTreeSet<String> = map
                .values()
                .map(|file| {
                    file.as_str().map(String::from).ok_or_else(|| WeightsError::Index {
                        path: index_path.clone(),
                        message: format!("`weight_map` value {file} is not a file name"),
                    })
                })
                .collect::<Result<_, _>>()?;
            names.into_iter().collect()
        } else if single_path.exists() {
            vec![SINGLE_FILE.to_string()]
        } else {
            return Err(WeightsError::NoCheckpoint { dir: dir.to_path_buf() });
        };

        let mut files = Vec::new();
        let mut locations = BTreeMap::new();
        for name in shard_names {
            let path = dir.join(&name);
            let file = File::open(&path).map_err(|source| WeightsError::Io { path: path.clone(), source })?;
            // SAFETY: the mapping is read-only and we never write to the checkpoint; as with
            // every mmap-based loader (transformers, candle, vLLM), a file truncated by another
            // process while we read it is outside what we can guard against.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|source| WeightsError::Io { path: path.clone(), source })?;
            // Full validation once (offsets, lengths, a truncated file); lookups then use the header.
            SafeTensors::deserialize(&mmap).map_err(|e| WeightsError::Invalid { path: path.clone(), message: e.to_string() })?;
            let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| WeightsError::Invalid { path: path.clone(), message: e.to_string() })?;
            let file_index = files.len();
            for tensor_name in metadata.tensors().keys() {
                locations.insert(tensor_name.clone(), file_index);
            }
            files.push(Shard { path, mmap, data_start: 8 + header_len, metadata });
        }
        Ok(Checkpoint { files, locations })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.locations.keys().map(String::as_str)
    }

    /// A tensor's values as f32 with its shape, converted from whatever dtype is on disk.
    pub fn read_f32(&self, name: &str) -> Option<Result<(Vec<f32>, Vec<usize>), WeightsError>> {
        let &file_index = self.locations.get(name)?;
        let shard = &self.files[file_index];
        let path = &shard.path;
        let info = shard.metadata.info(name)?;
        let bytes = &shard.mmap[shard.data_start + info.data_offsets.0..shard.data_start + info.data_offsets.1];
        let values: Vec<f32> = match info.dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
            dtype => {
                return Some(Err(WeightsError::Dtype { tensor: name.to_string(), file: path.clone(), dtype }));
            }
        };
        Some(Ok((values, info.shape.clone())))
    }

    fn file_of(&self, name: &str) -> PathBuf {
        self.locations
            .get(name)
            .map(|&i| self.files[i].path.clone())
            .unwrap_or_else(|| self.files.first().map(|f| f.path.clone()).unwrap_or_default())
    }
}

/// Options for putting a checkpoint on a device.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Compute dtype of the parameters (f32 everywhere; bf16/f16 where the device has it).
    pub dtype: DType,
    /// Quantize the decoder layers' projections to this many bits as they are read (QLoRA's
    /// frozen base, with scales in `dtype`; see [`QuantizedWeight`]), so the full-precision
    /// model is never in memory at once.
    pub quantize_bits: Option<u8>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { dtype: DType::F32, quantize_bits: None }
    }
}

impl LoadOptions {
    /// Parameters in `dtype`, none quantized.
    pub fn in_dtype(dtype: DType) -> Self {
        LoadOptions { dtype, quantize_bits: None }
    }
}

/// Loads the checkpoint in `dir` into a model for `config`, checking every tensor first.
pub fn load(dir: &Path, config: &ModelConfig, device: &Device, options: LoadOptions) -> Result<CausalLm, WeightsError> {
    let checkpoint = Checkpoint::open(dir)?;
    let expected = expected_tensors(config);
    let expected_names: BTreeSet<&str> = expected.iter().map(|(name, _)| name.as_str()).collect();
    for name in checkpoint.names() {
        if !expected_names.contains(name) && !is_ignorable(name, config) {
            return Err(WeightsError::Unexpected {
                tensor: name.to_string(),
                file: checkpoint.file_of(name),
                architecture: config.architecture.hf_name(),
            });
        }
    }
    let index_file = dir.join(if dir.join(INDEX_FILE).exists() { INDEX_FILE } else { SINGLE_FILE });
    let mut loader = Loader { checkpoint: &checkpoint, shapes: expected.into_iter().collect(), device, options, index_file };
    loader.model(config)
}

struct Loader<'a> {
    checkpoint: &'a Checkpoint,
    shapes: BTreeMap<String, Vec<usize>>,
    device: &'a Device,
    options: LoadOptions,
    index_file: PathBuf,
}

impl Loader<'_> {
    /// The values of `name` on the host, checked against the shape the config implies.
    fn values(&mut self, name: &str) -> Result<(Vec<f32>, Vec<usize>), WeightsError> {
        let expected = self.shapes.get(name).cloned().unwrap_or_default();
        let (values, found) = match self.checkpoint.read_f32(name) {
            Some(result) => result?,
            None => {
                return Err(WeightsError::Missing {
                    tensor: name.to_string(),
                    file: self.index_file.clone(),
                    expected,
                });
            }
        };
        if found != expected {
            return Err(WeightsError::Shape {
                tensor: name.to_string(),
                file: self.checkpoint.file_of(name),
                expected,
                found,
            });
        }
        Ok((values, found))
    }

    fn tensor<const D: usize>(&mut self, name: &str) -> Result<Tensor<D>, WeightsError> {
        let (values, found) = self.values(name)?;
        // Converted to the parameter dtype on the host: the device never holds an f32 copy (on
        // wgpu, a 7B's f32 embeddings are more than one tensor may span).
        Ok(Tensor::<D>::from_data(TensorData::new(values, found), (self.device, self.options.dtype)))
    }

    fn param<const D: usize>(&mut self, name: &str) -> Result<Param<Tensor<D>>, WeightsError> {
        Ok(Param::from_tensor(self.tensor(name)?))
    }

    /// HF stores `[out, in]`; burn's `Linear` multiplies by `[in, out]`.
    fn linear(&mut self, prefix: &str, bias: bool) -> Result<Linear, WeightsError> {
        let name = format!("{prefix}.weight");
        let bias = if bias { Some(self.param(&format!("{prefix}.bias"))?) } else { None };
        let outputs = self.shapes.get(&name).map_or(0, |shape| shape[0]);
        match self.options.quantize_bits {
            Some(bits) if prefix.contains("layers.") && super::linear::quantizable([0, outputs]) => {
                let (values, found) = self.values(&name)?;
                let inputs = found[1];
                // Transposed on the host, so that only the quantized weight reaches the device.
                use rayon::prelude::*;
                let mut rows = vec![0f32; values.len()];
                rows.par_chunks_mut(outputs).enumerate().for_each(|(input, row)| {
                    for (output, value) in row.iter_mut().enumerate() {
                        *value = values[output * inputs + input];
                    }
                });
                let quantized = QuantizedWeight::from_rows(&rows, [inputs, outputs], bits, self.options.dtype, self.device);
                Ok(Linear { weight: None, quantized: Some(quantized), bias })
            }
            _ => Ok(Linear::dense(Param::from_tensor(self.tensor::<2>(&name)?.transpose()), bias)),
        }
    }

    fn norm(&mut self, name: &str, epsilon: f64) -> Result<RmsNorm, WeightsError> {
        Ok(RmsNorm { gamma: self.param(name)?, epsilon })
    }

    fn model(&mut self, config: &ModelConfig) -> Result<CausalLm, WeightsError> {
        let embed_tokens = Embedding { weight: self.param("model.embed_tokens.weight")? };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for layer in 0..config.num_hidden_layers {
            let p = format!("model.layers.{layer}");
            layers.push(DecoderLayer {
                input_layernorm: self.norm(&format!("{p}.input_layernorm.weight"), config.rms_norm_eps)?,
                self_attn: Attention {
                    q_proj: self.linear(&format!("{p}.self_attn.q_proj"), config.qkv_bias)?,
                    k_proj: self.linear(&format!("{p}.self_attn.k_proj"), config.qkv_bias)?,
                    v_proj: self.linear(&format!("{p}.self_attn.v_proj"), config.qkv_bias)?,
                    o_proj: self.linear(&format!("{p}.self_attn.o_proj"), config.o_bias)?,
                    num_heads: config.num_attention_heads,
                    num_kv_heads: config.num_key_value_heads,
                    head_dim: config.head_dim,
                    lora: None,
                },
                mlp: Mlp {
                    gate_proj: self.linear(&format!("{p}.mlp.gate_proj"), config.mlp_bias)?,
                    up_proj: self.linear(&format!("{p}.mlp.up_proj"), config.mlp_bias)?,
                    down_proj: self.linear(&format!("{p}.mlp.down_proj"), config.mlp_bias)?,
                    lora: None,
                },
                post_attention_layernorm: self
                    .norm(&format!("{p}.post_attention_layernorm.weight"), config.rms_norm_eps)?,
            });
        }
        let norm = self.norm("model.norm.weight", config.rms_norm_eps)?;
        let lm_head = if config.tie_word_embeddings { None } else { Some(self.param("lm_head.weight")?) };
        Ok(CausalLm { embed_tokens, layers, norm, lm_head })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Architecture;
    use safetensors::tensor::TensorView;

    fn tiny_config() -> ModelConfig {
        let value = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 8, "intermediate_size": 12,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "vocab_size": 10, "tie_word_embeddings": true
        });
        ModelConfig::from_hf_json(&value, Path::new("config.json")).unwrap()
    }

    /// Writes every expected tensor with values `i * 0.25 - 3` in `dtype` and reads them back.
    fn round_trip(dtype: Dtype) {
        let config = tiny_config();
        assert_eq!(config.architecture, Architecture::Llama);
        let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = expected_tensors(&config)
            .into_iter()
            .map(|(name, shape)| {
                let count: usize = shape.iter().product();
                let bytes = (0..count)
                    .flat_map(|i| {
                        let value = i as f32 * 0.25 - 3.0;
                        match dtype {
                            Dtype::F16 => half::f16::from_f32(value).to_le_bytes().to_vec(),
                            Dtype::BF16 => half::bf16::from_f32(value).to_le_bytes().to_vec(),
                            _ => value.to_le_bytes().to_vec(),
                        }
                    })
                    .collect();
                (name, shape, bytes)
            })
            .collect();
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(name, shape, bytes)| (name.clone(), TensorView::new(dtype, shape.clone(), bytes).unwrap()))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        safetensors::serialize_to_file(views, None, &dir.path().join(SINGLE_FILE)).unwrap();

        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        for (name, shape) in expected_tensors(&config) {
            let (values, found) = checkpoint.read_f32(&name).unwrap().unwrap();
            assert_eq!(found, shape);
            for (i, value) in values.iter().enumerate() {
                // Multiples of 0.25 below 2^8 are exact in f16 and bf16.
                assert_eq!(*value, i as f32 * 0.25 - 3.0, "{name}[{i}] from {dtype:?}");
            }
        }
        let device = crate::device::parse("flex").unwrap();
        let model = load(dir.path(), &config, &device, LoadOptions::default()).unwrap();
        // HF `[out, in]` becomes burn's `[in, out]`.
        let q = model.layers[0].self_attn.q_proj.weight();
        assert_eq!(q.dims(), [8, 8]);
        let q = q.into_data().convert::<f32>();
        assert_eq!(q.as_slice::<f32>().unwrap()[1], 8.0 * 0.25 - 3.0);
    }

    #[test]
    fn loads_f32_f16_and_bf16() {
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            round_trip(dtype);
        }
    }

    #[test]
    fn rejects_integer_tensors() {
        let config = tiny_config();
        let dir = tempfile::tempdir().unwrap();
        let bytes = vec![0u8; 80 * 8];
        let view = TensorView::new(Dtype::I64, vec![10, 8], &bytes).unwrap();
        safetensors::serialize_to_file(vec![("model.embed_tokens.weight", view)], None, &dir.path().join(SINGLE_FILE)).unwrap();
        let device = crate::device::parse("flex").unwrap();
        let error = load(dir.path(), &config, &device, LoadOptions::default()).unwrap_err().to_string();
        assert!(error.contains("model.embed_tokens.weight") && error.contains("I64"), "{error}");
    }
}
