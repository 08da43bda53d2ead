//! Training: the loss, the optimizer, the learning-rate schedule and the loop that drives them.

pub mod checkpoint;
pub mod optim;
pub mod run;
pub mod schedule;

use burn::tensor::{Int, Tensor, TensorData};

use crate::data::packing::PackedBlock;
use crate::model::Model;

/// Width of the first level of the two-level sum in [`log_sum_exp`].
const SUM_BLOCK: usize = 512;

/// `log Σ exp` over the last axis of `[batch, seq, vocab]` → `[batch, seq, 1]`, summed in two
/// levels (blocks of 512, then the block sums). A single f32 pass over a 152k vocabulary loses
/// ~1e-5 relative, enough to drift from PyTorch within a few optimizer steps.
pub fn log_sum_exp(logits: Tensor<3>) -> Tensor<3> {
    let [batch, seq, vocab] = logits.dims();
    let max = logits.clone().max_dim(2).detach();
    let exp = (logits - max.clone()).exp();
    let padded = vocab.div_ceil(SUM_BLOCK) * SUM_BLOCK;
    let exp = if padded == vocab {
        exp
    } else {
        let zeros = Tensor::<3>::zeros([batch, seq, padded - vocab], &exp.device());
        Tensor::cat(vec![exp, zeros], 2)
    };
    let sums = exp.reshape([batch, seq, padded / SUM_BLOCK, SUM_BLOCK]).sum_dim(3).sum_dim(2);
    sums.reshape([batch, seq, 1]).log() + max
}

/// Summed cross-entropy over the trained tokens of `blocks` (a tensor to backpropagate
/// through) and how many tokens that is.
pub fn nll_sum<'a>(model: &Model, blocks: impl IntoIterator<Item = &'a PackedBlock>) -> (Tensor<1>, usize) {
    let device = &model.device;
    let mut total: Option<Tensor<1>> = None;
    let mut count = 0usize;
    for block in blocks {
        let hidden = model.hidden_packed(block);
        let len = block.len();
        // Position t - 1 predicts token t.
        let logits = model.net.logits(hidden.narrow(1, 0, len - 1));
        // The loss is taken in f32 whatever the compute dtype, as transformers upcasts logits.
        let logits = if logits.dtype() == burn::tensor::DType::F32 { logits } else { logits.cast(burn::tensor::DType::F32) };
        let targets: Vec<i64> = block.input_ids[1..].iter().map(|&id| id as i64).collect();
        let targets = Tensor::<3, Int>::from_data(TensorData::new(targets, [1, len - 1, 1]), device);
        let mask: Vec<f32> = block.trained[1..].iter().map(|&t| if t { 1.0 } else { 0.0 }).collect();
        count += block.trained[1..].iter().filter(|&&t| t).count();
        let mask = Tensor::<3>::from_data(TensorData::new(mask, [1, len - 1, 1]), device);
        let log_probs = logits.clone().gather(2, targets) - log_sum_exp(logits);
        let picked = (log_probs * mask).sum().neg();
        total = Some(match total {
            Some(sum) => sum + picked,
            None => picked,
        });
    }
    (total.expect("at least one block"), count)
}

/// Mean cross-entropy over the trained tokens of the blocks (transformers' `loss` with -100
/// labels outside the mask).
pub fn loss(model: &Model, blocks: &[PackedBlock]) -> Tensor<1> {
    let (sum, count) = nll_sum(model, blocks);
    sum / count.max(1) as f64
}
