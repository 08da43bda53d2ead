//! `distill`: run, score and measure Qwen2 / Llama-3 students of the R1 distillation.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

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
        let (device, _) = distill::device::select(self.device.as_deref())?;
        let dtype = match self.dtype.as_str() {
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            _ => DType::F32,
        };
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
struct GenerateArgs {
    /// HF checkpoint folder.
    #[arg(long)]
    model: PathBuf,
    /// Raw text, encoded with the tokenizer's own special tokens (no chat template).
    #[arg(long, conflicts_with = "messages", required_unless_present = "messages")]
    prompt: Option<String>,
    /// JSON file with a list of {role, content} messages, rendered with the chat template
    /// and its generation prompt.
    #[arg(long)]
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

#[derive(Subcommand)]
enum BenchCommand {
    /// Prefill and decode tokens/s of a ~100M-parameter model (random weights).
    Forward(BenchForwardArgs),
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Info(args) => info(args),
        Command::Eval(args) => eval(args),
        Command::Generate(args) => generate_command(args),
        Command::Bench(BenchCommand::Forward(args)) => bench_forward(args),
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
    let prompt = match (&args.prompt, &args.messages) {
        (Some(text), _) => tokenizer.encode(text, true)?,
        (None, Some(path)) => tokenizer.encode_chat(&read_messages(path)?, true)?,
        (None, None) => bail!("give --prompt or --messages"),
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
        let output = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{command} --config {} --prompt-len {} --decode-tokens {} --repeats {}",
                args.config.display(), args.prompt_len, args.decode_tokens, args.repeats
            ))
            .output()
            .with_context(|| format!("running reference command `{command}`"))?;
        if !output.status.success() {
            bail!("reference command failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).context("reference printed no JSON line")?;
        let reference: serde_json::Value = serde_json::from_str(line)?;
        let rate = |key: &str| reference.get(key).and_then(|v| v.as_f64()).with_context(|| format!("reference JSON lacks {key}"));
        let (reference_prefill, reference_decode) = (rate("prefill_tokens_per_s")?, rate("decode_tokens_per_s")?);
        println!("pytorch  prefill {reference_prefill:>10.1} tokens/s   decode {reference_decode:>8.1} tokens/s");
        println!("ratio    prefill {:>10.2}×           decode {:>8.2}×   (burn / pytorch; > 1 is faster)",
            prefill_rate / reference_prefill, decode_rate / reference_decode);
    }
    Ok(())
}
