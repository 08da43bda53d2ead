//! Writing a model as a Hugging Face checkpoint folder that transformers and vLLM load as it is:
//! HF tensor names and layouts, safetensors shards of at most `max_shard_size` with
//! `model.safetensors.index.json`, `config.json`, `generation_config.json` and the tokenizer.
//!
//! The folder is assembled under a temporary name beside the destination and renamed into
//! place at the end, so a crash never leaves a half-written checkpoint under the final name.
//! Tensors are converted and written one at a time: memory holds one tensor, not a second
//! model.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use burn::tensor::Tensor;
use safetensors::Dtype;
use serde_json::json;

use crate::model::linear::Linear;
use crate::model::weights::{INDEX_FILE, SINGLE_FILE, expected_tensors};
use crate::model::{CausalLm, Model};
use crate::tensor_file::{self, Entry, TensorFileError};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0} already exists and is not empty; choose another --out or remove it")]
    Exists(PathBuf),
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tensors(#[from] TensorFileError),
    #[error("unknown dtype `{0}` (bf16, f16 or f32)")]
    Dtype(String),
    #[error("bad shard size `{0}` (e.g. 5GB, 500MB)")]
    ShardSize(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportDtype {
    F32,
    BF16,
    F16,
}

impl ExportDtype {
    pub fn parse(name: &str) -> Result<Self, ExportError> {
        match name {
            "f32" | "float32" => Ok(ExportDtype::F32),
            "bf16" | "bfloat16" => Ok(ExportDtype::BF16),
            "f16" | "float16" => Ok(ExportDtype::F16),
            other => Err(ExportError::Dtype(other.into())),
        }
    }

    fn torch_name(self) -> &'static str {
        match self {
            ExportDtype::F32 => "float32",
            ExportDtype::BF16 => "bfloat16",
            ExportDtype::F16 => "float16",
        }
    }

    fn safetensors(self) -> Dtype {
        match self {
            ExportDtype::F32 => Dtype::F32,
            ExportDtype::BF16 => Dtype::BF16,
            ExportDtype::F16 => Dtype::F16,
        }
    }

    fn bytes_per_value(self) -> u64 {
        if self == ExportDtype::F32 { 4 } else { 2 }
    }

    fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            ExportDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ExportDtype::BF16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
            ExportDtype::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        }
    }
}

/// `5GB`, `500MB`, `2GiB` → bytes (transformers' `max_shard_size` spelling; GB = 10⁹).
pub fn parse_shard_size(text: &str) -> Result<u64, ExportError> {
    let upper = text.trim().to_uppercase();
    let split = upper.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(upper.len());
    let (number, unit) = upper.split_at(split);
    let number: f64 = number.parse().map_err(|_| ExportError::ShardSize(text.into()))?;
    let scale = match unit.trim() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(ExportError::ShardSize(text.into())),
    };
    Ok((number * scale) as u64)
}

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub dtype: ExportDtype,
    pub max_shard_bytes: u64,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions { dtype: ExportDtype::BF16, max_shard_bytes: 5_000_000_000 }
    }
}

/// One parameter in HF layout: values (f32, row-major) and shape.
fn hf_tensor(net: &CausalLm, name: &str) -> Option<(Vec<f32>, Vec<usize>)> {
    fn data<const D: usize>(tensor: Tensor<D>) -> (Vec<f32>, Vec<usize>) {
        let shape = tensor.dims().to_vec();
        let data = tensor.into_data().convert::<f32>();
        let values = data.as_slice::<f32>().map(<[f32]>::to_vec).unwrap_or_default();
        (values, shape)
    }
    // burn's Linear stores `[in, out]`; HF stores `[out, in]`.
    let linear_weight = |linear: &Linear| data(linear.weight().transpose());
    let bias = |linear: &Linear| linear.bias.as_ref().map(|b| data(b.val()));
    match name {
        "model.embed_tokens.weight" => return Some(data(net.embed_tokens.weight.val())),
        "model.norm.weight" => return Some(data(net.norm.gamma.val())),
        "lm_head.weight" => return net.lm_head.as_ref().map(|head| data(head.val())),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (index, field) = rest.split_once('.')?;
    let layer = net.layers.get(index.parse::<usize>().ok()?)?;
    let attention = &layer.self_attn;
    let mlp = &layer.mlp;
    Some(match field {
        "input_layernorm.weight" => data(layer.input_layernorm.gamma.val()),
        "post_attention_layernorm.weight" => data(layer.post_attention_layernorm.gamma.val()),
        "self_attn.q_proj.weight" => linear_weight(&attention.q_proj),
        "self_attn.k_proj.weight" => linear_weight(&attention.k_proj),
        "self_attn.v_proj.weight" => linear_weight(&attention.v_proj),
        "self_attn.o_proj.weight" => linear_weight(&attention.o_proj),
        "self_attn.q_proj.bias" => bias(&attention.q_proj)?,
        "self_attn.k_proj.bias" => bias(&attention.k_proj)?,
        "self_attn.v_proj.bias" => bias(&attention.v_proj)?,
        "self_attn.o_proj.bias" => bias(&attention.o_proj)?,
        "mlp.gate_proj.weight" => linear_weight(&mlp.gate_proj),
        "mlp.up_proj.weight" => linear_weight(&mlp.up_proj),
        "mlp.down_proj.weight" => linear_weight(&mlp.down_proj),
        "mlp.gate_proj.bias" => bias(&mlp.gate_proj)?,
        "mlp.up_proj.bias" => bias(&mlp.up_proj)?,
        "mlp.down_proj.bias" => bias(&mlp.down_proj)?,
        _ => return None,
    })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Io { path: path.to_path_buf(), source }
}

/// Files of the source checkpoint that travel with the weights.
const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
];

/// Writes `model` as an HF checkpoint at `out`. `tokenizer_dir` supplies the tokenizer files;
/// `eos_token_ids` go into generation_config.json (every id that ends a turn of the template).
pub fn export(
    model: &Model,
    tokenizer_dir: &Path,
    eos_token_ids: &[u32],
    out: &Path,
    options: &ExportOptions,
) -> Result<(), ExportError> {
    if out.exists() && fs::read_dir(out).map_err(io(out))?.next().is_some() {
        return Err(ExportError::Exists(out.into()));
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(io(parent))?;
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "export".into());
    let staging = crate::staging::folder(parent, &format!(".{name}.partial-"));
    crate::staging::or_remove(&staging, || write_folder(model, tokenizer_dir, eos_token_ids, out, &staging, options))
}

/// The files of an export, in `staging`, renamed to `out` when complete.
fn write_folder(model: &Model, tokenizer_dir: &Path, eos_token_ids: &[u32], out: &Path, staging: &Path, options: &ExportOptions) -> Result<(), ExportError> {
    if staging.exists() {
        fs::remove_dir_all(staging).map_err(io(staging))?;
    }
    fs::create_dir_all(staging).map_err(io(staging))?;

    // Shards by cumulative size, in checkpoint order.
    let tensors = expected_tensors(&model.config);
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new()];
    let mut shard_bytes = 0u64;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() as u64 * options.dtype.bytes_per_value();
        if shard_bytes > 0 && shard_bytes + bytes > options.max_shard_bytes {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shard_bytes += bytes;
        shards.last_mut().expect("one shard at least").push((name, shape));
    }
    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total_size = 0u64;
    for (index, shard) in shards.iter().enumerate() {
        let file_name = if count == 1 { SINGLE_FILE.to_string() } else { format!("model-{:05}-of-{:05}.safetensors", index + 1, count) };
        let path = staging.join(&file_name);
        let entries: Vec<Entry> = shard.iter().map(|(name, shape)| Entry::new(name.clone(), options.dtype.safetensors(), shape.clone())).collect();
        let metadata = [("format".to_string(), "pt".to_string())].into_iter().collect();
        // One tensor at a time: memory holds one tensor's values, never a shard.
        total_size += tensor_file::write(&path, &entries, Some(&metadata), |i| {
            let (values, _) = hf_tensor(&model.net, &entries[i].name).expect("every expected tensor exists in the model");
            Ok(options.dtype.encode(&values))
        })?;
        for entry in &entries {
            weight_map.insert(entry.name.clone(), file_name.clone());
        }
    }
    let write_json = |file: &str, value: serde_json::Value| -> Result<(), ExportError> {
        let path = staging.join(file);
        let text = serde_json::to_string_pretty(&value).expect("JSON values serialize");
        fs::write(&path, text + "\n").map_err(io(&path))
    };
    if count > 1 {
        write_json(INDEX_FILE, json!({"metadata": {"total_size": total_size}, "weight_map": weight_map}))?;
    }
    write_json("config.json", model.config.to_hf_json(options.dtype.torch_name()))?;
    let mut generation = json!({"_from_model_config": false});
    if let Some(bos) = model.config.bos_token_id {
        generation["bos_token_id"] = bos.into();
    }
    generation["eos_token_id"] = match eos_token_ids {
        [single] => (*single).into(),
        many => many.into(),
    };
    write_json("generation_config.json", generation)?;
    for file in TOKENIZER_FILES {
        let source = tokenizer_dir.join(file);
        let target = staging.join(file);
        if source.exists() {
            fs::copy(&source, &target).map_err(io(&target))?;
        } else if file == "tokenizer.json" && tokenizer_dir.join("tokenizer.json.gz").exists() {
            // transformers and vLLM read tokenizer.json only: a compressed one is written unpacked.
            let (_, bytes) = crate::text::tokenizer::read_tokenizer_json(tokenizer_dir)
                .map_err(|e| ExportError::Io { path: tokenizer_dir.join("tokenizer.json.gz"), source: std::io::Error::other(e.to_string()) })?;
            fs::write(&target, bytes).map_err(io(&target))?;
        }
    }
    // Make the files durable before the rename publishes them.
    for entry in fs::read_dir(staging).map_err(io(staging))? {
        let path = entry.map_err(io(staging))?.path();
        fs::File::open(&path).and_then(|f| f.sync_all()).map_err(io(&path))?;
    }
    if out.exists() {
        fs::remove_dir(out).map_err(io(out))?;
    }
    fs::rename(staging, out).map_err(io(out))?;
    Ok(())
}
