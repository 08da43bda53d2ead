//! Training checkpoints: `RUN_DIR/checkpoint-STEP/` holds `trainer_state.json`, the AdamW
//! moments of the trained parameters (`optimizer.safetensors`) and the trained weights: the
//! whole model as an HF checkpoint (`model/`) for full fine-tuning, or only the adapters as PEFT
//! writes them (`adapter_model.safetensors` + `adapter_config.json`) for LoRA, whose frozen base
//! is rebuilt from the run's settings when the checkpoint is read.
//!
//! Tensors stream to disk one at a time and are read back through a memory map one at a time:
//! neither the model nor the optimizer state is ever encoded in host memory whole. The folder is
//! assembled under a temporary name and renamed into place, so a kill at any moment leaves
//! either a whole checkpoint or none. The data order is a function of the seed and the step,
//! so the step is the whole data cursor.

use std::fs;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use super::optim::{AdamW, SavedMoments};
use crate::export::{ExportDtype, ExportError, ExportOptions, export};
use crate::model::{LoadOptions, Model, ModelError};
use crate::tensor_file::{self, Entry, TensorFileError, f32_bytes};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tensors(#[from] TensorFileError),
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
    if model.has_lora() {
        write_adapters(model, &state.settings["lora"], &staging)?;
    } else {
        // f32 weights: resuming must continue from exactly these values.
        let options = ExportOptions { dtype: ExportDtype::F32, max_shard_bytes: u64::MAX };
        export(model, tokenizer_dir, eos_token_ids, &staging.join("model"), &options)?;
    }
    let parameters = optimizer.state_entries(&model.net);
    let entries: Vec<Entry> = parameters
        .iter()
        .flat_map(|(name, _, len)| {
            [Entry::new(format!("{name}.exp_avg"), Dtype::F32, vec![*len]), Entry::new(format!("{name}.exp_avg_sq"), Dtype::F32, vec![*len])]
        })
        .collect();
    tensor_file::write(&staging.join("optimizer.safetensors"), &entries, None, |i| {
        let (name, id, _) = &parameters[i / 2];
        let values = optimizer.moment_values(*id, i % 2 == 1).ok_or_else(|| format!("no optimizer state for {name}"))?;
        Ok(f32_bytes(&values))
    })?;
    write_synced(&staging.join("trainer_state.json"), &serde_json::to_string_pretty(state).expect("plain struct"))?;
    fs::rename(&staging, &target).map_err(|e| file_error(&target, e))?;
    Ok(target)
}

/// Every complete checkpoint of a run, oldest first.
pub fn all(run_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut found: Vec<(usize, PathBuf)> = fs::read_dir(run_dir)
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let step = path.file_name()?.to_str()?.strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
            Some((step, path))
        })
        .collect();
    found.sort();
    found
}

/// The newest complete checkpoint of a run.
pub fn latest(run_dir: &Path) -> Option<(usize, PathBuf)> {
    all(run_dir).pop()
}

/// Deletes all but the newest `keep` checkpoints (TRL's `save_total_limit`); returns the steps
/// removed. A checkpoint is renamed out of its final name before it is deleted, so a kill
/// half-way leaves no half-deleted checkpoint that `latest` would pick.
pub fn prune(run_dir: &Path, keep: usize) -> Result<Vec<usize>, CheckpointError> {
    // What a kill during an earlier save or deletion left (the save of this step is renamed
    // into place already, and the run lock keeps other processes out).
    for entry in fs::read_dir(run_dir).map_err(|e| file_error(run_dir, e))?.flatten() {
        if entry.file_name().to_str().is_some_and(|n| n.starts_with(".checkpoint-") && (n.ends_with(".deleting") || n.ends_with(".partial"))) {
            fs::remove_dir_all(entry.path()).map_err(|e| file_error(&entry.path(), e))?;
        }
    }
    let checkpoints = all(run_dir);
    let excess = checkpoints.len().saturating_sub(keep.max(1));
    let mut removed = Vec::new();
    for (step, path) in checkpoints.into_iter().take(excess) {
        let doomed = run_dir.join(format!(".checkpoint-{step}.deleting"));
        fs::rename(&path, &doomed).map_err(|e| file_error(&path, e))?;
        fs::remove_dir_all(&doomed).map_err(|e| file_error(&doomed, e))?;
        removed.push(step);
    }
    Ok(removed)
}

fn write_synced(path: &Path, text: &str) -> Result<(), CheckpointError> {
    fs::write(path, text).and_then(|()| fs::File::open(path)?.sync_all()).map_err(|e| file_error(path, e))
}

/// The values of an f32 safetensors view.
fn f32_values(view: &safetensors::tensor::TensorView) -> Vec<f32> {
    view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// A safetensors file mapped into memory: tensors are read from it one at a time.
struct Mapped {
    path: PathBuf,
    map: memmap2::Mmap,
}

impl Mapped {
    fn open(path: &Path) -> Result<Self, CheckpointError> {
        let file = fs::File::open(path).map_err(|e| file_error(path, e))?;
        // SAFETY: checkpoint files are written once under a temporary name and never modified
        // after the rename that publishes them.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| file_error(path, e))?;
        Ok(Mapped { path: path.to_path_buf(), map })
    }

    fn tensors(&self) -> Result<SafeTensors<'_>, CheckpointError> {
        SafeTensors::deserialize(&self.map).map_err(|e| file_error(&self.path, e))
    }
}

/// `adapter_model.safetensors` (PEFT tensor names, f32) and `adapter_config.json`.
fn write_adapters(model: &Model, lora: &serde_json::Value, dir: &Path) -> Result<(), CheckpointError> {
    let adapters = crate::model::lora::adapter_tensors(&model.net);
    let entries: Vec<Entry> = adapters.iter().map(|(name, t)| Entry::new(name.clone(), Dtype::F32, t.dims().to_vec())).collect();
    tensor_file::write(&dir.join("adapter_model.safetensors"), &entries, None, |i| {
        let data = adapters[i].1.clone().into_data().convert::<f32>();
        Ok(f32_bytes(data.as_slice::<f32>().unwrap_or_default()))
    })?;
    let config = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora["rank"], "lora_alpha": lora["alpha"],
        "lora_dropout": lora["dropout"], "target_modules": lora["targets"], "bias": "none",
        "fan_in_fan_out": false, "use_rslora": false, "inference_mode": true, "init_lora_weights": true,
    });
    write_synced(&dir.join("adapter_config.json"), &serde_json::to_string_pretty(&config).expect("plain JSON"))
}

/// Reads a checkpoint's adapters into `base` (the frozen base with adapters attached).
pub fn read_adapters(dir: &Path, base: Model) -> Result<Model, CheckpointError> {
    let path = dir.join("adapter_model.safetensors");
    let mapped = Mapped::open(&path)?;
    let tensors = mapped.tensors()?;
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

/// Reads `trainer_state.json`.
pub fn read_state(dir: &Path) -> Result<TrainerState, CheckpointError> {
    let state_path = dir.join("trainer_state.json");
    let text = fs::read_to_string(&state_path).map_err(|e| file_error(&state_path, e))?;
    serde_json::from_str(&text).map_err(|e| file_error(&state_path, e))
}

/// Loads a checkpoint: the model on `device` and the optimizer state. For a LoRA run, `base`
/// is the frozen base model with adapters attached, and the checkpoint's adapters are read
/// into it.
pub fn load(dir: &Path, device: &Device, optimizer: &mut AdamW, base: Option<Model>) -> Result<(Model, TrainerState), CheckpointError> {
    let state = read_state(dir)?;
    let model = match base {
        Some(base) => read_adapters(dir, base)?,
        None => Model::load(&dir.join("model"), device, LoadOptions::default())?,
    };
    let optimizer_path = dir.join("optimizer.safetensors");
    let mapped = Mapped::open(&optimizer_path)?;
    let tensors = mapped.tensors()?;
    let mut names: Vec<String> = tensors.names().into_iter().filter_map(|n| n.strip_suffix(".exp_avg").map(String::from)).collect();
    names.sort();
    let values = |name: &str| -> Result<Vec<f32>, String> { Ok(f32_values(&tensors.tensor(name).map_err(|e| format!("{name}: {e}"))?)) };
    let saved = names.into_iter().map(|name| {
        Ok(SavedMoments { first: values(&format!("{name}.exp_avg"))?, second: values(&format!("{name}.exp_avg_sq"))?, name })
    });
    optimizer.load_state(&model.net, state.optimizer_steps, saved).map_err(|e| file_error(&optimizer_path, e))?;
    Ok((model, state))
}
