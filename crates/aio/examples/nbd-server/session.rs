//! What both connection engines (`connection.rs`, callbacks; `conn_task.rs`, one task per
//! connection) decide the same way: the limits of a connection, the answers to the client flags
//! and to every option, the checks and the meaning of a request, the work a request runs on the
//! thread pool and the reply it gets, flow control, and what a connection's deadline means
//! when it passes. Nothing here touches a socket or a context: an engine reads and writes,
//! these functions say what the bytes mean and what goes back.

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::export::{Export, Run};
use crate::protocol::*;

/// Requests a connection may have on the thread pool before its socket stops being read.
pub const MAX_IN_FLIGHT: usize = 128;
/// Bytes of read and write payload in flight plus replies not yet sent, above which the
/// socket stops being read. One request of up to [`MAX_PAYLOAD`] is always admitted. As much
/// as nbdcopy keeps in flight per connection (64 requests of 256 KiB), so it bounds memory
/// without slowing bulk copies.
pub const MAX_PENDING_BYTES: usize = 16 << 20;
/// Replies waiting to be sent, above which no further request or option is acted on: their
/// bytes on the wire or the memory they hold ([`held_bytes`]), whichever is more.
pub const MAX_BACKLOG: usize = 16 << 20;
/// What a reply waiting to be sent holds beside its buffer, rounded up: its place in the
/// connection's queue, or under `--engine tasks` its request's task.
pub const QUEUED_REPLY_COST: usize = 256;
/// How long a client may take from connecting to entering the transmission phase.
pub const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);
/// How long a connection closing after a protocol violation (or `NBD_CMD_DISC`) waits for the
/// client to take the replies it is owed.
pub const LINGER: Duration = Duration::from_secs(10);
/// How much one read of a write's payload takes from the socket at most (the callback engine
/// also yields to the other handlers after this much).
pub const READ_BUDGET: usize = 1 << 20;
/// The read buffer's size; it grows only to hold the largest option (64 KiB of data).
pub const READ_CHUNK: usize = 64 << 10;
/// The callback engine sends the replies of requests served at once on the context's thread
/// as soon as this many are queued, instead of all of them after the last request of the
/// read: the client then works on them (and sends its next requests) while the rest are
/// served, where with one send at the end the client and the server took turns on the two
/// CPUs. `qemu-img bench` 4 KiB at queue depth 32, 3–5 alternating runs, IOPS: writes
/// 79–87 k → 100–106 k, reads 98–103 k → 117–125 k; fio writes 114–143 k → 155–167 k, fio
/// reads unchanged (BENCHMARKS.md, "Session of 2026-12-06, 05:39 UTC"). 3 measured like 4;
/// 1, 2, 6 and 8 lower.
pub const EARLY_SEND_REPLIES: usize = 4;
/// Structured READs at least this long (without `NBD_CMD_FLAG_DF`) look for holes and send
/// them as `OFFSET_HOLE` chunks. Shorter ones are sent whole: for a few KiB, the `lseek` that
/// finds a hole would cost more than the zeros it saves.
pub const SPARSE_READ_MIN: u32 = 64 << 10;
/// At most this many chunks in a sparse READ's reply; what is left after them is read as data.
const MAX_READ_CHUNKS: usize = 256;
/// At most this many extents in a BLOCK_STATUS reply built on the pool (qemu's limit: 1 MiB of
/// descriptors); the client asks again from where the reply ended.
pub const MAX_EXTENTS: usize = 128 << 10;
/// The longest metadata context query looked at; longer ones (strings are at most 4 KiB) are
/// ignored, as unknown queries are.
const MAX_QUERY: usize = 4096;

/// Whether flow control holds back further requests (and options): `in_flight` requests on the
/// pool with `pending_bytes` of payload, and replies not yet sent, `unsent` bytes on the wire
/// that hold `held` bytes of memory ([`held_bytes`]); the backlog is the larger of the two. One
/// request is always admitted when nothing is in flight and nothing waits to be sent.
pub fn is_full(in_flight: usize, pending_bytes: usize, unsent: usize, held: usize) -> bool {
    let backlog = unsent.max(held);
    in_flight >= MAX_IN_FLIGHT
        || backlog >= MAX_BACKLOG
        || (in_flight > 0 && pending_bytes + backlog >= MAX_PENDING_BYTES)
}

/// The memory `reply` holds while it waits to be sent: its buffer's capacity, not only the
/// bytes it sends, and [`QUEUED_REPLY_COST`]. A WRITE's 16-byte status reply is built in its
/// payload's buffer ([`write_done`]), so that the buffer goes back to the pool once the reply
/// is sent; counted by its length, as flow control did before, a client that read no replies
/// made the server keep one payload buffer per WRITE until a million of them were queued
/// (RSS grew by 64 MiB per 1 000 WRITEs of 68 KiB, to 6.4 GB at 100 000).
pub fn held_bytes(reply: &IoBuf) -> usize {
    reply.vec.capacity() + QUEUED_REPLY_COST
}

/// The bytes a request holds while it is in flight on the pool: its data, either way, for a
/// READ or a WRITE, once [`classify`] admitted it (so at most [`MAX_PAYLOAD`]); for a
/// BLOCK_STATUS the most its runs and reply can take (at most [`MAX_EXTENTS`] extents).
pub fn payload_bytes(req: &Request) -> usize {
    match req.kind {
        CMD_READ | CMD_WRITE => req.length as usize,
        CMD_BLOCK_STATUS => {
            let extents = (req.length / BLOCK_STATUS_GRAIN + 2).min(MAX_EXTENTS as u64);
            extents as usize * BLOCK_STATUS_EXTENT_COST
        }
        _ => 0,
    }
}

/// The finest an extent of a BLOCK_STATUS reply can be (a file system block is at least this),
/// for [`payload_bytes`]' worst case.
const BLOCK_STATUS_GRAIN: u64 = 512;
/// What one extent of a BLOCK_STATUS built on the pool may hold while in flight, rounded up:
/// its run (16 bytes, in a vector that may have grown to twice what it holds) and its
/// descriptor in the reply (8 bytes, 16 with extended headers). Counted since a client that
/// kept writes running (so that BLOCK_STATUS goes to the pool) and read no replies had 128
/// requests of up to [`MAX_EXTENTS`] extents each in flight on one connection, past flow
/// control: 164 MB of RSS with structured replies, 296 MB with extended headers, 557 MB from
/// four connections (BENCHMARKS.md, "memory under a client that reads no replies").
const BLOCK_STATUS_EXTENT_COST: usize = 48;

/// A connection whose handshake began before it reached its context: TLS is on (`tls.rs`),
/// the greeting and the client flags are done, and the handshake limit started earlier.
#[derive(Clone, Copy, Debug)]
pub struct AfterTls {
    /// What the handshake settled before TLS (the client's no-zeroes flag), with `tls` set.
    pub hs: Handshake,
    /// When [`HANDSHAKE_LIMIT`] runs out, counted from the client's connecting.
    pub deadline: Instant,
}

impl AfterTls {
    /// How long the connection has left to enter the transmission phase.
    pub fn handshake_left(after_tls: Option<AfterTls>) -> Duration {
        after_tls.map_or(HANDSHAKE_LIMIT, |a| {
            a.deadline.saturating_duration_since(Instant::now())
        })
    }
}

/// What the handshake has settled so far.
#[derive(Clone, Copy, Debug)]
pub struct Handshake {
    pub framing: Framing,
    pub no_zeroes: bool,
    /// `base:allocation` was selected by the last `NBD_OPT_SET_META_CONTEXT`, so
    /// `NBD_CMD_BLOCK_STATUS` is allowed.
    pub base_allocation: bool,
    /// The connection runs over TLS (`NBD_OPT_STARTTLS` was acknowledged, `tls.rs`).
    pub tls: bool,
}

impl Default for Handshake {
    fn default() -> Handshake {
        Handshake {
            framing: Framing::Simple,
            no_zeroes: false,
            base_allocation: false,
            tls: false,
        }
    }
}

impl Handshake {
    fn structured(&self) -> bool {
        self.framing.chunked()
    }
}

/// The client's 32-bit flags after the greeting: `Ok` with whether the client omits the zeroes
/// after `NBD_OPT_EXPORT_NAME`, or the protocol violation to log before closing.
pub fn client_flags(flags: u32) -> Result<bool, String> {
    if flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0
        || flags & CLIENT_FIXED_NEWSTYLE == 0
    {
        // The protocol says to drop a client whose flags we do not understand; a client that
        // does not speak the fixed newstyle could not understand our errors anyway.
        return Err(format!("unsupported client flags {flags:#x}, closing"));
    }
    Ok(flags & CLIENT_NO_ZEROES != 0)
}

/// What an option did to the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opted {
    /// Answered; the next option follows.
    Continue,
    /// Answered, and the transmission phase begins.
    Transmission,
    /// Acknowledged `NBD_OPT_ABORT`: the session ends once the reply is out.
    Abort,
    /// A protocol violation (logged as this): nothing more is acted on.
    Fail(&'static str),
}

/// An option whose data is longer than [`MAX_OPTION_LEN`]: `Ok` with the reply to send once
/// its data has been read and dropped, and whether the session ends then; `Err` with the
/// violation to log if the only answer is closing.
pub fn oversized_option(option: u32) -> Result<(Vec<u8>, bool), &'static str> {
    if option == OPT_EXPORT_NAME {
        // NBD_OPT_EXPORT_NAME has no error reply: closing is the only answer.
        return Err("NBD_OPT_EXPORT_NAME with an over-long name, closing");
    }
    let mut reply = Vec::new();
    if option == OPT_ABORT {
        // The protocol: ABORT is always acknowledged, its data ignored; then the session ends.
        option_reply(&mut reply, option, REP_ACK, &[]);
    } else {
        option_reply(&mut reply, option, REP_ERR_TOO_BIG, b"option data too long");
    }
    Ok((reply, option == OPT_ABORT))
}

/// Answers one option with its complete `data`, appending the replies to `out`.
pub fn handle_option(
    export: &Export,
    hs: &mut Handshake,
    option: u32,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Opted {
    match option {
        OPT_EXPORT_NAME => {
            if data != export.name.as_bytes() {
                return Opted::Fail("NBD_OPT_EXPORT_NAME for an unknown export, closing");
            }
            out.extend_from_slice(&export.size.to_be_bytes());
            let flags = export.transmission_flags(hs.structured());
            out.extend_from_slice(&flags.to_be_bytes());
            if !hs.no_zeroes {
                out.extend_from_slice(&[0; 124]);
            }
            return Opted::Transmission;
        }
        OPT_ABORT => {
            option_reply(out, option, REP_ACK, &[]);
            return Opted::Abort;
        }
        OPT_LIST if !data.is_empty() => {
            option_reply(out, option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
        }
        OPT_LIST => {
            let mut entry = (export.name.len() as u32).to_be_bytes().to_vec();
            entry.extend_from_slice(export.name.as_bytes());
            option_reply(out, option, REP_SERVER, &entry);
            option_reply(out, option, REP_ACK, &[]);
        }
        OPT_INFO | OPT_GO => match parse_info_request(data) {
            None => option_reply(out, option, REP_ERR_INVALID, b"malformed request"),
            Some((name, _)) if name != export.name.as_bytes() => {
                option_reply(out, option, REP_ERR_UNKNOWN, b"no such export");
            }
            Some((_, items)) => {
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&export.size.to_be_bytes());
                let flags = export.transmission_flags(hs.structured());
                info.extend_from_slice(&flags.to_be_bytes());
                option_reply(out, option, REP_INFO, &info);
                if items.contains(&INFO_BLOCK_SIZE) {
                    let mut info = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    for size in [MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD] {
                        info.extend_from_slice(&size.to_be_bytes());
                    }
                    option_reply(out, option, REP_INFO, &info);
                }
                option_reply(out, option, REP_ACK, &[]);
                if option == OPT_GO {
                    return Opted::Transmission;
                }
            }
        },
        OPT_STRUCTURED_REPLY | OPT_EXTENDED_HEADERS if !data.is_empty() => {
            option_reply(out, option, REP_ERR_INVALID, b"the option takes no data");
        }
        // Extended headers take precedence: no going back to compact ones.
        OPT_STRUCTURED_REPLY if hs.framing == Framing::Extended => {
            let msg = b"extended headers are already negotiated";
            option_reply(out, option, REP_ERR_EXT_HEADER_REQD, msg);
        }
        OPT_STRUCTURED_REPLY => {
            hs.framing = Framing::Structured;
            option_reply(out, option, REP_ACK, &[]);
        }
        OPT_EXTENDED_HEADERS => {
            hs.framing = Framing::Extended;
            option_reply(out, option, REP_ACK, &[]);
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => meta_context(export, hs, option, data, out),
        // Before TLS, a server with `--tls-creds` answers this option in `tls.rs`.
        OPT_STARTTLS if hs.tls => {
            option_reply(out, option, REP_ERR_INVALID, b"TLS is already on");
        }
        OPT_STARTTLS => {
            let msg = b"TLS is not configured on this server (--tls-creds)";
            option_reply(out, option, REP_ERR_POLICY, msg);
        }
        _ => option_reply(out, option, REP_ERR_UNSUP, b"option not supported"),
    }
    Opted::Continue
}

/// Answers `NBD_OPT_LIST_META_CONTEXT` or `NBD_OPT_SET_META_CONTEXT`. The one context offered
/// is `base:allocation`; a query names it exactly, or (when listing) as the `base:` wildcard,
/// and listing with no query lists everything. Other queries, of any namespace, are ignored,
/// as the protocol asks. A SET replaces the selection even when it fails, and needs
/// structured replies first.
fn meta_context(export: &Export, hs: &mut Handshake, option: u32, data: &[u8], out: &mut Vec<u8>) {
    let list = option == OPT_LIST_META_CONTEXT;
    if !list {
        hs.base_allocation = false;
        if !hs.structured() {
            let msg = b"meta contexts need structured replies or extended headers";
            return option_reply(out, option, REP_ERR_INVALID, msg);
        }
    }
    let Some((name, queries)) = parse_meta_request(data) else {
        return option_reply(out, option, REP_ERR_INVALID, b"malformed request");
    };
    if name != export.name.as_bytes() {
        return option_reply(out, option, REP_ERR_UNKNOWN, b"no such export");
    }
    if queries.iter().any(|q| q.contains(&0)) {
        return option_reply(out, option, REP_ERR_INVALID, b"NUL in a query");
    }
    let selects =
        |q: &&[u8]| q.len() <= MAX_QUERY && (*q == BASE_ALLOCATION || (list && *q == b"base:"));
    let found = (list && queries.is_empty()) || queries.iter().any(selects);
    if found {
        // Listing names contexts without selecting them: their id is 0 there.
        let id = if list { 0 } else { BASE_ALLOCATION_ID };
        let mut reply = id.to_be_bytes().to_vec();
        reply.extend_from_slice(BASE_ALLOCATION);
        option_reply(out, option, REP_META_CONTEXT, &reply);
    }
    if !list {
        hs.base_allocation = found;
    }
    option_reply(out, option, REP_ACK, &[]);
}

/// The log line of a connection entering the transmission phase.
pub fn transmission_log(framing: Framing) -> String {
    format!(
        "transmission phase, {} replies",
        match framing {
            Framing::Simple => "simple",
            Framing::Structured => "structured",
            Framing::Extended => "extended",
        }
    )
}

/// What a request header asks of the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `NBD_CMD_DISC`: read nothing more; close once the replies owed are out.
    Disconnect,
    /// Refused with this NBD error (and `why`, for an error chunk), answered once `discard`
    /// payload bytes have been read and dropped (whatever their number: they stream through,
    /// even over [`MAX_PAYLOAD`]).
    Refuse {
        errno: u32,
        why: &'static str,
        discard: u64,
    },
    /// A read of nothing: answered at once with success (a structured reply may not carry an
    /// empty data chunk).
    Empty,
    /// A valid request for the pool; a WRITE's payload (`payload_len` bytes, at most
    /// [`MAX_PAYLOAD`]) follows the header.
    Run,
}

/// What to do with request `req` on `export`, on a connection whose handshake settled `hs`.
pub fn classify(export: &Export, hs: &Handshake, req: &Request) -> Action {
    if req.kind == CMD_DISC {
        return Action::Disconnect;
    }
    if let Err((errno, why)) = check(export, hs, req) {
        let discard = req.payload_len;
        return Action::Refuse {
            errno,
            why,
            discard,
        };
    }
    if req.kind == CMD_READ && req.length == 0 {
        return Action::Empty;
    }
    Action::Run
}

/// Validates a request against the export and the handshake; `Err` carries the NBD error to
/// reply with and why (the error chunk's message).
fn check(export: &Export, hs: &Handshake, req: &Request) -> Result<(), (u32, &'static str)> {
    // FUA is accepted everywhere (the protocol: "valid for all commands"); each other flag
    // only where it means something, else EINVAL (NO_HOLE on a READ, DF without structured
    // replies, a payload on anything but a WRITE).
    let extended = hs.framing == Framing::Extended;
    let flags = CMD_FLAG_FUA
        | match req.kind {
            CMD_READ if hs.structured() => CMD_FLAG_DF,
            CMD_WRITE if extended => CMD_FLAG_PAYLOAD_LEN,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        };
    if req.flags & !flags != 0 {
        return Err((EINVAL, "a flag this command does not take"));
    }
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && export.read_only {
        return Err((EPERM, "the export is read-only"));
    }
    const PAST_END: &str = "the request goes past the end of the export";
    let in_range = req
        .offset
        .checked_add(req.length)
        .is_some_and(|end| end <= export.size);
    match req.kind {
        CMD_READ | CMD_WRITE | CMD_CACHE if req.length > u64::from(MAX_PAYLOAD) => {
            Err((EINVAL, "the request is longer than the 32 MiB maximum"))
        }
        CMD_READ | CMD_TRIM | CMD_CACHE | CMD_BLOCK_STATUS if !in_range => Err((EINVAL, PAST_END)),
        CMD_WRITE | CMD_WRITE_ZEROES if !in_range => Err((ENOSPC, PAST_END)),
        // Block status needs a selected context, and a length to describe.
        CMD_BLOCK_STATUS if !hs.base_allocation => {
            Err((EINVAL, "no metadata context was negotiated"))
        }
        CMD_BLOCK_STATUS if req.length == 0 => Err((EINVAL, "a block status of no bytes")),
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_FLUSH | CMD_CACHE
        | CMD_BLOCK_STATUS => Ok(()),
        _ => Err((EINVAL, "an unknown command")),
    }
}

/// The buffer a request takes to the thread pool (see [`work`]): a READ's reply buffer, of
/// [`Framing::read_prefix`] plus the read's length, from the context's buffer pool; a WRITE's
/// payload; nothing for the rest.
pub fn buffer_len(framing: Framing, req: &Request) -> usize {
    if req.kind == CMD_READ {
        framing.read_prefix() + req.length as usize
    } else {
        0
    }
}

/// A request's or a reply's bytes: `vec[start..]`, then, for a READ's reply sent from the page
/// cache, its data straight from the file (`tail`). The bytes before `start` are padding that
/// put a READ's data or a WRITE's payload on the alignment `O_DIRECT` needs (`--cache none`);
/// nothing reads or sends them.
#[derive(Debug, Default)]
pub struct IoBuf {
    pub vec: Vec<u8>,
    pub start: usize,
    pub tail: Option<FileTail>,
}

/// The rest of a reply, sent from the image with `sendfile` behind the reply's bytes
/// (`file_io::read_by_sendfile`): `len` bytes at `offset`.
#[derive(Debug)]
pub struct FileTail {
    pub file: Arc<File>,
    pub offset: u64,
    pub len: usize,
}

impl IoBuf {
    /// A buffer whose bytes start at `start`.
    pub fn at(vec: Vec<u8>, start: usize) -> IoBuf {
        IoBuf {
            vec,
            start,
            tail: None,
        }
    }

    /// The bytes that count (without the tail).
    pub fn bytes(&self) -> &[u8] {
        &self.vec[self.start..]
    }

    /// How many bytes this is on the wire: the bytes, then the tail.
    pub fn len(&self) -> usize {
        self.bytes().len() + self.tail.as_ref().map_or(0, |t| t.len)
    }

    /// Whether there is nothing to send.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<Vec<u8>> for IoBuf {
    fn from(vec: Vec<u8>) -> IoBuf {
        IoBuf::at(vec, 0)
    }
}

/// `buf` made ready for a READ's reply with `len` bytes of data after a `prefix`-byte header:
/// with `align` above 1, padding first, so that the data starts on a multiple of it (the
/// buffer's capacity is reserved first, so the data stays where the padding put it).
pub fn read_buffer(mut buf: Vec<u8>, prefix: usize, len: usize, align: usize) -> IoBuf {
    let mut start = 0;
    if align > 1 {
        buf.clear();
        buf.reserve(align + prefix + len);
        start = crate::buffers::pad_for(&buf, prefix, align);
    }
    fit(&mut buf, start + prefix + len);
    IoBuf::at(buf, start)
}

/// The blocking work of a request [`classify`] admitted, for the thread pool. A READ and a
/// BLOCK_STATUS return their whole reply, framed for `framing` (a READ's data read straight
/// into `buf`, its reply buffer; or, with `tails`, a READ of [`SENDFILE_READ_MIN`] or more
/// that is all data and all in the page cache, its header and a [`FileTail`], for the
/// connection to send with `sendfile`); a WRITE returns its status reply, written into `buf`,
/// its payload, once that is on disk (so the buffer goes back to the pool with the reply); the
/// others return an empty buffer, for [`reply`] to answer with a status.
pub fn work(
    export: Arc<Export>,
    req: Request,
    buf: IoBuf,
    framing: Framing,
    tails: bool,
) -> impl FnOnce() -> io::Result<IoBuf> + Send + 'static {
    move || {
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let done = match req.kind {
            CMD_READ => return read_reply(&export, &req, framing, buf.vec, tails),
            CMD_BLOCK_STATUS => {
                return block_status_reply(&export, &req, framing, MAX_EXTENTS).map(IoBuf::from);
            }
            CMD_WRITE => {
                export.write(buf.bytes(), req.offset, fua)?;
                return Ok(write_done(buf.vec, framing, &req));
            }
            CMD_FLUSH => export.flush(),
            CMD_TRIM => export.trim(req.offset, req.length, fua),
            CMD_CACHE => export.cache(req.offset, req.length),
            CMD_WRITE_ZEROES => {
                let no_hole = req.flags & CMD_FLAG_NO_HOLE != 0;
                let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
                export.write_zeroes(req.offset, req.length, no_hole, fast, fua)
            }
            _ => unreachable!("classify() admits only these commands"),
        };
        done.map(|()| IoBuf::default())
    }
}

/// A WRITE's status reply, once its payload is on disk, in the payload's buffer (which goes
/// back to the pool with the reply).
pub fn write_done(mut buf: Vec<u8>, framing: Framing, req: &Request) -> IoBuf {
    buf.clear();
    framing.status_reply(&mut buf, req, None);
    IoBuf::from(buf)
}

/// A READ's complete reply. With structured replies, a read of [`SPARSE_READ_MIN`] or more
/// without `NBD_CMD_FLAG_DF` sends its holes as `OFFSET_HOLE` chunks and its data as
/// `OFFSET_DATA` chunks, in order, the last one marked DONE (everything is read before the
/// reply goes out, so no error can follow it); otherwise the data goes in one piece, in a
/// simple reply or one DONE `OFFSET_DATA` chunk.
fn read_reply(
    export: &Export,
    req: &Request,
    framing: Framing,
    mut buf: Vec<u8>,
    tails: bool,
) -> io::Result<IoBuf> {
    // Admitted reads are at most MAX_PAYLOAD long.
    let len = req.length;
    let mut runs = if looks_for_holes(framing, req) {
        export.allocation(req.offset, len, MAX_READ_CHUNKS)?
    } else {
        Vec::new()
    };
    let covered: u64 = runs.iter().map(|r| r.len).sum();
    if covered < len {
        runs.push(Run {
            len: len - covered,
            hole: false,
        });
    }
    if let [only] = runs[..]
        && !only.hole
    {
        if tails && may_send_from_cache(export, req) {
            return Ok(tail_reply(export, req, framing, buf));
        }
        let prefix = framing.read_prefix();
        let mut out = read_buffer(buf, prefix, len as usize, export.align());
        let reply = &mut out.vec[out.start..];
        export.read_into(reply, prefix, req.offset)?;
        framing.write_read_prefix(reply, req, req.offset, len as u32);
        return Ok(out);
    }
    // Runs lie within the request, so each length fits the chunks' 32 bits.
    let (header, prefix) = (framing.chunk_header_len(), framing.read_prefix());
    let size = |r: &Run| {
        if r.hole {
            header + 12
        } else {
            prefix + r.len as usize
        }
    };
    fit(&mut buf, runs.iter().map(size).sum());
    let (mut at, mut pos) = (0, req.offset);
    for (i, run) in runs.iter().enumerate() {
        let flags = if i + 1 == runs.len() {
            REPLY_FLAG_DONE
        } else {
            0
        };
        let chunk = &mut buf[at..at + size(run)];
        chunk[header..prefix].copy_from_slice(&pos.to_be_bytes());
        if run.hole {
            framing.chunk_header(chunk, flags, REPLY_TYPE_OFFSET_HOLE, req, 12);
            chunk[prefix..].copy_from_slice(&(run.len as u32).to_be_bytes());
        } else {
            let kind = REPLY_TYPE_OFFSET_DATA;
            framing.chunk_header(chunk, flags, kind, req, run.len as u32 + 8);
            export.read_into(chunk, prefix, pos)?;
        }
        at += chunk.len();
        pos += run.len;
    }
    Ok(IoBuf::from(buf))
}

/// The smallest READ whose data may be sent from the page cache with `sendfile`: above
/// [`NOWAIT_READ_MAX`](crate::file_io::NOWAIT_READ_MAX), where copying the data costs more
/// than the trip to a worker saves.
pub const SENDFILE_READ_MIN: u64 = crate::file_io::NOWAIT_READ_MAX + 1;

/// Whether READ `req` may be answered with a [`FileTail`]: [`SENDFILE_READ_MIN`] bytes or
/// more, from an export that can be sent from ([`Export::sendfile`]), whose pages the page
/// cache holds now (so that `sendfile` will not wait for the disk, unless the kernel evicts
/// one meanwhile).
pub fn may_send_from_cache(export: &Export, req: &Request) -> bool {
    req.kind == CMD_READ
        && req.length >= SENDFILE_READ_MIN
        && export.sendfile
        && export.is_cached(req.offset, req.length)
}

/// The reply to READ `req` as its header alone, in `head`, and its data as a [`FileTail`]
/// (one simple reply, or one DONE `OFFSET_DATA` chunk).
pub fn tail_reply(export: &Export, req: &Request, framing: Framing, mut head: Vec<u8>) -> IoBuf {
    fit(&mut head, framing.read_prefix());
    // Admitted reads are at most MAX_PAYLOAD long.
    framing.write_read_prefix(&mut head, req, req.offset, req.length as u32);
    IoBuf {
        tail: Some(FileTail {
            file: export.file().clone(),
            offset: req.offset,
            len: req.length as usize,
        }),
        ..IoBuf::from(head)
    }
}

/// Whether a READ looks for holes, to send them as hole chunks: a structured read of
/// [`SPARSE_READ_MIN`] or more without `NBD_CMD_FLAG_DF`.
pub fn looks_for_holes(framing: Framing, req: &Request) -> bool {
    framing.chunked() && req.flags & CMD_FLAG_DF == 0 && req.length >= u64::from(SPARSE_READ_MIN)
}

/// Makes `buf` exactly `len` bytes long, zeroing only what it did not hold before.
pub fn fit(buf: &mut Vec<u8>, len: usize) {
    if buf.len() >= len {
        buf.truncate(len);
    } else {
        buf.resize(len, 0);
    }
}

/// A BLOCK_STATUS's complete reply: one DONE chunk for `base:allocation`, the only context,
/// with the runs of `[offset, offset + length)` as extents (a hole reads as zeros:
/// `HOLE | ZERO`; data: 0): a `BLOCK_STATUS` chunk of 32-bit extents, or with extended headers
/// a `BLOCK_STATUS_EXT` chunk of 64-bit ones (so a request of more than 4 GiB gets extents
/// that long). `NBD_CMD_FLAG_REQ_ONE` asks for the first extent alone; otherwise at most
/// `max_extents`, which then cover less than the request (the client asks again for the rest).
pub fn block_status_reply(
    export: &Export,
    req: &Request,
    framing: Framing,
    max_extents: usize,
) -> io::Result<Vec<u8>> {
    let max = if req.flags & CMD_FLAG_REQ_ONE != 0 {
        1
    } else {
        max_extents
    };
    let runs = export.allocation(req.offset, req.length, max)?;
    let extended = framing == Framing::Extended;
    let (kind, head, each) = if extended {
        (REPLY_TYPE_BLOCK_STATUS_EXT, 8, 16)
    } else {
        (REPLY_TYPE_BLOCK_STATUS, 4, 8)
    };
    let payload = head + each * runs.len();
    let mut buf = vec![0u8; framing.chunk_header_len()];
    // At most MAX_EXTENTS descriptors: the length fits.
    framing.chunk_header(&mut buf, REPLY_FLAG_DONE, kind, req, payload as u32);
    buf.reserve(payload);
    buf.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    if extended {
        buf.extend_from_slice(&(runs.len() as u32).to_be_bytes());
    }
    for run in runs {
        let flags = if run.hole { STATE_HOLE | STATE_ZERO } else { 0 };
        if extended {
            buf.extend_from_slice(&run.len.to_be_bytes());
            buf.extend_from_slice(&u64::from(flags).to_be_bytes());
        } else {
            // Compact requests are at most 32 bits long, and runs lie within them.
            buf.extend_from_slice(&(run.len as u32).to_be_bytes());
            buf.extend_from_slice(&flags.to_be_bytes());
        }
    }
    Ok(buf)
}

/// The complete reply to request `req` of connection `id` once the pool has run its
/// [`work`]: the reply the work built, or a status reply. A failure (of the file, or of the
/// pool: cancelled, panicked) is the server's problem, not the client's, so it is logged;
/// except the `ENOTSUP` a `NBD_CMD_FLAG_FAST_ZERO` asked for.
pub fn reply(framing: Framing, id: u64, req: &Request, result: io::Result<IoBuf>) -> IoBuf {
    match result {
        Ok(buf) if !buf.is_empty() => buf,
        Ok(_) => IoBuf::from(status(framing, req, None)),
        Err(e) => {
            let errno = errno_of(&e);
            if !(errno == ENOTSUP && req.flags & CMD_FLAG_FAST_ZERO != 0) {
                eprintln!("nbd-server: connection {id}: {req:?} failed: {e}");
            }
            let why = format!("{} failed: {e}", command_name(req.kind));
            IoBuf::from(status(framing, req, Some((errno, &why))))
        }
    }
}

/// A complete reply without data: success for `None`, else that NBD error and why
/// ([`Framing::status_reply`]).
pub fn status(framing: Framing, req: &Request, error: Option<(u32, &str)>) -> Vec<u8> {
    let mut out = Vec::new();
    framing.status_reply(&mut out, req, error);
    out
}

/// Where a connection is, for its one deadline (the handshake limit, the linger after a
/// violation or `NBD_CMD_DISC`, or the idle timeout).
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Closing after a violation or DISC: the deadline is the linger.
    pub closing: bool,
    pub transmission: bool,
    pub idle_timeout: Option<Duration>,
    pub in_flight: usize,
    /// When a byte last moved on the socket.
    pub last_active: Instant,
}

/// What a connection's passed deadline means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expired {
    /// Close the connection, with this line on stderr.
    Close(String),
    /// Not idle after all: arm the deadline again, this much later.
    Rearm(Duration),
    /// Nothing to do.
    Nothing,
}

/// The deadline of connection `id` passed; see [`Timing`].
pub fn expired(id: u64, t: Timing) -> Expired {
    let why = if t.closing {
        "last replies not taken in time".to_owned()
    } else if !t.transmission {
        "handshake not finished in time".to_owned()
    } else if let Some(limit) = t.idle_timeout {
        let idle = t.last_active.elapsed();
        if t.in_flight > 0 {
            // Requests on the pool are the server's own slowness, not the client's.
            return Expired::Rearm(limit);
        }
        if idle < limit {
            return Expired::Rearm(limit - idle);
        }
        format!("idle for {} s (--idle-timeout)", limit.as_secs_f64())
    } else {
        return Expired::Nothing;
    };
    Expired::Close(format!("nbd-server: connection {id}: {why}, closing"))
}
