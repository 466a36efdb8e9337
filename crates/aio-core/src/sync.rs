//! The one place that names concurrency primitives: std's, or loom's under `--cfg aio_loom`.
//!
//! Every atomic, fence, shared pointer, lock and thread-local that the loop's cross-thread
//! protocols use comes from here, so that the loom models in `tests/loom_*.rs` check the real
//! code rather than a copy of it. Single-threaded state (`Cell`, `RefCell`, `Rc`) is not
//! re-exported: loom has nothing to check there.

#[cfg(not(aio_loom))]
mod imp {
    pub(crate) use std::sync::atomic::{
        AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering, fence,
    };
    pub(crate) use std::sync::{Arc, Condvar, Mutex, MutexGuard};
    pub(crate) use std::thread_local;

    /// An `UnsafeCell` with loom's closure-based accessor, so that call sites read the same
    /// whether or not loom is tracking the accesses.
    #[derive(Debug)]
    pub(crate) struct UnsafeCell<T: ?Sized>(std::cell::UnsafeCell<T>);

    impl<T> UnsafeCell<T> {
        pub(crate) const fn new(value: T) -> Self {
            Self(std::cell::UnsafeCell::new(value))
        }

        /// The value, taking the cell apart.
        pub(crate) fn into_inner(self) -> T {
            self.0.into_inner()
        }
    }

    impl<T: ?Sized> UnsafeCell<T> {
        /// Runs `f` with a raw pointer for reading.
        pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
            f(self.0.get())
        }

        /// Runs `f` with a raw pointer for writing.
        pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
            f(self.0.get())
        }
    }
}

#[cfg(aio_loom)]
mod imp {
    pub(crate) use loom::cell::UnsafeCell;
    pub(crate) use loom::sync::atomic::{
        AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering, fence,
    };
    pub(crate) use loom::sync::{Arc, Condvar, Mutex, MutexGuard};
    pub(crate) use loom::thread_local;
}

pub(crate) use imp::*;

/// std's `Arc` even under loom, where one must be std's: a `Waker` is made from a std `Arc`
/// (`Wake`). What such an `Arc` holds uses this module's primitives.
pub(crate) use std::sync::Arc as StdArc;

/// std's lock and atomics even under loom, for process-wide statics (loom's have no `const`
/// constructor) that no model explores: the registry of `wait_kick`, and a loom model's switch
/// to a deliberately broken gate (`remote::Gate`).
pub(crate) mod global {
    #[cfg(aio_loom)]
    pub(crate) use std::sync::atomic::AtomicBool;
    pub(crate) use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    pub(crate) use std::sync::{Mutex, MutexGuard, PoisonError};
}

/// Locks `mutex`, ignoring poisoning: the loop's locks guard plain data whose every update is
/// complete before anything that can panic runs, so a poisoned lock holds a consistent value.
pub(crate) fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Waits on `condvar`, ignoring poisoning for the reason given at [`lock`]. May return
/// spuriously, as `Condvar::wait` may: callers re-check their condition.
pub(crate) fn wait<'a, T>(condvar: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    condvar
        .wait(guard)
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Waits on `condvar` for at most `timeout` (spuriously too, as [`wait`]). Under loom, which
/// does not model time, a plain wait: the models have no waiter that needs the timeout.
pub(crate) fn wait_timeout<'a, T>(
    condvar: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: std::time::Duration,
) -> MutexGuard<'a, T> {
    #[cfg(not(aio_loom))]
    return condvar
        .wait_timeout(guard, timeout)
        .map_or_else(|e| e.into_inner().0, |(g, _)| g);
    #[cfg(aio_loom)]
    {
        let _ = timeout;
        wait(condvar, guard)
    }
}

/// std's `AtomicU64` even under loom: for a setting that no cross-thread protocol depends on
/// (the polling parameters, whose stale value used once is harmless), so that reading it once
/// per iteration adds nothing for the models to explore.
pub(crate) type SettingU64 = std::sync::atomic::AtomicU64;

/// std's `AtomicBool` even under loom, for a flag that no cross-thread protocol depends on (a
/// backend's "my fd was lent", set and read on the thread that drives the backend; atomic only
/// so that the backend stays `Sync`).
pub(crate) type SettingBool = std::sync::atomic::AtomicBool;

/// Which thread is a context's home thread right now: [`thread_id`] of that thread, or 0 for
/// none. An ordinary context's home never changes; a [`SharedContext`](crate::SharedContext)'s
/// is the thread holding its lock, stored by `acquire` before the holder uses the context and
/// reset to 0 by the outermost release before it unlocks ([SHARED-1]).
///
/// The only question ever asked is "is it me?", and Relaxed answers it by coherence alone: a
/// thread reads its own id only if it stored it (ids are never reused) and has not overwritten
/// it since, because a thread never reads a value older than its own last store to the same
/// location (read-write coherence). So the holder reads its id from its acquire to its release,
/// and every other thread reads something else (a stale id of a former holder, a newer one,
/// or 0), all meaning "not me". What the holder's accesses to the loop need ordering with is
/// ordered by the lock's own release and acquire, not by this word. std's atomic even under
/// loom: no model needs to explore it.
pub(crate) struct HomeThread(std::sync::atomic::AtomicU64);

impl HomeThread {
    pub(crate) fn new(id: u64) -> Self {
        HomeThread(std::sync::atomic::AtomicU64::new(id))
    }

    /// Whether the calling thread is the home thread (see the type's docs for why Relaxed).
    /// Async-signal-safe, as [`thread_id`] is.
    #[inline]
    pub(crate) fn is_current(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed) == thread_id()
    }

    /// Makes `id` the home thread (0: none). Only the lock holder of a shared context calls it.
    pub(crate) fn set(&self, id: u64) {
        self.0.store(id, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A number that identifies the calling thread and is never given to another thread, not even
/// after this one exits (an address, such as a thread-local's, can be reused by a later
/// thread). Used to recognise a context's home thread without a system call: after the first
/// call on a thread, one thread-local load. Async-signal-safe: a thread-local `Cell` with a
/// `const` initializer and no destructor, and one atomic add.
#[inline]
pub(crate) fn thread_id() -> u64 {
    // Not modelled by loom (an id allocator, not a protocol): std's atomic even under loom,
    // so that ids stay unique across the model's iterations.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    #[cfg(not(aio_loom))]
    std::thread_local! {
        static ID: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    #[cfg(aio_loom)]
    loom::thread_local! {
        static ID: std::cell::Cell<u64> = std::cell::Cell::new(0);
    }
    ID.with(|id| match id.get() {
        0 => {
            // Relaxed: uniqueness needs only the atomicity of the add.
            let new = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            id.set(new);
            new
        }
        known => known,
    })
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

#[cfg(all(test, not(aio_loom)))]
mod tests {
    #[test]
    fn thread_ids_are_never_reused() {
        let mine = super::thread_id();
        assert_eq!(super::thread_id(), mine, "stable on one thread");
        let mut seen = vec![mine];
        // Threads that run one after another typically get the same thread-local addresses:
        // the old address-based marker gave them equal markers.
        for _ in 0..8 {
            let id = std::thread::spawn(super::thread_id).join().unwrap();
            assert!(!seen.contains(&id), "id {id} given twice");
            seen.push(id);
        }
    }
}
