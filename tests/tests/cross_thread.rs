//! Bottom halves and wake-ups driven from other threads while the home thread polls: many
//! schedules of one BH, ping-pong with one BH per thread, one-shot floods, and a remote notify
//! waking a loop that has nothing else to wait for (QEMU `/aio/multi/*` style).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use aio::{AioContext, BottomHalf};

const THREADS: usize = 4;
const PER_THREAD: u64 = 100_000;
const TOTAL: u64 = THREADS as u64 * PER_THREAD;

/// A run that takes longer than this is a hang (a lost wake-up), not a slow machine.
const HANG: Duration = Duration::from_secs(120);

fn make() -> AioContext {
    aio_tests::poll_context().expect("creating a context")
}

/// Blocking polls until `finished` reaches `THREADS` (each thread notifies after its last
/// operation, so the loop cannot sleep through the end), then drains.
fn poll_until_finished(ctx: &AioContext, finished: &AtomicUsize) {
    let start = Instant::now();
    while finished.load(SeqCst) < THREADS {
        ctx.poll();
        assert!(start.elapsed() < HANG, "the loop stopped making progress");
    }
    while ctx.poll_nonblocking() {}
}

/// QEMU's "each schedule is followed by at least one run": 4 threads schedule the same BH
/// 100 000 times each while the home thread polls. Schedules coalesce, so the run count is
/// anywhere in 1..=400 000, but the last run must observe all 400 000 schedules.
#[test]
fn same_bh_from_four_threads() {
    let ctx = make();
    let scheduled = Arc::new(AtomicU64::new(0));
    let runs = Arc::new(AtomicU64::new(0));
    let last_seen = Arc::new(AtomicU64::new(0));
    let (s, r, l) = (scheduled.clone(), runs.clone(), last_seen.clone());
    let bh = Arc::new(ctx.bh(move || {
        r.fetch_add(1, SeqCst);
        l.store(s.load(SeqCst), SeqCst);
    }));
    let finished = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (bh, scheduled, finished) = (bh.clone(), scheduled.clone(), finished.clone());
            let handle = ctx.handle();
            thread::spawn(move || {
                for _ in 0..PER_THREAD {
                    scheduled.fetch_add(1, SeqCst);
                    bh.schedule();
                }
                finished.fetch_add(1, SeqCst);
                handle.notify();
            })
        })
        .collect();
    poll_until_finished(&ctx, &finished);
    for t in threads {
        t.join().unwrap();
    }
    while ctx.poll_nonblocking() {}
    let runs = runs.load(SeqCst);
    assert!((1..=TOTAL).contains(&runs), "runs = {runs}");
    assert_eq!(scheduled.load(SeqCst), TOTAL);
    assert_eq!(
        last_seen.load(SeqCst),
        TOTAL,
        "the last schedule was followed by a run"
    );
    assert!(!bh.is_scheduled());
}

/// 4 threads, one BH each, ping-pong: each thread schedules its BH, waits until it ran, and
/// schedules it again, 100 000 times. No schedule can coalesce, so each BH runs exactly
/// 100 000 times.
#[test]
fn distinct_bhs_ping_pong() {
    let ctx = make();
    let finished = Arc::new(AtomicUsize::new(0));
    let mut bhs = Vec::new();
    let mut threads = Vec::new();
    let counts: Vec<Arc<AtomicU64>> = (0..THREADS).map(|_| Arc::new(AtomicU64::new(0))).collect();
    for count in &counts {
        let ran = Arc::new(AtomicBool::new(false));
        let (c, r) = (count.clone(), ran.clone());
        let bh: Arc<BottomHalf> = Arc::new(ctx.bh(move || {
            c.fetch_add(1, SeqCst);
            r.store(true, SeqCst);
        }));
        bhs.push(bh.clone());
        let (finished, handle) = (finished.clone(), ctx.handle());
        threads.push(thread::spawn(move || {
            for _ in 0..PER_THREAD {
                ran.store(false, SeqCst);
                bh.schedule();
                while !ran.load(SeqCst) {
                    thread::yield_now();
                }
            }
            finished.fetch_add(1, SeqCst);
            handle.notify();
        }));
    }
    poll_until_finished(&ctx, &finished);
    for t in threads {
        t.join().unwrap();
    }
    assert!(!ctx.poll_nonblocking());
    for (i, c) in counts.iter().enumerate() {
        assert_eq!(c.load(SeqCst), PER_THREAD, "BH {i}");
    }
}

/// 4 threads × 100 000 one-shot BHs: exactly 400 000 runs, all on the home thread.
#[test]
fn oneshot_flood_runs_each_once_on_home_thread() {
    let ctx = make();
    let home = thread::current().id();
    let runs = Arc::new(AtomicU64::new(0));
    let elsewhere = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (runs, elsewhere, finished) = (runs.clone(), elsewhere.clone(), finished.clone());
            let handle = ctx.handle();
            thread::spawn(move || {
                for _ in 0..PER_THREAD {
                    let (r, e) = (runs.clone(), elsewhere.clone());
                    handle.schedule_oneshot(move || {
                        r.fetch_add(1, SeqCst);
                        if thread::current().id() != home {
                            e.fetch_add(1, SeqCst);
                        }
                    });
                }
                finished.fetch_add(1, SeqCst);
                handle.notify();
            })
        })
        .collect();
    poll_until_finished(&ctx, &finished);
    for t in threads {
        t.join().unwrap();
    }
    while ctx.poll_nonblocking() {}
    assert_eq!(runs.load(SeqCst), TOTAL);
    assert_eq!(
        elsewhere.load(SeqCst),
        0,
        "every one-shot ran on the home thread"
    );
    assert!(!ctx.poll_nonblocking());
    assert_eq!(runs.load(SeqCst), TOTAL);
}

/// A poll with nothing to wait for (no timers, no BHs, no user fds) sleeps until another
/// thread notifies it 100 ms later, and returns false: a bare notify is not progress.
#[test]
fn remote_notify_wakes_idle_poll() {
    let ctx = make();
    while ctx.poll_nonblocking() {}
    let sent = Arc::new(AtomicBool::new(false));
    let (handle, s) = (ctx.handle(), sent.clone());
    let t = thread::spawn(move || {
        thread::sleep(Duration::from_millis(100));
        s.store(true, SeqCst);
        handle.notify();
    });
    let start = Instant::now();
    let progress = ctx.poll();
    let elapsed = start.elapsed();
    t.join().unwrap();
    assert!(!progress);
    assert!(sent.load(SeqCst), "the poll slept until the notify");
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    assert!(ctx.handle().event_writes() >= 1);
}

/// A BH deleted (its handle dropped) on another thread while scheduled never runs, and its
/// callback is freed by the loop.
#[test]
fn bh_deleted_on_another_thread_never_runs() {
    let ctx = make();
    let runs = Arc::new(AtomicU32::new(0));
    let freed = Arc::new(Mutex::new(false));
    struct Flag(Arc<Mutex<bool>>);
    impl Drop for Flag {
        fn drop(&mut self) {
            *self.0.lock().unwrap() = true;
        }
    }
    let (r, flag) = (runs.clone(), Flag(freed.clone()));
    let bh = ctx.bh(move || {
        let _ = &flag;
        r.fetch_add(1, SeqCst);
    });
    bh.schedule();
    thread::spawn(move || drop(bh)).join().unwrap();
    assert!(!ctx.poll_nonblocking());
    assert_eq!(runs.load(SeqCst), 0);
    assert!(*freed.lock().unwrap());
}

/// A BH created and scheduled through a `ContextHandle` on another thread runs on the home
/// thread; dropping it there afterwards is fine.
#[test]
fn bh_created_on_another_thread() {
    let ctx = make();
    while ctx.poll_nonblocking() {}
    let home = thread::current().id();
    let ran_home = Arc::new(AtomicU32::new(0));
    let (handle, r) = (ctx.handle(), ran_home.clone());
    let bh = thread::spawn(move || {
        let bh = handle.bh(move || {
            if thread::current().id() == home {
                r.fetch_add(1, SeqCst);
            }
        });
        bh.schedule();
        bh
    })
    .join()
    .unwrap();
    assert!(ctx.poll());
    assert_eq!(ran_home.load(SeqCst), 1);
    thread::spawn(move || drop(bh)).join().unwrap();
    assert!(!ctx.poll_nonblocking());
    assert_eq!(ran_home.load(SeqCst), 1);
}
