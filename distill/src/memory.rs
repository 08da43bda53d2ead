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
