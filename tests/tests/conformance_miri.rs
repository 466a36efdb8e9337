//! The conformance suite of `aio_conformance` on `MiriMonitor`, the test-only monitor that the
//! helpers of the core and pool tests switch to under Miri (which emulates neither `ppoll` nor
//! level-triggered epoll; see `crates/aio-core/tests/support/miri_monitor.rs`).
//!
//! Run natively, it proves that the stand-in behaves like a real backend; run by `xtask ci`'s
//! `miri` step, it puts the context's bottom-half, handler and context paths under Miri.

#![cfg(target_os = "linux")]

#[path = "../../crates/aio-core/tests/support/miri_monitor.rs"]
mod miri_monitor;

fn make() -> std::io::Result<aio::AioContext> {
    aio_core::AioContext::new(Box::new(miri_monitor::MiriMonitor::new()?))
}

aio_conformance::conformance_tests!(make);
