//! Each context's pool of request buffers, so that memory follows what is in flight rather than
//! the allocator's history: a READ's reply and a WRITE's payload are taken from the pool on the
//! context's thread, filled on a pool worker (or from the socket), and given back once the
//! reply they became has been sent.
//!
//! Buffers come in size classes, powers of two from 4 KiB to the largest payload, each with
//! [`HEADROOM`] more for the reply's headers, so that a buffer fits any request of its class
//! and is reused by requests of the same size. Idle buffers are kept up to [`MAX_IDLE`] bytes
//! in all, over every context's pool (the rest are freed, so a burst does not leave its peak
//! behind, however many contexts there are); a buffer whose
//! capacity is not exactly a class (a small status reply, the handshake's output) is simply
//! dropped.
//!
//! Only the context's thread touches its pool (an [`AioContext::local`]); a buffer crosses to a
//! worker and back inside the request, never through the pool.
//!
//! What the pool frees must leave the process: [`release_freed_memory`] keeps glibc from
//! parking freed request buffers in its heaps.

use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};

use aio::AioContext;

use crate::connection::Socket;
use crate::protocol::MAX_PAYLOAD;
use crate::session::IoBuf;

/// Room past a class's power of two: a reply's headers (a structured read has 28 bytes before
/// its data; a sparse read some more per chunk), and with `--cache none` the padding in front
/// that puts the data on the alignment `O_DIRECT` needs ([`pad_for`]).
pub const HEADROOM: usize = 8 << 10;
/// The smallest class: anything smaller (status replies, small reads) is not worth pooling.
const MIN_CLASS: usize = 4 << 10;
/// Idle bytes the pools of all contexts keep for reuse, together.
pub const MAX_IDLE: usize = 8 << 20;

/// Idle bytes in every context's pool: a budget, not a synchronization (Relaxed; a pool
/// checks its reservation's result, so the sum never passes [`MAX_IDLE`]).
static IDLE_TOTAL: AtomicUsize = AtomicUsize::new(0);

/// Makes glibc's malloc serve every allocation of 128 KiB or more (request buffers) with its
/// own `mmap`, and so give it back to the kernel when freed. By default glibc raises that
/// threshold each time such a block is freed, up to 32 MiB, after which freed request buffers
/// stay in its heaps: RSS then stays at the peak of the busiest moment (hundreds of MiB after
/// a bulk copy) instead of falling back to what is in use.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // mallopt sets glibc's own tunable, under glibc's lock.
        // SAFETY: [EXAMPLE-MALLOC] two integers in, no memory of ours involved.
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10) };
        if ok == 0 {
            eprintln!("nbd-server: mallopt(M_MMAP_THRESHOLD) refused; freed memory may linger");
        }
    }
}

/// Gives the free memory of malloc's heaps (every arena's) back to the kernel
/// (`malloc_trim`), after a burst of connections has left: their allocations are below the
/// mmap threshold, so their memory stays in the heaps, and RSS at the burst's peak, otherwise.
pub fn trim_heaps() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // malloc_trim walks glibc's own heaps under their locks.
        // SAFETY: [EXAMPLE-MALLOC] an integer in, no memory of ours involved.
        unsafe { libc::malloc_trim(0) };
    }
}

/// How many bytes go in front of `buf[head..]` so that it starts on a multiple of `align` (a
/// power of two; 1 or 0: none). Stable as long as `buf` is not reallocated: reserve first.
pub fn pad_for(buf: &[u8], head: usize, align: usize) -> usize {
    if align <= 1 {
        return 0;
    }
    let at = buf.as_ptr() as usize + head;
    (align - at % align) % align
}

/// The classes' capacities: `MIN_CLASS << k` plus [`HEADROOM`], up to the largest payload.
fn class_of(len: usize) -> Option<usize> {
    let payload = len.saturating_sub(HEADROOM).max(MIN_CLASS);
    let k = payload.next_power_of_two().trailing_zeros() - MIN_CLASS.trailing_zeros();
    (payload <= MAX_PAYLOAD as usize).then_some(k as usize)
}

fn capacity(class: usize) -> usize {
    (MIN_CLASS << class) + HEADROOM
}

/// A WRITE payload being received into its request's buffer. The buffer's length is how far
/// its bytes are initialized (by this request or an earlier one), `filled` how far they are
/// this payload's; only bytes never initialized are zeroed before the socket writes them.
pub struct Payload {
    buf: IoBuf,
    filled: usize,
}

impl Payload {
    /// How many payload bytes have arrived.
    pub fn received(&self) -> usize {
        self.filled - self.buf.start
    }

    /// Appends `bytes` (received with the request's header).
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.room(bytes.len()).copy_from_slice(bytes);
        self.advance(bytes.len());
    }

    /// The `n` bytes after those that have arrived, for the socket to write into.
    pub fn room(&mut self, n: usize) -> &mut [u8] {
        let end = self.filled + n;
        if self.buf.vec.len() < end {
            self.buf.vec.resize(end, 0);
        }
        &mut self.buf.vec[self.filled..end]
    }

    /// Receives up to `n` more bytes from `sock`: into bytes an earlier request initialized
    /// if the buffer has them, else onto its end without zeroing (`Socket::read_append`).
    pub fn receive(&mut self, n: usize, sock: &Socket) -> io::Result<usize> {
        let end = self.filled + n;
        let vec = &mut self.buf.vec;
        let got = if vec.len() >= end {
            sock.read(&mut vec[self.filled..end])?
        } else {
            // What lies past `filled` holds nothing of this payload: forget it, and receive
            // into the capacity behind.
            vec.truncate(self.filled);
            sock.read_append(vec, n)?
        };
        self.filled += got;
        Ok(got)
    }

    /// Counts `n` more bytes as arrived (the socket wrote them into [`room`](Self::room)).
    pub fn advance(&mut self, n: usize) {
        self.filled += n;
    }

    /// An empty payload in `vec`, whose bytes stay initialized for the next one to be received
    /// into (a streaming worker's buffer, reused from one WRITE to the next).
    pub fn reuse(vec: Vec<u8>) -> Payload {
        Payload {
            buf: IoBuf::at(vec, 0),
            filled: 0,
        }
    }

    /// The buffer, holding exactly the padding and the bytes that arrived.
    pub fn into_buf(mut self) -> IoBuf {
        self.buf.vec.truncate(self.filled);
        self.buf
    }
}

#[derive(Default)]
pub struct BufPool {
    /// Idle buffers per class; each keeps its length (its bytes are initialized, whatever they
    /// hold), so reusing it for a read of that length or less needs no zeroing.
    idle: RefCell<Vec<Vec<Vec<u8>>>>,
    /// This pool's share of [`IDLE_TOTAL`].
    idle_bytes: Cell<usize>,
}

impl Drop for BufPool {
    /// Gives the pool's idle buffers' share of the budget back with them (a context that ends).
    fn drop(&mut self) {
        IDLE_TOTAL.fetch_sub(self.idle_bytes.get(), Ordering::Relaxed);
    }
}

impl BufPool {
    /// The pool of `ctx`, which must be the context of this thread.
    pub fn of(ctx: &AioContext) -> Rc<BufPool> {
        ctx.local(|_| BufPool::default())
    }

    /// A buffer of exactly `len` initialized bytes (whatever they hold), with room to grow to
    /// its class. A new one is allocated zeroed (`calloc`), which for a big buffer is fresh
    /// pages that nothing touches until they are written: a READ's reply that turns out to be
    /// a hole, or shorter than asked, then costs no page faults for the rest. Zeroing a new
    /// buffer by writing cost a 32 MiB READ of a hole 16 ms of CPU for a 28-byte reply.
    pub fn take(&self, len: usize) -> Vec<u8> {
        let Some(class) = class_of(len) else {
            return vec![0; len];
        };
        let Some(mut buf) = self.pop_idle(class) else {
            let mut buf = vec![0; capacity(class)];
            buf.truncate(len);
            return buf;
        };
        if buf.len() >= len {
            buf.truncate(len);
        } else {
            buf.resize(len, 0);
        }
        buf
    }

    /// A buffer for a `len`-byte WRITE payload, to be received into it: the payload will
    /// start on a multiple of `align` (1: anywhere). A reused buffer keeps the bytes an earlier
    /// request initialized, so receiving into it zeroes nothing; a new one touches no memory
    /// until bytes arrive.
    pub fn take_payload(&self, len: usize, align: usize) -> Payload {
        let mut buf = self.reuse(len);
        // Within a class's capacity (HEADROOM covers the padding): no reallocation.
        buf.reserve((len + align).saturating_sub(buf.len()));
        let start = pad_for(&buf, 0, align);
        if buf.len() < start {
            buf.resize(start, 0);
        }
        Payload {
            buf: IoBuf::at(buf, start),
            filled: start,
        }
    }

    /// An idle buffer of `len`'s class, as it was given back, or a new empty one.
    fn reuse(&self, len: usize) -> Vec<u8> {
        let Some(class) = class_of(len) else {
            return Vec::with_capacity(len);
        };
        self.pop_idle(class)
            .unwrap_or_else(|| Vec::with_capacity(capacity(class)))
    }

    /// An idle buffer of `class`, as it was given back.
    fn pop_idle(&self, class: usize) -> Option<Vec<u8>> {
        let buf = self.idle.borrow_mut().get_mut(class).and_then(Vec::pop)?;
        self.idle_bytes.set(self.idle_bytes.get() - buf.capacity());
        IDLE_TOTAL.fetch_sub(buf.capacity(), Ordering::Relaxed);
        Some(buf)
    }

    /// Takes `buf` back for reuse, if it is a class's and there is room.
    pub fn give(&self, buf: Vec<u8>) {
        let cap = buf.capacity();
        let Some(class) = class_of(cap).filter(|&c| capacity(c) == cap) else {
            return;
        };
        let reserved = IDLE_TOTAL.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |total| {
            (total + cap <= MAX_IDLE).then_some(total + cap)
        });
        if reserved.is_err() {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        if idle.len() <= class {
            idle.resize_with(class + 1, Vec::new);
        }
        idle[class].push(buf);
        self.idle_bytes.set(self.idle_bytes.get() + cap);
    }
}
