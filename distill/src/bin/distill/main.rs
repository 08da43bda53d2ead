//! `distill`: run, score and measure Qwen2 / Llama-3 students of the R1 distillation.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use distill::burn::tensor::DType;
use distill::data::records::read_records;
use distill::data::traces::TraceFormat;
use distill::eval::{Example, evaluate};
use distill::generate::{FinishReason, SamplingParams, TextStream, generate};
use distill::info::{gib, human_count};
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

mod args;
mod bench;

use args::*;
use bench::{bench_attention, bench_forward, bench_generate, bench_train};

/// Counts heap bytes, for the allocated peak that `distill bench train` reports.
#[global_allocator]
static ALLOCATOR: distill::memory::CountingAllocator = distill::memory::CountingAllocator;

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
        Command::Bench(BenchCommand::Attention(args)) => bench_attention(args),
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
        activation_offloading: args.activation_offloading,
        shard_optimizer: args.shard_optimizer,
        load_in_4bit: args.load_in_4bit.then_some(true),
        load_in_8bit: args.load_in_8bit.then_some(true),
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
    let compute_dtype = distill::device::dtype_named(options.dtype.as_deref().unwrap_or("f32"))?;
    let bits = options.load_in_bits().map_err(anyhow::Error::msg)?;
    let plan_options = PlanOptions {
        seq_len: options.max_length.unwrap_or(4096),
        batch_size: options.per_device_train_batch_size.unwrap_or(1),
        gradient_accumulation_steps: options.gradient_accumulation_steps.unwrap_or(1),
        compute_dtype,
        gradient_checkpointing: options.gradient_checkpointing.unwrap_or(false),
        activation_offloading: options.activation_offloading.unwrap_or(false),
        lora_rank: options.lora_rank,
        lora_targets,
        runtime_bytes: None,
        devices: args.devices.max(1),
        shard_optimizer: options.shard_optimizer.unwrap_or(false),
        base: distill::model::BaseStorage::choose(bits, compute_dtype != DType::F32),
        // Planned for a GPU, which multiplies in the compute dtype.
        flex: false,
        average_share: false,
    };
    let plan = MemoryPlan::new(&config, &plan_options);
    let memory = args.gpu_memory.as_deref().map(distill::info::parse_memory).transpose().map_err(anyhow::Error::msg)?;
    let routes = distill::plan::routes(&config, &plan_options, args.devices, options.lora_rank.unwrap_or(16));
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
            "devices": args.devices,
            "fallback": memory.filter(|&m| !routes.iter().any(|r| r.bytes_per_device <= m)).and_then(|m| {
                distill::plan::route_that_fits(&config, &plan_options, args.devices, options.lora_rank.unwrap_or(16), m)
            }).map(|(seq_len, batch_size, route)| serde_json::json!({"seq_len": seq_len, "batch_size": batch_size, "name": route.name, "flags": route.flags, "bytes_per_device": route.bytes_per_device})),
            "routes": routes.iter().map(|r| serde_json::json!({
                "name": r.name, "flags": r.flags, "bytes_per_device": r.bytes_per_device, "fits": memory.map(|m| r.bytes_per_device <= m),
            })).collect::<Vec<_>>(),
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
        distill::plan::checkpointing_phrase(plan_options.gradient_checkpointing, plan_options.activation_offloading),
    );
    for line in plan.table().lines() {
        println!("  {line}");
    }
    if let Some(memory) = memory {
        let verdict = if plan.total() <= memory { "fits" } else { "does NOT fit" };
        println!("  {verdict} in {:.2} GiB", gib(memory));
    }
    println!(
        "routes on {} device(s) at {} tokens × {} rows{}{} (memory per device){}:",
        args.devices, plan_options.seq_len, plan_options.batch_size,
        if plan_options.compute_dtype == DType::F32 { ", f32".to_string() } else { format!(", {:?} compute", plan_options.compute_dtype) },
        distill::plan::checkpointing_phrase(plan_options.gradient_checkpointing, plan_options.activation_offloading),
        memory.map(|m| format!(", against {:.0} GiB", gib(m))).unwrap_or_default(),
    );
    let width = routes.iter().map(|r| r.name.chars().count()).max().unwrap_or(0);
    for route in &routes {
        let verdict = match memory {
            Some(m) if route.bytes_per_device <= m => "fits    ",
            Some(_) => "too big ",
            None => "",
        };
        println!("  {verdict}{:<width$} {:>9.2} GiB  {}", route.name, gib(route.bytes_per_device), route.flags);
    }
    if let Some(memory) = memory {
        match routes.iter().find(|r| r.bytes_per_device <= memory) {
            Some(route) => println!("  first that fits: {} ({})", route.name, route.flags),
            None => match distill::plan::route_that_fits(&config, &plan_options, args.devices, options.lora_rank.unwrap_or(16), memory) {
                Some((seq_len, batch_size, route)) => println!(
                    "  none fits at {} tokens × {} rows; at {seq_len} tokens × {batch_size} row(s): {} ({:.2} GiB; {} --max-length {seq_len} --per-device-train-batch-size {batch_size})",
                    plan_options.seq_len, plan_options.batch_size, route.name, gib(route.bytes_per_device), route.flags,
                ),
                None => println!("  none fits, even at 1024 tokens × 1 row"),
            },
        }
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
    let (device, device_name, devices) = if args.devices.is_empty() {
        let (device, name) = distill::device::select(args.device.as_deref())?;
        (device, name, Vec::new())
    } else {
        let devices = args.devices.iter().map(|name| Ok((distill::device::parse(name)?, name.clone()))).collect::<Result<Vec<_>>>()?;
        // Two replicas on one GPU would share its memory, which the plan gives to one; flex is
        // the host, counted per replica, and has one device handle only.
        if let Some(twice) = args.devices.iter().enumerate().find(|(i, name)| *name != "flex" && args.devices[..*i].contains(name)).map(|(_, name)| name) {
            bail!("--devices names {twice} twice; name each device once (flex alone may repeat: replicas on the host's cores)");
        }
        eprintln!("devices: {} (data parallel)", args.devices.join(", "));
        (devices[0].0.clone(), devices[0].1.clone(), devices)
    };
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
        devices,
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
