//! Adaptive polling over real time that the conformance suite cannot afford per backend: a
//! handler that polling has not found ready for 7 s (QEMU `POLL_IDLE_INTERVAL_NS`) leaves the
//! poll set, with `on_poll_end` if the loop is in polling mode, and joins again on its next fd
//! dispatch. On the poll backend; the rule lives in the context, not in a backend.

use aio_core::{AioContext, EventNotifier, PollParams};
use std::cell::Cell;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

fn ctx() -> AioContext {
    AioContext::new(Box::new(fdmon_poll::PollMonitor::new().unwrap())).unwrap()
}

#[test]
fn an_idle_handler_leaves_the_poll_set_after_7_s_and_rejoins_on_its_next_dispatch() {
    let ctx = ctx();
    ctx.set_poll_params(PollParams::new(Duration::from_secs(60)))
        .unwrap();
    let e = Arc::new(EventNotifier::new().unwrap());
    let (reads, polls, begins, ends) = (
        Rc::new(Cell::new(0u32)),
        Rc::new(Cell::new(0u32)),
        Rc::new(Cell::new(0u32)),
        Rc::new(Cell::new(0u32)),
    );
    let (r, p, b, en) = (reads.clone(), polls.clone(), begins.clone(), ends.clone());
    let notifier = e.clone();
    let _polled = ctx
        .fd_handler(&*e)
        .on_read(move |_| {
            assert!(notifier.test_and_clear(), "spurious read");
            r.set(r.get() + 1);
        })
        .on_poll(move || {
            p.set(p.get() + 1);
            false
        })
        .on_poll_ready(|_| panic!("its poll never finds work"))
        .on_poll_begin(move || b.set(b.get() + 1))
        .on_poll_end(move || en.set(en.get() + 1))
        .register()
        .unwrap();
    // An fd-only handler whose readiness ends each blocking poll below.
    let (mut a, s) = UnixStream::pair().unwrap();
    s.set_nonblocking(true).unwrap();
    let plain = Rc::new(Cell::new(0u32));
    let (pl, mut reader) = (plain.clone(), s.try_clone().unwrap());
    let _plain = ctx
        .fd_handler(&s)
        .on_read(move |_| {
            let mut buf = [0u8; 16];
            assert!(std::io::Read::read(&mut reader, &mut buf).unwrap() > 0);
            pl.set(pl.get() + 1);
        })
        .register()
        .unwrap();
    let mut wake = |ctx: &AioContext| {
        a.write_all(b"x").unwrap();
        let before = plain.get();
        assert!(ctx.poll());
        assert_eq!(plain.get(), before + 1);
    };

    e.set().unwrap();
    assert!(ctx.poll());
    assert_eq!(reads.get(), 1, "dispatched by its fd: joins the poll set");
    assert_eq!(ctx.poll_window(), Duration::from_micros(4));
    // A first polling phase starts its idle clock; it finds nothing, so the loop leaves
    // polling mode before it sleeps.
    wake(&ctx);
    assert!(polls.get() >= 1);
    assert_eq!((begins.get(), ends.get()), (1, 1));
    std::thread::sleep(Duration::from_millis(7_100));
    // The next polling phase finds it idle for more than 7 s: it leaves, with on_poll_end.
    wake(&ctx);
    assert_eq!((begins.get(), ends.get()), (2, 2));
    assert_eq!(ctx.poll_window(), Duration::ZERO, "the poll set is empty");
    let polls_after = polls.get();
    wake(&ctx);
    assert_eq!(polls.get(), polls_after, "no longer polled");
    // Its next fd dispatch brings it back, with a fresh 4 µs window.
    e.set().unwrap();
    assert!(ctx.poll());
    assert_eq!(reads.get(), 2);
    assert_eq!(ctx.poll_window(), Duration::from_micros(4));
}
