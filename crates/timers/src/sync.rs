//! The one place that names the timers' concurrency primitives: std's and `parking_lot`'s, or
//! loom's under `--cfg aio_loom`.
//!
//! Every atomic, lock, condition variable, thread-local and process-wide value of the timer
//! lists and the virtual clocks comes from here, so that `tests/loom_arm.rs` checks the real
//! code. Reference counts (`Arc`, `Weak`) are std's in both builds: loom's `Arc` has no `Weak`
//! and cannot be coerced to the `dyn Fn` of [`Notify`](crate::Notify). So is `OnceLock`, which
//! only ever holds plain values (the monotonic clock's epoch). A process-wide value
//! ([`process_global!`], behind `VirtualClock::global`) is one per loom execution under
//! `aio_loom`, since loom objects cannot outlive an execution.
//!
//! The locks keep `parking_lot`'s signatures (`lock` returns the guard); condition variables
//! take and return the guard by value, which both libraries can do.

#[cfg(not(aio_loom))]
mod imp {
    pub(crate) use parking_lot::{Mutex, MutexGuard};
    pub(crate) use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

    /// `parking_lot`'s condition variable, waiting with the guard by value.
    #[derive(Debug, Default)]
    pub(crate) struct Condvar(parking_lot::Condvar);

    impl Condvar {
        pub(crate) fn new() -> Self {
            Self(parking_lot::Condvar::new())
        }

        pub(crate) fn wait<'a, T>(&self, mut guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
            self.0.wait(&mut guard);
            guard
        }

        pub(crate) fn notify_all(&self) {
            self.0.notify_all();
        }
    }
}

#[cfg(aio_loom)]
mod imp {
    pub(crate) use loom::sync::MutexGuard;
    pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
    use std::sync::PoisonError;

    /// loom's mutex with `parking_lot`'s signature (a poisoned lock is taken as it is: a panic
    /// under it is already a failed model).
    #[derive(Debug)]
    pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Self(loom::sync::Mutex::new(value))
        }

        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(PoisonError::into_inner)
        }
    }

    /// loom's condition variable.
    #[derive(Debug, Default)]
    pub(crate) struct Condvar(loom::sync::Condvar);

    impl Condvar {
        pub(crate) fn new() -> Self {
            Self(loom::sync::Condvar::new())
        }

        pub(crate) fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
            self.0.wait(guard).unwrap_or_else(PoisonError::into_inner)
        }

        pub(crate) fn notify_all(&self) {
            self.0.notify_all();
        }
    }
}

pub(crate) use imp::*;
pub(crate) use std::sync::{Arc, OnceLock, Weak};

/// Declares `fn $name() -> $ty`, which returns a clone of one process-wide value, made by
/// `$init` on first use: in a std `OnceLock`, or under `aio_loom` in loom's `lazy_static!`,
/// which makes one per execution.
macro_rules! process_global {
    ($vis:vis fn $name:ident() -> $ty:ty = $init:expr) => {
        $vis fn $name() -> $ty {
            #[cfg(not(aio_loom))]
            {
                static GLOBAL: std::sync::OnceLock<$ty> = std::sync::OnceLock::new();
                GLOBAL.get_or_init(|| $init).clone()
            }
            #[cfg(aio_loom)]
            {
                loom::lazy_static! {
                    static ref GLOBAL: $ty = $init;
                }
                GLOBAL.clone()
            }
        }
    };
}
pub(crate) use process_global;

/// A small number naming the calling thread (0 is nobody), cheaper than `thread::current()`:
/// a thread-local, set on first use from a process-wide counter.
pub(crate) fn thread_token() -> u64 {
    use std::cell::Cell;
    // The counter only hands out unique values and orders nothing; loom's atomics cannot
    // initialise a `static`, so it is std's in both builds.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    #[cfg(not(aio_loom))]
    std::thread_local! {
        static TOKEN: Cell<u64> = const { Cell::new(0) };
    }
    // Loom runs its threads on one OS thread: each needs its own token.
    #[cfg(aio_loom)]
    loom::thread_local! {
        static TOKEN: Cell<u64> = Cell::new(0);
    }
    TOKEN.with(|t| {
        if t.get() == 0 {
            t.set(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        }
        t.get()
    })
}
