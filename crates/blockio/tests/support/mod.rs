//! What the block I/O test files share: unlinked temporary files, an io_uring context where
//! the kernel allows one, and byte patterns to check data against.

#![allow(dead_code)] // each test file uses its own part

use std::fs::{File, OpenOptions};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use aio_core::AioContext;
use fdmon_uring::UringMonitor;

/// A temporary file, already unlinked, open for reading and writing.
pub fn temp_file() -> Arc<File> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("blockio-test-{}-{n}", std::process::id()));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("temp file");
    std::fs::remove_file(&path).expect("unlink temp file");
    Arc::new(f)
}

/// An io_uring context, or `None` (with the reason printed) where io_uring does not work.
pub fn uring_ctx() -> Option<AioContext> {
    match UringMonitor::new_checked() {
        Ok(m) => Some(AioContext::new(Box::new(m)).expect("context")),
        Err(e) => {
            println!("skipped the io_uring engine: io_uring is unavailable here: {e}");
            None
        }
    }
}

/// A byte pattern that differs at every offset of a small range.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
