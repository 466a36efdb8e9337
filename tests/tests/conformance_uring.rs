//! The conformance suite of `aio_conformance` on the io_uring backend.
//!
//! io_uring can be missing or refused (an old kernel, `kernel.io_uring_disabled`, a seccomp
//! filter). The test crate's build script probes for it; where it is unavailable, every case is
//! reported as ignored with that reason (and the build prints a warning), never as passed.

#![cfg(target_os = "linux")]

use fdmon_uring::UringMonitor;

/// A context on a new io_uring monitor.
fn make() -> std::io::Result<aio_core::AioContext> {
    aio_core::AioContext::new(Box::new(UringMonitor::new()?))
}

aio_conformance::conformance_tests!(
    make,
    #[cfg_attr(
        aio_no_uring,
        ignore = "io_uring is unavailable on this machine (see the build warning)"
    )]
);
