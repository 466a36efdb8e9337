//! What both connection engines (`connection.rs`, callbacks; `conn_task.rs`, one task per
//! connection) decide the same way: the limits of a connection, the answers to the client flags
//! and to every option, the checks and the meaning of a request, the work a request runs on the
//! thread pool and the reply it gets, flow control, and what a connection's deadline means
//! when it passes. Nothing here touches a socket or a context: an engine reads and writes,
//! these functions say what the bytes mean and what goes back.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::export::Export;
use crate::protocol::*;

/// Requests a connection may have on the thread pool before its socket stops being read.
pub const MAX_IN_FLIGHT: usize = 128;
/// Bytes of read and write payload in flight plus replies not yet sent, above which the
/// socket stops being read. One request of up to [`MAX_PAYLOAD`] is always admitted.
pub const MAX_PENDING_BYTES: usize = 64 << 20;
/// Replies waiting to be sent, above which no further request or option is acted on.
pub const MAX_BACKLOG: usize = 16 << 20;
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

/// Whether flow control holds back further requests (and options): `in_flight` requests on the
/// pool with `pending_bytes` of payload, and `backlog` bytes of replies not yet sent. One
/// request is always admitted when nothing is in flight and nothing waits to be sent.
pub fn is_full(in_flight: usize, pending_bytes: usize, backlog: usize) -> bool {
    in_flight >= MAX_IN_FLIGHT
        || backlog >= MAX_BACKLOG
        || (in_flight > 0 && pending_bytes + backlog >= MAX_PENDING_BYTES)
}

/// The payload bytes a request holds while it is in flight (its data, either way).
pub fn payload_bytes(req: &Request) -> usize {
    if matches!(req.kind, CMD_READ | CMD_WRITE) {
        req.length as usize
    } else {
        0
    }
}

/// What the handshake has settled so far.
#[derive(Clone, Copy, Debug)]
pub struct Handshake {
    pub framing: Framing,
    pub no_zeroes: bool,
}

impl Default for Handshake {
    fn default() -> Handshake {
        Handshake {
            framing: Framing::Simple,
            no_zeroes: false,
        }
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
            out.extend_from_slice(&export.transmission_flags().to_be_bytes());
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
                info.extend_from_slice(&export.transmission_flags().to_be_bytes());
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
        OPT_STRUCTURED_REPLY if !data.is_empty() => {
            let msg = b"NBD_OPT_STRUCTURED_REPLY takes no data";
            option_reply(out, option, REP_ERR_INVALID, msg);
        }
        OPT_STRUCTURED_REPLY => {
            hs.framing = Framing::Structured;
            option_reply(out, option, REP_ACK, &[]);
        }
        OPT_SET_META_CONTEXT if hs.framing != Framing::Structured => {
            let msg = b"meta contexts need structured replies";
            option_reply(out, option, REP_ERR_INVALID, msg);
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => match parse_meta_request(data) {
            None => option_reply(out, option, REP_ERR_INVALID, b"malformed request"),
            Some(name) if name != export.name.as_bytes() => {
                option_reply(out, option, REP_ERR_UNKNOWN, b"no such export");
            }
            // We offer no metadata context (no block status), so whatever was asked for,
            // the answer is the empty list.
            Some(_) => option_reply(out, option, REP_ACK, &[]),
        },
        _ => option_reply(out, option, REP_ERR_UNSUP, b"option not supported"),
    }
    Opted::Continue
}

/// The log line of a connection entering the transmission phase.
pub fn transmission_log(framing: Framing) -> String {
    format!(
        "transmission phase, {} replies",
        match framing {
            Framing::Simple => "simple",
            Framing::Structured => "structured",
        }
    )
}

/// What a request header asks of the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `NBD_CMD_DISC`: read nothing more; close once the replies owed are out.
    Disconnect,
    /// Refused with this NBD error, answered once `discard` payload bytes have been read and
    /// dropped (whatever their number: they stream through, even over [`MAX_PAYLOAD`]).
    Refuse { errno: u32, discard: u64 },
    /// A read of nothing: answered at once with success (a structured reply may not carry an
    /// empty data chunk).
    Empty,
    /// A valid request for the pool; a WRITE's payload (`length` bytes) follows the header.
    Run,
}

/// What to do with request `req` on `export`.
pub fn classify(export: &Export, req: &Request) -> Action {
    if req.kind == CMD_DISC {
        return Action::Disconnect;
    }
    if let Err(errno) = check(export, req) {
        let discard = if req.kind == CMD_WRITE {
            u64::from(req.length)
        } else {
            0
        };
        return Action::Refuse { errno, discard };
    }
    if req.kind == CMD_READ && req.length == 0 {
        return Action::Empty;
    }
    Action::Run
}

/// Validates a request against the export; `Err` carries the NBD error to reply with.
fn check(export: &Export, req: &Request) -> Result<(), u32> {
    // NO_HOLE means something only to WRITE_ZEROES; the protocol asks for EINVAL elsewhere.
    let flags = match req.kind {
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => CMD_FLAG_FUA,
    };
    if req.flags & !flags != 0 {
        return Err(EINVAL);
    }
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && export.read_only {
        return Err(EPERM);
    }
    let in_range = req
        .offset
        .checked_add(u64::from(req.length))
        .is_some_and(|end| end <= export.size);
    match req.kind {
        CMD_READ | CMD_WRITE if req.length > MAX_PAYLOAD => Err(EINVAL),
        CMD_READ | CMD_TRIM if !in_range => Err(EINVAL),
        CMD_WRITE | CMD_WRITE_ZEROES if !in_range => Err(ENOSPC),
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_FLUSH => Ok(()),
        _ => Err(EINVAL),
    }
}

/// The blocking work of a request [`classify`] admitted, for the thread pool: a READ returns
/// its reply buffer with `prefix` bytes left in front of the data for the reply header (see
/// [`reply`]); the others return an empty buffer. `data` is a WRITE's payload.
pub fn work(
    export: Arc<Export>,
    req: Request,
    data: Option<Vec<u8>>,
    prefix: usize,
) -> impl FnOnce() -> io::Result<Vec<u8>> + Send + 'static {
    move || {
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let done = match req.kind {
            CMD_READ => {
                let mut buf = vec![0u8; prefix + req.length as usize];
                export.read_into(&mut buf, prefix, req.offset)?;
                return Ok(buf);
            }
            CMD_WRITE => export.write(&data.unwrap_or_default(), req.offset, fua),
            CMD_FLUSH => export.flush(),
            CMD_TRIM => export.trim(req.offset, req.length, fua),
            CMD_WRITE_ZEROES => {
                let no_hole = req.flags & CMD_FLAG_NO_HOLE != 0;
                export.write_zeroes(req.offset, req.length, no_hole, fua)
            }
            _ => unreachable!("classify() admits only these commands"),
        };
        done.map(|()| Vec::new())
    }
}

/// The complete reply to request `req` of connection `id` once the pool has run its
/// [`work`]: a READ's buffer with its header filled in (no copy), or a status reply. A
/// failure (of the file, or of the pool: cancelled, panicked) is the server's problem, not
/// the client's, so it is always logged.
pub fn reply(
    framing: Framing,
    id: u64,
    req: &Request,
    result: Result<io::Result<Vec<u8>>, aio::threadpool::Error>,
) -> Vec<u8> {
    let result =
        result.unwrap_or_else(|_| Err(io::Error::other("the thread pool did not run the request")));
    match result {
        Ok(mut buf) if req.kind == CMD_READ => {
            framing.write_read_prefix(&mut buf, req.cookie, req.offset, req.length);
            buf
        }
        Ok(_) => status(framing, req.cookie, 0),
        Err(e) => {
            eprintln!("nbd-server: connection {id}: {req:?} failed: {e}");
            status(framing, req.cookie, errno_of(&e))
        }
    }
}

/// A complete reply without data: success when `errno` is 0, else that NBD error.
pub fn status(framing: Framing, cookie: u64, errno: u32) -> Vec<u8> {
    let mut out = Vec::new();
    framing.status_reply(&mut out, cookie, errno);
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
