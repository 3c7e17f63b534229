//! A budget shared by every instance: GCRA in Redis (one atomic Lua script
//! per grant), spent locally in chunks.
//!
//! The cached read path must not pay a Redis round trip per request, so an
//! instance takes up to `chunk` tokens of a client's budget at once and
//! spends them locally; it asks again only when they are spent (or older
//! than [`CHUNK_LIFETIME`]). Tokens are taken from the global budget before
//! they are spent, so the instances together never admit more than the
//! quota; what they may lose is the unspent rest of a chunk (at most one
//! chunk per instance per lifetime, a few percent of the quota by the
//! choice of `chunk`). A refusal is remembered locally until the budget
//! refills, so a client over its limit costs no Redis call either.
//!
//! Hand-written: the Redis rate-limit crates (e.g. redis-cell, a Redis
//! module) either need a server module or check per request; none spends a
//! shared budget in local chunks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_redis::redis;

use crate::config::Quota;
use crate::redis::RedisClient;
use crate::telemetry::metrics::Metrics;

/// Unspent tokens are given up after this long: an instance a client has
/// left must not hold its budget back for long. (They were taken from the
/// budget when granted, so holding them never lets a client exceed it.)
pub const CHUNK_LIFETIME: Duration = Duration::from_secs(5);
/// Clients remembered per instance; beyond them the least used are
/// forgotten (a forgotten slot only gives up its unspent chunk).
const MAX_CLIENTS: u64 = 100_000;

type Hasher = foldhash::fast::RandomState;

/// GCRA with a token-bucket reading: the bucket holds `burst` tokens and
/// refills one per `interval`; its state is the theoretical arrival time
/// (TAT) of the next token. Grants up to ARGV[3] tokens, as many as there
/// are. Redis's own clock, so instances' clocks do not matter.
/// KEYS[1]: the client's key. ARGV: interval µs, burst, wanted.
/// Returns {granted, µs until one token is available when none was granted}.
const TAKE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2]) * interval
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local room = math.floor((now + capacity - tat) / interval)
local granted = math.min(tonumber(ARGV[3]), room)
if granted <= 0 then
  return {0, tat + interval - capacity - now}
end
tat = tat + granted * interval
redis.call('SET', KEYS[1], tat, 'PX', math.floor((tat - now) / 1000) + 1000)
return {granted, 0}
";

/// What the shared budget says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Over the quota; the budget has a token again after this long.
    Denied(Duration),
    /// Redis could not be asked: the caller falls back to its local limit.
    Unavailable,
}

/// One client's chunk on this instance.
#[derive(Default)]
struct Slot {
    tokens: u32,
    valid_until: Option<Instant>,
    denied_until: Option<Instant>,
}

pub struct SharedBudget {
    quota: Quota,
    chunk: u32,
    key_prefix: String,
    redis: RedisClient,
    script: redis::Script,
    /// quick_cache, not moka: this is looked up on every request, and
    /// moka's per-read bookkeeping (each read logged for its idle timer
    /// and LRU) was 3.4 % of a fragment answer's CPU (perf, 20-offer
    /// batches). A slot needs no idle timer: its tokens expire by
    /// `valid_until`, and eviction by use bounds the memory.
    slots: quick_cache::sync::Cache<String, Arc<tokio::sync::Mutex<Slot>>, quick_cache::UnitWeighter, Hasher>,
    metrics: Arc<Metrics>,
}

impl SharedBudget {
    /// `chunk`: tokens taken per Redis call (1 = ask for every request).
    pub fn new(
        name: &'static str,
        quota: Quota,
        chunk: u32,
        prefix: &str,
        redis: RedisClient,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            quota,
            chunk: chunk.clamp(1, quota.burst),
            key_prefix: format!("{prefix}:rl:{name}:"),
            redis,
            script: redis::Script::new(TAKE),
            // Sized for a few thousand clients at first; grows to the bound.
            slots: quick_cache::sync::Cache::with(
                4_096,
                MAX_CLIENTS,
                quick_cache::UnitWeighter,
                Hasher::default(),
                Default::default(),
            ),
            metrics,
        }
    }

    /// The chunk that keeps the loss to about 5 % of the quota: a
    /// twentieth of a second's tokens, at most a tenth of the burst.
    pub fn read_chunk(quota: Quota) -> u32 {
        (quota.per_sec / 20).min(quota.burst / 10).max(1)
    }

    /// Spends one token of `client`'s budget.
    pub async fn take(&self, client: &str) -> Verdict {
        let slot = self
            .slots
            .get_or_insert_with(client, || Ok::<_, std::convert::Infallible>(Arc::default()))
            .unwrap_or_else(|never| match never {});
        // Held across the Redis call: concurrent requests of one client on
        // one instance wait for that call instead of each making one.
        let mut slot = slot.lock().await;
        let now = Instant::now();
        if let Some(until) = slot.denied_until {
            if now < until {
                return Verdict::Denied(until - now);
            }
            slot.denied_until = None;
        }
        if slot.tokens > 0 && slot.valid_until.is_some_and(|v| now < v) {
            slot.tokens -= 1;
            return Verdict::Allowed;
        }
        match self.grant(client, self.chunk).await {
            None => {
                self.metrics.rate_limit_budget_calls.get_or_create(&[("outcome", "unavailable")]).inc();
                Verdict::Unavailable
            }
            Some((0, wait)) => {
                self.metrics.rate_limit_budget_calls.get_or_create(&[("outcome", "denied")]).inc();
                slot.denied_until = Some(now + wait);
                Verdict::Denied(wait)
            }
            Some((granted, _)) => {
                self.metrics.rate_limit_budget_calls.get_or_create(&[("outcome", "granted")]).inc();
                slot.tokens = granted - 1;
                slot.valid_until = Some(now + CHUNK_LIFETIME);
                Verdict::Allowed
            }
        }
    }

    /// Up to `wanted` tokens from Redis: `(granted, wait when none)`.
    async fn grant(&self, client: &str, wanted: u32) -> Option<(u32, Duration)> {
        let key = format!("{}{client}", self.key_prefix);
        let interval_us = (1_000_000 / u64::from(self.quota.per_sec)).max(1);
        let (granted, wait_us): (i64, i64) = self
            .redis
            .call("rate_limit", |mut c| async move {
                self.script.key(&key).arg(interval_us).arg(self.quota.burst).arg(wanted).invoke_async(&mut c).await
            })
            .await?;
        let granted = u32::try_from(granted).unwrap_or(0);
        Some((granted, Duration::from_micros(u64::try_from(wait_us).unwrap_or(0).max(1))))
    }
}
