//! Training checkpoints: `RUN_DIR/checkpoint-STEP/` holds the model as an HF checkpoint
//! (`model/`; LoRA adapters merged, with the adapters themselves in PEFT's
//! `adapter_model.safetensors` + `adapter_config.json`), the AdamW moments
//! (`optimizer.safetensors`) and `trainer_state.json`. The
//! folder is assembled under a temporary name and renamed into place, so a kill at any moment
//! leaves either a whole checkpoint or none. The data order is a function of the seed and the
//! step, so the step is the whole data cursor.

use std::fs;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use super::optim::{AdamW, SavedMoments};
use crate::export::{ExportDtype, ExportError, ExportOptions, export};
use crate::model::{LoadOptions, Model, ModelError};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub global_step: usize,
    pub optimizer_steps: u64,
    /// The resolved training settings, to refuse resuming with different ones.
    pub settings: serde_json::Value,
}

fn file_error(path: &Path, message: impl ToString) -> CheckpointError {
    CheckpointError::File { path: path.to_path_buf(), message: message.to_string() }
}

pub fn checkpoint_dir(run_dir: &Path, step: usize) -> PathBuf {
    run_dir.join(format!("checkpoint-{step}"))
}

/// Writes a checkpoint of `model` and `optimizer` after `state.global_step` steps.
pub fn save(
    run_dir: &Path,
    model: &Model,
    optimizer: &AdamW,
    state: &TrainerState,
    tokenizer_dir: &Path,
    eos_token_ids: &[u32],
) -> Result<PathBuf, CheckpointError> {
    let target = checkpoint_dir(run_dir, state.global_step);
    let staging = run_dir.join(format!(".checkpoint-{}.partial", state.global_step));
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(|e| file_error(&staging, e))?;
    }
    fs::create_dir_all(&staging).map_err(|e| file_error(&staging, e))?;
    // f32 weights: resuming must continue from exactly these values.
    let options = ExportOptions { dtype: ExportDtype::F32, max_shard_bytes: u64::MAX };
    if model.has_lora() {
        // The adapters as PEFT writes them (what a resume reads), and the merged model, so that
        // `distill export` of any checkpoint needs nothing else.
        write_adapters(model, &state.settings["lora"], &staging)?;
        let (merged, _) = model.merge_lora().map_err(|e| file_error(&staging, e))?;
        export(&merged, tokenizer_dir, eos_token_ids, &staging.join("model"), &options)?;
    } else {
        export(model, tokenizer_dir, eos_token_ids, &staging.join("model"), &options)?;
    }

    let moments: Vec<(String, Vec<usize>, Vec<f32>)> = optimizer
        .save_state(&model.net)
        .into_iter()
        .flat_map(|m| [(format!("{}.exp_avg", m.name), vec![m.first.len()], m.first), (format!("{}.exp_avg_sq", m.name), vec![m.second.len()], m.second)])
        .collect();
    write_f32_tensors(&staging.join("optimizer.safetensors"), &moments)?;
    write_synced(&staging.join("trainer_state.json"), &serde_json::to_string_pretty(state).expect("plain struct"))?;
    fs::rename(&staging, &target).map_err(|e| file_error(&target, e))?;
    Ok(target)
}

/// The newest complete checkpoint of a run.
pub fn latest(run_dir: &Path) -> Option<(usize, PathBuf)> {
    fs::read_dir(run_dir)
        .ok()?
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let step = path.file_name()?.to_str()?.strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
            Some((step, path))
        })
        .max_by_key(|(step, _)| *step)
}

/// Writes f32 tensors `(name, shape, values)` as a safetensors file, fsynced.
fn write_f32_tensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<(), CheckpointError> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, values)| values.iter().flat_map(|v| v.to_le_bytes()).collect()).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), data)| TensorView::new(Dtype::F32, shape.clone(), data).map(|view| (name.clone(), view)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| file_error(path, e))?;
    fs::File::open(path).and_then(|f| f.sync_all()).map_err(|e| file_error(path, e))
}

fn write_synced(path: &Path, text: &str) -> Result<(), CheckpointError> {
    fs::write(path, text).and_then(|()| fs::File::open(path)?.sync_all()).map_err(|e| file_error(path, e))
}

/// The values of an f32 safetensors view.
fn f32_values(view: &TensorView) -> Vec<f32> {
    view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// `adapter_model.safetensors` (PEFT tensor names, f32) and `adapter_config.json`.
fn write_adapters(model: &Model, lora: &serde_json::Value, dir: &Path) -> Result<(), CheckpointError> {
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = crate::model::lora::adapter_tensors(&model.net)
        .into_iter()
        .map(|(name, tensor)| {
            let shape = tensor.dims().to_vec();
            let data = tensor.into_data().convert::<f32>();
            (name, shape, data.as_slice::<f32>().unwrap_or_default().to_vec())
        })
        .collect();
    write_f32_tensors(&dir.join("adapter_model.safetensors"), &tensors)?;
    let config = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora["rank"], "lora_alpha": lora["alpha"],
        "lora_dropout": lora["dropout"], "target_modules": lora["targets"], "bias": "none",
        "fan_in_fan_out": false, "use_rslora": false, "inference_mode": true, "init_lora_weights": true,
    });
    write_synced(&dir.join("adapter_config.json"), &serde_json::to_string_pretty(&config).expect("plain JSON"))
}

/// Reads a checkpoint's adapters into `base` (the frozen base with adapters attached).
fn read_adapters(dir: &Path, base: Model) -> Result<Model, CheckpointError> {
    let path = dir.join("adapter_model.safetensors");
    let bytes = fs::read(&path).map_err(|e| file_error(&path, e))?;
    let tensors = SafeTensors::deserialize(&bytes).map_err(|e| file_error(&path, e))?;
    let device = base.device.clone();
    let net = crate::model::lora::load_adapter_tensors(base.net, |name, shape| {
        let view = tensors.tensor(name).map_err(|e| format!("{name}: {e}"))?;
        if view.shape() != shape || view.dtype() != Dtype::F32 {
            return Err(format!("{name}: expected f32 {shape:?}, found {:?} {:?}", view.dtype(), view.shape()));
        }
        Ok(burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(f32_values(&view), shape), &device))
    })
    .map_err(|e| file_error(&path, e))?;
    Ok(Model { net, ..base })
}

/// Loads a checkpoint: the model on `device` and the optimizer state. For a LoRA run, `base`
/// is the frozen base model with adapters attached, and the checkpoint's adapters are read
/// into it.
pub fn load(dir: &Path, device: &Device, optimizer: &mut AdamW, base: Option<Model>) -> Result<(Model, TrainerState), CheckpointError> {
    let state_path = dir.join("trainer_state.json");
    let text = fs::read_to_string(&state_path).map_err(|e| file_error(&state_path, e))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| file_error(&state_path, e))?;
    let model = match base {
        Some(base) => read_adapters(dir, base)?,
        None => Model::load(&dir.join("model"), device, LoadOptions::default())?,
    };
    let optimizer_path = dir.join("optimizer.safetensors");
    let bytes = fs::read(&optimizer_path).map_err(|e| file_error(&optimizer_path, e))?;
    let tensors = SafeTensors::deserialize(&bytes).map_err(|e| file_error(&optimizer_path, e))?;
    let values = |name: &str| -> Result<Vec<f32>, CheckpointError> {
        let view = tensors.tensor(name).map_err(|e| file_error(&optimizer_path, e))?;
        Ok(f32_values(&view))
    };
    let mut names: Vec<String> = tensors
        .names()
        .into_iter()
        .filter_map(|n| n.strip_suffix(".exp_avg").map(String::from))
        .collect();
    names.sort();
    let saved = names
        .into_iter()
        .map(|name| {
            Ok(SavedMoments { first: values(&format!("{name}.exp_avg"))?, second: values(&format!("{name}.exp_avg_sq"))?, name })
        })
        .collect::<Result<Vec<_>, CheckpointError>>()?;
    optimizer.load_state(&model.net, state.optimizer_steps, saved).map_err(|e| file_error(&optimizer_path, e))?;
    Ok((model, state))
}
