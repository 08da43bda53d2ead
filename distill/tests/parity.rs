//! Numerical parity with transformers on the committed fixtures (tests/fixtures/make_fixtures.py):
//! logits, per-row NLL, tokenization through the chat template, greedy decoding alone and in a
//! left-padded batch (tests/fixtures/make_generate_reference.py), and continuous batching, on flex
//! and on wgpu.

mod common;

use distill::burn::tensor::Device;
use distill::data::records::read_records;
use distill::eval::{Example, example_nll};
use std::collections::HashMap;

use distill::generate::{BatchGenerator, FinishReason, SamplingParams, generate};
use distill::model::LoadOptions;
use distill::pretrained::Pretrained;
use serde_json::Value;

const MODELS: [&str; 2] = ["tiny-qwen2", "tiny-llama"];

fn load(name: &str, device: &Device) -> Pretrained {
    Pretrained::load(&common::fixtures().join(name), device, LoadOptions::default()).unwrap()
}

fn ids(value: &Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

#[test]
fn logits_match_transformers() {
    let reference = common::reference();
    for (device_name, device) in common::devices() {
        for name in MODELS {
            let pretrained = load(name, &device);
            let entry = &reference[name];
            for case in entry["logits"].as_array().unwrap() {
                let row = entry["rows"].as_array().unwrap().iter().find(|r| r["id"] == case["id"]).unwrap();
                let input_ids = ids(&row["input_ids"]);
                let logits = pretrained.model.logits(std::slice::from_ref(&input_ids));
                let [_, seq, vocab] = logits.dims();
                let data = logits.into_data().convert::<f32>();
                let values = data.as_slice::<f32>().unwrap();
                let vocab_ids = ids(&case["vocab_ids"]);
                let mut max_error = 0.0f64;
                for position in 0..seq {
                    let row_logits = &values[position * vocab..(position + 1) * vocab];
                    let expected = case["values"][position].as_array().unwrap();
                    for (k, &vocab_id) in vocab_ids.iter().enumerate() {
                        let error = (row_logits[vocab_id as usize] as f64 - expected[k].as_f64().unwrap()).abs();
                        max_error = max_error.max(error);
                    }
                    let max = row_logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                    let logsumexp = max + row_logits.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
                    max_error = max_error.max((logsumexp - case["logsumexp"][position].as_f64().unwrap()).abs());
                    assert_eq!(
                        distill::generate::argmax(row_logits) as u64,
                        case["argmax"][position].as_u64().unwrap(),
                        "{name} on {device_name}: argmax differs at position {position}"
                    );
                }
                println!("{name} on {device_name}, row {}: max |Δlogit| = {max_error:.2e}", case["id"]);
                assert!(max_error < 1e-4, "{name} on {device_name}: max logit error {max_error}");
            }
        }
    }
}

#[test]
fn per_row_nll_matches_transformers_loss() {
    let reference = common::reference();
    let records = read_records(&common::fixtures().join("eval_rows.jsonl")).unwrap();
    for (device_name, device) in common::devices() {
        for name in MODELS {
            let pretrained = load(name, &device);
            for (record, expected) in records.iter().zip(reference[name]["rows"].as_array().unwrap()) {
                let example = Example::from_record(record, &pretrained.tokenizer).unwrap();
                assert_eq!(example.input_ids, ids(&expected["input_ids"]), "{name}: tokens of {}", expected["id"]);
                let (sum, tokens) = example_nll(&pretrained.model, &example);
                assert_eq!(tokens as u64, expected["tokens"].as_u64().unwrap(), "{name}: scored tokens of {}", expected["id"]);
                let nll = sum / tokens as f64;
                let want = expected["nll"].as_f64().unwrap();
                let relative = (nll - want).abs() / want;
                println!("{name} on {device_name}, {}: nll {nll:.6} vs {want:.6} (rel {relative:.1e})", expected["id"]);
                // Losses must be informative: well under ln(vocab) ≈ 11.8.
                assert!(want < 10.0, "fixture model is untrained ({want})");
                assert!(relative < 1e-5, "{name} on {device_name}: NLL {nll} vs transformers {want}");
            }
        }
    }
}

#[test]
fn greedy_decoding_matches_transformers() {
    let reference = common::reference();
    for (device_name, device) in common::devices() {
        for name in MODELS {
            let pretrained = load(name, &device);
            let greedy = &reference[name]["greedy"];
            let prompt = ids(&greedy["prompt_ids"]);
            let params = SamplingParams { max_new_tokens: 32, temperature: 0.0, top_p: 1.0, seed: 0 };
            let (generated, _) = generate(&pretrained.model, &prompt, &params, &pretrained.eos_token_ids, |_| {});
            assert_eq!(generated, ids(&greedy["generated_ids"]), "{name} on {device_name}");
        }
    }
}

/// Steps `batch` until every sequence is done; the tokens by id, checked against the stream.
fn run_to_completion(batch: &mut BatchGenerator, model: &distill::model::Model) -> HashMap<u64, (Vec<u32>, FinishReason)> {
    let mut streamed: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut done = HashMap::new();
    while !batch.is_empty() {
        for finished in batch.step(model, |id, token| streamed.entry(id).or_default().push(token)) {
            assert_eq!(streamed.remove(&finished.id).unwrap_or_default(), finished.tokens, "streamed tokens of {}", finished.id);
            assert!(done.insert(finished.id, (finished.tokens, finished.finish_reason)).is_none(), "{} finished twice", finished.id);
        }
    }
    done
}

#[test]
fn batched_greedy_matches_transformers_left_padded_batch() {
    let text = std::fs::read_to_string(common::fixtures().join("generate_reference.json")).unwrap();
    let reference: Value = serde_json::from_str(&text).unwrap();
    for (device_name, device) in common::devices() {
        for name in MODELS {
            let pretrained = load(name, &device);
            let rows = reference[name].as_array().unwrap();
            let mut batch = BatchGenerator::new(&pretrained.eos_token_ids, rows.len());
            for (id, row) in rows.iter().enumerate() {
                let params = SamplingParams { max_new_tokens: 24, temperature: 0.0, top_p: 1.0, seed: 0 };
                batch.add(id as u64, ids(&row["prompt_ids"]), params);
            }
            let done = run_to_completion(&mut batch, &pretrained.model);
            for (id, row) in rows.iter().enumerate() {
                assert_eq!(done[&(id as u64)].0, ids(&row["generated_ids"]), "{name} on {device_name}, row {id}");
            }
        }
    }
}

#[test]
fn continuous_batching_gives_each_sequence_what_it_gives_alone() {
    let greedy = |max_new_tokens| SamplingParams { max_new_tokens, temperature: 0.0, top_p: 1.0, seed: 0 };
    let sampled = |max_new_tokens, seed| SamplingParams { max_new_tokens, temperature: 0.8, top_p: 0.95, seed };
    for (device_name, device) in common::devices() {
        let pretrained = load("tiny-llama", &device);
        let chat = |question: &str| {
            let messages = [distill::text::Message::new("user", question)];
            pretrained.tokenizer.encode_chat(&messages, true).unwrap()
        };
        // Prompts of different lengths and budgets, more than fit in the batch: sequences
        // finish at different steps and waiting ones join a batch that is mid-way.
        let requests: Vec<(Vec<u32>, SamplingParams)> = vec![
            (chat("What is 7 times 6?"), greedy(30)),
            (chat("Find the sum of the first ten positive odd integers."), sampled(20, 1)),
            (vec![4516], greedy(5)),
            ((0..50).map(|i| (i * 97 % 1000) as u32 + 10).collect(), sampled(12, 2)),
            (chat("2 + 2?"), greedy(17)),
            (chat("Is 91 prime? Answer briefly."), sampled(25, 3)),
            (Vec::new(), greedy(4)),
            (chat("Say hi."), greedy(0)),
        ];
        let mut batch = BatchGenerator::new(&pretrained.eos_token_ids, 3);
        for (id, (prompt, params)) in requests.iter().enumerate() {
            batch.add(id as u64, prompt.clone(), params.clone());
        }
        let done = run_to_completion(&mut batch, &pretrained.model);
        assert_eq!(done.len(), requests.len());
        for (id, (prompt, params)) in requests.iter().enumerate() {
            let alone = generate(&pretrained.model, prompt, params, &pretrained.eos_token_ids, |_| {});
            assert_eq!(done[&(id as u64)], alone, "request {id} on {device_name}");
        }
        assert!(done[&1].0.len() > 1 && done[&3].0.len() > 1, "sampled rows produced tokens");
    }
}

#[test]
fn eval_command_prints_reference_nll_as_json() {
    let reference = common::reference();
    let output = common::distill(&[
        "eval", "--model", "tests/fixtures/tiny-llama", "--data", "tests/fixtures/eval_rows.jsonl",
        "--device", "flex", "--json",
    ]);
    assert!(output.status.success(), "{}", common::stderr(&output));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let expected = reference["tiny-llama"]["rows"].as_array().unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), expected.len());
    let (mut sum, mut count) = (0.0, 0);
    for (row, want) in rows.iter().zip(expected) {
        let (nll, want_nll) = (row["nll"].as_f64().unwrap(), want["nll"].as_f64().unwrap());
        assert!((nll - want_nll).abs() / want_nll < 1e-5);
        assert_eq!(row["tokens"], want["tokens"]);
        sum += want_nll * want["tokens"].as_f64().unwrap();
        count += want["tokens"].as_u64().unwrap();
    }
    assert_eq!(report["total_tokens"].as_u64().unwrap(), count);
    assert!((report["mean_nll"].as_f64().unwrap() - sum / count as f64).abs() < 1e-5);
    assert!(common::stderr(&output).contains("device: flex"));
}

#[test]
fn generate_command_streams_the_greedy_continuation() {
    let reference = common::reference();
    let messages = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        messages.path(),
        r#"[{"role": "user", "content": "What is 7 times 6? Please reason step by step."}]"#,
    )
    .unwrap();
    let output = common::distill(&[
        "generate", "--model", "tests/fixtures/tiny-qwen2", "--messages", messages.path().to_str().unwrap(),
        "--temperature", "0", "--max-new-tokens", "32", "--device", "flex",
    ]);
    assert!(output.status.success(), "{}", common::stderr(&output));
    let text = String::from_utf8(output.stdout).unwrap();
    let expected = reference["tiny-qwen2"]["greedy"]["text"].as_str().unwrap();
    assert_eq!(text, format!("{expected}\n"));
}

/// Decoding one token at a time through the KV cache gives the logits of a full forward pass.
#[test]
fn kv_cache_steps_equal_full_forward() {
    let reference = common::reference();
    for (device_name, device) in common::devices() {
        for name in MODELS {
            let pretrained = load(name, &device);
            let input_ids = ids(&reference[name]["rows"][2]["input_ids"]);
            let full = pretrained.model.logits(std::slice::from_ref(&input_ids)).into_data().convert::<f32>();
            let full = full.as_slice::<f32>().unwrap();
            let vocab = pretrained.model.config.vocab_size;
            let mut cache = pretrained.model.new_cache();
            // A prompt chunk first, then single tokens: both cache paths.
            let split = input_ids.len() / 2;
            let mut stepped = vec![pretrained.model.step(&input_ids[..split], &mut cache)];
            for &token in &input_ids[split..] {
                stepped.push(pretrained.model.step(&[token], &mut cache));
            }
            for (offset, logits) in stepped.into_iter().enumerate() {
                let position = split - 1 + offset;
                let logits = logits.into_data().convert::<f32>();
                let expected = &full[position * vocab..(position + 1) * vocab];
                let error = logits.as_slice::<f32>().unwrap().iter().zip(expected).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                assert!(error < 1e-4, "{name} on {device_name}: position {position} differs by {error}");
            }
        }
    }
}

/// bf16 compute (flex has it) stays within bf16 precision of transformers' f32 loss.
#[test]
fn bf16_on_flex_is_close_to_the_f32_reference() {
    let reference = common::reference();
    let device = distill::device::parse("flex").unwrap();
    let options = LoadOptions::in_dtype(distill::burn::tensor::DType::BF16);
    let records = read_records(&common::fixtures().join("eval_rows.jsonl")).unwrap();
    for name in MODELS {
        let pretrained = Pretrained::load(&common::fixtures().join(name), &device, options).unwrap();
        for (record, expected) in records.iter().zip(reference[name]["rows"].as_array().unwrap()) {
            let example = Example::from_record(record, &pretrained.tokenizer).unwrap();
            let (sum, tokens) = example_nll(&pretrained.model, &example);
            let (nll, want) = (sum / tokens as f64, expected["nll"].as_f64().unwrap());
            assert!((nll - want).abs() / want < 2e-2, "{name} bf16: {nll} vs {want}");
        }
    }
}

/// The same rows as Parquet (as HF `datasets` / pyarrow write them, `messages` a list of
/// structs, nulls where a row has no `text`) score exactly like the JSONL rows.
#[test]
fn parquet_rows_score_like_jsonl_rows() {
    let run = |data: &str| {
        let output = common::distill(&["eval", "--model", "tests/fixtures/tiny-qwen2", "--data", data, "--device", "flex", "--json"]);
        assert!(output.status.success(), "{}", common::stderr(&output));
        serde_json::from_slice::<Value>(&output.stdout).unwrap()
    };
    let jsonl = run("tests/fixtures/eval_rows.jsonl");
    let parquet = run("tests/fixtures/eval_rows.parquet");
    assert_eq!(jsonl, parquet);
    // A glob over both reads every row twice.
    let both = run("tests/fixtures/eval_rows.*");
    assert_eq!(both["rows"].as_array().unwrap().len(), 2 * jsonl["rows"].as_array().unwrap().len());
}
