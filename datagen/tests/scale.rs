//! A run much larger than the memory `stats`, `export`, `merge` and `rescore` may use: each streams the
//! shards record batch by record batch. The run is synthetic (long traces written through the
//! store); each command runs as its own process and reports its own peak resident memory from
//! the kernel (VmHWM), measured, not estimated.
//!
//! The suite generates 0.75 GiB of traces and caps each command at 256 MiB, which the whole run
//! could not fit in; `DATAGEN_SCALE_GIB=3 DATAGEN_SCALE_CAP_MIB=1024` runs the 3 GiB
//! check (under two minutes on two cores).

use std::path::Path;
use std::process::Command;

use datagen::schema::Row;

#[allow(unused_imports)]
mod common;

/// The peak resident set the command reported of itself (`DATAGEN_REPORT_PEAK_RSS`), in bytes.
fn reported_peak(stderr: &str) -> u64 {
    let line = stderr.lines().find_map(|l| l.strip_prefix("peak RSS: ")).expect("the command reports its peak");
    let kib: u64 = line.trim_end_matches("kB").trim().parse().expect("VmHWM in kB");
    kib * 1024
}

fn synthetic_row(index: usize, reasoning: &str) -> Row {
    let id = format!("p{:06}", index / 4);
    let content = "The answer is $\\boxed{7}$.";
    serde_json::from_value(serde_json::json!({
        "key": format!("{id}/{}/0123456789abcdef", index % 4), "id": id, "source": "synthetic",
        "problem": format!("Problem {index}: what is 3 + 4?"), "reference_answer": "7", "sample_index": index % 4,
        "status": "ok", "error": null, "reasoning": reasoning, "content": content,
        "messages": [
            {"role": "user", "content": format!("Problem {index}: what is 3 + 4?")},
            {"role": "assistant", "content": format!("<think>\n{reasoning}\n</think>\n\n{content}")},
        ],
        "extracted_answer": "7", "correct": true, "verdict": "correct", "verifier": "datagen-verify",
        "filters_failed": [], "accepted": true, "finish_reason": "stop", "prompt_tokens": 20,
        "completion_tokens": reasoning.len() / 4, "usage_source": "server", "teacher_model": "synthetic",
        "endpoint": null, "temperature": 0.6, "top_p": 0.95, "max_tokens": 32768, "latency_ms": 1,
        "attempts": 1, "reasoning_parser": "reasoning_content", "created_at": "2026-11-30T00:00:00Z"
    }))
    .expect("a valid row")
}

/// Writes a complete run of about `bytes` of traces (each stored once, in `messages`) into `dir`.
fn write_run(dir: &Path, bytes: usize) -> usize {
    let trace_len = 256 * 1024;
    let rows = bytes / trace_len;
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let mut writer = datagen::store::GenerationWriter::new(&dir.join("data"), 0, 64).unwrap();
    // Text that varies from row to row, so that neither compression nor a cache makes it small.
    let words = ["so", "then", "we", "have", "the", "sum", "of", "three", "and", "four", "which", "gives", "seven", "check"];
    for index in 0..rows {
        let mut reasoning = String::with_capacity(trace_len + 64);
        let mut state = index as u64 * 2654435761 + 1;
        while reasoning.len() < trace_len {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            reasoning.push_str(words[(state >> 59) as usize % words.len()]);
            reasoning.push(if state & 0xff == 0 { '\n' } else { ' ' });
        }
        writer.push(synthetic_row(index, &reasoning)).unwrap();
    }
    writer.finish().unwrap();
    let manifest = serde_json::json!({"tool": "test", "generation": 0, "status": "complete", "prompts": {}, "runs": []});
    datagen::run::write_manifest(dir, &manifest).unwrap();
    rows
}

#[test]
fn stats_export_merge_and_rescore_stream_a_run_larger_than_their_memory() {
    let gib: f64 = std::env::var("DATAGEN_SCALE_GIB").ok().and_then(|v| v.parse().ok()).unwrap_or(0.75);
    let cap_mib: u64 = std::env::var("DATAGEN_SCALE_CAP_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let dir = tempfile::tempdir().unwrap();
    // DATAGEN_SCALE_DIR keeps the generated run for a closer look.
    let kept = std::env::var_os("DATAGEN_SCALE_DIR").map(std::path::PathBuf::from);
    let run = kept.clone().unwrap_or_else(|| dir.path().join("run"));
    let rows = write_run(&run, (gib * (1u64 << 30) as f64) as usize);
    let run_text = run.to_str().unwrap();
    let exported = dir.path().join("open-r1.parquet");
    let datagen = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_datagen"))
            .args(args)
            .env("DATAGEN_REPORT_PEAK_RSS", "1")
            .current_dir(common::repo_root())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{args:?}: {stderr}");
        let peak = reported_peak(&stderr);
        println!("{:<8} peak RSS {:>6} MiB ({gib} GiB of traces, {rows} rows)", args[0], peak >> 20);
        assert!(peak <= cap_mib << 20, "{args:?}: peak RSS {} MiB above the cap of {cap_mib} MiB", peak >> 20);
        output
    };
    let stats = datagen(&["stats", run_text, "--json"]);
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["samples"].as_u64(), Some(rows as u64));
    datagen(&["export", run_text, "--out", exported.to_str().unwrap()]);
    let file = std::fs::File::open(&exported).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    assert!(reader.metadata().num_row_groups() > 1, "written in row groups");
    let problems: usize = reader.build().unwrap().map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(problems, rows.div_ceil(4));
    let merged = dir.path().join("merged");
    datagen(&["merge", "--out", merged.to_str().unwrap(), run_text]);
    assert_eq!(datagen::run::read_manifest(&merged).unwrap()["generation"], 0);
    datagen(&["rescore", run_text, "--keep", "all", "--filters", "none"]);
    let manifest = datagen::run::read_manifest(&run).unwrap();
    assert_eq!(manifest["generation"], 1);
    let mut count = 0;
    datagen::store::for_each_row(&run.join("data"), 1, |_| {
        count += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(count, rows);
}
