//! Folders written under a temporary name and renamed into place when complete (checkpoints,
//! exports, the token cache), so that a crash or a kill never leaves a half-written one under
//! the final name.

use std::fs;
use std::path::{Path, PathBuf};

/// The staging folder of this process for `prefix` in `parent`: `PREFIX` + process id. Folders
/// of the same prefix left by processes that no longer run (killed half-way: nothing else would
/// ever reuse their names) are removed first.
pub fn folder(parent: &Path, prefix: &str) -> PathBuf {
    if let Ok(entries) = fs::read_dir(parent) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(prefix)).and_then(|p| p.parse::<u32>().ok()) else { continue };
            if pid != std::process::id() && !process_runs(pid) {
                // Best effort: a folder that cannot be removed is only disk space.
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    parent.join(format!("{prefix}{}", std::process::id()))
}

/// Runs `write` into `staging`, and removes `staging` if it fails: the error is what is
/// reported, and half of a folder is of no use to anyone.
pub fn or_remove<T, E>(staging: &Path, write: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    let result = write();
    if result.is_err() {
        let _ = fs::remove_dir_all(staging);
    }
    result
}

#[cfg(target_os = "linux")]
fn process_runs(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Without /proc, a folder is never taken for abandoned.
#[cfg(not(target_os = "linux"))]
fn process_runs(_pid: u32) -> bool {
    true
}
