//! One row per sample: what `datagen run` writes, `datagen rescore` rewrites and
//! `distill train` reads. Documented column by column in `datasets/SCHEMA.md`; a test checks
//! that document against [`schema`].

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, Schema, TimeUnit};
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub key: String,
    pub id: String,
    pub source: Option<String>,
    pub problem: String,
    pub reference_answer: Option<String>,
    pub sample_index: u32,
    /// `ok`, or `failed` (retries exhausted; `error` says why).
    pub status: String,
    pub error: Option<String>,
    /// Why a failed sample failed: `context_length`, `invalid_request`, `server`, `timeout`,
    /// `connection`, `rate_limit`, `protocol`… (see `RequestError::class`); absent in shards
    /// written before it existed.
    #[serde(default)]
    pub error_class: Option<String>,
    /// The reasoning and the answer after it. Not stored: the trace is kept once, as the last
    /// turn of `messages` (`<think>\n{reasoning}\n</think>\n\n{content}`), and both are derived
    /// from it when rows are read ([`Row::derive_trace`]); shards written before kept them as
    /// columns, which are still read.
    #[serde(default, skip_serializing)]
    pub reasoning: Option<String>,
    #[serde(default, skip_serializing)]
    pub content: Option<String>,
    pub messages: Option<Vec<Message>>,
    pub extracted_answer: Option<String>,
    pub correct: Option<bool>,
    /// `correct`, `wrong`, `no_answer` or `unparsable`; absent in shards written before it existed.
    #[serde(default)]
    pub verdict: Option<String>,
    pub verifier: Option<String>,
    pub filters_failed: Vec<String>,
    pub accepted: bool,
    pub finish_reason: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub usage_source: Option<String>,
    pub teacher_model: String,
    pub endpoint: Option<String>,
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens: u64,
    pub latency_ms: Option<u64>,
    pub attempts: u32,
    pub reasoning_parser: Option<String>,
    /// RFC 3339, UTC.
    pub created_at: String,
}

impl Row {
    /// Fills `reasoning` and `content` from the assistant turn of `messages` when they were not
    /// read (they are not stored). A turn without a reasoning block is all answer.
    pub fn derive_trace(&mut self) {
        if self.reasoning.is_some() || self.content.is_some() {
            return;
        }
        let Some(turn) = self.messages.as_ref().and_then(|m| m.last()).filter(|m| m.role == "assistant") else { return };
        match turn.content.strip_prefix("<think>\n").and_then(|rest| rest.split_once("\n</think>\n\n")) {
            Some((reasoning, content)) => {
                self.reasoning = Some(reasoning.to_string());
                self.content = Some(content.to_string());
            }
            None => self.content = Some(turn.content.clone()),
        }
    }
}

/// The Arrow (and Parquet) schema of [`Row`], field for field.
pub fn schema() -> Arc<Schema> {
    let utf8 = |name: &str, nullable: bool| Field::new(name, DataType::Utf8, nullable);
    let message = Fields::from(vec![utf8("role", false), utf8("content", false)]);
    Arc::new(Schema::new(vec![
        utf8("key", false),
        utf8("id", false),
        utf8("source", true),
        utf8("problem", false),
        utf8("reference_answer", true),
        Field::new("sample_index", DataType::UInt32, false),
        utf8("status", false),
        utf8("error", true),
        utf8("error_class", true),
        Field::new("messages", DataType::List(Arc::new(Field::new("item", DataType::Struct(message), false))), true),
        utf8("extracted_answer", true),
        Field::new("correct", DataType::Boolean, true),
        utf8("verdict", true),
        utf8("verifier", true),
        Field::new("filters_failed", DataType::List(Arc::new(Field::new("item", DataType::Utf8, false))), false),
        Field::new("accepted", DataType::Boolean, false),
        utf8("finish_reason", true),
        Field::new("prompt_tokens", DataType::UInt64, true),
        Field::new("completion_tokens", DataType::UInt64, true),
        utf8("usage_source", true),
        utf8("teacher_model", false),
        utf8("endpoint", true),
        Field::new("temperature", DataType::Float64, false),
        Field::new("top_p", DataType::Float64, false),
        Field::new("max_tokens", DataType::UInt64, false),
        Field::new("latency_ms", DataType::UInt64, true),
        Field::new("attempts", DataType::UInt32, false),
        utf8("reasoning_parser", true),
        Field::new("created_at", DataType::Timestamp(TimeUnit::Millisecond, Some("+00:00".into())), false),
    ]))
}

/// A record batch of [`schema`] → rows.
pub fn from_batch(batch: &RecordBatch) -> Result<Vec<Row>, String> {
    let mut writer = arrow::json::WriterBuilder::new().with_explicit_nulls(true).build::<_, arrow::json::writer::JsonArray>(Vec::new());
    writer.write(batch).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    let mut values: Vec<serde_json::Value> = serde_json::from_slice(&writer.into_inner()).map_err(|e| e.to_string())?;
    for value in &mut values {
        // arrow-json writes timestamps without the zone; they are UTC.
        if let Some(text) = value["created_at"].as_str()
            && !text.ends_with('Z')
            && !text.contains('+')
        {
            value["created_at"] = serde_json::Value::String(format!("{text}Z"));
        }
    }
    values
        .into_iter()
        .map(|v| {
            let mut row: Row = serde_json::from_value(v).map_err(|e| e.to_string())?;
            row.derive_trace();
            Ok(row)
        })
        .collect()
}

/// One problem in the per-problem layout of open-r1's OpenR1-Math-220k
/// (`datagen export --format open-r1`), column for column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenR1Row {
    pub problem: String,
    /// The prompt file's reference solution (`solution`), null without one.
    pub solution: Option<String>,
    pub answer: Option<String>,
    /// The prompt file's `problem_type` / `question_type`, null without them.
    pub problem_type: Option<String>,
    pub question_type: Option<String>,
    pub source: Option<String>,
    pub uuid: String,
    /// Per generation: the trace closes its reasoning and then answers, and was not cut by
    /// `max_tokens` — computed from the trace, whatever filters the run used.
    pub is_reasoning_complete: Vec<bool>,
    /// The assistant turns (`<think>…</think>` + answer), by sample index.
    pub generations: Vec<String>,
    pub correctness_math_verify: Vec<bool>,
    /// open-r1's second judge (Llama-3.3-70B); this toolkit has none: always null.
    pub correctness_llama: Option<Vec<bool>>,
    pub finish_reasons: Vec<Option<String>>,
    pub correctness_count: i64,
    /// The conversation of the first accepted generation; null when none was accepted.
    pub messages: Option<Vec<Message>>,
}

pub fn open_r1_schema() -> Arc<Schema> {
    let utf8 = |name: &str, nullable: bool| Field::new(name, DataType::Utf8, nullable);
    let list = |name: &str, item: DataType, nullable_items: bool, nullable: bool| {
        Field::new(name, DataType::List(Arc::new(Field::new("item", item, nullable_items))), nullable)
    };
    let message = Fields::from(vec![utf8("role", false), utf8("content", false)]);
    Arc::new(Schema::new(vec![
        utf8("problem", false),
        utf8("solution", true),
        utf8("answer", true),
        utf8("problem_type", true),
        utf8("question_type", true),
        utf8("source", true),
        utf8("uuid", false),
        list("is_reasoning_complete", DataType::Boolean, false, false),
        list("generations", DataType::Utf8, false, false),
        list("correctness_math_verify", DataType::Boolean, false, false),
        list("correctness_llama", DataType::Boolean, false, true),
        list("finish_reasons", DataType::Utf8, true, false),
        Field::new("correctness_count", DataType::Int64, false),
        Field::new("messages", DataType::List(Arc::new(Field::new("item", DataType::Struct(message), false))), true),
    ]))
}

/// Whether a stored sample's reasoning is complete: it was not cut by `max_tokens`, its
/// reasoning is closed (a `</think>` in the assistant turn, or reasoning the server split off),
/// and an answer follows it.
pub fn reasoning_complete(row: &Row) -> bool {
    let closed = row.reasoning.as_deref().is_some_and(|r| !r.trim().is_empty())
        || row.messages.as_ref().and_then(|m| m.last()).is_some_and(|m| m.content.contains("</think>"));
    row.finish_reason.as_deref() != Some("length") && closed && row.content.as_deref().is_some_and(|c| !c.trim().is_empty())
}

/// Per-problem fields of the prompt file, by id, for the open-r1 export.
#[derive(Debug, Clone, Default)]
pub struct ProblemInfo {
    pub solution: Option<String>,
    pub problem_type: Option<String>,
    pub question_type: Option<String>,
}

/// The open-r1 row of one problem from its successful samples (any order).
pub fn open_r1_row(mut samples: Vec<Row>, info: Option<&ProblemInfo>) -> OpenR1Row {
    samples.sort_by_key(|r| r.sample_index);
    let assistant = |r: &Row| r.messages.as_ref().and_then(|m| m.last()).map(|m| m.content.clone()).unwrap_or_default();
    let problem = info.cloned().unwrap_or_default();
    let first = &samples[0];
    OpenR1Row {
        problem: first.problem.clone(),
        solution: problem.solution,
        answer: first.reference_answer.clone(),
        problem_type: problem.problem_type,
        question_type: problem.question_type,
        source: first.source.clone(),
        uuid: first.id.clone(),
        is_reasoning_complete: samples.iter().map(reasoning_complete).collect(),
        generations: samples.iter().map(assistant).collect(),
        correctness_math_verify: samples.iter().map(|r| r.correct == Some(true)).collect(),
        correctness_llama: None,
        finish_reasons: samples.iter().map(|r| r.finish_reason.clone()).collect(),
        correctness_count: samples.iter().filter(|r| r.correct == Some(true)).count() as i64,
        messages: samples.iter().find(|r| r.accepted).and_then(|r| r.messages.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(messages: Option<Vec<Message>>) -> Row {
        serde_json::from_value(serde_json::json!({
            "key": "k", "id": "i", "source": null, "problem": "p", "reference_answer": null, "sample_index": 0,
            "status": "ok", "error": null, "messages": messages, "extracted_answer": null, "correct": null,
            "verifier": null, "filters_failed": [], "accepted": false, "finish_reason": "stop", "prompt_tokens": null,
            "completion_tokens": null, "usage_source": null, "teacher_model": "m", "endpoint": null, "temperature": 0.6,
            "top_p": 0.95, "max_tokens": 1, "latency_ms": null, "attempts": 1, "reasoning_parser": null,
            "created_at": "2026-11-30T00:00:00Z"
        }))
        .unwrap()
    }

    fn turn(content: &str) -> Option<Vec<Message>> {
        Some(vec![Message { role: "user".into(), content: "q".into() }, Message { role: "assistant".into(), content: content.into() }])
    }

    #[test]
    fn the_trace_is_stored_once_and_read_back_whole() {
        let assistant = crate::reasoning::assistant_turn(Some("step 1\n\nstep 2"), "So \\boxed{3}.");
        let mut r = row(turn(&assistant));
        r.derive_trace();
        assert_eq!((r.reasoning.as_deref(), r.content.as_deref()), (Some("step 1\n\nstep 2"), Some("So \\boxed{3}.")));
        // Stored, the row has no reasoning or content of its own.
        let stored = serde_json::to_value(&r).unwrap();
        assert!(stored.get("reasoning").is_none() && stored.get("content").is_none());
        // A cut trace (no answer), an answer without reasoning, a failed sample.
        let mut cut = row(turn(&crate::reasoning::assistant_turn(Some("thinking"), "")));
        cut.derive_trace();
        assert_eq!((cut.reasoning.as_deref(), cut.content.as_deref()), (Some("thinking"), Some("")));
        let mut plain = row(turn("42"));
        plain.derive_trace();
        assert_eq!((plain.reasoning.as_deref(), plain.content.as_deref()), (None, Some("42")));
        let mut failed = row(None);
        failed.derive_trace();
        assert_eq!((failed.reasoning, failed.content), (None, None));
        // A row of an older shard keeps the columns it was read with.
        let mut old = row(turn(&assistant));
        old.reasoning = Some("as stored".into());
        old.derive_trace();
        assert_eq!(old.reasoning.as_deref(), Some("as stored"));
    }
}
