//! `datagen verify`: JSONL in, JSONL out, in input order, every field kept.

use std::io::Write;
use std::process::{Command, Stdio};

fn datagen(args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_datagen"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn verifies_stdin_rows_in_order_keeping_fields() {
    let input = concat!(
        r#"{"id": "a", "gold": "\\frac{1}{2}", "pred": "<think>\nhmm \\boxed{3}\n</think>\nSo \\boxed{0.5}.", "extra": [1, 2]}"#, "\n",
        r#"{"id": "b", "gold": 42, "pred": "The final answer is 41."}"#, "\n",
        "\n",
        r#"{"id": "c", "gold": "(1,3)", "pred": "$1 < x < 3$"}"#, "\n",
    );
    let output = datagen(&["verify", "--input", "-", "--explain"], input);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let rows: Vec<serde_json::Value> =
        String::from_utf8(output.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["id"], "a");
    assert_eq!(rows[0]["extra"], serde_json::json!([1, 2]));
    assert_eq!(rows[0]["correct"], true);
    assert_eq!(rows[0]["extracted"], "0.5");
    assert_eq!(rows[1]["id"], "b");
    assert_eq!(rows[1]["correct"], false);
    assert_eq!(rows[1]["extracted"], "41");
    assert_eq!(rows[2]["correct"], true);
    assert!(rows[2]["explanation"].as_str().unwrap().contains("tuples/intervals"));
}

#[test]
fn writes_to_a_file_and_reports_bad_rows() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("pairs.jsonl");
    let out = dir.path().join("out.jsonl");
    std::fs::write(&input, "{\"gold\": \"1\", \"pred\": \"1\"}\n").unwrap();
    let output = datagen(&["verify", "--input", input.to_str().unwrap(), "--output", out.to_str().unwrap()], "");
    assert!(output.status.success());
    assert!(std::fs::read_to_string(&out).unwrap().contains("\"correct\":true"));

    std::fs::write(&input, "{\"gold\": \"1\", \"pred\": \"1\"}\n{\"gold\": \"1\"}\n").unwrap();
    let output = datagen(&["verify", "--input", input.to_str().unwrap()], "");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("pairs.jsonl:2") && stderr.contains("`pred`"), "{stderr}");
    // A failure half-way leaves no output file, and no partial one beside it.
    let failed = dir.path().join("failed.jsonl");
    let output = datagen(&["verify", "--input", input.to_str().unwrap(), "--output", failed.to_str().unwrap()], "");
    assert!(!output.status.success());
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(!names.iter().any(|n| n.contains("failed")), "{names:?}");

    std::fs::write(&input, "not json\n").unwrap();
    let output = datagen(&["verify", "--input", input.to_str().unwrap()], "");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("pairs.jsonl:1") && !stderr.contains("panicked"), "{stderr}");
}

#[test]
fn verdict_classes_and_the_rule_that_decided() {
    let input = concat!(
        r#"{"gold": "7", "pred": "I am not sure how to approach this problem."}"#, "\n",
        r#"{"gold": "7", "pred": "So the answer is $\\boxed{3^{2}^{2}}$."}"#, "\n",
        r#"{"gold": "2^{n+1}", "pred": "\\boxed{2^n+1}"}"#, "\n",
        r#"{"gold": "C", "pred": "The answer is (C)."}"#, "\n",
        r#"{"gold": "\\frac{1}{2}", "pred": "\\boxed{0.5}"}"#, "\n",
    );
    let output = datagen(&["verify", "--input", "-", "--explain"], input);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let rows: Vec<serde_json::Value> =
        String::from_utf8(output.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let got: Vec<(&str, &str)> = rows.iter().map(|r| (r["verdict"].as_str().unwrap(), r["rule"].as_str().unwrap())).collect();
    assert_eq!(
        got,
        [
            ("no_answer", "no_answer"),
            ("unparsable", "structure_text"),
            ("wrong", "equivalence"),
            ("correct", "choice_letter"),
            ("correct", "equivalence"),
        ]
    );
    assert_eq!(rows[0]["extracted"], serde_json::Value::Null);
    assert_eq!(rows[3]["source"], "final_answer_phrase");
    assert_eq!(rows[4]["source"], "boxed");
    // Without --explain only the verdict, `correct` and the answer are added.
    let output = datagen(&["verify", "--input", "-"], input);
    let first: serde_json::Value = serde_json::from_str(String::from_utf8(output.stdout).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(first["verdict"], "no_answer");
    assert!(first.get("rule").is_none() && first.get("explanation").is_none());
}

#[test]
fn decimals_policy_is_an_option() {
    let input = concat!(
        r#"{"gold": "\\frac{1}{3}", "pred": "\\boxed{0.333}"}"#, "\n",
        r#"{"gold": "\\frac{2}{3}", "pred": "\\boxed{0.666}"}"#, "\n",
        r#"{"gold": "\\frac{1}{3}", "pred": "\\boxed{0.3}"}"#, "\n",
        r#"{"gold": "\\pi", "pred": "\\boxed{3.14}"}"#, "\n",
        r#"{"gold": "\\pi", "pred": "\\boxed{3.15}"}"#, "\n",
    );
    let verdicts = |args: &[&str]| -> Vec<String> {
        let output = datagen(&[&["verify", "--input", "-", "--explain"], args].concat(), input);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                let row: serde_json::Value = serde_json::from_str(l).unwrap();
                format!("{}/{}", row["verdict"].as_str().unwrap(), row["rule"].as_str().unwrap())
            })
            .collect()
    };
    // The default is exact: a rounded decimal is not the value.
    assert_eq!(verdicts(&[]), ["wrong/equivalence"; 5]);
    assert_eq!(verdicts(&["--decimals", "exact"]), ["wrong/equivalence"; 5]);
    assert_eq!(
        verdicts(&["--decimals", "rounded"]),
        ["correct/rounded_decimal", "wrong/equivalence", "wrong/equivalence", "correct/rounded_decimal", "wrong/equivalence"]
    );
}
