//! Scheduling a bottom half from a signal handler on the home thread, which QEMU allows
//! (`qemu_bh_schedule` is async-signal-safe): while the loop sleeps in `poll` (inside the
//! blocking window, where the schedule must notify), and while the home thread is itself in the
//! middle of scheduling (the handler interrupts an operation on the home thread's local list and
//! must fall back to the shared list).
//!
//! Each test installs its own signal and runs alone in a child process (the test binary re-runs
//! itself), so that signal dispositions do not leak between tests. The `SAFETY` comments cite
//! [SYS-1], [SYS-2] and [SYS-4] of ARCHITECTURE.md ("The kernel boundary").

use aio_core::{AioContext, BottomHalf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn ctx() -> AioContext {
    AioContext::new(Box::new(fdmon_poll::PollMonitor::new().unwrap())).unwrap()
}

/// Runs `test` in a child process and checks that it passed there.
fn in_child(name: &str, test: fn()) {
    if std::env::var("AIO_SIGNAL_CHILD").as_deref() == Ok(name) {
        test();
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env("AIO_SIGNAL_CHILD", name)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

static BH: OnceLock<BottomHalf> = OnceLock::new();
static HANDLED: AtomicUsize = AtomicUsize::new(0);

extern "C" fn schedule_from_handler(_: libc::c_int) {
    HANDLED.fetch_add(1, Ordering::SeqCst);
    if let Some(bh) = BH.get() {
        bh.schedule();
    }
}

fn install(signal: libc::c_int) {
    // [SYS-2]: a zeroed sigaction means "no flags, empty mask", and `action` is a live local.
    // SAFETY: [SYS-4]: the handler only touches atomics and schedules a BH.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = schedule_from_handler as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        assert_eq!(libc::sigaction(signal, &action, std::ptr::null_mut()), 0);
    }
}

fn signal_thread(thread: libc::pthread_t, signal: libc::c_int) {
    // SAFETY: [SYS-1]: `thread` is the home thread, which joins this sender before it exits.
    assert_eq!(unsafe { libc::pthread_kill(thread, signal) }, 0);
}

#[test]
#[cfg_attr(miri, ignore = "Miri cannot run child processes or deliver signals")]
fn signal_handler_schedule_wakes_a_sleeping_poll() {
    in_child("signal_handler_schedule_wakes_a_sleeping_poll", || {
        let ctx = ctx();
        let runs = std::sync::Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        assert!(
            BH.set(ctx.bh(move || {
                r.fetch_add(1, Ordering::SeqCst);
            }))
            .is_ok()
        );
        install(libc::SIGUSR1);
        // SAFETY: [SYS-1]: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            signal_thread(me, libc::SIGUSR1);
        });
        let start = Instant::now();
        // The only thing that can end this sleep is the BH the handler schedules.
        while runs.load(Ordering::SeqCst) == 0 {
            ctx.poll();
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the signal's BH never woke poll"
            );
        }
        sender.join().unwrap();
        assert_eq!(HANDLED.load(Ordering::SeqCst), 1);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    });
}

#[test]
#[cfg_attr(miri, ignore = "Miri cannot run child processes or deliver signals")]
fn signal_storm_while_the_home_thread_schedules() {
    in_child("signal_storm_while_the_home_thread_schedules", || {
        let ctx = ctx();
        // Each handler invocation counts, then schedules; the BH records the count it saw, so
        // the last run must have seen every handler invocation (no schedule lost).
        let seen = std::sync::Arc::new(AtomicUsize::new(0));
        let s = seen.clone();
        assert!(
            BH.set(ctx.bh(move || {
                s.store(HANDLED.load(Ordering::SeqCst), Ordering::SeqCst);
            }))
            .is_ok()
        );
        let local_runs = std::sync::Arc::new(AtomicUsize::new(0));
        let l = local_runs.clone();
        let local = ctx.bh(move || {
            l.fetch_add(1, Ordering::SeqCst);
        });
        install(libc::SIGUSR2);
        // SAFETY: [SYS-1]: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = done.clone();
        let sender = std::thread::spawn(move || {
            let mut sent = 0;
            while !d.load(Ordering::SeqCst) && sent < 20_000 {
                signal_thread(me, libc::SIGUSR2);
                sent += 1;
                std::hint::spin_loop();
            }
        });
        // Schedule locally in a tight loop, so that handlers often interrupt a local-list
        // operation and must take the shared list.
        let start = Instant::now();
        let mut iterations = 0;
        while start.elapsed() < Duration::from_millis(500) {
            local.schedule();
            ctx.poll_nonblocking();
            iterations += 1;
        }
        done.store(true, Ordering::SeqCst);
        sender.join().unwrap();
        while ctx.poll_nonblocking() {}
        let handled = HANDLED.load(Ordering::SeqCst);
        assert!(handled > 0, "no signal was delivered");
        assert_eq!(
            seen.load(Ordering::SeqCst),
            handled,
            "a signal handler's schedule was lost"
        );
        assert_eq!(local_runs.load(Ordering::SeqCst), iterations);
        println!("{handled} signals over {iterations} local schedules");
    });
}
