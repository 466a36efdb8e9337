//! The one place that names concurrency primitives: std's, or loom's under `--cfg aio_loom`.
//!
//! Every atomic, fence, shared pointer, lock and thread-local that the loop's cross-thread
//! protocols use comes from here, so that the loom models in `tests/loom_*.rs` check the real
//! code rather than a copy of it. Single-threaded state (`Cell`, `RefCell`, `Rc`) is not
//! re-exported: loom has nothing to check there.

#[cfg(not(aio_loom))]
mod imp {
    pub(crate) use std::sync::Arc;
    pub(crate) use std::sync::atomic::{
        AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering, fence,
    };
    pub(crate) use std::thread_local;

    /// An `UnsafeCell` with loom's closure-based accessor, so that call sites read the same
    /// whether or not loom is tracking the accesses.
    #[derive(Debug)]
    pub(crate) struct UnsafeCell<T: ?Sized>(std::cell::UnsafeCell<T>);

    impl<T> UnsafeCell<T> {
        pub(crate) const fn new(value: T) -> Self {
            Self(std::cell::UnsafeCell::new(value))
        }
    }

    impl<T: ?Sized> UnsafeCell<T> {
        /// Runs `f` with a raw pointer for writing.
        pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
            f(self.0.get())
        }
    }
}

#[cfg(aio_loom)]
mod imp {
    pub(crate) use loom::cell::UnsafeCell;
    pub(crate) use loom::sync::Arc;
    pub(crate) use loom::sync::atomic::{
        AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering, fence,
    };
    pub(crate) use loom::thread_local;
}

pub(crate) use imp::*;

/// An address that identifies the calling thread among live threads: that of a thread-local.
/// Used to recognise a context's home thread without a system call.
pub(crate) fn thread_marker() -> usize {
    #[cfg(not(aio_loom))]
    std::thread_local! {
        static MARKER: u8 = const { 0 };
    }
    #[cfg(aio_loom)]
    loom::thread_local! {
        static MARKER: u8 = 0;
    }
    MARKER.with(|m| std::ptr::from_ref(m) as usize)
}

/// Orders the home thread's own memory accesses as a signal handler on that thread sees them
/// (a signal fence); nothing to model under loom.
pub(crate) fn signal_fence() {
    #[cfg(not(aio_loom))]
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
}

/// Wraps `f` as the `timers` crate's notify callback (a std `Arc`, whatever `Arc` is here: the
/// timers crate's `Notify` is a std `Arc` in both builds).
pub(crate) fn timer_notify(f: impl Fn() + Send + Sync + 'static) -> timers::Notify {
    std::sync::Arc::new(f)
}
