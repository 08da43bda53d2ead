//! The command-line arguments of `distill`, each with the help it prints.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use distill::model::LoadOptions;
use distill::train::options::TrainingOptions;

#[derive(Args)]
pub struct DeviceArgs {
    /// flex (pure-Rust CPU), wgpu, vulkan, metal, webgpu, cuda[:N] or rocm[:N]; default: the
    /// best compiled-in GPU backend, else flex.
    #[arg(long)]
    pub device: Option<String>,
    /// Compute dtype: f32 everywhere; bf16 on cuda, metal and flex; f16 on GPUs.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    pub dtype: String,
}

impl DeviceArgs {
    pub fn resolve(&self) -> Result<(distill::burn::tensor::Device, LoadOptions)> {
        let (device, name) = distill::device::select(self.device.as_deref())?;
        let dtype = distill::device::dtype(&self.dtype, &device, &name)?;
        Ok((device, LoadOptions::in_dtype(dtype)))
    }
}

#[derive(Args)]
pub struct InfoArgs {
    /// A student config (student_configs/*.toml), an HF checkpoint folder, or a config.json.
    pub config: PathBuf,
    /// Tokens per row; default: the student config's max_length, else 4096.
    #[arg(long, visible_alias = "seq-len")]
    pub max_length: Option<usize>,
    /// Rows per forward pass; default: the student config's, else 1.
    #[arg(long, visible_alias = "batch-size")]
    pub per_device_train_batch_size: Option<usize>,
    /// Micro-batches per optimizer step (above one, the plan holds their running gradient
    /// sum); default: the student config's, else 1.
    #[arg(long)]
    pub gradient_accumulation_steps: Option<usize>,
    /// Plan LoRA adapters of this rank (on every linear layer unless --lora-targets).
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// Comma-separated projections the adapters go on (q_proj, k_proj, v_proj, o_proj,
    /// gate_proj, up_proj, down_proj), or all-linear (the default).
    #[arg(long)]
    pub lora_targets: Option<String>,
    /// Compute dtype: f32, or bf16 / f16 over f32 master weights; default: the student config's.
    #[arg(long, value_parser = ["f32", "bf16", "f16"])]
    pub dtype: Option<String>,
    /// Layer-level activation checkpointing; default: the student config's.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub gradient_checkpointing: Option<bool>,
    /// Plan the checkpointed layer inputs in host memory (implies --gradient-checkpointing).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub activation_offloading: Option<bool>,
    /// Say whether the plan fits this much device memory (80GB, 24GiB).
    #[arg(long)]
    pub gpu_memory: Option<String>,
    /// Devices of a data-parallel run (`distill train --devices`); the plan is per device.
    #[arg(long, default_value_t = 1)]
    pub devices: usize,
    /// Plan the optimizer sharded over --devices (ZeRO stage 2).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub shard_optimizer: Option<bool>,
    /// Plan QLoRA: the frozen base's projections in 4 bits (needs --lora-rank).
    #[arg(long, requires = "lora_rank")]
    pub load_in_4bit: bool,
    /// Plan LoRA over an 8-bit base.
    #[arg(long, requires = "lora_rank", conflicts_with = "load_in_4bit")]
    pub load_in_8bit: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct EvalArgs {
    /// HF checkpoint folder.
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL or Parquet (file, folder of shards or glob) with a `text` or `messages` column.
    #[arg(long)]
    pub data: PathBuf,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Print {mean_nll, total_tokens, rows: [{nll, tokens}]} as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("input").required(true)))]
pub struct GenerateArgs {
    /// HF checkpoint folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Raw text, encoded with the tokenizer's own special tokens (no chat template).
    #[arg(long, group = "input")]
    pub prompt: Option<String>,
    /// One user turn, rendered with the chat template and its generation prompt (as the
    /// student saw its training prompts).
    #[arg(long, group = "input")]
    pub chat: Option<String>,
    /// JSON file with a list of {role, content} messages, rendered with the chat template
    /// and its generation prompt.
    #[arg(long, group = "input")]
    pub messages: Option<PathBuf>,
    /// Stop after this many generated tokens (or at an end-of-sequence token).
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy. R1's recommendation is 0.6.
    #[arg(long, default_value_t = 0.6)]
    pub temperature: f32,
    /// Nucleus sampling mass. R1's recommendation is 0.95.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Seed of the sampler (with --temperature above 0).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Args)]
#[command(after_long_help = TrainingOptions::defaults_help())]
pub struct TrainArgs {
    /// An HF checkpoint folder, or a student config (student_configs/*.toml) whose `checkpoint`
    /// names the downloaded base model; its [training] table sets options not given here.
    #[arg(long)]
    pub model: PathBuf,
    /// Traces: JSONL or Parquet (file, folder of shards or glob) with a `messages` column, or
    /// the columns named by --prompt-field / --response-field.
    #[arg(long)]
    pub data: PathBuf,
    /// Run folder: metrics.jsonl, checkpoints and the exported model in final/. Must not exist
    /// yet (or hold a run to --resume).
    #[arg(long)]
    pub out: PathBuf,
    /// `pretrained` starts from the checkpoint's weights; `random` builds the architecture from
    /// scratch (tiny configs, tests, demos).
    #[arg(long, default_value = "pretrained", value_parser = ["pretrained", "random"])]
    pub init: String,
    /// Column with the list of {role, content} messages.
    #[arg(long, default_value = "messages")]
    pub messages_field: String,
    /// Prompt column (with --response-field), e.g. `problem`.
    #[arg(long, requires = "response_field")]
    pub prompt_field: Option<String>,
    /// Response column, e.g. `generated_solution` (kept whole, `<think>` included).
    #[arg(long, requires = "prompt_field")]
    pub response_field: Option<String>,
    #[command(flatten)]
    pub options: TrainingOptions,
    /// Shorthand for --dtype bf16.
    #[arg(long, conflicts_with = "dtype")]
    pub bf16: bool,
    /// Continue the run in --out from its newest checkpoint, with the same settings.
    #[arg(long)]
    pub resume: bool,
    /// Hold out this fraction of the rows (chosen by --seed) to measure eval loss on.
    #[arg(long, conflicts_with = "eval_data")]
    pub eval_split: Option<f64>,
    /// Separate eval rows (same format as --data).
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// flex (pure-Rust CPU), wgpu, vulkan, metal, webgpu, cuda[:N] or rocm[:N]; default: the
    /// best compiled-in GPU backend, else flex.
    #[arg(long)]
    pub device: Option<String>,
    /// Data parallel over these devices, comma-separated (cuda:0,cuda:1,cuda:2,cuda:3; mixed
    /// backends such as flex,wgpu work too): each device runs its own micro-batches and the
    /// gradients are summed before one optimizer step. The global batch is devices ×
    /// --per-device-train-batch-size × --gradient-accumulation-steps, as in accelerate; a run
    /// may resume on another number of devices with the same per-device and global batch.
    #[arg(long, value_delimiter = ',', conflicts_with = "device")]
    pub devices: Vec<String>,
    /// The device's memory (80GB, 24GiB; both read as GiB) to check the memory plan against;
    /// default: the system's available memory on flex, no check on GPUs (burn does not report
    /// their memory).
    #[arg(long, visible_alias = "device-memory")]
    pub gpu_memory: Option<String>,
    /// Where tokenized data is cached (default: $DISTILL_CACHE, else ~/.cache/r1-distill).
    #[arg(long)]
    pub dataset_cache: Option<PathBuf>,
}

#[derive(Args)]
pub struct ExportArgs {
    /// Run folder written by `distill train`.
    #[arg(long)]
    pub run: PathBuf,
    /// Checkpoint step to export; default: the newest.
    #[arg(long)]
    pub step: Option<usize>,
    /// Destination folder (must not exist or be empty).
    #[arg(long)]
    pub out: PathBuf,
    /// Dtype of the written weights (HF checkpoints of the R1-Distill family are bf16).
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f16", "f32"])]
    pub dtype: String,
    /// Largest safetensors shard, as transformers spells it (5GB, 500MB).
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
    /// Device that reads the checkpoint (flex by default; the weights only pass through).
    #[arg(long)]
    pub device: Option<String>,
}

#[derive(Args)]
pub struct PlotArgs {
    /// Run folder written by `distill train` (its metrics.jsonl is read).
    pub run: PathBuf,
    /// Where to write the PNG; default RUN_DIR/loss.png.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Image size in pixels, WIDTHxHEIGHT.
    #[arg(long, default_value = "1000x700")]
    pub size: String,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Prefill and decode tokens/s of a ~100M-parameter model (random weights).
    Forward(BenchForwardArgs),
    /// Training tokens/s and peak memory of a model (random weights; bench-100m by default) per
    /// sequence length, beside its memory plan: forward, backward and AdamW step on
    /// --per-device-train-batch-size rows.
    Train(BenchTrainArgs),
    /// The attention operation alone, forward and backward, at a model's attention shape: seconds
    /// and GFLOP/s per sequence length (causal, one row), beside PyTorch's SDPA given
    /// --reference.
    Attention(BenchAttentionArgs),
    /// Generation tokens/s of a batch of prompts of different lengths: continuous batching
    /// against the same sequences one at a time (and, given --reference, transformers'
    /// batched `generate`).
    Generate(BenchGenerateArgs),
}

#[derive(Args)]
pub struct BenchGenerateArgs {
    /// Model to time: a student config, HF folder or config.json (random weights).
    #[arg(long, default_value = "student_configs/bench-100m.toml")]
    pub config: PathBuf,
    /// Sequences generated together.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// The longest prompt; the others spread down to half of it (left padding is exercised).
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    /// Tokens generated for every sequence (no end-of-sequence stop).
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// A command that runs the same batch through transformers' `generate` and prints one JSON
    /// line {"tokens_per_s": …}; e.g.
    /// `.venv/bin/python distill/benches/reference_generate.py --threads 2`.
    #[arg(long)]
    pub reference: Option<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Args)]
pub struct BenchForwardArgs {
    /// Model to time: a student config, HF folder or config.json (random weights).
    #[arg(long, default_value = "student_configs/bench-100m.toml")]
    pub config: PathBuf,
    /// Tokens of the timed prefill.
    #[arg(long, default_value_t = 512)]
    pub prompt_len: usize,
    /// Tokens decoded one at a time after it (KV cache).
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    /// Timed repetitions (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// A command that runs the same measurement in PyTorch and prints one JSON line
    /// {"prefill_tokens_per_s": …, "decode_tokens_per_s": …}; e.g.
    /// `.venv/bin/python distill/benches/reference_forward.py --threads 2`.
    #[arg(long)]
    pub reference: Option<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Args)]
pub struct BenchAttentionArgs {
    /// Model whose attention shape (heads, KV heads, head_dim) to time: a student config, HF
    /// folder or config.json.
    #[arg(long, default_value = "student_configs/bench-100m.toml")]
    pub config: PathBuf,
    /// Sequence lengths, comma-separated.
    #[arg(long, default_value = "4096,16384", value_delimiter = ',')]
    pub seq_len: Vec<usize>,
    /// Timed repetitions per length (after one warm-up); the median is printed.
    #[arg(long, default_value_t = 2)]
    pub repeats: usize,
    /// A command that times the same shapes with PyTorch's scaled_dot_product_attention and
    /// prints one JSON line {"forward_s": […], "backward_s": […]} (one entry per length); e.g.
    /// `.venv/bin/python distill/benches/reference_attention.py --threads 2`.
    #[arg(long)]
    pub reference: Option<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Args)]
pub struct BenchTrainArgs {
    /// Model to train: a student config, HF folder or config.json (random weights).
    #[arg(long, default_value = "student_configs/bench-100m.toml")]
    pub config: PathBuf,
    /// Sequence lengths to measure, comma-separated; each is measured from a fresh model
    /// with the process's peak reset, so each figure is that length's own.
    #[arg(long, default_value = "1024,4096", value_delimiter = ',')]
    pub seq_len: Vec<usize>,
    /// Timed optimizer steps per length (after the warm-up steps).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Untimed steps first per length (kernel compilation and autotuning on a GPU, the first
    /// allocation of the AdamW moments).
    #[arg(long, default_value_t = 1)]
    pub warmup_steps: usize,
    /// Rows per step.
    #[arg(long, default_value_t = 1)]
    pub per_device_train_batch_size: usize,
    /// Compute in bf16 over f32 master weights (the reference autocasts to bf16); refused on
    /// a device without bf16 (WGSL).
    #[arg(long)]
    pub bf16: bool,
    /// Keep only each decoder layer's input and recompute the layer in the backward pass (the
    /// reference calls gradient_checkpointing_enable()).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Keep the checkpointed layer inputs in host memory (implies --gradient-checkpointing).
    #[arg(long)]
    pub activation_offloading: bool,
    /// Train LoRA adapters of this rank on every linear layer instead of every weight.
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// With --lora-rank: the frozen base's projections in 4 bits (QLoRA).
    #[arg(long, requires = "lora_rank", conflicts_with = "load_in_8bit")]
    pub load_in_4bit: bool,
    /// With --lora-rank: the frozen base's projections in 8 bits.
    #[arg(long, requires = "lora_rank")]
    pub load_in_8bit: bool,
    /// A command that runs the same measurement in PyTorch for one length and prints one JSON
    /// line {"tokens_per_s": …, "peak_memory_bytes": …}; it is run once per length (its own
    /// process, so its peak is that length's); e.g.
    /// `.venv/bin/python distill/benches/reference_train.py --threads 2`.
    #[arg(long, conflicts_with = "devices")]
    pub reference: Option<String>,
    /// The device to measure: flex, wgpu, vulkan, metal, webgpu, cuda[:N], rocm[:N] (default: a
    /// compiled-in CUDA, ROCm or Metal device, else flex).
    #[arg(long, conflicts_with = "devices")]
    pub device: Option<String>,
    /// Measure data parallelism: tokens/s on the first of these devices alone, then on all of
    /// them (each with --per-device-train-batch-size rows), and the scaling efficiency.
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
    /// With --devices: shard the optimizer over them (ZeRO stage 2).
    #[arg(long)]
    pub shard_optimizer: bool,
    /// The device's peak rate in TFLOP/s for the compute dtype (e.g. 989 for an H100/H200 in
    /// bf16, 67 in f32 without tensor cores): adds the model FLOPs utilisation (MFU).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Print one JSON object per length (with the memory plan) instead of the table.
    #[arg(long)]
    pub json: bool,
}
