//! Verification and filtering of a stored sample: what `datagen run` does to each completion
//! and `datagen rescore` redoes from the stored rows, without the teacher.

use std::collections::{BTreeMap, HashMap};

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

/// Sets `extracted_answer`, `correct`, `verdict`, `verifier`, `filters_failed` and `accepted` of `row`
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
            row.correct = Some(verdict.correct());
            row.verdict = Some(verdict.outcome.name().to_string());
            row.extracted_answer = verdict.extracted;
            row.verifier = Some(VERIFIER.to_string());
        }
        None => {
            row.extracted_answer = crate::verify::extract::extract_answer(&response, verify_config.multiple_boxed, |a, b| a == b).map(|(a, _)| a);
            row.correct = None;
            row.verdict = None;
            row.verifier = None;
        }
    }
    let sample = filters::Sample {
        problem: &row.problem,
        reasoning: row.reasoning.as_deref(),
        content: &content,
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

/// pass@1 (mean correctness over samples, averaged over prompts) and cons@k (the majority
/// extracted answer per prompt is correct) over the prompts with a reference answer.
pub fn pass_and_consensus(rows: &[Row]) -> (Option<f64>, Option<f64>, usize) {
    let mut by_prompt: BTreeMap<&str, Vec<&Row>> = BTreeMap::new();
    for row in rows.iter().filter(|r| r.status == "ok" && r.correct.is_some()) {
        by_prompt.entry(&row.id).or_default().push(row);
    }
    if by_prompt.is_empty() {
        return (None, None, 0);
    }
    let mut pass = 0.0;
    let mut consensus = 0.0;
    for samples in by_prompt.values() {
        pass += samples.iter().filter(|r| r.correct == Some(true)).count() as f64 / samples.len() as f64;
        let mut votes: HashMap<&str, (usize, bool)> = HashMap::new();
        for row in samples {
            if let Some(answer) = row.extracted_answer.as_deref() {
                let entry = votes.entry(answer).or_insert((0, false));
                entry.0 += 1;
                entry.1 |= row.correct == Some(true);
            }
        }
        // Ties go to the answer seen first, as in the usual majority-vote evaluations.
        let mut best: Option<(&str, usize, bool)> = None;
        for row in samples {
            if let Some(answer) = row.extracted_answer.as_deref() {
                let (count, correct) = votes[answer];
                if best.is_none_or(|(_, c, _)| count > c) {
                    best = Some((answer, count, correct));
                }
            }
        }
        consensus += best.is_some_and(|(_, _, correct)| correct) as u8 as f64;
    }
    let n = by_prompt.len() as f64;
    (Some(pass / n), Some(consensus / n), by_prompt.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, answer: &str, correct: bool) -> Row {
        let mut row: Row = serde_json::from_value(serde_json::json!({
            "key": format!("{id}/{answer}/{correct}"), "id": id, "source": null, "problem": "p", "reference_answer": "1",
            "sample_index": 0, "status": "ok", "error": null, "reasoning": null, "content": null, "messages": null,
            "extracted_answer": answer, "correct": correct, "verifier": null, "filters_failed": [], "accepted": correct,
            "finish_reason": "stop", "prompt_tokens": null, "completion_tokens": null, "usage_source": null,
            "teacher_model": "m", "endpoint": null, "temperature": 0.6, "top_p": 0.95, "max_tokens": 1,
            "latency_ms": null, "attempts": 1, "reasoning_parser": null, "created_at": "2026-11-28T00:00:00Z"
        }))
        .unwrap();
        row.key.push('x');
        row
    }

    #[test]
    fn pass_at_1_and_majority_vote() {
        // Prompt a: 1 of 3 right, the majority (2 × "5") wrong. Prompt b: 2 of 3 right, majority right.
        let rows = vec![
            row("a", "1", true), row("a", "5", false), row("a", "5", false),
            row("b", "7", true), row("b", "7", true), row("b", "8", false),
        ];
        let (pass, consensus, prompts) = pass_and_consensus(&rows);
        assert_eq!(prompts, 2);
        assert!((pass.unwrap() - (1.0 / 3.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        assert_eq!(consensus, Some(0.5));
    }
}
