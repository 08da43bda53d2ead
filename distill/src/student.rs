//! Student config files (`student_configs/*.toml`): the architecture of an R1 student exactly
//! as its HF `config.json` has it, where its base checkpoint lives, and training defaults.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::{ConfigError, ModelConfig};
pub use crate::train::options::TrainingOptions;

#[derive(Debug, thiserror::Error)]
pub enum StudentError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Toml { path: PathBuf, message: String },
    #[error(transparent)]
    Model(#[from] ConfigError),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct StudentFile {
    name: String,
    base_model: Option<String>,
    checkpoint: Option<PathBuf>,
    tokenizer: Option<PathBuf>,
    source: Option<String>,
    model: toml::Table,
    #[serde(default)]
    training: TrainingOptions,
}

#[derive(Debug, Clone)]
pub struct StudentConfig {
    pub path: PathBuf,
    pub name: String,
    /// The HF repository the base checkpoint comes from, e.g. `Qwen/Qwen2.5-Math-1.5B`.
    pub base_model: Option<String>,
    /// Local folder of the downloaded base checkpoint, resolved against the config's folder.
    pub checkpoint: Option<PathBuf>,
    /// Folder with the tokenizer to train with, when it is not the checkpoint's own.
    pub tokenizer: Option<PathBuf>,
    pub source: Option<String>,
    pub model: ModelConfig,
    pub training: TrainingOptions,
}

impl StudentConfig {
    pub fn from_path(path: &Path) -> Result<Self, StudentError> {
        let text = std::fs::read_to_string(path).map_err(|source| StudentError::Io { path: path.into(), source })?;
        let file: StudentFile =
            toml::from_str(&text).map_err(|e| StudentError::Toml { path: path.into(), message: e.to_string() })?;
        let json = serde_json::to_value(&file.model)
            .map_err(|e| StudentError::Toml { path: path.into(), message: e.to_string() })?;
        let model = ModelConfig::from_hf_json(&json, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        Ok(StudentConfig {
            path: path.into(),
            name: file.name,
            base_model: file.base_model,
            checkpoint: file.checkpoint.map(resolve),
            tokenizer: file.tokenizer.map(resolve),
            source: file.source,
            model,
            training: file.training,
        })
    }
}

/// What `distill info` and friends accept: a student TOML, an HF folder, or a config.json.
pub fn model_config_from_any(path: &Path) -> Result<(ModelConfig, Option<StudentConfig>), StudentError> {
    if path.extension().is_some_and(|e| e == "toml") {
        let student = StudentConfig::from_path(path)?;
        Ok((student.model.clone(), Some(student)))
    } else {
        Ok((ModelConfig::from_path(path)?, None))
    }
}
