//! Shared helpers for the workspace tests: how each test file makes its contexts.

use std::io;

/// A context on the poll backend, the one every platform has.
///
/// # Errors
///
/// As [`aio::Builder::build`].
pub fn poll_context() -> io::Result<aio::AioContext> {
    aio::Builder::new().backend(aio::Backend::Poll).build()
}
