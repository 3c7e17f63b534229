//! Entry judging: whether a value found in L1 or L2 may be served, and for
//! how long — token current, fresh or only servable stale, XFetch early
//! refresh — and the jitter every deadline gets. No I/O here.

use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{CacheKey, CachedValue, Inner, Kind, Source, XFETCH_BETA};
use crate::telemetry::metrics::Metrics;

/// What an L1 lookup found, as counted.
#[derive(Clone, Copy)]
enum L1Result {
    Hit,
    Miss,
    Stale,
    Fenced,
}

impl L1Result {
    const ALL: [Self; 4] = [Self::Hit, Self::Miss, Self::Stale, Self::Fenced];

    fn label(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Stale => "stale",
            Self::Fenced => "fenced",
        }
    }
}

/// The L1 series of `cache_requests`, one counter per kind and result,
/// looked up once: every field a query resolves reads L1, and a labelled
/// lookup in the metric family per read showed in the profile of the
/// execution path.
pub(super) struct L1Counters([[Counter; L1Result::ALL.len()]; Kind::ALL.len()]);

impl L1Counters {
    pub(super) fn new(metrics: &Metrics) -> Self {
        Self(Kind::ALL.map(|kind| {
            L1Result::ALL.map(|result| {
                metrics
                    .cache_requests
                    .get_or_create(&[("layer", "l1"), ("kind", kind.label()), ("result", result.label())])
                    .clone()
            })
        }))
    }

    fn count(&self, kind: Kind, result: L1Result) {
        self.0[kind as usize][result as usize].inc();
    }
}

/// How an L2 entry is stored: the value plus what every instance needs to
/// judge it (token, freshness, how long it took to load).
#[derive(Serialize, Deserialize)]
pub(super) struct L2Entry {
    pub token: u64,
    pub fresh_until_ms: i64,
    pub stale_until_ms: i64,
    pub load_us: u32,
    pub value: CachedValue,
}

/// Which look at a key this is: a request's first look is counted (hit
/// rates, the key's rate for hot-key detection); a re-check after a miss
/// (inside a load) counts nothing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Look {
    First,
    Recheck,
}

/// An L1 lookup's verdict.
pub(super) enum Lookup {
    Fresh {
        value: CachedValue,
        fresh_until: Instant,
        refresh_early: bool,
    },
    /// Past freshness, within the stale window: served while refreshed.
    Stale(CachedValue),
    Miss,
}

/// Whether a servable entry is still fresh.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Freshness {
    Fresh,
    Stale,
}

/// Time an entry has left, counted from its source read (an entry never
/// outlives, in any layer, the bound counted from that read).
#[derive(Clone, Copy, Debug)]
pub(super) struct Remaining {
    pub fresh: Duration,
    pub servable: Duration,
}

/// A servable L2 entry.
pub(super) struct Judged {
    pub value: CachedValue,
    pub freshness: Freshness,
    pub left: Remaining,
}

impl<S: Source> Inner<S> {
    pub(super) async fn lookup_l1(&self, key: &CacheKey, look: Look) -> Lookup {
        let kind = key.kind();
        let record = |result| {
            if look == Look::First {
                self.l1_counters.count(kind, result);
            }
        };
        if look == Look::First && self.hot.touch(key).1 {
            self.metrics.hot_keys.inc();
            tracing::info!(kind = kind.label(), "hot key detected; kept longer in L1");
        }
        let now = Instant::now();
        if !self.gate.is_open(now) {
            // Possibly behind the invalidation stream: L2 and the source
            // are what a writer made current before answering.
            record(L1Result::Fenced);
            return Lookup::Miss;
        }
        let entry = match self.l1.get(key) {
            Some(entry) => Some(entry),
            None => self.l1_negative.get(key),
        };
        let Some(entry) = entry else {
            record(L1Result::Miss);
            return Lookup::Miss;
        };
        if entry.token != self.gens.current_ref(key.tag_ref()) {
            // Invalidated since it was loaded.
            record(L1Result::Miss);
            return Lookup::Miss;
        }
        if now < entry.fresh_until {
            record(L1Result::Hit);
            let draw: f64 = rand::rng().random_range(f64::MIN_POSITIVE..1.0);
            let refresh_early = xfetch_early(entry.load_time, entry.fresh_until - now, draw);
            return Lookup::Fresh { value: entry.value.clone(), fresh_until: entry.fresh_until, refresh_early };
        }
        record(L1Result::Stale);
        Lookup::Stale(entry.value.clone())
    }

    /// Decodes an L2 value and judges it: `Some` when its token is current
    /// and it is still servable.
    pub(super) fn judge_l2(
        &self,
        key: &CacheKey,
        raw: Option<Vec<u8>>,
        token: u64,
        now: i64,
        look: Look,
    ) -> Option<Judged> {
        let kind = key.kind().label();
        let record = |result| {
            if look == Look::First {
                self.metrics.cache("l2", kind, result);
            }
        };
        let Some(raw) = raw else {
            record("miss");
            return None;
        };
        let Ok(entry) = postcard::from_bytes::<L2Entry>(&raw) else {
            self.metrics.decode_errors.inc();
            record("miss");
            return None;
        };
        if entry.token != token || now >= entry.stale_until_ms {
            record("miss");
            return None;
        }
        let freshness = if now < entry.fresh_until_ms { Freshness::Fresh } else { Freshness::Stale };
        record(if freshness == Freshness::Fresh { "hit" } else { "stale" });
        let left = |until: i64| Duration::from_millis(u64::try_from(until - now).unwrap_or(0));
        Some(Judged {
            value: entry.value,
            freshness,
            left: Remaining { fresh: left(entry.fresh_until_ms), servable: left(entry.stale_until_ms) },
        })
    }
}

/// XFetch (Vattani et al.): refresh before expiry with a probability that
/// grows as expiry nears and with how long a load takes, so that exactly one
/// of many readers of a hot key refreshes it, early, instead of all of them
/// missing at once. `draw` is uniform in (0, 1).
fn xfetch_early(load_time: Duration, left: Duration, draw: f64) -> bool {
    load_time.as_secs_f64() * XFETCH_BETA * -draw.ln() >= left.as_secs_f64()
}

/// ±10 % so that entries filled together do not expire together.
pub(super) fn jitter(ttl: Duration) -> Duration {
    ttl.mul_f64(rand::rng().random_range(0.9..1.1))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn xfetch_refreshes_more_often_as_expiry_nears() {
        let load = Duration::from_millis(50);
        let rate = |left_ms: u64| {
            (1..1000).filter(|i| xfetch_early(load, Duration::from_millis(left_ms), f64::from(*i) / 1000.0)).count()
        };
        assert_eq!(rate(0), 999, "at expiry every reader refreshes");
        assert_eq!(rate(10_000), 0, "far from expiry nobody does");
        assert!(rate(20) > rate(100) && rate(100) > rate(300), "{} {} {}", rate(20), rate(100), rate(300));
        assert!(!xfetch_early(Duration::ZERO, Duration::from_millis(1), 0.5), "instant loads never refresh early");
    }

    #[test]
    fn jitter_stays_within_ten_percent_and_varies() {
        let base = Duration::from_secs(100);
        let samples: HashSet<u128> = (0..200)
            .map(|_| {
                let j = jitter(base);
                assert!(j >= Duration::from_secs(90) && j <= Duration::from_secs(110));
                j.as_millis()
            })
            .collect();
        assert!(samples.len() > 50, "not synchronised");
    }
}
