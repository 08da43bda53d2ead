//! Whole answers as models write them (issue #11), with near-misses that must never be judged
//! correct: a false positive is trained into the student.
//! - tests/verifier/model_written.jsonl: written for the issue; agreement at 98% or more.
//! - tests/verifier/outsider.jsonl: written afterwards by an independent tester who did not read
//!   the verifier or its cases; agreement at 95% or more.
//!
//! A label `no_answer` (a response with nothing in it that is an answer) must get that verdict
//! or `unparsable`, never `correct` or `wrong`. Agreement is printed.

use datagen::verify::{Outcome, VerifyConfig, verify};
use serde_json::Value;

/// (agreeing cases, cases, false positives).
fn check(file: &str) -> (usize, usize, Vec<String>) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/verifier").join(file);
    let cases: Vec<Value> = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("case is JSON"))
        .collect();
    let negatives = cases.iter().filter(|c| c["expected"] != "correct").count();
    assert!(negatives >= 150, "{file}: only {negatives} near-misses");
    let config = VerifyConfig::default();
    let (mut agree, mut false_positives) = (0, Vec::new());
    for (line, case) in cases.iter().enumerate() {
        let (gold, response) = (case["gold"].as_str().unwrap(), case["response"].as_str().unwrap());
        let verdict = verify(gold, response, &config);
        let class_agrees = match case["expected"].as_str().unwrap() {
            "correct" => verdict.outcome == Outcome::Correct,
            "wrong" => matches!(verdict.outcome, Outcome::Wrong | Outcome::Unparsable),
            "no_answer" => matches!(verdict.outcome, Outcome::NoAnswer | Outcome::Unparsable),
            other => panic!("{file}:{}: unknown label {other}", line + 1),
        };
        agree += usize::from(class_agrees);
        if verdict.correct() && case["expected"] != "correct" {
            false_positives.push(format!("{file}:{} [{}] gold {gold:?} response {response:.80?}: {}", line + 1, case["category"], verdict.explanation));
        }
    }
    println!("{file}: agreement {agree}/{} ({:.1}%)", cases.len(), 100.0 * agree as f64 / cases.len() as f64);
    (agree, cases.len(), false_positives)
}

#[test]
fn written_for_the_issue() {
    let (agree, total, false_positives) = check("model_written.jsonl");
    assert!(false_positives.is_empty(), "wrong answers judged correct:\n{}", false_positives.join("\n"));
    assert!(agree * 100 >= 98 * total, "agreement fell to {agree}/{total}");
}

#[test]
fn written_by_an_outsider() {
    let (agree, total, false_positives) = check("outsider.jsonl");
    assert!(false_positives.is_empty(), "wrong answers judged correct:\n{}", false_positives.join("\n"));
    assert!(agree * 100 >= 95 * total, "agreement fell to {agree}/{total}");
}
