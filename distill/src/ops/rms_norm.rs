//! RMSNorm, `x / sqrt(mean(x²) + ε) · γ`, as one operation on flex for f32: a pass per row on
//! every core, keeping for the backward pass its input and one rms per row. burn's `RmsNorm`
//! is five element-wise operations that flex runs one pass at a time on one thread, and under
//! autodiff it keeps `x²` and `x / rms` as well. Elsewhere, and in bf16, it is burn's.

use burn::nn::RmsNorm;
use burn::tensor::{DType, Tensor};

#[cfg(feature = "flex")]
use {
    super::host::HostF32,
    super::{Differentiable, apply, ranked},
    burn::backend::DispatchTensor,
    burn::tensor::TensorData,
    rayon::prelude::*,
    std::sync::Arc,
};

#[cfg(feature = "flex")]
#[derive(Clone, Debug)]
struct RmsNormOp {
    epsilon: f32,
}

/// Rows per task of the backward pass: each task sums its rows' share of dγ.
#[cfg(feature = "flex")]
const ROWS_PER_TASK: usize = 64;

#[cfg(feature = "flex")]
fn host<const D: usize>(tensor: Tensor<D>) -> HostF32 {
    HostF32::of(tensor).expect("checked by `rms_norm`: an f32 tensor on flex")
}

#[cfg(feature = "flex")]
impl Differentiable for RmsNormOp {
    /// The input, γ, and each row's rms.
    type Saved = (DispatchTensor, DispatchTensor, Arc<Vec<f32>>);

    fn forward(&self, inputs: &[DispatchTensor], needed: Option<&[bool]>) -> (DispatchTensor, Option<Self::Saved>) {
        let (x, gamma): (Tensor<3>, Tensor<1>) = (ranked(inputs[0].clone()), ranked(inputs[1].clone()));
        let (device, dims) = (x.device(), x.dims());
        let (x, gamma) = (host(x), host(gamma));
        let (x, gamma) = (x.values(), gamma.values());
        let width = gamma.len();
        let mut y = vec![0f32; x.len()];
        let mut rms = vec![0f32; x.len() / width];
        y.par_chunks_mut(width).zip(rms.par_iter_mut()).zip(x.par_chunks(width)).for_each(|((y, rms), x)| {
            // burn's arithmetic: the mean of the squares, then x / rms, then · γ.
            *rms = (x.iter().map(|v| v * v).sum::<f32>() / width as f32 + self.epsilon).sqrt();
            y.iter_mut().zip(x).zip(gamma).for_each(|((y, x), g)| *y = (x / *rms) * g);
        });
        let y = Tensor::<3>::from_data(TensorData::new(y, dims), (&device, DType::F32));
        (y.into_dispatch(), needed.map(|_| (inputs[0].clone(), inputs[1].clone(), Arc::new(rms))))
    }

    fn backward(&self, (x, gamma, rms): Self::Saved, output_grad: DispatchTensor, needed: &[bool]) -> Vec<Option<DispatchTensor>> {
        let (x, gamma, grad): (Tensor<3>, Tensor<1>, Tensor<3>) = (ranked(x), ranked(gamma), ranked(output_grad));
        let (device, dims) = (x.device(), x.dims());
        let (x, gamma, grad) = (host(x), host(gamma), host(grad));
        let (x, gamma, grad) = (x.values(), gamma.values(), grad.values());
        let width = gamma.len();
        let mut x_grad = vec![0f32; x.len()];
        // Each task's rows: dx = (dy·γ − x̂ · mean(dy·γ·x̂)) / rms with x̂ = x / rms, and their
        // share of dγ = Σ dy · x̂.
        let gamma_grads: Vec<Vec<f32>> = x_grad
            .par_chunks_mut(ROWS_PER_TASK * width)
            .enumerate()
            .map(|(task, x_grad)| {
                let mut gamma_grad = vec![0f32; if needed[1] { width } else { 0 }];
                for (i, x_grad) in x_grad.chunks_mut(width).enumerate() {
                    let row = task * ROWS_PER_TASK + i;
                    let (x, grad, rms) = (&x[row * width..(row + 1) * width], &grad[row * width..(row + 1) * width], rms[row]);
                    let mean = x.iter().zip(grad).zip(gamma).map(|((x, dy), g)| dy * g * (x / rms)).sum::<f32>() / width as f32;
                    for (((dx, x), dy), g) in x_grad.iter_mut().zip(x).zip(grad).zip(gamma) {
                        *dx = (dy * g - (x / rms) * mean) / rms;
                    }
                    gamma_grad.iter_mut().zip(x).zip(grad).for_each(|((dg, x), dy)| *dg += dy * (x / rms));
                }
                gamma_grad
            })
            .collect();
        let x_grad = needed[0].then(|| Tensor::<3>::from_data(TensorData::new(x_grad, dims), (&device, DType::F32)).into_dispatch());
        let gamma_grad = needed[1].then(|| {
            let sum = gamma_grads.iter().fold(vec![0f32; width], |mut sum, part| {
                sum.iter_mut().zip(part).for_each(|(s, p)| *s += p);
                sum
            });
            Tensor::<1>::from_data(TensorData::new(sum, [width]), (&device, DType::F32)).into_dispatch()
        });
        vec![x_grad, gamma_grad]
    }
}

/// `norm` applied to `x` `[batch, seq, hidden]`: the fused operation for f32 on flex, burn's
/// module otherwise.
pub fn rms_norm(norm: &RmsNorm, x: Tensor<3>) -> Tensor<3> {
    #[cfg(feature = "flex")]
    {
        let gamma = norm.gamma.val();
        if crate::device::is_flex(&x.device()) && x.dtype() == DType::F32 && gamma.dtype() == DType::F32 {
            let op = RmsNormOp { epsilon: norm.epsilon as f32 };
            return ranked(apply(op, vec![x.into_dispatch(), gamma.into_dispatch()]));
        }
    }
    norm.forward(x)
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::module::Param;
    use burn::nn::RmsNormConfig;
    use burn::tensor::Distribution;

    /// The fused operation against burn's module: output, dx and dγ within 1e-5 relative, with a
    /// width that is not a multiple of the SIMD lanes and more rows than one backward task.
    #[test]
    fn the_fused_norm_equals_burns() {
        let device = crate::device::parse("flex").expect("flex").autodiff();
        let (rows, width) = (150, 77);
        let x = Tensor::<3>::random([2, rows / 2, width], Distribution::Normal(0.0, 2.0), &device);
        let upstream = Tensor::<3>::random([2, rows / 2, width], Distribution::Normal(0.0, 1.0), &device);
        let mut norm = RmsNormConfig::new(width).with_epsilon(1e-6).init(&device);
        norm.gamma = Param::from_tensor(Tensor::random([width], Distribution::Uniform(0.5, 1.5), &device));
        let run = |fused: bool| {
            let x = x.clone().detach().require_grad();
            let y = if fused { rms_norm(&norm, x.clone()) } else { norm.forward(x.clone()) };
            let grads = (y.clone() * upstream.clone()).sum().backward();
            let x_grad = x.grad(&grads).expect("dx");
            let gamma_grad = norm.gamma.val().grad(&grads).expect("dγ");
            (y.inner(), x_grad, gamma_grad)
        };
        let (fused, reference) = (run(true), run(false));
        let close = |a: Tensor<3>, b: Tensor<3>, what: &str| {
            let error = (a - b.clone()).abs().max().into_scalar::<f32>();
            let scale = b.abs().max().into_scalar::<f32>();
            assert!(error <= 1e-5 * scale, "{what}: max error {error} of {scale}");
        };
        close(fused.0, reference.0, "output");
        close(fused.1, reference.1, "dx");
        close(fused.2.unsqueeze(), reference.2.unsqueeze(), "dγ");
    }
}
