//! The backend conformance suite (feature `testing`): every behaviour of the loop that must
//! hold on every backend, as plain functions over a context constructor, and the
//! [`conformance_tests!`](crate::conformance_tests) macro that turns them into `#[test]`s.
//!
//! Each backend's test file is one macro call, so the suite is defined once and run against
//! poll, epoll and io_uring alike. The cases follow QEMU's `tests/unit/test-aio.c` and the
//! conformance list in `qemu-aio-tests.md` §13; each asserts exact counts and return values.

use crate::AioContext;
use std::io;

/// Makes a fresh context on the backend under test.
pub type MakeContext = fn() -> io::Result<AioContext>;

/// `/aio/bh/schedule`: one scheduled BH runs exactly once, then the loop is idle.
pub fn bh_schedule(make: MakeContext) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    let ctx = make().expect("context");
    let n = Arc::new(AtomicU32::new(0));
    let c = n.clone();
    let bh = ctx.bh(move || {
        c.fetch_add(1, Ordering::SeqCst);
    });
    bh.schedule();
    assert_eq!(
        n.load(Ordering::SeqCst),
        0,
        "scheduling never runs anything synchronously"
    );
    assert!(ctx.poll());
    assert_eq!(n.load(Ordering::SeqCst), 1);
    assert!(!ctx.poll_nonblocking());
    assert_eq!(n.load(Ordering::SeqCst), 1);
}

/// Generates one `#[test]` per conformance case, each calling the case with `$make`.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        #[test]
        fn bh_schedule() {
            $crate::testing::bh_schedule($make)
        }
    };
}
