//! Training steps against PyTorch (tests/fixtures/make_train_reference.py): the tiny Qwen2,
//! one batch, AdamW with PyTorch semantics, warmup + cosine-to-floor, global norm clipping.
//! Per-step loss and global gradient norm must match over 5 steps.

mod common;

use distill::burn::tensor::Device;
use distill::data::packing::PackedBlock;
use distill::data::traces::SftExample;
use distill::model::LoadOptions;
use distill::pretrained::Pretrained;
use distill::train::optim::{AdamW, AdamWConfig};
use distill::train::schedule::{Schedule, Scheduler};
use serde_json::Value;

fn run(device: Device, tolerance: f64, device_name: &str) {
    let path = common::fixtures().join("train_reference.json");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let hyper = &reference["hyper"];
    let number = |key: &str| hyper[key].as_f64().unwrap();
    let mut model = Pretrained::load(&common::fixtures().join("tiny-qwen2"), &device, LoadOptions::default()).unwrap().model;
    let blocks: Vec<PackedBlock> = reference["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .zip(reference["trained"].as_array().unwrap())
        .map(|(ids, trained)| {
            PackedBlock::single(&SftExample {
                input_ids: ids.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect(),
                trained: trained.as_array().unwrap().iter().map(|v| v.as_bool().unwrap()).collect(),
            })
        })
        .collect();
    let schedule = Schedule {
        learning_rate: number("learning_rate"),
        scheduler: Scheduler::Cosine,
        warmup_steps: number("warmup_steps") as usize,
        total_steps: number("total_steps") as usize,
        min_lr_ratio: number("min_lr_ratio"),
    };
    let mut optimizer = AdamW::new(AdamWConfig {
        beta1: number("adam_beta1"),
        beta2: number("adam_beta2"),
        epsilon: number("adam_epsilon"),
        weight_decay: number("weight_decay"),
    });
    for (step, expected) in reference["steps"].as_array().unwrap().iter().enumerate() {
        let lr = schedule.lr(step);
        assert!((lr - expected["lr"].as_f64().unwrap()).abs() < 1e-12);
        let loss = distill::train::loss(&model, &blocks);
        let loss_value = loss.clone().into_scalar::<f32>() as f64;
        let grads = loss.backward();
        let (updated, norm) = optimizer.step(model.net, &grads, lr, Some(number("max_grad_norm")));
        model.net = updated;
        let (want_loss, want_norm) = (expected["loss"].as_f64().unwrap(), expected["grad_norm"].as_f64().unwrap());
        println!("{device_name} step {step}: loss {loss_value:.6} vs {want_loss:.6}, grad norm {norm:.6} vs {want_norm:.6}");
        assert!((loss_value - want_loss).abs() / want_loss < tolerance, "step {step}: loss {loss_value} vs {want_loss}");
        assert!((norm - want_norm).abs() / want_norm < tolerance, "step {step}: grad norm {norm} vs {want_norm}");
    }
}

#[test]
fn five_adamw_steps_match_pytorch_on_flex() {
    run(distill::device::parse("flex").unwrap().autodiff(), 1e-4, "flex");
}

#[test]
fn five_adamw_steps_match_pytorch_on_wgpu() {
    if std::env::var("DISTILL_TEST_SKIP_WGPU").is_ok() {
        return;
    }
    run(distill::device::parse("wgpu").unwrap().autodiff(), 1e-3, "wgpu");
}
