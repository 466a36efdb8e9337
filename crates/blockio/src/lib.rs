//! File I/O on an [`AioContext`]: typed, safe read, write, vectored, sync, fallocate and no-op
//! requests whose completion callbacks run on the context's home thread. C original: QEMU's
//! `block/io_uring.c` (since QEMU 11 on the context's own ring, `aio_add_sqe`) and the thread
//! pool path of `block/file-posix.c`. This crate owns the operation API, the two engines and the
//! ownership of request buffers.
//!
//! # Engines
//!
//! * [`Engine::IoUring`]: when the context runs on the io_uring backend
//!   ([`AioContext::has_io_uring`]), each request is one SQE on the backend's own ring
//!   ([`fdmon_uring::UringMonitor::add_sqe`]). The SQEs of one iteration go to the kernel in
//!   the `io_uring_enter` of the next wait, with the iteration's polls; completions are put on
//!   the monitor's ready list and run by this crate's completion source, which every
//!   iteration, nested ones included, calls after its BHs; a completion counts as progress.
//! * [`Engine::Threads`]: on epoll and poll, each request is a blocking system call on the
//!   context's [`ThreadPool`], with the same API and the same semantics.
//!
//! [`BlockIo::of`] picks io_uring when it can; [`BlockIo::with_engine`] asks for one.
//!
//! Each operation takes a callback; [`OpFuture`] (and the `*_async` forms) is the same request
//! as a future, for tasks and `AioContext::block_on`.
//!
//! # Buffer ownership
//!
//! A request takes its buffer by value (`Vec<u8>`, or a `Vec` of [`Segment`]s for the
//! vectored forms) and gives it back in the completion callback, so no caller can touch, free
//! or reuse it while the kernel or a worker may be writing to it: a use-after-free cannot be
//! written. On io_uring
//! the buffer (and an `Arc` of the file) is kept in the monitor's request table until the CQE
//! has been reaped; a context dropped with requests in flight cancels them and reaps every one
//! before freeing their buffers (ARCHITECTURE.md, rule [URING-2]). On the thread
//! pool the buffer travels with the work, and comes back even when the work is cancelled
//! before it ran.
//!
//! [`FixedBufPool`] hands out [`FixedBuf`] leases of page-aligned buffers registered with the
//! context's ring; [`BlockIo::read_fixed`] and [`BlockIo::write_fixed`] take one by value the
//! same way, as `READ_FIXED`/`WRITE_FIXED` where the pool is registered and the plain
//! operations elsewhere (rule [URING-5] for the pool's memory).
//!
//! # Results
//!
//! One read or write request is one `pread`/`pwrite` (or its io_uring equivalent): it may
//! transfer fewer bytes than asked (a read at end of file returns what is there, 0 past it);
//! the count is in the result. The buffer comes back with its length unchanged. Errors are
//! `io::Error`s carrying the errno; a cancelled request fails with `ECANCELED`; a transfer on
//! an `O_DIRECT` file that the kernel refused for its alignment fails with a
//! [`MisalignedDirectIo`] saying what was off ([`DirectAlign`] gives the file's rules and
//! buffers that meet them).
//!
//! # Example
//!
//! ```
//! use std::cell::RefCell;
//! use std::rc::Rc;
//! use std::sync::Arc;
//!
//! use blockio::BlockIo;
//!
//! let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
//! let path = std::env::temp_dir().join(format!("blockio-doc-{}", std::process::id()));
//! let file = Arc::new(
//!     std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?,
//! );
//! std::fs::remove_file(&path)?;
//! let io = BlockIo::of(&ctx);
//!
//! let got = Rc::new(RefCell::new(None));
//! let g = got.clone();
//! let f = file.clone();
//! io.write_at(&ctx, &file, b"hello".to_vec(), 0, move |r, _buf| {
//!     assert_eq!(r.unwrap(), 5);
//!     // Chain a read from the completion; the buffer is given back with the result.
//!     let ctx = aio_core::AioContext::current().unwrap();
//!     BlockIo::of(&ctx).read_at(&ctx, &f, vec![0; 8], 0, move |r, buf| {
//!         *g.borrow_mut() = Some((r.unwrap(), buf));
//!     });
//! });
//! while got.borrow().is_none() {
//!     ctx.poll();
//! }
//! let (n, buf) = got.borrow_mut().take().unwrap();
//! assert_eq!(&buf[..n], b"hello"); // a short read: the file ends there
//! # Ok::<(), std::io::Error>(())
//! ```

#![deny(missing_docs)]

mod direct;
mod fixed;
mod future;
#[cfg(target_os = "linux")]
mod linux_aio;
mod segment;
#[cfg(target_os = "linux")]
mod uring;

pub use direct::{AlignSource, DirectAlign, MisalignedDirectIo};
pub use fixed::{FIXED_BUF_ALIGN, FixedBuf, FixedBufPool};
pub use future::OpFuture;
pub use segment::Segment;

use std::fmt;
use std::fs::File;
use std::io;
use std::ops::DerefMut;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use aio_core::AioContext;
use threadpool::{ThreadPool, Ticket};

/// Which mechanism carries a context's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Engine {
    /// SQEs on the context's own io_uring ring (the context must run on the io_uring backend).
    IoUring,
    /// Blocking system calls on the context's thread pool.
    Threads,
    /// Linux native AIO (`io_submit`), completions on an eventfd watched by the context;
    /// `fallocate` and `nop` use the thread pool. Works on any backend.
    LinuxAio,
}

/// The `fallocate(2)` modes, as its `mode` argument (`0`, `FALLOC_FL_KEEP_SIZE`,
/// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`, ...), passed through unchanged.
pub type FallocateMode = i32;

/// The block I/O interface of one context with one engine: a small `Copy` value; every
/// operation takes the context it runs on.
///
/// Every operation returns at once with an [`Op`] and calls `done` exactly once, later, on the
/// context's home thread, from [`AioContext::poll`] (never from inside the call that
/// submitted it), unless the context is dropped first, in which case `done` is dropped
/// uncalled and the buffer freed only once the kernel is done with it.
///
/// A `BlockIo` checks its engine against the context it was made for
/// ([`with_engine`](Self::with_engine) refuses an io_uring engine for a context without a
/// ring, with a message that says so). Given another context, one that has no ring, an
/// io_uring `BlockIo`'s operations fail in `done` with `EOPNOTSUPP` ("Operation not
/// supported"): make one per context, with [`of`](Self::of) or `with_engine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockIo {
    engine: Engine,
}

/// A request in flight: cancel it with [`cancel`](Op::cancel). Dropping it does not cancel
/// the request.
pub struct Op(OpInner);

/// Each engine's request identity, with the identity of the engine state ([`engine_uid`]) of
/// the context it was submitted on: request ids repeat across contexts, so a cancel through
/// another context must not act on that context's request.
enum OpInner {
    #[cfg(target_os = "linux")]
    Uring(fdmon_uring::RequestId, u64),
    #[cfg(target_os = "linux")]
    Laio(usize, u64, u64),
    /// A request of its context's thread pool (which the ticket knows).
    Pool(Ticket),
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            #[cfg(target_os = "linux")]
            OpInner::Uring(id, _) => f.debug_tuple("Op::IoUring").field(id).finish(),
            #[cfg(target_os = "linux")]
            OpInner::Laio(slot, _, _) => f.debug_tuple("Op::LinuxAio").field(slot).finish(),
            OpInner::Pool(_) => f.write_str("Op::Threads"),
        }
    }
}

impl Op {
    /// Asks for the request to be cancelled (QEMU `bdrv_aio_cancel_async`). Returns false if
    /// it has completed already (its callback may not have run yet); `done` is then called
    /// with the result. Returns true if it was still pending: `done` is called with
    /// `ECANCELED`, or, when the request was already running in the kernel or on a worker
    /// and could not be stopped (a read of a regular file usually cannot), with its normal
    /// result. Either way `done` runs exactly once and gets the buffer back.
    ///
    /// `ctx` is the context the request was submitted on; given another one, `cancel`
    /// returns false and touches nothing (in particular no request of that context).
    pub fn cancel(&self, ctx: &AioContext) -> bool {
        match &self.0 {
            #[cfg(target_os = "linux")]
            OpInner::Uring(id, engine) => uring::cancel(ctx, *id, *engine),
            #[cfg(target_os = "linux")]
            OpInner::Laio(slot, generation, engine) => {
                linux_aio::cancel(ctx, *slot, *generation, *engine)
            }
            OpInner::Pool(ticket) => {
                ThreadPool::existing(ctx).is_some_and(|p| p.owns(ticket)) && ticket.cancel()
            }
        }
    }
}

impl BlockIo {
    /// The context's block I/O: io_uring when the context runs on the io_uring backend, the
    /// thread pool otherwise.
    pub fn of(ctx: &AioContext) -> BlockIo {
        let engine = if cfg!(target_os = "linux") && ctx.has_io_uring() {
            Engine::IoUring
        } else {
            Engine::Threads
        };
        BlockIo { engine }
    }

    /// Block I/O with the given engine.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::Unsupported`] for [`Engine::IoUring`] when the context does not run on
    /// the io_uring backend (so there is no ring to submit to). [`Engine::Threads`] always
    /// works.
    pub fn with_engine(ctx: &AioContext, engine: Engine) -> io::Result<BlockIo> {
        if engine == Engine::IoUring && !(cfg!(target_os = "linux") && ctx.has_io_uring()) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "the io_uring block I/O engine needs a context on the io_uring backend, \
                     this one runs on {}",
                    ctx.backend()
                ),
            ));
        }
        #[cfg(target_os = "linux")]
        if engine == Engine::LinuxAio {
            linux_aio::of(ctx)?;
        }
        #[cfg(not(target_os = "linux"))]
        if engine == Engine::LinuxAio {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "Linux native AIO",
            ));
        }
        Ok(BlockIo { engine })
    }

    /// The native AIO state, for an engine that `with_engine` checked.
    #[cfg(target_os = "linux")]
    fn laio(&self, ctx: &AioContext) -> Option<std::rc::Rc<linux_aio::Laio>> {
        if self.engine == Engine::LinuxAio {
            linux_aio::of(ctx).ok()
        } else {
            None
        }
    }

    /// The engine that carries the requests.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// Reads up to `buf.len()` bytes of `file` at `offset` into `buf` (one `pread`). `done`
    /// gets the number of bytes read (short at end of file, 0 past it) and the buffer, whose
    /// length is unchanged.
    pub fn read_at(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        buf: Vec<u8>,
        offset: u64,
        done: impl FnOnce(io::Result<usize>, Vec<u8>) + 'static,
    ) -> Op {
        self.read_into(ctx, file, buf, 0, offset, done)
    }

    /// [`read_at`](Self::read_at) into `buf[start..]`, leaving `buf[..start]` as it was: room
    /// for a header in front of the data (an NBD reply's), or padding that puts the data on
    /// an alignment `O_DIRECT` needs, without a second buffer or a copy. A `start` past
    /// `buf.len()` fails with `InvalidInput` (in `done`, like any other error).
    pub fn read_into(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        buf: Vec<u8>,
        start: usize,
        offset: u64,
        done: impl FnOnce(io::Result<usize>, Vec<u8>) + 'static,
    ) -> Op {
        self.one_buf(ctx, file, buf, start, offset, false, done)
    }

    /// Writes up to `buf.len()` bytes of `buf` to `file` at `offset` (one `pwrite`). `done`
    /// gets the number of bytes written and the buffer.
    pub fn write_at(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        buf: Vec<u8>,
        offset: u64,
        done: impl FnOnce(io::Result<usize>, Vec<u8>) + 'static,
    ) -> Op {
        self.write_from(ctx, file, buf, 0, offset, done)
    }

    /// [`write_at`](Self::write_at) of `buf[start..]` only (see [`read_into`](Self::read_into)
    /// for why a buffer starts with bytes that are not written). A `start` past `buf.len()`
    /// fails with `InvalidInput`.
    pub fn write_from(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        buf: Vec<u8>,
        start: usize,
        offset: u64,
        done: impl FnOnce(io::Result<usize>, Vec<u8>) + 'static,
    ) -> Op {
        self.one_buf(ctx, file, buf, start, offset, true, done)
    }

    /// [`read_into`](Self::read_into) with a buffer leased from a [`FixedBufPool`]: reads up to
    /// `buf.len() - start` bytes of `file` at `offset` into `buf[start..]`. On the io_uring
    /// engine of the context the pool is registered with, one `READ_FIXED` (the kernel does not
    /// pin the pages again); everywhere else the plain read, with the same result. `done`
    /// gets the byte count and the buffer, its length unchanged. Pool buffers are
    /// page-aligned, so they serve `O_DIRECT` files as they are.
    pub fn read_fixed(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        buf: FixedBuf,
        start: usize,
        offset: u64,
        done: impl FnOnce(io::Result<usize>, FixedBuf) + 'static,
    ) -> Op {
        self.fixed(ctx, file, buf, start, offset, false, done)
    }

    /// [`write_from`](Self::write_from) with a buffer leased from a [`FixedBufPool`]: one
    /// `WRITE_FIXED` of `buf[start..]` where the pool is registered (see
    /// [`read_fixed`](Self::read_fixed)), the plain write elsewhere.
    pub fn write_fixed(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        buf: FixedBuf,
        start: usize,
        offset: u64,
        done: impl FnOnce(io::Result<usize>, FixedBuf) + 'static,
    ) -> Op {
        self.fixed(ctx, file, buf, start, offset, true, done)
    }

    /// [`read_fixed`](Self::read_fixed) or [`write_fixed`](Self::write_fixed): the fixed
    /// opcodes on io_uring (when the pool is this ring's table), [`one_buf`](Self::one_buf)
    /// otherwise.
    #[allow(clippy::too_many_arguments)] // one request's fields
    fn fixed(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        buf: FixedBuf,
        start: usize,
        offset: u64,
        write: bool,
        done: impl FnOnce(io::Result<usize>, FixedBuf) + 'static,
    ) -> Op {
        #[cfg(target_os = "linux")]
        if self.engine == Engine::IoUring && start <= buf.len() {
            return uring::rw_fixed(ctx, file.clone(), buf, start, offset, write, done);
        }
        self.one_buf(ctx, file, buf, start, offset, write, done)
    }

    /// [`read_into`](Self::read_into) or [`write_from`](Self::write_from), on the engine.
    #[allow(clippy::too_many_arguments)] // one request's fields
    fn one_buf<B: IoBuf>(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        buf: B,
        start: usize,
        offset: u64,
        write: bool,
        done: impl FnOnce(io::Result<usize>, B) + 'static,
    ) -> Op {
        if start > buf.len() {
            let why = start_past_end(start, buf.len());
            return self.refuse(ctx, buf, why, done);
        }
        #[cfg(target_os = "linux")]
        if let Some(l) = self.laio(ctx) {
            return linux_aio::rw(ctx, &l, file.clone(), buf, start, offset, write, done);
        }
        match (self.engine, write) {
            #[cfg(target_os = "linux")]
            (Engine::IoUring, false) => uring::read_at(ctx, file.clone(), buf, start, offset, done),
            #[cfg(target_os = "linux")]
            (Engine::IoUring, true) => uring::write_at(ctx, file.clone(), buf, start, offset, done),
            (_, false) => pool_buf(ctx, file.clone(), buf, done, move |f, b| {
                let r = f.read_at(&mut b[start..], offset);
                direct::explained(r, f, false, offset, || vec![direct::segment(&b[start..])])
            }),
            (_, true) => pool_buf(ctx, file.clone(), buf, done, move |f, b| {
                let r = f.write_at(&b[start..], offset);
                direct::explained(r, f, true, offset, || vec![direct::segment(&b[start..])])
            }),
        }
    }

    /// Fails a request that cannot start (`why`, an `InvalidInput`), through a no-op request
    /// so that `done` runs later, from a poll, as for every other result, with the buffer.
    fn refuse<B: 'static>(
        &self,
        ctx: &AioContext,
        buf: B,
        why: String,
        done: impl FnOnce(io::Result<usize>, B) + 'static,
    ) -> Op {
        self.nop(ctx, move |_| {
            done(Err(io::Error::new(io::ErrorKind::InvalidInput, why)), buf)
        })
    }

    /// Reads into each buffer of `bufs` in turn, from `offset` on (`preadv`). `done` gets the
    /// total number of bytes read and the buffers, lengths unchanged. On the thread pool this
    /// is one `pread` per buffer, stopping at the first short one.
    ///
    /// A buffer is a [`Segment`]: a `Vec<u8>`, or a `(Vec<u8>, usize)` read into from that
    /// start on, which is how an `O_DIRECT` file gets each segment on its memory alignment
    /// ([`DirectAlign::buffer`] makes one). A start past its buffer's end fails the request
    /// with `InvalidInput` (in `done`), before anything is read.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// # let path = std::env::temp_dir().join(format!("blockio-readv-doc-{}", std::process::id()));
    /// # std::fs::write(&path, b"headerpayload")?;
    /// use std::sync::Arc;
    /// let file = Arc::new(std::fs::File::open(&path)?);
    /// let io = blockio::BlockIo::of(&ctx);
    /// // Six bytes into a fresh buffer, the rest after a two-byte prefix kept as it is.
    /// let bufs = vec![(vec![0u8; 6], 0), (b"> .......".to_vec(), 2)];
    /// let (r, bufs) = ctx.block_on(io.readv_async(&ctx, &file, bufs, 0));
    /// assert_eq!(r?, 13);
    /// assert_eq!(bufs[0].0, b"header");
    /// assert_eq!(bufs[1].0, b"> payload");
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn readv<S: Segment>(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        bufs: Vec<S>,
        offset: u64,
        done: impl FnOnce(io::Result<usize>, Vec<S>) + 'static,
    ) -> Op {
        self.rwv(ctx, file, bufs, offset, false, done)
    }

    /// Writes each buffer of `bufs` in turn, from `offset` on (`pwritev`). `done` gets the
    /// total number of bytes written and the buffers. On the thread pool this is one `pwrite`
    /// per buffer, stopping at the first short one. A buffer is a [`Segment`], as for
    /// [`readv`](Self::readv): a `(Vec<u8>, usize)` writes the bytes from that start on.
    pub fn writev<S: Segment>(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        bufs: Vec<S>,
        offset: u64,
        done: impl FnOnce(io::Result<usize>, Vec<S>) + 'static,
    ) -> Op {
        self.rwv(ctx, file, bufs, offset, true, done)
    }

    /// [`readv`](Self::readv) or [`writev`](Self::writev).
    fn rwv<S: Segment>(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        bufs: Vec<S>,
        offset: u64,
        write: bool,
        done: impl FnOnce(io::Result<usize>, Vec<S>) + 'static,
    ) -> Op {
        if let Some(why) = segment::refused(&bufs) {
            return self.refuse(ctx, bufs, why, done);
        }
        #[cfg(target_os = "linux")]
        if let Some(l) = self.laio(ctx) {
            return linux_aio::rwv(ctx, &l, file.clone(), bufs, offset, write, done);
        }
        match self.engine {
            #[cfg(target_os = "linux")]
            Engine::IoUring => uring::vectored(ctx, file.clone(), bufs, offset, write, done),
            _ => pool_buf(ctx, file.clone(), bufs, done, move |f, bufs| {
                let r = if write {
                    vectored_at(bufs, offset, |b, o| f.write_at(b, o))
                } else {
                    vectored_at(bufs, offset, |b, o| f.read_at(b, o))
                };
                direct::explained(r, f, write, offset, || segment::segments(bufs))
            }),
        }
    }

    /// Flushes `file`'s data and metadata to stable storage (`fsync`).
    pub fn fsync(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        done: impl FnOnce(io::Result<()>) + 'static,
    ) -> Op {
        self.sync(ctx, file, false, done)
    }

    /// Flushes `file`'s data, and only the metadata needed to read it back, to stable storage
    /// (`fdatasync`).
    pub fn fdatasync(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        done: impl FnOnce(io::Result<()>) + 'static,
    ) -> Op {
        self.sync(ctx, file, true, done)
    }

    fn sync(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        data_only: bool,
        done: impl FnOnce(io::Result<()>) + 'static,
    ) -> Op {
        #[cfg(target_os = "linux")]
        if let Some(l) = self.laio(ctx) {
            return linux_aio::sync(ctx, &l, file.clone(), data_only, done);
        }
        match self.engine {
            #[cfg(target_os = "linux")]
            Engine::IoUring => uring::fsync(ctx, file.clone(), data_only, done),
            _ => {
                let f = file.clone();
                pool_plain(ctx, done, move || {
                    if data_only {
                        f.sync_data()
                    } else {
                        f.sync_all()
                    }
                })
            }
        }
    }

    /// Allocates (or, with `FALLOC_FL_PUNCH_HOLE`, deallocates) `len` bytes of `file` from
    /// `offset` (`fallocate(2)` with `mode`).
    pub fn fallocate(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        mode: FallocateMode,
        offset: u64,
        len: u64,
        done: impl FnOnce(io::Result<()>) + 'static,
    ) -> Op {
        match self.engine {
            #[cfg(target_os = "linux")]
            Engine::IoUring => uring::fallocate(ctx, file.clone(), mode, offset, len, done),
            _ => {
                let f = file.clone();
                pool_plain(ctx, done, move || fallocate_sync(&f, mode, offset, len))
            }
        }
    }

    /// A request that does nothing and succeeds: the engine's round trip.
    pub fn nop(&self, ctx: &AioContext, done: impl FnOnce(io::Result<()>) + 'static) -> Op {
        match self.engine {
            #[cfg(target_os = "linux")]
            Engine::IoUring => uring::nop(ctx, done),
            _ => pool_plain(ctx, done, || Ok(())),
        }
    }
}

/// The bytes of a request's buffer: heap memory that stays where it is when the value moves (a
/// `Vec`'s allocation, a fixed buffer's place in its pool), so a request can own the value
/// while the kernel or a worker uses the bytes.
pub(crate) trait IoBuf: DerefMut<Target = [u8]> + Default + Send + 'static {}

impl IoBuf for Vec<u8> {}

impl IoBuf for FixedBuf {}

/// A process-unique identity for a context's io_uring or native AIO engine state, which its
/// [`Op`]s carry (see [`OpInner`]); never 0, the identity of no engine.
#[cfg(target_os = "linux")]
pub(crate) fn engine_uid() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    // Relaxed: only uniqueness matters; nothing is published with the value.
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Submits blocking work that borrows a buffer `B` to the thread pool; `done` gets the result
/// and the buffer back, even when the work was cancelled before it ran (the buffer then never
/// left the slot it waits in).
fn pool_buf<B, R>(
    ctx: &AioContext,
    file: Arc<File>,
    buf: B,
    done: impl FnOnce(io::Result<R>, B) + 'static,
    work: impl FnOnce(&File, &mut B) -> io::Result<R> + Send + 'static,
) -> Op
where
    B: Send + Default + 'static,
    R: Send + 'static,
{
    let slot = Arc::new(Mutex::new(Some(buf)));
    let s = slot.clone();
    let ticket = ThreadPool::of(ctx).submit_with(
        move || {
            let mut buf = take(&s);
            let r = work(&file, &mut buf);
            (r, buf)
        },
        move |r| match r {
            Ok((r, buf)) => done(r, buf),
            Err(e) => done(Err(pool_error(e)), take(&slot)),
        },
    );
    Op(OpInner::Pool(ticket))
}

/// Takes the buffer out of its slot; an empty one if a panicking work closure lost it.
fn take<B: Default>(slot: &Mutex<Option<B>>) -> B {
    slot.lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .unwrap_or_default()
}

/// Submits blocking work without a buffer to the thread pool.
fn pool_plain(
    ctx: &AioContext,
    done: impl FnOnce(io::Result<()>) + 'static,
    work: impl FnOnce() -> io::Result<()> + Send + 'static,
) -> Op {
    let ticket = ThreadPool::of(ctx).submit_with(work, move |r| {
        done(r.unwrap_or_else(|e| Err(pool_error(e))))
    });
    Op(OpInner::Pool(ticket))
}

/// The thread pool's failures as I/O errors: a cancelled request fails with `ECANCELED` on
/// both engines.
fn pool_error(e: threadpool::Error) -> io::Error {
    match e {
        threadpool::Error::Cancelled => io::Error::from_raw_os_error(libc::ECANCELED),
        other => io::Error::other(other.to_string()),
    }
}

/// Why a transfer from `start` on cannot be made in a buffer of `len` bytes.
fn start_past_end(start: usize, len: usize) -> String {
    format!("start {start} lies past the end of a {len}-byte buffer")
}

/// One positioned transfer per segment, stopping at the first short one or error (an error
/// after some bytes were transferred returns the count, as `preadv` does).
fn vectored_at<S: Segment>(
    bufs: &mut [S],
    mut offset: u64,
    mut op: impl FnMut(&mut [u8], u64) -> io::Result<usize>,
) -> io::Result<usize> {
    let mut total = 0;
    for b in bufs {
        let b = b.bytes_mut();
        let n = match op(b, offset) {
            Ok(n) => n,
            Err(e) if total == 0 => return Err(e),
            Err(_) => return Ok(total),
        };
        total += n;
        offset += n as u64;
        if n < b.len() {
            break;
        }
    }
    Ok(total)
}

/// `fallocate(2)` on the calling thread.
fn fallocate_sync(file: &File, mode: FallocateMode, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    };
    // SAFETY: [SYS-1]: fallocate takes an fd and three integers.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
