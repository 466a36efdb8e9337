//! TLS (`--tls-creds DIR`, `--tls-psk FILE`): the server's credentials, the thread that meets each
//! client of a TLS server up to the end of its TLS handshake, and the relay that then carries its
//! connection on a context, as qemu-nbd with `--tls-creds` does (the protocol's FORCEDTLS mode).
//!
//! The thread ([`meet`]; every step may block, so not on a context) sends the greeting, reads the
//! client flags, answers every option but `NBD_OPT_STARTTLS` with `NBD_REP_ERR_TLS_REQD`
//! (`NBD_OPT_ABORT` is acknowledged, and `NBD_OPT_EXPORT_NAME`, which has no error reply, closes),
//! acknowledges `NBD_OPT_STARTTLS` and runs the TLS handshake (TLS 1.3 and 1.2: rustls with X.509
//! certificates, or OpenSSL with pre-shared keys, `tls_psk.rs`; the [`Tls`] enum drives either the
//! same way), all within the handshake limit. The session then goes to the context the client was
//! dealt to ([`Session::serve`]): one end of a Unix socket pair becomes an ordinary connection
//! there, which goes on with the options from where the thread left them, and a [`Relay`] moves
//! bytes between the other end and the client, as two fd handlers of the same context: records from
//! the client decrypted onto the pair, what the connection writes into the pair (replies, READ data
//! sent from the page cache with `sendfile` included) encrypted to the client. So both connection
//! engines and every `--aio` mode serve TLS clients unchanged, and a request costs no thread hop
//! more than without TLS. (A relay thread per client, tried first, measured on 2 vCPUs 5.7 k
//! against 13.3 k fio 4 KiB reads per second at queue depth 1, 100 k against 124 k at 32, and 519
//! against 722 MiB/s for nbdcopy uploads, level on downloads: BENCHMARKS.md, "TLS".) A close of
//! either side ends the other: once the connection has closed, what it wrote is sent, then the TLS
//! `close_notify`, and the relay reads the client to its end of stream before closing (a lingering
//! close: no reset cuts the last bytes); from the connection's leaving, the client has [`LINGER`]
//! for all that. The client's end shuts down the pair's writing side, which the connection reads as
//! an end of stream.
//!
//! At most 64 handshakes run at once (`MAX_TLS_HANDSHAKES` in `main.rs`), so that
//! connections that never finish their handshake hold a bounded number of threads; a client
//! beyond them closes the oldest handshake under way (a real one takes milliseconds).

use std::cell::RefCell;
use std::io::{self, BufRead, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aio::{AioContext, ClockType, FdHandler, HandlerBuilder, Scale, Timer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

use crate::connection::{self, Served, Settings, Shard, Socket};
use crate::export::Export;
use crate::protocol::*;
use crate::session::{self, AfterTls, HANDSHAKE_LIMIT, Handshake, LINGER};
use crate::tls_psk::{self, PskSession};
use crate::{ClientSlot, TLS_CLIENT_ERRORS, TLS_SERVER_ERRORS};
use openssl::ssl::SslContext;

/// One client's TLS session, either kind, driven the same way by the handshake and the relay:
/// records in and out (`read_tls`, `write_tls`), plaintext in and out (`take_plaintext`,
/// `write_plain`).
enum Tls {
    X509(Box<ServerConnection>),
    Psk(PskSession),
}

impl Tls {
    fn new(creds: Creds) -> io::Result<Tls> {
        Ok(match creds {
            Creds::X509(config) => Tls::X509(Box::new(
                ServerConnection::new(config).map_err(io::Error::other)?,
            )),
            Creds::Psk(context) => Tls::Psk(PskSession::new(&context)?),
        })
    }

    /// Runs the handshake to its end over the blocking `wire`.
    fn handshake(&mut self, wire: &mut Wire<'_>) -> io::Result<()> {
        match self {
            Tls::X509(tls) => {
                while tls.is_handshaking() {
                    tls.complete_io(wire)
                        .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake: {e}")))?;
                }
                // The relay bounds what it gives rustls itself; rustls must take all of it.
                tls.set_buffer_limit(None);
                Ok(())
            }
            Tls::Psk(tls) => tls.handshake(wire),
        }
    }

    fn wants_write(&self) -> bool {
        match self {
            Tls::X509(tls) => tls.wants_write(),
            Tls::Psk(tls) => tls.wants_write(),
        }
    }

    fn write_tls(&mut self, wire: &mut Wire<'_>) -> io::Result<usize> {
        match self {
            Tls::X509(tls) => tls.write_tls(wire),
            Tls::Psk(tls) => tls.write_tls(wire),
        }
    }

    /// Reads records from the client, one read (0: its stream ended). rustls decrypts them
    /// here, OpenSSL in [`take_plaintext`](Self::take_plaintext); either way a record that does
    /// not decrypt is an `InvalidData` error (rustls's after the alert that says why is sent).
    fn read_tls(&mut self, wire: &mut Wire<'_>) -> io::Result<usize> {
        match self {
            Tls::X509(tls) => {
                let n = tls.read_tls(wire)?;
                if n > 0
                    && let Err(e) = tls.process_new_packets()
                {
                    let _ = tls.write_tls(wire);
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                }
                Ok(n)
            }
            Tls::Psk(tls) => tls.read_tls(wire),
        }
    }

    /// Moves the decrypted plaintext into `out`; true when the client has ended its side (its
    /// `close_notify`, or the stream ended without it).
    fn take_plaintext(&mut self, out: &mut Vec<u8>) -> io::Result<bool> {
        match self {
            Tls::X509(tls) => take_plaintext(tls, out),
            Tls::Psk(tls) => tls.take_plaintext(out),
        }
    }

    /// Encrypts all of `plain`, to be sent.
    fn write_plain(&mut self, plain: &[u8]) -> io::Result<()> {
        match self {
            Tls::X509(tls) => tls.writer().write_all(plain),
            Tls::Psk(tls) => tls.write_plain(plain),
        }
    }

    fn send_close_notify(&mut self) {
        match self {
            Tls::X509(tls) => tls.send_close_notify(),
            Tls::Psk(tls) => tls.send_close_notify(),
        }
    }

    /// The protocol and cipher suite, for the logs.
    fn describe(&self) -> String {
        match self {
            Tls::X509(tls) => format!(
                "{:?}, {:?}",
                tls.protocol_version(),
                tls.negotiated_cipher_suite().map(|s| s.suite())
            ),
            Tls::Psk(tls) => tls.describe(),
        }
    }
}

/// The files in `--tls-creds DIR`, named as qemu's `tls-creds-x509` and nbdkit's
/// `--tls-certificates` name them: the server's certificate chain (its own first) and its
/// private key; with `--tls-verify-peer`, the authority that client certificates must chain to.
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const CA_CERT: &str = "ca-cert.pem";

/// How many bytes the relay moves from one side before it looks at the other (and at most
/// what it holds decrypted or to encrypt per side). rustls encrypts each 16 KiB record into a
/// buffer of its own, freed once sent: 64 KiB of them stay under glibc's trim threshold
/// (128 KiB), where 256 KiB were handed back to the kernel and faulted in again for every
/// chunk (a fifth of the relay's CPU in a `perf` profile of a bulk copy).
const RELAY_CHUNK: usize = 64 << 10;

/// The server's TLS settings: X.509 (rustls) or pre-shared keys (OpenSSL, `tls_psk.rs`).
#[derive(Clone)]
pub enum Creds {
    X509(Arc<ServerConfig>),
    Psk(SslContext),
}

/// The server's TLS settings, from `--tls-creds DIR` (and `--tls-verify-peer`): the X.509
/// certificate and key, or, as in a directory of qemu's `tls-creds-psk`, pre-shared keys in
/// `DIR/keys.psk` when there is no certificate; an `Err` that names the file for a missing or
/// unreadable certificate, key or keys file, or a key that does not match the certificate.
pub fn load(dir: &Path, verify_peer: bool) -> io::Result<Creds> {
    let keys = dir.join(tls_psk::KEYS_FILE);
    if !dir.join(SERVER_CERT).exists() && keys.exists() {
        if verify_peer {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "--tls-verify-peer is for X.509 certificates, not pre-shared keys",
            ));
        }
        return tls_psk::load(&keys).map(Creds::Psk);
    }
    load_x509(dir, verify_peer).map(Creds::X509)
}

/// [`load`]'s X.509 settings.
fn load_x509(dir: &Path, verify_peer: bool) -> io::Result<Arc<ServerConfig>> {
    let bad = |file: &str, e: &dyn std::fmt::Display| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: {e}", dir.join(file).display()),
        )
    };
    let certs = CertificateDer::pem_file_iter(dir.join(SERVER_CERT))
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(SERVER_CERT, &e))?;
    if certs.is_empty() {
        return Err(bad(SERVER_CERT, &"no certificate in the file"));
    }
    let key =
        PrivateKeyDer::from_pem_file(dir.join(SERVER_KEY)).map_err(|e| bad(SERVER_KEY, &e))?;
    // ring rather than rustls's default, aws-lc-rs: it builds from C alone in seconds, where
    // aws-lc needs far longer in every CI build. rustls deprecates it for lacking the
    // post-quantum key exchange, which the GnuTLS of qemu 10 and libnbd 1.14 do not offer.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(SERVER_CERT, &e))?;
    let builder = if verify_peer {
        let mut roots = RootCertStore::empty();
        for cert in
            CertificateDer::pem_file_iter(dir.join(CA_CERT)).map_err(|e| bad(CA_CERT, &e))?
        {
            roots
                .add(cert.map_err(|e| bad(CA_CERT, &e))?)
                .map_err(|e| bad(CA_CERT, &e))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| bad(CA_CERT, &e))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| bad(SERVER_KEY, &e))?;
    Ok(Arc::new(config))
}

/// What the client's handshake came to before TLS.
enum Before {
    /// `NBD_OPT_STARTTLS` was acknowledged: the TLS handshake follows. Whether the client
    /// asked for no zeroes after `NBD_OPT_EXPORT_NAME`.
    StartTls { no_zeroes: bool },
    /// `NBD_OPT_ABORT`, acknowledged.
    Aborted,
}

/// A client that completed the TLS handshake, ready to be served on a context
/// ([`Session::serve`]).
pub struct Session {
    tls: Tls,
    sock: Socket,
    no_zeroes: bool,
    /// The handshake limit, from the client's connecting: the connection has what is left.
    deadline: Instant,
    name: String,
}

/// Meets the client on `sock`, on a thread of its own since every step may block: the
/// handshake up to TLS and the TLS handshake, within [`HANDSHAKE_LIMIT`]. `None` (logged) when
/// the client aborts, leaves, breaks the protocol or fails the TLS handshake. `name` is for
/// the logs.
pub fn meet(sock: Socket, creds: Creds, name: String, verbose: bool) -> Option<Session> {
    let deadline = Instant::now() + HANDSHAKE_LIMIT;
    let mut wire = Wire {
        sock: &sock,
        deadline: Some(deadline),
    };
    let result = (|| -> io::Result<Option<(Tls, bool)>> {
        sock.set_nonblocking(false)?;
        let no_zeroes = match before_tls(&mut wire)? {
            Before::Aborted => return Ok(None),
            Before::StartTls { no_zeroes } => no_zeroes,
        };
        let mut tls = Tls::new(creds)?;
        tls.handshake(&mut wire)?;
        Ok(Some((tls, no_zeroes)))
    })();
    let (tls, no_zeroes) = match result {
        Ok(Some(done)) => done,
        Ok(None) => {
            if verbose {
                eprintln!("nbd-server: {name}: NBD_OPT_ABORT before TLS");
            }
            return None;
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            let limit = HANDSHAKE_LIMIT.as_secs();
            TLS_CLIENT_ERRORS.log(verbose, || {
                format!("nbd-server: {name}: no TLS session after {limit} s ({e}), closing")
            });
            sock.shutdown();
            return None;
        }
        // A client that hangs up (one refused for lacking TLS, say) makes the next read end
        // or the next write fail: it left, which is no error of the server's.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
            ) =>
        {
            if verbose {
                eprintln!("nbd-server: {name}: the client left before TLS ({e})");
            }
            return None;
        }
        Err(e) => {
            TLS_CLIENT_ERRORS.log(verbose, || format!("nbd-server: {name}: {e}, closing"));
            sock.shutdown();
            return None;
        }
    };
    if verbose {
        eprintln!("nbd-server: {name}: TLS on ({})", tls.describe());
    }
    Some(Session {
        tls,
        sock,
        no_zeroes,
        deadline,
        name,
    })
}

impl Session {
    /// Serves the session on `ctx` (the context of this thread): a connection on one end of a
    /// Unix socket pair, from the options on, holding `slot`; and the relay between the other
    /// end and the client, as two fd handlers of the same context.
    pub fn serve(
        self,
        ctx: &AioContext,
        export: Arc<Export>,
        settings: Settings,
        slot: ClientSlot,
    ) {
        let Session {
            tls,
            sock,
            no_zeroes,
            deadline,
            name,
        } = self;
        let (ours, theirs) = match UnixStream::pair() {
            Ok(pair) => pair,
            Err(e) => {
                TLS_SERVER_ERRORS.log(settings.verbose, || {
                    format!("nbd-server: {name}: socket pair: {e}, closing")
                });
                return;
            }
        };
        let theirs = Socket::Unix(theirs);
        let prepared = sock
            .set_nonblocking(true)
            .and_then(|()| ours.set_nonblocking(true))
            .and_then(|()| crate::prepare(&theirs));
        if let Err(e) = prepared {
            TLS_SERVER_ERRORS.log(settings.verbose, || {
                format!("nbd-server: {name}: {e}, closing")
            });
            return;
        }
        let hs = Handshake {
            no_zeroes,
            tls: true,
            ..Handshake::default()
        };
        // The relay holds the client's place too: it may keep replies for the client up to its
        // linger after the connection has gone, and under `--shared` that is a client served.
        let slot = Rc::new(slot);
        let after_tls = AfterTls { hs, deadline };
        // Not started (shutdown has begun): the client's socket closes with `sock`.
        if let Some(conn) =
            Shard::start(ctx, theirs, export, settings, slot.clone(), Some(after_tls))
        {
            Relay::start(ctx, conn, tls, sock, ours, slot, name, settings.verbose);
        }
    }
}

/// The greeting, the client flags and the options before TLS, on a blocking socket whose
/// reads and writes end at the handshake's deadline.
fn before_tls(wire: &mut Wire<'_>) -> io::Result<Before> {
    let violation = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    wire.write_all(&greeting())?;
    let mut flags = [0; 4];
    wire.read_exact(&mut flags)?;
    let no_zeroes = session::client_flags(be32(&flags)).map_err(violation)?;
    loop {
        let mut header = [0; OPTION_HEADER_LEN];
        wire.read_exact(&mut header)?;
        let (option, len) =
            parse_option_header(&header).ok_or_else(|| violation("bad option magic".to_owned()))?;
        // Option data is read and dropped, whatever its size: before TLS none is looked at.
        let dropped = io::copy(
            &mut Read::by_ref(wire).take(u64::from(len)),
            &mut io::sink(),
        )?;
        if dropped < u64::from(len) {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut out = Vec::new();
        let before = match option {
            OPT_STARTTLS if len > 0 => {
                option_reply(
                    &mut out,
                    option,
                    REP_ERR_INVALID,
                    b"NBD_OPT_STARTTLS takes no data",
                );
                None
            }
            OPT_STARTTLS => {
                option_reply(&mut out, option, REP_ACK, &[]);
                Some(Before::StartTls { no_zeroes })
            }
            OPT_ABORT => {
                option_reply(&mut out, option, REP_ACK, &[]);
                Some(Before::Aborted)
            }
            OPT_EXPORT_NAME => {
                // It has no error reply: closing is the only answer.
                return Err(violation("NBD_OPT_EXPORT_NAME before TLS".to_owned()));
            }
            _ => {
                let msg = b"this server requires TLS: send NBD_OPT_STARTTLS first";
                option_reply(&mut out, option, REP_ERR_TLS_REQD, msg);
                None
            }
        };
        wire.write_all(&out)?;
        if let Some(before) = before {
            return Ok(before);
        }
    }
}

/// The relay between a TLS client and the connection that serves it, on the connection's
/// context: decrypted records from `client` go to `pair`, what the connection writes into its
/// end of the pair goes to `client` encrypted. Neither side is read while what came from it
/// waits for the other, so it holds at most about [`RELAY_CHUNK`] each way. It lives in its
/// context's [`Shard`] like a connection, until the connection's side has ended and the client
/// has been sent the rest, its `close_notify`, and has closed (or [`LINGER`] after the
/// connection left, or the shutdown grace period, ends it).
struct Relay {
    id: u64,
    tls: Tls,
    /// Each socket is shared with its handler while it has one (`end` drops both).
    client: Rc<Socket>,
    pair: Rc<UnixStream>,
    /// Decrypted bytes not yet taken by the pair, from `to_pair_at` on.
    to_pair: Vec<u8>,
    to_pair_at: usize,
    /// What the pair gave, to encrypt (allocated once the first reply comes).
    buf: Vec<u8>,
    /// The client's stream ended (close_notify, the end of the stream, an error): the pair's
    /// writing side is shut down once `to_pair` is out (`pair_shut`).
    client_eof: bool,
    pair_shut: bool,
    /// The connection no longer reads: what the client sends is read and dropped (so that
    /// closing does not reset the stream over the replies still on their way).
    discard: bool,
    /// The connection closed its end and everything it wrote was read: `close_notify` is
    /// queued, and once it is out the client's writing side is shut down (`write_shut`), and
    /// the relay waits for the client's end of stream.
    context_done: bool,
    write_shut: bool,
    /// Ended: sockets shut down, handlers dropped, out of the shard (or on its way out).
    ended: bool,
    /// Armed when the connection leaves: the longest the client may take to read the rest.
    linger: Option<Timer>,
    /// The handlers, and what each watches: (readable, writable).
    client_handler: Option<FdHandler>,
    pair_handler: Option<FdHandler>,
    watching: [(bool, bool); 2],
    weak: Weak<RefCell<Relay>>,
    /// The client's place under `--shared`, given back when the relay is dropped as well as
    /// the connection.
    _slot: Rc<ClientSlot>,
    name: String,
    verbose: bool,
}

impl Relay {
    /// Starts relaying for connection `conn` of this context's shard.
    #[allow(clippy::too_many_arguments)] // a session's parts, each moved into the relay
    fn start(
        ctx: &AioContext,
        conn: u64,
        tls: Tls,
        client: Socket,
        pair: UnixStream,
        slot: Rc<ClientSlot>,
        name: String,
        verbose: bool,
    ) {
        let shard = Shard::of(ctx);
        let id = connection::new_id();
        let relay = Rc::new(RefCell::new(Relay {
            id,
            tls,
            client: Rc::new(client),
            pair: Rc::new(pair),
            to_pair: Vec::new(),
            to_pair_at: 0,
            buf: Vec::new(),
            client_eof: false,
            pair_shut: false,
            discard: false,
            context_done: false,
            write_shut: false,
            ended: false,
            linger: None,
            client_handler: None,
            pair_handler: None,
            watching: [(false, false); 2],
            weak: Weak::new(),
            _slot: slot,
            name,
            verbose,
        }));
        let mut r = relay.borrow_mut();
        r.weak = Rc::downgrade(&relay);
        shard.insert(id, relay.clone());
        shard.watch_close(conn, id);
        // Records that came with the handshake's last flight may hold requests already.
        r.pump(ctx);
    }

    /// Moves what can move without waiting, then watches for what it waits for (or ends).
    fn pump(&mut self, ctx: &AioContext) {
        if self.ended {
            return;
        }
        if let Err(e) = self.shift() {
            self.end(ctx, Some(e));
            return;
        }
        let flushed = !self.tls.wants_write();
        if self.context_done && flushed && !self.write_shut {
            // Everything and close_notify are out: a lingering close, which reads the client
            // to its end rather than reset the stream while our last bytes are in flight.
            self.client.shutdown_how(Shutdown::Write);
            self.write_shut = true;
        }
        if self.write_shut && self.client_eof {
            self.end(ctx, None);
            return;
        }
        let pair_pending = self.to_pair_at < self.to_pair.len();
        let client = (
            !self.client_eof && (self.discard || !pair_pending),
            !self.write_shut && !flushed,
        );
        let pair = (!self.context_done && flushed, pair_pending);
        for (side, want) in [(0, client), (1, pair)] {
            if want == self.watching[side] {
                continue;
            }
            let builder = self.handler_for(ctx, side, want);
            let slot = if side == 0 {
                &mut self.client_handler
            } else {
                &mut self.pair_handler
            };
            // Changed in place when there is one (one update of the backend, not two).
            let watched = match (builder, slot.as_mut()) {
                (None, _) => {
                    *slot = None;
                    Ok(())
                }
                (Some(builder), Some(handler)) => builder.replace(handler),
                (Some(builder), None) => builder.register().map(|h| *slot = Some(h)),
            };
            if let Err(e) = watched {
                // The backend refused the fd: end rather than never move again.
                eprintln!("nbd-server: {}: cannot watch a TLS socket: {e}", self.name);
                self.end(ctx, None);
                return;
            }
            self.watching[side] = want;
        }
    }

    /// The moves that need no waiting: plaintext rustls holds to the pair, records rustls
    /// holds to the client, and the pair's shutdown once the client's side has ended.
    fn shift(&mut self) -> io::Result<()> {
        if self.to_pair_at == self.to_pair.len() {
            self.to_pair.clear();
            self.to_pair_at = 0;
            if !self.client_eof && !self.write_shut {
                self.client_eof = self.tls.take_plaintext(&mut self.to_pair)?;
            }
            if self.discard {
                self.to_pair.clear();
            }
        }
        while self.to_pair_at < self.to_pair.len() {
            match (&*self.pair).write(&self.to_pair[self.to_pair_at..]) {
                Ok(n) => self.to_pair_at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The connection closed its end: nothing more goes that way. What it wrote
                // before closing is still read from the pair and sent, up to its end of
                // stream; what the client sends is dropped.
                Err(_) => {
                    self.to_pair.clear();
                    self.to_pair_at = 0;
                    self.discard = true;
                    self.pair_shut = true;
                }
            }
        }
        if self.to_pair_at == self.to_pair.len() {
            self.to_pair.clear();
            self.to_pair_at = 0;
        }
        let mut wire = Wire {
            sock: &self.client,
            deadline: None,
        };
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut wire) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.client_eof && self.to_pair.is_empty() && !self.pair_shut {
            // The connection reads an end of stream, and still sends the replies it owes.
            let _ = self.pair.shutdown(Shutdown::Write);
            self.pair_shut = true;
        }
        Ok(())
    }

    /// The handler for side `side` (0: the client, 1: the pair) watching `want`, or none.
    fn handler_for<'a>(
        &self,
        ctx: &'a AioContext,
        side: usize,
        want: (bool, bool),
    ) -> Option<HandlerBuilder<'a, Rc<dyn AsFd>>> {
        if want == (false, false) {
            return None;
        }
        // One builder type for both sides: the handler owns a clone of the side's socket.
        let fd: Rc<dyn AsFd> = if side == 0 {
            self.client.clone()
        } else {
            self.pair.clone()
        };
        let mut builder = ctx.fd_handler(fd);
        if want.0 {
            let weak = self.weak.clone();
            builder = builder.on_read(move |ctx| {
                if let Some(relay) = weak.upgrade() {
                    relay.borrow_mut().readable(ctx, side);
                }
            });
        }
        if want.1 {
            let weak = self.weak.clone();
            builder = builder.on_write(move |ctx| {
                if let Some(relay) = weak.upgrade() {
                    relay.borrow_mut().pump(ctx);
                }
            });
        }
        Some(builder)
    }

    /// Side `side` is readable: reads from it, then moves whatever that lets move.
    fn readable(&mut self, ctx: &AioContext, side: usize) {
        if self.ended {
            return;
        }
        if side == 0 && self.write_shut {
            // After our close_notify: the client's last bytes, dropped, up to its end.
            if self.buf.is_empty() {
                self.buf = vec![0; RELAY_CHUNK];
            }
            match self.client.read(&mut self.buf) {
                Ok(1..) => {}
                Err(e) if is_transient(&e) => {}
                Ok(0) | Err(_) => self.client_eof = true,
            }
        } else if side == 0 {
            if let Err(e) = self.read_client() {
                self.end(ctx, Some(e));
                return;
            }
        } else {
            if self.buf.is_empty() {
                self.buf = vec![0; RELAY_CHUNK];
            }
            match (&*self.pair).read(&mut self.buf) {
                Ok(0) => self.context_ended(ctx),
                Ok(n) => {
                    if let Err(e) = self.tls.write_plain(&self.buf[..n]) {
                        self.end(ctx, Some(e));
                        return;
                    }
                }
                Err(e) if is_transient(&e) => {}
                Err(_) => self.context_ended(ctx),
            }
        }
        self.pump(ctx);
    }

    /// Reads records from the client, decrypting as it goes, up to a chunk of plaintext
    /// (rustls takes a few KiB per read; the client is read only when `to_pair` is empty, or
    /// when what it sends is dropped).
    fn read_client(&mut self) -> io::Result<()> {
        let mut wire = Wire {
            sock: &self.client,
            deadline: None,
        };
        // Bounded by what is read too: plaintext that is dropped does not fill `to_pair`.
        let mut taken = 0;
        while !self.client_eof && self.to_pair.len() < RELAY_CHUNK && taken < RELAY_CHUNK {
            match self.tls.read_tls(&mut wire) {
                Ok(0) => self.client_eof = true,
                Ok(n) => {
                    taken += n;
                    self.client_eof = self.tls.take_plaintext(&mut self.to_pair)?;
                    if self.discard {
                        self.to_pair.clear();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::InvalidData => return Err(e),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => self.client_eof = true,
            }
        }
        Ok(())
    }

    /// The connection has closed its end and everything it wrote is read: the TLS stream ends
    /// with `close_notify` once rustls has sent what it holds.
    fn context_ended(&mut self, ctx: &AioContext) {
        self.tls.send_close_notify();
        self.context_done = true;
        self.arm_linger(ctx);
    }

    /// From the connection's leaving, the client has [`LINGER`] to take the rest, as a
    /// connection gives it for its replies; then the relay ends, whatever is left.
    fn arm_linger(&mut self, ctx: &AioContext) {
        if self.linger.is_some() || self.ended {
            return;
        }
        let id = self.id;
        // Send closures only: the timer finds the relay again through its context.
        let timer = ctx.timer(ClockType::Realtime, Scale::NS, move || {
            if let Some(ctx) = AioContext::current() {
                Shard::of(&ctx).timer_fired(&ctx, id);
            }
        });
        timer.arm_after(LINGER);
        self.linger = Some(timer);
    }

    /// Ends the relay: both sockets closed (the connection then reads an end of stream), the
    /// handlers dropped, and the relay out of its shard.
    fn end(&mut self, ctx: &AioContext, error: Option<io::Error>) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        match error {
            // A record that does not decrypt or parse: worth a line whatever the verbosity.
            Some(e) if e.kind() == io::ErrorKind::InvalidData => {
                let name = &self.name;
                TLS_CLIENT_ERRORS.log(self.verbose, || {
                    format!("nbd-server: {name}: TLS: {e}, closing")
                });
            }
            // The client vanished (reset, broken pipe).
            Some(e) if self.verbose => eprintln!("nbd-server: {}: TLS relay: {e}", self.name),
            _ => {}
        }
        self.client.shutdown();
        let _ = self.pair.shutdown(Shutdown::Both);
        self.client_handler = None;
        self.pair_handler = None;
        self.watching = [(false, false); 2];
        self.linger = None;
        // On the context's next iteration, outside any borrow of the relay: the shard's
        // reference may be the last one.
        let id = self.id;
        ctx.schedule_oneshot(move || {
            if let Some(ctx) = AioContext::current() {
                Shard::of(&ctx).remove(id);
            }
        });
    }
}

impl Served for RefCell<Relay> {
    // The relay ends with its connection, which shutdown drains.
    fn drain(&self, _ctx: &AioContext) {}

    fn force_close(&self, ctx: &AioContext) {
        self.borrow_mut().end(ctx, None);
    }

    fn on_timer(&self, ctx: &AioContext) {
        let mut relay = self.borrow_mut();
        if relay.verbose {
            eprintln!(
                "nbd-server: {}: the client had not taken the rest {} s after its connection \
                 closed",
                relay.name,
                LINGER.as_secs()
            );
        }
        relay.end(ctx, None);
    }

    fn watched_closed(&self, ctx: &AioContext) {
        self.borrow_mut().arm_linger(ctx);
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Moves the plaintext rustls has decrypted into `out`; true when the client has ended its
/// side (its `close_notify`, or the stream ended without it).
fn take_plaintext(tls: &mut ServerConnection, out: &mut Vec<u8>) -> io::Result<bool> {
    let mut reader = tls.reader();
    loop {
        // From rustls's own buffer: nothing to zero or copy twice.
        let n = match reader.fill_buf() {
            Ok([]) => return Ok(true),
            Ok(chunk) => {
                out.extend_from_slice(chunk);
                chunk.len()
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(true),
            Err(e) => return Err(e),
        };
        reader.consume(n);
    }
}

/// The client's socket as `Read` and `Write` for rustls and the handshake: each call ends by
/// `deadline` when there is one (the socket is then blocking, with its timeouts set to what
/// is left; past it, calls fail with `TimedOut`).
struct Wire<'a> {
    sock: &'a Socket,
    deadline: Option<Instant>,
}

impl Wire<'_> {
    fn arm(&self) -> io::Result<()> {
        let Some(deadline) = self.deadline else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left < Duration::from_millis(1) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the handshake took too long",
            ));
        }
        self.sock.set_timeouts(Some(left))
    }
}

impl Read for Wire<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        self.sock.read(buf)
    }
}

impl Write for Wire<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm()?;
        self.sock.write_vectored(&[io::IoSlice::new(buf)])
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
