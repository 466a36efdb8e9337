//! Steps 4 to 7 of `cargo xtask demo` done by the built-in NBD client
//! (`crates/nbd-client`) instead of qemu-io and qemu-img: the same writes,
//! reads, trims, zeroes, copy and benchmark, with the same checks, in process over the same Unix
//! socket.
//!
//! The client is the one the server's integration tests use. It was written from the NBD
//! specification independently of the server and validates every reply strictly (cookies,
//! structured read chunks covering their range exactly), so the fallback checks the server as
//! seriously as qemu's tools do. Structured replies are negotiated, as qemu does. Each step opens
//! its own connection, as each qemu-io or qemu-img run does, and ends it with `NBD_CMD_DISC`, which
//! also checks that the server answered everything and then closed the connection.
//!
//! Bulk transfers go in 1 MiB requests (less if the server advertises a smaller maximum) with up
//! to 8 in flight. The benchmark reads 4 KiB blocks at depth 32 and then at depth 1, stepping
//! through the image the way `qemu-img bench` does, and verifies every block it reads.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use super::{
    BENCH_DEPTH, BENCH_REQUESTS, IMAGE_SIZE, MIB, Tour, all_bytes, detail, step, watchdog_error,
};
use crate::cmd::{Context, Error, Result};
use nbd_client::{Client, Handshake, tx_flag};

/// The largest request of a bulk transfer: big enough that per-request costs vanish, small enough
/// to stay well under any server's maximum payload.
const CHUNK: u32 = 1 << 20;

/// Bulk requests in flight at once: enough to keep the server busy while the client waits.
const BULK_DEPTH: usize = 8;

/// The benchmark's block size, as in `qemu-img bench -s 4096`.
const BENCH_BLOCK: u32 = 4096;

/// Runs steps 4 to 7 against the server the tour started.
pub(super) fn steps(tour: &mut Tour) -> Result<()> {
    patterns(tour)?;
    trim_and_zeroes(tour)?;
    // The file of random data is read once and kept: step 6 copies it in and compares what comes
    // back out, and step 7 verifies every block it reads against it.
    let host =
        std::fs::read(&tour.host).with_context(|| format!("reading {}", tour.host.display()))?;
    copy(tour, &host)?;
    bench(tour, &host)
}

/// Step 4: a pattern written through the export reads back verified, and a wrong pattern is
/// caught (so the verification is known to be able to fail).
fn patterns(tour: &mut Tour) -> Result<()> {
    step(
        4,
        "built-in client: writing 16 MiB of 0xa5 and reading it back verified",
    );
    let mut client = connect(tour)?;
    detail(describe(&client));
    let len = 16 * MIB;
    let chunk = chunk_len(&client)?;
    let data = vec![0xa5u8; chunk as usize];
    pipeline(
        tour,
        &mut client,
        chunks(len, chunk),
        BULK_DEPTH,
        "write",
        |client, i| {
            let (offset, n) = piece(0, len, chunk, i);
            client.send_write(offset, &data[..n as usize])
        },
        |_, _| Ok(()),
    )?;
    client
        .flush()
        .with_context(|| "built-in client: flush".to_owned())?;
    read_expecting(tour, &mut client, 0, len, 0xa5)?;
    let first = client
        .read(0, 4096)
        .with_context(|| "built-in client: reading 4 KiB at 0".to_owned())?;
    if expect_bytes(&first, 0x5a, 0).is_ok() {
        return Err(Error::new(
            "checking 0x5a where 0xa5 was written found no mismatch: the verification cannot fail",
        ));
    }
    disconnect(client)?;
    detail("pattern verified; checking against a wrong pattern is reported as a mismatch");
    tour.notes.push(
        "built-in client: wrote 16 MiB of 0xa5 and read it back verified; a wrong pattern was \
         caught"
            .into(),
    );
    Ok(())
}

/// Step 5: trim and write zeroes, read the zeros back, and look at the file on disk.
fn trim_and_zeroes(tour: &mut Tour) -> Result<()> {
    step(
        5,
        "built-in client: trimming 4-8 MiB, writing zeroes to 8-16 MiB, reading zeros back",
    );
    let mut client = connect(tour)?;
    let needed = tx_flag::SEND_TRIM | tx_flag::SEND_WRITE_ZEROES;
    if client.flags() & needed != needed {
        return Err(Error::new(format!(
            "the server does not offer trim and write zeroes (transmission flags {:#06x})",
            client.flags()
        )));
    }
    let four = u32::try_from(4 * MIB).expect("4 MiB fits in a u32");
    client
        .trim(4 * MIB, four)
        .with_context(|| "built-in client: trim 4-8 MiB".to_owned())?;
    // One range with and one without permission to punch a hole (NBD_CMD_FLAG_NO_HOLE set and
    // clear, as qemu-io's `write -z` and `write -z -u`), since a server may take different paths
    // for the two.
    client
        .write_zeroes(8 * MIB, four, true)
        .with_context(|| "built-in client: write zeroes (no hole) 8-12 MiB".to_owned())?;
    client
        .write_zeroes(12 * MIB, four, false)
        .with_context(|| "built-in client: write zeroes (may punch a hole) 12-16 MiB".to_owned())?;
    client
        .flush()
        .with_context(|| "built-in client: flush".to_owned())?;
    read_expecting(tour, &mut client, 8 * MIB, 8 * MIB, 0)?;
    read_expecting(tour, &mut client, 0, 4 * MIB, 0xa5)?;
    // NBD lets a server ignore a trim, so the trimmed range may hold either the old data or
    // zeros; the tour reports which, and anything else is an error.
    let trimmed = read_range(tour, &mut client, 4 * MIB, 4 * MIB)?;
    let discarded = if expect_bytes(&trimmed, 0, 4 * MIB).is_ok() {
        "reads back as zeros"
    } else {
        expect_bytes(&trimmed, 0xa5, 4 * MIB).map_err(|err| {
            Error::new(format!(
                "the trimmed range 4-8 MiB holds neither zeros nor its old data: {err}"
            ))
        })?;
        "kept its data (NBD allows ignoring a trim)"
    };
    disconnect(client)?;
    detail(format_args!(
        "zeros read back; the trimmed range {discarded}"
    ));
    tour.check_image_after_zeroes()?;
    tour.notes.push(format!(
        "built-in client: trim + write zeroes: zeros read back over NBD and found on disk; the \
         trimmed range {discarded}"
    ));
    Ok(())
}

/// Step 6: the host file is written into the export and read back out into a copy, compared on
/// the way; the copy and the image file on disk must equal the host file too.
fn copy(tour: &mut Tour, host: &[u8]) -> Result<()> {
    step(
        6,
        "built-in client: copying a random file into the export and back out, then comparing",
    );
    let mut client = connect(tour)?;
    let chunk = chunk_len(&client)?;
    let count = chunks(IMAGE_SIZE, chunk);
    let slice = |i: usize| {
        let (offset, n) = piece(0, IMAGE_SIZE, chunk, i);
        let at = usize::try_from(offset).expect("the image fits in memory");
        (offset, &host[at..at + n as usize])
    };

    let started = Instant::now();
    pipeline(
        tour,
        &mut client,
        count,
        BULK_DEPTH,
        "write",
        |client, i| {
            let (offset, data) = slice(i);
            client.send_write(offset, data)
        },
        |_, _| Ok(()),
    )?;
    client
        .flush()
        .with_context(|| "built-in client: flush".to_owned())?;
    let written = started.elapsed();

    let out =
        File::create(&tour.copy).with_context(|| format!("creating {}", tour.copy.display()))?;
    let started = Instant::now();
    pipeline(
        tour,
        &mut client,
        count,
        BULK_DEPTH,
        "read",
        |client, i| {
            let (offset, data) = slice(i);
            client.send_read(offset, data.len() as u32)
        },
        |i, data| {
            let (offset, expected) = slice(i);
            // Slice equality first, for the reason `expect_bytes` gives. The client checks that a
            // read returns exactly its length, so a difference is in the bytes.
            if data != expected {
                let at = data
                    .iter()
                    .zip(expected)
                    .position(|(a, b)| a != b)
                    .unwrap_or(data.len().min(expected.len()));
                return Err(Error::new(format!(
                    "byte {} read back out differs from the file copied in",
                    offset + at as u64
                )));
            }
            out.write_all_at(&data, offset)
                .with_context(|| format!("writing {}", tour.copy.display()))
        },
    )?;
    let read = started.elapsed();
    disconnect(client)?;
    tour.check_copies()?;

    let rate = |took: std::time::Duration| (IMAGE_SIZE / MIB) as f64 / took.as_secs_f64();
    let (rate_in, rate_out) = (rate(written), rate(read));
    detail(format_args!(
        "in at {rate_in:.0} MiB/s, out at {rate_out:.0} MiB/s; identical on the way out, and the \
         copy and the image file match byte for byte"
    ));
    tour.notes.push(format!(
        "built-in client: {} MiB of random data in ({rate_in:.0} MiB/s) and back out \
         ({rate_out:.0} MiB/s), identical (compared on the way out, the copy and the image file \
         on disk)",
        IMAGE_SIZE / MIB
    ));
    Ok(())
}

/// Step 7: the built-in client's `qemu-img bench`: 4 KiB reads at depth 32 and then at depth 1,
/// each one verified against the data step 6 copied in.
fn bench(tour: &mut Tour, host: &[u8]) -> Result<()> {
    step(
        7,
        &format!(
            "built-in client: {BENCH_REQUESTS} reads of 4 KiB, {BENCH_DEPTH} in parallel, then \
             one at a time"
        ),
    );
    let mut client = connect(tour)?;
    let mut runs = Vec::new();
    for depth in [BENCH_DEPTH as usize, 1] {
        let started = Instant::now();
        pipeline(
            tour,
            &mut client,
            BENCH_REQUESTS as usize,
            depth,
            "benchmark read",
            |client, i| client.send_read(bench_offset(i), BENCH_BLOCK),
            |i, data| {
                let at = usize::try_from(bench_offset(i)).expect("the image fits in memory");
                if data != host[at..at + BENCH_BLOCK as usize] {
                    return Err(Error::new(format!(
                        "the 4 KiB read at {at} differs from the data copied in at step 6"
                    )));
                }
                Ok(())
            },
        )?;
        let elapsed = started.elapsed().as_secs_f64();
        let iops = f64::from(BENCH_REQUESTS) / elapsed;
        detail(format_args!(
            "depth {depth:>2}: {elapsed:.3} s, {iops:.0} IOPS"
        ));
        runs.push(format!("{iops:.0} IOPS at depth {depth} ({elapsed:.3} s)"));
    }
    disconnect(client)?;
    tour.notes.push(format!(
        "built-in client bench: {BENCH_REQUESTS} x 4 KiB reads, each verified: {} (one client \
         thread with unbuffered reads, so this understates the server; cargo xtask bench nbd \
         measures it with qemu-img)",
        runs.join(", ")
    ));
    Ok(())
}

/// Connects to the tour's export with structured replies and checks the size the server
/// announced.
fn connect(tour: &Tour) -> Result<Client> {
    let client = Handshake::new("")
        .structured_replies()
        .connect_unix(&tour.socket)
        .with_context(|| format!("built-in client: connecting to {}", tour.socket.display()))?;
    if client.size() != IMAGE_SIZE {
        return Err(Error::new(format!(
            "the server announced an export of {} bytes; the image has {IMAGE_SIZE}",
            client.size()
        )));
    }
    Ok(client)
}

/// Ends a connection with `NBD_CMD_DISC`; the client checks that nothing was left unanswered and
/// that the server closed its end.
fn disconnect(client: Client) -> Result<()> {
    client
        .disconnect()
        .with_context(|| "built-in client: disconnecting (NBD_CMD_DISC)".to_owned())
}

/// One line on what the handshake agreed, printed once at step 4.
fn describe(client: &Client) -> String {
    let commands: Vec<&str> = [
        (tx_flag::SEND_FLUSH, "flush"),
        (tx_flag::SEND_FUA, "fua"),
        (tx_flag::SEND_TRIM, "trim"),
        (tx_flag::SEND_WRITE_ZEROES, "write-zeroes"),
        (tx_flag::READ_ONLY, "read-only"),
    ]
    .iter()
    .filter(|(flag, _)| client.flags() & flag != 0)
    .map(|&(_, name)| name)
    .collect();
    let sizes = client.block_size().map_or_else(
        || "no block sizes".to_owned(),
        |b| {
            format!(
                "block sizes {}/{}/{} bytes (min/preferred/max)",
                b.min, b.preferred, b.max
            )
        },
    );
    format!(
        "connected: {} MiB export, structured replies: {}, {sizes}, flags: {}",
        client.size() / MIB,
        if client.structured() { "on" } else { "off" },
        commands.join(" ")
    )
}

/// The length of bulk requests: [`CHUNK`], or the server's maximum if that is smaller.
fn chunk_len(client: &Client) -> Result<u32> {
    match client.block_size() {
        None => Ok(CHUNK),
        Some(sizes) if sizes.max > 0 => Ok(sizes.max.min(CHUNK)),
        Some(sizes) => Err(Error::new(format!(
            "the server advertised a maximum block size of 0 ({sizes:?})"
        ))),
    }
}

/// How many requests of at most `chunk` bytes cover `len` bytes.
fn chunks(len: u64, chunk: u32) -> usize {
    usize::try_from(len.div_ceil(u64::from(chunk))).expect("a count of requests fits in a usize")
}

/// The `i`-th request of at most `chunk` bytes covering `[start, start + len)`: its offset and
/// length.
fn piece(start: u64, len: u64, chunk: u32, i: usize) -> (u64, u32) {
    let offset = start + i as u64 * u64::from(chunk);
    let n = (start + len - offset).min(u64::from(chunk));
    (offset, u32::try_from(n).expect("at most chunk"))
}

/// The offset of the benchmark's `i`-th read: consecutive blocks from offset 0, wrapping at the
/// end of the image, as `qemu-img bench` steps by default.
fn bench_offset(i: usize) -> u64 {
    (i as u64 * u64::from(BENCH_BLOCK)) % IMAGE_SIZE
}

/// An error naming the first byte of `data` (read at `offset`) that is not `value`.
fn expect_bytes(data: &[u8], value: u8, offset: u64) -> Result<()> {
    // The fast comparison first: the byte-by-byte search below is slow in xtask's unoptimized
    // build, and only a mismatch needs it.
    if all_bytes(data, value) {
        return Ok(());
    }
    match data.iter().position(|&byte| byte != value) {
        None => Ok(()),
        Some(at) => Err(Error::new(format!(
            "byte {} reads {:#04x}, expected {value:#04x}",
            offset + at as u64,
            data[at]
        ))),
    }
}

/// Reads `[offset, offset + len)` in pipelined chunks and checks that every byte is `value`.
fn read_expecting(
    tour: &Tour,
    client: &mut Client,
    offset: u64,
    len: u64,
    value: u8,
) -> Result<()> {
    let data = read_range(tour, client, offset, len)?;
    expect_bytes(&data, value, offset)
        .map_err(|err| Error::new(format!("built-in client: read: {err}")))
}

/// Reads `[offset, offset + len)` in pipelined chunks (whole, so that a failed check never leaves
/// requests in flight on a connection that is used again).
fn read_range(tour: &Tour, client: &mut Client, offset: u64, len: u64) -> Result<Vec<u8>> {
    let chunk = chunk_len(client)?;
    let mut out = vec![0u8; usize::try_from(len).expect("the range fits in memory")];
    pipeline(
        tour,
        client,
        chunks(len, chunk),
        BULK_DEPTH,
        "read",
        |client, i| {
            let (at, n) = piece(offset, len, chunk, i);
            client.send_read(at, n)
        },
        |i, data| {
            let start =
                usize::try_from(piece(offset, len, chunk, i).0 - offset).expect("inside the range");
            out[start..start + data.len()].copy_from_slice(&data);
            Ok(())
        },
    )?;
    Ok(out)
}

/// Runs `count` requests with at most `depth` in flight: `send(client, i)` sends the `i`-th and
/// returns its cookie, and `done(i, data)` checks its answer (the data of a read, empty for
/// other commands). Replies may come in any order, so each is matched to its request by cookie.
fn pipeline(
    tour: &Tour,
    client: &mut Client,
    count: usize,
    depth: usize,
    what: &str,
    mut send: impl FnMut(&mut Client, usize) -> io::Result<u64>,
    mut done: impl FnMut(usize, Vec<u8>) -> Result<()>,
) -> Result<()> {
    let mut in_flight: HashMap<u64, usize> = HashMap::with_capacity(depth);
    let mut next = 0;
    while next < count || !in_flight.is_empty() {
        // The watchdog ends a hang by killing the server; this ends a run that is merely too
        // slow, while the server still answers.
        if tour.deadline.remaining().is_zero() {
            return Err(watchdog_error());
        }
        while next < count && in_flight.len() < depth {
            let cookie = send(client, next)
                .with_context(|| format!("built-in client: sending {what} request {next}"))?;
            in_flight.insert(cookie, next);
            next += 1;
        }
        let reply = client
            .receive()
            .with_context(|| format!("built-in client: waiting for {what} replies"))?;
        let i = in_flight.remove(&reply.cookie).ok_or_else(|| {
            Error::new(format!(
                "built-in client: a reply for cookie {:#x}, which no {what} request has",
                reply.cookie
            ))
        })?;
        let data = reply
            .result
            .with_context(|| format!("built-in client: {what} request {i} failed"))?;
        done(i, data).map_err(|err| Error::new(format!("built-in client: {what}: {err}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_a_range_exactly() {
        let (start, len, chunk) = (3 * MIB, 5 * MIB / 2, 1 << 20);
        let count = chunks(len, chunk);
        assert_eq!(count, 3);
        let pieces: Vec<_> = (0..count).map(|i| piece(start, len, chunk, i)).collect();
        assert_eq!(
            pieces,
            [(3 * MIB, 1 << 20), (4 * MIB, 1 << 20), (5 * MIB, 1 << 19)]
        );
    }

    #[test]
    fn bench_offsets_step_by_a_block_and_wrap() {
        assert_eq!(bench_offset(0), 0);
        assert_eq!(bench_offset(1), 4096);
        let per_image = usize::try_from(IMAGE_SIZE / u64::from(BENCH_BLOCK)).unwrap();
        assert_eq!(bench_offset(per_image), 0);
        assert_eq!(bench_offset(per_image + 2), 8192);
    }

    #[test]
    fn expect_bytes_names_the_first_wrong_byte() {
        assert!(expect_bytes(&[7; 16], 7, 100).is_ok());
        let mut data = [7u8; 16];
        data[5] = 9;
        let err = expect_bytes(&data, 7, 100).unwrap_err().to_string();
        assert_eq!(err, "byte 105 reads 0x09, expected 0x07");
    }
}
