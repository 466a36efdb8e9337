//! B7, lateness: how late timers of 10 µs, 100 µs and 1 ms fire when the loop sleeps for them,
//! per backend and timer slack, against tokio `sleep_until` on a `current_thread` runtime in
//! the same process. Prints p50 / p99 / p99.9 of (time the callback ran − deadline), and writes
//! `lateness.md` into `$AIO_BENCH_REPORT_DIR` when set.
//!
//! Timer slack is per thread and decides how late the kernel may end a timed wait; Linux's
//! default is 50 µs, QEMU sets 1 ns. Each row says which it used, for aio and tokio alike.

use aio::{Backend, Builder, ClockType, Scale};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One row's samples, in nanoseconds of lateness.
fn percentiles(mut v: Vec<u64>) -> (u64, u64, u64) {
    v.sort_unstable();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (at(0.50), at(0.99), at(0.999))
}

/// How many samples for a period: about 1.5 s of waiting per row, between 200 and 3 000 (tokio
/// rounds every sleep up to a millisecond, so its rows take about `samples` ms).
fn samples(period: Duration) -> usize {
    (1_500_000_000 / period.as_nanos() as usize).clamp(200, 3_000)
}

fn aio_lateness(backend: Backend, period: Duration) -> Option<Vec<u64>> {
    let ctx = Builder::new().backend(backend).ignore_env().build().ok()?;
    let fired: Arc<Mutex<Option<Instant>>> = Arc::default();
    let f = fired.clone();
    let timer = ctx.timer(ClockType::Realtime, Scale::NS, move || {
        *f.lock().unwrap() = Some(Instant::now());
    });
    let n = samples(period);
    let mut out = Vec::with_capacity(n);
    for i in 0..n + 20 {
        let deadline = Instant::now() + period;
        timer.arm_after(period);
        loop {
            ctx.poll();
            if let Some(at) = fired.lock().unwrap().take() {
                if i >= 20 {
                    // The first 20 are warm-up.
                    out.push(at.saturating_duration_since(deadline).as_nanos() as u64);
                }
                break;
            }
        }
    }
    Some(out)
}

fn tokio_lateness(period: Duration) -> Vec<u64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let n = samples(period);
    rt.block_on(async {
        let mut out = Vec::with_capacity(n);
        for i in 0..n + 20 {
            let deadline = tokio::time::Instant::now() + period;
            tokio::time::sleep_until(deadline).await;
            let late = tokio::time::Instant::now().saturating_duration_since(deadline);
            if i >= 20 {
                out.push(late.as_nanos() as u64);
            }
        }
        out
    })
}

fn us(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1000.0)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists bench targets; nothing to list here.
    }
    let periods = [
        Duration::from_micros(10),
        Duration::from_micros(100),
        Duration::from_millis(1),
    ];
    let mut table = String::from(
        "| timer | runtime | slack | p50 late µs | p99 late µs | p99.9 late µs | samples |\n|---|---|---|---:|---:|---:|---:|\n",
    );
    for slack in [Duration::from_nanos(1), Duration::ZERO] {
        let slack_name = if slack.is_zero() {
            "default (50 µs)"
        } else {
            "1 ns"
        };
        aio::set_timer_slack(slack).expect("timer slack");
        for period in periods {
            for (name, backend) in [
                ("aio io_uring", Backend::IoUring),
                ("aio epoll", Backend::Epoll),
                ("aio poll", Backend::Poll),
            ] {
                let Some(v) = aio_lateness(backend, period) else {
                    println!("SKIP {name}: backend unavailable");
                    continue;
                };
                let count = v.len();
                let (p50, p99, p999) = percentiles(v);
                writeln!(
                    table,
                    "| {period:?} | {name} | {slack_name} | {} | {} | {} | {count} |",
                    us(p50),
                    us(p99),
                    us(p999)
                )
                .unwrap();
            }
            let v = tokio_lateness(period);
            let count = v.len();
            let (p50, p99, p999) = percentiles(v);
            writeln!(
                table,
                "| {period:?} | tokio sleep_until | {slack_name} | {} | {} | {} | {count} |",
                us(p50),
                us(p99),
                us(p999)
            )
            .unwrap();
        }
    }
    aio::set_timer_slack(Duration::ZERO).ok();
    println!("{table}");
    if let Some(dir) = std::env::var_os("AIO_BENCH_REPORT_DIR") {
        let path = std::path::Path::new(&dir).join("lateness.md");
        std::fs::create_dir_all(&dir).ok();
        std::fs::write(&path, &table).expect("write lateness.md");
        println!("written to {}", path.display());
    }
}
