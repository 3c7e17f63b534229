//! The tiered read-through cache: L1 (moka, in process) → L2 (Redis, shared)
//! → the source (Postgres, through the loaders) for what is still missing,
//! then fill L2 and L1. One public API: [`Cache::get`] / [`Cache::load`] for reads,
//! [`Cache::invalidate_local`] / [`Cache::invalidate_shared`] for the event
//! pipeline. It knows nothing about SQL: the source is a trait object.
//!
//! Guarantees:
//! * **Fenced fills.** A load takes its tags' tokens (L1 stripes, L2 tokens)
//!   *before* reading the source; a fill is refused when a token moved in
//!   between, and a read ignores entries under an old token. A value read
//!   before a write committed can therefore never be served after that
//!   write's invalidation.
//! * **Single-flight.** Concurrent misses of one key on one instance cause
//!   one load; across instances a Redis lease (`SET NX PX`) lets one load
//!   while the others wait briefly for its fill.
//! * **Bounded staleness.** Entries are fresh for their TTL (±10 % jitter;
//!   shorter for negative results), then served while refreshed in the
//!   background or while the source fails, up to `max_stale`; XFetch
//!   refreshes hot entries early. Never past `ttl + max_stale`, even if
//!   every invalidation were lost.
//! * **Redis is optional.** Absent or failing (circuit open), reads go L1 →
//!   source with no error.
//! * **Public data only.** Keys name only what every caller may see.
//!
//! Where each job lives: this file holds the public API and the read-through
//! load (`load_through`); [`key`] the keys and tags, `l1`/`l2` the two
//! stores, `generations` the L1 stripes, `gate` whether L1 may serve at all,
//! `judge` whether an entry may be served and for how long, `fill` L1 fills
//! and what goes to L2, `single_flight` and `lease` one load per key on an
//! instance and across instances, `refresh` background refreshes, `hot` hot
//! keys.

mod fill;
mod gate;
mod generations;
mod hot;
mod judge;
pub mod key;
mod l1;
mod l2;
mod lease;
mod refresh;
mod single_flight;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::Rng;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

pub use crate::redis::BreakerState;
pub use gate::L1Gate;
pub use generations::Stamp;
pub use key::{CacheKey, CachedValue, Kind, Tag};

use crate::config::CacheConfig;
use crate::redis::RedisClient;
use crate::telemetry::metrics::Metrics;
use fill::Deadlines;
use generations::Generations;
use hot::HotKeys;
use judge::{jitter, Freshness, Judged, L1Counters, L2Entry, Look, Lookup};
use l1::L1;
use l2::{Fetched, Fill, L2};
use refresh::{refresher, Refresh};
use single_flight::Claims;

/// XFetch β: > 1 refreshes earlier, < 1 later.
const XFETCH_BETA: f64 = 1.0;
/// Reviews by id change rarely; they stay fresh this many times longer.
const REVIEW_TTL_FACTOR: u32 = 5;
/// Hot keys loaded on this instance stay in L1 this many times longer.
const HOT_TTL_FACTOR: u32 = 2;
/// How long a request waits for another request's load of the same key.
const SINGLE_FLIGHT_WAIT: Duration = Duration::from_secs(2);
/// How often a contended key is looked up in L2 while its lease holder loads.
const LEASE_POLL: Duration = Duration::from_millis(5);
/// Negative results (unknown ids, empty pages) get this share of the L1
/// budget, in a cache of their own: a flood of random ids evicts only
/// other negative results, never the hot set.
const NEGATIVE_L1_SHARE: u64 = 16;
/// Negative results loaded once recently, remembered (as hashes) so that
/// only one read again is written to L2: a random id is read once.
const NEGATIVE_SEEN: u64 = 100_000;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where missing values come from (the store, through the loaders).
pub trait Source: Send + Sync + 'static {
    type Error: Clone + Send + Sync + 'static;

    /// Loads every key; the result has a value for each (negative values
    /// for ids that match nothing).
    fn load(&self, keys: Vec<CacheKey>) -> BoxFuture<'_, Result<HashMap<CacheKey, CachedValue>, Self::Error>>;

    /// The next loads must see every write up to `watermark` (the WAL
    /// position recorded in L2 with the tokens they were taken under; see
    /// `store/replica.rs`). Zero: nothing recorded.
    fn require(&self, _watermark: u64) {}
}

/// A test hook run between a load and its fills (to inject a concurrent
/// write exactly there).
pub type FillHook = Arc<dyn Fn(Vec<CacheKey>) -> BoxFuture<'static, ()> + Send + Sync>;

/// What a load reads before the source.
#[derive(Clone, Copy)]
enum Through {
    /// L2 values first, then the source for what is still missing.
    L2,
    /// The source only (an early refresh: L2 holds the same ageing value),
    /// still under L2 tokens, which the fills need.
    SourceOnly,
}

pub struct Cache<S: Source> {
    inner: Arc<Inner<S>>,
}

impl<S: Source> Clone for Cache<S> {
    fn clone(&self) -> Self {
        Self { inner: Arc::clone(&self.inner) }
    }
}

struct Inner<S: Source> {
    config: CacheConfig,
    source: S,
    l1: L1,
    /// Negative results only, on a small budget of their own.
    l1_negative: L1,
    /// Hashes of keys recently loaded as negative (the L2 doorkeeper).
    negative_seen: moka::sync::Cache<u64, ()>,
    l2: Option<L2>,
    gens: Generations,
    gate: L1Gate,
    hot: HotKeys,
    l1_counters: L1Counters,
    /// Keys being loaded on this instance; waiters watch for the sender to drop.
    inflight: Mutex<HashMap<CacheKey, watch::Receiver<()>>>,
    /// Keys queued or being refreshed in the background.
    refreshing: Mutex<HashSet<CacheKey>>,
    refresh_tx: mpsc::UnboundedSender<(CacheKey, Refresh)>,
    /// Identifies this instance's leases.
    owner: String,
    /// `{prefix}:e{data epoch}`: the namespace of every L2 key (entries,
    /// tokens, leases, hot keys). A new epoch (after `seed`) is a fresh
    /// namespace: nothing written before it is read after it.
    l2_prefix: RwLock<Arc<str>>,
    epoch: AtomicI64,
    fill_hook: Mutex<Option<FillHook>>,
    metrics: Arc<Metrics>,
}

/// The L2 key of the write-position watermark.
fn watermark_key(prefix: &str) -> String {
    format!("{prefix}:wal")
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl<S: Source> Cache<S> {
    /// Builds the cache and starts its background refresher.
    pub fn new(config: CacheConfig, redis: Option<RedisClient>, source: S, metrics: Arc<Metrics>) -> Self {
        let l2 = redis.map(L2::new);
        let (refresh_tx, refresh_rx) = mpsc::unbounded_channel();
        let l2_prefix = format!("{}:e0", config.prefix).into();
        let inner = Arc::new(Inner {
            l1: l1::build(config.l1_max_bytes - config.l1_max_bytes / NEGATIVE_L1_SHARE, Arc::clone(&metrics)),
            l1_negative: l1::build(config.l1_max_bytes / NEGATIVE_L1_SHARE, Arc::clone(&metrics)),
            negative_seen: moka::sync::Cache::builder()
                .max_capacity(NEGATIVE_SEEN)
                .time_to_live(config.negative_ttl * 6)
                .build(),
            hot: HotKeys::new(config.hot_key_per_sec),
            l1_counters: L1Counters::new(&metrics),
            config,
            source,
            l2,
            gens: Generations::default(),
            gate: L1Gate::default(),
            inflight: Mutex::new(HashMap::new()),
            refreshing: Mutex::new(HashSet::new()),
            refresh_tx,
            owner: format!("{}-{}", std::process::id(), rand::rng().random::<u32>()),
            // Epoch 0 is never a real one (they start at 1): until the real
            // one is known, this instance shares nothing with the others.
            l2_prefix: RwLock::new(l2_prefix),
            epoch: AtomicI64::new(0),
            fill_hook: Mutex::new(None),
            metrics,
        });
        tokio::spawn(refresher(Arc::downgrade(&inner), refresh_rx));
        Self { inner }
    }

    pub fn enabled(&self) -> bool {
        self.inner.config.enabled
    }

    /// Whether this instance may serve from L1 (see [`L1Gate`]).
    pub fn gate(&self) -> &L1Gate {
        &self.inner.gate
    }

    /// L2 state for readiness: `None` when no Redis is configured.
    pub fn l2_state(&self) -> Option<BreakerState> {
        self.inner.l2.as_ref().map(L2::state)
    }

    /// Installs (or removes) the test hook run between loads and fills.
    pub fn set_fill_hook(&self, hook: Option<FillHook>) {
        *self.inner.fill_hook.lock().unwrap_or_else(|e| e.into_inner()) = hook;
    }

    /// The L1 value of `key`, fresh or within its stale window (then a
    /// background refresh is scheduled), with when it stops being fresh (a
    /// stale value: already). Counts the lookup and the key's rate.
    pub async fn get(&self, key: &CacheKey) -> Option<(CachedValue, Instant)> {
        let inner = &self.inner;
        if !inner.config.enabled {
            return None;
        }
        match inner.lookup_l1(key, Look::First).await {
            Lookup::Fresh { value, fresh_until, refresh_early } => {
                if refresh_early {
                    inner.schedule_refresh(key, Refresh::Early);
                }
                Some((value, fresh_until))
            }
            Lookup::Stale(value) => {
                inner.metrics.stale_served.get_or_create(&[("reason", "revalidate")]).inc();
                inner.schedule_refresh(key, Refresh::Stale);
                Some((value, Instant::now()))
            }
            Lookup::Miss => None,
        }
    }

    /// Values of keys that [`Cache::get`] missed: L2, then the source for
    /// what is still missing, filling both caches, one load per key per
    /// instance.
    ///
    /// # Errors
    /// The source failed for a key no stale value can stand in for.
    pub async fn load(&self, keys: &[CacheKey]) -> Result<HashMap<CacheKey, CachedValue>, S::Error> {
        let span = crate::child_span!(
            "cache.l1",
            keys = keys.len(),
            hits = tracing::field::Empty,
            misses = tracing::field::Empty,
        );
        self.load_from_l1(keys, &span).instrument(span.clone()).await
    }

    async fn load_from_l1(
        &self,
        keys: &[CacheKey],
        span: &tracing::Span,
    ) -> Result<HashMap<CacheKey, CachedValue>, S::Error> {
        let inner = &self.inner;
        if !inner.config.enabled {
            return inner.source.load(keys.to_vec()).await;
        }
        let mut out = HashMap::with_capacity(keys.len());
        let mut missing = Vec::new();
        for key in keys {
            // Filled by a concurrent request since `get` missed?
            match inner.lookup_l1(key, Look::Recheck).await {
                Lookup::Fresh { value: v, .. } | Lookup::Stale(v) => {
                    out.insert(key.clone(), v);
                }
                Lookup::Miss => missing.push(key.clone()),
            }
        }
        span.record("hits", out.len());
        span.record("misses", missing.len());
        if missing.is_empty() {
            return Ok(out);
        }
        // Single-flight on this instance: lead the keys nobody is loading,
        // wait for the others.
        let Claims { lead, waits, guard } = inner.claim(missing);
        let mut loaded = if lead.is_empty() { HashMap::new() } else { inner.load_through(&lead, Through::L2).await? };
        drop(guard);
        if !waits.is_empty() {
            inner.metrics.singleflight_waits.inc_by(waits.len() as u64);
            let mut again = Vec::new();
            for (key, mut rx) in waits {
                let _ = tokio::time::timeout(SINGLE_FLIGHT_WAIT, rx.changed()).await;
                match inner.lookup_l1(&key, Look::Recheck).await {
                    Lookup::Fresh { value: v, .. } | Lookup::Stale(v) => {
                        loaded.insert(key, v);
                    }
                    Lookup::Miss => again.push(key),
                }
            }
            if !again.is_empty() {
                loaded.extend(inner.load_through(&again, Through::L2).await?);
            }
        }
        out.extend(loaded);
        Ok(out)
    }

    /// When this instance's L1 value of `key` stops being fresh (`None`:
    /// not in L1, or invalidated). An entry filled from L2 carries the
    /// freshness of the original load, not of the copy.
    pub async fn fresh_until(&self, key: &CacheKey) -> Option<Instant> {
        let inner = &self.inner;
        if !inner.gate.is_open(Instant::now()) {
            return None;
        }
        let entry = match inner.l1.get(key) {
            Some(entry) => entry,
            None => inner.l1_negative.get(key)?,
        };
        (entry.token == inner.gens.current_ref(key.tag_ref())).then_some(entry.fresh_until)
    }

    /// The current L1 token of a tag: taken before a read, it fences
    /// anything derived from that read (see [`Cache::stamps_current`]).
    pub fn token(&self, tag: &Tag) -> u64 {
        self.inner.gens.current(tag)
    }

    /// `deps` (tags with the tokens taken before their reads) as stamps,
    /// for a value checked again and again (a rendered fragment): checked
    /// by [`Cache::stamps_current`] without hashing a tag.
    pub fn stamps(&self, deps: &[(Tag, u64)]) -> Box<[Stamp]> {
        deps.iter().map(|(tag, token)| self.inner.gens.stamp(tag, *token)).collect()
    }

    /// True when no tag of `stamps` was invalidated since its token was taken.
    pub fn stamps_current(&self, stamps: &[Stamp]) -> bool {
        stamps.iter().all(|&stamp| self.inner.gens.stamp_current(stamp))
    }

    /// Invalidations applied on this instance so far: tokens found current
    /// after reading a value stay current while it reads the same
    /// (`Generations::moves`).
    pub fn invalidations(&self) -> u64 {
        self.inner.gens.moves()
    }

    /// The base freshness, jittered, for caches built on this one.
    pub fn ttl(&self) -> Duration {
        jitter(self.inner.config.ttl)
    }

    /// Makes every L1 entry under these tags unusable on this instance.
    pub fn invalidate_local(&self, tags: &[Tag]) {
        for tag in tags {
            self.inner.gens.bump(tag);
        }
    }

    /// Drops all of this instance's L1 (e.g. after missing events).
    pub fn invalidate_all_local(&self) {
        self.inner.gens.bump_all();
    }

    /// Moves to the data epoch `epoch` (read from Postgres): a new L2
    /// namespace, and this instance's L1 dropped. Returns whether it changed.
    pub fn set_epoch(&self, epoch: i64) -> bool {
        let inner = &self.inner;
        if inner.epoch.swap(epoch, Ordering::AcqRel) == epoch {
            return false;
        }
        *inner.l2_prefix.write().unwrap_or_else(|e| e.into_inner()) =
            format!("{}:e{epoch}", inner.config.prefix).into();
        inner.gens.bump_all();
        tracing::info!(epoch, "data epoch changed: new L2 namespace, L1 dropped");
        true
    }

    /// Invalidates these tags in L2 for every instance, with `token` (a
    /// unique, increasing event id). Returns false when Redis did not take it.
    pub async fn invalidate_shared(&self, tags: &[Tag], token: u64) -> bool {
        self.invalidate_shared_after(None, tags, token).await
    }

    /// [`Cache::invalidate_shared`], first recording in L2 that loads must
    /// see every write up to WAL position `lsn` (the watermark must move
    /// before the tokens it covers), in the same round trip where Redis
    /// allows it.
    pub async fn invalidate_shared_after(&self, lsn: Option<u64>, tags: &[Tag], token: u64) -> bool {
        let Some(l2) = &self.inner.l2 else {
            return true;
        };
        let prefix = self.inner.l2_prefix();
        let keys: Vec<String> = tags.iter().map(|t| t.redis_key(&prefix)).collect();
        let watermark = lsn.map(|lsn| (watermark_key(&prefix), lsn));
        let watermark = watermark.as_ref().map(|(key, lsn)| (key.as_str(), *lsn));
        l2.invalidate(watermark, &keys, token, self.inner.token_ttl()).await
    }

    /// Refreshes gauges before a scrape.
    pub async fn export_gauges(&self) {
        let m = &self.inner.metrics;
        let (l1, negative) = (&self.inner.l1, &self.inner.l1_negative);
        // moka counts lazily, in its housekeeping: an idle instance would
        // report what it held at its last busy moment (or 0).
        l1.run_pending_tasks();
        negative.run_pending_tasks();
        m.l1_bytes.set((l1.weighted_size() + negative.weighted_size()) as i64);
        m.l1_entries.set((l1.entry_count() + negative.entry_count()) as i64);
        if let Some(l2) = &self.inner.l2 {
            m.redis_breaker_state.set(l2.state().as_gauge());
        }
    }

    /// Records this instance's hot keys in Redis (for the next start's warm-up).
    pub async fn record_hot_keys(&self) {
        let Some(l2) = &self.inner.l2 else { return };
        let members: Vec<(Vec<u8>, u32)> = self
            .inner
            .hot
            .snapshot()
            .into_iter()
            .filter_map(|(k, n)| Some((postcard::to_stdvec(&k).ok()?, n)))
            .collect();
        l2.record_hot(&self.inner.hot_set_key(), &members).await;
    }

    /// Loads the hottest recorded keys into L1; returns how many.
    pub async fn warm_up(&self, limit: usize) -> usize {
        let Some(l2) = &self.inner.l2 else { return 0 };
        let keys: Vec<CacheKey> = l2
            .hot_members(&self.inner.hot_set_key(), limit)
            .await
            .iter()
            .filter_map(|m| postcard::from_bytes(m).ok())
            .collect();
        let mut warmed = 0;
        for chunk in keys.chunks(200) {
            if let Ok(values) = self.inner.load_through(chunk, Through::L2).await {
                warmed += values.len();
            }
        }
        self.inner.metrics.warmup_keys.inc_by(warmed as u64);
        warmed
    }

    pub async fn ping_l2(&self) -> Option<bool> {
        match &self.inner.l2 {
            Some(l2) => Some(l2.ping().await),
            None => None,
        }
    }
}

impl<S: Source> Inner<S> {
    fn l2_prefix(&self) -> Arc<str> {
        Arc::clone(&self.l2_prefix.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn kind_ttl(&self, key: &CacheKey, value: &CachedValue) -> Duration {
        if value.is_negative() {
            self.config.negative_ttl
        } else if key.kind() == Kind::Review {
            self.config.ttl * REVIEW_TTL_FACTOR
        } else {
            self.config.ttl
        }
    }

    /// Token TTL: longer than any entry can live, so an expired token can
    /// never revive an entry filled under an older one.
    fn token_ttl(&self) -> Duration {
        (self.config.ttl * REVIEW_TTL_FACTOR * HOT_TTL_FACTOR * 2 + self.config.max_stale) * 2
    }

    fn hot_set_key(&self) -> String {
        format!("{}:v{}:hot", self.l2_prefix(), key::SCHEMA_VERSION)
    }

    /// L2, then the source for what is still missing; fills both caches.
    async fn load_through(
        &self,
        keys: &[CacheKey],
        through: Through,
    ) -> Result<HashMap<CacheKey, CachedValue>, S::Error> {
        // Fence tokens first: taken before anything is read.
        let l1_tokens: Vec<u64> = keys.iter().map(|k| self.gens.current_ref(k.tag_ref())).collect();
        let mut found: HashMap<CacheKey, CachedValue> = HashMap::with_capacity(keys.len());
        let mut stale: HashMap<CacheKey, CachedValue> = HashMap::new();
        let mut l2_tokens: Option<Vec<u64>> = None;
        // Taken with the tokens: a load that straddles an epoch change
        // fills the old namespace, which nobody reads any more.
        let prefix = &*self.l2_prefix();

        // The write-position watermark is read with the tokens (L2::mget):
        // a token moved by an event comes with its position.
        let tag_keys = || -> Vec<String> { keys.iter().map(|k| k.tag().redis_key(prefix)).collect() };
        let watermark = watermark_key(prefix);
        if let (Some(l2), Through::SourceOnly) = (&self.l2, through) {
            l2_tokens = l2.tokens(&tag_keys(), &watermark).await.map(|(tokens, watermark)| {
                self.source.require(watermark);
                tokens
            });
        } else if let Some(l2) = &self.l2 {
            let entry_keys: Vec<String> = keys.iter().map(|k| k.redis_key(prefix)).collect();
            let span = crate::child_span!(
                "cache.l2",
                keys = keys.len(),
                hits = tracing::field::Empty,
                stale = tracing::field::Empty,
                misses = tracing::field::Empty,
            );
            let asked = Instant::now();
            let fetched = l2.mget(&entry_keys, &tag_keys(), Some(&watermark)).instrument(span.clone()).await;
            self.metrics.cache_layer_seconds.get_or_create(&[("layer", "l2")]).observe(asked.elapsed().as_secs_f64());
            if let Some(Fetched { values, tokens, watermark }) = fetched {
                self.source.require(watermark);
                let now = now_ms();
                for ((i, key), raw) in keys.iter().enumerate().zip(values) {
                    match self.judge_l2(key, raw, tokens[i], now, Look::First) {
                        Some(Judged { value, freshness: Freshness::Fresh, left }) => {
                            self.fill_l1(key, value.clone(), l1_tokens[i], Deadlines::FromL2(left)).await;
                            found.insert(key.clone(), value);
                        }
                        Some(Judged { value, freshness: Freshness::Stale, .. }) => {
                            stale.insert(key.clone(), value);
                        }
                        None => {}
                    }
                }
                l2_tokens = Some(tokens);
            }
            span.record("hits", found.len());
            span.record("stale", stale.len());
            span.record("misses", keys.len() - found.len() - stale.len());
        } else {
            for key in keys {
                self.metrics.cache("l2", key.kind().label(), "miss");
            }
        }

        let mut remaining: Vec<usize> = (0..keys.len()).filter(|&i| !found.contains_key(&keys[i])).collect();
        let mut leased: Vec<String> = Vec::new();
        if let (Some(l2), Some(tokens), false) = (&self.l2, &l2_tokens, remaining.is_empty()) {
            let lease_keys: Vec<String> = remaining.iter().map(|&i| keys[i].lease_key(prefix)).collect();
            let entry_keys: Vec<String> = remaining.iter().map(|&i| keys[i].redis_key(prefix)).collect();
            if let Some(replies) = l2.lease(&lease_keys, &entry_keys, self.config.lease, &self.owner).await {
                let now = now_ms();
                let mut contended = Vec::new();
                let mut filled_meanwhile = Vec::new();
                for ((&i, lease_key), (taken, raw)) in remaining.iter().zip(lease_keys).zip(replies) {
                    match self.judge_l2(&keys[i], raw, tokens[i], now, Look::Recheck) {
                        // Filled by another instance since our MGET.
                        Some(Judged { value, freshness: Freshness::Fresh, left }) => {
                            self.fill_l1(&keys[i], value.clone(), l1_tokens[i], Deadlines::FromL2(left)).await;
                            found.insert(keys[i].clone(), value);
                            if taken {
                                filled_meanwhile.push(lease_key);
                            }
                        }
                        _ if taken => leased.push(lease_key),
                        _ => contended.push(i),
                    }
                }
                l2.release(&filled_meanwhile).await;
                if !contended.is_empty() {
                    self.metrics.lease_contention.inc_by(contended.len() as u64);
                    let served = self.await_other_instance(l2, keys, &contended, &l1_tokens, tokens).await;
                    for (i, value) in served {
                        found.insert(keys[i].clone(), value);
                    }
                }
                remaining.retain(|i| !found.contains_key(&keys[*i]));
            }
        }
        if remaining.is_empty() {
            return Ok(found);
        }

        let db_keys: Vec<CacheKey> = remaining.iter().map(|&i| keys[i].clone()).collect();
        let started = Instant::now();
        let loaded = self
            .source
            .load(db_keys.clone())
            .instrument(crate::child_span!("cache.source", keys = db_keys.len()))
            .await;
        let load_time = started.elapsed();
        self.metrics.cache_layer_seconds.get_or_create(&[("layer", "db")]).observe(load_time.as_secs_f64());
        for key in &db_keys {
            self.metrics.cache("db", key.kind().label(), "load");
        }
        let values = match loaded {
            Ok(values) => values,
            Err(error) => {
                if let Some(l2) = &self.l2 {
                    l2.release(&leased).await;
                }
                // Serve stale where we have it; fail only for the rest.
                if db_keys.iter().all(|k| stale.contains_key(k)) {
                    self.metrics.stale_served.get_or_create(&[("reason", "db_error")]).inc_by(db_keys.len() as u64);
                    found.extend(stale);
                    return Ok(found);
                }
                return Err(error);
            }
        };

        let hook = self.fill_hook.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(hook) = hook {
            hook(db_keys.clone()).await;
        }

        let mut fills = Vec::new();
        let now = now_ms();
        for &i in &remaining {
            let key = &keys[i];
            let Some(value) = values.get(key) else {
                continue;
            };
            let ttl = jitter(self.kind_ttl(key, value));
            self.fill_l1(key, value.clone(), l1_tokens[i], Deadlines::Loaded { ttl, load_time }).await;
            if let (Some(tokens), true) = (&l2_tokens, self.worth_sharing(key, value)) {
                let entry = L2Entry {
                    token: tokens[i],
                    fresh_until_ms: now + ttl.as_millis() as i64,
                    stale_until_ms: now + (ttl + self.config.max_stale).as_millis() as i64,
                    load_us: u32::try_from(load_time.as_micros()).unwrap_or(u32::MAX),
                    value: value.clone(),
                };
                if let Ok(bytes) = postcard::to_stdvec(&entry) {
                    fills.push(Fill {
                        entry_key: key.redis_key(prefix),
                        tag_key: key.tag().redis_key(prefix),
                        token: tokens[i],
                        ttl: ttl + self.config.max_stale,
                        bytes,
                    });
                }
            }
            found.insert(key.clone(), value.clone());
        }
        if let Some(l2) = &self.l2 {
            // Sent together: one round trip, not two, on the critical path
            // of every miss. Their order does not matter: a lease released
            // before its fill lands costs another instance at most a
            // redundant load, never a wrong entry (the fill is fenced).
            let (stored, ()) = tokio::join!(l2.fill(&fills), l2.release(&leased));
            if let Some(stored) = stored {
                let refused = fills.len().saturating_sub(stored);
                if refused > 0 {
                    self.metrics.fills_refused.get_or_create(&[("layer", "l2")]).inc_by(refused as u64);
                }
            }
        }
        Ok(found)
    }
}
