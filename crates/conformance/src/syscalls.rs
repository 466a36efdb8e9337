//! System calls the loop makes, listed in [`syscall_tests!`](crate::syscall_tests).

use crate::support::*;

/// DESIGN §8 B1 / docs/qemu-semantics.md §2.3 (the notifier's poll callback reads `notified`): with only BHs, a
/// schedule plus a poll makes no system call: no wait, no eventfd write, no drain.
pub fn stats_bh_only_makes_no_syscalls(make: MakeContext) {
    let ctx = new_ctx(make);
    drain(&ctx);
    let data = BhRecord::counting(&ctx, 0);
    let before = ctx.stats();
    for _ in 0..1000 {
        data.schedule();
        assert!(ctx.poll_nonblocking());
    }
    let after = ctx.stats();
    assert_eq!(data.n(), 1000);
    assert_eq!(after.waits, before.waits, "no wait system call");
    assert_eq!(after.event_writes, before.event_writes, "no eventfd write");
    assert_eq!(after.event_drains, before.event_drains, "no eventfd read");
    for _ in 0..1000 {
        data.schedule();
        assert!(
            ctx.poll(),
            "a blocking poll with a BH pending does not sleep"
        );
    }
    let last = ctx.stats();
    assert_eq!(data.n(), 2000);
    assert_eq!(
        (last.waits, last.event_writes, last.event_drains),
        (after.waits, after.event_writes, after.event_drains),
        "blocking polls with a BH pending make no system call either"
    );
    assert_eq!(last.bh_calls, after.bh_calls + 1000);
    assert_eq!(last.iterations, after.iterations + 1000);
}
