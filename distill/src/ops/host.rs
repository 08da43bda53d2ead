//! f32 values of a flex tensor, read and written in place on the host, and a vectorised exp.
//! flex runs each element-wise operation as its own pass over memory on one thread; work made
//! of many such passes over large tensors (the optimizer step, the loss's softmax rows) goes
//! faster as one pass on every core.

use burn::backend::{DispatchAutodiffContext, Flex};
use burn::tensor::{DType, Tensor, TensorData};

use super::{lift, lower};

type FlexTensor = burn::backend::tensor::FloatTensor<Flex>;

/// A contiguous f32 tensor on flex, held as flex's own tensor.
pub struct HostF32(FlexTensor);

impl HostF32 {
    /// `tensor`'s storage, when it is an f32 tensor on flex off the autodiff graph; `None`
    /// otherwise (the caller takes its tensor path).
    pub fn of<const D: usize>(tensor: Tensor<D>) -> Option<HostF32> {
        if tensor.dtype() != DType::F32 || !crate::device::is_flex(&tensor.device()) {
            return None;
        }
        let dispatch = tensor.into_dispatch();
        if dispatch.autodiff != DispatchAutodiffContext::Disabled {
            return None;
        }
        let flex = lower::<Flex>(dispatch);
        Some(HostF32(if flex.layout().contiguous_offsets().is_some() { flex } else { in_order(&flex) }))
    }

    pub fn values(&self) -> &[f32] {
        self.0.as_slice::<f32>().expect("contiguous f32, checked when made")
    }

    /// The values to write; copied first when the storage is shared with another tensor or
    /// holds more than these values (a view).
    pub fn values_mut(&mut self) -> &mut [f32] {
        let exact = self.0.layout().contiguous_offsets() == Some((0, self.0.bytes().len() / size_of::<f32>()));
        if !exact {
            self.0 = self.0.to_contiguous();
        }
        self.0.storage_mut::<f32>()
    }

    /// The tensor again, with the shape it came with.
    pub fn into_tensor<const D: usize>(self) -> Tensor<D> {
        Tensor::from_dispatch(lift::<Flex>(self.0))
    }
}

/// A view's values in the row-major order of its shape, copied on every core: flex's own copy
/// of a transposed view (the attention's heads out of the projections' token-major layout) runs
/// on one thread.
fn in_order(flex: &FlexTensor) -> FlexTensor {
    use rayon::prelude::*;
    let layout = flex.layout();
    let storage = flex.storage::<f32>();
    let dims: Vec<usize> = layout.shape().iter().copied().collect();
    let strides = layout.strides().to_vec();
    let rank = dims.len();
    let (width, inner) = (dims[rank - 1].max(1), strides[rank - 1]);
    let mut values = zeros(dims.iter().product());
    values.par_chunks_mut(width).enumerate().for_each(|(row, to)| {
        // The row's first element: its index in every dimension but the last, through the strides.
        let (mut rest, mut at) = (row, layout.start_offset() as isize);
        for axis in (0..rank - 1).rev() {
            at += (rest % dims[axis]) as isize * strides[axis];
            rest /= dims[axis];
        }
        if inner == 1 {
            to.copy_from_slice(&storage[at as usize..at as usize + width]);
        } else {
            to.iter_mut().enumerate().for_each(|(j, v)| *v = storage[(at + j as isize * inner) as usize]);
        }
    });
    FlexTensor::from_data(TensorData::new(values, dims))
}

/// `len` zeros, written. `vec![0.0; len]` takes fresh pages from the kernel that read as the
/// shared zero page until written; a product that accumulates into them reads first, and each
/// page's first write then costs a copy-on-write fault and a TLB shootdown on every core (14% of
/// the fused attention's time before its buffers were made this way).
pub fn zeros(len: usize) -> Vec<f32> {
    let mut values = Vec::with_capacity(len);
    values.resize(len, 0.0);
    values
}

/// `x ← exp(x − shift)` over a slice, vectorised: Cephes' `expf` (a degree-7 polynomial on
/// `[−ln2/2, ln2/2]` and a power of two from the exponent bits), within 1 ulp of libm's `expf`,
/// which scalar code calls a value at a time (it was the fused attention's largest cost after
/// its products). Arguments below −87.3 give the smallest normal float instead of less, and
/// above 88.38 (where 2^n would leave the exponent's range) exp(88.38) ≈ 2.4e38 instead of ∞
/// (SwiGLU's `exp(−gate)`, where either gives the same zero to within 1e-36 in
/// `gate / (1 + exp(−gate))`); NaN stays NaN. Returns the sum of the results, added in 16 lanes
/// (a single running sum is a chain of dependent adds that the compiler may not reorder, and
/// cost as much as the exps).
pub fn exp_shifted(values: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked above.
            return unsafe { exp_shifted_avx512(values, shift) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA, checked above.
            return unsafe { exp_shifted_avx2(values, shift) };
        }
    }
    exp_shifted_portable(values, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_shifted_avx512(values: &mut [f32], shift: f32) -> f32 {
    exp_shifted_portable(values, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(values: &mut [f32], shift: f32) -> f32 {
    exp_shifted_portable(values, shift)
}

/// The loop the compiler vectorises for the features of its caller: no calls, no branches, and
/// no float-to-integer cast (Rust's saturating `as` is scalar code): adding 1.5 · 2^23 rounds
/// to an integer `n` kept in the low mantissa bits, which become the exponent of 2^n.
#[inline(always)]
fn exp_shifted_portable(values: &mut [f32], shift: f32) -> f32 {
    let mut sums = [0f32; LANES];
    let mut chunks = values.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (x, sum) in chunk.iter_mut().zip(&mut sums) {
            *x = exp(*x - shift);
            *sum += *x;
        }
    }
    for x in chunks.into_remainder() {
        *x = exp(*x - shift);
        sums[0] += *x;
    }
    sums.iter().sum()
}

/// Lanes of the vectorised loops: one AVX-512 register, two AVX2 ones.
const LANES: usize = 16;

#[inline(always)]
fn exp(v: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0;
    // Compares, not `f32::max`, so that a NaN stays NaN (and so does the loss).
    let v = if v < -87.33654 { -87.33654 } else { v };
    let v = if v > 88.37626 { 88.37626 } else { v };
    let t = v * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = v - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65) * r + 0.500_000_01;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23)
}

/// The largest value (NaNs ignored, as `f32::max` does; −∞ for none), in 16 lanes: a running
/// maximum is a chain of dependent compares.
pub fn max_of(values: &[f32]) -> f32 {
    let mut maxima = [f32::NEG_INFINITY; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (&x, max) in chunk.iter().zip(&mut maxima) {
            *max = if x > *max { x } else { *max };
        }
    }
    chunks.remainder().iter().chain(&maxima).fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over the arguments the kernel passes (a score minus its row's maximum or log-sum-exp:
    /// at most a little above 0), through every code path this CPU takes and the portable one.
    #[test]
    fn the_vectorised_exp_is_within_two_ulp_of_libm() {
        let arguments: Vec<f32> = (0..=400_000).map(|i| -87.0 + i as f32 * (97.0 / 400_000.0)).collect();
        let mut fast = arguments.clone();
        exp_shifted(&mut fast, 0.0);
        let mut portable = arguments.clone();
        let sum = exp_shifted_portable(&mut portable, 0.0);
        let serial: f64 = portable.iter().map(|&y| y as f64).sum();
        assert!((sum as f64 - serial).abs() <= 1e-6 * serial, "sum {sum} against {serial}");
        for (results, path) in [(&fast, "dispatched"), (&portable, "portable")] {
            let worst = arguments
                .iter()
                .zip(results.iter())
                .map(|(x, y)| (x.exp().to_bits() as i64 - y.to_bits() as i64).unsigned_abs())
                .max()
                .expect("arguments");
            eprintln!("{path}: at most {worst} ulp from libm's expf");
            assert!(worst <= 2, "{path}: {worst} ulp from libm's expf");
        }
        let mut tiny = vec![-100.0f32, -1000.0, f32::NEG_INFINITY];
        exp_shifted(&mut tiny, 0.0);
        assert!(tiny.iter().all(|&y| (0.0..1.2e-38).contains(&y)), "{tiny:?}");
        // SwiGLU passes −gate, which can be large: a large finite float, not a wrapped exponent.
        let mut huge = vec![88.0f32, 89.0, 100.0, 1e30, f32::INFINITY];
        exp_shifted(&mut huge, 0.0);
        assert!(huge[0] > 1.6e38 && huge[1..].iter().all(|&y| y >= 1.6e38 && y.is_finite()), "{huge:?}");
        let mut nan = vec![1.0f32; 33];
        nan[17] = f32::NAN;
        exp_shifted(&mut nan, 2.0);
        assert!(nan[17].is_nan() && nan.iter().filter(|y| y.is_nan()).count() == 1, "{nan:?}");
    }

    #[test]
    fn max_of_is_the_fold_of_f32_max() {
        for len in [0usize, 1, 15, 16, 17, 100] {
            let mut values: Vec<f32> = (0..len).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.25).collect();
            let want = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_of(&values), want, "{len} values");
            if len > 3 {
                values[3] = f32::NAN;
                values[len - 1] = 1e9;
                assert_eq!(max_of(&values), 1e9, "{len} values with a NaN");
            }
        }
    }

    /// A transposed view and a narrowed one read back in their shapes' order, as flex's own copy
    /// reads them.
    #[test]
    fn host_values_of_views_follow_the_shape() {
        let device = crate::device::parse("flex").expect("flex");
        let values: Vec<f32> = (0..2 * 3 * 5 * 4).map(|i| i as f32).collect();
        let t = Tensor::<4>::from_data(burn::tensor::TensorData::new(values, [2, 3, 5, 4]), &device);
        let views = [t.clone(), t.clone().swap_dims(1, 2), t.clone().permute([3, 0, 2, 1]), t.narrow(2, 1, 3).swap_dims(0, 3)];
        for view in views {
            let want = view.clone().into_data().try_to_vec::<f32>().expect("f32");
            assert_eq!(HostF32::of(view).expect("f32 on flex").values(), want);
        }
    }
}
