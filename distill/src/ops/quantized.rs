//! A projection over a frozen, quantized weight (QLoRA's base): the weight stays quantized in
//! memory through the forward and the backward pass. Under burn's autodiff a matmul with a
//! quantized operand dequantizes it and keeps the dequantized copy until the backward pass,
//! one full-precision weight per projection; this operation instead dequantizes inside its
//! forward pass, drops the copy, and dequantizes again for the input's gradient. The weight is
//! frozen, so it needs no gradient and nothing else is saved.

use burn::backend::DispatchTensor;
use burn::tensor::{DType, Tensor};

use super::{Differentiable, apply, ranked};

#[derive(Clone, Debug)]
struct QuantizedMatmul {
    /// `[in, out]`, quantized, on the inner device.
    weight: DispatchTensor,
    /// Multiply in f32 whatever the activations' dtype: flex computes a bf16 matmul by widening
    /// both sides to f32 anyway, so this skips a bf16 copy of the weight and flex's f32 copy
    /// of that, and rounds the dequantized values once fewer.
    widen: bool,
}

impl QuantizedMatmul {
    /// `x · W` (`transpose`: `x · Wᵀ`) with W dequantized for this product only.
    fn times_weight(&self, x: Tensor<3>, transpose: bool) -> Tensor<3> {
        let dtype = x.dtype();
        let weight = ranked::<2>(self.weight.clone()).dequantize();
        let weight = if transpose { weight.transpose() } else { weight };
        if self.widen && dtype != DType::F32 {
            let x = x.cast(DType::F32);
            let weight = if weight.dtype() == DType::F32 { weight } else { weight.cast(DType::F32) };
            return x.matmul(weight.unsqueeze()).cast(dtype);
        }
        let weight = if weight.dtype() == dtype { weight } else { weight.cast(dtype) };
        x.matmul(weight.unsqueeze())
    }
}

impl Differentiable for QuantizedMatmul {
    type Saved = ();

    fn forward(&self, inputs: &[DispatchTensor], needed: Option<&[bool]>) -> (DispatchTensor, Option<()>) {
        let x: Tensor<3> = ranked(inputs[0].clone());
        (self.times_weight(x, false).into_dispatch(), needed.map(|_| ()))
    }

    fn backward(&self, _saved: (), output_grad: DispatchTensor, needed: &[bool]) -> Vec<Option<DispatchTensor>> {
        let grad: Tensor<3> = ranked(output_grad);
        vec![needed[0].then(|| self.times_weight(grad, true).into_dispatch())]
    }
}

/// Whether `weight` holds quantized values.
pub fn is_quantized(weight: &Tensor<2>) -> bool {
    matches!(weight.dtype(), DType::QFloat(_))
}

/// `x · weight (+ bias)` for a frozen quantized `weight` `[in, out]`.
pub fn linear(x: Tensor<3>, weight: &Tensor<2>, bias: Option<Tensor<1>>) -> Tensor<3> {
    let op = QuantizedMatmul { weight: weight.clone().inner().into_dispatch(), widen: crate::device::is_flex(&x.device()) };
    let y: Tensor<3> = ranked(apply(op, vec![x.into_dispatch()]));
    match bias {
        Some(bias) => {
            let bias = if bias.dtype() == y.dtype() { bias } else { bias.cast(y.dtype()) };
            y + bias.unsqueeze()
        }
        None => y,
    }
}
