//! Reasoning traces → tokenized SFT examples with a completion mask.
//!
//! The prompt (every turn before the final assistant turn) is rendered with the student's chat
//! template and its generation prompt; the final assistant turn is appended as written, then
//! the tokenizer's end-of-turn token. Rendering the assistant turn ourselves keeps the
//! reasoning: the R1-Distill template deletes everything up to `</think>` from assistant
//! messages, and training through it would teach the student to answer without thinking.

use super::records::{DataError, Record};
use crate::text::{Message, Tokenizer};

/// Which columns hold the conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceFormat {
    /// A list of `{role, content}` (TRL's conversational format; datagen's `messages`).
    Messages { field: String },
    /// A prompt and a response column (`problem` / `generated_solution` in public R1 trace sets).
    PromptResponse { prompt_field: String, response_field: String },
}

impl Default for TraceFormat {
    fn default() -> Self {
        TraceFormat::Messages { field: "messages".into() }
    }
}

/// What to do with a row longer than `max_length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LengthPolicy {
    /// Leave it out (counted). Truncated reasoning teaches a student to stop mid-thought.
    #[default]
    Drop,
    /// Keep its first `max_length` tokens (counted).
    Truncate,
}

#[derive(Debug, Clone)]
pub struct TraceOptions {
    pub format: TraceFormat,
    pub max_length: usize,
    pub length_policy: LengthPolicy,
    /// Train on the prompt tokens too (TRL's `completion_only_loss=False`).
    pub train_on_prompt: bool,
}

/// One tokenized example: `trained[t]` says whether token `t` is a target of the loss.
#[derive(Debug, Clone, PartialEq)]
pub struct SftExample {
    pub input_ids: Vec<u32>,
    pub trained: Vec<bool>,
}

impl SftExample {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of tokens the loss is computed on.
    pub fn trained_tokens(&self) -> usize {
        self.trained.iter().filter(|&&t| t).count()
    }
}

/// Rows that were not used, and why, so nothing is lost silently.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Skipped {
    /// Rows datagen marked `accepted: false` (rejection sampling).
    pub not_accepted: usize,
    pub too_long_dropped: usize,
    pub truncated: usize,
    /// Rows that cannot be trained on.
    pub invalid_rows: usize,
    /// `(location, reason)` of the first [`Skipped::KEPT_REASONS`] of them.
    pub invalid: Vec<(String, String)>,
}

impl Skipped {
    /// Reasons kept for invalid rows; the rest are counted.
    pub const KEPT_REASONS: usize = 100;

    pub fn summary(&self) -> String {
        format!(
            "{} not accepted by datagen, {} dropped as longer than max_length, {} truncated, {} invalid",
            self.not_accepted, self.too_long_dropped, self.truncated, self.invalid_rows
        )
    }

    fn invalid(&mut self, location: String, reason: String) {
        self.invalid_rows += 1;
        if self.invalid.len() < Self::KEPT_REASONS {
            self.invalid.push((location, reason));
        }
    }

    /// Counts what became of one row; returns its example, if any.
    pub fn count(&mut self, outcome: RowOutcome) -> Option<SftExample> {
        match outcome {
            RowOutcome::Example { example, truncated } => {
                self.truncated += usize::from(truncated);
                return Some(example);
            }
            RowOutcome::NotAccepted => self.not_accepted += 1,
            RowOutcome::TooLong => self.too_long_dropped += 1,
            RowOutcome::Invalid { location, reason } => self.invalid(location, reason),
        }
        None
    }
}

/// What became of one row of a dataset.
#[derive(Debug, Clone, PartialEq)]
pub enum RowOutcome {
    Example { example: SftExample, truncated: bool },
    /// datagen marked it `accepted: false`.
    NotAccepted,
    /// Longer than `max_length` under [`LengthPolicy::Drop`].
    TooLong,
    /// It cannot be trained on: where, and why.
    Invalid { location: String, reason: String },
}

const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// The conversation of a row, checked: known roles, a final assistant turn, and no empty
/// reasoning block.
pub fn conversation(record: &Record, format: &TraceFormat) -> Result<Vec<Message>, DataError> {
    let messages = match format {
        TraceFormat::Messages { field } => crate::eval::parse_messages(record, field)?,
        TraceFormat::PromptResponse { prompt_field, response_field } => vec![
            Message::new("user", record.string(prompt_field)?),
            Message::new("assistant", record.string(response_field)?),
        ],
    };
    let field = match format {
        TraceFormat::Messages { field } => field.clone(),
        TraceFormat::PromptResponse { response_field, .. } => response_field.clone(),
    };
    if let Some((index, message)) = messages.iter().enumerate().find(|(_, m)| !ROLES.contains(&m.role.as_str())) {
        return Err(record.field_error(&format!("{field}[{index}].role"), format!("unknown role `{}`", message.role)));
    }
    match messages.last() {
        Some(last) if last.role == "assistant" => {}
        _ => return Err(record.field_error(&field, "no final assistant turn to train on")),
    }
    let answer = &messages[messages.len() - 1].content;
    if answer.trim().is_empty() {
        return Err(record.field_error(&field, "the assistant turn is empty"));
    }
    if let (Some(open), Some(close)) = (answer.find("<think>"), answer.find("</think>")) {
        if close > open && answer[open + "<think>".len()..close].trim().is_empty() {
            return Err(record.field_error(&field, "empty reasoning (<think></think> with nothing inside)"));
        }
    }
    Ok(messages)
}

/// The end-of-turn text appended after the assistant turn: the tokenizer's `eos_token`.
fn end_of_turn(tokenizer: &Tokenizer) -> Result<String, DataError> {
    tokenizer.special_token("eos_token").map(String::from).ok_or_else(|| DataError::Field {
        location: "tokenizer_config.json".into(),
        field: "eos_token".into(),
        message: "missing; it ends every trained assistant turn".into(),
    })
}

/// What became of one conversation.
#[derive(Debug, Clone, PartialEq)]
pub enum Tokenized {
    Example { example: SftExample, truncated: bool },
    /// Longer than `max_length` under [`LengthPolicy::Drop`].
    TooLong { tokens: usize },
    /// The prompt alone fills `max_length`: there is nothing left to train on.
    PromptTooLong { tokens: usize },
}

/// Tokenizes one conversation (already checked by [`conversation`]).
pub fn tokenize_conversation(messages: &[Message], tokenizer: &Tokenizer, options: &TraceOptions) -> Result<Tokenized, DataError> {
    let (assistant, history) = messages.split_last().expect("checked by conversation()");
    let prompt = tokenizer
        .apply_chat_template(history, true)
        .map_err(|e| DataError::Field { location: "chat template".into(), field: "messages".into(), message: e.to_string() })?;
    let completion = format!("{}{}", assistant.content, end_of_turn(tokenizer)?);
    let encode = |text: &str| {
        tokenizer
            .encode(text, false)
            .map_err(|e| DataError::Field { location: "tokenizer".into(), field: "text".into(), message: e.to_string() })
    };
    let prompt_ids = encode(&prompt)?;
    let completion_ids = encode(&completion)?;
    if prompt_ids.len() >= options.max_length {
        return Ok(Tokenized::PromptTooLong { tokens: prompt_ids.len() });
    }
    let mut input_ids = prompt_ids.clone();
    input_ids.extend_from_slice(&completion_ids);
    let mut trained = vec![options.train_on_prompt; prompt_ids.len()];
    trained.extend(std::iter::repeat_n(true, completion_ids.len()));
    // The first token is never a target: nothing predicts it.
    trained[0] = false;
    let mut truncated = false;
    if input_ids.len() > options.max_length {
        match options.length_policy {
            LengthPolicy::Drop => return Ok(Tokenized::TooLong { tokens: input_ids.len() }),
            LengthPolicy::Truncate => {
                input_ids.truncate(options.max_length);
                trained.truncate(options.max_length);
                truncated = true;
            }
        }
    }
    Ok(Tokenized::Example { example: SftExample { input_ids, trained }, truncated })
}

/// Tokenizes one row. Only failures that stop the whole dataset (a broken chat template or
/// tokenizer) are errors; a row that cannot be used is an outcome.
pub fn tokenize_record(record: &Record, tokenizer: &Tokenizer, options: &TraceOptions) -> Result<RowOutcome, DataError> {
    // datagen writes every sample and marks the ones rejection sampling keeps.
    if record.fields.get("accepted") == Some(&serde_json::Value::Bool(false)) {
        return Ok(RowOutcome::NotAccepted);
    }
    let messages = match conversation(record, &options.format) {
        Ok(messages) => messages,
        Err(DataError::Field { location, field, message }) => {
            return Ok(RowOutcome::Invalid { location, reason: format!("field `{field}`: {message}") });
        }
        Err(other) => return Err(other),
    };
    Ok(match tokenize_conversation(&messages, tokenizer, options)? {
        Tokenized::Example { example, truncated } => RowOutcome::Example { example, truncated },
        Tokenized::TooLong { .. } => RowOutcome::TooLong,
        Tokenized::PromptTooLong { tokens } => RowOutcome::Invalid {
            location: record.location(),
            reason: format!("the prompt alone has {tokens} tokens; max_length is {}", options.max_length),
        },
    })
}

/// Tokenizes every record; rows that cannot be used are counted in [`Skipped`], never
/// silently lost. Only structural problems of the whole dataset are errors.
pub fn tokenize_records(
    records: &[Record],
    tokenizer: &Tokenizer,
    options: &TraceOptions,
) -> Result<(Vec<SftExample>, Skipped), DataError> {
    let mut examples = Vec::with_capacity(records.len());
    let mut skipped = Skipped::default();
    for record in records {
        if let Some(example) = skipped.count(tokenize_record(record, tokenizer, options)?) {
            examples.push(example);
        }
    }
    Ok((examples, skipped))
}
