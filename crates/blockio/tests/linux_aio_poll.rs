//! The native AIO engine and adaptive polling ([LAIO-3] in ARCHITECTURE.md): the engine's
//! handler peeks at the kernel's completion ring, so a completion that lands while the loop
//! busy-polls is run by the polling phase (a poll hit) instead of after the poll window, in
//! the backend's wait. Also: contexts with polling on dropped with requests in flight and with
//! the handler in the poll set.

mod support;

use support::temp_file;

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use aio_core::{AioContext, PollParams};
use blockio::{BlockIo, Engine};

/// An epoll context polling for up to `window`, with native AIO, or `None` (printed) where
/// the kernel refuses native AIO.
fn polling_laio_ctx(window: Duration) -> Option<(AioContext, BlockIo)> {
    let ctx = AioContext::new(Box::new(fdmon_epoll::EpollMonitor::new().unwrap())).unwrap();
    ctx.set_poll_params(PollParams::new(window)).unwrap();
    match BlockIo::with_engine(&ctx, Engine::LinuxAio) {
        Ok(io) => Some((ctx, io)),
        Err(e) => {
            println!("skipped: {e}");
            None
        }
    }
}

/// Reads block `i` of `file` and, from its completion, the next one, `left` times in all;
/// each completion checks the block's bytes and counts itself in `done`.
fn chain(ctx: &AioContext, io: BlockIo, file: Arc<File>, i: u64, left: u32, done: Rc<Cell<u32>>) {
    let f = file.clone();
    io.read_at(ctx, &file, vec![0; 4096], i * 4096, move |r, buf| {
        assert_eq!(r.expect("read"), 4096);
        assert!(buf.iter().all(|&b| b == i as u8), "block {i} read back");
        done.set(done.get() + 1);
        if left > 1 {
            let ctx = AioContext::current().expect("completions run on the loop");
            chain(&ctx, io, f, (i + 1) % 16, left - 1, done);
        }
    });
}

/// Whether a handler other than the context's own notifier is in `ctx`'s poll set with a
/// window to poll in.
fn handler_polls(ctx: &AioContext) -> bool {
    ctx.stats()
        .poll_set
        .iter()
        .any(|m| m.fd != -1 && !m.window.is_zero())
}

/// Whether this process runs under valgrind, whose preload library is mapped into it.
fn under_valgrind() -> bool {
    std::fs::read_to_string("/proc/self/maps").is_ok_and(|maps| maps.contains("vgpreload"))
}

#[test]
fn completions_landing_while_the_loop_polls_are_poll_hits() {
    let Some((ctx, io)) = polling_laio_ctx(Duration::from_millis(20)) else {
        return;
    };
    // `O_DIRECT`, so that each read completes in the device after `io_submit` has returned:
    // a page-cache read completes inside `io_submit`, and the completion source of the
    // iteration that submitted it runs it at once, before any polling.
    let Some(file) = support::temp_file_on_disk(true) else {
        return;
    };
    let align = blockio::DirectAlign::of(&file).unwrap();
    for i in 0..16u8 {
        let (mut block, start) = align.buffer(4096);
        block[start..].fill(i);
        // An aligned address and length, as O_DIRECT wants.
        file.write_all_at(&block[start..], u64::from(i) * 4096)
            .unwrap();
    }
    let done = Rc::new(Cell::new(0));
    let before = ctx.stats();
    let mut inline = 0u64;
    // Reads left after the submission's iteration while the engine's handler was in the poll
    // set with a window: those the polling phase can find.
    let mut polled_for = 0u64;
    for n in 0..500u32 {
        // One read at a time, from outside the loop: the iteration that runs the submission
        // BH does not block; the next one blocks, so it polls first, and polling should find
        // the completion on the ring.
        let d = done.clone();
        let i = u64::from(n % 16);
        let (buf, start) = align.buffer(4096);
        io.read_into(&ctx, &file, buf, start, i * 4096, move |r, buf| {
            assert_eq!(r.expect("read"), 4096);
            assert!(
                buf[start..].iter().all(|&b| u64::from(b) == i),
                "block {i} read back"
            );
            d.set(d.get() + 1);
        });
        // The submission's iteration: a read that the device completed before that
        // iteration's completion source ran is run there, with nothing left to poll for
        // (rare natively; every read under valgrind, which slows the loop past the device).
        ctx.poll();
        if done.get() > n {
            inline += 1;
        } else if handler_polls(&ctx) {
            polled_for += 1;
        }
        while done.get() <= n {
            ctx.poll();
        }
    }
    let after = ctx.stats();
    let hits = after.poll_hits - before.poll_hits;
    let waits = after.waits - before.waits;
    // Once the handler has joined the poll set (after its first dispatch) and its window has
    // grown, each completion left after the submission's iteration is found by polling.
    // Without a poll function that sees the ring there would be no hit at all: nothing else
    // in this context polls.
    let summary = format!(
        "{hits} poll hits for {polled_for} completions polled for ({inline} run in the \
         submission's iteration, {waits} waits in the backend)"
    );
    // Under valgrind, which slows the loop past the device, nearly every read is run in its
    // submission's iteration; a few dozen reads say little about polling either way.
    if polled_for < 50 {
        println!("too few reads were polled for to judge: {summary}");
        return;
    }
    // Valgrind (xtask's memcheck step runs this file for the ring's memory accesses) also
    // stretches the polling phase's own clock reads unevenly: one CI run there found 32 hits
    // for 71 reads polled for. The ratio is judged natively, in the test step.
    if under_valgrind() {
        println!("under valgrind, the hit ratio is not judged: {summary}");
        return;
    }
    assert!(hits >= polled_for / 2, "{summary}");
    println!("{summary}");
}

#[test]
fn a_polling_context_dropped_with_requests_in_flight_and_the_handler_in_the_poll_set() {
    let Some((ctx, io)) = polling_laio_ctx(Duration::from_millis(1)) else {
        return;
    };
    let file = temp_file();
    // Put the handler in the poll set: a few completions through the loop.
    let done = Rc::new(Cell::new(0));
    for i in 0..16u8 {
        file.write_all_at(&[i; 4096], u64::from(i) * 4096).unwrap();
    }
    chain(&ctx, io, file.clone(), 0, 20, done.clone());
    while done.get() < 20 {
        ctx.poll();
    }
    assert!(
        !ctx.stats().poll_set.is_empty(),
        "the engine's handler is in the poll set"
    );
    // Then 200 requests submitted (in the kernel, completed or not) and 50 queued, unreaped.
    let seen = Rc::new(RefCell::new(0));
    for n in 0..250 {
        let s = seen.clone();
        io.read_at(&ctx, &file, vec![0; 4096], 0, move |_, _| {
            *s.borrow_mut() += 1
        });
        if n == 199 {
            // The submission BH runs; the completion source of the same iteration runs what
            // completed inside `io_submit`, and the rest stays in the kernel or on the ring
            // (the poll phase of a non-blocking iteration does not run).
            ctx.poll_nonblocking();
        }
    }
    let ran = *seen.borrow();
    drop(ctx);
    assert_eq!(*seen.borrow(), ran, "no callback runs during the drop");
    assert_eq!(
        Arc::strong_count(&file),
        1,
        "no keep-alive survives the context"
    );
}
