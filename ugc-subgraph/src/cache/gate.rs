//! The L1 gate: whether this instance may serve from its own L1 (and its
//! rendered entities) at all.
//!
//! Open by default. Once [`L1Gate::require_sync`] is called (the write
//! visibility protocol is on), it is open only while the instance can prove
//! it is caught up with the invalidation stream and still registered as live:
//! a writer that stopped waiting for this instance's acknowledgement relies
//! on it (see `events/visibility.rs`). Closed, lookups fall through to L2 and
//! Postgres, which the writer invalidated before answering.
//!
//! It must never open on a proof older than its window: the times it holds
//! are when a proof *started* (a tick sent, a heartbeat begun), never when
//! it ended.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct L1Gate {
    required: AtomicBool,
    base: Instant,
    /// Micros since `base` until which the invalidation stream is proven
    /// caught up (a tick sent then came back through it).
    synced_until: AtomicU64,
    /// Micros since `base` until which this instance is surely in the live
    /// set every writer waits for.
    registered_until: AtomicU64,
}

impl Default for L1Gate {
    fn default() -> Self {
        Self {
            required: AtomicBool::new(false),
            base: Instant::now(),
            synced_until: AtomicU64::new(0),
            registered_until: AtomicU64::new(0),
        }
    }
}

impl L1Gate {
    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_micros()).unwrap_or(u64::MAX)
    }

    /// From now on, L1 is served only on fresh proofs.
    pub fn require_sync(&self) {
        self.required.store(true, Ordering::Release);
    }

    /// May L1 serve at `now`?
    pub fn is_open(&self, now: Instant) -> bool {
        if !self.required.load(Ordering::Acquire) {
            return true;
        }
        let now = self.micros(now);
        now < self.synced_until.load(Ordering::Acquire) && now < self.registered_until.load(Ordering::Acquire)
    }

    /// A tick sent at `sent` came back through the invalidation stream:
    /// everything committed before `sent` has been applied.
    pub fn synced(&self, sent: Instant, window: Duration) {
        self.synced_until.fetch_max(self.micros(sent + window), Ordering::AcqRel);
    }

    /// A heartbeat begun at `started` succeeded.
    pub fn registered(&self, started: Instant, margin: Duration) {
        self.registered_until.fetch_max(self.micros(started + margin), Ordering::AcqRel);
    }

    /// Closes the gate at once (e.g. leaving the live set at shutdown).
    pub fn close(&self) {
        self.registered_until.store(0, Ordering::Release);
    }

    /// `at` as this gate's clock (micros since its base), for tick payloads.
    pub fn stamp(&self, at: Instant) -> u64 {
        self.micros(at)
    }

    /// The instant a [`L1Gate::stamp`] stands for.
    pub fn instant(&self, stamp: u64) -> Instant {
        self.base + Duration::from_micros(stamp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_only_on_both_proofs_and_only_for_their_window() {
        let gate = L1Gate::default();
        let t0 = Instant::now();
        assert!(gate.is_open(t0), "open until required");
        gate.require_sync();
        assert!(!gate.is_open(t0), "no proof yet");
        gate.synced(t0, Duration::from_millis(100));
        assert!(!gate.is_open(t0), "synced but not registered");
        gate.registered(t0, Duration::from_secs(2));
        assert!(gate.is_open(t0 + Duration::from_millis(99)));
        assert!(!gate.is_open(t0 + Duration::from_millis(100)), "the sync proof is 100 ms old");
        // An older proof arriving late never moves the window back.
        gate.synced(t0 - Duration::from_millis(50), Duration::from_millis(100));
        assert!(gate.is_open(t0 + Duration::from_millis(99)));
        gate.synced(t0 + Duration::from_secs(1), Duration::from_millis(100));
        assert!(gate.is_open(t0 + Duration::from_millis(1050)));
        assert!(!gate.is_open(t0 + Duration::from_millis(2000)), "registration lapsed");
        gate.close();
        assert!(!gate.is_open(t0 + Duration::from_millis(1050)));
        let at = t0 + Duration::from_millis(7);
        assert!(at - gate.instant(gate.stamp(at)) < Duration::from_micros(1), "stamps round-trip");
    }
}
