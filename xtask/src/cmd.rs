//! Running external programs: echo each command, time it, and turn failure into an [`Error`] with
//! context; also owns the workspace root and xtask's small std-only error type.
//!
//! Every command runs from the workspace root, so paths in arguments and in output are the same
//! whichever directory `cargo xtask` was started from. Cargo is found through the `CARGO`
//! environment variable that `cargo run` sets (falling back to `cargo` on `PATH`), so the
//! toolchain that built xtask is also the one that runs the checks.

use std::borrow::Cow;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// xtask's error: a human-readable message, built up with context as it travels up.
///
/// A `String` is all a build script needs; nobody matches on the kind of failure.
#[derive(Debug)]
pub struct Error {
    msg: String,
}

impl Error {
    pub fn new(msg: impl Into<String>) -> Self {
        Error { msg: msg.into() }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds "what we were doing" to any displayable error, in the style of `anyhow::Context`.
pub trait Context<T> {
    fn with_context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn with_context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|err| Error::new(format!("{}: {err}", what())))
    }
}

/// The workspace root: the parent of this crate's manifest directory.
///
/// `CARGO_MANIFEST_DIR` is read at compile time, so the answer does not depend on the current
/// directory or on how the binary was started.
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ always has a parent directory: the workspace root")
        .to_path_buf()
}

/// Formats a duration the way every xtask message does: seconds with one decimal.
pub fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// A command line to run from the workspace root, with extra environment variables.
#[derive(Debug, Clone)]
pub struct Cmd {
    /// What is executed: `$CARGO` may be a long toolchain path.
    program: String,
    /// What is echoed: `cargo` rather than that long path, so logs read like what a person types.
    display: String,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    /// Variables removed from the child's environment.
    removed: Vec<String>,
}

impl Cmd {
    /// `$CARGO` (set by `cargo run`), or `cargo` from `PATH` when xtask is run some other way.
    pub fn cargo() -> Self {
        let program = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        Cmd {
            program,
            display: "cargo".to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            removed: Vec::new(),
        }
    }

    /// Any other program, looked up on `PATH`.
    pub fn new(program: &str) -> Self {
        Cmd {
            program: program.to_owned(),
            display: program.to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            removed: Vec::new(),
        }
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for the child only; xtask's own environment is untouched.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Removes an environment variable from the child's environment.
    pub fn env_remove(mut self, key: impl Into<String>) -> Self {
        self.removed.push(key.into());
        self
    }

    /// Echoes, runs and times the command; a non-zero exit becomes an error naming the command.
    pub fn run(&self) -> Result<()> {
        let started = Instant::now();
        let status = self.status()?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::new(format!(
                "`{self}` failed ({status}) after {}",
                secs(started.elapsed())
            )))
        }
    }

    /// Echoes, runs and times the command, and returns its exit status whatever it is.
    ///
    /// Only failing to start the program is an error here; use this to pass an exit code through.
    pub fn status(&self) -> Result<ExitStatus> {
        eprintln!("==> {self}");
        let started = Instant::now();
        let status = self.command().status().with_context(|| {
            format!(
                "could not start `{self}` (is `{}` installed?)",
                self.program
            )
        })?;
        eprintln!("    ({status}, took {})", secs(started.elapsed()));
        Ok(status)
    }

    /// Echoes, runs and times the command, capturing its stdout (stderr still goes to the
    /// terminal); a non-zero exit or non-UTF-8 output is an error.
    pub fn stdout(&self) -> Result<String> {
        eprintln!("==> {self}");
        let started = Instant::now();
        let output = self
            .command()
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| {
                format!(
                    "could not start `{self}` (is `{}` installed?)",
                    self.program
                )
            })?;
        let took = secs(started.elapsed());
        eprintln!("    ({}, took {took})", output.status);
        if !output.status.success() {
            return Err(Error::new(format!(
                "`{self}` failed ({}) after {took}",
                output.status
            )));
        }
        String::from_utf8(output.stdout).with_context(|| format!("`{self}` printed non-UTF-8"))
    }

    /// Echoes and runs the command with a time limit, capturing stdout and stderr; the child is
    /// killed (and the call fails) if it is still running when `limit` has passed.
    ///
    /// A non-zero exit is not an error here: the caller reads the [`Output`] and decides, since
    /// tools such as `qemu-io` explain their failures on stdout.
    pub fn output_within(&self, limit: Duration) -> Result<Output> {
        eprintln!("==> {self}");
        let started = Instant::now();
        let mut child = self
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| {
                format!(
                    "could not start `{self}` (is `{}` installed?)",
                    self.program
                )
            })?;
        // Each pipe gets its own reader thread so that a child filling one pipe never blocks
        // while we wait on it or on the other one.
        let stdout = child.stdout.take().map(drain);
        let stderr = child.stderr.take().map(drain);
        let status = loop {
            if let Some(status) = child
                .try_wait()
                .with_context(|| format!("waiting for `{self}`"))?
            {
                break status;
            }
            if started.elapsed() >= limit {
                // Killing closes the pipes, so the reader threads finish and nothing is leaked.
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::new(format!(
                    "`{self}` did not finish within {}; killed it",
                    secs(limit)
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let took = secs(started.elapsed());
        eprintln!("    ({status}, took {took})");
        let join = |reader: Option<std::thread::JoinHandle<Vec<u8>>>| {
            reader
                .map(|r| r.join().unwrap_or_default())
                .unwrap_or_default()
        };
        Ok(Output {
            status,
            stdout: join(stdout),
            stderr: join(stderr),
        })
    }

    /// Echoes and starts the command with stdin closed, stdout piped and stderr inherited, and
    /// hands the child to the caller: for servers that run alongside xtask. The caller must kill
    /// and reap it on every path (`nbd::Server` does so on drop).
    pub fn spawn_piped(&self) -> Result<Child> {
        eprintln!("==> {self} &");
        self.command()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| {
                format!(
                    "could not start `{self}` (is `{}` installed?)",
                    self.program
                )
            })
    }

    /// Runs the command silently and says whether it succeeded: for probes such as "is
    /// cargo-nextest installed?", where failure is an answer, not an error.
    pub fn probe(&self) -> bool {
        self.command()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command.args(&self.args).current_dir(project_root());
        for key in &self.removed {
            command.env_remove(key);
        }
        for (key, value) in &self.envs {
            command.env(key, value);
        }
        command
    }
}

/// Reads a pipe to its end on a thread of its own; the thread yields everything read.
fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        // A read error ends the capture early; what was read so far is still worth showing.
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

/// Shows the command the way it could be pasted into a shell:
/// `[env -u UNSET ...] KEY=value ... cargo args ...`.
impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.removed.is_empty() {
            f.write_str("env ")?;
            for key in &self.removed {
                write!(f, "-u {key} ")?;
            }
        }
        for (key, value) in &self.envs {
            write!(f, "{key}={} ", shell_quote(value))?;
        }
        f.write_str(&self.display)?;
        for arg in &self.args {
            write!(f, " {}", shell_quote(arg))?;
        }
        Ok(())
    }
}

/// Quotes a word for a POSIX shell, leaving plain words (the common case) alone.
fn shell_quote(word: &str) -> Cow<'_, str> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        Cow::Borrowed(word)
    } else {
        Cow::Owned(format!("'{}'", word.replace('\'', r"'\''")))
    }
}

/// The tools among `tools` that do not run (`<tool> --version` fails or is not found on `PATH`),
/// in the order given.
pub fn missing_tools<'a>(tools: &[&'a str]) -> Vec<&'a str> {
    tools
        .iter()
        .copied()
        .filter(|tool| !Cmd::new(tool).arg("--version").probe())
        .collect()
}

/// Installs the Debian `package` with apt-get when any of `tools` (which it provides) does not
/// run, so that xtask alone sets up a fresh CI machine (Debian, as root). Checks the tools again
/// afterwards.
pub fn ensure_apt_package(package: &str, tools: &[&str]) -> Result<()> {
    let missing = || missing_tools(tools).join(", ");
    ensure_apt_package_for(package, &missing)
}

/// Installs the Debian `package` with apt-get when `missing()` names something it provides
/// (an empty string: nothing is missing), and checks again afterwards. The general form of
/// [`ensure_apt_package`], for what is not a tool with `--version` (a library that
/// `pkg-config` finds, say).
pub fn ensure_apt_package_for(package: &str, missing: &dyn Fn() -> String) -> Result<()> {
    let before = missing();
    if before.is_empty() {
        return Ok(());
    }
    eprintln!("{before} not found; installing {package} with apt-get");
    let installed = Cmd::new("apt-get")
        .args(["update", "-qq"])
        .run()
        .and_then(|()| {
            Cmd::new("apt-get")
                .args(["install", "-y", "-qq", package])
                .run()
        });
    let still_missing = missing();
    match installed {
        Ok(()) if still_missing.is_empty() => Ok(()),
        Ok(()) => Err(Error::new(format!(
            "{package} is installed but {still_missing} still is not found"
        ))),
        Err(err) => Err(Error::new(format!(
            "{before} missing, and installing {package} failed ({err}); install it by hand \
             (Debian: apt-get install {package})"
        ))),
    }
}

/// The system GLib that the `glib` feature of `aio` links (through the `glib` crate, whose
/// build script asks `pkg-config`), installed with apt-get (`libglib2.0-dev`, which brings
/// `pkg-config`) when `pkg-config` does not find it. Probed and installed once per process;
/// `Err` says why it is unavailable.
pub fn ensure_glib() -> std::result::Result<(), String> {
    static GLIB: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    GLIB.get_or_init(|| {
        let missing = || {
            let found = Cmd::new("pkg-config")
                .args(["--exists", "--print-errors", GLIB_PKG_CONFIG])
                .probe();
            if found {
                String::new()
            } else {
                format!("{GLIB_PKG_CONFIG} (pkg-config)")
            }
        };
        ensure_apt_package_for("libglib2.0-dev", &missing).map_err(|e| e.to_string())
    })
    .clone()
}

/// The system OpenSSL that the NBD server example links for TLS with pre-shared keys (the
/// `openssl` crate, a dev-dependency of `aio`, whose build script asks `pkg-config`), installed
/// with apt-get (`pkg-config`, then `libssl-dev`) when `pkg-config` does not find it. Every
/// build of `aio`'s tests and examples needs it, so a failure stops the command.
pub fn ensure_openssl() -> Result<()> {
    ensure_apt_package("pkg-config", &["pkg-config"])?;
    let missing = || {
        let found = Cmd::new("pkg-config")
            .args(["--exists", "--print-errors", "openssl"])
            .probe();
        if found {
            String::new()
        } else {
            "openssl (pkg-config)".to_owned()
        }
    };
    ensure_apt_package_for("libssl-dev", &missing)
}

/// What `pkg-config` must find for the `glib` crate (0.20 asks for 2.56 or later).
const GLIB_PKG_CONFIG: &str = "glib-2.0 >= 2.56";

/// What kind of cargo target an executable is looked up for in cargo's JSON messages.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// An integration test (`--test NAME`).
    Test,
    /// An example (`--example NAME`).
    Example,
}

/// The `executable` of the `kind` target named `name` in cargo's JSON messages
/// (`--message-format json`), so that `CARGO_TARGET_DIR` and profiles are honoured.
pub fn artifact_executable(messages: &str, kind: Target, name: &str) -> Option<String> {
    let name = format!("\"name\":\"{name}\"");
    let kind = match kind {
        Target::Test => "\"test\":true",
        Target::Example => "\"kind\":[\"example\"]",
    };
    messages
        .lines()
        .filter(|line| line.contains(&name) && line.contains(kind))
        .find_map(|line| {
            let start = line.find("\"executable\":\"")? + "\"executable\":\"".len();
            let len = line[start..].find('"')?;
            Some(line[start..start + len].to_owned())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_is_pasteable_into_a_shell() {
        let cmd = Cmd::cargo()
            .env("RUSTFLAGS", "--cfg aio_loom")
            .env("LOOM_MAX_PREEMPTIONS", "2")
            .args(["test", "-p", "aio-core", "--test", "loom_notify"]);
        assert_eq!(
            cmd.to_string(),
            "RUSTFLAGS='--cfg aio_loom' LOOM_MAX_PREEMPTIONS=2 cargo test -p aio-core --test loom_notify"
        );
    }

    #[test]
    fn shell_quote_escapes_quotes_and_empty_words() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("loom_*"), "'loom_*'");
    }

    #[test]
    fn probe_reports_success_and_failure() {
        assert!(Cmd::cargo().arg("--version").probe());
        assert!(!Cmd::cargo().arg("no-such-subcommand-xtask-probe").probe());
        assert!(!Cmd::new("/nonexistent/program").probe());
    }

    #[test]
    fn project_root_is_the_workspace() {
        assert!(project_root().join("xtask").join("Cargo.toml").is_file());
    }
}
