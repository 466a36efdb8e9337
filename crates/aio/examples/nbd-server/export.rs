//! The exported image: a raw file or a block device, its size and name, and the blocking
//! operations on it (pread, pwrite, fdatasync, fallocate, posix_fadvise, and the allocation map
//! from `SEEK_DATA`/`SEEK_HOLE`) that connections run on the context's thread pool (and the
//! allocation map on the context's thread too, `file_io::block_status_now`).
//!
//! Each operation is an ordinary blocking function taking `&Export`; the connection moves an
//! `Arc<Export>` into the pool's work closure. Nothing here touches a client's socket; whether
//! READ replies may be sent from the image's pages with `sendfile` is probed here, at open,
//! and whether a range's pages are in the page cache asked here (`cachestat`).

use std::borrow::Borrow;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use aio::blockio::DirectAlign;

use crate::protocol::*;

/// The fallocate mode of a TRIM (and of a WRITE_ZEROES that may leave a hole).
#[cfg(target_os = "linux")]
const PUNCH_HOLE: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
/// The fallocate mode of a WRITE_ZEROES that keeps the blocks allocated.
#[cfg(target_os = "linux")]
const ZERO_RANGE: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
/// Placeholders outside Linux, where `Export::fallocate` refuses every mode with `EOPNOTSUPP`.
#[cfg(not(target_os = "linux"))]
const PUNCH_HOLE: libc::c_int = 1;
#[cfg(not(target_os = "linux"))]
const ZERO_RANGE: libc::c_int = 2;

#[derive(Debug)]
pub struct Export {
    /// The image, through the page cache.
    file: Arc<File>,
    /// With `--cache none`: the image opened again with `O_DIRECT`, which every READ and
    /// WRITE whose memory, offset and length meet the file's direct I/O alignment (probed
    /// with [`DirectAlign::of`], as qemu-nbd probes its `request_alignment`) goes through.
    direct: Option<(Arc<File>, DirectAlign)>,
    /// With `direct`: keeps its transfers and those through the page cache apart in time.
    gate: Arc<Gate>,
    pub name: String,
    pub size: u64,
    pub read_only: bool,
    /// A block device, not a regular file: its size came from seeking to its end, it has no
    /// holes to report, and zeroing it with `FALLOC_FL_ZERO_RANGE` may be the kernel writing
    /// zeros (so not fast).
    pub block_device: bool,
    /// The granularity of fallocate on the image: a block device's logical block size
    /// (`BLKSSZGET`, 512 or 4096), whose kernel refuses (`EINVAL`) to discard or zero a range
    /// that is not a whole number of blocks; 1 for a regular file.
    zero_align: u64,
    /// The page cache's pages of the image can go to a socket with `sendfile` and their
    /// residency be asked with `cachestat` (Linux 6.5): probed at open ([`probe_sendfile`]).
    /// Without both, every READ's data is copied into its reply buffer.
    pub sendfile: bool,
    /// WRITEs, TRIMs and WRITE_ZEROES running now, on any thread ([`Writing`]).
    writing: AtomicUsize,
}

/// Counts one change of the image as running while it lives. On ext4 a buffered write holds
/// the file's inode lock while it copies (and while the kernel throttles it for dirty pages),
/// fallocate too, and `lseek(SEEK_HOLE)` waits for that lock: the context's thread looks for
/// holes itself only while no change runs ([`Export::is_being_changed`]).
///
/// The guard borrows the export for a blocking operation here, or owns a reference to it for
/// a WRITE that runs elsewhere (a request on the context's ring or a Linux AIO one,
/// `file_io::start`, from [`Export::changing`] until the request completes).
pub struct Writing<E: Borrow<Export>>(E);

impl<E: Borrow<Export>> Writing<E> {
    fn start(export: E) -> Writing<E> {
        export.borrow().writing.fetch_add(1, Ordering::Relaxed);
        Writing(export)
    }
}

impl<E: Borrow<Export>> Drop for Writing<E> {
    fn drop(&mut self) {
        self.0.borrow().writing.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Keeps the image's `O_DIRECT` transfers and its page-cache ones (unaligned READs and
/// WRITEs, zeros written by hand, read-ahead) from running at the same time under
/// `--cache none`. Linux keeps the two coherent only between them: a direct write
/// invalidates the cached pages of its range, and if a cached transfer holds one of them at
/// that moment, the kernel gives up, marks the file with EIO, and the next sync fails (seen
/// here when a pipelined unaligned write overlapped an aligned one). Transfers of one kind
/// run together; a page-cache transfer that waits stops new direct ones from starting, so
/// the rare unaligned request is not starved. Only blocking work waits ([`Gate::enter`], on
/// the pool); the context's thread only tries ([`Gate::try_direct`]), so a direct request
/// held by the ring until its completion runs on that thread never waits for anything.
#[derive(Debug, Default)]
pub struct Gate {
    state: Mutex<GateState>,
    turn: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    direct: usize,
    cached: usize,
    cached_waiting: usize,
}

/// A running transfer's place in the [`Gate`]; leaving it may let the other kind start.
pub struct Pass {
    gate: Arc<Gate>,
    direct: bool,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        // The state is three counters changed in single steps: still right after a panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enter(self: &Arc<Gate>, direct: bool) -> Pass {
        let mut s = self.lock();
        if direct {
            while s.cached > 0 || s.cached_waiting > 0 {
                s = self.turn.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            s.direct += 1;
        } else {
            s.cached_waiting += 1;
            while s.direct > 0 {
                s = self.turn.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            s.cached_waiting -= 1;
            s.cached += 1;
        }
        Pass {
            gate: self.clone(),
            direct,
        }
    }

    fn try_direct(self: &Arc<Gate>) -> Option<Pass> {
        let mut s = self.lock();
        if s.cached > 0 || s.cached_waiting > 0 {
            return None;
        }
        s.direct += 1;
        Some(Pass {
            gate: self.clone(),
            direct: true,
        })
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut s = self.gate.lock();
        let left = if self.direct {
            s.direct -= 1;
            s.direct
        } else {
            s.cached -= 1;
            s.cached
        };
        if left == 0 {
            self.gate.turn.notify_all();
        }
    }
}

/// Whether the image's data goes through the page cache (`--cache`, as qemu-nbd's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Cache {
    /// Through the page cache; FLUSH makes it durable.
    #[default]
    Writeback,
    /// `O_DIRECT` for aligned READs and WRITEs; FLUSH still syncs (the disk's own cache).
    None,
}

/// A run of the allocation map: `len` bytes from where the previous run ended, either a hole
/// (unallocated, reads as zeros) or data (allocated, or not known to be a hole).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub len: u64,
    pub hole: bool,
}

impl Export {
    /// Opens `path` (read-write unless `read_only`) and takes its size: a regular file's
    /// length, or a block device's size (where its end is). Anything else is refused.
    pub fn open(path: &Path, name: String, read_only: bool, cache: Cache) -> io::Result<Export> {
        let mut file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let direct = match cache {
            Cache::Writeback => None,
            Cache::None => {
                let direct = OpenOptions::new()
                    .read(true)
                    .write(!read_only)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)
                    .map_err(|e| {
                        let why = if e.raw_os_error() == Some(libc::EINVAL) {
                            "its file system does not do O_DIRECT".to_owned()
                        } else {
                            e.to_string()
                        };
                        io::Error::new(e.kind(), format!("--cache none: {why}"))
                    })?;
                let align = DirectAlign::of(&direct)
                    .map_err(|e| io::Error::new(e.kind(), format!("--cache none: {e}")))?;
                Some((Arc::new(direct), align))
            }
        };
        let kind = file.metadata()?.file_type();
        let (size, block_device) = if kind.is_file() {
            (file.metadata()?.len(), false)
        } else if kind.is_block_device() {
            // Every other access is positional (pread, pwrite), so moving the offset is harmless.
            (file.seek(SeekFrom::End(0))?, true)
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        };
        let zero_align = if block_device {
            // A block device's logical block size; 4096 if it cannot be read, never too small.
            DirectAlign::of(&file).map_or(4096, |a| a.offset().max(1) as u64)
        } else {
            1
        };
        let sendfile = direct.is_none() && size > 0 && probe_sendfile(&file);
        Ok(Export {
            file: Arc::new(file),
            direct,
            gate: Arc::default(),
            name,
            size,
            read_only,
            block_device,
            zero_align,
            sendfile,
            writing: AtomicUsize::new(0),
        })
    }

    /// The transmission flags sent to a client; `structured` says whether it negotiated
    /// structured replies, without which `NBD_CMD_FLAG_DF` means nothing.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        // Every connection writes to the same file and a flush syncs all of them, so clients
        // may open several connections (CAN_MULTI_CONN).
        let mut flags = TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_CACHE
            | TFLAG_CAN_MULTI_CONN;
        if structured {
            flags |= TFLAG_SEND_DF;
        }
        // A read-only export offers no command that changes it, as qemu-nbd and nbdkit: TRIM
        // and WRITE_ZEROES would only be refused (EPERM).
        if self.read_only {
            flags |= TFLAG_READ_ONLY;
        } else {
            flags |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
        }
        flags
    }

    /// The open image through the page cache: a sync through it covers the `O_DIRECT` one's
    /// writes too (one file).
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// The alignment that request buffers should have: with `--cache none`, the larger of the
    /// file's memory and offset alignments for direct I/O (so that a buffer whose data starts
    /// there serves any aligned request), else 1 (none).
    pub fn align(&self) -> usize {
        match &self.direct {
            Some((_, align)) => align.memory().max(align.offset()),
            None => 1,
        }
    }

    /// The open image to move `data` at `offset` through: the `O_DIRECT` one when there is
    /// one and the transfer meets its alignment, else the page cache's (an unaligned request
    /// under `--cache none` is served, through the cache, rather than refused).
    pub fn file_for(&self, data: &[u8], offset: u64) -> &Arc<File> {
        self.file_at(data.as_ptr() as usize, data.len(), offset)
    }

    /// [`file_for`](Self::file_for) the `len` bytes at address `addr`.
    fn file_at(&self, addr: usize, len: usize, offset: u64) -> &Arc<File> {
        match &self.direct {
            Some((direct, align)) if align.fits_at(addr, len, offset) => direct,
            _ => &self.file,
        }
    }

    /// Whether `file` (from [`file_for`](Self::file_for)) is the `O_DIRECT` one.
    pub fn is_direct(&self, file: &Arc<File>) -> bool {
        self.direct
            .as_ref()
            .is_some_and(|(d, _)| Arc::ptr_eq(d, file))
    }

    /// Lets a transfer through `file` start, waiting while transfers of the other kind run
    /// (see [`Gate`]); without `--cache none`, at once. For blocking work (the pool).
    pub fn enter(&self, file: &Arc<File>) -> Option<Pass> {
        self.direct.as_ref()?;
        Some(self.gate.enter(self.is_direct(file)))
    }

    /// Lets an `O_DIRECT` transfer start now if no page-cache transfer runs or waits; `None`
    /// if one does (the caller then takes the blocking way, on the pool). For the context's
    /// thread, which never waits.
    pub fn try_direct(&self) -> Option<Pass> {
        self.gate.try_direct()
    }

    /// Reads `len` bytes at `offset` into `buf[prefix..]`, a buffer the caller sized to
    /// `prefix + len` so that the reply header can be filled in front of the data and the
    /// whole reply sent with one write.
    ///
    /// Bytes past the end of a file that shrank under the server read as zeros
    /// ([`zeros_past_the_end`]).
    pub fn read_into(&self, buf: &mut [u8], prefix: usize, offset: u64) -> io::Result<()> {
        let data = &mut buf[prefix..];
        let file = self.file_at(data.as_ptr() as usize, data.len(), offset);
        let _pass = self.enter(file);
        let mut done = 0;
        while done < data.len() {
            let at = offset + done as u64;
            match file.read_at(&mut data[done..], at) {
                Ok(n) => {
                    done += n;
                    let pos = at + n as u64;
                    if done < data.len() && zeros_past_the_end(file, &mut data[done..], pos)? {
                        break;
                    }
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the image read nothing before its end",
                        ));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether a WRITE, TRIM or WRITE_ZEROES of this image is running now, on any thread (a
    /// snapshot: one may start right after).
    pub fn is_being_changed(&self) -> bool {
        self.writing.load(Ordering::Relaxed) > 0
    }

    /// Whether the page cache holds every page of `[offset, offset + len)` now (`cachestat`),
    /// so that sending them with `sendfile` will not wait for the disk (unless the kernel
    /// evicts one meanwhile). False when the kernel cannot tell.
    #[cfg(target_os = "linux")]
    pub fn is_cached(&self, offset: u64, len: u64) -> bool {
        cached_pages(&self.file, offset, len).is_some_and(|n| n >= pages_of(offset, len))
    }

    #[cfg(not(target_os = "linux"))]
    pub fn is_cached(&self, _offset: u64, _len: u64) -> bool {
        false
    }

    /// Counts a WRITE of the image that runs elsewhere (a block I/O request) as a change
    /// ([`is_being_changed`](Self::is_being_changed)) until the guard is dropped.
    pub fn changing(self: &Arc<Self>) -> Writing<Arc<Export>> {
        Writing::start(self.clone())
    }

    /// Writes `data` at `offset`, then syncs if `fua` (force unit access) asks for it.
    pub fn write(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let _writing = Writing::start(self);
        let file = self.file_for(data, offset);
        let pass = self.enter(file);
        file.write_all_at(data, offset)?;
        drop(pass);
        if fua { self.flush() } else { Ok(()) }
    }

    /// Makes every completed write durable (NBD_CMD_FLUSH).
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Discards a range (NBD_CMD_TRIM): punches a hole, which reads back as zeros. A file
    /// system without hole punching makes TRIM a no-op, which the protocol allows (a trim is
    /// advisory). On a block device only the whole logical blocks of the range are discarded
    /// (the kernel refuses a partial one); the partial blocks at its edges keep their data.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let _writing = Writing::start(self);
        let [_, middle, _] = self.split_for_fallocate(offset, len);
        if let Some((start, len)) = middle {
            match self.fallocate(PUNCH_HOLE, start, len) {
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                r => r?,
            }
        }
        if fua { self.flush() } else { Ok(()) }
    }

    /// `[offset, offset + len)` as the part before the first whole block of
    /// [`zero_align`](Self::zero_align), the whole blocks, and the part after them, each as
    /// `(offset, len)` if not empty. A regular file is all middle.
    fn split_for_fallocate(&self, offset: u64, len: u64) -> [Option<(u64, u64)>; 3] {
        let a = self.zero_align;
        let end = offset + len;
        let start = offset.next_multiple_of(a).min(end);
        let stop = (end - end % a).max(start);
        let part = |from: u64, to: u64| (to > from).then_some((from, to - from));
        [part(offset, start), part(start, stop), part(stop, end)]
    }

    /// Writes zeros to a range (NBD_CMD_WRITE_ZEROES). Without `no_hole` the range may become
    /// a hole; with it, the blocks stay allocated. When the file system cannot do it with
    /// fallocate, zeros are written, unless `fast` (`NBD_CMD_FLAG_FAST_ZERO`) asks for an
    /// `EOPNOTSUPP` failure instead, with the range untouched. On a block device, only
    /// `PUNCH_HOLE` counts as fast: the kernel serves it only where the device zeroes by
    /// itself, while `ZERO_RANGE` may fall back to writing zero pages; and the partial
    /// logical blocks at the range's edges, which fallocate refuses, are written with zeros,
    /// so that a range that has any is not fast either (qemu-nbd answers such a FAST_ZERO
    /// with `ENOTSUP` too).
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast: bool,
        fua: bool,
    ) -> io::Result<()> {
        let _writing = Writing::start(self);
        let [head, middle, tail] = self.split_for_fallocate(offset, len);
        if fast && (head.is_some() || tail.is_some()) {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        if let Some((start, len)) = middle {
            self.zero_whole_blocks(start, len, no_hole, fast)?;
        }
        for (start, len) in [head, tail].into_iter().flatten() {
            self.write_zeros_slowly(start, len)?;
        }
        if fua { self.flush() } else { Ok(()) }
    }

    /// [`write_zeroes`](Self::write_zeroes) of a range of whole blocks, without the flush.
    fn zero_whole_blocks(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast: bool,
    ) -> io::Result<()> {
        let mut modes = Vec::with_capacity(2);
        if !no_hole {
            modes.push(PUNCH_HOLE);
        }
        if !(fast && self.block_device) {
            modes.push(ZERO_RANGE);
        }
        for mode in modes {
            match self.fallocate(mode, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                Err(e) => return Err(e),
            }
        }
        if fast {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        self.write_zeros_slowly(offset, len)
    }

    /// Asks the kernel to read a range ahead into its page cache (NBD_CMD_CACHE), without
    /// waiting for it.
    pub fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            // posix_fadvise would take a length of 0 as "to the end of the file".
            return Ok(());
        }
        let _pass = self.enter(&self.file);
        self.fadvise_willneed(offset, len)
    }

    /// macOS has no posix_fadvise; a read-ahead hint is advisory, so it is dropped.
    #[cfg(target_vendor = "apple")]
    fn fadvise_willneed(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    #[cfg(not(target_vendor = "apple"))]
    fn fadvise_willneed(&self, offset: u64, len: u64) -> io::Result<()> {
        let (off, len) = (Self::off(offset)?, Self::off(len)?);
        let fd = self.file.as_raw_fd();
        // posix_fadvise only reads its integer arguments and `fd`, which `self.file` keeps open
        // for the duration of the call.
        // SAFETY: [EXAMPLE-FD] posix_fadvise takes integers only; `self.file` keeps `fd` open.
        let r = unsafe { libc::posix_fadvise(fd, off, len, libc::POSIX_FADV_WILLNEED) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(r))
        }
    }

    /// The allocation of `[offset, offset + len)` as consecutive runs of data and holes, found
    /// with `SEEK_HOLE` and `SEEK_DATA`: at most `max` runs (at least 1), which then cover
    /// less than the range. Where the file cannot tell (a block device, a file system without
    /// hole support), the answer is data, which is always a correct one.
    pub fn allocation(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<Run>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut runs: Vec<Run> = Vec::new();
        let push = |runs: &mut Vec<Run>, len: u64, hole: bool| match runs.last_mut() {
            Some(last) if last.hole == hole => last.len += len,
            _ => runs.push(Run { len, hole }),
        };
        let mut pos = offset;
        let mut stalled = false;
        while pos < end && runs.len() < max.max(1) {
            if self.block_device {
                push(&mut runs, end - pos, false);
                break;
            }
            let next_hole = match self.seek_to(pos, libc::SEEK_HOLE) {
                Ok(h) => h,
                // Past the end of the file (it shrank under us): what is left reads as zeros.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => pos,
                // No hole support: all data.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => end,
                Err(e) => return Err(e),
            };
            if next_hole > pos {
                let n = next_hole.min(end) - pos;
                push(&mut runs, n, false);
                pos += n;
                stalled = false;
                continue;
            }
            let next_data = match self.seek_to(pos, libc::SEEK_DATA) {
                Ok(d) => d,
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
                Err(e) => return Err(e),
            };
            if next_data > pos {
                let n = next_data.min(end) - pos;
                push(&mut runs, n, true);
                pos += n;
                stalled = false;
            } else if stalled {
                // A hole at `pos` that has data at `pos` too, twice: a writer keeps filling
                // and punching it. Data is a safe answer; never loop on it.
                push(&mut runs, end - pos, false);
                break;
            } else {
                stalled = true;
            }
        }
        Ok(runs)
    }

    /// `lseek` to `pos` with `whence` (`SEEK_HOLE`, `SEEK_DATA`): where it lands.
    fn seek_to(&self, pos: u64, whence: libc::c_int) -> io::Result<u64> {
        let off = Self::off(pos)?;
        let fd = self.file.as_raw_fd();
        // lseek only reads its integer arguments and `fd`, which `self.file` keeps open; the file
        // offset it moves is used by nothing else (every read and write is positional).
        // SAFETY: [EXAMPLE-FD] lseek takes integers only, `fd` is kept open, its offset unused.
        let r = unsafe { libc::lseek(fd, off, whence) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    }

    fn off(pos: u64) -> io::Result<libc::off_t> {
        libc::off_t::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
    }

    fn write_zeros_slowly(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let _pass = self.enter(&self.file);
        let end = offset + len;
        while offset < end {
            let n = zeros.len().min((end - offset) as usize);
            self.file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    #[cfg(not(target_os = "linux"))]
    fn fallocate(&self, _mode: libc::c_int, _offset: u64, _len: u64) -> io::Result<()> {
        // No fallocate modes outside Linux: TRIM becomes a no-op and WRITE_ZEROES writes zeros,
        // as on a Linux file system without them.
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }

    #[cfg(target_os = "linux")]
    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (off, len) = (Self::off(offset)?, Self::off(len)?);
        let fd = self.file.as_raw_fd();
        // fallocate only reads its integer arguments and `fd`, which `self.file` keeps open for
        // the duration of the call.
        // SAFETY: [EXAMPLE-FD] fallocate takes integers only; `self.file` keeps `fd` open.
        let r = unsafe { libc::fallocate(fd, mode, off, len) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// `cachestat`'s system call number: 451 in the generic table and in x86's (libc 0.2 names it
/// for only a few architectures). MIPS and Alpha number it otherwise; there 451 is no system
/// call at all, `ENOSYS`, and READs are copied as without `cachestat`.
#[cfg(target_os = "linux")]
const SYS_CACHESTAT: libc::c_long = 451;

/// `struct cachestat_range` of `<linux/mman.h>`.
#[cfg(target_os = "linux")]
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

/// `struct cachestat` of `<linux/mman.h>`: page counts of the range asked about.
#[cfg(target_os = "linux")]
#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// How many pages of `[offset, offset + len)` of `file` the page cache holds (`cachestat`,
/// Linux 6.5); `None` if the kernel cannot tell (older kernel, a file without a page cache).
#[cfg(target_os = "linux")]
fn cached_pages(file: &File, offset: u64, len: u64) -> Option<u64> {
    let range = CachestatRange { off: offset, len };
    let mut stat = Cachestat::default();
    // cachestat reads `range` and writes one `struct cachestat` into `stat`, both borrowed for
    // the call and laid out as the kernel's (`repr(C)`, five and two u64s); flags must be 0.
    // SAFETY: [EXAMPLE-CACHESTAT] two live, correctly sized pointers and `file`'s open fd.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0 as libc::c_uint,
        )
    };
    (r == 0).then_some(stat.nr_cache)
}

/// How many pages `[offset, offset + len)` touches.
#[cfg(target_os = "linux")]
fn pages_of(offset: u64, len: u64) -> u64 {
    let page = rustix::param::page_size() as u64;
    (offset + len).div_ceil(page) - offset / page
}

/// Whether READ replies may be sent from `file`'s pages with `sendfile`: the kernel answers
/// `cachestat` on it, and `sendfile` from it into a Unix socket works (not every file system
/// can splice). One byte is moved, at open. `AIO_NBD_SENDFILE=0` in the environment says no.
#[cfg(target_os = "linux")]
fn probe_sendfile(file: &File) -> bool {
    // For side-by-side measurements: the copying path, on request.
    if std::env::var_os("AIO_NBD_SENDFILE").is_some_and(|v| v == "0") {
        return false;
    }
    if cached_pages(file, 0, 1).is_none() {
        return false;
    }
    let Ok((a, _b)) = std::os::unix::net::UnixStream::pair() else {
        return false;
    };
    let mut at = 0;
    rustix::fs::sendfile(&a, file, Some(&mut at), 1) == Ok(1)
}

#[cfg(not(target_os = "linux"))]
fn probe_sendfile(_file: &File) -> bool {
    false
}

/// After a read of `file` that stopped short at `pos`, with `rest` still to fill: whether `pos`
/// is the end of the file, in which case `rest` is zeroed and the read is complete. Requests lie
/// within the export's size, fixed at the handshake, so only a file that shrank under the
/// server (truncated by someone else) ends inside one; what it no longer holds reads as zeros,
/// whatever path the READ takes, as qemu-nbd's (its file driver pads a short read with zeros).
/// A short read that is not at the end (none is expected from a regular file or a block
/// device) returns false, and the caller reads on.
pub fn zeros_past_the_end(file: &File, rest: &mut [u8], pos: u64) -> io::Result<bool> {
    // `lseek` gives a block device's size as well as a file's; every other access is
    // positional, so moving the offset is harmless.
    let end = rustix::fs::seek(file, rustix::fs::SeekFrom::End(0))?;
    if pos < end {
        return Ok(false);
    }
    rest.fill(0);
    Ok(true)
}
