//! L1: the in-process moka cache, bounded by bytes.
//!
//! An entry carries its generation token (see `generations.rs`), when it
//! stops being fresh, when it stops being servable at all (fresh + the
//! stale window: moka evicts it then), and how long its load took (for
//! XFetch early refresh).

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::notification::RemovalCause;
use moka::sync::Cache;
use moka::Expiry;

use super::key::{CacheKey, CachedValue};
use crate::telemetry::metrics::Metrics;

pub struct L1Entry {
    pub value: CachedValue,
    pub token: u64,
    pub fresh_until: Instant,
    pub stale_until: Instant,
    pub load_time: Duration,
}

struct UntilStale;

impl Expiry<CacheKey, Arc<L1Entry>> for UntilStale {
    fn expire_after_create(&self, _: &CacheKey, entry: &Arc<L1Entry>, now: Instant) -> Option<Duration> {
        Some(entry.stale_until.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        key: &CacheKey,
        entry: &Arc<L1Entry>,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, entry, now)
    }
}

/// The sync cache, not `moka::future`: nothing here awaits (no loader runs
/// inside moka), and the future one's read path (an async state machine
/// per read, its housekeeping awaited) showed in the executed path's
/// profile. foldhash, not SipHash: every field a query resolves reads here.
pub type L1 = Cache<CacheKey, Arc<L1Entry>, foldhash::fast::RandomState>;

pub fn build(max_bytes: u64, metrics: Arc<Metrics>) -> L1 {
    Cache::builder()
        .max_capacity(max_bytes)
        .weigher(|key: &CacheKey, entry: &Arc<L1Entry>| {
            let key_bytes = match key {
                CacheKey::Review(_) => 16,
                CacheKey::Rating(id) | CacheKey::AuthorCount(id) => 32 + id.len(),
                CacheKey::Page(p) => {
                    let (crate::domain::cursor::ListScope::Offer(id) | crate::domain::cursor::ListScope::Author(id)) =
                        &p.scope;
                    64 + id.len()
                }
            };
            // Entry bookkeeping (moka's own and ours) on top of the value.
            entry.value.weight().saturating_add(key_bytes as u32 + 128)
        })
        .expire_after(UntilStale)
        .eviction_listener(move |_, _, cause| {
            if cause == RemovalCause::Size {
                metrics.l1_evictions.inc();
            }
        })
        .build_with_hasher(foldhash::fast::RandomState::default())
}
