//! Broken checkpoints and data give clear errors naming the file, tensor, row or field, a
//! non-zero exit code, and never a panic.

mod common;

use std::fs;

use common::{assert_clean_failure, copy_fixture, distill};

fn eval(model: &str, data: &str) -> std::process::Output {
    distill(&["eval", "--model", model, "--data", data, "--device", "flex"])
}

const ROWS: &str = "tests/fixtures/eval_rows.jsonl";

/// Rewrites the config.json of a copied fixture.
fn edit_config(dir: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    fs::write(&path, config.to_string()).unwrap();
}

#[test]
fn truncated_safetensors() {
    let dir = copy_fixture("tiny-qwen2");
    let path = dir.path().join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_failure(&eval(dir.path().to_str().unwrap(), ROWS), &["model.safetensors", "truncated"]);
}

#[test]
fn wrong_shape_names_the_tensor_and_expected_shape() {
    let dir = copy_fixture("tiny-qwen2");
    edit_config(dir.path(), |config| config["intermediate_size"] = 64.into());
    assert_clean_failure(
        &eval(dir.path().to_str().unwrap(), ROWS),
        &["model.layers.0.mlp.gate_proj.weight", "[64, 16]", "[48, 16]"],
    );
}

#[test]
fn missing_shard() {
    let dir = copy_fixture("tiny-llama");
    let shard = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("of-00002.safetensors"))
        .expect("the llama fixture has two shards");
    fs::remove_file(&shard).unwrap();
    let name = shard.file_name().unwrap().to_str().unwrap().to_string();
    assert_clean_failure(&eval(dir.path().to_str().unwrap(), ROWS), &[&name]);
}

#[test]
fn unexpected_tensor_is_named() {
    let dir = copy_fixture("tiny-llama");
    edit_config(dir.path(), |config| config["num_hidden_layers"] = 1.into());
    assert_clean_failure(&eval(dir.path().to_str().unwrap(), ROWS), &["model.layers.1."]);
}

#[test]
fn tokenizer_of_another_model() {
    let dir = copy_fixture("tiny-llama");
    // The Qwen tokenizer (151,665 tokens) does not fit Llama's 128,256-entry embedding.
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        fs::copy(common::fixtures().join("tiny-qwen2").join(file), dir.path().join(file)).unwrap();
    }
    assert_clean_failure(&eval(dir.path().to_str().unwrap(), ROWS), &["vocab_size is 128256"]);
}

#[test]
fn malformed_config() {
    let dir = copy_fixture("tiny-qwen2");
    fs::write(dir.path().join("config.json"), "{\"hidden_size\": 16,").unwrap();
    assert_clean_failure(&eval(dir.path().to_str().unwrap(), ROWS), &["config.json", "not valid JSON"]);
}

#[test]
fn unknown_architecture() {
    let dir = copy_fixture("tiny-qwen2");
    edit_config(dir.path(), |config| config["architectures"] = serde_json::json!(["MixtralForCausalLM"]));
    assert_clean_failure(&eval(dir.path().to_str().unwrap(), ROWS), &["architectures", "MixtralForCausalLM"]);
}

#[test]
fn not_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("config.json"), fs::read(common::fixtures().join("tiny-qwen2/config.json")).unwrap()).unwrap();
    assert_clean_failure(&eval(dir.path().to_str().unwrap(), ROWS), &["model.safetensors"]);
}

#[test]
fn empty_data_file() {
    let data = tempfile::Builder::new().suffix(".jsonl").tempfile().unwrap();
    assert_clean_failure(&eval("tests/fixtures/tiny-qwen2", data.path().to_str().unwrap()), &["no rows"]);
}

#[test]
fn row_without_text_or_messages_names_file_line_and_field() {
    let data = tempfile::Builder::new().suffix(".jsonl").tempfile().unwrap();
    fs::write(data.path(), "{\"text\": \"fine row\"}\n{\"prompt\": \"no text here\"}\n").unwrap();
    let name = data.path().to_str().unwrap();
    assert_clean_failure(&eval("tests/fixtures/tiny-qwen2", name), &[&format!("{name}:2"), "text", "messages"]);
}

#[test]
fn bad_json_line_and_bad_message_types() {
    let data = tempfile::Builder::new().suffix(".jsonl").tempfile().unwrap();
    fs::write(data.path(), "{\"text\": \"ok\"}\n{not json\n").unwrap();
    let name = data.path().to_str().unwrap();
    assert_clean_failure(&eval("tests/fixtures/tiny-qwen2", name), &[&format!("{name}:2")]);

    fs::write(data.path(), "{\"messages\": [{\"role\": \"user\", \"content\": 5}]}\n").unwrap();
    assert_clean_failure(&eval("tests/fixtures/tiny-qwen2", name), &["messages[0].content", "a number"]);
}

#[test]
fn unknown_device_is_a_clear_error() {
    let output = distill(&["eval", "--model", "tests/fixtures/tiny-qwen2", "--data", ROWS, "--device", "tpu"]);
    assert_clean_failure(&output, &["unknown device `tpu`"]);
}
