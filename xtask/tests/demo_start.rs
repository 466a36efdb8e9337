//! `cargo xtask demo` says something at once: its first line comes within a second, before the
//! release build of the server starts, with and without `--quiet`, and `--quiet` reaches cargo.
//! The build is played by a fake `cargo` (`$CARGO`, which xtask runs) that logs its arguments,
//! takes two seconds and fails, so the demo stops after step 1.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the fake build takes.
const BUILD_TIME: Duration = Duration::from_secs(2);

/// Kills the demo if the test fails half way.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xtask-demo-start-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_demo_prints_its_first_line_before_the_build_and_within_a_second() {
    let dir = scratch();
    let cargo = dir.join("fake-cargo");
    let log = dir.join("cargo-args");
    std::fs::write(
        &cargo,
        format!(
            "#!/bin/sh\n\
             echo \"$@\" > '{}'\n\
             sleep {}\n\
             echo 'fake cargo: no build here' >&2\n\
             exit 101\n",
            log.display(),
            BUILD_TIME.as_secs()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&cargo, std::fs::Permissions::from_mode(0o755)).unwrap();

    for quiet in [true, false] {
        let _ = std::fs::remove_file(&log);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
        cmd.arg("demo");
        if quiet {
            cmd.arg("--quiet");
        }
        let started = Instant::now();
        let mut demo = Guard(
            cmd.env("CARGO", &cargo)
                .env("AIO_DEMO_CLIENT", "builtin")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut out = BufReader::new(demo.0.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        let first_after = started.elapsed();
        assert!(
            first.starts_with("demo: a tour of the NBD server example"),
            "quiet {quiet}: first line {first:?}"
        );
        assert!(
            first_after < Duration::from_secs(1),
            "quiet {quiet}: the first line took {first_after:?}"
        );

        let mut rest = String::new();
        out.read_to_string(&mut rest).unwrap();
        let mut err = String::new();
        demo.0
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let status = demo.0.wait().unwrap();
        // The build came after the line, and the demo waited for it, then failed with it.
        assert!(
            started.elapsed() >= BUILD_TIME,
            "quiet {quiet}: the demo did not run the build"
        );
        assert_eq!(status.code(), Some(1), "quiet {quiet}: {err}");
        assert!(err.contains("fake cargo: no build here"), "{err}");
        let lines: Vec<&str> = rest.lines().collect();
        assert!(
            lines.len() >= 2
                && lines[0].starts_with("demo: client: the built-in NBD client")
                && lines[1].starts_with("[1/9] building the NBD server"),
            "quiet {quiet}: {rest}"
        );
        let args = std::fs::read_to_string(&log).unwrap();
        assert!(
            args.starts_with("build --release -p aio --example nbd-server"),
            "{args}"
        );
        assert_eq!(
            args.split_whitespace().any(|a| a == "--quiet"),
            quiet,
            "cargo got: {args}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
