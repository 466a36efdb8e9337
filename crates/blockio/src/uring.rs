//! The io_uring engine: typed requests turned into SQEs on the context's own ring, and the
//! context's table of completion callbacks with the completion source that runs them.
//!
//! Every request's memory (buffers, iovec array, an `Arc` of the file) goes into the
//! monitor's request table as the request's keep-alive; the callback here only gets it back
//! with the completion (ARCHITECTURE.md, rule [URING-2]). This file holds the `unsafe` calls
//! to [`UringMonitor::add_sqe`], each of which hands over exactly the memory the SQE points at;
//! their `SAFETY` comments cite [URING-2], or [URING-1] for a request that points at no memory,
//! and [URING-5] for the registration of a [`FixedBufPool`](crate::FixedBufPool)'s memory and
//! the `READ_FIXED`/`WRITE_FIXED` requests that name one of its buffers.

use std::any::Any;
use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use aio_core::AioContext;
use fdmon_uring::{KeepAlive, RequestId, Sqe, UringMonitor};
use io_uring::{opcode, types};

use crate::fixed::{FixedBuf, Memory};
use crate::segment::{self, Segment};
use crate::{FallocateMode, IoBuf, Op, OpInner, direct};

/// What runs when a request completes: its result (`res` of the CQE), its keep-alive, and the
/// table, which takes back the keep-alive's box once emptied ([`Callbacks::recycle`]).
type Callback = Box<dyn FnOnce(i32, KeepAlive, &Callbacks)>;

/// How many emptied keep-alive boxes a context keeps for reuse.
const MAX_SPARE: usize = 16;

/// The context's callbacks for io_uring requests in flight, a context-local value: indexed by
/// the request's slot in the monitor's table (dense, reused), each with the request's whole
/// identity so that a stale completion cannot take a newer request's callback.
#[derive(Default)]
struct Callbacks {
    /// The identity its requests' [`Op`]s carry ([`crate::engine_uid`]; 0 for a stand-in).
    uid: u64,
    table: RefCell<Vec<Option<(RequestId, Callback)>>>,
    /// Boxes of one-buffer keep-alives whose requests completed, emptied (no file, no
    /// buffer) and kept for the next requests of the same buffer type, so that a read or a
    /// write allocates one box (its callback), not two.
    spare: RefCell<Vec<KeepAlive>>,
}

impl Callbacks {
    /// `value` in a box: the spare box recycled last if it is of the same type (only that one
    /// is looked at, to keep this O(1); a context whose requests mix buffer types then
    /// allocates more often), else a new one.
    fn boxed<T: Any + Send>(&self, value: T) -> Box<T> {
        let mut spare = self.spare.borrow_mut();
        match spare.pop().map(|b| b.downcast::<T>()) {
            Some(Ok(mut b)) => {
                *b = value;
                b
            }
            Some(Err(other)) => {
                spare.push(other);
                Box::new(value)
            }
            None => Box::new(value),
        }
    }

    /// Keeps an emptied keep-alive box for [`boxed`](Self::boxed), up to [`MAX_SPARE`].
    fn recycle(&self, keep: KeepAlive) {
        let mut spare = self.spare.borrow_mut();
        if spare.len() < MAX_SPARE {
            spare.push(keep);
        }
    }

    fn insert(&self, id: RequestId, cb: Callback) {
        let mut table = self.table.borrow_mut();
        let slot = id.slot();
        if table.len() <= slot {
            table.resize_with(slot + 1, || None);
        }
        // The monitor gives a slot again only once the completion that held it has been taken
        // (`RequestId::slot`), and `run_completions` takes its callback at that moment.
        debug_assert!(table[slot].is_none(), "slot {slot} still holds a callback");
        table[slot] = Some((id, cb));
    }

    fn remove(&self, id: RequestId) -> Option<Callback> {
        let mut table = self.table.borrow_mut();
        let entry = table.get_mut(id.slot())?;
        match entry {
            Some((held, _)) if *held == id => entry.take().map(|(_, cb)| cb),
            _ => None,
        }
    }
}

/// The context's callback table, created on first use together with the completion source
/// that drains the monitor's ready list.
fn callbacks(ctx: &AioContext) -> Rc<Callbacks> {
    ctx.local(|ctx| {
        let cbs = Rc::new(Callbacks {
            uid: crate::engine_uid(),
            ..Callbacks::default()
        });
        let weak: Weak<Callbacks> = Rc::downgrade(&cbs);
        ctx.add_completion_source(Rc::new(move |ctx: &AioContext| run_completions(ctx, &weak)));
        LocalCallbacks(cbs)
    })
    .0
    .clone()
}

/// The context-local value: the table's `Rc`, which the completion source holds weakly, so
/// that the table goes with the context's locals.
struct LocalCallbacks(Rc<Callbacks>);

/// Runs `f` with the context's io_uring monitor, if it runs on one. Every use in this file
/// calls only the monitor's request methods (`add_sqe`, `pop_completion`, `cancel_request`,
/// `register_buffers` and queries), never its `FdMonitor` methods, and never replaces it.
fn with_ring<R>(ctx: &AioContext, f: impl FnOnce(Option<&mut UringMonitor>) -> R) -> R {
    // `f` neither drives the monitor's watched set nor replaces the monitor (above); it
    // only adds, cancels and reaps requests of its own.
    // SAFETY: `with_backend`'s contract ([FD-1]), kept as just said.
    unsafe { ctx.with_backend(|b| f(b.and_then(|m| m.downcast_mut::<UringMonitor>()))) }
}

/// The completion source: takes completions off the monitor's ready list one at a time and
/// runs their callbacks with no borrow held, so that a callback may submit requests or poll
/// the context (a nested iteration calls this again and goes on with the next completion).
/// It stops after the completion that was the last on the list when taken: one that a nested
/// wait inside its callback reaped is run by that nested iteration, or else by the next
/// iteration, whose wait does not sleep while the list holds any (and for which an outer
/// loop's `check` reports work, `FdMonitor::has_completions`).
fn run_completions(ctx: &AioContext, cbs: &Weak<Callbacks>) -> bool {
    let Some(cbs) = cbs.upgrade() else {
        return false;
    };
    let mut progress = false;
    loop {
        let next = with_ring(ctx, |m| {
            let m = m?;
            let c = m.pop_completion()?;
            Some((c, m.completions_waiting() > 0))
        });
        let Some((c, more)) = next else {
            break;
        };
        let cb = cbs.remove(c.id);
        if let Some(cb) = cb {
            cb(c.res, c.keep, &cbs);
            progress = true;
        }
        if !more {
            break;
        }
    }
    progress
}

/// Adds one request: `entry` must point only into memory owned by `keep` (see each caller).
/// `done` gets the CQE's result and `keep` back.
///
/// # Safety
///
/// As [`UringMonitor::add_sqe`]: every piece of memory `entry` points at is heap memory owned
/// by `keep` and used by nothing else until `done` gets `keep` back.
unsafe fn submit(
    ctx: &AioContext,
    entry: Sqe,
    keep: KeepAlive,
    done: impl FnOnce(i32, KeepAlive, &Callbacks) + 'static,
) -> Op {
    let cbs = callbacks(ctx);
    // SAFETY: [URING-2]: the caller's contract; with no fixed alternative there is no [URING-5] part.
    unsafe { submit_or_fixed(ctx, &cbs, entry, None, keep, done) }
}

/// As [`submit`], but submits `fixed.1` instead of `entry` when the ring's registered buffer
/// table is `fixed.0`.
///
/// # Safety
///
/// As [`submit`] for both entries; and `fixed.1` names (by index) a buffer of the table at
/// `fixed.0` whose lease `keep` owns, pointing only into that buffer ([URING-5]).
unsafe fn submit_or_fixed(
    ctx: &AioContext,
    cbs: &Callbacks,
    entry: Sqe,
    fixed: Option<(*const Memory, Sqe)>,
    keep: KeepAlive,
    done: impl FnOnce(i32, KeepAlive, &Callbacks) + 'static,
) -> Op {
    let added = with_ring(ctx, |m| match m {
        Some(m) => {
            let entry = match fixed {
                Some((table, fixed)) if is_table(m, table) => fixed,
                _ => entry,
            };
            // SAFETY: [URING-2], [URING-5]: the caller's contract is add_sqe's; a fixed entry only on its own table's ring.
            unsafe { m.add_sqe(entry, keep) }.map_err(|(_, keep)| (libc::EAGAIN, keep))
        }
        None => Err((libc::EOPNOTSUPP, keep)),
    });
    let id = match added {
        Ok(id) => id,
        // The request table is full (EAGAIN), or this context has no ring (EOPNOTSUPP: a
        // `BlockIo` made for an io_uring context used with another one): the request fails,
        // asynchronously as every completion, through the thread pool's completion path, with
        // its memory given back.
        Err((errno, keep)) => return fail_later(ctx, errno, keep, done),
    };
    cbs.insert(id, Box::new(done));
    Op(OpInner::Uring(id, cbs.uid))
}

/// Completes a request that could not be added with `-errno`, from the next iteration.
fn fail_later(
    ctx: &AioContext,
    errno: i32,
    keep: KeepAlive,
    done: impl FnOnce(i32, KeepAlive, &Callbacks) + 'static,
) -> Op {
    let keep = std::sync::Mutex::new(Some(keep));
    let ticket = threadpool::ThreadPool::of(ctx).submit_with(
        || (),
        move |_| {
            let keep = keep
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .unwrap_or_else(|| Box::new(()));
            done(-errno, keep, &Callbacks::default())
        },
    );
    Op(OpInner::Pool(ticket))
}

/// Cancels the request `id` of the engine `engine` (see [`Op::cancel`]): nothing when `ctx`'s
/// callback table is another's, since request ids repeat across rings.
pub(crate) fn cancel(ctx: &AioContext, id: RequestId, engine: u64) -> bool {
    let ours = ctx
        .try_local::<LocalCallbacks>()
        .is_some_and(|l| l.0.uid == engine);
    ours && with_ring(ctx, |m| m.is_some_and(|m| m.cancel_request(id)))
}

/// A CQE result as an `io::Result` of a byte count.
fn count(res: i32) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}

/// A CQE result as an `io::Result<()>`.
fn unit(res: i32) -> io::Result<()> {
    count(res).map(drop)
}

/// Whether `table` (the address of a pool's memory, which the caller keeps alive, so that no
/// other allocation can have it meanwhile) is the buffer table registered with `m`'s ring.
fn is_table(m: &UringMonitor, table: *const Memory) -> bool {
    m.registered_buffers()
        .is_some_and(|r| std::ptr::addr_eq(Arc::as_ptr(r), table))
}

/// Registers `mem`, a fixed buffer pool's memory, with `ctx`'s ring; the ring keeps a clone of
/// the `Arc` until it is closed.
pub(crate) fn register_buffers(ctx: &AioContext, mem: &Arc<Memory>) -> io::Result<()> {
    let iovecs: Vec<libc::iovec> = (0..mem.count())
        .map(|i| libc::iovec {
            iov_base: mem.buf_ptr(i).cast(),
            iov_len: mem.size(),
        })
        .collect();
    with_ring(ctx, |m| match m {
        // SAFETY: [URING-5]: each iovec is one buffer of `mem`, which the ring keeps until closed; leases are exclusive.
        Some(m) => unsafe { m.register_buffers(&iovecs, mem.clone()) },
        None => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "registered buffers need a context on the io_uring backend",
        )),
    })
}

/// Whether `mem` is the buffer table registered with `ctx`'s ring.
pub(crate) fn buffers_registered(ctx: &AioContext, mem: &Arc<Memory>) -> bool {
    with_ring(ctx, |m| m.is_some_and(|m| is_table(m, Arc::as_ptr(mem))))
}

/// The keep-alive of a one-buffer request: a `Vec<u8>` or a [`FixedBuf`]. Both fields are
/// taken out when it completes, and its box is used again ([`Callbacks::recycle`]).
struct OneBuf<B> {
    file: Option<Arc<File>>,
    buf: B,
}

/// The result of a one-buffer request and its buffer, taken back out of the keep-alive made by
/// `read_at`/`write_at`/`rw_fixed`, whose emptied box goes back to `cbs`; an `EINVAL` of a
/// misaligned direct transfer of `buf[start..]` explained.
fn one_buf<B: IoBuf>(
    res: i32,
    keep: KeepAlive,
    cbs: &Callbacks,
    start: usize,
    offset: u64,
    write: bool,
) -> (io::Result<usize>, B) {
    match keep.downcast::<OneBuf<B>>() {
        Ok(mut k) => {
            let (file, buf) = (k.file.take(), std::mem::take(&mut k.buf));
            cbs.recycle(k);
            let r = match &file {
                Some(f) => direct::explained(count(res), f, write, offset, || {
                    vec![direct::segment(&buf[start..])]
                }),
                None => count(res),
            };
            (r, buf)
        }
        Err(_) => (count(res), B::default()),
    }
}

/// The table and a keep-alive box (a spare one when there is one) holding `file` and `buf`,
/// for `read_at`/`write_at`/`rw_fixed`.
fn one_buf_keep<B: IoBuf>(
    ctx: &AioContext,
    file: Arc<File>,
    buf: B,
) -> (Rc<Callbacks>, Box<OneBuf<B>>) {
    let cbs = callbacks(ctx);
    let keep = cbs.boxed(OneBuf {
        file: Some(file),
        buf,
    });
    (cbs, keep)
}

/// Reads into `buf[start..]`; the caller checked `start <= buf.len()`.
pub(crate) fn read_at<B: IoBuf>(
    ctx: &AioContext,
    file: Arc<File>,
    buf: B,
    start: usize,
    offset: u64,
    done: impl FnOnce(io::Result<usize>, B) + 'static,
) -> Op {
    let fd = types::Fd(file.as_raw_fd());
    let (cbs, mut keep) = one_buf_keep(ctx, file, buf);
    let to = &mut keep.buf[start..];
    let len = u32::try_from(to.len()).unwrap_or(u32::MAX);
    let entry = opcode::Read::new(fd, to.as_mut_ptr(), len)
        .offset(offset)
        .build();
    // SAFETY: [URING-2]: the SQE points at `len` bytes of `keep.buf`'s heap memory only.
    unsafe {
        submit_or_fixed(ctx, &cbs, entry, None, keep, move |res, keep, cbs| {
            let (r, buf) = one_buf(res, keep, cbs, start, offset, false);
            done(r, buf)
        })
    }
}

/// Writes `buf[start..]`; the caller checked `start <= buf.len()`.
pub(crate) fn write_at<B: IoBuf>(
    ctx: &AioContext,
    file: Arc<File>,
    buf: B,
    start: usize,
    offset: u64,
    done: impl FnOnce(io::Result<usize>, B) + 'static,
) -> Op {
    let fd = types::Fd(file.as_raw_fd());
    let (cbs, keep) = one_buf_keep(ctx, file, buf);
    let from = &keep.buf[start..];
    let len = u32::try_from(from.len()).unwrap_or(u32::MAX);
    let entry = opcode::Write::new(fd, from.as_ptr(), len)
        .offset(offset)
        .build();
    // SAFETY: [URING-2]: the SQE points at `len` bytes of `keep.buf`'s heap memory only.
    unsafe {
        submit_or_fixed(ctx, &cbs, entry, None, keep, move |res, keep, cbs| {
            let (r, buf) = one_buf(res, keep, cbs, start, offset, true);
            done(r, buf)
        })
    }
}

/// Reads into or writes `buf[start..]` with `READ_FIXED`/`WRITE_FIXED` when `buf`'s pool is the
/// table registered with `ctx`'s ring, with `READ`/`WRITE` otherwise; the caller checked
/// `start <= buf.len()`.
pub(crate) fn rw_fixed(
    ctx: &AioContext,
    file: Arc<File>,
    buf: FixedBuf,
    start: usize,
    offset: u64,
    write: bool,
    done: impl FnOnce(io::Result<usize>, FixedBuf) + 'static,
) -> Op {
    // The memory's address only: `keep` below holds the lease, and so the memory, until the
    // comparison in `submit_or_fixed` is done.
    let Some((table, index)) = buf.table().map(|(t, i)| (Arc::as_ptr(t), i)) else {
        // A default buffer: no pool, no bytes, the plain path.
        return if write {
            write_at(ctx, file, buf, start, offset, done)
        } else {
            read_at(ctx, file, buf, start, offset, done)
        };
    };
    let fd = types::Fd(file.as_raw_fd());
    let (cbs, mut keep) = one_buf_keep(ctx, file, buf);
    let at = &mut keep.buf[start..];
    let len = u32::try_from(at.len()).unwrap_or(u32::MAX);
    let ptr = at.as_mut_ptr();
    let (plain, fixed) = if write {
        (
            opcode::Write::new(fd, ptr, len).offset(offset).build(),
            opcode::WriteFixed::new(fd, ptr, len, index)
                .offset(offset)
                .build(),
        )
    } else {
        (
            opcode::Read::new(fd, ptr, len).offset(offset).build(),
            opcode::ReadFixed::new(fd, ptr, len, index)
                .offset(offset)
                .build(),
        )
    };
    // SAFETY: [URING-2], [URING-5]: both point at `len` bytes of buffer `index` of `table`, leased by `keep.buf`.
    unsafe {
        submit_or_fixed(
            ctx,
            &cbs,
            plain,
            Some((table, fixed)),
            keep,
            move |res, keep, cbs| {
                let (r, buf) = one_buf(res, keep, cbs, start, offset, write);
                done(r, buf)
            },
        )
    }
}

/// The iovec array of a vectored request, pointing into the buffers of the same keep-alive.
struct IoVecs(Vec<libc::iovec>);

// An `iovec` holds raw pointers, which are not `Send`; these are only ever read by the kernel,
// never through this type.
// SAFETY: [URING-2]: they point only into the buffers of the same `VecBufs` and move with it.
unsafe impl Send for IoVecs {}

/// The keep-alive of a vectored request.
struct VecBufs<S> {
    file: Arc<File>,
    bufs: Vec<S>,
    iovecs: IoVecs,
}

pub(crate) fn vectored<S: Segment>(
    ctx: &AioContext,
    file: Arc<File>,
    bufs: Vec<S>,
    offset: u64,
    write: bool,
    done: impl FnOnce(io::Result<usize>, Vec<S>) + 'static,
) -> Op {
    let fd = types::Fd(file.as_raw_fd());
    let mut keep = Box::new(VecBufs {
        file,
        bufs,
        iovecs: IoVecs(Vec::new()),
    });
    keep.iovecs = IoVecs(segment::iovecs(&mut keep.bufs));
    let n = u32::try_from(keep.iovecs.0.len()).unwrap_or(u32::MAX);
    let ptr = keep.iovecs.0.as_ptr();
    let entry = if write {
        opcode::Writev::new(fd, ptr, n).offset(offset).build()
    } else {
        opcode::Readv::new(fd, ptr, n).offset(offset).build()
    };
    // The SQE points at `keep.iovecs`, which point into the heap memory of `keep.bufs`'
    // `Vec`s (a sealed `Segment` is one), which does not move with them.
    // SAFETY: [URING-2], kept as just said.
    unsafe {
        submit(ctx, entry, keep, move |res, keep, _| {
            match keep.downcast::<VecBufs<S>>() {
                Ok(k) => {
                    let r = direct::explained(count(res), &k.file, write, offset, || {
                        segment::segments(&k.bufs)
                    });
                    done(r, k.bufs)
                }
                Err(_) => done(count(res), Vec::new()),
            }
        })
    }
}

pub(crate) fn fsync(
    ctx: &AioContext,
    file: Arc<File>,
    data_only: bool,
    done: impl FnOnce(io::Result<()>) + 'static,
) -> Op {
    let mut op = opcode::Fsync::new(types::Fd(file.as_raw_fd()));
    if data_only {
        op = op.flags(types::FsyncFlags::DATASYNC);
    }
    // SAFETY: [URING-1]: an FSYNC points at no memory; `keep` only holds the file open.
    unsafe {
        submit(ctx, op.build(), Box::new(file), move |res, _, _| {
            done(unit(res))
        })
    }
}

pub(crate) fn fallocate(
    ctx: &AioContext,
    file: Arc<File>,
    mode: FallocateMode,
    offset: u64,
    len: u64,
    done: impl FnOnce(io::Result<()>) + 'static,
) -> Op {
    let entry = opcode::Fallocate::new(types::Fd(file.as_raw_fd()), len)
        .offset(offset)
        .mode(mode)
        .build();
    // SAFETY: [URING-1]: a FALLOCATE carries only integers; `keep` only holds the file open.
    unsafe { submit(ctx, entry, Box::new(file), move |res, _, _| done(unit(res))) }
}

pub(crate) fn nop(ctx: &AioContext, done: impl FnOnce(io::Result<()>) + 'static) -> Op {
    let entry = opcode::Nop::new().build();
    // SAFETY: [URING-1]: a NOP points at no memory.
    unsafe { submit(ctx, entry, Box::new(()), move |res, _, _| done(unit(res))) }
}
