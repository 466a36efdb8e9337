//! Requests on the monitor's ring that are not polls (QEMU 11's `aio_add_sqe`): the table of
//! requests in flight, the memory each one keeps alive, the queues of SQEs and cancels waiting
//! for the next submission, and the ready list of completions waiting for their owner.
//!
//! A request lives in a slot of the table from [`Requests::add`] until its completion is taken
//! by [`Requests::pop_done`]. The slot owns the request's *keep-alive*: a box holding every
//! piece of memory its SQE points at (buffers, iovec arrays, the file). The box is handed back
//! only with the completion, that is after the kernel has posted the CQE and so will not touch
//! the memory again (ARCHITECTURE.md, rule [URING-2]). A slot's `user_data` is a
//! reserved tag (`user_data.rs`) naming the slot; a generation tells a live request from an
//! earlier one in the same slot, for callers that cancel late.

use std::any::Any;
use std::collections::VecDeque;

use io_uring::squeue;

use crate::user_data::{MAX_REQUESTS, request_tag};

/// Memory a request keeps alive until its completion: its buffers, its file, anything its SQE
/// points at.
pub type KeepAlive = Box<dyn Any + Send>;

/// The identity of one request added with `UringMonitor::add_sqe`: its slot and the slot's
/// generation at the time, so that an identity outliving its request never names another one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId {
    slot: u32,
    generation: u32,
}

impl RequestId {
    /// The request's slot in the monitor's table: a small number, unique among the requests
    /// in flight and the completions on the ready list, and reused only once its completion
    /// has been taken off the ready list (the identity as a whole is never reused), so that the
    /// request's owner can keep its state in a `Vec` indexed by it instead of a map.
    pub fn slot(&self) -> usize {
        self.slot as usize
    }
}

/// One completed request on the ready list.
#[derive(Debug)]
pub struct Completion {
    /// The request.
    pub id: RequestId,
    /// The CQE's result: a byte count or 0 on success, a negative errno on failure
    /// (`-ECANCELED` for a cancelled request).
    pub res: i32,
    /// The memory the request kept alive, given back now that the kernel is done with it.
    pub keep: KeepAlive,
}

/// Where a live request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Where {
    /// In `queued`, not yet in the submission queue: the kernel has not seen it.
    Queued,
    /// In the submission queue or in the kernel.
    Kernel,
}

/// One slot of the table.
struct Slot {
    generation: u32,
    /// The live request, if any.
    live: Option<(Where, KeepAlive)>,
}

/// The request table and its queues.
#[derive(Default)]
pub(crate) struct Requests {
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// SQEs waiting for the next submission, with their slots.
    queued: VecDeque<(u32, squeue::Entry)>,
    /// Requests in the kernel whose cancellation waits for the next submission.
    cancels: VecDeque<RequestId>,
    /// Completions not yet taken by their owner (QEMU's `cqe_handler_ready_list`).
    done: VecDeque<Completion>,
    /// How many requests are in the submission queue or the kernel.
    in_kernel: usize,
}

impl Requests {
    /// Takes a slot for `entry` and queues it for the next submission.
    pub(crate) fn add(
        &mut self,
        entry: squeue::Entry,
        keep: KeepAlive,
    ) -> Result<RequestId, (squeue::Entry, KeepAlive)> {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                let Ok(slot) = u32::try_from(self.slots.len()) else {
                    return Err((entry, keep));
                };
                if slot >= MAX_REQUESTS {
                    return Err((entry, keep));
                }
                self.slots.push(Slot {
                    generation: 0,
                    live: None,
                });
                slot
            }
        };
        let s = &mut self.slots[slot as usize];
        s.live = Some((Where::Queued, keep));
        let id = RequestId {
            slot,
            generation: s.generation,
        };
        self.queued
            .push_back((slot, entry.user_data(request_tag(slot))));
        Ok(id)
    }

    /// Asks for `id` to be cancelled. Returns false if it already completed (its completion
    /// may still be on the ready list). A request the kernel has not seen completes at once
    /// with `-ECANCELED`; one in the kernel gets an `ASYNC_CANCEL` with the next submission
    /// and completes with whatever the kernel says (`-ECANCELED`, or its result if it was too
    /// late to stop).
    pub(crate) fn cancel(&mut self, id: RequestId) -> bool {
        let Some(slot) = self.slots.get_mut(id.slot as usize) else {
            return false;
        };
        if slot.generation != id.generation {
            return false;
        }
        match slot.live {
            None => false,
            Some((Where::Queued, _)) => {
                self.queued.retain(|&(s, _)| s != id.slot);
                self.finish(id.slot, -libc::ECANCELED);
                true
            }
            Some((Where::Kernel, _)) => {
                if !self.cancels.contains(&id) {
                    self.cancels.push_back(id);
                }
                true
            }
        }
    }

    /// Moves the request in `slot` to the ready list with result `res`; the slot is freed when
    /// the completion is taken ([`pop_done`](Self::pop_done)).
    /// Returns false if the slot holds no live request (a completion the table does not
    /// expect, which is logged by the caller).
    pub(crate) fn finish(&mut self, slot: u32, res: i32) -> bool {
        let Some(s) = self.slots.get_mut(slot as usize) else {
            return false;
        };
        let Some((place, keep)) = s.live.take() else {
            return false;
        };
        if place == Where::Kernel {
            self.in_kernel -= 1;
        }
        let id = RequestId {
            slot,
            generation: s.generation,
        };
        s.generation = s.generation.wrapping_add(1);
        // The slot stays taken until the completion leaves the ready list (`pop_done`): its
        // owner may still hold state under it, and a request added meanwhile, by a callback
        // run before this completion is taken, must not get the same slot.
        self.done.push_back(Completion { id, res, keep });
        true
    }

    /// Hands every waiting submission to `push`, which puts it in the submission queue and
    /// says whether there was room: cancels first (a cancel of a request that completed
    /// meanwhile is dropped), then requests, which are then counted as in the kernel. Stops at
    /// the first that does not fit, which stays first in its queue; returns whether it
    /// stopped so.
    pub(crate) fn submit_with(&mut self, mut push: impl FnMut(Submit<'_>) -> bool) -> bool {
        while let Some(&id) = self.cancels.front() {
            let slot = &self.slots[id.slot as usize];
            if slot.generation == id.generation
                && matches!(slot.live, Some((Where::Kernel, _)))
                && !push(Submit::Cancel(request_tag(id.slot)))
            {
                return true;
            }
            self.cancels.pop_front();
        }
        while let Some((slot, entry)) = self.queued.front() {
            if !push(Submit::Request(entry)) {
                return true;
            }
            if let Some((place, _)) = &mut self.slots[*slot as usize].live {
                *place = Where::Kernel;
            }
            self.in_kernel += 1;
            self.queued.pop_front();
        }
        false
    }

    /// Takes the oldest completion off the ready list, and frees its slot.
    pub(crate) fn pop_done(&mut self) -> Option<Completion> {
        let c = self.done.pop_front()?;
        self.free.push(c.id.slot);
        Some(c)
    }

    /// How many completions wait on the ready list.
    pub(crate) fn done_len(&self) -> usize {
        self.done.len()
    }

    /// Whether something waits for a submission (a request or a cancel) or for its owner (a
    /// completion).
    pub(crate) fn has_work(&self) -> bool {
        !self.queued.is_empty() || !self.cancels.is_empty() || !self.done.is_empty()
    }

    /// How many requests are live: queued, in the kernel, not yet completed.
    pub(crate) fn live(&self) -> usize {
        self.queued.len() + self.in_kernel
    }

    /// How many requests are in the submission queue or the kernel.
    pub(crate) fn in_kernel(&self) -> usize {
        self.in_kernel
    }

    /// For the monitor's drop: frees every request the kernel never saw, and queues a cancel
    /// for every one it has. Completions on the ready list are dropped with their memory,
    /// which the kernel no longer uses.
    pub(crate) fn cancel_all(&mut self) {
        while let Some((slot, _)) = self.queued.pop_front() {
            self.finish(slot, -libc::ECANCELED);
        }
        self.done.clear();
        self.cancels.clear();
        for (slot, s) in self.slots.iter().enumerate() {
            if let Some((Where::Kernel, _)) = s.live {
                self.cancels.push_back(RequestId {
                    slot: slot as u32,
                    generation: s.generation,
                });
            }
        }
    }

    /// For the monitor's drop when the ring can no longer be used: the memory of every request
    /// still in the kernel is leaked, never freed, because the kernel may still write to it.
    pub(crate) fn leak_in_kernel(&mut self) {
        for s in &mut self.slots {
            if let Some((Where::Kernel, keep)) = s.live.take() {
                std::mem::forget(keep);
            }
        }
        self.in_kernel = 0;
        self.done.clear();
    }
}

/// A submission [`Requests::submit_with`] hands to the monitor.
pub(crate) enum Submit<'a> {
    /// An `ASYNC_CANCEL` of the request with this `user_data`.
    Cancel(u64),
    /// The SQE of a request, `user_data` set.
    Request(&'a squeue::Entry),
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::opcode;

    fn nop() -> squeue::Entry {
        opcode::Nop::new().build()
    }

    /// A slot whose completion waits on the ready list is not given to a new request, even
    /// though the request itself is over; it is once the completion is taken.
    #[test]
    fn a_slot_is_reused_only_after_its_completion_is_taken() {
        let mut r = Requests::default();
        let a = r.add(nop(), Box::new(())).ok().unwrap();
        assert!(!r.submit_with(|_| true));
        assert_eq!(r.in_kernel(), 1);
        assert!(r.finish(a.slot, 0));
        // On the ready list: a new request gets another slot.
        let b = r.add(nop(), Box::new(())).ok().unwrap();
        assert_ne!(a.slot(), b.slot());
        let c = r.pop_done().unwrap();
        assert_eq!((c.id, c.res), (a, 0));
        // Taken: the slot is free again, under a new generation.
        let d = r.add(nop(), Box::new(())).ok().unwrap();
        assert_eq!(d.slot(), a.slot());
        assert_ne!(d, a);
        // A late cancel of the finished request names nothing.
        assert!(!r.cancel(a));
    }

    /// Submissions go out in order, cancels first, and one that does not fit stays first in
    /// its queue for the next call; only requests that went out count as in the kernel.
    #[test]
    fn submission_stops_at_the_first_that_does_not_fit_and_resumes_there() {
        let mut r = Requests::default();
        let ids: Vec<RequestId> = (0..3)
            .map(|_| r.add(nop(), Box::new(())).ok().unwrap())
            .collect();
        let mut seen = Vec::new();
        let mut room = 2;
        let full = r.submit_with(|sub| {
            let Submit::Request(entry) = sub else {
                panic!("no cancel was asked for");
            };
            if room == 0 {
                return false;
            }
            room -= 1;
            seen.push(entry.get_user_data());
            true
        });
        assert!(full);
        assert_eq!(seen, [request_tag(0), request_tag(1)]);
        assert_eq!((r.in_kernel(), r.live()), (2, 3));
        // A cancel of a request in the kernel goes before the request still queued.
        assert!(r.cancel(ids[1]));
        let mut order = Vec::new();
        assert!(!r.submit_with(|sub| {
            order.push(match sub {
                Submit::Cancel(target) => ("cancel", target),
                Submit::Request(entry) => ("request", entry.get_user_data()),
            });
            true
        }));
        assert_eq!(
            order,
            [("cancel", request_tag(1)), ("request", request_tag(2))]
        );
        assert_eq!((r.in_kernel(), r.live()), (3, 3));
        assert!(!r.has_work());
    }
}
