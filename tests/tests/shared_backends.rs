//! `SharedContext` on every backend the kernel accepts (`aio::Builder::build_shared`): the
//! monitor moves between threads with the lock, so each backend is used from several threads
//! in turn. An event-loop thread runs `loop { acquire; poll; release }` while two I/O threads
//! take turns: each acquires (kicking the loop), registers a handler on an eventfd, arms a
//! timer, sets the eventfd, polls until both callbacks ran, removes the handler, releases.

use aio::{Backend, ClockType, EventNotifier, Scale, SharedContext};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::thread;
use std::time::{Duration, Instant};

const ROUNDS: usize = 50;
const HANG: Duration = Duration::from_secs(60);

fn backends() -> Vec<(Backend, SharedContext)> {
    let mut out = Vec::new();
    for b in [
        Backend::Poll,
        Backend::PollThenEpoll,
        Backend::Epoll,
        Backend::IoUring,
        Backend::Polling,
    ] {
        match aio::Builder::new().backend(b).ignore_env().build_shared() {
            Ok(ctx) => out.push((b, ctx)),
            Err(e) => println!("skipping {b:?}: {e}"),
        }
    }
    out
}

fn io_round(ctx: &SharedContext) {
    let held = ctx.acquire();
    let n = Arc::new(EventNotifier::new().unwrap());
    let reads = Arc::new(AtomicUsize::new(0));
    let (r, n2) = (reads.clone(), n.clone());
    let handler = held
        .fd_handler(n.clone())
        .on_read(move || {
            if n2.test_and_clear() {
                r.fetch_add(1, SeqCst);
            }
        })
        .register()
        .unwrap();
    let fired = Arc::new(AtomicBool::new(false));
    let f = fired.clone();
    let timer = held
        .timer(ClockType::Realtime, Scale::US, move || {
            f.store(true, SeqCst)
        })
        .unwrap();
    timer.arm_after(Duration::from_micros(100));
    n.set().unwrap();
    let start = Instant::now();
    while reads.load(SeqCst) == 0 || !fired.load(SeqCst) {
        assert!(start.elapsed() < HANG, "the I/O never completed");
        held.poll();
    }
    handler.remove();
    // Set again after the removal: nothing reads it any more.
    n.set().unwrap();
    held.poll_nonblocking();
    assert_eq!(reads.load(SeqCst), 1);
}

#[test]
fn threads_take_turns_on_every_backend() {
    for (backend, ctx) in backends() {
        let stop = Arc::new(AtomicBool::new(false));
        let looper = {
            let (ctx, stop) = (ctx.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(SeqCst) {
                    let held = ctx.acquire();
                    held.poll();
                }
            })
        };
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let ctx = ctx.clone();
                thread::spawn(move || {
                    for _ in 0..ROUNDS {
                        io_round(&ctx);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .unwrap_or_else(|_| panic!("{backend:?}: an I/O thread failed"));
        }
        stop.store(true, SeqCst);
        ctx.notify();
        looper.join().unwrap();
        // The last clone is dropped here, on a thread that never polled it.
        drop(ctx);
    }
}
