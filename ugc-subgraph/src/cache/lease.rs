//! Cross-instance single-flight: when another instance holds a key's load
//! lease (`SET NX PX` in Redis, taken in `load_through`), wait briefly for
//! its fill instead of loading the same key from Postgres too.

use std::time::Instant;

use super::judge::{Freshness, Judged, Look};
use super::l2::{Fetched, L2};
use super::{now_ms, CacheKey, CachedValue, Deadlines, Inner, Source, LEASE_POLL};

impl<S: Source> Inner<S> {
    /// Another instance holds the lease of these keys: poll L2 for its fill
    /// for up to `lease_wait`. Returns what it filled; the rest the caller
    /// loads itself.
    pub(super) async fn await_other_instance(
        &self,
        l2: &L2,
        keys: &[CacheKey],
        contended: &[usize],
        l1_tokens: &[u64],
        tokens: &[u64],
    ) -> Vec<(usize, CachedValue)> {
        let deadline = Instant::now() + self.config.lease_wait;
        let mut waiting: Vec<usize> = contended.to_vec();
        let mut served = Vec::new();
        while !waiting.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(LEASE_POLL).await;
            let prefix = self.l2_prefix();
            let entry_keys: Vec<String> = waiting.iter().map(|&i| keys[i].redis_key(&prefix)).collect();
            let tag_keys: Vec<String> = waiting.iter().map(|&i| keys[i].tag().redis_key(&prefix)).collect();
            let Some(Fetched { values, tokens: current, .. }) = l2.mget(&entry_keys, &tag_keys, None).await else {
                break;
            };
            let now = now_ms();
            let mut still = Vec::new();
            for ((j, &i), raw) in waiting.iter().enumerate().zip(values) {
                // The fill must be under the token we saw before waiting,
                // else an invalidation happened meanwhile: load ourselves.
                if current[j] != tokens[i] {
                    continue;
                }
                match self.judge_l2(&keys[i], raw, current[j], now, Look::Recheck) {
                    Some(Judged { value, freshness: Freshness::Fresh, left }) => {
                        self.fill_l1(&keys[i], value.clone(), l1_tokens[i], Deadlines::FromL2(left)).await;
                        served.push((i, value));
                    }
                    _ => still.push(i),
                }
            }
            waiting = still;
        }
        served
    }
}
