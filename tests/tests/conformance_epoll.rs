//! The conformance suite of `aio_conformance` on the epoll backend.

#![cfg(target_os = "linux")]

fn make() -> std::io::Result<aio::AioContext> {
    aio_core::AioContext::new(Box::new(fdmon_epoll::EpollMonitor::new()?))
}

aio_conformance::conformance_tests!(make);
