//! The conformance suite of `aio_core::testing` on the poll backend.

fn make() -> std::io::Result<aio::AioContext> {
    aio::Builder::new()
        .backend(aio::Backend::Poll)
        .ignore_env()
        .build()
}

aio_core::conformance_tests!(make);
