//! Registered (fixed) buffers: [`FixedBufPool`], `count` page-aligned buffers of one size
//! allocated once, registered with a context's io_uring ring when it can be, and [`FixedBuf`],
//! the owned lease of one of them that the `read_fixed`/`write_fixed` operations take by value.
//! This file owns the pool's memory, its free list and the byte access of a lease.
//!
//! # Why
//!
//! A plain `READ`/`WRITE` makes the kernel pin the buffer's pages and unpin them again on
//! every request; a buffer registered once (`IORING_REGISTER_BUFFERS`) stays pinned and a
//! `READ_FIXED`/`WRITE_FIXED` names it by index. The raw floor of B11 measured 1.21–1.36×
//! on 4 KiB reads (BENCHMARKS.md, "B11_ring_features").
//!
//! # Soundness (ARCHITECTURE.md, rule [URING-5])
//!
//! The memory is one boxed slice of pages, allocated by [`FixedBufPool::new`] and never moved
//! or resized; it is freed only when the last `Arc` of it goes. Three kinds of owner hold one:
//! the pool, every lease (through the pool's shared state), and the ring it is registered with
//! (`UringMonitor::register_buffers` keeps it until the ring is closed, after its requests are
//! reaped). A buffer index is on the free list or in exactly one lease, never both, so the
//! bytes a lease reaches are reached by nothing else; a request takes the lease by value
//! into its keep-alive ([URING-2]) and hands it back only once the kernel is done.

use std::cell::UnsafeCell;
use std::fmt;
use std::io;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

use aio_core::AioContext;

/// The alignment and granularity of the pool's buffers: a page, which is also what `O_DIRECT`
/// needs on every file system.
pub const FIXED_BUF_ALIGN: usize = 4096;

/// The kernel's limit on the number of registered buffers (`IORING_MAX_REG_BUFFERS`), which
/// also keeps an index in the `u16` of an SQE.
const MAX_BUFFERS: usize = 1 << 14;

/// The kernel's limit on the size of one registered buffer.
const MAX_BUF_SIZE: usize = 1 << 30;

/// One page of the pool, aligned so that every buffer starts on a page.
#[repr(C, align(4096))]
struct Page([u8; FIXED_BUF_ALIGN]);

/// The pool's memory: `count` buffers of `size` bytes, contiguous, page-aligned, zeroed at
/// first. Never accessed through `&self` except as raw pointers: a lease makes the slices.
pub(crate) struct Memory {
    pages: Box<[UnsafeCell<Page>]>,
    count: usize,
    size: usize,
}

// The bytes are behind `UnsafeCell`s and reached only through a lease of their buffer, which
// is exclusive (the free list hands out each index once), so sharing `&Memory` between threads
// shares nothing but addresses.
// SAFETY: [URING-5]: each buffer's bytes are reached only by the one lease that holds its index.
unsafe impl Sync for Memory {}

impl Memory {
    /// The address of buffer `index`'s first byte. `index < count`.
    pub(crate) fn buf_ptr(&self, index: usize) -> *mut u8 {
        debug_assert!(index < self.count);
        // The address is derived from the slice of `UnsafeCell`s, so writing through it is
        // allowed while no reference to those bytes exists.
        UnsafeCell::raw_get(self.pages.as_ptr())
            .cast::<u8>()
            .wrapping_add(index * self.size)
    }

    /// How many buffers.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    /// The size of one buffer, in bytes (a multiple of [`FIXED_BUF_ALIGN`]).
    pub(crate) fn size(&self) -> usize {
        self.size
    }
}

/// What the pool handle and its leases share.
struct PoolState {
    mem: Arc<Memory>,
    /// The indices not leased.
    free: Mutex<Vec<u16>>,
}

impl PoolState {
    fn free(&self) -> std::sync::MutexGuard<'_, Vec<u16>> {
        // The list is consistent after every push or pop, so a poisoned lock is still usable.
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A pool of `count` page-aligned buffers of `size` bytes, registered with a context's
/// io_uring ring when possible, from which [`FixedBuf`] leases are taken. Cheap to clone
/// (clones share the buffers); `Send + Sync`.
///
/// On the io_uring engine of the context the pool is registered with,
/// [`BlockIo::read_fixed`](crate::BlockIo::read_fixed) and
/// [`write_fixed`](crate::BlockIo::write_fixed) are `READ_FIXED`/`WRITE_FIXED` requests;
/// everywhere else (another context, a ring that refused the registration, the thread pool,
/// native AIO) they are the plain operations on the same memory, with the same results.
///
/// ```
/// use blockio::FixedBufPool;
/// let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
/// let pool = FixedBufPool::new(&ctx, 2, 4096)?; // on poll: not registered, still usable
/// assert!(!pool.is_registered(&ctx));
/// let a = pool.get().unwrap();
/// let b = pool.get().unwrap();
/// assert!(pool.get().is_none()); // exhausted: no wait
/// drop(a);
/// assert_eq!(pool.available(), 1);
/// # drop(b);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone)]
pub struct FixedBufPool {
    state: Arc<PoolState>,
}

impl fmt::Debug for FixedBufPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FixedBufPool")
            .field("count", &self.count())
            .field("buf_size", &self.buf_size())
            .field("available", &self.available())
            .finish()
    }
}

impl FixedBufPool {
    /// A pool of `count` buffers of `size` bytes (rounded up to a multiple of 4096), registered
    /// with `ctx`'s ring if `ctx` runs on io_uring. A refused registration (a kernel older than
    /// 5.13, `RLIMIT_MEMLOCK`, a seccomp filter, a ring that has a table already) is logged
    /// once per process and leaves the pool unregistered: the operations then use plain
    /// requests.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] for `count` 0 or over 16 384, or `size` 0 or over
    /// 1 GiB; [`io::ErrorKind::OutOfMemory`] if the buffers cannot be allocated.
    pub fn new(ctx: &AioContext, count: usize, size: usize) -> io::Result<FixedBufPool> {
        let pool = Self::unregistered(count, size)?;
        if ctx.has_io_uring()
            && let Err(e) = pool.register(ctx)
        {
            static LOGGED: std::sync::Once = std::sync::Once::new();
            LOGGED.call_once(|| {
                tracing::warn!(
                    "blockio: io_uring refused the fixed buffers ({e}); using plain reads \
                     and writes"
                );
            });
        }
        Ok(pool)
    }

    /// A pool that is not registered anywhere (yet): see [`register`](Self::register).
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new).
    pub fn unregistered(count: usize, size: usize) -> io::Result<FixedBufPool> {
        if count == 0 || count > MAX_BUFFERS {
            return Err(invalid(format!(
                "a fixed buffer pool holds 1 to {MAX_BUFFERS} buffers, not {count}"
            )));
        }
        if size == 0 || size > MAX_BUF_SIZE {
            return Err(invalid(format!(
                "a fixed buffer holds 1 byte to 1 GiB, not {size} bytes"
            )));
        }
        let size = size.div_ceil(FIXED_BUF_ALIGN) * FIXED_BUF_ALIGN;
        let pages_total = (size / FIXED_BUF_ALIGN)
            .checked_mul(count)
            .ok_or_else(|| invalid("the pool's size overflows".to_owned()))?;
        let mut pages = Vec::new();
        pages.try_reserve_exact(pages_total).map_err(|_| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("cannot allocate {count} buffers of {size} bytes"),
            )
        })?;
        pages.extend((0..pages_total).map(|_| UnsafeCell::new(Page([0; FIXED_BUF_ALIGN]))));
        let mem = Arc::new(Memory {
            pages: pages.into_boxed_slice(),
            count,
            size,
        });
        // Popped from the end: hand out low indices first.
        let free = (0..count as u16).rev().collect();
        Ok(FixedBufPool {
            state: Arc::new(PoolState {
                mem,
                free: Mutex::new(free),
            }),
        })
    }

    /// Registers the buffers with `ctx`'s ring (`IORING_REGISTER_BUFFERS`). The ring keeps the
    /// memory until it is closed; a ring has one table, so a second pool is refused. A pool
    /// may be registered with several rings (each names the same buffers by the same indices).
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::Unsupported`] if `ctx` does not run on io_uring (or not on Linux) or the
    /// kernel is older than 5.13; [`io::ErrorKind::AlreadyExists`] if the ring has a table
    /// already; the kernel's refusal otherwise. The pool stays usable, unregistered.
    pub fn register(&self, ctx: &AioContext) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        {
            crate::uring::register_buffers(ctx, &self.state.mem)
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = ctx;
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "registered buffers need io_uring (Linux)",
            ))
        }
    }

    /// Whether the buffers are registered with `ctx`'s ring, so that the fixed operations on
    /// `ctx`'s io_uring engine are `READ_FIXED`/`WRITE_FIXED`.
    pub fn is_registered(&self, ctx: &AioContext) -> bool {
        #[cfg(target_os = "linux")]
        {
            crate::uring::buffers_registered(ctx, &self.state.mem)
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = ctx;
            false
        }
    }

    /// Leases a free buffer, its length set to [`buf_size`](Self::buf_size); `None` if every
    /// buffer is leased (never waits). The lease goes back to the pool when dropped.
    pub fn get(&self) -> Option<FixedBuf> {
        let index = self.state.free().pop()?;
        Some(FixedBuf {
            lease: Some(Lease {
                pool: self.state.clone(),
                index,
            }),
            len: self.state.mem.size,
        })
    }

    /// How many buffers the pool has.
    pub fn count(&self) -> usize {
        self.state.mem.count
    }

    /// The size of each buffer in bytes (the requested size rounded up to 4096).
    pub fn buf_size(&self) -> usize {
        self.state.mem.size
    }

    /// How many buffers are free right now.
    pub fn available(&self) -> usize {
        self.state.free().len()
    }
}

/// The exclusive hold of one buffer index; gives it back on drop.
struct Lease {
    pool: Arc<PoolState>,
    index: u16,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.free().push(self.index);
    }
}

/// A buffer leased from a [`FixedBufPool`]: owned, `Send`, a `[u8]` of `len()`
/// bytes (up to [`capacity`](Self::capacity)) through `Deref`/`DerefMut`, and back in the
/// pool when dropped. The fixed operations take it by value and give it back with the result.
///
/// `FixedBuf::default()` belongs to no pool and holds no bytes; the operations accept it (a
/// zero-length transfer on the plain path).
#[derive(Default)]
pub struct FixedBuf {
    lease: Option<Lease>,
    len: usize,
}

impl FixedBuf {
    /// The buffer's size in the pool: the most [`set_len`](Self::set_len) accepts.
    pub fn capacity(&self) -> usize {
        self.lease.as_ref().map_or(0, |l| l.pool.mem.size)
    }

    /// Sets how many bytes the buffer exposes, and so how many a request transfers. Bytes
    /// beyond the old length keep whatever they held (zero on a buffer never used).
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] for a length over [`capacity`](Self::capacity); the
    /// length is then unchanged.
    pub fn set_len(&mut self, len: usize) -> io::Result<()> {
        if len > self.capacity() {
            return Err(invalid(format!(
                "length {len} exceeds the fixed buffer's {} bytes",
                self.capacity()
            )));
        }
        self.len = len;
        Ok(())
    }

    /// The buffer's index in its pool's (registered) table and the pool's memory, or `None`
    /// for a default buffer.
    pub(crate) fn table(&self) -> Option<(&Arc<Memory>, u16)> {
        self.lease.as_ref().map(|l| (&l.pool.mem, l.index))
    }

    /// Whether this buffer was leased from `pool` (or one of its clones).
    pub fn same_pool(&self, pool: &FixedBufPool) -> bool {
        self.lease
            .as_ref()
            .is_some_and(|l| Arc::ptr_eq(&l.pool, &pool.state))
    }
}

impl Deref for FixedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.lease {
            None => &[],
            Some(l) => {
                let ptr = l.pool.mem.buf_ptr(usize::from(l.index));
                // SAFETY: [URING-5]: `len <= size` bytes of this lease's buffer, which it alone reaches.
                unsafe { std::slice::from_raw_parts(ptr, self.len) }
            }
        }
    }
}

impl DerefMut for FixedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &self.lease {
            None => &mut [],
            Some(l) => {
                let ptr = l.pool.mem.buf_ptr(usize::from(l.index));
                // SAFETY: [URING-5]: as in `deref`, and `&mut self` excludes every other borrow.
                unsafe { std::slice::from_raw_parts_mut(ptr, self.len) }
            }
        }
    }
}

impl fmt::Debug for FixedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FixedBuf")
            .field("index", &self.lease.as_ref().map(|l| l.index))
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .finish()
    }
}

/// An [`io::ErrorKind::InvalidInput`] error.
fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

#[cfg(test)]
mod tests {
    //! The leases' aliasing argument ([URING-5]) without a ring, so that Miri can check it:
    //! buffers written and read through leases on several threads at once, returned and
    //! leased again, with the pool handle dropped while leases live.
    use super::*;

    #[test]
    fn leases_are_disjoint_across_threads_and_outlive_the_pool_handle() {
        let pool = FixedBufPool::unregistered(4, 4096).unwrap();
        let mut leases: Vec<FixedBuf> = (0..4).map(|_| pool.get().unwrap()).collect();
        assert!(pool.get().is_none());
        drop(pool);
        let handles: Vec<_> = leases
            .drain(..)
            .enumerate()
            .map(|(i, mut buf)| {
                std::thread::spawn(move || {
                    buf.set_len(4096).unwrap();
                    for round in 0..3u8 {
                        buf.fill(i as u8 ^ round);
                        assert!(buf.iter().all(|&b| b == i as u8 ^ round));
                    }
                    buf
                })
            })
            .collect();
        let back: Vec<FixedBuf> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for (i, buf) in back.iter().enumerate() {
            assert!(buf.iter().all(|&b| b == i as u8 ^ 2), "buffer {i}");
        }
        assert_eq!(back[0].capacity(), 4096);
        // The last leases return their buffers to a pool whose handle is gone, and free the
        // memory with them.
        drop(back);
        let again = FixedBufPool::unregistered(1, 4096).unwrap();
        let mut one = again.get().unwrap();
        assert!(one.set_len(4097).is_err());
        one.set_len(10).unwrap();
        assert_eq!(&one[..], &[0; 10]);
    }
}
