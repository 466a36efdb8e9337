//! QEMU's `AioContext` event loop, in Rust: the context, bottom halves, level-triggered fd
//! handlers and event notifiers, the `notify_me`/`notified` wake-up protocol, and the
//! [`FdMonitor`] contract that the poll, epoll and io_uring backends implement.
//!
//! Applications normally depend on the `aio` facade, which picks a backend; this crate is what
//! the backends and the facade build on. Behaviour follows QEMU's `util/async.c` and
//! `util/aio-posix.c` (see `ARCHITECTURE.md` for the QEMU ↔ Rust name table).
//!
//! # One iteration of [`AioContext::poll`]
//!
//! 1. Compute the timeout: zero if a bottom half is scheduled, at most 10 ms if only idle BHs
//!    are, otherwise unlimited (or the next timer). A non-blocking iteration uses zero.
//! 2. With adaptive polling enabled ([`AioContext::set_poll_params`]), an outermost iteration
//!    with a non-zero timeout first busy-polls: it calls the poll functions of its poll set
//!    (and reads its own notify flag) for up to the polling window, stopping at the first work
//!    found (the timeout becomes zero) or when the monitor's `must_wait` says so.
//! 3. For a blocking wait, raise `notify_me`, full fence, and re-check `notified`: a notify that
//!    raced with step 1 turns the timeout into zero. If the wait may still sleep, leave polling
//!    mode (`on_poll_end`, then one more poll).
//! 4. Ask the [`FdMonitor`] to wait, unless the timeout is zero, polling covered every user
//!    handler (none of them is left to the backend alone), and the monitor says there is
//!    nothing it must look at (then the iteration makes no system call).
//! 5. Lower `notify_me`, and *accept* the notification (clear `notified`) before dispatching
//!    anything, so that no wake-up is lost.
//! 6. Run bottom halves (draining outer nested passes first), then the fd handlers the monitor
//!    reported, then the poll-ready callbacks of what polling found, re-checking before each
//!    callback that the handler was not removed meanwhile; adapt the polling windows from the
//!    time this iteration blocked; run expired timers.
//! 7. Return whether a user callback ran ("progress"); the context's own wake-ups never count.
//!
//! Any callback may poll the context again (a nested iteration); only the home thread can, as
//! [`AioContext`] is `!Send`.
//!
//! # Example
//!
//! ```
//! use aio_core::AioContext;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::sync::Arc;
//!
//! let ctx = AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
//! let hits = Arc::new(AtomicU32::new(0));
//! let h = hits.clone();
//! let bh = ctx.bh(move || { h.fetch_add(1, Ordering::Relaxed); });
//!
//! // Another thread schedules the BH; the loop sleeps until it arrives.
//! let remote = ctx.handle();
//! std::thread::spawn(move || remote.schedule_oneshot(|| ()));
//! bh.schedule();
//! assert!(ctx.poll());
//! assert_eq!(hits.load(Ordering::Relaxed), 1);
//! # Ok::<(), std::io::Error>(())
//! ```

#![deny(missing_docs)]
#![doc(test(attr(deny(warnings))))]

mod bh;
mod context;
mod event_notifier;
#[cfg(aio_loom)]
#[doc(hidden)]
pub mod fake;
mod fdmon;
mod handler;
mod polling;
mod remote;
mod rfifolock;
mod scope;
mod shared;
mod sync;
mod sys;
pub mod task;

pub use bh::{BottomHalf, RunningBh};
#[cfg(aio_loom)]
#[doc(hidden)]
pub use context::LoomVariant;
pub use context::{
    AioContext, CompletionSource, ContextHandle, MAX_BATCH_LIMIT, NotDisabledError, PolledHandler,
    Stats,
};
pub use event_notifier::EventNotifier;
pub use fdmon::registrations;
pub use fdmon::{Change, FdMonitor, HandlerKey, Interest, OuterFd, Readiness, ReadyList};
pub use handler::{FdHandler, HandlerBuilder, RemoteFdHandler, RemoteHandlerBuilder};
pub use polling::{DEFAULT_WEIGHT, MAX_POLL_NS, MAX_WEIGHT, PollParams, PollPolicy};
pub use remote::ContextGone;
pub use rfifolock::{RFifoLock, RFifoLockGuard};
pub use scope::{Scope, ScopeId, ScopeView};
pub use shared::{Acquired, SharedContext, SharedFdHandler, SharedHandle, SharedHandlerBuilder};
pub use sys::set_timer_slack;
pub use task::{JoinError, JoinHandle};
pub use timers::{
    ClockType, Clocks, GroupBuilder, GroupHandle, Scale, Timer, TimerAttrs, TimerListGroup,
    TimerRef, VirtualClock, host_ns, realtime_ns,
};
