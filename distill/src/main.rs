//! `distill`: run, score and measure Qwen2 / Llama-3 students of the R1 distillation.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use distill::benchmark::run_reference;
use distill::burn::tensor::DType;
use distill::data::records::read_records;
use distill::eval::{Example, evaluate};
use distill::generate::{FinishReason, SamplingParams, TextStream, generate};
use distill::info::{estimate, gib, human_count};
use distill::model::LoadOptions;
use distill::pretrained::Pretrained;
use distill::student::model_config_from_any;
use distill::text::Message;

#[derive(Parser)]
#[command(
    name = "distill",
    version,
    about = "Distil reasoning into Qwen2 / Llama-3 students: run, score and measure HF checkpoints with burn",
    long_about = "Distil reasoning into Qwen2 / Llama-3 students (the DeepSeek-R1-Distill recipe).\n\n\
        Checkpoints are Hugging Face folders (config.json, *.safetensors, tokenizer.json,\n\
        tokenizer_config.json); student_configs/ holds one config per R1 student.\n\n\
        Examples:\n  \
        distill info student_configs/qwen2.5-math-1.5b.toml --seq-len 32768\n  \
        distill eval --model tests/fixtures/tiny-qwen2 --data tests/fixtures/eval_rows.jsonl\n  \
        distill generate --model tests/fixtures/tiny-qwen2 --prompt 'What is 7 times 6?' --temperature 0"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parameter count and memory needed for inference and for full / LoRA training.
    Info(InfoArgs),
    /// Mean negative log-likelihood per token of a dataset (lower is better).
    Eval(EvalArgs),
    /// Generate text from a prompt or a conversation, streamed to stdout.
    Generate(GenerateArgs),
    /// Fine-tune a student on reasoning traces (SFT) and export it as an HF checkpoint.
    Train(TrainArgs),
    /// Write a training run's checkpoint as a Hugging Face checkpoint folder.
    Export(ExportArgs),
    /// Draw a run's train / eval loss and learning rate as a PNG (RUN_DIR/loss.png by default).
    Plot(PlotArgs),
    /// Speed measurements (benchmarks, not tests).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Args)]
struct DeviceArgs {
    /// flex (pure-Rust CPU), wgpu, vulkan, metal, webgpu, cuda[:N] or rocm[:N]; default: the
    /// best compiled-in GPU backend, else flex.
    #[arg(long)]
    device: Option<String>,
    /// Compute dtype: f32 everywhere; bf16 on cuda, metal and flex; f16 on GPUs.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    dtype: String,
}

impl DeviceArgs {
    fn resolve(&self) -> Result<(distill::burn::tensor::Device, LoadOptions)> {
        let (device, name) = distill::device::select(self.device.as_deref())?;
        let dtype = distill::device::dtype(&self.dtype, &device, &name)?;
        Ok((device, LoadOptions { dtype }))
    }
}

#[derive(Args)]
struct InfoArgs {
    /// A student config (student_configs/*.toml), an HF checkpoint folder, or a config.json.
    config: PathBuf,
    /// Sequence length for the memory estimates.
    #[arg(long, default_value_t = 4096)]
    seq_len: usize,
    /// Sequences per device for the memory estimates.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// LoRA rank for the LoRA estimate (adapters on every linear layer).
    #[arg(long, default_value_t = 16)]
    lora_rank: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct EvalArgs {
    /// HF checkpoint folder.
    #[arg(long)]
    model: PathBuf,
    /// JSONL or Parquet (file, folder of shards or glob) with a `text` or `messages` column.
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    device: DeviceArgs,
    /// Print {mean_nll, total_tokens, rows: [{nll, tokens}]} as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("input").required(true)))]
struct GenerateArgs {
    /// HF checkpoint folder.
    #[arg(long)]
    model: PathBuf,
    /// Raw text, encoded with the tokenizer's own special tokens (no chat template).
    #[arg(long, group = "input")]
    prompt: Option<String>,
    /// One user turn, rendered with the chat template and its generation prompt (as the
    /// student saw its training prompts).
    #[arg(long, group = "input")]
    chat: Option<String>,
    /// JSON file with a list of {role, content} messages, rendered with the chat template
    /// and its generation prompt.
    #[arg(long, group = "input")]
    messages: Option<PathBuf>,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy. R1's recommendation is 0.6.
    #[arg(long, default_value_t = 0.6)]
    temperature: f32,
    /// Nucleus sampling mass. R1's recommendation is 0.95.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
struct TrainArgs {
    /// An HF checkpoint folder, or a student config (student_configs/*.toml) whose `checkpoint`
    /// names the downloaded base model; its [training] table gives the defaults below.
    #[arg(long)]
    model: PathBuf,
    /// Traces: JSONL or Parquet (file, folder of shards or glob) with a `messages` column, or
    /// the columns named by --prompt-field / --response-field.
    #[arg(long)]
    data: PathBuf,
    /// Run folder: metrics.jsonl and the exported model in final/. Must not exist yet.
    #[arg(long)]
    out: PathBuf,
    /// `pretrained` starts from the checkpoint's weights; `random` builds the architecture from
    /// scratch (tiny configs, tests, demos).
    #[arg(long, default_value = "pretrained", value_parser = ["pretrained", "random"])]
    init: String,
    /// Column with the list of {role, content} messages.
    #[arg(long, default_value = "messages")]
    messages_field: String,
    /// Prompt column (with --response-field), e.g. `problem`.
    #[arg(long, requires = "response_field")]
    prompt_field: Option<String>,
    /// Response column, e.g. `generated_solution` (kept whole, `<think>` included).
    #[arg(long, requires = "prompt_field")]
    response_field: Option<String>,
    #[arg(long)]
    learning_rate: Option<f64>,
    /// cosine (to --min-lr-ratio), linear or constant, after the warmup.
    #[arg(long)]
    lr_scheduler: Option<String>,
    #[arg(long)]
    min_lr_ratio: Option<f64>,
    #[arg(long)]
    warmup_ratio: Option<f64>,
    #[arg(long)]
    num_train_epochs: Option<f64>,
    /// Optimizer steps; overrides --num-train-epochs.
    #[arg(long)]
    max_steps: Option<usize>,
    /// Longest row in tokens; longer rows are dropped (or cut with --truncate), and counted.
    #[arg(long)]
    max_length: Option<usize>,
    #[arg(long)]
    truncate: bool,
    #[arg(long)]
    per_device_train_batch_size: Option<usize>,
    #[arg(long)]
    gradient_accumulation_steps: Option<usize>,
    /// Global gradient-norm clipping (0 disables).
    #[arg(long)]
    max_grad_norm: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Pack rows into max_length blocks (attention never crosses rows).
    #[arg(long)]
    packing: bool,
    /// Also train on prompt tokens (default: completion-only loss).
    #[arg(long)]
    train_on_prompt: bool,
    /// Mixed precision: forward and backward in bf16 over f32 master weights (cuda, metal,
    /// flex). `--dtype bf16|f16` does the same; `dtype = "bf16"` in a student config turns it on
    /// where the device has bf16.
    #[arg(long)]
    bf16: bool,
    /// Recompute cheap activations in the backward pass instead of storing them (burn's
    /// balanced checkpointing): less memory, more compute.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Train LoRA adapters of this rank instead of every weight (the base stays frozen; the
    /// adapters are merged into the weights on export).
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA scaling numerator (update × alpha / rank); default 2 × rank.
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// Dropout on the adapters' input (PEFT's lora_dropout).
    #[arg(long)]
    lora_dropout: Option<f64>,
    /// Projections to adapt: comma-separated q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,
    /// down_proj, or all-linear.
    #[arg(long)]
    lora_targets: Option<String>,
    /// dtype of the exported weights.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    export_dtype: String,
    /// Write a checkpoint (weights, optimizer state, step) every N optimizer steps; 0: only at the end.
    #[arg(long, default_value_t = 0)]
    save_steps: usize,
    /// Continue the run in --out from its newest checkpoint, with the same settings.
    #[arg(long)]
    resume: bool,
    /// Hold out this fraction of the rows (chosen by --seed) to measure eval loss on.
    #[arg(long, conflicts_with = "eval_data")]
    eval_split: Option<f64>,
    /// Separate eval rows (same format as --data).
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Evaluate every N optimizer steps (and at the end); default: five times over the run.
    #[arg(long)]
    eval_steps: Option<usize>,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
struct ExportArgs {
    /// Run folder written by `distill train`.
    #[arg(long)]
    run: PathBuf,
    /// Checkpoint step to export; default: the newest.
    #[arg(long)]
    step: Option<usize>,
    /// Destination folder (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f16", "f32"])]
    dtype: String,
    /// Largest safetensors shard, as transformers spells it (5GB, 500MB).
    #[arg(long, default_value = "5GB")]
    max_shard_size: String,
    /// Device that reads the checkpoint (flex by default; the weights only pass through).
    #[arg(long)]
    device: Option<String>,
}

#[derive(Args)]
struct PlotArgs {
    /// Run folder written by `distill train` (its metrics.jsonl is read).
    run: PathBuf,
    /// Where to write the PNG; default RUN_DIR/loss.png.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Image size in pixels, WIDTHxHEIGHT.
    #[arg(long, default_value = "1000x700")]
    size: String,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Prefill and decode tokens/s of a ~100M-parameter model (random weights).
    Forward(BenchForwardArgs),
    /// Training tokens/s and peak memory of a ~100M-parameter model (random weights) per
    /// sequence length: forward, backward and AdamW step on one row.
    Train(BenchTrainArgs),
    /// Generation tokens/s of a batch of prompts of different lengths: continuous batching
    /// against the same sequences one at a time (and, given --reference, transformers'
    /// batched `generate`).
    Generate(BenchGenerateArgs),
}

#[derive(Args)]
struct BenchGenerateArgs {
    /// Model to time: a student config, HF folder or config.json (random weights).
    #[arg(long, default_value = "student_configs/bench-100m.toml")]
    config: PathBuf,
    /// Sequences generated together.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// The longest prompt; the others spread down to half of it (left padding is exercised).
    #[arg(long, default_value_t = 64)]
    prompt_len: usize,
    /// Tokens generated for every sequence (no end-of-sequence stop).
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// A command that runs the same batch through transformers' `generate` and prints one JSON
    /// line {"tokens_per_s": …}; e.g.
    /// `.venv/bin/python distill/benches/reference_generate.py --threads 2`.
    #[arg(long)]
    reference: Option<String>,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
struct BenchForwardArgs {
    /// Model to time: a student config, HF folder or config.json (random weights).
    #[arg(long, default_value = "student_configs/bench-100m.toml")]
    config: PathBuf,
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Timed repetitions (after one warm-up).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// A command that runs the same measurement in PyTorch and prints one JSON line
    /// {"prefill_tokens_per_s": …, "decode_tokens_per_s": …}; e.g.
    /// `.venv/bin/python distill/benches/reference_forward.py --threads 2`.
    #[arg(long)]
    reference: Option<String>,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
struct BenchTrainArgs {
    /// Model to train: a student config, HF folder or config.json (random weights).
    #[arg(long, default_value = "student_configs/bench-100m.toml")]
    config: PathBuf,
    /// Sequence lengths to measure, comma-separated, in increasing order (peak memory is the
    /// process's high-water mark, so each length's figure includes the shorter ones).
    #[arg(long, default_value = "1024,4096", value_delimiter = ',')]
    seq_len: Vec<usize>,
    /// Timed optimizer steps per length (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    #[arg(long)]
    bf16: bool,
    #[arg(long)]
    gradient_checkpointing: bool,
    /// A command that runs the same measurement in PyTorch for one length and prints one JSON
    /// line {"tokens_per_s": …, "peak_memory_bytes": …}; it is run once per length (its own
    /// process, so its peak is that length's); e.g.
    /// `.venv/bin/python distill/benches/reference_train.py --threads 2`.
    #[arg(long)]
    reference: Option<String>,
    #[arg(long)]
    device: Option<String>,
}

/// burn's CPU backend allocates and frees activation-sized buffers (logits over a 152k
/// vocabulary are gigabytes) every step. glibc hands each one back to the kernel and
/// page-faults it in again: half of a training step on `flex` was system time. Keeping freed
/// memory in the heap instead makes the peak resident size the working set, which it is anyway.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator tunables; it is called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() -> Result<()> {
    keep_freed_memory();
    let cli = Cli::parse();
    match cli.command {
        Command::Info(args) => info(args),
        Command::Eval(args) => eval(args),
        Command::Generate(args) => generate_command(args),
        Command::Train(args) => train_command(args),
        Command::Export(args) => export_command(args),
        Command::Plot(args) => plot_command(args),
        Command::Bench(BenchCommand::Forward(args)) => bench_forward(args),
        Command::Bench(BenchCommand::Train(args)) => bench_train(args),
        Command::Bench(BenchCommand::Generate(args)) => bench_generate(args),
    }
}

fn info(args: InfoArgs) -> Result<()> {
    let (config, student) = model_config_from_any(&args.config)?;
    let estimate = estimate(&config, args.seq_len, args.batch_size, args.lora_rank);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&estimate)?);
        return Ok(());
    }
    if let Some(student) = &student {
        println!("{}", student.name);
        if let Some(base) = &student.base_model {
            println!("  base model        {base}");
        }
    }
    println!("  architecture      {} ({} layers, hidden {}, {} heads / {} kv heads, head_dim {}, vocab {})",
        config.architecture.hf_name(), config.num_hidden_layers, config.hidden_size,
        config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.vocab_size);
    println!("  parameters        {} ({})", human_count(estimate.parameters), estimate.parameters);
    println!("memory at seq_len {} × batch {} (estimates; see README):", args.seq_len, args.batch_size);
    println!("  inference bf16                 {:>9.2} GiB  (KV cache {:.2} GiB)", gib(estimate.inference_bytes), gib(estimate.kv_cache_bytes));
    println!("  full training                  {:>9.2} GiB", gib(estimate.full_training_bytes));
    println!("  full training + checkpointing  {:>9.2} GiB", gib(estimate.full_training_checkpointed_bytes));
    println!("  LoRA r={} training             {:>9.2} GiB  ({} trainable)", estimate.lora_rank, gib(estimate.lora_training_bytes), human_count(estimate.lora_parameters));
    Ok(())
}

fn progress(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed} < {eta}]")
            .expect("static template"),
    );
    bar.set_message(what.to_string());
    bar
}

fn eval(args: EvalArgs) -> Result<()> {
    let (device, options) = args.device.resolve()?;
    let pretrained = Pretrained::load(&args.model, &device, options)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let records = read_records(&args.data)?;
    let examples = records
        .iter()
        .map(|record| Example::from_record(record, &pretrained.tokenizer))
        .collect::<Result<Vec<_>, _>>()?;
    let bar = progress(examples.len(), "eval");
    let report = evaluate(&pretrained.model, &examples, |_| bar.inc(1));
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("mean NLL {:.6} over {} tokens ({} rows); perplexity {:.3}",
            report.mean_nll, report.total_tokens, report.rows.len(), report.mean_nll.exp());
    }
    Ok(())
}

fn read_messages(path: &Path) -> Result<Vec<Message>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    let list = value.get("messages").cloned().unwrap_or(value);
    serde_json::from_value(list).with_context(|| {
        format!("{}: expected a list of {{\"role\", \"content\"}} messages (or an object with `messages`)", path.display())
    })
}

fn generate_command(args: GenerateArgs) -> Result<()> {
    let (device, options) = args.device.resolve()?;
    let pretrained = Pretrained::load(&args.model, &device, options)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let tokenizer = &pretrained.tokenizer;
    let prompt = match (&args.prompt, &args.chat, &args.messages) {
        (Some(text), _, _) => tokenizer.encode(text, true)?,
        (None, Some(text), _) => tokenizer.encode_chat(&[Message::new("user", text.as_str())], true)?,
        (None, None, Some(path)) => tokenizer.encode_chat(&read_messages(path)?, true)?,
        (None, None, None) => bail!("give --prompt, --chat or --messages"),
    };
    let params = SamplingParams {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    let mut stream = TextStream::new();
    let mut stdout = std::io::stdout();
    let started = std::time::Instant::now();
    let (tokens, finish) = generate(&pretrained.model, &prompt, &params, &pretrained.eos_token_ids, |token| {
        let delta = stream.push(tokenizer, token);
        // A closed pipe (`| head`) is not an error worth a panic.
        let _ = write!(stdout, "{delta}");
        let _ = stdout.flush();
    });
    println!("{}", stream.finish(tokenizer));
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "{} tokens in {:.2}s ({:.1} tokens/s), finished by {}",
        tokens.len(),
        seconds,
        tokens.len() as f64 / seconds.max(1e-9),
        match finish {
            FinishReason::Stop => "end-of-sequence token",
            FinishReason::Length => "--max-new-tokens",
        }
    );
    Ok(())
}

/// Set by SIGINT (Ctrl-C) during `distill train`.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[cfg(unix)]
fn catch_ctrl_c() {
    extern "C" fn on_sigint(_: libc::c_int) {
        // Only an atomic store: async-signal-safe.
        INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
}

#[cfg(not(unix))]
fn catch_ctrl_c() {}

fn train_command(args: TrainArgs) -> Result<()> {
    use distill::data::packing::{PackedBlock, pack};
    use distill::data::traces::{LengthPolicy, TraceFormat, TraceOptions, tokenize_records};
    use distill::train::optim::AdamWConfig;
    use distill::train::run::{TrainConfig, steps_per_epoch, train};
    use distill::train::schedule::{Schedule, Scheduler};

    use distill::train::checkpoint::{self, TrainerState};
    if !args.resume && args.out.exists() && std::fs::read_dir(&args.out)?.next().is_some() {
        bail!("{} already exists and is not empty; continue it with --resume, or choose a new --out", args.out.display());
    }
    let (device, options) = args.device.resolve()?;
    // Where the architecture, weights, tokenizer and defaults come from.
    let (config, student) = model_config_from_any(&args.model)?;
    let defaults = student.as_ref().map(|s| s.training.clone()).unwrap_or_default();
    let gradient_checkpointing = args.gradient_checkpointing || defaults.gradient_checkpointing.unwrap_or(false);
    let device = device.autodiff();
    // Master weights stay f32; a lower dtype is the compute dtype (mixed precision).
    let compute_dtype = if args.bf16 {
        Some(DType::BF16)
    } else if options.dtype != DType::F32 {
        Some(options.dtype)
    } else if defaults.dtype.as_deref() == Some("bf16") {
        if device.supports_dtype(DType::BF16) {
            Some(DType::BF16)
        } else {
            eprintln!("note: the student config asks for bf16, which this device cannot compute; training in f32");
            None
        }
    } else {
        None
    };
    if let Some(dtype) = compute_dtype
        && !device.supports_dtype(dtype)
    {
        bail!("this device has no {dtype:?} compute (Vulkan and WGSL have none for bf16); drop --bf16 / --dtype");
    }
    let options = LoadOptions { dtype: DType::F32 };
    let lora = match args.lora_rank.or(defaults.lora_rank) {
        Some(rank) => {
            let lora = distill::model::lora::LoraConfig {
                rank,
                alpha: args.lora_alpha.or(defaults.lora_alpha).unwrap_or(2.0 * rank as f64),
                dropout: args.lora_dropout.or(defaults.lora_dropout).unwrap_or(0.05),
                targets: distill::model::lora::LoraConfig::parse_targets(
                    args.lora_targets.as_deref().or(defaults.lora_targets.as_deref()).unwrap_or("all-linear"),
                )
                .map_err(anyhow::Error::msg)?,
            };
            lora.validate().map_err(anyhow::Error::msg)?;
            Some(lora)
        }
        None => None,
    };
    let checkpoint_dir = match &student {
        Some(student) => student.checkpoint.clone(),
        None => Some(args.model.clone()),
    };
    let tokenizer_dir = student
        .as_ref()
        .and_then(|s| s.tokenizer.clone())
        .or_else(|| checkpoint_dir.clone())
        .context("the student config names neither `tokenizer` nor `checkpoint`")?;
    let tokenizer = distill::text::Tokenizer::from_dir(&tokenizer_dir)?;
    let seed = args.seed.or(defaults.seed).unwrap_or(42);
    let model = if args.init == "random" {
        // The initial weights follow --seed too, so a run (and its resume) is reproducible.
        device.seed(seed);
        distill::model::Model::random(config.clone(), &device)
    } else {
        let dir = checkpoint_dir.context("--init pretrained needs a checkpoint folder (or `checkpoint` in the student config)")?;
        distill::model::Model::load(&dir, &device, options).with_context(|| format!("loading {}", dir.display()))?
    };
    let model = match &lora {
        // Adapters are drawn from the seed as well, after the base weights.
        Some(lora) => model.with_lora(lora),
        None => model,
    };
    let eos_token_ids = distill::pretrained::eos_token_ids(&tokenizer_dir, &config.eos_token_ids)?;

    let max_length = args.max_length.or(defaults.max_length).unwrap_or(4096);
    let trace_options = TraceOptions {
        format: match (&args.prompt_field, &args.response_field) {
            (Some(prompt_field), Some(response_field)) => {
                TraceFormat::PromptResponse { prompt_field: prompt_field.clone(), response_field: response_field.clone() }
            }
            _ => TraceFormat::Messages { field: args.messages_field.clone() },
        },
        max_length,
        length_policy: if args.truncate { LengthPolicy::Truncate } else { LengthPolicy::Drop },
        train_on_prompt: args.train_on_prompt,
    };
    let records = read_records(&args.data)?;
    let (examples, skipped) = tokenize_records(&records, &tokenizer, &trace_options)?;
    eprintln!("data: {} rows → {} examples ({})", records.len(), examples.len(), skipped.summary());
    for (location, reason) in skipped.invalid.iter().take(5) {
        eprintln!("  skipped {location}: {reason}");
    }
    if examples.is_empty() {
        bail!("{}: no row can be trained on ({})", args.data.display(), skipped.summary());
    }
    let packing = args.packing || defaults.packing.unwrap_or(false);
    // Held-out rows: a seeded split of --data, or --eval-data.
    let (examples, eval_examples) = match (&args.eval_data, args.eval_split) {
        (Some(path), _) => {
            let (eval, skipped) = tokenize_records(&read_records(path)?, &tokenizer, &trace_options)?;
            eprintln!("eval data: {} examples ({})", eval.len(), skipped.summary());
            (examples, eval)
        }
        (None, Some(fraction)) if fraction > 0.0 => {
            if fraction >= 1.0 {
                bail!("--eval-split must be below 1 (got {fraction})");
            }
            use rand::SeedableRng;
            use rand::seq::SliceRandom;
            let mut order: Vec<usize> = (0..examples.len()).collect();
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ 0xE7A1));
            let held = ((fraction * examples.len() as f64).ceil() as usize).min(examples.len() - 1);
            let (eval_idx, train_idx) = order.split_at(held);
            (train_idx.iter().map(|&i| examples[i].clone()).collect(), eval_idx.iter().map(|&i| examples[i].clone()).collect())
        }
        _ => (examples, Vec::new()),
    };
    let eval_blocks: Vec<PackedBlock> = eval_examples.iter().map(PackedBlock::single).collect();
    let blocks: Vec<PackedBlock> =
        if packing { pack(&examples, max_length, seed) } else { examples.iter().map(PackedBlock::single).collect() };

    let mut train_config = TrainConfig {
        schedule: Schedule {
            learning_rate: args.learning_rate.or(defaults.learning_rate).unwrap_or(2e-5),
            scheduler: args.lr_scheduler.clone().or(defaults.lr_scheduler.clone()).unwrap_or_else(|| "cosine".into()).parse::<Scheduler>().map_err(anyhow::Error::msg)?,
            warmup_steps: 0,
            total_steps: 0,
            min_lr_ratio: args.min_lr_ratio.or(defaults.min_lr_ratio).unwrap_or(0.0),
        },
        adamw: AdamWConfig {
            beta1: defaults.adam_beta1.unwrap_or(0.9),
            beta2: defaults.adam_beta2.unwrap_or(0.999),
            epsilon: defaults.adam_epsilon.unwrap_or(1e-8),
            weight_decay: args.weight_decay.or(defaults.weight_decay).unwrap_or(0.0),
        },
        max_grad_norm: Some(args.max_grad_norm.or(defaults.max_grad_norm).unwrap_or(1.0)).filter(|&n| n > 0.0),
        per_device_train_batch_size: args.per_device_train_batch_size.or(defaults.per_device_train_batch_size).unwrap_or(1),
        gradient_accumulation_steps: args.gradient_accumulation_steps.or(defaults.gradient_accumulation_steps).unwrap_or(1),
        seed,
        compute_dtype,
        gradient_checkpointing,
    };
    let per_epoch = steps_per_epoch(blocks.len(), &train_config);
    let epochs = args.num_train_epochs.or(defaults.num_train_epochs).unwrap_or(1.0);
    let total_steps = args.max_steps.or(defaults.max_steps).unwrap_or((epochs * per_epoch as f64).ceil() as usize).max(1);
    train_config.schedule.total_steps = total_steps;
    train_config.schedule.warmup_steps = Schedule::warmup_from_ratio(args.warmup_ratio.or(defaults.warmup_ratio).unwrap_or(0.0), total_steps);
    let (trainable, total) = distill::model::lora::trainable_parameters(&model.net);
    eprintln!(
        "training {} of {} parameters{} for {total_steps} steps ({} blocks, {per_epoch} steps per epoch, batch {} × accumulation {}){}{}",
        human_count(trainable as u64), human_count(total as u64),
        lora.as_ref().map(|l| format!(" (LoRA rank {}, alpha {}, dropout {}, {})", l.rank, l.alpha, l.dropout, l.targets.join(","))).unwrap_or_default(),
        blocks.len(), train_config.per_device_train_batch_size, train_config.gradient_accumulation_steps,
        compute_dtype.map(|d| format!(", {d:?} compute over f32 weights")).unwrap_or_default(),
        if gradient_checkpointing { ", gradient checkpointing" } else { "" },
    );

    // Everything that decides the run's trajectory; a resume must match it.
    let settings = serde_json::json!({
        "model": args.model, "data": args.data, "init": args.init, "format": format!("{:?}", trace_options.format),
        "max_length": max_length, "truncate": args.truncate, "train_on_prompt": args.train_on_prompt, "packing": packing,
        "seed": seed, "total_steps": total_steps, "warmup_steps": train_config.schedule.warmup_steps,
        "learning_rate": train_config.schedule.learning_rate, "scheduler": format!("{:?}", train_config.schedule.scheduler),
        "min_lr_ratio": train_config.schedule.min_lr_ratio, "adamw": format!("{:?}", train_config.adamw),
        "max_grad_norm": train_config.max_grad_norm, "batch": train_config.per_device_train_batch_size,
        "accumulation": train_config.gradient_accumulation_steps,
        "eval_split": args.eval_split, "eval_data": args.eval_data,
        "lora": lora, "compute_dtype": compute_dtype.map(|d| format!("{d:?}")),
    });
    std::fs::create_dir_all(&args.out)?;
    let metrics_path = args.out.join("metrics.jsonl");
    let mut optimizer = distill::train::optim::AdamW::new(train_config.adamw.clone());
    let (model, start_step) = match checkpoint::latest(&args.out).filter(|_| args.resume) {
        Some((_, dir)) => {
            // A LoRA checkpoint holds the adapters; the frozen base is rebuilt as above.
            let base = lora.is_some().then(|| model.clone());
            let (model, state) = checkpoint::load(&dir, &device, &mut optimizer, base)?;
            if state.settings != settings {
                bail!("{}: the run was started with other settings; resume it with the same command", dir.display());
            }
            eprintln!("resuming from {} (step {})", dir.display(), state.global_step);
            (model, state.global_step)
        }
        None => (model, 0),
    };
    // Metrics logged after the checkpoint (by a run that was then killed) are replayed.
    let kept: Vec<String> = std::fs::read_to_string(&metrics_path)
        .unwrap_or_default()
        .lines()
        .filter(|line| serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s as usize <= start_step))
        .map(String::from)
        .collect();
    let mut metrics = std::io::BufWriter::new(std::fs::File::create(&metrics_path)?);
    for line in &kept {
        writeln!(metrics, "{line}")?;
    }
    metrics.flush()?;
    let bar = ProgressBar::new(total_steps as u64);
    bar.set_style(ProgressStyle::with_template("train {bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]").expect("static template"));
    bar.set_position(start_step as u64);
    let save_every = if args.save_steps == 0 { total_steps } else { args.save_steps };
    // Ctrl-C finishes the step under way, checkpoints it and stops: no finished step is lost.
    let interrupted = &INTERRUPTED;
    catch_ctrl_c();
    // Five evaluations over the run unless told otherwise: enough to see the trend.
    let eval_every = args.eval_steps.unwrap_or(total_steps.div_ceil(5)).max(1);
    let model = train(model, &mut optimizer, &blocks, &train_config, start_step, |step, model, optimizer| -> Result<()> {
        bar.set_message(format!("loss {:.4} lr {:.2e} {:.0} tok/s", step.loss, step.learning_rate, step.tokens_per_second));
        bar.inc(1);
        writeln!(metrics, "{}", serde_json::to_string(step)?)?;
        if !eval_blocks.is_empty() && (step.step % eval_every == 0 || step.step == total_steps) {
            // Forward passes only; their graphs are dropped unused.
            let (mut sum, mut count) = (0.0, 0);
            let model = model.for_inference();
            for block in &eval_blocks {
                let batch = distill::data::batch::Batch::new(&[block]);
                if let Some(nll) = distill::train::nll_sum(&model, &batch, Default::default()) {
                    sum += nll.into_scalar::<f32>() as f64;
                    count += batch.targets.len();
                }
            }
            let eval_loss = sum / count.max(1) as f64;
            bar.println(format!("step {}: eval loss {eval_loss:.4} ({count} tokens)", step.step));
            writeln!(metrics, "{}", serde_json::json!({"step": step.step, "eval_loss": eval_loss, "eval_tokens": count}))?;
        }
        metrics.flush().with_context(|| format!("writing {}", metrics_path.display()))?;
        let interrupted = interrupted.load(std::sync::atomic::Ordering::SeqCst);
        if step.step % save_every == 0 || step.step == total_steps || interrupted {
            let state = TrainerState { global_step: step.step, optimizer_steps: optimizer.steps, settings: settings.clone() };
            checkpoint::save(&args.out, model, optimizer, &state, &tokenizer_dir, &eos_token_ids)?;
        }
        if interrupted {
            bar.abandon();
            bail!(
                "interrupted: checkpoint-{} saved in {}; continue with the same command and --resume",
                step.step,
                args.out.display()
            );
        }
        Ok(())
    })?;
    bar.finish();
    let final_dir = args.out.join("final");
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    let export_options = distill::export::ExportOptions {
        dtype: distill::export::ExportDtype::parse(&args.export_dtype)?,
        ..Default::default()
    };
    let model = if model.has_lora() {
        let (merged, difference) = model.merge_lora().map_err(anyhow::Error::msg)?;
        eprintln!("merged the LoRA adapters into the weights (logits of merged vs adapted model: max |Δ| {difference:.1e})");
        merged
    } else {
        model
    };
    distill::export::export(&model, &tokenizer_dir, &eos_token_ids, &final_dir, &export_options)?;
    summarize_run(&metrics_path)?;
    eprintln!("exported {} (metrics in {}; chart: distill plot {})", final_dir.display(), metrics_path.display(), args.out.display());
    Ok(())
}

/// The loss at the start and end of the run (train and eval) and the peak memory, from the
/// metrics log.
fn summarize_run(metrics_path: &Path) -> Result<()> {
    let curves = distill::plot::read_metrics(metrics_path)?;
    let ends = |points: &[(f64, f64)]| -> Option<String> {
        let (first, last) = (points.first()?, points.last()?);
        Some(format!("{:.4} (step {}) → {:.4} (step {})", first.1, first.0, last.1, last.0))
    };
    if let Some(train) = ends(&curves.train_loss) {
        eprintln!("train loss {train}");
    }
    if let [(step, loss)] = curves.eval_loss[..] {
        eprintln!("eval loss  {loss:.4} (step {step})");
    } else if let Some(eval) = ends(&curves.eval_loss) {
        eprintln!("eval loss  {eval}");
    }
    if let Some(peak) = curves.peak_memory_bytes {
        eprintln!("peak memory {:.2} GiB", gib(peak));
    }
    Ok(())
}

fn export_command(args: ExportArgs) -> Result<()> {
    use distill::train::checkpoint;
    let dir = match args.step {
        Some(step) => checkpoint::checkpoint_dir(&args.run, step),
        None => checkpoint::latest(&args.run).map(|(_, dir)| dir).with_context(|| format!("{}: no checkpoint-* folder", args.run.display()))?,
    };
    let model_dir = dir.join("model");
    if !model_dir.is_dir() {
        bail!("{}: no such checkpoint", dir.display());
    }
    let (device, _) = distill::device::select(Some(args.device.as_deref().unwrap_or("flex")))?;
    let pretrained = Pretrained::load(&model_dir, &device, LoadOptions::default())?;
    let options = distill::export::ExportOptions {
        dtype: distill::export::ExportDtype::parse(&args.dtype)?,
        max_shard_bytes: distill::export::parse_shard_size(&args.max_shard_size)?,
    };
    distill::export::export(&pretrained.model, &model_dir, &pretrained.eos_token_ids, &args.out, &options)?;
    eprintln!("exported {} → {}", dir.display(), args.out.display());
    Ok(())
}

fn plot_command(args: PlotArgs) -> Result<()> {
    let size = args
        .size
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)))
        .filter(|&(w, h)| (200..=10_000).contains(&w) && (200..=10_000).contains(&h))
        .with_context(|| format!("--size {}: expected WIDTHxHEIGHT, each 200 to 10000 pixels", args.size))?;
    let curves = distill::plot::read_metrics(&args.run.join("metrics.jsonl"))?;
    let out = args.out.unwrap_or_else(|| args.run.join("loss.png"));
    let title = args.run.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    distill::plot::plot(&curves, &title, &out, size)?;
    let (first, last) = (curves.train_loss[0], curves.train_loss[curves.train_loss.len() - 1]);
    eprintln!("wrote {} (train loss {:.4} at step {} → {:.4} at step {})", out.display(), first.1, first.0, last.1, last.0);
    Ok(())
}

fn bench_train(args: BenchTrainArgs) -> Result<()> {
    use distill::data::packing::PackedBlock;
    use distill::train::run::{TrainConfig, train};
    use distill::train::schedule::{Schedule, Scheduler};
    let (device, _) = distill::device::select(args.device.as_deref())?;
    let device = device.autodiff();
    let (config, _) = model_config_from_any(&args.config)?;
    println!(
        "model: {} parameters, batch 1, {} timed steps per length, {}{}",
        human_count(config.num_parameters()), args.steps,
        if args.bf16 { "bf16 compute over f32 weights" } else { "f32" },
        if args.gradient_checkpointing { ", gradient checkpointing" } else { "" },
    );
    let train_config = TrainConfig {
        schedule: Schedule { learning_rate: 1e-4, scheduler: Scheduler::Constant, warmup_steps: 0, total_steps: args.steps + 1, min_lr_ratio: 0.0 },
        adamw: Default::default(),
        max_grad_norm: Some(1.0),
        per_device_train_batch_size: 1,
        gradient_accumulation_steps: 1,
        seed: 0,
        compute_dtype: args.bf16.then_some(DType::BF16),
        gradient_checkpointing: args.gradient_checkpointing,
    };
    let mut table = Vec::new();
    for &seq_len in &args.seq_len {
        device.seed(0);
        let model = distill::model::Model::random(config.clone(), &device);
        let block = PackedBlock {
            input_ids: (0..seq_len).map(|i| (i * 7919 % config.vocab_size) as u32).collect(),
            trained: vec![true; seq_len],
            positions: (0..seq_len).collect(),
            segments: vec![0; seq_len],
        };
        let mut optimizer = distill::train::optim::AdamW::new(train_config.adamw.clone());
        let mut rates = Vec::new();
        let mut peak = None;
        train(model, &mut optimizer, std::slice::from_ref(&block), &train_config, 0, |step, _, _| -> Result<()> {
            if step.step > 1 {
                rates.push(step.tokens_per_second);
            }
            peak = step.peak_memory_bytes.max(peak);
            Ok(())
        })?;
        rates.sort_by(f64::total_cmp);
        let rate = rates[rates.len() / 2];
        println!("burn     seq {seq_len:>6}   {rate:>9.1} tokens/s   peak memory {:>6.2} GiB", gib(peak.unwrap_or(0)));
        table.push((seq_len, rate, peak));
    }
    if let Some(command) = &args.reference {
        for (seq_len, rate, peak) in table {
            let extra = format!(
                " --config {} --seq-len {seq_len} --steps {}{}{}", args.config.display(), args.steps,
                if args.bf16 { " --bf16" } else { "" }, if args.gradient_checkpointing { " --gradient-checkpointing" } else { "" }
            );
            let reference = run_reference(&format!("{command}{extra}"))?;
            let value = |key: &str| reference.get(key).and_then(|v| v.as_f64()).with_context(|| format!("reference JSON lacks {key}"));
            let (reference_rate, reference_peak) = (value("tokens_per_s")?, value("peak_memory_bytes")?);
            println!("pytorch  seq {seq_len:>6}   {reference_rate:>9.1} tokens/s   peak memory {:>6.2} GiB", gib(reference_peak as u64));
            println!(
                "ratio    seq {seq_len:>6}   {:>9.2}× speed   {:>6.2}× memory   (burn / pytorch; speed > 1 and memory < 1 are better)",
                rate / reference_rate, peak.map_or(f64::NAN, |p| p as f64 / reference_peak)
            );
        }
    }
    Ok(())
}

/// The prompts of `bench generate`; `distill/benches/reference_generate.py` builds the same.
fn bench_prompts(batch_size: usize, prompt_len: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..batch_size)
        .map(|row| {
            let len = (prompt_len / 2 + row * prompt_len.div_ceil(2) / batch_size.max(1)).max(1);
            (0..len).map(|i| ((row * 131 + i) * 7919 % vocab) as u32).collect()
        })
        .collect()
}

fn bench_generate(args: BenchGenerateArgs) -> Result<()> {
    use distill::generate::{BatchGenerator, SamplingParams, generate};
    let (device, options) = args.device.resolve()?;
    let (config, _) = model_config_from_any(&args.config)?;
    let model = distill::model::Model::random(config.clone(), &device).with_dtype(options.dtype);
    let prompts = bench_prompts(args.batch_size, args.prompt_len, config.vocab_size);
    println!("model: {} parameters, {} sequences, prompts of {}-{} tokens, {} new tokens each, dtype {:?}",
        human_count(config.num_parameters()), prompts.len(), prompts[0].len(), prompts[prompts.len() - 1].len(), args.new_tokens, options.dtype);
    // Greedy with no end-of-sequence token: every sequence generates exactly `new_tokens`.
    let params = SamplingParams { max_new_tokens: args.new_tokens, temperature: 0.0, top_p: 1.0, seed: 0 };
    let total = (prompts.len() * args.new_tokens) as f64;
    generate(&model, &prompts[0], &SamplingParams { max_new_tokens: 2, ..params.clone() }, &[], |_| {});

    let started = std::time::Instant::now();
    for prompt in &prompts {
        generate(&model, prompt, &params, &[], |_| {});
    }
    let alone = total / started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    let mut batch = BatchGenerator::new(&[], prompts.len());
    for (id, prompt) in prompts.iter().enumerate() {
        batch.add(id as u64, prompt.clone(), params.clone());
    }
    while !batch.is_empty() {
        batch.step(&model, |_, _| {});
    }
    let batched = total / started.elapsed().as_secs_f64();
    println!("burn one at a time  {alone:>10.1} tokens/s");
    println!("burn batched        {batched:>10.1} tokens/s   {:.2}× one at a time", batched / alone);
    if let Some(command) = &args.reference {
        let reference = run_reference(&format!(
            "{command} --config {} --batch-size {} --prompt-len {} --new-tokens {}",
            args.config.display(), args.batch_size, args.prompt_len, args.new_tokens
        ))?;
        let rate = reference.get("tokens_per_s").and_then(|v| v.as_f64()).context("reference JSON lacks tokens_per_s")?;
        println!("pytorch batched     {rate:>10.1} tokens/s   burn batched / pytorch batched: {:.2}× (> 1 is faster)", batched / rate);
    }
    Ok(())
}

fn bench_forward(args: BenchForwardArgs) -> Result<()> {
    let (device, options) = args.device.resolve()?;
    let (config, _) = model_config_from_any(&args.config)?;
    println!("model: {} parameters, prompt {} tokens, decode {} tokens, dtype {:?}",
        human_count(config.num_parameters()), args.prompt_len, args.decode_tokens, options.dtype);
    let model = distill::model::Model::random(config.clone(), &device).with_dtype(options.dtype);
    let prompt: Vec<u32> = (0..args.prompt_len).map(|i| (i * 7919 % config.vocab_size) as u32).collect();
    let mut prefill_times = Vec::new();
    let mut decode_times = Vec::new();
    for repeat in 0..=args.repeats {
        let mut cache = model.new_cache();
        let started = std::time::Instant::now();
        let logits = model.step(&prompt, &mut cache);
        let mut token = distill::generate::argmax(logits.into_data().convert::<f32>().as_slice::<f32>().expect("f32"));
        let prefill = started.elapsed().as_secs_f64();
        let started = std::time::Instant::now();
        for _ in 0..args.decode_tokens {
            let logits = model.step(&[token], &mut cache);
            token = distill::generate::argmax(logits.into_data().convert::<f32>().as_slice::<f32>().expect("f32"));
        }
        let decode = started.elapsed().as_secs_f64();
        if repeat > 0 {
            prefill_times.push(prefill);
            decode_times.push(decode);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let prefill_rate = args.prompt_len as f64 / median(prefill_times);
    let decode_rate = args.decode_tokens as f64 / median(decode_times);
    println!("burn     prefill {prefill_rate:>10.1} tokens/s   decode {decode_rate:>8.1} tokens/s");
    if let Some(command) = &args.reference {
        let reference = run_reference(&format!(
            "{command} --config {} --prompt-len {} --decode-tokens {} --repeats {}",
            args.config.display(), args.prompt_len, args.decode_tokens, args.repeats
        ))?;
        let rate = |key: &str| reference.get(key).and_then(|v| v.as_f64()).with_context(|| format!("reference JSON lacks {key}"));
        let (reference_prefill, reference_decode) = (rate("prefill_tokens_per_s")?, rate("decode_tokens_per_s")?);
        println!("pytorch  prefill {reference_prefill:>10.1} tokens/s   decode {reference_decode:>8.1} tokens/s");
        println!("ratio    prefill {:>10.2}×           decode {:>8.2}×   (burn / pytorch; > 1 is faster)",
            prefill_rate / reference_prefill, decode_rate / reference_decode);
    }
    Ok(())
}
