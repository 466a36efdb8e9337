//! Where an admitted request's file I/O runs (`--aio`): the whole request as blocking work on
//! the context's thread pool (`threads`, qemu-nbd's default), or its READ, WRITE and FLUSH as
//! block I/O requests on the context itself ([`BlockIo`]: `io_uring` on the context's own
//! ring, `native` with Linux AIO), whose completions run on the context's thread; under
//! either, small requests on the page cache are served as under `threads`: at once on the
//! context's thread when others came with them, a lone one by the pool's path
//! ([`worth_serving_at_once`] says why). Both engines
//! of `connection.rs` and `conn_task.rs` start requests here and build the same replies.
//!
//! As in qemu-nbd, only the data path changes with `--aio`: TRIM and WRITE_ZEROES (fallocate),
//! CACHE (readahead) and the READs that look for holes (`lseek`) stay on the pool in every
//! mode; BLOCK_STATUS is answered on the context's thread while no change of the image runs
//! ([`block_status_now`]), on the pool otherwise. A big page-cache WRITE that finds its
//! connection idle (callback engine) does not come here: a pool worker streams it
//! (`write_stream.rs`).

use std::cell::RefCell;
use std::fs::File;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use aio::blockio::Engine as IoEngine;
use aio::{AioContext, BlockIo, ThreadPool};

use crate::buffers::BufPool;
use crate::export::{self, Export, Pass, Run};
use crate::protocol::*;
use crate::session::{self, IoBuf};

/// The block I/O of a context for `engine`, which `main.rs` checked when it made the context;
/// should that check be undone, the thread pool, which always works, with a line on stderr.
pub fn block_io(ctx: &AioContext, engine: IoEngine) -> BlockIo {
    BlockIo::with_engine(ctx, engine).unwrap_or_else(|e| {
        eprintln!("nbd-server: {e}; using the thread pool");
        BlockIo::with_engine(ctx, IoEngine::Threads).expect("the thread pool always works")
    })
}

/// Starts request `req` (admitted by `session::classify`) with `buf`, its reply buffer or its
/// WRITE payload; `done` gets, on the context's thread, what [`session::work`] returns: the
/// whole reply, or an empty buffer for a status reply, or the error. Under `--cache none` the
/// data moves through the `O_DIRECT` file when its buffer, offset and length are aligned
/// (`Export::file_for`). `alone` as for [`worth_serving_at_once`], which says where a lone
/// small request goes under `--aio io_uring` and `native`.
#[allow(clippy::too_many_arguments)] // a request and everything it runs with
pub fn start(
    ctx: &AioContext,
    io: BlockIo,
    pool: &ThreadPool,
    export: &Arc<Export>,
    req: Request,
    buf: IoBuf,
    framing: Framing,
    alone: bool,
    done: impl FnOnce(io::Result<IoBuf>) + 'static,
) {
    let pool_path = match io.engine() {
        IoEngine::Threads => true,
        // A lone small request on the page cache takes the pool's path as under `threads`
        // ([`worth_serving_at_once`] says why).
        IoEngine::IoUring | IoEngine::LinuxAio => {
            alone
                && export.align() <= 1
                && match req.kind {
                    CMD_READ => req.length <= NOWAIT_READ_MAX,
                    CMD_WRITE => req.length <= LANE_WRITE_MAX,
                    _ => false,
                }
        }
    };
    if pool_path {
        if req.kind == CMD_WRITE && req.length <= LANE_WRITE_MAX && export.align() <= 1 {
            return lane_write(ctx, pool, export, req, buf, framing, done);
        }
        return on_pool(pool, export, req, buf, framing, done, true);
    }
    match req.kind {
        CMD_READ if !session::looks_for_holes(framing, &req) => {
            let prefix = framing.read_prefix();
            let len = req.length as usize;
            let out = session::read_buffer(buf.vec, prefix, len, export.align());
            let start = out.start;
            let data = start + prefix;
            let file = export.file_for(&out.vec[data..], req.offset).clone();
            let Ok(pass) = admit(export, &file) else {
                return on_pool(pool, export, req, out, framing, done, false);
            };
            let whole = move |r: io::Result<()>, mut vec: Vec<u8>| {
                drop(pass);
                done(r.map(|()| {
                    // Admitted reads are at most MAX_PAYLOAD long.
                    let reply = &mut vec[start..];
                    framing.write_read_prefix(reply, &req, req.offset, len as u32);
                    IoBuf::at(vec, start)
                }))
            };
            transfer(ctx, io, file, out.vec, data, req.offset, false, whole);
        }
        CMD_WRITE => {
            let fua = req.flags & CMD_FLAG_FUA != 0;
            let file = export.file_for(buf.bytes(), req.offset).clone();
            let Ok(pass) = admit(export, &file) else {
                return on_pool(pool, export, req, buf, framing, done, false);
            };
            let sync_file = file.clone();
            // The ring's or the kernel AIO's write holds the inode lock like a pwrite: the
            // context's thread must not `lseek` for holes meanwhile (`block_status_now`).
            let changing = export.changing();
            let written = move |r: io::Result<()>, vec: Vec<u8>| {
                drop(pass);
                let reply = move |r: io::Result<()>| {
                    drop(changing);
                    // The payload is on disk: its buffer carries the status reply.
                    done(r.map(|()| session::write_done(vec, framing, &req)))
                };
                match (r, AioContext::current()) {
                    (Ok(()), Some(ctx)) if fua => {
                        io.fdatasync(&ctx, &sync_file, reply);
                    }
                    (Ok(()), None) if fua => reply(Err(io::Error::other(
                        "a completion ran outside its context",
                    ))),
                    (r, _) => reply(r),
                }
            };
            transfer(ctx, io, file, buf.vec, buf.start, req.offset, true, written);
        }
        CMD_FLUSH => {
            io.fdatasync(ctx, export.file(), move |r| {
                done(r.map(|()| IoBuf::default()))
            });
        }
        // The rest, READs that look for holes among them: the pool, where such a READ that
        // finds none may come back with its data as a tail (`read_by_sendfile`).
        _ => on_pool(pool, export, req, buf, framing, done, true),
    }
}

/// The reply to a BLOCK_STATUS, built at once on the context's thread, as QEMU's file driver
/// answers block status in its coroutine (`lseek` with `SEEK_HOLE` and `SEEK_DATA`, which reads
/// the file's extent map and never its data); `None` for another request, or while a WRITE,
/// TRIM or WRITE_ZEROES of the image runs: `lseek` on ext4 waits for the inode's lock, which
/// they hold, so then the pool looks, as [`read_by_sendfile`] does for a READ that looks for
/// holes. The trip to the pool and back is two wake-ups, each a wait for a CPU on a busy
/// machine: nbdcopy of a 4 GiB image holding 8 MiB of data, 20 runs, medians of 3 rounds, went
/// from 9.3–10.2 ms to 7.2–7.7 ms (qemu-nbd 11.0–11.3 ms), and with two CPU hogs running from
/// 68–76 ms to 34–35 ms (BENCHMARKS.md, "Session of 2026-12-06, 08:27 UTC"). The reply holds
/// at most [`EXTENTS_AT_ONCE`] extents, so that a fragmented file cannot hold the loop for long.
pub fn block_status_now(
    export: &Export,
    req: &Request,
    framing: Framing,
) -> Option<io::Result<IoBuf>> {
    if req.kind != CMD_BLOCK_STATUS || export.is_being_changed() {
        return None;
    }
    Some(session::block_status_reply(export, req, framing, EXTENTS_AT_ONCE).map(IoBuf::from))
}

/// The most extents a BLOCK_STATUS answered on the context's thread describes
/// ([`block_status_now`]): each costs up to two `lseek`s, so a request over a file of many
/// small extents holds the loop for a bounded time (about a millisecond on ext4) instead of up
/// to [`session::MAX_EXTENTS`]; NBD lets a reply cover less than the request, and the client
/// asks again from where it ended.
pub const EXTENTS_AT_ONCE: usize = 256;

/// The largest READ that [`read_cached_now`] tries on the context's thread: small reads, whose
/// cost is mostly the trip to a worker and back; bigger ones are mostly copying, which the
/// pool's workers do in parallel with the loop.
pub const NOWAIT_READ_MAX: u64 = 64 << 10;

/// On the page cache: serves a READ of at most [`NOWAIT_READ_MAX`] bytes at once,
/// on the context's thread, when the page cache holds all of it (`preadv2` with `RWF_NOWAIT`,
/// which fails with `EAGAIN` rather than wait for the disk or a lock), and returns the whole
/// reply. Anything else gives the buffer back untouched in meaning, for the engine: a read that
/// would block, a partial one, an error (the engine meets it again and reports it), a read that
/// looks for holes, `--cache none`, or a kernel without `RWF_NOWAIT`. When to try it is
/// [`worth_serving_at_once`]'s call.
pub fn read_cached_now(
    export: &Export,
    req: &Request,
    framing: Framing,
    buf: IoBuf,
) -> Result<IoBuf, IoBuf> {
    if req.kind != CMD_READ
        || req.length > NOWAIT_READ_MAX
        || export.align() > 1
        || session::looks_for_holes(framing, req)
    {
        return Err(buf);
    }
    let prefix = framing.read_prefix();
    let len = req.length as usize;
    let mut out = session::read_buffer(buf.vec, prefix, len, 1);
    let reply = &mut out.vec[out.start..];
    let data = &mut reply[prefix..];
    let got = rustix::io::preadv2(
        export.file(),
        &mut [io::IoSliceMut::new(data)],
        req.offset,
        rustix::io::ReadWriteFlags::NOWAIT,
    );
    if got != Ok(len) {
        return Err(out);
    }
    framing.write_read_prefix(reply, req, req.offset, len as u32);
    Ok(out)
}

/// On the page cache, whatever `--aio`: the reply to a READ of [`session::SENDFILE_READ_MIN`]
/// bytes or more whose pages the page cache holds now (`cachestat`), built at once on the
/// context's thread as its header alone, in a buffer from `bufs`, with the data as a
/// [`FileTail`](session::FileTail) that the connection sends with `sendfile` behind it: no
/// worker, and no copy of the data in user space (a Unix socket or TCP takes references to the
/// cached pages). `None` for anything else, which takes the `--aio` engine or the pool: a
/// smaller READ, data the disk
/// must supply (`sendfile` would wait for it on the context's thread), `--cache none`, an
/// image that cannot be sent from ([`Export::sendfile`]), a read that
/// looks for holes and finds some (its hole chunks are built on the pool), and a read that
/// looks for holes while a WRITE, TRIM or WRITE_ZEROES of the image runs: finding holes
/// (`lseek`) waits on ext4 for the file's inode lock, which those hold, throttled or not, so
/// then the pool looks, and its reply is again a header and a tail when the read is all data
/// and cached ([`session::work`]). Looking on the context's thread otherwise measured twice
/// as fast as the trip to the pool (nbdcopy `-C 4 -R 64`: 4 677 against 2 295 MiB/s,
/// BENCHMARKS.md); a change that starts just after the check can still hold it up once.
///
/// The `--aio` mode picks how the file is read when the data must be read; cached data sent
/// this way is not read by any of them. Under `--aio io_uring` and `native` it measured 2.1–2.5×
/// the ring's or the kernel AIO's read into a buffer and copy to the socket for nbdcopy's 256 KiB
/// reads, at a fifth of the server's CPU per GiB (BENCHMARKS.md, "big READs from the page cache
/// in every `--aio` mode").
///
/// Unlike [`read_cached_now`], a lone READ is served this way too: what it saves is the copy
/// of up to 32 MiB, not a wake-up.
///
/// The pages are sent as they are when the socket takes them, so a WRITE to the same range
/// that runs after this READ was answered but before the client read the reply can show in
/// it: only requests that overlap in time can meet so, and NBD leaves their order open.
pub fn read_by_sendfile(
    export: &Export,
    req: &Request,
    framing: Framing,
    bufs: &BufPool,
) -> Option<IoBuf> {
    let holes = session::looks_for_holes(framing, req);
    if (holes && export.is_being_changed()) || !session::may_send_from_cache(export, req) {
        return None;
    }
    if holes {
        // Two runs at most: one that covers the whole request is all data.
        let runs = export.allocation(req.offset, req.length, 2).ok()?;
        if !matches!(runs[..], [Run { hole: false, len }] if len == req.length) {
            return None;
        }
    }
    Some(session::tail_reply(export, req, framing, bufs.take(0)))
}

/// Whether a small request on the page cache is worth serving at once on the context's thread
/// (a READ with [`read_cached_now`], a WRITE that [`may_write_at_once`]) rather than by the
/// `--aio` engine; `alone` when no other request of its connection is in flight and none came
/// in the same read from the socket (queue depth 1). Only when not alone, in every mode; each
/// mode measured:
/// * `--aio threads`: only when not alone. A lone request goes to the pool even when cached:
///   on 2 vCPUs that measured twice as fast for READs (31 000 against 16 000 fio 4 KiB reads per
///   second, BENCHMARKS.md, "the three-way race after issue 16's changes"), because the
///   worker's trip overlaps the client's next send and keeps both CPUs from idling, while at
///   queue depth 32 serving at once is 1.9× the pool;
/// * `--aio io_uring`: only when not alone, as under `threads`, for a READ and a WRITE; and a
///   lone one takes the pool's path too ([`start`]: a READ of at most [`NOWAIT_READ_MAX`] the
///   pool, a WRITE of at most [`LANE_WRITE_MAX`] the write lane). Not alone, at once beats the
///   ring: the kernel would do the same read at submission, but the request's round trip
///   through the ring costs more work on the context's thread than the one system call (fio
///   4 KiB random reads at queue depth 32, medians of 4 alternating runs: 200 k IOPS at once
///   against 148 k through the ring), and ext4 has no non-blocking buffered write, so the ring
///   hands each WRITE to one of the kernel's io-wq workers (143 k against 89 k at queue depth
///   32; BENCHMARKS.md, "small requests at once under `--aio io_uring`"). Alone, neither the
///   ring nor at once keeps a CPU awake between requests, and the client's next request then
///   wakes an idle vCPU: `qemu-img bench` at queue depth 1, 50 000 requests, 3 alternating
///   runs, 6.0–6.2 k READs per second through the ring (qemu-nbd `--aio=io_uring` 6.0–6.2 k)
///   against 9.8–13.0 k through the pool, and 6.2–6.8 k WRITEs at once (qemu-nbd 5.3–5.8 k)
///   against 8.6–12.7 k through the lane, for 20–60 % more server CPU per request (the
///   worker's spin; BENCHMARKS.md, "Session of 2026-12-06");
/// * `--aio native`: as under `threads` and `io_uring`. Linux AIO is asynchronous only for
///   `O_DIRECT`: `io_submit` of a buffered request does its copy inline, on the context's
///   thread, so serving it at once is the same work without the iocb, the eventfd's wake-up
///   and `io_getevents` (fio 4 KiB random writes at queue depth 32, 3 alternating
///   runs of 5 s: 158–162 k per second at once against 133–135 k through `io_submit`, nbdkit
///   137–153 k; reads 251 k against 170–187 k). Alone,
///   a small request on the page cache takes the pool's path, as under `io_uring` and for the
///   same reason (`qemu-img bench` at queue depth 1, 20 000 requests, 3 alternating runs:
///   23–65 k READs per second against 13 k through `io_submit`, 27–55 k WRITEs against
///   12–14 k).
pub fn worth_serving_at_once(alone: bool) -> bool {
    !alone
}

/// Whether a WRITE may be done at once on the context's thread, from wherever its payload
/// is, when [`worth_serving_at_once`] says so too: on the page cache, at most
/// [`LANE_WRITE_MAX`] bytes, and without FUA (which would wait for the disk). ext4 refuses
/// `RWF_NOWAIT` for buffered writes (`EOPNOTSUPP`), so unlike [`read_cached_now`] the write
/// cannot decline to block; a page-cache write mostly copies, which costs less than the trip to
/// a worker and back: under `--aio threads`, fio 4 KiB random writes at queue depth 32, medians
/// of 5 alternating runs, 119 k IOPS against 72 k through the lane (nbdkit 128 k), and 67–99 k
/// against 19–36 k while the kernel writes back a dirty image (BENCHMARKS.md, "small WRITEs at
/// once"); there a lone WRITE takes the lane, for the reason a lone READ takes the pool
/// ([`worth_serving_at_once`] has each mode's rule).
pub fn may_write_at_once(export: &Export, req: &Request) -> bool {
    req.kind == CMD_WRITE
        && req.length <= LANE_WRITE_MAX
        && req.flags & CMD_FLAG_FUA == 0
        && export.align() <= 1
}

/// Whether a transfer through `file` may go to the engine now, with its place in the
/// export's gate (`--cache none`: see `export::Gate`), or must take the pool, where it may
/// wait for its turn: an unaligned one (through the page cache), or a direct one while
/// page-cache transfers run or wait. Without `--cache none` every transfer may go, with no
/// place to hold.
fn admit(export: &Export, file: &Arc<File>) -> Result<Option<Pass>, ()> {
    if export.align() <= 1 {
        return Ok(None);
    }
    if !export.is_direct(file) {
        return Err(());
    }
    export.try_direct().map(Some).ok_or(())
}

/// The largest WRITE that goes through the context's [`WriteLane`].
pub const LANE_WRITE_MAX: u64 = 64 << 10;

/// One small WRITE waiting in the lane: what the worker needs, and what the loop runs after.
type LaneEntry = (
    Arc<Export>,
    Request,
    IoBuf,
    Framing,
    Box<dyn FnOnce(io::Result<IoBuf>)>,
);

/// `--aio threads` on the page cache (and `--aio io_uring` and `native`, for lone ones): the small WRITEs
/// of a context (at most
/// [`LANE_WRITE_MAX`] bytes) run on the pool one batch at a time, a batch being every write
/// queued when the lane is free, done one after the other by one worker, whose single
/// completion then runs their replies. A buffered write holds the file's inode lock, so
/// workers writing one file at once mostly wait for each other (`perf`: 10 % of the cycles in
/// `rwsem_spin_on_owner` during fio 4 KiB writes at queue depth 32) and each costs a worker
/// wake-up; a batch costs one. A lone write finds the lane free and goes at once. Since the
/// writes that are not alone are done at once on the context's thread ([`may_write_at_once`]),
/// the lane mostly carries lone writes, and writes whose payload came in several reads.
#[derive(Default)]
struct WriteLane {
    queued: RefCell<Vec<LaneEntry>>,
    busy: std::cell::Cell<bool>,
}

/// Queues a small WRITE in the context's lane, and starts a batch if none is running.
fn lane_write(
    ctx: &AioContext,
    pool: &ThreadPool,
    export: &Arc<Export>,
    req: Request,
    buf: IoBuf,
    framing: Framing,
    done: impl FnOnce(io::Result<IoBuf>) + 'static,
) {
    let lane = ctx.local(|_| WriteLane::default());
    let entry: LaneEntry = (export.clone(), req, buf, framing, Box::new(done));
    lane.queued.borrow_mut().push(entry);
    if !lane.busy.replace(true) {
        run_lane(pool, lane);
    }
}

/// Sends every queued write to a worker as one job; its completion runs their callbacks, then
/// the next batch (or frees the lane).
fn run_lane(pool: &ThreadPool, lane: Rc<WriteLane>) {
    let batch: Vec<LaneEntry> = lane.queued.borrow_mut().drain(..).collect();
    if batch.is_empty() {
        lane.busy.set(false);
        return;
    }
    let mut work = Vec::with_capacity(batch.len());
    let mut dones = Vec::with_capacity(batch.len());
    for (export, req, buf, framing, done) in batch {
        work.push(session::work(export, req, buf, framing, false));
        dones.push(done);
    }
    let job = move || work.into_iter().map(|w| w()).collect::<Vec<_>>();
    pool.submit_with(job, move |r| {
        match r {
            Ok(results) => {
                for (done, result) in dones.into_iter().zip(results) {
                    done(result);
                }
            }
            Err(_) => {
                for done in dones {
                    done(Err(io::Error::other(
                        "the thread pool did not run the request",
                    )));
                }
            }
        }
        // The callbacks may have queued more writes: they go as the next batch.
        match AioContext::current() {
            Some(ctx) => run_lane(&ThreadPool::of(&ctx), lane),
            None => {
                // Completions run on the context; should one not, fail what waits rather
                // than leave it waiting.
                lane.busy.set(false);
                let stranded: Vec<LaneEntry> = lane.queued.borrow_mut().drain(..).collect();
                for (.., done) in stranded {
                    done(Err(io::Error::other(
                        "a completion ran outside its context",
                    )));
                }
            }
        }
    });
}

/// The whole request as [`session::work`] on the pool.
fn on_pool(
    pool: &ThreadPool,
    export: &Arc<Export>,
    req: Request,
    buf: IoBuf,
    framing: Framing,
    done: impl FnOnce(io::Result<IoBuf>) + 'static,
    tails: bool,
) {
    let work = session::work(export.clone(), req, buf, framing, tails);
    pool.submit_with(work, move |r| {
        done(r.unwrap_or_else(|_| Err(io::Error::other("the thread pool did not run the request"))))
    });
}

/// Reads (or writes) all of `buf[at..]` at `offset`, one request after another while the
/// kernel transfers less than asked; `done` gets the buffer back. A read that meets the end
/// of the file first fills the rest with zeros (requests lie within the export, so only a file
/// shrunk under the server does that: [`export::zeros_past_the_end`]); a write that writes
/// nothing fails with `UnexpectedEof`.
#[allow(clippy::too_many_arguments)] // one transfer's state, carried from request to request
fn transfer(
    ctx: &AioContext,
    io: BlockIo,
    file: Arc<File>,
    buf: Vec<u8>,
    at: usize,
    offset: u64,
    write: bool,
    done: impl FnOnce(io::Result<()>, Vec<u8>) + 'static,
) {
    let f = file.clone();
    let next = move |r: io::Result<usize>, mut buf: Vec<u8>| {
        let n = match r {
            Ok(n) if at + n >= buf.len() => return done(Ok(()), buf),
            Ok(n) if !write => {
                match export::zeros_past_the_end(&f, &mut buf[at + n..], offset + n as u64) {
                    Ok(true) => return done(Ok(()), buf),
                    Ok(false) if n == 0 => {
                        let eof = io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the image read nothing before its end",
                        );
                        return done(Err(eof), buf);
                    }
                    Ok(false) => n,
                    Err(e) => return done(Err(e), buf),
                }
            }
            Ok(0) => {
                return done(
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "wrote nothing",
                    )),
                    buf,
                );
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return done(Err(e), buf),
        };
        match AioContext::current() {
            Some(ctx) => transfer(&ctx, io, f, buf, at + n, offset + n as u64, write, done),
            None => done(
                Err(io::Error::other("a completion ran outside its context")),
                buf,
            ),
        }
    };
    if write {
        io.write_from(ctx, &file, buf, at, offset, next);
    } else {
        io.read_into(ctx, &file, buf, at, offset, next);
    }
}

/// A request started with [`start`], as a future (for the task engine); a BLOCK_STATUS is
/// answered at once where [`block_status_now`] can; where [`worth_serving_at_once`] says so
/// (`alone`: no other request of its connection in flight), a READ is first tried with
/// [`read_cached_now`], and a WRITE that [`may_write_at_once`] is written at once from its
/// payload buffer.
#[allow(clippy::too_many_arguments)] // a request, everything it runs with, and one choice
pub fn run(
    ctx: &AioContext,
    io: BlockIo,
    pool: &ThreadPool,
    export: &Arc<Export>,
    req: Request,
    buf: IoBuf,
    framing: Framing,
    alone: bool,
) -> Outcome {
    let ready = Outcome::ready;
    if let Some(reply) = block_status_now(export, &req, framing) {
        return ready(reply);
    }
    let mut buf = buf;
    let at_once = worth_serving_at_once(alone);
    if at_once && may_write_at_once(export, &req) {
        let written = export.write(buf.bytes(), req.offset, false);
        return ready(written.map(|()| session::write_done(buf.vec, framing, &req)));
    }
    if at_once {
        match read_cached_now(export, &req, framing, buf) {
            Ok(reply) => return ready(Ok(reply)),
            Err(back) => buf = back,
        }
    }
    let slot = Rc::new(RefCell::new(Slot::default()));
    let s = slot.clone();
    start(ctx, io, pool, export, req, buf, framing, alone, move |r| {
        let mut s = s.borrow_mut();
        s.result = Some(r);
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    });
    Outcome(slot)
}

#[derive(Default)]
struct Slot {
    result: Option<io::Result<IoBuf>>,
    waker: Option<Waker>,
}

/// The future [`run`] returns: the request's result, once its completion ran.
pub struct Outcome(Rc<RefCell<Slot>>);

impl Outcome {
    /// A request served at once: its result is there.
    pub fn ready(result: io::Result<IoBuf>) -> Outcome {
        Outcome(Rc::new(RefCell::new(Slot {
            result: Some(result),
            waker: None,
        })))
    }

    /// Whether the result is there already: right after [`run`], only for a request served at
    /// once (a completion never runs inside the call that started it).
    pub fn is_ready(&self) -> bool {
        self.0.borrow().result.is_some()
    }
}

impl Future for Outcome {
    type Output = io::Result<IoBuf>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut s = self.0.borrow_mut();
        match s.result.take() {
            Some(r) => Poll::Ready(r),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}
