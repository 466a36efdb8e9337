//! The one B11 row that misses its target, quickly: 4 KiB random reads at queue depth 1 from
//! the page cache, aio's io_uring engine against the raw `io-uring` crate floor, the same
//! workloads as `benches/fileio.rs` (`aio_benches::file_io`), interleaved round by round, and
//! the median of each with their ratio. The full B11 runs every contender on every row and
//! takes many minutes; this takes seconds, for trying a change to the request path.
//!
//! `cargo run --release -p aio-benches --example b11_qd1 [ROUNDS [OPS]]` (defaults 15 rounds of
//! 50 000 reads of B11's 1 GiB file, `target/tmp/b11.img`, made if missing).
//! `b11_qd1 --only aio|raw OPS` runs one contender once and prints nothing, for
//! `valgrind --tool=callgrind`, where the instructions per read are the steadier figure on a VM.

use std::path::PathBuf;
use std::time::Duration;

use aio::blockio::Engine;
use aio_benches::file_io::{self, Kind};

/// Size of the file read: B11's (`benches/fileio.rs`, its full plan), which it shares.
const FILE_SIZE: u64 = 1 << 30;

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Where `cargo bench` puts B11's file (an example has no CARGO_TARGET_TMPDIR); not /tmp,
    // which may be a tmpfs.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/tmp");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("b11.img");
    file_io::prepare(&path, FILE_SIZE)?;
    let file = file_io::open(&path, false)?;
    file_io::warm(&file, FILE_SIZE)?;
    let number = |i: usize, default: usize| {
        args.get(i)
            .map(|a| a.parse().expect("a number"))
            .unwrap_or(default)
    };
    let run = |who: &str, offsets: &[u64]| match who {
        "aio" => file_io::aio(Engine::IoUring, &file, Kind::Read, 1, offsets),
        "raw" => file_io::raw_uring(&file, Kind::Read, 1, offsets),
        other => panic!("unknown contender {other}: aio or raw"),
    };
    if args.first().map(String::as_str) == Some("--only") {
        let who = args.get(1).expect("--only aio|raw OPS");
        let offsets = file_io::offsets(number(2, 20_000), FILE_SIZE, 1);
        run(who, &offsets)?;
        return Ok(());
    }
    let (rounds, ops) = (number(0, 15), number(1, 50_000));
    let mut times: [Vec<Duration>; 2] = Default::default();
    for round in 0..rounds {
        let offsets = file_io::offsets(ops, FILE_SIZE, round as u64 + 1);
        // Alternate who goes first, so that neither always runs on a warmer machine.
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for who in order {
            times[who].push(run(["aio", "raw"][who], &offsets)? / ops as u32);
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (aio, raw) = (median(&mut times[0]), median(&mut times[1]));
    println!(
        "QD 1 cached 4 KiB reads, {rounds} rounds of {ops}: aio io_uring {:.3} µs, raw floor \
         {:.3} µs, ratio {:.3} (target ≤ 1.2)",
        aio.as_secs_f64() * 1e6,
        raw.as_secs_f64() * 1e6,
        aio.as_secs_f64() / raw.as_secs_f64()
    );
    Ok(())
}
