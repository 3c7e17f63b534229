//! The one Redis client of an instance, shared by the L2 cache and the
//! shared rate-limit budgets: a multiplexed connection to one server, or a
//! cluster connection (the redis crate's: slot routing, `MOVED`/`ASK`
//! redirects, topology refresh after a failover), a timeout on every call,
//! and a circuit breaker ([`breaker`]).
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

use deadpool_redis::redis::aio::{ConnectionLike, MultiplexedConnection};
use deadpool_redis::redis::cluster_async::ClusterConnection;
use deadpool_redis::redis::{self, Cmd, Pipeline, RedisFuture, RedisResult, Value};
use deadpool_redis::{Config as PoolConfig, Runtime};
use tracing::Instrument;

use crate::config::RedisTarget;
use crate::telemetry::metrics::Metrics;
pub use breaker::State as BreakerState;
use breaker::{Breaker, State};

/// Five failures in a row open the circuit for a second.
const BREAKER_THRESHOLD: u32 = 5;
const BREAKER_COOL_DOWN: Duration = Duration::from_secs(1);

/// A Redis URL that cannot be used (one server or a cluster alike).
#[derive(Debug, thiserror::Error)]
#[error("Redis: {0}")]
pub struct SetupError(#[from] deadpool_redis::CreatePoolError);

/// Cheap to clone: one connection and one breaker per instance.
#[derive(Clone)]
pub struct RedisClient {
    inner: Arc<Inner>,
}

/// A connection to one server or to a cluster; cheap to clone (both are
/// handles to a multiplexed connection task).
#[derive(Clone)]
pub enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

enum Pool {
    Single(deadpool_redis::Pool),
    Cluster(deadpool_redis::cluster::Pool),
}

struct Inner {
    pool: Pool,
    conn: Mutex<Option<Conn>>,
    breaker: Breaker,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl RedisClient {
    /// Prepares the client; connects on first use.
    ///
    /// # Errors
    /// A URL deadpool-redis cannot use.
    pub fn new(target: &RedisTarget, timeout: Duration, metrics: Arc<Metrics>) -> Result<Self, SetupError> {
        let mut pool_config = deadpool_redis::PoolConfig::new(4);
        pool_config.timeouts.wait = Some(timeout * 4);
        pool_config.timeouts.create = Some(Duration::from_millis(500));
        let pool = match target {
            RedisTarget::Single(url) => {
                let mut config = PoolConfig::from_url(url);
                config.pool = Some(pool_config);
                Pool::Single(config.create_pool(Some(Runtime::Tokio1))?)
            }
            RedisTarget::Cluster(urls) => {
                // Reads go to the masters: a replica's copy of a token can
                // be behind, and the fence must read the newest one.
                let mut config = deadpool_redis::cluster::Config::from_urls(urls.clone());
                config.pool = Some(pool_config);
                Pool::Cluster(config.create_pool(Some(deadpool_redis::cluster::Runtime::Tokio1))?)
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                conn: Mutex::new(None),
                breaker: Breaker::new(BREAKER_THRESHOLD, BREAKER_COOL_DOWN),
                timeout,
                metrics,
            }),
        })
    }

    /// Whether keys of different hash slots must go in different commands.
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner.pool, Pool::Cluster(_))
    }

    /// How long one call may take.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// Counts a write no replica acknowledged in time.
    pub fn unreplicated(&self) {
        self.inner.metrics.redis_unreplicated.inc();
    }

    pub fn state(&self) -> State {
        self.inner.breaker.state()
    }

    async fn connection(&self) -> Option<Conn> {
        if let Some(conn) = self.inner.conn.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return Some(conn.clone());
        }
        let detached = match &self.inner.pool {
            Pool::Single(pool) => Conn::Single(deadpool_redis::Connection::take(pool.get().await.ok()?)),
            Pool::Cluster(pool) => Conn::Cluster(deadpool_redis::cluster::Connection::take(pool.get().await.ok()?)),
        };
        *self.inner.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(detached.clone());
        Some(detached)
    }

    /// Runs one Redis operation under the breaker and the timeout; `None`
    /// when Redis failed, timed out, or the circuit is open.
    pub async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Option<T>
    where
        F: FnOnce(Conn) -> Fut,
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
                let opened = inner.breaker.failure();
                // A broken or slow connection is replaced on next use. A
                // cluster connection reconnects to its nodes itself (one
                // failing master must not cost the others' connections):
                // replaced only when the circuit opens.
                if !self.is_cluster() || opened {
                    *inner.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                if opened {
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
