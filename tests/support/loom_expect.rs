//! `expect_loom_failure`: the one harness that shows a loom model catches a deliberately broken
//! variant. Included with `#[path]` by the loom test files of aio-core, threadpool and timers
//! (test-only; no crate depends on another for it).

/// Asserts that loom finds a failure in `model`, run as the test named `test`, and that the
/// failure report contains `expected` (`"deadlock"` for a lost wake-up).
///
/// A model that loom catches cannot be run in-process: after loom reports the failure, the
/// unwinding drops loom objects outside an execution, which aborts the process. So the test
/// re-executes its own binary to run just that model, and checks the child's failure.
pub fn expect_loom_failure(test: &str, expected: &str, model: fn()) {
    if std::env::var("AIO_LOOM_EXPECT_FAILURE").as_deref() == Ok(test) {
        loom::model(model);
        return; // Not reached when loom catches the bug: the child fails.
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env("AIO_LOOM_EXPECT_FAILURE", test)
        .output()
        .expect("re-run the test binary");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "loom accepted {test}: the model no longer detects it"
    );
    assert!(
        stderr.contains(expected),
        "{test} failed, but not with {expected:?}:\n{stderr}"
    );
}
