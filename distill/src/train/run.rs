//! The SFT loop, top to bottom: shuffle the blocks each epoch, run micro-batches (spread over
//! the devices of a data-parallel run), accumulate gradients, clip, step, log.

use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::Serialize;

use burn::tensor::{DType, Device};

use super::optim::{AccumulatedGrads, AdamW, AdamWConfig};
use super::parallel::Replicas;
use super::schedule::Schedule;
use crate::data::batch::Batch;
use crate::data::packing::{BlockSource, PackedBlock};
use crate::model::{Model, Training};

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub schedule: Schedule,
    pub adamw: AdamWConfig,
    pub max_grad_norm: Option<f64>,
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub seed: u64,
    /// Mixed precision: forward and backward in this dtype (bf16) over f32 master weights.
    pub compute_dtype: Option<DType>,
    /// Layer-level activation checkpointing: keep each decoder layer's input only.
    pub gradient_checkpointing: bool,
    /// Keep those inputs in host memory until the backward pass needs them (implies
    /// checkpointing; nothing moves on flex, whose memory is the host's).
    pub activation_offloading: bool,
    /// Data parallel: every device (autodiff), the model's own first; empty: the model's
    /// device alone. Micro-batch `j` of a step runs on device `j % devices`.
    pub devices: Vec<Device>,
    /// Spread the optimizer state, gradient sums and (under mixed precision) master weights over
    /// the devices (ZeRO stage 2; see [`super::parallel`]).
    pub shard_optimizer: bool,
}

impl TrainConfig {
    /// Devices the micro-batches are spread over.
    pub fn data_parallel(&self) -> usize {
        self.devices.len().max(1)
    }

    /// Blocks per optimizer step: devices × per-device batch × accumulation, as in accelerate.
    pub fn global_batch(&self) -> usize {
        self.data_parallel() * self.per_device_train_batch_size * self.gradient_accumulation_steps
    }
}

/// What one optimizer step did; one JSON line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    pub step: usize,
    pub epoch: f64,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub trained_tokens: usize,
    pub tokens_per_second: f64,
    /// See [`crate::memory::peak_bytes`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
}

/// Optimizer steps in one epoch of `blocks` blocks.
pub fn steps_per_epoch(blocks: usize, config: &TrainConfig) -> usize {
    blocks.div_ceil(config.global_batch()).max(1)
}

/// The order blocks are visited in during `epoch`: a permutation fixed by the seed.
fn epoch_order(blocks: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..blocks).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed.wrapping_add(epoch as u64)));
    order
}

/// Trains `model` (on an autodiff device) from optimizer step `start_step` (0, or where a
/// checkpoint left off) to `config.schedule.total_steps`. `after_step` sees every step's metrics
/// with the replicas and optimizer as they are after it (to log and to checkpoint:
/// [`Replicas::full_model`] is the model); an error from it stops training.
pub fn train<E>(
    model: Model,
    optimizer: &mut AdamW,
    blocks: &(impl BlockSource + ?Sized),
    config: &TrainConfig,
    start_step: usize,
    mut after_step: impl FnMut(&StepMetrics, &Replicas, &AdamW) -> Result<(), E>,
) -> Result<Model, E> {
    let per_step = config.global_batch();
    let per_epoch = steps_per_epoch(blocks.len(), config);
    let mut replicas = Replicas::new(model, &config.devices, config.shard_optimizer, config.compute_dtype);
    replicas.place_moments(optimizer);
    // Dropout masks come from the device's generator, which burn keeps once per process: two
    // replicas drawing at once would take each other's draws, so such a run takes turns.
    let side_by_side = !replicas.model(0).draws_dropout();
    let mut order: Option<(usize, Vec<usize>)> = None;
    for step in start_step..config.schedule.total_steps {
        let started = Instant::now();
        let (epoch, step_in_epoch) = (step / per_epoch, step % per_epoch);
        if order.as_ref().is_none_or(|(cached, _)| *cached != epoch) {
            order = Some((epoch, epoch_order(blocks.len(), config.seed, epoch)));
        }
        let order = &order.as_ref().expect("set above").1;
        let chosen: Vec<PackedBlock> = order.iter().skip(step_in_epoch * per_step).take(per_step).map(|&i| blocks.block(i)).collect();

        // The loss is the mean over every trained token of the step, so each micro-batch's
        // summed loss is divided by the step's token count before its backward pass.
        let step_tokens: usize = chosen.iter().map(PackedBlock::trained_tokens).sum();
        let micro_batches: Vec<&[PackedBlock]> = chosen.chunks(config.per_device_train_batch_size).collect();
        let devices = replicas.len();
        let mut loss = 0.0;
        // A round is one micro-batch per device; its gradients go to their owners before the
        // next round, so no device holds a whole step's gradients of parameters it does not own.
        for (round, batches) in micro_batches.chunks(devices).enumerate() {
            let run_device = |device: usize| -> (AccumulatedGrads, f64) {
                let mut grads = AccumulatedGrads::default();
                let Some(micro_batch) = batches.get(device) else { return (grads, 0.0) };
                let model = replicas.model(device);
                let compute = match config.compute_dtype {
                    Some(dtype) if dtype != model.dtype => model.compute_copy(dtype),
                    _ => model.clone(),
                };
                // Dropout masks (LoRA) depend on the step and the micro-batch's place in it
                // only, so a resumed run draws the same ones, on any number of devices (with
                // the same per-device batch).
                let index = round * devices + device;
                let dropout_seed = config.seed.wrapping_mul(0x9E37_79B9).wrapping_add(step as u64).wrapping_mul(31).wrapping_add(index as u64);
                let training = Training {
                    dropout_seed: Some(dropout_seed),
                    checkpoint: config.gradient_checkpointing || config.activation_offloading,
                    offload: config.activation_offloading,
                };
                let micro_batch: Vec<&PackedBlock> = micro_batch.iter().collect();
                let Some(sum) = super::nll_sum(&compute, &Batch::new(&micro_batch), training) else { return (grads, 0.0) };
                let scaled = sum / step_tokens.max(1) as f64;
                let loss = scaled.clone().into_scalar::<f32>() as f64;
                grads.add(&model.net, &scaled.backward());
                (grads, loss)
            };
            let per_device: Vec<(AccumulatedGrads, f64)> =
                if side_by_side { crate::threads::side_by_side((0..devices).collect(), run_device) } else { (0..devices).map(run_device).collect() };
            loss += per_device.iter().map(|(_, loss)| loss).sum::<f64>();
            replicas.reduce(per_device.into_iter().map(|(grads, _)| grads).collect());
        }

        let learning_rate = config.schedule.lr(step);
        let grad_norm = replicas.step(optimizer, learning_rate, config.max_grad_norm);
        let seconds = started.elapsed().as_secs_f64();
        let tokens: usize = chosen.iter().map(|b| b.len()).sum();
        let metrics = StepMetrics {
            step: step + 1,
            epoch: (step + 1) as f64 / per_epoch as f64,
            loss,
            learning_rate,
            grad_norm,
            trained_tokens: step_tokens,
            tokens_per_second: tokens as f64 / seconds.max(1e-9),
            peak_memory_bytes: crate::memory::peak_bytes(&replicas.model(0).device),
        };
        after_step(&metrics, &replicas, optimizer)?;
    }
    Ok(replicas.into_full_model())
}
