//! Running a context inside a tokio runtime (feature `tokio`): [`drive`], the future that
//! drives a context from a tokio task through its outer-loop hooks (QEMU's GSource
//! prepare / check / dispatch), and the pattern for calling into tokio from aio callbacks.
//!
//! # Driving a context from tokio
//!
//! [`drive`] returns a future that never completes unless an fd operation fails. Poll it on a
//! `current_thread` runtime or in a [`LocalSet`](::tokio::task::LocalSet) (`spawn_local`): it
//! is not `Send`, as the context is not. Each turn of its loop calls
//! [`AioContext::prepare`], watches the context's outer fds, sleeps for at most the timeout
//! `prepare` gave, then calls [`AioContext::check`] and [`AioContext::dispatch`]. So aio's BHs,
//! fd handlers, timers and tasks run on the tokio thread, between tokio's own tasks, and a
//! [`ContextHandle::schedule_oneshot`](crate::ContextHandle::schedule_oneshot) from another
//! thread wakes the runtime while it sleeps.
//!
//! * **Fds.** The outer fds (the epoll fd or ring fd, or each watched fd on the poll backend)
//!   sit in a private epoll, registered once with tokio as an
//!   [`AsyncFd`]; when the set changes (a handler added on the
//!   poll backend, a move from poll to epoll) the private epoll is rebuilt, so tokio never
//!   unregisters a number that a callback may have closed. Linux only (epoll).
//! * **Level-triggered handlers.** tokio's readiness is edge-triggered; the driver clears it
//!   just before each `check` (which looks at the fds level-triggered) and, after an iteration
//!   that found work, runs one more without sleeping, so a handler that leaves data unread is
//!   called again, as under aio's own loop.
//! * **Timers.** `prepare`'s timeout bounds the sleep with [`tokio::time::timeout`], whose
//!   resolution is 1 ms: an aio timer fires up to 1 ms late (never early) under tokio, where
//!   aio's own loop keeps nanoseconds. Use aio's own loop, or the calloop adapter (a timerfd),
//!   when that matters.
//! * **Idle.** With nothing scheduled and no fd ready the driver waits on the one fd and no
//!   timer: zero wake-ups per second.
//! * **Fairness.** An iteration that does not sleep yields to tokio first
//!   ([`yield_now`](::tokio::task::yield_now)), so a BH that keeps rescheduling itself does not
//!   starve tokio's tasks.
//! * **Nesting.** A callback may poll the context directly ([`AioContext::poll`],
//!   [`AioContext::block_on`]), as in QEMU; it must not wait there for tokio work on the same
//!   thread, which cannot run until the callback returns.
//! * **Detaching.** Dropping the future (or aborting its task) detaches the context: no
//!   callback runs from it afterwards, and the context can be driven by aio's own loop or
//!   another driver. A detach while the driver sleeps closes the outer loop's window with a
//!   `check` whose findings are left to the next loop, so notifies stop writing the eventfd.
//!   The future owns a clone of the context, so the context lives as long as either the future
//!   or another clone does.
//! * **Panics.** A panic in an aio callback unwinds out of the driver future into the tokio
//!   task that polls it, which ends (tokio catches the panic): the context is no longer
//!   driven, and none of its callbacks runs, until something drives it again. Nothing else
//!   says so: await the driver task's `JoinHandle` (a `JoinError` whose
//!   [`into_panic`](::tokio::task::JoinError::into_panic) gives the payload) to notice.
//!   (The glib source catches the panic itself; under calloop it unwinds out of `dispatch`
//!   to its caller.)
//!
//! # Calling tokio from aio callbacks
//!
//! When the context is driven by [`drive`], its callbacks run inside the runtime:
//! `tokio::spawn`/`spawn_local` and [`Handle::current`](::tokio::runtime::Handle::current)
//! work from a BH or handler, and an aio task can `.await` tokio futures (sockets, timers)
//! directly, since their wake-ups reach the context through its own notifier.
//!
//! When the context runs its own loop on its own thread and tokio runs elsewhere, keep a
//! [`Handle`](::tokio::runtime::Handle) and use [`spawn_on`]: the work runs on tokio, and the
//! returned future can be awaited by an aio task, or waited for from any callback with
//! [`AioContext::block_on`] (which keeps the context running meanwhile).
//!
//! ```
//! use std::time::Duration;
//! # fn main() -> std::io::Result<()> {
//! let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! let ctx = aio::Builder::new().build()?;
//! let local = tokio::task::LocalSet::new();
//! local.block_on(&rt, async {
//!     let driver = tokio::task::spawn_local(aio::tokio::drive(ctx.clone()));
//!     // An aio timer and an aio task awaiting a tokio timer, on tokio's thread.
//!     let (tx, rx) = tokio::sync::oneshot::channel();
//!     let task = ctx.spawn_local(async move {
//!         tokio::time::sleep(Duration::from_millis(5)).await;
//!         tx.send(42).unwrap();
//!     });
//!     assert_eq!(rx.await.unwrap(), 42);
//!     assert!(task.is_finished());
//!     driver.abort(); // detach
//! });
//! # Ok(()) }
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::time::Duration;

use ::tokio::io::Interest as TokioInterest;
use ::tokio::io::unix::AsyncFd;

use crate::AioContext;
use crate::embed::OuterSet;

/// Drives `ctx` from the tokio task that polls the returned future, until the future is
/// dropped (see the [module documentation](self)). It must be polled inside a tokio runtime
/// with I/O and time enabled (`enable_all`), on the context's home thread.
///
/// # Errors
///
/// The future resolves only on an error: creating or updating the private epoll, or
/// registering it with tokio (for example outside a runtime with I/O enabled).
pub async fn drive(ctx: AioContext) -> io::Result<Infallible> {
    let mut attached = Attached {
        ctx,
        prepared: false,
    };
    let set = OuterSet::new(false)?;
    // `as_raw_fd` of an `OuterSet` is its epoll A, which it owns, never replaces and closes
    // only when dropped, so the fd stays open and the same for the `AsyncFd`'s whole life.
    // SAFETY: [OUTER-FD]: the set's epoll A stays open and the same for the `AsyncFd`'s life.
    let fd = unsafe { AsyncFd::register_with_interest(set, TokioInterest::READABLE)? };
    // After an iteration that found work, look again without sleeping: tokio reports
    // edges, and a handler may have left its fd ready.
    let mut again = false;
    loop {
        let ctx = &attached.ctx;
        let timeout = ctx.prepare();
        attached.prepared = true;
        // Epoll A, the fd tokio watches, stays; only what is behind it changes.
        fd.get_ref().sync(ctx)?;
        let sleep = !again && timeout != Some(Duration::ZERO);
        if sleep {
            let ready = fd.readable();
            let guard = match timeout {
                None => Some(ready.await?),
                Some(t) => match ::tokio::time::timeout(t, ready).await {
                    Ok(guard) => Some(guard?),
                    Err(_elapsed) => None,
                },
            };
            // Cleared before `check`, whose look is level-triggered: readiness that
            // arrives from here on is a new edge, which tokio keeps for the next wait.
            if let Some(mut guard) = guard {
                guard.clear_ready();
            }
        } else {
            ::tokio::task::yield_now().await;
        }
        attached.prepared = false;
        again = ctx.check();
        if again {
            ctx.dispatch();
        }
    }
}

/// The driver's context, and whether a `prepare` awaits its `check`. Dropped with the driver:
/// a detach between the two ends the outer loop's window with a `check` (whose findings are
/// dropped, not dispatched), so that bit 0 of `notify_me` does not stay set and make every later
/// notify write the eventfd for nobody.
struct Attached {
    ctx: AioContext,
    prepared: bool,
}

impl Drop for Attached {
    fn drop(&mut self) {
        // Not while unwinding from a callback's panic: the context is left as the panic left
        // it, and a second panic here would abort.
        if self.prepared && !std::thread::panicking() {
            // No callback runs here: `check` only looks. What it found (ready fds, a due timer,
            // scheduled BHs) is found again by whichever loop drives the context next.
            self.ctx.check();
        }
    }
}

/// Runs `future` on the tokio runtime behind `handle` and returns a future of its output, for
/// an aio task to await or a callback to wait for with [`AioContext::block_on`]: the bridge
/// from a context running its own loop to tokio's ecosystem on another thread.
///
/// # Errors
///
/// The returned future gives tokio's `JoinError` if the tokio task panicked or the runtime
/// shut down first.
pub fn spawn_on<F>(
    handle: &::tokio::runtime::Handle,
    future: F,
) -> ::tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    handle.spawn(future)
}
