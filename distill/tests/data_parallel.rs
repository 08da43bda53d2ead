//! Data parallelism (`--devices`): a step spread over several devices is the step one device
//! takes with the whole global batch, with or without the optimizer sharded.

mod common;

use distill::burn::module::{Module, ModuleVisitor, Param};
use distill::burn::tensor::{DType, Device, Tensor};
use distill::data::packing::PackedBlock;
use distill::model::lora::LoraConfig;
use distill::model::{BaseStorage, LoadOptions, Model};
use distill::pretrained::Pretrained;
use distill::train::optim::{AdamW, AdamWConfig};
use distill::train::parallel::Replicas;
use distill::train::run::{StepMetrics, TrainConfig, train};
use distill::train::schedule::{Schedule, Scheduler};

fn flex() -> Device {
    distill::device::parse("flex").unwrap().autodiff()
}

struct Run {
    metrics: Vec<StepMetrics>,
    weights: Vec<f32>,
}

struct Flatten(Vec<f32>);

impl ModuleVisitor for Flatten {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.extend(param.val().into_data().convert::<f32>().as_slice::<f32>().unwrap());
    }
}

fn weights(model: &Model) -> Vec<f32> {
    let mut flat = Flatten(Vec::new());
    model.net.visit(&mut flat);
    flat.0
}

fn start(device: &Device, lora: Option<&LoraConfig>) -> (Model, Vec<PackedBlock>) {
    start_with(device, lora, BaseStorage::Full)
}

fn start_with(device: &Device, lora: Option<&LoraConfig>, base: BaseStorage) -> (Model, Vec<PackedBlock>) {
    let pretrained = Pretrained::load(&common::fixtures().join("tiny-qwen2"), device, LoadOptions::default()).unwrap();
    let blocks = common::math_blocks(&pretrained.tokenizer, 40, 16);
    let model = match lora {
        Some(lora) => {
            device.seed(3);
            pretrained.model.with_lora(lora).with_frozen_base(base, DType::F32)
        }
        None => pretrained.model,
    };
    (model, blocks)
}

fn run(devices: Vec<Device>, shard_optimizer: bool, batch: usize, accumulation: usize, lora: Option<&LoraConfig>) -> Run {
    run_in(devices, shard_optimizer, batch, accumulation, lora, None)
}

fn run_in(devices: Vec<Device>, shard_optimizer: bool, batch: usize, accumulation: usize, lora: Option<&LoraConfig>, compute_dtype: Option<DType>) -> Run {
    run_on_base(devices, shard_optimizer, batch, accumulation, lora, compute_dtype, BaseStorage::Full)
}

fn run_on_base(
    devices: Vec<Device>,
    shard_optimizer: bool,
    batch: usize,
    accumulation: usize,
    lora: Option<&LoraConfig>,
    compute_dtype: Option<DType>,
    base: BaseStorage,
) -> Run {
    let first = devices.first().cloned().unwrap_or_else(flex);
    let (model, blocks) = start_with(&first, lora, base);
    let config = TrainConfig {
        schedule: Schedule { learning_rate: 3e-3, scheduler: Scheduler::Cosine, warmup_steps: 1, total_steps: 4, min_lr_ratio: 0.1 },
        adamw: AdamWConfig { weight_decay: 0.01, ..Default::default() },
        max_grad_norm: Some(1.0),
        per_device_train_batch_size: batch,
        gradient_accumulation_steps: accumulation,
        seed: 5,
        compute_dtype,
        gradient_checkpointing: false,
        activation_offloading: false,
        devices,
        shard_optimizer,
    };
    let mut metrics = Vec::new();
    let mut optimizer = AdamW::new(config.adamw.clone());
    let model = train(model, &mut optimizer, &blocks, &config, 0, |m, _, _| -> Result<(), ()> {
        metrics.push(m.clone());
        Ok(())
    })
    .unwrap();
    Run { metrics, weights: weights(&model) }
}

fn assert_same(a: &Run, b: &Run, tolerance: f64, weight_tolerance: f64, what: &str) {
    assert_eq!(a.metrics.len(), b.metrics.len());
    for (x, y) in a.metrics.iter().zip(&b.metrics) {
        assert_eq!(x.trained_tokens, y.trained_tokens, "{what}: step {} saw other rows", x.step);
        assert!((x.loss - y.loss).abs() <= tolerance * x.loss, "{what}: step {} loss {} vs {}", x.step, x.loss, y.loss);
        assert!((x.grad_norm - y.grad_norm).abs() <= 10.0 * tolerance * x.grad_norm, "{what}: step {} grad norm {} vs {}", x.step, x.grad_norm, y.grad_norm);
    }
    assert_eq!(a.weights.len(), b.weights.len());
    let scale = a.weights.iter().fold(0f32, |m, w| m.max(w.abs())) as f64;
    let worst = a.weights.iter().zip(&b.weights).fold(0f64, |m, (x, y)| m.max((x - y).abs() as f64));
    assert!(worst <= weight_tolerance * scale, "{what}: weights differ by {worst:e} (largest weight {scale:e})");
}

/// Two devices with batch b each take the steps one device takes with batch 2b: the same rows,
/// the same losses, the same weights after four steps (flex twice: two replicas on one CPU
/// device, the only way to have two flex devices).
#[test]
fn two_devices_equal_one_device_with_twice_the_batch() {
    let _generator = common::random_generator();
    let one = run(vec![], false, 4, 1, None);
    let two = run(vec![flex(), flex()], false, 2, 1, None);
    assert_same(&one, &two, 1e-5, 1e-5, "2 devices × batch 2 vs 1 × batch 4");
    // A first step that changed nothing would make the comparison empty.
    assert!(one.metrics[3].loss < one.metrics[0].loss, "{:?}", one.metrics.iter().map(|m| m.loss).collect::<Vec<_>>());
    // Accumulation spreads over the devices the same way: 2 × 1 × 2 = 1 × 4. The four
    // micro-batches' gradients are summed in another order ((g0 + g2) + (g1 + g3)), and AdamW
    // divides near-zero gradients by their own size, so after four steps a few weights differ
    // by more than the sums' rounding: losses to 1e-5, weights to 1e-4.
    let accumulated = run(vec![flex(), flex()], false, 1, 2, None);
    assert_same(&one, &accumulated, 1e-5, 1e-4, "2 devices × batch 1 × accumulation 2 vs 1 × batch 4");
}

/// ZeRO-1: the moments spread over the devices, each device updating its share, give the steps
/// of the unsharded optimizer.
#[test]
fn sharded_optimizer_steps_equal_unsharded_ones() {
    let _generator = common::random_generator();
    let unsharded = run(vec![flex(), flex()], false, 2, 1, None);
    let sharded = run(vec![flex(), flex()], true, 2, 1, None);
    assert_same(&unsharded, &sharded, 1e-6, 1e-6, "sharded vs unsharded");
    // The shares: every parameter once; each device's share within one parameter of an even
    // split (tiny-qwen2's tied embedding is 99.5% of it, so its shares are lopsided).
    let (model, _) = start(&flex(), None);
    let total = model.net.num_params();
    let largest = model.config.vocab_size * model.config.hidden_size;
    let owned = Replicas::new(model, &[flex(), flex(), flex()], true, None).owned_elements();
    assert_eq!(owned.iter().sum::<usize>(), total);
    assert!(owned.iter().all(|&o| o > 0 && o <= total / 3 + largest), "shares {owned:?} of {total}");
}

/// ZeRO under mixed precision: each replica keeps f32 master weights for its share only (the
/// rest in bf16, their gradients arriving in bf16), which computes what the unsharded bf16 run
/// computes: the same bf16 values in the forward pass, the same gradients (a cast's backward
/// pass is a cast). The checkpointed model is whole and f32.
#[test]
fn sharded_mixed_precision_keeps_master_weights_per_device() {
    let _generator = common::random_generator();
    let unsharded = run_in(vec![flex(), flex()], false, 2, 2, None, Some(DType::BF16));
    let sharded = run_in(vec![flex(), flex()], true, 2, 2, None, Some(DType::BF16));
    assert_same(&unsharded, &sharded, 1e-5, 1e-5, "sharded vs unsharded, bf16 compute");
    let one = run_in(vec![], false, 4, 2, None, Some(DType::BF16));
    // One batch of 4 rows against two of 2: the bf16 activations round apart below one bf16
    // step (7.8e-3 at 1.0); measured 1.0e-3 of the largest weight after four steps.
    assert_same(&one, &sharded, 1e-3, 2e-3, "sharded on 2 devices vs 1, bf16 compute");

    let (model, _) = start(&flex(), None);
    let replicas = Replicas::new(model, &[flex(), flex()], true, Some(DType::BF16));
    let count = |index: usize, dtype: DType| {
        let mut seen = Dtypes(Vec::new());
        replicas.model(index).net.visit(&mut seen);
        seen.0.iter().filter(|d| **d == dtype).count()
    };
    let params = {
        let mut seen = Dtypes(Vec::new());
        replicas.model(0).net.visit(&mut seen);
        seen.0.len()
    };
    // Each parameter is f32 on exactly one replica.
    assert_eq!(count(0, DType::F32) + count(1, DType::F32), params);
    assert!(count(0, DType::BF16) > 0 && count(1, DType::BF16) > 0);
    let mut whole = Dtypes(Vec::new());
    replicas.full_model().net.visit(&mut whole);
    assert!(whole.0.iter().all(|d| *d == DType::F32), "the checkpointed model is f32");
}

struct Dtypes(Vec<DType>);

impl ModuleVisitor for Dtypes {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push(param.val().dtype());
    }
}

/// LoRA over data parallel: only the adapters are reduced and updated; the frozen base stays
/// the same everywhere.
#[test]
fn lora_data_parallel_equals_one_device() {
    let _generator = common::random_generator();
    let lora = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.0, targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()] };
    let one = run(vec![], false, 4, 1, Some(&lora));
    let two = run(vec![flex(), flex()], true, 2, 1, Some(&lora));
    assert_same(&one, &two, 1e-5, 1e-5, "LoRA on 2 devices vs 1");
}

/// LoRA dropout on two devices draws the masks one device draws for the same micro-batches
/// (they follow the step and the micro-batch's place in it; burn's generator is one per
/// process, so replicas that draw take turns instead of taking each other's draws), and QLoRA's
/// quantized base forks to every replica: both equal one device running the same two
/// micro-batches one after the other.
#[test]
fn lora_dropout_and_qlora_on_two_devices_equal_one_device() {
    let _generator = common::random_generator();
    let lora = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.1, targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()] };
    let one = run(vec![], false, 2, 2, Some(&lora));
    let two = run(vec![flex(), flex()], true, 2, 1, Some(&lora));
    assert_same(&one, &two, 1e-5, 1e-5, "LoRA with dropout on 2 devices vs 1");
    let without = LoraConfig { dropout: 0.0, ..lora.clone() };
    let undropped = run(vec![], false, 2, 2, Some(&without));
    assert!((undropped.metrics[0].grad_norm - one.metrics[0].grad_norm).abs() > 1e-3 * one.metrics[0].grad_norm, "dropout changed nothing");
    let quantized = BaseStorage::Quantized { bits: 4 };
    let one = run_on_base(vec![], false, 2, 2, Some(&lora), None, quantized);
    let two = run_on_base(vec![flex(), flex()], true, 2, 1, Some(&lora), None, quantized);
    assert_same(&one, &two, 1e-5, 1e-5, "QLoRA on 2 devices vs 1");
}

/// Mixed backends: a replica on flex and one on wgpu (lavapipe on CI) train as one device does,
/// within wgpu's own agreement with flex.
#[test]
fn flex_and_wgpu_train_together() {
    let _generator = common::random_generator();
    let one = run(vec![], false, 4, 1, None);
    let mixed = run(vec![flex(), distill::device::parse("wgpu").unwrap().autodiff()], true, 2, 1, None);
    assert_same(&one, &mixed, 1e-4, 1e-4, "flex + wgpu vs flex");
}

/// Bad `--devices` / QLoRA settings are refused before anything is written, with what to change.
#[test]
fn bad_parallel_and_quantization_settings_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let train = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec![
            "train", "--model", "tests/fixtures/tiny-qwen2", "--data", "datasets/r1_traces_sample40.jsonl",
            "--prompt-field", "problem", "--response-field", "generated_solution", "--out", out.to_str().unwrap(),
            "--max-length", "96", "--truncate", "--max-steps", "1",
        ];
        args.extend(extra);
        let output = common::distill(&args);
        assert!(!out.exists() || std::fs::read_dir(&out).unwrap().next().is_none(), "{name}: {} was written", out.display());
        output
    };
    common::assert_clean_failure(&train("unknown", &["--devices", "flex,tpu"]), &["unknown device `tpu`"]);
    common::assert_clean_failure(&train("both", &["--devices", "flex,flex", "--device", "flex"]), &["--devices", "--device"]);
    common::assert_clean_failure(&train("twice", &["--devices", "wgpu,wgpu"]), &["--devices names wgpu twice"]);
    common::assert_clean_failure(&train("bf16-on-wgpu", &["--devices", "flex,wgpu", "--dtype", "bf16"]), &["wgpu has no bf16 compute"]);
    common::assert_clean_failure(
        &train("two-widths", &["--device", "flex", "--lora-rank", "4", "--load-in-4bit", "--load-in-8bit"]),
        &["--load-in-4bit and --load-in-8bit exclude each other"],
    );
}
