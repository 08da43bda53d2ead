//! f32 values of a flex tensor, read and written in place on the host. flex runs each
//! element-wise operation as its own pass over memory on one thread; work made of many such
//! passes over large tensors (the optimizer step) goes faster as one pass on every core.

use burn::backend::{DispatchAutodiffContext, Flex};
use burn::tensor::{DType, Tensor};

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
        Some(HostF32(if flex.layout().contiguous_offsets().is_some() { flex } else { flex.to_contiguous() }))
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
