//! A checkpoint's tokenizer: `tokenizer.json` through the `tokenizers` crate, plus what
//! `tokenizer_config.json` adds (chat template, named special tokens).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::chat_template::{ChatTemplate, Message, TemplateError};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("{path}: field `{field}`: {message}")]
    Field { path: PathBuf, field: String, message: String },
    #[error("{path}: no chat template (neither `chat_template` in tokenizer_config.json nor chat_template.jinja)")]
    NoChatTemplate { path: PathBuf },
    #[error("{path}: {source}")]
    Template {
        path: PathBuf,
        #[source]
        source: TemplateError,
    },
    #[error("tokenization failed: {0}")]
    Encode(String),
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<ChatTemplate>,
    /// `(name, token)` for bos/eos/unk/pad as tokenizer_config.json names them.
    special_tokens: Vec<(String, String)>,
    config_path: PathBuf,
}

/// A token given either as a string or as a serialized `AddedToken` object.
fn token_content(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(object) => object.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

/// The bytes of a folder's `tokenizer.json`, or of `tokenizer.json.gz` unpacked when only that is
/// there (a 6 MB vocabulary stored compressed), with the path read.
pub fn read_tokenizer_json(dir: &Path) -> Result<(PathBuf, Vec<u8>), TokenizerError> {
    let plain = dir.join("tokenizer.json");
    let packed = dir.join("tokenizer.json.gz");
    let error = |path: &Path, e: std::io::Error| TokenizerError::Load { path: path.to_path_buf(), message: e.to_string() };
    if !plain.exists() && packed.exists() {
        let mut bytes = Vec::new();
        let file = std::fs::File::open(&packed).map_err(|e| error(&packed, e))?;
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(file), &mut bytes).map_err(|e| error(&packed, e))?;
        return Ok((packed, bytes));
    }
    let bytes = std::fs::read(&plain).map_err(|e| error(&plain, e))?;
    Ok((plain, bytes))
}

impl Tokenizer {
    /// Loads `tokenizer.json` (or `tokenizer.json.gz`) and (when present) `tokenizer_config.json` and `chat_template.jinja`
    /// from a checkpoint folder.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let (tokenizer_path, bytes) = read_tokenizer_json(dir)?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::Load {
            path: tokenizer_path.clone(),
            message: e.to_string(),
        })?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.exists() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| TokenizerError::Load { path: config_path.clone(), message: e.to_string() })?;
            serde_json::from_str(&text)
                .map_err(|e| TokenizerError::Load { path: config_path.clone(), message: format!("not valid JSON: {e}") })?
        } else {
            Value::Object(Default::default())
        };

        let mut special_tokens = Vec::new();
        for name in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            if let Some(token) = config.get(name).and_then(token_content) {
                special_tokens.push((name.to_string(), token));
            }
        }

        // transformers v5 saves the template beside the config and prefers that file.
        let jinja_path = dir.join("chat_template.jinja");
        let (source, source_path) = if jinja_path.exists() {
            let text = std::fs::read_to_string(&jinja_path)
                .map_err(|e| TokenizerError::Load { path: jinja_path.clone(), message: e.to_string() })?;
            (Some(text), jinja_path)
        } else {
            (Self::template_from_config(&config, &config_path)?, config_path.clone())
        };
        let chat_template = match source {
            Some(source) => Some(
                ChatTemplate::new(&source).map_err(|source| TokenizerError::Template { path: source_path, source })?,
            ),
            None => None,
        };
        Ok(Tokenizer { inner, chat_template, special_tokens, config_path })
    }

    fn template_from_config(config: &Value, path: &Path) -> Result<Option<String>, TokenizerError> {
        match config.get("chat_template") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(source)) => Ok(Some(source.clone())),
            // A list of named templates: the one named "default" is the chat template.
            Some(Value::Array(templates)) => Ok(templates
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(String::from)),
            Some(other) => Err(TokenizerError::Field {
                path: path.to_path_buf(),
                field: "chat_template".into(),
                message: format!("expected a string or a list of named templates, got {other}"),
            }),
        }
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor
    /// (e.g. Llama 3's and DeepSeek's BOS), as `tokenizer(text)` does in transformers.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Ids the tokenizer can produce (its vocabulary with the added tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The named special token (`"bos_token"`, `"eos_token"`, …) from tokenizer_config.json.
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special_tokens.iter().find(|(n, _)| n == name).map(|(_, t)| t.as_str())
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.special_token("eos_token").and_then(|t| self.token_to_id(t))
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, TokenizerError> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or_else(|| TokenizerError::NoChatTemplate { path: self.config_path.clone() })?;
        let tokens: Vec<(&str, &str)> = self.special_tokens.iter().map(|(n, t)| (n.as_str(), t.as_str())).collect();
        template
            .render(messages, add_generation_prompt, &tokens)
            .map_err(|source| TokenizerError::Template { path: self.config_path.clone(), source })
    }

    /// Token ids of a rendered conversation. transformers encodes the rendering without adding
    /// special tokens again: the template already wrote BOS where the model wants it.
    pub fn encode_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Vec<u32>, TokenizerError> {
        self.encode(&self.apply_chat_template(messages, add_generation_prompt)?, false)
    }
}
