//! The conformance suite on the context the facade builds by default, honouring `AIO_BACKEND`:
//! `cargo xtask ci` runs this file once per backend with the variable set, so that the
//! backend choice, and not only each backend alone, passes every case.

fn make() -> std::io::Result<aio::AioContext> {
    let ctx = aio::Builder::new().build()?;
    if let Ok(wanted) = std::env::var(aio::BACKEND_ENV) {
        // A forced backend that was silently replaced would test the wrong thing. poll+epoll
        // starts on poll (it moves to epoll only at 64 fds).
        let expected = match wanted.trim() {
            "poll+epoll" => "poll",
            other => other,
        };
        assert_eq!(
            ctx.backend(),
            expected,
            "{} was not honoured",
            aio::BACKEND_ENV
        );
    }
    Ok(ctx)
}

aio_conformance::conformance_tests!(
    make,
    #[cfg_attr(
        aio_forced_backend_unavailable,
        ignore = "AIO_BACKEND asks for a backend this machine lacks (see the build warning)"
    )]
);
