//! The fd a handler owns (`AioContext::fd_handler` and `ContextHandle::fd_handler` take it):
//! it stays open while the handler is registered, is dropped only after the backend stopped
//! watching it, and is dropped on every way out: removal (from inside its own callback too),
//! replacement, a registration refused by the context or by the backend, a removal from
//! another thread, the context's drop. A leaked handle leaks the fd with it until the context
//! goes, never closes it early. Taking a handler out of the backend and back (external
//! handlers disabled and enabled) keeps it. A registration that applies a pending remote
//! removal of the same number checks the number only after that removal, and an `AsyncFd`
//! owned by a task outlives the backend when the context is dropped.
//!
//! Whether an fd is still open is read from its peer: the other end of a socket pair reads
//! end-of-file once the last fd of this end is closed. A wrapping monitor checks, at each
//! change that stops watching an fd and at its own drop (for the fds still watched then),
//! that the number still names the file it was added with (`/proc/self/fd`), which is the
//! rule of ARCHITECTURE.md's "Raw fds".

use aio_core::{AioContext, Change, FdMonitor, OuterFd, ReadyList};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{self, ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// What `/proc/self/fd/<fd>` points at, or `None` if the number is not open.
fn names(fd: RawFd) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()
}

/// The poll backend, checking that every fd it stops watching still names the file it was
/// added with. Failures are collected, not panicked, so that a test reports them.
#[derive(Debug)]
struct Checking {
    inner: fdmon_poll::PollMonitor,
    added: HashMap<RawFd, PathBuf>,
    log: Log,
    /// Set by a test: the next `Add` is refused, as a backend may refuse one.
    refuse_add: Rc<Cell<bool>>,
}

impl Checking {
    fn check(&self, fd: RawFd, when: &str) {
        let at_add = self.added.get(&fd);
        let now = names(fd);
        if now.is_none() || now.as_ref() != at_add {
            self.log.borrow_mut().push(format!(
                "fd {fd} was closed or reused {when} (added as {at_add:?}, now {now:?})"
            ));
        }
    }

    fn forget(&mut self, fd: RawFd) {
        self.check(fd, "before the backend forgot it");
        self.added.remove(&fd);
    }
}

impl Drop for Checking {
    fn drop(&mut self) {
        for &fd in self.added.keys() {
            self.check(fd, "before the backend was dropped");
        }
    }
}

impl FdMonitor for Checking {
    fn name(&self) -> &'static str {
        "checking"
    }
    unsafe fn update(&mut self, change: Change) -> io::Result<()> {
        match change {
            Change::Add { .. } if self.refuse_add.replace(false) => {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            Change::Add { fd, .. } => {
                if let Some(path) = names(fd) {
                    self.added.insert(fd, path);
                }
            }
            Change::Remove { fd, .. } => self.forget(fd),
            _ => {}
        }
        // SAFETY: [FD-1]: the caller's contract, passed on unchanged.
        unsafe { self.inner.update(change) }
    }
    fn wait(&mut self, ready: &mut ReadyList, timeout: Option<Duration>) -> io::Result<usize> {
        self.inner.wait(ready, timeout)
    }
    fn must_wait(&self) -> Option<bool> {
        self.inner.must_wait()
    }
    fn outer_fds(&self, out: &mut Vec<OuterFd>) {
        self.inner.outer_fds(out)
    }
}

/// The checking monitor's log of violations.
type Log = Rc<RefCell<Vec<String>>>;

/// A context on the checking monitor, and its log of violations.
fn checked_ctx() -> (AioContext, Log) {
    let (ctx, log, _) = checked_ctx_refusing();
    (ctx, log)
}

/// The same, with the switch that makes the monitor refuse the next `Add`.
fn checked_ctx_refusing() -> (AioContext, Log, Rc<Cell<bool>>) {
    let (log, refuse) = (Rc::new(RefCell::new(Vec::new())), Rc::new(Cell::new(false)));
    let monitor = Checking {
        inner: fdmon_poll::PollMonitor::new().unwrap(),
        added: HashMap::new(),
        log: log.clone(),
        refuse_add: refuse.clone(),
    };
    (AioContext::new(Box::new(monitor)).unwrap(), log, refuse)
}

/// A connected pair, the peer non-blocking so that `is_open` can ask it.
fn pair() -> (UnixStream, UnixStream) {
    let (ours, peer) = UnixStream::pair().unwrap();
    peer.set_nonblocking(true).unwrap();
    (ours, peer)
}

/// Whether the other end of `peer` is still open: it reads end-of-file once it is closed.
fn is_open(mut peer: &UnixStream) -> bool {
    match peer.read(&mut [0; 16]) {
        Ok(0) => false,
        Ok(_) => panic!("nothing was written to the peer"),
        Err(e) if e.kind() == ErrorKind::WouldBlock => true,
        Err(e) => panic!("reading the peer: {e}"),
    }
}

#[test]
fn a_handler_keeps_its_fd_until_removed_then_drops_it_after_the_backend_forgot_it() {
    let (ctx, log) = checked_ctx();
    let (ours, peer) = pair();
    let raw = ours.as_raw_fd();
    let handler = ctx.fd_handler(ours).on_read(|_| {}).register().unwrap();
    assert_eq!(handler.fd(), raw);
    ctx.poll_nonblocking();
    assert!(is_open(&peer), "the handler must keep its fd open");
    drop(handler);
    assert!(!is_open(&peer), "a removed handler must drop its fd");
    assert!(log.borrow().is_empty(), "{:?}", log.borrow());
}

#[test]
fn remove_from_inside_its_own_callback_drops_the_fd_after_the_callback() {
    let (ctx, log) = checked_ctx();
    let (ours, peer) = pair();
    let peer = Rc::new(peer);
    let slot: Rc<RefCell<Option<aio_core::FdHandler>>> = Rc::default();
    let (s, p, during) = (slot.clone(), peer.clone(), Rc::new(Cell::new(None)));
    let seen = during.clone();
    // The handler owns the only fd of `ours`; the callback holds no clone of it.
    let handler = ctx
        .fd_handler(ours)
        .on_write(move |_| {
            drop(s.borrow_mut().take());
            // Removed, but the node lives until its callback returns: the fd too.
            seen.set(Some(is_open(&p)));
        })
        .register()
        .unwrap();
    *slot.borrow_mut() = Some(handler);
    ctx.poll_nonblocking();
    assert_eq!(
        during.get(),
        Some(true),
        "the fd closed under its running callback"
    );
    assert!(
        !is_open(&peer),
        "the removed handler's node dropped the fd after it"
    );
    assert!(log.borrow().is_empty(), "{:?}", log.borrow());
}

#[test]
fn a_replacement_brings_its_own_clone_and_the_old_one_is_dropped() {
    let (ctx, log) = checked_ctx();
    let (ours, peer) = pair();
    let ours = Rc::new(ours);
    let mut handler = ctx
        .fd_handler(ours.clone())
        .on_read(|_| {})
        .register()
        .unwrap();
    ctx.fd_handler(ours.clone())
        .on_write(|_| {})
        .replace(&mut handler)
        .unwrap();
    assert_eq!(
        Rc::strong_count(&ours),
        2,
        "the old node's clone is dropped"
    );
    drop(ours);
    ctx.poll_nonblocking();
    assert!(is_open(&peer), "the new node owns the fd");
    drop(handler);
    assert!(!is_open(&peer));
    assert!(log.borrow().is_empty(), "{:?}", log.borrow());
}

#[test]
fn a_refused_registration_drops_the_fd_it_was_given() {
    let (ctx, log) = checked_ctx();
    // No callback: refused before anything is registered.
    let (ours, peer) = pair();
    let err = ctx.fd_handler(ours).register().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(!is_open(&peer));
    // A second handler for the same number: refused; the first keeps its clone.
    let (ours, peer) = pair();
    let ours = Rc::new(ours);
    let first = ctx
        .fd_handler(ours.clone())
        .on_read(|_| {})
        .register()
        .unwrap();
    let err = ctx
        .fd_handler(ours.clone())
        .on_read(|_| {})
        .register()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    assert_eq!(
        Rc::strong_count(&ours),
        2,
        "the refused builder's clone is dropped"
    );
    drop(ours);
    assert!(is_open(&peer));
    drop(first);
    assert!(!is_open(&peer));
    drop(ctx);
    assert!(log.borrow().is_empty(), "{:?}", log.borrow());
}

#[test]
fn a_leaked_handle_leaks_its_fd_until_the_context_goes() {
    let (ctx, log) = checked_ctx();
    let (ours, peer) = pair();
    // Leaked as `mem::forget` would (its drop never runs while the context lives), but
    // released at the end, so that the handle's `Weak` does not keep the context's allocation
    // for the leak checkers (AddressSanitizer's runs this file).
    let leaked =
        std::mem::ManuallyDrop::new(ctx.fd_handler(ours).on_read(|_| {}).register().unwrap());
    ctx.poll_nonblocking();
    assert!(is_open(&peer), "a leaked handle must not close the fd");
    drop(ctx);
    assert!(!is_open(&peer), "the context's drop drops its nodes' fds");
    assert!(log.borrow().is_empty(), "{:?}", log.borrow());
    drop(std::mem::ManuallyDrop::into_inner(leaked));
}

#[test]
fn the_context_drop_closes_owned_fds_and_a_later_handle_drop_does_nothing() {
    let (ctx, log) = checked_ctx();
    let (ours, peer) = pair();
    let handler = ctx.fd_handler(ours).on_read(|_| {}).register().unwrap();
    drop(ctx);
    assert!(!is_open(&peer));
    assert!(!handler.is_registered());
    drop(handler);
    assert!(log.borrow().is_empty(), "{:?}", log.borrow());
}

#[test]
fn a_handler_registered_and_removed_from_another_thread_drops_its_fd_on_the_loop() {
    let (ctx, log) = checked_ctx();
    let (ours, peer) = pair();
    let handle = ctx.handle();
    let registering =
        std::thread::spawn(move || handle.fd_handler(Arc::new(ours)).on_read(|_| {}).register());
    while !registering.is_finished() {
        ctx.poll_nonblocking();
    }
    let remote = registering.join().unwrap().unwrap();
    assert!(is_open(&peer));
    // Removed on another thread: no callback starts after that, and the home thread takes
    // the fd out of the backend, then drops it, at its next iteration.
    std::thread::spawn(move || remote.remove()).join().unwrap();
    ctx.poll_nonblocking();
    assert!(
        !is_open(&peer),
        "the loop dropped the fd once it applied the removal"
    );
    assert!(log.borrow().is_empty(), "{:?}", log.borrow());
}

#[test]
fn a_registration_the_backend_refuses_drops_its_fd_and_leaves_nothing_watched() {
    let (ctx, log, refuse) = checked_ctx_refusing();
    let (ours, peer) = pair();
    refuse.set(true);
    let err = ctx.fd_handler(ours).on_read(|_| {}).register().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    assert!(!is_open(&peer), "the refused builder's fd is dropped");
    drop(ctx);
    assert!(log.borrow().is_empty(), "{:?}", log.borrow());
}

#[test]
fn external_handlers_taken_out_of_the_backend_and_back_keep_their_fd() {
    let (ctx, log) = checked_ctx();
    let (ours, peer) = pair();
    let handler = ctx
        .fd_handler(ours)
        .on_read(|_| {})
        .external(true)
        .register()
        .unwrap();
    ctx.disable_external();
    ctx.poll_nonblocking();
    assert!(is_open(&peer), "out of the backend, still owned");
    ctx.enable_external().unwrap();
    ctx.poll_nonblocking();
    assert!(is_open(&peer));
    drop(handler);
    assert!(!is_open(&peer));
    assert!(log.borrow().is_empty(), "{:?}", log.borrow());
}

#[test]
fn a_registration_after_a_remote_removal_not_yet_applied_checks_the_fd_after_that_removal() {
    let (ctx, log) = checked_ctx();
    // The socket moved to a high number, which no other test's open reuses while this one
    // runs (the kernel hands out the lowest free number).
    let (low, peer) = pair();
    let ours = UnixStream::from(rustix::io::fcntl_dupfd_cloexec(&low, 512).expect("F_DUPFD"));
    drop(low);
    let high = ours.as_raw_fd();
    let handle = ctx.handle();
    let registering =
        std::thread::spawn(move || handle.fd_handler(ours).on_read(|_| {}).register());
    while !registering.is_finished() {
        ctx.poll_nonblocking();
    }
    let remote = registering.join().unwrap().unwrap();
    // Removed on another thread; the home thread has not applied it yet.
    std::thread::spawn(move || remote.remove()).join().unwrap();
    assert!(
        is_open(&peer),
        "the removal is not applied before the next iteration"
    );
    // A registration of the same number on the home thread applies that removal first,
    // which drops the only owner: the number is checked after that, and found closed. The
    // registration must refuse it rather than watch it.
    // SAFETY: breaks [FD-1] on purpose: the removal this registration applies closes it.
    let err = unsafe { ctx.fd_handler_raw(high) }
        .on_read(|_| {})
        .register()
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{err}");
    assert!(!is_open(&peer), "the stale node's fd was dropped");
    ctx.poll_nonblocking();
    drop(ctx);
    assert!(log.borrow().is_empty(), "{:?}", log.borrow());
}

#[test]
fn an_async_fd_dropped_with_its_task_at_the_context_drop_outlives_the_backend() {
    use aio_core::task::fd::AsyncFd;
    let (ctx, log) = checked_ctx();
    let (ours, peer) = pair();
    let watching = Rc::new(Cell::new(false));
    let seen = watching.clone();
    // A task that waits forever for a read that never comes, its fd watched by the backend.
    let task = ctx.spawn_local(async move {
        let fd = AsyncFd::new(ours)?;
        seen.set(true);
        fd.readable().await.map(drop)
    });
    while !watching.get() {
        ctx.poll_nonblocking();
    }
    ctx.poll_nonblocking();
    assert!(is_open(&peer));
    // The context drops its monitor before its tasks: the checking monitor finds the fd
    // still open at its own drop, and the task's `AsyncFd` then closes it without touching
    // the monitor that is gone.
    drop(ctx);
    assert!(
        !is_open(&peer),
        "the task's AsyncFd was dropped with the context"
    );
    drop(task);
    assert!(log.borrow().is_empty(), "{:?}", log.borrow());
}
