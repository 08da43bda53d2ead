//! The attention operation on flex, fused: FlashAttention-2's forward and backward passes
//! (Dao, 2023) over tiles that stay in cache, on all cores.
//!
//! Written with tensor operations (see [`super::attention`]), each block of scores goes through
//! memory between a matmul, the masks, the exp and the backward pass's products, and flex runs
//! the element-wise operations on one thread. Here a tile of `QUERY_TILE` queries meets
//! `KEY_TILE` keys at a time: the scores are a matrix product (the `gemm` crate flex itself
//! uses), masked, exponentiated and multiplied by V while they are in cache, and tiles run side
//! by side (rayon). The numbers are the tensor path's: f32 scores and statistics, the same
//! online softmax, the same log-sum-exp saved for the backward pass.
//!
//! The backward pass runs once over the tiles of each query head, as FlashAttention-2's does:
//! each pair of tiles makes its scores' gradient once and adds it to dV, dK and dQ. A head writes
//! only gradients of its own (dK and dV per query head, summed over the GQA group after), so
//! heads run side by side with nothing shared between threads.

use rayon::prelude::*;

use super::host::{exp_shifted, max_of, zeros};

/// Queries per tile: a tile's scores against `KEY_TILE` keys are 256 KiB of f32, in a core's L2.
/// At 8192 tokens, 128 × 512 ran the forward pass 25% faster than 64 × 256 (the statistics of
/// each row are updated once per key tile) and the backward pass 15% faster; larger tiles were
/// no faster.
const QUERY_TILE: usize = 128;
const KEY_TILE: usize = 512;

/// Dimensions of q `[batch, heads, seq, head_dim]` and k, v `[batch, kv_heads, seq, head_dim]`.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seq: usize,
    pub head_dim: usize,
}

/// A row-major view: element `(i, j)` at `data[i · rows + j · columns]` (strides in elements).
struct View<'a> {
    data: &'a [f32],
    rows: isize,
    columns: isize,
}

fn view(data: &[f32], rows: usize, columns: usize) -> View<'_> {
    View { data, rows: rows as isize, columns: columns as isize }
}

/// `c ← (c if accumulate) + scale · a · b` for `a` `m × k`, `b` `k × n` and `c` row-major `m × n`.
fn matmul(m: usize, n: usize, k: usize, c: &mut [f32], accumulate: bool, a: View, b: View, scale: f32) {
    let last = |v: &View, rows: usize, columns: usize| (rows.max(1) - 1) as isize * v.rows + (columns.max(1) - 1) as isize * v.columns;
    assert!(c.len() >= m * n && (last(&a, m, k) as usize) < a.data.len() && (last(&b, k, n) as usize) < b.data.len());
    // SAFETY: the asserts above keep every element the product reads or writes inside the
    // slices, whose borrows outlive the call.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.columns,
            a.rows,
            b.data.as_ptr(),
            b.columns,
            b.rows,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The keys query `t` sees within the key tile `[j0, j0 + keys)`, as offsets in the tile: from
/// its segment's start `first` to itself.
fn visible(t: usize, first: usize, j0: usize, keys: usize) -> std::ops::Range<usize> {
    let lo = first.max(j0).min(j0 + keys) - j0;
    let hi = (t + 1).clamp(j0, j0 + keys) - j0;
    lo..hi.max(lo)
}

/// Scores of a query tile against a key tile, `scale · q kᵀ`, into `scores` (`n × keys`).
fn score_tile(scores: &mut [f32], q: &[f32], k: &[f32], n: usize, keys: usize, d: usize, scale: f32) {
    matmul(n, keys, d, scores, false, view(q, d, 1), view(k, 1, d), scale);
}

/// The context `[batch, heads, seq, head_dim]` and the log-sum-exp of every query's scores
/// `[batch, heads, seq]`. `first[row · seq + t]` is where token `t`'s segment starts.
pub fn forward(shape: Shape, first: &[usize], q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let Shape { batch, heads, kv_heads, seq, head_dim: d } = shape;
    let group = heads / kv_heads;
    let scale = (d as f32).powf(-0.5);
    let mut output = zeros(batch * heads * seq * d);
    let mut lse = zeros(batch * heads * seq);
    output.par_chunks_mut(seq * d).zip(lse.par_chunks_mut(seq)).enumerate().for_each(|(bh, (output, lse))| {
        let (b, h) = (bh / heads, bh % heads);
        let kv = (b * kv_heads + h / group) * seq * d;
        let (q, k, v) = (&q[bh * seq * d..(bh + 1) * seq * d], &k[kv..kv + seq * d], &v[kv..kv + seq * d]);
        let first = &first[b * seq..(b + 1) * seq];
        output.par_chunks_mut(QUERY_TILE * d).zip(lse.par_chunks_mut(QUERY_TILE)).enumerate().for_each_init(|| zeros(QUERY_TILE * KEY_TILE), |scores, (tile, (output, lse))| {
            let i0 = tile * QUERY_TILE;
            let n = lse.len();
            let scores = &mut scores[..n * KEY_TILE];
            let mut max = vec![f32::NEG_INFINITY; n];
            let mut sum = vec![0f32; n];
            let mut j0 = first[i0];
            while j0 < i0 + n {
                let keys = KEY_TILE.min(i0 + n - j0);
                let scores = &mut scores[..n * keys];
                score_tile(scores, &q[i0 * d..], &k[j0 * d..], n, keys, d, scale);
                for r in 0..n {
                    let t = i0 + r;
                    let seen = visible(t, first[t], j0, keys);
                    let row = &mut scores[r * keys..(r + 1) * keys];
                    if seen.is_empty() {
                        row.fill(0.0);
                        continue;
                    }
                    let tile_max = max_of(&row[seen.clone()]);
                    let new_max = max[r].max(tile_max);
                    let rescale = (max[r] - new_max).exp();
                    row[..seen.start].fill(0.0);
                    row[seen.end..].fill(0.0);
                    let tile_sum = exp_shifted(&mut row[seen], new_max);
                    sum[r] = sum[r] * rescale + tile_sum;
                    max[r] = new_max;
                    if rescale != 1.0 {
                        output[r * d..(r + 1) * d].iter_mut().for_each(|o| *o *= rescale);
                    }
                }
                matmul(n, d, keys, output, true, view(scores, keys, 1), view(&v[j0 * d..], d, 1), 1.0);
                j0 += keys;
            }
            for r in 0..n {
                output[r * d..(r + 1) * d].iter_mut().for_each(|o| *o /= sum[r]);
                lse[r] = max[r] + sum[r].ln();
            }
        });
    });
    (output, lse)
}

/// What the backward pass reads: the inputs, the forward pass's output and log-sum-exp, and the
/// output's gradient, all in the layouts of [`forward`].
pub struct Saved<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub output: &'a [f32],
    pub lse: &'a [f32],
    pub output_grad: &'a [f32],
}

/// One tile's probabilities `exp(scale · q kᵀ − lse)` where the query sees the key, 0
/// elsewhere; and, in `grad`, the scores' gradient `P ∘ (dO vᵀ − D)`.
#[allow(clippy::too_many_arguments)]
fn tile_gradients(
    probabilities: &mut [f32],
    grad: &mut [f32],
    (q, k, v, output_grad): (&[f32], &[f32], &[f32], &[f32]),
    (lse, correction, first): (&[f32], &[f32], &[usize]),
    (i0, n, j0, keys, d, scale): (usize, usize, usize, usize, usize, f32),
) {
    score_tile(probabilities, &q[i0 * d..], &k[j0 * d..], n, keys, d, scale);
    matmul(n, keys, d, grad, false, view(&output_grad[i0 * d..], d, 1), view(&v[j0 * d..], 1, d), 1.0);
    for r in 0..n {
        let t = i0 + r;
        let seen = visible(t, first[t], j0, keys);
        let (row, grad_row) = (&mut probabilities[r * keys..(r + 1) * keys], &mut grad[r * keys..(r + 1) * keys]);
        for hidden in [0..seen.start, seen.end..keys] {
            row[hidden.clone()].fill(0.0);
            grad_row[hidden].fill(0.0);
        }
        let (lse, correction) = (lse[t], correction[t]);
        exp_shifted(&mut row[seen.clone()], lse);
        for (p, g) in row[seen.clone()].iter().zip(&mut grad_row[seen]) {
            *g = *p * (*g - correction);
        }
    }
}

/// dQ `[batch, heads, seq, head_dim]`, dK and dV `[batch, kv_heads, seq, head_dim]`.
pub fn backward(shape: Shape, first: &[usize], saved: Saved) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Shape { batch, heads, kv_heads, seq, head_dim: d } = shape;
    let group = heads / kv_heads;
    let scale = (d as f32).powf(-0.5);
    let Saved { q, k, v, output, lse, output_grad } = saved;
    // D = rowsum(dO ∘ O), the softmax backward's correction term.
    let correction: Vec<f32> =
        output.par_chunks(d).zip(output_grad.par_chunks(d)).map(|(o, g)| o.iter().zip(g).map(|(o, g)| o * g).sum()).collect();
    let head = |bh: usize| bh * seq * d..(bh + 1) * seq * d;

    // One pass per query head, FlashAttention-2's backward: for each key tile, the query tiles
    // that see it make dS once, and it goes to dV and dK of the key tile and to dQ of the query
    // tile. Every gradient a head writes is its own (dK and dV per query head, summed over the
    // group after), so heads run side by side with nothing shared, and the scores are computed
    // once, not once for dK/dV and again for dQ.
    let mut query_grad = zeros(batch * heads * seq * d);
    let mut head_key_grad = zeros(batch * heads * seq * d);
    let mut head_value_grad = zeros(batch * heads * seq * d);
    let per_head = query_grad.par_chunks_mut(seq * d).zip(head_key_grad.par_chunks_mut(seq * d)).zip(head_value_grad.par_chunks_mut(seq * d));
    per_head.enumerate().for_each(|(bh, ((query_grad, key_grad), value_grad))| {
        let (b, h) = (bh / heads, bh % heads);
        let kv = b * kv_heads + h / group;
        let (q, k, v, output_grad) = (&q[head(bh)], &k[head(kv)], &v[head(kv)], &output_grad[head(bh)]);
        let (lse, correction) = (&lse[bh * seq..(bh + 1) * seq], &correction[bh * seq..(bh + 1) * seq]);
        let first = &first[b * seq..(b + 1) * seq];
        let mut probabilities = zeros(QUERY_TILE * KEY_TILE);
        let mut grad = zeros(QUERY_TILE * KEY_TILE);
        for j0 in (0..seq).step_by(KEY_TILE) {
            let keys = KEY_TILE.min(seq - j0);
            let mut i0 = j0;
            // Segment starts do not decrease along a row: once a tile's first query starts its
            // segment after these keys, no later query sees them.
            while i0 < seq && first[i0] < j0 + keys {
                let n = QUERY_TILE.min(seq - i0);
                let (p, g) = (&mut probabilities[..n * keys], &mut grad[..n * keys]);
                tile_gradients(p, g, (q, k, v, output_grad), (lse, correction, first), (i0, n, j0, keys, d, scale));
                matmul(keys, d, n, &mut value_grad[j0 * d..], true, view(p, 1, keys), view(&output_grad[i0 * d..], d, 1), 1.0);
                matmul(keys, d, n, &mut key_grad[j0 * d..], true, view(g, 1, keys), view(&q[i0 * d..], d, 1), scale);
                matmul(n, d, keys, &mut query_grad[i0 * d..], true, view(g, keys, 1), view(&k[j0 * d..], d, 1), scale);
                i0 += n;
            }
        }
    });

    // dK and dV of each KV head: the sums over its group of query heads.
    let mut key_grad = zeros(batch * kv_heads * seq * d);
    let mut value_grad = zeros(batch * kv_heads * seq * d);
    for (sums, per_head) in [(&mut key_grad, &head_key_grad), (&mut value_grad, &head_value_grad)] {
        sums.par_chunks_mut(seq * d).enumerate().for_each(|(bkv, sum)| {
            let (b, kv) = (bkv / kv_heads, bkv % kv_heads);
            for h in kv * group..(kv + 1) * group {
                sum.iter_mut().zip(&per_head[head(b * heads + h)]).for_each(|(s, g)| *s += g);
            }
        });
    }
    (query_grad, key_grad, value_grad)
}
