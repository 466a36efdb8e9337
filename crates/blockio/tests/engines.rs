//! Every block I/O operation on every engine (io_uring on the context's ring, the thread pool
//! on an io_uring, epoll and poll context, Linux native AIO on epoll and io_uring) against a
//! temporary file, checked byte for byte; short reads at end of file; cancellation before,
//! during and after completion, and through another context; nested polls inside
//! completions, blocking ones two deep inside each engine's own reads; a panicking callback;
//! batching of one iteration's requests into one `io_uring_enter`. The memory paths of the
//! io_uring and native AIO engines, which valgrind runs, are in `memory.rs`.

mod support;

use support::{Slot, pattern, ring, setups, temp_file, uring_ctx, wait_for};

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::sync::Arc;

use aio_core::AioContext;
use blockio::{BlockIo, Engine};

#[test]
fn every_operation_on_every_engine() {
    for (name, ctx, io) in setups() {
        let file = temp_file();

        // write_at, then check the file with std.
        let data = pattern(10_000, 7);
        let slot: Slot<(io::Result<usize>, Vec<u8>)> = Rc::default();
        let s = slot.clone();
        io.write_at(&ctx, &file, data.clone(), 4096, move |r, b| {
            *s.borrow_mut() = Some((r, b))
        });
        let (r, back) = wait_for(&ctx, &slot);
        assert_eq!(r.unwrap(), data.len(), "{name}: write count");
        assert_eq!(back, data, "{name}: write buffer given back");
        let mut check = vec![0; 4096 + data.len()];
        file.read_exact_at(&mut check, 0).unwrap();
        assert!(check[..4096].iter().all(|&b| b == 0), "{name}: hole");
        assert_eq!(&check[4096..], &data[..], "{name}: written bytes");

        // read_at of the same range.
        let s = slot.clone();
        io.read_at(&ctx, &file, vec![0xff; data.len()], 4096, move |r, b| {
            *s.borrow_mut() = Some((r, b))
        });
        let (r, got) = wait_for(&ctx, &slot);
        assert_eq!(r.unwrap(), data.len(), "{name}: read count");
        assert_eq!(got, data, "{name}: read bytes");

        // writev of three buffers, then readv into three differently sized ones.
        let parts = vec![pattern(100, 1), pattern(5000, 2), pattern(3, 3)];
        let flat: Vec<u8> = parts.concat();
        let vslot: Slot<(io::Result<usize>, Vec<Vec<u8>>)> = Rc::default();
        let s = vslot.clone();
        io.writev(&ctx, &file, parts.clone(), 100_000, move |r, b| {
            *s.borrow_mut() = Some((r, b))
        });
        let (r, back) = wait_for(&ctx, &vslot);
        assert_eq!(r.unwrap(), flat.len(), "{name}: writev count");
        assert_eq!(back, parts, "{name}: writev buffers given back");
        let mut check = vec![0; flat.len()];
        file.read_exact_at(&mut check, 100_000).unwrap();
        assert_eq!(check, flat, "{name}: writev bytes");
        let s = vslot.clone();
        io.readv(
            &ctx,
            &file,
            vec![vec![0; 7], vec![0; 4000], vec![0; 1096]],
            100_000,
            move |r, b| *s.borrow_mut() = Some((r, b)),
        );
        let (r, got) = wait_for(&ctx, &vslot);
        assert_eq!(r.unwrap(), flat.len(), "{name}: readv count");
        assert_eq!(got.concat(), flat, "{name}: readv bytes");

        // fsync, fdatasync, fallocate, nop.
        let uslot: Slot<io::Result<()>> = Rc::default();
        let s = uslot.clone();
        io.fsync(&ctx, &file, move |r| *s.borrow_mut() = Some(r));
        wait_for(&ctx, &uslot).unwrap_or_else(|e| panic!("{name}: fsync: {e}"));
        let s = uslot.clone();
        io.fdatasync(&ctx, &file, move |r| *s.borrow_mut() = Some(r));
        wait_for(&ctx, &uslot).unwrap_or_else(|e| panic!("{name}: fdatasync: {e}"));
        let s = uslot.clone();
        io.fallocate(&ctx, &file, 0, 0, 1 << 20, move |r| {
            *s.borrow_mut() = Some(r)
        });
        match wait_for(&ctx, &uslot) {
            Ok(()) => assert_eq!(file.metadata().unwrap().len(), 1 << 20, "{name}: size"),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                println!("{name}: fallocate unsupported by this file system")
            }
            Err(e) => panic!("{name}: fallocate: {e}"),
        }
        // The data written before is still there after the allocation.
        let mut check = vec![0; data.len()];
        file.read_exact_at(&mut check, 4096).unwrap();
        assert_eq!(check, data, "{name}: data after fallocate");
        let s = uslot.clone();
        io.nop(&ctx, move |r| *s.borrow_mut() = Some(r));
        wait_for(&ctx, &uslot).unwrap_or_else(|e| panic!("{name}: nop: {e}"));
    }
}

#[test]
fn short_reads_at_end_of_file() {
    for (name, ctx, io) in setups() {
        let file = temp_file();
        let data = pattern(100, 9);
        file.write_all_at(&data, 0).unwrap();
        let slot: Slot<(io::Result<usize>, Vec<u8>)> = Rc::default();
        let s = slot.clone();
        io.read_at(&ctx, &file, vec![0xee; 4096], 50, move |r, b| {
            *s.borrow_mut() = Some((r, b))
        });
        let (r, buf) = wait_for(&ctx, &slot);
        assert_eq!(r.unwrap(), 50, "{name}: short read");
        assert_eq!(buf.len(), 4096, "{name}: buffer length unchanged");
        assert_eq!(&buf[..50], &data[50..], "{name}: bytes read");
        assert!(
            buf[50..].iter().all(|&b| b == 0xee),
            "{name}: rest untouched"
        );

        let s = slot.clone();
        io.read_at(&ctx, &file, vec![0; 10], 1000, move |r, b| {
            *s.borrow_mut() = Some((r, b))
        });
        assert_eq!(
            wait_for(&ctx, &slot).0.unwrap(),
            0,
            "{name}: read past the end"
        );

        // A vectored read that ends inside its second buffer.
        let vslot: Slot<(io::Result<usize>, Vec<Vec<u8>>)> = Rc::default();
        let s = vslot.clone();
        io.readv(
            &ctx,
            &file,
            vec![vec![0; 60], vec![0; 60]],
            0,
            move |r, b| *s.borrow_mut() = Some((r, b)),
        );
        let (r, bufs) = wait_for(&ctx, &vslot);
        assert_eq!(r.unwrap(), 100, "{name}: short readv");
        assert_eq!(bufs[0][..], data[..60], "{name}: first buffer");
        assert_eq!(bufs[1][..40], data[60..], "{name}: second buffer");
    }
}

#[test]
fn reads_and_writes_from_an_offset_in_the_buffer_leave_its_head_alone() {
    for (name, ctx, io) in setups() {
        let file = temp_file();
        let data = pattern(5000, 3);
        // write_from: only `buf[start..]` reaches the file.
        let mut buf = vec![0xaa; 24];
        buf.extend_from_slice(&data);
        let slot: Slot<(io::Result<usize>, Vec<u8>)> = Rc::default();
        let s = slot.clone();
        io.write_from(&ctx, &file, buf, 24, 512, move |r, b| {
            *s.borrow_mut() = Some((r, b))
        });
        let (r, buf) = wait_for(&ctx, &slot);
        assert_eq!(r.unwrap(), 5000, "{name}: write_from count");
        assert_eq!(buf.len(), 5024, "{name}: buffer given back whole");
        let mut on_disk = vec![0; 5512];
        file.read_exact_at(&mut on_disk, 0).unwrap();
        assert!(on_disk[..512].iter().all(|&b| b == 0), "{name}: before");
        assert_eq!(on_disk[512..], data[..], "{name}: written bytes");

        // read_into: the head keeps its bytes, the rest is the file's.
        let s = slot.clone();
        io.read_into(&ctx, &file, vec![0x55; 1000], 16, 600, move |r, b| {
            *s.borrow_mut() = Some((r, b))
        });
        let (r, buf) = wait_for(&ctx, &slot);
        assert_eq!(r.unwrap(), 984, "{name}: read_into count");
        assert!(
            buf[..16].iter().all(|&b| b == 0x55),
            "{name}: head untouched"
        );
        assert_eq!(buf[16..], data[88..88 + 984], "{name}: bytes read");

        // A start at the very end transfers nothing; one past it is refused, in `done`.
        let s = slot.clone();
        io.read_into(&ctx, &file, vec![1; 8], 8, 0, move |r, b| {
            *s.borrow_mut() = Some((r, b))
        });
        assert_eq!(wait_for(&ctx, &slot).0.unwrap(), 0, "{name}: empty range");
        for write in [false, true] {
            let s = slot.clone();
            let done = move |r, b| *s.borrow_mut() = Some((r, b));
            if write {
                io.write_from(&ctx, &file, vec![1; 8], 9, 0, done);
            } else {
                io.read_into(&ctx, &file, vec![1; 8], 9, 0, done);
            }
            assert!(slot.borrow().is_none(), "{name}: done ran inside the call");
            let (r, buf) = wait_for(&ctx, &slot);
            assert_eq!(
                r.unwrap_err().kind(),
                io::ErrorKind::InvalidInput,
                "{name}: start past the end (write: {write})"
            );
            assert_eq!(buf, vec![1; 8], "{name}: the buffer comes back");
        }
    }
}

#[test]
fn a_read_of_a_write_only_file_reports_the_errno() {
    for (name, ctx, io) in setups() {
        // A write-only file cannot be read: EBADF on every engine.
        let path = std::env::temp_dir().join(format!("blockio-wo-{}-{name}", std::process::id()));
        let file = Arc::new(File::create(&path).unwrap());
        std::fs::remove_file(&path).unwrap();
        let slot: Slot<(io::Result<usize>, Vec<u8>)> = Rc::default();
        let s = slot.clone();
        io.read_at(&ctx, &file, vec![1, 2, 3], 0, move |r, b| {
            *s.borrow_mut() = Some((r, b))
        });
        let (r, buf) = wait_for(&ctx, &slot);
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EBADF), "{name}");
        assert_eq!(buf, [1, 2, 3], "{name}: buffer given back on error");
    }
}

/// A completed read or write keeps no hold on its file: once its callback has run, the
/// engine has let go of the file (the io_uring engine keeps the emptied box of a request's
/// keep-alive for the next one, but not what it held), so dropping the caller's handle
/// closes it. Ten requests on one file, then one on a second file, which takes the box the
/// first file's requests used.
#[test]
fn a_completed_request_keeps_no_hold_on_its_file() {
    for (name, ctx, io) in setups() {
        let (first, second) = (temp_file(), temp_file());
        let slot: Slot<(io::Result<usize>, Vec<u8>)> = Rc::default();
        for i in 0..10 {
            let s = slot.clone();
            let done = move |r, b| *s.borrow_mut() = Some((r, b));
            if i % 2 == 0 {
                io.write_at(&ctx, &first, vec![i; 512], 512 * u64::from(i), done);
            } else {
                io.read_at(&ctx, &first, vec![0; 512], 0, done);
            }
            let (r, _) = wait_for(&ctx, &slot);
            assert_eq!(r.unwrap(), 512, "{name}: request {i}");
            assert_eq!(
                Arc::strong_count(&first),
                1,
                "{name}: request {i}'s file still held"
            );
        }
        let s = slot.clone();
        io.read_at(&ctx, &second, vec![0; 16], 0, move |r, b| {
            *s.borrow_mut() = Some((r, b))
        });
        let (r, _) = wait_for(&ctx, &slot);
        assert_eq!(r.unwrap(), 0, "{name}: an empty file");
        assert_eq!(Arc::strong_count(&first), 1, "{name}: first file");
        assert_eq!(Arc::strong_count(&second), 1, "{name}: second file");
    }
}

/// A context driven by an outer loop (`prepare`, `check`, `dispatch`: what the glib, tokio and
/// calloop adapters do) runs the completions of its ring's requests: `check` reports one its
/// wait reaped although no fd was ready, and `dispatch` runs it. Before, `check` said there was
/// nothing to do while `prepare` kept the loop from sleeping: a busy loop that never ran it.
#[test]
fn an_outer_loop_runs_ring_completions() {
    let Some(ctx) = uring_ctx() else {
        println!("skipped: no io_uring context here");
        return;
    };
    let io = BlockIo::of(&ctx);
    let file = temp_file();
    file.write_all_at(b"xyz", 0).unwrap();
    let slot: Slot<(io::Result<usize>, Vec<u8>)> = Rc::default();
    let s = slot.clone();
    io.read_at(&ctx, &file, vec![0; 3], 0, move |r, b| {
        *s.borrow_mut() = Some((r, b))
    });
    for _ in 0..1000 {
        // An outer loop would sleep on `outer_fds` for at most this long.
        if let Some(t) = ctx.prepare() {
            std::thread::sleep(t.min(std::time::Duration::from_millis(1)));
        }
        if ctx.check() {
            ctx.dispatch();
        }
        if let Some((r, buf)) = slot.borrow_mut().take() {
            assert_eq!(r.unwrap(), 3);
            assert_eq!(buf, b"xyz");
            return;
        }
    }
    panic!("an outer loop never ran the read's completion in 1 000 rounds");
}

#[test]
fn cancel_before_submission() {
    for (name, ctx, io) in setups() {
        let file = temp_file();
        let slot: Slot<(io::Result<usize>, Vec<u8>)> = Rc::default();
        let s = slot.clone();
        // Neither engine starts a request before the context polls: the ring submits in the
        // next wait, and a fresh pool has no thread yet.
        let op = io.read_at(&ctx, &file, vec![5; 64], 0, move |r, b| {
            *s.borrow_mut() = Some((r, b))
        });
        assert!(
            op.cancel(&ctx),
            "{name}: a pending request can be cancelled"
        );
        let (r, buf) = wait_for(&ctx, &slot);
        assert_eq!(
            r.unwrap_err().raw_os_error(),
            Some(libc::ECANCELED),
            "{name}"
        );
        assert_eq!(buf, vec![5; 64], "{name}: buffer given back");
        assert!(!op.cancel(&ctx), "{name}: a completed request cannot be");
    }
}

#[test]
fn cancel_after_completion_changes_nothing() {
    for (name, ctx, io) in setups() {
        let file = temp_file();
        file.write_all_at(b"abc", 0).unwrap();
        let calls = Rc::new(Cell::new(0));
        let slot: Slot<(io::Result<usize>, Vec<u8>)> = Rc::default();
        let (s, c) = (slot.clone(), calls.clone());
        let op = io.read_at(&ctx, &file, vec![0; 3], 0, move |r, b| {
            c.set(c.get() + 1);
            *s.borrow_mut() = Some((r, b))
        });
        let (r, buf) = wait_for(&ctx, &slot);
        assert_eq!(r.unwrap(), 3, "{name}");
        assert_eq!(buf, b"abc", "{name}");
        assert!(!op.cancel(&ctx), "{name}");
        ctx.poll_nonblocking();
        assert_eq!(calls.get(), 1, "{name}: called exactly once");
    }
}

#[test]
fn cancel_during_a_read_the_kernel_is_blocked_on() {
    // A read of an empty pipe waits in the kernel; only io_uring can stop it (a thread pool
    // `pread` of a pipe fails with ESPIPE at once).
    let Some(ctx) = uring_ctx() else { return };
    let io = BlockIo::of(&ctx);
    let (rx, mut tx) = std::io::pipe().unwrap();
    let rx = Arc::new(File::from(std::os::fd::OwnedFd::from(rx)));
    let slot: Slot<(io::Result<usize>, Vec<u8>)> = Rc::default();
    let s = slot.clone();
    let op = io.read_at(&ctx, &rx, vec![9; 16], 0, move |r, b| {
        *s.borrow_mut() = Some((r, b))
    });
    // Submitted, and still waiting for data.
    for _ in 0..3 {
        ctx.poll_nonblocking();
    }
    assert!(slot.borrow().is_none());
    assert_eq!(ring(&ctx, |m| m.requests_in_flight()), 1);
    assert!(op.cancel(&ctx));
    let (r, buf) = wait_for(&ctx, &slot);
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::ECANCELED));
    assert_eq!(buf, vec![9; 16]);
    // The pipe still works, and nothing read the byte written now.
    use std::io::Write;
    tx.write_all(b"z").unwrap();
    let s = slot.clone();
    io.read_at(&ctx, &rx, vec![0; 16], 0, move |r, b| {
        *s.borrow_mut() = Some((r, b))
    });
    let (r, buf) = wait_for(&ctx, &slot);
    assert_eq!(r.unwrap(), 1);
    assert_eq!(buf[0], b'z');
}

#[test]
fn a_completion_counts_as_progress_and_may_poll_again() {
    for (name, ctx, io) in setups() {
        let file = temp_file();
        file.write_all_at(b"nested", 0).unwrap();
        let inner: Slot<(io::Result<usize>, Vec<u8>)> = Rc::default();
        let outer_done = Rc::new(Cell::new(false));
        let (i, o, f) = (inner.clone(), outer_done.clone(), file.clone());
        io.nop(&ctx, move |r| {
            r.unwrap();
            let ctx = AioContext::current().unwrap();
            let i2 = i.clone();
            io.read_at(&ctx, &f, vec![0; 6], 0, move |r, b| {
                *i2.borrow_mut() = Some((r, b))
            });
            // A nested poll runs the next completion while this one is still running.
            while i.borrow().is_none() {
                ctx.poll();
            }
            o.set(true);
        });
        let mut progress = false;
        while !outer_done.get() {
            progress |= ctx.poll();
        }
        assert!(progress, "{name}: progress reported");
        let (r, buf) = inner.borrow_mut().take().unwrap();
        assert_eq!(r.unwrap(), 6, "{name}");
        assert_eq!(buf, b"nested", "{name}");
    }
}

/// Completions reaped together, whose callbacks each submit a new request: the new requests
/// reuse the request-table slots the reaped ones freed while later completions of the same
/// batch still wait to run, so a callback keyed by slot alone would be overwritten and its
/// completion lost (seen in the NBD tests once: a pipelined client waited forever). Every one
/// of 2 000 requests must complete exactly once.
#[test]
fn completions_whose_callbacks_submit_again_all_run() {
    for (name, ctx, io) in setups() {
        let file = temp_file();
        file.write_all_at(&pattern(4096, 5), 0).unwrap();
        const TOTAL: usize = 2_000;
        const DEPTH: usize = 32;
        let issued = Rc::new(Cell::new(0usize));
        let done = Rc::new(Cell::new(0usize));
        fn issue(
            io: BlockIo,
            ctx: &AioContext,
            file: &Arc<File>,
            issued: &Rc<Cell<usize>>,
            done: &Rc<Cell<usize>>,
        ) {
            if issued.get() == TOTAL {
                return;
            }
            issued.set(issued.get() + 1);
            let (f, i, d) = (file.clone(), issued.clone(), done.clone());
            io.read_at(ctx, file, vec![0; 512], 0, move |r, _| {
                assert_eq!(r.unwrap(), 512);
                d.set(d.get() + 1);
                let ctx = AioContext::current().unwrap();
                issue(io, &ctx, &f, &i, &d);
            });
        }
        for _ in 0..DEPTH {
            issue(io, &ctx, &file, &issued, &done);
        }
        // Never blocking, so that a lost completion fails the test instead of hanging it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while done.get() < TOTAL {
            ctx.poll_nonblocking();
            assert!(
                std::time::Instant::now() < deadline,
                "{name}: only {} of {TOTAL} completions ran",
                done.get()
            );
        }
        assert_eq!(issued.get(), TOTAL, "{name}");
    }
}

#[test]
fn one_iteration_submits_its_requests_in_one_enter() {
    let Some(ctx) = uring_ctx() else { return };
    let io = BlockIo::of(&ctx);
    let enters = |ctx: &AioContext| ring(ctx, |m| m.enter_calls());
    let done = Rc::new(Cell::new(0));
    for _ in 0..64 {
        let d = done.clone();
        io.nop(&ctx, move |r| {
            r.unwrap();
            d.set(d.get() + 1)
        });
    }
    let before = enters(&ctx);
    assert!(ctx.poll_nonblocking(), "completions are progress");
    assert_eq!(enters(&ctx) - before, 1, "64 requests, one io_uring_enter");
    assert_eq!(done.get(), 64);

    // More than the 128-entry submission queue holds: queued and submitted in rounds.
    for _ in 0..1000 {
        let d = done.clone();
        io.nop(&ctx, move |r| {
            r.unwrap();
            d.set(d.get() + 1)
        });
    }
    while done.get() < 1064 {
        ctx.poll();
    }
}

#[test]
fn explicit_io_uring_engine_needs_an_io_uring_context() {
    let ctx = AioContext::new(Box::new(fdmon_poll::PollMonitor::new().unwrap())).unwrap();
    let err = BlockIo::with_engine(&ctx, Engine::IoUring).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::Unsupported);
    assert!(err.to_string().contains("poll"), "{err}");
}

#[test]
fn an_io_uring_block_io_used_on_another_context_fails_cleanly() {
    let Some(uring) = uring_ctx() else { return };
    let io = BlockIo::of(&uring);
    let ctx = AioContext::new(Box::new(fdmon_poll::PollMonitor::new().unwrap())).unwrap();
    let file = temp_file();
    let slot: Slot<(io::Result<usize>, Vec<u8>)> = Rc::default();
    let s = slot.clone();
    io.read_at(&ctx, &file, vec![4; 8], 0, move |r, b| {
        *s.borrow_mut() = Some((r, b))
    });
    let (r, buf) = wait_for(&ctx, &slot);
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EOPNOTSUPP));
    assert_eq!(buf, vec![4; 8], "buffer given back");
}

#[test]
fn futures_over_the_callbacks() {
    for (name, ctx, io) in setups() {
        let file = temp_file();
        let (r, buf) = ctx.block_on(io.write_at_async(&ctx, &file, b"future".to_vec(), 2));
        assert_eq!(r.unwrap(), 6, "{name}");
        assert_eq!(buf, b"future", "{name}");
        ctx.block_on(io.fsync_async(&ctx, &file)).unwrap();
        // From a task, which awaits the read.
        let (c, f) = (ctx.clone(), file.clone());
        let task = ctx.spawn_local(async move {
            let (r, buf) = io.read_at_async(&c, &f, vec![0; 10], 0).await;
            (r.unwrap(), buf)
        });
        let (n, buf) = ctx.block_on(task).unwrap();
        assert_eq!(n, 8, "{name}");
        assert_eq!(&buf[..8], b"\0\0future", "{name}");
        // Every other operation's future, checked against the file.
        let (r, _) = ctx.block_on(io.write_from_async(&ctx, &file, b"..AB".to_vec(), 2, 20));
        assert_eq!(r.unwrap(), 2, "{name}");
        let (r, buf) = ctx.block_on(io.read_into_async(&ctx, &file, vec![b'-'; 4], 1, 19));
        assert_eq!((r.unwrap(), &buf[..]), (3, &b"-\0AB"[..]), "{name}");
        let (r, _) =
            ctx.block_on(io.writev_async(&ctx, &file, vec![b"C".to_vec(), b"DE".to_vec()], 30));
        assert_eq!(r.unwrap(), 3, "{name}");
        let (r, bufs) = ctx.block_on(io.readv_async(&ctx, &file, vec![vec![0; 2], vec![0; 1]], 30));
        assert_eq!(
            (r.unwrap(), bufs),
            (3, vec![b"CD".to_vec(), b"E".to_vec()]),
            "{name}"
        );
        ctx.block_on(io.fdatasync_async(&ctx, &file)).unwrap();
        ctx.block_on(io.fallocate_async(&ctx, &file, 0, 0, 4096))
            .unwrap();
        assert_eq!(
            file.metadata().unwrap().len(),
            4096,
            "{name}: fallocate extends"
        );
        ctx.block_on(io.nop_async(&ctx)).unwrap();
        let pool = blockio::FixedBufPool::unregistered(1, 4096).unwrap();
        let mut fixed = pool.get().unwrap();
        fixed[..3].copy_from_slice(b"fix");
        let (r, fixed) = ctx.block_on(io.write_fixed_async(&ctx, &file, fixed, 0, 40));
        assert_eq!(r.unwrap(), 4096, "{name}");
        let (r, fixed) = ctx.block_on(io.read_fixed_async(&ctx, &file, fixed, 1, 40));
        assert_eq!((r.unwrap(), &fixed[1..4]), (4095, &b"fix"[..]), "{name}");
    }
}

/// Polls `ctx` (blocking) until `done`, at most `limit` iterations: a nested wait that cannot
/// reach the completion it waits for either sleeps forever or spins, and the bound turns the
/// spin into a failure.
fn poll_until(ctx: &AioContext, limit: usize, what: &str, done: impl Fn() -> bool) {
    for _ in 0..limit {
        if done() {
            return;
        }
        ctx.poll();
    }
    assert!(done(), "{what}: not done after {limit} blocking iterations");
}

/// A completion callback of each engine's own read (not a `nop`, which native AIO leaves to
/// the thread pool) submits another read and waits for it with blocking nested polls, two
/// levels deep, on a cached file and, where the file system allows it, with `O_DIRECT` (whose
/// native AIO completions arrive after `io_submit`, through the eventfd that the running
/// handler cannot be re-entered to clear).
#[test]
fn blocking_nested_polls_inside_each_engines_own_completions() {
    let mut files = vec![("cached", temp_file())];
    if let Some(f) = support::temp_file_on_disk(true) {
        files.push(("O_DIRECT", f));
    }
    for (kind, file) in files {
        let align = blockio::DirectAlign::of(&file).unwrap();
        let data = pattern(3 * 4096, 7);
        // From an aligned buffer: the O_DIRECT file refuses another address (EINVAL).
        let (mut aligned, at) = align.buffer(data.len());
        aligned[at..].copy_from_slice(&data);
        file.write_all_at(&aligned[at..], 0).unwrap();
        for (name, ctx, io) in setups() {
            let what = format!("{name}, {kind}");
            let levels = Rc::new(RefCell::new(Vec::<Vec<u8>>::new()));
            // Level `depth` reads block `depth` and, below level 2, nests the next level.
            fn level(
                ctx: &AioContext,
                io: BlockIo,
                file: &Arc<File>,
                align: blockio::DirectAlign,
                depth: u64,
                levels: &Rc<RefCell<Vec<Vec<u8>>>>,
                what: &str,
            ) {
                let (buf, start) = align.buffer(4096);
                let (f, l, w) = (file.clone(), levels.clone(), what.to_owned());
                io.read_into(ctx, file, buf, start, depth * 4096, move |r, b| {
                    assert_eq!(r.unwrap(), 4096, "{w}: level {depth}");
                    if depth < 2 {
                        let ctx = AioContext::current().unwrap();
                        let before = l.borrow().len();
                        level(&ctx, io, &f, align, depth + 1, &l, &w);
                        poll_until(&ctx, 1000, &w, || l.borrow().len() > before);
                    }
                    l.borrow_mut().push(b[start..start + 4096].to_vec());
                });
            }
            level(&ctx, io, &file, align, 0, &levels, &what);
            poll_until(&ctx, 1000, &what, || levels.borrow().len() == 3);
            // Innermost first: each level finished only after the one it waited for.
            let got = levels.borrow();
            for (i, block) in got.iter().enumerate() {
                let depth = 2 - i;
                assert_eq!(
                    block[..],
                    data[depth * 4096..][..4096],
                    "{what}: level {depth}"
                );
            }
        }
    }
}

/// A callback that panics loses no other completion, and the completions left when it
/// unwound run in the next blocking iteration rather than after some unrelated event.
#[test]
fn a_panicking_callback_loses_no_other_completion() {
    const N: usize = 16;
    for (name, ctx, io) in setups() {
        let file = temp_file();
        file.write_all_at(&pattern(512, 3), 0).unwrap();
        let done = Rc::new(Cell::new(0usize));
        let first = Rc::new(Cell::new(true));
        for _ in 0..N {
            let (d, f) = (done.clone(), first.clone());
            io.read_at(&ctx, &file, vec![0; 512], 0, move |r, _| {
                assert_eq!(r.unwrap(), 512);
                d.set(d.get() + 1);
                if f.replace(false) {
                    panic!("a callback panics on purpose");
                }
            });
        }
        let mut panics = 0;
        for _ in 0..100 {
            if done.get() == N {
                break;
            }
            let poll = std::panic::AssertUnwindSafe(|| ctx.poll());
            if std::panic::catch_unwind(poll).is_err() {
                panics += 1;
            }
        }
        assert_eq!(panics, 1, "{name}");
        assert_eq!(
            done.get(),
            N,
            "{name}: completions lost after a panicking callback"
        );
    }
}

/// An `Op` cancelled through another context cancels nothing there, though request ids
/// repeat across contexts (the same slot and generation on both rings or AIO contexts).
#[test]
fn cancel_through_another_context_touches_nothing() {
    let mut pairs = Vec::new();
    if let (Some(a), Some(b)) = (uring_ctx(), uring_ctx()) {
        pairs.push(("io_uring", a, b, Engine::IoUring));
    }
    let epoll = || AioContext::new(Box::new(fdmon_epoll::EpollMonitor::new().unwrap())).unwrap();
    let (a, b) = (epoll(), epoll());
    if BlockIo::with_engine(&a, Engine::LinuxAio).is_ok() {
        pairs.push(("linux-aio", a, b, Engine::LinuxAio));
    }
    // The thread pool's requests too (which the native AIO engine's no-ops use): found by a
    // user trying the API, where the pool's cancel went through whatever the context.
    pairs.push(("threads", epoll(), epoll(), Engine::Threads));
    for (name, a, b, engine) in pairs {
        let file = temp_file();
        file.write_all_at(b"data", 0).unwrap();
        let (io_a, io_b) = (
            BlockIo::with_engine(&a, engine).unwrap(),
            BlockIo::with_engine(&b, engine).unwrap(),
        );
        let got_a: Slot<io::Result<usize>> = Rc::default();
        let s = got_a.clone();
        let op_a = io_a.read_at(&a, &file, vec![0; 4], 0, move |r, _| {
            *s.borrow_mut() = Some(r)
        });
        let got_b: Slot<(io::Result<usize>, Vec<u8>)> = Rc::default();
        let s = got_b.clone();
        io_b.read_at(&b, &file, vec![0; 4], 0, move |r, buf| {
            *s.borrow_mut() = Some((r, buf))
        });
        let nop_a: Slot<io::Result<()>> = Rc::default();
        let s = nop_a.clone();
        let op_nop = io_a.nop(&a, move |r| *s.borrow_mut() = Some(r));
        assert!(
            !op_a.cancel(&b),
            "{name}: cancelled through the wrong context"
        );
        assert!(
            !op_nop.cancel(&b),
            "{name}: a no-op cancelled through the wrong context"
        );
        let (r, buf) = wait_for(&b, &got_b);
        assert_eq!(r.unwrap(), 4, "{name}: the other context's read");
        assert_eq!(buf, b"data", "{name}");
        // Its own context still cancels it (it had not been submitted yet) or sees it done.
        let cancelled = op_a.cancel(&a);
        let r = wait_for(&a, &got_a);
        if cancelled {
            assert_eq!(
                r.unwrap_err().raw_os_error(),
                Some(libc::ECANCELED),
                "{name}"
            );
        } else {
            assert_eq!(r.unwrap(), 4, "{name}");
        }
        let cancelled = op_nop.cancel(&a);
        let r = wait_for(&a, &nop_a);
        if cancelled {
            let err = r.unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::ECANCELED), "{name}");
        } else {
            r.unwrap();
        }
    }
    // A context that never had the engine: nothing is cancelled and nothing set up.
    let (a, c) = (epoll(), epoll());
    if let Ok(io) = BlockIo::with_engine(&a, Engine::LinuxAio) {
        let op = io.read_at(&a, &temp_file(), vec![0; 4], 0, |_, _| {});
        assert!(!op.cancel(&c));
    }
}

/// Native AIO completions fetched together are run one at a time; a callback's nested wait
/// must not sleep over the ones still held (found by review). The callback of a read X
/// submits two page-cache reads A and B, which complete inside one `io_submit` and are
/// fetched together; A's callback waits for B with blocking polls. X is made to be fetched by
/// the eventfd's handler, which clears the eventfd, rather than by the completion source: it
/// is an `O_DIRECT` read that completes while a pipe handler dispatched before the engine's
/// sleeps, after a first read has left the eventfd set. Without the engine's pending check
/// this ordering makes B wait for the watchdog, which wakes the loop after 3 s so that a
/// failure ends; the same reads without the pipe and the first read do not show it.
#[test]
fn a_nested_wait_does_not_sleep_over_native_aio_completions_fetched_together() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    let Some(direct) = support::temp_file_on_disk(true) else {
        return;
    };
    let align = blockio::DirectAlign::of(&direct).unwrap();
    let (mut block, start) = align.buffer(1 << 20);
    block[start..].fill(9);
    direct.write_all_at(&block[start..], 0).unwrap();
    direct.sync_all().unwrap();
    let cached = temp_file();
    cached.write_all_at(&[5u8; 8192], 0).unwrap();

    let ctx = AioContext::new(Box::new(fdmon_poll::PollMonitor::new().unwrap())).unwrap();
    // The pipe's handler, registered before the engine's eventfd, is dispatched before it.
    let (rx, mut tx) = io::pipe().unwrap();
    let sleep_once = Rc::new(Cell::new(false));
    let s = sleep_once.clone();
    let rx = Rc::new(rx);
    let r = rx.clone();
    let _pipe = ctx
        .fd_handler(rx)
        .on_read(move |_| {
            let mut b = [0u8; 16];
            let _ = (&*r).read(&mut b);
            if s.replace(false) {
                std::thread::sleep(Duration::from_millis(300));
            }
        })
        .register()
        .unwrap();
    let io = match BlockIo::with_engine(&ctx, Engine::LinuxAio) {
        Ok(io) => io,
        Err(e) => {
            println!("skipped: {e}");
            return;
        }
    };
    // A first read, completed inside `io_submit`: the source fetches and runs it, and the
    // eventfd stays set.
    let first = Rc::new(Cell::new(false));
    let f = first.clone();
    io.read_at(&ctx, &cached, vec![0; 512], 0, move |r, _| {
        r.unwrap();
        f.set(true)
    });
    ctx.poll_nonblocking();
    assert!(first.get());

    let b_done = Rc::new(Cell::new(None::<Instant>));
    let x_done = Rc::new(Cell::new(false));
    let started = Instant::now();
    let (bd, xd, c) = (b_done.clone(), x_done.clone(), cached.clone());
    let (buf, at) = align.buffer(1 << 20);
    io.read_into(&ctx, &direct, buf, at, 0, move |r, _| {
        r.unwrap();
        let ctx = AioContext::current().unwrap();
        let a_done = Rc::new(Cell::new(false));
        let (bd2, ad) = (bd.clone(), a_done.clone());
        io.read_at(&ctx, &c, vec![0; 512], 0, move |r, _| {
            r.unwrap();
            let ctx = AioContext::current().unwrap();
            while bd2.get().is_none() {
                ctx.poll();
            }
            ad.set(true);
        });
        io.read_at(&ctx, &c, vec![0; 512], 4096, move |r, _| {
            r.unwrap();
            bd.set(Some(Instant::now()));
        });
        while !a_done.get() {
            ctx.poll();
        }
        xd.set(true);
    });
    sleep_once.set(true);
    tx.write_all(b"x").unwrap();
    let fired = Arc::new(AtomicBool::new(false));
    let (handle, f) = (ctx.handle(), fired.clone());
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        f.store(true, Ordering::SeqCst);
        handle.notify();
    });
    for _ in 0..1000 {
        if x_done.get() {
            break;
        }
        ctx.poll();
    }
    assert!(x_done.get());
    let took = b_done.get().unwrap() - started;
    assert!(
        !fired.load(Ordering::SeqCst) || took < Duration::from_secs(3),
        "B's completion waited for the watchdog ({took:?})"
    );
}
