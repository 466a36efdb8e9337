//! Registered (fixed) buffers: `read_fixed`/`write_fixed` with leases of a `FixedBufPool` on
//! every engine (`READ_FIXED`/`WRITE_FIXED` on the ring the pool is registered with, the plain
//! path elsewhere), checked byte for byte, with and without `O_DIRECT`; a buffer from another
//! context's pool; a registration the ring refuses; an exhausted pool; bad lengths and starts.
//! The drop of a context with fixed requests in flight is in `memory.rs` (valgrind).

mod support;

use support::{Slot, pattern, temp_file_on_disk, uring_ctx, wait_for};

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::sync::Arc;

use aio_core::AioContext;
use blockio::{BlockIo, Engine, FixedBuf, FixedBufPool, MisalignedDirectIo};

/// Every (name, context, engine, pool made for that context, whether the fixed opcodes are
/// expected) to test: the engines of [`support::setups`] but poll's, each with a pool of its
/// own context (registered with its ring where the context has one, used through the plain path
/// by every engine but io_uring's).
fn setups() -> Vec<(&'static str, AioContext, BlockIo, FixedBufPool, bool)> {
    let mut v = Vec::new();
    for (name, ctx, io) in support::setups() {
        if name == "threads on poll" {
            continue;
        }
        let pool = FixedBufPool::new(&ctx, 8, 16384).unwrap();
        if !ctx.has_io_uring() {
            assert!(
                !pool.is_registered(&ctx),
                "{name}: no ring, no registration"
            );
        }
        let fixed = io.engine() == Engine::IoUring && pool.is_registered(&ctx);
        if io.engine() == Engine::IoUring && !fixed {
            println!("the ring refused the buffers: the io_uring rows use the plain path");
        }
        v.push((name, ctx, io, pool, fixed));
    }
    v
}

/// `write_fixed` then `read_fixed` of `buf[start..]`, through `io`; returns the read buffer.
#[allow(clippy::too_many_arguments)]
fn write_then_read(
    ctx: &AioContext,
    io: BlockIo,
    file: &Arc<File>,
    pool: &FixedBufPool,
    data: &[u8],
    start: usize,
    offset: u64,
    name: &str,
) -> FixedBuf {
    let mut buf = pool.get().expect("a free buffer");
    buf.set_len(start + data.len()).unwrap();
    buf[start..].copy_from_slice(data);
    let slot: Slot<(io::Result<usize>, FixedBuf)> = Rc::default();
    let s = slot.clone();
    io.write_fixed(ctx, file, buf, start, offset, move |r, b| {
        *s.borrow_mut() = Some((r, b))
    });
    let (r, back) = wait_for(ctx, &slot);
    assert_eq!(r.unwrap(), data.len(), "{name}: write count");
    assert_eq!(&back[start..], data, "{name}: the buffer comes back intact");
    drop(back);
    // Checked with std through another (page-aligned, so O_DIRECT-proof) buffer of the pool.
    let mut check = pool.get().expect("a free buffer");
    check.set_len(data.len()).unwrap();
    file.read_exact_at(&mut check, offset).unwrap();
    assert_eq!(&check[..], data, "{name}: the file holds what was written");
    drop(check);

    let mut buf = pool.get().expect("a free buffer");
    buf.set_len(start + data.len()).unwrap();
    buf.fill(0xee);
    let s = slot.clone();
    io.read_fixed(ctx, file, buf, start, offset, move |r, b| {
        *s.borrow_mut() = Some((r, b))
    });
    let (r, back) = wait_for(ctx, &slot);
    assert_eq!(r.unwrap(), data.len(), "{name}: read count");
    assert!(
        back[..start].iter().all(|&b| b == 0xee),
        "{name}: bytes before `start` untouched"
    );
    assert_eq!(&back[start..], data, "{name}: bytes read");
    back
}

#[test]
fn fixed_buffers_on_every_engine() {
    for (name, ctx, io, pool, registered) in setups() {
        if registered {
            assert!(pool.is_registered(&ctx), "{name}");
        }
        let file = temp_file_on_disk(false).unwrap();
        assert_eq!(pool.buf_size(), 16384);
        // Two buffers held, so that the requests use indices 2 and up: a READ_FIXED naming
        // another buffer than its address lies in fails with EFAULT.
        let held = (pool.get().unwrap(), pool.get().unwrap());
        // Whole buffers, a part at an odd offset, and a part past a header.
        for (i, (len, start, offset)) in [(16384, 0, 0u64), (3000, 0, 12345), (5000, 100, 40960)]
            .into_iter()
            .enumerate()
        {
            let data = pattern(len, i as u8 + 3);
            write_then_read(&ctx, io, &file, &pool, &data, start, offset, name);
        }
        // Short read at the end of the file.
        let end = file.metadata().unwrap().len();
        let slot: Slot<(io::Result<usize>, FixedBuf)> = Rc::default();
        let s = slot.clone();
        io.read_fixed(
            &ctx,
            &file,
            pool.get().unwrap(),
            0,
            end - 10,
            move |r, b| *s.borrow_mut() = Some((r, b)),
        );
        let (r, b) = wait_for(&ctx, &slot);
        assert_eq!(r.unwrap(), 10, "{name}: short read at end of file");
        assert_eq!(b.len(), 16384, "{name}: length unchanged");
        drop((b, held));
        // Every lease went back.
        assert_eq!(pool.available(), pool.count(), "{name}: leases returned");
    }
}

#[test]
fn fixed_buffers_with_o_direct() {
    for (name, ctx, io, pool, _) in setups() {
        let Some(file) = temp_file_on_disk(true) else {
            return;
        };
        // O_DIRECT needs aligned buffers, lengths and offsets: pool buffers are page-aligned.
        let data = pattern(8192, 9);
        let back = write_then_read(&ctx, io, &file, &pool, &data, 0, 4096, name);
        assert_eq!(back.as_ptr() as usize % blockio::FIXED_BUF_ALIGN, 0);
        // A misaligned start is the kernel's EINVAL, explained (tests/direct.rs), never a crash.
        let slot: Slot<(io::Result<usize>, FixedBuf)> = Rc::default();
        let s = slot.clone();
        io.read_fixed(&ctx, &file, pool.get().unwrap(), 1, 4096, move |r, b| {
            *s.borrow_mut() = Some((r, b))
        });
        let (r, _) = wait_for(&ctx, &slot);
        let err = r.unwrap_err();
        let why = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<MisalignedDirectIo>());
        assert_eq!(
            why.and_then(|w| w.address_misaligned()),
            Some(0),
            "{name}: misaligned O_DIRECT read: {err}"
        );
    }
}

#[test]
fn a_buffer_of_another_contexts_pool_uses_the_plain_path() {
    let (Some(a), Some(b)) = (uring_ctx(), uring_ctx()) else {
        return;
    };
    let pool_a = FixedBufPool::new(&a, 4, 4096).unwrap();
    let pool_b = FixedBufPool::new(&b, 4, 4096).unwrap();
    if !pool_a.is_registered(&a) || !pool_b.is_registered(&b) {
        return println!("skipped: the ring refused the buffers");
    }
    assert!(!pool_a.is_registered(&b));
    assert!(!pool_b.is_registered(&a));
    let io = BlockIo::of(&b);
    let file = temp_file_on_disk(false).unwrap();
    let data = pattern(4096, 42);
    file.write_all_at(&data, 0).unwrap();
    // Hold every buffer of b's table, zeroed, so that a read that went to b's table by index
    // would show there.
    let held: Vec<FixedBuf> = (0..4).map(|_| pool_b.get().unwrap()).collect();
    // Buffer 0 of a's pool, read on b's ring: a READ_FIXED with index 0 would land in b's
    // buffer 0. The check of the table sends it down the plain path into a's memory.
    let buf = pool_a.get().unwrap();
    let slot: Slot<(io::Result<usize>, FixedBuf)> = Rc::default();
    let s = slot.clone();
    io.read_fixed(&b, &file, buf, 0, 0, move |r, b| {
        *s.borrow_mut() = Some((r, b))
    });
    let (r, got) = wait_for(&b, &slot);
    assert_eq!(r.unwrap(), 4096);
    assert_eq!(&got[..], &data[..], "the data is in a's buffer");
    assert!(got.same_pool(&pool_a));
    for h in &held {
        assert!(h.iter().all(|&x| x == 0), "b's buffers untouched");
    }
    // And written back from a's buffer through b's ring, at another offset.
    let s = slot.clone();
    io.write_fixed(&b, &file, got, 0, 8192, move |r, b| {
        *s.borrow_mut() = Some((r, b))
    });
    assert_eq!(wait_for(&b, &slot).0.unwrap(), 4096);
    let mut check = vec![0; 4096];
    file.read_exact_at(&mut check, 8192).unwrap();
    assert_eq!(check, data);
}

#[test]
fn a_refused_registration_falls_back() {
    let Some(ctx) = uring_ctx() else { return };
    let first = FixedBufPool::new(&ctx, 2, 4096).unwrap();
    // The ring has one table: a second registration is refused, and `new` leaves that pool
    // unregistered (logged once) rather than failing.
    let second = FixedBufPool::new(&ctx, 2, 4096).unwrap();
    assert!(!second.is_registered(&ctx));
    if first.is_registered(&ctx) {
        let e = second.register(&ctx).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
    }
    // A pool never registered, as a kernel that refuses IORING_REGISTER_BUFFERS leaves it.
    let never = FixedBufPool::unregistered(2, 4096).unwrap();
    assert!(!never.is_registered(&ctx));
    let io = BlockIo::of(&ctx);
    let file = temp_file_on_disk(false).unwrap();
    for (i, pool) in [&second, &never].into_iter().enumerate() {
        let data = pattern(4000, i as u8);
        write_then_read(&ctx, io, &file, pool, &data, 50, 777, "unregistered");
    }
    // Registration needs a ring.
    let epoll = AioContext::new(Box::new(fdmon_epoll::EpollMonitor::new().unwrap())).unwrap();
    let e = never.register(&epoll).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::Unsupported, "{e}");
}

#[test]
fn an_exhausted_pool_says_so_at_once() {
    let pool = FixedBufPool::unregistered(3, 100).unwrap();
    assert_eq!(pool.buf_size(), 4096, "rounded up to a page");
    assert_eq!(pool.count(), 3);
    let leases: Vec<FixedBuf> = (0..3).map(|_| pool.get().unwrap()).collect();
    assert_eq!(pool.available(), 0);
    assert!(pool.get().is_none(), "exhausted: None, no wait");
    // Distinct, page-aligned, disjoint buffers.
    let mut addrs: Vec<usize> = leases.iter().map(|b| b.as_ptr() as usize).collect();
    addrs.sort_unstable();
    addrs.dedup();
    assert_eq!(addrs.len(), 3);
    assert!(addrs.windows(2).all(|w| w[1] - w[0] >= 4096));
    assert!(addrs.iter().all(|a| a % 4096 == 0));
    drop(leases);
    assert_eq!(pool.available(), 3);
    // A lease outlives the pool handle and still goes back to the (shared) free list.
    let clone = pool.clone();
    let b = pool.get().unwrap();
    drop(pool);
    assert_eq!(clone.available(), 2);
    drop(b);
    assert_eq!(clone.available(), 3);
}

#[test]
fn bad_sizes_lengths_and_starts_are_errors() {
    for (count, size) in [(0, 4096), (16385, 4096), (1, 0), (1, (1 << 30) + 1)] {
        let e = FixedBufPool::unregistered(count, size).unwrap_err();
        assert_eq!(
            e.kind(),
            io::ErrorKind::InvalidInput,
            "{count} × {size}: {e}"
        );
    }
    let pool = FixedBufPool::unregistered(1, 4096).unwrap();
    let mut b = pool.get().unwrap();
    assert_eq!((b.len(), b.capacity()), (4096, 4096));
    assert_eq!(
        b.set_len(4097).unwrap_err().kind(),
        io::ErrorKind::InvalidInput
    );
    assert_eq!(b.len(), 4096, "unchanged by a refused set_len");
    b.set_len(10).unwrap();
    assert_eq!(b.len(), 10);
    let d = FixedBuf::default();
    assert_eq!((d.len(), d.capacity()), (0, 0));

    // A start past the length fails in `done`, on every engine, and the buffer comes back.
    for (name, ctx, io, pool, _) in setups() {
        let file = temp_file_on_disk(false).unwrap();
        let mut buf = pool.get().unwrap();
        buf.set_len(10).unwrap();
        let slot: Slot<(io::Result<usize>, FixedBuf)> = Rc::default();
        let s = slot.clone();
        io.read_fixed(&ctx, &file, buf, 11, 0, move |r, b| {
            *s.borrow_mut() = Some((r, b))
        });
        let (r, b) = wait_for(&ctx, &slot);
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::InvalidInput, "{name}");
        assert!(b.same_pool(&pool), "{name}: the buffer comes back");
        // The default buffer is a zero-length transfer.
        let s = slot.clone();
        io.write_fixed(&ctx, &file, FixedBuf::default(), 0, 0, move |r, b| {
            *s.borrow_mut() = Some((r, b))
        });
        assert_eq!(wait_for(&ctx, &slot).0.unwrap(), 0, "{name}");
    }
}
