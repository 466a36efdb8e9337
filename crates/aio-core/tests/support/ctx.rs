//! The context (and the monitor) the test files of this crate build: on `MiriMonitor` under
//! Miri, which emulates neither `ppoll` nor level-triggered epoll, on poll otherwise. A test
//! file includes it with `#[path = "support/ctx.rs"] mod support;`.

#![allow(dead_code)]

#[cfg(miri)]
#[path = "miri_monitor.rs"]
mod miri_monitor;

use aio_core::{AioContext, FdMonitor};

/// The monitor for a test context.
pub fn monitor() -> Box<dyn FdMonitor> {
    #[cfg(miri)]
    return Box::new(miri_monitor::MiriMonitor::new().unwrap());
    #[cfg(not(miri))]
    Box::new(fdmon_poll::PollMonitor::new().unwrap())
}

/// A context on [`monitor`].
pub fn ctx() -> AioContext {
    AioContext::new(monitor()).unwrap()
}
