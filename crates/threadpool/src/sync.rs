//! The one place that names the pool's concurrency primitives: std's and `parking_lot`'s, or
//! loom's under `--cfg aio_loom`.
//!
//! What loom checks here is the request state machine (`request.rs`): its mutex and every atomic
//! switch to loom's, and `tests/loom_request.rs` runs the real `Req` under it. The pool lock and
//! the workers' condition variables stay `parking_lot`'s in both builds ([`PoolMutex`],
//! [`Condvar`]): the pool's scheduling (OS worker threads, idle timeouts, thread creation from a
//! bottom half) is not modelled, and under `aio_loom` only the loom models run. Reference counts
//! are std's `Arc` in both builds: loom's cannot be coerced to `Arc<dyn Job>`.

#[cfg(not(aio_loom))]
mod imp {
    pub(crate) use parking_lot::Mutex;
    pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
}

#[cfg(aio_loom)]
mod imp {
    pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

    /// loom's mutex with `parking_lot`'s signature: `lock` returns the guard (a poisoned lock is
    /// taken as it is: a panic under it is already a failed model).
    #[derive(Debug)]
    pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Self(loom::sync::Mutex::new(value))
        }

        pub(crate) fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        }
    }
}

pub(crate) use imp::*;

/// std's in both builds (see the module docs).
pub(crate) use std::sync::Arc;

/// The pool lock (not modelled; see the module docs).
pub(crate) use parking_lot::Mutex as PoolMutex;
pub(crate) use parking_lot::{Condvar, MutexGuard};

/// A counter in a `static` that hands out unique ids. It orders nothing, and loom's atomics
/// cannot initialise a `static`, so it is std's in both builds.
pub(crate) type IdCounter = std::sync::atomic::AtomicU64;
