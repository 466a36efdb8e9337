//! The task engine (`--engine tasks`): one client connection as tasks on its context, the
//! way QEMU's `nbd/server.c` runs a client as coroutines. The connection's own task reads:
//! the handshake, then request after request (QEMU's `nbd_co_receive_request`, one
//! `nbd_trip` at a time); each request it admits becomes a task of its own that awaits the
//! thread pool's [`Request`](aio::threadpool::Request) future and then writes its reply whole
//! under the connection's send lock (QEMU's `send_lock` `CoMutex`), so replies go out one at a
//! time, in the order the requests complete. The socket is an [`AsyncFd`]; the connection's
//! deadline (handshake limit, idle timeout, linger) is a sleeping watchdog task.
//!
//! The behaviour is the callback engine's (`connection.rs`, whose module docs state it), with
//! the decisions shared through `session.rs`:
//! * Flow control: the reading task waits before each request while the connection is full
//!   (`session::is_full`: requests in flight, their payload, replies not yet sent). Replies are
//!   written by the request tasks, never by the reader, so a client that pipelines writes and
//!   reads its replies only later cannot stall the reader on a full socket.
//! * A write's payload goes straight into the request's buffer; a refused write's payload is
//!   read and dropped first, and only then is the refusal sent.
//! * A protocol violation, `NBD_CMD_DISC` and `NBD_OPT_ABORT` stop the reading; the replies
//!   owed still go out, then the connection closes (after a violation or DISC, at the latest
//!   when `LINGER` runs out).
//! * Shutdown ([`Shard::drain`]) stops reading the socket; complete requests already buffered
//!   are still served, requests in flight complete and their replies go out, then the
//!   connection closes.

use std::cell::{Cell, RefCell};
use std::future::{Future, poll_fn};
use std::io;
use std::pin::pin;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use aio::task::{AsyncFd, CoMutex};
use aio::{AioContext, BlockIo, JoinHandle, ThreadPool};

use crate::ClientSlot;
use crate::buffers::BufPool;
use crate::connection::{Served, Settings, Shard, Socket};
use crate::export::Export;
use crate::file_io;
use crate::protocol::*;
use crate::session::{
    self, Action, AfterTls, Expired, Handshake, IoBuf, LINGER, Opted, READ_BUDGET, READ_CHUNK,
    Timing,
};

/// Starts serving `sock` as connection `id` of `shard`, on `ctx` (the context of this thread);
/// with `after_tls`, from the options on (see `Shard::start`). False if the socket cannot be
/// watched (the client is dropped).
#[allow(clippy::too_many_arguments)]
pub fn start(
    ctx: &AioContext,
    id: u64,
    sock: Socket,
    export: Arc<Export>,
    settings: Settings,
    slot: Rc<ClientSlot>,
    shard: &Rc<Shard>,
    after_tls: Option<AfterTls>,
) -> bool {
    // On io_uring, a polling loop sees the next request in the ring (no-op elsewhere).
    let sock = match AsyncFd::with_context(ctx, sock).map(AsyncFd::poll_in_backend) {
        Ok(sock) => sock,
        Err(e) => {
            // The backend refused the socket: drop the client rather than never serve it.
            eprintln!("nbd-server: connection {id}: cannot watch the socket: {e}");
            return false;
        }
    };
    let conn = Rc::new_cyclic(|me| Conn {
        id,
        me: me.clone(),
        sock,
        ctx: ctx.clone(),
        export,
        pool: ThreadPool::of(ctx),
        io: file_io::block_io(ctx, settings.io),
        bufs: BufPool::of(ctx),
        shard: shard.clone(),
        verbose: settings.verbose,
        idle_timeout: settings.idle_timeout,
        hs: Cell::new(after_tls.map(|a| a.hs).unwrap_or_default()),
        transmission: Cell::new(false),
        in_flight: Cell::new(0),
        pending_bytes: Cell::new(0),
        backlog: Cell::new(0),
        held: Cell::new(0),
        owed: Cell::new(0),
        read_done: Cell::new(false),
        closing: Cell::new(false),
        closed: Cell::new(false),
        read_run: Cell::new(0),
        reader: RefCell::new(None),
        reader_waits: Cell::new(false),
        writer: RefCell::new(None),
        send_lock: CoMutex::new(()),
        last_active: Cell::new(Instant::now()),
        watchdog: RefCell::new(None),
        slot,
    });
    conn.log("accepted");
    shard.insert(id, conn.clone());
    conn.arm(AfterTls::handshake_left(after_tls));
    ctx.spawn_local(conn.run()).detach();
    true
}

/// How a wait for input ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Got {
    /// What was asked for is here.
    All,
    /// The client closed its side first.
    Eof,
    /// The socket is not read any more (shutdown, violation, close).
    Stopped,
}

pub struct Conn {
    id: u64,
    /// Itself, for the tasks it spawns.
    me: Weak<Conn>,
    sock: AsyncFd<Socket>,
    /// The context the connection's tasks run on.
    ctx: AioContext,
    export: Arc<Export>,
    pool: Rc<ThreadPool>,
    /// How file I/O is done (`--aio`).
    io: BlockIo,
    /// The context's buffer pool: read replies and write payloads come from it, and go back
    /// once sent.
    bufs: Rc<BufPool>,
    /// The context's shard, which holds this connection until it has closed.
    shard: Rc<Shard>,
    verbose: bool,
    idle_timeout: Option<Duration>,
    /// Starts with `tls` set when the greeting and the client flags were done before TLS
    /// (`tls.rs`).
    hs: Cell<Handshake>,
    transmission: Cell<bool>,
    in_flight: Cell<usize>,
    /// Payload bytes of the requests in flight.
    pending_bytes: Cell<usize>,
    /// Bytes of replies waiting for the send lock or being written.
    backlog: Cell<usize>,
    /// The memory those replies hold (`session::held_bytes`), for flow control.
    held: Cell<usize>,
    /// Request tasks not finished (their reply sent or dropped): the connection closes at 0.
    owed: Cell<usize>,
    /// The socket is not read again (end of stream, shutdown), but complete requests already
    /// buffered are still served.
    read_done: Cell<bool>,
    /// Nothing more is acted on (DISC, ABORT, a violation); the replies owed still go out.
    closing: Cell<bool>,
    /// The socket is shut down; unsent replies are dropped.
    closed: Cell<bool>,
    /// Bytes read since the reading task last yielded to the rest of the context.
    read_run: Cell<usize>,
    /// The reading task's waker while it waits, and whether it waits for room or for its
    /// requests to finish (which completions then wake it for).
    reader: RefCell<Option<Waker>>,
    reader_waits: Cell<bool>,
    /// The waker of the task writing a reply, for [`abort`](Self::abort) to interrupt it.
    writer: RefCell<Option<Waker>>,
    send_lock: CoMutex<()>,
    /// When a byte last moved on the socket (kept only with an idle timeout).
    last_active: Cell<Instant>,
    /// The task that sleeps until the connection's deadline.
    watchdog: RefCell<Option<JoinHandle<()>>>,
    /// This client's place in the process's count of clients (`--shared`, the exit after
    /// the last client).
    slot: Rc<ClientSlot>,
}

impl Served for Conn {
    fn drain(&self, _ctx: &AioContext) {
        self.read_done.set(true);
        wake(&self.reader);
    }

    fn force_close(&self, _ctx: &AioContext) {
        if !self.closed.get() {
            eprintln!(
                "nbd-server: connection {}: closed at the end of the shutdown grace period",
                self.id
            );
        }
        self.abort();
    }
}

impl Conn {
    /// The connection's life: the greeting, the handshake, the requests; then the wait for
    /// the replies owed, and the close.
    async fn run(self: Rc<Self>) {
        let mut input = Input::default();
        if let Err(e) = self.serve(&mut input).await {
            self.log(&e.to_string());
            self.abort();
        }
        self.wait_reader(|| self.owed.get() == 0).await;
        if !self.closed.replace(true) {
            self.sock.get_ref().shutdown();
        }
        self.log("closed");
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.abort();
        }
        self.shard.remove(self.id);
    }

    async fn serve(self: &Rc<Self>, input: &mut Input) -> io::Result<()> {
        // Over TLS the greeting and the client flags were done before (`tls.rs`).
        let greeted = self.hs.get().tls || self.send(&IoBuf::from(greeting().to_vec())).await;
        if !greeted || !self.handshake(input).await? {
            return Ok(());
        }
        self.transmission.set(true);
        self.slot.negotiated();
        match self.idle_timeout {
            Some(limit) => self.arm(limit),
            None => self.disarm(),
        }
        self.touch();
        self.log(&session::transmission_log(self.hs.get().framing));
        self.receive(input).await
    }

    /// The client flags and the options; true once the transmission phase begins.
    async fn handshake(&self, input: &mut Input) -> io::Result<bool> {
        let mut hs = self.hs.get();
        if !hs.tls {
            if !self.got(input.fill(self, 4).await?, input) {
                return Ok(false);
            }
            match session::client_flags(be32(input.have())) {
                Ok(no_zeroes) => hs.no_zeroes = no_zeroes,
                Err(why) => {
                    self.fail(&why);
                    return Ok(false);
                }
            }
            input.consume(4);
        }
        loop {
            if !self.got(input.fill(self, OPTION_HEADER_LEN).await?, input) {
                return Ok(false);
            }
            let Some((option, len)) = parse_option_header(input.have()) else {
                self.fail("bad option magic, closing");
                return Ok(false);
            };
            input.consume(OPTION_HEADER_LEN);
            let mut out = Vec::new();
            let opted = if len > MAX_OPTION_LEN {
                match session::oversized_option(option) {
                    Err(why) => Opted::Fail(why),
                    Ok((reply, close)) => {
                        if !self.got(input.discard(self, u64::from(len)).await?, input) {
                            return Ok(false);
                        }
                        out = reply;
                        if close { Opted::Abort } else { Opted::Continue }
                    }
                }
            } else {
                let len = len as usize;
                if !self.got(input.fill(self, len).await?, input) {
                    return Ok(false);
                }
                let opted = session::handle_option(
                    &self.export,
                    &mut hs,
                    option,
                    &input.have()[..len],
                    &mut out,
                );
                input.consume(len);
                opted
            };
            self.hs.set(hs);
            // Written before the next option is read: a client that does not take its
            // replies is not read either, until the handshake limit closes it.
            if !self.send(&IoBuf::from(out)).await {
                return Ok(false);
            }
            match opted {
                Opted::Continue => {}
                Opted::Transmission => return Ok(true),
                Opted::Abort => {
                    self.closing.set(true);
                    return Ok(false);
                }
                Opted::Fail(why) => {
                    self.fail(why);
                    return Ok(false);
                }
            }
        }
    }

    /// The transmission phase's receive loop: one request at a time, each admitted one
    /// running as a task of its own (QEMU's `nbd_trip`).
    async fn receive(self: &Rc<Self>, input: &mut Input) -> io::Result<()> {
        loop {
            // (An aborted connection is `closing` too.)
            self.wait_reader(|| !self.is_full() || self.closing.get())
                .await;
            let framing = self.hs.get().framing;
            let hdr = framing.request_len();
            if self.closing.get() || !self.got(input.fill(self, hdr).await?, input) {
                return Ok(());
            }
            let Some(req) = parse_request(input.have(), framing) else {
                // Out of step or not NBD at all: nothing after this can be trusted.
                self.fail("bad request magic, closing");
                return Ok(());
            };
            input.consume(hdr);
            match session::classify(&self.export, &self.hs.get(), &req) {
                Action::Disconnect => {
                    self.log("NBD_CMD_DISC");
                    self.closing.set(true);
                    self.arm(LINGER);
                    return Ok(());
                }
                Action::Refuse {
                    errno,
                    why,
                    discard,
                } => {
                    if !self.got(input.discard(self, discard).await?, input) {
                        return Ok(());
                    }
                    self.reply_later(session::status(framing, &req, Some((errno, why))));
                }
                Action::Empty => {
                    self.shard.requests.set(self.shard.requests.get() + 1);
                    self.reply_later(session::status(framing, &req, None));
                }
                Action::Run => {
                    let data = if req.payload_len > 0 {
                        // A WRITE: its payload is at most MAX_PAYLOAD.
                        let len = req.payload_len as usize;
                        let (got, data) = input.payload(self, len).await?;
                        if !self.got(got, input) {
                            return Ok(());
                        }
                        Some(data)
                    } else {
                        None
                    };
                    self.run_request(req, data);
                }
            }
        }
    }

    /// Whether input that was waited for came; at the end of the stream, logs where the client
    /// left (as the callback engine does) and stops reading.
    fn got(&self, got: Got, input: &Input) -> bool {
        if got == Got::Eof {
            if !self.transmission.get() {
                self.log("disconnected during the handshake");
            } else if input.in_payload {
                self.log("disconnected in the middle of a write payload");
            } else if !input.have().is_empty() {
                self.log("disconnected in the middle of a request");
            }
            self.read_done.set(true);
        }
        got == Got::All
    }

    fn is_full(&self) -> bool {
        session::is_full(
            self.in_flight.get(),
            self.pending_bytes.get(),
            self.backlog.get(),
            self.held.get(),
        )
    }

    /// Submits an admitted request to the pool and spawns the task that awaits it and sends
    /// its reply.
    fn run_request(self: &Rc<Self>, req: Request, data: Option<IoBuf>) {
        let framing = self.hs.get().framing;
        let done = match file_io::read_by_sendfile(&self.export, &req, framing, &self.bufs) {
            Some(reply) => file_io::Outcome::ready(Ok(reply)),
            None => {
                let buf = data.unwrap_or_else(|| {
                    IoBuf::from(self.bufs.take(session::buffer_len(framing, &req)))
                });
                let done = file_io::run(
                    &self.ctx,
                    self.io,
                    &self.pool,
                    &self.export,
                    req,
                    buf,
                    framing,
                    self.in_flight.get() == 0,
                );
                if done.is_ready() {
                    self.shard.served_at_once(&req);
                }
                done
            }
        };
        self.in_flight.set(self.in_flight.get() + 1);
        self.pending_bytes
            .set(self.pending_bytes.get() + session::payload_bytes(&req));
        let me = self.clone();
        self.spawn_request(async move {
            let result = done.await;
            me.in_flight.set(me.in_flight.get() - 1);
            me.pending_bytes
                .set(me.pending_bytes.get() - session::payload_bytes(&req));
            me.shard.requests.set(me.shard.requests.get() + 1);
            if !me.closed.get() {
                let reply = session::reply(framing, me.id, &req, result);
                if reply.tail.is_some() {
                    me.shard.sent_from_file();
                }
                me.send(&reply).await;
                me.bufs.give(reply.vec);
            }
        });
    }

    /// Sends a reply that is ready now from a task of its own, so that the reader never waits
    /// for the socket. The reply counts in flow control from now, not from when its task first
    /// runs: the reader goes on until it has read [`READ_BUDGET`] bytes before the context
    /// runs other tasks, and a client that pipelines requests answered at once (an unknown
    /// command, a zero-length READ: 28 bytes each) and reads no replies had the server queue
    /// 37 000 uncounted tasks per MiB, 56–60 MB per connection, 1.9 GB with 32.
    fn reply_later(self: &Rc<Self>, reply: Vec<u8>) {
        let reply = IoBuf::from(reply);
        let held = self.count(&reply);
        let me = self.clone();
        self.spawn_request(async move {
            me.send_counted(&reply, held).await;
        });
    }

    /// Spawns the task of a request, owed until it ends; its own memory (the future's state,
    /// which holds its reply while the send waits) counts in `held`, with the task's
    /// bookkeeping ([`session::QUEUED_REPLY_COST`]), from now until it ends.
    fn spawn_request(self: &Rc<Self>, task: impl Future<Output = ()> + 'static) {
        let cost = std::mem::size_of_val(&task) + session::QUEUED_REPLY_COST;
        self.owed.set(self.owed.get() + 1);
        self.held.set(self.held.get() + cost);
        let me = self.clone();
        self.ctx
            .spawn_local(async move {
                task.await;
                me.held.set(me.held.get() - cost);
                me.settled();
            })
            .detach();
    }

    /// A request task is done: one less owed, and maybe room for the reader.
    fn settled(&self) {
        self.owed.set(self.owed.get() - 1);
        if self.reader_waits.get() {
            wake(&self.reader);
        }
    }

    /// Counts `reply` in flow control (its bytes to send, and the memory it holds:
    /// [`session::held_bytes`]) until [`send_counted`](Self::send_counted) is done with it;
    /// returns the memory counted.
    fn count(&self, reply: &IoBuf) -> usize {
        let held = session::held_bytes(reply);
        self.backlog.set(self.backlog.get() + reply.len());
        self.held.set(self.held.get() + held);
        held
    }

    /// Writes `reply` whole (its bytes, then its tail from the file), after the replies before
    /// it (the send lock). False if the connection is closed or closes meanwhile (the reply is
    /// dropped).
    async fn send(&self, reply: &IoBuf) -> bool {
        let held = self.count(reply);
        self.send_counted(reply, held).await
    }

    /// [`send`](Self::send) of a reply that [`count`](Self::count) counted, as `held`.
    async fn send_counted(&self, reply: &IoBuf, held: usize) -> bool {
        let len = reply.len();
        let mut sent = 0;
        let _turn = self.send_lock.lock().await;
        while sent < len && !self.closed.get() {
            let stop = || self.closed.get();
            let write = self
                .sock
                .write_with(|s| s.send_reply(reply, sent, std::iter::empty()));
            match until(&self.writer, stop, write).await {
                None => break,
                Some(Ok(n)) => {
                    sent += n;
                    self.backlog.set(self.backlog.get() - n);
                    self.touch();
                }
                Some(Err(e)) => {
                    // The client is gone (EPIPE, ECONNRESET): its replies have no reader.
                    self.log(&format!("write error: {e}"));
                    self.abort();
                }
            }
        }
        self.backlog.set(self.backlog.get() - (len - sent));
        self.held.set(self.held.get() - held);
        if self.reader_waits.get() {
            wake(&self.reader);
        }
        sent == len
    }

    /// One read from the socket into `buf`: `Some(0)` at the end of the stream, `None` once
    /// the socket is not to be read any more.
    async fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        self.read_by(|s| s.read(buf)).await
    }

    /// [`read`](Self::read) by `op`, which reads from the socket into memory of its own.
    async fn read_by(
        &self,
        mut op: impl FnMut(&Socket) -> io::Result<usize>,
    ) -> io::Result<Option<usize>> {
        let stop = || self.read_done.get() || self.closing.get() || self.closed.get();
        let read = self.sock.read_with(|s| op(s));
        match until(&self.reader, stop, read).await {
            None => Ok(None),
            Some(Ok(n)) => {
                self.touch();
                // A read that finds data does not yield; a client that keeps the socket full
                // would keep the context's other tasks and handlers waiting.
                let run = self.read_run.get() + n;
                if run >= READ_BUDGET {
                    self.read_run.set(0);
                    aio::task::yield_now().await;
                } else {
                    self.read_run.set(run);
                }
                Ok(Some(n))
            }
            Some(Err(e)) => Err(io::Error::new(e.kind(), format!("read error: {e}"))),
        }
    }

    /// Waits until `ready()` holds; completions, sends and stops wake the reader to look
    /// again.
    async fn wait_reader(&self, ready: impl Fn() -> bool) {
        poll_fn(|cx| {
            if ready() {
                return Poll::Ready(());
            }
            self.reader_waits.set(true);
            keep(&self.reader, cx.waker());
            Poll::Pending
        })
        .await;
        self.reader_waits.set(false);
    }

    /// A protocol violation: nothing more is read or acted on, but the replies owed still go
    /// out; the connection closes once that is done, or after [`LINGER`].
    fn fail(&self, why: &str) {
        self.log(why);
        self.closing.set(true);
        self.arm(LINGER);
    }

    /// Closes the socket now, dropping unsent replies; requests in flight still complete
    /// (their results are dropped), then the connection leaves its shard.
    fn abort(&self) {
        self.closing.set(true);
        if !self.closed.replace(true) {
            self.sock.get_ref().shutdown();
        }
        wake(&self.reader);
        wake(&self.writer);
    }

    /// (Re)starts the watchdog: in `after`, [`expired`](Self::expired) decides.
    fn arm(&self, after: Duration) {
        let me = self.me.clone();
        let watchdog = self.ctx.spawn_local(async move {
            aio::task::sleep(after).await;
            if let Some(me) = me.upgrade() {
                // This task is ending: the connection forgets it before re-arming.
                drop(me.watchdog.take());
                me.expired();
            }
        });
        if let Some(old) = self.watchdog.replace(Some(watchdog)) {
            old.abort();
        }
    }

    fn disarm(&self) {
        if let Some(old) = self.watchdog.take() {
            old.abort();
        }
    }

    /// The deadline passed: the handshake limit, the linger, or the idle timeout.
    fn expired(&self) {
        if self.closed.get() {
            return;
        }
        let timing = Timing {
            closing: self.closing.get(),
            transmission: self.transmission.get(),
            idle_timeout: self.idle_timeout,
            in_flight: self.in_flight.get(),
            last_active: self.last_active.get(),
        };
        match session::expired(self.id, timing) {
            Expired::Close(line) => {
                eprintln!("{line}");
                self.abort();
            }
            Expired::Rearm(after) => self.arm(after),
            Expired::Nothing => {}
        }
    }

    /// Notes that a byte moved on the socket, for the idle timeout.
    fn touch(&self) {
        if self.idle_timeout.is_some() {
            self.last_active.set(Instant::now());
        }
    }

    fn log(&self, what: &str) {
        if self.verbose {
            eprintln!("nbd-server: connection {}: {what}", self.id);
        }
    }
}

/// Runs `fut` until it completes (`Some`), or until `stop()` holds when the task is polled
/// (`None`); the task's waker is kept in `slot` for whoever makes `stop()` true to wake it.
async fn until<F: Future>(
    slot: &RefCell<Option<Waker>>,
    stop: impl Fn() -> bool,
    fut: F,
) -> Option<F::Output> {
    let mut fut = pin!(fut);
    poll_fn(|cx| {
        if stop() {
            return Poll::Ready(None);
        }
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        keep(slot, cx.waker());
        Poll::Pending
    })
    .await
}

fn keep(slot: &RefCell<Option<Waker>>, waker: &Waker) {
    let mut slot = slot.borrow_mut();
    if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
        *slot = Some(waker.clone());
    }
}

fn wake(slot: &RefCell<Option<Waker>>) {
    let waker = slot.borrow_mut().take();
    if let Some(waker) = waker {
        waker.wake();
    }
}

/// The reading task's buffer: received bytes not yet parsed are `buf[start..end]`; the
/// vector's length is its usable size (kept initialized, so reads go straight into it).
#[derive(Default)]
struct Input {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// A write's payload is being read (for the log line if the client leaves).
    in_payload: bool,
}

impl Input {
    fn have(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
    }

    /// Reads until `need` bytes are buffered (a request header, an option).
    async fn fill(&mut self, conn: &Conn, need: usize) -> io::Result<Got> {
        if self.buf.is_empty() && need > 0 {
            // The connection's first read goes to a small array, and the buffer is made only
            // once something came: a connection that never sends costs no buffer.
            let mut first = [0u8; 512];
            match conn.read(&mut first).await? {
                None => return Ok(Got::Stopped),
                Some(0) => return Ok(Got::Eof),
                Some(n) => {
                    self.buf.resize(READ_CHUNK.max(need), 0);
                    self.buf[..n].copy_from_slice(&first[..n]);
                    (self.start, self.end) = (0, n);
                }
            }
        }
        while self.end - self.start < need {
            // Unparsed bytes move to the front only when the message would not fit behind
            // them; the buffer grows only for a message bigger than it (a long option).
            let room = need.max(READ_CHUNK / 2);
            if self.start > 0 && self.buf.len() - self.end < room {
                self.buf.copy_within(self.start..self.end, 0);
                (self.start, self.end) = (0, self.end - self.start);
            }
            let size = self.buf.len().max(READ_CHUNK).max(self.end + room);
            if size > self.buf.len() {
                self.buf.resize(size, 0);
            }
            match conn.read(&mut self.buf[self.end..]).await? {
                None => return Ok(Got::Stopped),
                Some(0) => return Ok(Got::Eof),
                Some(n) => self.end += n,
            }
        }
        Ok(Got::All)
    }

    /// Reads a write's `len`-byte payload: what is buffered, then the rest straight from the
    /// socket into the request's own buffer, which grows only as the bytes arrive.
    async fn payload(&mut self, conn: &Conn, len: usize) -> io::Result<(Got, IoBuf)> {
        let mut data = conn.bufs.take_payload(len, conn.export.align());
        let buffered = self.have().len().min(len);
        data.extend_from_slice(&self.have()[..buffered]);
        self.consume(buffered);
        let mut got = Got::All;
        while data.received() < len {
            // Into the buffer's capacity, zeroing nothing ahead of the bytes that arrive
            // (`Payload::receive`): a client that stalls in a payload holds only what it sent.
            // Zeroing the next READ_BUDGET bytes first cost 1 MiB per stalled connection
            // (400 connections each stalled 64 KiB into a 32 MiB WRITE: 469 MB of RSS).
            let room = (len - data.received()).min(READ_BUDGET);
            let n = conn.read_by(|s| data.receive(room, s)).await?;
            match n {
                None => got = Got::Stopped,
                Some(0) => got = Got::Eof,
                Some(_) => continue,
            }
            break;
        }
        self.in_payload = got == Got::Eof;
        Ok((got, data.into_buf()))
    }

    /// Reads and drops the next `n` bytes (a refused message's data).
    async fn discard(&mut self, conn: &Conn, mut n: u64) -> io::Result<Got> {
        loop {
            let buffered = self
                .have()
                .len()
                .min(usize::try_from(n).unwrap_or(usize::MAX));
            self.consume(buffered);
            n -= buffered as u64;
            if n == 0 {
                return Ok(Got::All);
            }
            match self.fill(conn, 1).await? {
                Got::All => {}
                other => return Ok(other),
            }
        }
    }
}
