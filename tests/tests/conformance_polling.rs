//! The conformance suite of `aio_core::testing` on the `polling` backend (epoll underneath on
//! Linux; kqueue or event ports where this file is run elsewhere).

fn make() -> std::io::Result<aio::AioContext> {
    aio::Builder::new()
        .backend(aio::Backend::Polling)
        .ignore_env()
        .build()
}

aio_core::conformance_tests!(make);
