//! SwiGLU's gate, `silu(gate) · up`, as one operation that keeps only its two inputs for the
//! backward pass. Written as separate tensor operations under burn's autodiff it keeps
//! `sigmoid(gate)`, `silu(gate)` and the product as well: three more intermediate-sized
//! activations per token and layer, the largest share of what a layer keeps. flex runs
//! element-wise work on one thread, so there f32 goes through one pass on every core, and other
//! dtypes are cut into one chunk of tokens per core, computed side by side.

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

/// `f` over same-shape f32 inputs on flex, a chunk of positions at a time on every core, giving
/// `N` outputs of that shape (`f` gets the chunk of each input and fills the chunk of each
/// output); `None` (the tensor path) elsewhere.
#[cfg(feature = "flex")]
fn on_host<const I: usize, const N: usize>(inputs: &[&Tensor<3>; I], f: impl Fn([&[f32]; I], [&mut [f32]; N]) + Sync) -> Option<Vec<Tensor<3>>> {
    use burn::tensor::{DType, TensorData};
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    let hosts: Vec<super::host::HostF32> = inputs.iter().map(|t| super::host::HostF32::of((*t).clone())).collect::<Option<_>>()?;
    let values: Vec<&[f32]> = hosts.iter().map(|h| h.values()).collect();
    let len = values[0].len();
    let mut results: Vec<Vec<f32>> = (0..N).map(|_| super::host::zeros(len)).collect();
    // Chunk `c` of every output, side by side.
    let mut chunks: Vec<Vec<&mut [f32]>> = (0..len.div_ceil(CHUNK)).map(|_| Vec::with_capacity(N)).collect();
    for result in results.iter_mut() {
        chunks.iter_mut().zip(result.chunks_mut(CHUNK)).for_each(|(chunk, part)| chunk.push(part));
    }
    chunks.into_par_iter().enumerate().for_each(|(c, outputs)| {
        let range = c * CHUNK..c * CHUNK + outputs[0].len();
        let outputs: [&mut [f32]; N] = outputs.try_into().unwrap_or_else(|_| unreachable!("N outputs"));
        f(std::array::from_fn(|k| &values[k][range.clone()]), outputs);
    });
    let (device, dims) = (inputs[0].device(), inputs[0].dims());
    Some(results.into_iter().map(|r| Tensor::from_data(TensorData::new(r, dims), (&device, DType::F32))).collect())
}

/// `exp(−gate)` into `out`, with the kernels' vectorised exp: libm's, a call a value, was the
/// largest share of SwiGLU's passes.
#[cfg(feature = "flex")]
fn exp_negated(gate: &[f32], out: &mut [f32]) {
    out.iter_mut().zip(gate).for_each(|(e, g)| *e = -g);
    super::host::exp_shifted(out, 0.0);
}

impl Differentiable for SwiGlu {
    /// The gate and the up projection.
    type Saved = [DispatchTensor; 2];

    fn forward(&self, inputs: &[DispatchTensor], needed: Option<&[bool]>) -> (DispatchTensor, Option<Self::Saved>) {
        let (gate, up): (Tensor<3>, Tensor<3>) = (ranked(inputs[0].clone()), ranked(inputs[1].clone()));
        let saved = needed.map(|_| [inputs[0].clone(), inputs[1].clone()]);
        #[cfg(feature = "flex")]
        if let Some(mut output) = on_host(&[&gate, &up], |[gate, up], [out]| {
            exp_negated(gate, out);
            out.iter_mut().zip(gate).zip(up).for_each(|((o, g), u)| *o = g / (1.0 + *o) * u);
        }) {
            return (output.remove(0).into_dispatch(), saved);
        }
        let output = by_chunks(&[gate, up], |t| vec![t[0].clone() * sigmoid(t[0].clone()) * t[1].clone()]).remove(0);
        (output.into_dispatch(), saved)
    }

    fn backward(&self, [gate, up]: Self::Saved, output_grad: DispatchTensor, needed: &[bool]) -> Vec<Option<DispatchTensor>> {
        let (gate, up, grad): (Tensor<3>, Tensor<3>, Tensor<3>) = (ranked(gate), ranked(up), ranked(output_grad));
        #[cfg(feature = "flex")]
        if let Some(grads) = on_host(&[&gate, &up, &grad], |[gate, up, grad], [gate_grad, up_grad]| {
            exp_negated(gate, gate_grad);
            let inputs = gate.iter().zip(up).zip(grad);
            for ((gate_grad, up_grad), ((&g, &u), &d)) in gate_grad.iter_mut().zip(up_grad.iter_mut()).zip(inputs) {
                let s = 1.0 / (1.0 + *gate_grad);
                *gate_grad = d * u * (s * ((g * (1.0 - s)) + 1.0));
                *up_grad = d * (g * s);
            }
        }) {
            let [gate_grad, up_grad]: [Tensor<3>; 2] = grads.try_into().unwrap_or_else(|_| unreachable!("two gradients"));
            return vec![needed[0].then(|| gate_grad.into_dispatch()), needed[1].then(|| up_grad.into_dispatch())];
        }
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
