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

    std::fs::write(&input, "not json\n").unwrap();
    let output = datagen(&["verify", "--input", input.to_str().unwrap()], "");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("pairs.jsonl:1") && !stderr.contains("panicked"), "{stderr}");
}
