//! SwiGLU's gate, `silu(gate) · up`, as one operation that keeps only its two inputs for the
//! backward pass. Written as separate tensor operations under burn's autodiff it keeps
//! `sigmoid(gate)`, `silu(gate)` and the product as well: three more intermediate-sized
//! activations per token and layer, the largest share of what a layer keeps. On flex, which
//! runs element-wise work on one thread, the tokens are cut into one chunk per core, computed
//! side by side.

use burn::backend::DispatchTensor;
use burn::tensor::Tensor;
use burn::tensor::activation::sigmoid;

use super::{Differentiable, apply, ranked};

#[derive(Clone, Debug)]
struct SwiGlu;

/// `f` on chunks of the token dimension of `inputs` (all `[batch, seq, width]`), side by side on
/// flex, joined back in order.
fn by_chunks(inputs: &[Tensor<3>], f: impl Fn(&[Tensor<3>]) -> Vec<Tensor<3>> + Sync) -> Vec<Tensor<3>> {
    let seq = inputs[0].dims()[1];
    let threads = super::attention::threads_on(&inputs[0].device()).min(seq).max(1);
    if threads == 1 {
        return f(inputs);
    }
    let chunk = seq.div_ceil(threads);
    let chunks: Vec<Vec<Tensor<3>>> =
        (0..seq).step_by(chunk).map(|start| inputs.iter().map(|t| t.clone().narrow(1, start, chunk.min(seq - start))).collect()).collect();
    let parts = crate::threads::side_by_side(chunks, |pieces| f(&pieces));
    let outputs = parts[0].len();
    (0..outputs).map(|i| Tensor::cat(parts.iter().map(|p| p[i].clone()).collect(), 1)).collect()
}

impl Differentiable for SwiGlu {
    /// The gate and the up projection.
    type Saved = [DispatchTensor; 2];

    fn forward(&self, inputs: &[DispatchTensor], needed: Option<&[bool]>) -> (DispatchTensor, Option<Self::Saved>) {
        let (gate, up): (Tensor<3>, Tensor<3>) = (ranked(inputs[0].clone()), ranked(inputs[1].clone()));
        let output = by_chunks(&[gate, up], |t| vec![t[0].clone() * sigmoid(t[0].clone()) * t[1].clone()]).remove(0);
        (output.into_dispatch(), needed.map(|_| [inputs[0].clone(), inputs[1].clone()]))
    }

    fn backward(&self, [gate, up]: Self::Saved, output_grad: DispatchTensor, needed: &[bool]) -> Vec<Option<DispatchTensor>> {
        let (gate, up, grad): (Tensor<3>, Tensor<3>, Tensor<3>) = (ranked(gate), ranked(up), ranked(output_grad));
        let grads = by_chunks(&[gate, up, grad], |t| {
            let (gate, up, grad) = (t[0].clone(), t[1].clone(), t[2].clone());
            let s = sigmoid(gate.clone());
            let silu = gate.clone() * s.clone();
            // d silu / d gate = s · (1 + gate · (1 − s))
            let d_silu = s.clone() * ((gate * (s.neg() + 1.0)) + 1.0);
            vec![grad.clone() * up * d_silu, grad * silu]
        });
        let [gate_grad, up_grad]: [Tensor<3>; 2] = grads.try_into().unwrap_or_else(|_| unreachable!("two gradients"));
        vec![needed[0].then(|| gate_grad.into_dispatch()), needed[1].then(|| up_grad.into_dispatch())]
    }
}

/// `silu(gate) · up` for `[batch, seq, intermediate]` inputs.
pub fn swiglu(gate: Tensor<3>, up: Tensor<3>) -> Tensor<3> {
    ranked(apply(SwiGlu, vec![gate.into_dispatch(), up.into_dispatch()]))
}
