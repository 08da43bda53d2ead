//! Hugging Face `config.json` for the two student families of the R1 distillation.
//!
//! Both the classic layout of the published checkpoints (`rope_theta`, `rope_scaling`,
//! `torch_dtype` at the top level) and transformers v5's (`rope_parameters`, `dtype`) are read.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: field `{field}`: {message}")]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// The architectures this toolkit implements. Both are pre-norm decoder-only transformers with
/// RMSNorm, SwiGLU MLPs, grouped-query attention and rotate-half RoPE; they differ in biases
/// and in RoPE scaling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    #[serde(rename = "Qwen2ForCausalLM")]
    Qwen2,
    #[serde(rename = "LlamaForCausalLM")]
    Llama,
}

impl Architecture {
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Llama => "LlamaForCausalLM",
        }
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Qwen2 => "qwen2",
            Architecture::Llama => "llama",
        }
    }
}

/// RoPE frequency scaling, as in transformers' `ROPE_INIT_FUNCTIONS`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Llama 3.1's piecewise scaling of the low frequencies.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
}

/// Architecture of a student, with the names of HF `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (always on for Qwen2; `attention_bias` for Llama, which then
    /// also puts one on o_proj).
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// dtype the checkpoint was saved in (`torch_dtype` / `dtype`), e.g. "bfloat16".
    pub torch_dtype: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// Reads the typed fields out of a `config.json` object, naming the field on every error.
struct Fields<'a> {
    path: &'a Path,
    object: &'a serde_json::Map<String, Value>,
}

impl Fields<'_> {
    fn error(&self, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Field {
            path: self.path.to_path_buf(),
            field: field.to_string(),
            message: message.into(),
        }
    }

    fn get(&self, field: &str) -> Option<&Value> {
        self.object.get(field).filter(|value| !value.is_null())
    }

    /// An optional field read by `convert`, which returns `None` for a value of the wrong type.
    fn typed<T>(&self, field: &str, expected: &str, convert: impl Fn(&Value) -> Option<T>) -> Result<Option<T>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(value) => convert(value)
                .map(Some)
                .ok_or_else(|| self.error(field, format!("expected {expected}, got {value}"))),
        }
    }

    fn usize(&self, field: &str) -> Result<Option<usize>, ConfigError> {
        self.typed(field, "a positive integer", |v| v.as_u64().filter(|&n| n > 0).map(|n| n as usize))
    }

    fn required_usize(&self, field: &str) -> Result<usize, ConfigError> {
        self.usize(field)?
            .ok_or_else(|| self.error(field, "missing (required for this architecture)"))
    }

    fn f64(&self, field: &str) -> Result<Option<f64>, ConfigError> {
        self.typed(field, "a number", Value::as_f64)
    }

    fn bool(&self, field: &str) -> Result<Option<bool>, ConfigError> {
        self.typed(field, "true or false", Value::as_bool)
    }

    fn string(&self, field: &str) -> Result<Option<String>, ConfigError> {
        self.typed(field, "a string", |v| v.as_str().map(String::from))
    }

    /// `eos_token_id` is an int in base checkpoints and a list in Llama 3.x Instruct ones.
    fn token_ids(&self, field: &str) -> Result<Vec<u32>, ConfigError> {
        let bad = |value: &Value| self.error(field, format!("expected a token id or a list of them, got {value}"));
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| item.as_u64().map(|id| id as u32).ok_or_else(|| bad(item)))
                .collect(),
            Some(value) => value.as_u64().map(|id| vec![id as u32]).ok_or_else(|| bad(value)),
        }
    }
}

impl ModelConfig {
    /// Reads `config.json` from a checkpoint folder or a path to the file itself.
    pub fn from_path(path: &Path) -> Result<Self, ConfigError> {
        let file = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&file).map_err(|source| ConfigError::Io {
            path: file.clone(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|source| ConfigError::Json {
            path: file.clone(),
            source,
        })?;
        Self::from_hf_json(&value, &file)
    }

    /// Parses an HF config object; `path` is only used to name the file in errors.
    pub fn from_hf_json(value: &Value, path: &Path) -> Result<Self, ConfigError> {
        let object = value.as_object().ok_or_else(|| ConfigError::Field {
            path: path.to_path_buf(),
            field: "(top level)".into(),
            message: "expected a JSON object".into(),
        })?;
        let fields = Fields { path, object };

        let architecture = Self::architecture(&fields)?;
        let hidden_size = fields.required_usize("hidden_size")?;
        let num_attention_heads = fields.required_usize("num_attention_heads")?;
        let num_key_value_heads = fields.usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(fields.error(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads = {num_attention_heads}"),
            ));
        }
        let head_dim = match fields.usize("head_dim")? {
            Some(head_dim) => head_dim,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(fields.error(
                    "num_attention_heads",
                    format!("{num_attention_heads} does not divide hidden_size = {hidden_size} and no head_dim is given"),
                ));
            }
        };
        if head_dim % 2 != 0 {
            return Err(fields.error("head_dim", format!("{head_dim} is odd; rotary embeddings need an even head_dim")));
        }

        if let Some(activation) = fields.string("hidden_act")? {
            if activation != "silu" {
                return Err(fields.error("hidden_act", format!("\"{activation}\" is not supported (only \"silu\")")));
            }
        }
        if architecture == Architecture::Qwen2 && fields.bool("use_sliding_window")?.unwrap_or(false) {
            return Err(fields.error("use_sliding_window", "true is not supported: sliding-window attention is not implemented"));
        }
        if let Some(Value::Array(types)) = fields.get("layer_types") {
            if let Some(other) = types.iter().find(|t| t.as_str() != Some("full_attention")) {
                return Err(fields.error("layer_types", format!("{other} is not supported (only \"full_attention\")")));
            }
        }
        if fields.usize("pretraining_tp")?.unwrap_or(1) != 1 {
            return Err(fields.error("pretraining_tp", "only 1 is supported"));
        }

        let (rope_theta, rope_scaling) = Self::rope(&fields)?;
        let attention_bias = fields.bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            // Qwen2 always has q/k/v biases and never an o_proj bias.
            Architecture::Qwen2 => (true, false),
            Architecture::Llama => (attention_bias, attention_bias),
        };

        Ok(ModelConfig {
            architecture,
            vocab_size: fields.required_usize("vocab_size")?,
            hidden_size,
            intermediate_size: fields.required_usize("intermediate_size")?,
            num_hidden_layers: fields.required_usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: fields.usize("max_position_embeddings")?.unwrap_or(2048),
            rms_norm_eps: fields.f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: fields.bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: architecture == Architecture::Llama && fields.bool("mlp_bias")?.unwrap_or(false),
            torch_dtype: match fields.string("dtype")? {
                Some(dtype) => Some(dtype),
                None => fields.string("torch_dtype")?,
            },
            bos_token_id: fields.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: fields.token_ids("eos_token_id")?,
        })
    }

    fn architecture(fields: &Fields) -> Result<Architecture, ConfigError> {
        let names: Vec<String> = match fields.get("architectures") {
            Some(Value::Array(items)) => items.iter().filter_map(|v| v.as_str().map(String::from)).collect(),
            Some(other) => return Err(fields.error("architectures", format!("expected a list of names, got {other}"))),
            None => Vec::new(),
        };
        if let Some(name) = names.first() {
            return match name.as_str() {
                "Qwen2ForCausalLM" => Ok(Architecture::Qwen2),
                "LlamaForCausalLM" => Ok(Architecture::Llama),
                other => Err(fields.error(
                    "architectures",
                    format!("\"{other}\" is not supported (supported: Qwen2ForCausalLM, LlamaForCausalLM)"),
                )),
            };
        }
        match fields.string("model_type")?.as_deref() {
            Some("qwen2") => Ok(Architecture::Qwen2),
            Some("llama") => Ok(Architecture::Llama),
            Some(other) => Err(fields.error("model_type", format!("\"{other}\" is not supported (supported: qwen2, llama)"))),
            None => Err(fields.error("architectures", "missing, and no model_type either")),
        }
    }

    /// RoPE settings from either `rope_theta` + `rope_scaling` (classic) or `rope_parameters` (v5).
    fn rope(fields: &Fields) -> Result<(f64, Option<RopeScaling>), ConfigError> {
        let (parameters, field) = match fields.get("rope_parameters") {
            Some(parameters) => (Some(parameters), "rope_parameters"),
            None => (fields.get("rope_scaling"), "rope_scaling"),
        };
        let mut theta = fields.f64("rope_theta")?;
        let scaling = match parameters {
            None => None,
            Some(Value::Object(parameters)) => {
                let sub = Fields { path: fields.path, object: parameters };
                let qualified = |name: &str| format!("{field}.{name}");
                let number = |name: &str| -> Result<f64, ConfigError> {
                    sub.f64(name)
                        .map_err(|_| fields.error(&qualified(name), "expected a number"))?
                        .ok_or_else(|| fields.error(&qualified(name), "missing"))
                };
                if let Some(value) = sub.f64("rope_theta").map_err(|_| fields.error(&qualified("rope_theta"), "expected a number"))? {
                    theta = Some(value);
                }
                // transformers accepts the legacy key `type` as well as `rope_type`.
                let kind = match sub.get("rope_type").or_else(|| sub.get("type")) {
                    Some(Value::String(kind)) => kind.clone(),
                    Some(other) => return Err(fields.error(&qualified("rope_type"), format!("expected a string, got {other}"))),
                    None => "default".to_string(),
                };
                match kind.as_str() {
                    "default" => None,
                    "llama3" => Some(RopeScaling::Llama3 {
                        factor: number("factor")?,
                        low_freq_factor: number("low_freq_factor")?,
                        high_freq_factor: number("high_freq_factor")?,
                        original_max_position_embeddings: sub
                            .usize("original_max_position_embeddings")
                            .map_err(|_| fields.error(&qualified("original_max_position_embeddings"), "expected a positive integer"))?
                            .ok_or_else(|| fields.error(&qualified("original_max_position_embeddings"), "missing"))?,
                    }),
                    "linear" => Some(RopeScaling::Linear { factor: number("factor")? }),
                    other => {
                        return Err(fields.error(
                            &qualified("rope_type"),
                            format!("\"{other}\" is not supported (supported: default, llama3, linear)"),
                        ));
                    }
                }
            }
            Some(other) => return Err(fields.error(field, format!("expected an object or null, got {other}"))),
        };
        Ok((theta.unwrap_or(10_000.0), scaling))
    }

    /// The `config.json` transformers writes for this architecture (classic layout, which both
    /// transformers 4.x and v5 and vLLM read).
    pub fn to_hf_json(&self, dtype: &str) -> Value {
        let mut config = serde_json::json!({
            "architectures": [self.architecture.hf_name()],
            "model_type": self.architecture.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": dtype,
            "use_cache": true,
        });
        let object = config.as_object_mut().expect("literal object");
        match self.architecture {
            Architecture::Qwen2 => {
                object.insert("use_sliding_window".into(), false.into());
            }
            Architecture::Llama => {
                object.insert("attention_bias".into(), self.qkv_bias.into());
                object.insert("mlp_bias".into(), self.mlp_bias.into());
            }
        }
        object.insert(
            "rope_scaling".into(),
            match &self.rope_scaling {
                None => Value::Null,
                Some(scaling) => serde_json::to_value(scaling).expect("plain struct"),
            },
        );
        if let Some(bos) = self.bos_token_id {
            object.insert("bos_token_id".into(), bos.into());
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [single] => {
                object.insert("eos_token_id".into(), (*single).into());
            }
            many => {
                object.insert("eos_token_id".into(), many.into());
            }
        }
        config
    }

    /// The same config with `torch_dtype` set (what an export in that dtype reads back as).
    pub fn with_dtype_name(mut self, dtype: &str) -> Self {
        self.torch_dtype = Some(dtype.to_string());
        self
    }

    pub fn num_query_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Number of parameters, counted the way `model.num_parameters()` does (tied weights once).
    pub fn num_parameters(&self) -> u64 {
        let hidden = self.hidden_size as u64;
        let q_width = (self.num_attention_heads * self.head_dim) as u64;
        let kv_width = (self.num_key_value_heads * self.head_dim) as u64;
        let intermediate = self.intermediate_size as u64;
        let mut attention = hidden * q_width + 2 * hidden * kv_width + q_width * hidden;
        if self.qkv_bias {
            attention += q_width + 2 * kv_width;
        }
        if self.o_bias {
            attention += hidden;
        }
        let mut mlp = 3 * hidden * intermediate;
        if self.mlp_bias {
            mlp += 2 * intermediate + hidden;
        }
        let layer = attention + mlp + 2 * hidden;
        let embeddings = self.vocab_size as u64 * hidden;
        let head = if self.tie_word_embeddings { 0 } else { embeddings };
        embeddings + self.num_hidden_layers as u64 * layer + hidden + head
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: Value) -> Result<ModelConfig, ConfigError> {
        ModelConfig::from_hf_json(&value, Path::new("config.json"))
    }

    fn llama31_8b() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "attention_bias": false, "bos_token_id": 128000,
            "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
            "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
            "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
            "pretraining_tp": 1, "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16", "vocab_size": 128256
        })
    }

    #[test]
    fn classic_llama31_config() {
        let config = parse(llama31_8b()).unwrap();
        assert_eq!(config.architecture, Architecture::Llama);
        assert_eq!(config.head_dim, 128);
        assert_eq!(config.num_query_groups(), 4);
        assert_eq!(config.rope_theta, 500000.0);
        assert!(matches!(config.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 8.0));
        assert_eq!(config.torch_dtype.as_deref(), Some("bfloat16"));
        assert_eq!(config.num_parameters(), 8_030_261_248);
    }

    #[test]
    fn transformers_v5_rope_parameters_and_dtype() {
        let mut value = llama31_8b();
        let object = value.as_object_mut().unwrap();
        let scaling = object.remove("rope_scaling").unwrap();
        object.remove("rope_theta");
        object.remove("torch_dtype");
        let mut parameters = scaling.as_object().unwrap().clone();
        parameters.insert("rope_theta".into(), json!(500000.0));
        object.insert("rope_parameters".into(), Value::Object(parameters));
        object.insert("dtype".into(), json!("bfloat16"));
        assert_eq!(parse(value).unwrap(), parse(llama31_8b()).unwrap());
    }

    #[test]
    fn v5_default_rope_parameters() {
        let mut value = llama31_8b();
        let object = value.as_object_mut().unwrap();
        object.remove("rope_scaling");
        object.remove("rope_theta");
        object.insert("rope_parameters".into(), json!({"rope_type": "default", "rope_theta": 1000000.0}));
        let config = parse(value).unwrap();
        assert_eq!(config.rope_theta, 1e6);
        assert_eq!(config.rope_scaling, None);
    }

    #[test]
    fn legacy_type_key_and_linear_scaling() {
        let mut value = llama31_8b();
        value["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
        assert_eq!(parse(value).unwrap().rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
    }

    #[test]
    fn errors_name_the_field_and_value() {
        let mut value = llama31_8b();
        value["rope_scaling"] = json!({"rope_type": "dynamic", "factor": 2.0});
        let message = parse(value).unwrap_err().to_string();
        assert!(message.contains("rope_scaling.rope_type") && message.contains("dynamic"), "{message}");

        let mut value = llama31_8b();
        value["architectures"] = json!(["MistralForCausalLM"]);
        let message = parse(value).unwrap_err().to_string();
        assert!(message.contains("architectures") && message.contains("MistralForCausalLM"), "{message}");

        let mut value = llama31_8b();
        value["hidden_size"] = json!("4096");
        let message = parse(value).unwrap_err().to_string();
        assert!(message.contains("hidden_size") && message.contains("\"4096\""), "{message}");

        let mut value = llama31_8b();
        value.as_object_mut().unwrap().remove("vocab_size");
        assert!(parse(value).unwrap_err().to_string().contains("vocab_size"));
    }

    #[test]
    fn qwen_has_qkv_bias_and_round_trips() {
        let value = json!({
            "architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643, "eos_token_id": 151643,
            "hidden_act": "silu", "hidden_size": 1536, "intermediate_size": 8960,
            "max_position_embeddings": 4096, "model_type": "qwen2", "num_attention_heads": 12,
            "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
            "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": true,
            "torch_dtype": "bfloat16", "use_sliding_window": false, "vocab_size": 151936
        });
        let config = parse(value).unwrap();
        assert!(config.qkv_bias && !config.o_bias);
        assert_eq!(config.num_parameters(), 1_543_714_304);
        let written = config.to_hf_json("bfloat16");
        assert_eq!(parse(written).unwrap(), config);
    }
}
