//! `cargo xtask demo`: runs the `aio` facade's `demo` example in release mode and passes its exit
//! code through.
//!
//! Today this is a plain `cargo run --release -p aio --example demo`. Later issues will extend the
//! demo (for example running it once per compiled-in backend or checking its output); those
//! extensions belong in this file so `main.rs` stays a dispatcher.

use std::process::ExitCode;

use crate::cmd::{Cmd, Result};

pub fn run() -> Result<ExitCode> {
    let status = Cmd::cargo()
        .args(["run", "--release", "-p", "aio", "--example", "demo"])
        .status()?;
    Ok(exit_code(status.code()))
}

/// The demo's exit code, or 1 when it has none (killed by a signal), since the shell's
/// `128 + signal` convention does not fit in an `ExitCode` portably.
fn exit_code(code: Option<i32>) -> ExitCode {
    match code.map(u8::try_from) {
        Some(Ok(code)) => ExitCode::from(code),
        _ => ExitCode::FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_pass_through() {
        assert_eq!(exit_code(Some(0)), ExitCode::SUCCESS);
        assert_eq!(exit_code(Some(3)), ExitCode::from(3));
        assert_eq!(exit_code(None), ExitCode::FAILURE);
        assert_eq!(exit_code(Some(-1)), ExitCode::FAILURE);
    }
}
