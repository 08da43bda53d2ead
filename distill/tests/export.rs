//! HF checkpoint export: an unchanged model exports bit-exactly in f32, shards and an index
//! are written when asked, and the export scores exactly like the original.

mod common;

use std::collections::BTreeMap;

use distill::data::records::read_records;
use distill::eval::{Example, evaluate};
use distill::export::{ExportDtype, ExportOptions, export, parse_shard_size};
use distill::model::LoadOptions;
use distill::model::weights::Checkpoint;
use distill::pretrained::Pretrained;

fn all_tensors(dir: &std::path::Path) -> BTreeMap<String, (Vec<f32>, Vec<usize>)> {
    let checkpoint = Checkpoint::open(dir).unwrap();
    let names: Vec<String> = checkpoint.names().map(String::from).collect();
    names.into_iter().map(|name| {
        let value = checkpoint.read_f32(&name).unwrap().unwrap();
        (name, value)
    }).collect()
}

fn nll(dir: &std::path::Path) -> Vec<f64> {
    let device = distill::device::parse("flex").unwrap();
    let pretrained = Pretrained::load(dir, &device, LoadOptions::default()).unwrap();
    let records = read_records(&common::fixtures().join("eval_rows.jsonl")).unwrap();
    let examples: Vec<Example> = records.iter().map(|r| Example::from_record(r, &pretrained.tokenizer).unwrap()).collect();
    evaluate(&pretrained.model, &examples, |_| {}).rows.iter().map(|r| r.nll).collect()
}

#[test]
fn f32_export_of_an_unchanged_model_is_bit_exact() {
    let device = distill::device::parse("flex").unwrap();
    let source = common::fixtures().join("tiny-qwen2");
    let pretrained = Pretrained::load(&source, &device, LoadOptions::default()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("export");
    let options = ExportOptions { dtype: ExportDtype::F32, ..Default::default() };
    export(&pretrained.model, &source, &pretrained.eos_token_ids, &target, &options).unwrap();
    let (original, exported) = (all_tensors(&source), all_tensors(&target));
    assert_eq!(original.keys().collect::<Vec<_>>(), exported.keys().collect::<Vec<_>>());
    for (name, (values, shape)) in &original {
        let (new_values, new_shape) = &exported[name];
        assert_eq!(shape, new_shape, "{name}");
        assert!(values.iter().zip(new_values).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} differs");
    }
    assert_eq!(nll(&source), nll(&target));
    let config = distill::model::ModelConfig::from_path(&target).unwrap();
    assert_eq!(config, pretrained.model.config.clone().with_dtype_name("float32"));
    // Exporting over an existing checkpoint is refused rather than mixing files.
    assert!(export(&pretrained.model, &source, &pretrained.eos_token_ids, &target, &options).is_err());
}

#[test]
fn sharded_bf16_export_reloads_and_scores_the_same() {
    let device = distill::device::parse("flex").unwrap();
    let source = common::fixtures().join("tiny-llama");
    let pretrained = Pretrained::load(&source, &device, LoadOptions::default()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("nested/export");
    let options = ExportOptions { dtype: ExportDtype::BF16, max_shard_bytes: parse_shard_size("3MB").unwrap() };
    export(&pretrained.model, &source, &pretrained.eos_token_ids, &target, &options).unwrap();
    let shards = std::fs::read_dir(&target).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".safetensors")).count();
    assert!(shards >= 3, "{shards} shards");
    assert!(target.join("model.safetensors.index.json").exists());
    // The fixture is bf16 on disk, so bf16 → f32 → bf16 is exact and the scores are equal.
    assert_eq!(nll(&source), nll(&target));
    let generation: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(target.join("generation_config.json")).unwrap()).unwrap();
    assert_eq!(generation["eos_token_id"], serde_json::json!([128001, 128008, 128009]));
    // The fixture keeps its tokenizer as tokenizer.json.gz; the export writes it unpacked, since
    // transformers and vLLM read tokenizer.json only.
    assert!(!source.join("tokenizer.json").exists() && source.join("tokenizer.json.gz").exists());
    let (_, unpacked) = distill::text::tokenizer::read_tokenizer_json(&source).unwrap();
    assert_eq!(std::fs::read(target.join("tokenizer.json")).unwrap(), unpacked);
    assert!(!target.join("tokenizer.json.gz").exists());
    assert_eq!(parse_shard_size("5GB").unwrap(), 5_000_000_000);
    assert!(parse_shard_size("lots").is_err());
}

/// Leaves exports of both fixtures in `DISTILL_EXPORT_CHECK_DIR` for
/// `tests/fixtures/check_export.py` to load with transformers (opt-in: needs Python).
#[test]
fn write_exports_for_transformers_check() {
    let Ok(dir) = std::env::var("DISTILL_EXPORT_CHECK_DIR") else { return };
    let device = distill::device::parse("flex").unwrap();
    for name in ["tiny-qwen2", "tiny-llama"] {
        let source = common::fixtures().join(name);
        let pretrained = Pretrained::load(&source, &device, LoadOptions::default()).unwrap();
        let options = ExportOptions { dtype: ExportDtype::F32, max_shard_bytes: parse_shard_size("4MB").unwrap() };
        export(&pretrained.model, &source, &pretrained.eos_token_ids, &std::path::Path::new(&dir).join(name), &options).unwrap();
    }
}
