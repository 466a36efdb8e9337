//! TLS (`--tls-creds DIR`): the server's certificate and key, and the thread that meets each
//! client of a TLS server, as qemu-nbd with `--tls-creds` does (the protocol's FORCEDTLS mode).
//!
//! The thread sends the greeting, reads the client flags, answers every option but
//! `NBD_OPT_STARTTLS` with `NBD_REP_ERR_TLS_REQD` (`NBD_OPT_ABORT` is acknowledged, and
//! `NBD_OPT_EXPORT_NAME`, which has no error reply, closes), acknowledges `NBD_OPT_STARTTLS`
//! and runs the TLS handshake (rustls: TLS 1.3 and 1.2, X.509 certificates). Then it hands one
//! end of a Unix socket pair to a context, whose connection goes on with the options from
//! there as on any socket, and relays between the pair and the client for the connection's
//! life: records from the client are decrypted onto the pair, what the context writes into the
//! pair (replies, READ data it sends from the page cache with `sendfile` included) is encrypted
//! to the client. So both connection engines and every `--aio` mode serve TLS clients unchanged,
//! and the cipher runs beside the context's thread, not on it. A close of either side ends the
//! other: the context's close sends the TLS `close_notify`, the client's end shuts down the
//! pair's writing side, which the connection reads as an end of stream.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

use crate::connection::Socket;
use crate::protocol::*;
use crate::session::{self, HANDSHAKE_LIMIT, Handshake};

/// The files in `--tls-creds DIR`, named as qemu's `tls-creds-x509` and nbdkit's
/// `--tls-certificates` name them: the server's certificate chain (its own first) and its
/// private key; with `--tls-verify-peer`, the authority that client certificates must chain to.
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const CA_CERT: &str = "ca-cert.pem";

/// Relays running: at exit, the server waits (a little) for them to send their clients the
/// end of the TLS stream ([`wait_for_relays`]).
static RELAYING: AtomicUsize = AtomicUsize::new(0);

/// Holds a place in [`RELAYING`] while a relay runs.
struct Relaying;

impl Relaying {
    fn start() -> Relaying {
        // Release/Acquire: only the count matters, what the relay sent is in the kernel.
        RELAYING.fetch_add(1, Ordering::AcqRel);
        Relaying
    }
}

impl Drop for Relaying {
    fn drop(&mut self) {
        RELAYING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// At exit, once every connection is closed (so every relay has seen its pair's end): waits up
/// to `limit` for the relays to send their `close_notify` and close, so that TLS clients see
/// the stream end cleanly rather than cut.
pub fn wait_for_relays(limit: Duration) {
    let deadline = Instant::now() + limit;
    while RELAYING.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// How many bytes the relay moves from one side before it looks at the other (and at most
/// what it holds decrypted or to encrypt per side).
const RELAY_CHUNK: usize = 256 << 10;

/// The server's TLS settings, from `--tls-creds DIR` (and `--tls-verify-peer`): an `Err` that
/// names the file for a missing or unreadable certificate or key, or a key that does not
/// match the certificate.
pub fn load(dir: &Path, verify_peer: bool) -> io::Result<Arc<ServerConfig>> {
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

/// Meets the client on `sock` (a blocking thread's whole work, for this connection's life):
/// the handshake up to TLS, then `serve` with the pair's end for a context and the handshake
/// settled so far, then the relay until either side closes. `name` is for the logs.
pub fn meet(
    sock: Socket,
    config: Arc<ServerConfig>,
    name: &str,
    verbose: bool,
    serve: impl FnOnce(Socket, Handshake),
) {
    let mut wire = Wire {
        sock: &sock,
        deadline: Some(Instant::now() + HANDSHAKE_LIMIT),
    };
    let result = (|| -> io::Result<Option<(ServerConnection, bool)>> {
        set_blocking(&sock, true)?;
        let no_zeroes = match before_tls(&mut wire)? {
            Before::Aborted => return Ok(None),
            Before::StartTls { no_zeroes } => no_zeroes,
        };
        let mut tls = ServerConnection::new(config).map_err(io::Error::other)?;
        while tls.is_handshaking() {
            tls.complete_io(&mut wire)
                .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake: {e}")))?;
        }
        Ok(Some((tls, no_zeroes)))
    })();
    let (tls, no_zeroes) = match result {
        Ok(Some(done)) => done,
        Ok(None) => {
            if verbose {
                eprintln!("nbd-server: {name}: NBD_OPT_ABORT before TLS");
            }
            return;
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            let limit = HANDSHAKE_LIMIT.as_secs();
            eprintln!("nbd-server: {name}: no TLS session after {limit} s ({e}), closing");
            sock.shutdown();
            return;
        }
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            if verbose {
                eprintln!("nbd-server: {name}: the client left before TLS");
            }
            return;
        }
        Err(e) => {
            eprintln!("nbd-server: {name}: {e}, closing");
            sock.shutdown();
            return;
        }
    };
    if verbose {
        eprintln!(
            "nbd-server: {name}: TLS on ({:?}, {:?})",
            tls.protocol_version(),
            tls.negotiated_cipher_suite().map(|s| s.suite())
        );
    }
    let (ours, theirs) = match UnixStream::pair() {
        Ok(pair) => pair,
        Err(e) => {
            eprintln!("nbd-server: {name}: socket pair: {e}, closing");
            return;
        }
    };
    let hs = Handshake {
        no_zeroes,
        tls: true,
        ..Handshake::default()
    };
    let relaying = Relaying::start();
    serve(Socket::Unix(theirs), hs);
    let relayed = relay(tls, &sock, &ours);
    sock.shutdown();
    drop(relaying);
    match relayed {
        Ok(()) => {}
        // A record that does not decrypt or parse: worth a line whatever the verbosity.
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            eprintln!("nbd-server: {name}: TLS: {e}, closing");
        }
        // The client vanished (reset, broken pipe).
        Err(e) if verbose => eprintln!("nbd-server: {name}: TLS relay: {e}"),
        Err(_) => {}
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

/// Moves bytes both ways until the client or the context closes: decrypted records from
/// `client` go to `pair`, what the context writes into `pair` goes to `client` encrypted.
/// Neither side is read while what came from it waits for the other, so the relay holds at most
/// about [`RELAY_CHUNK`] each way.
fn relay(mut tls: ServerConnection, client: &Socket, pair: &UnixStream) -> io::Result<()> {
    set_blocking(client, false)?;
    pair.set_nonblocking(true)?;
    // The relay bounds what it gives rustls itself; rustls must take all of it.
    tls.set_buffer_limit(None);
    let mut wire = Wire {
        sock: client,
        deadline: None,
    };
    let mut buf = vec![0; RELAY_CHUNK];
    // Decrypted bytes not yet taken by the pair, from `to_pair_at` on.
    let mut to_pair = Vec::new();
    let mut to_pair_at = 0;
    // The client ended its side (close_notify or end of stream); the context closed its end.
    let (mut client_done, mut context_done, mut pair_shut) = (false, false, false);
    loop {
        // Plaintext rustls holds (after the handshake, or a read below) goes to the pair.
        if to_pair_at == to_pair.len() && !client_done {
            to_pair.clear();
            to_pair_at = 0;
            client_done = take_plaintext(&mut tls, &mut to_pair)?;
        }
        while to_pair_at < to_pair.len() {
            match (&*pair).write(&to_pair[to_pair_at..]) {
                Ok(n) => to_pair_at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The context closed its end: the connection is over.
                Err(_) => return Ok(()),
            }
        }
        while tls.wants_write() {
            match tls.write_tls(&mut wire) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let pair_pending = to_pair_at < to_pair.len();
        if client_done && !pair_pending && !pair_shut {
            // The connection reads an end of stream, and still sends the replies it owes.
            let _ = pair.shutdown(Shutdown::Write);
            pair_shut = true;
        }
        if context_done && !tls.wants_write() {
            return Ok(());
        }
        let mut client_events = PollFlags::empty();
        if !client_done && !pair_pending {
            client_events |= PollFlags::IN;
        }
        if tls.wants_write() {
            client_events |= PollFlags::OUT;
        }
        let mut pair_events = PollFlags::empty();
        if !context_done && !tls.wants_write() {
            pair_events |= PollFlags::IN;
        }
        if pair_pending {
            pair_events |= PollFlags::OUT;
        }
        // A side with nothing to wait for is left out: its hang-up, which poll reports
        // whatever was asked, would wake this loop again and again.
        let mut fds = Vec::with_capacity(2);
        if !client_events.is_empty() {
            fds.push(PollFd::new(client, client_events));
        }
        if !pair_events.is_empty() {
            fds.push(PollFd::new(pair, pair_events));
        }
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let ready = |events: PollFlags, i: usize| {
            !events.is_empty()
                && fds[i]
                    .revents()
                    .intersects(events | PollFlags::HUP | PollFlags::ERR)
        };
        let client_ready = ready(client_events, 0);
        let pair_ready = ready(pair_events, usize::from(!client_events.is_empty()));
        drop(fds);
        if client_ready && client_events.contains(PollFlags::IN) {
            match tls.read_tls(&mut wire) {
                Ok(0) => client_done = true,
                Ok(_) => {
                    if let Err(e) = tls.process_new_packets() {
                        // Last gasp: the alert that says why, then close.
                        let _ = tls.write_tls(&mut wire);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                }
                Err(e) if is_transient(&e) => {}
                Err(_) => client_done = true,
            }
        }
        if pair_ready && pair_events.contains(PollFlags::IN) {
            match (&*pair).read(&mut buf) {
                Ok(0) => {
                    tls.send_close_notify();
                    context_done = true;
                }
                Ok(n) => tls.writer().write_all(&buf[..n])?,
                Err(e) if is_transient(&e) => {}
                Err(_) => {
                    tls.send_close_notify();
                    context_done = true;
                }
            }
        }
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
        let at = out.len();
        out.resize(at + (64 << 10), 0);
        match reader.read(&mut out[at..]) {
            Ok(0) => {
                out.truncate(at);
                return Ok(true);
            }
            Ok(n) => out.truncate(at + n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                out.truncate(at);
                return Ok(false);
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                out.truncate(at);
                return Ok(true);
            }
            Err(e) => return Err(e),
        }
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
        match self.sock {
            Socket::Tcp(s) => s
                .set_read_timeout(Some(left))
                .and(s.set_write_timeout(Some(left))),
            Socket::Unix(s) => s
                .set_read_timeout(Some(left))
                .and(s.set_write_timeout(Some(left))),
        }
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

fn set_blocking(sock: &Socket, blocking: bool) -> io::Result<()> {
    match sock {
        Socket::Tcp(s) => s.set_nonblocking(!blocking),
        Socket::Unix(s) => s.set_nonblocking(!blocking),
    }
}
