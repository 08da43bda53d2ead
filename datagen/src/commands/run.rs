//! `datagen run` and `datagen eval`.

use super::FilterOptions;
use super::folder::{light_rows, run_verify_config};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use datagen::prompts::{PromptFields, read_prompts};
use datagen::run::{DEFAULT_TEMPLATE, Progress, RunConfig, Sampling, now, read_manifest, run, write_manifest};
use datagen::schema::Row;
use datagen::scoring::Keep;
use datagen::store;
use datagen::teacher::ERROR_CLASSES;

use crate::VerifierOptions;

#[derive(Args)]
pub struct RunArgs {
    /// Prompts: JSONL or Parquet (file, folder or glob) with an id, a problem and a reference
    /// answer (see --id-field, --problem-field, --answer-field).
    #[arg(long)]
    prompts: PathBuf,
    /// API base of an OpenAI-compatible server, e.g. http://node0:8000/v1 (vLLM, SGLang) or
    /// https://api.deepseek.com/v1; repeat for several replicas of the teacher.
    #[arg(long = "endpoint", required_unless_present = "teacher")]
    endpoints: Vec<String>,
    /// `local:DIR`: run the HF checkpoint in DIR in-process (distill's generation) instead of a
    /// server, e.g. to evaluate a distilled student with `datagen stats`.
    #[arg(long, conflicts_with = "endpoints")]
    teacher: Option<String>,
    /// Device of the local teacher (flex, wgpu, cuda…).
    #[arg(long, requires = "teacher")]
    device: Option<String>,
    /// Local teacher: compute dtype (f32 everywhere; bf16 on cuda, metal and flex; f16 on GPUs).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"], requires = "teacher")]
    dtype: String,
    /// Local teacher: most sequences generated together (continuous batching, like vLLM's
    /// --max-num-seqs). Keep --concurrency at least this large so the batch can fill.
    #[arg(long, default_value_t = 16, requires = "teacher")]
    max_batch_size: usize,
    /// Model name the server knows the teacher by (e.g. deepseek-ai/DeepSeek-R1,
    /// deepseek-reasoner); for a local teacher, its folder by default.
    #[arg(long, required_unless_present = "teacher")]
    model: Option<String>,
    /// Run folder: data/ (Parquet shards), manifest.json. An existing folder is resumed.
    #[arg(long)]
    out: PathBuf,
    /// Samples per prompt.
    #[arg(long, default_value_t = 4)]
    samples: u32,
    /// Requests in flight across all endpoints.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 32768)]
    max_tokens: u64,
    /// R1's recommended sampling: temperature 0.6, top-p 0.95.
    #[arg(long, default_value_t = 0.6)]
    temperature: f64,
    #[arg(long, default_value_t = 0.95)]
    top_p: f64,
    /// The user turn; `{problem}` is replaced by the problem.
    #[arg(long, default_value = DEFAULT_TEMPLATE)]
    prompt_template: String,
    /// A system prompt (off by default: R1 is advised to run without one).
    #[arg(long)]
    system_prompt: Option<String>,
    /// Environment variable holding the API key (sent as a bearer token; never logged).
    #[arg(long)]
    api_key_env: Option<String>,
    #[arg(long, default_value = "id")]
    id_field: String,
    #[arg(long, default_value = "problem")]
    problem_field: String,
    #[arg(long, default_value = "answer")]
    answer_field: String,
    /// Ask for whole responses instead of server-sent events.
    #[arg(long)]
    no_stream: bool,
    /// Attempts after the first for 429, 5xx, timeouts, broken streams and connection errors.
    #[arg(long, default_value_t = 8)]
    max_retries: u32,
    /// Extra attempts for a completion cut by --max-tokens (0 keeps it as a rejected row).
    #[arg(long, default_value_t = 0)]
    length_retries: u32,
    /// Deadline of one request, in seconds (a 32k-token trace at 20 tokens/s takes ~27 min).
    #[arg(long, default_value_t = 3600)]
    request_timeout: u64,
    /// Seconds without a streamed chunk (or keep-alive) after which a request is given up and
    /// retried: a stalled stream.
    #[arg(long, default_value_t = 300)]
    stall_timeout: u64,
    /// How long to wait out an outage — every endpoint failing (refused connections, 5xx,
    /// stalls) — before samples start to fail: `30m`, `2h`, `90s`. Retries during an outage do
    /// not spend --max-retries.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    max_outage: Duration,
    /// Requests per minute at most (a hosted API's account limit); none by default.
    #[arg(long)]
    max_requests_per_minute: Option<u32>,
    /// Prompt + completion tokens per minute at most (a hosted API's account limit).
    #[arg(long)]
    max_tokens_per_minute: Option<u64>,
    /// Rows per Parquet shard.
    #[arg(long, default_value_t = 256)]
    shard_rows: usize,
    /// Take only part `I` of `N` of the prompts (`0/4` … `3/4`), chosen by a hash of each id, so
    /// that N processes or machines with their own --out share a prompt set without overlap;
    /// `datagen merge` joins their folders afterwards.
    #[arg(long, value_name = "I/N", value_parser = parse_shard)]
    prompt_shard: Option<(u64, u64)>,
    /// Add samples made with other sampling settings (model, temperature, top-p, max tokens,
    /// template) to a folder that holds some already; refused without it, so that settings never
    /// mix silently. Each sample's key carries its settings' hash either way.
    #[arg(long)]
    allow_mixed: bool,
    /// Ask again for the samples stored as failed: all of them, or those of the given reason
    /// classes (`context_length,server`; see `error_class`). Each is asked for once more, under
    /// its own key; the failed row is replaced by the new result.
    #[arg(long, num_args = 0..=1, default_missing_value = "all", value_name = "CLASSES")]
    retry_failed: Option<String>,
    /// The teacher's tokenizer folder (tokenizer.json, tokenizer_config.json): counts prompt and
    /// completion tokens when a server sends no usage (`usage_source = local`).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[command(flatten)]
    filters: FilterOptions,
    #[command(flatten)]
    verifier: VerifierOptions,
}

/// The progress bar of `datagen run`.
struct Bar {
    bar: ProgressBar,
    started: Instant,
    prompts: usize,
    samples: usize,
    accepted: usize,
    tokens: u64,
}

impl Progress for Bar {
    fn start(&mut self, samples: usize, prompts: usize) {
        self.bar.set_length(samples as u64);
        self.prompts = prompts;
        self.started = Instant::now();
    }

    fn sample(&mut self, row: &Row, prompts_done: usize) {
        self.samples += 1;
        self.accepted += row.accepted as usize;
        self.tokens += row.completion_tokens.unwrap_or(0);
        let seconds = self.started.elapsed().as_secs_f64().max(1e-9);
        self.bar.set_message(format!(
            "prompts {prompts_done}/{} | {:.2} samples/s | {:.0} tokens/s | accepted {:.0}%",
            self.prompts,
            self.samples as f64 / seconds,
            self.tokens as f64 / seconds,
            100.0 * self.accepted as f64 / self.samples as f64
        ));
        self.bar.inc(1);
    }

    fn finish(&mut self) {
        self.bar.finish();
    }
}

pub fn run_command(args: RunArgs) -> Result<()> {
    for endpoint in &args.endpoints {
        let url = reqwest::Url::parse(endpoint).with_context(|| format!("--endpoint {endpoint}: not a URL"))?;
        if !matches!(url.scheme(), "http" | "https") {
            bail!("--endpoint {endpoint}: expected an http:// or https:// API base");
        }
    }
    let api_key = match &args.api_key_env {
        Some(variable) => Some(std::env::var(variable).with_context(|| format!("--api-key-env {variable}: the variable is not set"))?),
        None => None,
    };
    if !args.prompt_template.contains("{problem}") {
        bail!("--prompt-template must contain {{problem}}");
    }
    if args.samples == 0 || args.concurrency == 0 {
        bail!("--samples and --concurrency must be at least 1");
    }
    let fields = PromptFields { id: args.id_field.clone(), problem: args.problem_field.clone(), answer: args.answer_field.clone() };
    let mut prompts = read_prompts(&args.prompts, &fields)?;
    if let Some((part, parts)) = args.prompt_shard {
        prompts.retain(|p| datagen::prompts::shard_of(&p.id, parts) == part);
        eprintln!("--prompt-shard {part}/{parts}: {} prompts", prompts.len());
    }
    let local = match &args.teacher {
        Some(spec) => {
            let dir = spec.strip_prefix("local:").with_context(|| format!("--teacher {spec}: expected local:DIR"))?;
            let teacher = datagen::teacher::local::LocalTeacher::load(Path::new(dir), args.device.as_deref(), &args.dtype, args.max_batch_size).map_err(anyhow::Error::msg)?;
            Some((dir.to_string(), std::sync::Arc::new(teacher)))
        }
        None => None,
    };
    let model = match (&args.model, &local) {
        (Some(model), _) => model.clone(),
        (None, Some((dir, _))) => dir.clone(),
        (None, None) => bail!("--model is required with --endpoint"),
    };
    let sampling = Sampling {
        model,
        temperature: args.temperature,
        top_p: args.top_p,
        max_tokens: args.max_tokens,
        prompt_template: args.prompt_template.clone(),
        system_prompt: args.system_prompt.clone(),
    };
    let score_options = args.filters.score_options()?;
    let retry_classes = match args.retry_failed.as_deref() {
        None => None,
        Some("all") => Some(Vec::new()),
        Some(list) => Some(
            list.split(',')
                .map(|c| c.trim().to_string())
                .map(|c| if ERROR_CLASSES.contains(&c.as_str()) { Ok(c) } else { Err(anyhow::anyhow!("--retry-failed: unknown class `{c}` (expected all, or some of {})", ERROR_CLASSES.join(", "))) })
                .collect::<Result<Vec<_>>>()?,
        ),
    };
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let _lock = store::lock(&args.out)?;
    let previous = read_manifest(&args.out).ok();
    let mut generation = previous.as_ref().and_then(|m| m["generation"].as_u64()).unwrap_or(0) as u32;
    let data = args.out.join("data");
    // Samples stored under other settings (whatever the history says of runs that stored none)
    // are refused before anything is written.
    let stored_hashes = if data.exists() { store::settings_hashes(&data, generation)? } else { Default::default() };
    let other = stored_hashes.iter().find(|h| **h != sampling.hash());
    if let Some(other) = other
        && !args.allow_mixed
    {
        let earlier = previous
            .as_ref()
            .and_then(|m| m["runs"].as_array().and_then(|runs| runs.iter().find(|r| r["sampling_hash"] == **other).map(|r| r["sampling"].clone())))
            .or_else(|| previous.as_ref().filter(|m| m["sampling_hash"] == **other).map(|m| m["sampling"].clone()))
            .unwrap_or_else(|| json!(format!("settings hash {other}")));
        bail!(
            "{} holds samples made with other sampling settings ({earlier}); this run's are {}. Use another --out, or --allow-mixed to add these beside them",
            args.out.display(),
            json!(sampling)
        );
    }
    if let (Some(classes), Some(manifest)) = (&retry_classes, &previous) {
        // Only the failed samples this run asks for again: its prompts, sample indices and settings.
        let hash = sampling.hash();
        let wanted: HashSet<String> =
            prompts.iter().flat_map(|p| (0..args.samples).map(|i| datagen::run::key(&p.id, i, &hash)).collect::<Vec<_>>()).collect();
        let (next, count) = datagen::folder::drop_failed(&args.out, generation, classes, &wanted, args.shard_rows, manifest.clone())?;
        let which = if classes.is_empty() { "all".to_string() } else { classes.join(", ") };
        eprintln!("--retry-failed {which}: {count} failed samples to ask for again");
        generation = next;
    }
    let created_at = previous.as_ref().and_then(|m| m["created_at"].as_str().map(String::from)).unwrap_or_else(now);
    // Every earlier run's settings, kept in order; this run's entry is added (and updated) last.
    let mut history: Vec<serde_json::Value> = previous.as_ref().and_then(|m| m["runs"].as_array().cloned()).unwrap_or_default();
    if history.is_empty()
        && let Some(m) = &previous
        && m.get("sampling_hash").is_some()
    {
        // A folder written before the history existed: its last run is its first entry.
        history.push(json!({"started_at": m["updated_at"], "sampling": m["sampling"], "sampling_hash": m["sampling_hash"], "samples_per_prompt": m["samples_per_prompt"], "status": m["status"]}));
    }
    let started_at = now();
    let manifest = |status: &str, summary: Option<&datagen::run::Summary>| {
        json!({
            "tool": concat!("datagen ", env!("CARGO_PKG_VERSION")),
            "created_at": created_at,
            "updated_at": now(),
            "status": status,
            "generation": generation,
            "prompts": {"path": args.prompts, "count": prompts.len(), "id_field": args.id_field, "problem_field": args.problem_field, "answer_field": args.answer_field, "shard": args.prompt_shard.map(|(i, n)| format!("{i}/{n}"))},
            "teacher": {"endpoints": args.endpoints, "local": args.teacher, "max_batch_size": args.teacher.as_ref().map(|_| args.max_batch_size), "dtype": args.teacher.as_ref().map(|_| &args.dtype), "api_key_env": args.api_key_env, "stream": !args.no_stream},
            "sampling": sampling,
            "sampling_hash": sampling.hash(),
            "samples_per_prompt": args.samples,
            "retries": {"max_retries": args.max_retries, "length_retries": args.length_retries, "request_timeout_s": args.request_timeout, "stall_timeout_s": args.stall_timeout, "max_outage_s": args.max_outage.as_secs()},
            "scoring": score_options,
            "verifier": datagen::scoring::VERIFIER,
            "verify_config": args.verifier.config(),
            "summary": summary,
            "runs": history.iter().cloned().chain([json!({
                "started_at": started_at, "sampling": sampling, "sampling_hash": sampling.hash(),
                "samples_per_prompt": args.samples, "retry_failed": args.retry_failed, "status": status, "summary": summary,
            })]).collect::<Vec<_>>(),
        })
    };
    write_manifest(&args.out, &manifest("running", None))?;
    let config = RunConfig {
        out: args.out.clone(),
        endpoints: args.endpoints.clone(),
        api_key,
        sampling: sampling.clone(),
        samples: args.samples,
        concurrency: args.concurrency,
        stream: !args.no_stream,
        max_retries: args.max_retries,
        length_retries: args.length_retries,
        request_timeout: Duration::from_secs(args.request_timeout.max(1)),
        stall_timeout: Duration::from_secs(args.stall_timeout.max(1)),
        max_outage: args.max_outage,
        max_requests_per_minute: args.max_requests_per_minute,
        max_tokens_per_minute: args.max_tokens_per_minute,
        backoff_base: Duration::from_millis(500),
        backoff_cap: Duration::from_secs(60),
        score: score_options.clone(),
        verify: args.verifier.config(),
        shard_rows: args.shard_rows,
        generation,
        local: local.map(|(_, teacher)| teacher),
        tokenizer: match &args.tokenizer {
            Some(dir) => Some(std::sync::Arc::new(
                distill::text::Tokenizer::from_dir(dir).with_context(|| format!("--tokenizer {}", dir.display()))?,
            )),
            None => None,
        },
    };
    let bar = ProgressBar::new(0);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} samples {msg} [{elapsed} < {eta}]").expect("static template"));
    let mut progress = Bar { bar, started: Instant::now(), prompts: 0, samples: 0, accepted: 0, tokens: 0 };
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(run(&prompts, config, &mut progress, async {
        let _ = tokio::signal::ctrl_c().await;
    }));
    let summary = match result {
        Ok(summary) => summary,
        Err(error) => {
            write_manifest(&args.out, &manifest("stopped", None))?;
            return Err(error.into());
        }
    };
    let status = if summary.interrupted { "interrupted" } else { "complete" };
    write_manifest(&args.out, &manifest(status, Some(&summary)))?;
    eprintln!(
        "{status}: {} samples stored this run ({} accepted, {} failed), {} were already done; data in {}",
        summary.stored, summary.accepted, summary.failed, summary.already_done, args.out.join("data").display()
    );
    if summary.interrupted {
        eprintln!("run the same command again to continue");
    }
    Ok(())
}

/// `I/N` with I < N.
fn parse_shard(text: &str) -> Result<(u64, u64), String> {
    let (part, parts) = text.split_once('/').ok_or_else(|| format!("`{text}`: expected I/N, e.g. 0/4"))?;
    let (part, parts) = (part.trim().parse::<u64>(), parts.trim().parse::<u64>());
    match (part, parts) {
        (Ok(part), Ok(parts)) if part < parts => Ok((part, parts)),
        _ => Err(format!("`{text}`: expected I/N with 0 ≤ I < N, e.g. 0/4")),
    }
}

/// `90s`, `30m`, `2h` or plain seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len()));
    let value: f64 = number.parse().map_err(|_| format!("`{text}`: expected a duration such as 90s, 30m or 2h"))?;
    let seconds = match unit {
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("`{text}`: the unit must be s, m or h")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("`{text}`: not a duration this program can wait"))
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    run: RunArgs,
}

/// `datagen eval`: a run with R1's evaluation protocol (every sample kept, whatever the filters),
/// then its scoreboard, printed and written to `OUT/scoreboard.json`.
pub fn eval_command(mut args: EvalArgs) -> Result<()> {
    args.run.filters.keep = Keep::All;
    let out = args.run.out.clone();
    run_command(args.run)?;
    let manifest = read_manifest(&out)?;
    if manifest["status"] != "complete" {
        eprintln!("the run did not finish ({}); the scoreboard covers the samples stored so far", manifest["status"]);
    }
    let rows = light_rows(&out)?;
    let board = datagen::scoring::scoreboard(&rows, &run_verify_config(&out))
        .context("no prompt has a reference answer: nothing to score (see --answer-field)")?;
    let text = serde_json::to_string_pretty(&board)?;
    store::write_atomically(&out.join("scoreboard.json"), |file| std::io::Write::write_all(file, text.as_bytes()).map_err(|e| e.to_string()))?;
    let line = |name: &str, s: &datagen::scoring::Scores| {
        println!(
            "{name:<32} {:>7} {:>8} {:>7} {:>8.1}% {:>8.1}% {:>8.1}%",
            s.prompts, s.samples, s.failed, 100.0 * s.pass_at_1, 100.0 * s.pass_at_k, 100.0 * s.cons_at_k
        )
    };
    let k = board.overall.k;
    println!("{:<32} {:>7} {:>8} {:>7} {:>9} {:>9} {:>9}", "source", "prompts", "samples", "failed", "pass@1", format!("pass@{k}"), format!("cons@{k}"));
    for (source, scores) in &board.by_source {
        line(source, scores);
    }
    line("all", &board.overall);
    eprintln!("scoreboard written to {}", out.join("scoreboard.json").display());
    Ok(())
}
