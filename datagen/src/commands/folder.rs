//! Commands on a stored run folder: `rescore`, `stats`, `export`, `merge`.

use super::{FilterOptions, generation};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use serde_json::json;

use datagen::prompts::{PromptFields, read_prompts};
use datagen::run::{now, read_manifest, write_manifest};
use datagen::schema::Row;
use datagen::scoring::score;
use datagen::store;
use datagen::teacher::pool::percentile;

use crate::VerifierOptions;

#[derive(Args)]
pub struct MergeArgs {
    /// The new run folder (must not exist yet).
    #[arg(long)]
    out: PathBuf,
    /// Run folders to join, e.g. the parts of a `--prompt-shard` run.
    #[arg(required = true, num_args = 1..)]
    dirs: Vec<PathBuf>,
}

pub fn merge_command(args: MergeArgs) -> Result<()> {
    let count = datagen::folder::merge(&args.dirs, &args.out)?;
    eprintln!("merged {count} samples from {} folders into {}", args.dirs.len(), args.out.display());
    Ok(())
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
pub struct StatsArgs {
    /// Run folder written by `datagen run`.
    dir: PathBuf,
    /// Print the figures as one JSON object.
    #[arg(long)]
    json: bool,
}

/// The verifier settings the run (or its last rescore) judged with, for grouping cons@k votes the
/// same way; the defaults for folders written before they were recorded.
pub(super) fn run_verify_config(dir: &Path) -> datagen::verify::VerifyConfig {
    read_manifest(dir).ok().and_then(|m| serde_json::from_value(m["verify_config"].clone()).ok()).unwrap_or_default()
}

/// Every stored row of a run without its texts (problem, reasoning, answer, conversation): what
/// the figures need, streamed, so that memory holds no trace.
pub(super) fn light_rows(dir: &Path) -> Result<Vec<Row>> {
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
    // A test forces the spill with a small limit.
    let spill_limit = std::env::var("DATAGEN_EXPORT_SPILL_BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(datagen::export::SPILL_BYTES);
    let exported = datagen::export::open_r1(&args.dir.join("data"), generation(&args.dir)?, &args.out, args.max_problems_per_file, &info, spill_limit)?;
    eprintln!(
        "wrote {} problems ({} with an accepted generation in `messages`) to {} file(s):",
        exported.problems, exported.with_messages, exported.files.len()
    );
    for (rows, path) in &exported.files {
        eprintln!("  {} ({rows} problems)", path.display());
    }
    Ok(())
}
