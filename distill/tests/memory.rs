//! Training memory grows linearly with the sequence length, and layer checkpointing lowers it,
//! measured: the peak resident memory of training steps (forward, backward, AdamW) on flex,
//! with small widths (so the layers' activations, not the weights, dominate) and long
//! sequences. Each measurement is a `distill bench train` process of its own, so no
//! measurement inherits another's heap.

mod common;

/// Bytes a training step on a `seq`-token row adds to the process (peak − resident memory
/// before the model was built), and the plan's prediction of the whole peak.
fn step_peak(config: &std::path::Path, seq: usize, checkpointing: bool) -> (u64, u64, u64) {
    let seq = seq.to_string();
    let mut args = vec!["--config", config.to_str().unwrap(), "--seq-len", &seq, "--steps", "1", "--device", "flex"];
    if checkpointing {
        args.push("--gradient-checkpointing");
    }
    let measured = common::bench_train_json(&args);
    let bytes = |key: &str| measured[key].as_u64().unwrap();
    (bytes("peak_memory_bytes") - bytes("baseline_bytes"), bytes("peak_memory_bytes"), bytes("plan_bytes"))
}

#[test]
fn a_training_step_grows_linearly_with_length_and_checkpointing_lowers_it() {
    if !cfg!(target_os = "linux") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    let json = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": 128, "intermediate_size": 384,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 8,
        "vocab_size": 512, "max_position_embeddings": 65536, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": true,
    });
    std::fs::write(&config, json.to_string()).unwrap();
    let short = 2048;
    let long = 4 * short;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut steps = Vec::new();
    for checkpointing in [false, true] {
        for seq in [short, long] {
            let (step, peak, plan) = step_peak(&config, seq, checkpointing);
            println!(
                "{seq} tokens{}: step {:.1} MiB; peak {:.1} MiB, plan {:.1} MiB",
                if checkpointing { ", checkpointing" } else { "" }, mib(step), mib(peak), mib(plan)
            );
            steps.push(step);
        }
    }
    let [plain_short, plain_long, checkpointed_short, checkpointed_long] = steps[..] else { unreachable!() };
    // Dense attention keeps heads × seq² scores per layer: 16× for 4× the tokens.
    assert!(plain_long as f64 <= 4.5 * plain_short as f64, "{:.1} MiB at {long} vs {:.1} MiB at {short}", mib(plain_long), mib(plain_short));
    assert!(
        checkpointed_long as f64 <= 4.5 * checkpointed_short as f64,
        "checkpointed: {:.1} MiB at {long} vs {:.1} MiB at {short}", mib(checkpointed_long), mib(checkpointed_short)
    );
    assert!(checkpointed_long < plain_long / 2, "checkpointing {:.1} MiB vs {:.1} MiB without", mib(checkpointed_long), mib(plain_long));
    assert!(checkpointed_short < plain_short);
}
