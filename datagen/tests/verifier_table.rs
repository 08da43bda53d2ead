//! The labelled table in tests/verifier/cases.jsonl: at least 300 (gold, prediction, verdict)
//! cases over every answer kind, written for this project, plus real R1 traces and MATH /
//! GSM8K reference solutions. The verifier must agree with at least 99% of them.

use datagen::verify::{VerifyConfig, verify};
use serde_json::Value;

fn cases() -> Vec<Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/verifier/cases.jsonl");
    std::fs::read_to_string(path)
        .expect("cases.jsonl")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("case is JSON"))
        .collect()
}

#[test]
fn agrees_with_at_least_99_percent_of_the_table() {
    let cases = cases();
    assert!(cases.len() >= 300, "only {} cases", cases.len());
    let config = VerifyConfig::default();
    let mut wrong = Vec::new();
    for (line, case) in cases.iter().enumerate() {
        let verdict = verify(case["gold"].as_str().unwrap(), case["pred"].as_str().unwrap(), &config);
        if verdict.correct() != case["expected"].as_bool().unwrap() {
            wrong.push(format!(
                "line {} [{}] gold {:?} pred {:.80?} expected {} ({})",
                line + 1,
                case["category"].as_str().unwrap(),
                case["gold"].as_str().unwrap(),
                case["pred"].as_str().unwrap(),
                case["expected"],
                verdict.explanation
            ));
        }
    }
    for w in &wrong {
        println!("{w}");
    }
    let agreement = 1.0 - wrong.len() as f64 / cases.len() as f64;
    println!("agreement {:.2}% on {} cases", 100.0 * agreement, cases.len());
    assert!(agreement >= 0.99, "agreement {:.2}% < 99%", 100.0 * agreement);
}

#[test]
fn every_category_has_cases_of_both_verdicts() {
    let cases = cases();
    let mut categories = std::collections::BTreeMap::<String, (usize, usize)>::new();
    for case in &cases {
        let entry = categories.entry(case["category"].as_str().unwrap().to_string()).or_default();
        if case["expected"].as_bool().unwrap() {
            entry.0 += 1
        } else {
            entry.1 += 1
        }
    }
    let one_sided = ["r1_trace", "math_solution", "gsm8k_solution", "adversarial", "r1_trace_mismatch"];
    for (category, (yes, no)) in &categories {
        if !one_sided.contains(&category.as_str()) {
            assert!(*yes > 0 && *no > 0, "{category}: {yes} true, {no} false");
        }
    }
    assert!(categories.len() >= 20, "{categories:?}");
}
