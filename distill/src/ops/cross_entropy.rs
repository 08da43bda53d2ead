//! Cross-entropy through the output layer, chunk by chunk, without `[positions, vocab]` logits
//! (the idea of Liger-Kernel's fused linear cross-entropy).
//!
//! The hidden states of the trained positions go through `lm_head` a chunk of rows at a time:
//! each chunk's logits give its loss and, when a backward pass will follow, at once its
//! gradients (`softmax − onehot`, through the weight to the hidden states and to the weight),
//! so the chunk's logits are freed before the next chunk. Peak memory is one chunk's
//! `rows × vocab` in f32 whatever the sequence length; the backward pass only scales the saved
//! gradients by the loss's gradient.
//!
//! The log-sum-exp sums in two levels (blocks of 512, then the block sums): a single f32 pass
//! over a 152k vocabulary loses ~1e-5 relative, enough to drift from PyTorch within a few
//! optimizer steps.

use std::sync::Arc;

use burn::backend::DispatchTensor;
use burn::tensor::{DType, IndexingUpdateOp, Int, Tensor, TensorData};

use super::attention::SCORE_BUDGET;
use super::{Differentiable, apply, ranked};
use super::matmul::product;

/// Widest first level of the two-level sum in [`log_sum_exp`].
const SUM_BLOCK: usize = 512;

/// The first level's width for a `vocab`-wide row: the largest divisor of `vocab` from 64 to
/// [`SUM_BLOCK`], so the row reshapes into blocks without a padded copy (real vocabularies all
/// have one: 151936 = 1187 × 128, 128256 = 501 × 256, 32000 = 64 × 500); `None` if there is
/// none.
fn sum_block(vocab: usize) -> Option<usize> {
    (64..=SUM_BLOCK.min(vocab)).rev().find(|&b| vocab.is_multiple_of(b))
}

/// `Σ` over the last axis of `[rows, vocab]` → `[rows, 1]`, in two levels (blocks, then the
/// block sums): a single f32 pass over a 152k vocabulary loses ~1e-5 relative, enough to drift
/// from PyTorch within a few optimizer steps.
fn two_level_sum(values: Tensor<2>) -> Tensor<2> {
    let [rows, vocab] = values.dims();
    let (values, block) = match sum_block(vocab) {
        Some(block) => (values, block),
        None => {
            let padded = vocab.div_ceil(SUM_BLOCK) * SUM_BLOCK;
            let zeros = Tensor::<2>::zeros([rows, padded - vocab], (&values.device(), values.dtype()));
            (Tensor::cat(vec![values, zeros], 1), SUM_BLOCK)
        }
    };
    let blocks = values.dims()[1] / block;
    values.reshape([rows, blocks, block]).sum_dim(2).sum_dim(1).reshape([rows, 1])
}

/// `log Σ exp` over the last axis of `[rows, vocab]` → `[rows, 1]`, in f32.
pub fn log_sum_exp(logits: Tensor<2>) -> Tensor<2> {
    let max = logits.clone().max_dim(1).detach();
    two_level_sum((logits - max.clone()).exp()).log() + max
}

/// Rows per chunk for a `vocab`-wide output layer: one chunk's f32 logits stay within
/// [`SCORE_BUDGET`] elements.
pub fn chunk_rows(vocab: usize) -> usize {
    (SCORE_BUDGET / vocab.max(1)).max(8)
}

fn to_f32<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    if t.dtype() == DType::F32 { t } else { t.cast(DType::F32) }
}

/// One chunk's loss, and `softmax − onehot(target)` written over its logits when `gradient`,
/// in one pass per row with the rows spread over every core: the arithmetic of [`rows_loss`]'s
/// tensor path (`max`, one `exp` per logit, the two-level sum, the softmax as that exp over the
/// sum), whose tensor operations flex runs one pass over the chunk at a time on one thread. For
/// f32 logits on flex; the logits back otherwise.
#[cfg(feature = "flex")]
fn rows_on_host(logits: Tensor<2>, targets: &[u32], gradient: bool) -> Result<(Tensor<1>, Option<Tensor<2>>), Tensor<2>> {
    use rayon::prelude::*;
    let [_, vocab] = logits.dims();
    let device = logits.device();
    let Some(mut host) = super::host::HostF32::of(logits.clone()) else { return Err(logits) };
    drop(logits);
    let block = sum_block(vocab).unwrap_or(SUM_BLOCK);
    let losses: Vec<f32> = host
        .values_mut()
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .map(|(row, &target)| {
            let picked = row[target as usize];
            let max = super::host::max_of(row);
            // The exps' own sum is not this one: the two-level sum keeps PyTorch's order.
            super::host::exp_shifted(row, max);
            let sum: f32 = row.chunks(block).map(|b| b.iter().sum::<f32>()).sum();
            if gradient {
                row.iter_mut().for_each(|x| *x /= sum);
                row[target as usize] -= 1.0;
            }
            sum.ln() + max - picked
        })
        .collect();
    let loss = Tensor::<1>::from_data(TensorData::new(vec![losses.iter().sum::<f32>()], [1]), (&device, DType::F32));
    Ok((loss, gradient.then(|| host.into_tensor())))
}

/// One chunk's summed loss `[1]` from its f32 logits `[rows, vocab]`, and when `gradient`
/// the logits' gradient `softmax − onehot(target)`.
fn rows_loss(logits: Tensor<2>, targets: &[u32], gradient: bool) -> (Tensor<1>, Option<Tensor<2>>) {
    #[cfg(feature = "flex")]
    let logits = match rows_on_host(logits, targets, gradient) {
        Ok(done) => return done,
        Err(logits) => logits,
    };
    let device = logits.device();
    let len = targets.len();
    let targets: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
    let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [len, 1]), &device);
    let picked = logits.clone().gather(1, targets.clone());
    // exp(logits − max) in place (nothing else holds the logits now), its two-level sum, and
    // the softmax as that exp over the sum: one exp per logit.
    let max = logits.clone().max_dim(1);
    let exp = (logits - max.clone()).exp();
    let sum = two_level_sum(exp.clone());
    let loss = (sum.clone().log() + max - picked).sum();
    // d loss / d logits = softmax − onehot(target).
    let logits_grad = gradient.then(|| {
        let minus_one = Tensor::<2>::full([len, 1], -1.0, (&device, DType::F32));
        (exp / sum).scatter(1, targets, minus_one, IndexingUpdateOp::Add)
    });
    (loss, logits_grad)
}

#[derive(Debug, Clone)]
struct CrossEntropyOp {
    targets: Arc<Vec<u32>>,
    chunk: usize,
    weight_dtype: DType,
}

impl CrossEntropyOp {
    /// The summed loss `[1]`, and the gradients of the hidden states and of the weight for a
    /// loss gradient of 1 where `needed` asks for them.
    fn run(&self, hidden: Tensor<2>, weight: Tensor<2>, needed: [bool; 2]) -> (Tensor<1>, Option<Tensor<2>>, Option<Tensor<2>>) {
        let [rows, width] = hidden.dims();
        let [vocab, _] = weight.dims();
        let device = hidden.device();
        let dtype = hidden.dtype();
        let mut loss = Tensor::<1>::zeros([1], (&device, DType::F32));
        let mut hidden_grads = Vec::new();
        // A frozen output layer (LoRA) gets no gradient: no `[vocab, width]` buffer, no matmul.
        let mut weight_grad = needed[1].then(|| Tensor::<2>::zeros([vocab, width], (&device, DType::F32)));
        let mut start = 0;
        while start < rows {
            let len = self.chunk.min(rows - start);
            let h = hidden.clone().narrow(0, start, len);
            let logits = to_f32(product(&h, false, &weight, true));
            let (chunk_loss, logits_grad) = rows_loss(logits, &self.targets[start..start + len], needed[0] || needed[1]);
            loss = loss + chunk_loss;
            if let Some(logits_grad) = logits_grad {
                let logits_grad = if dtype == DType::F32 { logits_grad } else { logits_grad.cast(dtype) };
                if needed[0] {
                    hidden_grads.push(product(&logits_grad, false, &weight, false));
                }
                if let Some(total) = weight_grad.take() {
                    weight_grad = Some(total + to_f32(product(&logits_grad, true, &h, false)));
                }
            }
            start += len;
        }
        let hidden_grad = needed[0].then(|| Tensor::cat(hidden_grads, 0));
        (loss, hidden_grad, weight_grad)
    }
}

impl Differentiable for CrossEntropyOp {
    /// The gradients of the hidden states and of the weight (those needed) for a loss
    /// gradient of 1.
    type Saved = (Option<DispatchTensor>, Option<DispatchTensor>);

    fn forward(&self, inputs: &[DispatchTensor], needed: Option<&[bool]>) -> (DispatchTensor, Option<Self::Saved>) {
        let wanted = needed.map_or([false, false], |n| [n[0], n[1]]);
        let (loss, hidden_grad, weight_grad) = self.run(ranked(inputs[0].clone()), ranked(inputs[1].clone()), wanted);
        let saved = needed.map(|_| (hidden_grad.map(Tensor::into_dispatch), weight_grad.map(Tensor::into_dispatch)));
        (loss.into_dispatch(), saved)
    }

    fn backward(&self, saved: Self::Saved, output_grad: DispatchTensor, needed: &[bool]) -> Vec<Option<DispatchTensor>> {
        let scale = ranked::<1>(output_grad).reshape([1, 1]);
        let hidden_grad = saved.0.filter(|_| needed[0]).map(|grad| {
            let grad = ranked::<2>(grad);
            let scale = scale.clone().cast(grad.dtype());
            (grad * scale).into_dispatch()
        });
        let weight_grad = saved.1.filter(|_| needed[1]).map(|grad| {
            let grad = ranked::<2>(grad) * to_f32(scale);
            (if self.weight_dtype == DType::F32 { grad } else { grad.cast(self.weight_dtype) }).into_dispatch()
        });
        vec![hidden_grad, weight_grad]
    }
}

/// `Σ −log softmax(hidden Wᵀ)[target]` over the rows of `hidden` `[rows, width]`, with `weight`
/// `[vocab, width]` the output layer (`lm_head`, or the tied embeddings), as a `[1]` f32 tensor.
/// On an autodiff device it is one node of the graph; its backward pass gives the gradients
/// of `hidden` and `weight`.
pub fn cross_entropy_sum(hidden: Tensor<2>, weight: Tensor<2>, targets: &[u32]) -> Tensor<1> {
    let chunk = chunk_rows(weight.dims()[0]);
    cross_entropy_sum_chunked(hidden, weight, targets, chunk)
}

/// [`cross_entropy_sum`] with `chunk` rows per chunk.
pub fn cross_entropy_sum_chunked(hidden: Tensor<2>, weight: Tensor<2>, targets: &[u32], chunk: usize) -> Tensor<1> {
    assert_eq!(hidden.dims()[0], targets.len(), "one target per row");
    let chunk = chunk.max(1);
    let op = CrossEntropyOp { targets: Arc::new(targets.to_vec()), chunk, weight_dtype: weight.dtype() };
    ranked(apply(op, vec![hidden.into_dispatch(), weight.into_dispatch()]))
}

/// The same sum with dense logits and burn's autodiff: the reference the chunked operation is
/// tested against.
pub fn cross_entropy_sum_dense(hidden: Tensor<2>, weight: Tensor<2>, targets: &[u32]) -> Tensor<1> {
    let device = hidden.device();
    let logits = to_f32(hidden.matmul(weight.transpose()));
    let targets: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
    let targets = Tensor::<2, Int>::from_data(TensorData::new(targets.clone(), [targets.len(), 1]), &device);
    (log_sum_exp(logits.clone()) - logits.gather(1, targets)).sum()
}
