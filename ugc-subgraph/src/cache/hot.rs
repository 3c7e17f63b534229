//! Hot-key detection: per-key request rates from a count-min sketch over
//! one-second windows. A key whose estimated rate crosses the threshold is
//! hot: it is reported (metric + one log line), kept in L1 longer, and
//! remembered so that it can be recorded in Redis for warm-up.
//!
//! Hand-written: a count-min sketch is 4 rows of atomic counters; the crates
//! that provide one are single-threaded or generic far beyond this need.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use super::key::CacheKey;

const WIDTH: usize = 1 << 14;
const DEPTH: usize = 4;
/// How many hot keys are remembered for warm-up at most.
pub const MAX_HOT: usize = 2_000;

pub struct HotKeys {
    threshold: u32,
    cells: Box<[AtomicU32]>,
    /// foldhash: every L1 read touches its key here.
    hasher: foldhash::fast::RandomState,
    started: Instant,
    window: AtomicU64,
    /// Hot keys seen, with their last window's estimate.
    hot: Mutex<HashMap<CacheKey, u32>>,
}

impl HotKeys {
    pub fn new(per_second: u64) -> Self {
        Self {
            threshold: u32::try_from(per_second).unwrap_or(u32::MAX),
            cells: (0..WIDTH * DEPTH).map(|_| AtomicU32::new(0)).collect(),
            hasher: Default::default(),
            started: Instant::now(),
            window: AtomicU64::new(0),
            hot: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one request for `key`; returns true when the key is hot (and,
    /// in the second tuple field, whether it just became hot).
    pub fn touch(&self, key: &CacheKey) -> (bool, bool) {
        self.roll_window();
        let hash = self.hasher.hash_one(key);
        let mut estimate = u32::MAX;
        for row in 0..DEPTH {
            // Derive DEPTH indexes from one 64-bit hash (double hashing).
            let i = (hash.rotate_left(row as u32 * 16) as usize ^ row.wrapping_mul(0x9E37_79B9)) & (WIDTH - 1);
            let n = self.cells[row * WIDTH + i].fetch_add(1, Ordering::Relaxed) + 1;
            estimate = estimate.min(n);
        }
        if estimate < self.threshold {
            return (false, false);
        }
        // Past the threshold, refresh the shared map only when the key
        // crosses it and every 64 requests after: a hot key is touched
        // thousands of times a second, and each lock would be contended.
        if estimate != self.threshold && estimate % 64 != 0 {
            return (true, false);
        }
        let mut hot = self.hot.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = !hot.contains_key(key);
        if fresh && hot.len() >= MAX_HOT {
            return (true, false);
        }
        hot.insert(key.clone(), estimate);
        (true, fresh)
    }

    pub fn is_hot(&self, key: &CacheKey) -> bool {
        self.hot.lock().unwrap_or_else(|e| e.into_inner()).contains_key(key)
    }

    /// The hot keys with their rates, hottest first.
    pub fn snapshot(&self) -> Vec<(CacheKey, u32)> {
        let mut v: Vec<_> =
            self.hot.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, n)| (k.clone(), *n)).collect();
        v.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        v
    }

    /// Starts a new one-second window: counters restart from zero.
    fn roll_window(&self) {
        let now = self.started.elapsed().as_secs();
        let current = self.window.load(Ordering::Relaxed);
        if now > current && self.window.compare_exchange(current, now, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            for c in self.cells.iter() {
                c.store(0, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_becomes_hot_past_the_threshold_once() {
        let hot = HotKeys::new(10);
        let key = CacheKey::Rating("offer-1".into());
        let cold = CacheKey::Rating("offer-2".into());
        let mut became = 0;
        for _ in 0..9 {
            assert_eq!(hot.touch(&key), (false, false));
        }
        for _ in 0..5 {
            let (is_hot, fresh) = hot.touch(&key);
            assert!(is_hot);
            became += usize::from(fresh);
        }
        assert_eq!(became, 1, "reported once");
        assert!(!hot.touch(&cold).0);
        assert!(hot.is_hot(&key) && !hot.is_hot(&cold));
        assert_eq!(hot.snapshot()[0].0, key);
    }
}
