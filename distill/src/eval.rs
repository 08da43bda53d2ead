//! `distill eval`: mean negative log-likelihood per token of a dataset under a model.
//!
//! A `text` row scores every token after the first, with the tokenizer's own special tokens
//! added as transformers adds them. A `messages` row is rendered with the chat template and
//! scores only the final assistant turn, up to and including its end-of-turn token — the
//! tokens a distilled student is trained to produce.

use serde::Serialize;
use serde_json::Value;


use crate::data::records::{DataError, Record, type_name};
use crate::model::Model;
use crate::text::{Message, Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("{location}: {source}")]
    Tokenizer {
        location: String,
        #[source]
        source: TokenizerError,
    },
    #[error("{location}: {message}")]
    Row { location: String, message: String },
}

/// A tokenized row and which of its tokens are scored.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    /// Positions `t` whose token is predicted from `input_ids[..t]` and scored.
    pub scored: std::ops::Range<usize>,
}

/// Parses a `messages` field: a list of `{role, content}` objects.
pub fn parse_messages(record: &Record, field: &str) -> Result<Vec<Message>, DataError> {
    let items = match record.fields.get(field) {
        Some(Value::Array(items)) => items,
        None | Some(Value::Null) => return Err(record.field_error(field, "missing")),
        Some(other) => return Err(record.field_error(field, format!("expected a list of messages, got {}", type_name(other)))),
    };
    items
        .iter()
        .enumerate()
        .map(|(index, item)| {
            let at = |what: &str| format!("{field}[{index}].{what}");
            let role = item.get("role").and_then(Value::as_str).ok_or_else(|| record.field_error(&at("role"), "missing or not a string"))?;
            let content = match item.get("content") {
                Some(Value::String(content)) => content.clone(),
                None | Some(Value::Null) => String::new(),
                Some(other) => return Err(record.field_error(&at("content"), format!("expected a string, got {}", type_name(other)))),
            };
            Ok(Message::new(role, content))
        })
        .collect()
}

impl Example {
    pub fn from_record(record: &Record, tokenizer: &Tokenizer) -> Result<Self, EvalError> {
        let tokenizer_error = |source| EvalError::Tokenizer { location: record.location(), source };
        let present = |field: &str| record.fields.get(field).is_some_and(|v| !v.is_null());
        if present("text") {
            let input_ids = tokenizer.encode(record.string("text")?, true).map_err(tokenizer_error)?;
            if input_ids.len() < 2 {
                return Err(EvalError::Row { location: record.location(), message: "`text` has fewer than 2 tokens; nothing to score".into() });
            }
            let scored = 1..input_ids.len();
            return Ok(Example { input_ids, scored });
        }
        if present("messages") {
            let messages = parse_messages(record, "messages")?;
            return Self::from_messages(&messages, tokenizer).map_err(|message| match message {
                MessagesError::Tokenizer(source) => tokenizer_error(source),
                MessagesError::Row(message) => EvalError::Row { location: record.location(), message },
            });
        }
        Err(record
            .field_error("text", "the row has neither a `text` nor a `messages` field")
            .into())
    }

    /// Chat rows: the completion is what the full rendering adds to the rendering of the
    /// history with the generation prompt, cut after the first end-of-turn token.
    pub fn from_messages(messages: &[Message], tokenizer: &Tokenizer) -> Result<Self, MessagesError> {
        let Some((last, history)) = messages.split_last() else {
            return Err(MessagesError::Row("`messages` is empty".into()));
        };
        if last.role != "assistant" {
            return Err(MessagesError::Row(format!("the last message has role `{}`; it must be the assistant turn to score", last.role)));
        }
        let prefix = tokenizer.encode_chat(history, true)?;
        let input_ids = tokenizer.encode_chat(messages, false)?;
        if !input_ids.starts_with(&prefix) || input_ids.len() == prefix.len() {
            return Err(MessagesError::Row(
                "the chat template does not render the final assistant turn after the generation prompt; cannot tell which tokens to score".into(),
            ));
        }
        let end = match tokenizer.eos_token_id() {
            Some(eos) => input_ids[prefix.len()..]
                .iter()
                .position(|&id| id == eos)
                .map_or(input_ids.len(), |offset| prefix.len() + offset + 1),
            None => input_ids.len(),
        };
        Ok(Example { input_ids, scored: prefix.len()..end })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MessagesError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("{0}")]
    Row(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct RowScore {
    pub nll: f64,
    pub tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Token-weighted mean NLL over all scored tokens.
    pub mean_nll: f64,
    pub total_tokens: usize,
    pub rows: Vec<RowScore>,
}

/// Positions per logits chunk: bounds the `[chunk, vocab]` buffers (152k-entry vocabularies
/// make full-sequence logits of long traces several GB).
const LOGITS_CHUNK: usize = 256;

/// `log Σ exp(x)` accumulated in f64. An f32 log-softmax over a 152k vocabulary loses ~1e-5
/// relative in the sum, which is more than the model's own error against transformers.
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    max + logits.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln()
}

/// Summed NLL of the scored tokens of one example.
pub fn example_nll(model: &Model, example: &Example) -> (f64, usize) {
    let ids = &example.input_ids;
    let hidden = model.hidden(std::slice::from_ref(ids));

    // Target t is predicted by the hidden state at t - 1.
    let first = example.scored.start.max(1) - 1;
    let last = example.scored.end - 1;
    let mut total = 0.0f64;
    let mut start = first;
    while start < last {
        let len = (last - start).min(LOGITS_CHUNK);
        let logits = model.net.logits(hidden.clone().narrow(1, start, len)).into_data().convert::<f32>();
        let logits = logits.as_slice::<f32>().expect("f32 data");
        let vocab = logits.len() / len;
        for (offset, row) in logits.chunks_exact(vocab).enumerate() {
            total += log_sum_exp(row) - row[ids[start + offset + 1] as usize] as f64;
        }
        start += len;
    }
    (total, last - first)
}

pub fn evaluate(model: &Model, examples: &[Example], mut on_row: impl FnMut(usize)) -> EvalReport {
    let mut rows = Vec::with_capacity(examples.len());
    let (mut sum, mut count) = (0.0, 0);
    for (index, example) in examples.iter().enumerate() {
        let (nll, tokens) = example_nll(model, example);
        sum += nll;
        count += tokens;
        rows.push(RowScore { nll: if tokens > 0 { nll / tokens as f64 } else { 0.0 }, tokens });
        on_row(index);
    }
    EvalReport { mean_nll: if count > 0 { sum / count as f64 } else { f64::NAN }, total_tokens: count, rows }
}
