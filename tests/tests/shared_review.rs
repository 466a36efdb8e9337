//! An adversarial review of `aio::Builder::build_shared` on every backend: the backend's state
//! is used by a thread that then exits (io_uring cancels the polls a thread submitted when it
//! exits), by threads that come and go with adaptive polling on, and the context is dropped on
//! a thread that never polled it while handlers are registered.

use aio::{Backend, ClockType, EventNotifier, PollParams, Scale, SharedContext};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::thread;
use std::time::{Duration, Instant};

const HANG: Duration = Duration::from_secs(30);

fn backends(poll: PollParams) -> Vec<(Backend, SharedContext)> {
    let mut out = Vec::new();
    for b in [
        Backend::Auto,
        Backend::Poll,
        Backend::PollThenEpoll,
        Backend::Epoll,
        Backend::IoUring,
        Backend::Polling,
    ] {
        match aio::Builder::new()
            .backend(b)
            .poll_params(poll)
            .ignore_env()
            .build_shared()
        {
            Ok(ctx) => out.push((b, ctx)),
            Err(e) => println!("skipping {b:?}: {e}"),
        }
    }
    out
}

/// Attempt: a thread acquires, registers a handler (and, with a poll, submits its wait to the
/// backend: an io_uring `POLL_ADD` belongs to the submitting thread), releases and exits;
/// another thread then sets the fd and polls. The handler must still fire (the kernel's
/// cancellation of the exited thread's polls must be re-armed, not reported or lost).
fn registering_thread_exits(poll: PollParams) {
    for (backend, ctx) in backends(poll) {
        for submit in [false, true] {
            let n = Arc::new(EventNotifier::new().unwrap());
            let reads = Arc::new(AtomicUsize::new(0));
            let handler = {
                let (ctx, n, reads) = (ctx.clone(), n.clone(), reads.clone());
                thread::spawn(move || {
                    let held = ctx.acquire();
                    let n2 = n.clone();
                    let h = held
                        .fd_handler(n.clone())
                        .on_read(move || {
                            if n2.test_and_clear() {
                                reads.fetch_add(1, SeqCst);
                            }
                        })
                        .register()
                        .unwrap();
                    if submit {
                        held.poll_nonblocking();
                        held.poll_nonblocking();
                    }
                    h
                })
                .join()
                .unwrap()
            };
            // The submitting thread is gone; give the kernel's exit path time to cancel.
            thread::sleep(Duration::from_millis(20));
            let held = ctx.acquire();
            for round in 1..=3 {
                n.set().unwrap();
                let start = Instant::now();
                while reads.load(SeqCst) < round {
                    assert!(
                        start.elapsed() < HANG,
                        "{backend:?} (submitted: {submit}): the handler never fired after its \
                         registering thread exited"
                    );
                    // Bounded: a timer wakes the wait if the fd is no longer watched.
                    let t = held.timer(ClockType::Realtime, Scale::MS, || {}).unwrap();
                    t.arm_after(Duration::from_millis(50));
                    held.poll();
                }
            }
            drop(held);
            let _ = handler.remove();
        }
        // The last clone dropped on a thread that never polled.
        thread::spawn(move || drop(ctx)).join().unwrap();
    }
}

#[test]
fn a_registering_thread_exits_and_another_polls_every_backend() {
    registering_thread_exits(PollParams::disabled());
}

#[test]
fn a_registering_thread_exits_and_another_polls_with_adaptive_polling() {
    registering_thread_exits(PollParams::new(Duration::from_micros(64)));
}

/// Attempt: many short-lived threads each take one turn (acquire, register on a fresh
/// eventfd, poll until it fires, remove, exit) while a long-lived loop thread polls between
/// them; every backend, adaptive polling on so the poll set moves between threads too.
#[test]
fn short_lived_threads_take_turns_with_a_loop_thread() {
    for (backend, ctx) in backends(PollParams::new(Duration::from_micros(32))) {
        let stop = Arc::new(AtomicBool::new(false));
        let looper = {
            let (ctx, stop) = (ctx.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(SeqCst) {
                    ctx.acquire().poll();
                }
            })
        };
        for _ in 0..20 {
            let ctx = ctx.clone();
            thread::spawn(move || {
                let held = ctx.acquire();
                let n = Arc::new(EventNotifier::new().unwrap());
                let fired = Arc::new(AtomicBool::new(false));
                let (f, n2) = (fired.clone(), n.clone());
                let h = held
                    .fd_handler(n.clone())
                    .on_read(move || {
                        if n2.test_and_clear() {
                            f.store(true, SeqCst);
                        }
                    })
                    .on_poll({
                        let n3 = n.clone();
                        move || n3.is_set()
                    })
                    .on_poll_ready({
                        let (f, n4) = (fired.clone(), n.clone());
                        move || {
                            if n4.test_and_clear() {
                                f.store(true, SeqCst);
                            }
                        }
                    })
                    .register()
                    .unwrap();
                n.set().unwrap();
                let start = Instant::now();
                while !fired.load(SeqCst) {
                    assert!(start.elapsed() < HANG, "{backend:?}: hang");
                    held.poll();
                }
                h.remove();
            })
            .join()
            .unwrap_or_else(|_| panic!("{backend:?}: a turn failed"));
        }
        stop.store(true, SeqCst);
        ctx.notify();
        looper.join().unwrap();
    }
}
