//! Shared helpers for the nbd-server integration tests: an independent NBD client
//! (`nbd_client`), the server child process and its scratch directory (`server`).

pub use ::nbd_client;
pub mod server;

/// Runs a real client (`nbdinfo`, `nbdcopy`, `qemu-io`, ...) to its end, panicking with its
/// output if it failed; returns its stdout and its stderr.
pub fn run_ok(cmd: &mut std::process::Command) -> (String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "{cmd:?}: {}: {stdout}{stderr}",
        out.status
    );
    (stdout, stderr)
}
