//! The conformance suite of `aio_conformance` on the poll backend.

fn make() -> std::io::Result<aio::AioContext> {
    aio::Builder::new()
        .backend(aio::Backend::Poll)
        .ignore_env()
        .build()
}

aio_conformance::conformance_tests!(make);
