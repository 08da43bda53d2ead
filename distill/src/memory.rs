//! Peak memory, for the training log and `distill bench train`.

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
pub fn reset_host_peak() -> bool {
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
