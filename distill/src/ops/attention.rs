//! Causal self-attention in memory linear in the sequence length: FlashAttention-2's algorithm
//! (Dao, 2023) written with tensor operations over blocks of queries.
//!
//! The forward pass keeps, per layer, only its inputs, its output and the log-sum-exp of each
//! query's scores (`[batch, heads, seq]`); the backward pass recomputes each block's scores from
//! them. Nothing `seq × seq` outlives one block: a block of `n` queries scores against the keys
//! it can see (`n × keys`, f32), and is freed before the next. burn's own attention, under
//! autodiff, keeps every layer's `seq × seq` probabilities for the backward pass.
//!
//! **Which keys a query sees** is described by a [`Layout`]: each row of the batch is a run of
//! segments (the documents of a packed row, or padding), and a token sees the earlier tokens of
//! its own segment. A block of queries therefore sees keys from the start of its first
//! query's segment to its own end, and no others: with one row, keys of earlier documents and
//! of the future are never multiplied (the "varlen" trick); with several rows the block starts
//! at the earliest of the rows' segment starts and masks the rest. Those keys come in two
//! pieces, each masked by small tensors built on the host from the layout alone:
//! * the *past* `[key_start, block_start)`, all in the first query's segment: a query sees them
//!   only if it is still in that segment (a per-query bias), and, where rows of the batch
//!   differ, only from its row's segment start (a per-key bias);
//! * the *diagonal* `[block_start, block_end)`: causal within segments (`n × n`).
//!
//! **GQA**: queries are viewed as `[batch, kv_heads, group, seq, head_dim]` and K/V broadcast
//! over the group inside the matmuls; dK and dV are summed over the group.
//!
//! **Numerics**: scores, the softmax statistics and dK/dV accumulate in f32 whatever the
//! compute dtype; probabilities and score gradients are cast to the compute dtype for the
//! matmuls, as FlashAttention does.

use std::collections::HashMap;
use std::sync::Arc;

use burn::backend::DispatchTensor;
use burn::tensor::{DType, Device, Tensor, TensorData};

#[cfg(feature = "flex")]
use super::attention_host;
use super::{Differentiable, apply, ranked};

/// Which tokens of a batch of equal-length rows see which: every row is a run of segments and a
/// token sees the tokens of its own segment up to itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    len: usize,
    /// Per row, where each segment starts: `0` first, strictly increasing, below `len`.
    starts: Vec<Vec<usize>>,
}

impl Layout {
    /// `rows` rows of `len` tokens, each one causal sequence.
    pub fn causal(rows: usize, len: usize) -> Self {
        Layout { len, starts: vec![vec![0]; rows] }
    }

    /// Rows given by a segment id per token: a new segment starts wherever the id changes
    /// (packed documents, padding).
    pub fn from_segments<S: AsRef<[u32]>>(rows: &[S]) -> Self {
        let len = rows.first().map_or(0, |r| r.as_ref().len());
        let starts = rows
            .iter()
            .map(|row| {
                let row = row.as_ref();
                assert_eq!(row.len(), len, "every row of a layout has the same length");
                (0..len).filter(|&t| t == 0 || row[t] != row[t - 1]).collect()
            })
            .collect();
        Layout { len, starts }
    }

    pub fn rows(&self) -> usize {
        self.starts.len()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Index of the segment holding token `t` of `row`.
    fn segment(&self, row: usize, t: usize) -> usize {
        self.starts[row].partition_point(|&start| start <= t) - 1
    }

    /// Where the segment holding token `t` of `row` starts.
    fn segment_start(&self, row: usize, t: usize) -> usize {
        self.starts[row][self.segment(row, t)]
    }

    /// Where each token's segment starts, row after row (`rows × len`).
    fn token_segment_starts(&self) -> Vec<usize> {
        let mut starts = Vec::with_capacity(self.rows() * self.len);
        for row in &self.starts {
            let mut segment = 0;
            for t in 0..self.len {
                while segment + 1 < row.len() && row[segment + 1] <= t {
                    segment += 1;
                }
                starts.push(row[segment]);
            }
        }
        starts
    }

    /// Whether token `query` of `row` sees token `key` (a dense reference for tests).
    pub fn visible(&self, row: usize, query: usize, key: usize) -> bool {
        key <= query && self.segment(row, key) == self.segment(row, query)
    }
}

/// f32 elements of a block's scores (64 MiB): a block of queries is as many as fit, but at
/// least 16 (so with very many heads × keys, as 64 heads at 32k tokens, a block holds more).
pub const SCORE_BUDGET: usize = 1 << 24;

/// Queries per block for `rows × heads` score rows over at most `len` keys.
pub fn block_size(rows: usize, heads: usize, len: usize) -> usize {
    (SCORE_BUDGET / (rows * heads * len).max(1)).clamp(16, 512).min(len.max(1))
}

/// Pieces of work `device` computes side by side (SwiGLU's chunks): one per core on flex, which
/// runs element-wise operations on one thread; one elsewhere (a GPU queues every thread's work
/// on one stream).
pub fn threads_on(device: &Device) -> usize {
    if crate::device::is_flex(device) { rayon::current_num_threads() } else { 1 }
}

/// One block of queries and the masks of the keys it sees, on the device.
#[derive(Debug, Clone)]
struct QueryBlock {
    start: usize,
    end: usize,
    /// The first key any query of the block sees.
    key_start: usize,
    /// `[rows, 1, 1, n, 1]`: 0 where a query is still in the block's first segment, -inf after.
    past_rows: Option<Tensor<5>>,
    /// `[rows, 1, 1, 1, past]`: -inf for past keys before a row's own segment start.
    past_keys: Option<Tensor<5>>,
    /// `[rows or 1, 1, 1, n, n]`: causal within segments.
    diagonal: Tensor<5>,
}

/// A [`Layout`] cut into query blocks with their masks, made once per batch and shared by every
/// layer's forward and backward pass.
#[derive(Debug)]
pub struct Plan {
    layout: Layout,
    block: usize,
    blocks: Vec<QueryBlock>,
    /// Where each token's segment starts (`rows × len`), for the fused kernel on flex: made once
    /// per batch, read by every layer's forward and backward pass.
    segment_starts: Vec<usize>,
}

const HIDDEN: f32 = f32::NEG_INFINITY;

fn bias_tensor(values: Vec<f32>, shape: [usize; 5], device: &Device) -> Tensor<5> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

impl Plan {
    /// Blocks sized by [`block_size`] for `heads` query heads.
    pub fn new(layout: Layout, heads: usize, device: &Device) -> Self {
        let block = block_size(layout.rows(), heads, layout.len());
        Self::with_block(layout, block, device)
    }

    /// Blocks of `block` queries (the last may be shorter). `device` is the inner device the
    /// masks live on.
    pub fn with_block(layout: Layout, block: usize, device: &Device) -> Self {
        let device = device.clone().inner();
        let rows = layout.rows();
        let block = block.max(1);
        // Blocks inside one segment of every row share a plain causal triangle per size.
        let mut triangles: HashMap<usize, Tensor<5>> = HashMap::new();
        let mut blocks = Vec::new();
        let mut start = 0;
        while start < layout.len() {
            let end = (start + block).min(layout.len());
            let n = end - start;
            let row_starts: Vec<usize> = (0..rows).map(|r| layout.segment_start(r, start)).collect();
            let key_start = row_starts.iter().copied().min().unwrap_or(start);
            let single_segment = (0..rows).all(|r| layout.segment(r, end - 1) == layout.segment(r, start));
            let past = start - key_start;

            let past_rows = (past > 0 && !single_segment).then(|| {
                let values = (0..rows)
                    .flat_map(|r| {
                        let first = layout.segment(r, start);
                        (start..end).map(move |t| (t, r, first))
                    })
                    .map(|(t, r, first)| if layout.segment(r, t) == first { 0.0 } else { HIDDEN })
                    .collect();
                bias_tensor(values, [rows, 1, 1, n, 1], &device)
            });
            let past_keys = (past > 0 && row_starts.iter().any(|&s| s != key_start)).then(|| {
                let values = row_starts
                    .iter()
                    .flat_map(|&row_start| (key_start..start).map(move |k| if k >= row_start { 0.0 } else { HIDDEN }))
                    .collect();
                bias_tensor(values, [rows, 1, 1, 1, past], &device)
            });
            let diagonal = if single_segment {
                triangles
                    .entry(n)
                    .or_insert_with(|| {
                        let values = (0..n).flat_map(|q| (0..n).map(move |k| if k <= q { 0.0 } else { HIDDEN })).collect();
                        bias_tensor(values, [1, 1, 1, n, n], &device)
                    })
                    .clone()
            } else {
                let values = (0..rows)
                    .flat_map(|r| (start..end).flat_map(move |q| (start..end).map(move |k| (r, q, k))))
                    .map(|(r, q, k)| if layout.visible(r, q, k) { 0.0 } else { HIDDEN })
                    .collect();
                bias_tensor(values, [rows, 1, 1, n, n], &device)
            };
            blocks.push(QueryBlock { start, end, key_start, past_rows, past_keys, diagonal });
            start = end;
        }
        let segment_starts = layout.token_segment_starts();
        Plan { layout, block, blocks, segment_starts }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Queries per block.
    pub fn block(&self) -> usize {
        self.block
    }

    /// Key-query products the blocks compute, per head: what the layout costs, against
    /// `rows × len²` for dense attention.
    pub fn scored_pairs(&self) -> usize {
        self.blocks.iter().map(|b| (b.end - b.start) * (b.end - b.key_start)).sum::<usize>() * self.layout.rows()
    }
}

/// `[batch, heads, seq, head_dim]` → `[batch, kv_heads, group, seq, head_dim]`.
fn grouped(t: Tensor<4>, kv_heads: usize) -> Tensor<5> {
    let [batch, heads, seq, head_dim] = t.dims();
    t.reshape([batch, kv_heads, heads / kv_heads, seq, head_dim])
}

fn to_f32<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    if t.dtype() == DType::F32 { t } else { t.cast(DType::F32) }
}

fn to_dtype<const D: usize>(t: Tensor<D>, dtype: DType) -> Tensor<D> {
    if t.dtype() == dtype { t } else { t.cast(dtype) }
}

/// One piece of keys a query block sees: `[start, end)` and its masks.
struct Piece<'a> {
    start: usize,
    end: usize,
    masks: [Option<&'a Tensor<5>>; 2],
}

fn pieces(block: &QueryBlock) -> Vec<Piece<'_>> {
    let mut pieces = Vec::with_capacity(2);
    if block.key_start < block.start {
        pieces.push(Piece { start: block.key_start, end: block.start, masks: [block.past_rows.as_ref(), block.past_keys.as_ref()] });
    }
    pieces.push(Piece { start: block.start, end: block.end, masks: [Some(&block.diagonal), None] });
    pieces
}

/// f32 scores `[b, kv, group, n, keys]` of a (pre-scaled) query block against a piece of keys,
/// masked.
fn scores(q_block: &Tensor<5>, k: &Tensor<5>, piece: &Piece) -> Tensor<5> {
    let keys = k.clone().narrow(3, piece.start, piece.end - piece.start);
    let mut s = to_f32(q_block.clone().matmul(keys.swap_dims(3, 4)));
    for mask in piece.masks.into_iter().flatten() {
        s = s + mask.clone();
    }
    s
}

/// The attention context `[batch, seq, heads · head_dim]` and the log-sum-exp of every query's
/// scores `[batch, kv_heads, group, seq, 1]` (f32), for `q` `[batch, heads, seq, d]` and `k`, `v`
/// `[batch, kv_heads, seq, d]`.
pub fn forward(plan: &Plan, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> (Tensor<3>, Tensor<5>) {
    let [batch, heads, seq, head_dim] = q.dims();
    let kv_heads = k.dims()[1];
    assert_eq!(seq, plan.layout.len(), "the plan was made for {} tokens, not {seq}", plan.layout.len());
    assert_eq!(batch, plan.layout.rows(), "the plan was made for {} rows, not {batch}", plan.layout.rows());
    #[cfg(feature = "flex")]
    if crate::device::is_flex(&q.device()) {
        return host_forward(plan, q, k, v);
    }
    let dtype = q.dtype();
    // The softmax scale goes on the queries (seq × head_dim), not on every score (seq × keys).
    let scale = (head_dim as f64).powf(-0.5);
    let (q, k, v) = (grouped(q * scale, kv_heads), k.unsqueeze_dim::<5>(2), v.unsqueeze_dim::<5>(2));
    let forward_run = |blocks: &[QueryBlock]| -> Vec<(Tensor<5>, Tensor<5>)> {
        blocks
            .iter()
            .map(|block| {
                let q_block = q.clone().narrow(3, block.start, block.end - block.start);
                let pieces = pieces(block);
                let scored: Vec<Tensor<5>> = pieces.iter().map(|piece| scores(&q_block, &k, piece)).collect();
                let max = scored.iter().map(|s| s.clone().max_dim(4)).reduce(|a, b| a.max_pair(b)).expect("a block sees itself");
                let exps: Vec<Tensor<5>> = scored.into_iter().map(|s| (s - max.clone()).exp()).collect();
                let sum = exps.iter().map(|e| e.clone().sum_dim(4)).reduce(|a, b| a + b).expect("a block sees itself");
                // Σ exp · V, normalised after the matmul: a division over `n × head_dim`, not
                // over every score (the unnormalised exps are in [0, 1], so nothing is lost in
                // a low dtype).
                let mut output: Option<Tensor<5>> = None;
                for (piece, e) in pieces.iter().zip(exps) {
                    let values = v.clone().narrow(3, piece.start, piece.end - piece.start);
                    let part = to_f32(to_dtype(e, dtype).matmul(values));
                    output = Some(match output {
                        Some(o) => o + part,
                        None => part,
                    });
                }
                let output = output.map(|o| to_dtype(o / sum.clone(), dtype)).expect("a block sees itself");
                (output, max + sum.log())
            })
            .collect()
    };
    let (outputs, lses): (Vec<Tensor<5>>, Vec<Tensor<5>>) = forward_run(&plan.blocks).into_iter().unzip();
    let output = Tensor::cat(outputs, 3)
        .reshape([batch, heads, seq, head_dim])
        .swap_dims(1, 2)
        .reshape([batch, seq, heads * head_dim]);
    (output, Tensor::cat(lses, 3))
}

/// dQ, dK, dV from the output's gradient `[batch, seq, heads · head_dim]`.
pub fn backward(
    plan: &Plan,
    (q, k, v): (Tensor<4>, Tensor<4>, Tensor<4>),
    output: Tensor<3>,
    lse: Tensor<5>,
    output_grad: Tensor<3>,
) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
    #[cfg(feature = "flex")]
    if crate::device::is_flex(&q.device()) {
        return host_backward(plan, (q, k, v), output, lse, output_grad);
    }
    let [batch, heads, seq, head_dim] = q.dims();
    let kv_heads = k.dims()[1];
    let dtype = q.dtype();
    let scale = (head_dim as f64).powf(-0.5);
    let by_head = |t: Tensor<3>| grouped(t.reshape([batch, seq, heads, head_dim]).swap_dims(1, 2), kv_heads);
    let output_grad = to_dtype(by_head(output_grad), dtype);
    // D = rowsum(dO ∘ O), the softmax backward's correction term.
    let correction = (to_f32(output_grad.clone()) * to_f32(by_head(output))).sum_dim(4);
    // With q' = q · scale the scores are q'kᵀ: dK = dSᵀ q', and dQ = dS k · scale.
    let (q, k, v) = (grouped(q * scale, kv_heads), k.unsqueeze_dim::<5>(2), v.unsqueeze_dim::<5>(2));
    let device = q.device();
    let accumulate = |total: Tensor<5>, piece: &Piece, part: Tensor<5>| {
        let range = [0..batch, 0..kv_heads, 0..1, piece.start..piece.end, 0..head_dim];
        let sum = total.clone().slice(range.clone()) + part;
        total.slice_assign(range, sum)
    };
    let backward_run = |blocks: &[QueryBlock]| -> (Vec<Tensor<5>>, Tensor<5>, Tensor<5>) {
        let mut key_grad = Tensor::<5>::zeros([batch, kv_heads, 1, seq, head_dim], (&device, DType::F32));
        let mut value_grad = Tensor::<5>::zeros([batch, kv_heads, 1, seq, head_dim], (&device, DType::F32));
        let mut query_grads = Vec::with_capacity(blocks.len());
        for block in blocks {
            let n = block.end - block.start;
            let q_block = q.clone().narrow(3, block.start, n);
            let grad_block = output_grad.clone().narrow(3, block.start, n);
            let lse_block = lse.clone().narrow(3, block.start, n);
            let correction_block = correction.clone().narrow(3, block.start, n);
            let mut query_grad: Option<Tensor<5>> = None;
            for piece in pieces(block) {
                let p = (scores(&q_block, &k, &piece) - lse_block.clone()).exp();
                let values = v.clone().narrow(3, piece.start, piece.end - piece.start);
                let keys = k.clone().narrow(3, piece.start, piece.end - piece.start);
                let part = to_dtype(p.clone(), dtype).swap_dims(3, 4).matmul(grad_block.clone());
                value_grad = accumulate(value_grad, &piece, to_f32(part.sum_dim(2)));
                let p_grad = to_f32(grad_block.clone().matmul(values.swap_dims(3, 4)));
                let s_grad = to_dtype(p * (p_grad - correction_block.clone()), dtype);
                let part = to_f32(s_grad.clone().matmul(keys));
                query_grad = Some(match query_grad {
                    Some(g) => g + part,
                    None => part,
                });
                let part = s_grad.swap_dims(3, 4).matmul(q_block.clone());
                key_grad = accumulate(key_grad, &piece, to_f32(part.sum_dim(2)));
            }
            query_grads.push(to_dtype(query_grad.expect("a block sees itself") * scale, dtype));
        }
        (query_grads, key_grad, value_grad)
    };
    let (query_grads, key_grad, value_grad) = backward_run(&plan.blocks);
    let query_grad = Tensor::cat(query_grads, 3).reshape([batch, heads, seq, head_dim]);
    let key_grad = to_dtype(key_grad.reshape([batch, kv_heads, seq, head_dim]), dtype);
    let value_grad = to_dtype(value_grad.reshape([batch, kv_heads, seq, head_dim]), dtype);
    (query_grad, key_grad, value_grad)
}

/// `t`'s values in f32, in the row-major order of its shape (borrowed when it is laid out so).
#[cfg(feature = "flex")]
fn host_values<const D: usize>(t: Tensor<D>) -> super::host::HostF32 {
    let t = if t.dtype() == DType::F32 { t } else { t.cast(DType::F32) };
    super::host::HostF32::of(t).expect("the host kernel runs on flex, off the autodiff graph")
}

#[cfg(feature = "flex")]
fn host_shape(q: &Tensor<4>, k: &Tensor<4>) -> attention_host::Shape {
    let [batch, heads, seq, head_dim] = q.dims();
    attention_host::Shape { batch, heads, kv_heads: k.dims()[1], seq, head_dim }
}

/// [`forward`] on flex: the fused host kernel, in f32 whatever the compute dtype.
#[cfg(feature = "flex")]
fn host_forward(plan: &Plan, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> (Tensor<3>, Tensor<5>) {
    use rayon::prelude::*;
    let shape = host_shape(&q, &k);
    let attention_host::Shape { batch, heads, kv_heads, seq, head_dim } = shape;
    let (dtype, device) = (q.dtype(), q.device());
    let (q, k, v) = (host_values(q), host_values(k), host_values(v));
    let (by_head, lse) = attention_host::forward(shape, &plan.segment_starts, q.values(), k.values(), v.values());
    // Back to the token-major `[batch, seq, heads · head_dim]` on every core (flex would copy
    // the transposed view on one thread).
    let mut output = super::host::zeros(by_head.len());
    output.par_chunks_mut(heads * head_dim).enumerate().for_each(|(row, token)| {
        let (b, t) = (row / seq, row % seq);
        for (h, values) in token.chunks_mut(head_dim).enumerate() {
            let at = ((b * heads + h) * seq + t) * head_dim;
            values.copy_from_slice(&by_head[at..at + head_dim]);
        }
    });
    let output = Tensor::<3>::from_data(TensorData::new(output, [batch, seq, heads * head_dim]), (&device, dtype));
    let lse = Tensor::<5>::from_data(TensorData::new(lse, [batch, kv_heads, heads / kv_heads, seq, 1]), (&device, DType::F32));
    (output, lse)
}

/// [`backward`] on flex.
#[cfg(feature = "flex")]
fn host_backward(
    plan: &Plan,
    (q, k, v): (Tensor<4>, Tensor<4>, Tensor<4>),
    output: Tensor<3>,
    lse: Tensor<5>,
    output_grad: Tensor<3>,
) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
    let shape = host_shape(&q, &k);
    let attention_host::Shape { batch, heads, kv_heads, seq, head_dim } = shape;
    let (dtype, device) = (q.dtype(), q.device());
    let by_head = |t: Tensor<3>| host_values(t.reshape([batch, seq, heads, head_dim]).swap_dims(1, 2));
    let (output, output_grad) = (by_head(output), by_head(output_grad));
    let (q, k, v, lse) = (host_values(q), host_values(k), host_values(v), host_values(lse));
    let saved = attention_host::Saved {
        q: q.values(),
        k: k.values(),
        v: v.values(),
        output: output.values(),
        lse: lse.values(),
        output_grad: output_grad.values(),
    };
    let (query_grad, key_grad, value_grad) = attention_host::backward(shape, &plan.segment_starts, saved);
    let tensor = |values: Vec<f32>, heads: usize| Tensor::<4>::from_data(TensorData::new(values, [batch, heads, seq, head_dim]), (&device, dtype));
    (tensor(query_grad, heads), tensor(key_grad, kv_heads), tensor(value_grad, kv_heads))
}

#[derive(Debug, Clone)]
struct AttentionOp {
    plan: Arc<Plan>,
}

impl Differentiable for AttentionOp {
    /// q, k, v, the output and the log-sum-exp.
    type Saved = [DispatchTensor; 5];

    fn forward(&self, inputs: &[DispatchTensor], needed: Option<&[bool]>) -> (DispatchTensor, Option<Self::Saved>) {
        let [q, k, v] = [0, 1, 2].map(|i| ranked::<4>(inputs[i].clone()));
        let (output, lse) = forward(&self.plan, q, k, v);
        let saved = needed.map(|_| {
            [inputs[0].clone(), inputs[1].clone(), inputs[2].clone(), output.clone().into_dispatch(), lse.into_dispatch()]
        });
        (output.into_dispatch(), saved)
    }

    fn backward(&self, saved: Self::Saved, output_grad: DispatchTensor, needed: &[bool]) -> Vec<Option<DispatchTensor>> {
        if !needed.iter().any(|&n| n) {
            return vec![None; 3];
        }
        let [q, k, v, output, lse] = saved;
        let (dq, dk, dv) = backward(
            &self.plan,
            (ranked(q), ranked(k), ranked(v)),
            ranked(output),
            ranked(lse),
            ranked(output_grad),
        );
        [dq, dk, dv].into_iter().zip(needed).map(|(g, &n)| n.then(|| g.into_dispatch())).collect()
    }
}

/// Attention of `q` `[batch, heads, seq, d]` over `k`, `v` `[batch, kv_heads, seq, d]` (RoPE
/// applied) as `plan` lays the batch out; returns the context `[batch, seq, heads · d]`. On an
/// autodiff device this is one node of the graph with the memory-efficient backward pass.
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, plan: &Arc<Plan>) -> Tensor<3> {
    let op = AttentionOp { plan: plan.clone() };
    ranked(apply(op, vec![q.into_dispatch(), k.into_dispatch(), v.into_dispatch()]))
}
