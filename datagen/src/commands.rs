//! `datagen run`, `rescore`, `stats` and `export`: the command-line side of [`datagen::run`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use datagen::filters::{self, Filter, FilterConfig};
use datagen::prompts::{PromptFields, read_prompts};
use datagen::run::{DEFAULT_TEMPLATE, Progress, RunConfig, Sampling, now, read_manifest, run, write_manifest};
use datagen::schema::Row;
use datagen::scoring::{Keep, ScoreOptions, score};
use datagen::store;
use distill::benchmark::run_reference;
use datagen::teacher::ERROR_CLASSES;
use datagen::teacher::pool::percentile;

use crate::VerifierOptions;

#[derive(Args)]
pub struct FilterOptions {
    /// R1's chain-of-thought filters to apply, comma-separated: language-mixing,
    /// long-paragraph, code-block, repetition, incomplete, length; `all` or `none`.
    #[arg(long, default_value = "all")]
    filters: String,
    /// A paragraph longer than this many characters fails `long-paragraph`.
    #[arg(long, default_value_t = 4000)]
    max_paragraph_chars: usize,
    /// Completion-token bounds of the `length` filter.
    #[arg(long, default_value_t = 1)]
    min_completion_tokens: u64,
    #[arg(long)]
    max_completion_tokens: Option<u64>,
    /// Which samples are accepted: `correct` (verified and filtered: R1's rejection sampling),
    /// `all` (filtered only), or verdict classes, e.g. `correct,unparsable`.
    #[arg(long, default_value = "correct")]
    keep: Keep,
}

impl FilterOptions {
    fn score_options(&self) -> Result<ScoreOptions> {
        let enabled = match self.filters.trim() {
            "all" => filters::ALL.to_vec(),
            "none" => Vec::new(),
            list => list.split(',').map(|name| name.trim().parse::<Filter>()).collect::<Result<Vec<_>, _>>().map_err(anyhow::Error::msg)?,
        };
        Ok(ScoreOptions {
            keep: self.keep.clone(),
            filters: FilterConfig {
                enabled,
                max_paragraph_chars: self.max_paragraph_chars,
                min_tokens: self.min_completion_tokens,
                max_tokens: self.max_completion_tokens.unwrap_or(u64::MAX),
                ..FilterConfig::default()
            },
        })
    }
}

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
        generation = drop_failed(&args.out, generation, classes, &wanted, args.shard_rows, manifest.clone())?;
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

#[derive(Args)]
pub struct MergeArgs {
    /// The new run folder (must not exist yet).
    #[arg(long)]
    out: PathBuf,
    /// Run folders to join, e.g. the parts of a `--prompt-shard` run.
    #[arg(required = true, num_args = 1..)]
    dirs: Vec<PathBuf>,
}

/// Joins run folders into a new one: every stored sample once (a key in two folders is taken
/// from the first that has it; two different rows under one key are an error), the manifests'
/// run histories kept. Written beside `--out` and renamed into place when complete.
pub fn merge_command(args: MergeArgs) -> Result<()> {
    if args.out.exists() {
        bail!("--out {} exists; merge writes a new folder", args.out.display());
    }
    let name = args.out.file_name().and_then(|n| n.to_str()).context("--out names no folder")?;
    let staging = args.out.with_file_name(format!(".{name}.merging"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))?;
    }
    let written = (|| -> Result<usize> {
        std::fs::create_dir_all(staging.join("data"))?;
        // Per key: the folder it came from and a digest of what was stored, so that memory holds
        // keys, never traces.
        let mut seen: HashMap<String, (usize, [u8; 32])> = HashMap::new();
        let mut writer = store::GenerationWriter::new(&staging.join("data"), 0, 256)?;
        let mut runs = Vec::new();
        let mut first_manifest = None;
        for (index, dir) in args.dirs.iter().enumerate() {
            let _lock = store::lock(dir)?; // nobody writes a folder while it is merged
            let manifest = read_manifest(dir).with_context(|| format!("{} is not a datagen run folder", dir.display()))?;
            let generation = manifest["generation"].as_u64().unwrap_or(0) as u32;
            let mut conflict = None;
            store::for_each_row(&dir.join("data"), generation, |row| {
                use sha2::Digest;
                // What was stored: the status, the error and the conversation (old shards' separate
                // reasoning/content columns are read back from it too, so they are not compared).
                let stored = (&row.status, &row.error, row.messages.as_ref().and_then(|m| m.last()).map(|m| &m.content));
                let digest: [u8; 32] = sha2::Sha256::digest(serde_json::to_vec(&stored).unwrap_or_default()).into();
                match seen.get(&row.key) {
                    Some((_, same)) if *same == digest => Ok(()),
                    Some((other, _)) => {
                        conflict.get_or_insert((row.key.clone(), *other));
                        Ok(())
                    }
                    None => {
                        seen.insert(row.key.clone(), (index, digest));
                        writer.push(row)
                    }
                }
            })?;
            if let Some((key, other)) = conflict {
                bail!("key {key} is stored differently in {} and {}", args.dirs[other].display(), dir.display());
            }
            runs.extend(manifest["runs"].as_array().cloned().unwrap_or_default());
            first_manifest.get_or_insert(manifest);
        }
        let count = writer.finish()?;
        let mut manifest = first_manifest.context("no folders")?;
        manifest["generation"] = json!(0);
        manifest["runs"] = json!(runs);
        manifest["merged_from"] = json!(args.dirs);
        manifest["merged_at"] = json!(now());
        manifest["prompts"]["shard"] = serde_json::Value::Null;
        write_manifest(&staging, &manifest)?;
        Ok(count)
    })();
    match written {
        Ok(count) => {
            std::fs::rename(&staging, &args.out).with_context(|| format!("renaming {} to {}", staging.display(), args.out.display()))?;
            eprintln!("merged {count} samples from {} folders into {}", args.dirs.len(), args.out.display());
            Ok(())
        }
        Err(error) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(error)
        }
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

/// Removes the failed rows of `classes` (every class when empty) among the keys this run asks
/// for (`wanted`) from the run in `out`, as a new
/// generation written beside the current one and switched to atomically, so that the run asks
/// for those samples again, under the same keys. Returns the generation to write to.
fn drop_failed(
    out: &Path,
    generation: u32,
    classes: &[String],
    wanted: &HashSet<String>,
    shard_rows: usize,
    mut manifest: serde_json::Value,
) -> Result<u32> {
    let data = out.join("data");
    let retried = |row: &Row| {
        row.status == "failed"
            && wanted.contains(&row.key)
            && (classes.is_empty() || row.error_class.as_ref().is_some_and(|c| classes.contains(c)))
    };
    let mut count = 0;
    store::for_each_row(&data, generation, |row| {
        count += usize::from(retried(&row));
        Ok(())
    })?;
    let which = if classes.is_empty() { "all".to_string() } else { classes.join(", ") };
    eprintln!("--retry-failed {which}: {count} failed samples to ask for again");
    if count == 0 {
        return Ok(generation);
    }
    let mut next = generation;
    store::rewrite_with(
        &data,
        generation,
        shard_rows,
        |writer| store::for_each_row(&data, generation, |row| if retried(&row) { Ok(()) } else { writer.push(row) }),
        |g| {
            next = g;
            manifest["generation"] = json!(g);
            manifest["retried_failed_at"] = json!(now());
            write_manifest(out, &manifest)
        },
    )?;
    Ok(next)
}

fn generation(out: &Path) -> Result<u32> {
    let manifest = read_manifest(out).with_context(|| format!("{} is not a datagen run folder", out.display()))?;
    Ok(manifest["generation"].as_u64().unwrap_or(0) as u32)
}

#[derive(Args)]
pub struct RescoreArgs {
    /// Run folder written by `datagen run`.
    dir: PathBuf,
    #[command(flatten)]
    filters: FilterOptions,
    #[command(flatten)]
    verifier: VerifierOptions,
}

/// Re-verifies and re-filters every stored sample with the given options; never calls the
/// teacher.
pub fn rescore_command(args: RescoreArgs) -> Result<()> {
    generation(&args.dir)?; // a run folder, before a lock file is made in it
    let _lock = store::lock(&args.dir)?;
    let from = generation(&args.dir)?;
    let data = args.dir.join("data");
    store::remove_other_generations(&data, from)?;
    let options = args.filters.score_options()?;
    let verify = args.verifier.config();
    let (mut before, mut after, mut count) = (0, 0, 0);
    let mut manifest = read_manifest(&args.dir)?;
    store::rewrite_with(
        &data,
        from,
        256,
        |writer| {
            store::for_each_row(&data, from, |mut row| {
                before += row.accepted as usize;
                score(&mut row, &options, &verify);
                after += row.accepted as usize;
                count += 1;
                writer.push(row)
            })
        },
        |generation| {
            manifest["generation"] = json!(generation);
            manifest["scoring"] = json!(options);
            manifest["verify_config"] = json!(verify);
            manifest["rescored_at"] = json!(now());
            write_manifest(&args.dir, &manifest)
        },
    )?;
    eprintln!("rescored {count} samples: {before} → {after} accepted");
    Ok(())
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

#[derive(Args)]
pub struct StatsArgs {
    /// Run folder written by `datagen run`.
    dir: PathBuf,
    /// Print the figures as one JSON object.
    #[arg(long)]
    json: bool,
}

/// The verifier settings the run (or its last rescore) judged with, for grouping cons@k votes the
/// same way; the defaults for folders written before they were recorded.
fn run_verify_config(dir: &Path) -> datagen::verify::VerifyConfig {
    read_manifest(dir).ok().and_then(|m| serde_json::from_value(m["verify_config"].clone()).ok()).unwrap_or_default()
}

/// Every stored row of a run without its texts (problem, reasoning, answer, conversation): what
/// the figures need, streamed, so that memory holds no trace.
fn light_rows(dir: &Path) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    store::for_each_row(&dir.join("data"), generation(dir)?, |mut row| {
        row.problem = String::new();
        row.reasoning = None;
        row.messages = None;
        // The answer's emptiness is all the figures read of it.
        row.content = row.content.map(|c| if c.trim().is_empty() { String::new() } else { "…".into() });
        rows.push(row);
        Ok(())
    })?;
    Ok(rows)
}

pub fn stats_command(args: StatsArgs) -> Result<()> {
    let rows = light_rows(&args.dir)?;
    let ok: Vec<&Row> = rows.iter().filter(|r| r.status == "ok").collect();
    let verified: Vec<&Row> = ok.iter().copied().filter(|r| r.correct.is_some()).collect();
    let correct = verified.iter().filter(|r| r.correct == Some(true)).count();
    let mut filters: BTreeMap<String, usize> = BTreeMap::new();
    let mut finish: BTreeMap<String, usize> = BTreeMap::new();
    let mut parsers: BTreeMap<String, usize> = BTreeMap::new();
    let mut verdicts: BTreeMap<String, usize> = BTreeMap::new();
    let mut endpoints: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for row in &rows {
        for name in &row.filters_failed {
            *filters.entry(name.clone()).or_default() += 1;
        }
        *finish.entry(row.finish_reason.clone().unwrap_or_else(|| "-".into())).or_default() += 1;
        *parsers.entry(row.reasoning_parser.clone().unwrap_or_else(|| "-".into())).or_default() += 1;
        if let Some(verdict) = &row.verdict {
            *verdicts.entry(verdict.clone()).or_default() += 1;
        }
        if let (Some(endpoint), Some(latency)) = (&row.endpoint, row.latency_ms) {
            endpoints.entry(endpoint.clone()).or_default().push(latency);
        }
    }
    let mut tokens: Vec<u64> = ok.iter().filter_map(|r| r.completion_tokens).collect();
    tokens.sort_unstable();
    let (pass_at_1, cons_at_k, prompts_scored) = datagen::scoring::pass_and_consensus(&rows, &run_verify_config(&args.dir));
    let samples_per_prompt = {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for row in &ok {
            *counts.entry(&row.id).or_default() += 1;
        }
        counts.values().copied().max().unwrap_or(0)
    };
    let endpoint_stats: Vec<serde_json::Value> = endpoints
        .iter_mut()
        .map(|(endpoint, latencies)| {
            latencies.sort_unstable();
            json!({"endpoint": endpoint, "samples": latencies.len(), "latency_ms_p50": percentile(latencies, 0.5), "latency_ms_p90": percentile(latencies, 0.9)})
        })
        .collect();
    let report = json!({
        "samples": rows.len(),
        "failed": rows.len() - ok.len(),
        "accepted": rows.iter().filter(|r| r.accepted).count(),
        "verified": verified.len(),
        "pass_rate": (!verified.is_empty()).then(|| correct as f64 / verified.len() as f64),
        "pass_at_1": pass_at_1,
        "cons_at_k": cons_at_k,
        "k": samples_per_prompt,
        "prompts_scored": prompts_scored,
        "verdicts": verdicts,
        "filters_failed": filters,
        "finish_reasons": finish,
        "reasoning_parsers": parsers,
        "completion_tokens": {"p50": percentile(&tokens, 0.5), "p90": percentile(&tokens, 0.9), "p99": percentile(&tokens, 0.99), "max": tokens.last()},
        "endpoints": endpoint_stats,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let percent = |v: &serde_json::Value| v.as_f64().map_or("-".to_string(), |v| format!("{:.1}%", 100.0 * v));
    println!("samples          {} ({} failed requests, {} accepted)", report["samples"], report["failed"], report["accepted"]);
    println!("pass rate        {} of {} verified samples", percent(&report["pass_rate"]), verified.len());
    println!("verdicts         {}", if verdicts.is_empty() { "-".into() } else { verdicts.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ") });
    println!("pass@1           {} over {} prompts", percent(&report["pass_at_1"]), prompts_scored);
    println!("cons@{:<3}         {}", samples_per_prompt, percent(&report["cons_at_k"]));
    println!("filters failed   {}", if filters.is_empty() { "none".into() } else { filters.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ") });
    println!("finish reasons   {}", finish.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "));
    println!("reasoning from   {}", parsers.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "));
    let show = |v: &serde_json::Value| v.as_u64().map_or("-".to_string(), |v| v.to_string());
    let t = &report["completion_tokens"];
    println!("completion tokens p50 {} p90 {} p99 {} max {}", show(&t["p50"]), show(&t["p90"]), show(&t["p99"]), show(&t["max"]));
    for endpoint in &endpoint_stats {
        println!(
            "endpoint         {} {} samples, latency p50 {} ms p90 {} ms",
            endpoint["endpoint"].as_str().unwrap_or("-"), endpoint["samples"], show(&endpoint["latency_ms_p50"]), show(&endpoint["latency_ms_p90"])
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct ExportArgs {
    /// Run folder written by `datagen run`.
    dir: PathBuf,
    /// `open-r1`: one row per problem with every column of open-r1's OpenR1-Math-220k
    /// (`problem, solution, answer, problem_type, question_type, source, uuid,
    /// is_reasoning_complete, generations, correctness_math_verify, correctness_llama,
    /// finish_reasons, correctness_count, messages`); see datasets/SCHEMA.md.
    #[arg(long, value_parser = ["open-r1"], default_value = "open-r1")]
    format: String,
    /// The Parquet file to write.
    #[arg(long)]
    out: PathBuf,
    /// Split the export into files of at most this many problems, named after --out with a
    /// number (`r1-00000.parquet`, `r1-00001.parquet`, …), as Hub datasets are sharded.
    #[arg(long)]
    max_problems_per_file: Option<usize>,
}

/// Samples of incomplete problems `export` holds before it spills them to bucket files.
const SPILL_BYTES: usize = 256 << 20;
/// Bucket files of a spilled export: each holds about 1/64 of the rows still to group.
const SPILL_BUCKETS: u64 = 64;

/// The open-r1 export's output: one file, or numbered files of at most `per_file` problems.
struct OpenR1Files {
    out: PathBuf,
    per_file: Option<usize>,
    file: store::ParquetStream<datagen::schema::OpenR1Row>,
    path: PathBuf,
    files: Vec<(usize, PathBuf)>,
    problems: usize,
    with_messages: usize,
}

impl OpenR1Files {
    fn open(out: &Path, per_file: Option<usize>, index: usize) -> Result<(store::ParquetStream<datagen::schema::OpenR1Row>, PathBuf), store::StoreError> {
        let path = if per_file.is_some() { export_shard(out, index) } else { out.to_path_buf() };
        store::ParquetStream::create(&path, datagen::schema::open_r1_schema(), 16).map(|file| (file, path))
    }

    fn create(out: &Path, per_file: Option<usize>) -> Result<OpenR1Files, store::StoreError> {
        let (file, path) = Self::open(out, per_file, 0)?;
        Ok(OpenR1Files { out: out.to_path_buf(), per_file, file, path, files: Vec::new(), problems: 0, with_messages: 0 })
    }

    fn push(&mut self, problem: datagen::schema::OpenR1Row) -> Result<(), store::StoreError> {
        self.with_messages += usize::from(problem.messages.is_some());
        self.problems += 1;
        self.file.push(problem)?;
        if self.per_file.is_some_and(|n| self.file.rows >= n) {
            let (next, next_path) = Self::open(&self.out, self.per_file, self.files.len() + 1)?;
            let full = std::mem::replace(&mut self.file, next).finish()?;
            self.files.push((full, std::mem::replace(&mut self.path, next_path)));
        }
        Ok(())
    }

    /// The files written (problems, path), problems and those with `messages`.
    fn finish(mut self) -> Result<(Vec<(usize, PathBuf)>, usize, usize), store::StoreError> {
        if self.file.rows > 0 || self.files.is_empty() {
            self.files.push((self.file.finish()?, self.path));
        }
        Ok((self.files, self.problems, self.with_messages))
    }
}

/// Rows of an export spilled to bucket files by a hash of their problem id (JSON lines, the trace
/// once), beside the output and removed when drained or dropped.
struct Spill {
    dir: PathBuf,
    buckets: Vec<std::io::BufWriter<std::fs::File>>,
}

impl Spill {
    fn create(out: &Path) -> std::io::Result<Spill> {
        let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("export");
        let dir = out.with_file_name(format!(".{name}.spill"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let buckets = (0..SPILL_BUCKETS)
            .map(|b| std::fs::File::create(dir.join(format!("{b:02}.jsonl"))).map(std::io::BufWriter::new))
            .collect::<std::io::Result<_>>()?;
        Ok(Spill { dir, buckets })
    }

    fn write(&mut self, row: &Row) -> Result<(), store::StoreError> {
        let bucket = datagen::prompts::shard_of(&row.id, SPILL_BUCKETS) as usize;
        let error = |e: &dyn std::fmt::Display| store::StoreError::File { path: self.dir.clone(), message: e.to_string() };
        let writer = &mut self.buckets[bucket];
        serde_json::to_writer(&mut *writer, row).map_err(|e| error(&e))?;
        std::io::Write::write_all(writer, b"\n").map_err(|e| error(&e))
    }

    /// Calls `each` with every problem's samples, one bucket in memory at a time.
    fn drain(mut self, mut each: impl FnMut(Vec<Row>) -> Result<(), store::StoreError>) -> Result<(), store::StoreError> {
        let error = |e: &dyn std::fmt::Display| store::StoreError::File { path: self.dir.clone(), message: e.to_string() };
        for writer in &mut self.buckets {
            std::io::Write::flush(writer).map_err(|e| error(&e))?;
        }
        for b in 0..SPILL_BUCKETS {
            let path = self.dir.join(format!("{b:02}.jsonl"));
            let mut groups: BTreeMap<String, Vec<Row>> = BTreeMap::new();
            let text = std::fs::read(&path).map_err(|e| error(&e))?;
            for line in text.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
                let mut row: Row = serde_json::from_slice(line).map_err(|e| error(&e))?;
                row.derive_trace();
                groups.entry(row.id.clone()).or_default().push(row);
            }
            for samples in groups.into_values() {
                each(samples)?;
            }
            let _ = std::fs::remove_file(&path);
        }
        Ok(())
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `index`-th file of a sharded export: `out`'s stem with the number, beside it.
fn export_shard(out: &Path, index: usize) -> PathBuf {
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("export");
    out.with_file_name(format!("{stem}-{index:05}.parquet"))
}

pub fn export_command(args: ExportArgs) -> Result<()> {
    // `solution`, `problem_type` and `question_type` come from the prompt file the run recorded,
    // when it is still there.
    let manifest = read_manifest(&args.dir)?;
    let mut info = HashMap::new();
    if let Some(path) = manifest["prompts"]["path"].as_str() {
        let field = |name: &str, default: &str| manifest["prompts"][name].as_str().unwrap_or(default).to_string();
        let fields = PromptFields { id: field("id_field", "id"), problem: field("problem_field", "problem"), answer: field("answer_field", "answer") };
        match read_prompts(Path::new(path), &fields) {
            Ok(prompts) => {
                for p in prompts {
                    info.insert(p.id, datagen::schema::ProblemInfo { solution: p.solution, problem_type: p.problem_type, question_type: p.question_type });
                }
            }
            Err(e) => eprintln!("the run's prompt file is not readable ({e}); `solution`, `problem_type` and `question_type` are left null"),
        }
    }
    // Pass 1: how many successful samples each problem has. Pass 2: samples gathered per problem,
    // each problem written as soon as its last sample is read, in row groups of 16 problems, so
    // that memory holds the problems whose samples are still coming (about --concurrency
    // samples, as a run stores them in prompt order), never the whole run.
    let (data, generation) = (args.dir.join("data"), generation(&args.dir)?);
    let mut expected: HashMap<String, usize> = HashMap::new();
    store::for_each_row(&data, generation, |row| {
        if row.status == "ok" {
            *expected.entry(row.id).or_default() += 1;
        }
        Ok(())
    })?;
    if expected.is_empty() {
        bail!("{}: no successful samples to export", args.dir.display());
    }
    let per_file = args.max_problems_per_file.filter(|&n| n > 0);
    let mut out = OpenR1Files::create(&args.out, per_file)?;
    // Samples of problems not yet complete; past SPILL_BYTES of them (a problem's samples spread
    // over early and late shards, after a resume with more samples or --retry-failed), they and
    // every later row go to bucket files by problem, exported one bucket at a time.
    let spill_limit = std::env::var("DATAGEN_EXPORT_SPILL_BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(SPILL_BYTES);
    let mut open: HashMap<String, Vec<Row>> = HashMap::new();
    let (mut open_bytes, mut spill): (usize, Option<Spill>) = (0, None);
    store::for_each_row(&data, generation, |row| {
        if row.status != "ok" {
            return Ok(());
        }
        if let Some(spill) = &mut spill {
            return spill.write(&row);
        }
        let id = row.id.clone();
        open_bytes += store::row_bytes(&row);
        let samples = open.entry(id.clone()).or_default();
        samples.push(row);
        // A sample stored between the two passes (a run beside the export) leaves its problem to
        // the end, where what is open is written.
        if expected.get(&id).is_some_and(|&n| samples.len() == n) {
            let samples = open.remove(&id).unwrap_or_default();
            open_bytes -= samples.iter().map(store::row_bytes).sum::<usize>();
            out.push(datagen::schema::open_r1_row(samples, info.get(&id)))?;
        } else if open_bytes > spill_limit {
            let mut buckets = Spill::create(&args.out).map_err(|e| store::StoreError::File { path: args.out.clone(), message: e.to_string() })?;
            for row in open.drain().flat_map(|(_, rows)| rows) {
                buckets.write(&row)?;
            }
            spill = Some(buckets);
        }
        Ok(())
    })?;
    for (id, samples) in open {
        out.push(datagen::schema::open_r1_row(samples, info.get(&id)))?;
    }
    if let Some(spill) = spill {
        spill.drain(|samples| {
            let id = samples[0].id.clone();
            out.push(datagen::schema::open_r1_row(samples, info.get(&id)))
        })?;
    }
    let (files, problems, with_messages) = out.finish()?;
    if problems == 0 {
        bail!("{}: no successful samples to export (the run changed while it was read?)", args.dir.display());
    }
    // Numbered files of an earlier, larger export would mix with these when the folder is loaded.
    if per_file.is_some() {
        let mut index = files.len();
        while export_shard(&args.out, index).exists() {
            std::fs::remove_file(export_shard(&args.out, index)).with_context(|| format!("removing {}", export_shard(&args.out, index).display()))?;
            index += 1;
        }
    }
    eprintln!("wrote {problems} problems ({with_messages} with an accepted generation in `messages`) to {} file(s):", files.len());
    for (rows, path) in &files {
        eprintln!("  {} ({rows} problems)", path.display());
    }
    Ok(())
}

#[derive(Args)]
pub struct BenchClientArgs {
    /// Requests to make.
    #[arg(long, default_value_t = 5000)]
    requests: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Ask for whole responses instead of server-sent events.
    #[arg(long)]
    no_stream: bool,
    /// A command that makes the same requests with another client and prints one JSON line
    /// {"requests_per_s": …, "cpu_ms_per_request": …}; it is given --url, --requests,
    /// --concurrency (and --no-stream); e.g.
    /// `.venv/bin/python datagen/benches/reference_client.py`.
    #[arg(long)]
    reference: Option<String>,
}

/// CPU time (user + system) this process has used.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Serves until killed, printing its URL first.
pub fn serve_loopback() -> Result<()> {
    let server = datagen::teacher::loopback::serve(datagen::teacher::loopback::Behaviour { keep_alives: false, ..Default::default() }, HashMap::new());
    println!("{}", server.url());
    loop {
        std::thread::park();
    }
}

/// The client's overhead: a server in another process that answers at once, `requests`
/// chat completions through the same code `datagen run` uses, and the CPU this process spent.
pub fn bench_client(args: BenchClientArgs) -> Result<()> {
    use std::io::BufRead;
    let mut server = std::process::Command::new(std::env::current_exe()?)
        .arg("serve-loopback")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting the loopback server")?;
    let mut url = String::new();
    std::io::BufReader::new(server.stdout.take().context("server stdout")?).read_line(&mut url)?;
    let url = url.trim().to_string();
    let request = datagen::teacher::openai::ChatRequest {
        model: "bench".into(),
        messages: vec![("user".into(), "What is 1+1?".into())],
        temperature: 0.6,
        top_p: 0.95,
        max_tokens: 64,
        stream: !args.no_stream,
        seed: None,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let (cpu_before, started) = (cpu_seconds(), Instant::now());
    let failures = runtime.block_on(async {
        let http = reqwest::Client::builder().pool_max_idle_per_host(args.concurrency).build().expect("client");
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..args.requests {
            let permit = permits.clone().acquire_owned().await.expect("open semaphore");
            let (http, url, request) = (http.clone(), url.clone(), request.clone());
            tasks.spawn(async move {
                let result = datagen::teacher::openai::chat(&http, &url, None, &request, Duration::from_secs(60), Duration::from_secs(60)).await;
                drop(permit);
                result.is_err()
            });
            while tasks.try_join_next().is_some() {}
        }
        let mut failures = 0;
        while let Some(failed) = tasks.join_next().await {
            failures += failed.unwrap_or(true) as usize;
        }
        failures
    });
    let (seconds, cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu_before);
    println!("{} requests at concurrency {}, {}, {failures} failed", args.requests, args.concurrency, if args.no_stream { "whole responses" } else { "streamed" });
    let rate = args.requests as f64 / seconds;
    let cpu_ms = 1000.0 * cpu / args.requests as f64;
    println!("datagen  {rate:>9.0} requests/s   {cpu_ms:>6.3} ms CPU per request");
    let result = match &args.reference {
        Some(command) => (|| -> Result<()> {
            let reference = run_reference(&format!(
                "{command} --url {url} --requests {} --concurrency {}{}",
                args.requests, args.concurrency, if args.no_stream { " --no-stream" } else { "" }
            ))?;
            let value = |key: &str| reference[key].as_f64().with_context(|| format!("reference JSON lacks {key}"));
            let (reference_rate, reference_cpu) = (value("requests_per_s")?, value("cpu_ms_per_request")?);
            println!("python   {reference_rate:>9.0} requests/s   {reference_cpu:>6.3} ms CPU per request");
            println!("ratio    {:>9.2}× requests/s {:>6.2}× CPU per request (datagen / python; > 1 and < 1 are better)", rate / reference_rate, cpu_ms / reference_cpu);
            Ok(())
        })(),
        None => Ok(()),
    };
    let _ = server.kill();
    let _ = server.wait();
    result
}
