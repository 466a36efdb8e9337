//! `cargo xtask ci`: the one command CI runs; owns the list and order of checks and the summary.
//!
//! Steps, in order, stopping at the first failure (DESIGN.md §7, style guideline 17):
//!
//! 1. `fmt`: `cargo fmt --all -- --check`.
//! 2. `clippy`: `-D warnings` over all targets with all features (the facade's features are
//!    additive, so the union is a valid build), then once per backend feature set of `aio`.
//! 3. `test`: the whole workspace with all features, under cargo-nextest when installed (plus
//!    `cargo test --doc`, since nextest does not run doctests), else plain `cargo test`.
//!    qemu-utils (qemu-img, qemu-io, qemu-nbd) and python3-libnbd (libnbd's Python bindings and
//!    nbdsh), which the NBD server's tests use, are installed with apt-get first when missing.
//! 4. `test-matrix`: `aio` alone with each feature set in [`FEATURE_SETS`], then `aio-tests`.
//! 5. `loom`: every `crates/<crate>/tests/loom_*.rs` model under `--cfg aio_loom`, release mode,
//!    `LOOM_MAX_PREEMPTIONS=2`, in its own target directory.
//! 6. `memcheck`: the test binaries in [`MEMCHECK`] under valgrind memcheck, which must report no
//!    invalid access and no definite leak (the bottom-half list frees nodes by hand; the timer
//!    tests prove that dropped groups and timers free every callback). Valgrind is
//!    installed with apt-get when it is missing.
//! 7. `doc`: `cargo doc` with `RUSTDOCFLAGS=-D warnings`.
//! 8. `tidy`: house-style checks, in process (see `tidy.rs`).
//!
//! `--quick` skips `test-matrix`, `loom` and `memcheck`, the slowest steps, for local iteration.
//! The exit code is 0 only if every step that ran passed. `.ci/run` calls this, so
//! "`cargo xtask ci` passes locally" means "CI is green".

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::cmd::{Cmd, Context, Error, Result, Target, artifact_executable, project_root, secs};
use crate::tidy;

/// Feature sets of the `aio` facade that are built, linted and tested on their own, as
/// `-p aio --no-default-features --features <set>`.
///
/// One entry per backend combination worth proving in isolation. Today only the poll backend
/// exists; as the other backends land, add `"epoll"` and `"io-uring"` here (and combinations such
/// as `"poll,epoll"` if `AutoMonitor`'s fallback between them needs its own run).
pub const FEATURE_SETS: &[&str] = &[
    "poll",
    "epoll",
    "io-uring",
    "poll,epoll",
    "poll,epoll,io-uring",
];

/// Values of `AIO_BACKEND` under which the conformance suite runs on the facade's default
/// context (`tests/tests/conformance_auto.rs`), proving the backend choice as well as each
/// backend. On a machine without io_uring the `io_uring` run reports its cases as ignored (the
/// test crate's build script probes for it).
pub const BACKENDS: &[&str] = &["poll", "poll+epoll", "epoll", "io_uring"];

/// Crates that carry loom models as `crates/<crate>/tests/loom_*.rs` (directory name = package
/// name). Listing a crate here asserts that it has models: finding none fails the step, since a
/// check that cannot fail is a defect.
const LOOM_CRATES: &[&str] = &["aio-core", "threadpool", "timers"];

/// Loom's preemption bound. DESIGN.md §7 fixes it at 2: exhaustive beyond that, the models
/// would not finish inside the CI budget on two cores.
const LOOM_MAX_PREEMPTIONS: &str = "2";

/// The loom models' cfg; namespaced (not bare `loom`) so dependencies that test for `cfg(loom)`
/// are not switched into their own loom mode (style guideline 12).
const LOOM_CFG: &str = "--cfg aio_loom";

/// Test binaries run under valgrind memcheck, as (package, integration test target): the
/// ownership paths of bottom-half nodes, and the whole conformance suite on the poll backend.
const MEMCHECK: &[(&str, &str)] = &[
    ("aio-core", "bh_memory"),
    ("aio-tests", "conformance_poll"),
    ("aio-tests", "conformance_epoll"),
    // Timer lifetimes: group drop with armed timers, callbacks that own or drop their timer,
    // nested runs and a panicking callback.
    ("timers", "lifecycle"),
    ("timers", "callbacks"),
];

/// Whether to run every step or skip the slow ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Full,
    /// `--quick`: skips the steps with `full_only` set.
    Quick,
}

/// One named CI step.
struct Step {
    name: &'static str,
    /// Skipped by `--quick`.
    full_only: bool,
    run: fn(&Path) -> Result<()>,
}

impl Step {
    /// A step that runs in both modes.
    const fn always(name: &'static str, run: fn(&Path) -> Result<()>) -> Self {
        Step {
            name,
            full_only: false,
            run,
        }
    }

    /// A step that `--quick` skips.
    const fn full_only(name: &'static str, run: fn(&Path) -> Result<()>) -> Self {
        Step {
            name,
            full_only: true,
            run,
        }
    }
}

/// The steps, in the order they run.
const STEPS: &[Step] = &[
    Step::always("fmt", fmt),
    Step::always("clippy", clippy),
    Step::always("test", test),
    Step::full_only("test-matrix", test_matrix),
    Step::full_only("loom", loom),
    Step::full_only("memcheck", memcheck),
    Step::always("doc", doc),
    Step::always("tidy", tidy),
];

/// What happened to one step, for the summary table.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Passed(Duration),
    Failed(Duration),
    /// Skipped by `--quick`.
    Skipped,
    /// Not reached because an earlier step failed.
    NotRun,
}

pub fn run(mode: Mode) -> Result<ExitCode> {
    let root = project_root();
    let mode_name = match mode {
        Mode::Full => "full",
        Mode::Quick => "quick (skipping test-matrix, loom and memcheck)",
    };
    // Nothing depends on CI today; printing it makes logs say where they came from.
    let ci_env = std::env::var("CI").unwrap_or_else(|_| "<unset>".to_owned());
    eprintln!("ci: mode {mode_name}, CI={ci_env}, root {}", root.display());

    let started = Instant::now();
    let mut outcomes = Vec::with_capacity(STEPS.len());
    let mut failure = None;
    for (i, step) in STEPS.iter().enumerate() {
        let outcome = if failure.is_some() {
            Outcome::NotRun
        } else if mode == Mode::Quick && step.full_only {
            eprintln!(
                "\n=== [{}/{}] {}: skipped (--quick)",
                i + 1,
                STEPS.len(),
                step.name
            );
            Outcome::Skipped
        } else {
            eprintln!("\n=== [{}/{}] {}", i + 1, STEPS.len(), step.name);
            let step_started = Instant::now();
            let result = (step.run)(&root);
            let took = step_started.elapsed();
            match result {
                Ok(()) => Outcome::Passed(took),
                Err(err) => {
                    failure = Some((step.name, err));
                    Outcome::Failed(took)
                }
            }
        };
        outcomes.push(outcome);
    }

    eprintln!("\n{}", summary(&outcomes));
    let total = secs(started.elapsed());
    match failure {
        Some((name, err)) => Err(Error::new(format!(
            "ci: step `{name}` failed (total {total}):\n  {err}"
        ))),
        None => {
            let passed = outcomes
                .iter()
                .filter(|o| matches!(o, Outcome::Passed(_)))
                .count();
            let skipped = outcomes
                .iter()
                .filter(|o| matches!(o, Outcome::Skipped))
                .count();
            let skipped = match skipped {
                0 => String::new(),
                n => format!(", {n} skipped by --quick"),
            };
            eprintln!("ci: {passed} steps passed{skipped} in {total}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The table printed at the end, whether or not a step failed.
fn summary(outcomes: &[Outcome]) -> String {
    let mut table = String::from("ci summary:\n");
    for (step, outcome) in STEPS.iter().zip(outcomes) {
        let (result, took) = match outcome {
            Outcome::Passed(d) => ("passed", secs(*d)),
            Outcome::Failed(d) => ("FAILED", secs(*d)),
            Outcome::Skipped => ("skipped", String::new()),
            Outcome::NotRun => ("not run", String::new()),
        };
        let row = format!("  {:<12} {:<8} {:>9}", step.name, result, took);
        table.push_str(row.trim_end());
        table.push('\n');
    }
    table
}

fn fmt(_root: &Path) -> Result<()> {
    Cmd::cargo().args(["fmt", "--all", "--", "--check"]).run()
}

fn clippy(_root: &Path) -> Result<()> {
    Cmd::cargo()
        .args(["clippy", "--workspace", "--all-targets", "--all-features"])
        .args(["--", "-D", "warnings"])
        .run()?;
    // The union of features can hide code that only compiles (or only stays warning-free) when a
    // backend is alone: an import used only by another backend's arm, say.
    for set in FEATURE_SETS {
        Cmd::cargo()
            .args([
                "clippy",
                "-p",
                "aio",
                "--all-targets",
                "--no-default-features",
            ])
            .args(["--features", set, "--", "-D", "warnings"])
            .run()?;
    }
    Ok(())
}

fn test(_root: &Path) -> Result<()> {
    // The NBD server's tests drive it with qemu-io and qemu-img; without them those tests skip
    // with a printed reason, so a failed install is a warning, not a failure.
    if let Err(e) = crate::nbd::ensure_qemu_utils() {
        eprintln!("warning: {e}; the qemu-utils NBD tests will be skipped");
    }
    // libnbd, through its Python bindings, is the second real client of those tests. They are
    // probed as the test does (a Python on PATH, e.g. pyenv's, may lack them while the
    // system's has them, and then nbdsh, which runs `env python3`, fails too).
    let has_libnbd = ["python3", "/usr/bin/python3"]
        .into_iter()
        .any(|python| Cmd::new(python).args(["-c", "import nbd"]).probe());
    if !has_libnbd && let Err(e) = crate::cmd::ensure_apt_package("python3-libnbd", &["nbdsh"]) {
        eprintln!("warning: {e}; the libnbd NBD test will be skipped");
    }
    if Cmd::cargo().args(["nextest", "--version"]).probe() {
        eprintln!("test runner: cargo-nextest");
        Cmd::cargo()
            .args([
                "nextest",
                "run",
                "--workspace",
                "--all-features",
                "--no-fail-fast",
            ])
            .run()?;
        // nextest runs only test binaries; doctests need cargo's own runner.
        Cmd::cargo()
            .args(["test", "--workspace", "--doc", "--all-features"])
            .run()
    } else {
        // `cargo test` runs doctests too, so there is no separate doctest run on this path.
        eprintln!("test runner: cargo test (cargo-nextest not installed)");
        Cmd::cargo()
            .args(["test", "--workspace", "--all-features", "--no-fail-fast"])
            .run()
    }
}

fn test_matrix(_root: &Path) -> Result<()> {
    for set in FEATURE_SETS {
        Cmd::cargo()
            .args([
                "test",
                "-p",
                "aio",
                "--no-default-features",
                "--features",
                set,
            ])
            .run()?;
    }
    // The conformance and cross-crate scenarios, once, with the features aio-tests asks for.
    Cmd::cargo().args(["test", "-p", "aio-tests"]).run()?;
    for backend in BACKENDS {
        Cmd::cargo()
            .args(["test", "-p", "aio-tests", "--test", "conformance_auto"])
            .env("AIO_BACKEND", *backend)
            .run()?;
    }
    Ok(())
}

fn loom(root: &Path) -> Result<()> {
    for krate in LOOM_CRATES {
        let tests_dir = root.join("crates").join(krate).join("tests");
        let models = loom_models(&tests_dir)?;
        if models.is_empty() {
            return Err(Error::new(format!(
                "no loom models found: expected {}/loom_*.rs",
                tests_dir.strip_prefix(root).unwrap_or(&tests_dir).display()
            )));
        }

        // Prove that each model file really holds tests under the cfg: a file whose
        // `#![cfg(aio_loom)]` never matches compiles to an empty binary that "passes". Listing
        // builds the binaries, so the run below only executes them.
        for model in &models {
            let listing = loom_cargo()
                .args(["test", "-p", krate, "--release", "--test", model])
                .args(["--", "--list", "--format", "terse"])
                .stdout()?;
            if !listing.lines().any(|line| line.ends_with(": test")) {
                return Err(Error::new(format!(
                    "crates/{krate}/tests/{model}.rs has no tests under `{LOOM_CFG}`"
                )));
            }
        }

        loom_cargo()
            .args(["test", "-p", krate, "--release"])
            .args(models.iter().flat_map(|m| ["--test", m.as_str()]))
            .run()?;
    }
    Ok(())
}

fn memcheck(_root: &Path) -> Result<()> {
    crate::cmd::ensure_apt_package("valgrind", &["valgrind"])?;
    for (package, test) in MEMCHECK {
        let messages = Cmd::cargo()
            .args(["test", "-p", package, "--test", test, "--no-run"])
            .args(["--message-format", "json"])
            .stdout()?;
        let exe = artifact_executable(&messages, Target::Test, test).ok_or_else(|| {
            Error::new(format!(
                "cargo built no executable for `-p {package} --test {test}`"
            ))
        })?;
        Cmd::new("valgrind")
            .args([
                "--error-exitcode=9",
                "--leak-check=full",
                "--errors-for-leak-kinds=definite",
            ])
            .args(["-q", exe.as_str(), "--test-threads=1"])
            .run()?;
    }
    Ok(())
}

/// `cargo` set up for loom: the cfg, the preemption bound, and a separate target directory so that
/// switching RUSTFLAGS does not throw away the normal build cache (and vice versa).
fn loom_cargo() -> Cmd {
    let mut cmd = Cmd::cargo()
        .env(
            "RUSTFLAGS",
            append_flags(std::env::var("RUSTFLAGS").ok(), LOOM_CFG),
        )
        .env("LOOM_MAX_PREEMPTIONS", LOOM_MAX_PREEMPTIONS)
        .env(
            "CARGO_TARGET_DIR",
            project_root()
                .join("target")
                .join("loom")
                .display()
                .to_string(),
        );
    // Cargo prefers CARGO_ENCODED_RUSTFLAGS over RUSTFLAGS; if it were set, the cfg would be
    // silently dropped and every model would compile to nothing.
    if std::env::var_os("CARGO_ENCODED_RUSTFLAGS").is_some() {
        cmd = cmd.env_remove("CARGO_ENCODED_RUSTFLAGS");
    }
    cmd
}

/// Test target names (file stems) of `dir/loom_*.rs`, sorted so the command line is stable.
fn loom_models(dir: &Path) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        // No tests/ directory at all simply means no models; the caller reports that.
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(Error::new(format!("reading {}: {err}", dir.display()))),
    };
    let mut models = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stem) = name.strip_suffix(".rs")
            && stem.starts_with("loom_")
            && entry.path().is_file()
        {
            models.push(stem.to_owned());
        }
    }
    models.sort();
    Ok(models)
}

fn doc(_root: &Path) -> Result<()> {
    let mut cmd = Cmd::cargo()
        .env(
            "RUSTDOCFLAGS",
            append_flags(std::env::var("RUSTDOCFLAGS").ok(), "-D warnings"),
        )
        .args(["doc", "--workspace", "--no-deps", "--all-features"]);
    // Same reason as in `loom_cargo`: the encoded form would win and drop `-D warnings`.
    if std::env::var_os("CARGO_ENCODED_RUSTDOCFLAGS").is_some() {
        cmd = cmd.env_remove("CARGO_ENCODED_RUSTDOCFLAGS");
    }
    cmd.run()
}

fn tidy(root: &Path) -> Result<()> {
    tidy::check(root)
}

/// Adds our flags after the user's own, so a caller's RUSTFLAGS are kept rather than replaced.
fn append_flags(existing: Option<String>, ours: &str) -> String {
    match existing {
        Some(existing) if !existing.trim().is_empty() => format!("{} {ours}", existing.trim()),
        _ => ours.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_flags_keeps_existing_flags() {
        assert_eq!(append_flags(None, "-D warnings"), "-D warnings");
        assert_eq!(
            append_flags(Some("  ".into()), "-D warnings"),
            "-D warnings"
        );
        assert_eq!(
            append_flags(Some("-C debuginfo=0".into()), "--cfg aio_loom"),
            "-C debuginfo=0 --cfg aio_loom"
        );
    }

    #[test]
    fn loom_models_globs_loom_star_rs_sorted() {
        let dir = std::env::temp_dir().join(format!("xtask-loom-glob-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("loom_dir.rs")).unwrap();
        for name in [
            "loom_notify.rs",
            "loom_bh.rs",
            "notify.rs",
            "loom_x.txt",
            "xloom_y.rs",
        ] {
            std::fs::write(dir.join(name), "").unwrap();
        }
        let models = loom_models(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(models.unwrap(), ["loom_bh", "loom_notify"]);
    }

    #[test]
    fn loom_models_of_a_missing_dir_is_empty() {
        assert!(
            loom_models(Path::new("/nonexistent/xtask/tests"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn test_executable_is_found_in_cargo_json() {
        let json = concat!(
            r#"{"reason":"compiler-artifact","target":{"name":"other"},"profile":{"test":true},"#,
            r#""executable":"/t/other-1"}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"name":"bh_memory"},"profile":{"test":true},"#,
            r#""executable":"/t/bh_memory-2"}"#,
        );
        assert_eq!(
            artifact_executable(json, Target::Test, "bh_memory").as_deref(),
            Some("/t/bh_memory-2")
        );
        assert_eq!(artifact_executable(json, Target::Test, "missing"), None);
    }

    #[test]
    fn quick_mode_skips_only_the_slow_steps() {
        let skipped: Vec<_> = STEPS
            .iter()
            .filter(|s| s.full_only)
            .map(|s| s.name)
            .collect();
        assert_eq!(skipped, ["test-matrix", "loom", "memcheck"]);
    }

    #[test]
    fn summary_lists_every_step() {
        let outcomes = [
            Outcome::Passed(Duration::from_millis(1200)),
            Outcome::Passed(Duration::from_secs(40)),
            Outcome::Failed(Duration::from_secs(3)),
            Outcome::NotRun,
            Outcome::NotRun,
            Outcome::NotRun,
            Outcome::NotRun,
            Outcome::Skipped,
        ];
        let table = summary(&outcomes);
        assert!(table.contains("fmt          passed        1.2s"), "{table}");
        assert!(table.contains("test         FAILED        3.0s"), "{table}");
        assert_eq!(table.lines().count(), STEPS.len() + 1);
    }
}
