//! `cargo xtask demo`: a tour of the NBD server example (`crates/aio/examples/nbd-server`),
//! driven from the outside by qemu's own tools, or by the built-in NBD client when they are
//! absent; owns the choice of client, the tour's steps, checks and summary.
//!
//! The server is built in release mode and started on a scratch image under `target/`, on its
//! default backend (`AIO_BACKEND` is left as the user has it; the server names the backend it
//! picked). Then `qemu-io` writes a pattern and reads it back verified, discards and zeroes ranges,
//! `qemu-img convert` copies a file of random data into the export and back out, `qemu-img bench`
//! measures reads, a second server requiring TLS (`--tls-creds`, with a throwaway certificate
//! `openssl` makes, then with a random pre-shared key) serves the same image to `qemu-img compare`
//! over TLS and refuses a client without it, and SIGTERM stops the server, which must say `stopped`
//! and exit 0. The image file on disk is checked as well, so what the server acknowledged is known
//! to be where it belongs.
//!
//! The demo never installs anything. When qemu-io or qemu-img is not on `PATH`, or when
//! `AIO_DEMO_CLIENT=builtin` asks for it, steps 4 to 7 are done instead by the client the
//! server's tests use (`crates/nbd-client`, see `demo/builtin.rs`), with the
//! same checks; `AIO_DEMO_CLIENT=qemu` insists on qemu's tools. The demo prints which client it
//! uses and why. The TLS step needs qemu's tools and `openssl`; without them it is skipped, and
//! the summary says why.
//!
//! The first line is printed before anything that can take time (probing the tools, the
//! build), so the demo says something at once; `--quiet` (`-q`) hides cargo's build output
//! (`cargo build --quiet`), the server's own lines and the per-step details, leaving that first
//! line, the step headers, the commands run (echoed on stderr) and the summary. (`cargo --quiet
//! xtask demo` is cargo's own quiet: it hides cargo's progress while it builds xtask itself,
//! which only happens after a change under `xtask/`, before this program runs; the alias is not
//! `--quiet` for that reason.)
//!
//! A watchdog bounds everything after the build to 60 s: it kills the server and every tool still
//! running, so a hang becomes an error (the built-in client then sees its connection close). The
//! older `aio` example `demo` (a tour of the event loop itself) is still there:
//! `cargo run --release -p aio --example demo`.

mod builtin;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::cmd::{Cmd, Context, Error, Result, secs};
use crate::nbd::{self, Deadline, Killer, Readiness, Scratch, Server};

/// Everything after the build must finish within this.
const WATCHDOG: Duration = Duration::from_secs(60);

/// Size of the exported image (and of the file copied through it).
const IMAGE_SIZE: u64 = 64 << 20;

const MIB: u64 = 1 << 20;

/// Steps printed as `[k/STEPS]`.
const STEPS: usize = 9;

/// Requests of the closing benchmark (`qemu-img bench`, or the built-in client's equivalent): a
/// fraction of a second on any machine.
const BENCH_REQUESTS: u32 = 20_000;
const BENCH_DEPTH: u32 = 32;

/// The environment variable that picks the client; see [`Driver::choose`].
const CLIENT_VAR: &str = "AIO_DEMO_CLIENT";

/// The qemu tools the qemu tour runs (it needs no `qemu-nbd`: our server takes its place).
const QEMU_TOOLS: [&str; 2] = ["qemu-io", "qemu-img"];
/// What a qemu built without GnuTLS says when asked for TLS credentials (its
/// `crypto/tlscredsx509.c`; nbdkit's tests detect it the same way); the TLS step is then
/// skipped.
const NO_GNUTLS: &str = "requires GNUTLS";

/// Where the built-in client lives, for messages.
const BUILTIN_CLIENT: &str = "crates/nbd-client";

/// The first line of every run, printed before anything that can take time.
const FIRST_LINE: &str = "demo: a tour of the NBD server example \
     (crates/aio/examples/nbd-server); step 1 builds it in release mode, which takes a while on \
     a cold cache";

/// `--quiet`: per-step details (and cargo's build output) are not printed.
static QUIET: AtomicBool = AtomicBool::new(false);

/// Runs the tour; `quiet` is `--quiet`.
pub fn run(quiet: bool) -> Result<ExitCode> {
    println!("{FIRST_LINE}");
    // Relaxed: set once here, before anything reads it, on this thread.
    QUIET.store(quiet, Ordering::Relaxed);
    // Chosen before the build so that a bad AIO_DEMO_CLIENT fails at once, and so that the
    // next thing the demo says is which client will drive the server.
    let driver = Driver::choose(
        std::env::var(CLIENT_VAR).ok().as_deref(),
        crate::cmd::missing_tools,
    )?;
    println!("demo: {}", driver.describe());
    step(
        1,
        &format!(
            "building the NBD server (cargo build --release -p aio --example nbd-server{})",
            if quiet { " --quiet" } else { "" }
        ),
    );
    let built = Instant::now();
    let exe = nbd::build_server_quietly(quiet)?;
    detail(format_args!("built in {}", secs(built.elapsed())));

    let started = Instant::now();
    let deadline = Deadline::after(WATCHDOG);
    let mut scratch = Scratch::create("nbd-demo")?;
    let tour = Tour {
        image: scratch.path().join("image.raw"),
        host: scratch.path().join("host.raw"),
        copy: scratch.path().join("copy.raw"),
        socket: scratch.socket_path("nbd.sock"),
        tls_socket: scratch.socket_path("nbd-tls.sock"),
        pki: scratch.path().join("pki"),
        deadline,
        notes: vec![driver.describe()],
        skipped: 0,
        driver,
    };
    let (notes, skipped) = tour.run(&exe)?;

    let passed = if skipped == 0 {
        format!("all {STEPS} steps passed")
    } else {
        format!(
            "{} of {STEPS} steps passed, {skipped} skipped",
            STEPS - skipped
        )
    };
    println!(
        "\ndemo: {passed} in {} (after the build)",
        secs(started.elapsed())
    );
    for note in notes {
        println!("  - {note}");
    }
    drop(scratch);
    Ok(ExitCode::SUCCESS)
}

/// Prints one indented line under a step, unless `--quiet`.
fn detail(line: impl std::fmt::Display) {
    // Relaxed: see `run`.
    if !QUIET.load(Ordering::Relaxed) {
        println!("      {line}");
    }
}

/// Prints a step line in the `[k/n] ...` style of the other demos.
fn step(k: usize, what: &str) {
    println!("[{k}/{STEPS}] {what}");
}

/// Which client drives the server in steps 4 to 7, and why that one.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Driver {
    /// qemu-io and qemu-img, the way a user of the server would drive it.
    Qemu,
    /// The built-in NBD client; `why` completes "because ...".
    Builtin { why: String },
}

impl Driver {
    /// Picks the client from the value of `AIO_DEMO_CLIENT` (`setting`) and, unless the setting
    /// decides alone, from which of qemu-io and qemu-img `missing` says do not run.
    ///
    /// `builtin` forces the built-in client, which is how its path is exercised on a machine
    /// that has qemu-utils; `qemu` insists on qemu's tools and fails without them; unset, empty
    /// or `auto` prefers qemu's tools and falls back to the built-in client. `missing` is a
    /// parameter so that the unit tests can play a machine without qemu.
    fn choose(
        setting: Option<&str>,
        missing: impl FnOnce(&[&'static str]) -> Vec<&'static str>,
    ) -> Result<Self> {
        match setting.map(str::trim) {
            Some("builtin") => Ok(Driver::Builtin {
                why: format!("{CLIENT_VAR}=builtin asks for it"),
            }),
            Some("qemu") => {
                let missing = missing(&QEMU_TOOLS);
                if missing.is_empty() {
                    Ok(Driver::Qemu)
                } else {
                    Err(Error::new(format!(
                        "{CLIENT_VAR}=qemu, but {} not on PATH (Debian: apt-get install \
                         qemu-utils; the demo installs nothing); unset {CLIENT_VAR} to use the \
                         built-in client instead",
                        are_missing(&missing)
                    )))
                }
            }
            None | Some("" | "auto") => {
                let missing = missing(&QEMU_TOOLS);
                if missing.is_empty() {
                    Ok(Driver::Qemu)
                } else {
                    Ok(Driver::Builtin {
                        why: format!(
                            "{} not on PATH (the demo installs nothing; Debian: apt-get install \
                             qemu-utils for the qemu tour)",
                            are_missing(&missing)
                        ),
                    })
                }
            }
            Some(other) => Err(Error::new(format!(
                "{CLIENT_VAR} must be `builtin`, `qemu` or `auto` (the default), not `{other}`"
            ))),
        }
    }

    /// One line saying which client is used and why, printed first and repeated in the summary.
    fn describe(&self) -> String {
        match self {
            Driver::Qemu => format!(
                "client: qemu-io and qemu-img (found on PATH; {CLIENT_VAR}=builtin uses the \
                 built-in client instead)"
            ),
            Driver::Builtin { why } => {
                format!("client: the built-in NBD client ({BUILTIN_CLIENT}), because {why}")
            }
        }
    }
}

/// "qemu-img is" or "qemu-io and qemu-img are", for messages about missing tools.
fn are_missing(tools: &[&str]) -> String {
    match tools {
        [one] => format!("{one} is"),
        _ => format!("{} are", tools.join(" and ")),
    }
}

/// The files and the deadline of one tour, and what it found out along the way.
#[derive(Debug)]
struct Tour {
    image: PathBuf,
    /// A file of random data on the host, copied into the export and back out.
    host: PathBuf,
    /// Where the copy back out lands.
    copy: PathBuf,
    socket: PathBuf,
    /// The TLS server's socket (step 8).
    tls_socket: PathBuf,
    /// The TLS step's certificate authority and server certificate.
    pki: PathBuf,
    deadline: Deadline,
    /// One line per step for the closing summary.
    notes: Vec<String>,
    /// How many steps were skipped (their notes say why).
    skipped: usize,
    driver: Driver,
}

impl Tour {
    /// Steps 2 to 9; returns the summary's notes and how many steps were skipped.
    fn run(mut self, exe: &Path) -> Result<(Vec<String>, usize)> {
        step(
            2,
            &format!(
                "creating a {} MiB image and a {} MiB file of random data",
                IMAGE_SIZE / MIB,
                IMAGE_SIZE / MIB
            ),
        );
        // A sparse image: it reads as zeros until the tour writes to it.
        File::create(&self.image)
            .and_then(|file| file.set_len(IMAGE_SIZE))
            .with_context(|| format!("creating {}", self.image.display()))?;
        nbd::write_random_file(&self.host, IMAGE_SIZE, 0x6465_6d6f)?;

        step(3, "starting nbd-server on a Unix socket (default backend)");
        // --persistent: the tour connects one tool after another; without it the server
        // would exit when the first one leaves, as qemu-nbd does without -t.
        let cmd = Cmd::new(&exe.display().to_string())
            .args(["--unix", &self.socket.display().to_string(), "--persistent"])
            .arg(self.image.display().to_string());
        let server = Server::start("nbd-server", &cmd, &Readiness::ReadyLine, self.deadline)?;
        let watchdog = Watchdog::arm(self.deadline, server.killer());
        for line in server.stdout() {
            detail(line);
        }
        let ready = server.ready_line().unwrap_or_default().to_owned();
        self.notes.push(format!("server started: {ready}"));

        // The server is killed on drop if any step fails, and the watchdog kills it (which
        // makes the tool or the built-in client waiting on it fail) if a step hangs.
        match self.driver {
            Driver::Qemu => {
                self.patterns()?;
                self.discard_and_zeroes()?;
                self.convert()?;
                self.bench()?;
            }
            Driver::Builtin { .. } => builtin::steps(&mut self)?,
        }
        self.tls(exe)?;

        step(9, "stopping the server with SIGTERM");
        let stopped = server.stop(self.deadline)?;
        watchdog.disarm();
        for line in stopped
            .stdout
            .iter()
            .skip_while(|line| **line != ready)
            .skip(1)
        {
            detail(line);
        }
        if !stopped.status.success() || !nbd::printed_stopped(&stopped.stdout) {
            return Err(Error::new(format!(
                "nbd-server did not stop cleanly on SIGTERM ({}); its stdout: {:?}",
                stopped.status, stopped.stdout
            )));
        }
        self.notes
            .push("SIGTERM: the server said `stopped` and exited 0".into());
        Ok((self.notes, self.skipped))
    }

    fn url(&self) -> String {
        nbd::unix_url(&self.socket)
    }

    /// Step 4: a pattern written through the export reads back verified, and a wrong pattern is
    /// caught (so the verification is known to be able to fail).
    fn patterns(&mut self) -> Result<()> {
        step(
            4,
            "qemu-io: writing 16 MiB of 0xa5 and reading it back verified",
        );
        self.qemu_io(&["write -P 0xa5 0 16M", "read -P 0xa5 0 16M"])?;
        let wrong = self.qemu_io_output(&["read -P 0x5a 0 4k"])?;
        if wrong.0 || !wrong.1.contains("verification failed") {
            return Err(Error::new(format!(
                "qemu-io read 0x5a where 0xa5 was written and did not notice:\n{}",
                wrong.1
            )));
        }
        detail("pattern verified; reading with a wrong pattern is reported as a mismatch");
        self.notes.push(
            "wrote 16 MiB of 0xa5 and read it back verified; a wrong pattern was caught".into(),
        );
        Ok(())
    }

    /// Step 5: discard and write zeroes, read the zeros back, and look at the file on disk.
    fn discard_and_zeroes(&mut self) -> Result<()> {
        step(
            5,
            "qemu-io: discarding 4-8 MiB, writing zeroes to 8-16 MiB, reading zeros back",
        );
        // One range without and one with permission to punch a hole (NBD_CMD_FLAG_NO_HOLE set
        // and clear), since a server may take different paths for the two.
        self.qemu_io(&["discard 4M 4M", "write -z 8M 4M", "write -z -u 12M 4M"])?;
        self.qemu_io(&["read -P 0 8M 8M", "read -P 0xa5 0 4M"])?;
        // NBD lets a server ignore a discard, so the discarded range may hold either the old
        // data or zeros; the tour reports which, and the disk check below requires one of them.
        let (zeros, _) = self.qemu_io_output(&["read -P 0 4M 4M"])?;
        let discarded = if zeros {
            "reads back as zeros"
        } else {
            "kept its data (NBD allows ignoring a discard)"
        };
        detail(format_args!(
            "zeros read back; the discarded range {discarded}"
        ));
        self.check_image_after_zeroes()?;
        self.notes.push(format!(
            "discard + write zeroes: zeros read back over NBD and found on disk; the discarded \
             range {discarded}"
        ));
        Ok(())
    }

    /// After step 5: the image file on disk must hold what the server acknowledged, whichever
    /// client wrote it.
    fn check_image_after_zeroes(&self) -> Result<()> {
        let disk = std::fs::read(&self.image)
            .with_context(|| format!("reading {}", self.image.display()))?;
        let at = |from: u64, to: u64| &disk[from as usize..to as usize];
        let all = all_bytes;
        let holds = disk.len() as u64 == IMAGE_SIZE
            && all(at(0, 4 * MIB), 0xa5)
            && (all(at(4 * MIB, 8 * MIB), 0xa5) || all(at(4 * MIB, 8 * MIB), 0))
            && all(at(8 * MIB, IMAGE_SIZE), 0);
        if !holds {
            return Err(Error::new(format!(
                "the image file {} does not hold what the server acknowledged (0xa5 at 0-4 MiB, \
                 0xa5 or zeros at 4-8 MiB, zeros from 8 MiB to the end, {IMAGE_SIZE} bytes long)",
                self.image.display()
            )));
        }
        detail("the image file on disk holds the same bytes");
        Ok(())
    }

    /// Step 6: `qemu-img convert` a host file into the export and back out; all three copies
    /// (host file, copy, image file) must be identical.
    fn convert(&mut self) -> Result<()> {
        step(
            6,
            "qemu-img: converting a random file into the export and back out, then comparing",
        );
        let url = self.url();
        let host = self.host.display().to_string();
        let copy = self.copy.display().to_string();
        self.tool(
            Cmd::new("qemu-img")
                .args(["convert", "-n", "-f", "raw", "-O", "raw"])
                .args([host.as_str(), url.as_str()]),
        )?;
        self.tool(
            Cmd::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "raw"])
                .args([url.as_str(), copy.as_str()]),
        )?;
        self.tool(
            Cmd::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "raw"])
                .args([host.as_str(), url.as_str()]),
        )?;
        self.check_copies()?;
        detail("qemu-img compare: identical; the copy and the image file match byte for byte");
        self.notes.push(format!(
            "qemu-img convert: {} MiB of random data in and back out, identical (qemu-img \
             compare, the copy and the image file on disk)",
            IMAGE_SIZE / MIB
        ));
        Ok(())
    }

    /// After step 6: the copy read back out and the image file must both equal the host file.
    fn check_copies(&self) -> Result<()> {
        for (what, path) in [
            ("copy read back out", &self.copy),
            ("image file", &self.image),
        ] {
            if !same_contents(&self.host, path)? {
                return Err(Error::new(format!(
                    "the {what} ({}) differs from the file copied in ({})",
                    path.display(),
                    self.host.display()
                )));
            }
        }
        Ok(())
    }

    /// Step 7: a short `qemu-img bench` of reads.
    fn bench(&mut self) -> Result<()> {
        step(
            7,
            &format!("qemu-img bench: {BENCH_REQUESTS} reads of 4 KiB, {BENCH_DEPTH} in parallel"),
        );
        let output = self.tool(
            Cmd::new("qemu-img")
                .args(["bench", "-f", "raw", "-t", "writeback", "-s", "4096"])
                .args(["-c", &BENCH_REQUESTS.to_string()])
                .args(["-d", &BENCH_DEPTH.to_string()])
                .arg(self.url()),
        )?;
        let elapsed = nbd::parse_bench_elapsed(&output).ok_or_else(|| {
            Error::new(format!(
                "no \"Run completed in X seconds\" in qemu-img's output:\n{output}"
            ))
        })?;
        let iops = f64::from(BENCH_REQUESTS) / elapsed;
        detail(format_args!("{elapsed:.3} s, {iops:.0} IOPS"));
        self.notes.push(format!(
            "qemu-img bench: {BENCH_REQUESTS} x 4 KiB reads at depth {BENCH_DEPTH} in \
             {elapsed:.3} s = {iops:.0} IOPS (cargo xtask bench nbd compares with qemu-nbd)"
        ));
        Ok(())
    }

    /// Step 8: a second server on the same image, requiring TLS; `qemu-img compare` reads the
    /// whole export over TLS and finds it equal to the file copied in at step 6, and a client
    /// without TLS is refused with the server's reason. Skipped, with the reason in the summary,
    /// under the built-in client (it has no TLS), without `openssl` (the demo installs
    /// nothing), or when qemu-img was built without GnuTLS.
    fn tls(&mut self, exe: &Path) -> Result<()> {
        step(
            8,
            "TLS: a second server with --tls-creds; qemu-img compare reads the export over TLS, \
             with a certificate, then with a pre-shared key, and a client without TLS is refused",
        );
        let skipped = match self.driver {
            Driver::Builtin { .. } => Some("the built-in client has no TLS".to_owned()),
            Driver::Qemu if !Cmd::new("openssl").arg("version").probe() => Some(
                "openssl is not on PATH to make a certificate (the demo installs nothing; \
                 Debian: apt-get install openssl)"
                    .to_owned(),
            ),
            Driver::Qemu => None,
        };
        if let Some(why) = skipped {
            self.skip_tls(&why);
            return Ok(());
        }
        nbd::make_pki(&self.pki)?;
        detail(format_args!(
            "a throwaway authority and a certificate for localhost in {}",
            self.pki.display()
        ));
        let (server, watchdog) = self.start_tls_server(exe, &self.pki, "nbd-server (TLS)")?;
        let compare = self.compare_over_tls(
            format!(
                "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                opt(&self.pki)
            ),
            ",tls-hostname=localhost",
        );
        let output = self.output(&compare)?;
        let text = both_streams(&output);
        if !output.status.success() && text.contains(NO_GNUTLS) {
            // A qemu built without GnuTLS knows the object type but cannot complete it.
            let why = "this qemu-img was built without GnuTLS (it says \"TLS credentials \
                       support requires GNUTLS\")";
            self.skip_tls(why);
            server.stop(self.deadline)?;
            watchdog.disarm();
            return Ok(());
        }
        if !output.status.success() {
            return Err(Error::new(format!(
                "`{compare}` failed ({}):\n{text}",
                output.status
            )));
        }
        detail("qemu-img compare over TLS: identical to the file copied in");
        let plain = Cmd::new("qemu-io")
            .args(["-f", "raw", "-c", "read 0 4k"])
            .arg(nbd::unix_url(&self.tls_socket));
        let output = self.output(&plain)?;
        let text = both_streams(&output);
        if output.status.success() || !text.contains("requires TLS") {
            return Err(Error::new(format!(
                "a client without TLS was not refused with the server's reason ({}):\n{text}",
                output.status
            )));
        }
        detail("a client without TLS: refused (\"this server requires TLS\")");
        self.stop_tls(server)?;
        watchdog.disarm();
        self.tls_psk(exe)?;
        self.notes.push(format!(
            "TLS: qemu-img compare read the {} MiB export over TLS, with a certificate and with \
             a pre-shared key, identical both times; a client without TLS was refused",
            IMAGE_SIZE / MIB
        ));
        Ok(())
    }

    /// Starts a server of the TLS step on the image with `--tls-creds dir`, and prints its
    /// ready line; the watchdog kills it at the demo's deadline.
    fn start_tls_server(&self, exe: &Path, dir: &Path, name: &str) -> Result<(Server, Watchdog)> {
        let cmd = Cmd::new(&exe.display().to_string())
            .args(["--unix", &self.tls_socket.display().to_string()])
            .args(["--persistent", "--tls-creds", &dir.display().to_string()])
            .arg(self.image.display().to_string());
        let server = Server::start(name, &cmd, &Readiness::ReadyLine, self.deadline)?;
        let watchdog = Watchdog::arm(self.deadline, server.killer());
        for line in server.stdout() {
            detail(line);
        }
        Ok((server, watchdog))
    }

    /// `qemu-img compare` of the TLS server's export, through the client credentials `object`
    /// (its id `tls0`) and with `more` NBD options, with the file copied in at step 6.
    fn compare_over_tls(&self, object: String, more: &str) -> Cmd {
        Cmd::new("qemu-img")
            .args(["compare", "--object"])
            .arg(object)
            .arg("--image-opts")
            .arg(format!(
                "driver=nbd,path={},tls-creds=tls0{more}",
                opt(&self.tls_socket)
            ))
            .arg(format!("driver=file,filename={}", opt(&self.host)))
    }

    /// Stops a server of the TLS step, which must say `stopped` and exit 0.
    fn stop_tls(&self, server: Server) -> Result<()> {
        let stopped = server.stop(self.deadline)?;
        if !stopped.status.success() || !nbd::printed_stopped(&stopped.stdout) {
            return Err(Error::new(format!(
                "the TLS server did not stop cleanly ({}); its stdout: {:?}",
                stopped.status, stopped.stdout
            )));
        }
        Ok(())
    }

    /// The TLS step's second half: the same image served with a pre-shared key instead of a
    /// certificate (a directory holding `keys.psk`, qemu's `tls-creds-psk` layout, given as
    /// `--tls-creds`), and `qemu-img compare` over it as the user `demo`.
    fn tls_psk(&mut self, exe: &Path) -> Result<()> {
        let dir = self.pki.with_file_name("psk");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let key = self.output(&Cmd::new("openssl").args(["rand", "-hex", "32"]))?;
        let key = String::from_utf8_lossy(&key.stdout);
        if !key.trim().bytes().all(|b| b.is_ascii_hexdigit()) || key.trim().len() != 64 {
            return Err(Error::new(format!("openssl rand -hex 32 printed {key:?}")));
        }
        let keys = dir.join("keys.psk");
        std::fs::write(&keys, format!("demo:{}\n", key.trim()))
            .with_context(|| format!("writing {}", keys.display()))?;
        detail(format_args!(
            "a random 256-bit key for the user `demo` in {}",
            keys.display()
        ));
        let (server, watchdog) =
            self.start_tls_server(exe, &dir, "nbd-server (TLS, pre-shared key)")?;
        let compare = self.compare_over_tls(
            format!(
                "tls-creds-psk,id=tls0,endpoint=client,dir={},username=demo",
                opt(&dir)
            ),
            "",
        );
        let output = self.output(&compare)?;
        if !output.status.success() {
            return Err(Error::new(format!(
                "`{compare}` failed ({}):\n{}",
                output.status,
                both_streams(&output)
            )));
        }
        detail("qemu-img compare over TLS with the pre-shared key: identical");
        self.stop_tls(server)?;
        watchdog.disarm();
        Ok(())
    }

    /// Skips the TLS step, saying why on its line and in the summary.
    fn skip_tls(&mut self, why: &str) {
        detail(format_args!("skipped: {why}"));
        self.notes.push(format!("TLS: skipped, because {why}"));
        self.skipped += 1;
    }

    /// Runs qemu-io commands against the export; any failure (a non-zero exit, an I/O error, a
    /// pattern mismatch) is an error carrying qemu-io's output.
    fn qemu_io(&self, commands: &[&str]) -> Result<()> {
        let (ok, text) = self.qemu_io_output(commands)?;
        if ok {
            Ok(())
        } else {
            Err(Error::new(format!("qemu-io {commands:?} failed:\n{text}")))
        }
    }

    /// Runs qemu-io commands; returns whether they all succeeded, and qemu-io's output.
    ///
    /// qemu-io reports failures on stdout as well as in its status (older versions exit 0 after
    /// a failed command), so both are checked.
    fn qemu_io_output(&self, commands: &[&str]) -> Result<(bool, String)> {
        let mut cmd = Cmd::new("qemu-io").args(["-f", "raw"]);
        for command in commands {
            cmd = cmd.args(["-c", command]);
        }
        let output = self.output(&cmd.arg(self.url()))?;
        let text = both_streams(&output);
        let ok = output.status.success() && !text.contains("failed");
        Ok((ok, text))
    }

    /// Runs a tool that must succeed, returning its stdout.
    fn tool(&self, cmd: Cmd) -> Result<String> {
        let output = self.output(&cmd)?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            return Err(Error::new(format!(
                "`{cmd}` failed ({}):\n{stdout}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(stdout)
    }

    /// Runs a command within what is left of the watchdog's allowance.
    fn output(&self, cmd: &Cmd) -> Result<std::process::Output> {
        let left = self.deadline.remaining();
        if left.is_zero() {
            return Err(watchdog_error());
        }
        cmd.output_within(left)
            .map_err(|err| Error::new(format!("{err} (watchdog: {})", secs(WATCHDOG))))
    }
}

/// A command's stdout then stderr, as text (for looking for a message in either).
fn both_streams(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn watchdog_error() -> Error {
    Error::new(format!(
        "watchdog: the demo did not finish within {} after the build",
        secs(WATCHDOG)
    ))
}

/// Whether every byte of `bytes` is `value`.
///
/// Compared a block at a time against a block of `value`s, because slice equality becomes
/// `memcmp` even in the unoptimized build `cargo xtask` runs, where a loop over the bytes would
/// take seconds for the demo's 64 MiB.
fn all_bytes(bytes: &[u8], value: u8) -> bool {
    let block = [value; 4096];
    bytes
        .chunks(block.len())
        .all(|chunk| chunk == &block[..chunk.len()])
}

/// Whether two files hold the same bytes, compared a chunk at a time.
fn same_contents(a: &Path, b: &Path) -> Result<bool> {
    const CHUNK: usize = 1 << 20;
    let open =
        |path: &Path| File::open(path).with_context(|| format!("opening {}", path.display()));
    let (fa, fb) = (open(a)?, open(b)?);
    let len = |file: &File, path: &Path| {
        file.metadata()
            .map(|m| m.len())
            .with_context(|| format!("reading the size of {}", path.display()))
    };
    if len(&fa, a)? != len(&fb, b)? {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let size = len(&fa, a)?;
    let mut offset = 0;
    while offset < size {
        let n = usize::try_from((size - offset).min(CHUNK as u64)).expect("at most CHUNK");
        fa.read_exact_at(&mut ba[..n], offset)
            .with_context(|| format!("reading {}", a.display()))?;
        fb.read_exact_at(&mut bb[..n], offset)
            .with_context(|| format!("reading {}", b.display()))?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
        offset += n as u64;
    }
    Ok(true)
}

/// Kills the server when the deadline passes, unless disarmed first. Killing the server makes
/// whichever tool is talking to it fail promptly, and every tool also runs under the same
/// deadline, so nothing waits past it.
#[derive(Debug)]
struct Watchdog {
    disarm: mpsc::Sender<()>,
}

impl Watchdog {
    fn arm(deadline: Deadline, server: Killer) -> Self {
        let (disarm, disarmed) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) =
                disarmed.recv_timeout(deadline.remaining())
            {
                eprintln!("{}; killing the server", watchdog_error());
                server.kill();
            }
        });
        Watchdog { disarm }
    }

    fn disarm(self) {
        // Dropping the sender would do as well; sending says what is meant.
        let _ = self.disarm.send(());
    }
}

/// `path` as a value in qemu's option syntax, which doubles a comma inside a value.
fn opt(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_contents_compares_length_and_bytes() {
        let scratch = Scratch::create("demo-unit-test").expect("scratch directory");
        let file = |name: &str, bytes: &[u8]| {
            let path = scratch.path().join(name);
            std::fs::write(&path, bytes).expect("write a test file");
            path
        };
        let a = file("a", &[1; 3000]);
        let b = file("b", &[1; 3000]);
        let shorter = file("c", &[1; 2999]);
        let mut other = vec![1; 3000];
        other[2999] = 2;
        let other = file("d", &other);
        assert!(same_contents(&a, &b).unwrap());
        assert!(!same_contents(&a, &shorter).unwrap());
        assert!(!same_contents(&a, &other).unwrap());
    }

    #[test]
    fn all_bytes_checks_every_block_including_a_short_last_one() {
        let mut bytes = vec![3u8; 4096 * 2 + 5];
        assert!(all_bytes(&bytes, 3));
        assert!(all_bytes(&[], 3));
        bytes[4096 * 2 + 4] = 4;
        assert!(!all_bytes(&bytes, 3));
        bytes[4096 * 2 + 4] = 3;
        bytes[0] = 0;
        assert!(!all_bytes(&bytes, 3));
    }

    /// A stand-in for `crate::cmd::missing_tools` on a machine where `absent` do not run.
    fn machine(
        absent: &'static [&'static str],
    ) -> impl FnOnce(&[&'static str]) -> Vec<&'static str> {
        move |tools| {
            tools
                .iter()
                .copied()
                .filter(|tool| absent.contains(tool))
                .collect()
        }
    }

    #[test]
    fn qemu_tools_are_preferred_when_present() {
        for setting in [None, Some(""), Some("auto"), Some("qemu")] {
            assert_eq!(
                Driver::choose(setting, machine(&[])).unwrap(),
                Driver::Qemu,
                "{setting:?}"
            );
        }
    }

    #[test]
    fn builtin_client_when_a_qemu_tool_is_missing_and_says_which() {
        let Driver::Builtin { why } = Driver::choose(None, machine(&["qemu-img"])).unwrap() else {
            panic!("qemu-img missing must select the built-in client");
        };
        assert!(why.starts_with("qemu-img is not on PATH"), "{why}");
        let Driver::Builtin { why } =
            Driver::choose(Some("auto"), machine(&["qemu-io", "qemu-img", "qemu-nbd"])).unwrap()
        else {
            panic!("no qemu at all must select the built-in client");
        };
        assert!(
            why.starts_with("qemu-io and qemu-img are not on PATH"),
            "{why}"
        );
        // qemu-nbd is not needed by the demo, so its absence alone changes nothing.
        assert_eq!(
            Driver::choose(None, machine(&["qemu-nbd"])).unwrap(),
            Driver::Qemu
        );
    }

    #[test]
    fn builtin_is_forced_without_probing_and_qemu_insisted_on_fails_without_it() {
        let forced = Driver::choose(Some("builtin"), |_: &[&'static str]| -> Vec<&'static str> {
            panic!("AIO_DEMO_CLIENT=builtin must not need to look for qemu")
        })
        .unwrap();
        assert!(forced.describe().contains("AIO_DEMO_CLIENT=builtin"));
        let err = Driver::choose(Some("qemu"), machine(&["qemu-io"])).unwrap_err();
        assert!(err.to_string().contains("qemu-io is not on PATH"), "{err}");
        let err = Driver::choose(Some("qemu-io"), machine(&[])).unwrap_err();
        assert!(err.to_string().contains("not `qemu-io`"), "{err}");
    }

    #[test]
    fn the_real_probe_finds_no_program_that_does_not_exist() {
        // `cargo` sets CARGO for the tests it runs; it names a program that certainly runs.
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        assert_eq!(
            crate::cmd::missing_tools(&["/nonexistent/qemu-img", &cargo]),
            ["/nonexistent/qemu-img"]
        );
    }
}
