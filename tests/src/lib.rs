//! Shared helpers for the workspace tests: how each test file makes its contexts, and how a
//! test runs alone in a child process.

use std::io;
use std::process::Command;

/// A context on the poll backend, the one every platform has, whatever `AIO_BACKEND` says.
///
/// # Errors
///
/// As [`aio::Builder::build`].
pub fn poll_context() -> io::Result<aio::AioContext> {
    aio::Builder::new()
        .backend(aio::Backend::Poll)
        .ignore_env()
        .build()
}

/// The variable that tells a re-executed test binary which test it runs as a child.
const CHILD_ENV: &str = "AIO_TESTS_CHILD";

/// Runs `body` as the test named `test` in a child process of this test binary, and asserts
/// that it passed there.
///
/// For tests that change something process-wide and permanent (a resource limit, a signal
/// disposition, a seccomp filter, an environment variable) that must not leak into the tests
/// running in parallel in this process. `env` sets (`Some`) or removes (`None`) variables for
/// the child.
pub fn in_child(test: &str, env: &[(&str, Option<&str>)], body: impl FnOnce()) {
    if std::env::var(CHILD_ENV).as_deref() == Ok(test) {
        body();
        return;
    }
    let mut cmd = Command::new(std::env::current_exe().expect("current_exe"));
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, test);
    for (name, value) in env {
        match value {
            Some(value) => cmd.env(name, value),
            None => cmd.env_remove(name),
        };
    }
    let out = cmd.output().expect("re-executing the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child {test} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
