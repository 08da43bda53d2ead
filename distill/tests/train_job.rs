//! `distill train` refusing what it cannot do well, and its run folder at scale: the context
//! length check and its overrides, a memory plan that cannot fit, a damaged token cache, a
//! second process on one run folder, `--save-total-limit`, and LoRA checkpoints that hold the
//! adapters only.

mod common;

use std::path::Path;

use common::{assert_clean_failure, copy_fixture, distill, stderr};

const TRACES: &str = "datasets/r1_traces_sample40.jsonl";

fn args<'a>(model: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "train", "--model", model, "--data", TRACES, "--prompt-field", "problem", "--response-field", "generated_solution",
        "--out", out, "--truncate", "--device", "flex",
    ];
    args.extend_from_slice(extra);
    for (flag, default) in [("--max-steps", "2"), ("--max-length", "96")] {
        if !extra.contains(&flag) {
            args.extend_from_slice(&[flag, default]);
        }
    }
    args
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A max_length past the positions the model was trained for is refused with the way to extend
/// it on purpose; with --rope-theta and --max-position-embeddings it trains, and the exported
/// config.json declares the new context.
#[test]
fn max_length_beyond_the_context_needs_an_explicit_extension() {
    let model = copy_fixture("tiny-qwen2");
    let path = model.path().join("config.json");
    let mut config = read_json(&path);
    config["max_position_embeddings"] = 64.into();
    std::fs::write(&path, config.to_string()).unwrap();
    let runs = tempfile::tempdir().unwrap();
    let out = runs.path().join("refused");
    let output = distill(&args(model.path().to_str().unwrap(), out.to_str().unwrap(), &[]));
    assert_clean_failure(&output, &["max_length 96", "max_position_embeddings 64", "--rope-theta", "--max-position-embeddings"]);
    assert!(!out.exists(), "nothing is written for a refused run");

    let out = runs.path().join("extended");
    let extra = ["--rope-theta", "40000", "--max-position-embeddings", "128"];
    let output = distill(&args(model.path().to_str().unwrap(), out.to_str().unwrap(), &extra));
    assert!(output.status.success(), "{}", stderr(&output));
    let exported = read_json(&out.join("final/config.json"));
    assert_eq!(exported["rope_theta"], 40000.0);
    assert_eq!(exported["max_position_embeddings"], 128);
    // Not enough positions even so: refused, naming the flag to raise.
    let out = runs.path().join("short");
    let output = distill(&args(model.path().to_str().unwrap(), out.to_str().unwrap(), &["--max-position-embeddings", "80"]));
    assert_clean_failure(&output, &["max_position_embeddings 80", "raise --max-position-embeddings"]);
}

/// The six R1 students' own defaults pass the context check (the Qwen2.5-Math configs extend
/// their 4096 positions as open-r1 did).
#[test]
fn student_configs_defaults_fit_their_context() {
    for file in ["qwen2.5-math-1.5b", "qwen2.5-math-7b", "llama-3.1-8b", "qwen2.5-14b", "qwen2.5-32b", "llama-3.3-70b-instruct"] {
        let student = distill::student::StudentConfig::from_path(&common::repo_root().join(format!("student_configs/{file}.toml"))).unwrap();
        let options = student.training.or(&distill::train::options::TrainingOptions::defaults());
        let mut config = student.model.clone();
        let max_length = options.max_length.unwrap();
        assert_eq!(max_length, 32768, "{file}");
        distill::train::job::extend_context(&mut config, &options, max_length).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}

/// A plan larger than the device is refused before anything is loaded or written.
#[test]
fn a_plan_that_cannot_fit_is_refused() {
    let runs = tempfile::tempdir().unwrap();
    let out = runs.path().join("run");
    let output = distill(&args("student_configs/tiny-qwen2.toml", out.to_str().unwrap(), &["--init", "random", "--gpu-memory", "64MB"]));
    assert_clean_failure(&output, &["memory plan needs", "GiB", "--gradient-checkpointing"]);
    assert!(!out.exists());
}

/// wgpu binds a tensor of at most 2 GiB: a model whose embeddings are larger (an H200 refused
/// a 14B's f32 embeddings in its first kernel) is refused before anything is built, naming the
/// tensor and the devices that can hold it.
#[test]
fn a_tensor_larger_than_wgpu_can_bind_is_refused() {
    if std::env::var("DISTILL_TEST_SKIP_WGPU").is_ok() {
        return;
    }
    let model = copy_fixture("tiny-qwen2");
    let path = model.path().join("config.json");
    let mut config = read_json(&path);
    config["vocab_size"] = 40_000_000.into();
    std::fs::write(&path, config.to_string()).unwrap();
    let runs = tempfile::tempdir().unwrap();
    let out = runs.path().join("run");
    let output = distill(&[
        "train", "--model", model.path().to_str().unwrap(), "--data", TRACES, "--prompt-field", "problem", "--response-field",
        "generated_solution", "--out", out.to_str().unwrap(), "--truncate", "--max-length", "96", "--init", "random", "--device", "wgpu",
    ]);
    assert_clean_failure(&output, &["binds at most 2.00 GiB per tensor", "model.embed_tokens.weight [40000000, 16]", "2.38 GiB", "cuda"]);
    assert!(!out.exists());
}

/// A damaged token cache is noticed, rebuilt with a message, and the run goes on.
#[test]
fn a_damaged_token_cache_is_rebuilt() {
    let runs = tempfile::tempdir().unwrap();
    let cache = runs.path().join("cache");
    let first = runs.path().join("first");
    let mut extra = vec!["--init", "random", "--dataset-cache", cache.to_str().unwrap()];
    let output = distill(&args("student_configs/tiny-qwen2.toml", first.to_str().unwrap(), &extra));
    assert!(output.status.success() && stderr(&output).contains("data: tokenized"), "{}", stderr(&output));
    let entry = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).find(|p| p.join("meta.json").exists()).unwrap();
    // A second run on the same data reuses it.
    let second = runs.path().join("second");
    let output = distill(&args("student_configs/tiny-qwen2.toml", second.to_str().unwrap(), &extra));
    assert!(output.status.success() && stderr(&output).contains("read from"), "{}", stderr(&output));
    // Cut the token file short.
    let tokens = entry.join("tokens.u32");
    let bytes = std::fs::read(&tokens).unwrap();
    std::fs::write(&tokens, &bytes[..bytes.len() - 8]).unwrap();
    let third = runs.path().join("third");
    let output = distill(&args("student_configs/tiny-qwen2.toml", third.to_str().unwrap(), &extra));
    let err = stderr(&output);
    assert!(output.status.success(), "{err}");
    assert!(err.contains("damaged") && err.contains("tokens.u32"), "{err}");
    // Garbage in an id: out of the vocabulary.
    let mut bytes = std::fs::read(&tokens).unwrap();
    bytes[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(&tokens, &bytes).unwrap();
    let output = distill(&args("student_configs/tiny-qwen2.toml", runs.path().join("fourth").to_str().unwrap(), &extra));
    assert!(output.status.success() && stderr(&output).contains("outside the tokenizer's"), "{}", stderr(&output));
    // Another max_length is another cache entry, tokenized anew beside the first.
    extra.extend_from_slice(&["--max-length", "80"]);
    let output = distill(&args("student_configs/tiny-qwen2.toml", runs.path().join("fifth").to_str().unwrap(), &extra));
    assert!(output.status.success() && stderr(&output).contains("data: tokenized"), "{}", stderr(&output));
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 2);
}

/// A second process on the same run folder is refused while the first trains.
#[test]
fn a_second_process_on_one_run_folder_is_refused() {
    let runs = tempfile::tempdir().unwrap();
    let out = runs.path().join("run");
    let out_str = out.to_str().unwrap().to_string();
    let mut first = common::command()
        .args(args("student_configs/tiny-qwen2.toml", &out_str, &["--init", "random", "--max-steps", "400", "--save-steps", "1"]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while !out.join("checkpoint-1").exists() {
        assert!(std::time::Instant::now() < deadline, "the first run never checkpointed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let output = distill(&args("student_configs/tiny-qwen2.toml", &out_str, &["--init", "random", "--max-steps", "400", "--resume"]));
    first.kill().unwrap();
    first.wait().unwrap();
    assert_clean_failure(&output, &["being trained by another process", ".lock"]);
}

/// --save-total-limit keeps the newest checkpoints; a LoRA checkpoint holds the adapters and
/// their optimizer state, not the model, and `distill export` of it equals the run's final
/// export.
#[test]
fn save_total_limit_and_lora_checkpoints() {
    let runs = tempfile::tempdir().unwrap();
    let out = runs.path().join("run");
    let extra = ["--max-steps", "4", "--save-steps", "1", "--save-total-limit", "2", "--lora-rank", "4", "--lora-targets", "q_proj,down_proj", "--export-dtype", "bf16"];
    let output = distill(&args("tests/fixtures/tiny-qwen2", out.to_str().unwrap(), &extra));
    assert!(output.status.success(), "{}", stderr(&output));
    let steps: Vec<usize> = distill::train::checkpoint::all(&out).into_iter().map(|(step, _)| step).collect();
    assert_eq!(steps, vec![3, 4]);
    let checkpoint = out.join("checkpoint-4");
    let mut files: Vec<String> = std::fs::read_dir(&checkpoint).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert_eq!(files, ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json"]);
    let optimizer = std::fs::read(checkpoint.join("optimizer.safetensors")).unwrap();
    let names = safetensors::SafeTensors::deserialize(&optimizer).unwrap().names().len();
    assert_eq!(names, 2 * 2 * 2 * 2, "2 layers × 2 targets × (A, B) × 2 moments");

    let exported = runs.path().join("exported");
    let output = distill(&["export", "--run", out.to_str().unwrap(), "--out", exported.to_str().unwrap(), "--device", "flex"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let read = |path: &Path| std::fs::read(path).unwrap();
    assert_eq!(read(&exported.join("model.safetensors")), read(&out.join("final/model.safetensors")), "the checkpoint's merge is the final export");
}

/// `--resume` with other settings is refused before any weights are read, naming what changed;
/// the same settings written another way (`./` before a relative path) are the same run, and
/// it reuses the token cache.
#[test]
fn resume_with_other_settings_names_them() {
    let runs = tempfile::tempdir().unwrap();
    let out = runs.path().join("run");
    let out = out.to_str().unwrap();
    let cache = runs.path().join("cache");
    let cache = cache.to_str().unwrap();
    let first = distill(&args("student_configs/tiny-qwen2.toml", out, &["--init", "random", "--max-steps", "1", "--dataset-cache", cache]));
    assert!(first.status.success(), "{}", stderr(&first));
    let metrics = std::fs::read_to_string(Path::new(out).join("metrics.jsonl")).unwrap();
    let changed = distill(&args("student_configs/tiny-qwen2.toml", out, &["--init", "random", "--max-steps", "1", "--learning-rate", "3e-4", "--resume", "--dataset-cache", cache]));
    assert_clean_failure(&changed, &["other settings", "learning_rate"]);
    assert_eq!(std::fs::read_to_string(Path::new(out).join("metrics.jsonl")).unwrap(), metrics, "a refused resume leaves the metrics alone");
    let same = distill(&args("./student_configs/tiny-qwen2.toml", out, &["--init", "random", "--max-steps", "1", "--resume", "--dataset-cache", cache]));
    assert!(same.status.success(), "{}", stderr(&same));
    assert!(stderr(&same).contains("resuming from"), "{}", stderr(&same));
    // The resumed run reads the first run's tokens back instead of tokenising again.
    assert!(stderr(&first).contains("data: tokenized") && stderr(&first).contains(" into "), "{}", stderr(&first));
    assert!(stderr(&same).contains("data: tokenized rows of") && stderr(&same).contains("read from"), "{}", stderr(&same));
}

/// An --eval-split that holds out nothing, or is not a fraction, is refused.
#[test]
fn eval_split_must_be_a_fraction_that_holds_out_rows() {
    let runs = tempfile::tempdir().unwrap();
    for split in ["1.5", "-0.1", "NaN"] {
        let out = runs.path().join(format!("run{split}"));
        let flag = format!("--eval-split={split}");
        let output = distill(&args("student_configs/tiny-qwen2.toml", out.to_str().unwrap(), &["--init", "random", &flag]));
        assert_clean_failure(&output, &["--eval-split", "fraction"]);
        assert!(!out.exists(), "nothing is written for a refused run");
    }
}
