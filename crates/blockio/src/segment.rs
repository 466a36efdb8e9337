//! [`Segment`]: what one buffer of a vectored request ([`BlockIo::readv`],
//! [`BlockIo::writev`]) transfers, a whole `Vec<u8>` or a `Vec<u8>` from a start on.
//!
//! [`BlockIo::readv`]: crate::BlockIo::readv
//! [`BlockIo::writev`]: crate::BlockIo::writev

/// One buffer of a vectored request and the bytes of it the request transfers:
///
/// * a `Vec<u8>`: all of it;
/// * a `(Vec<u8>, usize)`: `buf[start..]`, leaving `buf[..start]` as it was, as
///   [`BlockIo::read_into`](crate::BlockIo::read_into) takes it. That is how each segment of
///   an `O_DIRECT` transfer sits on the memory alignment: [`DirectAlign::buffer`] makes such
///   a pair. A start past the buffer's end fails the whole request with `InvalidInput`.
///
/// The trait is sealed. The engines give the kernel the bytes' address, which must not move
/// while the request owns the buffer; a `Vec`'s heap memory does not when the `Vec` moves.
///
/// [`DirectAlign::buffer`]: crate::DirectAlign::buffer
pub trait Segment: sealed::Sealed + Send + 'static {
    /// The bytes the request transfers (empty for a start past the end, which the request
    /// refuses before it starts).
    fn bytes(&self) -> &[u8];

    /// The same bytes, writable.
    fn bytes_mut(&mut self) -> &mut [u8];
}

mod sealed {
    /// Only the two kinds of segment whose bytes live in a `Vec`'s heap memory. Private, so
    /// its method is not part of the public API.
    pub trait Sealed {
        /// Why the segment cannot be transferred, if it cannot.
        fn refused(&self) -> Option<String> {
            None
        }
    }

    impl Sealed for Vec<u8> {}

    impl Sealed for (Vec<u8>, usize) {
        fn refused(&self) -> Option<String> {
            let (buf, start) = self;
            (*start > buf.len()).then(|| crate::start_past_end(*start, buf.len()))
        }
    }
}

impl Segment for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl Segment for (Vec<u8>, usize) {
    fn bytes(&self) -> &[u8] {
        let (buf, start) = self;
        buf.get(*start..).unwrap_or_default()
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        let (buf, start) = self;
        buf.get_mut(*start..).unwrap_or_default()
    }
}

/// The first segment of `bufs` that cannot be transferred, and why.
pub(crate) fn refused<S: Segment>(bufs: &[S]) -> Option<String> {
    bufs.iter()
        .enumerate()
        .find_map(|(i, b)| sealed::Sealed::refused(b).map(|why| format!("segment {i}: {why}")))
}

/// The (address, length) of each segment's bytes, for an explanation of a misaligned
/// transfer.
pub(crate) fn segments<S: Segment>(bufs: &[S]) -> Vec<(usize, usize)> {
    bufs.iter()
        .map(|b| crate::direct::segment(b.bytes()))
        .collect()
}

/// The `iovec` of each segment's bytes, for `preadv`/`pwritev` through the kernel.
#[cfg(target_os = "linux")]
pub(crate) fn iovecs<S: Segment>(bufs: &mut [S]) -> Vec<libc::iovec> {
    bufs.iter_mut()
        .map(|b| {
            let bytes = b.bytes_mut();
            libc::iovec {
                iov_base: bytes.as_mut_ptr().cast(),
                iov_len: bytes.len(),
            }
        })
        .collect()
}
