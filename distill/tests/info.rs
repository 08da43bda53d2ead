//! `distill info` on the R1 student configs: parameter counts equal the real checkpoints'.

mod common;

use distill::student::StudentConfig;

#[test]
fn student_parameter_counts_match_the_real_models() {
    let expected = [
        ("qwen2.5-math-1.5b.toml", "1.54B"),
        ("qwen2.5-math-7b.toml", "7.62B"),
        ("llama-3.1-8b.toml", "8.03B"),
        ("qwen2.5-14b.toml", "14.77B"),
        ("qwen2.5-32b.toml", "32.76B"),
        ("llama-3.3-70b-instruct.toml", "70.55B"),
    ];
    for (file, count) in expected {
        let path = common::repo_root().join("student_configs").join(file);
        let student = StudentConfig::from_path(&path).unwrap();
        assert_eq!(distill::info::human_count(student.model.num_parameters()), count, "{file}");
        let training = &student.training;
        assert_eq!(training.learning_rate, Some(4e-5), "{file}");
        assert_eq!(training.max_grad_norm, Some(0.2), "{file}");
        assert_eq!(training.warmup_ratio, Some(0.03), "{file}");
        let global_batch = training.per_device_train_batch_size.unwrap() * training.gradient_accumulation_steps.unwrap();
        assert_eq!(global_batch, 128, "{file}");

        let output = common::distill(&["info", path.to_str().unwrap(), "--seq-len", "32768"]);
        assert!(output.status.success(), "{}", common::stderr(&output));
        let text = String::from_utf8(output.stdout).unwrap();
        assert!(text.contains(count) && text.contains("LoRA") && text.contains("GiB"), "{text}");
    }
}

#[test]
fn tiny_configs_match_their_fixtures() {
    for name in ["tiny-qwen2", "tiny-llama"] {
        let student = StudentConfig::from_path(&common::repo_root().join(format!("student_configs/{name}.toml"))).unwrap();
        let fixture = distill::model::ModelConfig::from_path(&common::fixtures().join(name)).unwrap();
        assert_eq!(student.model.num_parameters(), fixture.num_parameters(), "{name}");
        assert_eq!(student.model.rope_scaling, fixture.rope_scaling, "{name}");
    }
}

#[test]
fn info_json_and_memory_grows_with_length() {
    let run = |seq: &str| {
        let output = common::distill(&["info", "student_configs/llama-3.1-8b.toml", "--seq-len", seq, "--json"]);
        assert!(output.status.success(), "{}", common::stderr(&output));
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    let (short, long) = (run("1024"), run("32768"));
    assert_eq!(short["parameters"], 8_030_261_248u64);
    for key in ["inference_bytes", "full_training_bytes", "lora_training_bytes"] {
        assert!(long[key].as_u64() > short[key].as_u64(), "{key}");
    }
    assert!(short["lora_training_bytes"].as_u64() < short["full_training_checkpointed_bytes"].as_u64());
}
