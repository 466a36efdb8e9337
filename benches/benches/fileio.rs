//! B11 (docs/benchmarks.md): 4 KiB random reads and writes of one file, at queue depth 1 and
//! 32, through the page cache (`B11_cached`) and with `O_DIRECT` (`B11_direct`): aio's three
//! block I/O engines against `tokio::fs`, tokio `spawn_blocking` + `pread`/`pwrite`,
//! tokio-uring and the raw `io-uring` crate floor, all in one process. The workloads are in
//! `aio_benches::file_io`; this program owns the plan, the interleaving and the tables.
//!
//! Each row runs `rounds` rounds; a round runs every contender once over the same offsets (a
//! new sequence per round), in the same order, so that they all see the same machine weather;
//! the table gives the median per-operation time, its IOPS, and ratios. Targets (issue 14): the
//! io_uring engine ≥ 2× `tokio::fs` at QD 32 (with `O_DIRECT`, where `tokio::fs` cannot run,
//! against tokio's `spawn_blocking`), and within 1.2× of the raw floor.
//!
//! The file (`b11.img` in cargo's target tmp dir, 1 GiB; `--quick` 256 MiB) is written once,
//! every block, so that `O_DIRECT` reads reach the disk. The page-cache part reads the whole
//! file before its reads, and before every write run writes the file back and drops it from
//! the page cache, so that each contender's writes start alike (`file_io::drop_cached` says
//! why); the direct writes then evict it.
//!
//! `B11_fixed` runs only aio's io_uring engine with plain `Vec` buffers against the same engine
//! with a registered `FixedBufPool` (`read_fixed`/`write_fixed`), interleaved, more rounds: what
//! registered buffers win in the real code path. Both are also rows of the two tables above.
//!
//! `B11_ring_features` runs the raw floor with each optional io_uring feature (SINGLE_ISSUER +
//! DEFER_TASKRUN, a registered file, registered buffers, SQPOLL): what each can win at best.
//!
//! `cargo bench -p aio-benches --bench fileio [-- FILTER] [--quick]`; without `--bench` (as
//! under `cargo test --benches`) a smoke run on an 8 MiB file.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use aio::blockio::Engine;
use aio_benches::file_io::{self, Kind, RingFeatures};
use aio_benches::{Sizes, percentile, verdict};

#[derive(Debug, Clone, Copy)]
struct Plan {
    rounds: usize,
    file_size: u64,
    cached_ops: usize,
    direct_ops: usize,
}

const SMOKE: Plan = Plan {
    rounds: 1,
    file_size: 8 << 20,
    cached_ops: 256,
    direct_ops: 64,
};
const QUICK: Plan = Plan {
    rounds: 2,
    file_size: 256 << 20,
    cached_ops: 20_000,
    direct_ops: 2_000,
};
const FULL: Plan = Plan {
    rounds: 5,
    file_size: 1 << 30,
    cached_ops: 100_000,
    direct_ops: 10_000,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    AioUring,
    AioUringFixed,
    AioThreads,
    AioNative,
    TokioFs,
    TokioBlocking,
    TokioUring,
    Raw,
}

const EVERYONE: [Who; 8] = [
    Who::AioUring,
    Who::AioUringFixed,
    Who::AioThreads,
    Who::AioNative,
    Who::TokioFs,
    Who::TokioBlocking,
    Who::TokioUring,
    Who::Raw,
];

fn label(w: Who) -> &'static str {
    match w {
        Who::AioUring => "aio io_uring (context's ring)",
        Who::AioUringFixed => "aio io_uring, registered buffers (`FixedBufPool`)",
        Who::AioThreads => "aio threads (pool, epoll context)",
        Who::AioNative => "aio native (Linux AIO, epoll context)",
        Who::TokioFs => "`tokio::fs::File` seek + read/write",
        Who::TokioBlocking => "tokio `spawn_blocking` + pread/pwrite",
        Who::TokioUring => "tokio-uring 0.5",
        Who::Raw => "raw `io-uring` crate (floor)",
    }
}

fn run(
    w: Who,
    file: &std::fs::File,
    kind: Kind,
    qd: usize,
    offs: &[u64],
) -> std::io::Result<Duration> {
    match w {
        Who::AioUring => file_io::aio(Engine::IoUring, file, kind, qd, offs),
        Who::AioUringFixed => file_io::aio_fixed(file, kind, qd, offs),
        Who::AioThreads => file_io::aio(Engine::Threads, file, kind, qd, offs),
        Who::AioNative => file_io::aio(Engine::LinuxAio, file, kind, qd, offs),
        Who::TokioFs => file_io::tokio_fs(file, kind, qd, offs),
        Who::TokioBlocking => file_io::tokio_blocking(file, kind, qd, offs),
        Who::TokioUring => file_io::tokio_uring(file, kind, qd, offs),
        Who::Raw => file_io::raw_uring(file, kind, qd, offs),
    }
}

fn cache_name(direct: bool) -> &'static str {
    if direct { "O_DIRECT" } else { "page cache" }
}

fn image() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("b11.img")
}

/// The benchmark file, written if need be, opened for `direct` or not (and then read whole, so
/// that the page-cache rows start from a cached file), and the operations per run.
fn bench_file(plan: Plan, direct: bool) -> Result<(std::fs::File, usize), String> {
    let path = image();
    file_io::prepare(&path, plan.file_size)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let file = file_io::open(&path, direct)
        .map_err(|e| format!("cannot open {} (O_DIRECT: {direct}): {e}", path.display()))?;
    if direct {
        return Ok((file, plan.direct_ops));
    }
    file_io::warm(&file, plan.file_size).map_err(|e| format!("cannot read the file: {e}"))?;
    Ok((file, plan.cached_ops))
}

/// Before every page-cache write run: the file written back and out of the page cache
/// ([`file_io::drop_cached`]), the same state for every contender. Reads need nothing: the
/// file is read whole before the reads ([`bench_file`]) and reads evict nothing.
fn settle(file: &std::fs::File, kind: Kind, direct: bool) -> std::io::Result<()> {
    if kind == Kind::Write && !direct {
        file_io::drop_cached(file)?;
    }
    Ok(())
}

fn part(out: &mut String, plan: Plan, direct: bool) {
    let name = if direct { "B11_direct" } else { "B11_cached" };
    let (file, ops) = match bench_file(plan, direct) {
        Ok(f) => f,
        Err(e) => {
            writeln!(out, "\n## {name}\n\nskipped: {e}").unwrap();
            return;
        }
    };
    writeln!(
        out,
        "\n## {name}: 4 KiB random I/O on a {} MiB file, {}, {ops} operations per run, {} rounds\n",
        plan.file_size >> 20,
        if direct { "O_DIRECT" } else { "page cache" },
        plan.rounds
    )
    .unwrap();
    writeln!(
        out,
        "| op | QD | contender | median µs/op | kIOPS | vs tokio | vs raw floor |"
    )
    .unwrap();
    writeln!(out, "|---|---:|---|---:|---:|---:|---:|").unwrap();
    let mut verdicts = Vec::new();
    let mut skipped = Vec::new();
    for kind in [Kind::Read, Kind::Write] {
        for qd in [1usize, 32] {
            let who: Vec<Who> = EVERYONE
                .into_iter()
                .filter(|&w| !(direct && w == Who::TokioFs))
                .collect();
            let mut times: Vec<Vec<f64>> = vec![Vec::new(); who.len()];
            let mut alive = vec![true; who.len()];
            for round in 0..plan.rounds {
                let offs = file_io::offsets(ops, plan.file_size, 0x5eed + round as u64 * 7919);
                for (i, &w) in who.iter().enumerate() {
                    if !alive[i] {
                        continue;
                    }
                    if let Err(e) = settle(&file, kind, direct) {
                        alive[i] = false;
                        skipped.push(format!("{} ({kind:?}, QD {qd}): {e}", label(w)));
                        continue;
                    }
                    match run(w, &file, kind, qd, &offs) {
                        Ok(t) => times[i].push(t.as_nanos() as f64 / ops as f64),
                        Err(e) => {
                            alive[i] = false;
                            skipped.push(format!("{} ({kind:?}, QD {qd}): {e}", label(w)));
                        }
                    }
                }
            }
            let med: Vec<Option<f64>> = times
                .into_iter()
                .map(|mut v| {
                    v.sort_by(f64::total_cmp);
                    (!v.is_empty()).then(|| percentile(&v, 0.5))
                })
                .collect();
            let at = |w: Who| who.iter().position(|&x| x == w).and_then(|i| med[i]);
            let tokio = if direct {
                at(Who::TokioBlocking)
            } else {
                at(Who::TokioFs)
            };
            let raw = at(Who::Raw);
            for (i, &w) in who.iter().enumerate() {
                let Some(ns) = med[i] else { continue };
                let ratio = |peer: Option<f64>| {
                    peer.map_or("–".to_owned(), |p| format!("{:.2}×", p / ns))
                };
                writeln!(
                    out,
                    "| {kind:?} | {qd} | {} | {:.2} | {:.1} | {} | {} |",
                    label(w),
                    ns / 1000.0,
                    1e6 / ns,
                    ratio(tokio),
                    ratio(raw)
                )
                .unwrap();
            }
            if let (Some(plain), Some(fixed)) = (at(Who::AioUring), at(Who::AioUringFixed)) {
                verdicts.push(format!(
                    "Registered buffers vs plain on the io_uring engine, {kind:?} QD {qd}: {:.2}× ({:.2} against {:.2} µs/op)",
                    plain / fixed,
                    fixed / 1000.0,
                    plain / 1000.0
                ));
            }
            if let Some(ours) = at(Who::AioUring) {
                let peer = if direct {
                    "tokio spawn_blocking"
                } else {
                    "tokio::fs"
                };
                if qd == 32
                    && let Some(t) = tokio
                {
                    verdicts.push(format!(
                        "Target io_uring engine ≥ 2× {peer}, {kind:?} QD 32: {:.2}× — {}",
                        t / ours,
                        verdict(t / ours >= 2.0)
                    ));
                }
                if let Some(r) = raw {
                    verdicts.push(format!(
                        "Target io_uring engine within 1.2× of the raw floor, {kind:?} QD {qd}: {:.2}× the floor's time — {}",
                        ours / r,
                        verdict(ours / r <= 1.2)
                    ));
                }
            }
        }
    }
    for v in verdicts {
        writeln!(out, "\n{v}").unwrap();
    }
    for s in skipped {
        writeln!(out, "\nskipped: {s}").unwrap();
    }
}

/// aio's io_uring engine, plain buffers against a registered `FixedBufPool`, interleaved
/// (which goes first alternates by round), `2 × rounds + 1` rounds: reads and writes, QD 1 and
/// 32, page cache and `O_DIRECT`.
fn fixed_buffers(out: &mut String, plan: Plan) {
    let rounds = 2 * plan.rounds + 1;
    writeln!(
        out,
        "\n## B11_fixed: aio's io_uring engine, plain `Vec` buffers vs registered buffers, 4 KiB random I/O, {rounds} rounds\n"
    )
    .unwrap();
    writeln!(
        out,
        "| cache | op | QD | plain µs/op | fixed µs/op | fixed vs plain | fixed wins in rounds |"
    )
    .unwrap();
    writeln!(out, "|---|---|---:|---:|---:|---:|---:|").unwrap();
    for direct in [false, true] {
        let (file, ops) = match bench_file(plan, direct) {
            Ok(f) => f,
            Err(e) => {
                writeln!(out, "| {} | skipped: {e} | | | | | |", cache_name(direct)).unwrap();
                continue;
            }
        };
        for kind in [Kind::Read, Kind::Write] {
            for qd in [1usize, 32] {
                let (mut plain, mut fixed, mut wins) = (Vec::new(), Vec::new(), 0);
                let mut failed = None;
                for round in 0..rounds {
                    let offs =
                        file_io::offsets(ops, plan.file_size, 0xf1ed + round as u64 * 104_729);
                    let order = if round % 2 == 0 {
                        [Who::AioUring, Who::AioUringFixed]
                    } else {
                        [Who::AioUringFixed, Who::AioUring]
                    };
                    let mut pair = [0.0; 2];
                    for w in order {
                        if let Err(e) = settle(&file, kind, direct) {
                            failed = Some(format!("{}: {e}", label(w)));
                            continue;
                        }
                        match run(w, &file, kind, qd, &offs) {
                            Ok(t) => {
                                let ns = t.as_nanos() as f64 / ops as f64;
                                pair[usize::from(w == Who::AioUringFixed)] = ns;
                            }
                            Err(e) => failed = Some(format!("{}: {e}", label(w))),
                        }
                    }
                    if failed.is_some() {
                        break;
                    }
                    wins += usize::from(pair[1] < pair[0]);
                    plain.push(pair[0]);
                    fixed.push(pair[1]);
                }
                let cache = cache_name(direct);
                if let Some(e) = failed {
                    writeln!(out, "| {cache} | {kind:?} | {qd} | refused: {e} | | | |").unwrap();
                    continue;
                }
                plain.sort_by(f64::total_cmp);
                fixed.sort_by(f64::total_cmp);
                let (p, f) = (percentile(&plain, 0.5), percentile(&fixed, 0.5));
                writeln!(
                    out,
                    "| {cache} | {kind:?} | {qd} | {:.2} | {:.2} | {:.2}× | {wins}/{rounds} |",
                    p / 1000.0,
                    f / 1000.0,
                    p / f
                )
                .unwrap();
            }
        }
    }
}

fn cached(out: &mut String, plan: Plan) {
    part(out, plan, false);
}

fn direct(out: &mut String, plan: Plan) {
    part(out, plan, true);
}

/// What each optional io_uring feature wins on the raw floor (QD 1 and 32 reads, page cache and
/// `O_DIRECT`), before any is built into the monitor.
fn ring_features(out: &mut String, plan: Plan) {
    let none = RingFeatures::default();
    let variants = [
        ("no setup flags (the monitor's ring today)", none),
        (
            "SINGLE_ISSUER + DEFER_TASKRUN",
            RingFeatures {
                defer_taskrun: true,
                ..none
            },
        ),
        (
            "registered file",
            RingFeatures {
                fixed_file: true,
                ..none
            },
        ),
        (
            "registered buffers (READ_FIXED)",
            RingFeatures {
                fixed_buffers: true,
                ..none
            },
        ),
        (
            "registered file + buffers",
            RingFeatures {
                fixed_file: true,
                fixed_buffers: true,
                ..none
            },
        ),
        (
            "SQPOLL (a kernel thread polls)",
            RingFeatures {
                sqpoll: true,
                ..none
            },
        ),
    ];
    writeln!(
        out,
        "\n## B11_ring_features: the raw floor's 4 KiB random reads with optional io_uring features, {} rounds\n",
        plan.rounds
    )
    .unwrap();
    writeln!(out, "| cache | QD | ring | median µs/op | vs no flags |").unwrap();
    writeln!(out, "|---|---:|---|---:|---:|").unwrap();
    for direct in [false, true] {
        let (file, ops) = match bench_file(plan, direct) {
            Ok(f) => f,
            Err(e) => {
                writeln!(out, "| {} | | skipped: {e} | | |", cache_name(direct)).unwrap();
                continue;
            }
        };
        for qd in [1usize, 32] {
            let mut times: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
            let mut refused: Vec<Option<String>> = vec![None; variants.len()];
            for round in 0..plan.rounds {
                let offs = file_io::offsets(ops, plan.file_size, 0xfea7 + round as u64 * 31);
                for (i, (_, f)) in variants.iter().enumerate() {
                    if refused[i].is_some() {
                        continue;
                    }
                    match file_io::raw_uring_with(*f, &file, Kind::Read, qd, &offs) {
                        Ok(t) => times[i].push(t.as_nanos() as f64 / ops as f64),
                        Err(e) => refused[i] = Some(e.to_string()),
                    }
                }
            }
            let med: Vec<Option<f64>> = times
                .into_iter()
                .map(|mut v| {
                    v.sort_by(f64::total_cmp);
                    (!v.is_empty()).then(|| percentile(&v, 0.5))
                })
                .collect();
            let cache = cache_name(direct);
            for (i, (name, _)) in variants.iter().enumerate() {
                match (med[i], &refused[i]) {
                    (Some(ns), _) => {
                        let vs = med[0].map_or("–".to_owned(), |b| format!("{:.2}×", b / ns));
                        writeln!(
                            out,
                            "| {cache} | {qd} | {name} | {:.2} | {vs} |",
                            ns / 1000.0
                        )
                        .unwrap();
                    }
                    (None, Some(e)) => {
                        writeln!(out, "| {cache} | {qd} | {name} | refused: {e} | |").unwrap();
                    }
                    (None, None) => {}
                }
            }
        }
    }
}

fn main() {
    aio_benches::run_parts(
        "fileio",
        "B11: file I/O, aio's engines vs tokio, tokio-uring and raw io_uring",
        "fileio.md",
        |sizes| match sizes {
            Sizes::Smoke => SMOKE,
            Sizes::Quick => QUICK,
            Sizes::Full => FULL,
        },
        &[
            ("B11_cached", cached),
            ("B11_direct", direct),
            ("B11_fixed", fixed_buffers),
            ("B11_ring_features", ring_features),
        ],
    );
}
