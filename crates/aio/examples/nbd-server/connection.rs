//! One client connection: its socket as a non-blocking fd handler, the handshake, the
//! transmission phase, the requests in flight on the thread pool, and the replies waiting to
//! be sent. Also each context's table of its connections ([`Shard`]), which shutdown drains.
//!
//! Everything here runs on the thread of the context that owns the connection, so a
//! connection is an `Rc<RefCell<Conn>>`: its fd handler holds a `Weak` to it, each request on
//! the pool holds an `Rc` until its completion has run, and the shard holds an `Rc` until the
//! connection is closed and idle.
//!
//! Flow control, so that one client can neither stall the others nor grow memory without
//! bound:
//! * The socket is read only while the connection has fewer than `MAX_IN_FLIGHT` requests,
//!   less than `MAX_PENDING_BYTES` of payload in flight or waiting to be sent, and less than
//!   `MAX_BACKLOG` of replies waiting to be sent (the limits are in `session.rs`, which both
//!   engines share); a client that does not read its replies soon stops being read, in the
//!   handshake too.
//! * A write's payload goes straight into the request's own buffer (from the context's buffer
//!   pool, `buffers.rs`) as it arrives, so memory grows only with the bytes a client actually
//!   sends, and is not copied again. A big page-cache WRITE that arrives with nothing in
//!   flight and nothing queued lends the socket to a pool worker that streams it and the big
//!   WRITEs right behind it (`write_stream.rs`); meanwhile the connection neither reads nor
//!   sends, and admits nothing, so the stream counts as one request in flight. The read
//!   buffer itself is made on the connection's first read, so connections that never send
//!   cost none, and a context whose last connection of
//!   a burst of [`TRIM_AFTER`] or more has left gives malloc's free memory back
//!   ([`buffers::trim_heaps`](crate::buffers::trim_heaps)).
//! * A reply is written as soon as it is complete (replies of requests served at once on the
//!   context's thread: after the last request of the read, or as soon as
//!   `EARLY_SEND_REPLIES` are queued); whatever the socket does not take waits in
//!   the connection's queue of reply buffers (written with `writev`, never copied into one
//!   another; each goes back to the pool once sent), and only then is the handler watching
//!   for writability. A big READ's reply sent from the page cache (`file_io::read_by_sendfile`)
//!   is its header in the queue and a range of the image behind it, which `sendfile` sends
//!   once the header is out, before anything queued after it.
//! * A client gets `HANDSHAKE_LIMIT` to finish the handshake; with `--idle-timeout`, a
//!   client in the transmission phase that moves no byte in either direction for that long,
//!   with no request of its own on the pool, is closed.
//!
//! Replies keep the order the protocol needs:
//! * A refused request that carries data (a WRITE, an over-long option) is answered only once
//!   its data has been read and dropped, so the reply never overtakes the client's upload.
//! * A protocol violation (bad magic, flags or export name) stops reading and acting on the
//!   client's bytes, but the replies already owed (option replies, replies to requests that
//!   were read before the violation and are on the pool) are still sent; then the connection
//!   closes, or after `LINGER` if the client does not take them.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aio::{AioContext, BlockIo, ClockType, FdHandler, Scale, ThreadPool, Timer};

use crate::ClientSlot;
use crate::buffers::{BufPool, Payload};
use crate::conn_task;
use crate::export::Export;
use crate::file_io;
use crate::protocol::*;
use crate::session::{
    self, Action, AfterTls, EARLY_SEND_REPLIES, Expired, FileTail, Handshake, IoBuf, LINGER, Opted,
    READ_BUDGET, READ_CHUNK, Timing,
};
use crate::write_stream::{self, Streamed, Streamer};

/// At most this many queued replies go to the socket in one `writev`.
const MAX_SLICES: usize = 64;

/// Connection ids, unique in the process (for logs).
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A new id for an entry of a [`Shard`] (a connection, or a TLS relay).
pub fn new_id() -> u64 {
    // Relaxed: the id only has to be unique; nothing is published with it.
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// A client socket, TCP or Unix.
#[derive(Debug)]
pub enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => (&*s).read(buf),
            Socket::Unix(s) => (&*s).read(buf),
        }
    }

    /// Receives up to `n` bytes onto the end of `buf`, into its spare capacity, which is not
    /// zeroed first (a WRITE payload's new buffer: the socket is the first to write it).
    pub(crate) fn read_append(&self, buf: &mut Vec<u8>, n: usize) -> io::Result<usize> {
        buf.reserve(n);
        let spare = &mut buf.spare_capacity_mut()[..n];
        // `spare` is memory of `buf`'s allocation, borrowed mutably for the call.
        // SAFETY: [EXAMPLE-RECV] recv writes at most `spare.len()` bytes, into `spare` only.
        let got = unsafe {
            libc::recv(
                self.as_fd().as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                0,
            )
        };
        let got = usize::try_from(got).map_err(|_| io::Error::last_os_error())?;
        let len = buf.len() + got.min(n);
        // recv wrote `got` (at most `n`) bytes after the old length, within the reserved room.
        // SAFETY: [EXAMPLE-RECV] the bytes up to `len` are initialized and within capacity.
        unsafe { buf.set_len(len) };
        Ok(got)
    }

    pub(crate) fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => (&*s).write_vectored(bufs),
            Socket::Unix(s) => (&*s).write_vectored(bufs),
        }
    }

    /// Sends the bytes of `tail` from its `from`-th on, from the file (`sendfile`); as many
    /// as the socket takes. A file that ends before the tail does (it shrank under the server)
    /// is an error, and so is a read error of the image (`EIO`): the reply's header, already
    /// sent, promised the bytes, so the connection ends (a copied READ would get an error
    /// reply instead; data in the page cache is not read from the disk again).
    #[cfg(target_os = "linux")]
    pub(crate) fn send_file(&self, tail: &FileTail, from: usize) -> io::Result<usize> {
        let mut offset = tail.offset + from as u64;
        match rustix::fs::sendfile(self, &*tail.file, Some(&mut offset), tail.len - from)? {
            0 => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the image ended inside a READ being sent",
            )),
            n => Ok(n),
        }
    }

    #[cfg(not(target_os = "linux"))]
    pub(crate) fn send_file(&self, _tail: &FileTail, _from: usize) -> io::Result<usize> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    /// Sends what is left of `reply` once the socket has taken its first `sent` bytes: from
    /// its bytes (with those of the replies in `more` behind, when it has no tail), else from
    /// its tail.
    pub(crate) fn send_reply<'a>(
        &self,
        reply: &IoBuf,
        sent: usize,
        more: impl Iterator<Item = &'a IoBuf>,
    ) -> io::Result<usize> {
        let bytes = reply.bytes();
        if sent >= bytes.len() {
            let tail = reply
                .tail
                .as_ref()
                .expect("a reply sent past its bytes has a tail");
            return self.send_file(tail, sent - bytes.len());
        }
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        slices[0] = IoSlice::new(&bytes[sent..]);
        let mut count = 1;
        if reply.tail.is_none() {
            // The replies behind go in the same call, up to the first with a tail, whose
            // bytes must be followed by its tail.
            for next in more.take(MAX_SLICES - 1) {
                slices[count] = IoSlice::new(next.bytes());
                count += 1;
                if next.tail.is_some() {
                    break;
                }
            }
        }
        self.write_vectored(&slices[..count])
    }

    pub(crate) fn shutdown(&self) {
        self.shutdown_how(Shutdown::Both);
    }

    /// Another handle on the same socket (a duplicated fd): shutting it down ends the
    /// original's blocking reads and writes too.
    pub(crate) fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
        })
    }

    /// Shuts down one side or both (the writing side alone: the peer reads an end of stream,
    /// a lingering close). The peer may be gone already; there is nothing to do about an error.
    pub(crate) fn shutdown_how(&self, how: Shutdown) {
        let _ = match self {
            Socket::Tcp(s) => s.shutdown(how),
            Socket::Unix(s) => s.shutdown(how),
        };
    }

    pub(crate) fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_nonblocking(on),
            Socket::Unix(s) => s.set_nonblocking(on),
        }
    }

    /// The timeout of each blocking read and write (`SO_RCVTIMEO`, `SO_SNDTIMEO`).
    pub(crate) fn set_timeouts(&self, limit: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_read_timeout(limit).and(s.set_write_timeout(limit)),
            Socket::Unix(s) => s.set_read_timeout(limit).and(s.set_write_timeout(limit)),
        }
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Tcp(s) => s.as_fd(),
            Socket::Unix(s) => s.as_fd(),
        }
    }
}

/// What every connection of the process is served with, besides its export.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Log each connection's life on stderr.
    pub verbose: bool,
    /// Close a client in the transmission phase after this long without traffic (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// How connections are served.
    pub engine: Engine,
    /// How file I/O is done (`--aio`); every context was checked to support it.
    pub io: aio::blockio::Engine,
}

/// How a connection is served (`--engine`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Engine {
    /// A level-triggered fd handler and a state machine, completions as callbacks (this file).
    #[default]
    Callbacks,
    /// One task per connection and one per request, as QEMU's coroutines (`conn_task.rs`).
    Tasks,
}

/// A connection of either engine, as its [`Shard`] sees it.
pub trait Served {
    /// Shutdown: read no further request; serve those read, then close.
    fn drain(&self, ctx: &AioContext);
    /// The shutdown grace period is over: close now.
    fn force_close(&self, ctx: &AioContext);
    /// The connection's timer fired (the callback engine's; the task engine has its own).
    fn on_timer(&self, _ctx: &AioContext) {}
    /// The entry this one watches ([`Shard::watch_close`]) has left the shard.
    fn watched_closed(&self, _ctx: &AioContext) {}
}

impl Served for RefCell<Conn> {
    fn drain(&self, ctx: &AioContext) {
        let mut c = self.borrow_mut();
        // Requests already read are still served; the socket is not read again.
        c.read_done = true;
        if let Some(streamer) = &c.streamer {
            streamer.stop();
        }
        c.update(ctx);
    }

    fn force_close(&self, ctx: &AioContext) {
        let mut c = self.borrow_mut();
        if c.sock.is_some() {
            eprintln!(
                "nbd-server: connection {}: closed at the end of the shutdown grace period",
                c.id
            );
        }
        c.abort();
        c.update(ctx);
    }

    fn on_timer(&self, ctx: &AioContext) {
        self.borrow_mut().on_timer(ctx);
    }
}

/// Per-context server state, one per context (an [`AioContext::local`]): the connections the
/// context serves, and whether the server is shutting down.
#[derive(Default)]
pub struct Shard {
    conns: RefCell<HashMap<u64, Rc<dyn Served>>>,
    /// Entry → the entry told when it leaves (a TLS connection → its relay).
    watchers: RefCell<HashMap<u64, u64>>,
    draining: Cell<bool>,
    /// Closes whatever is still open when the shutdown grace period ends.
    grace: RefCell<Option<Timer>>,
    pub accepted: Cell<u64>,
    pub requests: Cell<u64>,
    /// Of those, READs served at once from the page cache (`file_io::read_cached_now`).
    pub cached_reads: Cell<u64>,
    /// WRITEs done at once on the context's thread (`file_io::may_write_at_once`).
    pub writes_at_once: Cell<u64>,
    /// READ replies whose data went from the page cache with `sendfile`
    /// (`file_io::read_by_sendfile`, `session::work`).
    pub sendfile_reads: Cell<u64>,
    /// Sends of the replies of requests served at once made as soon as
    /// [`EARLY_SEND_REPLIES`] were queued, before the last request of the read.
    pub early_sends: Cell<u64>,
    /// BLOCK_STATUS replies built at once on the context's thread
    /// (`file_io::block_status_now`).
    pub block_status_at_once: Cell<u64>,
    /// WRITEs written and answered by a worker that streamed them (`write_stream.rs`).
    pub streamed_writes: Cell<u64>,
    /// The streams that did (each lent the socket to a worker once).
    pub streams: Cell<u64>,
    /// Of those, the streams that ended because the socket did not take a whole reply (a
    /// client not reading its replies, or a socket that failed): the rest is queued on the
    /// context's thread if the connection is still open.
    pub streams_full: Cell<u64>,
    /// The most entries held at once since the shard was last empty: a burst of connections
    /// leaves its small allocations (read buffers, connection state) free in malloc's heaps,
    /// which are trimmed when the last of [`TRIM_AFTER`] or more leaves.
    peak: Cell<usize>,
}

/// A shard that held this many entries at once trims malloc's heaps once it is empty again
/// ([`buffers::trim_heaps`]); fewer are not worth the walk.
const TRIM_AFTER: usize = 64;

impl Shard {
    /// This context's shard.
    pub fn of(ctx: &AioContext) -> Rc<Shard> {
        ctx.local(|_| Shard::default())
    }

    /// Counts a request served at once on the context's thread.
    pub fn served_at_once(&self, req: &Request) {
        let count = match req.kind {
            CMD_WRITE => &self.writes_at_once,
            CMD_BLOCK_STATUS => &self.block_status_at_once,
            _ => &self.cached_reads,
        };
        count.set(count.get() + 1);
    }

    /// Counts a READ reply whose data goes from the page cache with `sendfile`.
    pub fn sent_from_file(&self) {
        self.sendfile_reads.set(self.sendfile_reads.get() + 1);
    }

    /// True once shutdown has begun and every connection is closed and idle: the context's
    /// thread may leave its loop.
    pub fn finished(&self) -> bool {
        self.draining.get() && self.conns.borrow().is_empty()
    }

    /// Starts serving `sock` on `ctx`, which must be the context polling on this thread. The
    /// connection holds its share of `slot` until it is closed and its last request has
    /// completed (a TLS connection's relay holds another, `tls.rs`). Returns its id, or `None`
    /// when it was not started (shutdown has begun, or the socket cannot be watched). With
    /// `after_tls`, the greeting and the client flags are done, TLS is on (`tls.rs` relays
    /// `sock`): the connection begins with the options, from that handshake.
    pub fn start(
        ctx: &AioContext,
        sock: Socket,
        export: Arc<Export>,
        settings: Settings,
        slot: Rc<ClientSlot>,
        after_tls: Option<AfterTls>,
    ) -> Option<u64> {
        let shard = Shard::of(ctx);
        let id = new_id();
        shard.accepted.set(shard.accepted.get() + 1);
        if shard.draining.get() {
            // Accepted just before the listener closed: the client gets a closed socket.
            return None;
        }
        if settings.engine == Engine::Tasks {
            let started =
                conn_task::start(ctx, id, sock, export, settings, slot, &shard, after_tls);
            return started.then_some(id);
        }
        let conn = Rc::new(RefCell::new(Conn {
            id,
            sock: Some(Arc::new(sock)),
            export,
            pool: ThreadPool::of(ctx),
            io: file_io::block_io(ctx, settings.io),
            bufs: BufPool::of(ctx),
            shard: shard.clone(),
            handler: None,
            watching: (false, false),
            phase: if after_tls.is_some() {
                Phase::Options
            } else {
                Phase::ClientFlags
            },
            // Made on the first read: a connection that never sends costs no buffer.
            inbuf: Vec::new(),
            in_start: 0,
            in_end: 0,
            discard: 0,
            after_discard: None,
            payload: None,
            streamer: None,
            streaming: false,
            out: VecDeque::new(),
            out_pos: 0,
            unsent_at_once: 0,
            out_bytes: 0,
            out_held: 0,
            in_flight: 0,
            pending_bytes: 0,
            hs: after_tls.map(|a| a.hs).unwrap_or_default(),
            closing: false,
            read_done: false,
            timer: None,
            idle_timeout: settings.idle_timeout,
            last_active: Instant::now(),
            weak: Weak::new(),
            verbose: settings.verbose,
            slot,
        }));
        let mut c = conn.borrow_mut();
        c.weak = Rc::downgrade(&conn);
        if after_tls.is_none() {
            c.queue(greeting().to_vec());
        }
        // Send closures only: the timer finds the connection again through its context.
        // One timer for the connection's whole life: the handshake limit, then the idle
        // timeout, or the linger after a protocol violation (see `on_timer`).
        let timer = ctx.timer(ClockType::Realtime, Scale::NS, move || {
            if let Some(ctx) = AioContext::current() {
                Shard::of(&ctx).timer_fired(&ctx, id);
            }
        });
        timer.arm_after(AfterTls::handshake_left(after_tls));
        c.timer = Some(timer);
        if c.verbose {
            eprintln!("nbd-server: connection {id}: accepted");
        }
        shard.insert(id, conn.clone());
        c.flush();
        c.update(ctx);
        Some(id)
    }

    /// The timer of entry `id` (a connection or a TLS relay) fired.
    pub fn timer_fired(&self, ctx: &AioContext, id: u64) {
        let conn = self.conns.borrow().get(&id).cloned();
        if let Some(conn) = conn {
            conn.on_timer(ctx);
        }
    }

    /// Shutdown: no connection reads another request; each closes once its requests in
    /// flight have completed and their replies are sent, or when `grace` runs out.
    pub fn drain(ctx: &AioContext, grace: Duration) {
        let shard = Shard::of(ctx);
        shard.draining.set(true);
        let conns: Vec<_> = shard.conns.borrow().values().cloned().collect();
        for conn in conns {
            conn.drain(ctx);
        }
        if !shard.conns.borrow().is_empty() {
            let timer = ctx.timer(ClockType::Realtime, Scale::NS, move || {
                if let Some(ctx) = AioContext::current() {
                    Shard::of(&ctx).force_close(&ctx);
                }
            });
            timer.arm_after(grace);
            *shard.grace.borrow_mut() = Some(timer);
        }
    }

    fn force_close(&self, ctx: &AioContext) {
        let conns: Vec<_> = self.conns.borrow().values().cloned().collect();
        for conn in conns {
            conn.force_close(ctx);
        }
    }

    /// Adds connection `id`, which the shard holds until [`remove`](Self::remove).
    pub fn insert(&self, id: u64, conn: Rc<dyn Served>) {
        let mut conns = self.conns.borrow_mut();
        conns.insert(id, conn);
        self.peak.set(self.peak.get().max(conns.len()));
    }

    /// Connection `id` has closed and has nothing in flight.
    pub fn remove(&self, id: u64) {
        // The Rc taken out may be the last one; drop it after the borrow of the table ends,
        // since dropping a connection can drop its handler and timer.
        let conn = self.conns.borrow_mut().remove(&id);
        drop(conn);
        if self.conns.borrow().is_empty() && self.peak.replace(0) >= TRIM_AFTER {
            crate::buffers::trim_heaps();
        }
        let watcher = self.watchers.borrow_mut().remove(&id);
        let watcher = watcher.and_then(|w| self.conns.borrow().get(&w).cloned());
        if let (Some(watcher), Some(ctx)) = (watcher, AioContext::current()) {
            watcher.watched_closed(&ctx);
        }
    }

    /// Tells entry `watcher` when entry `id` leaves the shard ([`Served::watched_closed`]).
    pub fn watch_close(&self, id: u64, watcher: u64) {
        self.watchers.borrow_mut().insert(id, watcher);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the client's 32-bit flags after our greeting.
    ClientFlags,
    /// Options until NBD_OPT_EXPORT_NAME or NBD_OPT_GO.
    Options,
    /// Requests and replies.
    Transmission,
}

pub struct Conn {
    id: u64,
    /// `None` once closed: the fd is released at once, even while requests are in flight
    /// (`abort` drops `handler`, which shares the socket, first).
    sock: Option<Arc<Socket>>,
    export: Arc<Export>,
    pool: Rc<ThreadPool>,
    /// How file I/O is done (`--aio`).
    io: BlockIo,
    /// The context's buffer pool: read replies and write payloads come from it, and go back
    /// once sent.
    bufs: Rc<BufPool>,
    /// The context's shard, which holds this connection (a cycle, broken when the
    /// connection leaves the shard).
    shard: Rc<Shard>,
    handler: Option<FdHandler>,
    /// What `handler` watches: (readable, writable).
    watching: (bool, bool),
    phase: Phase,
    /// Received bytes not yet parsed are `inbuf[in_start..in_end]`; the vector's length is
    /// its usable size (it is kept initialized, so reads go straight into it).
    inbuf: Vec<u8>,
    in_start: usize,
    in_end: usize,
    /// Payload bytes of a refused request (or option) still to be read and dropped.
    discard: u64,
    /// What to do once `discard` reaches 0: the refusal's reply, and whether to close then.
    after_discard: Option<(Vec<u8>, bool)>,
    /// A write whose payload is arriving: the request and the bytes received so far, in a
    /// buffer with room for all of them, handed to the pool when complete.
    payload: Option<(Request, Payload)>,
    /// What a worker streaming big WRITEs borrows (`write_stream.rs`), made for the first.
    streamer: Option<Streamer>,
    /// A worker has the socket: it streams big WRITEs, and nothing here reads or sends.
    streaming: bool,
    /// Replies not yet taken by the socket, each in its own buffer (a read's goes back to the
    /// pool once sent) from its `start`; the socket has taken `out_pos` bytes of the first.
    out: VecDeque<IoBuf>,
    out_pos: usize,
    /// Replies served at once and queued since the last send ([`EARLY_SEND_REPLIES`]).
    unsent_at_once: usize,
    /// The bytes in `out` not yet taken.
    out_bytes: usize,
    /// The memory the replies in `out` hold (`session::held_bytes`), for flow control.
    out_held: usize,
    in_flight: usize,
    /// Payload bytes of the requests in flight.
    pending_bytes: usize,
    /// Structured replies, no zeroes: what the handshake settled.
    hs: Handshake,
    /// Nothing more is acted on, not even what is buffered; the connection closes once its
    /// requests in flight are answered (DISC, ABORT, a fatal error).
    closing: bool,
    /// The socket is not read again (end of stream, shutdown), but every complete request
    /// already read is still served before the connection closes.
    read_done: bool,
    /// The handshake limit, the idle timeout or the linger after a violation (`on_timer`).
    timer: Option<Timer>,
    idle_timeout: Option<Duration>,
    /// When a byte last moved on the socket (kept only with an idle timeout).
    last_active: Instant,
    weak: Weak<RefCell<Conn>>,
    verbose: bool,
    /// This client's place in the process's count of clients (`--shared`, the exit after
    /// the last client).
    slot: Rc<ClientSlot>,
}

impl Conn {
    /// Reads whatever the socket has (up to a budget) and acts on every complete message.
    fn on_readable(&mut self, ctx: &AioContext) {
        let mut budget = READ_BUDGET;
        while self.wants_read() && budget > 0 {
            let Some((result, room)) = self.read_some() else {
                break;
            };
            match result {
                Ok(0) => {
                    // End of stream. Requests in flight still complete (their replies may
                    // still be read if the client only shut down its sending side).
                    if self.payload.is_some() {
                        self.log("disconnected in the middle of a write payload");
                    } else if self.phase != Phase::Transmission {
                        self.log("disconnected during the handshake");
                    } else if self.in_end > self.in_start {
                        self.log("disconnected in the middle of a request");
                    }
                    self.read_done = true;
                }
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    self.touch();
                    self.received(n);
                    if n < room {
                        // The socket is very likely empty now; if more arrived meanwhile, the
                        // level-triggered handler runs again. Saves a read that would only
                        // say EAGAIN.
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.log(&format!("read error: {e}"));
                    self.abort();
                }
            }
        }
        self.flush();
        self.update(ctx);
    }

    /// One read from the socket: into the arriving write payload's own buffer if there is one,
    /// else into the read buffer. Returns the result and how much room the read had (`None`
    /// once the socket is closed).
    fn read_some(&mut self) -> Option<(io::Result<usize>, usize)> {
        if let (Some(sock), Some((req, data))) = (&self.sock, &mut self.payload) {
            // Zero only what no earlier request initialized: pages are touched as data arrives.
            let room = (req.payload_len as usize - data.received()).min(READ_BUDGET);
            return Some((data.receive(room, sock), room));
        }
        self.make_room();
        let sock = self.sock.as_ref()?;
        let room = self.inbuf.len() - self.in_end;
        Some((sock.read(&mut self.inbuf[self.in_end..]), room))
    }

    /// Acts on `n` bytes just read by [`read_some`](Self::read_some): a write whose payload
    /// is now whole goes to the pool, and complete messages in the read buffer are handled.
    fn received(&mut self, n: usize) {
        match &self.payload {
            Some((req, data)) if data.received() as u64 == req.payload_len => {
                let (req, data) = self.payload.take().expect("matched above");
                self.submit(req, Some(data.into_buf()), false);
            }
            Some(_) => return,
            None => self.in_end += n,
        }
        self.process();
    }

    fn on_writable(&mut self, ctx: &AioContext) {
        self.send_and_admit();
        self.update(ctx);
    }

    /// Sends what the socket takes; then, if messages wait in the read buffer, acts on those
    /// that flow control admits now (sending brings the backlog down, a completion the
    /// requests in flight) and sends what that made ready.
    fn send_and_admit(&mut self) {
        self.flush();
        if self.in_end > self.in_start {
            self.process();
            self.flush();
        }
    }

    /// Whether the socket should be read now.
    fn wants_read(&self) -> bool {
        !self.streaming
            && self.sock.is_some()
            && !self.closing
            && !self.read_done
            && !self.is_full()
    }

    /// Whether flow control holds back further requests (and options). One request is always
    /// admitted when nothing is in flight and nothing waits to be sent.
    fn is_full(&self) -> bool {
        session::is_full(
            self.in_flight,
            self.pending_bytes,
            self.out_bytes,
            self.out_held,
        )
    }

    /// Makes sure at least some room follows `in_end`, and enough for the message being
    /// assembled, moving the unparsed bytes to the front when that helps.
    fn make_room(&mut self) {
        if self.inbuf.is_empty() {
            self.inbuf.resize(READ_CHUNK, 0);
        }
        let need = self.bytes_wanted().max(READ_CHUNK / 2);
        let unparsed = self.in_end - self.in_start;
        if self.in_start > 0 && self.inbuf.len() - self.in_end < need {
            self.inbuf.copy_within(self.in_start..self.in_end, 0);
            self.in_start = 0;
            self.in_end = unparsed;
        }
        if self.inbuf.len() - self.in_end < need {
            self.inbuf.resize(self.in_end + need, 0);
        }
    }

    /// How many more bytes the message at the head of the buffer needs, at least.
    fn bytes_wanted(&self) -> usize {
        if self.discard > 0 {
            return 0;
        }
        let have = self.in_end - self.in_start;
        let head = &self.inbuf[self.in_start..self.in_end];
        let total = match self.phase {
            Phase::ClientFlags => 4,
            Phase::Options if have >= OPTION_HEADER_LEN => match parse_option_header(head) {
                Some((_, len)) if len <= MAX_OPTION_LEN => OPTION_HEADER_LEN + len as usize,
                _ => OPTION_HEADER_LEN,
            },
            Phase::Options => OPTION_HEADER_LEN,
            // A write's payload goes to its own buffer (`payload`), never here.
            Phase::Transmission => self.hs.framing.request_len(),
        };
        total.saturating_sub(have)
    }

    /// Acts on every complete message in the read buffer, as far as flow control allows.
    fn process(&mut self) {
        // Whether a request was handled before the next one in this call: they came in the
        // same reads from the socket.
        let mut earlier = false;
        while self.sock.is_some() && !self.closing {
            if self.discard > 0 {
                let n = (self.in_end - self.in_start).min(self.discard as usize);
                self.in_start += n;
                self.discard -= n as u64;
                if self.discard > 0 {
                    break;
                }
                // The refused message's last byte is in: now its reply may go.
                if let Some((reply, close)) = self.after_discard.take() {
                    self.queue(reply);
                    self.closing |= close;
                    continue;
                }
            }
            if self.payload.is_some() || self.streaming || self.is_full() {
                break;
            }
            let have = self.in_end - self.in_start;
            let done = match self.phase {
                Phase::ClientFlags => self.client_flags(),
                Phase::Options => self.option(),
                Phase::Transmission if have < self.hs.framing.request_len() => 0,
                Phase::Transmission => self.request(earlier),
            };
            // A send on the way (an early send, an empty reply) may have found the client gone
            // and closed the connection, emptying the read buffer: nothing is left to consume.
            if done == 0 || self.sock.is_none() {
                break;
            }
            self.in_start += done;
            earlier = self.phase == Phase::Transmission;
        }
        if self.in_start == self.in_end {
            self.in_start = 0;
            self.in_end = 0;
        }
    }

    /// Handles the client flags; returns the bytes consumed (0: not complete yet).
    fn client_flags(&mut self) -> usize {
        let head = &self.inbuf[self.in_start..self.in_end];
        if head.len() < 4 {
            return 0;
        }
        match session::client_flags(be32(head)) {
            Ok(no_zeroes) => self.hs.no_zeroes = no_zeroes,
            Err(why) => {
                self.fail(&why);
                return 0;
            }
        }
        self.phase = Phase::Options;
        4
    }

    /// Handles one option; returns the bytes consumed (0: not complete yet).
    fn option(&mut self) -> usize {
        let head = &self.inbuf[self.in_start..self.in_end];
        if head.len() < OPTION_HEADER_LEN {
            return 0;
        }
        let Some((option, len)) = parse_option_header(head) else {
            self.fail("bad option magic, closing");
            return 0;
        };
        if len > MAX_OPTION_LEN {
            match session::oversized_option(option) {
                Ok((reply, close)) => self.discard_then(u64::from(len), reply, close),
                Err(why) => {
                    self.fail(why);
                    return 0;
                }
            }
            return OPTION_HEADER_LEN;
        }
        let total = OPTION_HEADER_LEN + len as usize;
        if head.len() < total {
            return 0;
        }
        // The data is copied out so that the reply can be built while it is looked at; options
        // are rare and small.
        let data = head[OPTION_HEADER_LEN..total].to_vec();
        self.handle_option(option, &data);
        // An option that ends the session leaves the rest unread.
        if self.closing { 0 } else { total }
    }

    fn handle_option(&mut self, option: u32, data: &[u8]) {
        let mut out = Vec::new();
        let opted = session::handle_option(&self.export, &mut self.hs, option, data, &mut out);
        self.queue(out);
        match opted {
            Opted::Continue => {}
            Opted::Transmission => self.enter_transmission(),
            Opted::Abort => self.closing = true,
            Opted::Fail(why) => self.fail(why),
        }
    }

    fn enter_transmission(&mut self) {
        self.phase = Phase::Transmission;
        self.slot.negotiated();
        if let Some(timer) = &self.timer {
            match self.idle_timeout {
                Some(limit) => timer.arm_after(limit),
                None => timer.cancel(),
            }
        }
        self.touch();
        self.log(&session::transmission_log(self.hs.framing));
    }

    /// Handles one request whose header is complete, `earlier` if another came before it in
    /// the same read; returns the bytes consumed (0: a write whose payload is not complete yet,
    /// or a bad header that closed the connection).
    fn request(&mut self, earlier: bool) -> usize {
        let framing = self.hs.framing;
        let hdr = framing.request_len();
        let head = &self.inbuf[self.in_start..self.in_end];
        let Some(req) = parse_request(head, framing) else {
            // Out of step or not NBD at all: nothing after this can be trusted.
            self.fail("bad request magic, closing");
            return 0;
        };
        match session::classify(&self.export, &self.hs, &req) {
            Action::Disconnect => {
                self.log("NBD_CMD_DISC");
                self.closing = true;
                // The replies still owed go out; a client that never takes them is not
                // waited for forever.
                if let Some(timer) = &self.timer {
                    timer.arm_after(LINGER);
                }
                hdr
            }
            Action::Refuse {
                errno,
                why,
                discard,
            } => {
                let reply = session::status(framing, &req, Some((errno, why)));
                self.discard_then(discard, reply, false);
                hdr
            }
            Action::Empty => {
                self.send(session::status(framing, &req, None));
                self.shard.requests.set(self.shard.requests.get() + 1);
                hdr
            }
            Action::Run if req.payload_len == 0 => {
                // Anything past the header in the read buffer is behind it.
                self.submit(req, None, earlier || head.len() > hdr);
                hdr
            }
            Action::Run => {
                // A WRITE: its payload is at most MAX_PAYLOAD.
                let len = req.payload_len as usize;
                let total = hdr + len;
                if head.len() >= total {
                    let with_others = earlier || head.len() > total;
                    let alone = self.in_flight == 0 && !with_others;
                    if file_io::worth_serving_at_once(alone)
                        && file_io::may_write_at_once(&self.export, &req)
                    {
                        let data = &self.inbuf[self.in_start + hdr..self.in_start + total];
                        let written = self.export.write(data, req.offset, false);
                        self.served_at_once(&req, written.map(|()| IoBuf::default()));
                        return total;
                    }
                    // The whole payload came with the header (small writes): one copy, into
                    // the buffer the pool's pwrite takes.
                    let mut data = self.bufs.take_payload(len, self.export.align());
                    data.extend_from_slice(&head[hdr..total]);
                    self.submit(req, Some(data.into_buf()), with_others);
                    return total;
                }
                // The rest of the payload is read straight into the request's buffer, a
                // reused one, or a new one whose pages are touched only as the bytes arrive.
                let mut data = self.bufs.take_payload(len, self.export.align());
                data.extend_from_slice(&head[hdr..]);
                let consumed = head.len();
                // Not after the end of the stream or a drain: the worker would read on.
                if write_stream::may_stream(&self.export, &req)
                    && self.in_flight == 0
                    && self.out_bytes == 0
                    && !self.read_done
                {
                    self.stream(req, data);
                } else {
                    self.payload = Some((req, data));
                }
                consumed
            }
        }
    }

    /// Lends the socket to a pool worker that receives the rest of WRITE `req`'s payload
    /// (which has its first bytes in `data`), writes it, answers it, and goes on with the
    /// next big WRITEs (`write_stream.rs`); the connection reads and sends nothing until
    /// [`stream_ended`](Self::stream_ended). Only with nothing in flight and nothing queued.
    fn stream(&mut self, req: Request, data: Payload) {
        let (Some(sock), Some(conn)) = (&self.sock, self.weak.upgrade()) else {
            // Not while serving: receive it here as any other payload.
            self.payload = Some((req, data));
            return;
        };
        let streamer = self
            .streamer
            .get_or_insert_with(|| Streamer::new(sock.clone()));
        let work = streamer.work(self.export.clone(), self.hs, self.id, req, data);
        self.streaming = true;
        self.in_flight += 1;
        self.pending_bytes += session::payload_bytes(&req);
        self.pool
            .submit_with(work, move |r: Result<Streamed, threadpool::Error>| {
                Conn::stream_ended(&conn, req, r)
            });
    }

    /// A stream that began with WRITE `first` has ended, on the context's thread: what the
    /// worker did not finish (a reply's unsent end, a payload still arriving, the next
    /// request's first bytes) is taken up here.
    fn stream_ended(
        conn: &Rc<RefCell<Conn>>,
        first: Request,
        r: Result<Streamed, threadpool::Error>,
    ) {
        let mut c = conn.borrow_mut();
        c.streaming = false;
        c.in_flight -= 1;
        c.pending_bytes -= session::payload_bytes(&first);
        c.touch();
        match r {
            Ok(done) => {
                c.shard.requests.set(c.shard.requests.get() + done.served);
                c.shard
                    .streamed_writes
                    .set(c.shard.streamed_writes.get() + done.served);
                c.shard.streams.set(c.shard.streams.get() + 1);
                if !done.unsent.is_empty() {
                    c.shard.streams_full.set(c.shard.streams_full.get() + 1);
                }
                if let Some(buf) = done.spare {
                    c.bufs.give(buf);
                }
                if c.sock.is_some() {
                    c.take_up(done.unsent, done.partial, &done.leftover);
                }
            }
            Err(e) => {
                // The worker panicked (a closed pool never runs the callback): what it did
                // to the socket is unknown.
                eprintln!(
                    "nbd-server: connection {}: a WRITE stream failed: {e}",
                    c.id
                );
                c.abort();
            }
        }
        if let Some(ctx) = AioContext::current() {
            c.update(&ctx);
        }
    }

    /// Takes up where a stream stopped: queues the end of a reply the socket did not take,
    /// goes on receiving a payload that stopped arriving, and parses the bytes read after the
    /// last streamed request as if the socket had just given them.
    fn take_up(&mut self, unsent: Vec<u8>, partial: Option<(Request, Payload)>, leftover: &[u8]) {
        if !unsent.is_empty() {
            self.queue(unsent);
        }
        if let Some(partial) = partial {
            self.payload = Some(partial);
        }
        if !leftover.is_empty() {
            // Room for at least READ_CHUNK / 2 bytes; a leftover is at most a header.
            self.make_room();
            self.inbuf[self.in_end..][..leftover.len()].copy_from_slice(leftover);
            self.in_end += leftover.len();
        }
        self.process();
        self.flush();
    }

    /// Drops the next `n` bytes from the client, then queues `reply` (and closes if `close`);
    /// at once if `n` is 0.
    fn discard_then(&mut self, n: u64, reply: Vec<u8>, close: bool) {
        if n == 0 {
            self.queue(reply);
            self.closing |= close;
        } else {
            self.discard = n;
            self.after_discard = Some((reply, close));
        }
    }

    /// A protocol violation: nothing more is read or acted on, but what the client is owed
    /// still goes out (see the module docs); the connection closes once that is done, or after
    /// [`LINGER`].
    fn fail(&mut self, why: &str) {
        self.log(why);
        self.closing = true;
        self.discard = 0;
        self.after_discard = None;
        self.payload = None;
        if let Some(timer) = &self.timer {
            timer.arm_after(LINGER);
        }
    }

    /// The connection's timer fired: the handshake limit, the linger after a violation, or
    /// the idle timeout.
    fn on_timer(&mut self, ctx: &AioContext) {
        if self.sock.is_none() {
            return;
        }
        let timing = Timing {
            closing: self.closing,
            transmission: self.phase == Phase::Transmission,
            idle_timeout: self.idle_timeout,
            in_flight: self.in_flight,
            last_active: self.last_active,
        };
        match session::expired(self.id, timing) {
            Expired::Close(line) => {
                eprintln!("{line}");
                self.abort();
                self.update(ctx);
            }
            Expired::Rearm(after) => {
                if let Some(timer) = &self.timer {
                    timer.arm_after(after);
                }
            }
            Expired::Nothing => {}
        }
    }

    /// Notes that a byte moved on the socket, for the idle timeout.
    fn touch(&mut self) {
        if self.idle_timeout.is_some() {
            self.last_active = Instant::now();
        }
    }

    /// Starts a valid request (`file_io.rs`), `with_others` if other requests came in the same
    /// reads from the socket; its completion sends the reply.
    fn submit(&mut self, req: Request, data: Option<IoBuf>, with_others: bool) {
        let conn = self
            .weak
            .upgrade()
            .expect("a connection being served is alive");
        let Some(ctx) = AioContext::current() else {
            // Requests are read from the socket's handler, which runs inside the loop.
            self.log("a request was read outside the context; dropping the connection");
            return self.abort();
        };
        let framing = self.hs.framing;
        if let Some(reply) = file_io::read_by_sendfile(&self.export, &req, framing, &self.bufs) {
            self.shard.requests.set(self.shard.requests.get() + 1);
            return self.queue_from(reply);
        }
        if let Some(reply) = file_io::block_status_now(&self.export, &req, framing) {
            return self.served_at_once(&req, reply);
        }
        let mut buf =
            data.unwrap_or_else(|| IoBuf::from(self.bufs.take(session::buffer_len(framing, &req))));
        let alone = self.in_flight == 0 && !with_others;
        if file_io::worth_serving_at_once(alone) {
            match file_io::read_cached_now(&self.export, &req, framing, buf) {
                Ok(reply) => return self.served_at_once(&req, Ok(reply)),
                Err(back) => buf = back,
            }
        }
        self.in_flight += 1;
        self.pending_bytes += session::payload_bytes(&req);
        let done = move |r| Conn::completed(&conn, req, r);
        file_io::start(
            &ctx,
            self.io,
            &self.pool,
            &self.export,
            req,
            buf,
            framing,
            alone,
            done,
        );
    }

    /// A request served at once on the context's thread (a READ, a WRITE, a BLOCK_STATUS): its
    /// reply is queued now, and goes
    /// out with the others of this dispatch in one send, or with those queued since the last
    /// send once they are [`EARLY_SEND_REPLIES`].
    fn served_at_once(&mut self, req: &Request, result: io::Result<IoBuf>) {
        let reply = session::reply(self.hs.framing, self.id, req, result);
        self.queue_from(reply);
        self.shard.requests.set(self.shard.requests.get() + 1);
        self.shard.served_at_once(req);
        self.unsent_at_once += 1;
        if self.unsent_at_once >= EARLY_SEND_REPLIES {
            self.shard.early_sends.set(self.shard.early_sends.get() + 1);
            self.flush();
        }
    }

    /// A request's completion, on the context's thread: queue its reply and send.
    fn completed(conn: &Rc<RefCell<Conn>>, req: Request, result: io::Result<IoBuf>) {
        let mut c = conn.borrow_mut();
        c.in_flight -= 1;
        c.pending_bytes -= session::payload_bytes(&req);
        if c.sock.is_some() {
            let reply = session::reply(c.hs.framing, c.id, &req, result);
            c.queue_from(reply);
            c.send_and_admit();
        }
        c.shard.requests.set(c.shard.requests.get() + 1);
        if let Some(ctx) = AioContext::current() {
            c.update(&ctx);
        }
    }

    /// Sends one complete reply, behind those queued before it.
    fn send(&mut self, reply: Vec<u8>) {
        self.queue(reply);
        self.flush();
    }

    /// Queues bytes to send after those already queued.
    fn queue(&mut self, bytes: Vec<u8>) {
        self.queue_from(IoBuf::from(bytes));
    }

    /// Queues `buf` (its bytes, then its tail) to send after those already queued.
    fn queue_from(&mut self, buf: IoBuf) {
        if buf.tail.is_some() {
            self.shard.sent_from_file();
        }
        if !buf.is_empty() {
            self.out_bytes += buf.len();
            self.out_held += session::held_bytes(&buf);
            self.out.push_back(buf);
        }
    }

    /// Writes as much of the queued replies as the socket takes, several buffers per system
    /// call (a reply's tail in a call of its own, `sendfile`); each reply fully sent gives its
    /// buffer back to the pool.
    fn flush(&mut self) {
        self.unsent_at_once = 0;
        while self.out_bytes > 0 {
            let Some(sock) = &self.sock else { return };
            let mut queued = self.out.iter();
            let front = queued.next().expect("out_bytes counts queued replies");
            match sock.send_reply(front, self.out_pos, queued) {
                Ok(n) => {
                    self.out_bytes -= n;
                    self.out_pos += n;
                    while let Some(front) = self.out.front() {
                        if self.out_pos < front.len() {
                            break;
                        }
                        self.out_pos -= front.len();
                        let sent = self.out.pop_front().expect("looked at above");
                        self.out_held -= session::held_bytes(&sent);
                        self.bufs.give(sent.vec);
                    }
                    self.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // The client is gone (EPIPE, ECONNRESET): its replies have no reader.
                    self.log(&format!("write error: {e}"));
                    self.abort();
                    return;
                }
            }
        }
    }

    /// Closes the socket now, dropping unsent replies. Requests in flight still complete
    /// (their results are dropped), then the connection leaves its shard.
    fn abort(&mut self) {
        self.closing = true;
        // A worker streaming holds its own handle on the socket, shut down just below.
        if let Some(streamer) = self.streamer.take() {
            streamer.stop();
        }
        self.handler = None;
        self.watching = (false, false);
        self.timer = None;
        self.after_discard = None;
        if let Some(sock) = self.sock.take() {
            sock.shutdown();
            self.log("closed");
        }
        self.out = VecDeque::new();
        self.out_pos = 0;
        self.out_bytes = 0;
        self.out_held = 0;
        self.payload = None;
        self.inbuf = Vec::new();
        self.in_start = 0;
        self.in_end = 0;
    }

    /// Brings the fd handler in line with what the connection wants (read, write, neither),
    /// and closes a connection that is closing and has nothing left to do.
    fn update(&mut self, ctx: &AioContext) {
        // A send that empties the queue may be the last event for a while: a client that has
        // sent every request it means to waits for their replies, and sends nothing that would
        // wake the connection. With nothing in flight either, nothing else would act on the
        // requests flow control held back (a queued reply counts its whole buffer until it is
        // sent whole, so the admission just before the send that finished a 16 MiB reply was
        // refused): act on them here, and go on while the replies that makes go out at once.
        // Without this, the last requests of a pipeline of big READs sometimes got no reply
        // (the connection stalled, or closed at the end of a drain).
        while self.in_flight == 0 && self.out_bytes == 0 && self.in_end > self.in_start {
            let buffered = self.in_end - self.in_start;
            self.send_and_admit();
            if self.in_end - self.in_start == buffered {
                break;
            }
        }
        let pending_out = self.out_bytes > 0;
        let finished = self.closing || (self.read_done && self.in_flight == 0);
        if finished && self.sock.is_some() && self.in_flight == 0 && !pending_out {
            self.abort();
        }
        if self.sock.is_none() {
            if self.in_flight == 0 {
                self.shard.remove(self.id);
            }
            return;
        }
        let want = (self.wants_read(), pending_out);
        if want == self.watching {
            return;
        }
        if want == (false, false) {
            self.handler = None;
            self.watching = want;
            return;
        }
        let sock = self.sock.clone().expect("checked above");
        // On io_uring, a polling loop sees the next request in the ring (no-op elsewhere).
        let mut builder = ctx.fd_handler(sock).poll_in_backend();
        if want.0 {
            let weak = self.weak.clone();
            builder = builder.on_read(move |ctx| {
                if let Some(conn) = weak.upgrade() {
                    conn.borrow_mut().on_readable(ctx);
                }
            });
        }
        if want.1 {
            let weak = self.weak.clone();
            builder = builder.on_write(move |ctx| {
                if let Some(conn) = weak.upgrade() {
                    conn.borrow_mut().on_writable(ctx);
                }
            });
        }
        let result = match self.handler.take() {
            Some(mut handler) => {
                // On error the old handler stays registered, and is dropped below.
                let r = builder.replace(&mut handler);
                self.handler = Some(handler);
                r
            }
            None => builder.register().map(|h| self.handler = Some(h)),
        };
        match result {
            Ok(()) => self.watching = want,
            Err(e) => {
                // The backend refused the socket (out of memory, say): drop the client rather
                // than leave it waiting for events that will never be watched.
                eprintln!(
                    "nbd-server: connection {}: cannot watch the socket: {e}",
                    self.id
                );
                self.abort();
                if self.in_flight == 0 {
                    self.shard.remove(self.id);
                }
            }
        }
    }

    fn log(&self, what: &str) {
        if self.verbose {
            eprintln!("nbd-server: connection {}: {what}", self.id);
        }
    }
}
