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
//! | anything else | the `TIMEOUT` with that sequence number |
//!
//! Numbering timeouts lets a wait tell its own timeout from an older one that is still in
//! flight (see `lib.rs`, "Timeouts").

use aio_core::HandlerKey;

/// The low half that marks a value as a monitor tag rather than a handler key.
const TAG_INDEX: u64 = u32::MAX as u64;

/// The high half of [`WAKE_TAG`].
const WAKE_HIGH: u32 = u32::MAX - 1;

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
/// `seq` must be below `u32::MAX - 1`: the two highest values spell [`WAKE_TAG`] and
/// [`REMOVE_TAG`]. [`next_timeout_seq`] never produces them.
pub(crate) fn timeout_tag(seq: u32) -> u64 {
    debug_assert!(seq < WAKE_HIGH, "the two highest values are other tags");
    (u64::from(seq) << 32) | TAG_INDEX
}

/// The sequence number after `seq`, wrapping before the two values that are other tags.
/// Wrapping is harmless: a timeout lives for about one wait, so two in flight at once are at
/// most a few numbers apart.
pub(crate) fn next_timeout_seq(seq: u32) -> u32 {
    if seq + 1 >= WAKE_HIGH { 0 } else { seq + 1 }
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
        for seq in [0, 1, 12345, u32::MAX - 2] {
            let tag = timeout_tag(seq);
            assert_eq!(Tag::decode(tag), Tag::Timeout(seq));
            assert!(is_reserved(HandlerKey::from_u64(tag)));
        }
    }

    #[test]
    fn timeout_sequence_skips_the_other_tags() {
        assert_eq!(next_timeout_seq(0), 1);
        assert_eq!(next_timeout_seq(u32::MAX - 3), u32::MAX - 2);
        assert_eq!(next_timeout_seq(u32::MAX - 2), 0);
    }
}
