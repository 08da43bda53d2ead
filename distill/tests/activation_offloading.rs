//! `--activation-offloading`: under layer checkpointing the kept layer inputs wait in host
//! memory. Measured on wgpu (lavapipe here, a GPU elsewhere), whose allocator reports the bytes
//! in use on the device: between the forward and the backward pass the device holds every
//! layer's input less, and the gradients are the same.

mod common;

use distill::burn::tensor::{Device, Tensor};
use distill::data::batch::Batch;
use distill::data::packing::PackedBlock;
use distill::model::{Model, ModelConfig, Training};

const LAYERS: usize = 6;
const HIDDEN: usize = 128;
const TOKENS: usize = 512;

fn model(device: &Device) -> Model {
    let json = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": HIDDEN, "intermediate_size": 256,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": LAYERS,
        "vocab_size": 256, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": true,
    });
    let config = ModelConfig::from_hf_json(&json, std::path::Path::new("config.json")).unwrap();
    device.seed(3);
    Model::random(config, device)
}

fn in_use(device: &Device) -> u64 {
    device.clone().inner().memory_pool_usage().expect("wgpu reports its allocator").bytes_in_use
}

/// Device bytes in use between the passes, and the gradient of every parameter, flattened.
fn step(offload: bool) -> (u64, Vec<f32>) {
    let device = distill::device::parse("wgpu").unwrap().autodiff();
    let model = model(&device);
    let block = PackedBlock {
        input_ids: (0..TOKENS).map(|i| (i * 7919 % 256) as u32).collect(),
        trained: vec![true; TOKENS],
        positions: (0..TOKENS).collect(),
        segments: vec![0; TOKENS],
    };
    let batch = Batch::new(&[&block]);
    let before = in_use(&device);
    let loss = distill::train::nll_sum(&model, &batch, Training { dropout_seed: None, checkpoint: true, offload }).unwrap();
    let _ = loss.clone().into_scalar::<f32>();
    let held = in_use(&device) - before;
    let grads = loss.backward();
    let mut flat = Vec::new();
    for layer in &model.net.layers {
        let weight: Tensor<2> = layer.mlp.up_proj.weight.as_ref().unwrap().val();
        flat.extend(weight.grad(&grads).unwrap().into_data().convert::<f32>().try_to_vec::<f32>().unwrap());
    }
    (held, flat)
}

#[test]
fn offloaded_layer_inputs_leave_the_device_and_the_gradients_stay() {
    let (kept, kept_grads) = step(false);
    let (offloaded, offloaded_grads) = step(true);
    let layer_inputs = (LAYERS * TOKENS * HIDDEN * 4) as u64;
    println!("device bytes held between the passes: {kept} kept, {offloaded} offloaded; the layer inputs are {layer_inputs}");
    assert!(kept - offloaded.min(kept) >= layer_inputs, "offloading freed {} of {layer_inputs} bytes", kept.saturating_sub(offloaded));
    assert_eq!(kept_grads.len(), offloaded_grads.len());
    for (a, b) in kept_grads.iter().zip(&offloaded_grads) {
        assert_eq!(a, b, "the same values come back, so the same gradients");
    }
}

/// `distill train --activation-offloading` on wgpu: the plan keeps the layer inputs in host
/// memory, the summary says so, and the run trains and exports.
#[test]
fn the_train_command_offloads() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let output = common::distill(&[
        "train", "--model", "tests/fixtures/tiny-qwen2", "--data", "datasets/r1_traces_sample40.jsonl", "--prompt-field", "problem",
        "--response-field", "generated_solution", "--out", out.to_str().unwrap(), "--max-length", "96", "--truncate", "--max-steps", "2",
        "--device", "wgpu", "--activation-offloading",
    ]);
    let err = common::stderr(&output);
    assert!(output.status.success(), "{err}");
    assert!(err.contains("offloaded") && err.contains("in host memory"), "{err}");
    assert!(err.contains("gradient checkpointing with the layer inputs offloaded to host memory"), "{err}");
    assert!(out.join("final/model.safetensors").exists());
}

/// A run whose offloaded layer inputs need more host memory than the machine has is refused
/// before anything is built or written, with the ways out.
#[test]
fn offloading_more_than_the_host_has_is_refused() {
    let model = common::copy_fixture("tiny-qwen2");
    let path = model.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    // 10⁹ layers' inputs of 96 tokens × 16 values: 5.6 TiB.
    config["num_hidden_layers"] = 1_000_000_000u64.into();
    std::fs::write(&path, config.to_string()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let output = common::distill(&[
        "train", "--model", model.path().to_str().unwrap(), "--data", "datasets/r1_traces_sample40.jsonl", "--prompt-field", "problem",
        "--response-field", "generated_solution", "--out", out.to_str().unwrap(), "--max-length", "96", "--truncate", "--init", "random",
        "--device", "wgpu", "--activation-offloading",
    ]);
    common::assert_clean_failure(&output, &["the offloaded layer inputs need", "GiB of host memory", "without --activation-offloading"]);
    assert!(!out.exists(), "nothing is written for a refused run");
}
