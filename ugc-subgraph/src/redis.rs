//! The one Redis client of an instance, shared by the L2 cache and the
//! shared rate-limit budgets: a multiplexed connection, a timeout on every
//! call, and a circuit breaker ([`breaker`]).
//!
//! A failing call is `None` plus a metric, never an error: every user of
//! Redis has a way to go on without it (L1 + Postgres for reads, the local
//! limits for rate limiting). It must never block a request longer than its
//! timeout.
//!
//! The hot path uses one multiplexed connection taken out of the
//! deadpool-redis pool: deadpool-redis PINGs on every checkout, which costs
//! a round trip per call (SPEC §10). The pool only creates connections, the
//! first time and after a failure.

pub mod breaker;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_redis::redis::aio::MultiplexedConnection;
use deadpool_redis::redis::{self, RedisResult};
use deadpool_redis::{Config as PoolConfig, Pool, Runtime};
use tracing::Instrument;

use crate::telemetry::metrics::Metrics;
pub use breaker::State as BreakerState;
use breaker::{Breaker, State};

/// Five failures in a row open the circuit for a second.
const BREAKER_THRESHOLD: u32 = 5;
const BREAKER_COOL_DOWN: Duration = Duration::from_secs(1);

/// Cheap to clone: one connection and one breaker per instance.
#[derive(Clone)]
pub struct RedisClient {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    conn: Mutex<Option<MultiplexedConnection>>,
    breaker: Breaker,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl RedisClient {
    /// Prepares the client; connects on first use.
    ///
    /// # Errors
    /// A URL deadpool-redis cannot use.
    pub fn new(url: &str, timeout: Duration, metrics: Arc<Metrics>) -> Result<Self, deadpool_redis::CreatePoolError> {
        let mut config = PoolConfig::from_url(url);
        let mut pool = deadpool_redis::PoolConfig::new(4);
        pool.timeouts.wait = Some(timeout * 4);
        pool.timeouts.create = Some(Duration::from_millis(500));
        config.pool = Some(pool);
        Ok(Self {
            inner: Arc::new(Inner {
                pool: config.create_pool(Some(Runtime::Tokio1))?,
                conn: Mutex::new(None),
                breaker: Breaker::new(BREAKER_THRESHOLD, BREAKER_COOL_DOWN),
                timeout,
                metrics,
            }),
        })
    }

    pub fn state(&self) -> State {
        self.inner.breaker.state()
    }

    async fn connection(&self) -> Option<MultiplexedConnection> {
        if let Some(conn) = self.inner.conn.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return Some(conn.clone());
        }
        let detached = deadpool_redis::Connection::take(self.inner.pool.get().await.ok()?);
        *self.inner.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(detached.clone());
        Some(detached)
    }

    /// Runs one Redis operation under the breaker and the timeout; `None`
    /// when Redis failed, timed out, or the circuit is open.
    pub async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Option<T>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let inner = &self.inner;
        if !inner.breaker.allow() {
            inner.metrics.redis_breaker_state.set(inner.breaker.state().as_gauge());
            return None;
        }
        inner.metrics.redis_calls.get_or_create(&[("op", op)]).inc();
        let span = crate::telemetry::traces::client_span("redis", op);
        let outcome = tokio::time::timeout(inner.timeout, async {
            match self.connection().await {
                Some(conn) => f(conn).await.map_err(|e| e.to_string()),
                None => Err("no connection".to_owned()),
            }
        })
        .instrument(span.clone())
        .await;
        if !matches!(outcome, Ok(Ok(_))) {
            span.record("otel.status_code", "ERROR");
        }
        match outcome {
            Ok(Ok(value)) => {
                inner.breaker.success();
                inner.metrics.redis_breaker_state.set(0);
                Some(value)
            }
            failed => {
                let reason = match failed {
                    Ok(Err(e)) => e,
                    _ => "timeout".to_owned(),
                };
                inner.metrics.redis_errors.get_or_create(&[("op", op)]).inc();
                // A broken or slow connection is replaced on next use.
                *inner.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
                if inner.breaker.failure() {
                    tracing::warn!(op, reason, "redis failing: circuit open, serving from L1 + Postgres");
                }
                inner.metrics.redis_breaker_state.set(inner.breaker.state().as_gauge());
                None
            }
        }
    }

    pub async fn ping(&self) -> bool {
        self.call("ping", |mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await }).await.is_some()
    }
}
