//! External clients, listed in [`external_client_tests!`](crate::external_client_tests).

use crate::support::*;

fn external_client(make: MakeContext, depth: usize) {
    let ctx = new_ctx(make);
    let mut data = Notifier::new(10, true);
    data.register_external(&ctx);
    data.set();
    for _ in 0..depth {
        ctx.disable_external();
    }
    assert!(ctx.is_external_disabled());
    for i in 0..depth {
        assert!(
            !ctx.poll_nonblocking(),
            "a disabled external handler is not dispatched"
        );
        assert_eq!(data.n(), 0);
        assert!(data.e.test_and_clear(), "the notifier stayed set");
        data.set();
        ctx.enable_external().expect("disabled");
        assert_eq!(ctx.is_external_disabled(), i + 1 < depth, "disables nest");
    }
    assert!(ctx.poll_nonblocking());
    assert_eq!((data.n(), data.active()), (1, 9));
    data.unregister();
    assert!(!ctx.poll_nonblocking());
    assert_eq!(data.n(), 1);
}

/// `/aio/external-client` (§1.17), depth 1.
pub fn external_client_depth1(make: MakeContext) {
    external_client(make, 1);
}

/// `/aio/external-client` (§1.17), depth 2: disables nest as a counter.
pub fn external_client_depth2(make: MakeContext) {
    external_client(make, 2);
}

/// Derived (docs/qemu-semantics.md §6.1, QEMU asserts): `enable_external` without a matching disable fails with
/// `NotDisabledError` and changes nothing; non-external handlers are never affected.
pub fn external_enable_without_disable_errors(make: MakeContext) {
    let ctx = new_ctx(make);
    assert_eq!(ctx.enable_external(), Err(NotDisabledError));
    assert!(!ctx.is_external_disabled());
    let mut ext = Notifier::new(0, false);
    ext.register_external(&ctx);
    let mut internal = Notifier::new(0, false);
    internal.register(&ctx);
    drain(&ctx);
    ext.set();
    assert!(ctx.poll_nonblocking(), "external handlers still run");
    assert_eq!(ext.n(), 1);

    ctx.disable_external();
    internal.set();
    ext.set();
    assert!(
        ctx.poll_nonblocking(),
        "a non-external handler runs while disabled"
    );
    assert_eq!((internal.n(), ext.n()), (1, 1));
    ctx.enable_external().unwrap();
    assert_eq!(ctx.enable_external(), Err(NotDisabledError));
    assert!(!ctx.is_external_disabled());
    assert!(ctx.poll_nonblocking());
    assert_eq!((internal.n(), ext.n()), (1, 2));
    assert!(!ctx.poll_nonblocking());
}
