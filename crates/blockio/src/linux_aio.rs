//! The Linux native AIO engine (QEMU's `block/linux-aio.c`): `io_setup`/`io_submit`/
//! `io_getevents` through raw system calls, completion signalled on an eventfd
//! (`IOCB_FLAG_RESFD`) that the context watches as an fd handler, and submissions batched per
//! iteration: requests queue up and one one-shot BH submits them all in one `io_submit`
//! (QEMU's plug / `defer_call`). `EAGAIN` leaves the rest queued until a completion frees a
//! slot. Completions are taken from the kernel into a queue and run from there, one at a time,
//! by a completion source that every iteration calls, nested ones included, so that a
//! callback may poll the context and a panicking one loses no other completion (QEMU
//! reschedules its completion BH around each callback; see [`Laio::new`]). This file owns
//! the kernel AIO context of one `AioContext`, its request table and every
//! `unsafe` of the engine; the `SAFETY` comments cite [LAIO-1], [LAIO-2] and [SYS-n] of
//! ARCHITECTURE.md ("The kernel boundary").
//!
//! Native AIO has no no-op and no fallocate; those go to the thread pool, as in QEMU.
//! Without `O_DIRECT`, the kernel runs most requests synchronously inside `io_submit`; the
//! completion still arrives through the eventfd, so the semantics do not change.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::rc::Rc;
use std::sync::Arc;

use aio_core::{AioContext, EventNotifier, FdHandler};

use crate::segment::{self, Segment};
use crate::{IoBuf, Op, OpInner, direct};

/// Memory a request keeps alive until the kernel has completed it.
type KeepAlive = Box<dyn std::any::Any>;
/// What runs when a request completes: the event's `res` and the keep-alive.
type Callback = Box<dyn FnOnce(i64, KeepAlive)>;

/// How many requests the kernel context accepts in flight (QEMU's `MAX_EVENTS`).
const MAX_EVENTS: usize = 1024;

const IOCB_CMD_PREAD: u16 = 0;
const IOCB_CMD_PWRITE: u16 = 1;
const IOCB_CMD_FSYNC: u16 = 2;
const IOCB_CMD_FDSYNC: u16 = 3;
const IOCB_CMD_PREADV: u16 = 7;
const IOCB_CMD_PWRITEV: u16 = 8;
const IOCB_FLAG_RESFD: u32 = 1;

/// The `magic` of the completion ring the kernel maps at an AIO context's id (`fs/aio.c`).
const AIO_RING_MAGIC: u32 = 0xa10a_10a1;
/// Where the ring header's `u32` fields sit: `id, nr, head, tail, magic, ...`.
const RING_HEAD: usize = 2;
const RING_TAIL: usize = 3;
const RING_MAGIC: usize = 4;

/// The kernel's `struct iocb` (little-endian layout: `aio_key` before `aio_rw_flags`).
#[repr(C)]
#[derive(Debug, Default)]
struct Iocb {
    aio_data: u64,
    aio_key: u32,
    aio_rw_flags: i32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    aio_buf: u64,
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    aio_flags: u32,
    aio_resfd: u32,
}

// The layouts above are the kernel ABI's on 64-bit little-endian targets; `of` refuses others.
const _: () = assert!(std::mem::size_of::<Iocb>() == 64);
const _: () = assert!(std::mem::size_of::<IoEvent>() == 32);

/// The kernel's `struct io_event`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

/// One request: its iocb (boxed, so its address is stable), its memory, its callback.
struct Req {
    /// Tells this request from earlier ones in the same slot, for late cancels.
    generation: u64,
    iocb: Box<Iocb>,
    keep: KeepAlive,
    done: Callback,
}

/// The engine state of one context, a context-local value.
pub(crate) struct Laio {
    /// The kernel AIO context (`aio_context_t`).
    id: u64,
    /// The identity its requests' [`Op`]s carry ([`crate::engine_uid`]).
    uid: u64,
    notifier: Arc<EventNotifier>,
    handler: RefCell<Option<FdHandler>>,
    /// Requests by slot; `None` is a free slot.
    slots: RefCell<Vec<Option<Req>>>,
    free: RefCell<Vec<usize>>,
    /// Slots waiting for `io_submit`.
    pending: RefCell<VecDeque<usize>>,
    /// How many requests the kernel holds.
    in_kernel: Cell<usize>,
    /// Completions whose callbacks have not run yet, oldest first, as `(slot, res)`: taken
    /// from the kernel, or failed by `io_submit`. Only the completion source runs them, so
    /// that a nested iteration (a callback that polls the context) or the iteration after a
    /// panicking callback goes on with the rest.
    reaped: RefCell<VecDeque<(usize, i64)>>,
    /// Whether the kernel's completion ring can be peeked at ([`Laio::has_events`]).
    ring: bool,
    /// Whether the submission BH is scheduled.
    flush_scheduled: Cell<bool>,
    /// The generation of the next request.
    next_generation: Cell<u64>,
}

/// The context-local wrapper: the engine, or why the kernel refused it.
struct LocalLaio(Result<Rc<Laio>, (io::ErrorKind, String)>);

/// Whether the kernel mapped its completion ring at `id` with the header this engine knows
/// (a kernel always has since Linux 2.6; [LAIO-3]).
fn ring_is_readable(id: u64) -> bool {
    if id == 0 || !id.is_multiple_of(4096) {
        return false;
    }
    let header = id as *const u32;
    // io_setup returned `id`, the address of the ring's mapping; only the header is read.
    // SAFETY: [LAIO-3]: a non-null, page-aligned ring address from io_setup, before any request.
    let magic = unsafe { load(header, RING_MAGIC) };
    magic == AIO_RING_MAGIC
}

/// An atomic load of the ring header's `u32` field `index`, which the kernel writes
/// concurrently (Acquire: the events before `tail` are visible once `tail` is).
///
/// # Safety
///
/// `header` is the address of a live AIO completion ring ([LAIO-3]) and `index` < 8.
unsafe fn load(header: *const u32, index: usize) -> u32 {
    // The field is a 4-byte aligned u32 of a live mapping that only the kernel writes.
    // SAFETY: [LAIO-3]: the caller's contract; the field is only ever read, atomically.
    let field = unsafe { std::sync::atomic::AtomicU32::from_ptr(header.add(index).cast_mut()) };
    field.load(std::sync::atomic::Ordering::Acquire)
}

/// The context's native AIO engine, set up on first use.
pub(crate) fn of(ctx: &AioContext) -> io::Result<Rc<Laio>> {
    if cfg!(target_endian = "big") || cfg!(not(target_pointer_width = "64")) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "Linux native AIO: this engine knows the iocb layout of 64-bit little-endian targets only",
        ));
    }
    let local = ctx.local(|ctx| LocalLaio(Laio::new(ctx).map_err(|e| (e.kind(), e.to_string()))));
    match &local.0 {
        Ok(l) => Ok(l.clone()),
        Err((kind, msg)) => Err(io::Error::new(*kind, format!("Linux native AIO: {msg}"))),
    }
}

impl Laio {
    fn new(ctx: &AioContext) -> io::Result<Rc<Laio>> {
        let mut id: u64 = 0;
        // SAFETY: [SYS-2]: io_setup writes one aio_context_t into `id`, a borrowed local.
        let rc = unsafe { libc::syscall(libc::SYS_io_setup, MAX_EVENTS as libc::c_long, &mut id) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EAGAIN) {
                // The system-wide limit of AIO events: each context asks for MAX_EVENTS, which
                // the kernel raises to at least 4 per possible CPU and then doubles.
                return Err(io::Error::new(
                    err.kind(),
                    format!(
                        "io_setup of {MAX_EVENTS} events: {err}: the system's limit of AIO \
                         events in use (/proc/sys/fs/aio-max-nr, against aio-nr) is reached"
                    ),
                ));
            }
            return Err(err);
        }
        let notifier = Arc::new(EventNotifier::new()?);
        let ring = ring_is_readable(id);
        if !ring {
            tracing::debug!("Linux native AIO: no completion ring to peek at; no polling");
        }
        let laio = Rc::new(Laio {
            id,
            uid: crate::engine_uid(),
            notifier: notifier.clone(),
            handler: RefCell::new(None),
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            pending: RefCell::new(VecDeque::new()),
            in_kernel: Cell::new(0),
            reaped: RefCell::new(VecDeque::new()),
            ring,
            flush_scheduled: Cell::new(false),
            next_generation: Cell::new(0),
        });
        // Callbacks run from one place only: a completion source, which every iteration calls
        // after its BHs, nested ones included, and which takes one completion at a time (QEMU
        // reschedules its completion BH around each callback instead; a BH or handler here
        // cannot be re-entered). The eventfd's handler never runs a callback, so a nested
        // iteration can always dispatch it: it clears the eventfd, then takes what landed
        // since the source looked (a completion after the clear sets the eventfd again). While
        // completions wait in `reaped`, the pending check keeps every wait from sleeping, for
        // their eventfd signal is spent. The ring shows completions without a system call, so
        // the handler can take part in adaptive polling (QEMU's `qemu_laio_poll_cb`): a
        // completion that lands while the loop polls is run by that iteration's source.
        let (on_fd, on_poll, on_ready, on_source, held) = (
            Rc::downgrade(&laio),
            Rc::downgrade(&laio),
            Rc::downgrade(&laio),
            Rc::downgrade(&laio),
            Rc::downgrade(&laio),
        );
        let e = notifier.clone();
        let mut builder = ctx.fd_handler(notifier.clone()).on_read(move |_| {
            e.test_and_clear();
            if let Some(l) = on_fd.upgrade() {
                l.fetch();
                l.flush();
            }
        });
        if ring {
            builder = builder
                .on_poll(move || on_poll.upgrade().is_some_and(|l| l.has_events()))
                .on_poll_ready(move |_| {
                    // The eventfd stays set; its next dispatch clears it.
                    if let Some(l) = on_ready.upgrade() {
                        l.fetch();
                        l.flush();
                    }
                });
        }
        let handler = builder.register()?;
        *laio.handler.borrow_mut() = Some(handler);
        ctx.add_completion_source(Rc::new(move |_: &AioContext| {
            let Some(l) = on_source.upgrade() else {
                return false;
            };
            let ran = l.deliver();
            if ran {
                // Completions freed room in the kernel's queue for requests waiting on it.
                l.flush();
            }
            ran
        }));
        ctx.add_completion_pending(Rc::new(move || {
            held.upgrade()
                .is_some_and(|l| !l.reaped.borrow().is_empty())
        }));
        Ok(laio)
    }

    /// Queues a request; the submission BH sends the iteration's batch in one `io_submit`.
    ///
    /// # Safety
    ///
    /// Every piece of memory `iocb` points at is heap memory owned by `keep`, used by nothing
    /// else until `done` gets `keep` back ([LAIO-1]).
    unsafe fn add(&self, ctx: &AioContext, mut iocb: Iocb, keep: KeepAlive, done: Callback) -> Op {
        let slot = match self.free.borrow_mut().pop() {
            Some(s) => s,
            None => {
                let mut slots = self.slots.borrow_mut();
                slots.push(None);
                slots.len() - 1
            }
        };
        iocb.aio_data = slot as u64;
        iocb.aio_flags |= IOCB_FLAG_RESFD;
        iocb.aio_resfd = self.notifier.as_fd().as_raw_fd() as u32;
        let generation = self.next_generation.get();
        self.next_generation.set(generation + 1);
        self.slots.borrow_mut()[slot] = Some(Req {
            generation,
            iocb: Box::new(iocb),
            keep,
            done,
        });
        self.pending.borrow_mut().push_back(slot);
        if !self.flush_scheduled.replace(true) {
            ctx.schedule_oneshot(|| {
                if let Some(ctx) = AioContext::current()
                    && let Ok(l) = of(&ctx)
                {
                    l.flush_scheduled.set(false);
                    l.flush();
                }
            });
        }
        Op(OpInner::Laio(slot, generation, self.uid))
    }

    /// Whether the kernel has put completions on the ring that nobody reaped yet (QEMU's
    /// `io_getevents_peek`): two loads, no system call.
    /// Called only when `ring_is_readable` said yes at setup.
    fn has_events(&self) -> bool {
        let header = self.id as *const u32;
        // SAFETY: [LAIO-3]: the ring was checked at setup; the header is mapped until `io_destroy` in drop.
        let (head, tail) = unsafe { (load(header, RING_HEAD), load(header, RING_TAIL)) };
        head != tail
    }

    /// Submits every pending request, in as few `io_submit` calls as the kernel allows.
    fn flush(&self) {
        loop {
            let batch: Vec<*mut Iocb> = {
                let pending = self.pending.borrow();
                let mut slots = self.slots.borrow_mut();
                let room = MAX_EVENTS.saturating_sub(self.in_kernel.get());
                pending
                    .iter()
                    .take(room)
                    .filter_map(|&s| slots[s].as_mut().map(|r| &mut *r.iocb as *mut Iocb))
                    .collect()
            };
            if batch.is_empty() {
                return;
            }
            // `batch` (a live local array, [SYS-2]) holds the boxed iocbs of pending requests.
            // The kernel also writes each iocb's `aio_key` during the call: no reference to
            // an iocb is held across it (the pointers were made from `&mut` inside the
            // block above, and nothing reads the boxes until the call returns).
            // SAFETY: [LAIO-1]: each iocb and what it points at stays in `slots` until reaped.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_io_submit,
                    self.id,
                    batch.len() as libc::c_long,
                    batch.as_ptr(),
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EAGAIN) {
                    // Retried when a completion frees a slot, or by the next request.
                    return;
                }
                // Fail the first request and go on with the rest, as QEMU does; its callback
                // runs from the completion source, as every other.
                let slot = self.pending.borrow_mut().pop_front();
                if let Some(slot) = slot {
                    let res = -i64::from(e.raw_os_error().unwrap_or(libc::EIO));
                    self.reaped.borrow_mut().push_back((slot, res));
                }
                continue;
            }
            let n = rc as usize;
            self.pending.borrow_mut().drain(..n);
            self.in_kernel.set(self.in_kernel.get() + n);
            if n < batch.len() {
                return;
            }
        }
    }

    /// Runs the callbacks of completed requests, oldest first, one at a time with no borrow
    /// held, taking more from the kernel when those taken are done; whether it ran any. A
    /// callback may poll the context: the nested iteration's completion source goes on with
    /// the next completion, and its wait does not sleep while any are left in `reaped` (the
    /// pending check registered in [`Laio::new`]); nor does the next iteration's after a
    /// callback that panicked.
    fn deliver(&self) -> bool {
        let mut progress = false;
        loop {
            let next = self.reaped.borrow_mut().pop_front();
            let Some((slot, res)) = next else {
                if self.fetch() {
                    continue;
                }
                return progress;
            };
            self.complete(slot, res);
            progress = true;
        }
    }

    /// Moves the events the kernel has completed into `reaped`; whether there were any.
    fn fetch(&self) -> bool {
        if self.in_kernel.get() == 0 || (self.ring && !self.has_events()) {
            return false;
        }
        let mut events = [IoEvent::default(); 64];
        let mut any = false;
        loop {
            let timeout = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: [SYS-2]: `events` is borrowed, `events.len()` long; `timeout` is valid.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_io_getevents,
                    self.id,
                    0 as libc::c_long,
                    events.len() as libc::c_long,
                    events.as_mut_ptr(),
                    &timeout,
                )
            };
            if rc <= 0 {
                return any;
            }
            let got = &events[..rc as usize];
            self.in_kernel.set(self.in_kernel.get() - got.len());
            self.reaped
                .borrow_mut()
                .extend(got.iter().map(|ev| (ev.data as usize, ev.res)));
            any = true;
            if got.len() < events.len() {
                return true;
            }
        }
    }

    /// Frees `slot` and runs its callback with `res`.
    fn complete(&self, slot: usize, res: i64) {
        let req = self.slots.borrow_mut().get_mut(slot).and_then(Option::take);
        if let Some(req) = req {
            self.free.borrow_mut().push(slot);
            (req.done)(res, req.keep);
        }
    }

    /// Cancels the request in `slot` if it still waits for `io_submit` (the kernel cannot
    /// cancel file I/O once submitted: `io_cancel` fails with `EINVAL` there).
    fn cancel(&self, slot: usize, generation: u64) -> bool {
        let live = self
            .slots
            .borrow()
            .get(slot)
            .and_then(Option::as_ref)
            .is_some_and(|r| r.generation == generation);
        // One whose completion was fetched has completed; its callback has not run yet.
        if !live || self.reaped.borrow().iter().any(|&(s, _)| s == slot) {
            return false;
        }
        let pos = self.pending.borrow().iter().position(|&s| s == slot);
        if let Some(pos) = pos {
            self.pending.borrow_mut().remove(pos);
            // Completed by the completion source, like every completion: never inside `cancel`.
            self.reaped
                .borrow_mut()
                .push_back((slot, -i64::from(libc::ECANCELED)));
        }
        // Otherwise it is in the kernel, which cannot stop file I/O (`io_cancel` fails with
        // EINVAL there): it completes with its own result.
        true
    }
}

impl Drop for Laio {
    /// `io_destroy` waits until the kernel has completed every request of the context, so
    /// the buffers are freed afterwards only; if it fails, the memory of the requests in the
    /// kernel is leaked on purpose ([LAIO-2]).
    fn drop(&mut self) {
        // SAFETY: [SYS-1]: io_destroy takes the context id only.
        let rc = unsafe { libc::syscall(libc::SYS_io_destroy, self.id) };
        if rc < 0 && self.in_kernel.get() > 0 {
            let pending: Vec<usize> = self.pending.borrow().iter().copied().collect();
            for (i, s) in self.slots.get_mut().iter_mut().enumerate() {
                if !pending.contains(&i)
                    && let Some(req) = s.take()
                {
                    std::mem::forget(req);
                }
            }
        }
        self.handler.get_mut().take();
    }
}

/// Cancels a native AIO request of the engine `engine`; see [`Op::cancel`]. Nothing when
/// `ctx` has no native AIO engine, or another one: slots repeat across contexts.
pub(crate) fn cancel(ctx: &AioContext, slot: usize, generation: u64, engine: u64) -> bool {
    match ctx.try_local::<LocalLaio>().as_deref() {
        Some(LocalLaio(Ok(l))) if l.uid == engine => l.cancel(slot, generation),
        _ => false,
    }
}

fn count(res: i64) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error((-res) as i32))
    } else {
        Ok(res as usize)
    }
}

struct OneBuf<B> {
    file: Arc<File>,
    buf: B,
}

#[allow(clippy::too_many_arguments)] // one request's fields, as the iocb has them
pub(crate) fn rw<B: IoBuf>(
    ctx: &AioContext,
    laio: &Laio,
    file: Arc<File>,
    buf: B,
    start: usize,
    offset: u64,
    write: bool,
    done: impl FnOnce(io::Result<usize>, B) + 'static,
) -> Op {
    let fd = file.as_raw_fd() as u32;
    let mut keep = Box::new(OneBuf { file, buf });
    let at = &mut keep.buf[start..];
    let iocb = Iocb {
        aio_lio_opcode: if write {
            IOCB_CMD_PWRITE
        } else {
            IOCB_CMD_PREAD
        },
        aio_fildes: fd,
        aio_buf: at.as_mut_ptr() as u64,
        aio_nbytes: at.len() as u64,
        aio_offset: offset as i64,
        ..Iocb::default()
    };
    // SAFETY: [LAIO-1]: the iocb points at `keep.buf`'s heap memory only.
    unsafe {
        laio.add(
            ctx,
            iocb,
            keep,
            Box::new(move |res, keep| match keep.downcast::<OneBuf<B>>() {
                Ok(k) => {
                    let r = direct::explained(count(res), &k.file, write, offset, || {
                        vec![direct::segment(&k.buf[start..])]
                    });
                    done(r, k.buf)
                }
                Err(_) => done(count(res), B::default()),
            }),
        )
    }
}

struct VecBufs<S> {
    file: Arc<File>,
    bufs: Vec<S>,
    _iovecs: Vec<libc::iovec>,
}

pub(crate) fn rwv<S: Segment>(
    ctx: &AioContext,
    laio: &Laio,
    file: Arc<File>,
    mut bufs: Vec<S>,
    offset: u64,
    write: bool,
    done: impl FnOnce(io::Result<usize>, Vec<S>) + 'static,
) -> Op {
    let fd = file.as_raw_fd() as u32;
    let iovecs = segment::iovecs(&mut bufs);
    let iocb = Iocb {
        aio_lio_opcode: if write {
            IOCB_CMD_PWRITEV
        } else {
            IOCB_CMD_PREADV
        },
        aio_fildes: fd,
        aio_buf: iovecs.as_ptr() as u64,
        aio_nbytes: iovecs.len() as u64,
        aio_offset: offset as i64,
        ..Iocb::default()
    };
    let keep = Box::new(VecBufs {
        file,
        bufs,
        _iovecs: iovecs,
    });
    // The iovec array and the buffers moved into `keep`; their heap memory did not move (a
    // sealed `Segment` is a `Vec`'s).
    // SAFETY: [LAIO-1]: the iocb points at `keep._iovecs`, which point into `keep.bufs`.
    unsafe {
        laio.add(
            ctx,
            iocb,
            keep,
            Box::new(move |res, keep| match keep.downcast::<VecBufs<S>>() {
                Ok(k) => {
                    let r = direct::explained(count(res), &k.file, write, offset, || {
                        segment::segments(&k.bufs)
                    });
                    done(r, k.bufs)
                }
                Err(_) => done(count(res), Vec::new()),
            }),
        )
    }
}

pub(crate) fn sync(
    ctx: &AioContext,
    laio: &Laio,
    file: Arc<File>,
    data_only: bool,
    done: impl FnOnce(io::Result<()>) + 'static,
) -> Op {
    let iocb = Iocb {
        aio_lio_opcode: if data_only {
            IOCB_CMD_FDSYNC
        } else {
            IOCB_CMD_FSYNC
        },
        aio_fildes: file.as_raw_fd() as u32,
        ..Iocb::default()
    };
    // SAFETY: [LAIO-1]: an fsync iocb points at no memory; `keep` holds the file open.
    unsafe {
        laio.add(
            ctx,
            iocb,
            Box::new(file),
            Box::new(move |res, _| done(count(res).map(drop))),
        )
    }
}
