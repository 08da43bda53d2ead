//! Real tokenizers against Hugging Face reference ids, and chat templates rendered byte for
//! byte as `transformers.apply_chat_template` renders them.

mod common;

use distill::text::{Message, Tokenizer};
use serde_json::Value;

fn tokenizer(name: &str) -> Tokenizer {
    Tokenizer::from_dir(&common::fixtures().join("tokenizers").join(name)).unwrap()
}

#[test]
fn reference_ids_of_shared_vectors() {
    let path = common::fixtures().join("tokenizers/reference_ids.json");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let tokenizer = tokenizer(case["tokenizer"].as_str().unwrap());
        let text = case["text"].as_str().unwrap();
        let add_special = case["add_special_tokens"].as_bool().unwrap();
        let expected: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(tokenizer.encode(text, add_special).unwrap(), expected, "{case}");
    }
}

/// llama.cpp's tokenizer test vectors, whose ids were produced by the HF tokenizers.
#[test]
fn llama_cpp_hf_vectors() {
    for (name, stem) in [("qwen2", "ggml-vocab-qwen2.gguf"), ("llama3", "ggml-vocab-llama-bpe.gguf")] {
        let tokenizer = tokenizer(name);
        let dir = common::fixtures().join("tokenizers").join(name).join("ref");
        let inputs = std::fs::read_to_string(dir.join(format!("{stem}.inp"))).unwrap();
        let outputs = std::fs::read_to_string(dir.join(format!("{stem}.out"))).unwrap();
        let inputs: Vec<&str> = inputs.split("\n__ggml_vocab_test__\n").collect();
        let outputs: Vec<&str> = outputs.lines().collect();
        assert_eq!(inputs.len() - 1, outputs.len(), "{name}: the .inp file ends with a separator");
        for (text, ids) in inputs.iter().zip(&outputs) {
            let expected: Vec<u32> = ids.split_whitespace().map(|id| id.parse().unwrap()).collect();
            assert_eq!(tokenizer.encode(text, false).unwrap(), expected, "{name}: {text:?}");
        }
        println!("{name}: {} vectors", outputs.len());
    }
}

#[test]
fn chat_templates_render_like_transformers() {
    let path = common::fixtures().join("chat_templates.json");
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(cases.len() >= 18);
    for case in &cases {
        let tokenizer = tokenizer(case["tokenizer"].as_str().unwrap());
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
        let rendered = tokenizer.apply_chat_template(&messages, generation_prompt).unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap(), "{} / {}", case["tokenizer"], case["case"]);
        let ids: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(tokenizer.encode_chat(&messages, generation_prompt).unwrap(), ids, "{} / {}", case["tokenizer"], case["case"]);
    }
}

#[test]
fn r1_template_drops_reasoning_from_history_and_keeps_bos() {
    let tokenizer = tokenizer("deepseek-r1-distill-qwen");
    let messages = [
        Message::new("user", "1+1?"),
        Message::new("assistant", "<think>\nadd\n</think>\n\n2"),
    ];
    let rendered = tokenizer.apply_chat_template(&messages, false).unwrap();
    assert_eq!(rendered, "<｜begin▁of▁sentence｜><｜User｜>1+1?<｜Assistant｜>\n\n2<｜end▁of▁sentence｜>");
}
