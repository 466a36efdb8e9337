//! The NBD wire protocol as this server speaks it: the fixed-newstyle handshake, the request
//! header (compact, or extended with 64-bit lengths), and simple, structured and extended
//! replies. Numbers and layouts follow the protocol's
//! specification (`doc/proto.md` of the NBD project); everything is big-endian.
//!
//! This module only encodes and decodes. What a message means for a connection is
//! `connection.rs`'s business.

/// `NBDMAGIC`: the first eight bytes the server sends.
pub const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: follows `NBDMAGIC` in the greeting and starts every option a client sends.
pub const OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
/// Starts every reply to an option.
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Starts every request in the transmission phase.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Starts a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Starts a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Starts every request once extended headers are negotiated.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Starts every reply chunk once extended headers are negotiated.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flags (server → client): we speak the fixed newstyle and can omit the 124 zero
/// bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (client → server): the same two bits, as the client's answer.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types; errors have the top bit set.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR | 10;

/// Information items in an `NBD_REP_INFO` reply.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags, sent with the export's size.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Command types.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// "Don't fragment": a READ's data in one content chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// One extent per context in a BLOCK_STATUS reply, no longer than the request.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// A WRITE_ZEROES that must fail with `ENOTSUP` unless it is faster than writing zeros.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// With extended headers: the length is a payload's, which follows the header (a WRITE's).
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Structured reply chunk flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// The one metadata context offered (`NBD_OPT_SET_META_CONTEXT`), its id on this server, and
/// its two status flags.
pub const BASE_ALLOCATION: &[u8] = b"base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// Error numbers on the wire. NBD fixes its own values (they happen to match Linux's).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;

/// The largest payload of a READ or WRITE this server accepts (advertised as the maximum block
/// size). A longer request is refused with `EINVAL`; a write's payload is first read and
/// dropped (so the connection stays in step and the reply follows the upload), then answered.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// The largest option data accepted during the handshake; names are at most 4 KiB by the
/// specification, so anything beyond this is read and dropped, then refused with
/// `NBD_REP_ERR_TOO_BIG` (or, for `NBD_OPT_ABORT`, acknowledged).
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// The block sizes advertised with `NBD_INFO_BLOCK_SIZE`: byte-granular, 4 KiB preferred.
pub const MIN_BLOCK: u32 = 1;
pub const PREFERRED_BLOCK: u32 = 4096;

/// The server's greeting: magic, option magic, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut g = [0u8; 18];
    g[..8].copy_from_slice(&INIT_MAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&OPTS_MAGIC.to_be_bytes());
    g[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// Big-endian readers over a byte slice that is known to be long enough.
pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
pub fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// An option header: `IHAVEOPT`, the option, the length of its data.
pub const OPTION_HEADER_LEN: usize = 16;

/// A parsed option header, or `None` if the magic is wrong (the client is not speaking NBD).
pub fn parse_option_header(b: &[u8]) -> Option<(u32, u32)> {
    (be64(b) == OPTS_MAGIC).then(|| (be32(&b[8..]), be32(&b[12..])))
}

/// Appends an option reply with its data to `out`.
pub fn option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&REP_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    // Option data is bounded by MAX_OPTION_LEN and our replies are shorter still.
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`: the export name and the information items the
/// client asks for. `None` if the lengths inside do not add up.
pub fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let name_len = usize::try_from(be32(data.get(..4)?)).ok()?;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let rest = &data[4 + name_len..];
    let count = usize::from(be16(rest.get(..2)?));
    let items = rest.get(2..)?;
    if items.len() != 2 * count {
        return None;
    }
    Some((name, items.chunks_exact(2).map(be16).collect()))
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: the export name and
/// the queries (an export name, then a count of queries, each a length and a string), or
/// `None` if the lengths inside do not add up.
pub fn parse_meta_request(data: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let name_len = usize::try_from(be32(data.get(..4)?)).ok()?;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let mut rest = &data[4 + name_len..];
    let count = be32(rest.get(..4)?);
    rest = &rest[4..];
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = usize::try_from(be32(rest.get(..4)?)).ok()?;
        queries.push(rest.get(4..4usize.checked_add(len)?)?);
        rest = &rest[4 + len..];
    }
    rest.is_empty().then_some((name, queries))
}

/// A request header in the transmission phase: compact, and extended.
pub const REQUEST_LEN: usize = 28;
pub const EXTENDED_REQUEST_LEN: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    /// What the request covers (a compact header's 32 bits, an extended one's 64); for a WRITE,
    /// the length of its payload.
    pub length: u64,
    /// The bytes of payload that follow the header: a WRITE's length, or an extended request's
    /// length when it has `NBD_CMD_FLAG_PAYLOAD_LEN`; else 0.
    pub payload_len: u64,
}

/// Parses a request header framed as `framing` says ([`Framing::request_len`] bytes), or
/// `None` if the magic is wrong (the stream is out of step or not NBD; the only safe answer is
/// to close).
pub fn parse_request(b: &[u8], framing: Framing) -> Option<Request> {
    let (flags, kind) = (be16(&b[4..]), be16(&b[6..]));
    let (magic, length, payload_len) = if framing == Framing::Extended {
        let length = be64(&b[24..]);
        // A WRITE must say its length is a payload's, but qemu's client does not (10.0), and
        // qemu's server takes it as one all the same: so do we.
        let has_payload = flags & CMD_FLAG_PAYLOAD_LEN != 0 || kind == CMD_WRITE;
        let payload = if has_payload { length } else { 0 };
        (EXTENDED_REQUEST_MAGIC, length, payload)
    } else {
        let length = u64::from(be32(&b[24..]));
        let payload = if kind == CMD_WRITE { length } else { 0 };
        (REQUEST_MAGIC, length, payload)
    };
    (be32(b) == magic).then(|| Request {
        flags,
        kind,
        cookie: be64(&b[8..]),
        offset: be64(&b[16..]),
        length,
        payload_len,
    })
}

/// The length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// The length of a structured reply chunk header, and of an extended one.
pub const STRUCTURED_HEADER_LEN: usize = 20;
pub const EXTENDED_HEADER_LEN: usize = 32;

/// How requests and replies are framed on a connection: simple replies for old clients,
/// structured replies (`NBD_OPT_STRUCTURED_REPLY`), or extended headers
/// (`NBD_OPT_EXTENDED_HEADERS`: 32-byte requests with 64-bit lengths, and every reply a chunk
/// with a 32-byte header that repeats the request's offset).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Simple,
    Structured,
    Extended,
}

impl Framing {
    /// Whether replies are chunks (structured or extended), which is what metadata contexts,
    /// hole chunks and `NBD_CMD_FLAG_DF` need.
    pub fn chunked(self) -> bool {
        self != Framing::Simple
    }

    /// The length of a request header.
    pub fn request_len(self) -> usize {
        if self == Framing::Extended {
            EXTENDED_REQUEST_LEN
        } else {
            REQUEST_LEN
        }
    }

    /// The length of a chunk's header.
    pub fn chunk_header_len(self) -> usize {
        if self == Framing::Extended {
            EXTENDED_HEADER_LEN
        } else {
            STRUCTURED_HEADER_LEN
        }
    }

    /// The bytes that precede a successful read's data: a simple reply's header, or a chunk's
    /// header and the `OFFSET_DATA` offset.
    pub fn read_prefix(self) -> usize {
        match self {
            Framing::Simple => SIMPLE_REPLY_LEN,
            _ => self.chunk_header_len() + 8,
        }
    }

    /// Fills in the header of a chunk of the reply to `req` (its cookie, and with extended
    /// headers its offset), whose payload of `len` bytes follows.
    pub fn chunk_header(self, buf: &mut [u8], flags: u16, kind: u16, req: &Request, len: u32) {
        let magic = if self == Framing::Extended {
            EXTENDED_REPLY_MAGIC
        } else {
            STRUCTURED_REPLY_MAGIC
        };
        buf[..4].copy_from_slice(&magic.to_be_bytes());
        buf[4..6].copy_from_slice(&flags.to_be_bytes());
        buf[6..8].copy_from_slice(&kind.to_be_bytes());
        buf[8..16].copy_from_slice(&req.cookie.to_be_bytes());
        if self == Framing::Extended {
            buf[16..24].copy_from_slice(&req.offset.to_be_bytes());
            buf[24..32].copy_from_slice(&u64::from(len).to_be_bytes());
        } else {
            buf[16..20].copy_from_slice(&len.to_be_bytes());
        }
    }

    /// Fills in the first [`read_prefix`](Self::read_prefix) bytes of `buf` for a successful
    /// read of `len` bytes at `offset` for `req`, whose data follows in `buf`.
    pub fn write_read_prefix(self, buf: &mut [u8], req: &Request, offset: u64, len: u32) {
        if self == Framing::Simple {
            return simple_header(buf, 0, req.cookie);
        }
        let kind = REPLY_TYPE_OFFSET_DATA;
        self.chunk_header(buf, REPLY_FLAG_DONE, kind, req, len + 8);
        let at = self.chunk_header_len();
        buf[at..at + 8].copy_from_slice(&offset.to_be_bytes());
    }

    /// Appends the complete reply to `req` when it carries no data back: success for `None`,
    /// else the NBD error number and a message saying why, for an error chunk (cut to
    /// [`MAX_ERROR_MESSAGE`] bytes; a simple reply has no room for it).
    pub fn status_reply(self, out: &mut Vec<u8>, req: &Request, error: Option<(u32, &str)>) {
        let start = out.len();
        if self == Framing::Simple {
            out.resize(start + SIMPLE_REPLY_LEN, 0);
            let errno = error.map_or(0, |(errno, _)| errno);
            return simple_header(&mut out[start..], errno, req.cookie);
        }
        out.resize(start + self.chunk_header_len(), 0);
        let h = &mut out[start..];
        if let Some((error, message)) = error {
            // An error chunk: the error, the message's length and the message.
            let message = cut_at_char(message, MAX_ERROR_MESSAGE);
            let len = message.len() as u16;
            self.chunk_header(
                h,
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                req,
                6 + u32::from(len),
            );
            out.extend_from_slice(&error.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(message.as_bytes());
        } else {
            self.chunk_header(h, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req, 0);
        }
    }
}

/// The longest error message an error chunk carries: the protocol's SHOULD for strings (it
/// allows 4 096 bytes at most).
pub const MAX_ERROR_MESSAGE: usize = 256;

/// `text` cut to at most `max` bytes, at a character boundary.
fn cut_at_char(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The protocol's name of command `kind`, for messages.
pub fn command_name(kind: u16) -> &'static str {
    match kind {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "an unknown command",
    }
}

fn simple_header(buf: &mut [u8], error: u32, cookie: u64) {
    buf[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    buf[4..8].copy_from_slice(&error.to_be_bytes());
    buf[8..16].copy_from_slice(&cookie.to_be_bytes());
}

/// The NBD error for an I/O error from the export's file.
pub fn errno_of(e: &std::io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::EPERM | libc::EACCES | libc::EROFS) => EPERM,
        Some(libc::ENOMEM) => ENOMEM,
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => ENOSPC,
        Some(libc::EINVAL) => EINVAL,
        Some(libc::EOVERFLOW) => EOVERFLOW,
        Some(libc::EOPNOTSUPP) => ENOTSUP,
        _ => EIO,
    }
}
