//! A projection over a frozen, quantized weight (QLoRA's base): the weight stays quantized in
//! memory through the forward and the backward pass. This operation dequantizes the weight
//! inside its forward pass, a slice at a time, multiplies, and drops the slice; the backward
//! pass dequantizes again for the input's gradient. The weight is frozen, so it needs no
//! gradient, and the operation saves nothing but the packed weight itself, whose clone shares
//! its storage.

use burn::backend::DispatchTensor;
use burn::tensor::{DType, Int, Tensor};

use super::{Differentiable, apply, ranked};
use crate::model::linear::{BLOCK, QuantizedWeight, dequantize};

/// The most values dequantized at once: a slice of a weight in f32 takes 4 bytes a value, and
/// unpacking it about as much again, so one slice costs at most ~256 MiB of transients, however
/// large the projection (a 70B model's MLP weight is 235M values).
pub const SLICE_VALUES: usize = 16 << 20;

#[derive(Clone, Debug)]
struct QuantizedMatmul {
    /// `[in, out · bits / 32]` packed words, on the inner device.
    values: Tensor<2, Int>,
    /// `[in, out / 32]`, on the inner device.
    scales: Tensor<2>,
    /// The most values dequantized at once ([`SLICE_VALUES`]).
    slice_values: usize,
    /// Multiply in f32 whatever the activations' dtype: flex computes a bf16 matmul by widening
    /// both sides to f32 anyway, so this skips a bf16 copy of the weight and flex's f32 copy
    /// of that, and rounds the dequantized values once fewer.
    widen: bool,
}

impl QuantizedMatmul {
    fn dims(&self) -> [usize; 2] {
        let [inputs, blocks] = self.scales.dims();
        [inputs, blocks * BLOCK]
    }

    /// Columns `columns` of the weight, dequantized (`columns` on whole blocks).
    fn columns(&self, columns: std::ops::Range<usize>) -> Tensor<2> {
        let [inputs, outputs] = self.dims();
        let per_word = outputs / self.values.dims()[1];
        let values = self.values.clone().slice([0..inputs, columns.start / per_word..columns.end / per_word]);
        dequantize(values, self.scales.clone().slice([0..inputs, columns.start / BLOCK..columns.end / BLOCK]))
    }

    /// Rows `rows` of the weight, dequantized.
    fn rows(&self, rows: std::ops::Range<usize>) -> Tensor<2> {
        let [words, blocks] = [self.values.dims()[1], self.scales.dims()[1]];
        dequantize(self.values.clone().slice([rows.clone(), 0..words]), self.scales.clone().slice([rows, 0..blocks]))
    }

    /// `x · weight` for an f32 `weight` slice, in `x`'s dtype.
    fn times(&self, x: Tensor<3>, weight: Tensor<2>) -> Tensor<3> {
        let dtype = x.dtype();
        if dtype == DType::F32 || self.widen {
            let x = if dtype == DType::F32 { x } else { x.cast(DType::F32) };
            let y = x.matmul(weight.unsqueeze());
            return if dtype == DType::F32 { y } else { y.cast(dtype) };
        }
        x.matmul(weight.cast(dtype).unsqueeze())
    }
}

/// `ranges` of at most `step` covering `0..total`.
fn slices(total: usize, step: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..total).step_by(step.max(1)).map(move |start| start..(start + step.max(1)).min(total))
}

impl Differentiable for QuantizedMatmul {
    type Saved = ();

    /// `x · W`, W's columns a slice at a time.
    fn forward(&self, inputs: &[DispatchTensor], needed: Option<&[bool]>) -> (DispatchTensor, Option<()>) {
        let x: Tensor<3> = ranked(inputs[0].clone());
        let [inputs_width, outputs] = self.dims();
        let step = (self.slice_values / inputs_width.max(1) / BLOCK).max(1) * BLOCK;
        let parts: Vec<Tensor<3>> = slices(outputs, step).map(|columns| self.times(x.clone(), self.columns(columns))).collect();
        let y = if parts.len() == 1 { parts.into_iter().next().expect("one part") } else { Tensor::cat(parts, 2) };
        (y.into_dispatch(), needed.map(|_| ()))
    }

    /// `∂x = ∂y · Wᵀ`, W's rows a slice at a time.
    fn backward(&self, _saved: (), output_grad: DispatchTensor, needed: &[bool]) -> Vec<Option<DispatchTensor>> {
        let grad: Tensor<3> = ranked(output_grad);
        let [inputs_width, outputs] = self.dims();
        let step = (self.slice_values / outputs.max(1)).max(1);
        vec![needed[0].then(|| {
            let parts: Vec<Tensor<3>> = slices(inputs_width, step).map(|rows| self.times(grad.clone(), self.rows(rows).transpose())).collect();
            let x_grad = if parts.len() == 1 { parts.into_iter().next().expect("one part") } else { Tensor::cat(parts, 2) };
            x_grad.into_dispatch()
        })]
    }
}

/// `x · weight (+ bias)` for a frozen quantized `weight` `[in, out]`.
pub fn linear(x: Tensor<3>, weight: &QuantizedWeight, bias: Option<Tensor<1>>) -> Tensor<3> {
    let y = product(x, weight, SLICE_VALUES);
    match bias {
        Some(bias) => {
            let bias = if bias.dtype() == y.dtype() { bias } else { bias.cast(y.dtype()) };
            y + bias.unsqueeze()
        }
        None => y,
    }
}

fn product(x: Tensor<3>, weight: &QuantizedWeight, slice_values: usize) -> Tensor<3> {
    let widen = crate::device::is_flex(&x.device());
    let op = QuantizedMatmul { values: weight.values.val().inner(), scales: weight.scales.val().inner(), slice_values, widen };
    ranked(apply(op, vec![x.into_dispatch()]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};

    /// Slice by slice (three column slices forward, four row slices backward), the product and
    /// the input's gradient equal a dense matmul over the dequantized weight.
    #[test]
    fn slices_multiply_as_the_whole() {
        let device = crate::device::parse("flex").unwrap().autodiff();
        let (inputs, outputs) = (64, 96);
        let rows: Vec<f32> = (0..inputs * outputs).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
        let weight = QuantizedWeight::from_rows(&rows, [inputs, outputs], 4, DType::F32, &device);
        let dense = weight.dequantize();
        let x = Tensor::<3>::random([2, 5, inputs], Distribution::Default, &device).require_grad();
        let target = Tensor::<3>::random([2, 5, outputs], Distribution::Default, &device);
        let sliced = product(x.clone(), &weight, inputs * BLOCK);
        let whole = x.clone().matmul(dense.unsqueeze());
        let close = |a: TensorData, b: TensorData| {
            let (a, b) = (a.try_into_vec::<f32>().unwrap(), b.try_into_vec::<f32>().unwrap());
            a.iter().zip(&b).all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs()))
        };
        assert!(close(sliced.clone().into_data(), whole.clone().into_data()), "forward");
        let sliced_grad = (sliced * target.clone()).sum().backward();
        let whole_grad = (whole * target).sum().backward();
        assert!(close(x.grad(&sliced_grad).unwrap().into_data(), x.grad(&whole_grad).unwrap().into_data()), "backward");
    }
}
