//! The reference side of a benchmark (`distill bench`, `datagen bench`): the same measurement
//! made by another implementation (PyTorch, Python's openai client) in the same run, so the
//! printed ratio compares like with like on the same machine.

#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("running reference command `{command}`: {source}")]
    Spawn { command: String, source: std::io::Error },
    #[error("reference command failed: {0}")]
    Failed(String),
    #[error("reference printed no JSON line")]
    NoJson,
    #[error("reference JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Runs `command` through `sh -c` and parses the last line of its output that is a JSON object.
pub fn run_reference(command: &str) -> Result<serde_json::Value, ReferenceError> {
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .output()
        .map_err(|source| ReferenceError::Spawn { command: command.to_string(), source })?;
    if !output.status.success() {
        return Err(ReferenceError::Failed(String::from_utf8_lossy(&output.stderr).into_owned()));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).ok_or(ReferenceError::NoJson)?;
    Ok(serde_json::from_str(line)?)
}

/// What one `distill bench train` measurement runs.
#[derive(Debug, Clone)]
pub struct TrainBench {
    pub seq_len: usize,
    /// Rows per step.
    pub batch_size: usize,
    /// Untimed steps first (allocation, thread pool), then timed ones.
    pub warmup_steps: usize,
    pub steps: usize,
    pub compute_dtype: Option<burn::tensor::DType>,
    pub gradient_checkpointing: bool,
    /// The checkpointed layer inputs in host memory (implies checkpointing).
    pub activation_offloading: bool,
    pub lora_rank: Option<usize>,
    /// Data parallel over these devices (each with `batch_size` rows), the measured device
    /// first; empty: that device alone.
    pub devices: Vec<burn::tensor::Device>,
    pub shard_optimizer: bool,
    /// LoRA only: the frozen base quantized to this many bits (QLoRA).
    pub load_in_bits: Option<u8>,
}

impl TrainBench {
    /// How a LoRA run's frozen base is held: as `distill train` holds it.
    pub fn base(&self) -> crate::model::BaseStorage {
        crate::model::BaseStorage::choose(self.load_in_bits, self.compute_dtype.is_some())
    }

    /// The memory plan of these steps, beside `runtime_bytes` of process memory (an estimate
    /// when `None`).
    pub fn plan(&self, config: &crate::model::ModelConfig, runtime_bytes: Option<u64>, device: &burn::tensor::Device) -> crate::plan::MemoryPlan {
        crate::plan::MemoryPlan::new(
            config,
            &crate::plan::PlanOptions {
                seq_len: self.seq_len,
                batch_size: self.batch_size.max(1),
                gradient_accumulation_steps: 1,
                compute_dtype: self.compute_dtype.unwrap_or(burn::tensor::DType::F32),
                gradient_checkpointing: self.gradient_checkpointing,
                activation_offloading: self.activation_offloading,
                lora_rank: self.lora_rank,
                lora_targets: None,
                runtime_bytes,
                devices: self.devices.len().max(1),
                shard_optimizer: self.shard_optimizer,
                base: self.base(),
                flex: crate::device::is_flex(device),
                average_share: false,
            },
        )
    }

    /// The arguments that make `distill/benches/reference_train.py` run the same steps on the
    /// same rows (LoRA has no reference).
    pub fn reference_args(&self, config_path: &std::path::Path) -> String {
        format!(
            "--config {} --seq-len {} --batch-size {} --steps {} --warmup-steps {}{}{}",
            config_path.display(),
            self.seq_len,
            self.batch_size.max(1),
            self.steps,
            self.warmup_steps,
            if self.compute_dtype == Some(burn::tensor::DType::BF16) { " --bf16" } else { "" },
            if self.gradient_checkpointing { " --gradient-checkpointing" } else { "" },
        )
    }
}

/// burn's side of one length of `distill bench train`.
#[derive(Debug, Clone)]
pub enum BurnSide {
    Measured(TrainMeasurement),
    /// Not run: the plan exceeds the memory there is (the kernel would kill the process).
    Skipped { plan_bytes: u64, available_bytes: u64 },
}

/// PyTorch's side of one length.
#[derive(Debug, Clone, Copy)]
pub struct ReferencePoint {
    pub tokens_per_s: f64,
    pub peak_memory_bytes: f64,
}

/// One length of `distill bench train`: the reference (when a command is given) and burn.
#[derive(Debug, Clone)]
pub struct TrainComparison {
    pub burn: BurnSide,
    /// The reference's figures, or why it failed (its last line of error output).
    pub reference: Option<Result<ReferencePoint, String>>,
}

/// Measures `bench` in PyTorch (`reference`: the command, to which the steps' arguments are
/// appended) and then in burn, unless burn's plan exceeds `available` bytes. PyTorch runs first,
/// in its own process, so that neither side's heap is in the machine while the other measures.
pub fn compare_training(
    config: &crate::model::ModelConfig,
    config_path: &std::path::Path,
    bench: &TrainBench,
    reference: Option<&str>,
    device: &burn::tensor::Device,
    available: Option<u64>,
) -> TrainComparison {
    let reference = reference.map(|command| reference_point(&format!("{command} {}", bench.reference_args(config_path))));
    let plan_bytes = bench.plan(config, crate::memory::current_bytes(), device).total();
    let burn = match available {
        Some(available_bytes) if plan_bytes > available_bytes => BurnSide::Skipped { plan_bytes, available_bytes },
        _ => {
            let measured = measure_training(config, bench, device);
            // The model is gone; hand its memory back before the next length.
            crate::memory::release_device_memory(device);
            BurnSide::Measured(measured)
        }
    };
    TrainComparison { burn, reference }
}

fn reference_point(command: &str) -> Result<ReferencePoint, String> {
    let json = run_reference(command).map_err(|e| e.to_string().lines().last().unwrap_or("").to_string())?;
    let value = |key: &str| json.get(key).and_then(|v| v.as_f64()).ok_or_else(|| format!("reference JSON lacks {key}"));
    Ok(ReferencePoint { tokens_per_s: value("tokens_per_s")?, peak_memory_bytes: value("peak_memory_bytes")? })
}

/// Training speed and memory of one configuration, with the plan for it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainMeasurement {
    pub seq_len: usize,
    /// Median over the timed steps.
    pub tokens_per_s: f64,
    /// The process's peak memory during the steps (host peak on the CPU; the allocator's
    /// reservation on a GPU).
    pub peak_memory_bytes: u64,
    /// Resident memory before the model was built (the process itself).
    pub baseline_bytes: u64,
    /// Model FLOPs per second (see [`training_flops_per_token`]), in TFLOP/s: over the device's
    /// peak rate, the model FLOPs utilisation (MFU).
    pub model_tflops: f64,
    /// The most heap bytes held at once during the steps, and before the model was built,
    /// where the binary counts them ([`crate::memory::CountingAllocator`]): on the CPU, the
    /// peak without the allocator's own slack, so two runs compare without its noise.
    pub peak_allocated_bytes: Option<u64>,
    pub baseline_allocated_bytes: Option<u64>,
    pub plan: crate::plan::MemoryPlan,
    pub plan_bytes: u64,
}

/// Trains a randomly initialised `config` on one `seq_len`-token row per sequence (every token
/// a target) for the warm-up and timed steps, forward, backward, global-norm clipping and AdamW,
/// and measures tokens/s and the peak memory of the process from just before the model is
/// built. On the CPU the peak is reset first (Linux `clear_refs`), so measurements in one
/// process do not include each other's peaks.
pub fn measure_training(config: &crate::model::ModelConfig, bench: &TrainBench, device: &burn::tensor::Device) -> TrainMeasurement {
    use crate::data::packing::PackedBlock;
    use crate::train::run::{TrainConfig, train};
    use crate::train::schedule::{Schedule, Scheduler};
    let train_config = TrainConfig {
        schedule: Schedule { learning_rate: 1e-4, scheduler: Scheduler::Constant, warmup_steps: 0, total_steps: bench.warmup_steps + bench.steps, min_lr_ratio: 0.0 },
        adamw: Default::default(),
        max_grad_norm: Some(1.0),
        per_device_train_batch_size: bench.batch_size.max(1),
        gradient_accumulation_steps: 1,
        seed: 0,
        compute_dtype: bench.compute_dtype,
        gradient_checkpointing: bench.gradient_checkpointing,
        activation_offloading: bench.activation_offloading,
        devices: bench.devices.iter().map(|d| d.clone().autodiff()).collect(),
        shard_optimizer: bench.shard_optimizer,
    };
    crate::memory::release_device_memory(device);
    // On a GPU the peak is the device allocator's, so the baseline is too (the process's host
    // memory is not on the device).
    let device_baseline = crate::memory::device_reserved_bytes(device).filter(|_| !crate::device::is_flex(device));
    let baseline = device_baseline.or_else(crate::memory::current_bytes).unwrap_or(0);
    let baseline_allocated = crate::memory::allocated_bytes();
    crate::memory::reset_peaks();
    let device = device.clone().autodiff();
    device.seed(0);
    let model = crate::model::Model::random(config.clone(), &device);
    let base = bench.base();
    let lora = bench.lora_rank.map(|rank| crate::model::lora::LoraConfig {
        rank,
        alpha: 2.0 * rank as f64,
        dropout: 0.0,
        targets: crate::model::lora::TARGETS.iter().map(|t| t.to_string()).collect(),
    });
    let model = match &lora {
        Some(lora) => {
            let model = model.with_lora(lora).with_frozen_base(base, bench.compute_dtype.unwrap_or(burn::tensor::DType::F32));
            // The base is built in f32 before it is stored smaller; the steps are measured from
            // there, as a run that loads its base in the storage dtype would see them.
            crate::memory::release_device_memory(&device);
            crate::memory::reset_peaks();
            model
        }
        None => model,
    };
    let blocks: Vec<PackedBlock> = (0..train_config.per_device_train_batch_size * train_config.data_parallel())
        .map(|row| PackedBlock {
            input_ids: (0..bench.seq_len).map(|i| ((i + 31 * row) * 7919 % config.vocab_size) as u32).collect(),
            trained: vec![true; bench.seq_len],
            positions: (0..bench.seq_len).collect(),
            segments: vec![0; bench.seq_len],
        })
        .collect();
    let mut optimizer = crate::train::optim::AdamW::new(train_config.adamw.clone());
    let mut rates = Vec::new();
    let mut peak = 0;
    let warmup = bench.warmup_steps;
    let _ = train(model, &mut optimizer, &blocks, &train_config, 0, |step, _, _| -> Result<(), ()> {
        if step.step > warmup {
            rates.push(step.tokens_per_second);
        }
        peak = peak.max(step.peak_memory_bytes.unwrap_or(0));
        Ok(())
    });
    let peak_allocated = crate::memory::peak_allocated_bytes();
    rates.sort_by(f64::total_cmp);
    let plan = bench.plan(config, Some(baseline), &device);
    let tokens_per_s = rates.get(rates.len() / 2).copied().unwrap_or(f64::NAN);
    TrainMeasurement {
        seq_len: bench.seq_len,
        tokens_per_s,
        model_tflops: tokens_per_s * training_flops_per_token(config, bench.seq_len, bench.lora_rank.is_some()) / 1e12,
        peak_memory_bytes: peak,
        baseline_bytes: baseline,
        peak_allocated_bytes: peak_allocated,
        baseline_allocated_bytes: baseline_allocated,
        plan_bytes: plan.total(),
        plan,
    }
}

/// The FLOPs of one trained token, as MFU counts them (PaLM's appendix B; recomputation under
/// checkpointing not counted): a multiply-add is two FLOPs; the forward pass multiplies by every
/// projection and `lm_head` (`2N`) and attends to `seq_len / 2` keys on average under the causal
/// mask (`2 · seq_len · heads · head_dim` a layer); the backward pass is twice the forward. A
/// LoRA run computes no gradient for the frozen weights, so its matmuls cost `4N`, not `6N`
/// (the adapters are left out; attention's backward pass is whole either way).
pub fn training_flops_per_token(config: &crate::model::ModelConfig, seq_len: usize, lora: bool) -> f64 {
    let layers = config.num_hidden_layers as f64;
    let hidden = config.hidden_size as f64;
    let (heads, kv_heads, head_dim) = (config.num_attention_heads as f64, config.num_key_value_heads as f64, config.head_dim as f64);
    let attention = hidden * head_dim * (2.0 * heads + 2.0 * kv_heads);
    let mlp = 3.0 * hidden * config.intermediate_size as f64;
    let matmul_parameters = layers * (attention + mlp) + config.vocab_size as f64 * hidden;
    let matmuls = if lora { 4.0 } else { 6.0 } * matmul_parameters;
    matmuls + 6.0 * layers * seq_len as f64 * heads * head_dim
}

#[cfg(test)]
mod tests {
    use super::training_flops_per_token;

    /// Qwen2.5-Math-1.5B: its 1,543,714,304 parameters less the 144,896 of norms and q/k/v
    /// biases are matmul weights (lm_head tied to the embeddings, counted once as a matmul).
    #[test]
    fn flops_per_token_count_every_matmul_and_causal_attention() {
        let value = serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "hidden_size": 1536,
            "intermediate_size": 8960, "max_position_embeddings": 4096, "model_type": "qwen2",
            "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "tie_word_embeddings": true, "vocab_size": 151936
        });
        let config = crate::model::ModelConfig::from_hf_json(&value, std::path::Path::new("config.json")).unwrap();
        assert_eq!(config.num_parameters(), 1_543_714_304);
        let matmul_parameters = 1_543_714_304.0 - 144_896.0;
        let attention = 6.0 * 28.0 * 4096.0 * 12.0 * 128.0;
        assert_eq!(training_flops_per_token(&config, 4096, false), 6.0 * matmul_parameters + attention);
        assert_eq!(training_flops_per_token(&config, 4096, true), 4.0 * matmul_parameters + attention);
    }
}
