//! Shared helpers of the integration tests: fixture paths and running the real binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use distill::burn::tensor::Device;

/// Held by a test while it seeds and draws from burn's random generator, which is one per
/// process: tests of one binary run on threads side by side and would take each other's draws.
pub fn random_generator() -> std::sync::MutexGuard<'static, ()> {
    static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());
    GENERATOR.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `take` one-row blocks of the bundled math prompts from row `skip` on (problem → answer,
/// at most 96 tokens), tokenized by `tokenizer`.
pub fn math_blocks(tokenizer: &distill::text::Tokenizer, skip: usize, take: usize) -> Vec<distill::data::packing::PackedBlock> {
    use distill::data::traces::{LengthPolicy, TraceFormat, TraceOptions, tokenize_records};
    let records = distill::data::records::read_records(&repo_root().join("datasets/math_prompts_sample100.jsonl")).unwrap();
    let options = TraceOptions {
        format: TraceFormat::PromptResponse { prompt_field: "problem".into(), response_field: "answer".into() },
        max_length: 96,
        length_policy: LengthPolicy::Drop,
        train_on_prompt: false,
    };
    let (examples, _) = tokenize_records(&records[skip..], tokenizer, &options).unwrap();
    examples.iter().take(take).map(distill::data::packing::PackedBlock::single).collect()
}

/// `distill bench train … --json` run in a process of its own: the JSON line it printed.
pub fn bench_train_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["bench", "train"];
    all.extend_from_slice(args);
    all.push("--json");
    let output = distill(&all);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let line = stdout.lines().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON in {stdout}"));
    serde_json::from_str(line).unwrap()
}

pub fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference.json is JSON")
}

/// The devices the parity tests run on: flex always, wgpu (WGSL; Mesa lavapipe in CI), and
/// those that `DISTILL_TEST_DEVICES` names (e.g. `vulkan,cuda` on a GPU machine).
pub fn devices() -> Vec<(String, Device)> {
    let mut devices = vec![("flex".to_string(), distill::device::parse("flex").unwrap())];
    if std::env::var("DISTILL_TEST_SKIP_WGPU").is_err() {
        devices.push(("wgpu".to_string(), distill::device::parse("wgpu").unwrap()));
    }
    devices.extend(extra_devices());
    devices
}

/// The devices named in `DISTILL_TEST_DEVICES` (comma-separated `--device` names): the opt-in
/// GPU runs of the device-independent tests. A name that is not built in fails the test.
pub fn extra_devices() -> Vec<(String, Device)> {
    let names = std::env::var("DISTILL_TEST_DEVICES").unwrap_or_default();
    names
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| (name.to_string(), distill::device::parse(name).unwrap_or_else(|e| panic!("DISTILL_TEST_DEVICES: {e}"))))
        .collect()
}

/// The `distill` binary, run from the repository root with its token cache in the temporary
/// folder (not the user's ~/.cache).
pub fn command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_distill"));
    command.current_dir(repo_root()).env("DISTILL_CACHE", std::env::temp_dir().join("distill-test-cache"));
    command
}

pub fn distill(args: &[&str]) -> Output {
    command().args(args).output().expect("run distill")
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A clean failure: non-zero exit, no panic, and an error that names `needles`.
pub fn assert_clean_failure(output: &Output, needles: &[&str]) {
    let err = stderr(output);
    assert!(!output.status.success(), "expected failure, got success; stderr: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    for needle in needles {
        assert!(err.contains(needle), "error does not mention {needle:?}: {err}");
    }
}

/// Copies a fixture checkpoint into a temporary folder that a test may break.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}
