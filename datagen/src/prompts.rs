//! The prompt set: JSONL or Parquet rows with an id, a problem and (optionally) a reference
//! answer, under names that `--id-field`, `--problem-field` and `--answer-field` change.

use std::collections::HashMap;
use std::path::Path;

use distill::data::records::{DataError, read_records};
use serde_json::Value;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub id: String,
    pub problem: String,
    pub answer: Option<String>,
    pub source: Option<String>,
    /// Carried into the open-r1 export when the prompt file has them (OpenR1-Math-220k's
    /// `solution`, `problem_type`, `question_type`).
    pub solution: Option<String>,
    pub problem_type: Option<String>,
    pub question_type: Option<String>,
}

#[derive(Debug, Clone)]
pub struct PromptFields {
    pub id: String,
    pub problem: String,
    pub answer: String,
}

impl Default for PromptFields {
    fn default() -> Self {
        PromptFields { id: "id".into(), problem: "problem".into(), answer: "answer".into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("{0}: no prompts")]
    Empty(String),
    #[error("{location}: `{field}`: {message}")]
    Field { location: String, field: String, message: String },
    #[error("{second}: id `{id}` was already used at {first}; ids must be unique (or leave the id field out to use a hash of the problem)")]
    Duplicate { id: String, first: String, second: String },
}

/// A stable id for a problem without one (and the sampling settings' hash): the first 16 hex
/// digits of its SHA-256.
pub fn hash_id(problem: &str) -> String {
    let digest = Sha256::digest(problem.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The part of `parts` that prompt `id` belongs to (`--prompt-shard`): from a hash of the id, so
/// it does not depend on the order or the number of prompts in the file.
pub fn shard_of(id: &str, parts: u64) -> u64 {
    let digest = Sha256::digest(id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first) % parts.max(1)
}

/// Numbers are accepted where text is expected (GSM8K answers, integer ids).
fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

pub fn read_prompts(path: &Path, fields: &PromptFields) -> Result<Vec<Prompt>, PromptError> {
    let records = read_records(path)?;
    let mut prompts = Vec::with_capacity(records.len());
    let mut seen: HashMap<String, String> = HashMap::new();
    for record in &records {
        let field_error = |field: &str, message: &str| PromptError::Field {
            location: record.location(),
            field: field.to_string(),
            message: message.to_string(),
        };
        let problem = match record.fields.get(&fields.problem) {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(Value::String(_)) => return Err(field_error(&fields.problem, "empty")),
            None | Some(Value::Null) => return Err(field_error(&fields.problem, "missing (name the column with --problem-field)")),
            Some(_) => return Err(field_error(&fields.problem, "expected a string")),
        };
        let id = match record.fields.get(&fields.id) {
            None | Some(Value::Null) => hash_id(&problem),
            Some(value) => text(value).ok_or_else(|| field_error(&fields.id, "expected a string or a number"))?,
        };
        let answer = match record.fields.get(&fields.answer) {
            None | Some(Value::Null) => None,
            Some(value) => Some(text(value).ok_or_else(|| field_error(&fields.answer, "expected a string or a number"))?),
        };
        let source = record.fields.get("source").and_then(text);
        if let Some(first) = seen.insert(id.clone(), record.location()) {
            return Err(PromptError::Duplicate { id, first, second: record.location() });
        }
        let optional = |name: &str| record.fields.get(name).and_then(text);
        prompts.push(Prompt {
            id,
            problem,
            answer,
            source,
            solution: optional("solution"),
            problem_type: optional("problem_type"),
            question_type: optional("question_type"),
        });
    }
    if prompts.is_empty() {
        return Err(PromptError::Empty(path.display().to_string()));
    }
    Ok(prompts)
}
