//! The pool's two error types: why a request ended without a value ([`Error`]), and why a
//! pair of thread limits was refused ([`LimitsError`]).

use std::fmt;

/// Why a request completed without the value its work would have returned.
///
/// A request completes exactly once, with `Ok(value)` or one of these. QEMU reports the first
/// as `-ECANCELED`; the other two have no QEMU equivalent (QEMU asserts that no request is
/// outstanding when a pool is freed, and a crashing worker takes the process with it).
///
/// # Examples
///
/// ```
/// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
/// use threadpool::{Error, ThreadPool};
///
/// let pool = ThreadPool::of(&ctx);
/// let req = pool.submit(|| -> u32 { panic!("disk on fire") });
/// let result = loop {
///     ctx.poll();
///     if let Some(r) = req.try_take() { break r; }
/// };
/// assert_eq!(result, Err(Error::Panicked("disk on fire".into())));
/// assert_eq!(result.unwrap_err().to_string(), "the work panicked: disk on fire");
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The request was cancelled while it was still queued; its work never ran.
    Cancelled,
    /// The work panicked on its worker thread; the payload's message, if it was a string.
    /// The worker caught the panic and went on serving other requests.
    Panicked(String),
    /// The pool (or the context that owned it) was dropped before the work started, so it
    /// never will.
    ShutDown,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Cancelled => f.write_str("the request was cancelled before it started"),
            Error::Panicked(msg) => write!(f, "the work panicked: {msg}"),
            Error::ShutDown => f.write_str("the thread pool was shut down before the work started"),
        }
    }
}

impl std::error::Error for Error {}

/// Thread limits that [`ThreadPool::set_limits`](crate::ThreadPool::set_limits) refused: they
/// must satisfy `min <= max` and `max > 0` (QEMU `aio_context_set_thread_pool_params`).
///
/// # Examples
///
/// ```
/// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
/// let pool = threadpool::ThreadPool::of(&ctx);
/// let err = pool.set_limits(8, 4).unwrap_err();
/// assert_eq!((err.min, err.max), (8, 4));
/// assert!(pool.set_limits(0, 0).is_err());
/// assert_eq!(pool.limits(), (0, 64), "a refused change changes nothing");
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitsError {
    /// The refused minimum.
    pub min: usize,
    /// The refused maximum.
    pub max: usize,
}

impl fmt::Display for LimitsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid thread pool limits (min {}, max {}): need min <= max and max > 0",
            self.min, self.max
        )
    }
}

impl std::error::Error for LimitsError {}
