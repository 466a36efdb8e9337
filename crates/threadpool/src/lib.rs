//! QEMU's AioContext thread pool (`util/thread-pool.c`) in Rust: blocking work runs on worker
//! threads, and each completion runs on the thread of the [`AioContext`] the work came from,
//! as a bottom half.
//!
//! Each context has one [`ThreadPool`], created on first use by [`ThreadPool::of`]. Submit a
//! closure with [`submit`](ThreadPool::submit) and await the [`Request`] it returns (a
//! `Future` that only needs a waker), or with [`submit_with`](ThreadPool::submit_with) and a
//! callback that the context runs with the result. Other threads submit through a
//! [`PoolHandle`]; their completions still run on the context's thread.
//!
//! * **Threads.** Between a minimum and a maximum (0 and 64 by default), changeable at run time
//!   with [`set_limits`](ThreadPool::set_limits). Threads are created on demand, from the
//!   context's thread and one at a time, never on the submitter's path; idle threads above the
//!   minimum exit after 10 s. A fresh pool therefore runs nothing until its context polls;
//!   [`prestart`](ThreadPool::prestart) creates workers at once, from the calling thread, for
//!   code that submits and then blocks. A worker that runs out of requests watches the queue
//!   for 50 µs before it sleeps, yielding the CPU to any thread that wants it, so that requests
//!   sent one after the other pay no thread wake-up; the watch grows, up to 1 ms, while
//!   requests come back soon after a worker fell asleep
//!   ([`set_idle_spin`](ThreadPool::set_idle_spin)).
//! * **Completions.** Never before the context polls; exactly once per request; one at a time
//!   on the context's thread. A batch of completions costs one bottom-half schedule and at
//!   most one wake of a sleeping loop. A callback may poll the context (a nested loop) and wait
//!   there for another request.
//! * **Cancellation.** A queued request can be cancelled: it leaves the queue at once (a thread
//!   asked for it alone is not created), its work never runs, and it completes with
//!   [`Error::Cancelled`] through the normal completion path. A running request runs to
//!   the end and completes normally; [`Request::cancel_sync`] waits for that.
//! * **Panics.** A work closure that panics completes with [`Error::Panicked`]; the worker
//!   goes on.
//! * **Shutdown.** Dropping the pool (or its context) never waits for a worker and loses no
//!   completion silently: see [Shutdown](ThreadPool#shutdown).
//!
//! # Example
//!
//! ```
//! use std::cell::RefCell;
//! use std::rc::Rc;
//! use threadpool::{Error, ThreadPool};
//!
//! let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
//! let pool = ThreadPool::of(&ctx);
//!
//! // Blocking work with a completion callback, which runs on this thread.
//! let sizes = Rc::new(RefCell::new(Vec::new()));
//! for path in ["/", "/no/such/file"] {
//!     let s = sizes.clone();
//!     pool.submit_with(
//!         move || std::fs::metadata(path).map(|m| m.is_dir()).ok(),
//!         move |r: Result<Option<bool>, Error>| s.borrow_mut().push(r.unwrap()),
//!     );
//! }
//!
//! // A request awaited as a future; here polled by hand, usually by an executor.
//! let answer = pool.submit(|| 6 * 7);
//! let answer = loop {
//!     ctx.poll(); // sleeps until a completion arrives, then runs it
//!     if let Some(r) = answer.try_take() { break r; }
//! };
//! assert_eq!(answer, Ok(42));
//!
//! while sizes.borrow().len() < 2 {
//!     ctx.poll();
//! }
//! let mut sizes = sizes.borrow().clone();
//! sizes.sort();
//! assert_eq!(sizes, [None, Some(true)]);
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! # QEMU names
//!
//! | QEMU | here |
//! |---|---|
//! | `aio_get_thread_pool(ctx)` | [`ThreadPool::of`] |
//! | `thread_pool_new` / `thread_pool_free` | [`ThreadPool::new`] / drop |
//! | `thread_pool_submit_aio(func, arg, cb, opaque)` | [`ThreadPool::submit_with`] → [`Ticket`] |
//! | `thread_pool_submit_co(func, arg)` | [`ThreadPool::submit`] → [`Request`] (`.await`) |
//! | `thread_pool_submit(func, arg)` | [`ThreadPool::submit`], dropping the [`Request`] |
//! | `bdrv_aio_cancel_async(acb)` | [`Request::cancel`], [`Ticket::cancel`] |
//! | `bdrv_aio_cancel(acb)` (synchronous) | [`Request::cancel_sync`], [`Ticket::cancel_sync`] |
//! | `aio_context_set_thread_pool_params` / `thread_pool_update_params` | [`ThreadPool::set_limits`] |
//! | (none: QEMU creates every thread from the loop) | [`ThreadPool::prestart`] |
//! | `-ECANCELED` | [`Error::Cancelled`] |
//! | `THREAD_POOL_MAX_THREADS_DEFAULT` | [`DEFAULT_MAX_THREADS`] |
//!
//! [`AioContext`]: aio_core::AioContext

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![doc(test(attr(deny(warnings))))]

mod completion;
mod error;
#[cfg(aio_loom)]
#[doc(hidden)]
pub mod loom_api;
mod pool;
mod request;
mod sync;
mod worker;

pub use error::{Error, LimitsError};
pub use pool::{
    DEFAULT_IDLE_SPIN, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_THREADS, MAX_IDLE_SPIN, PoolHandle,
    PoolStats, ThreadPool,
};
#[cfg(aio_loom)]
#[doc(hidden)]
pub use request::LoomVariant;
pub use request::{Request, Status, Ticket};
