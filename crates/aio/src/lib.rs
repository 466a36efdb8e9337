//! aio: QEMU's `AioContext` event loop for Rust applications: bottom halves, level-triggered fd
//! handlers, event notifiers, nested polling and QEMU's wake-up protocol, on the backend the
//! cargo features and the machine allow.
//!
//! This facade is the crate applications depend on. It re-exports the loop from `aio-core`
//! and owns the policy that involves more than one backend: which one a [`Builder`] picks.
//!
//! # Example
//!
//! ```
//! use std::cell::Cell;
//! use std::io::{Read, Write};
//! use std::os::unix::net::UnixStream;
//! use std::rc::Rc;
//!
//! let ctx = aio::Builder::new().build()?;
//! let (mut client, server) = UnixStream::pair()?;
//! server.set_nonblocking(true)?;
//!
//! // Echo whatever arrives on `server`, from the loop's thread. The handler owns the fd it
//! // watches (here one `Rc` of the socket; the callback uses another).
//! let echoed = Rc::new(Cell::new(0));
//! let server = Rc::new(server);
//! let (count, sock) = (echoed.clone(), server.clone());
//! let _echo = ctx.fd_handler(server).on_read(move |_ctx| {
//!     let mut buf = [0u8; 256];
//!     if let Ok(n) = (&*sock).read(&mut buf) {
//!         (&*sock).write_all(&buf[..n]).unwrap();
//!         count.set(count.get() + n);
//!     }
//! }).register()?;
//!
//! // Another thread wakes the loop with a one-shot bottom half.
//! let remote = ctx.handle();
//! let (tx, rx) = std::sync::mpsc::channel();
//! std::thread::spawn(move || remote.schedule_oneshot(move || tx.send("hello").unwrap()));
//!
//! client.write_all(b"ping")?;
//! let mut greeting = None;
//! while echoed.get() < 4 || greeting.is_none() {
//!     ctx.poll(); // sleeps until the socket is readable or the BH arrives
//!     greeting = greeting.or(rx.try_recv().ok());
//! }
//! assert_eq!(greeting, Some("hello"));
//! let mut reply = [0u8; 4];
//! client.read_exact(&mut reply)?;
//! assert_eq!(&reply, b"ping");
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! # Features
//!
//! | feature | default | backend |
//! |---|---|---|
//! | `poll` | yes | `ppoll(2)`, portable to any Unix ([`PollMonitor`]) |
//! | `epoll` | yes | Linux epoll, level-triggered (`EpollMonitor`); ignored elsewhere |
//! | `io-uring` | yes | Linux io_uring, `POLL_ADD` re-armed per completion (`UringMonitor`) |
//! | `polling` | no | the `polling` crate: kqueue (macOS, BSDs), event ports (illumos), epoll (Linux) ([`PollingMonitor`]) |
//!
//! [`Backend::Auto`] (the default) uses io_uring where the kernel accepts a ring; otherwise it
//! starts on poll and moves to epoll once [`EPOLL_UPGRADE_THRESHOLD`] fds are registered, and
//! falls back from epoll to poll, keeping every handler, if epoll refuses an fd; see
//! [`AutoMonitor`]. Each fallback is logged with `tracing`, with its reason. The `AIO_BACKEND`
//! environment variable ([`BACKEND_ENV`]) steers `Auto` only: a backend the code names with
//! [`Builder::backend`] is the one it gets. [`AioContext::backend`] says which backend is active.
//! Where there is no epoll (macOS, the BSDs, illumos), `Auto` prefers [`Backend::Polling`] when
//! the `polling` feature is on; on Linux it picks it only when no other backend is compiled in
//! (its waits make more system calls than epoll's), so there it is used when asked for.
//! `--no-default-features --features poll` or `--features polling` builds on any Unix.
//!
//! Three more features embed a context in an event loop the program already runs (Linux only):
//!
//! | feature | module | outer loop |
//! |---|---|---|
//! | `glib` | `aio::glib` (`AioSource`, a real `GSource`) | any `glib::MainContext` (GTK, GStreamer, GIO); needs the system GLib |
//! | `tokio` | `aio::tokio` (`drive`, `spawn_on`) | a tokio current_thread runtime or `LocalSet` |
//! | `calloop` | `aio::calloop` (`AioSource`) | a `calloop::EventLoop` |
//!
//! Each drives the context through its outer-loop hooks ([`AioContext::prepare`],
//! [`AioContext::outer_fds`], [`AioContext::check`], [`AioContext::dispatch`]: QEMU's GSource
//! callbacks), wakes the sleeping outer loop on a cross-thread `schedule_oneshot`, adds no
//! wake-up while the context is idle, and lets a callback poll the context directly. Run aio's
//! own loop when the thread is yours (fewest system calls, adaptive polling, nanosecond timers);
//! embed it when the thread already belongs to one of these loops. Each module's documentation
//! has a runnable example, and `crates/aio/examples/embed_glib.rs`, `embed_tokio.rs` and
//! `embed_calloop.rs` are complete programs.

#![deny(missing_docs)]
#![doc(test(attr(deny(warnings))))]

/// A context that threads take turns running (`aio_context_acquire`/`release`):
/// [`Builder::build_shared`].
pub use aio_core::{Acquired, SharedContext, SharedFdHandler, SharedHandle, SharedHandlerBuilder};
pub use aio_core::{
    AioContext, BottomHalf, Change, ContextHandle, EventNotifier, FdHandler, FdMonitor,
    HandlerBuilder, HandlerKey, Interest, NotDisabledError, OuterFd, PollParams, PollPolicy,
    PolledHandler, Readiness, ReadyList, RunningBh, Stats,
};
/// Timers and their clocks; [`Clocks`], [`realtime_ns`] and [`host_ns`] read the clocks from
/// any thread (also [`ContextHandle::now_ns`]).
pub use aio_core::{
    ClockType, Clocks, GroupBuilder, GroupHandle, Scale, Timer, TimerAttrs, TimerListGroup,
    TimerRef, VirtualClock, host_ns, realtime_ns, set_timer_slack,
};
/// Handler operations from any thread, through a [`ContextHandle`].
pub use aio_core::{ContextGone, RemoteFdHandler, RemoteHandlerBuilder};
pub use aio_core::{DEFAULT_WEIGHT, MAX_BATCH_LIMIT, MAX_POLL_NS, MAX_WEIGHT};
/// Futures as QEMU's coroutines: tasks on a context and what they await.
pub use aio_core::{JoinError, JoinHandle, task};
/// QEMU's recursive FIFO lock (the first `aio_context_acquire`), as a standalone type.
pub use aio_core::{RFifoLock, RFifoLockGuard};
/// File I/O on the loop: io_uring requests on the context's own ring, or the thread pool.
#[cfg(target_os = "linux")]
pub use blockio::{self, BlockIo, Op as BlockOp};
#[cfg(feature = "poll")]
pub use fdmon_poll::PollMonitor;
#[cfg(feature = "polling")]
pub use fdmon_polling::PollingMonitor;
/// The context's worker thread pool (QEMU `aio_get_thread_pool`): [`ThreadPool::of`].
pub use threadpool::{self, PoolHandle, ThreadPool};

use std::io;

mod auto;
#[cfg(all(feature = "calloop", target_os = "linux"))]
pub mod calloop;
#[cfg(all(any(feature = "tokio", feature = "calloop"), target_os = "linux"))]
mod embed;
#[cfg(all(feature = "glib", target_os = "linux"))]
pub mod glib;
#[cfg(all(
    any(feature = "tokio", feature = "calloop", feature = "glib"),
    target_os = "linux"
))]
mod timerfd;
#[cfg(all(feature = "tokio", target_os = "linux"))]
pub mod tokio;

pub use auto::{AutoMonitor, Backend, EPOLL_UPGRADE_THRESHOLD};
#[cfg(all(feature = "epoll", target_os = "linux"))]
pub use fdmon_epoll::EpollMonitor;
#[cfg(all(feature = "io-uring", target_os = "linux"))]
pub use fdmon_uring::UringMonitor;

/// The environment variable that picks the backend of a [`Builder`] left on [`Backend::Auto`]
/// (the default): `poll`, `poll+epoll`, `epoll`, `io_uring` or `auto`. An explicit
/// [`Builder::backend`] other than `Auto` wins over it, and [`Builder::ignore_env`] turns it
/// off. An unknown value is logged and ignored.
pub const BACKEND_ENV: &str = "AIO_BACKEND";

/// The environment variable that overrides the adaptive-polling maximum a [`Builder`] sets, in
/// nanoseconds (QEMU's `poll-max-ns`; 0 disables polling). An invalid value is logged and
/// ignored. See [`Builder::poll_params`].
pub const POLL_MAX_NS_ENV: &str = "AIO_POLL_MAX_NS";

/// Creates contexts with a chosen backend.
///
/// ```
/// // The best backend compiled in and accepted by the kernel, whatever AIO_BACKEND says.
/// let ctx = aio::Builder::new().backend(aio::Backend::Auto).ignore_env().build()?;
/// assert!(["poll", "epoll", "io_uring", "polling"].contains(&ctx.backend()));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Default)]
pub struct Builder {
    backend: Backend,
    ignore_env: bool,
    timer_slack: Option<std::time::Duration>,
    clocks: Option<GroupBuilder>,
    poll: PollParams,
    max_batch: u32,
}

impl Builder {
    /// A builder with the default settings ([`Backend::Auto`], steered by `AIO_BACKEND`;
    /// `AIO_POLL_MAX_NS` honoured).
    pub fn new() -> Self {
        Self::default()
    }

    /// Picks the backend. An explicit choice is final: `AIO_BACKEND` steers only
    /// [`Backend::Auto`], the default, so code that needs one backend (a test of that backend,
    /// a program that relies on epoll's scaling) gets it whatever the environment says, while a
    /// deployment or a test run can still steer every context left on `Auto` without a
    /// rebuild. Asking for `Backend::Auto` explicitly is the same as not calling this.
    ///
    /// ```
    /// # #[cfg(feature = "poll")] {
    /// // Poll, even under AIO_BACKEND=epoll.
    /// let builder = aio::Builder::new().backend(aio::Backend::Poll);
    /// assert_eq!(builder.requested_backend(), aio::Backend::Poll);
    /// assert_eq!(builder.build()?.backend(), "poll");
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Ignores the environment: `AIO_BACKEND` (so [`Backend::Auto`] picks by what is compiled
    /// in and what the kernel accepts) and `AIO_POLL_MAX_NS` (so the polling parameters are
    /// exactly those given to [`poll_params`](Self::poll_params)). An explicit
    /// [`backend`](Self::backend) needs no `ignore_env`: the variable never overrides it.
    pub fn ignore_env(mut self) -> Self {
        self.ignore_env = true;
        self
    }

    /// Sets the building thread's timer slack (see [`set_timer_slack`]) when the context is
    /// built; build on the thread that will poll it. QEMU uses 1 ns on its loop threads.
    pub fn timer_slack(mut self, slack: std::time::Duration) -> Self {
        self.timer_slack = Some(slack);
        self
    }

    /// The clocks the context's timers read, for example a [`VirtualClock`] in place of real
    /// time for deterministic tests.
    pub fn clocks(mut self, clocks: GroupBuilder) -> Self {
        self.clocks = Some(clocks);
        self
    }

    /// The adaptive-polling parameters of the new context (disabled by default; see
    /// [`AioContext::set_poll_params`]). The `AIO_POLL_MAX_NS` environment variable, when
    /// set, overrides the maximum (keeping the rest), unless [`ignore_env`](Self::ignore_env)
    /// was called.
    ///
    /// ```
    /// use std::time::Duration;
    /// let ctx = aio::Builder::new()
    ///     .poll_params(aio::PollParams::new(Duration::from_nanos(32_768)))
    ///     .ignore_env()
    ///     .build()?;
    /// assert_eq!(ctx.poll_params().max(), Duration::from_nanos(32_768));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn poll_params(mut self, params: PollParams) -> Self {
        self.poll = params;
        self
    }

    /// The new context's `aio-max-batch` (0, the default: each block I/O engine's own; see
    /// [`AioContext::set_max_batch`]).
    pub fn max_batch(mut self, max_batch: u32) -> Self {
        self.max_batch = max_batch;
        self
    }

    /// The polling parameters this builder will set, after the environment override.
    pub fn requested_poll_params(&self) -> PollParams {
        if self.ignore_env {
            return self.poll;
        }
        let Ok(value) = std::env::var(POLL_MAX_NS_ENV) else {
            return self.poll;
        };
        let parsed = value
            .trim()
            .parse::<u64>()
            .ok()
            .map(|ns| self.poll.with_max(ns));
        match parsed {
            Some(p) if p.validate().is_ok() => p,
            _ => {
                tracing::warn!(
                    "aio: ignoring {POLL_MAX_NS_ENV}={value:?}: expected nanoseconds, at most {}",
                    aio_core::MAX_POLL_NS
                );
                self.poll
            }
        }
    }

    /// The backend this builder will ask for: the one given to [`backend`](Self::backend)
    /// unless that is [`Backend::Auto`], in which case `AIO_BACKEND` (when set, valid and not
    /// ignored with [`ignore_env`](Self::ignore_env)) decides.
    pub fn requested_backend(&self) -> Backend {
        let Ok(value) = std::env::var(BACKEND_ENV) else {
            return self.backend;
        };
        if self.ignore_env {
            return self.backend;
        }
        if self.backend != Backend::Auto {
            tracing::debug!(
                "aio: {BACKEND_ENV}={value:?} not applied: the builder asked for {:?}",
                self.backend
            );
            return self.backend;
        }
        Backend::from_name(&value).unwrap_or_else(|| {
            tracing::warn!(
                "aio: ignoring {BACKEND_ENV}={value:?}: expected poll, poll+epoll, epoll, io_uring, polling or auto"
            );
            self.backend
        })
    }

    /// Creates the context.
    ///
    /// # Errors
    ///
    /// `Unsupported` when the requested backend is not compiled in (no backend feature is
    /// enabled at all, for [`Backend::Auto`]); the kernel's error when an explicitly requested
    /// backend is refused; the error of [`set_timer_slack`]; otherwise the errors of
    /// [`AioContext::new`] (out of fds); `InvalidInput` for polling parameters that
    /// [`PollParams::validate`] refuses or an `aio-max-batch` above [`MAX_BATCH_LIMIT`].
    pub fn build(self) -> io::Result<AioContext> {
        let poll = self.requested_poll_params();
        poll.validate()?;
        let monitor = AutoMonitor::new(self.requested_backend())?;
        if let Some(slack) = self.timer_slack {
            set_timer_slack(slack)?;
        }
        let ctx = AioContext::with_clocks(Box::new(monitor), self.clocks.unwrap_or_default())?;
        if !poll.is_disabled() {
            ctx.set_poll_params(poll)?;
        }
        if self.max_batch != 0 {
            ctx.set_max_batch(self.max_batch)?;
        }
        Ok(ctx)
    }
}

impl Builder {
    /// Creates a [`SharedContext`] (acquire/release from any thread) with the same settings as
    /// [`build`](Self::build). The timer slack, a per-thread setting, applies to the calling
    /// thread only.
    ///
    /// # Errors
    ///
    /// As [`build`](Self::build).
    pub fn build_shared(self) -> io::Result<SharedContext> {
        let poll = self.requested_poll_params();
        poll.validate()?;
        let monitor = AutoMonitor::new(self.requested_backend())?;
        if let Some(slack) = self.timer_slack {
            set_timer_slack(slack)?;
        }
        let ctx = SharedContext::with_clocks(Box::new(monitor), self.clocks.unwrap_or_default())?;
        let handle = ctx.handle();
        if !poll.is_disabled() {
            handle.set_poll_params(poll)?;
        }
        if self.max_batch != 0 {
            handle.set_max_batch(self.max_batch)?;
        }
        Ok(ctx)
    }
}

/// A context on the default backend: `Builder::new().build()`.
///
/// # Errors
///
/// As [`Builder::build`].
pub fn new_context() -> io::Result<AioContext> {
    Builder::new().build()
}

/// Compiles and runs the Rust examples in README.md as doctests, so the README cannot drift
/// from the API.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
