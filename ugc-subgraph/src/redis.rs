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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_redis::redis::aio::{ConnectionLike, MultiplexedConnection};
use deadpool_redis::redis::cluster::{ClusterClient, ClusterClientBuilder};
use deadpool_redis::redis::cluster_async::ClusterConnection;
use deadpool_redis::redis::{self, Cmd, Pipeline, RedisFuture, RedisResult, Value};
use deadpool_redis::{Config as PoolConfig, Runtime};
use tokio::sync::Notify;
use tracing::Instrument;

use crate::config::RedisTarget;
use crate::telemetry::metrics::Metrics;
pub use breaker::State as BreakerState;
use breaker::{Breaker, State};

/// Five failures in a row open the circuit for a second.
const BREAKER_THRESHOLD: u32 = 5;
const BREAKER_COOL_DOWN: Duration = Duration::from_secs(1);

/// A Redis URL that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("REDIS_URL: {0}")]
    Single(#[from] deadpool_redis::CreatePoolError),
    #[error("REDIS_CLUSTER_URLS: {0}")]
    Cluster(#[source] redis::RedisError),
}

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
    /// The redis crate's cluster client, not deadpool-redis's cluster pool:
    /// that one takes no retry settings, and the crate's default (16
    /// retries, exponential back-off) holds a batch for seconds on a
    /// `TRYAGAIN` while a slot migrates. One connection serves all calls,
    /// as for one server; the client creates it again after a failure.
    Cluster(Box<ClusterClient>),
}

/// Redirects (`ASK`, then `MOVED`) each use a retry; a `TRYAGAIN` (a
/// multi-key command on a slot half-migrated) is retried once, 1–10 ms
/// later, then it is a miss like any failure.
const CLUSTER_RETRIES: u32 = 3;

/// A cluster connection is built again at most this often while calls fail.
const CLUSTER_RECONNECT_EVERY: Duration = Duration::from_secs(1);
/// How long building one (connecting to the nodes, reading the slots) may take.
const CLUSTER_BUILD_TIMEOUT: Duration = Duration::from_secs(5);

struct Inner {
    pool: Pool,
    conn: Mutex<Option<Conn>>,
    /// When a cluster connection was last asked for, and whether it is
    /// being built now; waiters are woken when the build ends.
    rebuilt_at: Mutex<Option<Instant>>,
    rebuilding: AtomicBool,
    rebuilt: Notify,
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
        let pool = match target {
            RedisTarget::Single(url) => {
                let mut config = PoolConfig::from_url(url);
                let mut pool = deadpool_redis::PoolConfig::new(4);
                pool.timeouts.wait = Some(timeout * 4);
                pool.timeouts.create = Some(Duration::from_millis(500));
                config.pool = Some(pool);
                Pool::Single(config.create_pool(Some(Runtime::Tokio1))?)
            }
            // Reads go to the masters (the builder's default): a replica's
            // copy of a token can be behind, and the fence must read the
            // newest one.
            RedisTarget::Cluster(urls) => Pool::Cluster(Box::new(
                ClusterClientBuilder::new(urls.iter().map(String::as_str))
                    .retries(CLUSTER_RETRIES)
                    .min_retry_wait(1)
                    .max_retry_wait(10)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .build()
                    .map_err(SetupError::Cluster)?,
            )),
        };
        Ok(Self::on(pool, timeout, metrics))
    }

    /// A client of the same Redis on a connection of its own, with its own
    /// breaker: for calls that block their connection (`WAIT`), which on
    /// the shared multiplexed one would hold up every read queued behind.
    pub fn separate(&self) -> Self {
        let pool = match &self.inner.pool {
            Pool::Single(pool) => Pool::Single(pool.clone()),
            Pool::Cluster(client) => Pool::Cluster(client.clone()),
        };
        Self::on(pool, self.inner.timeout, Arc::clone(&self.inner.metrics))
    }

    fn on(pool: Pool, timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                conn: Mutex::new(None),
                rebuilt_at: Mutex::new(None),
                rebuilding: AtomicBool::new(false),
                rebuilt: Notify::new(),
                breaker: Breaker::new(BREAKER_THRESHOLD, BREAKER_COOL_DOWN),
                timeout,
                metrics,
            }),
        }
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
        let current = || self.inner.conn.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(conn) = current() {
            return Some(conn);
        }
        let detached = match &self.inner.pool {
            Pool::Single(pool) => Conn::Single(deadpool_redis::Connection::take(pool.get().await.ok()?)),
            Pool::Cluster(_) => {
                // Built in the background (a call's timeout must not cut a
                // build short, or a slow cluster is never connected to);
                // this call waits for it within its own timeout.
                let woken = std::pin::pin!(self.inner.rebuilt.notified());
                let mut woken = woken;
                woken.as_mut().enable();
                self.rebuild_cluster(true);
                woken.await;
                return current();
            }
        };
        *self.inner.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(detached.clone());
        Some(detached)
    }

    /// Builds a new cluster connection from the seed nodes, in the
    /// background, keeping the current one in use meanwhile; at most once a
    /// second unless `now`.
    fn rebuild_cluster(&self, now: bool) {
        let Pool::Cluster(client) = &self.inner.pool else { return };
        {
            let mut at = self.inner.rebuilt_at.lock().unwrap_or_else(|e| e.into_inner());
            if !now && at.is_some_and(|at| at.elapsed() < CLUSTER_RECONNECT_EVERY) {
                return;
            }
            if self.inner.rebuilding.swap(true, Ordering::AcqRel) {
                return;
            }
            *at = Some(Instant::now());
        }
        let (client, inner) = (client.clone(), Arc::clone(&self.inner));
        tokio::spawn(async move {
            let built = tokio::time::timeout(CLUSTER_BUILD_TIMEOUT, client.get_async_connection()).await;
            match built {
                Ok(Ok(conn)) => *inner.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(Conn::Cluster(conn)),
                Ok(Err(e)) => tracing::warn!(error = %e, "redis cluster: could not connect to the seed nodes"),
                Err(_) => tracing::warn!("redis cluster: connecting to the seed nodes timed out"),
            }
            inner.rebuilding.store(false, Ordering::Release);
            inner.rebuilt.notify_waiters();
        });
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
                // failing master must not cost the others' connections),
                // but it learns a new topology only from redirects: after a
                // master died and its replica took over, calls to that
                // master's slots fail until it is built again from the seed
                // nodes, which happens in the background, at most once a second.
                if self.is_cluster() {
                    self.rebuild_cluster(false);
                } else {
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
