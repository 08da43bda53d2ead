//! A whole HF checkpoint folder: model, tokenizer and the generation settings that matter.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde_json::Value;

use crate::model::{LoadOptions, Model, ModelError};
use crate::text::{Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum PretrainedError {
    #[error("{0}: not a folder (expected a Hugging Face checkpoint folder)")]
    NotADirectory(PathBuf),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("{path}: {message}")]
    GenerationConfig { path: PathBuf, message: String },
    #[error("{dir}: the tokenizer has {tokenizer} tokens but config.json's vocab_size is {model}; they come from different models")]
    VocabularyMismatch { dir: PathBuf, tokenizer: usize, model: usize },
}

pub struct Pretrained {
    pub dir: PathBuf,
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// Every id that ends generation: `eos_token_id` of generation_config.json and config.json.
    pub eos_token_ids: Vec<u32>,
}

fn ids_of(value: Option<&Value>) -> Option<Vec<u32>> {
    match value? {
        Value::Array(items) => Some(items.iter().filter_map(Value::as_u64).map(|id| id as u32).collect()),
        other => other.as_u64().map(|id| vec![id as u32]),
    }
}

/// eos ids of `generation_config.json` (if any) followed by those of `config.json`.
pub fn eos_token_ids(dir: &Path, config_eos: &[u32]) -> Result<Vec<u32>, PretrainedError> {
    let mut ids: Vec<u32> = Vec::new();
    let path = dir.join("generation_config.json");
    if path.exists() {
        let error = |message: String| PretrainedError::GenerationConfig { path: path.clone(), message };
        let text = std::fs::read_to_string(&path).map_err(|e| error(e.to_string()))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| error(format!("not valid JSON: {e}")))?;
        ids.extend(ids_of(value.get("eos_token_id")).unwrap_or_default());
    }
    ids.extend_from_slice(config_eos);
    let mut seen = BTreeSet::new();
    ids.retain(|id| seen.insert(*id));
    Ok(ids)
}

impl Pretrained {
    pub fn load(dir: &Path, device: &Device, options: LoadOptions) -> Result<Self, PretrainedError> {
        if !dir.is_dir() {
            return Err(PretrainedError::NotADirectory(dir.into()));
        }
        let model = Model::load(dir, device, options)?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        // An id past the embedding table would be an out-of-bounds gather deep in the backend.
        let tokens = tokenizer.inner().get_vocab_size(true);
        if tokens > model.config.vocab_size {
            return Err(PretrainedError::VocabularyMismatch { dir: dir.into(), tokenizer: tokens, model: model.config.vocab_size });
        }
        let eos_token_ids = eos_token_ids(dir, &model.config.eos_token_ids)?;
        Ok(Pretrained { dir: dir.into(), model, tokenizer, eos_token_ids })
    }
}
