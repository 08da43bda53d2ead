//! `datagen`: the teacher side of the toolkit: sample reasoning traces from a teacher, verify
//! and filter them, store them as Parquet exactly once.

mod commands;

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::{Map, Value};

use datagen::verify::{Decimals, MultipleBoxed, VerifyConfig, verify};

#[derive(Parser)]
#[command(
    name = "datagen",
    version,
    about = "Reasoning-trace data generation: sample a teacher, verify and filter its traces, write Parquet",
    long_about = "Reasoning-trace data generation for R1-style distillation.\n\n\
        `datagen run` samples traces from a teacher behind an OpenAI-compatible API (vLLM, SGLang,\n\
        the DeepSeek API), verifies the answers, applies R1's filters and stores every sample\n\
        exactly once as Parquet (a killed run resumes). `datagen verify` checks answers with the\n\
        same native verifier.\n\n\
        Examples:\n  \
        datagen run --prompts datasets/math_prompts_sample100.jsonl --endpoint http://localhost:8000/v1 \\\n      \
        --model deepseek-ai/DeepSeek-R1 --samples 4 --out runs/r1-traces\n  \
        datagen stats runs/r1-traces\n  \
        echo '{\"id\": 1, \"gold\": \"\\\\frac{1}{2}\", \"pred\": \"so \\\\boxed{0.5}\"}' | datagen verify --input -\n  \
        datagen verify --input pairs.jsonl --output verdicts.jsonl --explain"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sample traces from the teacher for every prompt, verify, filter and store them (resumes).
    Run(commands::RunArgs),
    /// Re-verify and re-filter a run's samples with new options (no teacher calls).
    Rescore(commands::RescoreArgs),
    /// Pass rate, pass@1, cons@k, filter counts, token lengths and endpoint latency of a run.
    Stats(commands::StatsArgs),
    /// Write a run's samples in another layout (open-r1's per-problem Parquet).
    Export(commands::ExportArgs),
    /// Evaluate a model as R1 reports it: sample every prompt --samples times (R1's temperature 0.6,
    /// top-p 0.95), then pass@1, the unbiased pass@k and cons@k, overall and by source.
    Eval(commands::EvalArgs),
    /// Join run folders (e.g. the `--prompt-shard` parts of one run) into a new one, each sample once.
    Merge(commands::MergeArgs),
    /// Verify JSONL rows {gold, pred, …}; writes each row back with `verdict` (correct, wrong, no_answer, unparsable), `correct` and `extracted`.
    Verify(VerifyArgs),
    /// Benchmarks (not tests): the verifier's speed, the teacher client's overhead.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// A zero-latency OpenAI-compatible server on loopback (what `bench client` measures against).
    #[command(hide = true)]
    ServeLoopback,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Pairs per second of the verifier, against Math-Verify with --reference.
    Verify(BenchArgs),
    /// Requests per second and CPU per request of the teacher client at high concurrency.
    Client(commands::BenchClientArgs),
}

#[derive(Args)]
pub(crate) struct VerifierOptions {
    /// Several \boxed{} answers: `last` takes the last, `all-agree` requires them to agree.
    #[arg(long, default_value = "last", value_parser = ["last", "all-agree"])]
    multiple_boxed: String,
    /// Relative tolerance for answers that are not exact rationals.
    #[arg(long, default_value_t = 1e-10)]
    tolerance: f64,
    /// A decimal prediction of a value it cannot write exactly: `exact` refuses `0.333` for
    /// \frac13; `rounded` accepts the gold value rounded to the places shown (3+ significant digits).
    #[arg(long, value_enum, default_value = "exact")]
    decimals: Decimals,
    /// Time budget per pair, in milliseconds.
    #[arg(long, default_value_t = 200)]
    budget_ms: u64,
}

impl VerifierOptions {
    pub(crate) fn config(&self) -> VerifyConfig {
        VerifyConfig {
            multiple_boxed: if self.multiple_boxed == "all-agree" { MultipleBoxed::AllAgree } else { MultipleBoxed::Last },
            decimals: self.decimals,
            relative_tolerance: self.tolerance,
            time_budget: std::time::Duration::from_millis(self.budget_ms),
            ..VerifyConfig::default()
        }
    }
}

#[derive(Args)]
struct VerifyArgs {
    /// JSONL file of {gold, pred} rows (other fields are kept); `-` reads standard input.
    #[arg(long)]
    input: PathBuf,
    /// Where to write the rows; standard output by default.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Add `rule` (which rule decided), `source` (where the answer was found) and `explanation`.
    #[arg(long)]
    explain: bool,
    /// Field of the reference answer.
    #[arg(long, default_value = "gold")]
    gold_field: String,
    /// Field of the prediction: a bare answer or a whole response.
    #[arg(long, default_value = "pred")]
    pred_field: String,
    #[command(flatten)]
    options: VerifierOptions,
}

#[derive(Args)]
struct BenchArgs {
    /// JSONL rows {gold, pred} to time (default: the labelled table).
    #[arg(long, default_value = "tests/verifier/cases.jsonl")]
    cases: PathBuf,
    /// Passes over the rows.
    #[arg(long, default_value_t = 20)]
    repeats: usize,
    /// Field of the prediction: `pred` in the table, `response` in tests/verifier/model_written.jsonl.
    #[arg(long, default_value = "pred")]
    pred_field: String,
    /// A command that times Math-Verify on the same rows and prints one JSON line
    /// {"pairs_per_s": …}; e.g. `.venv/bin/python tests/verifier/math_verify_reference.py`.
    #[arg(long)]
    reference: Option<String>,
    #[command(flatten)]
    options: VerifierOptions,
}

fn main() -> Result<()> {
    let result = dispatch(Cli::parse().command);
    // The memory tests read this process's own peak (VmHWM: this program's pages only, not the
    // parent's that a child's rusage also counts after exec).
    if std::env::var_os("DATAGEN_REPORT_PEAK_RSS").is_some() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        if let Some(line) = status.lines().find(|l| l.starts_with("VmHWM:")) {
            eprintln!("peak RSS: {}", line.trim_start_matches("VmHWM:").trim());
        }
    }
    result
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Run(args) => commands::run_command(args),
        Command::Rescore(args) => commands::rescore_command(args),
        Command::Stats(args) => commands::stats_command(args),
        Command::Export(args) => commands::export_command(args),
        Command::Merge(args) => commands::merge_command(args),
        Command::Eval(args) => commands::eval_command(args),
        Command::Verify(args) => verify_command(args),
        Command::Bench(BenchCommand::Verify(args)) => bench(args),
        Command::Bench(BenchCommand::Client(args)) => commands::bench_client(args),
        Command::ServeLoopback => commands::serve_loopback(),
    }
}

fn verify_command(args: VerifyArgs) -> Result<()> {
    let input: Box<dyn Read> = if args.input.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(File::open(&args.input).with_context(|| format!("opening {}", args.input.display()))?)
    };
    let Some(path) = &args.output else {
        let mut output = BufWriter::new(std::io::stdout());
        verify_rows(&args, input, &mut output)?;
        return Ok(output.flush()?);
    };
    // Written beside the output and renamed into place when complete: a failure or a kill never
    // leaves half a file under the output's name.
    let name = path.file_name().and_then(|n| n.to_str()).context("--output names no file")?;
    let partial = path.with_file_name(format!(".{name}.partial"));
    let written = (|| -> Result<()> {
        let file = File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
        let mut output = BufWriter::new(file);
        verify_rows(&args, input, &mut output)?;
        output.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&partial, path).with_context(|| format!("renaming {} to {}", partial.display(), path.display()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

/// Verifies every JSONL row of `input` into `output`, in order; the number of rows.
fn verify_rows(args: &VerifyArgs, input: impl Read, output: &mut impl Write) -> Result<usize> {
    let config = args.options.config();
    let name = args.input.display().to_string();
    let mut rows = 0usize;
    for (index, line) in BufReader::new(input).lines().enumerate() {
        let line_number = index + 1;
        let line = line.with_context(|| format!("{name}:{line_number}: cannot read (invalid UTF-8?)"))?;
        if line.trim().is_empty() {
            continue;
        }
        let mut row: Map<String, Value> = match serde_json::from_str(&line) {
            Ok(Value::Object(row)) => row,
            Ok(_) => bail!("{name}:{line_number}: expected a JSON object"),
            Err(e) => bail!("{name}:{line_number}: not valid JSON: {e}"),
        };
        let field = |row: &Map<String, Value>, field: &str| -> Result<String> {
            match row.get(field) {
                Some(Value::String(s)) => Ok(s.clone()),
                // Numeric gold answers are common in JSONL ("gold": 42).
                Some(Value::Number(n)) => Ok(n.to_string()),
                Some(other) => bail!("{name}:{line_number}: field `{field}`: expected a string, got {other}"),
                None => bail!("{name}:{line_number}: field `{field}` is missing"),
            }
        };
        let (gold, pred) = (field(&row, &args.gold_field)?, field(&row, &args.pred_field)?);
        let verdict = verify(&gold, &pred, &config);
        row.insert("verdict".into(), verdict.outcome.name().into());
        row.insert("correct".into(), verdict.correct().into());
        row.insert("extracted".into(), verdict.extracted.clone().map_or(Value::Null, Value::from));
        if args.explain {
            row.insert("rule".into(), verdict.rule.name().into());
            row.insert("source".into(), serde_json::to_value(verdict.source)?);
            row.insert("explanation".into(), verdict.explanation.into());
        }
        serde_json::to_writer(&mut *output, &row)?;
        output.write_all(b"\n")?;
        rows += 1;
    }
    if rows == 0 {
        bail!("{name}: no rows");
    }
    Ok(rows)
}

fn bench(args: BenchArgs) -> Result<()> {
    let config = args.options.config();
    let text = std::fs::read_to_string(&args.cases).with_context(|| format!("reading {}", args.cases.display()))?;
    let name = args.cases.display();
    let pairs: Vec<(String, String)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(index, l)| {
            let v: Value = serde_json::from_str(l).with_context(|| format!("{name}:{}: not valid JSON", index + 1))?;
            let text = |field: &str| {
                v[field].as_str().map(str::to_string).with_context(|| format!("{name}:{}: field `{field}` is not a string", index + 1))
            };
            Ok((text("gold")?, text(&args.pred_field)?))
        })
        .collect::<Result<_>>()?;
    let total = pairs.len() * args.repeats;

    let started = Instant::now();
    for _ in 0..args.repeats {
        for (gold, pred) in &pairs {
            std::hint::black_box(verify(gold, pred, &config));
        }
    }
    let single = total as f64 / started.elapsed().as_secs_f64();

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for worker in 0..threads {
            let (pairs, config) = (&pairs, &config);
            scope.spawn(move || {
                for repeat in 0..args.repeats {
                    for (index, (gold, pred)) in pairs.iter().enumerate() {
                        if (repeat * pairs.len() + index) % threads == worker {
                            std::hint::black_box(verify(gold, pred, config));
                        }
                    }
                }
            });
        }
    });
    let parallel = total as f64 / started.elapsed().as_secs_f64();
    println!("{} pairs × {} passes", pairs.len(), args.repeats);
    println!("datagen verifier   {single:>10.0} pairs/s on 1 thread   {parallel:>10.0} pairs/s on {threads} threads");
    if let Some(command) = &args.reference {
        let reference = distill::benchmark::run_reference(&format!("{command} --cases {} --pred-field {}", args.cases.display(), args.pred_field))?;
        let rate = reference["pairs_per_s"].as_f64().context("reference JSON lacks pairs_per_s")?;
        println!("Math-Verify        {rate:>10.0} pairs/s on 1 process");
        println!("ratio (1 thread)   {:>10.1}×", single / rate);
    }
    Ok(())
}
