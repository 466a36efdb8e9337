//! `cargo xtask`: the project's automation entry point; owns argument parsing, usage and dispatch.
//!
//! See <https://github.com/matklad/cargo-xtask/>. The `xtask` alias in `.cargo/config.toml` runs
//! this binary from anywhere in the workspace. Each subcommand lives in its own file:
//!
//! | command                   | file               | what it does                                      |
//! |---------------------------|--------------------|---------------------------------------------------|
//! | `cargo xtask ci [--quick]`| `ci.rs`            | everything CI checks; `.ci/run` calls it          |
//! | `cargo xtask ci --only s` | `ci.rs`            | only the named steps (comma-separated), to iterate|
//! | `cargo xtask demo [-q]`   | `nbd/demo.rs`      | a tour of the NBD server example, driven by       |
//! |                           |                    | qemu-io (or the built-in client,                  |
//! |                           |                    | `nbd/demo/builtin.rs`)                            |
//! | `cargo xtask bench [f]`   | `bench.rs`         | runs the benchmarks, points at the report         |
//! | `cargo xtask bench nbd`   | `nbd/bench.rs`     | the NBD race: the server example, qemu-nbd and    |
//! |                           |                    | nbdkit under qemu-img bench, fio and nbdcopy      |
//! |                           |                    | (`nbd/json.rs` reads fio's reports)               |
//! | `cargo xtask tidy`        | `tidy.rs`          | house-style checks alone (also the last step of   |
//! |                           |                    | `ci`)                                             |
//!
//! `cmd.rs` holds the shared process runner and error type. Everything about the NBD server
//! example lives in the `nbd` module: `nbd/mod.rs` is the plumbing that `demo` and `bench nbd`
//! share (building the server, scratch images, guarded server processes); the demo's fallback
//! client is the `nbd-client` crate (`crates/nbd-client`), the same independent client the
//! server's tests use. The crate is std-only on purpose (and so is `nbd-client`): `cargo xtask`
//! should start in seconds on a cold cache.
//!
//! Exit codes: 0 on success, 1 when a step fails, 2 on a usage error.

mod bench;
mod ci;
mod cmd;
mod nbd;
mod tidy;

use std::process::ExitCode;

/// Printed for no arguments and `--help`, and (to stderr) for usage errors. `tidy` is left out on
/// purpose: it is a building block of `ci`, kept runnable alone for quick local checks.
const USAGE: &str = "\
Usage: cargo xtask <command> [args]

Commands:
  ci [--quick | --only <steps>]
                  run every CI check: fmt, clippy, test, test-matrix, loom, memcheck,
                  miri, asan, cross, doc, tidy (--quick skips test-matrix, loom, memcheck, miri
                  and asan, for local iteration; --only runs the comma-separated steps)
  demo [--quiet]  a tour of the NBD server example (release build): qemu-io and qemu-img
                  write, read, verify, discard, convert and benchmark through it (the
                  built-in NBD client does when they are absent or AIO_DEMO_CLIENT=builtin);
                  --quiet (-q) prints only the steps, the commands and the summary
  bench [filter]  run the benchmarks (optionally only those matching <filter>) and
                  write a report under target/bench-report/
  bench nbd       the NBD race: the server example against qemu-nbd and nbdkit's
                  file plugin under qemu-img bench, fio and nbdcopy, in each --aio
                  mode (AIO_NBD_BENCH_QUICK=1 for one short round; AIO_NBD_BENCH_ROUNDS,
                  _COUNT, _RUNTIME, _CLIENTS, _SERVERS, _MODES, _VARIANTS: see
                  xtask/src/nbd/bench.rs); report in target/bench-report/nbd.md

Options:
  -h, --help      print this help
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    // Building `aio`'s tests and examples links the system OpenSSL (the NBD server's
    // pre-shared keys): installed first on a fresh machine.
    if matches!(args.as_slice(), ["ci" | "demo" | "bench", ..])
        && let Err(err) = cmd::ensure_openssl()
    {
        eprintln!("error: {err}");
        return ExitCode::FAILURE;
    }
    let result = match args.as_slice() {
        [] | ["-h" | "--help" | "help", ..] => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        ["ci"] => ci::run(ci::Mode::Full),
        ["ci", "--quick"] => ci::run(ci::Mode::Quick),
        ["ci", "--only", steps] if !steps.is_empty() => ci::run(ci::Mode::Only(
            steps.split(',').map(|s| s.trim().to_owned()).collect(),
        )),
        ["demo"] => nbd::demo::run(false),
        ["demo", "--quiet" | "-q"] => nbd::demo::run(true),
        ["bench"] => bench::run(None),
        // The NBD comparison drives two external servers, not the criterion harness.
        ["bench", "nbd"] => nbd::bench::run(),
        ["bench", filter] if !filter.starts_with('-') => bench::run(Some(filter)),
        ["tidy"] => tidy::run(),
        _ => return usage_error(&args),
    };

    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Reports an unknown command or unexpected arguments and exits with 2, like most CLI tools.
fn usage_error(args: &[&str]) -> ExitCode {
    eprintln!("error: unrecognized arguments: {}\n", args.join(" "));
    eprint!("{USAGE}");
    ExitCode::from(2)
}
