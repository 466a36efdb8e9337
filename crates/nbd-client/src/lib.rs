//! A small NBD client for the nbd-server tests, written from the NBD protocol specification
//! (fixed newstyle handshake, simple and structured replies, metadata contexts and block
//! status, and the extended headers extension) with its own constants.
//!
//! It deliberately shares nothing with the server under test: an independent reading of the spec
//! is what catches the server's mistakes. Two layers:
//!
//! - [`Conn`], the raw layer, sends whatever bytes a test wants (options, request headers with
//!   any fields, garbage) and reads one message at a time, checking only framing. It can also
//!   tell that the server closed the connection, within a timeout.
//! - [`Client`], the high-level layer, performs the whole handshake ([`Handshake`]), then offers
//!   `read`/`write`/`flush`/`trim`/`write_zeroes`/`disconnect` and pipelining (send many requests,
//!   collect the replies by cookie in whatever order they come). It validates every reply
//!   strictly: unknown cookies, a structured read that does not cover its range exactly, or a
//!   simple reply to a read once structured replies are on are all `InvalidData` errors. An NBD
//!   error becomes `io::Error::from_raw_os_error(errno)`: the spec fixes NBD's error values to
//!   Linux's errno values.
//!
//! Every socket gets a read and write timeout ([`IO_TIMEOUT`]), so a server that stops answering
//! fails a test instead of hanging it.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// `"NBDMAGIC"`, the first eight bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `"IHAVEOPT"`: in the greeting (fixed newstyle) and in front of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Starts every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Starts every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Starts a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Starts a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Start every request, and every reply chunk, once extended headers are negotiated.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Sizes of the fixed-length messages, in bytes.
pub const GREETING_LEN: usize = 18;
pub const OPTION_HEADER_LEN: usize = 16;
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const CHUNK_HEADER_LEN: usize = 20;
pub const EXTENDED_REQUEST_LEN: usize = 32;
pub const EXTENDED_CHUNK_HEADER_LEN: usize = 32;
/// The zero padding after an `NBD_OPT_EXPORT_NAME` answer unless `NO_ZEROES` was agreed.
pub const EXPORT_NAME_PADDING: usize = 124;

/// How long any single read or write on a test connection may block.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshake flags (server, u16) and client flags (u32): the same two bits.
pub mod handshake {
    pub const FIXED_NEWSTYLE: u16 = 1;
    pub const NO_ZEROES: u16 = 2;
}

/// Option numbers.
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types. Errors have bit 31 set. The whole table the tests need is here, even
/// the entries no test happens to name.
#[allow(dead_code)]
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    pub const ERR_BIT: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERR_BIT + 1;
    pub const ERR_POLICY: u32 = ERR_BIT + 2;
    pub const ERR_INVALID: u32 = ERR_BIT + 3;
    pub const ERR_UNKNOWN: u32 = ERR_BIT + 6;
    pub const ERR_TOO_BIG: u32 = ERR_BIT + 9;
    pub const ERR_EXT_HEADER_REQD: u32 = ERR_BIT + 10;
}

/// Information types in `NBD_REP_INFO` replies and `NBD_OPT_INFO`/`GO` requests.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags, sent with the export's size.
pub mod tx_flag {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command types.
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cmd_flag {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk flags and types.
pub mod chunk {
    pub const FLAG_DONE: u16 = 1;
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const BLOCK_STATUS_EXT: u16 = 6;
    pub const ERROR: u16 = 32769;
    pub const ERROR_OFFSET: u16 = 32770;
}

/// The status flags of the `base:allocation` metadata context.
pub mod state {
    pub const HOLE: u32 = 1 << 0;
    pub const ZERO: u32 = 1 << 1;
}

/// The one metadata context the spec defines.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// NBD error values (the spec makes them equal to Linux's errno values).
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

// ---------------------------------------------------------------------------------------------
// Encoding and decoding, as pure functions so the unit tests can check them byte by byte.
// ---------------------------------------------------------------------------------------------

/// A protocol violation by the peer.
fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// The `io::Error` for an NBD error value.
pub fn nbd_error(errno: u32) -> io::Error {
    io::Error::from_raw_os_error(errno as i32)
}

/// The errno of an error produced by [`nbd_error`], if it is one.
pub fn errno_of(err: &io::Error) -> Option<u32> {
    err.raw_os_error().map(|e| e as u32)
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().unwrap())
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// The server's greeting: both magics checked, the handshake flags returned.
pub fn decode_greeting(b: &[u8; GREETING_LEN]) -> io::Result<u16> {
    if be_u64(b, 0) != NBD_MAGIC {
        return Err(invalid(format!(
            "greeting: bad NBDMAGIC {:#x}",
            be_u64(b, 0)
        )));
    }
    if be_u64(b, 8) != IHAVEOPT {
        return Err(invalid(format!(
            "greeting: not fixed newstyle (IHAVEOPT expected, got {:#x})",
            be_u64(b, 8)
        )));
    }
    Ok(be_u16(b, 16))
}

/// One option as the client sends it: `IHAVEOPT`, option, data length, data.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// The data of `NBD_OPT_INFO`/`NBD_OPT_GO`: name length, name, number of requests, requests.
pub fn encode_info_request(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        out.extend_from_slice(&r.to_be_bytes());
    }
    out
}

/// The header of an option reply: magic checked, `(option, reply type, data length)` returned.
pub fn decode_option_reply_header(
    b: &[u8; OPTION_REPLY_HEADER_LEN],
) -> io::Result<(u32, u32, u32)> {
    if be_u64(b, 0) != OPTION_REPLY_MAGIC {
        return Err(invalid(format!(
            "option reply: bad magic {:#x}",
            be_u64(b, 0)
        )));
    }
    Ok((be_u32(b, 8), be_u32(b, 12), be_u32(b, 16)))
}

/// The block size constraints of `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub min: u32,
    pub preferred: u32,
    pub max: u32,
}

/// The payload of one `NBD_REP_INFO` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export { size: u64, flags: u16 },
    BlockSize(BlockSize),
    Other { kind: u16, data: Vec<u8> },
}

/// Decodes an `NBD_REP_INFO` payload; the known types must have exactly their spec length.
pub fn decode_info(data: &[u8]) -> io::Result<Info> {
    if data.len() < 2 {
        return Err(invalid(format!(
            "NBD_REP_INFO: {} bytes, no type",
            data.len()
        )));
    }
    let kind = be_u16(data, 0);
    let want = match kind {
        info::EXPORT => 12,
        info::BLOCK_SIZE => 14,
        _ => {
            return Ok(Info::Other {
                kind,
                data: data[2..].to_vec(),
            });
        }
    };
    if data.len() != want {
        return Err(invalid(format!(
            "NBD_REP_INFO type {kind}: {} bytes, expected {want}",
            data.len()
        )));
    }
    Ok(match kind {
        info::EXPORT => Info::Export {
            size: be_u64(data, 2),
            flags: be_u16(data, 10),
        },
        _ => Info::BlockSize(BlockSize {
            min: be_u32(data, 2),
            preferred: be_u32(data, 6),
            max: be_u32(data, 10),
        }),
    })
}

/// Decodes an `NBD_REP_SERVER` payload (name length, name, then an optional description).
pub fn decode_server_reply(data: &[u8]) -> io::Result<String> {
    if data.len() < 4 {
        return Err(invalid("NBD_REP_SERVER shorter than its name length"));
    }
    let len = be_u32(data, 0) as usize;
    let name = data
        .get(4..4 + len)
        .ok_or_else(|| invalid("NBD_REP_SERVER name runs past the reply"))?;
    String::from_utf8(name.to_vec()).map_err(|_| invalid("NBD_REP_SERVER name is not UTF-8"))
}

/// The data of `NBD_OPT_LIST_META_CONTEXT`/`NBD_OPT_SET_META_CONTEXT`: name length, name,
/// number of queries, then each query as length and string.
pub fn encode_meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        out.extend_from_slice(&(q.len() as u32).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
    out
}

/// Decodes an `NBD_REP_META_CONTEXT` payload: the context id, then its name (UTF-8, the rest).
pub fn decode_meta_context(data: &[u8]) -> io::Result<(u32, String)> {
    if data.len() < 5 {
        return Err(invalid(format!(
            "NBD_REP_META_CONTEXT of {} bytes: no id and name",
            data.len()
        )));
    }
    let name = String::from_utf8(data[4..].to_vec())
        .map_err(|_| invalid("NBD_REP_META_CONTEXT name is not UTF-8"))?;
    Ok((be_u32(data, 0), name))
}

/// One block status descriptor: `len` bytes with status `flags` (for `base:allocation`, the
/// [`state`] bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub flags: u32,
}

/// Decodes an `NBD_REPLY_TYPE_BLOCK_STATUS` payload: the context id and at least one
/// descriptor, each of nonzero length.
pub fn decode_block_status(payload: &[u8]) -> io::Result<(u32, Vec<Extent>)> {
    if payload.len() < 12 || !(payload.len() - 4).is_multiple_of(8) {
        return Err(invalid(format!(
            "BLOCK_STATUS chunk of {} bytes (must be 4 + 8n, n >= 1)",
            payload.len()
        )));
    }
    let extents: Vec<Extent> = payload[4..]
        .chunks_exact(8)
        .map(|d| Extent {
            len: u64::from(be_u32(d, 0)),
            flags: be_u32(d, 4),
        })
        .collect();
    if extents.iter().any(|e| e.len == 0) {
        return Err(invalid(format!(
            "BLOCK_STATUS extent of length 0: {extents:?}"
        )));
    }
    Ok((be_u32(payload, 0), extents))
}

/// Decodes an `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` payload: the context id, the descriptor count
/// (which must match), and at least one descriptor of 64-bit length and status, each of
/// nonzero length; `base:allocation` statuses fit in 32 bits.
pub fn decode_block_status_ext(payload: &[u8]) -> io::Result<(u32, Vec<Extent>)> {
    if payload.len() < 24 || !(payload.len() - 8).is_multiple_of(16) {
        return Err(invalid(format!(
            "BLOCK_STATUS_EXT chunk of {} bytes (must be 8 + 16n, n >= 1)",
            payload.len()
        )));
    }
    let count = be_u32(payload, 4) as usize;
    let mut extents = Vec::new();
    for d in payload[8..].chunks_exact(16) {
        let (len, flags) = (be_u64(d, 0), be_u64(d, 8));
        let flags = u32::try_from(flags)
            .map_err(|_| invalid(format!("BLOCK_STATUS_EXT status {flags:#x} over 32 bits")))?;
        extents.push(Extent { len, flags });
    }
    if count != extents.len() || extents.iter().any(|e| e.len == 0) {
        return Err(invalid(format!(
            "BLOCK_STATUS_EXT with count {count} and extents {extents:?}"
        )));
    }
    Ok((be_u32(payload, 0), extents))
}

/// A transmission request header, with every field free so tests can send bad ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub magic: u32,
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// A well-formed request header.
    pub fn new(kind: u16, cookie: u64, offset: u64, length: u32) -> Request {
        Request {
            magic: REQUEST_MAGIC,
            flags: 0,
            kind,
            cookie,
            offset,
            length,
        }
    }

    pub fn with_flags(mut self, flags: u16) -> Request {
        self.flags = flags;
        self
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&self.magic.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// An extended request header: 64-bit length, `NBD_EXTENDED_REQUEST_MAGIC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtRequest {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

impl ExtRequest {
    pub fn encode(&self) -> [u8; EXTENDED_REQUEST_LEN] {
        let mut b = [0u8; EXTENDED_REQUEST_LEN];
        b[0..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..32].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// A structured reply chunk header: `(flags, type, cookie, payload length)` after the magic.
pub fn decode_chunk_header_rest(b: &[u8; CHUNK_HEADER_LEN - 4]) -> (u16, u16, u64, u32) {
    (be_u16(b, 0), be_u16(b, 2), be_u64(b, 4), be_u32(b, 12))
}

/// A simple reply header after the magic: `(error, cookie)`.
pub fn decode_simple_reply_rest(b: &[u8; SIMPLE_REPLY_LEN - 4]) -> (u32, u64) {
    (be_u32(b, 0), be_u64(b, 4))
}

/// The payload of an `NBD_REPLY_TYPE_ERROR`/`ERROR_OFFSET` chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkError {
    pub errno: u32,
    pub message: String,
    pub offset: Option<u64>,
}

/// Decodes an error chunk's payload; `with_offset` for `ERROR_OFFSET`.
pub fn decode_error_chunk(payload: &[u8], with_offset: bool) -> io::Result<ChunkError> {
    if payload.len() < 6 {
        return Err(invalid(format!("error chunk: {} bytes", payload.len())));
    }
    let msg_len = be_u16(payload, 4) as usize;
    let want = 6 + msg_len + if with_offset { 8 } else { 0 };
    if payload.len() != want {
        return Err(invalid(format!(
            "error chunk: {} bytes, message length {msg_len} says {want}",
            payload.len()
        )));
    }
    Ok(ChunkError {
        errno: be_u32(payload, 0),
        message: String::from_utf8_lossy(&payload[6..6 + msg_len]).into_owned(),
        offset: with_offset.then(|| be_u64(payload, 6 + msg_len)),
    })
}

// ---------------------------------------------------------------------------------------------
// The raw layer.
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
        }
    }

    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(on),
            Stream::Tcp(s) => s.set_nonblocking(on),
        }
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

/// One structured reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    /// The request's offset, which an extended chunk's header repeats (`None`: structured).
    pub offset: Option<u64>,
    pub payload: Vec<u8>,
}

impl Chunk {
    pub fn is_done(&self) -> bool {
        self.flags & chunk::FLAG_DONE != 0
    }
}

/// One reply in the transmission phase, as framed on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawReply {
    Simple {
        error: u32,
        cookie: u64,
        data: Vec<u8>,
    },
    Chunk(Chunk),
}

/// A raw connection: bytes in, bytes out, one message at a time.
#[derive(Debug)]
pub struct Conn {
    stream: Stream,
}

impl Conn {
    pub fn connect_unix(path: impl AsRef<Path>) -> io::Result<Conn> {
        Conn::new(Stream::Unix(UnixStream::connect(path)?))
    }

    pub fn connect_tcp(addr: impl ToSocketAddrs) -> io::Result<Conn> {
        let s = TcpStream::connect(addr)?;
        // Requests are small and latency matters more than batching in tests.
        s.set_nodelay(true)?;
        Conn::new(Stream::Tcp(s))
    }

    /// Wraps one end of a socket pair (the unit tests play the server on the other end).
    pub fn from_unix(stream: UnixStream) -> io::Result<Conn> {
        Conn::new(Stream::Unix(stream))
    }

    fn new(stream: Stream) -> io::Result<Conn> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Conn { stream })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.stream.raw_fd()
    }

    /// Another `Conn` on the same socket (a duplicated fd), so that one thread can read the
    /// replies while another sends requests. The socket's read and write timeouts are set
    /// again, to [`IO_TIMEOUT`], for both (they belong to the socket, not to the fd).
    pub fn try_clone(&self) -> io::Result<Conn> {
        Conn::new(match &self.stream {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.stream.set_nonblocking(on)
    }

    /// Sends `bytes` as they are.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Writes what the socket takes without blocking, returning how much that was.
    pub fn send_some(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.stream.write(bytes)
    }

    /// Reads exactly `n` bytes.
    pub fn recv_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        self.stream.read_exact(&mut buf)?;
        Ok(buf)
    }

    fn recv_array<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.stream.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// Reads the greeting and returns the handshake flags.
    pub fn read_greeting(&mut self) -> io::Result<u16> {
        decode_greeting(&self.recv_array()?)
    }

    pub fn send_client_flags(&mut self, flags: u32) -> io::Result<()> {
        self.send(&flags.to_be_bytes())
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        self.send(&encode_option(option, data))
    }

    pub fn read_option_reply(&mut self) -> io::Result<OptionReply> {
        let (option, kind, len) = decode_option_reply_header(&self.recv_array()?)?;
        let data = self.recv_exact(len as usize)?;
        Ok(OptionReply { option, kind, data })
    }

    /// Sends `option` and reads one reply, which must answer that option.
    pub fn option(&mut self, option: u32, data: &[u8]) -> io::Result<OptionReply> {
        self.send_option(option, data)?;
        let reply = self.read_option_reply()?;
        if reply.option != option {
            return Err(invalid(format!(
                "reply to option {option} names option {}",
                reply.option
            )));
        }
        Ok(reply)
    }

    /// Sends an extended request header followed by `payload`.
    pub fn send_ext_request(&mut self, req: &ExtRequest, payload: &[u8]) -> io::Result<()> {
        let mut msg = Vec::with_capacity(EXTENDED_REQUEST_LEN + payload.len());
        msg.extend_from_slice(&req.encode());
        msg.extend_from_slice(payload);
        self.send(&msg)
    }

    /// Sends a request header followed by `payload` (which need not match `req.length`).
    pub fn send_request(&mut self, req: &Request, payload: &[u8]) -> io::Result<()> {
        let mut msg = Vec::with_capacity(REQUEST_LEN + payload.len());
        msg.extend_from_slice(&req.encode());
        msg.extend_from_slice(payload);
        self.send(&msg)
    }

    /// Reads one reply of either kind. A simple reply's data length is not on the wire: the
    /// caller says it from the cookie and the error field.
    pub fn read_reply(
        &mut self,
        data_len: impl FnOnce(u64, u32) -> io::Result<usize>,
    ) -> io::Result<RawReply> {
        let magic = u32::from_be_bytes(self.recv_array()?);
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let (error, cookie) = decode_simple_reply_rest(&self.recv_array()?);
                let n = data_len(cookie, error)?;
                let data = self.recv_exact(n)?;
                Ok(RawReply::Simple {
                    error,
                    cookie,
                    data,
                })
            }
            STRUCTURED_REPLY_MAGIC => {
                let (flags, kind, cookie, len) = decode_chunk_header_rest(&self.recv_array()?);
                let payload = self.recv_exact(len as usize)?;
                Ok(RawReply::Chunk(Chunk {
                    flags,
                    kind,
                    cookie,
                    offset: None,
                    payload,
                }))
            }
            EXTENDED_REPLY_MAGIC => {
                let b: [u8; EXTENDED_CHUNK_HEADER_LEN - 4] = self.recv_array()?;
                let (flags, kind, cookie) = (be_u16(&b, 0), be_u16(&b, 2), be_u64(&b, 4));
                let (offset, len) = (be_u64(&b, 12), be_u64(&b, 20));
                // Payloads are at most 32 MiB and a few headers (the block size constraints).
                if len > 64 << 20 {
                    return Err(invalid(format!("extended chunk of {len} bytes")));
                }
                let payload = self.recv_exact(len as usize)?;
                Ok(RawReply::Chunk(Chunk {
                    flags,
                    kind,
                    cookie,
                    offset: Some(offset),
                    payload,
                }))
            }
            other => Err(invalid(format!("reply: bad magic {other:#x}"))),
        }
    }

    /// Reads one simple reply carrying `data_len` bytes of data if it reports success.
    pub fn read_simple_reply(&mut self, data_len: usize) -> io::Result<(u32, u64, Vec<u8>)> {
        match self.read_reply(|_, error| Ok(if error == 0 { data_len } else { 0 }))? {
            RawReply::Simple {
                error,
                cookie,
                data,
            } => Ok((error, cookie, data)),
            RawReply::Chunk(c) => Err(invalid(format!("expected a simple reply, got {c:?}"))),
        }
    }

    /// Reads one structured reply chunk.
    pub fn read_chunk(&mut self) -> io::Result<Chunk> {
        match self.read_reply(|_, _| Err(invalid("expected a structured reply chunk")))? {
            RawReply::Chunk(c) => Ok(c),
            RawReply::Simple { .. } => Err(invalid("expected a structured reply chunk")),
        }
    }

    /// Reads up to `n` bytes, stopping early at end of file, on a reset or when `within` has
    /// passed; returns what arrived.
    pub fn recv_up_to(&mut self, n: usize, within: Duration) -> io::Result<Vec<u8>> {
        let deadline = Instant::now() + within;
        let mut got = vec![0u8; n];
        let mut filled = 0;
        while filled < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut got[filled..]) {
                Ok(0) => break,
                Ok(k) => filled += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    break;
                }
                Err(e) => {
                    self.stream.set_read_timeout(Some(IO_TIMEOUT))?;
                    return Err(e);
                }
            }
        }
        self.stream.set_read_timeout(Some(IO_TIMEOUT))?;
        got.truncate(filled);
        Ok(got)
    }

    /// Half-closes the connection: the server sees end of file, the client can still read.
    pub fn shutdown_write(&self) -> io::Result<()> {
        match &self.stream {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
        }
    }

    /// Waits up to `within` for the server to close the connection and returns whatever it sent
    /// before closing. A reset counts as closed. Fails with `TimedOut` if the connection is
    /// still open after `within`.
    pub fn expect_closed(&mut self, within: Duration) -> io::Result<Vec<u8>> {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let result = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "server kept the connection open for {within:?} ({} bytes received)",
                        got.len()
                    ),
                ));
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut buf) {
                Ok(0) => break Ok(got),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break Ok(got),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => break Err(e),
            }
        };
        self.stream.set_read_timeout(Some(IO_TIMEOUT))?;
        result
    }
}

// ---------------------------------------------------------------------------------------------
// The high-level layer.
// ---------------------------------------------------------------------------------------------

/// Handshake settings; `Client::connect_*` use the defaults (`NBD_OPT_GO`, simple replies, block
/// sizes requested).
#[derive(Debug, Clone)]
pub struct Handshake {
    name: String,
    structured: bool,
    export_name_option: bool,
    request_block_size: bool,
    meta_queries: Vec<String>,
    extended: bool,
}

impl Handshake {
    pub fn new(name: &str) -> Handshake {
        Handshake {
            name: name.to_owned(),
            structured: false,
            export_name_option: false,
            request_block_size: true,
            meta_queries: Vec::new(),
            extended: false,
        }
    }

    /// Negotiates extended headers (`NBD_OPT_EXTENDED_HEADERS`, instead of structured
    /// replies): 32-byte requests with 64-bit lengths, and only extended reply chunks.
    pub fn extended_headers(mut self) -> Handshake {
        self.extended = true;
        self
    }

    /// Negotiates structured replies, then selects metadata contexts with
    /// `NBD_OPT_SET_META_CONTEXT` and these queries (the contexts the server selects are
    /// [`Client::contexts`]).
    pub fn meta_contexts(mut self, queries: &[&str]) -> Handshake {
        self.structured = true;
        self.meta_queries = queries.iter().map(|q| q.to_string()).collect();
        self
    }

    /// Negotiates structured replies (`NBD_OPT_STRUCTURED_REPLY`) before entering transmission.
    pub fn structured_replies(mut self) -> Handshake {
        self.structured = true;
        self
    }

    /// Enters transmission with the old `NBD_OPT_EXPORT_NAME` instead of `NBD_OPT_GO`.
    pub fn export_name_option(mut self) -> Handshake {
        self.export_name_option = true;
        self
    }

    /// Does not ask for `NBD_INFO_BLOCK_SIZE` in `NBD_OPT_GO`.
    pub fn without_block_size(mut self) -> Handshake {
        self.request_block_size = false;
        self
    }

    pub fn connect_unix(self, path: impl AsRef<Path>) -> io::Result<Client> {
        self.run(Conn::connect_unix(path)?)
    }

    pub fn connect_tcp(self, addr: impl ToSocketAddrs) -> io::Result<Client> {
        self.run(Conn::connect_tcp(addr)?)
    }

    /// Performs the handshake on a fresh connection.
    pub fn run(self, mut conn: Conn) -> io::Result<Client> {
        let server_flags = conn.read_greeting()?;
        if server_flags & handshake::FIXED_NEWSTYLE == 0 {
            return Err(invalid("server does not offer fixed newstyle"));
        }
        let no_zeroes = server_flags & handshake::NO_ZEROES != 0;
        let mut client_flags = u32::from(handshake::FIXED_NEWSTYLE);
        if no_zeroes {
            client_flags |= u32::from(handshake::NO_ZEROES);
        }
        conn.send_client_flags(client_flags)?;
        self.finish(conn, no_zeroes)
    }

    /// Performs the rest of the handshake on a connection that has read the greeting and sent
    /// the client flags `FIXED_NEWSTYLE | NO_ZEROES` (and perhaps sent options of its own).
    pub fn run_after_greeting(self, conn: Conn) -> io::Result<Client> {
        self.finish(conn, true)
    }

    fn finish(self, mut conn: Conn, no_zeroes: bool) -> io::Result<Client> {
        if self.extended {
            let reply = conn.option(opt::EXTENDED_HEADERS, &[])?;
            if reply.kind != rep::ACK || !reply.data.is_empty() {
                return Err(option_error("NBD_OPT_EXTENDED_HEADERS", &reply));
            }
        } else if self.structured {
            let reply = conn.option(opt::STRUCTURED_REPLY, &[])?;
            if reply.kind != rep::ACK || !reply.data.is_empty() {
                return Err(option_error("NBD_OPT_STRUCTURED_REPLY", &reply));
            }
        }
        let mut contexts = Vec::new();
        if !self.meta_queries.is_empty() {
            let queries: Vec<&str> = self.meta_queries.iter().map(String::as_str).collect();
            contexts = set_meta_context(&mut conn, &self.name, &queries)?;
        }

        let (size, flags, block_size) = if self.export_name_option {
            conn.send_option(opt::EXPORT_NAME, self.name.as_bytes())?;
            let b: [u8; 10] = conn.recv_array()?;
            if !no_zeroes {
                let pad = conn.recv_exact(EXPORT_NAME_PADDING)?;
                if pad.iter().any(|&x| x != 0) {
                    return Err(invalid("NBD_OPT_EXPORT_NAME padding is not zero"));
                }
            }
            (be_u64(&b, 0), be_u16(&b, 8), None)
        } else {
            let requests: &[u16] = if self.request_block_size {
                &[info::BLOCK_SIZE]
            } else {
                &[]
            };
            let (size, flags, block_size) = go_or_info(&mut conn, opt::GO, &self.name, requests)?;
            (size, flags, block_size)
        };

        Ok(Client {
            conn,
            size,
            flags,
            block_size,
            structured: self.structured || self.extended,
            extended: self.extended,
            contexts,
            next_cookie: FIRST_COOKIE,
            pending: HashMap::new(),
        })
    }
}

/// Sends `NBD_OPT_INFO` or `NBD_OPT_GO` and reads the replies up to the final `ACK`, checking
/// that exactly one `NBD_INFO_EXPORT` came. Returns `(size, transmission flags, block sizes)`.
pub fn go_or_info(
    conn: &mut Conn,
    option: u32,
    name: &str,
    requests: &[u16],
) -> io::Result<(u64, u16, Option<BlockSize>)> {
    conn.send_option(option, &encode_info_request(name, requests))?;
    let mut export = None;
    let mut block_size = None;
    loop {
        let reply = conn.read_option_reply()?;
        if reply.option != option {
            return Err(invalid(format!(
                "reply to option {option} names option {}",
                reply.option
            )));
        }
        match reply.kind {
            rep::INFO => match decode_info(&reply.data)? {
                Info::Export { size, flags } => {
                    if export.replace((size, flags)).is_some() {
                        return Err(invalid("two NBD_INFO_EXPORT replies"));
                    }
                }
                Info::BlockSize(b) => block_size = Some(b),
                // The spec lets servers send information nobody asked for; clients ignore it.
                Info::Other { .. } => {}
            },
            rep::ACK => {
                if !reply.data.is_empty() {
                    return Err(invalid("NBD_REP_ACK with data"));
                }
                let (size, flags) =
                    export.ok_or_else(|| invalid("ACK without an NBD_INFO_EXPORT before it"))?;
                return Ok((size, flags, block_size));
            }
            _ => return Err(option_error("NBD_OPT_GO/INFO", &reply)),
        }
    }
}

/// Sends `NBD_OPT_SET_META_CONTEXT` with `queries` for export `name` and reads the contexts
/// selected up to the final `ACK`: each must be one asked for, by name, under an id of its own.
pub fn set_meta_context(
    conn: &mut Conn,
    name: &str,
    queries: &[&str],
) -> io::Result<Vec<(u32, String)>> {
    let option = opt::SET_META_CONTEXT;
    conn.send_option(option, &encode_meta_request(name, queries))?;
    let mut contexts: Vec<(u32, String)> = Vec::new();
    loop {
        let reply = conn.read_option_reply()?;
        if reply.option != option {
            return Err(invalid(format!(
                "reply to option {option} names option {}",
                reply.option
            )));
        }
        match reply.kind {
            rep::META_CONTEXT => {
                let (id, context) = decode_meta_context(&reply.data)?;
                if !queries.contains(&context.as_str()) {
                    return Err(invalid(format!("context {context:?} was not asked for")));
                }
                if contexts.iter().any(|(i, c)| *i == id || *c == context) {
                    return Err(invalid(format!("context {context:?} (id {id}) twice")));
                }
                contexts.push((id, context));
            }
            rep::ACK if reply.data.is_empty() => return Ok(contexts),
            _ => return Err(option_error("NBD_OPT_SET_META_CONTEXT", &reply)),
        }
    }
}

/// Turns an unexpected option reply into an error naming it; error replies keep their type in
/// the message so tests can print it.
fn option_error(what: &str, reply: &OptionReply) -> io::Error {
    let kind = if reply.kind & rep::ERR_BIT != 0 {
        io::ErrorKind::Other
    } else {
        io::ErrorKind::InvalidData
    };
    io::Error::new(
        kind,
        format!(
            "{what}: reply type {:#x} with {} bytes ({})",
            reply.kind,
            reply.data.len(),
            String::from_utf8_lossy(&reply.data)
        ),
    )
}

/// Cookies start here and advance by an odd step so that both halves of the 64-bit field vary:
/// a server that truncates or reorders cookie bytes gets caught.
const FIRST_COOKIE: u64 = 0x0123_4567_89ab_cdef;
const COOKIE_STEP: u64 = 0x9e37_79b9_7f4a_7c15;

/// A request sent and not yet answered.
#[derive(Debug)]
struct Pending {
    kind: u16,
    flags: u16,
    offset: u64,
    len: u64,
    /// The data of a read, filled as chunks arrive.
    data: Vec<u8>,
    /// The byte ranges (relative to `offset`) that structured read chunks have covered.
    covered: Vec<(u64, u64)>,
    /// A structured read's content chunks, in the order they came.
    chunks: Vec<Content>,
    /// A block status's descriptors, per context id.
    extents: Vec<(u32, Vec<Extent>)>,
    /// The first error reported for this request.
    error: Option<u32>,
}

/// One content chunk of a structured read: `len` bytes at `offset`, data or a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Content {
    pub offset: u64,
    pub len: u64,
    pub hole: bool,
}

/// The answer to one request.
#[derive(Debug)]
pub struct Reply {
    pub cookie: u64,
    /// The data of a read (empty for other commands), or the NBD error.
    pub result: io::Result<Vec<u8>>,
    /// A structured read's content chunks, in the order they came (empty otherwise).
    pub chunks: Vec<Content>,
    /// A block status's descriptors, per context id, in the order they came.
    pub extents: Vec<(u32, Vec<Extent>)>,
}

/// A connected client in the transmission phase.
#[derive(Debug)]
pub struct Client {
    conn: Conn,
    size: u64,
    flags: u16,
    block_size: Option<BlockSize>,
    structured: bool,
    /// Extended headers: every request extended, every reply an extended chunk.
    extended: bool,
    /// The metadata contexts selected in the handshake: (id, name).
    contexts: Vec<(u32, String)>,
    next_cookie: u64,
    pending: HashMap<u64, Pending>,
}

impl Client {
    /// Connects over a Unix socket with `NBD_OPT_GO` and simple replies.
    pub fn connect_unix(path: impl AsRef<Path>, export_name: &str) -> io::Result<Client> {
        Handshake::new(export_name).connect_unix(path)
    }

    /// Connects over TCP with `NBD_OPT_GO` and simple replies.
    pub fn connect_tcp(addr: impl ToSocketAddrs, export_name: &str) -> io::Result<Client> {
        Handshake::new(export_name).connect_tcp(addr)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn flags(&self) -> u16 {
        self.flags
    }

    pub fn block_size(&self) -> Option<BlockSize> {
        self.block_size
    }

    pub fn structured(&self) -> bool {
        self.structured
    }

    /// The metadata contexts selected in the handshake, as (id, name).
    pub fn contexts(&self) -> &[(u32, String)] {
        &self.contexts
    }

    /// The raw connection, for tests that send something the high-level API would not.
    pub fn conn(&mut self) -> &mut Conn {
        &mut self.conn
    }

    /// Takes a cookie for a request, records it as in flight, and returns its header.
    fn register(&mut self, kind: u16, flags: u16, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let cookie = self.next_cookie;
        let header = self.header(kind, flags, cookie, offset, len)?;
        self.next_cookie = self.next_cookie.wrapping_add(COOKIE_STEP);
        // (Reads longer than any server serves get no buffer: their data would not fit.)
        let data = if kind == cmd::READ && len <= 64 << 20 {
            vec![0u8; len as usize]
        } else {
            Vec::new()
        };
        self.pending.insert(
            cookie,
            Pending {
                kind,
                flags,
                offset,
                len,
                data,
                covered: Vec::new(),
                chunks: Vec::new(),
                extents: Vec::new(),
                error: None,
            },
        );
        Ok(header)
    }

    /// A request's header: compact, or with extended headers extended (a WRITE's with
    /// `NBD_CMD_FLAG_PAYLOAD_LEN`).
    fn header(
        &self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u64,
    ) -> io::Result<Vec<u8>> {
        Ok(if self.extended {
            let flags = if kind == cmd::WRITE {
                flags | cmd_flag::PAYLOAD_LEN
            } else {
                flags
            };
            let req = ExtRequest {
                flags,
                kind,
                cookie,
                offset,
                length: len,
            };
            req.encode().to_vec()
        } else {
            let len = u32::try_from(len)
                .map_err(|_| invalid(format!("a length of {len} needs extended headers")))?;
            let req = Request::new(kind, cookie, offset, len).with_flags(flags);
            req.encode().to_vec()
        })
    }

    /// Sends a request without waiting for its reply; returns its cookie.
    pub fn send_command(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        self.send_command64(kind, flags, offset, u64::from(len), payload)
    }

    /// [`send_command`](Self::send_command) with a 64-bit length (extended headers).
    pub fn send_command64(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> io::Result<u64> {
        let cookie = self.next_cookie;
        let mut msg = self.register(kind, flags, offset, len)?;
        msg.extend_from_slice(payload);
        self.conn.send(&msg)?;
        Ok(cookie)
    }

    /// Sends reads of `ranges` in a single write, so that the server finds all of them in its
    /// socket at once; returns their cookies.
    pub fn send_reads_at_once(&mut self, ranges: &[(u64, u32)]) -> io::Result<Vec<u64>> {
        let commands: Vec<_> = ranges
            .iter()
            .map(|&(offset, len)| (cmd::READ, offset, len, &[][..]))
            .collect();
        self.send_at_once(&commands)
    }

    /// Sends `commands`, each (kind, offset, length, payload) without flags, in a single
    /// write, so that the server finds them together in its socket (as far as its send buffer
    /// holds them); returns their cookies.
    pub fn send_at_once(&mut self, commands: &[(u16, u64, u32, &[u8])]) -> io::Result<Vec<u64>> {
        let flagged: Vec<_> = commands
            .iter()
            .map(|&(kind, offset, len, payload)| (kind, 0, offset, len, payload))
            .collect();
        self.send_flagged_at_once(&flagged)
    }

    /// [`send_at_once`](Self::send_at_once) with each command's flags: (kind, flags, offset,
    /// length, payload).
    pub fn send_flagged_at_once(
        &mut self,
        commands: &[(u16, u16, u64, u32, &[u8])],
    ) -> io::Result<Vec<u64>> {
        let mut bytes = Vec::with_capacity(commands.len() * REQUEST_LEN);
        let mut cookies = Vec::with_capacity(commands.len());
        for &(kind, flags, offset, len, payload) in commands {
            cookies.push(self.next_cookie);
            bytes.extend(self.register(kind, flags, offset, u64::from(len))?);
            bytes.extend_from_slice(payload);
        }
        self.conn.send(&bytes)?;
        Ok(cookies)
    }

    pub fn send_read(&mut self, offset: u64, len: u32) -> io::Result<u64> {
        self.send_command(cmd::READ, 0, offset, len, &[])
    }

    pub fn send_write(&mut self, offset: u64, data: &[u8]) -> io::Result<u64> {
        self.send_command(cmd::WRITE, 0, offset, data.len() as u32, data)
    }

    pub fn send_flush(&mut self) -> io::Result<u64> {
        self.send_command(cmd::FLUSH, 0, 0, 0, &[])
    }

    /// How many requests have been sent and not answered.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Reads replies until one request is complete and returns its answer. Replies may come in
    /// any order; every one must name a cookie in flight.
    pub fn receive(&mut self) -> io::Result<Reply> {
        loop {
            let pending = &self.pending;
            let (structured, extended) = (self.structured, self.extended);
            let raw = self.conn.read_reply(|cookie, error| {
                let p = pending.get(&cookie).ok_or_else(|| {
                    invalid(format!("simple reply for unknown cookie {cookie:#x}"))
                })?;
                if extended {
                    return Err(invalid(format!(
                        "simple reply (cookie {cookie:#x}, error {error}) with extended headers"
                    )));
                }
                if p.kind == cmd::READ && structured {
                    return Err(invalid(format!(
                        "simple reply to a read (cookie {cookie:#x}, error {error}) after \
                         structured replies were negotiated"
                    )));
                }
                Ok(if p.kind == cmd::READ && error == 0 {
                    p.len as usize
                } else {
                    0
                })
            })?;
            match raw {
                RawReply::Simple {
                    error,
                    cookie,
                    data,
                } => {
                    self.pending.remove(&cookie);
                    let result = if error == 0 {
                        Ok(data)
                    } else {
                        Err(nbd_error(error))
                    };
                    return Ok(Reply {
                        cookie,
                        result,
                        chunks: Vec::new(),
                        extents: Vec::new(),
                    });
                }
                RawReply::Chunk(c) => {
                    if !self.structured {
                        return Err(invalid(format!(
                            "structured reply chunk without negotiation: {c:?}"
                        )));
                    }
                    if c.offset.is_some() != self.extended {
                        return Err(invalid(format!(
                            "a {} chunk on a connection {} extended headers: {c:?}",
                            if c.offset.is_some() {
                                "extended"
                            } else {
                                "structured"
                            },
                            if self.extended { "with" } else { "without" },
                        )));
                    }
                    if let Some(reply) = self.apply_chunk(c)? {
                        return Ok(reply);
                    }
                }
            }
        }
    }

    /// Folds one chunk into its request; returns the answer when the chunk is the last one.
    fn apply_chunk(&mut self, c: Chunk) -> io::Result<Option<Reply>> {
        let p = self
            .pending
            .get_mut(&c.cookie)
            .ok_or_else(|| invalid(format!("chunk for unknown cookie {:#x}", c.cookie)))?;
        if c.offset.is_some_and(|o| o != p.offset) {
            return Err(invalid(format!(
                "extended chunk with offset {:?} for a request at {}",
                c.offset, p.offset
            )));
        }
        match c.kind {
            chunk::NONE => {
                if !c.payload.is_empty() || !c.is_done() {
                    return Err(invalid(format!("NONE chunk must be empty and DONE: {c:?}")));
                }
            }
            chunk::OFFSET_DATA | chunk::OFFSET_HOLE => {
                if p.kind != cmd::READ {
                    return Err(invalid(format!("data chunk for a non-read: {c:?}")));
                }
                if c.payload.len() < if c.kind == chunk::OFFSET_DATA { 9 } else { 12 } {
                    return Err(invalid(format!("data chunk too short: {c:?}")));
                }
                let at = be_u64(&c.payload, 0);
                let (len, bytes) = if c.kind == chunk::OFFSET_DATA {
                    ((c.payload.len() - 8) as u64, Some(&c.payload[8..]))
                } else {
                    if c.payload.len() != 12 {
                        return Err(invalid(format!("hole chunk with extra bytes: {c:?}")));
                    }
                    (u64::from(be_u32(&c.payload, 8)), None)
                };
                let start = at
                    .checked_sub(p.offset)
                    .filter(|s| s + len <= p.len)
                    .ok_or_else(|| {
                        invalid(format!(
                            "chunk [{at}, +{len}) outside the read [{}, +{})",
                            p.offset, p.len
                        ))
                    })?;
                if p.covered.iter().any(|&(s, e)| start < e && s < start + len) {
                    return Err(invalid(format!(
                        "chunk [{at}, +{len}) overlaps an earlier one"
                    )));
                }
                if len == 0 {
                    return Err(invalid(format!("content chunk of no bytes: {c:?}")));
                }
                if p.flags & cmd_flag::DF != 0 && !p.chunks.is_empty() {
                    return Err(invalid(format!(
                        "a second content chunk for a read with DF: {c:?}"
                    )));
                }
                p.covered.push((start, start + len));
                p.chunks.push(Content {
                    offset: at,
                    len,
                    hole: bytes.is_none(),
                });
                let dst = &mut p.data[start as usize..(start + len) as usize];
                match bytes {
                    Some(b) => dst.copy_from_slice(b),
                    None => dst.fill(0),
                }
            }
            chunk::BLOCK_STATUS | chunk::BLOCK_STATUS_EXT => {
                if p.kind != cmd::BLOCK_STATUS {
                    return Err(invalid(format!(
                        "block status chunk for command {}",
                        p.kind
                    )));
                }
                // Each framing has its own chunk type: 32-bit extents, or 64-bit ones.
                let (id, extents) = match (c.kind, self.extended) {
                    (chunk::BLOCK_STATUS, false) => decode_block_status(&c.payload)?,
                    (chunk::BLOCK_STATUS_EXT, true) => decode_block_status_ext(&c.payload)?,
                    _ => {
                        return Err(invalid(format!(
                            "block status chunk type {} with extended headers {}",
                            c.kind, self.extended
                        )));
                    }
                };
                if !self.contexts.iter().any(|(i, _)| *i == id) {
                    return Err(invalid(format!(
                        "block status for context id {id}, not selected"
                    )));
                }
                if p.extents.iter().any(|(i, _)| *i == id) {
                    return Err(invalid(format!(
                        "two block status chunks for context id {id}"
                    )));
                }
                let (len, n) = (p.len, extents.len());
                let before_last: u64 = extents[..n - 1].iter().map(|e| e.len).sum();
                if p.flags & cmd_flag::REQ_ONE != 0 {
                    if n != 1 || extents[0].len > len {
                        return Err(invalid(format!(
                            "REQ_ONE block status of {len} bytes answered with {extents:?}"
                        )));
                    }
                } else if before_last >= len {
                    return Err(invalid(format!(
                        "block status of {len} bytes: extents past the range before the last: \
                         {extents:?}"
                    )));
                }
                p.extents.push((id, extents));
            }
            chunk::ERROR | chunk::ERROR_OFFSET => {
                let e = decode_error_chunk(&c.payload, c.kind == chunk::ERROR_OFFSET)?;
                if e.errno == 0 {
                    return Err(invalid(format!("error chunk with error 0: {c:?}")));
                }
                p.error.get_or_insert(e.errno);
            }
            other => return Err(invalid(format!("unknown chunk type {other}: {c:?}"))),
        }
        if !c.is_done() {
            return Ok(None);
        }
        let p = self.pending.remove(&c.cookie).expect("looked up above");
        if let Some(errno) = p.error {
            return Ok(Some(Reply {
                cookie: c.cookie,
                result: Err(nbd_error(errno)),
                chunks: p.chunks,
                extents: p.extents,
            }));
        }
        if p.kind == cmd::READ {
            let covered: u64 = p.covered.iter().map(|&(s, e)| e - s).sum();
            if covered != p.len {
                return Err(invalid(format!(
                    "read [{}, +{}) finished with only {covered} bytes covered",
                    p.offset, p.len
                )));
            }
        }
        if p.kind == cmd::BLOCK_STATUS && p.extents.len() != self.contexts.len() {
            return Err(invalid(format!(
                "block status finished with {} chunks for {} contexts",
                p.extents.len(),
                self.contexts.len()
            )));
        }
        Ok(Some(Reply {
            cookie: c.cookie,
            result: Ok(p.data),
            chunks: p.chunks,
            extents: p.extents,
        }))
    }

    /// Sends one request, with any flags, and waits for its answer (nothing else may be in
    /// flight).
    pub fn call(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<Vec<u8>> {
        self.call_reply(kind, flags, offset, len, payload)?.result
    }

    /// As [`call`](Self::call), with the whole answer (a read's chunks, the extents).
    pub fn call_reply(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<Reply> {
        self.call_reply64(kind, flags, offset, u64::from(len), payload)
    }

    /// [`call_reply`](Self::call_reply) with a 64-bit length (extended headers).
    pub fn call_reply64(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> io::Result<Reply> {
        let cookie = self.send_command64(kind, flags, offset, len, payload)?;
        let reply = self.receive()?;
        if reply.cookie != cookie {
            return Err(invalid(format!(
                "answer for cookie {:#x}, expected {cookie:#x}",
                reply.cookie
            )));
        }
        Ok(reply)
    }

    /// A read with `flags`, returning its data and (with structured replies) the content
    /// chunks it came in.
    pub fn read_chunks(
        &mut self,
        offset: u64,
        len: u32,
        flags: u16,
    ) -> io::Result<(Vec<u8>, Vec<Content>)> {
        let reply = self.call_reply(cmd::READ, flags, offset, len, &[])?;
        Ok((reply.result?, reply.chunks))
    }

    /// `NBD_CMD_BLOCK_STATUS` with `flags`, for a client that selected exactly one context:
    /// its descriptors.
    pub fn block_status(&mut self, offset: u64, len: u64, flags: u16) -> io::Result<Vec<Extent>> {
        if self.contexts.len() != 1 {
            return Err(invalid(format!(
                "{} contexts selected, not 1",
                self.contexts.len()
            )));
        }
        let reply = self.call_reply64(cmd::BLOCK_STATUS, flags, offset, len, &[])?;
        reply.result?;
        Ok(reply
            .extents
            .into_iter()
            .next()
            .map(|(_, e)| e)
            .unwrap_or_default())
    }

    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        self.call(cmd::READ, 0, offset, len, &[])
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.call(cmd::WRITE, 0, offset, data.len() as u32, data)
            .map(drop)
    }

    /// A write with `NBD_CMD_FLAG_FUA`.
    pub fn write_fua(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.call(cmd::WRITE, cmd_flag::FUA, offset, data.len() as u32, data)
            .map(drop)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.call(cmd::FLUSH, 0, 0, 0, &[]).map(drop)
    }

    pub fn trim(&mut self, offset: u64, len: u32) -> io::Result<()> {
        self.call(cmd::TRIM, 0, offset, len, &[]).map(drop)
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u32, no_hole: bool) -> io::Result<()> {
        let flags = if no_hole { cmd_flag::NO_HOLE } else { 0 };
        self.call(cmd::WRITE_ZEROES, flags, offset, len, &[])
            .map(drop)
    }

    /// Sends `NBD_CMD_DISC`, then checks that every outstanding request was answered and that
    /// the server closed the connection.
    pub fn disconnect(mut self) -> io::Result<()> {
        let disc = self.header(cmd::DISC, 0, self.next_cookie, 0, 0)?;
        self.conn.send(&disc)?;
        while !self.pending.is_empty() {
            self.receive()?.result.ok();
        }
        let extra = self.conn.expect_closed(IO_TIMEOUT)?;
        if !extra.is_empty() {
            return Err(invalid(format!(
                "{} bytes after NBD_CMD_DISC (it has no reply)",
                extra.len()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The client's own encoding and decoding, checked against the byte layouts the spec
    //! describes, and its reply handling against a scripted server on a socket pair.

    use super::*;
    use std::thread;

    fn push_u16(v: &mut Vec<u8>, x: u16) {
        v.extend_from_slice(&x.to_be_bytes());
    }
    fn push_u32(v: &mut Vec<u8>, x: u32) {
        v.extend_from_slice(&x.to_be_bytes());
    }
    fn push_u64(v: &mut Vec<u8>, x: u64) {
        v.extend_from_slice(&x.to_be_bytes());
    }

    /// A chunk as a server would send it.
    fn chunk_bytes(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        push_u32(&mut v, STRUCTURED_REPLY_MAGIC);
        push_u16(&mut v, flags);
        push_u16(&mut v, kind);
        push_u64(&mut v, cookie);
        push_u32(&mut v, payload.len() as u32);
        v.extend_from_slice(payload);
        v
    }

    fn offset_data(offset: u64, data: &[u8]) -> Vec<u8> {
        let mut v = offset.to_be_bytes().to_vec();
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn magics_spell_their_names() {
        assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn extended_request_and_block_status_layouts_follow_the_spec() {
        let req = ExtRequest {
            flags: cmd_flag::PAYLOAD_LEN,
            kind: cmd::WRITE,
            cookie: 0x1122_3344_5566_7788,
            offset: 0x0102_0304_0506_0708,
            length: 0x1_0000_0002,
        };
        let mut want = Vec::new();
        push_u32(&mut want, EXTENDED_REQUEST_MAGIC);
        push_u16(&mut want, 1 << 5);
        push_u16(&mut want, 1);
        push_u64(&mut want, 0x1122_3344_5566_7788);
        push_u64(&mut want, 0x0102_0304_0506_0708);
        push_u64(&mut want, 0x1_0000_0002);
        assert_eq!(req.encode().to_vec(), want);

        // BLOCK_STATUS: context id, then (length, flags) pairs of 32 bits.
        let mut p = Vec::new();
        push_u32(&mut p, 7);
        for (len, flags) in [(4096u32, 3u32), (512, 0)] {
            push_u32(&mut p, len);
            push_u32(&mut p, flags);
        }
        let (id, ext) = decode_block_status(&p).unwrap();
        assert_eq!(id, 7);
        assert_eq!(
            ext,
            [(4096, 3), (512, 0)].map(|(len, flags)| Extent { len, flags })
        );
        assert!(decode_block_status(&p[..p.len() - 1]).is_err());
        assert!(decode_block_status(&p[..4]).is_err(), "no extent");

        // BLOCK_STATUS_EXT: id, count, then (length, flags) pairs of 64 bits.
        let ext_payload = |count: u32, pairs: &[(u64, u64)]| {
            let mut p = Vec::new();
            push_u32(&mut p, 9);
            push_u32(&mut p, count);
            for &(len, flags) in pairs {
                push_u64(&mut p, len);
                push_u64(&mut p, flags);
            }
            p
        };
        let (id, ext) = decode_block_status_ext(&ext_payload(1, &[(6 << 30, 3)])).unwrap();
        assert_eq!(
            (id, ext),
            (
                9,
                vec![Extent {
                    len: 6 << 30,
                    flags: 3
                }]
            )
        );
        assert!(
            decode_block_status_ext(&ext_payload(2, &[(1, 0)])).is_err(),
            "count"
        );
        assert!(
            decode_block_status_ext(&ext_payload(1, &[(0, 0)])).is_err(),
            "empty extent"
        );
        assert!(
            decode_block_status_ext(&ext_payload(1, &[(1, 1 << 32)])).is_err(),
            "status"
        );
    }

    #[test]
    fn request_encoding_follows_the_spec_layout() {
        let req = Request::new(
            cmd::WRITE,
            0x1122_3344_5566_7788,
            0x0102_0304_0506_0708,
            0xa0b0c0d0,
        )
        .with_flags(cmd_flag::FUA | cmd_flag::NO_HOLE);
        let b = req.encode();
        let mut want = Vec::new();
        push_u32(&mut want, REQUEST_MAGIC);
        push_u16(&mut want, 3);
        push_u16(&mut want, 1);
        push_u64(&mut want, 0x1122_3344_5566_7788);
        push_u64(&mut want, 0x0102_0304_0506_0708);
        push_u32(&mut want, 0xa0b0c0d0);
        assert_eq!(b.len(), REQUEST_LEN);
        assert_eq!(b.to_vec(), want);
    }

    #[test]
    fn option_and_info_request_encoding() {
        let data = encode_info_request("disk", &[info::BLOCK_SIZE, 7]);
        let mut want_data = Vec::new();
        push_u32(&mut want_data, 4);
        want_data.extend_from_slice(b"disk");
        push_u16(&mut want_data, 2);
        push_u16(&mut want_data, 3);
        push_u16(&mut want_data, 7);
        assert_eq!(data, want_data);

        let opt_bytes = encode_option(opt::GO, &data);
        assert_eq!(opt_bytes.len(), OPTION_HEADER_LEN + data.len());
        assert_eq!(&opt_bytes[..8], b"IHAVEOPT");
        assert_eq!(be_u32(&opt_bytes, 8), opt::GO);
        assert_eq!(be_u32(&opt_bytes, 12), data.len() as u32);
        assert_eq!(&opt_bytes[16..], &data[..]);
    }

    #[test]
    fn greeting_and_option_reply_headers_are_checked() {
        let mut g = Vec::new();
        push_u64(&mut g, NBD_MAGIC);
        push_u64(&mut g, IHAVEOPT);
        push_u16(&mut g, 3);
        assert_eq!(decode_greeting(&g.clone().try_into().unwrap()).unwrap(), 3);
        g[0] ^= 1;
        assert!(decode_greeting(&g.clone().try_into().unwrap()).is_err());
        g[0] ^= 1;
        g[15] ^= 1;
        assert!(decode_greeting(&g.try_into().unwrap()).is_err());

        let mut r = Vec::new();
        push_u64(&mut r, OPTION_REPLY_MAGIC);
        push_u32(&mut r, opt::LIST);
        push_u32(&mut r, rep::ERR_TOO_BIG);
        push_u32(&mut r, 9);
        let h: [u8; OPTION_REPLY_HEADER_LEN] = r.clone().try_into().unwrap();
        assert_eq!(
            decode_option_reply_header(&h).unwrap(),
            (opt::LIST, rep::ERR_TOO_BIG, 9)
        );
        r[3] ^= 0x40;
        assert!(decode_option_reply_header(&r.try_into().unwrap()).is_err());
    }

    #[test]
    fn info_and_server_reply_decoding() {
        let mut e = Vec::new();
        push_u16(&mut e, info::EXPORT);
        push_u64(&mut e, 1 << 40);
        push_u16(&mut e, tx_flag::HAS_FLAGS | tx_flag::READ_ONLY);
        assert_eq!(
            decode_info(&e).unwrap(),
            Info::Export {
                size: 1 << 40,
                flags: 3
            }
        );
        e.push(0);
        assert!(decode_info(&e).is_err(), "export info with a stray byte");

        let mut b = Vec::new();
        push_u16(&mut b, info::BLOCK_SIZE);
        push_u32(&mut b, 1);
        push_u32(&mut b, 4096);
        push_u32(&mut b, 32 << 20);
        assert_eq!(
            decode_info(&b).unwrap(),
            Info::BlockSize(BlockSize {
                min: 1,
                preferred: 4096,
                max: 32 << 20
            })
        );
        assert!(decode_info(&b[..13]).is_err());

        let mut s = Vec::new();
        push_u32(&mut s, 5);
        s.extend_from_slice(b"disk0description");
        assert_eq!(decode_server_reply(&s).unwrap(), "disk0");
        assert!(decode_server_reply(&s[..6]).is_err());
    }

    #[test]
    fn error_chunk_decoding() {
        let mut p = Vec::new();
        push_u32(&mut p, errno::EINVAL);
        push_u16(&mut p, 3);
        p.extend_from_slice(b"bad");
        assert_eq!(
            decode_error_chunk(&p, false).unwrap(),
            ChunkError {
                errno: errno::EINVAL,
                message: "bad".into(),
                offset: None
            }
        );
        assert!(decode_error_chunk(&p, true).is_err(), "offset missing");
        push_u64(&mut p, 4096);
        assert_eq!(decode_error_chunk(&p, true).unwrap().offset, Some(4096));
    }

    #[test]
    fn nbd_errors_map_to_errno() {
        for e in [
            errno::EPERM,
            errno::EIO,
            errno::ENOMEM,
            errno::EINVAL,
            errno::ENOSPC,
            errno::EOVERFLOW,
            errno::ENOTSUP,
            errno::ESHUTDOWN,
        ] {
            assert_eq!(errno_of(&nbd_error(e)), Some(e));
        }
        assert_eq!(nbd_error(errno::ENOSPC).kind(), io::ErrorKind::StorageFull);
    }

    /// Runs the handshake against `server` (which plays the server's side of a socket pair)
    /// with structured replies on, and returns the client.
    fn scripted(
        server: impl FnOnce(UnixStream) + Send + 'static,
    ) -> (Client, thread::JoinHandle<()>) {
        let (a, b) = UnixStream::pair().unwrap();
        let t = thread::spawn(move || server(b));
        let client = Handshake::new("x")
            .structured_replies()
            .run(Conn::from_unix(a).unwrap())
            .unwrap();
        (client, t)
    }

    /// The server's side of a handshake with structured replies and `NBD_OPT_GO`; returns the
    /// options' bytes it received so tests can check them.
    fn serve_handshake(s: &mut UnixStream, size: u64) -> Vec<u8> {
        let mut g = Vec::new();
        push_u64(&mut g, NBD_MAGIC);
        push_u64(&mut g, IHAVEOPT);
        push_u16(&mut g, 3);
        s.write_all(&g).unwrap();
        let mut got = Vec::new();
        let mut flags = [0u8; 4];
        s.read_exact(&mut flags).unwrap();
        got.extend_from_slice(&flags);
        for _ in 0..2 {
            let mut h = [0u8; OPTION_HEADER_LEN];
            s.read_exact(&mut h).unwrap();
            let mut data = vec![0u8; be_u32(&h, 12) as usize];
            s.read_exact(&mut data).unwrap();
            got.extend_from_slice(&h);
            got.extend_from_slice(&data);
            let option = be_u32(&h, 8);
            let mut reply = |kind: u32, data: &[u8]| {
                let mut r = Vec::new();
                push_u64(&mut r, OPTION_REPLY_MAGIC);
                push_u32(&mut r, option);
                push_u32(&mut r, kind);
                push_u32(&mut r, data.len() as u32);
                r.extend_from_slice(data);
                s.write_all(&r).unwrap();
            };
            if option == opt::GO {
                let mut i = Vec::new();
                push_u16(&mut i, info::EXPORT);
                push_u64(&mut i, size);
                push_u16(&mut i, tx_flag::HAS_FLAGS);
                reply(rep::INFO, &i);
            }
            reply(rep::ACK, &[]);
        }
        got
    }

    /// Reads one request header on the server's side.
    fn recv_request(s: &mut UnixStream) -> (u16, u64, u64, u32) {
        let mut h = [0u8; REQUEST_LEN];
        s.read_exact(&mut h).unwrap();
        assert_eq!(be_u32(&h, 0), REQUEST_MAGIC);
        (be_u16(&h, 6), be_u64(&h, 8), be_u64(&h, 16), be_u32(&h, 24))
    }

    #[test]
    fn handshake_sends_what_the_spec_says() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (client, t) = scripted(move |mut s| {
            tx.send(serve_handshake(&mut s, 12345)).unwrap();
        });
        t.join().unwrap();
        let got = rx.recv().unwrap();
        assert_eq!(client.size(), 12345);
        assert_eq!(client.flags(), tx_flag::HAS_FLAGS);
        let mut want = Vec::new();
        push_u32(&mut want, 3);
        want.extend_from_slice(&encode_option(opt::STRUCTURED_REPLY, &[]));
        want.extend_from_slice(&encode_option(
            opt::GO,
            &encode_info_request("x", &[info::BLOCK_SIZE]),
        ));
        assert_eq!(got, want);
    }

    #[test]
    fn structured_reads_assemble_interleaved_out_of_order_chunks() {
        let (mut client, t) = scripted(|mut s| {
            serve_handshake(&mut s, 1 << 20);
            let (_, c1, off1, len1) = recv_request(&mut s);
            let (_, c2, off2, len2) = recv_request(&mut s);
            assert_eq!((off1, len1, off2, len2), (100, 8, 200, 4));
            // Second request first, its second half before its first half; the first request's
            // hole and data chunks interleaved with it.
            let mut hole = 100u64.to_be_bytes().to_vec();
            hole.extend_from_slice(&4u32.to_be_bytes());
            let mut out = Vec::new();
            out.extend(chunk_bytes(
                0,
                chunk::OFFSET_DATA,
                c2,
                &offset_data(202, b"yz"),
            ));
            out.extend(chunk_bytes(0, chunk::OFFSET_HOLE, c1, &hole));
            out.extend(chunk_bytes(
                chunk::FLAG_DONE,
                chunk::OFFSET_DATA,
                c2,
                &offset_data(200, b"wx"),
            ));
            out.extend(chunk_bytes(
                chunk::FLAG_DONE,
                chunk::OFFSET_DATA,
                c1,
                &offset_data(104, b"abcd"),
            ));
            s.write_all(&out).unwrap();
        });
        let c1 = client.send_read(100, 8).unwrap();
        let c2 = client.send_read(200, 4).unwrap();
        assert_ne!(c1, c2);
        let first = client.receive().unwrap();
        assert_eq!(first.cookie, c2);
        assert_eq!(first.result.unwrap(), b"wxyz");
        let second = client.receive().unwrap();
        assert_eq!(second.cookie, c1);
        assert_eq!(second.result.unwrap(), b"\0\0\0\0abcd");
        assert_eq!(client.in_flight(), 0);
        t.join().unwrap();
    }

    #[test]
    fn structured_read_with_a_gap_is_a_protocol_error() {
        let (mut client, t) = scripted(|mut s| {
            serve_handshake(&mut s, 1 << 20);
            let (_, c, _, _) = recv_request(&mut s);
            s.write_all(&chunk_bytes(
                chunk::FLAG_DONE,
                chunk::OFFSET_DATA,
                c,
                &offset_data(0, b"ab"),
            ))
            .unwrap();
        });
        let err = client.read(0, 4).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        t.join().unwrap();
    }

    #[test]
    fn structured_error_chunk_becomes_the_errno() {
        let (mut client, t) = scripted(|mut s| {
            serve_handshake(&mut s, 1 << 20);
            let (kind, c, _, len) = recv_request(&mut s);
            assert_eq!((kind, len), (cmd::WRITE, 1));
            s.read_exact(&mut [0u8; 1]).unwrap();
            let mut p = errno::ENOSPC.to_be_bytes().to_vec();
            p.extend_from_slice(&0u16.to_be_bytes());
            s.write_all(&chunk_bytes(chunk::FLAG_DONE, chunk::ERROR, c, &p))
                .unwrap();
            let (_, c, _, _) = recv_request(&mut s);
            s.write_all(&chunk_bytes(chunk::FLAG_DONE, chunk::NONE, c, &[]))
                .unwrap();
        });
        let err = client.write(1 << 20, b"x").unwrap_err();
        assert_eq!(errno_of(&err), Some(errno::ENOSPC));
        client.flush().unwrap();
        t.join().unwrap();
    }

    #[test]
    fn unknown_cookie_and_simple_read_reply_are_protocol_errors() {
        let (mut client, t) = scripted(|mut s| {
            serve_handshake(&mut s, 1 << 20);
            let (_, c, _, _) = recv_request(&mut s);
            // A simple reply to a read, which structured replies forbid.
            let mut r = Vec::new();
            push_u32(&mut r, SIMPLE_REPLY_MAGIC);
            push_u32(&mut r, 0);
            push_u64(&mut r, c);
            r.extend_from_slice(b"abcd");
            s.write_all(&r).unwrap();
        });
        let err = client.read(0, 4).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        t.join().unwrap();

        let (mut client, t) = scripted(|mut s| {
            serve_handshake(&mut s, 1 << 20);
            let (_, c, _, _) = recv_request(&mut s);
            s.write_all(&chunk_bytes(chunk::FLAG_DONE, chunk::NONE, !c, &[]))
                .unwrap();
        });
        let err = client.flush().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        t.join().unwrap();
    }

    #[test]
    fn expect_closed_sees_eof_and_times_out_on_an_open_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut conn = Conn::from_unix(a).unwrap();
        let err = conn.expect_closed(Duration::from_millis(50)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        (&b).write_all(b"bye").unwrap();
        drop(b);
        assert_eq!(conn.expect_closed(Duration::from_secs(5)).unwrap(), b"bye");
    }
}
