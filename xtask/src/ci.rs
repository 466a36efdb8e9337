//! `cargo xtask ci`: the one command CI runs; owns the list and order of checks and the summary.
//!
//! Steps, in order, stopping at the first failure (docs/conventions.md 1 and 17):
//!
//! 1. `fmt`: `cargo fmt --all -- --check`.
//! 2. `clippy`: `-D warnings` over all targets with all features (the facade's features are
//!    additive, so the union is a valid build), then once per backend feature set of `aio`.
//!    The `glib` features need the system GLib: before the first build with them, the system
//!    library is installed with apt-get (`libglib2.0-dev`) when `pkg-config` does not find it;
//!    if that fails, every step builds all features but those, and says so (see
//!    [`all_features`]).
//! 3. `test`: the whole workspace with all features, under cargo-nextest when installed (plus
//!    `cargo test --doc`, since nextest does not run doctests), else plain `cargo test`.
//!    qemu-utils (qemu-img, qemu-io, qemu-nbd), python3-libnbd (libnbd's Python bindings and
//!    nbdsh), libnbd-bin (nbdinfo, nbdcopy) and util-linux-extra (fincore), which the NBD
//!    server's tests use, are installed with apt-get first when missing.
//! 4. `test-matrix`: `aio` alone with each feature set in [`FEATURE_SETS`], then `aio-tests`.
//! 5. `loom`: every `crates/<crate>/tests/loom_*.rs` model under `--cfg aio_loom`, release mode,
//!    `LOOM_MAX_PREEMPTIONS=2`, in its own target directory.
//! 6. `memcheck`: the test binaries in [`MEMCHECK`] under valgrind memcheck, which must report no
//!    invalid access and no definite leak (the bottom-half list frees nodes by hand; the timer
//!    tests prove that dropped groups and timers free every callback). Valgrind is
//!    installed with apt-get when it is missing.
//! 7. `miri`: the tests in [`MIRI`] under Miri (nightly): the conformance suite (bottom halves,
//!    handlers, the context) on `MiriMonitor`, the BH ownership and context-local tests, the
//!    timers and the thread pool; the multi-threaded ones under several scheduler seeds (each
//!    run's seed count is in [`MIRI`], and its time is printed).
//! 8. `asan`: the test suites in [`ASAN`] built with AddressSanitizer (nightly,
//!    `-Zsanitizer=address`, its own target directory); doctests are left out.
//! 9. `cross`: `cargo clippy --lib --bins --tests --benches --all-features -- -D warnings` (a
//!    check that also refuses warnings; the examples are left out, because the NBD server's
//!    `--aio` and `--cache` are Linux-only) of the portable crates ([`CROSS_PACKAGES`]) for each target of
//!    [`CROSS_TARGETS`] (macOS, FreeBSD), then `aio` with its default features and with `poll`
//!    and `polling` alone, so that nothing Linux-only leaks out of its `cfg`. A target that is
//!    not installed is added with `rustup target add`; one that cannot be is skipped with the
//!    reason printed, and the step is SKIPPED when none is available.
//! 10. `doc`: `cargo doc` with `RUSTDOCFLAGS=-D warnings`.
//! 11. `tidy`: house-style checks, in process (see `tidy.rs`).
//!
//! `miri` and `asan` need a nightly toolchain, which they install with rustup when it is missing
//! (`rustup toolchain install nightly --profile minimal`, then the `miri` and `rust-src`
//! components and `cargo miri setup`). When that is impossible (no rustup, no network) the step
//! prints why and is reported as SKIPPED in the summary, never as passed. ThreadSanitizer is not
//! a step: see [`asan`] for why.
//!
//! `--quick` skips `test-matrix`, `loom`, `memcheck`, `miri` and `asan`, the slowest steps, for
//! local iteration; `--only a,b` runs just the named steps. The exit code is 0 only if every step
//! that ran passed. `.ci/run` calls this, so "`cargo xtask ci` passes locally" means "CI is
//! green".

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::cmd::{Cmd, Context, Error, Result, Target, artifact_executable, project_root, secs};
use crate::tidy;

/// Feature sets of the `aio` facade that are built, linted and tested on their own, as
/// `-p aio --no-default-features --features <set>`.
///
/// One entry per backend alone, and the combinations whose policy needs its own run: poll with
/// epoll (`AutoMonitor`'s upgrade and fall-back between them) and the three Linux ones; and the
/// outer-loop adapters (`tokio`, `calloop`, `glib`) over the poll backend alone (the
/// `--all-features` steps build and test them with every backend). `polling` is alone: `Auto`
/// picks it on Linux only when nothing else is compiled in, so it has no policy with the others
/// to test here. `glib` is dropped from a set when the system GLib is unavailable.
pub const FEATURE_SETS: &[&str] = &[
    "poll",
    "epoll",
    "io-uring",
    "polling",
    "poll,epoll",
    "poll,epoll,io-uring",
    "poll,tokio,calloop,glib",
];

/// The workspace's features that link the system GLib (`aio/glib`, and `aio-benches/glib`,
/// which turns it on for the adapter bench), by feature name.
const GLIB_FEATURES: &[&str] = &["glib"];

/// Values of `AIO_BACKEND` under which the conformance suite runs on the facade's default
/// context (`tests/tests/conformance_auto.rs`), proving the backend choice as well as each
/// backend. On a machine without io_uring the `io_uring` run reports its cases as ignored (the
/// test crate's build script probes for it).
pub const BACKENDS: &[&str] = &["poll", "poll+epoll", "epoll", "io_uring", "polling"];

/// The non-Linux targets the `cross` step checks: macOS on Apple silicon (kqueue, no `ppoll`, no
/// eventfd) and FreeBSD (kqueue, `ppoll`, no eventfd). Nothing is run there, only checked.
pub const CROSS_TARGETS: &[&str] = &["aarch64-apple-darwin", "x86_64-unknown-freebsd"];

/// The packages the `cross` step checks, with all their targets (tests and examples included).
/// Left out: `fdmon-uring` (its library builds empty outside Linux and is checked as a
/// dependency of `aio`, but its test file is Linux-only and not cfg'd), `aio-benches` (io_uring
/// floors, `cpu_set_t`, and criterion needs a C cross-compiler) and `xtask` (runs on the host).
const CROSS_PACKAGES: &[&str] = &[
    "aio-core",
    "aio-conformance",
    "timers",
    "threadpool",
    "fdmon-poll",
    "fdmon-epoll",
    "fdmon-polling",
    "aio",
    "aio-tests",
];

/// Crates that carry loom models as `crates/<crate>/tests/loom_*.rs` (directory name = package
/// name). Listing a crate here asserts that it has models: finding none fails the step, since a
/// check that cannot fail is a defect.
const LOOM_CRATES: &[&str] = &["aio-core", "threadpool", "timers"];

/// Loom's preemption bound. docs/conventions.md 2 fixes it at 2: exhaustive beyond that, the models
/// would not finish inside the CI budget on two cores.
const LOOM_MAX_PREEMPTIONS: &str = "2";

/// The loom models' cfg; namespaced (not bare `loom`) so dependencies that test for `cfg(loom)`
/// are not switched into their own loom mode (docs/conventions.md 12).
const LOOM_CFG: &str = "--cfg aio_loom";

/// Test binaries run under valgrind memcheck, as (package, integration test target): the
/// ownership paths of bottom-half nodes, and the whole conformance suite on the poll backend.
const MEMCHECK: &[(&str, &str)] = &[
    ("aio-core", "bh_memory"),
    // Tasks: futures dropped by abort, by the context's drop and on a dead target; wakers
    // outliving their task and context; tasks moving between contexts.
    ("aio-core", "tasks"),
    ("aio-tests", "conformance_poll"),
    ("aio-tests", "conformance_epoll"),
    // Timer lifetimes: group drop with armed timers, callbacks that own or drop their timer,
    // nested runs and a panicking callback.
    // Block I/O: buffers owned by io_uring requests, cancelled and reaped when the context is
    // dropped with requests in flight; the thread-pool engine's buffer hand-back.
    ("blockio", "memory"),
    // Native AIO's completion ring read from user space while the loop polls ([LAIO-3]).
    ("blockio", "linux_aio_poll"),
    ("timers", "lifecycle"),
    ("timers", "callbacks"),
];

/// The nightly toolchain that the `miri` and `asan` steps use, as rustup names it. Not pinned to
/// a date: a dated nightly may lack miri, while rustup always finds a current one that has it.
const NIGHTLY: &str = "nightly";

/// Flags for every Miri run.
///
/// `-Zmiri-disable-isolation`: the timers' `ClockType::Host` reads the wall clock
/// (`clock_gettime(CLOCK_REALTIME)`), which Miri refuses in isolation ("unsupported operation"),
/// and every timer group has a host clock. The tests then see real time, as they do natively.
///
/// `-Zmiri-permissive-provenance`: parking_lot (the pool's locks) keeps a pointer in an integer
/// (`parking_lot_core`'s word lock); the flag accepts that, as Miri does by default, without a
/// warning per thread that would bury the report.
const MIRI_FLAGS: &str = "-Zmiri-disable-isolation -Zmiri-permissive-provenance";

/// One `cargo miri test` invocation of the `miri` step.
struct MiriRun {
    package: &'static str,
    /// Test targets, as cargo arguments.
    targets: &'static [&'static str],
    /// Scheduler seeds (`-Zmiri-many-seeds=0..seeds`): the whole binary runs once per seed, so
    /// each seed explores another interleaving of the tests' threads. 1 for tests that start no
    /// thread. Four for the cross-thread ownership tests the soundness issue is about (bottom
    /// halves, operations from any thread, the shared context), two for the other threaded
    /// suites, whose interleavings the loom models cover too: a CI run measured 2 660 s with
    /// four seeds everywhere, 1 399 s of it in this step, against a 45-minute budget.
    seeds: u32,
}

/// What the `miri` step runs. Under Miri the tests' helpers build their contexts on
/// `MiriMonitor` (`crates/aio-core/tests/support/miri_monitor.rs`): Miri emulates neither
/// `ppoll` nor level-triggered epoll. Tests that cannot run under Miri say why with
/// `#[cfg_attr(miri, ignore = "...")]`.
const MIRI: &[MiriRun] = &[
    // Every path of BH node ownership, including deletes from other threads, and BHs held by
    // isolation scopes.
    MiriRun {
        package: "aio-core",
        targets: &["--test", "bh_memory", "--test", "isolation"],
        seeds: 4,
    },
    // Tasks: the executor's task cells (one allocation, raw wakers: [TASK-1]..[TASK-5]),
    // across threads, the review suite's panics and aborts, and the seeded task programs.
    MiriRun {
        package: "aio-core",
        targets: &[
            "--test",
            "tasks",
            "--test",
            "tasks_review",
            "--test",
            "tasks_soundness",
            "--test",
            "task_model",
        ],
        seeds: 2,
    },
    // Operations from any thread: remote registrations, removals racing dispatch, the
    // context dropped with operations queued.
    MiriRun {
        package: "aio-core",
        targets: &["--test", "any_thread", "--test", "any_thread_model"],
        seeds: 4,
    },
    // The unit tests, the context-local values, and the signal tests (ignored: Miri has no
    // signals, nor the child processes they run in).
    MiriRun {
        package: "aio-core",
        targets: &["--lib", "--test", "locals", "--test", "signals"],
        seeds: 1,
    },
    // The coroutine locks (their guards reach the data through `UnsafeCell`), with tasks on
    // several contexts and threads.
    MiriRun {
        package: "aio-core",
        targets: &["--test", "co_sync"],
        seeds: 2,
    },
    // The recursive FIFO lock: hand-offs, FIFO order, panics while holding and in the
    // contention callback, under several interleavings.
    MiriRun {
        package: "aio-core",
        targets: &["--test", "rfifolock"],
        seeds: 2,
    },
    // Acquire/release on a context: the loop handed between threads with the lock, its home
    // words and home table moving with it, drops on another thread, the seeded programs.
    MiriRun {
        package: "aio-core",
        targets: &["--test", "shared_context"],
        seeds: 4,
    },
    // The adversarial review of the shared context: nesting with plain contexts, out-of-order
    // releases, panics, leaked guards, thread exit, releases from drops inside in-place
    // operations (a data race before the fix), handles after the loop.
    MiriRun {
        package: "aio-core",
        targets: &["--test", "shared_review"],
        seeds: 4,
    },
    // Registered buffers' leases ([URING-5]): disjoint buffers written on several threads,
    // the pool handle dropped while leases live (no ring: the kernel side is in memcheck).
    MiriRun {
        package: "blockio",
        targets: &["--lib"],
        seeds: 2,
    },
    // The conformance suite: bottom halves, fd handlers, nested polls, the context's
    // lifetime, timers through the loop; several cases schedule from other threads.
    MiriRun {
        package: "aio-tests",
        targets: &["--test", "conformance_miri"],
        seeds: 2,
    },
    MiriRun {
        package: "timers",
        targets: &["--lib", "--tests"],
        seeds: 1,
    },
    MiriRun {
        package: "threadpool",
        targets: &["--lib", "--tests"],
        seeds: 2,
    },
];

/// Packages whose unit and integration tests the `asan` step runs under AddressSanitizer.
const ASAN: &[&str] = &[
    "aio-core",
    "fdmon-poll",
    "fdmon-epoll",
    "fdmon-uring",
    "fdmon-polling",
    "timers",
    "threadpool",
    "blockio",
    "aio-tests",
];

/// Which steps to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Full,
    /// `--quick`: skips the steps with `full_only` set.
    Quick,
    /// `--only a,b`: only the named steps, whatever their kind.
    Only(Vec<String>),
}

/// One named CI step.
struct Step {
    name: &'static str,
    /// Skipped by `--quick`.
    full_only: bool,
    /// Installs what the step needs first; `Err(reason)` when that is impossible, and then the
    /// step is reported as SKIPPED with the reason rather than run.
    prepare: Option<fn() -> std::result::Result<(), String>>,
    run: fn(&Path) -> Result<()>,
}

impl Step {
    /// A step that runs in both modes.
    const fn always(name: &'static str, run: fn(&Path) -> Result<()>) -> Self {
        Step {
            name,
            full_only: false,
            prepare: None,
            run,
        }
    }

    /// A step that `--quick` skips.
    const fn full_only(name: &'static str, run: fn(&Path) -> Result<()>) -> Self {
        Step {
            name,
            full_only: true,
            prepare: None,
            run,
        }
    }

    /// A step that `--quick` skips and that needs a toolchain `prepare` installs.
    const fn needs(
        name: &'static str,
        prepare: fn() -> std::result::Result<(), String>,
        run: fn(&Path) -> Result<()>,
    ) -> Self {
        Step {
            name,
            full_only: true,
            prepare: Some(prepare),
            run,
        }
    }
}

/// The names of every step, in order, for usage messages.
pub fn step_names() -> Vec<&'static str> {
    STEPS.iter().map(|s| s.name).collect()
}

/// The steps, in the order they run.
const STEPS: &[Step] = &[
    Step::always("fmt", fmt),
    Step::always("clippy", clippy),
    Step::always("test", test),
    Step::full_only("test-matrix", test_matrix),
    Step::full_only("loom", loom),
    Step::full_only("memcheck", memcheck),
    Step::needs("miri", ensure_miri, miri),
    Step::needs("asan", ensure_nightly_rustc, asan),
    // Not `full_only`: a check of two targets is cheap, and a Linux-only call outside its cfg
    // is the kind of slip a quick run should catch.
    Step {
        name: "cross",
        full_only: false,
        prepare: Some(ensure_cross_targets),
        run: cross,
    },
    Step::always("doc", doc),
    Step::always("tidy", tidy),
];

/// What happened to one step, for the summary table.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Passed(Duration),
    Failed(Duration),
    /// Skipped by `--quick` or left out by `--only`.
    Skipped,
    /// Could not run: its toolchain could not be installed (the reason is printed).
    Unavailable,
    /// Not reached because an earlier step failed.
    NotRun,
}

pub fn run(mode: Mode) -> Result<ExitCode> {
    let root = project_root();
    if let Mode::Only(names) = &mode
        && let Some(unknown) = names.iter().find(|n| !STEPS.iter().any(|s| s.name == *n))
    {
        return Err(Error::new(format!(
            "ci --only: no step named `{unknown}` (steps: {})",
            step_names().join(", ")
        )));
    }
    let mode_name = match &mode {
        Mode::Full => "full".to_owned(),
        Mode::Quick => "quick (skipping test-matrix, loom, memcheck, miri and asan)".to_owned(),
        Mode::Only(names) => format!("only {}", names.join(", ")),
    };
    // Nothing depends on CI today; printing it makes logs say where they came from.
    let ci_env = std::env::var("CI").unwrap_or_else(|_| "<unset>".to_owned());
    eprintln!("ci: mode {mode_name}, CI={ci_env}, root {}", root.display());

    let started = Instant::now();
    let mut outcomes = Vec::with_capacity(STEPS.len());
    let mut failure = None;
    // Steps that could not run, with the reason, repeated after the summary.
    let mut unavailable = Vec::new();
    for (i, step) in STEPS.iter().enumerate() {
        let skip = match &mode {
            Mode::Full => None,
            Mode::Quick => step.full_only.then_some("--quick"),
            Mode::Only(names) => (!names.iter().any(|n| n == step.name)).then_some("--only"),
        };
        let outcome = if failure.is_some() {
            Outcome::NotRun
        } else if let Some(why) = skip {
            eprintln!(
                "\n=== [{}/{}] {}: skipped ({why})",
                i + 1,
                STEPS.len(),
                step.name
            );
            Outcome::Skipped
        } else {
            eprintln!("\n=== [{}/{}] {}", i + 1, STEPS.len(), step.name);
            let step_started = Instant::now();
            let result = match step.prepare.map_or(Ok(()), |prepare| prepare()) {
                Ok(()) => (step.run)(&root),
                Err(reason) => {
                    eprintln!("{}: SKIPPED: {reason}", step.name);
                    unavailable.push((step.name, reason));
                    outcomes.push(Outcome::Unavailable);
                    continue;
                }
            };
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
    for (name, reason) in &unavailable {
        eprintln!("ci: step `{name}` was SKIPPED, not passed: {reason}");
    }
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
                n => format!(", {n} skipped by --quick or --only"),
            };
            let unavailable = match unavailable.len() {
                0 => String::new(),
                n => format!(", {n} SKIPPED (toolchain unavailable)"),
            };
            eprintln!("ci: {passed} steps passed{skipped}{unavailable} in {total}");
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
            Outcome::Unavailable => ("SKIPPED", String::new()),
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

fn clippy(root: &Path) -> Result<()> {
    Cmd::cargo()
        .args(["clippy", "--workspace", "--all-targets"])
        .args(all_features(root)?)
        .args(["--", "-D", "warnings"])
        .run()?;
    // The union of features can hide code that only compiles (or only stays warning-free) when a
    // backend is alone: an import used only by another backend's arm, say.
    for set in feature_sets() {
        Cmd::cargo()
            .args([
                "clippy",
                "-p",
                "aio",
                "--all-targets",
                "--no-default-features",
            ])
            .args(["--features", &set, "--", "-D", "warnings"])
            .run()?;
    }
    Ok(())
}

/// Whether the system GLib is there for the `glib` features (installed first when missing);
/// when it is not, says once what is left out and why.
fn glib_available() -> bool {
    static REPORTED: std::sync::Once = std::sync::Once::new();
    match crate::cmd::ensure_glib() {
        Ok(()) => true,
        Err(reason) => {
            REPORTED.call_once(|| {
                eprintln!(
                    "glib: SKIPPED: {reason}; the `glib` features (aio::glib, its tests \
                     `embed_glib` and example, the glib rows of the adapter bench) are left out \
                     of every build"
                );
            });
            false
        }
    }
}

/// The arguments that turn on every feature of the workspace: `--all-features`, or, without
/// the system GLib, `--features` with every feature but [`GLIB_FEATURES`], read from the
/// members' manifests.
fn all_features(root: &Path) -> Result<Vec<String>> {
    feature_args(root, glib_available())
}

/// [`all_features`], given whether the system GLib is there.
fn feature_args(root: &Path, glib: bool) -> Result<Vec<String>> {
    if glib {
        return Ok(vec!["--all-features".to_owned()]);
    }
    let features = workspace_features(root)?
        .into_iter()
        .filter(|(_, feature)| !GLIB_FEATURES.contains(&feature.as_str()))
        .map(|(package, feature)| format!("{package}/{feature}"))
        .collect::<Vec<_>>();
    Ok(vec!["--features".to_owned(), features.join(",")])
}

/// [`FEATURE_SETS`], without [`GLIB_FEATURES`] when the system GLib is unavailable.
fn feature_sets() -> Vec<String> {
    let glib = glib_available();
    FEATURE_SETS
        .iter()
        .map(|set| {
            set.split(',')
                .filter(|f| glib || !GLIB_FEATURES.contains(f))
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

/// Every `(package, feature)` of the workspace members but `default`, from their manifests'
/// `[features]` tables (the workspace's own manifests: one `name = [...]` per line).
fn workspace_features(root: &Path) -> Result<Vec<(String, String)>> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    let workspace = read(&root.join("Cargo.toml"))?;
    let mut out = Vec::new();
    for member in toml_array(&workspace, "members") {
        let manifest = read(&root.join(&member).join("Cargo.toml"))?;
        let name = toml_section(&manifest, "package")
            .find_map(|(key, value)| (key == "name").then(|| value.trim_matches('"').to_owned()))
            .ok_or_else(|| Error::new(format!("{member}/Cargo.toml has no package name")))?;
        for (feature, _) in toml_section(&manifest, "features") {
            if feature != "default" {
                out.push((name.clone(), feature));
            }
        }
    }
    Ok(out)
}

/// The `key = value` lines of a manifest's `[section]`, comments and blank lines skipped.
fn toml_section<'a>(text: &'a str, section: &str) -> impl Iterator<Item = (String, String)> + 'a {
    let header = format!("[{section}]");
    text.lines()
        .skip_while(move |line| line.trim() != header)
        .skip(1)
        .take_while(|line| !line.trim_start().starts_with('['))
        .filter_map(|line| {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            let (key, value) = line.split_once('=')?;
            Some((key.trim().to_owned(), value.trim().to_owned()))
        })
}

/// The strings of a top-level `key = [ "a", "b", ... ]` array, which may span lines.
fn toml_array(text: &str, key: &str) -> Vec<String> {
    let Some(start) = text.lines().position(|l| {
        l.split_once('=')
            .is_some_and(|(k, v)| k.trim() == key && v.trim_start().starts_with('['))
    }) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in text.lines().skip(start) {
        let body = line
            .split_once('=')
            .filter(|_| out.is_empty())
            .map_or(line, |(_, v)| v);
        out.extend(
            body.split(',')
                .map(|item| {
                    item.trim()
                        .trim_matches(['[', ']'])
                        .trim()
                        .trim_matches('"')
                })
                .filter(|item| !item.is_empty() && !item.starts_with('#'))
                .map(str::to_owned),
        );
        if line.contains(']') {
            break;
        }
    }
    out
}

fn test(root: &Path) -> Result<()> {
    let features = all_features(root)?;
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
    // nbdinfo --list: a client that never negotiates (the exit-after-the-last-client test);
    // nbdinfo --map/--can and nbdcopy: the block status tests.
    if let Err(e) = crate::cmd::ensure_apt_package("libnbd-bin", &["nbdinfo", "nbdcopy"]) {
        eprintln!("warning: {e}; the nbdinfo and nbdcopy parts of the NBD tests will be skipped");
    }
    // fincore: whether NBD_CMD_CACHE filled the page cache.
    if let Err(e) = crate::cmd::ensure_apt_package("util-linux-extra", &["fincore"]) {
        eprintln!("warning: {e}; the page cache check of the NBD CACHE test will be skipped");
    }
    if Cmd::cargo().args(["nextest", "--version"]).probe() {
        eprintln!("test runner: cargo-nextest");
        Cmd::cargo()
            .args(["nextest", "run", "--workspace", "--no-fail-fast"])
            .args(&features)
            .run()?;
        // nextest runs only test binaries; doctests need cargo's own runner.
        Cmd::cargo()
            .args(["test", "--workspace", "--doc"])
            .args(&features)
            .run()
    } else {
        // `cargo test` runs doctests too, so there is no separate doctest run on this path.
        eprintln!("test runner: cargo test (cargo-nextest not installed)");
        Cmd::cargo()
            .args(["test", "--workspace", "--no-fail-fast"])
            .args(&features)
            .run()
    }
}

fn test_matrix(_root: &Path) -> Result<()> {
    for set in feature_sets() {
        Cmd::cargo()
            .args([
                "test",
                "-p",
                "aio",
                "--no-default-features",
                "--features",
                &set,
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
        // `--fair-sched=yes`: valgrind runs one thread at a time, and with its default lock a
        // thread that spins (a test's waker thread, a loop polling without blocking) can keep
        // the others from running for minutes (the tasks suite once took 961 s instead of 12).
        Cmd::new("valgrind")
            .args([
                "--error-exitcode=9",
                "--leak-check=full",
                "--errors-for-leak-kinds=definite",
                "--fair-sched=yes",
            ])
            .args(["-q", exe.as_str(), "--test-threads=1"])
            .run()?;
    }
    Ok(())
}

/// `cargo +nightly`, through rustup's proxy on `PATH` (`$CARGO` is the stable cargo that runs
/// xtask).
fn nightly_cargo() -> Cmd {
    Cmd::new("cargo").arg(format!("+{NIGHTLY}"))
}

/// Makes sure the nightly toolchain runs and has `components`, installing what is missing with
/// rustup; `ready` says whether everything needed is there. `Err` explains why it is not.
fn ensure_nightly(
    components: &[&str],
    ready: impl Fn() -> bool,
) -> std::result::Result<(), String> {
    if ready() {
        return Ok(());
    }
    if !Cmd::new("rustup").arg("--version").probe() {
        let with = match components {
            [] => String::new(),
            _ => format!(" with {}", components.join(", ")),
        };
        return Err(format!(
            "the {NIGHTLY} toolchain{with} is missing and rustup is not on PATH to install it"
        ));
    }
    if !Cmd::new("rustc")
        .arg(format!("+{NIGHTLY}"))
        .arg("--version")
        .probe()
    {
        Cmd::new("rustup")
            .args(["toolchain", "install", NIGHTLY, "--profile", "minimal"])
            .run()
            .map_err(|e| format!("installing the {NIGHTLY} toolchain failed: {e}"))?;
    }
    if !components.is_empty() {
        Cmd::new("rustup")
            .args(["component", "add", "--toolchain", NIGHTLY])
            .args(components.iter().copied())
            .run()
            .map_err(|e| format!("adding {} to {NIGHTLY} failed: {e}", components.join(", ")))?;
    }
    if ready() {
        Ok(())
    } else {
        Err(format!(
            "rustup reported success, but the {NIGHTLY} toolchain still does not run what this \
             step needs"
        ))
    }
}

/// The `miri` step's toolchain: nightly with miri and rust-src, and Miri's own sysroot
/// (`cargo miri setup`, which builds std for Miri once and is quick afterwards).
fn ensure_miri() -> std::result::Result<(), String> {
    ensure_nightly(&["miri", "rust-src"], || {
        nightly_cargo().args(["miri", "--version"]).probe()
    })?;
    nightly_cargo()
        .args(["miri", "setup"])
        .run()
        .map_err(|e| format!("`cargo miri setup` failed: {e}"))
}

/// The `asan` step's toolchain: any nightly (`-Zsanitizer` is unstable). std is not rebuilt
/// (no `-Zbuild-std`): AddressSanitizer, unlike the thread and memory sanitizers, works with an
/// uninstrumented std, and our code (including the generic std code it instantiates, such as
/// `Arc`'s drop) is instrumented.
fn ensure_nightly_rustc() -> std::result::Result<(), String> {
    ensure_nightly(&[], || {
        Cmd::new("rustc")
            .arg(format!("+{NIGHTLY}"))
            .arg("--version")
            .probe()
    })
}

/// Runs each entry of [`MIRI`], all of them even when one fails, so that one run shows every
/// failure; fails if any did.
fn miri(_root: &Path) -> Result<()> {
    let user_flags = std::env::var("MIRIFLAGS").ok();
    let mut failed = Vec::new();
    for run in MIRI {
        let flags = if run.seeds > 1 {
            format!("{MIRI_FLAGS} -Zmiri-many-seeds=0..{}", run.seeds)
        } else {
            MIRI_FLAGS.to_owned()
        };
        let started = Instant::now();
        let cmd = nightly_cargo()
            .env("MIRIFLAGS", append_flags(user_flags.clone(), &flags))
            .args(["miri", "test", "--no-fail-fast", "-p", run.package])
            .args(run.targets.iter().copied());
        let outcome = cmd.run();
        eprintln!(
            "miri: {} {} ({} seed(s)): {}",
            run.package,
            run.targets.join(" "),
            run.seeds,
            secs(started.elapsed())
        );
        if let Err(err) = outcome {
            eprintln!("miri: {err}");
            failed.push(format!("{} {}", run.package, run.targets.join(" ")));
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::new(format!(
            "Miri failed for: {} (Undefined Behavior or a failing test; see above)",
            failed.join("; ")
        )))
    }
}

/// The `asan` step: every test binary (not the doctests) of [`ASAN`], built with
/// AddressSanitizer into `target/asan`, for the host target given explicitly so that
/// `RUSTFLAGS` reach only the target code, not build scripts and proc macros (which would then
/// need an instrumented runtime to load). Leak detection is on, as it is by default.
///
/// ThreadSanitizer is not a step. It needs std rebuilt with it (`-Zbuild-std`, several minutes
/// on two cores) to avoid false reports from std's own synchronisation, and it does not model
/// standalone fences: the context's notify handshake (`aio-core/src/context/wake.rs`) is a pair
/// of SeqCst fences, so TSan's verdict on exactly the cross-thread protocol that matters would
/// not be meaningful.
/// The loom models check that protocol instead; Miri's data-race detector checks the rest.
fn asan(_root: &Path) -> Result<()> {
    let version = Cmd::new("rustc")
        .args([format!("+{NIGHTLY}"), "-vV".to_owned()])
        .stdout()?;
    let host = version
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .ok_or_else(|| Error::new("`rustc -vV` printed no `host:` line"))?
        .trim()
        .to_owned();
    let mut cmd = nightly_cargo()
        .env(
            "RUSTFLAGS",
            append_flags(std::env::var("RUSTFLAGS").ok(), "-Zsanitizer=address"),
        )
        .env(
            "CARGO_TARGET_DIR",
            project_root()
                .join("target")
                .join("asan")
                .display()
                .to_string(),
        )
        .args([
            "test",
            "--target",
            host.as_str(),
            "--tests",
            "--no-fail-fast",
        ])
        .args(ASAN.iter().flat_map(|p| ["-p", p]));
    // As in `loom_cargo`: the encoded form would win and drop the sanitizer flag.
    if std::env::var_os("CARGO_ENCODED_RUSTFLAGS").is_some() {
        cmd = cmd.env_remove("CARGO_ENCODED_RUSTFLAGS");
    }
    cmd.run()
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

/// The directory of `target`'s standard library in the sysroot of the `rustc` that cargo uses,
/// if that toolchain has it (`rustup target add` puts it there).
fn target_installed(target: &str) -> bool {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let Ok(sysroot) = Cmd::new(&rustc).args(["--print", "sysroot"]).stdout() else {
        return false;
    };
    Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(target)
        .join("lib")
        .is_dir()
}

/// Installs each of [`CROSS_TARGETS`] that is missing with `rustup target add`. Succeeds when
/// at least one target is available; a target that cannot be installed is reported by
/// [`cross`], which skips it. `Err` (the step is SKIPPED) only when none is there.
fn ensure_cross_targets() -> std::result::Result<(), String> {
    let mut reasons = Vec::new();
    for target in CROSS_TARGETS {
        if target_installed(target) {
            continue;
        }
        if !Cmd::new("rustup").arg("--version").probe() {
            reasons.push(format!(
                "{target}: not installed, and rustup is not on PATH"
            ));
            continue;
        }
        if let Err(e) = Cmd::new("rustup").args(["target", "add", target]).run() {
            reasons.push(format!("{target}: `rustup target add` failed: {e}"));
        } else if !target_installed(target) {
            reasons.push(format!(
                "{target}: rustup added it, but not to the sysroot of the rustc cargo uses \
                 ($RUSTC or another toolchain?)"
            ));
        }
    }
    if CROSS_TARGETS.iter().any(|t| target_installed(t)) {
        Ok(())
    } else {
        Err(format!(
            "no cross target could be installed ({})",
            reasons.join("; ")
        ))
    }
}

/// `cargo clippy -D warnings` of [`CROSS_PACKAGES`] for each installed target of [`CROSS_TARGETS`]; a target
/// that is not installed is skipped with a printed reason, never counted as checked.
fn cross(_root: &Path) -> Result<()> {
    let mut checked = 0;
    for target in CROSS_TARGETS {
        if !target_installed(target) {
            eprintln!(
                "cross: SKIPPED {target}: its standard library is not installed \
                 (`rustup target add {target}` failed or is unavailable; see above)"
            );
            continue;
        }
        // clippy rather than check, for `-D warnings`: an item that a cfg leaves unused there
        // is a warning, which check would let through.
        let lint = |features: &[&str], packages: &[&str]| {
            Cmd::cargo()
                .args([
                    "clippy",
                    "--target",
                    target,
                    "--lib",
                    "--bins",
                    "--tests",
                    "--benches",
                ])
                .args(features.iter().copied())
                .args(packages.iter().flat_map(|p| ["-p", *p]))
                .args(["--", "-D", "warnings"])
                .run()
        };
        lint(&["--all-features"], CROSS_PACKAGES)?;
        // What a user there gets: the default features (poll; epoll and io_uring build empty),
        // and each of the two portable backends alone.
        lint(&[], &["aio"])?;
        for set in ["poll", "polling"] {
            lint(&["--no-default-features", "--features", set], &["aio"])?;
        }
        checked += 1;
    }
    eprintln!(
        "cross: checked {checked} of {} targets: {}",
        CROSS_TARGETS.len(),
        CROSS_TARGETS.join(", ")
    );
    Ok(())
}

fn doc(root: &Path) -> Result<()> {
    let mut cmd = Cmd::cargo()
        .env(
            "RUSTDOCFLAGS",
            append_flags(std::env::var("RUSTDOCFLAGS").ok(), "-D warnings"),
        )
        .args(["doc", "--workspace", "--no-deps"])
        .args(all_features(root)?);
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
    fn workspace_features_reads_the_members_manifests() {
        let features = workspace_features(&project_root()).unwrap();
        let has = |p: &str, f: &str| features.iter().any(|(pp, ff)| pp == p && ff == f);
        assert!(has("aio", "glib") && has("aio", "tokio") && has("aio", "io-uring"));
        assert!(!features.iter().any(|(_, f)| f == "default"));
    }

    #[test]
    fn without_glib_every_other_feature_is_on() {
        let args = feature_args(&project_root(), false).unwrap();
        assert_eq!(args[0], "--features");
        let features: Vec<&str> = args[1].split(',').collect();
        for f in ["aio/tokio", "aio/calloop", "aio/polling"] {
            assert!(features.contains(&f), "{f} missing from {features:?}");
        }
        assert!(
            !features.iter().any(|f| f.ends_with("/glib")),
            "{features:?}"
        );
        assert_eq!(
            feature_args(&project_root(), true).unwrap(),
            ["--all-features"]
        );
    }

    #[test]
    fn toml_helpers_read_arrays_and_sections() {
        let text = "[workspace]\nmembers = [\n    \"a\",\n    \"b/c\", # x\n]\n\
                    [package]\nname = \"p\"\n[features]\n# note\ndefault = [\"x\"]\n\
                    x = []\ny = [\"dep:z\"]\n\n[dependencies]\nq = 1\n";
        assert_eq!(toml_array(text, "members"), ["a", "b/c"]);
        let features: Vec<_> = toml_section(text, "features").map(|(k, _)| k).collect();
        assert_eq!(features, ["default", "x", "y"]);
        assert_eq!(toml_array("members = [\"one\"]\n", "members"), ["one"]);
    }

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
        assert_eq!(skipped, ["test-matrix", "loom", "memcheck", "miri", "asan"]);
    }

    #[test]
    fn only_the_toolchain_steps_have_a_prepare_step() {
        let prepared: Vec<_> = STEPS
            .iter()
            .filter(|s| s.prepare.is_some())
            .map(|s| s.name)
            .collect();
        // miri and asan install a nightly toolchain, cross the macOS and FreeBSD targets.
        assert_eq!(prepared, ["miri", "asan", "cross"]);
    }

    #[test]
    fn only_rejects_an_unknown_step() {
        let err = run(Mode::Only(vec!["no-such-step".into()])).unwrap_err();
        assert!(
            err.to_string().contains("no step named `no-such-step`"),
            "{err}"
        );
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
            Outcome::Unavailable,
            Outcome::NotRun,
            Outcome::NotRun,
            Outcome::NotRun,
            Outcome::Skipped,
        ];
        let table = summary(&outcomes);
        assert!(table.contains("fmt          passed        1.2s"), "{table}");
        assert!(table.contains("test         FAILED        3.0s"), "{table}");
        assert!(table.contains("miri         SKIPPED"), "{table}");
        assert_eq!(table.lines().count(), STEPS.len() + 1);
    }
}
