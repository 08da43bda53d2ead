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

use crate::model::ModelConfig;
use crate::model::lora::TARGETS;
use crate::ops::attention::block_size;
use crate::ops::cross_entropy::chunk_rows;

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
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanItem {
    pub name: &'static str,
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
fn kept_per_token(config: &ModelConfig) -> u64 {
    let hidden = config.hidden_size as u64;
    let q = (config.num_attention_heads * config.head_dim) as u64;
    let kv = (config.num_key_value_heads * config.head_dim) as u64;
    let intermediate = config.intermediate_size as u64;
    // Two RMSNorms (input, x / rms, normed output) = 6 × hidden; attention: q and k after RoPE,
    // v, the context (shared with o_proj's input) = 2q + 2kv; SwiGLU: gate, sigmoid(gate),
    // silu(gate), up and the product = 5 × intermediate.
    6 * hidden + 2 * q + 2 * kv + 5 * intermediate
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

impl MemoryPlan {
    pub fn new(config: &ModelConfig, options: &PlanOptions) -> Self {
        let parameters = config.num_parameters();
        let layers = config.num_hidden_layers as u64;
        let hidden = config.hidden_size as u64;
        let vocab = config.vocab_size as u64;
        let heads = config.num_attention_heads as u64;
        let rows = options.batch_size.max(1) as u64;
        let seq = options.seq_len as u64;
        let tokens = rows * seq;
        let e = dtype_bytes(options.compute_dtype);
        let mixed = options.compute_dtype != DType::F32;
        let all_targets: Vec<String> = TARGETS.iter().map(|t| t.to_string()).collect();
        let lora = options.lora_rank.map(|rank| layers * lora_per_layer(config, rank as u64, options.lora_targets.as_ref().unwrap_or(&all_targets)));
        let trainable = lora.unwrap_or(parameters);
        let mut items = Vec::new();
        let mut item = |name: &'static str, bytes: u64, detail: String| items.push(PlanItem { name, bytes, detail });

        item("weights", 4 * parameters + 4 * lora.unwrap_or(0), format!("{} parameters in f32", crate::info::human_count(parameters)));
        if mixed {
            item("compute copy", e * (parameters + lora.unwrap_or(0)), format!("every weight cast to {:?} for the forward and backward passes", options.compute_dtype));
        }
        let accumulating = options.gradient_accumulation_steps > 1;
        item(
            "gradients",
            4 * trainable * if accumulating { 2 } else { 1 } + if mixed { e * trainable } else { 0 },
            format!(
                "{} trainable parameters in f32{}{}",
                crate::info::human_count(trainable),
                if accumulating { ", the running sum and one micro-batch's" } else { "" },
                if mixed { ", arriving in the compute dtype" } else { "" }
            ),
        );
        item("optimizer moments", 8 * trainable, "AdamW's two f32 moments per trainable parameter".into());

        let per_layer = kept_per_token(config) * e + 4 * heads;
        if options.gradient_checkpointing {
            item(
                "activations",
                tokens * (layers * hidden * e + per_layer),
                format!("each layer's input ({} layers) and one layer recomputed at a time", layers),
            );
        } else {
            item("activations", tokens * layers * per_layer, format!("what {layers} layers keep for the backward pass"));
        }
        // Outside the layers: embeddings out, the final norm (input, x / rms, output).
        let outside = tokens * hidden * e * 4;
        let output_trained = lora.is_none();
        let loss_state = tokens * hidden * e + if output_trained { 4 * vocab * hidden } else { 0 };
        let chunk = chunk_rows(config.vocab_size).min(options.seq_len.max(1)) as u64;
        item(
            "loss",
            outside + loss_state + chunk * vocab * 4 * 3,
            format!("final norm, the hidden states' gradient{}, and {chunk} × {vocab} f32 logits at a time", if output_trained { " and lm_head's" } else { "" }),
        );
        let block = block_size(options.batch_size.max(1), config.num_attention_heads, options.seq_len.max(1)) as u64;
        let scores = rows * heads * block * seq * 4;
        // The backward pass of a query block holds its scores, probabilities and their
        // gradients at once; a layer's backward also holds its input and MLP gradients.
        let intermediate = config.intermediate_size as u64;
        let workspace = 4 * scores + tokens * (2 * intermediate + 4 * hidden) * e;
        item("workspace", workspace, format!("the largest transient: an attention block of {block} queries × {seq} keys, a layer's gradients"));
        item("runtime", options.runtime_bytes.unwrap_or(RUNTIME_BYTES), "the process itself (code, tokenizer, data index)".into());
        MemoryPlan { parameters, trainable_parameters: trainable, items }
    }

    pub fn total(&self) -> u64 {
        self.items.iter().map(|i| i.bytes).sum()
    }

    /// The plan as aligned lines: item, GiB, how it is made; then the total.
    pub fn table(&self) -> String {
        let mut lines: Vec<String> = self
            .items
            .iter()
            .map(|i| format!("{:<18} {:>9.2} GiB  {}", i.name, crate::info::gib(i.bytes), i.detail))
            .collect();
        lines.push(format!("{:<18} {:>9.2} GiB", "total", crate::info::gib(self.total())));
        lines.join("\n")
    }
}
