//! The futures form of the operations: a thin layer over the completion callbacks, awaitable
//! from the context's tasks or `AioContext::block_on`. It owns only the hand-over of one
//! result from the callback to the future.
//!
//! Dropping an [`OpFuture`] does not cancel its request: the request keeps its buffer and runs
//! to its end, and the result is dropped then (cancel first with [`OpFuture::cancel`] to stop
//! it early). Nothing the kernel may write is ever freed by the drop.

use std::cell::RefCell;
use std::fmt;
use std::fs::File;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use aio_core::AioContext;

use crate::{BlockIo, FallocateMode, FixedBuf, Op, Segment};

/// Where the callback leaves the result for the future.
struct Shared<T> {
    value: Option<T>,
    waker: Option<Waker>,
}

/// A request as a future: resolves to what the callback form passes to its callback.
pub struct OpFuture<T> {
    shared: Rc<RefCell<Shared<T>>>,
    op: Op,
}

impl<T> fmt::Debug for OpFuture<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpFuture")
            .field("op", &self.op)
            .field("ready", &self.shared.borrow().value.is_some())
            .finish()
    }
}

impl<T: 'static> OpFuture<T> {
    /// Submits a request with `submit`, which gets the callback to pass to a callback-form
    /// operation, and returns the future of its result.
    ///
    /// ```
    /// # let ctx = aio_core::AioContext::new(Box::new(fdmon_poll::PollMonitor::new()?))?;
    /// use blockio::{BlockIo, OpFuture};
    /// let io = BlockIo::of(&ctx);
    /// let fut = OpFuture::new(|done| io.nop(&ctx, done));
    /// assert!(ctx.block_on(fut).is_ok());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn new(submit: impl FnOnce(Box<dyn FnOnce(T)>) -> Op) -> OpFuture<T> {
        let shared = Rc::new(RefCell::new(Shared {
            value: None,
            waker: None,
        }));
        let s = shared.clone();
        let op = submit(Box::new(move |v| {
            let waker = {
                let mut s = s.borrow_mut();
                s.value = Some(v);
                s.waker.take()
            };
            if let Some(w) = waker {
                w.wake();
            }
        }));
        OpFuture { shared, op }
    }

    /// Asks for the request to be cancelled; see [`Op::cancel`]. The future still resolves,
    /// with `ECANCELED` or the request's own result.
    pub fn cancel(&self, ctx: &AioContext) -> bool {
        self.op.cancel(ctx)
    }
}

impl<T> Future for OpFuture<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut s = self.shared.borrow_mut();
        match s.value.take() {
            Some(v) => Poll::Ready(v),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl BlockIo {
    /// The future of a one-buffer transfer of `buf[start..]` (see [`BlockIo::read_into`]).
    fn vec_async(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        (buf, start): (Vec<u8>, usize),
        offset: u64,
        write: bool,
    ) -> OpFuture<(io::Result<usize>, Vec<u8>)> {
        OpFuture::new(|done| {
            self.one_buf(ctx, file, buf, start, offset, write, move |r, b| {
                done((r, b))
            })
        })
    }

    /// The future of a fixed-buffer transfer (see [`BlockIo::read_fixed`]).
    fn fixed_async(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        (buf, start): (FixedBuf, usize),
        offset: u64,
        write: bool,
    ) -> OpFuture<(io::Result<usize>, FixedBuf)> {
        OpFuture::new(|done| {
            self.fixed(ctx, file, buf, start, offset, write, move |r, b| {
                done((r, b))
            })
        })
    }

    /// [`read_at`](Self::read_at) as a future of `(result, buffer)`.
    pub fn read_at_async(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        buf: Vec<u8>,
        offset: u64,
    ) -> OpFuture<(io::Result<usize>, Vec<u8>)> {
        self.vec_async(ctx, file, (buf, 0), offset, false)
    }

    /// [`write_at`](Self::write_at) as a future of `(result, buffer)`.
    pub fn write_at_async(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        buf: Vec<u8>,
        offset: u64,
    ) -> OpFuture<(io::Result<usize>, Vec<u8>)> {
        self.vec_async(ctx, file, (buf, 0), offset, true)
    }

    /// [`read_into`](Self::read_into) as a future of `(result, buffer)`.
    pub fn read_into_async(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        buf: Vec<u8>,
        start: usize,
        offset: u64,
    ) -> OpFuture<(io::Result<usize>, Vec<u8>)> {
        self.vec_async(ctx, file, (buf, start), offset, false)
    }

    /// [`write_from`](Self::write_from) as a future of `(result, buffer)`.
    pub fn write_from_async(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        buf: Vec<u8>,
        start: usize,
        offset: u64,
    ) -> OpFuture<(io::Result<usize>, Vec<u8>)> {
        self.vec_async(ctx, file, (buf, start), offset, true)
    }

    /// [`read_fixed`](Self::read_fixed) as a future of `(result, buffer)`.
    pub fn read_fixed_async(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        buf: FixedBuf,
        start: usize,
        offset: u64,
    ) -> OpFuture<(io::Result<usize>, FixedBuf)> {
        self.fixed_async(ctx, file, (buf, start), offset, false)
    }

    /// [`write_fixed`](Self::write_fixed) as a future of `(result, buffer)`.
    pub fn write_fixed_async(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        buf: FixedBuf,
        start: usize,
        offset: u64,
    ) -> OpFuture<(io::Result<usize>, FixedBuf)> {
        self.fixed_async(ctx, file, (buf, start), offset, true)
    }

    /// [`readv`](Self::readv) as a future of `(result, buffers)`.
    pub fn readv_async<S: Segment>(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        bufs: Vec<S>,
        offset: u64,
    ) -> OpFuture<(io::Result<usize>, Vec<S>)> {
        OpFuture::new(|done| self.readv(ctx, file, bufs, offset, move |r, b| done((r, b))))
    }

    /// [`writev`](Self::writev) as a future of `(result, buffers)`.
    pub fn writev_async<S: Segment>(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        bufs: Vec<S>,
        offset: u64,
    ) -> OpFuture<(io::Result<usize>, Vec<S>)> {
        OpFuture::new(|done| self.writev(ctx, file, bufs, offset, move |r, b| done((r, b))))
    }

    /// [`fsync`](Self::fsync) as a future.
    pub fn fsync_async(&self, ctx: &AioContext, file: &Arc<File>) -> OpFuture<io::Result<()>> {
        OpFuture::new(|done| self.fsync(ctx, file, done))
    }

    /// [`fdatasync`](Self::fdatasync) as a future.
    pub fn fdatasync_async(&self, ctx: &AioContext, file: &Arc<File>) -> OpFuture<io::Result<()>> {
        OpFuture::new(|done| self.fdatasync(ctx, file, done))
    }

    /// [`fallocate`](Self::fallocate) as a future.
    pub fn fallocate_async(
        &self,
        ctx: &AioContext,
        file: &Arc<File>,
        mode: FallocateMode,
        offset: u64,
        len: u64,
    ) -> OpFuture<io::Result<()>> {
        OpFuture::new(|done| self.fallocate(ctx, file, mode, offset, len, done))
    }

    /// [`nop`](Self::nop) as a future: the engine's round trip.
    pub fn nop_async(&self, ctx: &AioContext) -> OpFuture<io::Result<()>> {
        OpFuture::new(|done| self.nop(ctx, done))
    }
}
