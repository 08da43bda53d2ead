//! The SFT loop: gradient accumulation is exact, and training lowers the loss.

mod common;

use distill::burn::tensor::{DType, Device};
use distill::data::packing::PackedBlock;
use distill::model::LoadOptions;
use distill::model::lora::LoraConfig;
use distill::pretrained::Pretrained;
use distill::train::optim::AdamWConfig;
use distill::train::run::{StepMetrics, TrainConfig, train};
use distill::train::schedule::{Schedule, Scheduler};

fn blocks(pretrained: &Pretrained) -> Vec<PackedBlock> {
    common::math_blocks(&pretrained.tokenizer, 50, 8)
}

fn run(batch: usize, accumulation: usize, steps: usize) -> Vec<StepMetrics> {
    run_on(distill::device::parse("flex").unwrap().autodiff(), None, batch, accumulation, steps)
}

fn run_on(device: Device, compute_dtype: Option<DType>, batch: usize, accumulation: usize, steps: usize) -> Vec<StepMetrics> {
    run_with(device, compute_dtype, false, None, batch, accumulation, steps)
}

fn run_with(
    device: Device,
    compute_dtype: Option<DType>,
    gradient_checkpointing: bool,
    lora: Option<&LoraConfig>,
    batch: usize,
    accumulation: usize,
    steps: usize,
) -> Vec<StepMetrics> {
    let _generator = common::random_generator();
    let mut pretrained = Pretrained::load(&common::fixtures().join("tiny-qwen2"), &device, LoadOptions::default()).unwrap();
    if let Some(lora) = lora {
        device.seed(17);
        pretrained.model = pretrained.model.with_lora(lora);
    }
    let blocks = blocks(&pretrained);
    assert_eq!(blocks.len(), 8);
    let config = TrainConfig {
        schedule: Schedule { learning_rate: 3e-3, scheduler: Scheduler::Cosine, warmup_steps: 1, total_steps: steps, min_lr_ratio: 0.1 },
        adamw: AdamWConfig { weight_decay: 0.01, ..Default::default() },
        max_grad_norm: Some(1.0),
        per_device_train_batch_size: batch,
        gradient_accumulation_steps: accumulation,
        seed: 5,
        compute_dtype,
        gradient_checkpointing,
        activation_offloading: false,
        devices: Vec::new(),
        shard_optimizer: false,
    };
    let mut metrics = Vec::new();
    let mut optimizer = distill::train::optim::AdamW::new(config.adamw.clone());
    train(pretrained.model, &mut optimizer, &blocks, &config, 0, |m, replicas, _| -> Result<(), ()> {
        let model = replicas.full_model();
        // Master weights stay f32 whatever the compute dtype.
        assert_eq!(model.net.layers[0].mlp.up_proj.weight().dtype(), DType::F32);
        metrics.push(m.clone());
        Ok(())
    })
    .unwrap();
    metrics
}

#[test]
fn gradient_accumulation_equals_the_bigger_batch() {
    let whole = run(4, 1, 3);
    let accumulated = run(2, 2, 3);
    let single = run(1, 4, 3);
    for ((a, b), c) in whole.iter().zip(&accumulated).zip(&single) {
        assert!((a.loss - b.loss).abs() / a.loss < 1e-5, "{} vs {}", a.loss, b.loss);
        assert!((a.loss - c.loss).abs() / a.loss < 1e-5, "{} vs {}", a.loss, c.loss);
        assert!((a.grad_norm - b.grad_norm).abs() / a.grad_norm < 1e-4);
        assert_eq!(a.trained_tokens, b.trained_tokens);
    }
}

/// bf16 compute over f32 master weights follows the f32 run (bf16 keeps 8 bits of mantissa).
#[test]
fn mixed_precision_tracks_full_precision() {
    let f32_run = run(4, 1, 3);
    let bf16_run = run_on(distill::device::parse("flex").unwrap().autodiff(), Some(DType::BF16), 4, 1, 3);
    for (a, b) in f32_run.iter().zip(&bf16_run) {
        assert!((a.loss - b.loss).abs() / a.loss < 2e-2, "step {}: loss {} vs {}", a.step, a.loss, b.loss);
        assert!((a.grad_norm - b.grad_norm).abs() / a.grad_norm < 0.1, "step {}: grad norm {} vs {}", a.step, a.grad_norm, b.grad_norm);
        assert_ne!(a.loss, b.loss, "bf16 compute was not used");
    }
}

/// Gradient checkpointing recomputes instead of storing; the steps are the same.
#[test]
fn gradient_checkpointing_gives_the_same_steps() {
    let plain = run(4, 1, 3);
    let recomputed = run_with(distill::device::parse("flex").unwrap().autodiff(), None, true, None, 4, 1, 3);
    for (a, b) in plain.iter().zip(&recomputed) {
        assert!((a.loss - b.loss).abs() / a.loss < 1e-6, "step {}: loss {} vs {}", a.step, a.loss, b.loss);
        assert!((a.grad_norm - b.grad_norm).abs() / a.grad_norm < 1e-5, "step {}: grad norm {} vs {}", a.step, a.grad_norm, b.grad_norm);
    }
}

/// The recomputation of a checkpointed layer draws the same LoRA dropout masks and computes
/// in the same dtype as the forward pass did: LoRA with dropout, in f32 and in bf16, takes the
/// same steps with and without checkpointing. (Were the masks drawn afresh, the gradients
/// would belong to other masks than the loss.)
#[test]
fn checkpointing_recomputes_lora_dropout_and_mixed_precision_exactly() {
    let lora = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.25, targets: distill::model::lora::LoraConfig::parse_targets("all-linear").unwrap() };
    let device = || distill::device::parse("flex").unwrap().autodiff();
    for compute in [None, Some(DType::BF16)] {
        let stored = run_with(device(), compute, false, Some(&lora), 2, 2, 3);
        let recomputed = run_with(device(), compute, true, Some(&lora), 2, 2, 3);
        for (a, b) in stored.iter().zip(&recomputed) {
            assert!((a.loss - b.loss).abs() / a.loss < 1e-6, "{compute:?} step {}: loss {} vs {}", a.step, a.loss, b.loss);
            assert!((a.grad_norm - b.grad_norm).abs() / a.grad_norm < 1e-5, "{compute:?} step {}: grad norm {} vs {}", a.step, a.grad_norm, b.grad_norm);
        }
        // The control: dropout does change the gradients, so equal ones above mean equal masks.
        let without_dropout = run_with(device(), compute, true, Some(&LoraConfig { dropout: 0.0, ..lora.clone() }), 2, 2, 3);
        let differs = recomputed.iter().zip(&without_dropout).any(|(a, b)| (a.grad_norm - b.grad_norm).abs() / a.grad_norm > 1e-3);
        assert!(differs, "{compute:?}: LoRA dropout 0.25 and 0 gave the same gradients");
    }
}

#[test]
fn training_lowers_the_loss() {
    let metrics = run(4, 1, 12);
    let first = metrics[..2].iter().map(|m| m.loss).sum::<f64>() / 2.0;
    let last = metrics[metrics.len() - 2..].iter().map(|m| m.loss).sum::<f64>() / 2.0;
    assert!(last < first * 0.9, "loss {first:.3} → {last:.3}");
    assert_eq!(metrics.last().unwrap().step, 12);
    assert!((metrics.last().unwrap().epoch - 6.0).abs() < 1e-9, "two steps per epoch of 8 blocks at batch 4");
}

/// `distill train` end to end: student config + random init on the real R1 traces, metrics
/// per step, an HF export that `distill eval` reads, and no overwriting of a run.
#[test]
fn train_command_writes_metrics_and_an_export() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let args = [
        "train", "--model", "student_configs/tiny-qwen2.toml", "--init", "random",
        "--data", "datasets/r1_traces_sample40.jsonl", "--prompt-field", "problem", "--response-field", "generated_solution",
        "--out", run.to_str().unwrap(), "--max-length", "128", "--truncate", "--max-steps", "3",
        "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "2", "--device", "flex",
        "--eval-split", "0.1", "--eval-steps", "2",
    ];
    let output = common::distill(&args);
    assert!(output.status.success(), "{}", common::stderr(&output));
    let stderr = common::stderr(&output);
    assert!(stderr.contains("40 rows") && stderr.contains("truncated"), "{stderr}");
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (train, eval): (Vec<_>, Vec<_>) = metrics.iter().partition(|m| m.get("loss").is_some());
    assert_eq!(train.len(), 3);
    assert_eq!(train[2]["step"], 3);
    assert!(train.iter().all(|m| m["loss"].as_f64().unwrap().is_finite()));
    // Held out: 4 of the 40 rows, evaluated at step 2 and at the end.
    assert_eq!(eval.iter().map(|m| m["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![2, 3]);
    assert!(eval.iter().all(|m| m["eval_loss"].as_f64().unwrap().is_finite() && m["eval_tokens"].as_u64().unwrap() > 0));
    let eval = common::distill(&[
        "eval", "--model", run.join("final").to_str().unwrap(), "--data", "tests/fixtures/eval_rows.jsonl", "--device", "flex",
    ]);
    assert!(eval.status.success(), "{}", common::stderr(&eval));

    let again = common::distill(&args);
    common::assert_clean_failure(&again, &["already exists"]);

    // `distill export` of the run's checkpoint, sharded in bf16.
    let exported = dir.path().join("exported");
    let output = common::distill(&[
        "export", "--run", run.to_str().unwrap(), "--out", exported.to_str().unwrap(),
        "--dtype", "bf16", "--max-shard-size", "2MB", "--device", "flex",
    ]);
    assert!(output.status.success(), "{}", common::stderr(&output));
    assert!(exported.join("model.safetensors.index.json").exists());
    let missing = common::distill(&["export", "--run", run.to_str().unwrap(), "--step", "99", "--out", "/tmp/never", "--device", "flex"]);
    common::assert_clean_failure(&missing, &["checkpoint-99"]);

    // `distill plot`: a PNG with the train curve (blue) and the eval curve (red) drawn.
    let output = common::distill(&["plot", run.to_str().unwrap()]);
    assert!(output.status.success(), "{}", common::stderr(&output));
    let image = image::open(run.join("loss.png")).unwrap().to_rgb8();
    assert_eq!(image.dimensions(), (1000, 700));
    let count = |rgb: [u8; 3]| image.pixels().filter(|p| p.0 == rgb).count();
    assert!(count([0, 0, 255]) > 100, "no train loss curve");
    assert!(count([255, 0, 0]) > 20, "no eval loss curve");
    assert!(count([0, 140, 60]) > 100, "no learning-rate curve");
    std::fs::write(run.join("metrics.jsonl"), "{\"step\": 1, \"loss\": 2.0}\nnot json\n").unwrap();
    let bad = common::distill(&["plot", run.to_str().unwrap()]);
    common::assert_clean_failure(&bad, &["metrics.jsonl, line 2", "not JSON"]);
}

fn train_args(run: &std::path::Path, save_steps: &str, extra: &[&str]) -> Vec<String> {
    let base = [
        "train", "--model", "student_configs/tiny-qwen2.toml", "--init", "random",
        "--data", "datasets/r1_traces_sample40.jsonl", "--prompt-field", "problem", "--response-field", "generated_solution",
        "--out", run.to_str().unwrap(), "--max-length", "96", "--truncate", "--max-steps", "8",
        "--per-device-train-batch-size", "2", "--learning-rate", "1e-2", "--device", "flex", "--save-steps", save_steps,
    ];
    let mut args: Vec<String> = base.iter().chain(extra).map(|s| s.to_string()).collect();
    // `--devices` (data parallel) replaces `--device`.
    if extra.contains(&"--devices") {
        let at = args.iter().position(|a| a == "--device").unwrap();
        args.drain(at..at + 2);
    }
    args
}

fn metrics(run: &std::path::Path) -> Vec<(u64, f64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap(), v["grad_norm"].as_f64().unwrap())
        })
        .collect()
}

/// A real SIGKILL of `distill train`, twice, then `--resume`: the loss curve is the straight
/// run's (to 1e-6), and every step is logged once.
#[test]
fn killed_and_resumed_run_matches_the_straight_run() {
    kill_and_resume(&[]);
}

/// The same with LoRA (adapters, their optimizer state and dropout masks carry over) on a
/// pretrained student.
#[test]
fn killed_and_resumed_lora_run_matches_the_straight_run() {
    kill_and_resume(&["--lora-rank", "4", "--lora-dropout", "0.1", "--lora-targets", "q_proj,v_proj,down_proj"]);
}

/// Data parallel on two devices, optimizer sharded under mixed precision (each device holds f32
/// master weights for its share): killed and resumed, the run is the straight two-device run.
#[test]
fn killed_and_resumed_two_device_run_matches_the_straight_run() {
    kill_and_resume(&["--devices", "flex,flex", "--shard-optimizer", "--dtype", "bf16"]);
}

/// A run started on one device resumes on two, keeping the global batch (1 × 2 × accumulation
/// 2 = 2 × 2 × 1): the same blocks in the same steps, the straight one-device run's losses.
#[test]
fn a_run_resumes_on_another_number_of_devices() {
    kill_and_resume_with(&["--gradient-accumulation-steps", "2"], &["--devices", "flex,flex"], 1e-5);
}

fn kill_and_resume(extra: &[&str]) {
    kill_and_resume_with(extra, extra, 1e-6);
}

/// The run with `extra` straight, and killed twice then resumed with `resumed` in place of
/// `extra`: the same losses and gradient norms to `tolerance`, every step logged once.
fn kill_and_resume_with(extra: &[&str], resumed: &[&str], tolerance: f64) {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    let args = train_args(&straight, "4", extra);
    let output = common::distill(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(output.status.success(), "{}", common::stderr(&output));

    let killed = dir.path().join("killed");
    let first = train_args(&killed, "1", extra);
    let args = train_args(&killed, "1", resumed);
    for kill_after in [2, 5] {
        let mut resume = if kill_after == 2 { first.clone() } else { args.clone() };
        if kill_after != 2 {
            resume.push("--resume".into());
        }
        let mut child = common::command()
            .args(&resume)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        while !killed.join(format!("checkpoint-{kill_after}")).exists() {
            assert!(std::time::Instant::now() < deadline, "no checkpoint-{kill_after}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    let mut resume: Vec<&str> = args.iter().map(String::as_str).collect();
    resume.push("--resume");
    let output = common::distill(&resume);
    assert!(output.status.success(), "{}", common::stderr(&output));
    assert!(common::stderr(&output).contains("resuming from"));

    let (a, b) = (metrics(&straight), metrics(&killed));
    assert_eq!(a.len(), 8);
    assert_eq!(b.iter().map(|m| m.0).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>(), "every step once");
    for (x, y) in a.iter().zip(&b) {
        assert!((x.1 - y.1).abs() <= tolerance * x.1, "step {}: loss {} vs {}", x.0, x.1, y.1);
        assert!((x.2 - y.2).abs() <= tolerance * x.2, "step {}: grad norm {} vs {}", x.0, x.2, y.2);
    }
    // No half-written checkpoint is left under a final name.
    for entry in std::fs::read_dir(&killed).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.starts_with("checkpoint-") {
            assert!(killed.join(&name).join("trainer_state.json").exists(), "{name} is incomplete");
        }
    }
}

/// LoRA on a pretrained student: only the targeted projections change, the adapters are
/// written as PEFT writes them, and the merged export scores like any checkpoint.
#[test]
fn lora_trains_adapters_only_and_merges_them_on_export() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let output = common::distill(&[
        "train", "--model", "tests/fixtures/tiny-qwen2", "--data", "datasets/r1_traces_sample40.jsonl",
        "--prompt-field", "problem", "--response-field", "generated_solution", "--out", run.to_str().unwrap(),
        "--max-length", "96", "--truncate", "--max-steps", "4", "--per-device-train-batch-size", "2",
        "--learning-rate", "1e-2", "--device", "flex", "--lora-rank", "4", "--lora-alpha", "16", "--lora-targets", "q_proj,v_proj",
    ]);
    let err = common::stderr(&output);
    assert!(output.status.success(), "{err}");
    assert!(err.contains("LoRA rank 4") && err.contains("merged the LoRA adapters"), "{err}");

    let read = |path: &std::path::Path| -> std::collections::HashMap<String, Vec<f32>> {
        let bytes = std::fs::read(path).unwrap();
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        tensors
            .names()
            .into_iter()
            .map(|name| {
                let view = tensors.tensor(name).unwrap();
                let values = match view.dtype() {
                    safetensors::Dtype::F32 => view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
                    safetensors::Dtype::F16 => view.data().chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
                    other => panic!("{name}: {other:?}"),
                };
                (name.to_string(), values)
            })
            .collect()
    };
    let base = read(&common::fixtures().join("tiny-qwen2/model.safetensors"));
    let merged = read(&run.join("final/model.safetensors"));
    for (name, values) in &base {
        let changed = merged[name] != *values;
        let targeted = name.contains("q_proj.weight") || name.contains("v_proj.weight");
        assert_eq!(changed, targeted, "{name}: changed = {changed}");
    }

    let checkpoint = run.join("checkpoint-4");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(checkpoint.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((config["peft_type"].as_str(), config["r"].as_u64(), config["lora_alpha"].as_f64()), (Some("LORA"), Some(4), Some(16.0)));
    let adapters = read(&checkpoint.join("adapter_model.safetensors"));
    assert_eq!(adapters.len(), 2 * 2 * 2, "2 layers × (q, v) × (A, B)");
    assert_eq!(adapters["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].len(), 4 * 16);
    assert!(adapters["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].iter().any(|&v| v != 0.0), "B was trained");

    let eval = common::distill(&["eval", "--model", run.join("final").to_str().unwrap(), "--data", "tests/fixtures/eval_rows.jsonl", "--device", "flex"]);
    assert!(eval.status.success(), "{}", common::stderr(&eval));
    let bad = common::distill(&[
        "train", "--model", "tests/fixtures/tiny-qwen2", "--data", "datasets/r1_traces_sample40.jsonl",
        "--prompt-field", "problem", "--response-field", "generated_solution", "--out", dir.path().join("bad").to_str().unwrap(),
        "--lora-rank", "4", "--lora-targets", "q_proj,attn", "--device", "flex",
    ]);
    common::assert_clean_failure(&bad, &["unknown LoRA target `attn`"]);
}

/// Ctrl-C (SIGINT) finishes the step under way, writes a checkpoint of it and exits; `--resume`
/// then completes the run, and the loss curve is the uninterrupted one.
#[cfg(unix)]
#[test]
fn ctrl_c_checkpoints_the_last_step_and_resume_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    let args = train_args(&straight, "0", &[]);
    let output = common::distill(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(output.status.success(), "{}", common::stderr(&output));

    let interrupted = dir.path().join("interrupted");
    let args = train_args(&interrupted, "0", &[]);
    let child = common::command()
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first logged step, then interrupt.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while std::fs::read_to_string(interrupted.join("metrics.jsonl")).map_or(true, |m| m.lines().count() < 2) {
        assert!(std::time::Instant::now() < deadline, "no step logged");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let output = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success() && err.contains("interrupted: checkpoint-"), "{err}");
    let (step, _) = distill::train::checkpoint::latest(&interrupted).expect("a checkpoint");
    assert!(step >= 2 && step < 8, "checkpoint at step {step}");

    let mut resume: Vec<&str> = args.iter().map(String::as_str).collect();
    resume.push("--resume");
    let output = common::distill(&resume);
    assert!(output.status.success(), "{}", common::stderr(&output));
    let (a, b) = (metrics(&straight), metrics(&interrupted));
    assert_eq!(b.iter().map(|m| m.0).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>());
    for (x, y) in a.iter().zip(&b) {
        assert!((x.1 - y.1).abs() <= 1e-6 * x.1, "step {}: loss {} vs {}", x.0, x.1, y.1);
    }
}
