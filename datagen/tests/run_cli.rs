//! The `datagen` binary: SIGKILLed at random moments and resumed, every sample is stored exactly
//! once; rescore and stats without the teacher; bad input is a clear error.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{Behaviour, serve};

fn datagen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_datagen")).args(args).current_dir(common::repo_root()).output().unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_clean_failure(output: &Output, needles: &[&str]) {
    let err = stderr(output);
    assert!(!output.status.success(), "expected failure: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    for needle in needles {
        assert!(err.contains(needle), "error does not mention {needle:?}: {err}");
    }
}

/// The keys of every row physically stored, duplicates included: in the shards of the current
/// generation, and in the journal.
fn stored_key_lists(out: &Path) -> (Vec<String>, Vec<String>) {
    let data = out.join("data");
    let mut in_shards = Vec::new();
    for shard in datagen::store::shards(&data, 0).unwrap() {
        in_shards.extend(datagen::store::read_shard(&shard).unwrap().into_iter().map(|r| r.key));
    }
    let mut in_journal = Vec::new();
    if let Ok(text) = std::fs::read_to_string(data.join("journal.wal")) {
        for line in text.lines() {
            if let Ok(row) = serde_json::from_str::<datagen::schema::Row>(line) {
                in_journal.push(row.key);
            }
        }
    }
    (in_shards, in_journal)
}

/// Every row physically stored, shards then journal, duplicates included.
fn stored_keys(out: &Path) -> Vec<String> {
    let (mut keys, in_journal) = stored_key_lists(out);
    keys.extend(in_journal);
    keys
}

fn run_args<'a>(prompts: &'a str, url: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "run", "--prompts", prompts, "--endpoint", url, "--model", "deepseek-ai/DeepSeek-R1", "--out", out,
        "--samples", "3", "--concurrency", "4", "--shard-rows", "4", "--max-tokens", "2048",
    ]
}

#[test]
fn killed_runs_resume_and_store_every_sample_exactly_once() {
    let Setup { server, dir, prompts, url, out, out_text } = setup(12, Behaviour { delay: Duration::from_millis(150), ..Behaviour::default() });
    let args = run_args(&prompts, &url, &out_text);
    // Kill times drawn from a seed that is printed (set DATAGEN_TEST_SEED to replay one).
    let seed: u64 = std::env::var("DATAGEN_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("DATAGEN_TEST_SEED={seed}");
    let mut state = seed;
    let mut draw = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        100 + (state >> 33) % 350
    };
    let kill_times: Vec<u64> = (0..3).map(|_| draw()).collect();
    let mut stored = 0;
    for kill_after_ms in kill_times {
        let mut child = Command::new(env!("CARGO_BIN_EXE_datagen")).args(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(kill_after_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // The shards never hold a key twice, nor does the journal. A kill between a shard's
        // rename and the journal's reset leaves that shard's rows in both, which the reader and
        // the next open resolve (rows a shard holds are dropped from the journal), so the rows
        // stored are what a reader reads.
        let (in_shards, in_journal) = stored_key_lists(&out);
        for (keys, place) in [(&in_shards, "the shards"), (&in_journal, "the journal")] {
            let unique: std::collections::HashSet<&String> = keys.iter().collect();
            assert_eq!(unique.len(), keys.len(), "a key stored twice in {place} after a kill");
        }
        let rows = datagen::store::read_all(&out.join("data"), 0).unwrap();
        assert!(rows.len() >= stored, "a stored row was lost: {} < {stored}", rows.len());
        stored = rows.len();
    }
    assert!(stored < 36, "the kills came too late to test anything ({stored} of 36 stored)");
    let output = datagen(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("were already done"), "{}", stderr(&output));
    let keys = stored_keys(&out);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for key in &keys {
        *counts.entry(key.clone()).or_default() += 1;
    }
    assert_eq!(counts.len(), 36, "12 prompts × 3 samples");
    assert!(counts.values().all(|&c| c == 1), "every key exactly once");
    let journal = std::fs::read_to_string(out.join("data/journal.wal")).unwrap();
    assert!(journal.is_empty(), "compacted at the end");
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["status"], "complete");
    assert!(!manifest.to_string().contains("sk-"), "no key in the manifest");

    // A second complete run asks nothing of the teacher.
    let before = server.requests();
    let output = datagen(&args);
    assert!(output.status.success());
    assert_eq!(server.requests(), before);

    // stats agree with the rows (which samples are right depends on where the kills fell: the
    // server alternates right and wrong answers per problem, killed requests included).
    let rows = datagen::store::read_all(&out.join("data"), 0).unwrap();
    let correct = rows.iter().filter(|r| r.correct == Some(true)).count();
    assert!(correct > 0 && correct < 36);
    let output = datagen(&["stats", &out_text, "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let stats: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!((stats["samples"].as_u64(), stats["k"].as_u64(), stats["accepted"].as_u64()), (Some(36), Some(3), Some(correct as u64)));
    assert!((stats["pass_at_1"].as_f64().unwrap() - correct as f64 / 36.0).abs() < 1e-9, "{stats}");
    assert_eq!(stats["verdicts"]["correct"].as_u64(), Some(correct as u64), "{stats}");
    let classes = ["correct", "wrong", "no_answer", "unparsable"];
    let counted: u64 = classes.iter().filter_map(|c| stats["verdicts"][c].as_u64()).sum();
    assert_eq!(counted, 36, "every verified sample has a verdict class: {stats}");
    let text = datagen(&["stats", &out_text]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("cons@3"));

    // distill reads the shards as training data: the accepted rows, reasoning kept.
    let records = distill::data::records::read_records(&out.join("data")).unwrap();
    let tokenizer = distill::text::Tokenizer::from_dir(&common::repo_root().join("tests/fixtures/tokenizers/deepseek-r1-distill-qwen")).unwrap();
    let options = distill::data::traces::TraceOptions {
        format: Default::default(),
        max_length: 4096,
        length_policy: distill::data::traces::LengthPolicy::Drop,
        train_on_prompt: false,
    };
    let (examples, skipped) = distill::data::traces::tokenize_records(&records, &tokenizer, &options).unwrap();
    assert_eq!((examples.len(), skipped.not_accepted), (correct, 36 - correct), "{}", skipped.summary());
    let text = tokenizer.decode(&examples[0].input_ids, false).unwrap();
    assert!(text.contains("<think>\nLet me work") && text.contains("</think>\n\nThe answer"), "{text}");

    // rescore with --keep all accepts every sample that passes the filters, without requests.
    let output = datagen(&["rescore", &out_text, "--keep", "all"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains(&format!("{correct} → 36 accepted")), "{}", stderr(&output));
    assert_eq!(server.requests(), before);
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["generation"], 1);

    // The open-r1 layout: one row per problem, read back with arrow.
    let exported = dir.path().join("open-r1.parquet");
    let output = datagen(&["export", &out_text, "--format", "open-r1", "--out", exported.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let file = std::fs::File::open(&exported).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    assert_eq!(reader.schema().as_ref(), datagen::schema::open_r1_schema().as_ref());
    let batch = reader.build().unwrap().next().unwrap().unwrap();
    let mut writer = arrow::json::ArrayWriter::new(Vec::new());
    writer.write(&batch).unwrap();
    writer.finish().unwrap();
    let problems: Vec<serde_json::Value> = serde_json::from_slice(&writer.into_inner()).unwrap();
    assert_eq!(problems.len(), 12);
    // OpenR1-Math-220k's columns, in its order.
    let names: Vec<String> = datagen::schema::open_r1_schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(names, [
        "problem", "solution", "answer", "problem_type", "question_type", "source", "uuid", "is_reasoning_complete",
        "generations", "correctness_math_verify", "correctness_llama", "finish_reasons", "correctness_count", "messages",
    ]);
    let total_correct: u64 = problems.iter().map(|p| p["correctness_count"].as_u64().unwrap()).sum();
    assert_eq!(total_correct, correct as u64);
    for problem in &problems {
        assert_eq!(problem["generations"].as_array().unwrap().len(), 3);
        assert!(problem["generations"][0].as_str().unwrap().starts_with("<think>\n"));
        assert_eq!(problem["correctness_math_verify"].as_array().unwrap().len(), 3);
        assert_eq!(problem["messages"].as_array().unwrap().len(), 2, "every sample accepted after --keep all");
        assert_eq!(problem["is_reasoning_complete"], serde_json::json!([true, true, true]));
        assert!(problem.get("correctness_llama").is_none_or(|v| v.is_null()), "no second judge: null");
        // The bundled prompts carry MATH's problem type (`type`), not open-r1's `problem_type`.
        assert!(problem.get("solution").is_none_or(|v| v.is_null() || v.is_string()));
    }
    // Sharded: files of at most 5 problems, each readable, 12 problems in all.
    let output = datagen(&["export", &out_text, "--out", exported.to_str().unwrap(), "--max-problems-per-file", "5"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let counts: Vec<usize> = (0..3)
        .map(|i| {
            let file = std::fs::File::open(dir.path().join(format!("open-r1-{i:05}.parquet"))).unwrap();
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap();
            reader.map(|b| b.unwrap().num_rows()).sum()
        })
        .collect();
    assert_eq!(counts, [5, 5, 2]);
    assert!(!dir.path().join("open-r1-00003.parquet").exists());
    assert!(datagen::store::shards(&out.join("data"), 0).unwrap().is_empty(), "old generation removed");
    let rows = datagen::store::read_all(&out.join("data"), 1).unwrap();
    assert_eq!((rows.len(), rows.iter().filter(|r| r.accepted).count()), (36, 36));
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let good = write("good.jsonl", "{\"id\": \"a\", \"problem\": \"1+1?\", \"answer\": \"2\"}\n");
    let url = "http://127.0.0.1:9/v1";

    let empty = write("empty.jsonl", "");
    assert_clean_failure(&datagen(&run_args(&empty, url, out)), &["empty.jsonl"]);
    let duplicate = write("dup.jsonl", "{\"id\": \"a\", \"problem\": \"x\"}\n{\"id\": \"a\", \"problem\": \"y\"}\n");
    assert_clean_failure(&datagen(&run_args(&duplicate, url, out)), &["dup.jsonl:2", "id `a`", "dup.jsonl:1"]);
    let missing = write("missing.jsonl", "{\"id\": \"a\", \"question\": \"x\"}\n");
    assert_clean_failure(&datagen(&run_args(&missing, url, out)), &["missing.jsonl:1", "`problem`", "--problem-field"]);
    assert_clean_failure(&datagen(&run_args(&good, "localhost:8000", out)), &["--endpoint localhost:8000"]);
    assert_clean_failure(&datagen(&run_args(&good, "not a url", out)), &["not a URL"]);
    let mut with_key = run_args(&good, url, out);
    with_key.extend(["--api-key-env", "DATAGEN_TEST_NO_SUCH_VARIABLE"]);
    assert_clean_failure(&datagen(&with_key), &["DATAGEN_TEST_NO_SUCH_VARIABLE"]);

    // An unreachable endpoint: retried, then stored as failed with the error, never dropped.
    let mut unreachable = run_args(&good, url, out);
    unreachable[10] = "1"; // --samples
    unreachable.extend(["--max-retries", "1"]);
    let output = datagen(&unreachable);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("1 failed"), "{}", stderr(&output));
    let rows = datagen::store::read_all(&Path::new(out).join("data"), 0).unwrap();
    assert_eq!(rows.len(), 1);
    assert!(rows[0].error.as_deref().unwrap().contains("connection failed"), "{:?}", rows[0].error);

    // A wrong API key stops the run with the server's message.
    let server = serve(Behaviour { faults: vec![common::Fault::Unauthorized; 50], ..Behaviour::default() }, Default::default());
    let url = server.url();
    let other = dir.path().join("other");
    let output = datagen(&run_args(&good, &url, other.to_str().unwrap()));
    assert_clean_failure(&output, &["HTTP 401", "Invalid API key", "not retried"]);
}

/// `--teacher local:DIR`: a checkpoint generates in-process (the tiny R1-style fixture), with the
/// same schema and stats, so the tool also evaluates a distilled student. Samples are batched;
/// each draws from its own seed, so the batch size does not change what is generated.
#[test]
fn a_local_teacher_fills_the_same_schema() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = common::prompt_file(dir.path(), 3);
    let local_run = |name: &str, max_batch_size: &str, dtype: &str| {
        let out = dir.path().join(name);
        let output = datagen(&[
            "run", "--prompts", prompts.to_str().unwrap(), "--teacher", "local:tests/fixtures/tiny-qwen2", "--device", "flex",
            "--out", out.to_str().unwrap(), "--samples", "2", "--max-tokens", "12", "--concurrency", "6",
            "--max-batch-size", max_batch_size, "--dtype", dtype,
        ]);
        assert!(output.status.success(), "{}", stderr(&output));
        let manifest = datagen::run::read_manifest(&out).unwrap();
        assert_eq!(manifest["teacher"]["max_batch_size"].as_u64(), max_batch_size.parse().ok());
        let mut rows = datagen::store::read_all(&out.join("data"), 0).unwrap();
        rows.sort_by_key(|row| row.key.clone());
        (out, rows)
    };
    let (out, rows) = local_run("batched", "4", "f32");
    let (_, one_at_a_time) = local_run("one-at-a-time", "1", "f32");
    let generated = |rows: &[datagen::schema::Row]| -> Vec<_> {
        rows.iter().map(|r| (r.key.clone(), r.reasoning.clone(), r.content.clone(), r.completion_tokens, r.finish_reason.clone())).collect()
    };
    assert_eq!(generated(&rows), generated(&one_at_a_time));
    assert_eq!(rows.len(), 6);
    for row in &rows {
        assert_eq!((row.status.as_str(), row.endpoint.as_deref(), row.usage_source.as_deref()), ("ok", Some("local"), Some("local")));
        assert!(row.completion_tokens.unwrap() <= 12 && row.prompt_tokens.unwrap() > 10);
        assert_eq!(row.teacher_model, "tests/fixtures/tiny-qwen2");
        assert!(row.correct.is_some(), "verified against the reference answer");
    }
    // Different sample indices draw differently.
    let texts: std::collections::HashSet<String> = rows.iter().map(|r| format!("{:?}{:?}", r.reasoning, r.content)).collect();
    assert!(texts.len() > 1);
    let output = datagen(&["stats", out.to_str().unwrap(), "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let stats: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!((stats["samples"].as_u64(), stats["k"].as_u64()), (Some(6), Some(2)));
    assert!(stats["pass_at_1"].as_f64().is_some());

    // bf16 compute where the device has it; a clear refusal where it has not.
    let (_, bf16) = local_run("bf16", "4", "bf16");
    assert_eq!(bf16.len(), 6);
    assert!(bf16.iter().all(|row| row.status == "ok" && row.completion_tokens.is_some_and(|n| n > 0)));
    let output = datagen(&[
        "run", "--prompts", prompts.to_str().unwrap(), "--teacher", "local:tests/fixtures/tiny-qwen2", "--device", "wgpu",
        "--dtype", "bf16", "--out", dir.path().join("wgpu-bf16").to_str().unwrap(),
    ]);
    assert_clean_failure(&output, &["wgpu has no BF16 compute", "--dtype"]);
}

/// A loopback teacher that knows the answers of the first `n` bundled prompts, their prompt file,
/// and a run folder to be, in a temporary directory.
struct Setup {
    server: common::Server,
    dir: tempfile::TempDir,
    prompts: String,
    url: String,
    out: std::path::PathBuf,
    out_text: String,
}

fn setup(n: usize, behaviour: Behaviour) -> Setup {
    let server = serve(behaviour, common::bundled_answers(&common::math_prompts(n)));
    let dir = tempfile::tempdir().unwrap();
    let prompts = common::prompt_file(dir.path(), n).to_str().unwrap().to_string();
    let out = dir.path().join("out");
    let (url, out_text) = (server.url(), out.to_str().unwrap().to_string());
    Setup { server, dir, prompts, url, out, out_text }
}

/// `args` with `flag` set to `value` (replaced where `run_args` set it already).
fn set<'a>(args: &mut Vec<&'a str>, flag: &'a str, value: &'a str) {
    match args.iter().position(|a| *a == flag) {
        Some(at) => args[at + 1] = value,
        None => args.extend([flag, value]),
    }
}

/// Rows of the run in `out`, at its current generation.
fn rows_of(out: &Path) -> Vec<datagen::schema::Row> {
    let manifest = datagen::run::read_manifest(out).unwrap();
    datagen::store::read_all(&out.join("data"), manifest["generation"].as_u64().unwrap() as u32).unwrap()
}

/// A prompt past the server's context gets vLLM's 400: that sample is stored as failed with the
/// reason class `context_length` and the run goes on; a resume does not stop at it;
/// `--retry-failed context_length` asks for exactly those samples once more.
#[test]
fn a_prompt_past_the_context_is_stored_as_failed_and_the_run_goes_on() {
    let answers = common::bundled_answers(&common::math_prompts(3));
    let server = serve(Behaviour { max_prompt_chars: Some(3000), ..Behaviour::default() }, answers);
    let dir = tempfile::tempdir().unwrap();
    let prompts = common::prompt_file(dir.path(), 3);
    // The first prompt also carries open-r1's per-problem fields, for the export.
    let mut lines: Vec<serde_json::Value> = std::fs::read_to_string(&prompts).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    lines[0]["solution"] = "Expand and count.".into();
    lines[0]["problem_type"] = "Algebra".into();
    lines[0]["question_type"] = "math-word-problem".into();
    let mut text: String = lines.iter().map(|l| l.to_string() + "\n").collect();
    text.push_str(&serde_json::json!({"id": "long", "problem": "Sum these numbers: ".to_string() + &"7 + ".repeat(1000) + "7.", "answer": "7007"}).to_string());
    text.push('\n');
    std::fs::write(&prompts, text).unwrap();
    let out = dir.path().join("out");
    let (prompts, url, out_text) = (prompts.to_str().unwrap().to_string(), server.url(), out.to_str().unwrap().to_string());
    let mut args = run_args(&prompts, &url, &out_text);
    set(&mut args, "--samples", "2");
    let output = datagen(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("2 failed"), "{}", stderr(&output));
    let rows = rows_of(&out);
    assert_eq!(rows.len(), 8);
    for row in &rows {
        if row.id == "long" {
            assert_eq!((row.status.as_str(), row.error_class.as_deref()), ("failed", Some("context_length")));
            assert!(row.error.as_deref().unwrap().contains("maximum context length"), "{:?}", row.error);
            assert_eq!(row.attempts, 1, "a request error is not retried");
        } else {
            assert_eq!(row.status, "ok");
        }
    }
    // A resume asks for nothing: the failed samples are stored.
    let before = server.requests();
    let output = datagen(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(server.requests(), before);
    // Retrying another class asks for nothing either; retrying this one asks for the two again.
    let mut retry = args.clone();
    retry.extend(["--retry-failed", "server"]);
    assert!(datagen(&retry).status.success());
    assert_eq!(server.requests(), before);
    let mut retry = args.clone();
    retry.extend(["--retry-failed", "context_length"]);
    let output = datagen(&retry);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("2 failed samples to ask for again"), "{}", stderr(&output));
    assert_eq!(server.requests(), before + 2);
    let rows = rows_of(&out);
    let keys: std::collections::HashSet<_> = rows.iter().map(|r| r.key.clone()).collect();
    assert_eq!((rows.len(), keys.len()), (8, 8), "each key once");
    // The export fills open-r1's per-problem fields from the run's prompt file; the failed
    // problem has no generation and is left out.
    let exported = dir.path().join("open-r1.parquet");
    let output = datagen(&["export", &out_text, "--out", exported.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let file = std::fs::File::open(&exported).unwrap();
    let batch = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap().next().unwrap().unwrap();
    let mut writer = arrow::json::ArrayWriter::new(Vec::new());
    writer.write(&batch).unwrap();
    writer.finish().unwrap();
    let problems: Vec<serde_json::Value> = serde_json::from_slice(&writer.into_inner()).unwrap();
    assert_eq!(problems.len(), 3);
    let first = problems.iter().find(|p| p["uuid"] == lines[0]["id"]).unwrap();
    assert_eq!((first["solution"].as_str(), first["problem_type"].as_str(), first["question_type"].as_str()), (Some("Expand and count."), Some("Algebra"), Some("math-word-problem")));
    let mut bad = args.clone();
    bad.extend(["--retry-failed", "flaky"]);
    assert_clean_failure(&datagen(&bad), &["--retry-failed", "unknown class `flaky`", "context_length"]);
}

/// Samples that failed while the server was down are asked for again by `--retry-failed` and
/// replaced by their results, each key once.
#[test]
fn retry_failed_replaces_failed_samples_with_their_results() {
    let Setup { server: _server, dir: _dir, prompts, url, out, out_text } = setup(3, Behaviour { faults: vec![common::Fault::ServerError; 6], ..Behaviour::default() });
    let mut args = run_args(&prompts, &url, &out_text);
    set(&mut args, "--samples", "2");
    set(&mut args, "--concurrency", "1");
    set(&mut args, "--max-retries", "0");
    // Not waited out as an outage: the samples fail at once.
    set(&mut args, "--max-outage", "0s");
    let output = datagen(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let rows = rows_of(&out);
    assert_eq!(rows.len(), 6);
    assert!(rows.iter().all(|r| r.status == "failed" && r.error_class.as_deref() == Some("server")));
    args.push("--retry-failed");
    let output = datagen(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let rows = rows_of(&out);
    let keys: std::collections::HashSet<_> = rows.iter().map(|r| r.key.clone()).collect();
    assert_eq!((rows.len(), keys.len()), (6, 6));
    assert!(rows.iter().all(|r| r.status == "ok" && r.verdict.is_some()));
    assert_eq!(datagen::run::read_manifest(&out).unwrap()["generation"], 1);
}

/// What no prompt can get past stops the run with the server's message: DeepSeek's 402 (balance
/// spent) at once; a bad setting refused on every request (a 400 not about the prompt's length)
/// at the eighth such answer, instead of storing every prompt as failed.
#[test]
fn refusals_that_no_prompt_gets_past_stop_the_run() {
    let cases = [
        (common::Fault::PaymentRequired, ["HTTP 402", "Insufficient Balance"], 0),
        (common::Fault::BadParameter, ["HTTP 400", "top_p must be in (0, 1]"], 7),
    ];
    for (fault, needles, stored) in cases {
        let server = serve(Behaviour { faults: vec![fault; 100], ..Behaviour::default() }, Default::default());
        let dir = tempfile::tempdir().unwrap();
        let prompts = common::prompt_file(dir.path(), 12);
        let out = dir.path().join("out");
        let output = datagen(&run_args(prompts.to_str().unwrap(), &server.url(), out.to_str().unwrap()));
        assert_clean_failure(&output, &needles);
        // Requests in flight when it stopped are asked again by the next run.
        assert_eq!(rows_of(&out).len(), stored);
        assert_eq!(datagen::run::read_manifest(&out).unwrap()["status"], "stopped");
    }
}

/// One writer per folder: a second `run` or `rescore` on a folder being written is refused,
/// naming the holder; the lock goes with the process that held it, even when it is killed.
#[test]
fn a_second_process_on_the_same_folder_is_refused() {
    let Setup { server: _server, dir: _dir, prompts, url, out, out_text } = setup(4, Behaviour { delay: Duration::from_millis(300), ..Behaviour::default() });
    let mut args = run_args(&prompts, &url, &out_text);
    set(&mut args, "--concurrency", "1");
    let mut first = Command::new(env!("CARGO_BIN_EXE_datagen")).args(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    // The first holds the lock once its manifest says it is running.
    let started = std::time::Instant::now();
    while datagen::run::read_manifest(&out).ok().is_none_or(|m| m["status"] != "running") {
        assert!(started.elapsed() < Duration::from_secs(60), "the first run never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = datagen(&args);
    assert_clean_failure(&second, &["being written by another datagen process", &format!("pid {}", first.id())]);
    let rescore = datagen(&["rescore", &out_text]);
    assert_clean_failure(&rescore, &["being written by another datagen process"]);
    first.kill().unwrap(); // SIGKILL: the lock is released with the process
    first.wait().unwrap();
    let output = datagen(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(rows_of(&out).len(), 12);
}

/// vLLM advertises its context (`max_model_len`); a --max-tokens that leaves no room for the
/// prompt is refused before any request, and with --tokenizer each request asks for what fits.
#[test]
fn max_tokens_is_checked_against_the_servers_context() {
    let Setup { server, dir: _dir, prompts, url, out, out_text } = setup(3, Behaviour { max_model_len: Some(4096), ..Behaviour::default() });
    let mut args = run_args(&prompts, &url, &out_text);
    set(&mut args, "--max-tokens", "32768");
    assert_clean_failure(&datagen(&args), &["--max-tokens 32768", "context of 4096 tokens", "--tokenizer"]);
    assert_eq!(server.requests(), 0, "refused before any request");
    args.extend(["--tokenizer", "tests/fixtures/tiny-qwen2"]);
    let output = datagen(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let asked: Vec<u64> = server.bodies.lock().unwrap().iter().filter_map(|(body, _)| body["max_tokens"].as_u64()).collect();
    assert_eq!(asked.len(), 9);
    // The longest bundled prompt (2,039 characters) leaves visibly less than the others.
    assert!(asked.iter().all(|&n| n < 4096 && n > 3000), "{asked:?}");
    assert!(asked.iter().min() < asked.iter().max(), "{asked:?}");
    // Each row records what its request asked for.
    let mut stored: Vec<u64> = rows_of(&out).iter().map(|r| r.max_tokens).collect();
    let mut asked = asked;
    (stored.sort_unstable(), asked.sort_unstable());
    assert_eq!(stored, asked);
}

/// Samples made with other sampling settings never mix silently: a resume with another
/// temperature is refused before anything is written, `--allow-mixed` adds them beside the
/// first ones (each key carries its settings' hash), and the manifest keeps every run in order.
#[test]
fn other_settings_are_refused_unless_allowed_and_every_run_is_recorded() {
    let Setup { server: _server, dir: _dir, prompts, url, out, out_text } = setup(2, Behaviour::default());
    let args = run_args(&prompts, &url, &out_text);
    assert!(datagen(&args).status.success());
    let mut warmer = args.clone();
    set(&mut warmer, "--temperature", "0.7");
    let before = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    assert_clean_failure(&datagen(&warmer), &["other sampling settings", "\"temperature\":0.6", "--allow-mixed"]);
    assert_eq!(std::fs::read_to_string(out.join("manifest.json")).unwrap(), before, "a refused run writes nothing");
    warmer.push("--allow-mixed");
    let output = datagen(&warmer);
    assert!(output.status.success(), "{}", stderr(&output));
    let rows = rows_of(&out);
    assert_eq!(rows.len(), 12);
    let hashes: std::collections::BTreeSet<_> = rows.iter().map(|r| r.key.rsplit('/').next().unwrap().to_string()).collect();
    assert_eq!(hashes.len(), 2);
    let runs = datagen::run::read_manifest(&out).unwrap()["runs"].as_array().unwrap().clone();
    assert_eq!(runs.len(), 2);
    assert_eq!((runs[0]["sampling"]["temperature"].as_f64(), runs[1]["sampling"]["temperature"].as_f64()), (Some(0.6), Some(0.7)));
    assert!(runs.iter().all(|r| r["status"] == "complete"));
}

/// `--prompt-shard 0/2` and `1/2` in two folders, joined by `datagen merge`, give exactly the rows
/// of one run over all the prompts; merging a folder twice stores each sample once.
#[test]
fn prompt_shards_merge_into_one_run() {
    let Setup { server: _server, dir, prompts, url, .. } = setup(12, Behaviour::default());
    let folder = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (whole, part0, part1, merged) = (folder("whole"), folder("part0"), folder("part1"), folder("merged"));
    assert!(datagen(&run_args(&prompts, &url, &whole)).status.success());
    let mut counts = Vec::new();
    for (part, out) in [("0/2", &part0), ("1/2", &part1)] {
        let mut args = run_args(&prompts, &url, out);
        set(&mut args, "--prompt-shard", part);
        let output = datagen(&args);
        assert!(output.status.success(), "{}", stderr(&output));
        counts.push(rows_of(Path::new(out)).len());
    }
    assert!(counts.iter().all(|&n| n > 0) && counts.iter().sum::<usize>() == 36, "{counts:?}");
    let output = datagen(&["merge", "--out", &merged, &part0, &part1, &part0]);
    assert!(output.status.success(), "{}", stderr(&output));
    let keys = |out: &str| -> std::collections::BTreeSet<String> { rows_of(Path::new(out)).into_iter().map(|r| r.key).collect() };
    assert_eq!(keys(&merged), keys(&whole));
    assert_eq!(rows_of(Path::new(&merged)).len(), 36);
    assert_eq!(datagen::run::read_manifest(Path::new(&merged)).unwrap()["runs"].as_array().unwrap().len(), 3);
    let stats = datagen(&["stats", &merged, "--json"]);
    assert!(stats.status.success());
    // Into an existing folder, or with a bad part: clear errors.
    assert_clean_failure(&datagen(&["merge", "--out", &merged, &part0]), &["exists"]);
    let mut bad = run_args(&prompts, &url, &part0);
    set(&mut bad, "--prompt-shard", "2/2");
    assert_clean_failure(&datagen(&bad), &["--prompt-shard", "0 ≤ I < N"]);
}

/// A crash at each step of the storage protocol (a test-only failpoint aborts the process there):
/// on reopening, every key is stored exactly once, and a rescore leaves one whole generation
/// readable whatever step it died at.
#[test]
fn a_crash_at_each_step_of_the_store_protocol_loses_nothing() {
    let Setup { server: _server, dir, prompts, url, .. } = setup(12, Behaviour::default());
    let run = |out: &str, failpoint: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_datagen"));
        command.args(run_args(&prompts, &url, out)).current_dir(common::repo_root());
        if let Some(name) = failpoint {
            command.env("DATAGEN_FAILPOINT", name);
        }
        command.output().unwrap()
    };
    let (run_points, rescore_points) = datagen::store::FAILPOINTS.split_at(5);
    for name in run_points {
        let out = dir.path().join(format!("run-{name}"));
        let out_text = out.to_str().unwrap();
        let crashed = run(out_text, Some(name));
        assert!(!crashed.status.success() && stderr(&crashed).contains(&format!("failpoint {name}")), "{name}: {}", stderr(&crashed));
        // Read as a reader does, each key once (between a shard's rename and the journal's reset
        // a row is in both, which the reader and the next open resolve).
        let rows = datagen::store::read_all(&out.join("data"), 0).unwrap();
        let unique: std::collections::HashSet<&String> = rows.iter().map(|r| &r.key).collect();
        assert_eq!(unique.len(), rows.len(), "{name}: a key read twice after the crash");
        let resumed = run(out_text, None);
        assert!(resumed.status.success(), "{name}: {}", stderr(&resumed));
        let keys = stored_keys(&out);
        let unique: std::collections::HashSet<&String> = keys.iter().collect();
        assert_eq!((keys.len(), unique.len()), (36, 36), "{name}: every key exactly once");
    }
    let out = dir.path().join("rescored");
    let out_text = out.to_str().unwrap();
    assert!(run(out_text, None).status.success());
    for name in rescore_points {
        let crashed = Command::new(env!("CARGO_BIN_EXE_datagen")).args(["rescore", out_text, "--keep", "all"]).env("DATAGEN_FAILPOINT", name).output().unwrap();
        assert!(!crashed.status.success() && stderr(&crashed).contains(&format!("failpoint {name}")), "{name}: {}", stderr(&crashed));
        // The generation the manifest names is whole.
        let rows = rows_of(&out);
        let unique: std::collections::HashSet<&String> = rows.iter().map(|r| &r.key).collect();
        assert_eq!((rows.len(), unique.len()), (36, 36), "{name}");
        // The next writer removes the other generation's shards, which a reader of the folder's
        // files (distill) would otherwise read twice.
        assert!(run(out_text, None).status.success());
        let generation = datagen::run::read_manifest(&out).unwrap()["generation"].as_u64().unwrap() as u32;
        let parquet = std::fs::read_dir(out.join("data")).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".parquet")).count();
        assert_eq!(parquet, datagen::store::shards(&out.join("data"), generation).unwrap().len(), "{name}: a stale generation after the resume");
        let again = datagen(&["rescore", out_text, "--keep", "all"]);
        assert!(again.status.success(), "{name}: {}", stderr(&again));
        assert_eq!(rows_of(&out).len(), 36, "{name}");
        // Only the current generation's shards remain.
        let generation = datagen::run::read_manifest(&out).unwrap()["generation"].as_u64().unwrap() as u32;
        let all = std::fs::read_dir(out.join("data")).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".parquet")).count();
        assert_eq!(all, datagen::store::shards(&out.join("data"), generation).unwrap().len(), "{name}: an old generation left behind");
    }
}

/// A real key value given through --api-key-env reaches the server as a bearer token and appears
/// in no file of the run folder, in no log line and in no manifest.
#[test]
fn the_api_key_is_never_written() {
    let Setup { server, dir: _dir, prompts, url, out, .. } = setup(3, Behaviour::default());
    let key = format!("sk-live-{:016x}", std::process::id() as u64 * 0x9e37_79b9_7f4a_7c15);
    let mut args = run_args(&prompts, &url, out.to_str().unwrap());
    args.extend(["--api-key-env", "DATAGEN_TEST_KEY"]);
    let output = Command::new(env!("CARGO_BIN_EXE_datagen")).args(&args).env("DATAGEN_TEST_KEY", &key).output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(server.bodies.lock().unwrap().iter().all(|(_, auth)| auth.as_deref() == Some(&format!("Bearer {key}"))));
    let logs = [output.stdout, output.stderr].concat();
    assert!(!logs.windows(key.len()).any(|w| w == key.as_bytes()), "the key is in the log");
    let stats = datagen(&["stats", out.to_str().unwrap(), "--json"]);
    let mut files = vec![out.clone()];
    let mut checked = 0;
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            let bytes = std::fs::read(&path).unwrap();
            assert!(!bytes.windows(key.len()).any(|w| w == key.as_bytes()), "the key is in {}", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 3, "manifest, shards and journal checked");
    assert!(!stats.stdout.windows(key.len()).any(|w| w == key.as_bytes()));
}

/// `datagen eval`: R1's protocol and scoreboard. The loopback teacher answers each problem right on
/// its even-numbered requests and wrong on the odd ones, so with 4 samples each prompt has 2 right:
/// pass@1 50%, pass@4 100%, and cons@4 100% (the tie goes to the first answer, the right one). A
/// resumed evaluation scores the same.
#[test]
fn eval_prints_and_writes_r1s_scoreboard() {
    let Setup { server: _server, dir: _dir, prompts, url, out, out_text } = setup(3, Behaviour::default());
    let mut args = run_args(&prompts, &url, &out_text);
    args[0] = "eval";
    set(&mut args, "--samples", "4");
    set(&mut args, "--concurrency", "1");
    let output = datagen(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let board: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("scoreboard.json")).unwrap()).unwrap();
    let overall = &board["overall"];
    assert_eq!((overall["prompts"].as_u64(), overall["samples"].as_u64(), overall["failed"].as_u64(), overall["k"].as_u64()), (Some(3), Some(12), Some(0), Some(4)));
    assert_eq!((overall["pass_at_1"].as_f64(), overall["pass_at_k"].as_f64(), overall["cons_at_k"].as_f64()), (Some(0.5), Some(1.0), Some(1.0)));
    assert!(board["by_source"].as_object().unwrap().keys().all(|s| s.starts_with("MATH train/")), "{board}");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(printed.contains("pass@4") && printed.contains("50.0%"), "{printed}");
    let first = std::fs::read_to_string(out.join("scoreboard.json")).unwrap();
    assert!(datagen(&args).status.success());
    assert_eq!(std::fs::read_to_string(out.join("scoreboard.json")).unwrap(), first, "resumed, the same scores");
}

/// A run that stored nothing (stopped by a refusal) does not bind later runs to its settings, and
/// `--retry-failed` only drops the failed samples this run asks for again.
#[test]
fn only_stored_samples_bind_settings_and_retries_stay_in_their_run() {
    let refusing = serve(Behaviour { faults: vec![common::Fault::PaymentRequired; 100], ..Behaviour::default() }, Default::default());
    let Setup { server: _server, dir: _dir, prompts, url, out, out_text } = setup(2, Behaviour::default());
    let refused_url = refusing.url();
    assert!(!datagen(&run_args(&prompts, &refused_url, &out_text)).status.success());
    let mut warmer = run_args(&prompts, &url, &out_text);
    set(&mut warmer, "--temperature", "0.7");
    let output = datagen(&warmer);
    assert!(output.status.success(), "a run that stored nothing binds nothing: {}", stderr(&output));
    // Failed samples of other settings stay when this run retries its own.
    let failing = serve(Behaviour { faults: vec![common::Fault::ServerError; 100], ..Behaviour::default() }, Default::default());
    let failing_url = failing.url();
    let mut other = run_args(&prompts, &failing_url, &out_text);
    for (flag, value) in [("--temperature", "0.5"), ("--max-retries", "0"), ("--max-outage", "0s"), ("--concurrency", "1")] {
        set(&mut other, flag, value);
    }
    other.push("--allow-mixed");
    assert!(datagen(&other).status.success());
    let failed_before = rows_of(&out).iter().filter(|r| r.status == "failed").count();
    assert_eq!(failed_before, 6);
    warmer.extend(["--retry-failed", "--allow-mixed"]);
    let output = datagen(&warmer);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("0 failed samples to ask for again"), "{}", stderr(&output));
    assert_eq!(rows_of(&out).iter().filter(|r| r.status == "failed").count(), 6, "the other settings' failed rows stay");
}

/// A problem whose samples lie in early and late shards (a resume with more samples) is exported
/// whole, and the same when export spills what it holds to bucket files (forced here with a
/// one-byte limit).
#[test]
fn export_groups_spread_samples_the_same_when_it_spills() {
    let Setup { server: _server, dir, prompts, url, out: _out, out_text } = setup(4, Behaviour::default());
    for samples in ["1", "3"] {
        let mut args = run_args(&prompts, &url, &out_text);
        set(&mut args, "--samples", samples);
        assert!(datagen(&args).status.success());
    }
    let export = |name: &str, spill: Option<&str>| -> Vec<serde_json::Value> {
        let path = dir.path().join(name);
        let mut command = Command::new(env!("CARGO_BIN_EXE_datagen"));
        command.args(["export", &out_text, "--out", path.to_str().unwrap()]);
        if let Some(limit) = spill {
            command.env("DATAGEN_EXPORT_SPILL_BYTES", limit);
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
        let file = std::fs::File::open(&path).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap();
        let mut writer = arrow::json::ArrayWriter::new(Vec::new());
        for batch in reader {
            writer.write(&batch.unwrap()).unwrap();
        }
        writer.finish().unwrap();
        let mut problems: Vec<serde_json::Value> = serde_json::from_slice(&writer.into_inner()).unwrap();
        problems.sort_by_key(|p| p["uuid"].as_str().unwrap().to_string());
        problems
    };
    let held = export("held.parquet", None);
    let spilled = export("spilled.parquet", Some("1"));
    assert_eq!(held.len(), 4);
    assert!(held.iter().all(|p| p["generations"].as_array().unwrap().len() == 3), "every problem whole");
    assert_eq!(held, spilled);
    assert!(!dir.path().join(".spilled.parquet.spill").exists(), "bucket files removed");
}
