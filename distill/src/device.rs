//! `--device flex|wgpu|vulkan|metal|webgpu|cuda[:N]|rocm[:N]` → a burn [`Device`].

use burn::tensor::{DType, Device};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device `{0}` (expected flex, wgpu, vulkan, metal, webgpu, cuda[:N] or rocm[:N])")]
    Unknown(String),
    #[error("device `{name}` needs the `{feature}` cargo feature; rebuild with `--features {feature}`")]
    NotBuilt { name: String, feature: &'static str },
    #[error("device `{0}`: the index after ':' must be a number")]
    BadIndex(String),
    #[error("unknown dtype `{0}` (expected f32, bf16 or f16)")]
    UnknownDtype(String),
    #[error("{device} has no {dtype:?} compute (bf16: cuda, metal, flex; f16: GPUs); choose another --dtype")]
    NoDtype { device: String, dtype: DType },
}

/// `f32`, `bf16` or `f16` as a dtype.
pub fn dtype_named(name: &str) -> Result<DType, DeviceError> {
    match name {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(DeviceError::UnknownDtype(other.to_string())),
    }
}

/// `--dtype f32|bf16|f16`, refused where `device` (named `name`) cannot compute it.
pub fn dtype(name: &str, device: &Device, device_name: &str) -> Result<DType, DeviceError> {
    let dtype = dtype_named(name)?;
    if !device.supports_dtype(dtype) {
        return Err(DeviceError::NoDtype { device: device_name.to_string(), dtype });
    }
    Ok(dtype)
}

/// The default when `--device` is not given: a compiled-in GPU backend if the machine has an
/// adapter for it, else flex. A wgpu adapter that is only a software rasteriser (lavapipe)
/// is slower than flex, so it is not chosen by default.
pub fn default_name() -> String {
    if cfg!(feature = "cuda") {
        return "cuda".into();
    }
    if cfg!(feature = "rocm") {
        return "rocm".into();
    }
    if cfg!(feature = "metal") && cfg!(target_os = "macos") {
        return "metal".into();
    }
    "flex".into()
}

fn not_built(name: &str, feature: &'static str) -> DeviceError {
    DeviceError::NotBuilt { name: name.to_string(), feature }
}

#[allow(unreachable_code, unused_variables)]
pub fn parse(spec: &str) -> Result<Device, DeviceError> {
    let (name, index) = match spec.split_once(':') {
        Some((name, index)) => (name, Some(index.parse::<usize>().map_err(|_| DeviceError::BadIndex(spec.into()))?)),
        None => (spec, None),
    };
    match name {
        "flex" | "cpu" => {
            #[cfg(feature = "flex")]
            return Ok(Device::flex());
            Err(not_built(spec, "flex"))
        }
        "wgpu" => {
            #[cfg(feature = "wgpu")]
            return Ok(Device::wgpu(wgpu_kind(index)));
            Err(not_built(spec, "wgpu"))
        }
        "vulkan" => {
            #[cfg(feature = "vulkan")]
            return Ok(Device::vulkan(wgpu_kind(index)));
            Err(not_built(spec, "vulkan"))
        }
        "metal" => {
            #[cfg(feature = "metal")]
            return Ok(Device::metal(wgpu_kind(index)));
            Err(not_built(spec, "metal"))
        }
        "webgpu" => {
            #[cfg(feature = "webgpu")]
            return Ok(Device::webgpu(wgpu_kind(index)));
            Err(not_built(spec, "webgpu"))
        }
        "cuda" => {
            #[cfg(feature = "cuda")]
            return Ok(Device::cuda(index.unwrap_or(0)));
            Err(not_built(spec, "cuda"))
        }
        "rocm" => {
            #[cfg(feature = "rocm")]
            return Ok(Device::rocm(index.unwrap_or(0)));
            Err(not_built(spec, "rocm"))
        }
        _ => Err(DeviceError::Unknown(spec.into())),
    }
}

#[cfg(any(feature = "wgpu", feature = "vulkan", feature = "metal", feature = "webgpu"))]
fn wgpu_kind(index: Option<usize>) -> burn::tensor::DeviceKind {
    match index {
        Some(index) => burn::tensor::DeviceKind::DiscreteGpu(index),
        None => burn::tensor::DeviceKind::DefaultDevice,
    }
}

/// The most bytes one tensor may span on the device named `name` (`--device`), where there is
/// such a limit: wgpu binds a tensor as one storage buffer, and caps a binding at
/// `max_storage_buffer_binding_size`, under 2 GiB (2147483644 bytes on an H200 with NVIDIA's
/// Vulkan driver: a 14B model's f32 embeddings, 2.9 GiB, could not be bound). `None` on flex,
/// CUDA and ROCm.
pub fn tensor_limit(name: &str) -> Option<u64> {
    let base = name.split(':').next().unwrap_or(name);
    matches!(base, "wgpu" | "vulkan" | "metal" | "webgpu").then_some((1 << 31) - 4)
}

/// Whether `device` (or the device under its autodiff) is flex: the host's CPU, which computes
/// bf16 matmuls by widening both sides to f32.
pub fn is_flex(device: &Device) -> bool {
    #[cfg(feature = "flex")]
    if matches!(device.clone().inner().as_dispatch(), burn::backend::DispatchDevice::Flex(_)) {
        return true;
    }
    let _ = device;
    false
}

/// Resolves `--device` (or the default), announcing the choice on stderr.
pub fn select(spec: Option<&str>) -> Result<(Device, String), DeviceError> {
    let name = spec.map(String::from).unwrap_or_else(default_name);
    let device = parse(&name)?;
    eprintln!("device: {name}{}{}", if spec.is_none() { " (default; choose with --device)" } else { "" }, products_on(&device));
    Ok((device, name))
}

/// How flex multiplies matrices, for the device line: through a CBLAS library, or its own.
fn products_on(device: &Device) -> String {
    #[cfg(feature = "flex")]
    if is_flex(device) {
        return match crate::ops::blas::blas() {
            Some(blas) => format!(", f32 matrix products through {}", blas.library),
            None if std::env::var("DISTILL_BLAS").is_ok_and(|v| !v.is_empty()) => ", matrix products by flex's gemm".to_string(),
            None => ", matrix products by flex's gemm (install OpenBLAS, e.g. libopenblas0, for faster f32 training; see DISTILL_BLAS)".to_string(),
        };
    }
    let _ = device;
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unknown_and_bad_index() {
        assert!(matches!(parse("tpu"), Err(DeviceError::Unknown(_))));
        assert!(matches!(parse("cuda:x"), Err(DeviceError::BadIndex(_))));
        assert!(parse("flex").is_ok());
    }
}
