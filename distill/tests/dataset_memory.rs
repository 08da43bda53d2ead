//! Host memory of a training run's dataset does not grow with the dataset.
//!
//! R1's 800k traces are gigabytes of text; `distill train` streams them from their files a chunk
//! of rows at a time, keeps their token ids in a memory-mapped cache, and holds only an offset
//! per example. This test tokenizes 512 real traces (one chunk of rows) and 4,096 (8× the
//! text: 17 MiB more), in JSONL and in Parquet written as one row group, then prepares and runs
//! a one-step job on each cache, and compares the heap's peaks: while tokenizing, while the job
//! is prepared and while it trains. Holding the text while tokenizing, or the token ids (up to
//! 1,024 a trace) during the run, adds megabytes to the larger dataset's peaks; the preparing
//! peak is the tokenizer's loading, which is higher than either, so data held only then would
//! not show.
//!
//! The heap is counted by the binary's own allocator, installed here as this test binary's,
//! which is why this is a file with a single test: nothing else allocates beside it.

mod common;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::sync::atomic::AtomicBool;

use arrow::array::{ArrayRef, StringArray};
use arrow::record_batch::RecordBatch;
use distill::data::cache::{self, CacheOutcome};
use distill::data::traces::{LengthPolicy, TraceFormat, TraceOptions};
use distill::memory::{allocated_bytes, peak_allocated_bytes, reset_peaks};
use distill::train::job::{EvalSource, Init, Job, JobSpec, Reporter};
use distill::train::options::TrainingOptions;
use distill::text::Tokenizer;
use distill::train::run::StepMetrics;

#[global_allocator]
static ALLOCATOR: distill::memory::CountingAllocator = distill::memory::CountingAllocator;

/// One chunk of rows tokenized together, and eight.
const MEDIUM: usize = 512;
const LARGE: usize = 8 * MEDIUM;

/// Keeps the job's notes, to see where its data came from.
#[derive(Default)]
struct Notes(Mutex<Vec<String>>);

impl Reporter for Notes {
    fn note(&self, line: &str) {
        self.0.lock().unwrap().push(line.to_string());
    }
    fn tokenizing(&self, _: usize) {}
    fn training_started(&self, _: usize, _: usize) {}
    fn step(&self, _: &StepMetrics) {}
    fn training_finished(&self) {}
}

/// `rows` rows cycling through the 40 bundled R1 traces, each problem made distinct.
fn rows(rows: usize) -> (Vec<String>, Vec<String>) {
    let text = std::fs::read_to_string(common::repo_root().join("datasets/r1_traces_sample40.jsonl")).unwrap();
    let traces: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    (0..rows)
        .map(|i| {
            let trace = &traces[i % traces.len()];
            (format!("{} (variant {i})", trace["problem"].as_str().unwrap()), trace["generated_solution"].as_str().unwrap().to_string())
        })
        .unzip()
}

fn write_jsonl(path: &Path, (problems, solutions): &(Vec<String>, Vec<String>)) {
    let mut out = BufWriter::new(File::create(path).unwrap());
    for (problem, solution) in problems.iter().zip(solutions) {
        serde_json::to_writer(&mut out, &serde_json::json!({"problem": problem, "generated_solution": solution})).unwrap();
        out.write_all(b"\n").unwrap();
    }
    out.flush().unwrap();
}

/// One row group for the whole file, as pandas and pyarrow write up to a million rows.
fn write_parquet(path: &Path, (problems, solutions): &(Vec<String>, Vec<String>)) {
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("problem", Arc::new(StringArray::from(problems.clone()))),
        ("generated_solution", Arc::new(StringArray::from(solutions.clone()))),
    ];
    let batch = RecordBatch::try_from_iter(columns).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(File::create(path).unwrap(), batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

const MAX_LENGTH: usize = 1024;

fn format() -> TraceFormat {
    TraceFormat::PromptResponse { prompt_field: "problem".into(), response_field: "generated_solution".into() }
}

/// The heap's peak above what was held before while `data` is streamed, tokenized and cached,
/// with the tokenizer already loaded (its loading peaks higher than a chunk of rows does).
fn tokenizing_peak(data: &Path, tokenizer: &Tokenizer, work: &Path) -> u64 {
    let options = TraceOptions { format: format(), max_length: MAX_LENGTH, length_policy: LengthPolicy::Truncate, train_on_prompt: false };
    distill::memory::release_free_memory();
    reset_peaks();
    let before = allocated_bytes().expect("the counting allocator is this binary's");
    let (data, outcome) = cache::load_or_build(data, tokenizer, &tokenizer_dir(), &options, &work.join("cache"), &|_| {}).unwrap();
    assert_eq!(outcome, CacheOutcome::Built);
    let peak = peak_allocated_bytes().unwrap().saturating_sub(before);
    drop(data);
    peak
}

fn tokenizer_dir() -> PathBuf {
    common::repo_root().join("tests/fixtures/tokenizers/deepseek-r1-distill-qwen")
}

/// The heap's peaks above what was held before while the job is prepared (the cached tokens
/// opened and packed, the tiny model built) and while it runs a step.
fn job_peaks(data: &Path, work: &Path, name: &str) -> [u64; 2] {
    let options = TrainingOptions { max_steps: Some(1), max_length: Some(MAX_LENGTH), truncate: Some(true), ..Default::default() };
    let spec = JobSpec {
        model: common::repo_root().join("student_configs/tiny-qwen2.toml"),
        data: data.to_path_buf(),
        out: work.join(format!("run-{name}")),
        init: Init::Random,
        format: format(),
        options,
        eval: EvalSource::None,
        resume: false,
        device: distill::device::parse("flex").unwrap(),
        device_name: "flex".into(),
        devices: Vec::new(),
        device_memory: None,
        dataset_cache: Some(work.join("cache")),
    };
    distill::memory::release_free_memory();
    reset_peaks();
    let before = allocated_bytes().expect("the counting allocator is this binary's");
    let notes = Notes::default();
    let job = Job::prepare(spec, &notes).unwrap_or_else(|e| panic!("{name}: {e}"));
    let prepared = peak_allocated_bytes().unwrap().saturating_sub(before);
    let notes = notes.0.into_inner().unwrap();
    assert!(notes.iter().any(|n| n.contains("read from")), "{name}: the job tokenized again instead of reading the cache: {notes:?}");
    reset_peaks();
    job.run(&Notes::default(), &AtomicBool::new(false)).unwrap_or_else(|e| panic!("{name}: {e}"));
    [prepared, peak_allocated_bytes().unwrap().saturating_sub(before)]
}

#[test]
fn dataset_memory_does_not_grow_with_the_number_of_traces() {
    let work = tempfile::tempdir().unwrap();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let tokenizer = Tokenizer::from_dir(&tokenizer_dir()).unwrap();
    // A first run of each, so that what stays allocated once (the tokenizer's caches, rayon's
    // pool, OpenBLAS) is held before the measured ones.
    let warm = work.path().join("warm.jsonl");
    write_jsonl(&warm, &rows(64));
    tokenizing_peak(&warm, &tokenizer, work.path());
    job_peaks(&warm, work.path(), "warm");
    for (format, write) in [("jsonl", write_jsonl as fn(&Path, &(Vec<String>, Vec<String>))), ("parquet", write_parquet)] {
        let mut measured = Vec::new();
        for count in [MEDIUM, LARGE] {
            let path = work.path().join(format!("traces-{count}.{format}"));
            let rows = rows(count);
            let text: usize = rows.0.iter().chain(&rows.1).map(String::len).sum();
            write(&path, &rows);
            let tokenizing = tokenizing_peak(&path, &tokenizer, work.path());
            let [preparing, training] = job_peaks(&path, work.path(), &format!("{format}-{count}"));
            eprintln!(
                "{format}: {count} traces, {:.1} MiB of text → heap peak {:.1} MiB tokenizing, {:.1} MiB preparing, {:.1} MiB training",
                mib(text as u64), mib(tokenizing), mib(preparing), mib(training)
            );
            measured.push((text as u64, [tokenizing, preparing, training]));
        }
        let added_text = measured[1].0 - measured[0].0;
        // Per example the run keeps an offset and a packing index (tens of bytes): the added
        // examples may add well under a megabyte, the added text is ~17 MiB. A Parquet column's
        // dictionary is held while its column chunk is read, and grows with the distinct values
        // up to the writer's dictionary page limit (1 MiB a column in arrow and pyarrow), after
        // which the column is written plainly: measured, 12.1, 13.8 and 14.4 MiB at 512, 4,096
        // and 8,192 traces.
        let dictionaries = if format == "parquet" { 2 << 20 } else { 0 };
        let allowed = (1 << 20) + dictionaries;
        for (phase, i) in [("tokenizing", 0), ("preparing", 1), ("training", 2)] {
            let (medium, large) = (measured[0].1[i], measured[1].1[i]);
            assert!(
                large <= medium + allowed,
                "{format}, {phase}: the heap's peak grew from {:.1} to {:.1} MiB with {:.1} MiB more text (allowed {:.1} MiB)",
                mib(medium), mib(large), mib(added_text), mib(allowed)
            );
        }
    }
}
