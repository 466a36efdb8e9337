//! B11 (docs/benchmarks.md) workloads: 4 KiB random reads or writes of one file at a fixed queue
//! depth, through the page cache or with `O_DIRECT`, by aio's three block I/O engines (`blockio`:
//! io_uring on the context's ring, with plain buffers or with a registered `FixedBufPool`, the
//! thread pool, Linux native AIO), by tokio (`tokio::fs`, and
//! `spawn_blocking` around `pread`/`pwrite`, which is what `tokio::fs` does inside but without
//! its seek and its copy), by tokio-uring (an io_uring-native runtime), and by the raw
//! `io-uring` crate (the floor: one ring, no runtime). Every contender runs the same offsets, in
//! the same order, from page-aligned 4 KiB buffers (so the `O_DIRECT` rows are possible), except
//! `tokio::fs`, which copies through buffers of its own and so runs only through the page cache.
//! Each function returns the wall time of its `offsets.len()` operations; the program in
//! `benches/fileio.rs` owns the plan and the tables.

use std::cell::{Cell, RefCell};
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aio::blockio::{Engine, FixedBuf, FixedBufPool};
use aio::{AioContext, Backend, BlockIo};

/// The transfer size of every operation, and the alignment of offsets and buffers.
pub const BLOCK: usize = 4096;

/// Which way the data goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
}

/// Makes `path` a file of `size` bytes with every block written (so that `O_DIRECT` reads
/// reach the disk rather than the zeros of unwritten extents), unless it already is one.
pub fn prepare(path: &Path, size: u64) -> io::Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == size) {
        return Ok(());
    }
    let mut f = File::create(path)?;
    let chunk: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    f.sync_all()
}

/// Opens the benchmark file for reading and writing, with `O_DIRECT` if `direct`.
pub fn open(path: &Path, direct: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

/// `n` block-aligned offsets below `size`, pseudo-random from `seed` (xorshift64*): the same
/// sequence for every contender.
pub fn offsets(n: usize, size: u64, seed: u64) -> Vec<u64> {
    let blocks = size / BLOCK as u64;
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) % blocks) * BLOCK as u64
        })
        .collect()
}

/// A buffer whose bytes `[start, start + BLOCK)` are page-aligned: `(vec, start)`.
pub fn aligned_block() -> (Vec<u8>, usize) {
    let mut v: Vec<u8> = Vec::with_capacity(2 * BLOCK);
    let start = (BLOCK - v.as_ptr() as usize % BLOCK) % BLOCK;
    v.resize(start + BLOCK, 0x5a);
    (v, start)
}

/// What the loop of one aio run shares with its completions.
struct AioRun {
    io: BlockIo,
    file: Arc<File>,
    kind: Kind,
    offsets: Rc<[u64]>,
    next: Cell<usize>,
    done: Cell<usize>,
    failed: RefCell<Option<io::Error>>,
}

/// aio, `engine` (on an io_uring context for [`Engine::IoUring`], epoll otherwise): `qd`
/// requests kept in flight, each completion issuing the next.
pub fn aio(
    engine: Engine,
    file: &File,
    kind: Kind,
    qd: usize,
    offsets: &[u64],
) -> io::Result<Duration> {
    let backend = if engine == Engine::IoUring {
        Backend::IoUring
    } else {
        Backend::Epoll
    };
    let ctx = aio::Builder::new().backend(backend).ignore_env().build()?;
    let run = Rc::new(AioRun {
        io: BlockIo::with_engine(&ctx, engine)?,
        file: Arc::new(file.try_clone()?),
        kind,
        offsets: offsets.into(),
        next: Cell::new(0),
        done: Cell::new(0),
        failed: RefCell::new(None),
    });
    let started = Instant::now();
    for _ in 0..qd {
        issue(&ctx, &run, aligned_block());
    }
    while run.done.get() < offsets.len() && run.failed.borrow().is_none() {
        ctx.poll();
    }
    let elapsed = started.elapsed();
    match run.failed.borrow_mut().take() {
        Some(e) => Err(e),
        None => Ok(elapsed),
    }
}

/// Issues the run's next operation with `buf`, if any is left.
fn issue(ctx: &AioContext, run: &Rc<AioRun>, (buf, start): (Vec<u8>, usize)) {
    let i = run.next.get();
    let Some(&off) = run.offsets.get(i) else {
        return;
    };
    run.next.set(i + 1);
    let r = run.clone();
    let done = move |res: io::Result<usize>, buf: Vec<u8>| {
        match res {
            Ok(BLOCK) => r.done.set(r.done.get() + 1),
            Ok(n) => *r.failed.borrow_mut() = Some(io::Error::other(format!("short: {n}"))),
            Err(e) => *r.failed.borrow_mut() = Some(e),
        }
        if let Some(ctx) = AioContext::current() {
            issue(&ctx, &r, (buf, start));
        }
    };
    match run.kind {
        Kind::Read => run.io.read_into(ctx, &run.file, buf, start, off, done),
        Kind::Write => run.io.write_from(ctx, &run.file, buf, start, off, done),
    };
}

/// aio's io_uring engine with a [`FixedBufPool`] of `qd` page-aligned 4 KiB buffers registered
/// with the context's ring: `READ_FIXED`/`WRITE_FIXED` requests (`read_fixed`/`write_fixed`),
/// otherwise as [`aio()`]. Fails if the ring refuses the registration, rather than measuring the
/// plain path under this name.
pub fn aio_fixed(file: &File, kind: Kind, qd: usize, offsets: &[u64]) -> io::Result<Duration> {
    let ctx = aio::Builder::new()
        .backend(Backend::IoUring)
        .ignore_env()
        .build()?;
    let pool = FixedBufPool::unregistered(qd, BLOCK)?;
    pool.register(&ctx)?;
    let run = Rc::new(AioRun {
        io: BlockIo::with_engine(&ctx, Engine::IoUring)?,
        file: Arc::new(file.try_clone()?),
        kind,
        offsets: offsets.into(),
        next: Cell::new(0),
        done: Cell::new(0),
        failed: RefCell::new(None),
    });
    let started = Instant::now();
    for _ in 0..qd {
        let mut buf = pool.get().expect("qd buffers");
        buf.fill(0x5a);
        issue_fixed(&ctx, &run, buf);
    }
    while run.done.get() < offsets.len() && run.failed.borrow().is_none() {
        ctx.poll();
    }
    let elapsed = started.elapsed();
    match run.failed.borrow_mut().take() {
        Some(e) => Err(e),
        None => Ok(elapsed),
    }
}

/// [`issue`] with a fixed buffer.
fn issue_fixed(ctx: &AioContext, run: &Rc<AioRun>, buf: FixedBuf) {
    let i = run.next.get();
    let Some(&off) = run.offsets.get(i) else {
        return;
    };
    run.next.set(i + 1);
    let r = run.clone();
    let done = move |res: io::Result<usize>, buf: FixedBuf| {
        match res {
            Ok(BLOCK) => r.done.set(r.done.get() + 1),
            Ok(n) => *r.failed.borrow_mut() = Some(io::Error::other(format!("short: {n}"))),
            Err(e) => *r.failed.borrow_mut() = Some(e),
        }
        if let Some(ctx) = AioContext::current() {
            issue_fixed(&ctx, &r, buf);
        }
    };
    match run.kind {
        Kind::Read => run.io.read_fixed(ctx, &run.file, buf, 0, off, done),
        Kind::Write => run.io.write_fixed(ctx, &run.file, buf, 0, off, done),
    };
}

/// `tokio::fs::File` on a `current_thread` runtime: `qd` local tasks, each with its own open of
/// the file (its own offset: a `try_clone` would share one, and the seeks would race), seeking
/// and then reading or writing 4 KiB (two blocking-pool hops per
/// operation, as `tokio::fs` works). Page cache only: `tokio::fs` reads through a buffer of its
/// own, not aligned for `O_DIRECT`.
pub fn tokio_fs(file: &File, kind: Kind, qd: usize, offsets: &[u64]) -> io::Result<Duration> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
    let rt = crate::tokio_runtime();
    let local = tokio::task::LocalSet::new();
    let next = Rc::new(Cell::new(0usize));
    let offsets: Rc<[u64]> = offsets.into();
    local.block_on(&rt, async {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..qd {
            let mut f = tokio::fs::File::from_std(reopen(file)?);
            let (next, offsets) = (next.clone(), offsets.clone());
            tasks.push(tokio::task::spawn_local(async move {
                let mut buf = vec![0x5a; BLOCK];
                loop {
                    let i = next.get();
                    let Some(&off) = offsets.get(i) else { break };
                    next.set(i + 1);
                    f.seek(io::SeekFrom::Start(off)).await?;
                    match kind {
                        Kind::Read => drop(f.read_exact(&mut buf).await?),
                        Kind::Write => f.write_all(&buf).await?,
                    }
                }
                f.flush().await
            }));
        }
        for t in tasks {
            t.await.map_err(io::Error::other)??;
        }
        Ok(started.elapsed())
    })
}

/// `file` opened again (through `/proc/self/fd`): a new open file description, with an offset
/// of its own, unlike a `try_clone`.
fn reopen(file: &File) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Reads the whole file once, so that the page-cache rows start from a cached file whatever ran
/// before (the `O_DIRECT` writes evict what they overwrite).
pub fn warm(file: &File, size: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < size {
        let n = file.read_at(&mut buf, at)?;
        if n == 0 {
            break;
        }
        at += n as u64;
    }
    Ok(())
}

/// Writes `file`'s dirty pages back and drops all its pages from the page cache
/// (`fdatasync`, then `posix_fadvise(DONTNEED)`), so that every contender's page-cache writes
/// start from the same state: none pending write-back, and each 4 KiB write landing in a small
/// folio of its own. A file cached in large folios (read ahead, or written with big writes)
/// makes Linux 6.18's ext4 spend tens of µs per 4 KiB write whoever submits it, which would
/// swamp the contenders' differences (BENCHMARKS.md, 2026-12-06 22:20 UTC).
pub fn drop_cached(file: &File) -> io::Result<()> {
    file.sync_data()?;
    rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed)?;
    Ok(())
}

/// tokio `spawn_blocking` around one `pread`/`pwrite` per operation, `qd` local tasks on a
/// `current_thread` runtime: tokio's way to do positioned I/O without `tokio::fs`'s seek.
pub fn tokio_blocking(file: &File, kind: Kind, qd: usize, offsets: &[u64]) -> io::Result<Duration> {
    let rt = crate::tokio_runtime();
    let local = tokio::task::LocalSet::new();
    let file = Arc::new(file.try_clone()?);
    let next = Rc::new(Cell::new(0usize));
    let offsets: Rc<[u64]> = offsets.into();
    local.block_on(&rt, async {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..qd {
            let (file, next, offsets) = (file.clone(), next.clone(), offsets.clone());
            tasks.push(tokio::task::spawn_local(async move {
                let mut block = aligned_block();
                loop {
                    let i = next.get();
                    let Some(&off) = offsets.get(i) else { break };
                    next.set(i + 1);
                    let f = file.clone();
                    let (buf, start) = block;
                    let (res, buf) = tokio::task::spawn_blocking(move || {
                        let mut buf = buf;
                        let r = match kind {
                            Kind::Read => f.read_exact_at(&mut buf[start..], off),
                            Kind::Write => f.write_all_at(&buf[start..], off),
                        };
                        (r, buf)
                    })
                    .await
                    .map_err(io::Error::other)?;
                    res?;
                    block = (buf, start);
                }
                Ok::<(), io::Error>(())
            }));
        }
        for t in tasks {
            t.await.map_err(io::Error::other)??;
        }
        Ok(started.elapsed())
    })
}

/// tokio-uring: `qd` tasks on its runtime, each reading or writing through the runtime's ring
/// with an owned, aligned buffer slice.
pub fn tokio_uring(file: &File, kind: Kind, qd: usize, offsets: &[u64]) -> io::Result<Duration> {
    use tokio_uring::buf::BoundedBuf;
    let file = file.try_clone()?;
    let offsets: Rc<[u64]> = offsets.into();
    tokio_uring::start(async move {
        let file = Rc::new(tokio_uring::fs::File::from_std(file));
        let next = Rc::new(Cell::new(0usize));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..qd {
            let (file, next, offsets) = (file.clone(), next.clone(), offsets.clone());
            tasks.push(tokio_uring::spawn(async move {
                let (mut buf, start) = aligned_block();
                loop {
                    let i = next.get();
                    let Some(&off) = offsets.get(i) else { break };
                    next.set(i + 1);
                    let (res, slice) = match kind {
                        Kind::Read => file.read_at(buf.slice(start..start + BLOCK), off).await,
                        Kind::Write => {
                            file.write_at(buf.slice(start..start + BLOCK), off)
                                .submit()
                                .await
                        }
                    };
                    buf = slice.into_inner();
                    if res? != BLOCK {
                        return Err(io::Error::other("short transfer"));
                    }
                }
                Ok::<(), io::Error>(())
            }));
        }
        for t in tasks {
            t.await.map_err(io::Error::other)??;
        }
        Ok(started.elapsed())
    })
}

/// Optional io_uring features, tried on the raw floor to see what each can win before any is
/// built into the monitor (issue 14: "each probed and each measured before it stays").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingFeatures {
    /// `IORING_SETUP_SQPOLL` (a kernel thread polls the submission queue; idle 1 s).
    pub sqpoll: bool,
    /// `IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN` (completions are posted only
    /// when the thread enters the kernel to get them).
    pub defer_taskrun: bool,
    /// The file registered (`IORING_REGISTER_FILES`), addressed by index.
    pub fixed_file: bool,
    /// The buffers registered (`IORING_REGISTER_BUFFERS`), `READ_FIXED` / `WRITE_FIXED`.
    pub fixed_buffers: bool,
}

/// The floor: the `io-uring` crate alone, one ring, `qd` SQEs in flight, each completion
/// replaced by the next operation in the same loop; no runtime, no callbacks, no allocation.
pub fn raw_uring(file: &File, kind: Kind, qd: usize, offsets: &[u64]) -> io::Result<Duration> {
    raw_uring_with(RingFeatures::default(), file, kind, qd, offsets)
}

/// [`raw_uring`] with `features`; `Unsupported` where the kernel refuses one.
pub fn raw_uring_with(
    features: RingFeatures,
    file: &File,
    kind: Kind,
    qd: usize,
    offsets: &[u64],
) -> io::Result<Duration> {
    use io_uring::{IoUring, opcode, types};
    let entries = (qd as u32).next_power_of_two().max(8);
    let mut builder = IoUring::<io_uring::squeue::Entry, io_uring::cqueue::Entry>::builder();
    if features.sqpoll {
        builder.setup_sqpoll(1000);
    }
    if features.defer_taskrun {
        builder.setup_single_issuer().setup_defer_taskrun();
    }
    let mut ring: IoUring = builder.build(entries)?;
    let mut bufs: Vec<(Vec<u8>, usize)> = (0..qd).map(|_| aligned_block()).collect();
    if features.fixed_file {
        ring.submitter().register_files(&[file.as_raw_fd()])?;
    }
    if features.fixed_buffers {
        let iovecs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|(b, start)| libc::iovec {
                iov_base: b[*start..].as_mut_ptr().cast(),
                iov_len: BLOCK,
            })
            .collect();
        // [BENCH-RAW-URING] the registered windows are the slots' buffers, which are
        // neither moved nor freed before `ring` is dropped (explicitly, before `bufs`, at the
        // end of this function), which unregisters them.
        // SAFETY: [BENCH-RAW-URING] the registered buffers outlive the ring.
        unsafe { ring.submitter().register_buffers(&iovecs) }?;
    }
    let raw_fd = types::Fd(file.as_raw_fd());
    let mut entry = |slot: usize, off: u64| {
        let (buf, start) = &mut bufs[slot];
        let ptr = buf[*start..].as_mut_ptr();
        let len = BLOCK as u32;
        let e = match (kind, features.fixed_buffers, features.fixed_file) {
            (Kind::Read, false, false) => opcode::Read::new(raw_fd, ptr, len).offset(off).build(),
            (Kind::Read, false, true) => opcode::Read::new(types::Fixed(0), ptr, len)
                .offset(off)
                .build(),
            (Kind::Read, true, false) => opcode::ReadFixed::new(raw_fd, ptr, len, slot as u16)
                .offset(off)
                .build(),
            (Kind::Read, true, true) => {
                opcode::ReadFixed::new(types::Fixed(0), ptr, len, slot as u16)
                    .offset(off)
                    .build()
            }
            (Kind::Write, false, false) => opcode::Write::new(raw_fd, ptr, len).offset(off).build(),
            (Kind::Write, false, true) => opcode::Write::new(types::Fixed(0), ptr, len)
                .offset(off)
                .build(),
            (Kind::Write, true, false) => opcode::WriteFixed::new(raw_fd, ptr, len, slot as u16)
                .offset(off)
                .build(),
            (Kind::Write, true, true) => {
                opcode::WriteFixed::new(types::Fixed(0), ptr, len, slot as u16)
                    .offset(off)
                    .build()
            }
        };
        e.user_data(slot as u64)
    };
    let started = Instant::now();
    let (mut next, mut done) = (0, 0);
    {
        let mut sq = ring.submission();
        while next < qd.min(offsets.len()) {
            let e = entry(next, offsets[next]);
            // [BENCH-RAW-URING] the SQE points at `BLOCK` bytes of `bufs[slot]`, which
            // lives until this function returns, after every submitted SQE has completed (the
            // loop below reaps as many CQEs as it submitted), and whose slot is not reused
            // before its CQE is reaped.
            // SAFETY: [BENCH-RAW-URING] the slot's buffer outlives its SQE's completion.
            unsafe { sq.push(&e) }.map_err(|_| io::Error::other("submission queue full"))?;
            next += 1;
        }
    }
    while done < offsets.len() {
        ring.submit_and_wait(1)?;
        let cqes: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (slot, res) in cqes {
            if res != BLOCK as i32 {
                return Err(if res < 0 {
                    io::Error::from_raw_os_error(-res)
                } else {
                    io::Error::other(format!("short: {res}"))
                });
            }
            done += 1;
            if next < offsets.len() {
                let e = entry(slot as usize, offsets[next]);
                if ring.submission().is_full() {
                    // With SQPOLL the kernel thread may not have taken the last batch yet.
                    ring.submit()?;
                }
                // [BENCH-RAW-URING] as above: `slot`'s CQE was just reaped, so its
                // buffer is free for this SQE, and it outlives the loop.
                // SAFETY: [BENCH-RAW-URING] the slot's CQE was reaped; its buffer is free and outlives the loop.
                unsafe { ring.submission().push(&e) }
                    .map_err(|_| io::Error::other("submission queue full"))?;
                next += 1;
            }
        }
    }
    let elapsed = started.elapsed();
    // The ring (and with it the registered buffers) goes before the buffers do.
    drop(ring);
    drop(bufs);
    Ok(elapsed)
}
