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

mod gate;
mod generations;
mod hot;
pub mod key;
mod l1;
mod l2;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

pub use crate::redis::BreakerState;
pub use gate::L1Gate;
pub use key::{CacheKey, CachedValue, Kind, Tag};

use crate::config::CacheConfig;
use crate::redis::RedisClient;
use crate::telemetry::metrics::Metrics;
use generations::Generations;
use hot::HotKeys;
use l1::{L1Entry, L1};
use l2::{Fill, L2};

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

/// How an L2 entry is stored: the value plus what every instance needs to
/// judge it (token, freshness, how long it took to load).
#[derive(Serialize, Deserialize)]
struct L2Entry {
    token: u64,
    fresh_until_ms: i64,
    stale_until_ms: i64,
    load_us: u32,
    value: CachedValue,
}

enum Lookup {
    Fresh(CachedValue, bool),
    Stale(CachedValue),
    Miss,
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
    /// Keys being loaded on this instance; waiters watch for the sender to drop.
    inflight: Mutex<HashMap<CacheKey, watch::Receiver<()>>>,
    /// Keys queued or being refreshed in the background.
    refreshing: Mutex<HashSet<CacheKey>>,
    refresh_tx: mpsc::UnboundedSender<(CacheKey, bool)>,
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
    /// background refresh is scheduled). Counts the lookup and the key's rate.
    pub async fn get(&self, key: &CacheKey) -> Option<CachedValue> {
        let inner = &self.inner;
        if !inner.config.enabled {
            return None;
        }
        match inner.lookup_l1(key, true).await {
            Lookup::Fresh(value, refresh_early) => {
                if refresh_early {
                    inner.schedule_refresh(key, "early");
                }
                Some(value)
            }
            Lookup::Stale(value) => {
                inner.metrics.stale_served.get_or_create(&[("reason", "revalidate")]).inc();
                inner.schedule_refresh(key, "stale");
                Some(value)
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
        let inner = &self.inner;
        if !inner.config.enabled {
            return inner.source.load(keys.to_vec()).await;
        }
        let mut out = HashMap::with_capacity(keys.len());
        let mut missing = Vec::new();
        for key in keys {
            // Filled by a concurrent request since `get` missed?
            match inner.lookup_l1(key, false).await {
                Lookup::Fresh(v, _) | Lookup::Stale(v) => {
                    out.insert(key.clone(), v);
                }
                Lookup::Miss => missing.push(key.clone()),
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        // Single-flight on this instance: lead the keys nobody is loading,
        // wait for the others.
        let (lead, waits, guard) = inner.claim(missing);
        let mut loaded = if lead.is_empty() { HashMap::new() } else { inner.load_through(&lead, false).await? };
        drop(guard);
        if !waits.is_empty() {
            inner.metrics.singleflight_waits.inc_by(waits.len() as u64);
            let mut again = Vec::new();
            for (key, mut rx) in waits {
                let _ = tokio::time::timeout(SINGLE_FLIGHT_WAIT, rx.changed()).await;
                match inner.lookup_l1(&key, false).await {
                    Lookup::Fresh(v, _) | Lookup::Stale(v) => {
                        loaded.insert(key, v);
                    }
                    Lookup::Miss => again.push(key),
                }
            }
            if !again.is_empty() {
                loaded.extend(inner.load_through(&again, false).await?);
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
        let entry = match inner.l1.get(key).await {
            Some(entry) => entry,
            None => inner.l1_negative.get(key).await?,
        };
        (entry.token == inner.gens.current(&key.tag())).then_some(entry.fresh_until)
    }

    /// The current L1 token of a tag: taken before a read, it fences
    /// anything derived from that read (see [`Cache::tokens_current`]).
    pub fn token(&self, tag: &Tag) -> u64 {
        self.inner.gens.current(tag)
    }

    /// True when no tag was invalidated since its token was taken.
    pub fn tokens_current(&self, deps: &[(Tag, u64)]) -> bool {
        deps.iter().all(|(tag, token)| self.inner.gens.current(tag) == *token)
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
        let Some(l2) = &self.inner.l2 else {
            return true;
        };
        let prefix = self.inner.l2_prefix();
        let keys: Vec<String> = tags.iter().map(|t| t.redis_key(&prefix)).collect();
        l2.invalidate(&keys, token, self.inner.token_ttl()).await
    }

    /// Records in L2 that loads must see every write up to WAL position
    /// `lsn` (set before the tokens it covers move). Returns false when Redis
    /// did not take it.
    pub async fn advance_watermark(&self, lsn: u64) -> bool {
        let Some(l2) = &self.inner.l2 else { return true };
        l2.invalidate(&[watermark_key(&self.inner.l2_prefix())], lsn, self.inner.token_ttl()).await
    }

    /// Refreshes gauges before a scrape.
    pub fn export_gauges(&self) {
        let m = &self.inner.metrics;
        let (l1, negative) = (&self.inner.l1, &self.inner.l1_negative);
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
            if let Ok(values) = self.inner.load_through(chunk, false).await {
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

/// Releases single-flight claims when the leader is done (or fails).
struct ClaimGuard<'a, S: Source> {
    inner: &'a Inner<S>,
    keys: Vec<CacheKey>,
    _senders: Vec<watch::Sender<()>>,
}

impl<S: Source> Drop for ClaimGuard<'_, S> {
    fn drop(&mut self) {
        let mut inflight = self.inner.inflight.lock().unwrap_or_else(|e| e.into_inner());
        for key in &self.keys {
            inflight.remove(key);
        }
        // Dropping the senders (after this) wakes every waiter.
    }
}

type Claims<'a, S> = (Vec<CacheKey>, Vec<(CacheKey, watch::Receiver<()>)>, ClaimGuard<'a, S>);

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

    /// `count`: this is the request's first look (count it and the key's
    /// rate); a re-check after a miss counts nothing.
    async fn lookup_l1(&self, key: &CacheKey, count: bool) -> Lookup {
        let kind = key.kind().label();
        let record = |result| {
            if count {
                self.metrics.cache("l1", kind, result);
            }
        };
        if count && self.hot.touch(key).1 {
            self.metrics.hot_keys.inc();
            tracing::info!(kind, "hot key detected; kept longer in L1");
        }
        let now = Instant::now();
        if !self.gate.is_open(now) {
            // Possibly behind the invalidation stream: L2 and the source
            // are what a writer made current before answering.
            record("fenced");
            return Lookup::Miss;
        }
        let entry = match self.l1.get(key).await {
            Some(entry) => Some(entry),
            None => self.l1_negative.get(key).await,
        };
        let Some(entry) = entry else {
            record("miss");
            return Lookup::Miss;
        };
        if entry.token != self.gens.current(&key.tag()) {
            // Invalidated since it was loaded.
            record("miss");
            return Lookup::Miss;
        }
        if now < entry.fresh_until {
            record("hit");
            let draw: f64 = rand::rng().random_range(f64::MIN_POSITIVE..1.0);
            let early = xfetch_early(entry.load_time, entry.fresh_until - now, draw);
            return Lookup::Fresh(entry.value.clone(), early);
        }
        record("stale");
        Lookup::Stale(entry.value.clone())
    }

    fn claim(&self, keys: Vec<CacheKey>) -> Claims<'_, S> {
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        let (mut lead, mut waits, mut senders) = (Vec::new(), Vec::new(), Vec::new());
        for key in keys {
            match inflight.get(&key) {
                Some(rx) => waits.push((key, rx.clone())),
                None => {
                    let (tx, rx) = watch::channel(());
                    inflight.insert(key.clone(), rx);
                    senders.push(tx);
                    lead.push(key);
                }
            }
        }
        let guard = ClaimGuard { inner: self, keys: lead.clone(), _senders: senders };
        (lead, waits, guard)
    }

    /// L2, then the source for what is still missing; fills both caches.
    /// `force` skips reading L2 values (an early refresh wants the source,
    /// not the entry it is refreshing), but still takes L2 tokens.
    async fn load_through(&self, keys: &[CacheKey], force: bool) -> Result<HashMap<CacheKey, CachedValue>, S::Error> {
        // Fence tokens first: taken before anything is read.
        let l1_tokens: Vec<u64> = keys.iter().map(|k| self.gens.current(&k.tag())).collect();
        let mut found: HashMap<CacheKey, CachedValue> = HashMap::with_capacity(keys.len());
        let mut stale: HashMap<CacheKey, CachedValue> = HashMap::new();
        let mut l2_tokens: Option<Vec<u64>> = None;
        // Taken with the tokens: a load that straddles an epoch change
        // fills the old namespace, which nobody reads any more.
        let prefix = &*self.l2_prefix();

        // The write-position watermark is read with the tokens, in the same
        // command: a token moved by an event comes with its position.
        let with_watermark = |keys: &[CacheKey]| -> Vec<String> {
            keys.iter().map(|k| k.tag().redis_key(prefix)).chain([watermark_key(prefix)]).collect()
        };
        let take_watermark = |tokens: Option<Vec<u64>>| {
            tokens.map(|mut tokens| {
                self.source.require(tokens.pop().unwrap_or(0));
                tokens
            })
        };
        if let (Some(l2), true) = (&self.l2, force) {
            l2_tokens = take_watermark(l2.tokens(&with_watermark(keys)).await);
        } else if let Some(l2) = &self.l2 {
            let entry_keys: Vec<String> = keys.iter().map(|k| k.redis_key(prefix)).collect();
            let fetched = l2.mget(&entry_keys, &with_watermark(keys)).await;
            if let Some((values, tokens)) = fetched.map(|(values, tokens)| (values, take_watermark(Some(tokens)))) {
                let tokens = tokens.unwrap_or_default();
                let now = now_ms();
                for ((i, key), raw) in keys.iter().enumerate().zip(values) {
                    match self.judge_l2(key, raw, tokens[i], now, true) {
                        Some((value, true, left)) => {
                            self.fill_l1(key, value.clone(), l1_tokens[i], None, Some(left)).await;
                            found.insert(key.clone(), value);
                        }
                        Some((value, false, _)) => {
                            stale.insert(key.clone(), value);
                        }
                        None => {}
                    }
                }
                l2_tokens = Some(tokens);
            }
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
                    match self.judge_l2(&keys[i], raw, tokens[i], now, false) {
                        // Filled by another instance since our MGET.
                        Some((value, true, left)) => {
                            self.fill_l1(&keys[i], value.clone(), l1_tokens[i], None, Some(left)).await;
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
        let loaded = self.source.load(db_keys.clone()).await;
        let load_time = started.elapsed();
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
            self.fill_l1(key, value.clone(), l1_tokens[i], Some((ttl, load_time)), None).await;
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
            if let Some(stored) = l2.fill(&fills).await {
                let refused = fills.len().saturating_sub(stored);
                if refused > 0 {
                    self.metrics.fills_refused.get_or_create(&[("layer", "l2")]).inc_by(refused as u64);
                }
            }
            l2.release(&leased).await;
        }
        Ok(found)
    }

    /// Decodes an L2 value and judges it: `Some((value, fresh))` when its
    /// token is current and it is still servable.
    /// `count`: the first look of this load (re-checks count nothing).
    fn judge_l2(
        &self,
        key: &CacheKey,
        raw: Option<Vec<u8>>,
        token: u64,
        now: i64,
        count: bool,
    ) -> Option<(CachedValue, bool, (Duration, Duration))> {
        let kind = key.kind().label();
        let record = |result| {
            if count {
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
        let fresh = now < entry.fresh_until_ms;
        record(if fresh { "hit" } else { "stale" });
        let left = |until: i64| Duration::from_millis(u64::try_from(until - now).unwrap_or(0));
        Some((entry.value, fresh, (left(entry.fresh_until_ms), left(entry.stale_until_ms))))
    }

    /// Another instance holds the lease of these keys: poll L2 for its fill
    /// for up to `lease_wait`.
    async fn await_other_instance(
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
            let Some((values, current)) = l2.mget(&entry_keys, &tag_keys).await else {
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
                match self.judge_l2(&keys[i], raw, current[j], now, false) {
                    Some((value, true, left)) => {
                        self.fill_l1(&keys[i], value.clone(), l1_tokens[i], None, Some(left)).await;
                        served.push((i, value));
                    }
                    _ => still.push(i),
                }
            }
            waiting = still;
        }
        served
    }

    /// Inserts into L1 unless the tag's stripe moved since `token` was taken.
    /// `fresh` is (ttl, load time) for a value just loaded from the source;
    /// `None` for a value promoted from L2, which keeps the L2 entry's own
    /// deadlines (`l2_left`: time left fresh, time left servable): an entry
    /// never outlives, in any layer, the bound counted from its source read.
    async fn fill_l1(
        &self,
        key: &CacheKey,
        value: CachedValue,
        token: u64,
        fresh: Option<(Duration, Duration)>,
        l2_left: Option<(Duration, Duration)>,
    ) {
        if self.gens.current(&key.tag()) != token {
            self.metrics.fills_refused.get_or_create(&[("layer", "l1")]).inc();
            return;
        }
        let now = Instant::now();
        let (fresh_for, stale_for, load_time) = match (fresh, l2_left) {
            (Some((ttl, load_time)), _) => {
                let ttl = if self.hot.is_hot(key) { ttl * HOT_TTL_FACTOR } else { ttl };
                (ttl, ttl + self.config.max_stale, load_time)
            }
            (None, Some((fresh_left, stale_left))) => (fresh_left, stale_left, Duration::ZERO),
            (None, None) => return,
        };
        // Each key lives in one of the two caches: the one its value belongs
        // to (a stale entry in the other would shadow it).
        let (home, other) =
            if value.is_negative() { (&self.l1_negative, &self.l1) } else { (&self.l1, &self.l1_negative) };
        let entry = L1Entry { value, token, fresh_until: now + fresh_for, stale_until: now + stale_for, load_time };
        other.invalidate(key).await;
        home.insert(key.clone(), Arc::new(entry)).await;
    }

    /// Positive values always go to L2; a negative one only when the key was
    /// loaded as negative before, recently: an id read once (a random-id
    /// scan) never reaches Redis.
    fn worth_sharing(&self, key: &CacheKey, value: &CachedValue) -> bool {
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

    fn schedule_refresh(&self, key: &CacheKey, reason: &'static str) {
        let fresh = self.refreshing.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone());
        if fresh {
            self.metrics.refreshes.get_or_create(&[("trigger", reason)]).inc();
            // An early refresh goes to the source: L2 holds the same ageing value.
            let _ = self.refresh_tx.send((key.clone(), reason == "early"));
        }
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
fn jitter(ttl: Duration) -> Duration {
    ttl.mul_f64(rand::rng().random_range(0.9..1.1))
}

/// Background refresher: batches queued keys and reloads them through L2
/// and the source (skipping L1, which holds the old value).
async fn refresher<S: Source>(inner: Weak<Inner<S>>, mut rx: mpsc::UnboundedReceiver<(CacheKey, bool)>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 200 {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        for force in [false, true] {
            let keys: Vec<CacheKey> = batch.iter().filter(|(_, f)| *f == force).map(|(k, _)| k.clone()).collect();
            if !keys.is_empty() && inner.load_through(&keys, force).await.is_err() {
                tracing::debug!(keys = keys.len(), "background refresh failed; stale values stay until max_stale");
            }
        }
        let mut refreshing = inner.refreshing.lock().unwrap_or_else(|e| e.into_inner());
        for (key, _) in &batch {
            refreshing.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
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
