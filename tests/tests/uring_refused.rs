//! io_uring refused by the kernel at run time, as container runtimes do with a seccomp filter:
//! `Backend::Auto` falls back (logged) to a working poll/epoll context, an explicit io_uring
//! request is a clear error, and `UringMonitor::probe` says why. Each case runs in a child
//! process that installs a seccomp filter making `io_uring_setup` fail with `EPERM` (a filter
//! cannot be removed, so it must not touch the other tests).
#![cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]

use aio::{Backend, Builder};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Runs `body` in a child process of this test binary, with io_uring refused.
fn with_io_uring_refused(test: &str, body: fn()) {
    aio_tests::in_child(test, &[("AIO_BACKEND", None)], || {
        refuse_io_uring_setup();
        body();
    });
}

/// Installs a seccomp filter on this thread: `io_uring_setup` fails with `EPERM`, every other
/// system call is allowed.
fn refuse_io_uring_setup() {
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let mut filter = [
        // Load the system call number (offset 0 of struct seccomp_data).
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
        jeq(libc::SYS_io_uring_setup as u32, 0, 1),
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only; it is required before an
    // unprivileged process may install a seccomp filter.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "no_new_privs: {}", io::Error::last_os_error());
    let mode = libc::SECCOMP_MODE_FILTER as libc::c_ulong;
    // SAFETY: `prog` points to `filter`, a valid BPF program that lives across the call (the
    // kernel copies it); the filter only makes io_uring_setup fail.
    let rc = unsafe { libc::prctl(libc::PR_SET_SECCOMP, mode, &prog) };
    assert_eq!(rc, 0, "seccomp: {}", io::Error::last_os_error());
}

#[test]
fn auto_falls_back_and_the_context_works() {
    with_io_uring_refused("auto_falls_back_and_the_context_works", || {
        let err = aio::UringMonitor::probe().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
        let ctx = Builder::new()
            .ignore_env()
            .build()
            .expect("Auto falls back");
        assert_eq!(ctx.backend(), "poll");
        // The fallback context really works: a BH and an fd handler.
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        ctx.schedule_oneshot(move || r.store(true, Ordering::SeqCst));
        assert!(ctx.poll());
        assert!(ran.load(Ordering::SeqCst));
        let notifier = Arc::new(aio::EventNotifier::new().unwrap());
        let hits = std::rc::Rc::new(std::cell::Cell::new(0));
        let h = hits.clone();
        let _handler = ctx
            .set_event_notifier(&notifier, move |e| {
                assert!(e.test_and_clear());
                h.set(h.get() + 1);
            })
            .unwrap();
        notifier.set().unwrap();
        assert!(ctx.poll());
        assert_eq!(hits.get(), 1);
    });
}

#[test]
fn explicit_io_uring_is_an_error_not_a_fallback() {
    with_io_uring_refused("explicit_io_uring_is_an_error_not_a_fallback", || {
        let err = Builder::new()
            .backend(Backend::IoUring)
            .ignore_env()
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
        // The other backends are unaffected.
        let epoll = Builder::new()
            .backend(Backend::Epoll)
            .ignore_env()
            .build()
            .unwrap();
        assert_eq!(epoll.backend(), "epoll");
    });
}
