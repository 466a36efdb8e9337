//! The `user_data` encoding: which completion belongs to a handler and which to the monitor.
//!
//! Every submission carries a 64-bit `user_data` that the kernel copies into its completion.
//! A `POLL_ADD` carries its handler's [`HandlerKey`] verbatim (`key.as_u64()`), so a
//! completion names its handler without any pointer (QEMU stores the `AioHandler *` there).
//! The monitor's own submissions (the `TIMEOUT` of a blocking wait, every `POLL_REMOVE`, and the
//! `NOP` that wakes an outer loop) need tags that can never be mistaken for a key.
//!
//! # The reserved range
//!
//! A key packs a slot index in its low 32 bits and a generation in its high 32 bits. Every
//! value whose index is `u32::MAX` is reserved here: aio-core's registry hands out indices
//! `0, 1, 2, …` one per live slot, so index `u32::MAX` would need 2³² − 1 simultaneous
//! handler slots (more than 64 GiB of handler nodes) before it could appear. The monitor still
//! refuses such a key with an error instead of trusting that arithmetic, so a tag and a key
//! can never collide. Inside the range, the generation half tells the tags apart:
//!
//! | high 32 bits | meaning |
//! |---|---|
//! | `u32::MAX` | the completion of a `POLL_REMOVE` ([`REMOVE_TAG`], `u64::MAX`) |
//! | `u32::MAX - 1` | the completion of a wake-up `NOP` ([`WAKE_TAG`]) |
//! | `u32::MAX - 2` | the completion of an `ASYNC_CANCEL` of a request ([`CANCEL_TAG`]) |
//! | `2³¹ ..= u32::MAX - 3` | the request (an SQE added with `add_sqe`) in slot `high − 2³¹` |
//! | below `2³¹` | the `TIMEOUT` with that sequence number |
//!
//! Numbering timeouts lets a wait tell its own timeout from an older one that is still in
//! flight (see `lib.rs`, "Timeouts").

use aio_core::HandlerKey;

/// The low half that marks a value as a monitor tag rather than a handler key.
const TAG_INDEX: u64 = u32::MAX as u64;

/// The high half of [`WAKE_TAG`].
const WAKE_HIGH: u32 = u32::MAX - 1;

/// The high half of [`CANCEL_TAG`].
const CANCEL_HIGH: u32 = u32::MAX - 2;

/// The first high half of a request tag; below it are timeout sequence numbers.
const REQUEST_BASE: u32 = 1 << 31;

/// How many request slots can exist at once: the high halves from [`REQUEST_BASE`] up to, not
/// including, [`CANCEL_HIGH`].
pub(crate) const MAX_REQUESTS: u32 = CANCEL_HIGH - REQUEST_BASE;

/// The `user_data` of every `ASYNC_CANCEL`. Like a `POLL_REMOVE`'s, its completion only says
/// whether the target was found; the target reports its own end under its own tag.
pub(crate) const CANCEL_TAG: u64 = ((CANCEL_HIGH as u64) << 32) | TAG_INDEX;

/// The `user_data` of every `POLL_REMOVE`. Its completion only says whether the targeted poll
/// was found; the targeted poll reports its own end under its key, so this one is ignored.
pub(crate) const REMOVE_TAG: u64 = u64::MAX;

/// The `user_data` of the `NOP` that makes the ring fd readable for an outer loop (see
/// `lib.rs`, "Outer loops"). Its completion carries nothing and is ignored.
pub(crate) const WAKE_TAG: u64 = ((u32::MAX as u64 - 1) << 32) | TAG_INDEX;

/// What a completion's `user_data` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tag {
    /// The `POLL_ADD` of the handler with this key.
    Handler(HandlerKey),
    /// The `TIMEOUT` with this sequence number.
    Timeout(u32),
    /// A `POLL_REMOVE`.
    Remove,
    /// A wake-up `NOP`.
    Wake,
    /// An `ASYNC_CANCEL` of a request.
    Cancel,
    /// The request in this slot of the request table.
    Request(u32),
}

impl Tag {
    /// Decodes a completion's `user_data`.
    pub(crate) fn decode(user_data: u64) -> Tag {
        if user_data & TAG_INDEX != TAG_INDEX {
            return Tag::Handler(HandlerKey::from_u64(user_data));
        }
        match (user_data >> 32) as u32 {
            u32::MAX => Tag::Remove,
            WAKE_HIGH => Tag::Wake,
            CANCEL_HIGH => Tag::Cancel,
            high if high >= REQUEST_BASE => Tag::Request(high - REQUEST_BASE),
            seq => Tag::Timeout(seq),
        }
    }
}

/// Whether `key` falls in the reserved range and therefore cannot be used as a `user_data`.
pub(crate) fn is_reserved(key: HandlerKey) -> bool {
    key.index() == u32::MAX
}

/// The `user_data` of the timeout with sequence number `seq`.
///
/// `seq` must be below 2³¹: the upper half of the range spells request tags and the other
/// monitor tags. [`next_timeout_seq`] never produces such a value.
pub(crate) fn timeout_tag(seq: u32) -> u64 {
    debug_assert!(seq < REQUEST_BASE, "the upper half holds other tags");
    (u64::from(seq) << 32) | TAG_INDEX
}

/// The `user_data` of the request in slot `slot` (below [`MAX_REQUESTS`]).
pub(crate) fn request_tag(slot: u32) -> u64 {
    debug_assert!(slot < MAX_REQUESTS, "the slot would spell another tag");
    (u64::from(REQUEST_BASE + slot) << 32) | TAG_INDEX
}

/// The sequence number after `seq`, wrapping before the values that are other tags.
/// Wrapping is harmless: a timeout lives for about one wait, so two in flight at once are at
/// most a few numbers apart.
pub(crate) fn next_timeout_seq(seq: u32) -> u32 {
    if seq + 1 >= REQUEST_BASE { 0 } else { seq + 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_decode_as_handlers() {
        for key in [
            HandlerKey::new(0, 0),
            HandlerKey::new(7, 3),
            HandlerKey::new(u32::MAX - 1, u32::MAX),
        ] {
            assert!(!is_reserved(key));
            assert_eq!(Tag::decode(key.as_u64()), Tag::Handler(key));
        }
    }

    #[test]
    fn tags_decode_as_tags_and_are_reserved() {
        assert_eq!(Tag::decode(REMOVE_TAG), Tag::Remove);
        assert!(is_reserved(HandlerKey::from_u64(REMOVE_TAG)));
        assert_eq!(Tag::decode(WAKE_TAG), Tag::Wake);
        assert!(is_reserved(HandlerKey::from_u64(WAKE_TAG)));
        for seq in [0, 1, 12345, REQUEST_BASE - 1] {
            let tag = timeout_tag(seq);
            assert_eq!(Tag::decode(tag), Tag::Timeout(seq));
            assert!(is_reserved(HandlerKey::from_u64(tag)));
        }
    }

    #[test]
    fn timeout_sequence_skips_the_other_tags() {
        assert_eq!(next_timeout_seq(0), 1);
        assert_eq!(next_timeout_seq(REQUEST_BASE - 2), REQUEST_BASE - 1);
        assert_eq!(next_timeout_seq(REQUEST_BASE - 1), 0);
    }

    #[test]
    fn request_tags_decode_as_requests() {
        assert_eq!(Tag::decode(CANCEL_TAG), Tag::Cancel);
        for slot in [0, 1, MAX_REQUESTS - 1] {
            let tag = request_tag(slot);
            assert_eq!(Tag::decode(tag), Tag::Request(slot));
            assert!(is_reserved(HandlerKey::from_u64(tag)));
        }
    }
}
