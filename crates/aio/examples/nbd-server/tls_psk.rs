//! TLS with pre-shared keys (`--tls-psk FILE`, or `keys.psk` in `--tls-creds DIR`), as
//! qemu-nbd's `tls-creds-psk` object and nbdkit's `--tls-psk` offer it: the keys file, and a
//! TLS session over OpenSSL that `tls.rs` drives as it drives rustls (rustls has no external
//! pre-shared keys).
//!
//! The keys file is GnuTLS's `psktool` format, which qemu and nbdkit read: one `username:key`
//! per line, the key in hexadecimal. A client names its user in the handshake and must hold
//! the same key; an unknown user or another key fails the handshake. TLS 1.3 and 1.2 (the
//! `PSK` cipher suites of 1.2, with or without an ephemeral key exchange); no session tickets,
//! since clients reconnect with their key anyway.
//!
//! The session runs without touching a socket ([`PskSession`]): OpenSSL reads the records the
//! relay (or the handshake thread) has put in its input buffer and writes its records to an
//! output buffer that they send, which is the shape of rustls's `ServerConnection`, so the
//! relay is the same for both.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

use openssl::ssl::{
    ErrorCode, ShutdownResult, Ssl, SslContext, SslMethod, SslOptions, SslStream, SslVersion,
};

/// The name of the keys file in a `--tls-creds` directory, as qemu's `tls-creds-psk` names it.
pub const KEYS_FILE: &str = "keys.psk";

/// Bytes read from the client per `read_tls`: a whole record of 16 KiB and its overhead.
const READ_CHUNK: usize = 17 << 10;

/// The longest key accepted, in bytes (OpenSSL's own limit, `PSK_MAX_PSK_LEN`).
const MAX_KEY: usize = 512;

thread_local! {
    /// The user a client named that the keys file does not have, for the handshake's error
    /// (OpenSSL only says the handshake failed). Each handshake runs on a thread of its own.
    static UNKNOWN_USER: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The server's TLS settings for pre-shared keys, from the keys file: an `Err` that names the
/// file and the line for a malformed one, or an empty file.
pub fn load(path: &Path) -> io::Result<SslContext> {
    let bad = |what: String| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: {what}", path.display()),
        )
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let keys = parse_keys(&text).map_err(bad)?;
    if keys.is_empty() {
        return Err(bad("no key in the file".into()));
    }
    let keys = Arc::new(keys);
    let tls = |e: openssl::error::ErrorStack| bad(format!("TLS settings: {e}"));
    let mut builder = SslContext::builder(SslMethod::tls_server()).map_err(tls)?;
    builder
        .set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(tls)?;
    // TLS 1.2: the suites a pre-shared key authenticates, none without encryption.
    builder
        .set_cipher_list("ECDHE-PSK:DHE-PSK:PSK:!eNULL:!aNULL:!3DES")
        .map_err(tls)?;
    // TLS 1.3: AES-GCM first, and the server's order over the client's. A SHA-256 PSK leaves
    // AES-128-GCM and ChaCha20, and GnuTLS clients (libnbd, qemu) ask for ChaCha20 first,
    // which on a CPU with AES instructions moved 660–690 MiB/s in nbdcopy downloads against
    // 1 830–1 910 with AES-128-GCM (BENCHMARKS.md, "pre-shared keys").
    builder
        .set_ciphersuites("TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256")
        .map_err(tls)?;
    // No renegotiation either (TLS 1.2): a client could make the context's thread redo the
    // handshake at will.
    builder.set_options(
        SslOptions::NO_TICKET | SslOptions::CIPHER_SERVER_PREFERENCE | SslOptions::NO_RENEGOTIATION,
    );
    builder.set_num_tickets(0).map_err(tls)?;
    // TLS 1.3 uses this callback too (OpenSSL's external PSK with a SHA-256 binder, what
    // GnuTLS clients send).
    builder.set_psk_server_callback(move |_ssl, identity, psk| {
        let user = String::from_utf8_lossy(identity.unwrap_or_default());
        Ok(match keys.get(&*user) {
            Some(key) if key.len() <= psk.len() => {
                psk[..key.len()].copy_from_slice(key);
                key.len()
            }
            // 0: no key for this user, and the handshake fails.
            _ => {
                UNKNOWN_USER.with(|u| *u.borrow_mut() = Some(user.into_owned()));
                0
            }
        })
    });
    Ok(builder.build())
}

/// The keys of a `psktool` file, by user; `Err` names the bad line.
fn parse_keys(text: &str) -> Result<HashMap<String, Vec<u8>>, String> {
    let mut keys = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |why: &str| format!("line {}: {why}", n + 1);
        let (user, hex) = line
            .rsplit_once(':')
            .ok_or_else(|| bad("not username:key"))?;
        if user.is_empty() {
            return Err(bad("no username"));
        }
        let key = decode_hex(hex).ok_or_else(|| bad("the key is not hexadecimal"))?;
        if key.is_empty() || key.len() > MAX_KEY {
            return Err(bad(&format!("a key must be 1 to {MAX_KEY} bytes")));
        }
        keys.insert(user.to_owned(), key);
    }
    Ok(keys)
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16);
    hex.as_bytes()
        .chunks(2)
        .map(|pair| Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8))
        .collect()
}

/// The records between OpenSSL and the socket: what the client sent, not yet read by OpenSSL,
/// and what OpenSSL wrote, not yet sent.
#[derive(Default)]
struct Records {
    input: Vec<u8>,
    input_at: usize,
    /// The client's stream has ended: OpenSSL reads the end once `input` is used up.
    eof: bool,
    output: Vec<u8>,
    output_at: usize,
}

impl Read for Records {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = &self.input[self.input_at..];
        if left.is_empty() {
            return if self.eof {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = left.len().min(buf.len());
        buf[..n].copy_from_slice(&left[..n]);
        self.input_at += n;
        Ok(n)
    }
}

impl Write for Records {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One client's TLS session with a pre-shared key, driven as rustls's `ServerConnection` is:
/// the caller moves records between it and the socket (`read_tls`, `write_tls`) and plaintext
/// in and out (`take_plaintext`, `write_plain`).
pub struct PskSession {
    stream: SslStream<Records>,
}

impl PskSession {
    pub fn new(context: &SslContext) -> io::Result<PskSession> {
        let ssl = Ssl::new(context).map_err(io::Error::other)?;
        let stream = SslStream::new(ssl, Records::default()).map_err(io::Error::other)?;
        Ok(PskSession { stream })
    }

    /// Runs the handshake to its end over `wire` (blocking, with its own deadline). On
    /// failure, the alert that says why is sent before the `Err`.
    pub fn handshake(&mut self, wire: &mut (impl Read + Write)) -> io::Result<()> {
        UNKNOWN_USER.with(|u| u.borrow_mut().take());
        loop {
            let step = self.stream.accept();
            while self.wants_write() {
                self.write_tls(wire)?;
            }
            match step {
                Ok(()) => return Ok(()),
                Err(e) if e.code() == ErrorCode::WANT_READ => {
                    if self.read_tls(wire)? == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the client left during the TLS handshake",
                        ));
                    }
                }
                Err(e) if e.code() == ErrorCode::WANT_WRITE => {}
                Err(e) => {
                    let why = match UNKNOWN_USER.with(|u| u.borrow_mut().take()) {
                        Some(user) => format!("no key for user {user:?}"),
                        None => e.to_string(),
                    };
                    return Err(io::Error::other(format!("TLS handshake: {why}")));
                }
            }
        }
    }

    /// Whether records wait to be sent.
    pub fn wants_write(&self) -> bool {
        let records = self.stream.get_ref();
        records.output_at < records.output.len()
    }

    /// Sends records to `wire`, as much as one write takes.
    pub fn write_tls(&mut self, wire: &mut dyn Write) -> io::Result<usize> {
        let records = self.stream.get_mut();
        let n = wire.write(&records.output[records.output_at..])?;
        records.output_at += n;
        if records.output_at == records.output.len() {
            records.output.clear();
            records.output_at = 0;
        }
        Ok(n)
    }

    /// Reads records from `wire`, one read; 0 at the end of the client's stream.
    pub fn read_tls(&mut self, wire: &mut dyn Read) -> io::Result<usize> {
        let records = self.stream.get_mut();
        records.input.drain(..records.input_at);
        records.input_at = 0;
        let had = records.input.len();
        records.input.resize(had + READ_CHUNK, 0);
        let got = wire.read(&mut records.input[had..]);
        records.input.truncate(had + *got.as_ref().unwrap_or(&0));
        if let Ok(0) = got {
            records.eof = true;
        }
        got
    }

    /// Decrypts what has come into `out`; true when the client has ended its side (its
    /// `close_notify`, or the end of its stream), `Err` for a record that does not decrypt.
    pub fn take_plaintext(&mut self, out: &mut Vec<u8>) -> io::Result<bool> {
        let mut chunk = [0; 16 << 10];
        loop {
            match self.stream.ssl_read(&mut chunk) {
                Ok(n) => out.extend_from_slice(&chunk[..n]),
                Err(e) if e.code() == ErrorCode::WANT_READ => return Ok(false),
                Err(e) if e.code() == ErrorCode::ZERO_RETURN => return Ok(true),
                // The stream ended without close_notify (OpenSSL 3 says so as an SSL error,
                // earlier ones as a system call error with no errno).
                Err(_) if self.at_end() => return Ok(true),
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            }
        }
    }

    fn at_end(&self) -> bool {
        let records = self.stream.get_ref();
        records.eof && records.input_at == records.input.len()
    }

    /// Encrypts all of `plain` into records to send.
    pub fn write_plain(&mut self, mut plain: &[u8]) -> io::Result<()> {
        while !plain.is_empty() {
            let n = self
                .stream
                .ssl_write(plain)
                .map_err(|e| io::Error::other(e.to_string()))?;
            plain = &plain[n..];
        }
        Ok(())
    }

    /// Queues `close_notify`.
    pub fn send_close_notify(&mut self) {
        // Sent: the records are queued whether or not the client's arrives later.
        let _: Result<ShutdownResult, _> = self.stream.shutdown();
    }

    /// The protocol and cipher suite, for the logs.
    pub fn describe(&self) -> String {
        let ssl = self.stream.ssl();
        let cipher = ssl.current_cipher().map_or("none", |c| c.name());
        format!("{}, {cipher}, pre-shared key", ssl.version_str())
    }
}
