//! Big WRITEs streamed by a pool worker: under the callback engine, on the page cache, a
//! connection with nothing in flight and nothing waiting to be sent that receives a WRITE of
//! more than [`LANE_WRITE_MAX`] hands its socket to one of the context's pool workers, which
//! receives the payload, writes it with `pwrite`, sends the status reply itself, and goes on
//! with the next request while that is another such WRITE; anything else it reads (the
//! header of another request, part of one) goes back to the context's thread, which serves
//! it as usual.
//!
//! Why: a bulk upload (nbdcopy into the server) otherwise costs each 256 KiB request two
//! hand-offs, the context's thread receiving the payload in pieces (a wake-up each) and a
//! worker writing it from another CPU's cache, with the worker's completion woken back on
//! the context's thread to send a 16-byte reply. nbdkit's threads each receive a request and
//! write it themselves. `nbdcopy -C 4 -R 64` of a cached 1 GiB file into a freshly written
//! image, 4 alternating rounds (BENCHMARKS.md, "Session of 2026-12-07, 11:43 UTC"): 0.48–0.51 s
//! at 490–540 ms of server CPU before, 0.35–0.38 s at 320–350 ms streamed, nbdkit 0.37–0.38 s
//! at 330–380 ms.
//!
//! While a worker streams, the connection is its worker's: the context's thread neither reads
//! the socket (its handler stops watching for input) nor sends on it, which holds because a
//! stream starts only when nothing is in flight and nothing is queued, and the connection
//! admits no request until the stream has ended. A stream ends, handing the connection back:
//! * when the next request is not a WRITE that may be streamed ([`may_stream`]), or its header
//!   has not arrived within [`HEADER_WAIT`]: its bytes go back for the context's thread to
//!   parse;
//! * when the worker has waited [`WAIT_BUDGET`] in all for payloads, or the client closes, or
//!   the socket fails: a payload received in part goes back, and the context's thread
//!   receives the rest (or meets the end or the error) as for any WRITE; and when it has
//!   waited as long in all for headers and the next one is not there: so a slow client keeps
//!   a worker waiting for a bounded time per stream, and the next stream is a new job behind
//!   those queued on the pool meanwhile;
//! * when the socket does not take a whole reply (a client that does not read its replies):
//!   the rest goes back to be queued, and the connection's flow control takes over;
//! * after [`STREAM_MAX_BYTES`], at the next request's boundary, so that the pool's other
//!   jobs get their turn;
//! * when the connection is drained (shutdown) or closed: the worker reads no further header
//!   ([`Streamer::stop`], checked before a header is read and again after waiting for one; a
//!   close also shuts the socket down under it).
//!
//! A request the worker reads counts as read by the connection, as one the context's thread
//! had read: a whole one is written and answered even if a shutdown begins meanwhile, and one
//! whose payload goes back unfinished during a shutdown gets what such a payload gets from the
//! context's thread (which reads no more of it, and closes).

use std::io::{self, IoSlice};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};

use crate::buffers::Payload;
use crate::connection::Socket;
use crate::export::Export;
use crate::file_io::LANE_WRITE_MAX;
use crate::protocol::*;
use crate::session::{self, Action, Handshake, IoBuf};

/// How long a worker waits for the next request's header after a reply before it hands the
/// connection back: long enough for a client that pipelines (nbdcopy sends the next request
/// as soon as its socket has room) and for a client at queue depth 1 that answers at once,
/// short enough that a connection going quiet frees its worker at once in human terms. The
/// wait happens off the context's thread: a request that arrives during it is parsed by the
/// worker, and one that is not a big WRITE goes back to the context's thread at once.
/// Measured on the first version, before streams ended at [`STREAM_MAX_BYTES`]: without the
/// wait, `nbdcopy -C 4 -R 64` handed back after about two requests per stream (6 567 streams
/// for 12 288 requests, 0.29–0.53 s per GiB); with it, after about 500 (23 streams, 0.30–0.31
/// s). The cap now ends a stream of 256 KiB requests after 256 of them.
pub const HEADER_WAIT: Duration = Duration::from_millis(1);

/// How long, in all, a worker waits during one stream for payload bytes, and how long for
/// headers: once it has waited that long for a payload, it hands the connection back with the
/// payload received in part (the context's thread receives the rest without holding a
/// worker); once that long for headers, it waits for no more, and hands the connection back
/// when the next header is not there already. So a slow client keeps a worker waiting at most
/// twice this per stream. Measured with one budget for both (`nbdcopy -C 4 -R 64`, three
/// copies): 7 492 of 12 288 WRITEs streamed, in 72 streams, since most streams then ended with
/// a payload handed back in part; with two, as with payload waits alone, 11 590.
pub const WAIT_BUDGET: Duration = Duration::from_millis(10);

/// The most payload bytes one stream writes before it hands the connection back (at the next
/// request boundary), so that a client that never makes it wait does not keep a worker for
/// itself: the next stream is a new job behind those already queued on the pool. 64 MiB is
/// about 30 ms of copying here, and a stream costs two wake-ups.
pub const STREAM_MAX_BYTES: u64 = 64 << 20;

/// Whether WRITE `req` on `export` may be streamed by a worker: on the page cache, more than
/// [`LANE_WRITE_MAX`] (smaller ones are written at once or by the write lane), without FUA.
pub fn may_stream(export: &Export, req: &Request) -> bool {
    req.kind == CMD_WRITE
        && req.payload_len > LANE_WRITE_MAX
        && req.flags & CMD_FLAG_FUA == 0
        && export.align() <= 1
}

/// What a connection lends a streaming worker, made once per connection: a handle on its
/// socket and the flag that stops the stream.
pub struct Streamer {
    sock: Arc<Socket>,
    stopped: Arc<AtomicBool>,
}

impl Streamer {
    pub fn new(sock: Arc<Socket>) -> Streamer {
        Streamer {
            sock,
            stopped: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The worker reads no further request header (shutdown, close). Relaxed: the flag only
    /// shortens a stream; a header read just before it is seen is served as one read earlier.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// The work of one stream, for the pool: `req`'s payload has its first bytes in `data`.
    pub fn work(
        &self,
        export: Arc<Export>,
        hs: Handshake,
        id: u64,
        req: Request,
        data: Payload,
    ) -> impl FnOnce() -> Streamed + Send + 'static {
        let sock = self.sock.clone();
        let stopped = self.stopped.clone();
        move || stream(&sock, &export, hs, id, &stopped, req, data)
    }
}

/// What a stream gives back to the context's thread.
pub struct Streamed {
    /// Requests written and answered (or answered with their error).
    pub served: u64,
    /// The end of a reply the socket did not take, to queue first.
    pub unsent: Vec<u8>,
    /// A WRITE whose payload stopped arriving: its request and what came of it.
    pub partial: Option<(Request, Payload)>,
    /// Bytes read after the last streamed request: part or all of the next header.
    pub leftover: Vec<u8>,
    /// The last payload's buffer, for the context's buffer pool.
    pub spare: Option<Vec<u8>>,
}

/// Runs on a pool worker: receives the rest of `req`'s payload into `data`, writes it,
/// answers it, and goes on while the next request is another WRITE that may be streamed
/// (see the module docs for when it stops).
fn stream(
    sock: &Socket,
    export: &Export,
    hs: Handshake,
    id: u64,
    stopped: &AtomicBool,
    mut req: Request,
    mut data: Payload,
) -> Streamed {
    let framing = hs.framing;
    let mut out = Streamed {
        served: 0,
        unsent: Vec::new(),
        partial: None,
        leftover: Vec::new(),
        spare: None,
    };
    // Separate, so that waiting for headers ends a stream at a request's boundary, where the
    // next stream starts at once, rather than with a payload handed back in part, after which
    // the connection's requests take the context's path for as long as one is in flight.
    let (mut payload_budget, mut header_budget) = (WAIT_BUDGET, WAIT_BUDGET);
    let mut written_bytes = 0;
    loop {
        if !receive_payload(sock, &req, &mut data, &mut payload_budget) {
            out.partial = Some((req, data));
            return out;
        }
        let buf = data.into_buf();
        let written = export.write(buf.bytes(), req.offset, false);
        let reply = session::reply(framing, id, &req, written.map(|()| IoBuf::default()));
        out.served += 1;
        written_bytes += req.payload_len;
        let vec = buf.vec;
        let unsent = send_all(sock, &reply.vec[reply.start..]);
        if !unsent.is_empty() {
            out.unsent = unsent.to_vec();
            out.spare = Some(vec);
            return out;
        }
        let mut head = [0u8; EXTENDED_REQUEST_LEN];
        let head = &mut head[..framing.request_len()];
        let got = if stopped.load(Ordering::Relaxed) || written_bytes >= STREAM_MAX_BYTES {
            0
        } else {
            receive_header(sock, head, &mut header_budget, stopped)
        };
        let next = (got == head.len())
            .then(|| parse_request(head, framing))
            .flatten()
            .filter(|next| {
                matches!(session::classify(export, &hs, next), Action::Run)
                    && may_stream(export, next)
            });
        let Some(next) = next else {
            out.leftover = head[..got].to_vec();
            out.spare = Some(vec);
            return out;
        };
        req = next;
        data = Payload::reuse(vec);
    }
}

/// Receives the rest of `req`'s payload into `data`, waiting for it at most `budget` in all
/// (what is left of it is left in `budget`); false if it did not all arrive.
fn receive_payload(
    sock: &Socket,
    req: &Request,
    data: &mut Payload,
    budget: &mut Duration,
) -> bool {
    // At most MAX_PAYLOAD, checked by `classify`.
    let len = req.payload_len as usize;
    while data.received() < len {
        match data.receive(len - data.received(), sock) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !wait_readable(sock, *budget, budget) || budget.is_zero() {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    true
}

/// Receives a request header into `head`, waiting once for its first bytes, up to
/// [`HEADER_WAIT`] or what is left of `budget` (none once it is spent), and reading nothing if
/// the stream was stopped meanwhile; returns how many bytes arrived (the end of the stream and
/// errors end it too: the context's thread meets them again).
fn receive_header(
    sock: &Socket,
    head: &mut [u8],
    budget: &mut Duration,
    stopped: &AtomicBool,
) -> usize {
    let mut got = 0;
    let mut waited = false;
    while got < head.len() {
        match sock.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && !waited && got == 0 => {
                waited = true;
                if !wait_readable(sock, HEADER_WAIT, budget) || stopped.load(Ordering::Relaxed) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    got
}

/// Sends `bytes` as far as the socket takes them without blocking; returns the rest, empty
/// when all went (after an error, the context's thread meets it again when it sends the rest).
fn send_all<'a>(sock: &Socket, bytes: &'a [u8]) -> &'a [u8] {
    let mut sent = 0;
    while sent < bytes.len() {
        match sock.write_vectored(&[IoSlice::new(&bytes[sent..])]) {
            Ok(0) => break,
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    &bytes[sent..]
}

/// Waits up to `limit`, and no longer than what is left of `budget`, for `sock` to have input
/// (or an error or hang-up, which the next read reports), taking the time waited from
/// `budget`; false on time-out.
fn wait_readable(sock: &Socket, limit: Duration, budget: &mut Duration) -> bool {
    let mut fds = [PollFd::new(sock, PollFlags::IN)];
    // At most WAIT_BUDGET, which a Timespec always holds.
    let timeout = Timespec::try_from(limit.min(*budget)).unwrap_or_default();
    let start = Instant::now();
    let ready = matches!(rustix::event::poll(&mut fds, Some(&timeout)), Ok(n) if n > 0);
    *budget = budget.saturating_sub(start.elapsed());
    ready
}
