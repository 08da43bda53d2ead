//! The memory plan matches measurement: `distill train` prints its plan before the first step
//! and its peak memory at the end; on flex the two agree within 25%, at several lengths, for
//! full fine-tuning in f32 and bf16, with layer checkpointing and with LoRA.
//!
//! One test function: the runs of `distill train` are separate processes, each measuring its
//! own peak, and they run one after another.

mod common;

fn gib_after(text: &str, label: &str) -> f64 {
    let line = text.lines().find(|l| l.trim_start().starts_with(label)).unwrap_or_else(|| panic!("no `{label}` line in:\n{text}"));
    let number = line.split_whitespace().find_map(|w| w.parse::<f64>().ok()).unwrap_or_else(|| panic!("no number in `{line}`"));
    number
}

#[test]
fn the_plan_of_distill_train_is_within_25_percent_of_its_measured_peak() {
    if !cfg!(target_os = "linux") {
        return;
    }
    // A student whose weights, optimizer state, activations and loss all matter: the Qwen2.5
    // tokenizer's 152k vocabulary at width 128, 4 layers.
    let model = common::copy_fixture("tiny-qwen2");
    let path = model.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (key, value) in [("hidden_size", 128), ("intermediate_size", 384), ("num_hidden_layers", 4), ("num_attention_heads", 4), ("num_key_value_heads", 2), ("max_position_embeddings", 8192)] {
        config[key] = value.into();
    }
    config.as_object_mut().unwrap().remove("head_dim");
    std::fs::write(&path, config.to_string()).unwrap();
    let runs = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str]); 11] = [
        ("1024", &[]),
        ("4096", &[]),
        ("4096", &["--gradient-checkpointing"]),
        ("2048", &["--dtype", "bf16"]),
        ("4096", &["--lora-rank", "8", "--gradient-checkpointing"]),
        // The routes of `distill info`: LoRA over a bf16 base, QLoRA, and data parallel with
        // the optimizer sharded (two replicas on flex: the host holds both).
        ("1024", &["--lora-rank", "8", "--dtype", "bf16"]),
        ("4096", &["--lora-rank", "8", "--dtype", "bf16", "--gradient-checkpointing"]),
        ("1024", &["--lora-rank", "8", "--load-in-4bit"]),
        ("4096", &["--lora-rank", "8", "--load-in-4bit", "--gradient-checkpointing"]),
        ("1024", &["--devices", "flex,flex", "--shard-optimizer"]),
        ("2048", &["--devices", "flex,flex", "--shard-optimizer", "--gradient-checkpointing"]),
    ];
    let mut failures = Vec::new();
    for (index, (length, extra)) in cases.iter().enumerate() {
        let out = runs.path().join(format!("run{index}"));
        let mut args = vec![
            "train", "--model", model.path().to_str().unwrap(), "--init", "random", "--data", "datasets/r1_traces_sample40.jsonl",
            "--prompt-field", "problem", "--response-field", "generated_solution", "--out", out.to_str().unwrap(),
            "--max-length", length, "--truncate", "--packing", "--max-steps", "2",
        ];
        if !extra.contains(&"--devices") {
            args.extend_from_slice(&["--device", "flex"]);
        }
        args.extend_from_slice(extra);
        let output = common::distill(&args);
        let err = common::stderr(&output);
        assert!(output.status.success(), "{err}");
        let plan = if err.contains("host total") { gib_after(&err, "host total") } else { gib_after(&err, "total") };
        let peak = gib_after(&err, "peak memory");
        let longest: usize = err.lines().find_map(|l| l.strip_prefix("memory plan at ")?.split_whitespace().next()?.parse().ok()).unwrap();
        let ratio = plan / peak;
        println!("{length} {extra:?}: longest block {longest} tokens, plan {plan:.3} GiB, measured {peak:.3} GiB ({:+.0}%)", 100.0 * (ratio - 1.0));
        assert!(longest * 2 > length.parse::<usize>().unwrap(), "the data did not fill the blocks: {longest} tokens");
        if !(0.75..=1.25).contains(&ratio) {
            failures.push(format!("{length} {extra:?}: plan {plan:.3} GiB vs measured {peak:.3} GiB"));
        }
    }
    assert!(failures.is_empty(), "the plan drifted more than 25% from measurement:\n{}", failures.join("\n"));
}
