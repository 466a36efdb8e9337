//! The exported image: a raw file, its size and name, and the blocking operations on it
//! (pread, pwrite, fdatasync, fallocate) that connections run on the context's thread pool.
//!
//! Each operation is an ordinary blocking function taking `&Export`; the connection moves an
//! `Arc<Export>` into the pool's work closure. Nothing here touches a socket.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::protocol::*;

#[derive(Debug)]
pub struct Export {
    file: File,
    pub name: String,
    pub size: u64,
    pub read_only: bool,
}

impl Export {
    /// Opens `path` (read-write unless `read_only`) and takes its size.
    pub fn open(path: &Path, name: String, read_only: bool) -> io::Result<Export> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", path.display()),
            ));
        }
        Ok(Export {
            file,
            name,
            size: meta.len(),
            read_only,
        })
    }

    /// The transmission flags sent to clients.
    pub fn transmission_flags(&self) -> u16 {
        // Every connection writes to the same file and a flush syncs all of them, so clients
        // may open several connections (CAN_MULTI_CONN).
        let mut flags = TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_CAN_MULTI_CONN;
        if self.read_only {
            flags |= TFLAG_READ_ONLY;
        }
        flags
    }

    /// Reads `len` bytes at `offset` into `buf[prefix..]`, a buffer the caller sized to
    /// `prefix + len` so that the reply header can be filled in front of the data and the
    /// whole reply sent with one write.
    pub fn read_into(&self, buf: &mut [u8], prefix: usize, offset: u64) -> io::Result<()> {
        self.file.read_exact_at(&mut buf[prefix..], offset)
    }

    /// Writes `data` at `offset`, then syncs if `fua` (force unit access) asks for it.
    pub fn write(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.file.write_all_at(data, offset)?;
        if fua { self.flush() } else { Ok(()) }
    }

    /// Makes every completed write durable (NBD_CMD_FLUSH).
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Discards a range (NBD_CMD_TRIM): punches a hole, which reads back as zeros. A file
    /// system without hole punching makes TRIM a no-op, which the protocol allows (a trim is
    /// advisory).
    pub fn trim(&self, offset: u64, len: u32, fua: bool) -> io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            r => r?,
        }
        if fua { self.flush() } else { Ok(()) }
    }

    /// Writes zeros to a range (NBD_CMD_WRITE_ZEROES). Without `no_hole` the range may become
    /// a hole; with it, the blocks stay allocated. Either way, when the file system cannot do
    /// it with fallocate, zeros are written.
    pub fn write_zeroes(&self, offset: u64, len: u32, no_hole: bool, fua: bool) -> io::Result<()> {
        let mode = if no_hole {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.write_zeros_slowly(offset, len)?
            }
            Err(e) => return Err(e),
        }
        if fua { self.flush() } else { Ok(()) }
    }

    fn write_zeros_slowly(&self, mut offset: u64, len: u32) -> io::Result<()> {
        let zeros = vec![0u8; (len as usize).min(1 << 20)];
        let end = offset + u64::from(len);
        while offset < end {
            let n = zeros.len().min((end - offset) as usize);
            self.file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u32) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (off, len) = (offset as libc::off_t, libc::off_t::from(len));
        // The fd is owned by `self.file`, open for the duration of the call.
        // SAFETY: fallocate only reads its integer arguments and that fd.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}
