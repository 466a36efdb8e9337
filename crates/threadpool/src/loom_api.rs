//! Loom only: the request state machine of `request.rs`, reachable from `tests/loom_request.rs`.
//!
//! A [`LoomRequest`] is a real `Req` whose result goes to a future. Its methods are the
//! transitions the pool drives (a worker's start, run and publish, a cancel, the context's
//! completion) and the future's poll, so that a model can run them on loom threads in any order
//! the pool allows. The pool's own queue and locks are not modelled (see `sync.rs`).

use crate::error::Error;
use crate::request::{Job, LoomVariant, Req, Slot, Status};
use crate::sync::Arc;
use std::task::{Poll, Waker};

type Work = Box<dyn FnOnce() -> u32 + Send>;

/// A request for the value `work` returns, as a future would await it.
#[derive(Clone)]
pub struct LoomRequest(Arc<Req<Work, u32>>);

impl std::fmt::Debug for LoomRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LoomRequest").field(&self.status()).finish()
    }
}

impl LoomRequest {
    /// A queued request running `variant` of the protocol.
    pub fn new(work: impl FnOnce() -> u32 + Send + 'static, variant: LoomVariant) -> Self {
        LoomRequest(Req::new_loom_variant(Box::new(work), variant))
    }

    /// A worker takes it: Queued → Running. False if it was not queued.
    pub fn start(&self) -> bool {
        self.0.start()
    }

    /// A worker runs the started work: Running → Returned.
    pub fn run(&self) {
        self.0.run();
    }

    /// Cancels it if queued (the work is dropped here, as the pool drops it after unlocking).
    pub fn cancel(&self) -> bool {
        self.0.cancel().is_some()
    }

    /// Queued for delivery: Returned → Finished.
    pub fn publish(&self) {
        self.0.publish();
    }

    /// The context's completion pass: Finished → Completed, waking the future.
    pub fn complete(&self) {
        let _ = self.0.complete();
    }

    /// The future's poll.
    pub fn poll(&self, waker: &Waker) -> Poll<Result<u32, Error>> {
        self.0.poll_result(waker)
    }

    /// The result, if delivered and not yet taken.
    pub fn try_take(&self) -> Option<Result<u32, Error>> {
        self.0.try_take()
    }

    /// Where it is.
    pub fn status(&self) -> Status {
        self.0.status()
    }
}
