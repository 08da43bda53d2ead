//! `distill`: run, score and measure Qwen2 / Llama-3 students of the R1 distillation.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use distill::benchmark::run_reference;
use distill::burn::tensor::DType;
use distill::data::records::read_records;
use distill::data::traces::TraceFormat;
use distill::eval::{Example, evaluate};
use distill::generate::{FinishReason, SamplingParams, TextStream, generate};
use distill::info::{gib, human_count};
use distill::model::LoadOptions;
use distill::pretrained::Pretrained;
use distill::student::model_config_from_any;
use distill::text::Message;
use distill::train::job::Reporter;
use distill::train::options::TrainingOptions;

#[derive(Parser)]
#[command(
    name = "distill",
    version,
    about = "Distil reasoning into Qwen2 / Llama-3 students: run, score and measure HF checkpoints with burn",
    long_about = "Distil reasoning into Qwen2 / Llama-3 students (the DeepSeek-R1-Distill recipe).\n\n\
        Checkpoints are Hugging Face folders (config.json, *.safetensors, tokenizer.json,\n\
        tokenizer_config.json); student_configs/ holds one config per R1 student.\n\n\
        Examples:\n  \
        distill info student_configs/qwen2.5-math-1.5b.toml --max-length 32768 --gpu-memory 80GB\n  \
        distill eval --model tests/fixtures/tiny-qwen2 --data tests/fixtures/eval_rows.jsonl\n  \
        distill generate --model tests/fixtures/tiny-qwen2 --prompt 'What is 7 times 6?' --temperature 0"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parameter count, serving memory, and the memory plan of training (what `distill train`
    /// allocates, item by item, and whether it fits --gpu-memory).
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
    /// Tokens per row; default: the student config's max_length, else 4096.
    #[arg(long, visible_alias = "seq-len")]
    max_length: Option<usize>,
    /// Rows per forward pass; default: the student config's, else 1.
    #[arg(long, visible_alias = "batch-size")]
    per_device_train_batch_size: Option<usize>,
    #[arg(long)]
    gradient_accumulation_steps: Option<usize>,
    /// Plan LoRA adapters of this rank (on every linear layer unless --lora-targets).
    #[arg(long)]
    lora_rank: Option<usize>,
    #[arg(long)]
    lora_targets: Option<String>,
    /// Compute dtype: f32, or bf16 / f16 over f32 master weights; default: the student config's.
    #[arg(long, value_parser = ["f32", "bf16", "f16"])]
    dtype: Option<String>,
    /// Layer-level activation checkpointing; default: the student config's.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    gradient_checkpointing: Option<bool>,
    /// Say whether the plan fits this much device memory (80GB, 24GiB).
    #[arg(long)]
    gpu_memory: Option<String>,
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
#[command(after_long_help = TrainingOptions::defaults_help())]
struct TrainArgs {
    /// An HF checkpoint folder, or a student config (student_configs/*.toml) whose `checkpoint`
    /// names the downloaded base model; its [training] table sets options not given here.
    #[arg(long)]
    model: PathBuf,
    /// Traces: JSONL or Parquet (file, folder of shards or glob) with a `messages` column, or
    /// the columns named by --prompt-field / --response-field.
    #[arg(long)]
    data: PathBuf,
    /// Run folder: metrics.jsonl, checkpoints and the exported model in final/. Must not exist
    /// yet (or hold a run to --resume).
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
    #[command(flatten)]
    options: TrainingOptions,
    /// Shorthand for --dtype bf16.
    #[arg(long, conflicts_with = "dtype")]
    bf16: bool,
    /// Continue the run in --out from its newest checkpoint, with the same settings.
    #[arg(long)]
    resume: bool,
    /// Hold out this fraction of the rows (chosen by --seed) to measure eval loss on.
    #[arg(long, conflicts_with = "eval_data")]
    eval_split: Option<f64>,
    /// Separate eval rows (same format as --data).
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// flex (pure-Rust CPU), wgpu, vulkan, metal, webgpu, cuda[:N] or rocm[:N]; default: the
    /// best compiled-in GPU backend, else flex.
    #[arg(long)]
    device: Option<String>,
    /// The device's memory (80GB, 24GiB; both read as GiB) to check the memory plan against;
    /// default: the system's available memory on flex, no check on GPUs (burn does not report
    /// their memory).
    #[arg(long, visible_alias = "device-memory")]
    gpu_memory: Option<String>,
    /// Where tokenized data is cached (default: $DISTILL_CACHE, else ~/.cache/r1-distill).
    #[arg(long)]
    dataset_cache: Option<PathBuf>,
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
    /// Training tokens/s and peak memory of a model (random weights; bench-100m by default) per
    /// sequence length, beside its memory plan: forward, backward and AdamW step on
    /// --per-device-train-batch-size rows.
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
    /// Sequence lengths to measure, comma-separated; each is measured from a fresh model
    /// with the process's peak reset, so each figure is that length's own.
    #[arg(long, default_value = "1024,4096", value_delimiter = ',')]
    seq_len: Vec<usize>,
    /// Timed optimizer steps per length (after the warm-up steps).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    #[arg(long, default_value_t = 1)]
    warmup_steps: usize,
    /// Rows per step.
    #[arg(long, default_value_t = 1)]
    per_device_train_batch_size: usize,
    #[arg(long)]
    bf16: bool,
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Train LoRA adapters of this rank on every linear layer instead of every weight.
    #[arg(long)]
    lora_rank: Option<usize>,
    /// A command that runs the same measurement in PyTorch for one length and prints one JSON
    /// line {"tokens_per_s": …, "peak_memory_bytes": …}; it is run once per length (its own
    /// process, so its peak is that length's); e.g.
    /// `.venv/bin/python distill/benches/reference_train.py --threads 2`.
    #[arg(long)]
    reference: Option<String>,
    #[arg(long)]
    device: Option<String>,
    /// Print one JSON object per length (with the memory plan) instead of the table.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    distill::memory::keep_freed_memory();
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
    use distill::plan::{MemoryPlan, PlanOptions};
    let (mut config, student) = model_config_from_any(&args.config)?;
    let from_config = student.as_ref().map(|s| s.training.clone()).unwrap_or_default();
    let given = TrainingOptions {
        max_length: args.max_length,
        per_device_train_batch_size: args.per_device_train_batch_size,
        gradient_accumulation_steps: args.gradient_accumulation_steps,
        lora_rank: args.lora_rank,
        lora_targets: args.lora_targets.clone(),
        dtype: args.dtype.clone(),
        gradient_checkpointing: args.gradient_checkpointing,
        ..Default::default()
    };
    let options = given.or(&from_config).or(&TrainingOptions::defaults());
    // The context the student trains at (a config may extend it, as open-r1 did).
    config.rope_theta = options.rope_theta.unwrap_or(config.rope_theta);
    config.max_position_embeddings = options.max_position_embeddings.unwrap_or(config.max_position_embeddings);
    let lora_targets = match (&options.lora_rank, &options.lora_targets) {
        (Some(_), Some(targets)) => Some(distill::model::lora::LoraConfig::parse_targets(targets).map_err(anyhow::Error::msg)?),
        _ => None,
    };
    let plan_options = PlanOptions {
        seq_len: options.max_length.unwrap_or(4096),
        batch_size: options.per_device_train_batch_size.unwrap_or(1),
        gradient_accumulation_steps: options.gradient_accumulation_steps.unwrap_or(1),
        compute_dtype: distill::device::dtype_named(options.dtype.as_deref().unwrap_or("f32"))?,
        gradient_checkpointing: options.gradient_checkpointing.unwrap_or(false),
        lora_rank: options.lora_rank,
        lora_targets,
        runtime_bytes: None,
    };
    let plan = MemoryPlan::new(&config, &plan_options);
    let memory = args.gpu_memory.as_deref().map(distill::info::parse_memory).transpose().map_err(anyhow::Error::msg)?;
    let inference = distill::info::inference(&config, plan_options.seq_len, plan_options.batch_size);
    if args.json {
        let report = serde_json::json!({
            "parameters": config.num_parameters(),
            "seq_len": plan_options.seq_len,
            "batch_size": plan_options.batch_size,
            "inference": inference,
            "training": plan,
            "training_bytes": plan.total(),
            "device_memory_bytes": memory,
            "fits": memory.map(|m| plan.total() <= m),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
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
    println!("  parameters        {} ({})", human_count(config.num_parameters()), config.num_parameters());
    println!("  context           max_position_embeddings {}, rope_theta {}", config.max_position_embeddings, config.rope_theta);
    println!("inference in bf16 at {} tokens × {}: weights {:.2} GiB, KV cache {:.2} GiB",
        plan_options.seq_len, plan_options.batch_size, gib(inference.weights_bytes), gib(inference.kv_cache_bytes));
    println!(
        "training at {} tokens × {} rows ({}{}{}), as `distill train` allocates it:",
        plan_options.seq_len,
        plan_options.batch_size,
        match plan_options.lora_rank { Some(rank) => format!("LoRA rank {rank}"), None => "full fine-tuning".into() },
        if plan_options.compute_dtype == DType::F32 { ", f32".to_string() } else { format!(", {:?} compute", plan_options.compute_dtype) },
        if plan_options.gradient_checkpointing { ", gradient checkpointing" } else { "" },
    );
    for line in plan.table().lines() {
        println!("  {line}");
    }
    if let Some(memory) = memory {
        let verdict = if plan.total() <= memory { "fits" } else { "does NOT fit" };
        println!("  {verdict} in {:.2} GiB", gib(memory));
    }
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
        // The first Ctrl-C asks for a checkpoint after the step under way; a second one means
        // now (checkpoints are renamed into place whole, so the newest one stays sound). Only
        // an atomic swap and _exit: async-signal-safe.
        if INTERRUPTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(130) };
        }
    }
    // SAFETY: the handler only touches an atomic and calls _exit.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
}

#[cfg(not(unix))]
fn catch_ctrl_c() {}

/// Progress of `distill train` on stderr: a bar while tokenizing and one while training.
struct TrainProgress {
    bar: std::sync::Mutex<Option<ProgressBar>>,
}

impl TrainProgress {
    fn with_bar(&self, f: impl FnOnce(&ProgressBar)) {
        if let Some(bar) = self.bar.lock().expect("not poisoned").as_ref() {
            f(bar);
        }
    }

    fn replace(&self, bar: Option<ProgressBar>) {
        if let Some(old) = std::mem::replace(&mut *self.bar.lock().expect("not poisoned"), bar) {
            old.finish_and_clear();
        }
    }
}

impl Reporter for TrainProgress {
    fn note(&self, line: &str) {
        match self.bar.lock().expect("not poisoned").as_ref() {
            // A hidden bar (stderr is not a terminal) would swallow the line.
            Some(bar) if !bar.is_hidden() => bar.println(line),
            _ => eprintln!("{line}"),
        }
    }

    fn tokenizing(&self, rows: usize) {
        if self.bar.lock().expect("not poisoned").is_none() {
            let bar = ProgressBar::new_spinner();
            bar.set_style(ProgressStyle::with_template("tokenizing {pos} rows [{elapsed}, {per_sec}]").expect("static template"));
            self.replace(Some(bar));
        }
        self.with_bar(|bar| bar.set_position(rows as u64));
    }

    fn training_started(&self, total_steps: usize, first_step: usize) {
        let bar = ProgressBar::new(total_steps as u64);
        bar.set_style(ProgressStyle::with_template("train {bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]").expect("static template"));
        bar.set_position(first_step as u64);
        self.replace(Some(bar));
    }

    fn step(&self, step: &distill::train::run::StepMetrics) {
        self.with_bar(|bar| {
            bar.set_message(format!("loss {:.4} lr {:.2e} {:.0} tok/s", step.loss, step.learning_rate, step.tokens_per_second));
            bar.inc(1);
        });
    }

    fn training_finished(&self) {
        self.with_bar(ProgressBar::finish);
        *self.bar.lock().expect("not poisoned") = None;
    }
}

fn train_command(args: TrainArgs) -> Result<()> {
    use distill::train::job::{EvalSource, Init, Job, JobSpec};
    let (device, device_name) = distill::device::select(args.device.as_deref())?;
    let mut options = args.options;
    if args.bf16 {
        options.dtype = Some("bf16".into());
    }
    let spec = JobSpec {
        model: args.model,
        data: args.data,
        out: args.out,
        init: if args.init == "random" { Init::Random } else { Init::Pretrained },
        format: match (args.prompt_field, args.response_field) {
            (Some(prompt_field), Some(response_field)) => TraceFormat::PromptResponse { prompt_field, response_field },
            _ => TraceFormat::Messages { field: args.messages_field },
        },
        options,
        eval: match (args.eval_data, args.eval_split) {
            (Some(path), _) => EvalSource::Data(path),
            (None, Some(fraction)) => EvalSource::Split(fraction),
            _ => EvalSource::None,
        },
        resume: args.resume,
        device,
        device_name,
        device_memory: args.gpu_memory.as_deref().map(distill::info::parse_memory).transpose().map_err(anyhow::Error::msg)?,
        dataset_cache: args.dataset_cache,
    };
    let progress = TrainProgress { bar: std::sync::Mutex::new(None) };
    let job = Job::prepare(spec, &progress)?;
    progress.replace(None);
    // Ctrl-C finishes the step under way, checkpoints it and stops: no finished step is lost.
    catch_ctrl_c();
    let final_dir = job.out().join("final");
    let run_dir = job.out().to_path_buf();
    let metrics_path = job.run(&progress, &INTERRUPTED)?;
    summarize_run(&metrics_path)?;
    eprintln!("exported {} (metrics in {}; chart: distill plot {})", final_dir.display(), metrics_path.display(), run_dir.display());
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
    if !dir.is_dir() {
        bail!("{}: no such checkpoint", dir.display());
    }
    let (device, _) = distill::device::select(Some(args.device.as_deref().unwrap_or("flex")))?;
    // A LoRA checkpoint's adapters are merged into the base the run's settings name.
    let (model, tokenizer_dir, eos_token_ids) = distill::train::job::checkpoint_model(&dir, &device)?;
    let options = distill::export::ExportOptions {
        dtype: distill::export::ExportDtype::parse(&args.dtype)?,
        max_shard_bytes: distill::export::parse_shard_size(&args.max_shard_size)?,
    };
    distill::export::export(&model, &tokenizer_dir, &eos_token_ids, &args.out, &options)?;
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
    use distill::benchmark::{TrainBench, measure_training};
    if args.reference.is_some() && args.lora_rank.is_some() {
        bail!("--reference measures full fine-tuning in PyTorch; compare LoRA runs without it (or drop --lora-rank)");
    }
    let (device, device_name) = distill::device::select(args.device.as_deref())?;
    let (config, _) = model_config_from_any(&args.config)?;
    let compute_dtype = args.bf16.then_some(DType::BF16);
    if !args.json {
        println!(
            "model: {} parameters, {} row(s), {} timed step(s) per length after {} warm-up, {}{}{}",
            human_count(config.num_parameters()), args.per_device_train_batch_size, args.steps, args.warmup_steps,
            if args.bf16 { "bf16 compute over f32 weights" } else { "f32" },
            if args.gradient_checkpointing { ", gradient checkpointing" } else { "" },
            args.lora_rank.map(|r| format!(", LoRA rank {r}")).unwrap_or_default(),
        );
    }
    for &seq_len in &args.seq_len {
        let bench = TrainBench {
            seq_len,
            batch_size: args.per_device_train_batch_size,
            warmup_steps: args.warmup_steps,
            steps: args.steps.max(1),
            compute_dtype,
            gradient_checkpointing: args.gradient_checkpointing,
            lora_rank: args.lora_rank,
        };
        // A length whose plan exceeds the machine is reported, not attempted: the kernel would
        // kill the process.
        let plan = distill::plan::MemoryPlan::new(&config, &distill::plan::PlanOptions {
            seq_len,
            batch_size: bench.batch_size,
            compute_dtype: compute_dtype.unwrap_or(DType::F32),
            gradient_checkpointing: bench.gradient_checkpointing,
            lora_rank: bench.lora_rank,
            runtime_bytes: distill::memory::current_bytes(),
            ..Default::default()
        });
        // PyTorch runs first, in its own process, so that neither side's heap is in the
        // machine while the other measures.
        let reference = args.reference.as_ref().map(|command| {
            let extra = format!(
                " --config {} --seq-len {seq_len} --batch-size {} --steps {} --warmup-steps {}{}{}",
                args.config.display(), bench.batch_size, bench.steps, bench.warmup_steps,
                if args.bf16 { " --bf16" } else { "" }, if args.gradient_checkpointing { " --gradient-checkpointing" } else { "" }
            );
            run_reference(&format!("{command}{extra}")).map_err(anyhow::Error::from).and_then(|reference| {
                let value = |key: &str| reference.get(key).and_then(|v| v.as_f64()).with_context(|| format!("reference JSON lacks {key}"));
                Ok((value("tokens_per_s")?, value("peak_memory_bytes")?))
            })
        });
        let available = distill::train::job::device_memory(None, &device_name);
        let burn = match available {
            Some(memory) if plan.total() > memory => {
                println!("burn     seq {seq_len:>6}   skipped: the memory plan needs {:.2} GiB, {device_name} has {:.2} GiB", gib(plan.total()), gib(memory));
                None
            }
            _ => {
                let measured = measure_training(&config, &bench, &device);
                // The model is gone; hand its memory back before the next length.
                distill::memory::release_free_memory();
                if args.json {
                    println!("{}", serde_json::to_string(&measured)?);
                } else {
                    println!(
                        "burn     seq {seq_len:>6}   {:>9.1} tokens/s   peak memory {:>6.2} GiB   (plan {:.2} GiB, {:+.0}%)",
                        measured.tokens_per_s, gib(measured.peak_memory_bytes), gib(measured.plan_bytes),
                        100.0 * (measured.plan_bytes as f64 / measured.peak_memory_bytes as f64 - 1.0),
                    );
                }
                Some(measured)
            }
        };
        let (reference_rate, reference_peak) = match reference {
            None => continue,
            Some(Ok(reference)) => reference,
            Some(Err(e)) => {
                println!("pytorch  seq {seq_len:>6}   failed: {}", e.to_string().lines().last().unwrap_or(""));
                continue;
            }
        };
        if args.json {
            println!("{}", serde_json::json!({"reference": "pytorch", "seq_len": seq_len, "tokens_per_s": reference_rate, "peak_memory_bytes": reference_peak}));
            continue;
        }
        println!("pytorch  seq {seq_len:>6}   {reference_rate:>9.1} tokens/s   peak memory {:>6.2} GiB", gib(reference_peak as u64));
        if let Some(measured) = burn {
            println!(
                "ratio    seq {seq_len:>6}   {:>9.2}× speed   {:>6.2}× memory   (burn / pytorch; speed > 1 and memory < 1 are better)",
                measured.tokens_per_s / reference_rate, measured.peak_memory_bytes as f64 / reference_peak
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
