//! Times the sub-steps of B1 (BH schedule + dispatch) and the primitives they are made of, to
//! show where aio's nanoseconds go (B2's one-shot path too). Not a benchmark of record; run with
//! `cargo run --release -p aio-benches --example b1_breakdown [SUBSTRING]`, where SUBSTRING
//! keeps only the steps whose name contains it (handy under `perf record` or `strace -c`).

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering, fence};
use std::time::Instant;

use aio_benches::{AioBhBatch, AioOneshot, TokioSpawnBatch, new_context};

const N: u64 = 5_000_000;
const RUNS: usize = 7;

/// Median over `RUNS` runs of the ns per call of `f`, which performs `N` operations; skipped
/// unless `name` contains the command line's substring.
fn time(name: &str, mut f: impl FnMut(u64)) {
    if std::env::args()
        .nth(1)
        .is_some_and(|only| !name.contains(&only))
    {
        return;
    }
    f(N / 10);
    let mut v: Vec<f64> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            f(N);
            t.elapsed().as_nanos() as f64 / N as f64
        })
        .collect();
    v.sort_by(f64::total_cmp);
    println!("{name:<58} {:>7.1} ns", v[RUNS / 2]);
}

fn main() {
    println!("-- aio B1 steps (home thread, poll backend) --");
    let mut b1 = AioBhBatch::new(1);
    time("B1: bh.schedule() + ctx.poll_nonblocking()", |n| {
        b1.run(n);
    });
    let ctx = new_context();
    time("poll_nonblocking() with nothing scheduled", |n| {
        for _ in 0..n {
            black_box(ctx.poll_nonblocking());
        }
    });
    time("ctx.notify() on the home thread", |n| {
        for _ in 0..n {
            ctx.notify();
        }
    });
    time(
        "notify() + poll_nonblocking() (accept stores + fences)",
        |n| {
            for _ in 0..n {
                ctx.notify();
                ctx.poll_nonblocking();
            }
        },
    );
    let bh = ctx.bh(|| {});
    bh.schedule();
    time("bh.schedule() of an already pending BH (coalesced)", |n| {
        for _ in 0..n {
            bh.schedule();
        }
    });
    ctx.poll_nonblocking();
    time("schedule_oneshot() + poll_nonblocking(), 1 per poll", |n| {
        for _ in 0..n {
            ctx.schedule_oneshot(|| {});
            ctx.poll_nonblocking();
        }
    });

    let mut b2 = AioOneshot::new(1000);
    time("B2: 1000 x schedule_oneshot() + poll until all ran", |n| {
        b2.run(n / 1000);
    });
    let mut peer = TokioSpawnBatch::new(1000);
    time("B2 peer: 1000 x tokio spawn + await", |n| {
        peer.run(n / 1000);
    });

    println!("-- primitives --");
    let a = AtomicU32::new(0);
    time("AtomicU32::fetch_or (lock or)", |n| {
        for _ in 0..n {
            a.fetch_or(black_box(1), Ordering::AcqRel);
        }
    });
    time("AtomicU32::compare_exchange (lock cmpxchg)", |n| {
        for i in 0..n {
            let _ =
                a.compare_exchange(i as u32, i as u32 + 1, Ordering::Release, Ordering::Relaxed);
        }
    });
    let flag = AtomicBool::new(false);
    time(
        "store(Release) + fence(SeqCst) (notify/accept shape)",
        |n| {
            for _ in 0..n {
                flag.store(true, Ordering::Release);
                fence(Ordering::SeqCst);
                black_box(a.load(Ordering::Relaxed));
            }
        },
    );
    time("swap(SeqCst) (xchg) instead of store + fence", |n| {
        for _ in 0..n {
            flag.swap(true, Ordering::SeqCst);
            black_box(a.load(Ordering::Relaxed));
        }
    });
    time("load(Relaxed) only (flag check)", |n| {
        for _ in 0..n {
            black_box(flag.load(Ordering::Relaxed));
        }
    });
    let arc = Arc::new(0u64);
    time("Arc clone + drop (lock inc + lock dec)", |n| {
        for _ in 0..n {
            drop(black_box(arc.clone()));
        }
    });
    let mut cb: Box<dyn FnMut() + Send> = Box::new(|| {});
    time("Box<dyn FnMut()> call", |n| {
        for _ in 0..n {
            black_box(&mut cb)();
        }
    });
    time("Box::new(closure) + drop (one-shot allocation)", |n| {
        for i in 0..n {
            let b: Box<dyn FnOnce() -> u64 + Send> = Box::new(move || i);
            drop(black_box(b));
        }
    });
}
