//! A circuit breaker for Redis: after `threshold` consecutive failures
//! (errors or timeouts) the circuit opens and calls are skipped for
//! `cool_down`; then one probe is let through (half-open) and its outcome
//! closes or re-opens the circuit.
//!
//! Hand-written: the crates that offer this (failsafe, recloser) bring their
//! own futures plumbing and policies for a state machine of three states and
//! two atomics; this one is lock-free and costs one atomic load per call.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    HalfOpen,
    Open,
}

impl State {
    /// Gauge value: 0 closed, 1 half-open, 2 open.
    pub fn as_gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen => 1,
            Self::Open => 2,
        }
    }
}

pub struct Breaker {
    threshold: u32,
    cool_down: Duration,
    epoch: Instant,
    failures: AtomicU32,
    /// Micros since `epoch` until which the circuit is open; 0 = closed.
    open_until: AtomicU64,
}

impl Breaker {
    pub fn new(threshold: u32, cool_down: Duration) -> Self {
        Self { threshold, cool_down, epoch: Instant::now(), failures: AtomicU32::new(0), open_until: AtomicU64::new(0) }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    pub fn state(&self) -> State {
        match self.open_until.load(Ordering::Acquire) {
            0 => State::Closed,
            until if self.now() < until => State::Open,
            _ => State::HalfOpen,
        }
    }

    /// May a call go through? In half-open state exactly one caller wins the
    /// probe (it pushes the deadline forward); the others stay out.
    pub fn allow(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        let now = self.now();
        now >= until
            && self
                .open_until
                .compare_exchange(until, now + self.cool_down.as_micros() as u64, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    pub fn success(&self) {
        self.failures.store(0, Ordering::Release);
        self.open_until.store(0, Ordering::Release);
    }

    /// Records a failure; returns true when this failure opened the circuit.
    pub fn failure(&self) -> bool {
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let was_open = self.open_until.load(Ordering::Acquire) != 0;
        if n >= self.threshold || was_open {
            self.open_until.store(self.now() + self.cool_down.as_micros() as u64, Ordering::Release);
            return !was_open;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_repeated_failures_and_recovers_through_one_probe() {
        let b = Breaker::new(3, Duration::from_millis(30));
        assert!(b.allow());
        assert!(!b.failure() && !b.failure());
        assert!(b.failure(), "third failure opens");
        assert_eq!(b.state(), State::Open);
        assert!(!b.allow());
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.state(), State::HalfOpen);
        assert!(b.allow(), "one probe goes through");
        assert!(!b.allow(), "only one");
        b.success();
        assert_eq!(b.state(), State::Closed);
        assert!(b.allow());
    }

    #[test]
    fn a_failed_probe_reopens() {
        let b = Breaker::new(1, Duration::from_millis(10));
        b.failure();
        std::thread::sleep(Duration::from_millis(15));
        assert!(b.allow());
        b.failure();
        assert_eq!(b.state(), State::Open);
    }
}
