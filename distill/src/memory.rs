//! Peak memory, for the training log and `distill bench train`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use burn::tensor::Device;

/// What training has needed so far, in bytes: on a GPU backend, what the device's allocator
/// holds (its pools keep freed pages, so this is its high-water mark); on the CPU, the
/// process's peak resident set (Linux `VmHWM`). `None` where neither is known.
pub fn peak_bytes(device: &Device) -> Option<u64> {
    match device.clone().inner().memory_pool_usage() {
        Some(usage) if usage.bytes_reserved > 0 => Some(usage.bytes_reserved),
        _ => host_peak_bytes(),
    }
}

/// What the device's allocator holds now, where the backend reports it (the CubeCL backends:
/// CUDA, ROCm, wgpu); `None` on flex, whose tensors are host memory.
pub fn device_reserved_bytes(device: &Device) -> Option<u64> {
    device.clone().inner().memory_pool_usage().map(|usage| usage.bytes_reserved)
}

/// Hands free memory back: the device allocator's free pages (a GPU's pools keep them, so its
/// reservation is a high-water mark) and the heap's ([`release_free_memory`]). A measurement
/// after a larger one, or after a model built in f32 and then stored smaller, starts clean.
pub fn release_device_memory(device: &Device) {
    device.clone().inner().memory_cleanup();
    release_free_memory();
}

/// The memory the device has for the plan check: what was given, else on the CPU the memory
/// the system has available plus what this process already holds.
pub fn device_memory(spec_memory: Option<u64>, device_name: &str) -> Option<u64> {
    if spec_memory.is_some() {
        return spec_memory;
    }
    if device_name != "flex" {
        return None;
    }
    host_memory()
}

/// The host memory this process may use: what the system has available plus what the process
/// already holds (Linux `MemAvailable`).
pub fn host_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let available = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024;
    let resident = current_bytes().unwrap_or(0);
    Some(available + resident)
}

/// The process's peak resident set size (`VmHWM` of `/proc/self/status`).
pub fn host_peak_bytes() -> Option<u64> {
    status_bytes("VmHWM:")
}

/// The process's resident set size now (`VmRSS`).
pub fn current_bytes() -> Option<u64> {
    status_bytes("VmRSS:")
}

fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Starts a new peak: the kernel resets `VmHWM` to the current resident size (Linux 4.0+).
/// Returns whether it could.
fn reset_host_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Hands the heap's free pages back to the kernel (glibc's `malloc_trim`), so that the
/// resident size is what is in use: a measurement after a larger one then starts clean.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// burn's CPU backend allocates and frees activation-sized buffers every step. glibc hands
/// each large one back to the kernel and page-faults it in again: most of a training step on
/// flex was system time. Keeping freed memory in the heap instead makes the peak resident
/// size the working set (plus the heap's fragmentation, which the memory plan counts in its
/// workspace). Call it before any thread starts; the test of the plan measures under it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator tunables.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn keep_freed_memory() {}

/// The global allocator of the `distill` binary: the system allocator, counting the bytes it
/// has handed out and not got back. Its peak is what the process held at once, as PyTorch's
/// `max_memory_allocated` is for a GPU: unlike the resident size it leaves out what glibc keeps
/// in its heaps and per-thread arenas after a free, which varies from run to run with how the
/// threads were scheduled.
pub struct CountingAllocator;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);
static PEAK_ALLOCATED: AtomicUsize = AtomicUsize::new(0);
static COUNTING: AtomicBool = AtomicBool::new(false);

fn allocated(bytes: usize) {
    let now = ALLOCATED.fetch_add(bytes, Ordering::Relaxed) + bytes;
    if now > PEAK_ALLOCATED.load(Ordering::Relaxed) {
        PEAK_ALLOCATED.fetch_max(now, Ordering::Relaxed);
    }
}

// SAFETY: every call goes to the system allocator unchanged; the counters only observe it.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        COUNTING.store(true, Ordering::Relaxed);
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            allocated(layout.size());
        }
        pointer
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let pointer = unsafe { System.alloc_zeroed(layout) };
        if !pointer.is_null() {
            allocated(layout.size());
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        unsafe { System.dealloc(pointer, layout) };
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let moved = unsafe { System.realloc(pointer, layout, new_size) };
        if !moved.is_null() {
            ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
            allocated(new_size);
        }
        moved
    }
}

/// Heap bytes held now, where [`CountingAllocator`] is the global allocator.
pub fn allocated_bytes() -> Option<u64> {
    COUNTING.load(Ordering::Relaxed).then(|| ALLOCATED.load(Ordering::Relaxed) as u64)
}

/// The most heap bytes held at once since the start or [`reset_peaks`].
pub fn peak_allocated_bytes() -> Option<u64> {
    COUNTING.load(Ordering::Relaxed).then(|| PEAK_ALLOCATED.load(Ordering::Relaxed) as u64)
}

/// Starts new peaks from what is held now: the resident one ([`host_peak_bytes`], where the
/// kernel allows) and the heap's ([`peak_allocated_bytes`]).
pub fn reset_peaks() {
    reset_host_peak();
    PEAK_ALLOCATED.store(ALLOCATED.load(Ordering::Relaxed), Ordering::Relaxed);
}
