//! Filling L1 (fenced by the tag's stripe token taken before the load) and
//! deciding what is worth writing to L2.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::judge::Remaining;
use super::l1::L1Entry;
use super::{CacheKey, CachedValue, Inner, Source, HOT_TTL_FACTOR};

/// How long an L1 entry lives.
pub(super) enum Deadlines {
    /// Just loaded from the source: its (jittered) TTL, and how long the
    /// load took (for XFetch).
    Loaded { ttl: Duration, load_time: Duration },
    /// Promoted from L2: the L2 entry's own deadlines, so that an entry
    /// never outlives, in any layer, the bound counted from its source read.
    FromL2(Remaining),
}

impl<S: Source> Inner<S> {
    /// Inserts into L1 unless the tag's stripe moved since `token` was taken.
    pub(super) async fn fill_l1(&self, key: &CacheKey, value: CachedValue, token: u64, deadlines: Deadlines) {
        if self.gens.current_ref(key.tag_ref()) != token {
            self.metrics.fills_refused.get_or_create(&[("layer", "l1")]).inc();
            return;
        }
        let now = Instant::now();
        let (fresh_for, stale_for, load_time) = match deadlines {
            Deadlines::Loaded { ttl, load_time } => {
                let ttl = if self.hot.is_hot(key) { ttl * HOT_TTL_FACTOR } else { ttl };
                (ttl, ttl + self.config.max_stale, load_time)
            }
            Deadlines::FromL2(left) => (left.fresh, left.servable, Duration::ZERO),
        };
        // Each key lives in one of the two caches: the one its value belongs
        // to (a stale entry in the other would shadow it).
        let (home, other) =
            if value.is_negative() { (&self.l1_negative, &self.l1) } else { (&self.l1, &self.l1_negative) };
        let entry = L1Entry { value, token, fresh_until: now + fresh_for, stale_until: now + stale_for, load_time };
        other.invalidate(key);
        home.insert(key.clone(), Arc::new(entry));
    }

    /// Positive values always go to L2; a negative one only when the key was
    /// loaded as negative before, recently: an id read once (a random-id
    /// scan) never reaches Redis.
    pub(super) fn worth_sharing(&self, key: &CacheKey, value: &CachedValue) -> bool {
        if !value.is_negative() {
            return true;
        }
        let mut h = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(key, &mut h);
        let seen = std::hash::Hasher::finish(&h);
        if self.negative_seen.contains_key(&seen) {
            self.metrics.negative_promotions.inc();
            return true;
        }
        self.negative_seen.insert(seen, ());
        false
    }
}
