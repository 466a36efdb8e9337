//! `O_DIRECT` on every engine: the alignment `DirectAlign::of` reads from the kernel, buffers
//! made with it going through byte for byte; a misaligned offset, length or buffer address
//! refused with a `MisalignedDirectIo` that names the broken rule, for plain, vectored and
//! fixed-buffer requests; an `EINVAL` that is not about alignment left as the kernel gave it;
//! the same misaligned transfers on a file without `O_DIRECT` simply working; vectored
//! transfers whose segments start inside their buffers (`(Vec<u8>, start)`), as `O_DIRECT`
//! needs, going through, and a start past its buffer refused before anything moves.

mod support;

use support::{Slot, pattern, setups, temp_file_on_disk, wait_for};

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::sync::Arc;

use aio_core::AioContext;
use blockio::{BlockIo, DirectAlign, FixedBuf, FixedBufPool, MisalignedDirectIo};

/// The file size the tests use.
const SIZE: usize = 64 * 1024;

/// An unlinked `O_DIRECT` file of [`SIZE`] bytes of `pattern(SIZE, 3)` and its alignment, or
/// `None` (printed) where the file system refuses `O_DIRECT`.
fn direct_file() -> Option<(Arc<File>, DirectAlign)> {
    let file = temp_file_on_disk(true)?;
    let align = DirectAlign::of(&file).expect("the alignment of a file that opened O_DIRECT");
    let (mut buf, start) = align.buffer(SIZE);
    buf[start..].copy_from_slice(&pattern(SIZE, 3));
    file.write_all_at(&buf[start..], 0)
        .expect("an aligned O_DIRECT write");
    Some((file, align))
}

/// [`direct_file`], where buffer addresses matter (a memory alignment above 1); `None`,
/// printed, otherwise.
fn direct_file_with_memory_alignment(name: &str) -> Option<(Arc<File>, DirectAlign)> {
    let (file, align) = direct_file()?;
    if align.memory() == 1 {
        println!("{name}: any buffer address is allowed here");
        return None;
    }
    Some((file, align))
}

/// Runs a one-buffer request through `submit` and waits for its result and buffer.
fn run<B: 'static>(
    ctx: &AioContext,
    submit: impl FnOnce(Box<dyn FnOnce(io::Result<usize>, B)>),
) -> (io::Result<usize>, B) {
    let slot: Slot<(io::Result<usize>, B)> = Rc::default();
    let s = slot.clone();
    submit(Box::new(move |r, b| *s.borrow_mut() = Some((r, b))));
    wait_for(ctx, &slot)
}

/// The `MisalignedDirectIo` inside `r`'s error; panics (naming `what`) if `r` is anything else.
fn misaligned(r: io::Result<usize>, what: &str) -> MisalignedDirectIo {
    let err = match r {
        Ok(n) => panic!("{what}: the kernel took a misaligned O_DIRECT transfer ({n} bytes)"),
        Err(e) => e,
    };
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{what}: {err}");
    let text = err.to_string();
    assert!(text.starts_with("O_DIRECT "), "{what}: {text}");
    err.get_ref()
        .and_then(|e| e.downcast_ref::<MisalignedDirectIo>())
        .unwrap_or_else(|| panic!("{what}: not explained: {err}"))
        .clone()
}

#[test]
fn the_alignment_comes_from_the_kernel() {
    let Some((file, align)) = direct_file() else {
        return;
    };
    println!(
        "O_DIRECT here: memory {} bytes, offsets and lengths {} ({} for reads), from {:?}",
        align.memory(),
        align.offset(),
        align.read_offset(),
        align.source()
    );
    for n in [align.memory(), align.offset(), align.read_offset()] {
        assert!(n.is_power_of_two() && n <= 1 << 20, "{align:?}");
    }
    assert!(align.read_offset() <= align.offset(), "{align:?}");
    // The same values through a handle opened without O_DIRECT: they describe the file.
    let plain = temp_file_on_disk(false).unwrap();
    assert_eq!(DirectAlign::of(&plain).unwrap().source(), align.source());
    drop(file);
}

#[test]
fn aligned_transfers_go_through_on_every_engine() {
    for (name, ctx, io) in setups() {
        let Some((file, align)) = direct_file() else {
            return;
        };
        // A read of 8 KiB from the second granule on.
        let at = align.offset() as u64;
        let (buf, start) = align.buffer(8192);
        let f = file.clone();
        let (r, buf) = run(&ctx, |done| {
            io.read_into(&ctx, &f, buf, start, at, done);
        });
        assert_eq!(r.unwrap(), 8192, "{name}: read");
        let want = pattern(SIZE, 3);
        assert_eq!(
            &buf[start..],
            &want[at as usize..at as usize + 8192],
            "{name}"
        );

        // A write of new bytes there, read back through std with another aligned buffer.
        let (mut buf, start) = align.buffer(4096);
        buf[start..].copy_from_slice(&pattern(4096, 9));
        let f = file.clone();
        let (r, _) = run(&ctx, |done| {
            io.write_from(&ctx, &f, buf, start, at, done);
        });
        assert_eq!(r.unwrap(), 4096, "{name}: write");
        let (mut check, s) = align.buffer(4096);
        file.read_exact_at(&mut check[s..], at).unwrap();
        assert_eq!(
            &check[s..],
            &pattern(4096, 9)[..],
            "{name}: the file holds the write"
        );
    }
}

/// A read and a write with the offset, the address or the length off by one byte, on `io`:
/// each fails with the rule it broke, and the file keeps its bytes.
fn each_misalignment_is_explained(name: &str, ctx: &AioContext, io: BlockIo) {
    let Some((file, align)) = direct_file() else {
        return;
    };
    let granule = align.offset();
    let read_granule = align.read_offset();

    // The offset.
    if read_granule > 1 {
        let (buf, start) = align.buffer(4096);
        let f = file.clone();
        let (r, back) = run(ctx, |done| {
            io.read_into(ctx, &f, buf, start, 1, done);
        });
        let e = misaligned(r, &format!("{name}: read at offset 1"));
        assert!(
            e.offset_misaligned() && !e.is_write() && e.offset() == 1,
            "{e:?}"
        );
        assert_eq!(e.segments(), [(back[start..].as_ptr() as usize, 4096)]);
    } else {
        println!("{name}: reads at any offset are allowed here");
    }
    if granule > 1 {
        let (mut buf, start) = align.buffer(4096);
        buf[start..].fill(0xee);
        let f = file.clone();
        let (r, _) = run(ctx, |done| {
            io.write_from(ctx, &f, buf, start, 1, done);
        });
        let e = misaligned(r, &format!("{name}: write at offset 1"));
        assert!(e.offset_misaligned() && e.is_write(), "{e:?}");
    }

    // The address: one byte past an aligned one.
    if align.memory() > 1 {
        let (mut buf, start) = align.buffer(4096 + align.memory());
        buf.truncate(start + 1 + 4096);
        let f = file.clone();
        let (r, _) = run(ctx, |done| {
            io.read_into(ctx, &f, buf, start + 1, 0, done);
        });
        let e = misaligned(r, &format!("{name}: read into a misaligned address"));
        assert_eq!(e.address_misaligned(), Some(0), "{e:?}");
        assert!(!e.offset_misaligned());
        let (mut buf, start) = align.buffer(4096 + align.memory());
        buf.truncate(start + 1 + 4096);
        buf[start + 1..].fill(0xee);
        let f = file.clone();
        let (r, _) = run(ctx, |done| {
            io.write_from(ctx, &f, buf, start + 1, 0, done);
        });
        let e = misaligned(r, &format!("{name}: write from a misaligned address"));
        assert_eq!(e.address_misaligned(), Some(0), "{e:?}");
    } else {
        println!("{name}: any buffer address is allowed here");
    }

    // The length: one granule and one byte.
    if granule > 1 {
        let (mut buf, start) = align.buffer(2 * granule);
        buf.truncate(start + granule + 1);
        buf[start..].fill(0xee);
        let f = file.clone();
        let (r, _) = run(ctx, |done| {
            io.write_from(ctx, &f, buf, start, 0, done);
        });
        let e = misaligned(r, &format!("{name}: write of a granule and a byte"));
        assert_eq!(e.length_misaligned(), Some(0), "{e:?}");
        assert!(
            e.to_string()
                .contains(&format!("the length {}", granule + 1)),
            "{e}"
        );
    }

    // Nothing was written by any refused request.
    let (mut check, s) = align.buffer(SIZE);
    file.read_exact_at(&mut check[s..], 0).unwrap();
    assert!(
        check[s..] == pattern(SIZE, 3),
        "{name}: a refused write changed the file"
    );
}

#[test]
fn misaligned_transfers_are_explained_on_every_engine() {
    for (name, ctx, io) in setups() {
        each_misalignment_is_explained(name, &ctx, io);
    }
}

#[test]
fn a_misaligned_buffer_of_a_vectored_transfer_is_named() {
    for (name, ctx, io) in setups() {
        let Some((file, align)) = direct_file_with_memory_alignment(name) else {
            return;
        };
        // A `Vec`'s allocation is only 16-byte aligned by the allocator's contract: keep
        // allocating (each stays alive, so each lands elsewhere) until one is misaligned.
        let mut spare = Vec::new();
        let odd = loop {
            let v = vec![0u8; 4096];
            if align.padding(&v) != 0 {
                break v;
            }
            spare.push(v);
            assert!(
                spare.len() < 64,
                "the allocator aligns everything to {}",
                align.memory()
            );
        };
        let odd_at = odd.as_ptr() as usize;
        let f = file.clone();
        let (r, bufs) = run(&ctx, |done| {
            io.readv(&ctx, &f, vec![odd, vec![0u8; 4096]], 0, done);
        });
        let e = misaligned(r, &format!("{name}: readv"));
        assert_eq!(e.address_misaligned(), Some(0), "{e:?}");
        assert_eq!(e.segments().len(), 2);
        assert_eq!(e.segments()[0], (odd_at, 4096));
        assert_eq!(bufs.len(), 2, "{name}: the buffers come back");
        let f = file.clone();
        let (r, _) = run(&ctx, |done| {
            io.writev(&ctx, &f, bufs, 0, done);
        });
        assert!(misaligned(r, &format!("{name}: writev")).is_write());
    }
}

/// Segments given as `(buffer, start)` pairs from `DirectAlign::buffer`: a vectored read of
/// three segments and a vectored write of two go through on an `O_DIRECT` file, byte for byte,
/// with each buffer's bytes before its start left alone.
#[test]
fn vectored_transfers_of_aligned_segments_go_through_on_every_engine() {
    for (name, ctx, io) in setups() {
        let Some((file, align)) = direct_file() else {
            return;
        };
        let granule = align.offset();
        let at = 2 * granule as u64;
        let lens = [granule, 2 * granule, granule];
        let bufs: Vec<(Vec<u8>, usize)> = lens
            .iter()
            .map(|&len| {
                let (mut buf, start) = align.buffer(len);
                buf[..start].fill(0xee);
                (buf, start)
            })
            .collect();
        let f = file.clone();
        let (r, bufs) = run(&ctx, |done| {
            io.readv(&ctx, &f, bufs, at, done);
        });
        let total: usize = lens.iter().sum();
        assert_eq!(r.unwrap(), total, "{name}: readv");
        let want = pattern(SIZE, 3);
        let mut pos = at as usize;
        for (i, (buf, start)) in bufs.iter().enumerate() {
            assert!(
                buf[..*start].iter().all(|&b| b == 0xee),
                "{name}: segment {i}'s prefix"
            );
            assert_eq!(
                &buf[*start..],
                &want[pos..pos + lens[i]],
                "{name}: segment {i}"
            );
            pos += lens[i];
        }

        // Two segments of new bytes written at `at`, read back through std.
        let new = pattern(3 * granule, 11);
        let bufs: Vec<(Vec<u8>, usize)> = [&new[..granule], &new[granule..]]
            .iter()
            .map(|part| {
                let (mut buf, start) = align.buffer(part.len());
                buf[start..].copy_from_slice(part);
                (buf, start)
            })
            .collect();
        let f = file.clone();
        let (r, _) = run(&ctx, |done| {
            io.writev(&ctx, &f, bufs, at, done);
        });
        assert_eq!(r.unwrap(), 3 * granule, "{name}: writev");
        let (mut check, s) = align.buffer(3 * granule);
        file.read_exact_at(&mut check[s..], at).unwrap();
        assert_eq!(&check[s..], &new[..], "{name}: the file holds the write");
    }
}

/// An empty segment is ignored by the kernel whatever its address, so the explanation of a
/// misaligned vectored transfer names the segment that is off, not an empty one before it.
#[test]
fn an_empty_segment_is_never_blamed_for_a_misalignment() {
    for (name, ctx, io) in setups() {
        let Some((file, align)) = direct_file_with_memory_alignment(name) else {
            return;
        };
        // Empty, at an odd address (one byte into its buffer).
        let empty = (vec![0u8; 1], 1);
        // Non-empty and misaligned by one byte.
        let (buf, start) = align.buffer(4096 + align.memory());
        let odd = (buf, start + 1);
        let odd_len = odd.0.len() - odd.1;
        let f = file.clone();
        let (r, _) = run(&ctx, |done| {
            io.readv(&ctx, &f, vec![empty, (odd.0, odd.1)], 0, done);
        });
        let e = misaligned(r, &format!("{name}: readv"));
        assert_eq!(e.address_misaligned(), Some(1), "{name}: {e:?}");
        assert_eq!(e.segments()[1].1, odd_len, "{name}");
    }
}

/// A segment whose start lies past its buffer's end fails the whole vectored request with
/// `InvalidInput` naming it, and nothing is read or written: the other segments come back
/// as they went, and the file keeps its bytes.
#[test]
fn a_segment_start_past_its_buffer_is_refused_before_anything_moves() {
    for (name, ctx, io) in setups() {
        let file = temp_file_on_disk(false).expect("a file on disk");
        file.write_all_at(&pattern(8192, 5), 0).unwrap();
        for write in [false, true] {
            let bufs = vec![(vec![7u8; 4096], 0), (vec![7u8; 16], 17)];
            let f = file.clone();
            let (r, bufs) = run(&ctx, |done| {
                if write {
                    io.writev(&ctx, &f, bufs, 0, done);
                } else {
                    io.readv(&ctx, &f, bufs, 0, done);
                }
            });
            let err = r.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{name}: {err}");
            assert!(err.to_string().contains("segment 1"), "{name}: {err}");
            assert_eq!(
                bufs,
                vec![(vec![7u8; 4096], 0), (vec![7u8; 16], 17)],
                "{name}"
            );
        }
        let mut back = vec![0u8; 8192];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, pattern(8192, 5), "{name}: the file kept its bytes");
    }
}

#[test]
fn a_fixed_buffer_read_from_a_misaligned_start_is_explained() {
    for (name, ctx, io) in setups() {
        let Some((file, _)) = direct_file_with_memory_alignment(name) else {
            return;
        };
        let pool = FixedBufPool::new(&ctx, 2, 8192).unwrap();
        let mut buf = pool.get().unwrap();
        buf.set_len(1 + 4096).unwrap();
        let f = file.clone();
        let (r, back): (_, FixedBuf) = run(&ctx, |done| {
            io.read_fixed(&ctx, &f, buf, 1, 0, done);
        });
        let e = misaligned(r, &format!("{name}: read_fixed from start 1"));
        assert_eq!(e.address_misaligned(), Some(0), "{e:?}");
        assert_eq!(
            back.len(),
            1 + 4096,
            "{name}: the lease comes back unchanged"
        );
        // From start 0 the same lease is aligned and the read goes through.
        let f = file.clone();
        let mut back = back;
        back.set_len(4096).unwrap();
        let (r, back) = run(&ctx, |done| {
            io.read_fixed(&ctx, &f, back, 0, 0, done);
        });
        assert_eq!(r.unwrap(), 4096, "{name}");
        assert_eq!(&back[..], &pattern(SIZE, 3)[..4096], "{name}");
    }
}

#[test]
fn an_einval_about_something_else_is_left_alone() {
    for (name, ctx, io) in setups() {
        let Some((file, align)) = direct_file() else {
            return;
        };
        // An aligned offset past what `off_t` holds: EINVAL from the VFS, whatever the flags.
        let at = 1u64 << 63;
        let (buf, start) = align.buffer(4096);
        let f = file.clone();
        let (r, _) = run(&ctx, |done| {
            io.read_into(&ctx, &f, buf, start, at, done);
        });
        let err = r.expect_err("a read at 2^63");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{name}: {err}");
        assert!(
            err.get_ref().is_none(),
            "{name}: explained as something else: {err}"
        );
    }
}

#[test]
fn without_o_direct_the_same_transfers_just_work() {
    for (name, ctx, io) in setups() {
        let file = temp_file_on_disk(false).unwrap();
        file.write_all_at(&pattern(SIZE, 3), 0).unwrap();
        let buf = vec![0u8; 1 + 1000];
        let f = file.clone();
        let (r, buf) = run(&ctx, |done| {
            io.read_into(&ctx, &f, buf, 1, 7, done);
        });
        assert_eq!(r.unwrap(), 1000, "{name}");
        assert_eq!(&buf[1..], &pattern(SIZE, 3)[7..1007], "{name}");
    }
}
