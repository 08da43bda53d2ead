//! Verification and filtering of a stored sample: what `datagen run` does to each completion
//! and `datagen rescore` redoes from the stored rows, without the teacher.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::filters::{self, FilterConfig};
use crate::schema::Row;
use crate::verify::{Outcome, VerifyConfig, verify, verify_answers};

/// Rejection sampling: which samples are accepted into the training set (`--keep`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Keep {
    /// Verified correct and passing every enabled filter (R1's rejection sampling).
    Correct,
    /// Passing every enabled filter, right or wrong (and prompts without a reference answer).
    All,
    /// Passing every enabled filter with one of these verdicts (`correct,unparsable` also keeps
    /// what the verifier could not read, for a second look).
    Verdicts(Vec<Outcome>),
}

impl std::str::FromStr for Keep {
    type Err = String;

    /// `correct`, `all`, or a comma-separated list of verdict classes.
    fn from_str(text: &str) -> Result<Keep, String> {
        match text.trim() {
            "correct" => Ok(Keep::Correct),
            "all" => Ok(Keep::All),
            list => list
                .split(',')
                .map(|name| {
                    Outcome::from_name(name.trim()).ok_or_else(|| {
                        format!("--keep: unknown verdict `{}` (expected all, or some of correct, wrong, no_answer, unparsable)", name.trim())
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Keep::Verdicts),
        }
    }
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
        && match &options.keep {
            Keep::Correct => row.correct == Some(true),
            Keep::All => true,
            Keep::Verdicts(classes) => row.verdict.as_deref().and_then(Outcome::from_name).is_some_and(|v| classes.contains(&v)),
        };
}

/// pass@1 (mean correctness over samples, averaged over prompts) and cons@k (the majority
/// answer per prompt is correct) over the prompts with a reference answer. A failed sample counts
/// as wrong (it is part of the k drawn). Votes are grouped by the verifier's equivalence, not by
/// string: `0.5` and `\frac12` are one answer.
pub fn pass_and_consensus(rows: &[Row], config: &VerifyConfig) -> (Option<f64>, Option<f64>, usize) {
    let mut by_prompt: BTreeMap<&str, Vec<&Row>> = BTreeMap::new();
    for row in rows.iter().filter(|r| r.reference_answer.is_some()) {
        by_prompt.entry(&row.id).or_default().push(row);
    }
    if by_prompt.is_empty() {
        return (None, None, 0);
    }
    let mut pass = 0.0;
    let mut consensus = 0.0;
    for samples in by_prompt.values() {
        pass += samples.iter().filter(|r| r.correct == Some(true)).count() as f64 / samples.len() as f64;
        // (representative answer, votes, correct), in order of first appearance.
        let mut groups: Vec<(&str, usize, bool)> = Vec::new();
        for row in samples.iter().filter(|r| r.status == "ok") {
            let Some(answer) = row.extracted_answer.as_deref() else { continue };
            let group = groups.iter().position(|(seen, _, _)| *seen == answer || verify_answers(seen, answer, config).correct());
            match group {
                Some(index) => {
                    groups[index].1 += 1;
                    groups[index].2 |= row.correct == Some(true);
                }
                None => groups.push((answer, 1, row.correct == Some(true))),
            }
        }
        // Ties go to the answer seen first, as in the usual majority-vote evaluations.
        let best = groups.iter().fold(None, |best: Option<&(&str, usize, bool)>, group| match best {
            Some(b) if b.1 >= group.1 => Some(b),
            _ => Some(group),
        });
        consensus += best.is_some_and(|(_, _, correct)| *correct) as u8 as f64;
    }
    let n = by_prompt.len() as f64;
    (Some(pass / n), Some(consensus / n), by_prompt.len())
}

/// The unbiased pass@k estimator of Chen et al. (2021): the chance that at least one of `k`
/// samples drawn without replacement from `n`, of which `c` are correct, is correct.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if k == 0 || k > n {
        return f64::NAN;
    }
    if n - c < k {
        return 1.0;
    }
    // 1 − C(n−c, k) / C(n, k), as a product that neither overflows nor cancels.
    1.0 - ((n - c + 1)..=n).map(|i| 1.0 - k as f64 / i as f64).product::<f64>()
}

/// One line of an evaluation scoreboard.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scores {
    pub prompts: usize,
    pub samples: usize,
    /// Samples whose request failed; they count as wrong.
    pub failed: usize,
    pub pass_at_1: f64,
    /// The samples per prompt that pass@k and cons@k use (the smallest any prompt has).
    pub k: usize,
    pub pass_at_k: f64,
    pub cons_at_k: f64,
}

/// R1's evaluation report over the prompts with a reference answer: overall and by `source`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scoreboard {
    pub overall: Scores,
    pub by_source: BTreeMap<String, Scores>,
}

fn scores(rows: &[&Row], config: &VerifyConfig) -> Option<Scores> {
    let mut by_prompt: BTreeMap<&str, Vec<&Row>> = BTreeMap::new();
    for row in rows {
        by_prompt.entry(&row.id).or_default().push(row);
    }
    let k = by_prompt.values().map(Vec::len).min()?;
    let owned: Vec<Row> = rows.iter().map(|r| (*r).clone()).collect();
    let (pass_at_1, cons_at_k, _) = pass_and_consensus(&owned, config);
    let pass_k = by_prompt.values().map(|s| pass_at_k(s.len(), s.iter().filter(|r| r.correct == Some(true)).count(), k)).sum::<f64>();
    Some(Scores {
        prompts: by_prompt.len(),
        samples: rows.len(),
        failed: rows.iter().filter(|r| r.status != "ok").count(),
        pass_at_1: pass_at_1?,
        k,
        pass_at_k: pass_k / by_prompt.len() as f64,
        cons_at_k: cons_at_k?,
    })
}

/// The scoreboard of a run's rows: pass@1 averaged over each prompt's samples, the unbiased
/// pass@k and cons@k (votes grouped by the verifier's equivalence), failed samples counted as
/// wrong; `None` when no prompt has a reference answer. It depends only on the stored rows, so a
/// resumed run scores as one run straight through.
pub fn scoreboard(rows: &[Row], config: &VerifyConfig) -> Option<Scoreboard> {
    let scored: Vec<&Row> = rows.iter().filter(|r| r.reference_answer.is_some()).collect();
    let overall = scores(&scored, config)?;
    let mut groups: BTreeMap<String, Vec<&Row>> = BTreeMap::new();
    for row in &scored {
        groups.entry(row.source.clone().unwrap_or_else(|| "-".into())).or_default().push(row);
    }
    let by_source = groups.into_iter().filter_map(|(source, rows)| Some((source, scores(&rows, config)?))).collect();
    Some(Scoreboard { overall, by_source })
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
        let (pass, consensus, prompts) = pass_and_consensus(&rows, &VerifyConfig::default());
        assert_eq!(prompts, 2);
        assert!((pass.unwrap() - (1.0 / 3.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        assert_eq!(consensus, Some(0.5));
    }

    #[test]
    fn votes_group_by_equivalence_and_failed_samples_count_as_wrong() {
        // "0.5" and "\frac12" are one answer with two votes against "3" with two: the first seen
        // wins the tie only when they are grouped (else "3" would win with 2 against 1 and 1).
        let rows = vec![
            row("a", "3", false), row("a", "0.5", true), row("a", "\\frac12", true), row("a", "3", false), row("a", "\\frac{1}{2}", true),
        ];
        let (_, consensus, _) = pass_and_consensus(&rows, &VerifyConfig::default());
        assert_eq!(consensus, Some(1.0));
        // A failed sample is one of the k: 1 right of 2, not 1 of 1.
        let mut failed = row("b", "", false);
        failed.status = "failed".into();
        failed.extracted_answer = None;
        failed.correct = None;
        let (pass, _, _) = pass_and_consensus(&[row("b", "7", true), failed], &VerifyConfig::default());
        assert_eq!(pass, Some(0.5));
    }

    #[test]
    fn unbiased_pass_at_k() {
        assert!((pass_at_k(5, 2, 2) - 0.7).abs() < 1e-12); // 1 − C(3,2)/C(5,2)
        assert_eq!(pass_at_k(4, 0, 4), 0.0);
        assert_eq!(pass_at_k(4, 1, 4), 1.0);
        assert!((pass_at_k(64, 16, 1) - 0.25).abs() < 1e-12);
        assert!(pass_at_k(2, 1, 3).is_nan());
    }

    #[test]
    fn keep_by_verdict_class() {
        assert_eq!("correct".parse::<Keep>(), Ok(Keep::Correct));
        assert_eq!("all".parse::<Keep>(), Ok(Keep::All));
        assert_eq!("correct, unparsable".parse::<Keep>(), Ok(Keep::Verdicts(vec![Outcome::Correct, Outcome::Unparsable])));
        assert!("correct,maybe".parse::<Keep>().unwrap_err().contains("unknown verdict `maybe`"));
        let options = |keep: &str| ScoreOptions { keep: keep.parse().unwrap(), filters: FilterConfig { enabled: Vec::new(), ..FilterConfig::default() } };
        let config = VerifyConfig::default();
        let mut unreadable = row("a", "x", false);
        unreadable.content = Some("So the answer is $\\boxed{3^{2}^{2}}$.".into());
        score(&mut unreadable, &options("correct"), &config);
        assert_eq!(unreadable.verdict.as_deref(), Some("unparsable"));
        assert!(!unreadable.accepted);
        score(&mut unreadable, &options("correct,unparsable"), &config);
        assert!(unreadable.accepted);
        score(&mut unreadable, &options("wrong"), &config);
        assert!(!unreadable.accepted);
    }
}
