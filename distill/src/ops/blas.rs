//! Matrix products on flex through a CBLAS library found at run time.
//!
//! flex multiplies with the `gemm` crate, which reaches about 190 GFLOP/s in f32 on two
//! AVX-512 cores where OpenBLAS's kernels (NumPy's) reach 300–340 and MKL's (PyTorch's) 340–375.
//! The training step is mostly matrix products, so when a CBLAS library can be loaded the large
//! f32 products of training on flex go through it: the projections of every layer
//! ([`super::dense`]) and the output layer of the loss. Nothing is linked at build time: the
//! library is opened with `dlopen` on first use, and without one everything runs as before.
//!
//! `DISTILL_BLAS` chooses: unset, MKL (`libmkl_rt`) where the loader finds it, else the system's
//! OpenBLAS (`libopenblas.so.0`, as Debian's and Ubuntu's `libopenblas0` install it;
//! `libopenblas.dylib` on macOS); a path or name, that CBLAS library (for example pip's MKL,
//! `$VIRTUAL_ENV/lib/libmkl_rt.so.3`, which is not on the loader's path); `off`, none.

use std::ffi::{CString, c_void};
use std::sync::OnceLock;

use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

use super::host::HostF32;

type Sgemm = unsafe extern "C" fn(
    layout: i32,
    trans_a: i32,
    trans_b: i32,
    m: i32,
    n: i32,
    k: i32,
    alpha: f32,
    a: *const f32,
    lda: i32,
    b: *const f32,
    ldb: i32,
    beta: f32,
    c: *mut f32,
    ldc: i32,
);

const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

/// Where an unset `DISTILL_BLAS` looks, in order.
const DEFAULT_LIBRARIES: &[&str] =
    &["libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so", "libopenblas.so.0", "libopenblas.so", "libopenblas.dylib"];

/// A loaded CBLAS library.
pub struct Blas {
    /// The name it was opened by.
    pub library: String,
    sgemm: Sgemm,
}

/// The CBLAS library of this process, loaded on first use; `None` when there is none (or
/// `DISTILL_BLAS=off`).
pub fn blas() -> Option<&'static Blas> {
    static BLAS: OnceLock<Option<Blas>> = OnceLock::new();
    BLAS.get_or_init(load).as_ref()
}

fn load() -> Option<Blas> {
    let chosen = std::env::var("DISTILL_BLAS").ok().filter(|v| !v.is_empty());
    match chosen.as_deref() {
        Some("off" | "none" | "0") => None,
        Some(path) => {
            let loaded = open(path);
            if loaded.is_none() {
                // Asked for by name, so its absence is worth a line rather than a silent
                // fallback to the slower products.
                eprintln!("DISTILL_BLAS={path}: no CBLAS library with cblas_sgemm could be loaded; matrix products use flex's own");
            }
            loaded
        }
        None => DEFAULT_LIBRARIES.iter().find_map(|name| open(name)),
    }
}

#[cfg(unix)]
fn open(library: &str) -> Option<Blas> {
    let name = CString::new(library).ok()?;
    // SAFETY: dlopen and dlsym with valid C strings; the handle is never closed, so the
    // function pointer stays valid for the life of the process.
    unsafe {
        let handle = libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if handle.is_null() {
            return None;
        }
        // One thread per call: the products are split over rayon's threads here. A library's
        // own threads wait for work by spinning (OpenBLAS on `sched_yield`, MKL's OpenMP for
        // 200 ms), which took the cores from the element-wise work that runs between products
        // (measured with OpenBLAS: no faster step at all); MKL threaded inside each of rayon's
        // threads ran slower than OpenBLAS. MKL's layer must be chosen before its first call.
        // (MKL's returns the layer it had; a C caller may drop a return value.)
        let call_with = |symbol: &std::ffi::CStr, value: i32| {
            let function = libc::dlsym(handle, symbol.as_ptr());
            if !function.is_null() {
                std::mem::transmute::<*mut c_void, unsafe extern "C" fn(i32)>(function)(value);
            }
        };
        const MKL_THREADING_SEQUENTIAL: i32 = 1;
        call_with(c"MKL_Set_Threading_Layer", MKL_THREADING_SEQUENTIAL);
        call_with(c"openblas_set_num_threads", 1);
        let sgemm = libc::dlsym(handle, c"cblas_sgemm".as_ptr());
        if sgemm.is_null() {
            return None;
        }
        Some(Blas { library: library.to_string(), sgemm: std::mem::transmute::<*mut c_void, Sgemm>(sgemm) })
    }
}

#[cfg(not(unix))]
fn open(_library: &str) -> Option<Blas> {
    None
}

/// The output's buffer, shared by the threads that each write their own rows of it.
struct SendPtr(*mut f32);
// SAFETY: each thread writes a disjoint range of rows through it.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: callers stay within the buffer's capacity.
        unsafe { self.0.add(offset) }
    }
}

/// Products smaller than this many multiply-adds stay with flex: a library call's fixed costs
/// (packing the operands, splitting the rows over threads) are not worth it there.
const MIN_WORK: usize = 1 << 20;

/// `op(a) · op(b)` for f32 matrices on flex through the CBLAS library, where `op` transposes
/// when asked (`a` is `[k, m]` when `transpose_a`, else `[m, k]`; likewise `b`). `None` when the
/// tensors are not f32 on flex, the product is small, or there is no library: the caller then
/// takes the tensor path.
pub fn matmul(a: &Tensor<2>, transpose_a: bool, b: &Tensor<2>, transpose_b: bool) -> Option<Tensor<2>> {
    let blas = blas()?;
    let ([a0, a1], [b0, b1]) = (a.dims(), b.dims());
    let (m, k) = if transpose_a { (a1, a0) } else { (a0, a1) };
    let (k2, n) = if transpose_b { (b1, b0) } else { (b0, b1) };
    assert_eq!(k, k2, "matmul: inner dimensions differ ({:?} · {:?})", a.dims(), b.dims());
    if m * n * k < MIN_WORK || [a0, a1, b0, b1].iter().any(|&d| d > i32::MAX as usize) || a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        return None;
    }
    let (host_a, host_b) = (HostF32::of(a.clone())?, HostF32::of(b.clone())?);
    // Not zeroed first: with beta = 0 the library writes every element without reading any.
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    // Row blocks of the output, one per thread: each call packs all of op(b), which costs
    // little beside the product (at 1024 rows on two cores: OpenBLAS 300–340 GFLOP/s and MKL
    // 340–375, against ~170 on one).
    let block = m.div_ceil(rayon::current_num_threads()).max(64);
    let device = a.device();
    let (a, b) = (host_a.values(), host_b.values());
    let output = SendPtr(c.as_mut_ptr());
    (0..m.div_ceil(block)).into_par_iter().for_each(|i| {
        let (first, rows) = (i * block, block.min(m - i * block));
        let c = output.at(first * n);
        // Rows `first..` of op(a): rows of a, or its columns when transposed.
        let a = if transpose_a { &a[first..] } else { &a[first * a1..] };
        // SAFETY: `a` and `b` hold the row-major matrices the dimensions and leading
        // dimensions describe (from row or column `first` of op(a) on); `c` points at `rows` × n
        // values of the output's capacity that no other block writes.
        unsafe {
            (blas.sgemm)(
                ROW_MAJOR,
                if transpose_a { TRANS } else { NO_TRANS },
                if transpose_b { TRANS } else { NO_TRANS },
                rows as i32,
                n as i32,
                k as i32,
                1.0,
                a.as_ptr(),
                a1 as i32,
                b.as_ptr(),
                b1 as i32,
                0.0,
                c,
                n as i32,
            );
        }
    });
    // SAFETY: the blocks above wrote all m × n values.
    unsafe { c.set_len(m * n) };
    Some(Tensor::from_data(TensorData::new(c, [m, n]), (&device, DType::F32)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// A library named in `DISTILL_BLAS` must load (CI names OpenBLAS, so the products below go
    /// through it there); unnamed, whichever is found.
    #[test]
    fn a_library_named_in_distill_blas_is_loaded() {
        match std::env::var("DISTILL_BLAS").ok().filter(|v| !v.is_empty()).as_deref() {
            None | Some("off" | "none" | "0") => {}
            Some(named) => assert!(blas().is_some(), "DISTILL_BLAS={named} did not load"),
        }
    }

    /// Every transposition, with dimensions that are not multiples of the libraries' tiles, and
    /// more output rows than one thread's block: the library's product equals flex's.
    #[test]
    fn the_library_product_equals_the_tensor_product() {
        let Some(blas) = blas() else {
            eprintln!("no CBLAS library loaded: nothing to compare");
            return;
        };
        eprintln!("comparing {} with flex", blas.library);
        let device = crate::device::parse("flex").expect("flex");
        let (m, k, n) = (301, 517, 263);
        for (transpose_a, transpose_b) in [(false, false), (false, true), (true, false), (true, true)] {
            let a = Tensor::<2>::random(if transpose_a { [k, m] } else { [m, k] }, Distribution::Normal(0.0, 1.0), &device);
            let b = Tensor::<2>::random(if transpose_b { [n, k] } else { [k, n] }, Distribution::Normal(0.0, 1.0), &device);
            let c = matmul(&a, transpose_a, &b, transpose_b).expect("an f32 product on flex above the size threshold");
            let a = if transpose_a { a.transpose() } else { a };
            let b = if transpose_b { b.transpose() } else { b };
            let expected = a.matmul(b);
            assert_eq!(c.dims(), [m, n]);
            let error = (c - expected.clone()).abs().max().into_scalar::<f32>();
            let scale = expected.abs().max().into_scalar::<f32>();
            assert!(error <= 1e-5 * scale, "transpose {transpose_a}/{transpose_b}: max error {error} of {scale}");
        }
    }

    #[test]
    fn small_or_non_f32_products_are_left_to_flex() {
        let device = crate::device::parse("flex").expect("flex");
        let small = Tensor::<2>::ones([8, 8], &device);
        assert!(matmul(&small, false, &small, false).is_none());
        let half = Tensor::<2>::ones([256, 256], (&device, DType::BF16));
        assert!(matmul(&half, false, &half, false).is_none());
    }
}
