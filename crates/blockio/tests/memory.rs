//! Buffer ownership of the io_uring and native AIO engines, for valgrind (xtask's memcheck
//! list): contexts dropped with 1 100 requests in flight (queued, or in the kernel), and a
//! byte-for-byte round trip of the buffer-carrying operations on the ring; the same two with
//! registered (fixed) buffers, whose pool memory the ring keeps while registered; pipe reads
//! blocked in the kernel at the drop (checked end to end) and native AIO `O_DIRECT` reads in
//! the device at the drop. No thread
//! pool is involved:
//! valgrind runs one thread at a time and cannot switch threads while one sleeps in
//! `io_uring_enter`, so a loop waiting there for a worker would never wake.

mod support;

use support::{pattern, ring, temp_file, uring_ctx};

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::sync::Arc;

use aio_core::AioContext;
use blockio::{BlockIo, Engine};

#[test]
fn buffers_round_trip_through_the_ring() {
    let Some(ctx) = uring_ctx() else { return };
    let io = BlockIo::of(&ctx);
    assert_eq!(io.engine(), Engine::IoUring);
    let file = temp_file();
    let data = pattern(3000, 5);
    type Got = Rc<RefCell<Option<(io::Result<usize>, Vec<u8>)>>>;
    let got: Got = Rc::default();
    let g = got.clone();
    io.write_at(&ctx, &file, data.clone(), 10, move |r, b| {
        *g.borrow_mut() = Some((r, b))
    });
    while got.borrow().is_none() {
        ctx.poll();
    }
    let (r, back) = got.borrow_mut().take().unwrap();
    assert_eq!(r.unwrap(), 3000);
    assert_eq!(back, data);
    let g = got.clone();
    io.read_at(&ctx, &file, vec![0; 4000], 10, move |r, b| {
        *g.borrow_mut() = Some((r, b))
    });
    while got.borrow().is_none() {
        ctx.poll();
    }
    let (r, buf) = got.borrow_mut().take().unwrap();
    assert_eq!(r.unwrap(), 3000);
    assert_eq!(buf[..3000], data[..]);
    let vgot = Rc::new(RefCell::new(None));
    let g = vgot.clone();
    io.readv(
        &ctx,
        &file,
        vec![vec![0; 1000], vec![0; 3000]],
        10,
        move |r, b| *g.borrow_mut() = Some((r.unwrap(), b)),
    );
    while vgot.borrow().is_none() {
        ctx.poll();
    }
    let (n, bufs): (usize, Vec<Vec<u8>>) = vgot.borrow_mut().take().unwrap();
    assert_eq!(n, 3000);
    assert_eq!(bufs.concat()[..3000], data[..]);
    let mut check = vec![0; 3000];
    file.read_exact_at(&mut check, 10).unwrap();
    assert_eq!(check, data);
}

#[test]
fn dropping_the_context_with_requests_in_flight() {
    let Some(ctx) = uring_ctx() else { return };
    let io = BlockIo::of(&ctx);
    let file = temp_file();
    file.write_all_at(&pattern(4096, 1), 0).unwrap();
    let (rx, _tx) = std::io::pipe().unwrap();
    let rx = Arc::new(File::from(std::os::fd::OwnedFd::from(rx)));
    let called = Rc::new(Cell::new(0));
    // 500 pipe reads that can only end by cancellation, and 500 file reads.
    for i in 0..1000 {
        let c = called.clone();
        let f = if i % 2 == 0 { &rx } else { &file };
        io.read_at(&ctx, f, vec![0; 4096], 0, move |_, _| c.set(c.get() + 1));
    }
    // Submit them (some file reads complete meanwhile), then queue 100 more that never
    // reach the kernel.
    ctx.poll_nonblocking();
    ctx.poll_nonblocking();
    for _ in 0..100 {
        let c = called.clone();
        io.read_at(&ctx, &rx, vec![0; 4096], 0, move |_, _| c.set(c.get() + 1));
    }
    let in_flight = ring(&ctx, |m| m.requests_in_flight());
    assert!(in_flight >= 600, "{in_flight} requests in flight");
    let ran = called.get();
    drop(ctx);
    // The drop reaped every request before freeing its memory: the keep-alives are gone, so
    // the files are held by nothing else, and no callback ran during the drop.
    assert_eq!(Arc::strong_count(&rx), 1, "pipe buffers freed, none leaked");
    assert_eq!(
        Arc::strong_count(&file),
        1,
        "file buffers freed, none leaked"
    );
    assert_eq!(called.get(), ran);
}

#[test]
fn dropping_a_context_with_native_aio_requests_in_flight() {
    let ctx = AioContext::new(Box::new(fdmon_epoll::EpollMonitor::new().unwrap())).unwrap();
    let io = match BlockIo::with_engine(&ctx, Engine::LinuxAio) {
        Ok(io) => io,
        Err(e) => return println!("skipped: {e}"),
    };
    let file = temp_file();
    file.write_all_at(&pattern(4096, 1), 0).unwrap();
    let called = Rc::new(Cell::new(0));
    for _ in 0..1000 {
        let c = called.clone();
        io.read_at(&ctx, &file, vec![0; 4096], 0, move |_, _| {
            c.set(c.get() + 1)
        });
    }
    // The submission BH runs: every request goes to the kernel; nothing is reaped yet.
    ctx.poll_nonblocking();
    for _ in 0..100 {
        let c = called.clone();
        io.write_at(&ctx, &file, vec![1; 4096], 0, move |_, _| {
            c.set(c.get() + 1)
        });
    }
    let ran = called.get();
    drop(ctx);
    // io_destroy waited for the kernel, then every request's memory was freed.
    assert_eq!(
        Arc::strong_count(&file),
        1,
        "no keep-alive survives the context"
    );
    assert_eq!(called.get(), ran, "no callback runs during the drop");
    let mut check = vec![0; 4096];
    file.read_exact_at(&mut check, 0).unwrap();
    assert_eq!(
        check,
        pattern(4096, 1),
        "queued writes never reached the file"
    );
}

#[test]
fn fixed_buffers_round_trip_through_the_ring() {
    let Some(ctx) = uring_ctx() else { return };
    let io = BlockIo::of(&ctx);
    let pool = blockio::FixedBufPool::new(&ctx, 4, 4096).expect("pool");
    if !pool.is_registered(&ctx) {
        println!("the ring refused the buffers: the plain path is checked instead");
    }
    let file = temp_file();
    let data = pattern(4096, 11);
    type Got = Rc<RefCell<Option<(io::Result<usize>, blockio::FixedBuf)>>>;
    let got: Got = Rc::default();
    let mut buf = pool.get().unwrap();
    buf.copy_from_slice(&data);
    let g = got.clone();
    io.write_fixed(&ctx, &file, buf, 0, 100, move |r, b| {
        *g.borrow_mut() = Some((r, b))
    });
    while got.borrow().is_none() {
        ctx.poll();
    }
    let (r, back) = got.borrow_mut().take().unwrap();
    assert_eq!(r.unwrap(), 4096);
    assert_eq!(&back[..], &data[..]);
    drop(back);
    let g = got.clone();
    let _held = pool.get().unwrap();
    let mut buf = pool.get().unwrap();
    buf.fill(0);
    io.read_fixed(&ctx, &file, buf, 96, 100, move |r, b| {
        *g.borrow_mut() = Some((r, b))
    });
    while got.borrow().is_none() {
        ctx.poll();
    }
    let (r, buf) = got.borrow_mut().take().unwrap();
    assert_eq!(r.unwrap(), 4000);
    assert_eq!(buf[96..], data[..4000]);
}

#[test]
fn dropping_the_context_with_fixed_requests_in_flight() {
    let Some(ctx) = uring_ctx() else { return };
    let io = BlockIo::of(&ctx);
    let pool = blockio::FixedBufPool::new(&ctx, 256, 4096).expect("pool");
    let file = temp_file();
    file.write_all_at(&pattern(4096, 1), 0).unwrap();
    let (rx, _tx) = std::io::pipe().unwrap();
    let rx = Arc::new(File::from(std::os::fd::OwnedFd::from(rx)));
    let called = Rc::new(Cell::new(0));
    // 100 pipe reads into fixed buffers that can only end by cancellation, 100 file reads.
    for i in 0..200 {
        let c = called.clone();
        let f = if i % 2 == 0 { &rx } else { &file };
        let buf = pool.get().unwrap();
        io.read_fixed(&ctx, f, buf, 0, 0, move |_, _| c.set(c.get() + 1));
    }
    ctx.poll_nonblocking();
    ctx.poll_nonblocking();
    // 50 more that never reach the kernel.
    for _ in 0..50 {
        let c = called.clone();
        let buf = pool.get().unwrap();
        io.read_fixed(&ctx, &rx, buf, 0, 0, move |_, _| c.set(c.get() + 1));
    }
    let in_flight = ring(&ctx, |m| m.requests_in_flight());
    assert!(in_flight >= 150, "{in_flight} requests in flight");
    assert!(pool.available() <= 256 - in_flight);
    let ran = called.get();
    // The pool handle goes first: the leases in the requests and the ring's registration
    // keep the memory.
    let check = pool.clone();
    drop(pool);
    drop(ctx);
    // Every request was reaped before its lease went back; none leaked, no callback ran.
    assert_eq!(check.available(), 256, "every lease back in the pool");
    assert_eq!(Arc::strong_count(&rx), 1, "pipe requests freed");
    assert_eq!(Arc::strong_count(&file), 1, "file requests freed");
    assert_eq!(called.get(), ran);
    // The memory is still usable through the remaining handle (the ring, closed, let go of
    // its clone).
    let mut b = check.get().unwrap();
    b.fill(7);
    assert!(b.iter().all(|&x| x == 7));
}

/// [URING-2]'s drop claim end to end, which valgrind cannot see (the kernel's writes bypass
/// it): reads of an empty pipe are blocked in the kernel when the context is dropped, so if
/// one outlived the drop it would take bytes written afterwards, into freed memory. Every
/// byte must still be in the pipe, and every fixed buffer back in its pool.
#[test]
fn after_the_drop_no_read_is_left_in_the_kernel() {
    let Some(ctx) = uring_ctx() else { return };
    let io = BlockIo::of(&ctx);
    let pool = blockio::FixedBufPool::new(&ctx, 64, 4096).unwrap();
    let (rx, mut tx) = io::pipe().unwrap();
    let rx = Arc::new(File::from(std::os::fd::OwnedFd::from(rx)));
    for i in 0..300 {
        match i % 5 {
            0 => {
                io.read_fixed(&ctx, &rx, pool.get().unwrap(), 0, 0, |_, _| {});
            }
            1 => {
                io.readv(&ctx, &rx, vec![vec![0; 8], vec![0; 8]], 0, |_, _| {});
            }
            _ => {
                io.read_at(&ctx, &rx, vec![0; 16], 0, |_, _| {});
            }
        }
    }
    ctx.poll_nonblocking();
    ctx.poll_nonblocking();
    let in_kernel = ring(&ctx, |m| m.requests_in_flight());
    assert_eq!(in_kernel, 300, "every read waits in the kernel");
    drop(ctx);
    use std::io::{Read, Write};
    tx.write_all(&[0xAA; 4096]).unwrap();
    drop(tx);
    let mut back = Vec::new();
    (&*rx).read_to_end(&mut back).unwrap();
    assert_eq!(
        back.len(),
        4096,
        "a read outlived the context and took bytes"
    );
    assert_eq!(
        Arc::strong_count(&rx),
        1,
        "no keep-alive survives the context"
    );
    assert_eq!(pool.available(), 64, "every lease is back");
}

/// Native AIO requests really in the kernel when the context is dropped: `O_DIRECT` reads
/// of a file on disk, which complete in the device after `io_submit` returns (page-cache
/// reads complete inside it), so that `io_destroy`'s wait ([LAIO-2]) is what keeps their
/// buffers alive. No callback runs during the drop, and nothing survives it.
#[test]
fn dropping_a_context_with_native_aio_o_direct_reads_in_the_kernel() {
    let Some(file) = support::temp_file_on_disk(true) else {
        return;
    };
    let ctx = AioContext::new(Box::new(fdmon_epoll::EpollMonitor::new().unwrap())).unwrap();
    let io = match BlockIo::with_engine(&ctx, Engine::LinuxAio) {
        Ok(io) => io,
        Err(e) => {
            println!("skipped: {e}");
            return;
        }
    };
    let align = blockio::DirectAlign::of(&file).unwrap();
    file.set_len(64 << 20).unwrap();
    let called = Rc::new(Cell::new(0));
    for i in 0..200u64 {
        let c = called.clone();
        let (buf, start) = align.buffer(1 << 16);
        io.read_into(&ctx, &file, buf, start, (i % 64) << 20, move |_, _| {
            c.set(c.get() + 1)
        });
    }
    // Runs the submission BH: the reads go to the kernel.
    ctx.poll_nonblocking();
    let ran = called.get();
    drop(ctx);
    assert_eq!(called.get(), ran, "no callback runs during the drop");
    assert_eq!(
        Arc::strong_count(&file),
        1,
        "no keep-alive survives the context"
    );
}
