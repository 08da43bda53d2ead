//! A dense projection `x · W + b` whose three matrix products (the output, and in the backward
//! pass the input's and the weight's gradients) go through the CBLAS library on flex
//! (`super::blas`). It keeps what burn's own `linear` keeps for its backward pass (the input
//! and the weight, shared, not copied). Elsewhere, in bf16, or without a library, it is burn's
//! `linear`.

use burn::backend::DispatchTensor;
use burn::tensor::{DType, Tensor};

use super::matmul::{on_blas, product};
use super::{Differentiable, apply, ranked};

#[derive(Clone, Debug)]
struct Dense {
    bias: bool,
}

/// `[.., in]` as `[rows, in]`.
fn rows(x: Tensor<3>) -> Tensor<2> {
    let [batch, seq, width] = x.dims();
    x.reshape([batch * seq, width])
}

impl Differentiable for Dense {
    /// The input and the weight.
    type Saved = [DispatchTensor; 2];

    fn forward(&self, inputs: &[DispatchTensor], needed: Option<&[bool]>) -> (DispatchTensor, Option<Self::Saved>) {
        let (x, weight): (Tensor<3>, Tensor<2>) = (ranked(inputs[0].clone()), ranked(inputs[1].clone()));
        let [batch, seq, _] = x.dims();
        let mut y = product(&rows(x), false, &weight, false);
        if self.bias {
            y = y + ranked::<1>(inputs[2].clone()).unsqueeze();
        }
        let out = weight.dims()[1];
        (y.reshape([batch, seq, out]).into_dispatch(), needed.map(|_| [inputs[0].clone(), inputs[1].clone()]))
    }

    fn backward(&self, [x, weight]: Self::Saved, output_grad: DispatchTensor, needed: &[bool]) -> Vec<Option<DispatchTensor>> {
        let (x, weight, grad): (Tensor<3>, Tensor<2>, Tensor<3>) = (ranked(x), ranked(weight), ranked(output_grad));
        let [batch, seq, width] = x.dims();
        let grad = rows(grad);
        let x_grad = needed[0].then(|| product(&grad, false, &weight, true).reshape([batch, seq, width]).into_dispatch());
        let weight_grad = needed[1].then(|| product(&rows(x), true, &grad, false).into_dispatch());
        let mut grads = vec![x_grad, weight_grad];
        if self.bias {
            grads.push(needed[2].then(|| grad.sum_dim(0).squeeze_dim::<1>(0).into_dispatch()));
        }
        grads
    }
}

/// `x · weight + bias` for `x` `[batch, seq, in]` and `weight` `[in, out]` (burn's layout).
pub fn linear(x: Tensor<3>, weight: Tensor<2>, bias: Option<Tensor<1>>) -> Tensor<3> {
    if !(on_blas(&x.device(), x.dtype()) && weight.dtype() == DType::F32) {
        return burn::tensor::module::linear(x, weight, bias);
    }
    let op = Dense { bias: bias.is_some() };
    let mut inputs = vec![x.into_dispatch(), weight.into_dispatch()];
    inputs.extend(bias.map(Tensor::into_dispatch));
    ranked(apply(op, inputs))
}
