//! The conformance suite of `aio_conformance` on the `polling` backend, twice: as the facade
//! builds it (level-triggered: epoll underneath on Linux, kqueue on macOS and the BSDs), and in
//! the mode event ports need (one-shot registrations re-armed by the monitor after each report),
//! forced here so that illumos's code path passes the suite on Linux too.

/// The backend as `Backend::Polling` builds it.
mod level {
    fn make() -> std::io::Result<aio::AioContext> {
        let ctx = aio::Builder::new()
            .backend(aio::Backend::Polling)
            .ignore_env()
            .build()?;
        assert_eq!(ctx.backend(), "polling");
        Ok(ctx)
    }

    aio_conformance::conformance_tests!(make);
}

/// One-shot registrations re-armed after each report (event ports' mode), on any platform.
mod rearm {
    fn make() -> std::io::Result<aio::AioContext> {
        let monitor = aio::PollingMonitor::with_rearm(true)?;
        assert!(monitor.rearms());
        aio_core::AioContext::new(Box::new(monitor))
    }

    aio_conformance::conformance_tests!(make);
}
