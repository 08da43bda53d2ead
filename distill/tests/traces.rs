//! Trace rows → SFT examples: reasoning kept, prompt masked, lengths handled and counted, bad
//! rows reported per row; packing computes exactly what the unpacked rows compute.

mod common;

use distill::data::packing::{PackedBlock, pack};
use distill::data::records::read_records;
use distill::data::traces::{LengthPolicy, TraceFormat, TraceOptions, tokenize_records};
use distill::eval::log_sum_exp;
use distill::model::LoadOptions;
use distill::pretrained::Pretrained;
use distill::text::Tokenizer;

fn r1_tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&common::fixtures().join("tokenizers/deepseek-r1-distill-qwen")).unwrap()
}

fn options(max_length: usize) -> TraceOptions {
    TraceOptions {
        format: TraceFormat::PromptResponse { prompt_field: "problem".into(), response_field: "generated_solution".into() },
        max_length,
        length_policy: LengthPolicy::Drop,
        train_on_prompt: false,
    }
}

#[test]
fn real_r1_traces_keep_their_reasoning_and_mask_the_prompt() {
    let tokenizer = r1_tokenizer();
    let records = read_records(&common::repo_root().join("datasets/r1_traces_sample40.jsonl")).unwrap();
    let (examples, skipped) = tokenize_records(&records, &tokenizer, &options(4096)).unwrap();
    assert_eq!(examples.len(), 40, "{}", skipped.summary());
    let eos = tokenizer.eos_token_id().unwrap();
    for example in &examples {
        let first_trained = example.trained.iter().position(|&t| t).unwrap();
        let completion = tokenizer.decode(&example.input_ids[first_trained..], false).unwrap();
        assert!(completion.starts_with("<think>\n"), "{completion:.40}");
        assert!(completion.contains("</think>") && completion.contains("\\boxed"));
        assert_eq!(*example.input_ids.last().unwrap(), eos);
        let prompt = tokenizer.decode(&example.input_ids[..first_trained], false).unwrap();
        assert!(prompt.ends_with("<｜Assistant｜>"), "{prompt}");
        assert!(example.trained[first_trained..].iter().all(|&t| t));
    }

    // Shorter max_length: long rows are dropped and counted, or truncated and counted.
    let (short, skipped) = tokenize_records(&records, &tokenizer, &options(1500)).unwrap();
    assert_eq!(short.len() + skipped.too_long_dropped, 40);
    assert!(skipped.too_long_dropped > 0);
    let truncating = TraceOptions { length_policy: LengthPolicy::Truncate, ..options(1500) };
    let (truncated, skipped) = tokenize_records(&records, &tokenizer, &truncating).unwrap();
    assert_eq!(truncated.len(), 40);
    assert!(skipped.truncated > 0 && truncated.iter().all(|e| e.len() <= 1500));
}

#[test]
fn bad_rows_are_reported_per_row_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rows.jsonl");
    std::fs::write(
        &path,
        concat!(
            r#"{"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n2"}]}"#, "\n",
            r#"{"messages": [{"role": "user", "content": "no answer"}]}"#, "\n",
            r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\n\n</think>\n\n2"}]}"#, "\n",
            r#"{"messages": [{"role": "wizard", "content": "q"}, {"role": "assistant", "content": "a"}]}"#, "\n",
            r#"{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 5}]}"#, "\n",
        ),
    )
    .unwrap();
    let records = read_records(&path).unwrap();
    let messages = TraceOptions { format: TraceFormat::default(), ..options(64) };
    let (examples, skipped) = tokenize_records(&records, &r1_tokenizer(), &messages).unwrap();
    assert_eq!(examples.len(), 1);
    let reasons: Vec<String> = skipped.invalid.iter().map(|(at, why)| format!("{at}: {why}")).collect();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert!(reasons[0].contains("rows.jsonl:2") && reasons[0].contains("no final assistant turn"));
    assert!(reasons[1].contains(":3") && reasons[1].contains("empty reasoning"));
    assert!(reasons[2].contains(":4") && reasons[2].contains("unknown role `wizard`"));
    assert!(reasons[3].contains(":5") && reasons[3].contains("messages[1].content"));

    // A max_length smaller than the prompt is a counted, explained skip.
    let (examples, skipped) = tokenize_records(&records[..1], &r1_tokenizer(), &TraceOptions { max_length: 3, ..messages }).unwrap();
    assert!(examples.is_empty());
    assert!(skipped.invalid[0].1.contains("the prompt alone"), "{:?}", skipped.invalid);
}

/// Summed NLL of the trained tokens of a block, and how many there are.
fn block_loss(model: &distill::model::Model, block: &PackedBlock) -> (f64, usize) {
    let batch = distill::data::batch::Batch::new(&[block]);
    let logits = model.net.logits(model.hidden_batch(&batch, Default::default())).into_data().convert::<f32>();
    let logits = logits.as_slice::<f32>().unwrap();
    let vocab = model.config.vocab_size;
    let (mut sum, mut count) = (0.0, 0);
    for t in 1..block.len() {
        if block.trained[t] {
            let row = &logits[(t - 1) * vocab..t * vocab];
            sum += log_sum_exp(row) - row[block.input_ids[t] as usize] as f64;
            count += 1;
        }
    }
    (sum, count)
}

#[test]
fn packed_loss_equals_unpacked_loss() {
    let device = distill::device::parse("flex").unwrap();
    let pretrained = Pretrained::load(&common::fixtures().join("tiny-qwen2"), &device, LoadOptions::default()).unwrap();
    let records = read_records(&common::repo_root().join("datasets/math_prompts_sample100.jsonl")).unwrap();
    let rows = TraceOptions {
        format: TraceFormat::PromptResponse { prompt_field: "problem".into(), response_field: "answer".into() },
        ..options(160)
    };
    let (examples, _) = tokenize_records(&records[50..62], &pretrained.tokenizer, &rows).unwrap();
    assert!(examples.len() >= 10);
    let blocks = pack(&examples, 160, 3);
    assert!(blocks.len() < examples.len() && blocks.iter().any(|b| b.rows() > 1));
    let (packed_sum, packed_count) = blocks.iter().map(|b| block_loss(&pretrained.model, b)).fold((0.0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let (single_sum, single_count) = examples
        .iter()
        .map(|e| block_loss(&pretrained.model, &PackedBlock::single(e)))
        .fold((0.0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    assert_eq!(packed_count, single_count);
    let (packed, single) = (packed_sum / packed_count as f64, single_sum / single_count as f64);
    assert!((packed - single).abs() / single < 1e-5, "packed {packed} vs unpacked {single}");

    // One batched forward pass of the packed blocks (shorter ones padded) gives the same loss
    // through the chunked cross-entropy.
    let refs: Vec<&PackedBlock> = blocks.iter().collect();
    let batch = distill::data::batch::Batch::new(&refs);
    assert!(batch.input_ids.iter().any(|row| row.len() > refs.iter().map(|b| b.len()).min().unwrap()), "the batch is padded");
    let batched = distill::train::nll_sum(&pretrained.model, &batch, Default::default()).unwrap().into_scalar::<f32>() as f64;
    assert_eq!(batch.targets.len(), single_count);
    let batched = batched / single_count as f64;
    assert!((batched - single).abs() / single < 1e-5, "batched {batched} vs unpacked {single}");
}

fn train_on(data: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let out = data.with_extension("run");
    let mut args = vec![
        "train", "--model", "student_configs/tiny-qwen2.toml", "--init", "random", "--data", data.to_str().unwrap(),
        "--out", out.to_str().unwrap(), "--max-steps", "1", "--max-length", "64", "--truncate", "--device", "flex",
    ];
    args.extend_from_slice(extra);
    common::distill(&args)
}

/// A Parquet file whose columns have the wrong Arrow types: every row is named with its file,
/// row and field, and `distill train` stops cleanly.
#[test]
fn parquet_with_wrong_column_types_is_a_clear_error() {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int64Array, StringArray};
    use arrow::record_batch::RecordBatch;

    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, columns: Vec<(&str, ArrayRef)>| {
        let path = dir.path().join(name);
        let batch = RecordBatch::try_from_iter(columns).unwrap();
        let mut writer = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        path
    };
    // `problem` as integers.
    let path = write("ints.parquet", vec![
        ("problem", Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef),
        ("generated_solution", Arc::new(StringArray::from(vec!["<think>\na\n</think>\n\n1", "<think>\nb\n</think>\n\n2"])) as ArrayRef),
    ]);
    let output = train_on(&path, &["--prompt-field", "problem", "--response-field", "generated_solution"]);
    common::assert_clean_failure(&output, &["no row can be trained on", "ints.parquet row 0", "problem", "expected a string, got a number"]);
    // `messages` as a plain string column instead of a list of {role, content}.
    let path = write("strings.parquet", vec![("messages", Arc::new(StringArray::from(vec!["user: hi", "assistant: hello"])) as ArrayRef)]);
    let output = train_on(&path, &[]);
    common::assert_clean_failure(&output, &["no row can be trained on", "strings.parquet row 0", "messages", "expected a list of messages"]);
}

/// Invalid UTF-8 in a JSONL file is an error naming the file and line, not a panic.
#[test]
fn invalid_utf8_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.jsonl");
    let mut bytes = br#"{"problem": "1+1?", "generated_solution": "<think>\nadd\n</think>\n\n2"}"#.to_vec();
    bytes.extend_from_slice(b"\n{\"problem\": \"caf\xe9\", \"generated_solution\": \"x\"}\n");
    std::fs::write(&path, bytes).unwrap();
    let output = train_on(&path, &["--prompt-field", "problem", "--response-field", "generated_solution"]);
    common::assert_clean_failure(&output, &["broken.jsonl:2", "invalid UTF-8"]);
}
