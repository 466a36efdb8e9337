//! `O_DIRECT`: the alignment a file's direct I/O needs ([`DirectAlign`], probed as QEMU's
//! `raw_probe_alignment` does, from the kernel rather than by trial reads), buffers placed on
//! it, and [`MisalignedDirectIo`], the explanation every engine gives instead of a bare
//! `EINVAL` when the kernel refuses a misaligned direct transfer.
//!
//! The explanation costs nothing on the way to the kernel: a request is not checked before it
//! is submitted. Only a read or write that failed with `EINVAL` is looked at, on the thread
//! that completes it: if its file was opened with `O_DIRECT` and one of its offset, lengths or
//! buffer addresses is off the file's alignment, the error becomes a `MisalignedDirectIo`
//! (kind [`io::ErrorKind::InvalidInput`], as `EINVAL` is); any other `EINVAL` stays as it was.

use std::error::Error;
use std::fmt;
use std::fs::File;
use std::io;

/// The alignment used where the kernel does not say: a page, which covers every logical block
/// size in use (512 and 4096 bytes) and every memory alignment a device asks for.
const ASSUMED: usize = 4096;

/// Where a [`DirectAlign`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlignSource {
    /// `statx(STATX_DIOALIGN)` (Linux 6.1 and later, on file systems that report it).
    Statx,
    /// A block device's logical block size (`BLKSSZGET`), for offsets, lengths and memory.
    BlockDevice,
    /// Not reported by the kernel: a page (4096 bytes) for everything, which is never too
    /// small.
    Assumed,
}

/// What `O_DIRECT` transfers on one file must respect: the alignment of the memory (each
/// buffer's address) and the granularity of file offsets and transfer lengths.
///
/// ```
/// use std::sync::Arc;
/// # let path = std::env::temp_dir().join(format!("blockio-direct-doc-{}", std::process::id()));
/// # std::fs::write(&path, vec![7u8; 8192])?;
/// let file = Arc::new(std::fs::File::open(&path)?);
/// let align = blockio::DirectAlign::of(&file)?;
/// // A buffer for 4 KiB whose bytes from `start` on sit on the memory alignment.
/// let (buf, start) = align.buffer(4096);
/// assert!(align.fits(&buf[start..], 0));
/// // `io.read_into(&ctx, &file, buf, start, 0, done)` then reads into `buf[start..]`.
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DirectAlign {
    memory: usize,
    offset: usize,
    read_offset: usize,
    source: AlignSource,
}

impl DirectAlign {
    /// The alignment of `file`'s direct I/O, whether or not `file` itself was opened with
    /// `O_DIRECT`: from `statx` where the kernel reports it, else a block device's logical
    /// block size, else [`AlignSource::Assumed`].
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::Unsupported`] when the kernel says that the file cannot do direct I/O
    /// at all (`statx` reports an alignment of 0), and the errors of `statx`/`fstat`.
    pub fn of(file: &File) -> io::Result<DirectAlign> {
        imp::probe(file)
    }

    /// An alignment given by the caller (both values are rounded up to a power of two, at
    /// least 1): for a device whose rules are known, or a test.
    pub fn new(memory: usize, offset: usize) -> DirectAlign {
        let offset = offset.max(1).next_power_of_two();
        DirectAlign {
            memory: memory.max(1).next_power_of_two(),
            offset,
            read_offset: offset,
            source: AlignSource::Assumed,
        }
    }

    /// One size for memory, offsets and lengths, from `source`.
    fn uniform(size: usize, source: AlignSource) -> DirectAlign {
        DirectAlign {
            memory: size,
            offset: size,
            read_offset: size,
            source,
        }
    }

    /// The alignment every buffer address must have, in bytes (a power of two).
    pub fn memory(&self) -> usize {
        self.memory
    }

    /// The granularity of file offsets and transfer lengths (and of each buffer's length in
    /// a vectored transfer), in bytes (a power of two).
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The granularity of offsets and lengths for reads, which a kernel may allow finer than
    /// [`offset`](Self::offset) (`STATX_DIO_READ_ALIGN`, Linux 6.16); otherwise the same.
    pub fn read_offset(&self) -> usize {
        self.read_offset
    }

    /// Where the values came from.
    pub fn source(&self) -> AlignSource {
        self.source
    }

    /// Whether a transfer of `buf` at `offset` meets this alignment (its address, its length
    /// and the offset), so that it may go through an `O_DIRECT` file.
    pub fn fits(&self, buf: &[u8], offset: u64) -> bool {
        self.fits_at(buf.as_ptr() as usize, buf.len(), offset)
    }

    /// [`fits`](Self::fits) for the `len` bytes at address `addr`, with the write rules (which
    /// hold for reads too).
    pub fn fits_at(&self, addr: usize, len: usize, offset: u64) -> bool {
        self.misfit(true, offset, &[(addr, len)]).is_none()
    }

    /// How many bytes from the start of `buf` the first address on the memory alignment lies:
    /// the `start` to give [`BlockIo::read_into`](crate::BlockIo::read_into) or
    /// [`write_from`](crate::BlockIo::write_from), or to pair with the buffer as a vectored
    /// request's [`Segment`](crate::Segment), so that the transfer's memory is aligned (the
    /// buffer must then hold `start` + the transfer's length).
    pub fn padding(&self, buf: &[u8]) -> usize {
        let at = buf.as_ptr() as usize;
        (self.memory - at % self.memory) % self.memory
    }

    /// A zeroed buffer and a `start` such that `buf[start..]` is `len` rounded up to the
    /// offset granularity, on the memory alignment: ready for a direct transfer with
    /// `read_into`/`write_from` at an aligned offset, or, as a `(buf, start)` pair, for one
    /// segment of `readv`/`writev`. The allocation is `memory - 1` bytes larger than the
    /// transfer, and does not move while the `Vec` is not grown.
    pub fn buffer(&self, len: usize) -> (Vec<u8>, usize) {
        let len = len.div_ceil(self.offset) * self.offset;
        let mut buf = vec![0; len + self.memory - 1];
        let start = self.padding(&buf);
        buf.truncate(start + len);
        (buf, start)
    }

    /// The first rule that `segments` (address, length) at `offset` break, if any.
    fn misfit(&self, write: bool, offset: u64, segments: &[(usize, usize)]) -> Option<Misfit> {
        let granule = if write { self.offset } else { self.read_offset };
        if !offset.is_multiple_of(granule as u64) {
            return Some(Misfit::Offset);
        }
        for (i, &(addr, len)) in segments.iter().enumerate() {
            // The kernel ignores an empty segment, whatever its address.
            if len == 0 {
                continue;
            }
            if !addr.is_multiple_of(self.memory) {
                return Some(Misfit::Address(i));
            }
            if !len.is_multiple_of(granule) {
                return Some(Misfit::Length(i));
            }
        }
        None
    }
}

/// Which rule of a [`DirectAlign`] a transfer broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Misfit {
    Offset,
    /// The address of segment `i`.
    Address(usize),
    /// The length of segment `i`.
    Length(usize),
}

/// A direct read or write that the kernel refused (`EINVAL`) because its offset, a length or
/// a buffer address is off the file's [`DirectAlign`]. Every engine's `done` gets it as an
/// [`io::Error`] of kind [`io::ErrorKind::InvalidInput`]; `err.get_ref()` and
/// `downcast_ref::<MisalignedDirectIo>()` give the details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MisalignedDirectIo {
    write: bool,
    offset: u64,
    segments: Vec<(usize, usize)>,
    align: DirectAlign,
    misfit: Misfit,
}

impl MisalignedDirectIo {
    /// Whether the refused transfer was a write.
    pub fn is_write(&self) -> bool {
        self.write
    }

    /// The file offset of the transfer.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The transfer's buffers as (address, length), one for a plain read or write.
    pub fn segments(&self) -> &[(usize, usize)] {
        &self.segments
    }

    /// The file's alignment, which the transfer broke.
    pub fn align(&self) -> DirectAlign {
        self.align
    }

    /// Whether the offset is what is off the alignment (else a buffer's address or length).
    pub fn offset_misaligned(&self) -> bool {
        self.misfit == Misfit::Offset
    }

    /// The index in [`segments`](Self::segments) of the buffer whose address is off the
    /// memory alignment, if that is what was wrong.
    pub fn address_misaligned(&self) -> Option<usize> {
        match self.misfit {
            Misfit::Address(i) => Some(i),
            _ => None,
        }
    }

    /// The index of the buffer whose length is off the granularity, if that was wrong.
    pub fn length_misaligned(&self) -> Option<usize> {
        match self.misfit {
            Misfit::Length(i) => Some(i),
            _ => None,
        }
    }
}

impl fmt::Display for MisalignedDirectIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (op, granule) = if self.write {
            ("write", self.align.offset)
        } else {
            ("read", self.align.read_offset)
        };
        let total: usize = self.segments.iter().map(|s| s.1).sum();
        write!(
            f,
            "O_DIRECT {op} of {total} bytes at offset {} refused: ",
            self.offset
        )?;
        match self.misfit {
            Misfit::Offset => write!(f, "the offset is not a multiple of {granule}")?,
            Misfit::Address(i) => write!(
                f,
                "the address {:#x}{} is not aligned to {} bytes",
                self.segments[i].0,
                self.which(i),
                self.align.memory
            )?,
            Misfit::Length(i) => write!(
                f,
                "the length {}{} is not a multiple of {granule}",
                self.segments[i].1,
                self.which(i),
            )?,
        }
        let source = match self.align.source {
            AlignSource::Statx => "statx",
            AlignSource::BlockDevice => "the device's logical block size",
            AlignSource::Assumed => "assumed: the kernel did not report it",
        };
        write!(
            f,
            " (this file's direct I/O needs offsets and lengths in multiples of {granule} \
             and memory aligned to {} bytes, from {source}; DirectAlign::buffer makes such \
             buffers)",
            self.align.memory
        )
    }
}

impl MisalignedDirectIo {
    /// " of buffer i" when the transfer was vectored, nothing for a plain one.
    fn which(&self, i: usize) -> String {
        if self.segments.len() > 1 {
            format!(" of buffer {i}")
        } else {
            String::new()
        }
    }
}

impl Error for MisalignedDirectIo {}

/// A buffer as (address, length), for [`explain`].
pub(crate) fn segment(buf: &[u8]) -> (usize, usize) {
    (buf.as_ptr() as usize, buf.len())
}

/// `r`, the result of a read or write at `offset` on `file`, with an `EINVAL` for a misaligned
/// `O_DIRECT` transfer explained ([`explain`]); `segments` lists the transfer's buffers and is
/// called only for an error.
pub(crate) fn explained(
    r: io::Result<usize>,
    file: &File,
    write: bool,
    offset: u64,
    segments: impl FnOnce() -> Vec<(usize, usize)>,
) -> io::Result<usize> {
    r.map_err(|e| explain(e, file, write, offset, &segments()))
}

/// Turns `err`, the failure of a read or write of `segments` at `offset` on `file`, into a
/// [`MisalignedDirectIo`] when it is the kernel's `EINVAL` for a misaligned `O_DIRECT`
/// transfer; returns it unchanged otherwise (and whenever the file's flags or alignment
/// cannot be read).
pub(crate) fn explain(
    err: io::Error,
    file: &File,
    write: bool,
    offset: u64,
    segments: &[(usize, usize)],
) -> io::Error {
    if err.raw_os_error() != Some(libc::EINVAL) || !imp::is_direct(file) {
        return err;
    }
    let Ok(align) = DirectAlign::of(file) else {
        return err;
    };
    match align.misfit(write, offset, segments) {
        Some(misfit) => io::Error::new(
            io::ErrorKind::InvalidInput,
            MisalignedDirectIo {
                write,
                offset,
                segments: segments.to_vec(),
                align,
                misfit,
            },
        ),
        None => err,
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use std::fs::File;
    use std::io;

    use rustix::fs::{AtFlags, FileType, OFlags, StatxFlags};

    use super::{ASSUMED, AlignSource, DirectAlign};

    /// `STATX_DIO_READ_ALIGN` (Linux 6.16), which rustix does not name yet.
    const STATX_DIO_READ_ALIGN: u32 = 0x0002_0000;

    pub(super) fn probe(file: &File) -> io::Result<DirectAlign> {
        let mask = StatxFlags::DIOALIGN
            | StatxFlags::TYPE
            | StatxFlags::from_bits_retain(STATX_DIO_READ_ALIGN);
        let st = match rustix::fs::statx(file, c"", AtFlags::EMPTY_PATH, mask) {
            Ok(st) => Some(st),
            // Before Linux 4.11, or a seccomp filter that refuses it: fstat below.
            Err(rustix::io::Errno::NOSYS | rustix::io::Errno::PERM) => None,
            Err(e) => return Err(e.into()),
        };
        if let Some(st) = &st
            && st.stx_mask & StatxFlags::DIOALIGN.bits() != 0
        {
            if st.stx_dio_mem_align == 0 || st.stx_dio_offset_align == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "the file system does not do direct I/O on this file (statx)",
                ));
            }
            let offset = st.stx_dio_offset_align as usize;
            let read_offset =
                if st.stx_mask & STATX_DIO_READ_ALIGN != 0 && st.stx_dio_read_offset_align != 0 {
                    st.stx_dio_read_offset_align as usize
                } else {
                    offset
                };
            return Ok(DirectAlign {
                memory: st.stx_dio_mem_align as usize,
                offset,
                read_offset,
                source: AlignSource::Statx,
            });
        }
        let mode = match &st {
            Some(st) => FileType::from_raw_mode(st.stx_mode.into()),
            None => FileType::from_raw_mode(rustix::fs::fstat(file)?.st_mode),
        };
        if mode == FileType::BlockDevice {
            let size = rustix::fs::ioctl_blksszget(file)? as usize;
            let size = size.max(1).next_power_of_two();
            return Ok(DirectAlign::uniform(size, AlignSource::BlockDevice));
        }
        Ok(DirectAlign::uniform(ASSUMED, AlignSource::Assumed))
    }

    /// Whether `file` was opened with `O_DIRECT` (false when its flags cannot be read).
    pub(super) fn is_direct(file: &File) -> bool {
        rustix::fs::fcntl_getfl(file).is_ok_and(|flags| flags.contains(OFlags::DIRECT))
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::fs::File;
    use std::io;

    use super::{ASSUMED, AlignSource, DirectAlign};

    /// No `statx` here: a page for everything.
    pub(super) fn probe(_file: &File) -> io::Result<DirectAlign> {
        Ok(DirectAlign::uniform(ASSUMED, AlignSource::Assumed))
    }

    /// Only Linux's `EINVAL` is explained.
    pub(super) fn is_direct(_file: &File) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_on_the_memory_alignment_and_hold_whole_granules() {
        for (memory, offset) in [(1, 1), (4, 512), (512, 512), (4096, 4096), (512, 4096)] {
            let align = DirectAlign::new(memory, offset);
            for len in [0, 1, 511, 512, 4097, 65536] {
                let (buf, start) = align.buffer(len);
                let data = &buf[start..];
                assert_eq!(data.len(), len.div_ceil(offset) * offset);
                assert_eq!(data.as_ptr() as usize % memory, 0);
                assert!(start < memory);
                assert!(align.fits(data, offset as u64 * 3));
                assert_eq!(align.padding(data), 0);
            }
        }
    }

    #[test]
    fn misfits_name_the_first_broken_rule() {
        let align = DirectAlign::new(512, 4096);
        assert_eq!(align.misfit(false, 100, &[(0, 4096)]), Some(Misfit::Offset));
        assert_eq!(
            align.misfit(true, 0, &[(0, 4096), (8, 4096)]),
            Some(Misfit::Address(1))
        );
        assert_eq!(
            align.misfit(false, 8192, &[(512, 4096), (1024, 100)]),
            Some(Misfit::Length(1))
        );
        assert_eq!(align.misfit(true, 8192, &[(512, 8192)]), None);
        // Values that are not powers of two are rounded up, and 0 means "any".
        let align = DirectAlign::new(0, 300);
        assert_eq!((align.memory(), align.offset()), (1, 512));
    }

    #[test]
    fn the_message_says_what_is_wrong_and_what_is_needed() {
        let err = MisalignedDirectIo {
            write: true,
            offset: 100,
            segments: vec![(0x1000, 4096)],
            align: DirectAlign::new(512, 512),
            misfit: Misfit::Offset,
        };
        let text = err.to_string();
        assert!(
            text.contains("O_DIRECT write of 4096 bytes at offset 100"),
            "{text}"
        );
        assert!(text.contains("not a multiple of 512"), "{text}");
        assert!(err.offset_misaligned());
        let err = MisalignedDirectIo {
            misfit: Misfit::Address(1),
            segments: vec![(0x1000, 512), (0x1001, 512)],
            ..err
        };
        let text = err.to_string();
        assert!(
            text.contains("the address 0x1001 of buffer 1 is not aligned"),
            "{text}"
        );
        assert_eq!(err.address_misaligned(), Some(1));
    }
}
