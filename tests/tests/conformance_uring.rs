//! The conformance suite of `aio_core::testing` on the io_uring backend.
//!
//! Every case builds its context with [`make`], on a fresh [`UringMonitor`]. io_uring can be
//! missing or refused (an old kernel, `kernel.io_uring_disabled`, a seccomp filter), and
//! `conformance_tests!` has no way to skip a case: it calls the constructor and fails the case
//! if that returns an error. So on such a machine every case here fails fast, at construction,
//! with a message that names the reason, rather than passing silently on another backend.
//! Until `aio_core::testing` grows a skip hook, that is the honest outcome; where io_uring
//! works (CI's machines do), the whole suite runs on it.

#![cfg(target_os = "linux")]

use std::io;

use fdmon_uring::UringMonitor;

/// A context on a new io_uring monitor, or an error that says why io_uring is unusable here.
fn make() -> io::Result<aio_core::AioContext> {
    let monitor = UringMonitor::new().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("io_uring unavailable, cannot run the io_uring conformance suite: {e}"),
        )
    })?;
    aio_core::AioContext::new(Box::new(monitor))
}

aio_core::conformance_tests!(make);
