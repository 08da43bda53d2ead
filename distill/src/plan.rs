//! The memory a training step needs, item by item, counted from the tensors `distill train`
//! allocates: weights, gradients, AdamW moments, the activations each decoder layer keeps for
//! its backward pass (all of them, or only its input under layer checkpointing), the
//! attention's and the loss's saved state, and the largest transient buffer of a step.
//!
//! The per-layer activation counts follow the model's operations (what each keeps for its
//! backward pass, e.g. RMSNorm keeps its input and `x / rms`, SwiGLU keeps gate, `silu(gate)`,
//! up and their product); the constants were checked against peak memory measured on flex by
//! `tests/memory_plan.rs`, which fails when the plan drifts more than 25% from measurement.

use burn::tensor::DType;
use serde::Serialize;

use crate::model::lora::TARGETS;
use crate::model::{BaseStorage, ModelConfig};
use crate::ops::attention::block_size;
use crate::ops::cross_entropy::chunk_rows;

/// How a run's summary line names its checkpointing.
pub fn checkpointing_phrase(gradient_checkpointing: bool, activation_offloading: bool) -> &'static str {
    match (gradient_checkpointing, activation_offloading) {
        (_, true) => ", gradient checkpointing with the layer inputs offloaded to host memory",
        (true, false) => ", gradient checkpointing",
        (false, false) => "",
    }
}

/// What a run looks like, for its plan.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOptions {
    /// Tokens per row (the longest block).
    pub seq_len: usize,
    /// Rows per forward pass (`per_device_train_batch_size`).
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// f32, or bf16 / f16 mixed precision over f32 master weights.
    pub compute_dtype: DType,
    pub gradient_checkpointing: bool,
    /// LoRA: the adapters' rank (None: full fine-tuning).
    pub lora_rank: Option<usize>,
    /// LoRA targets (None: all linear layers).
    pub lora_targets: Option<Vec<String>>,
    /// Memory the process holds before training (binary, tokenizer, data index); `None`: a
    /// typical figure.
    pub runtime_bytes: Option<u64>,
    /// Devices of a data-parallel run (1: one device). The plan is the first device's.
    pub devices: usize,
    /// The AdamW moments spread over the devices (`--shard-optimizer`).
    pub shard_optimizer: bool,
    /// LoRA only: how the frozen base is held (see [`BaseStorage`]).
    pub base: BaseStorage,
    /// The device is flex, the host's CPU: it multiplies a bf16 matmul in f32 (a dequantized
    /// weight needs no copy in the compute dtype), and activation offloading moves nothing.
    pub flex: bool,
    /// The checkpointed layer inputs wait in host memory (`--activation-offloading`; implies
    /// checkpointing).
    pub activation_offloading: bool,
    /// Sharded: plan an average device's share instead of the first device's (which holds the
    /// largest parameter whole), for the sum over replicas that share one host.
    pub average_share: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            seq_len: 4096,
            batch_size: 1,
            gradient_accumulation_steps: 1,
            compute_dtype: DType::F32,
            gradient_checkpointing: false,
            lora_rank: None,
            lora_targets: None,
            runtime_bytes: None,
            devices: 1,
            shard_optimizer: false,
            base: BaseStorage::Full,
            flex: false,
            activation_offloading: false,
            average_share: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanItem {
    pub name: &'static str,
    pub phase: Phase,
    pub bytes: u64,
    /// How the figure is made.
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryPlan {
    pub parameters: u64,
    pub trainable_parameters: u64,
    pub items: Vec<PlanItem>,
}

/// Process memory outside the tensors (binary, tokenizer, allocator), when not measured.
const RUNTIME_BYTES: u64 = 300 << 20;

/// Elements kept per token of one decoder layer for its backward pass, in the compute dtype.
/// `q`, `kv` and `intermediate` are the projection widths.
fn kept_per_token(config: &ModelConfig, fused_norm: bool) -> u64 {
    let hidden = config.hidden_size as u64;
    let q = (config.num_attention_heads * config.head_dim) as u64;
    let kv = (config.num_key_value_heads * config.head_dim) as u64;
    let intermediate = config.intermediate_size as u64;
    // Two RMSNorms (input, x / rms, normed output) = 6 × hidden, or 4 × hidden as one operation
    // (f32 on flex, `ops::rms_norm`: input and output); attention: q and k after RoPE, v, the
    // context (shared with o_proj's input) = 2q + 2kv; SwiGLU (one operation, see
    // `ops::swiglu`): gate and up, and the product as down_proj's input = 3 × intermediate.
    let norms = if fused_norm { 4 } else { 6 };
    norms * hidden + 2 * q + 2 * kv + 3 * intermediate
}

/// LoRA adapter parameters of one decoder layer.
fn lora_per_layer(config: &ModelConfig, rank: u64, targets: &[String]) -> u64 {
    let hidden = config.hidden_size as u64;
    let q = (config.num_attention_heads * config.head_dim) as u64;
    let kv = (config.num_key_value_heads * config.head_dim) as u64;
    let intermediate = config.intermediate_size as u64;
    targets
        .iter()
        .map(|t| match t.as_str() {
            "q_proj" => hidden + q,
            "k_proj" | "v_proj" => hidden + kv,
            "o_proj" => q + hidden,
            "gate_proj" | "up_proj" | "down_proj" => hidden + intermediate,
            _ => 0,
        })
        .sum::<u64>()
        * rank
}

fn dtype_bytes(dtype: DType) -> u64 {
    dtype.size() as u64
}

/// When a plan item is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The whole step.
    Always,
    /// From the end of the forward pass into the backward pass.
    Backward,
    /// The optimizer step, after the backward pass has freed the activations.
    Optimizer,
    /// In host memory, not the device's (offloaded activations): outside the device's total.
    Host,
    /// One of the backward pass's transients that take turns in the workspace: shown on its
    /// own, counted only through the workspace (the largest of them).
    Transient,
}

/// Parameters of one decoder layer's seven projections (what QLoRA quantizes).
fn projection_parameters(config: &ModelConfig) -> u64 {
    let hidden = config.hidden_size as u64;
    let q = (config.num_attention_heads * config.head_dim) as u64;
    let kv = (config.num_key_value_heads * config.head_dim) as u64;
    hidden * (q + 2 * kv) + q * hidden + 3 * hidden * config.intermediate_size as u64
}

/// Bytes per quantized value, and its share of its block's scale (held in the compute dtype,
/// `scale_bytes` a scale); see [`crate::model::linear::QuantizedWeight`].
pub fn quantized_bytes(bits: u8, scale_bytes: u64) -> (f64, f64) {
    (bits as f64 / 8.0, scale_bytes as f64 / crate::model::linear::BLOCK as f64)
}

/// The largest parameter tensor: embeddings / lm_head or an MLP matrix.
fn largest_parameter(config: &ModelConfig) -> u64 {
    let (_, [rows, columns]) = largest_tensor(config);
    (rows * columns) as u64
}

/// The largest parameter tensor's HF name and dims: the embeddings (lm_head has the same
/// dims) or an MLP matrix.
pub fn largest_tensor(config: &ModelConfig) -> (&'static str, [usize; 2]) {
    if config.vocab_size >= config.intermediate_size {
        ("model.embed_tokens.weight", [config.vocab_size, config.hidden_size])
    } else {
        ("model.layers.0.mlp.up_proj.weight", [config.intermediate_size, config.hidden_size])
    }
}

impl MemoryPlan {
    pub fn new(config: &ModelConfig, options: &PlanOptions) -> Self {
        let parameters = config.num_parameters();
        let layers = config.num_hidden_layers as u64;
        let hidden = config.hidden_size as u64;
        let vocab = config.vocab_size as u64;
        let heads = config.num_attention_heads as u64;
        let intermediate = config.intermediate_size as u64;
        let rows = options.batch_size.max(1) as u64;
        let seq = options.seq_len as u64;
        let tokens = rows * seq;
        let e = dtype_bytes(options.compute_dtype);
        let mixed = options.compute_dtype != DType::F32;
        // f32 compute on flex: the norms and the loss's rows run as host passes
        // that keep and copy less (ops/host.rs and its callers).
        let host_f32 = options.flex && !mixed;
        let all_targets: Vec<String> = TARGETS.iter().map(|t| t.to_string()).collect();
        let lora = options.lora_rank.map(|rank| layers * lora_per_layer(config, rank as u64, options.lora_targets.as_ref().unwrap_or(&all_targets)));
        let trainable = lora.unwrap_or(parameters);
        let mut items = Vec::new();
        let mut item = |name: &'static str, phase: Phase, bytes: u64, detail: String| items.push(PlanItem { name, phase, bytes, detail });

        let devices = options.devices.max(1) as u64;
        // A sharded optimizer's shares are balanced to within one parameter.
        let sharded = options.shard_optimizer && devices > 1;
        // The first device takes the largest parameter whole (the embeddings of a full run).
        let largest_trainable = if lora.is_some() || options.average_share { 0 } else { largest_parameter(config) };
        let owned = if sharded { trainable.div_ceil(devices).max(largest_trainable).min(trainable) } else { trainable };
        // Sharded mixed precision: f32 master weights for this device's share only.
        let narrowed = if sharded && mixed { trainable - owned } else { 0 };
        let base = if lora.is_some() { options.base } else { BaseStorage::Full };
        let adapters = lora.unwrap_or(0);
        let projections = layers * projection_parameters(config);
        match base {
            BaseStorage::Full if narrowed > 0 => {
                item(
                    "weights",
                    Phase::Always,
                    4 * (parameters + adapters - narrowed) + e * narrowed,
                    format!("this device's 1/{devices} of the trained weights in f32 (its master weights), the others in {:?}", options.compute_dtype),
                );
                item("compute copy", Phase::Always, e * (parameters + adapters - narrowed), format!("the f32 weights cast to {:?}", options.compute_dtype));
            }
            BaseStorage::Full => {
                item("weights", Phase::Always, 4 * parameters + 4 * adapters, format!("{} parameters in f32", crate::info::human_count(parameters)));
                if mixed {
                    item("compute copy", Phase::Always, e * (parameters + adapters), format!("every weight cast to {:?} for the forward and backward passes", options.compute_dtype));
                }
            }
            BaseStorage::Compute => {
                item("weights", Phase::Always, e * parameters + 4 * adapters, format!("the frozen base in {:?}, the adapters in f32", options.compute_dtype));
            }
            BaseStorage::Quantized { bits } => {
                let (value_bytes, scale_bytes) = quantized_bytes(bits, e);
                let quantized = (projections as f64 * (value_bytes + scale_bytes)) as u64;
                item(
                    "weights",
                    Phase::Always,
                    quantized + e * (parameters - projections) + 4 * adapters,
                    format!(
                        "{} projection weights in {bits} bits ({:.3} bytes a value with its block scale), the rest in {:?}, the adapters in f32",
                        crate::info::human_count(projections), value_bytes + scale_bytes, options.compute_dtype
                    ),
                );
            }
        }
        if mixed && base != BaseStorage::Full {
            item("compute copy", Phase::Always, e * adapters, format!("the adapters cast to {:?}", options.compute_dtype));
        }
        if owned == trainable {
            item("optimizer moments", Phase::Always, 8 * owned, "AdamW's two f32 moments per trainable parameter".into());
        } else {
            item("optimizer moments", Phase::Always, 8 * owned, format!("AdamW's two f32 moments of this device's 1/{devices} of the trainable parameters"));
        }
        item("runtime", Phase::Always, options.runtime_bytes.unwrap_or(RUNTIME_BYTES), "the process itself (code, tokenizer, data index)".into());

        // Kept for the backward pass: every layer's activations, or under checkpointing each
        // layer's input; and outside the layers the embeddings' output and the final norm's
        // input, x / rms and output.
        let per_layer = tokens * (kept_per_token(config, host_f32) * e + 4 * heads);
        let outside = tokens * hidden * e * 4;
        let layer_input = tokens * hidden * e;
        // Offloading implies checkpointing, as `distill train` runs it.
        let checkpointing = options.gradient_checkpointing || options.activation_offloading;
        let offloaded = options.activation_offloading && !options.flex;
        let (activations, detail) = match (checkpointing, offloaded) {
            (true, true) => {
                item("offloaded", Phase::Host, layers * layer_input, format!("each of {layers} layers' input, in host memory"));
                (outside, "outside the layers; their inputs wait in host memory".to_string())
            }
            (true, false) => (layers * layer_input + outside, format!("each of {layers} layers' input")),
            (false, _) => (layers * per_layer + outside, format!("what {layers} layers keep for the backward pass")),
        };
        item("activations", Phase::Backward, activations, detail);

        // The loss's gradients, computed in the forward pass a chunk of positions at a time.
        let output_trained = lora.is_none();
        let loss_state = tokens * hidden * e + if output_trained { 4 * vocab * hidden } else { 0 };
        item(
            "loss gradients",
            Phase::Backward,
            loss_state,
            format!("of the hidden states{}, held from the loss to the backward pass", if output_trained { " and of lm_head" } else { "" }),
        );
        // The largest transient: one chunk's f32 logits and their softmax gradient (end of the
        // forward pass), or a query block's probabilities, their gradient and the score gradient
        // with the layer's MLP gradients (backward pass), or one layer recomputed.
        let chunk = (chunk_rows(config.vocab_size) as u64).min(tokens.max(1));
        // Under mixed precision the chunk's logits and their gradient also pass through the
        // compute dtype on their way to and from f32 (and flex's bf16 product makes an f32
        // copy of its own). In f32 on flex the softmax gradient is written over the logits
        // (ops/cross_entropy.rs, `rows_on_host`).
        let logit_copies = if host_f32 { 4 } else { 8 };
        let loss_chunk = (logit_copies + if mixed { e } else { 0 }) * chunk * vocab + if output_trained { 4 * vocab * hidden } else { 0 };
        let layer_gradients = tokens * (2 * intermediate + 2 * hidden) * e;
        let (attention_block, attention_what) = if options.flex {
            // The fused kernel (ops/attention_host.rs) works on f32 host copies: q, k, v, the
            // output and its gradient in, dQ, dK, dV out, and dK, dV of every query head before
            // their sums over the group; its tiles are 256 KiB each, one to two per thread.
            let q_values = tokens * (config.num_attention_heads * config.head_dim) as u64;
            let kv_values = tokens * (config.num_key_value_heads * config.head_dim) as u64;
            let what = "the fused attention's f32 copies of q, k, v, the output and their gradients, and a layer's gradients";
            (4 * (6 * q_values + 4 * kv_values) + layer_gradients, what.to_string())
        } else {
            let block = block_size(options.batch_size.max(1), config.num_attention_heads, options.seq_len.max(1)) as u64;
            (3 * rows * heads * block * seq * 4 + layer_gradients, format!("an attention block of {block} queries × {seq} keys and a layer's gradients"))
        };
        // Offloaded, the layer's input comes back to the device for its recomputation.
        let recomputed = if checkpointing { per_layer + if offloaded { layer_input } else { 0 } } else { 0 };
        // A quantized projection is dequantized for its matmul a slice at a time, whatever else
        // the step holds then: the slice in f32 and its unpacked integers, and on the CubeCL
        // backends a copy in the compute dtype (flex multiplies in f32).
        let dequantized = match base {
            BaseStorage::Quantized { .. } => {
                let slice = (intermediate * hidden).min(crate::ops::quantized::SLICE_VALUES as u64);
                (8 + if mixed && !options.flex { e } else { 0 }) * slice
            }
            _ => 0,
        };
        let loss_what = format!("{chunk} × {vocab} f32 logits and their gradient");
        item("attention", Phase::Transient, attention_block, attention_what.clone());
        item("loss", Phase::Transient, loss_chunk, format!("one chunk of positions at a time: {loss_what}"));
        let (workspace, what) = [(loss_chunk, loss_what), (attention_block, attention_what), (recomputed, "one layer recomputed".to_string())]
            .into_iter()
            .max_by_key(|(bytes, _)| *bytes)
            .expect("three candidates");
        let what = if dequantized > 0 { format!("{what}, with a projection dequantized") } else { what };
        item("workspace", Phase::Backward, workspace + dequantized, format!("the largest transient: {what}"));
        if devices > 1 {
            let share = if sharded { format!(" (1/{devices})") } else { String::new() };
            item("gradient sum", Phase::Always, 4 * owned, format!("the step's sum of the gradients of the parameters this device updates{share}, in f32"));
        } else if options.gradient_accumulation_steps > 1 {
            item("gradient sum", Phase::Always, 4 * trainable, "the running sum of a step's micro-batches' gradients, in f32".into());
        }
        let gradients = 4 * (trainable - narrowed) + e * narrowed + if mixed { e * largest_parameter(config) } else { 0 };
        item("gradients", Phase::Optimizer, gradients, format!("one backward pass's: {} trainable parameters{}", crate::info::human_count(trainable), if narrowed > 0 { format!(", those of the other devices' shares in {:?}", options.compute_dtype) } else { " in f32".into() }));
        if devices > 1 {
            item("gradient reduction", Phase::Optimizer, 4 * owned, "the other devices' gradients of the parameters this device updates, as they arrive".into());
        }
        let largest = if lora.is_some() { 0 } else { largest_parameter(config) };
        // On flex the step is one in-place pass (train/optim.rs, `step_on_host`).
        if !options.flex {
            item("optimizer step", Phase::Optimizer, 2 * 4 * largest, "two temporaries of the largest parameter's size".into());
        }
        MemoryPlan { parameters, trainable_parameters: trainable, items }
    }

    fn phase(&self, phase: Phase) -> u64 {
        self.items.iter().filter(|i| i.phase == phase).map(|i| i.bytes).sum()
    }

    /// What the run keeps in host memory besides the device's (offloaded activations).
    pub fn host_bytes(&self) -> u64 {
        self.phase(Phase::Host)
    }

    /// The peak: what is always held, plus the larger of the backward and optimizer phases
    /// (the optimizer step runs after the backward pass has freed the activations).
    pub fn total(&self) -> u64 {
        self.phase(Phase::Always) + self.phase(Phase::Backward).max(self.phase(Phase::Optimizer))
    }

    /// What `replicas` devices of this plan need when they share one host's memory (data
    /// parallel on flex): the process once, the rest once per replica. The replicas run the
    /// same passes over equal micro-batches side by side, so their largest transients coincide
    /// (measured: two replicas peaked a whole workspace above the plan that counted it once).
    pub fn host_total(&self, replicas: u64) -> u64 {
        let once: u64 = self.items.iter().filter(|i| i.name == "runtime").map(|i| i.bytes).sum();
        once + replicas.max(1) * self.total().saturating_sub(once)
    }

    /// The plan as aligned lines: item, GiB, how it is made; then the total.
    pub fn table(&self) -> String {
        let mut lines: Vec<String> = self
            .items
            .iter()
            .map(|i| {
                let when = match i.phase {
                    Phase::Always => "",
                    Phase::Backward => " [backward]",
                    Phase::Optimizer => " [optimizer step]",
                    Phase::Host => " [host memory, not counted below]",
                    Phase::Transient => " [backward; in the workspace when the largest]",
                };
                format!("{:<18} {:>9.2} GiB  {}{when}", i.name, crate::info::gib(i.bytes), i.detail)
            })
            .collect();
        let peak = if self.phase(Phase::Backward) >= self.phase(Phase::Optimizer) { "backward" } else { "optimizer step" };
        lines.push(format!("{:<18} {:>9.2} GiB  at the {peak}, the larger phase", "total", crate::info::gib(self.total())));
        lines.join("\n")
    }
}

/// One way to train a student, with the memory one device needs for it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Route {
    pub name: String,
    /// The `distill train` flags that choose it.
    pub flags: String,
    pub bytes_per_device: u64,
}

/// The routes `distill info` weighs for `devices` devices of `options`' length, batch, dtype
/// and checkpointing: full fine-tuning, with the optimizer sharded (several devices), LoRA
/// (over the base in the compute dtype under mixed precision) and QLoRA, LoRA at
/// `lora_rank` (its targets as `options` says); then each again with the checkpointed layer
/// inputs offloaded to host memory, which costs transfers and so comes after.
pub fn routes(config: &ModelConfig, options: &PlanOptions, devices: usize, lora_rank: usize) -> Vec<Route> {
    let devices = devices.max(1);
    let mixed = options.compute_dtype != DType::F32;
    let plan = |lora: bool, shard: bool, base: BaseStorage, offload: bool| {
        let options = PlanOptions {
            lora_rank: lora.then_some(lora_rank),
            devices,
            shard_optimizer: shard,
            base,
            activation_offloading: offload,
            ..options.clone()
        };
        MemoryPlan::new(config, &options).total()
    };
    let lora_base = if mixed { BaseStorage::Compute } else { BaseStorage::Full };
    let mut kinds = vec![("full".to_string(), vec![], false, false, BaseStorage::Full)];
    if devices > 1 {
        kinds.push(("full + sharded optimizer".into(), vec!["--shard-optimizer".to_string()], false, true, BaseStorage::Full));
    }
    kinds.push((format!("LoRA rank {lora_rank}"), vec![format!("--lora-rank {lora_rank}")], true, false, lora_base));
    kinds.push((format!("QLoRA rank {lora_rank} (4-bit base)"), vec![format!("--lora-rank {lora_rank} --load-in-4bit")], true, false, BaseStorage::Quantized { bits: 4 }));
    let mut routes = Vec::new();
    for offload in [false, true] {
        for (name, flags, lora, shard, base) in &kinds {
            let mut flags = flags.clone();
            if devices > 1 {
                flags.insert(0, format!("--devices <{devices} devices>"));
            }
            let name = if offload {
                flags.push("--activation-offloading".into());
                format!("{name} + activation offloading")
            } else {
                name.clone()
            };
            routes.push(Route { name, flags: flags.join(" "), bytes_per_device: plan(*lora, *shard, *base, offload) });
        }
    }
    routes
}

/// When no route fits `memory` at `options`' length and batch: the first route that does with
/// one row per device, at the longest length (halving from `options.seq_len`, not below 1024)
/// where one does. Returns that length with the route.
pub fn route_that_fits(config: &ModelConfig, options: &PlanOptions, devices: usize, lora_rank: usize, memory: u64) -> Option<(usize, usize, Route)> {
    let mut seq_len = options.seq_len;
    let mut batch_size = options.batch_size.max(1);
    loop {
        let candidate = PlanOptions { seq_len, batch_size, ..options.clone() };
        if let Some(route) = routes(config, &candidate, devices, lora_rank).into_iter().find(|r| r.bytes_per_device <= memory) {
            return Some((seq_len, batch_size, route));
        }
        if batch_size > 1 {
            batch_size = 1;
        } else if seq_len / 2 >= 1024 {
            seq_len /= 2;
        } else {
            return None;
        }
    }
}
