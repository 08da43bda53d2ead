//! Training: the loss, the optimizer, the learning-rate schedule and the loop that drives them.

pub mod checkpoint;
pub mod job;
mod lock;
pub mod optim;
pub mod options;
pub mod parallel;
pub mod run;
pub mod schedule;

use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::data::batch::Batch;
use crate::data::packing::PackedBlock;
use crate::model::{Model, Training};
use crate::ops::cross_entropy::cross_entropy_sum;

/// Summed cross-entropy over the trained tokens of `batch` (a `[1]` f32 tensor to backpropagate
/// through), or `None` when the batch trains no token. The output layer only ever sees the
/// trained positions, a chunk at a time (see [`crate::ops::cross_entropy`]).
pub fn nll_sum(model: &Model, batch: &Batch, training: Training) -> Option<Tensor<1>> {
    if batch.targets.is_empty() {
        return None;
    }
    let hidden = model.hidden_batch(batch, training);
    let [rows, len, width] = hidden.dims();
    let positions: Vec<i64> = batch.targets.iter().map(|&(position, _)| position as i64).collect();
    let count = positions.len();
    let positions = Tensor::<1, Int>::from_data(TensorData::new(positions, [count]), &model.device.clone().inner());
    let selected = hidden.reshape([rows * len, width]).select(0, positions);
    let targets: Vec<u32> = batch.targets.iter().map(|&(_, token)| token).collect();
    let loss = cross_entropy_sum(selected, model.net.output_weight(), &targets);
    // The loss is f32 whatever the compute dtype, as transformers upcasts logits.
    Some(if loss.dtype() == DType::F32 { loss } else { loss.cast(DType::F32) })
}

/// Mean cross-entropy over the trained tokens of the blocks, as one batch (transformers'
/// `loss` with -100 labels outside the mask).
pub fn loss(model: &Model, blocks: &[PackedBlock]) -> Tensor<1> {
    let blocks: Vec<&PackedBlock> = blocks.iter().collect();
    let batch = Batch::new(&blocks);
    let count = batch.targets.len();
    match nll_sum(model, &batch, Training::default()) {
        Some(sum) => sum / count as f64,
        // Nothing to learn from (every token masked): a loss of zero, with zero gradients.
        None => Tensor::zeros([1], &model.device),
    }
}
