//! Rate limits (SPEC §6): one [`Limit`] per quota — reads per client,
//! writes per client, writes per user, events per token.
//!
//! Each limit is enforced twice, cheapest first: per instance by `governor`
//! (through tower-governor for the quotas known before the body is read,
//! directly for those known only after parsing), then across instances by
//! the [`shared::SharedBudget`] in Redis. When Redis is unavailable the
//! per-instance limit alone applies: a Redis outage never refuses a read.
//!
//! This module decides; `http` turns a [`Refusal`] into a 429. It must never
//! do per-request work beyond a local check while a client is within its
//! chunk of the shared budget.

pub mod shared;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::DefaultKeyedRateLimiter;

use crate::config::{Config, Quota};
use crate::redis::RedisClient;
use crate::telemetry::metrics::Metrics;
use shared::{SharedBudget, Verdict};

/// Why a request was refused, with what a client needs to know.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The quota's name (`read`, `write`, `user_write`, `events`).
    pub limit: &'static str,
    /// The settings that configure it (for the message).
    pub setting: &'static str,
    pub quota: Quota,
    pub retry_after: Duration,
}

impl Refusal {
    /// Whole seconds, at least one (what `Retry-After` can say).
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

/// One quota.
pub struct Limit {
    pub name: &'static str,
    pub setting: &'static str,
    pub quota: Quota,
    local: DefaultKeyedRateLimiter<String>,
    shared: Option<SharedBudget>,
    metrics: Arc<Metrics>,
}

impl Limit {
    fn new(
        name: &'static str,
        setting: &'static str,
        quota: Quota,
        chunk: u32,
        shared: Option<(&str, &RedisClient)>,
        metrics: &Arc<Metrics>,
    ) -> Self {
        Self {
            name,
            setting,
            quota,
            local: governor::RateLimiter::keyed(governor_quota(quota)),
            shared: shared.map(|(prefix, redis)| {
                SharedBudget::new(name, quota, chunk, prefix, redis.clone(), Arc::clone(metrics))
            }),
            metrics: Arc::clone(metrics),
        }
    }

    /// The per-instance limit, then the shared budget.
    ///
    /// # Errors
    /// The client is over the quota.
    pub async fn check(&self, key: &str) -> Result<(), Refusal> {
        if let Err(not_until) = self.local.check_key(&key.to_owned()) {
            return Err(self.refuse("local", not_until.wait_time_from(DefaultClock::default().now())));
        }
        self.check_shared(key).await
    }

    /// The shared budget only (the per-instance limit ran as a tower layer).
    ///
    /// # Errors
    /// The client is over the quota across all instances.
    pub async fn check_shared(&self, key: &str) -> Result<(), Refusal> {
        let Some(shared) = &self.shared else { return Ok(()) };
        match shared.take(key).await {
            Verdict::Allowed | Verdict::Unavailable => Ok(()),
            Verdict::Denied(wait) => Err(self.refuse("shared", wait)),
        }
    }

    /// Counts a refusal by the tower-governor layer of this quota.
    pub fn refused_locally(&self, wait: Duration) -> Refusal {
        self.refuse("local", wait)
    }

    fn refuse(&self, decided_by: &'static str, retry_after: Duration) -> Refusal {
        self.metrics.rate_limited.get_or_create(&[("quota", self.name), ("decided_by", decided_by)]).inc();
        Refusal { limit: self.name, setting: self.setting, quota: self.quota, retry_after }
    }

    /// Forgets idle clients of the per-instance limiter (bounded memory).
    fn forget_idle(&self) {
        self.local.retain_recent();
        self.local.shrink_to_fit();
    }
}

/// `governor`'s form of a quota.
pub fn governor_quota(quota: Quota) -> governor::Quota {
    let per_sec = NonZeroU32::new(quota.per_sec).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(quota.burst).unwrap_or(NonZeroU32::MIN);
    governor::Quota::per_second(per_sec).allow_burst(burst)
}

/// Every quota of the service.
pub struct RateLimits {
    /// `UGC_RATE_LIMIT=off`: nothing is limited.
    pub enabled: bool,
    pub read: Arc<Limit>,
    pub write: Arc<Limit>,
    pub user_write: Arc<Limit>,
    pub events: Arc<Limit>,
}

impl RateLimits {
    /// Shared budgets in Redis when `redis` is given, per instance otherwise.
    pub fn new(config: &Config, redis: Option<&RedisClient>, metrics: &Arc<Metrics>) -> Self {
        let c = &config.rate_limit;
        let shared = redis.map(|r| (config.cache.prefix.as_str(), r));
        let limit = |name, setting, quota, chunk| Arc::new(Limit::new(name, setting, quota, chunk, shared, metrics));
        Self {
            enabled: c.enabled,
            read: limit("read", "UGC_RATE_LIMIT_READ_PER_SEC / _BURST", c.read, SharedBudget::read_chunk(c.read)),
            // Writes ask Redis every time: they are few, and exactness matters more.
            write: limit("write", "UGC_RATE_LIMIT_WRITE_PER_SEC / _BURST", c.write, 1),
            user_write: limit("user_write", "UGC_RATE_LIMIT_USER_WRITE_PER_SEC / _BURST", c.user_write, 1),
            events: limit(
                "events",
                "UGC_RATE_LIMIT_EVENTS_PER_SEC / _BURST",
                c.events,
                SharedBudget::read_chunk(c.events),
            ),
        }
    }

    /// A mutation: per client address, then per user.
    ///
    /// # Errors
    /// Either quota is exhausted.
    pub async fn check_write(&self, client: &str, user: Option<&str>) -> Result<(), Refusal> {
        if !self.enabled {
            return Ok(());
        }
        self.write.check(client).await?;
        match user {
            Some(user) => self.user_write.check(user).await,
            None => Ok(()),
        }
    }

    /// Drops idle clients' state; called periodically.
    pub fn forget_idle(&self) {
        for limit in [&self.read, &self.write, &self.user_write, &self.events] {
            limit.forget_idle();
        }
    }
}

/// A stable 64-bit FNV-1a hash: identifies a bearer token in a limiter key
/// without the token itself ever being stored or shown.
pub fn fingerprint(secret: &str) -> String {
    let hash = secret.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_stable_and_distinct() {
        assert_eq!(fingerprint("abc"), fingerprint("abc"));
        assert_ne!(fingerprint("abc"), fingerprint("abd"));
        assert_eq!(fingerprint("").len(), 16);
    }

    #[test]
    fn read_chunks_keep_the_loss_small() {
        assert_eq!(SharedBudget::read_chunk(Quota { per_sec: 200, burst: 400 }), 10);
        assert_eq!(SharedBudget::read_chunk(Quota { per_sec: 100, burst: 20 }), 2);
        assert_eq!(SharedBudget::read_chunk(Quota { per_sec: 1, burst: 1 }), 1);
    }

    #[tokio::test]
    async fn the_local_limit_allows_the_burst_then_refuses_with_a_wait() {
        let metrics = Arc::new(Metrics::new());
        let limit = Limit::new("write", "X", Quota { per_sec: 1, burst: 3 }, 1, None, &metrics);
        for _ in 0..3 {
            assert!(limit.check("a").await.is_ok());
        }
        let refusal = limit.check("a").await.unwrap_err();
        assert_eq!(refusal.limit, "write");
        assert_eq!(refusal.retry_after_secs(), 1);
        assert!(limit.check("b").await.is_ok(), "clients have separate budgets");
    }
}
