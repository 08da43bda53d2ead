//! Verification and filtering of a stored sample: what `datagen run` does to each completion
//! and `datagen rescore` redoes from the stored rows, without the teacher.

use serde::{Deserialize, Serialize};

use crate::filters::{self, FilterConfig};
use crate::schema::Row;
use crate::verify::{VerifyConfig, verify};

/// Rejection sampling: which samples are accepted into the training set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Keep {
    /// Verified correct and passing every enabled filter (R1's rejection sampling).
    Correct,
    /// Passing every enabled filter, right or wrong (and prompts without a reference answer).
    All,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScoreOptions {
    pub keep: Keep,
    pub filters: FilterConfig,
}

pub const VERIFIER: &str = concat!("datagen-verify ", env!("CARGO_PKG_VERSION"));

/// Sets `extracted_answer`, `correct`, `verifier`, `filters_failed` and `accepted` of `row`
/// from its problem, reference answer and completion. A failed request is never accepted.
pub fn score(row: &mut Row, options: &ScoreOptions, verify_config: &VerifyConfig) {
    if row.status != "ok" {
        row.accepted = false;
        return;
    }
    let content = row.content.clone().unwrap_or_default();
    // The answer is looked for in the final answer; with nothing after the reasoning (a cut
    // trace), in the reasoning's end.
    let response = if content.trim().is_empty() { row.reasoning.clone().unwrap_or_default() } else { content.clone() };
    match &row.reference_answer {
        Some(gold) => {
            let verdict = verify(gold, &response, verify_config);
            row.extracted_answer = verdict.extracted;
            row.correct = Some(verdict.correct);
            row.verifier = Some(VERIFIER.to_string());
        }
        None => {
            row.extracted_answer = crate::verify::extract::extract_answer(&response, verify_config.multiple_boxed, |a, b| a == b).map(|(a, _)| a);
            row.correct = None;
            row.verifier = None;
        }
    }
    let sample = filters::Sample {
        problem: &row.problem,
        reasoning: row.reasoning.as_deref(),
        content: &content,
        unclosed: false,
        finish_reason: row.finish_reason.as_deref(),
        completion_tokens: row.completion_tokens,
    };
    row.filters_failed = filters::failed(&sample, &options.filters).into_iter().map(|f| f.name().to_string()).collect();
    row.accepted = row.filters_failed.is_empty()
        && match options.keep {
            Keep::Correct => row.correct == Some(true),
            Keep::All => true,
        };
}
