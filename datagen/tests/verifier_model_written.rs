//! tests/verifier/model_written.jsonl: whole answers as models write them (issue #11), with
//! near-misses that must never be judged correct: a false positive is trained into the student.
//! Agreement with the labels is printed and must stay at 98% or more. A label `no_answer` (a
//! response with nothing in it that is an answer) must get that verdict, not `wrong`.

use datagen::verify::{Outcome, VerifyConfig, verify};
use serde_json::Value;

#[test]
fn no_near_miss_is_judged_correct() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/verifier/model_written.jsonl");
    let cases: Vec<Value> = std::fs::read_to_string(path)
        .expect("model_written.jsonl")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("case is JSON"))
        .collect();
    let negatives = cases.iter().filter(|c| c["expected"] != "correct").count();
    assert!(negatives >= 150, "only {negatives} near-misses");
    let config = VerifyConfig::default();
    let (mut agree, mut false_positives) = (0, Vec::new());
    for (line, case) in cases.iter().enumerate() {
        let (gold, response) = (case["gold"].as_str().unwrap(), case["response"].as_str().unwrap());
        let verdict = verify(gold, response, &config);
        let expected = case["expected"] == "correct";
        let class_agrees = match case["expected"].as_str().unwrap() {
            "correct" => verdict.outcome == Outcome::Correct,
            "wrong" => matches!(verdict.outcome, Outcome::Wrong | Outcome::Unparsable),
            "no_answer" => verdict.outcome == Outcome::NoAnswer,
            other => panic!("line {}: unknown label {other}", line + 1),
        };
        agree += usize::from(class_agrees);
        if verdict.correct() && !expected {
            false_positives.push(format!("line {} [{}] gold {gold:?} response {response:.80?}: {}", line + 1, case["category"], verdict.explanation));
        }
    }
    println!("agreement {agree}/{} ({:.1}%)", cases.len(), 100.0 * agree as f64 / cases.len() as f64);
    assert!(false_positives.is_empty(), "wrong answers judged correct:\n{}", false_positives.join("\n"));
    // 324 of 324 on 2026-11-30 (Math-Verify 0.9: 287 of the first 314).
    assert!(agree * 100 >= 98 * cases.len(), "agreement fell to {agree}/{}", cases.len());
}
