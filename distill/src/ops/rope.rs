//! Rotary position embedding of the projections' heads, as one operation on flex for f32: the
//! token-major projection `[batch, seq, heads · head_dim]` in, the rotated heads
//! `[batch, heads, seq, head_dim]` out, in one pass on every core, and its backward pass likewise
//! straight back to the token-major layout. As tensor operations (`RopeTables::apply` on the
//! heads' transposed view) it is a strided copy for the half swap, two products and a sum, each
//! a pass on one thread, and as many again, plus the copy back to token-major, in the backward
//! pass; under checkpointing every layer runs it three times a step. Elsewhere, and in bf16, it
//! is those tensor operations. The arithmetic is theirs, so the results are the same bits.

use burn::tensor::Tensor;

use crate::model::rope::RopeTables;

#[cfg(feature = "flex")]
use {
    super::host::{HostF32, zeros},
    super::{Differentiable, apply, ranked},
    burn::backend::DispatchTensor,
    burn::tensor::{DType, TensorData},
    rayon::prelude::*,
};

/// `x` `[batch, seq, heads · head_dim]` as `[batch, heads, seq, head_dim]`, each head rotated by
/// `tables` (`x · cos + rotate_half(x) · sin`).
pub fn rope_heads(tables: &RopeTables, x: Tensor<3>, heads: usize) -> Tensor<4> {
    let [batch, seq, width] = x.dims();
    #[cfg(feature = "flex")]
    if crate::device::is_flex(&x.device()) && x.dtype() == DType::F32 && tables.cos.dtype() == DType::F32 {
        let op = RopeOp { heads, head_dim: width / heads };
        return ranked(apply(op, vec![x.into_dispatch(), tables.cos.clone().into_dispatch(), tables.sin.clone().into_dispatch()]));
    }
    tables.apply(x.reshape([batch, seq, heads, width / heads]).swap_dims(1, 2))
}

#[cfg(feature = "flex")]
#[derive(Clone, Debug)]
struct RopeOp {
    heads: usize,
    head_dim: usize,
}

#[cfg(feature = "flex")]
fn host<const D: usize>(tensor: Tensor<D>) -> HostF32 {
    HostF32::of(tensor).expect("checked by `rope_heads`: an f32 tensor on flex")
}

#[cfg(feature = "flex")]
impl Differentiable for RopeOp {
    /// The tables, `[batch, 1, seq, head_dim]` each.
    type Saved = [DispatchTensor; 2];

    fn forward(&self, inputs: &[DispatchTensor], needed: Option<&[bool]>) -> (DispatchTensor, Option<Self::Saved>) {
        let (x, cos, sin): (Tensor<3>, Tensor<4>, Tensor<4>) = (ranked(inputs[0].clone()), ranked(inputs[1].clone()), ranked(inputs[2].clone()));
        let ([batch, seq, _], device) = (x.dims(), x.device());
        let (n, d) = (self.heads, self.head_dim);
        let half = d / 2;
        let (x, cos, sin) = (host(x), host(cos), host(sin));
        let (x, cos, sin) = (x.values(), cos.values(), sin.values());
        let mut rotated = zeros(batch * n * seq * d);
        // Row (b, h, t) of the output: head h of token t, rotated by token t's angles.
        rotated.par_chunks_mut(d).enumerate().for_each(|(row, out)| {
            let (t, b, h) = (row % seq, row / (n * seq), row / seq % n);
            let token = b * seq + t;
            let x = &x[token * n * d + h * d..][..d];
            let (cos, sin) = (&cos[token * d..][..d], &sin[token * d..][..d]);
            for i in 0..half {
                out[i] = x[i] * cos[i] + x[i + half] * sin[i];
                out[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
            }
        });
        let rotated = Tensor::<4>::from_data(TensorData::new(rotated, [batch, n, seq, d]), (&device, DType::F32));
        (rotated.into_dispatch(), needed.map(|_| [inputs[1].clone(), inputs[2].clone()]))
    }

    fn backward(&self, [cos, sin]: Self::Saved, output_grad: DispatchTensor, needed: &[bool]) -> Vec<Option<DispatchTensor>> {
        let (cos, sin, grad): (Tensor<4>, Tensor<4>, Tensor<4>) = (ranked(cos), ranked(sin), ranked(output_grad));
        let ([batch, n, seq, d], device) = (grad.dims(), grad.device());
        let half = d / 2;
        let x_grad = needed[0].then(|| {
            let (grad, cos, sin) = (host(grad), host(cos), host(sin));
            let (grad, cos, sin) = (grad.values(), cos.values(), sin.values());
            let mut x_grad = zeros(batch * seq * n * d);
            // dx_i = g_i · cos_i + g_j · sin_j, j the other half's index: the tensor path's
            // g · cos plus the half swap of g · sin.
            x_grad.par_chunks_mut(n * d).enumerate().for_each(|(token, out)| {
                let (b, t) = (token / seq, token % seq);
                let (cos, sin) = (&cos[token * d..][..d], &sin[token * d..][..d]);
                for (h, out) in out.chunks_mut(d).enumerate() {
                    let g = &grad[((b * n + h) * seq + t) * d..][..d];
                    for i in 0..half {
                        out[i] = g[i] * cos[i] + g[i + half] * sin[i + half];
                        out[i + half] = g[i + half] * cos[i + half] + g[i] * sin[i];
                    }
                }
            });
            Tensor::<3>::from_data(TensorData::new(x_grad, [batch, seq, n * d]), (&device, DType::F32)).into_dispatch()
        });
        vec![x_grad, None, None]
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// Two rows with different positions (one packed: positions restart), three heads: the
    /// fused operation's output and its input's gradient are the tensor path's, bit for bit.
    #[test]
    fn the_fused_rotation_is_the_tensor_path_bit_for_bit() {
        let device = crate::device::parse("flex").expect("flex").autodiff();
        let (heads, head_dim, seq) = (3, 8, 7);
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": heads * head_dim, "intermediate_size": 12,
            "num_hidden_layers": 1, "num_attention_heads": heads, "num_key_value_heads": 1, "vocab_size": 10
        });
        let config = crate::model::ModelConfig::from_hf_json(&config, std::path::Path::new("config.json")).expect("a config");
        let rope = crate::model::rope::Rope::new(&config);
        let positions = vec![(0..seq).collect::<Vec<_>>(), vec![0, 1, 2, 0, 1, 2, 3]];
        let tables = rope.tables(&positions, &device);
        let x = Tensor::<3>::random([2, seq, heads * head_dim], Distribution::Normal(0.0, 1.0), &device);
        let weights = Tensor::<4>::random([2, heads, seq, head_dim], Distribution::Normal(0.0, 1.0), &device);
        let run = |fused: bool| {
            let x = x.clone().detach().require_grad();
            let rotated = if fused {
                rope_heads(&tables, x.clone(), heads)
            } else {
                tables.apply(x.clone().reshape([2, seq, heads, head_dim]).swap_dims(1, 2))
            };
            let grads = (rotated.clone() * weights.clone()).sum().backward();
            (rotated.into_data(), x.grad(&grads).expect("a gradient").into_data())
        };
        let ((fused, fused_grad), (tensor, tensor_grad)) = (run(true), run(false));
        let bits = |d: TensorData| d.iter::<f32>().map(f32::to_bits).collect::<Vec<_>>();
        assert_eq!(bits(fused), bits(tensor), "output");
        assert_eq!(bits(fused_grad), bits(tensor_grad), "gradient");
    }
}
