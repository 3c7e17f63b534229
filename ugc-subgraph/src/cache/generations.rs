//! L1 invalidation by generation stripes.
//!
//! Each tag hashes to one of `STRIPES` atomic counters. An L1 entry records
//! the counter of its tag when its load *started*; invalidating a tag bumps
//! its counter, which makes every entry under it (and, rarely, under a tag
//! that shares the stripe) unusable at once. O(1) per invalidation, bounded
//! memory, no key scans. Sharing a stripe only costs an extra miss, never a
//! stale read.
//!
//! Written by hand: it is a dozen lines over atomics, and the fencing rule
//! (token taken before the load, checked at fill and at read) is the point.

use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};

use super::key::{Tag, TagRef};

const STRIPES: usize = 1 << 16;

pub struct Generations {
    stripes: Box<[AtomicU64]>,
    /// Bumps so far, counted after their stripes moved: while it reads the
    /// same, no token checked since has changed (see [`Generations::moves`]).
    moves: AtomicU64,
    /// foldhash, not SipHash: every L1 read and every rendered fragment's
    /// dependencies hash their tags here (SipHash was 6 % of a fragment
    /// answer's CPU). Seeded per process; a collision only costs a miss.
    hasher: foldhash::fast::RandomState,
}

impl Default for Generations {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            moves: AtomicU64::new(0),
            hasher: Default::default(),
        }
    }
}

/// A tag's token as its stripe's position and value: checked again
/// without hashing the tag (a rendered fragment checks its every
/// dependency after each invalidation, and under writes the hashing was
/// most of that check; perf, 100 writes/s beside the read load).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    stripe: u32,
    token: u64,
}

impl Generations {
    fn index(&self, tag: TagRef<'_>) -> usize {
        let mut h = self.hasher.build_hasher();
        tag.hash(&mut h);
        (std::hash::Hasher::finish(&h) as usize) & (STRIPES - 1)
    }

    fn stripe(&self, tag: TagRef<'_>) -> &AtomicU64 {
        &self.stripes[self.index(tag)]
    }

    /// `token` of `tag` (as read by [`Generations::current`]) as a stamp.
    pub fn stamp(&self, tag: &Tag, token: u64) -> Stamp {
        // STRIPES fits in a u32.
        Stamp { stripe: self.index(tag.as_ref()) as u32, token }
    }

    /// Whether `stamp`'s stripe still holds its token: the same answer as
    /// comparing [`Generations::current`] of its tag.
    pub fn stamp_current(&self, stamp: Stamp) -> bool {
        self.stripes[stamp.stripe as usize].load(Ordering::Acquire) == stamp.token
    }

    /// The token a load must carry: read it *before* reading the source.
    pub fn current(&self, tag: &Tag) -> u64 {
        self.current_ref(tag.as_ref())
    }

    /// [`Generations::current`] of a tag borrowed from its key.
    pub fn current_ref(&self, tag: TagRef<'_>) -> u64 {
        self.stripe(tag).load(Ordering::Acquire)
    }

    pub fn bump(&self, tag: &Tag) {
        self.stripe(tag.as_ref()).fetch_add(1, Ordering::AcqRel);
        self.moves.fetch_add(1, Ordering::AcqRel);
    }

    /// Invalidates everything (e.g. after losing the event stream).
    pub fn bump_all(&self) {
        for s in self.stripes.iter() {
            s.fetch_add(1, Ordering::AcqRel);
        }
        self.moves.fetch_add(1, Ordering::AcqRel);
    }

    /// How many bumps have completed. Tokens found current after reading
    /// `moves() == m` are all still current while `moves()` reads `m`: a
    /// bump moves its stripe first, then this count, so a reader that sees
    /// the old count either checked before the stripe moved (and the new
    /// count tells the next reader to check again) or saw the stripe move.
    /// One load in place of a check per token, while nothing is written.
    pub fn moves(&self) -> u64 {
        self.moves.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bump_changes_the_token_of_that_tag() {
        let g = Generations::default();
        let tag = Tag::Offer("o1".into());
        let token = g.current(&tag);
        g.bump(&tag);
        assert_ne!(g.current(&tag), token);
        let other = Tag::Author("a".into());
        let before = g.current(&other);
        g.bump_all();
        assert_ne!(g.current(&other), before);
    }

    #[test]
    fn a_stamp_is_current_exactly_while_its_tags_token_is() {
        let g = Generations::default();
        let tag = Tag::Offer("o1".into());
        let stamp = g.stamp(&tag, g.current(&tag));
        assert!(g.stamp_current(stamp));
        g.bump(&Tag::Offer("o2".into()));
        // (o2 may share o1's stripe: then both say "moved".)
        assert_eq!(g.stamp_current(stamp), g.current(&tag) == stamp.token);
        g.bump(&tag);
        assert!(!g.stamp_current(stamp), "moved with its tag");
        assert!(g.stamp_current(g.stamp(&tag, g.current(&tag))));
    }

    #[test]
    fn every_bump_moves_the_count_after_its_stripe() {
        let g = Generations::default();
        let tag = Tag::Offer("o1".into());
        let (moves, token) = (g.moves(), g.current(&tag));
        g.bump(&tag);
        assert_eq!((g.moves(), g.current(&tag)), (moves + 1, token + 1));
        g.bump_all();
        assert_eq!(g.moves(), moves + 2);
    }
}
