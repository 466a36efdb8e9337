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
//! // Echo whatever arrives on `server`, from the loop's thread.
//! let echoed = Rc::new(Cell::new(0));
//! let (count, mut sock) = (echoed.clone(), server.try_clone()?);
//! let _echo = ctx.fd_handler(&server).on_read(move |_ctx| {
//!     let mut buf = [0u8; 256];
//!     if let Ok(n) = sock.read(&mut buf) {
//!         sock.write_all(&buf[..n]).unwrap();
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
//!
//! The epoll and io_uring backends, and the automatic choice and upgrade between them, arrive
//! with their own features; `Backend::Auto` then prefers io_uring, then epoll, then poll.

#![deny(missing_docs)]
#![doc(test(attr(deny(warnings))))]

pub use aio_core::{
    AioContext, BottomHalf, Change, ContextHandle, EventNotifier, FdHandler, FdMonitor,
    HandlerBuilder, HandlerKey, Interest, NotDisabledError, OuterFd, Readiness, ReadyList,
    RunningBh, Stats,
};
#[cfg(feature = "poll")]
pub use fdmon_poll::PollMonitor;
/// The context's worker thread pool (QEMU `aio_get_thread_pool`): [`ThreadPool::of`].
pub use threadpool::{self, PoolHandle, ThreadPool};

use std::io;

/// Which backend watches the context's fds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Backend {
    /// The best backend compiled in and accepted by the kernel.
    #[default]
    Auto,
    /// `ppoll(2)` (feature `poll`).
    Poll,
}

/// Creates contexts with a chosen backend.
///
/// ```
/// let ctx = aio::Builder::new().backend(aio::Backend::Poll).build()?;
/// assert_eq!(ctx.backend(), "poll");
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Builder {
    backend: Backend,
}

impl Builder {
    /// A builder with the default settings ([`Backend::Auto`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Picks the backend.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Creates the context.
    ///
    /// # Errors
    ///
    /// `Unsupported` when the requested backend is not compiled in (no backend feature is
    /// enabled at all, for `Auto`); otherwise the errors of [`AioContext::new`] (out of fds).
    pub fn build(&self) -> io::Result<AioContext> {
        match self.backend {
            Backend::Auto | Backend::Poll => poll_context(),
        }
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

#[cfg(feature = "poll")]
fn poll_context() -> io::Result<AioContext> {
    AioContext::new(Box::new(PollMonitor::new()?))
}

#[cfg(not(feature = "poll"))]
fn poll_context() -> io::Result<AioContext> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "aio was built without the `poll` feature",
    ))
}

/// Compiles and runs the Rust examples in README.md as doctests, so the README cannot drift
/// from the API.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
