//! What the adapter tests (`embed_tokio.rs`, `embed_calloop.rs`, `embed_glib.rs`) share:
//! serialization (their fd-leak checks count the process's open fds), a context on each backend
//! the kernel accepts, and the open-fd count.

use aio::{AioContext, Backend};
use std::sync::{Mutex, MutexGuard};

/// Serializes the tests: the fd-leak checks count the process's open fds.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A context on each backend that builds here (the others are skipped with the reason).
pub fn backends() -> Vec<(Backend, AioContext)> {
    let mut out = Vec::new();
    for b in [Backend::Poll, Backend::Epoll, Backend::IoUring] {
        match aio::Builder::new().backend(b).build() {
            Ok(ctx) => out.push((b, ctx)),
            Err(e) => println!("skipping {b:?}: {e}"),
        }
    }
    out
}

/// How many fds the process has open.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}
