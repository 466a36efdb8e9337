//! fd readiness as futures (`aio_core::task::fd::AsyncFd`) on sockets and pipes: echo between
//! tasks, readiness that waits for data, writes into a full buffer, end of file, an empty
//! buffer, no busy loop without waiters, a reader and a writer on one fd, unregistration on
//! drop, and an fd replaced through `get_mut`, which also forgets the readiness reported
//! before.

use aio_core::task::fd::AsyncFd;
use aio_core::{AioContext, Interest};
use std::cell::Cell;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::thread;

#[path = "support/ctx.rs"]
mod support;
use support::ctx;

/// Runs the loop without blocking until an iteration makes no progress.
fn settle(ctx: &AioContext) {
    for _ in 0..1000 {
        if !ctx.poll_nonblocking() {
            return;
        }
    }
    panic!("the loop kept making progress");
}

/// Writes into `s` (non-blocking) until the socket buffer is full; returns how much.
fn fill(s: &UnixStream) -> usize {
    let chunk = [0x5a; 4096];
    let mut total = 0;
    loop {
        match (&*s).write(&chunk) {
            Ok(n) => total += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return total,
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
#[cfg_attr(miri, ignore = "no socketpair ioctl under Miri")]
fn echo_between_two_tasks() {
    let ctx = ctx();
    let (a, b) = UnixStream::pair().unwrap();
    let a = AsyncFd::with_context(&ctx, a).unwrap();
    let server = ctx.spawn_local(async move {
        let b = AsyncFd::new(b)?;
        let mut buf = [0; 1000];
        let mut echoed = 0;
        loop {
            let n = b.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, io::Error>(echoed);
            }
            b.write_all(&buf[..n]).await?;
            echoed += n;
        }
    });
    let client = ctx.spawn_local(async move {
        let mut got = Vec::new();
        for i in 0..50u32 {
            let msg = vec![i as u8; 100 + i as usize * 37];
            a.write_all(&msg).await?;
            let mut back = vec![0; msg.len()];
            a.read_exact(&mut back).await?;
            assert_eq!(back, msg);
            got.extend_from_slice(&back);
        }
        Ok::<_, io::Error>(got.len())
    });
    let sent = ctx.block_on(client).unwrap().unwrap();
    // The client's AsyncFd is gone with its task: the server reads end of file.
    assert_eq!(ctx.block_on(server).unwrap().unwrap(), sent);
}

#[test]
#[cfg_attr(miri, ignore = "no socketpair ioctl under Miri")]
fn readable_waits_for_data() {
    let ctx = ctx();
    let (a, mut b) = UnixStream::pair().unwrap();
    let a = Rc::new(AsyncFd::with_context(&ctx, a).unwrap());
    let done = Rc::new(Cell::new(false));
    let (fd, d) = (a.clone(), done.clone());
    let task = ctx.spawn_local(async move {
        let guard = fd.readable().await;
        d.set(true);
        guard.map(drop)
    });
    settle(&ctx);
    assert!(!done.get(), "no data, not readable");
    assert_eq!(a.interest(), Interest::READ, "watched while awaited");
    b.write_all(b"data").unwrap();
    assert!(ctx.poll(), "the loop wakes for the data");
    settle(&ctx);
    assert!(done.get());
    ctx.block_on(task).unwrap().unwrap();
    // Still readable (nothing was read): the next wait completes without the loop.
    let mut again = Box::pin(a.readable());
    let poll = again
        .as_mut()
        .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
    assert!(matches!(poll, std::task::Poll::Ready(Ok(_))));
    drop(again);
    // Consumed: a WouldBlock clears it and the wait is for the loop again.
    let mut buf = [0; 16];
    assert_eq!(ctx.block_on(a.read(&mut buf)).unwrap(), 4);
    let n = ctx.block_on(async {
        let mut guard = a.readable().await.unwrap();
        guard.try_io(|s| (&*s).read(&mut [0; 1])).is_err()
    });
    assert!(
        n,
        "readiness from the earlier report; the read would block and clears it"
    );
    let mut wait = Box::pin(a.readable());
    let poll = wait
        .as_mut()
        .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
    assert!(poll.is_pending());
}

#[test]
#[cfg_attr(miri, ignore = "no socketpair ioctl under Miri")]
fn a_write_into_a_full_buffer_waits_until_the_peer_reads() {
    let ctx = ctx();
    let (a, b) = UnixStream::pair().unwrap();
    let a = AsyncFd::with_context(&ctx, a).unwrap();
    let filled = fill(a.get_ref());
    assert!(filled > 0);
    let payload: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    let expected = payload.clone();
    let writer = ctx.spawn_local(async move { a.write_all(&payload).await });
    settle(&ctx);
    for _ in 0..3 {
        assert!(!ctx.poll_nonblocking(), "the writer waits without spinning");
    }
    assert!(!writer.is_finished());
    // The peer reads everything; the writer resumes as room appears.
    b.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0; 8192];
    while got.len() < filled + expected.len() {
        match (&b).read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                ctx.poll();
            }
            Err(e) => panic!("{e}"),
        }
    }
    settle(&ctx);
    ctx.block_on(writer).unwrap().unwrap();
    assert_eq!(&got[filled..], &expected[..]);
}

/// An empty buffer reads nothing at once, with no data queued (a non-blocking socket answers
/// `EAGAIN` there, which must not turn into a wait) and with data queued, which stays for the
/// next read. Found by a new-user trial: codec code ported from tokio hung on a full buffer.
#[test]
#[cfg_attr(miri, ignore = "no socketpair ioctl under Miri")]
fn an_empty_buffer_reads_zero_at_once() {
    let ctx = ctx();
    let (a, mut b) = UnixStream::pair().unwrap();
    let a = AsyncFd::with_context(&ctx, a).unwrap();
    // Bounded, so that a regression fails instead of hanging.
    let read = |buf: &mut [u8]| {
        ctx.block_on(ctx.timeout(std::time::Duration::from_secs(5), a.read(buf)))
            .expect("the read waited")
    };
    assert_eq!(read(&mut []).unwrap(), 0, "nothing queued");
    b.write_all(b"data").unwrap();
    assert_eq!(read(&mut []).unwrap(), 0, "data queued");
    let mut buf = [0; 8];
    assert_eq!(read(&mut buf).unwrap(), 4, "the data stayed");
}

#[test]
#[cfg_attr(miri, ignore = "no socketpair ioctl under Miri")]
fn end_of_file_reads_zero() {
    let ctx = ctx();
    let (a, mut b) = UnixStream::pair().unwrap();
    let a = AsyncFd::with_context(&ctx, a).unwrap();
    b.write_all(b"last").unwrap();
    drop(b);
    let mut buf = [0; 16];
    assert_eq!(ctx.block_on(a.read(&mut buf)).unwrap(), 4);
    assert_eq!(ctx.block_on(a.read(&mut buf)).unwrap(), 0);
    assert_eq!(ctx.block_on(a.read(&mut buf)).unwrap(), 0, "and again");

    // A pipe: end of file once the writer waits and then closes.
    let (r, mut w) = io::pipe().unwrap();
    let r = AsyncFd::with_context(&ctx, r).unwrap();
    let closer = thread::spawn(move || {
        thread::sleep(std::time::Duration::from_millis(5));
        w.write_all(b"xy").unwrap();
    });
    let mut all = Vec::new();
    loop {
        let n = ctx.block_on(r.read(&mut buf)).unwrap();
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
    }
    closer.join().unwrap();
    assert_eq!(all, b"xy");
}

#[test]
#[cfg_attr(miri, ignore = "no socketpair ioctl under Miri")]
fn no_busy_loop_while_data_is_pending_and_nobody_waits() {
    let ctx = ctx();
    let (a, mut b) = UnixStream::pair().unwrap();
    let a = Rc::new(AsyncFd::with_context(&ctx, a).unwrap());
    let fd = a.clone();
    // One wait, no read: the data stays.
    let task = ctx.spawn_local(async move { fd.readable().await.map(drop) });
    settle(&ctx);
    b.write_all(b"pending").unwrap();
    ctx.block_on(task).unwrap().unwrap();
    // The handler fires at most once more (with no waiter) and then stops watching.
    settle(&ctx);
    assert_eq!(a.interest(), Interest::empty());
    for _ in 0..10 {
        assert!(!ctx.poll_nonblocking(), "the readable fd makes no progress");
    }
    // A new wait completes at once: the fd was reported readable and nothing cleared it.
    let mut buf = [0; 16];
    assert_eq!(ctx.block_on(a.read(&mut buf)).unwrap(), 7);
    assert_eq!(&buf[..7], b"pending");

    // Drained: the next read attempt would block and clears the readiness.
    let mut guard = ctx.block_on(a.readable()).unwrap();
    assert!(guard.try_io(|s| (&*s).read(&mut [0; 1])).is_err());
    // A wait that is dropped before the data comes: same, once the loop sees the data.
    let mut wait = Box::pin(a.readable());
    let noop = std::task::Waker::noop();
    assert!(
        wait.as_mut()
            .poll(&mut std::task::Context::from_waker(noop))
            .is_pending()
    );
    drop(wait);
    b.write_all(b"more").unwrap();
    settle(&ctx);
    assert_eq!(a.interest(), Interest::empty());
    assert!(!ctx.poll_nonblocking());
}

#[test]
#[cfg_attr(miri, ignore = "no socketpair ioctl under Miri")]
fn a_reader_and_a_writer_on_one_fd() {
    const TOTAL: usize = 1 << 20;
    let ctx = ctx();
    let (a, b) = UnixStream::pair().unwrap();
    // The peer echoes everything on a thread, with blocking I/O.
    let echo = thread::spawn(move || {
        let mut buf = vec![0; 16384];
        let mut b = b;
        loop {
            let n = b.read(&mut buf).unwrap();
            if n == 0 {
                return;
            }
            b.write_all(&buf[..n]).unwrap();
        }
    });
    let a = Rc::new(AsyncFd::with_context(&ctx, a).unwrap());
    let both = Rc::new(Cell::new(false));
    let (wfd, rfd, seen) = (a.clone(), a.clone(), both.clone());
    let writer = ctx.spawn_local(async move {
        let data: Vec<u8> = (0..TOTAL).map(|i| (i % 253) as u8).collect();
        for chunk in data.chunks(100_000) {
            wfd.write_all(chunk).await?;
        }
        wfd.get_ref().shutdown(std::net::Shutdown::Write)?;
        Ok::<_, io::Error>(())
    });
    let reader = ctx.spawn_local(async move {
        let mut got = Vec::with_capacity(TOTAL);
        let mut buf = vec![0; 30_000];
        loop {
            if rfd.interest() == Interest::READ | Interest::WRITE {
                seen.set(true);
            }
            let n = rfd.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, io::Error>(got);
            }
            got.extend_from_slice(&buf[..n]);
        }
    });
    ctx.block_on(writer).unwrap().unwrap();
    let got = ctx.block_on(reader).unwrap().unwrap();
    echo.join().unwrap();
    assert_eq!(got.len(), TOTAL);
    assert!(got.iter().enumerate().all(|(i, &v)| v == (i % 253) as u8));
    assert!(both.get(), "both directions were watched at once");
}

#[test]
#[cfg_attr(miri, ignore = "no socketpair ioctl under Miri")]
fn dropping_the_async_fd_unregisters_its_handler() {
    let ctx = ctx();
    let (a, mut b) = UnixStream::pair().unwrap();
    // In an `Rc`, so that the plain handlers below can take a clone of the very fd (a
    // `try_clone` would be another number, which no `AlreadyExists` would meet).
    let a = AsyncFd::with_context(&ctx, Rc::new(a)).unwrap();
    let mut wait = Box::pin(a.readable());
    let noop = std::task::Waker::noop();
    assert!(
        wait.as_mut()
            .poll(&mut std::task::Context::from_waker(noop))
            .is_pending()
    );
    drop(wait);
    assert_eq!(a.interest(), Interest::READ);
    // A second registration of the same fd is refused while the first one lives, in both
    // directions.
    let err = ctx
        .fd_handler(Rc::clone(a.get_ref()))
        .on_read(|_| ())
        .register()
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    let stream = a.into_inner();
    // Gone: the fd can be registered again, and nothing fires for it.
    let again = AsyncFd::with_context(&ctx, stream).unwrap();
    let err = AsyncFd::with_context(&ctx, again.get_ref().try_clone().unwrap());
    assert!(err.is_ok(), "a duplicate is another fd number");
    let same = ctx
        .fd_handler(Rc::clone(again.get_ref()))
        .on_read(|_| ())
        .register();
    assert!(same.is_ok(), "nothing awaited yet: no handler");
    let mut wait = Box::pin(again.readable());
    let poll = wait
        .as_mut()
        .poll(&mut std::task::Context::from_waker(noop));
    assert!(
        matches!(poll, std::task::Poll::Ready(Err(ref e)) if e.kind() == io::ErrorKind::AlreadyExists),
        "the wait reports the conflict: {poll:?}"
    );
    drop(wait);
    drop(same);
    b.write_all(b"x").unwrap();
    assert!(!ctx.poll_nonblocking(), "no handler fires for the fd");
    drop(again);
}

/// `get_mut` removes the handler before it hands out the fd, so the fd may be replaced: the
/// old one closes with nothing watching it (its peer reads end of file), and the next wait
/// watches the new one, not the old number.
#[test]
#[cfg_attr(miri, ignore = "no socketpair ioctl under Miri")]
fn an_fd_replaced_through_get_mut_is_the_one_watched_next() {
    let ctx = ctx();
    let (a, old_peer) = UnixStream::pair().unwrap();
    let mut a = AsyncFd::with_context(&ctx, a).unwrap();
    // Registered: a wait watches the first socket, and ends without data when dropped.
    {
        let mut wait = Box::pin(a.readable());
        let noop = &mut std::task::Context::from_waker(std::task::Waker::noop());
        assert!(wait.as_mut().poll(noop).is_pending());
    }
    assert_eq!(
        a.interest(),
        Interest::READ,
        "the dropped wait left its handler"
    );
    let (new, mut new_peer) = UnixStream::pair().unwrap();
    new.set_nonblocking(true).unwrap();
    let old = std::mem::replace(a.get_mut(), new);
    assert_eq!(
        a.interest(),
        Interest::empty(),
        "get_mut removed the handler"
    );
    drop(old);
    old_peer.set_nonblocking(true).unwrap();
    assert_eq!(
        (&old_peer).read(&mut [0; 4]).unwrap(),
        0,
        "the old fd is closed"
    );
    // The next wait is for the new socket: it registers before the data comes.
    let a = Rc::new(a);
    let reader = a.clone();
    let task = ctx.spawn_local(async move {
        let mut buf = [0; 8];
        let n = reader.read(&mut buf).await?;
        Ok::<_, io::Error>(buf[..n].to_vec())
    });
    settle(&ctx);
    assert_eq!(a.interest(), Interest::READ, "the wait registered");
    new_peer.write_all(b"new").unwrap();
    let got = ctx.block_on(task).unwrap();
    assert_eq!(got.unwrap(), b"new");
}

/// `get_mut` forgets the readiness the loop reported for the old fd: a wait right after it is
/// for the loop again, even when the old fd was marked readable and nothing consumed it.
#[test]
#[cfg_attr(miri, ignore = "no socketpair ioctl under Miri")]
fn get_mut_forgets_the_readiness_reported_before() {
    let ctx = ctx();
    let (a, mut b) = UnixStream::pair().unwrap();
    let mut a = AsyncFd::with_context(&ctx, a).unwrap();
    b.write_all(b"x").unwrap();
    ctx.block_on(async { a.readable().await.map(drop) })
        .unwrap();
    let noop = &mut std::task::Context::from_waker(std::task::Waker::noop());
    // Marked readable: a wait completes without the loop.
    assert!(Box::pin(a.readable()).as_mut().poll(noop).is_ready());
    a.get_mut();
    // Forgotten: the wait registers and needs the loop to report the fd again.
    let mut wait = Box::pin(a.readable());
    assert!(wait.as_mut().poll(noop).is_pending());
    assert_eq!(a.interest(), Interest::READ);
    drop(wait);
}
