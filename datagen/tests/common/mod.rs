//! Test helpers: the loopback teacher server and the bundled prompts.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde_json::Value;

pub use datagen::teacher::loopback::*;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The first `n` bundled math prompts as (problem, answer).
pub fn math_prompts(n: usize) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_root().join("datasets/math_prompts_sample100.jsonl")).unwrap();
    text.lines()
        .take(n)
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["problem"].as_str().unwrap().to_string(), v["answer"].as_str().unwrap().to_string())
        })
        .collect()
}

/// Writes the first `n` bundled prompts as a JSONL prompt file.
pub fn prompt_file(dir: &Path, n: usize) -> PathBuf {
    let source = std::fs::read_to_string(repo_root().join("datasets/math_prompts_sample100.jsonl")).unwrap();
    let path = dir.join("prompts.jsonl");
    std::fs::write(&path, source.lines().take(n).collect::<Vec<_>>().join("\n") + "\n").unwrap();
    path
}
