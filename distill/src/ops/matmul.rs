//! Matrix products of the training operations: through a CBLAS library on flex when one is
//! loaded ([`super::blas`]), else burn's.

use burn::tensor::{DType, Tensor};

/// `op(a) · op(b)`, where `op` transposes when asked.
pub fn product(a: &Tensor<2>, transpose_a: bool, b: &Tensor<2>, transpose_b: bool) -> Tensor<2> {
    #[cfg(feature = "flex")]
    if let Some(c) = super::blas::matmul(a, transpose_a, b, transpose_b) {
        return c;
    }
    let a = if transpose_a { a.clone().transpose() } else { a.clone() };
    let b = if transpose_b { b.clone().transpose() } else { b.clone() };
    a.matmul(b)
}

/// Whether products of f32 tensors on `device` go through a CBLAS library.
pub fn on_blas(device: &burn::tensor::Device, dtype: DType) -> bool {
    #[cfg(feature = "flex")]
    if dtype == DType::F32 && crate::device::is_flex(device) {
        return super::blas::blas().is_some();
    }
    let _ = (device, dtype);
    false
}
