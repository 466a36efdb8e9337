//! The registrations and the kernel state of their polls: what is watched, which `POLL_ADD`s
//! are in flight, and the queue of submissions that the next `wait` turns into entries.
//!
//! C original: the `FDMON_IO_URING_{PENDING,ADD,REMOVE}` flags of each `AioHandler` and the
//! lock-free `submit_list` in QEMU's `util/fdmon-io_uring.c`. Here every change comes from the
//! home thread through `&mut self`, so a plain queue replaces the atomic list, and the
//! "owned by io_uring until its completion arrives" state that QEMU encodes with list-membership
//! tricks is an explicit [`Flight`] per `user_data`.
//!
//! # The one invariant
//!
//! **At most one `POLL_ADD` is in flight per `user_data` at any time.** A completion therefore
//! names exactly one request, and its meaning follows from this table alone:
//!
//! | state of the key when its completion arrives | meaning | action |
//! |---|---|---|
//! | [`Flight::Current`] | the live registration's poll | report, then re-arm |
//! | [`Flight::Stale`] | the poll of a registration removed or replaced since | drop; arm a registration re-added under the same key |
//! | no entry, or [`Flight::Idle`] | cannot happen (a bug elsewhere) | drop, log |
//!
//! The context never reuses a key (a removal bumps the slot's generation), so `Stale` is
//! normally just "removed, `POLL_REMOVE` sent, waiting for the end of the old poll". The
//! invariant also covers a caller that does re-add a key while its old poll is still in
//! flight: the new registration's `POLL_ADD` is held back until the old one's completion has
//! been reaped, so the two can never be confused.
//!
//! # Queues
//!
//! Submissions wait in two FIFO queues of [`Op`]s until `wait` turns them into entries:
//! `now`, for changes and for anything that must reach the kernel during the current wait,
//! and `next`, for the re-arms of handlers that the current wait reported. Keeping those
//! re-arms out of the current wait is what guarantees that a wait reports each key at most
//! once: a re-armed poll on a still-ready fd completes at once, and would otherwise be reported
//! again by the same wait. Ops are cheap tokens (a key and a verb); whether one still has work
//! to do is decided when it is popped, so a change that is undone before the next wait (an add
//! followed by a remove) costs no submission at all.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::RawFd;

use aio_core::registrations::{invalid_input, not_found, validate};
use aio_core::{Change, HandlerKey, Interest, Readiness};

use crate::ring::{interest_to_poll, poll_to_readiness};
use crate::user_data::is_reserved;

/// What the kernel has under one `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flight {
    /// No `POLL_ADD` with this `user_data` is queued or in the kernel.
    Idle,
    /// The `POLL_ADD` of the live registration is in the submission queue or in the kernel.
    Current,
    /// A `POLL_ADD` of a registration that has since been removed (or replaced) is in the
    /// submission queue or in the kernel; a `POLL_REMOVE` for it is queued or submitted.
    Stale,
}

/// One registration the context knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Registration {
    fd: RawFd,
    interest: Interest,
    /// The kernel failed this registration's poll (`EBADF`: the fd was closed). It was
    /// reported as an error once and is not re-armed; it stays registered until removed.
    dead: bool,
}

/// Everything known about one `user_data`.
#[derive(Debug)]
struct Slot {
    /// The live registration under this key, if any.
    reg: Option<Registration>,
    /// What the kernel has under this key.
    flight: Flight,
    /// An [`Op::Arm`] for this key sits in one of the queues, so another would be redundant.
    arm_queued: bool,
}

/// A submission to make, decided when it is popped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// Give the live registration of this key a `POLL_ADD`, if it still needs one.
    Arm(u64),
    /// Send a `POLL_REMOVE` for this key's stale poll, if it is still in flight.
    Cancel(u64),
}

/// A submission ready to be turned into an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Submission {
    /// `POLL_ADD` of `fd` for the poll bits `events`, with `user_data`.
    PollAdd {
        /// The key's `user_data`.
        user_data: u64,
        /// The fd to watch.
        fd: RawFd,
        /// Poll bits to watch for.
        events: u32,
    },
    /// `POLL_REMOVE` of the poll whose `user_data` is `target`.
    PollRemove {
        /// The `user_data` of the poll to cancel.
        target: u64,
    },
}

/// What a handler completion means for the wait that reaped it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Report this key with this readiness.
    Report(HandlerKey, Readiness),
    /// Nothing to report (a stale completion, a cancelled poll that is re-armed).
    Nothing,
}

/// The registrations, their polls' state and the submissions waiting for the next `wait`.
#[derive(Debug, Default)]
pub(crate) struct Polls {
    slots: HashMap<u64, Slot>,
    /// How many slots hold a live registration.
    live: usize,
    /// Submissions for the current (or next) wait.
    now: VecDeque<Op>,
    /// Re-arms of keys reported by the current wait; moved to `now` when the next one starts.
    next: Vec<Op>,
}

impl Polls {
    /// Registers `key` for `fd` and `interest` and queues its `POLL_ADD`. No system call.
    pub(crate) fn add(&mut self, key: HandlerKey, fd: RawFd, interest: Interest) -> io::Result<()> {
        validate(Change::Add { key, fd, interest }, |k| self.fd_of(k))?;
        check_key(key)?;
        self.insert(key, fd, interest);
        Ok(())
    }

    /// Moves the registration of `old` to `new`, watching for `interest` from now on: the old
    /// key's poll is removed and the new key gets its own. Validates everything first, so an
    /// error changes nothing.
    pub(crate) fn modify(
        &mut self,
        old: HandlerKey,
        new: HandlerKey,
        fd: RawFd,
        interest: Interest,
    ) -> io::Result<()> {
        let change = Change::Replace {
            old,
            new,
            fd,
            interest,
        };
        validate(change, |k| self.fd_of(k))?;
        check_key(new)?;
        self.remove(old)?;
        self.insert(new, fd, interest);
        Ok(())
    }

    /// Forgets the registration of `key` and queues a `POLL_REMOVE` if its poll is in flight.
    /// The fd is not needed: it may already be closed, and the key alone names the poll.
    pub(crate) fn remove(&mut self, key: HandlerKey) -> io::Result<()> {
        let raw = key.as_u64();
        let slot = match self.slots.get_mut(&raw) {
            Some(slot) if slot.reg.is_some() => slot,
            _ => return Err(not_found(key)),
        };
        slot.reg = None;
        self.live -= 1;
        match slot.flight {
            // The poll may already have completed, its completion waiting in the queue; the
            // POLL_REMOVE then finds nothing (ENOENT), which is fine: either way exactly one
            // completion arrives for it, and the Stale state makes sure it is dropped.
            Flight::Current => {
                slot.flight = Flight::Stale;
                self.now.push_back(Op::Cancel(raw));
            }
            // Nothing in flight: the key is gone for good. A queued Arm finds no slot and is
            // skipped.
            Flight::Idle => {
                self.slots.remove(&raw);
            }
            // Cannot be: a stale poll has no registration.
            Flight::Stale => {}
        }
        Ok(())
    }

    /// Creates (or refills) the slot of `key`, which the caller checked is not live.
    fn insert(&mut self, key: HandlerKey, fd: RawFd, interest: Interest) {
        let raw = key.as_u64();
        let slot = self.slots.entry(raw).or_insert(Slot {
            reg: None,
            flight: Flight::Idle,
            arm_queued: false,
        });
        slot.reg = Some(Registration {
            fd,
            interest,
            dead: false,
        });
        self.live += 1;
        // With a stale poll still in flight under the same key, the Arm is harmless: when
        // popped it sees the stale flight and waits for the completion to re-queue it.
        queue_arm(slot, raw, &mut self.now);
    }

    /// The next submission to make, or `None` when the `now` queue has nothing left to do.
    pub(crate) fn pop(&mut self) -> Option<Submission> {
        while let Some(op) = self.now.pop_front() {
            match op {
                Op::Arm(raw) => {
                    let Some(slot) = self.slots.get_mut(&raw) else {
                        continue;
                    };
                    slot.arm_queued = false;
                    match (slot.reg, slot.flight) {
                        (Some(reg), Flight::Idle) if !reg.dead => {
                            slot.flight = Flight::Current;
                            return Some(Submission::PollAdd {
                                user_data: raw,
                                fd: reg.fd,
                                events: interest_to_poll(reg.interest),
                            });
                        }
                        // Removed before its poll was submitted, already armed, dead, or
                        // waiting for a stale poll of the same key to end (which re-queues it).
                        _ => continue,
                    }
                }
                Op::Cancel(raw) => match self.slots.get(&raw) {
                    Some(slot) if slot.flight == Flight::Stale => {
                        return Some(Submission::PollRemove { target: raw });
                    }
                    // The stale poll's completion was reaped before its POLL_REMOVE was sent.
                    _ => continue,
                },
            }
        }
        None
    }

    /// Undoes the last [`pop`](Self::pop), which returned `sub`, because the submission queue
    /// had no room for it; `sub` is the next one popped.
    pub(crate) fn unpop(&mut self, sub: Submission) {
        match sub {
            Submission::PollAdd { user_data, .. } => {
                if let Some(slot) = self.slots.get_mut(&user_data) {
                    slot.flight = Flight::Idle;
                    slot.arm_queued = true;
                }
                self.now.push_front(Op::Arm(user_data));
            }
            Submission::PollRemove { target } => self.now.push_front(Op::Cancel(target)),
        }
    }

    /// Starts a wait: the re-arms deferred by the previous one join the `now` queue.
    pub(crate) fn begin_wait(&mut self) {
        if !self.next.is_empty() {
            self.now.extend(self.next.drain(..));
        }
    }

    /// Applies the completion of the `POLL_ADD` with `user_data` `raw` and result `res`.
    pub(crate) fn complete(&mut self, raw: u64, res: i32) -> Outcome {
        let key = HandlerKey::from_u64(raw);
        let Some(slot) = self.slots.get_mut(&raw) else {
            tracing::warn!(
                ?key,
                res,
                "io_uring: completion for a key with no poll; dropped"
            );
            return Outcome::Nothing;
        };
        match slot.flight {
            Flight::Idle => {
                tracing::warn!(
                    ?key,
                    res,
                    "io_uring: completion for a key with no poll; dropped"
                );
                Outcome::Nothing
            }
            // The end of a removed registration's poll, whatever its result (ECANCELED from our
            // POLL_REMOVE, or readiness that raced with it): nobody is interested any more.
            Flight::Stale => {
                slot.flight = Flight::Idle;
                match slot.reg {
                    // Re-added under the same key meanwhile: its POLL_ADD was held back until
                    // now so that two polls never share a user_data.
                    Some(reg) if !reg.dead => queue_arm(slot, raw, &mut self.now),
                    Some(_) => {}
                    None => {
                        self.slots.remove(&raw);
                    }
                }
                Outcome::Nothing
            }
            Flight::Current => {
                slot.flight = Flight::Idle;
                let Some(reg) = slot.reg.as_mut() else {
                    // `remove` turns Current into Stale, so a live flight has a registration.
                    return Outcome::Nothing;
                };
                if res >= 0 {
                    let readiness = poll_to_readiness(res as u32);
                    if readiness.is_empty() {
                        // Nothing to report (the kernel never completes a poll with an empty
                        // mask today): re-arm within this wait, which may go on blocking.
                        queue_arm(slot, raw, &mut self.now);
                        return Outcome::Nothing;
                    }
                    // One-shot poll: re-arm it for the next wait, which keeps the handler
                    // level-triggered (a still-ready fd completes again at once).
                    queue_arm(slot, raw, &mut self.next);
                    Outcome::Report(key, readiness)
                } else if res == -libc::ECANCELED {
                    // We never cancel a live poll, but the kernel does when the thread that
                    // submitted it exits (the monitor moved to another thread). Re-arm from
                    // here, within this wait, so a blocking wait keeps watching the fd.
                    tracing::debug!(
                        ?key,
                        "io_uring: live poll cancelled by the kernel; re-armed"
                    );
                    queue_arm(slot, raw, &mut self.now);
                    Outcome::Nothing
                } else {
                    // EBADF: the fd was closed before the POLL_ADD reached the kernel. Re-arming
                    // would fail the same way (or, worse, watch an unrelated file that reused
                    // the number), so report it once, like poll(2)'s POLLNVAL, and stop.
                    reg.dead = true;
                    let err = io::Error::from_raw_os_error(-res);
                    tracing::warn!(
                        fd = reg.fd,
                        ?key,
                        "io_uring: poll failed ({err}); reporting an error once and no longer \
                         watching the fd until its handler is removed"
                    );
                    Outcome::Report(key, Readiness::ERROR)
                }
            }
        }
    }

    /// Whether a submission is waiting for a `wait` (in either queue).
    pub(crate) fn has_work(&self) -> bool {
        !self.now.is_empty() || !self.next.is_empty()
    }

    /// Whether submissions are waiting for the current wait (the `now` queue).
    pub(crate) fn has_urgent(&self) -> bool {
        !self.now.is_empty()
    }

    /// Every live registration: key, fd, interest.
    pub(crate) fn registrations(&self) -> impl Iterator<Item = (HandlerKey, RawFd, Interest)> + '_ {
        self.slots.iter().filter_map(|(&raw, slot)| {
            slot.reg
                .map(|reg| (HandlerKey::from_u64(raw), reg.fd, reg.interest))
        })
    }

    /// How many registrations are live.
    pub(crate) fn len(&self) -> usize {
        self.live
    }

    /// How many `POLL_ADD`s are queued or in the kernel, live and stale together.
    pub(crate) fn in_flight(&self) -> usize {
        self.slots
            .values()
            .filter(|s| s.flight != Flight::Idle)
            .count()
    }

    /// How many `POLL_ADD`s of removed or replaced registrations are still queued or in the
    /// kernel, waiting for their completion to be reaped.
    pub(crate) fn stale(&self) -> usize {
        self.slots
            .values()
            .filter(|s| s.flight == Flight::Stale)
            .count()
    }

    fn reg(&self, key: HandlerKey) -> Option<Registration> {
        self.slots.get(&key.as_u64()).and_then(|s| s.reg)
    }

    /// The fd of the live registration of `key`, for [`validate`].
    fn fd_of(&self, key: HandlerKey) -> Option<RawFd> {
        self.reg(key).map(|reg| reg.fd)
    }
}

/// Queues an [`Op::Arm`] for `raw` on `queue` unless one is already queued.
fn queue_arm<Q: Extend<Op>>(slot: &mut Slot, raw: u64, queue: &mut Q) {
    if !slot.arm_queued {
        slot.arm_queued = true;
        queue.extend([Op::Arm(raw)]);
    }
}

/// The check io_uring adds to the shared ones ([`validate`]): the key's slot index must not be
/// the one reserved for the monitor's own tags.
fn check_key(key: HandlerKey) -> io::Result<()> {
    if is_reserved(key) {
        return Err(invalid_input(format!(
            "{key:?} has slot index u32::MAX, which io_uring reserves for its own tags"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> HandlerKey {
        HandlerKey::new(i, 1)
    }

    fn drain(polls: &mut Polls) -> Vec<Submission> {
        std::iter::from_fn(|| polls.pop()).collect()
    }

    fn poll_add(k: HandlerKey, fd: RawFd) -> Submission {
        Submission::PollAdd {
            user_data: k.as_u64(),
            fd,
            events: libc::POLLIN as u32,
        }
    }

    #[test]
    fn add_then_remove_before_a_wait_submits_nothing() {
        let mut polls = Polls::default();
        polls.add(key(1), 5, Interest::READ).unwrap();
        polls.remove(key(1)).unwrap();
        assert!(polls.has_work());
        assert_eq!(drain(&mut polls), []);
        assert_eq!(polls.len(), 0);
        assert_eq!(polls.in_flight(), 0);
        assert!(!polls.has_work());
    }

    #[test]
    fn completion_reports_and_defers_the_rearm() {
        let mut polls = Polls::default();
        polls.add(key(1), 5, Interest::READ).unwrap();
        assert_eq!(drain(&mut polls), [poll_add(key(1), 5)]);
        let pollin = libc::POLLIN as i32;
        assert_eq!(
            polls.complete(key(1).as_u64(), pollin),
            Outcome::Report(key(1), Readiness::READABLE)
        );
        // Not in this wait...
        assert_eq!(drain(&mut polls), []);
        assert!(polls.has_work() && !polls.has_urgent());
        // ...but in the next.
        polls.begin_wait();
        assert_eq!(drain(&mut polls), [poll_add(key(1), 5)]);
    }

    #[test]
    fn removal_of_an_armed_poll_cancels_it_and_drops_its_completion() {
        let mut polls = Polls::default();
        polls.add(key(1), 5, Interest::READ).unwrap();
        drain(&mut polls);
        polls.remove(key(1)).unwrap();
        assert_eq!(
            drain(&mut polls),
            [Submission::PollRemove {
                target: key(1).as_u64()
            }]
        );
        assert_eq!(polls.in_flight(), 1);
        assert_eq!(
            polls.complete(key(1).as_u64(), -libc::ECANCELED),
            Outcome::Nothing
        );
        assert_eq!(polls.in_flight(), 0);
        assert_eq!(polls.slots.len(), 0, "the slot is freed");
    }

    #[test]
    fn same_key_readded_waits_for_the_stale_poll() {
        let mut polls = Polls::default();
        polls.add(key(1), 5, Interest::READ).unwrap();
        drain(&mut polls);
        polls.remove(key(1)).unwrap();
        polls.add(key(1), 5, Interest::WRITE).unwrap();
        // Only the removal goes out: a second POLL_ADD under the same user_data must wait.
        assert_eq!(
            drain(&mut polls),
            [Submission::PollRemove {
                target: key(1).as_u64()
            }]
        );
        // The stale poll raced and reported readiness: dropped, and the new one armed.
        assert_eq!(
            polls.complete(key(1).as_u64(), libc::POLLIN as i32),
            Outcome::Nothing
        );
        assert_eq!(
            drain(&mut polls),
            [Submission::PollAdd {
                user_data: key(1).as_u64(),
                fd: 5,
                events: libc::POLLOUT as u32
            }]
        );
    }

    #[test]
    fn ebadf_reports_error_once_and_does_not_rearm() {
        let mut polls = Polls::default();
        polls.add(key(1), 5, Interest::READ).unwrap();
        drain(&mut polls);
        assert_eq!(
            polls.complete(key(1).as_u64(), -libc::EBADF),
            Outcome::Report(key(1), Readiness::ERROR)
        );
        polls.begin_wait();
        assert_eq!(drain(&mut polls), []);
        assert_eq!(polls.len(), 1, "still registered until removed");
        polls.remove(key(1)).unwrap();
        assert_eq!(drain(&mut polls), []);
    }

    #[test]
    fn unpop_puts_the_submission_back_first() {
        let mut polls = Polls::default();
        polls.add(key(1), 5, Interest::READ).unwrap();
        polls.add(key(2), 6, Interest::READ).unwrap();
        let first = polls.pop().unwrap();
        assert_eq!(first, poll_add(key(1), 5));
        polls.unpop(first);
        assert_eq!(
            drain(&mut polls),
            [poll_add(key(1), 5), poll_add(key(2), 6)]
        );
    }
}
