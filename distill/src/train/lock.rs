//! An exclusive lock on a run folder while a process trains in it: a second `distill train` on
//! the same `--out` is refused instead of interleaving checkpoints.

use std::fs;
use std::path::Path;

/// Held for as long as the run trains; the lock goes with the file when it is dropped or the
/// process ends, however it ends.
pub struct RunLock {
    _file: fs::File,
}

impl RunLock {
    /// Locks `path` (created if need be); `None` when another process holds it.
    pub fn acquire(path: &Path) -> std::io::Result<Option<Self>> {
        let file = fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
        Ok(lock_exclusive(&file).then_some(RunLock { _file: file }))
    }
}

#[cfg(unix)]
fn lock_exclusive(file: &fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this process owns; released when the file is closed.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

#[cfg(not(unix))]
fn lock_exclusive(_file: &fs::File) -> bool {
    true
}
