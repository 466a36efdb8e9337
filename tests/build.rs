//! Probes whether this machine can create and enter an io_uring, so that the io_uring
//! conformance suite is reported as *ignored*, with the reason, where the kernel refuses
//! io_uring (an old kernel, `kernel.io_uring_disabled`, a seccomp filter, possibly one that
//! allows setup but not enter), instead of failing or passing vacuously.
//!
//! Setting `AIO_TEST_NO_URING=1` forces the "unavailable" answer, to exercise that path.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(aio_no_uring)");
    println!("cargo::rustc-check-cfg=cfg(aio_forced_backend_unavailable)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=AIO_TEST_NO_URING");
    println!("cargo::rerun-if-env-changed=AIO_BACKEND");
    if let Err(reason) = uring_available() {
        println!("cargo::rustc-cfg=aio_no_uring");
        println!("cargo::warning=io_uring conformance suite ignored: {reason}");
        // `xtask ci` also runs the suite on the facade's default context with
        // AIO_BACKEND=io_uring; there, too, the cases are ignored rather than failed.
        let forced = std::env::var("AIO_BACKEND").unwrap_or_default();
        if matches!(forced.trim(), "io_uring" | "io-uring" | "uring") {
            println!("cargo::rustc-cfg=aio_forced_backend_unavailable");
        }
    }
}

fn uring_available() -> Result<(), String> {
    if std::env::var_os("AIO_TEST_NO_URING").is_some_and(|v| v == "1") {
        return Err("AIO_TEST_NO_URING=1".into());
    }
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return Err("not Linux".into());
    }
    probe()
}

#[cfg(target_os = "linux")]
fn probe() -> Result<(), String> {
    // struct io_uring_params is 120 bytes; zeroed means "no flags, kernel picks sizes".
    let mut params = [0u8; 120];
    // io_uring_setup reads and writes `params` (120 bytes, the size of struct
    // io_uring_params, alive across the call) and returns a new fd or -1; nothing else is touched.
    // SAFETY: the conditions just stated hold for this call.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Err(format!(
            "io_uring_setup failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    // Some seccomp profiles allow io_uring_setup but refuse io_uring_enter, which makes every
    // wait fail: enter the ring once, submitting and waiting for nothing.
    // `fd` is the ring fd just returned; with nothing to submit or wait for and a null
    // signal mask (size 0), io_uring_enter touches no memory of ours.
    // SAFETY: the conditions just stated hold for this call.
    let entered = unsafe {
        libc::syscall(
            libc::SYS_io_uring_enter,
            fd as libc::c_int,
            0u32,
            0u32,
            0u32,
            std::ptr::null::<libc::c_void>(),
            0usize,
        )
    };
    let enter_error = std::io::Error::last_os_error();
    // SAFETY: `fd` is the ring fd just returned, owned by us and closed once.
    unsafe { libc::close(fd as libc::c_int) };
    if entered < 0 {
        return Err(format!("io_uring_enter failed: {enter_error}"));
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn probe() -> Result<(), String> {
    Err("not Linux".into())
}
