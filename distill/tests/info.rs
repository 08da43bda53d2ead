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

        let output = common::distill(&["info", path.to_str().unwrap(), "--max-length", "32768", "--gpu-memory", "80GB"]);
        assert!(output.status.success(), "{}", common::stderr(&output));
        let text = String::from_utf8(output.stdout).unwrap();
        assert!(text.contains(count) && text.contains("activations") && text.contains("total") && text.contains("fit"), "{text}");
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
    let run = |extra: &[&str]| {
        let mut args = vec!["info", "student_configs/llama-3.1-8b.toml", "--json", "--gpu-memory", "80GB"];
        args.extend_from_slice(extra);
        let output = common::distill(&args);
        assert!(output.status.success(), "{}", common::stderr(&output));
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    let bytes = |report: &serde_json::Value| report["training_bytes"].as_u64().unwrap();
    let item = |report: &serde_json::Value, name: &str| {
        report["training"]["items"].as_array().unwrap().iter().find(|i| i["name"] == name).unwrap()["bytes"].as_u64().unwrap()
    };
    let (short, long) = (run(&["--max-length", "1024"]), run(&["--max-length", "32768"]));
    assert_eq!(short["parameters"], 8_030_261_248u64);
    assert!(item(&long, "activations") > item(&short, "activations"));
    // Fully fine-tuned, an 8B model peaks in the optimizer step (f32 gradients and AdamW's
    // temporaries), whatever the length; with LoRA the backward pass's activations decide.
    assert!(bytes(&long) >= bytes(&short));
    let lora = |length: &str| bytes(&run(&["--max-length", length, "--lora-rank", "16"]));
    assert!(lora("32768") > lora("1024"));
    assert!(long["inference"]["kv_cache_bytes"].as_u64() > short["inference"]["kv_cache_bytes"].as_u64());
    // Full fine-tuning of an 8B model does not fit one 80 GB GPU; LoRA with checkpointing does.
    assert_eq!(short["fits"], false);
    let lora = run(&["--max-length", "4096", "--lora-rank", "16", "--gradient-checkpointing"]);
    assert!(bytes(&lora) < bytes(&short));
    let items: Vec<&str> = short["training"]["items"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
    for name in ["weights", "gradients", "optimizer moments", "activations", "attention", "loss", "loss gradients", "workspace", "optimizer step"] {
        assert!(items.contains(&name), "{name} missing from {items:?}");
    }
    // Attention's and the loss's transients take turns in the workspace: shown, counted once.
    assert!(item(&long, "workspace") >= item(&long, "attention").max(item(&long, "loss")));
    assert!(item(&long, "attention") > item(&short, "attention"));
    let counted: u64 = long["training"]["items"].as_array().unwrap().iter().filter(|i| i["phase"] != "transient" && i["phase"] != "host").map(|i| i["bytes"].as_u64().unwrap()).sum();
    assert!(bytes(&long) <= counted, "the transients are not added to the total");
}

/// Every student has a route at its own settings (32k tokens × 2 rows) on one 80 GB GPU; the
/// 70B's is QLoRA with the layer inputs offloaded, whose plan moves them to host memory.
#[test]
fn every_student_has_a_route_on_one_80gb_gpu() {
    let info = |config: &str, extra: &[&str]| {
        let mut args = vec!["info", config, "--json", "--gpu-memory", "80GB"];
        args.extend_from_slice(extra);
        let output = common::distill(&args);
        assert!(output.status.success(), "{}", common::stderr(&output));
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    for student in ["qwen2.5-math-1.5b", "qwen2.5-math-7b", "llama-3.1-8b", "qwen2.5-14b", "qwen2.5-32b", "llama-3.3-70b-instruct"] {
        let report = info(&format!("student_configs/{student}.toml"), &[]);
        let routes = report["routes"].as_array().unwrap();
        let first = routes.iter().find(|r| r["fits"] == true).unwrap_or_else(|| panic!("{student}: no route fits: {routes:?}"));
        if student.starts_with("llama-3.3-70b") {
            assert_eq!(first["name"], "QLoRA rank 16 (4-bit base) + activation offloading");
            assert!(first["flags"].as_str().unwrap().contains("--load-in-4bit --activation-offloading"));
            let without = routes.iter().find(|r| r["name"] == "QLoRA rank 16 (4-bit base)").unwrap();
            assert_eq!(without["fits"], false, "without offloading the 70B does not fit at 32k × 2");
        }
    }
    let offloaded = info("student_configs/llama-3.3-70b-instruct.toml", &["--lora-rank", "16", "--load-in-4bit", "--activation-offloading"]);
    let items = offloaded["training"]["items"].as_array().unwrap();
    let host = items.iter().find(|i| i["name"] == "offloaded").expect("an offloaded item");
    assert_eq!(host["phase"], "host");
    // 80 layers' inputs: 65536 tokens × 8192 × 2 bytes each.
    assert_eq!(host["bytes"].as_u64().unwrap(), 80 * 65536 * 8192 * 2);
    assert_eq!(offloaded["fits"], true);
}

/// On 8 × 80 GB the 7B and 8B students fully fine-tune with the optimizer sharded (as open-r1
/// trains its 7B with ZeRO), the 1.5B without sharding, and the 14B only with LoRA.
#[test]
fn routes_on_eight_80gb_gpus() {
    for (student, first_fit) in [
        ("qwen2.5-math-1.5b", "full"),
        ("qwen2.5-math-7b", "full + sharded optimizer"),
        ("llama-3.1-8b", "full + sharded optimizer"),
        ("qwen2.5-14b", "LoRA rank 16"),
    ] {
        let output = common::distill(&["info", &format!("student_configs/{student}.toml"), "--json", "--gpu-memory", "80GB", "--devices", "8"]);
        assert!(output.status.success(), "{}", common::stderr(&output));
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let routes = report["routes"].as_array().unwrap();
        let route = |name: &str| routes.iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("{student}: no {name} route in {routes:?}"));
        let first = routes.iter().find(|r| r["fits"] == true).unwrap_or_else(|| panic!("{student}: no route fits: {routes:?}"));
        assert_eq!(first["name"], first_fit, "{student}");
        let (full, sharded) = (route("full"), route("full + sharded optimizer"));
        assert!(sharded["flags"].as_str().unwrap().contains("--devices <8 devices> --shard-optimizer"), "{sharded}");
        assert!(sharded["bytes_per_device"].as_u64() < full["bytes_per_device"].as_u64(), "{student}: sharding lowers the memory per device");
        if first_fit == "LoRA rank 16" {
            assert_eq!(sharded["fits"], false, "{student}");
        }
    }
}
