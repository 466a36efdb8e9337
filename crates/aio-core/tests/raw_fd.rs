//! Handlers registered by raw fd number (`AioContext::fd_handler_raw`,
//! `ContextHandle::fd_handler_raw`), as code ported from C holds its fds: dispatch, removal,
//! the refusal of numbers that are not open, the clash with a handler registered through
//! `AsFd`, and registration from another thread.
//!
//! Every fd here comes from `pipe(2)` and is closed by the test that made it, after the handler
//! on it is removed: the raw-fd contract (ARCHITECTURE.md, "Raw fds").

use aio_core::AioContext;
use std::cell::Cell;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

fn ctx() -> AioContext {
    AioContext::new(Box::new(fdmon_poll::PollMonitor::new().unwrap())).unwrap()
}

/// A pipe as C code holds it: two bare numbers, closed by `Drop`.
struct RawPipe {
    rd: RawFd,
    wr: RawFd,
}

impl RawPipe {
    fn new() -> RawPipe {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a writable array of two ints for pipe(2) to fill.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        RawPipe {
            rd: fds[0],
            wr: fds[1],
        }
    }

    fn write_byte(&self, byte: u8) {
        // SAFETY: one readable byte; `wr` is open until `self` drops.
        let n = unsafe { libc::write(self.wr, (&raw const byte).cast(), 1) };
        assert_eq!(n, 1);
    }
}

/// Reads one byte from `fd`, which the caller keeps open.
fn read_byte(fd: RawFd) -> u8 {
    let mut byte = 0u8;
    // SAFETY: one writable byte; the caller keeps `fd` open across the call.
    assert_eq!(unsafe { libc::read(fd, (&raw mut byte).cast(), 1) }, 1);
    byte
}

/// The read end, for the safe `fd_handler`, which takes an owner of the fd: given an
/// `Rc<RawPipe>` clone, the handler keeps the pipe, so both ends, open until it is removed.
impl AsFd for RawPipe {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: `rd` is open until `self` drops, which outlives the returned borrow.
        unsafe { BorrowedFd::borrow_raw(self.rd) }
    }
}

impl Drop for RawPipe {
    fn drop(&mut self) {
        // Both fds came from pipe(2) in `new`; every test removes its raw-fd handlers before
        // dropping the pipe, and a safe handler holds an `Rc` of the pipe, so it is gone too.
        // SAFETY: [SYS-1] fds owned by this value alone, closed once, no handler left on them.
        unsafe {
            libc::close(self.rd);
            libc::close(self.wr);
        }
    }
}

#[test]
fn a_raw_fd_handler_is_dispatched_and_removed_like_any_other() {
    let ctx = ctx();
    let pipe = RawPipe::new();
    let rd = pipe.rd;
    let got = Rc::new(Cell::new(Vec::new()));
    let g = got.clone();
    // SAFETY: raw-fd contract: `pipe` outlives `handler`, which is removed below.
    let handler = unsafe { ctx.fd_handler_raw(rd) }
        .on_read(move |_| {
            let mut v = g.take();
            v.push(read_byte(rd));
            g.set(v);
        })
        .register()
        .unwrap();
    assert_eq!(handler.fd(), rd);
    assert!(handler.is_registered());
    assert!(!ctx.poll_nonblocking(), "nothing written yet");

    pipe.write_byte(b'a');
    assert!(ctx.poll_nonblocking());
    pipe.write_byte(b'b');
    assert!(ctx.poll_nonblocking());
    assert_eq!(got.take(), b"ab");

    handler.remove();
    pipe.write_byte(b'c');
    assert!(
        !ctx.poll_nonblocking(),
        "a removed handler is not dispatched"
    );
    assert!(got.take().is_empty());
    assert_eq!(read_byte(rd), b'c', "the byte is still in the pipe");
}

#[test]
fn numbers_that_are_not_open_fds_are_refused_with_ebadf() {
    let ctx = ctx();
    for fd in [-1, RawFd::MAX] {
        // `register` refuses the number (asserted below), so no fd is watched.
        // SAFETY: raw-fd contract: nothing is registered, so it has nothing to cover.
        let err = unsafe { ctx.fd_handler_raw(fd) }
            .on_read(|_| panic!("never registered"))
            .register()
            .expect_err("not an open fd");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF), "fd {fd}: {err}");
    }
    // The context is untouched.
    assert!(!ctx.poll_nonblocking());
}

#[test]
fn a_raw_fd_and_its_asfd_share_one_registration() {
    let ctx = ctx();
    // The safe handler takes a clone; the test keeps the pipe for the raw registrations.
    let pipe = Rc::new(RawPipe::new());
    let safe = ctx
        .fd_handler(pipe.clone())
        .on_read(|_| ())
        .register()
        .unwrap();
    // SAFETY: raw-fd contract: nothing is registered (AlreadyExists, asserted below).
    let err = unsafe { ctx.fd_handler_raw(pipe.rd) }
        .on_read(|_| ())
        .register()
        .expect_err("the fd already has a handler");
    assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    drop(safe);
    // Once the first is gone, the raw registration is accepted.
    // SAFETY: raw-fd contract: `raw` is dropped before `pipe`.
    let raw = unsafe { ctx.fd_handler_raw(pipe.rd) }
        .on_read(|_| ())
        .register()
        .unwrap();
    drop(raw);
}

#[test]
fn a_raw_fd_handler_registered_from_another_thread_runs_on_the_loop() {
    let ctx = ctx();
    let pipe = Arc::new(RawPipe::new());
    let hits = Arc::new(AtomicUsize::new(0));
    let (h, p) = (hits.clone(), pipe.clone());
    let handle = ctx.handle();
    let home = thread::current().id();
    let registrar = thread::spawn(move || {
        let rd = p.rd;
        // The test holds an `Arc` of the pipe until the handler is removed and the loop has
        // iterated since.
        // SAFETY: raw-fd contract: the fd stays open for as long as the handler may use it.
        unsafe { handle.fd_handler_raw(rd) }
            .on_read(move |_| {
                assert_eq!(thread::current().id(), home, "callbacks run on the loop");
                read_byte(rd);
                h.fetch_add(1, Ordering::SeqCst);
            })
            .register()
    });
    // Registration from another thread waits for the loop.
    let start = Instant::now();
    while !registrar.is_finished() {
        ctx.poll_nonblocking();
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "registration hung"
        );
        thread::yield_now();
    }
    let remote = registrar.join().unwrap().unwrap();
    assert_eq!(remote.fd(), pipe.rd);

    pipe.write_byte(1);
    while hits.load(Ordering::SeqCst) == 0 {
        ctx.poll();
    }
    assert!(!remote.remove(), "no callback was running");
    pipe.write_byte(2);
    ctx.poll_nonblocking(); // takes the fd out of the backend
    assert!(!ctx.poll_nonblocking());
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}
