//! Postgres access: every SQL statement of the service lives under this
//! module. Reads are batched (one statement per batch of keys); writes run in
//! one transaction together with their outbox event.
//!
//! The store knows nothing about caching or GraphQL. Each statement is timed
//! and counted in [`Metrics`] under a fixed name, so the statement bound of the
//! read path can be observed from `/metrics`.

mod external;
pub mod idempotency;
mod instances;
pub mod outbox;
mod pages;
mod reads;
mod replica;
pub mod seed;
mod writes;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};
use tracing::Instrument;

use crate::config::DatabaseConfig;
use crate::domain::{InvalidInput, Review, ReviewStatus};
use crate::telemetry::metrics::Metrics;

pub use crate::domain::cursor::PageKey;
pub use external::ExternalOutcome;
pub use reads::RowVersion;
pub use replica::ReplicaState;
pub use writes::{Committed, NewReview, ReviewPatch};

/// A pooled connection idle this long is pinged before it is handed out
/// (see `Store::connect`).
const PING_IF_IDLE_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// Migrations embedded in the binary; applied by `serve` and `migrate`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// A failure to talk to Postgres or to make sense of what it returned.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("statement {statement} failed: {source}")]
    Query {
        statement: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("invalid data in the database: {0}")]
    Corrupt(String),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Why a write did not happen. Everything but `Store` is the caller's doing.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    #[error("review not found")]
    NotFound,
    #[error("not allowed to change this review")]
    Forbidden,
    #[error("you have already reviewed this offer")]
    Conflict,
    /// Another write committed with the same idempotency key: its stored
    /// outcome is the answer.
    #[error("already written with this idempotency key")]
    Replayed,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Connection pools and statement accounting.
#[derive(Clone)]
pub struct Store {
    /// Writes, and reads when no replica is configured.
    primary: PgPool,
    /// The replica the read path uses while it is caught up (`DATABASE_READ_URL`).
    replica: Option<PgPool>,
    fence: Arc<replica::ReplicaFence>,
    metrics: Arc<Metrics>,
}

impl Store {
    /// Opens the pools lazily (the service starts, and reports not-ready,
    /// while Postgres is down).
    ///
    /// # Errors
    /// A URL that does not parse.
    pub fn connect(config: &DatabaseConfig, metrics: Arc<Metrics>) -> Result<Self, StoreError> {
        let pool = |url: &str| -> Result<PgPool, StoreError> {
            let options: PgConnectOptions = url.parse().map_err(StoreError::Unavailable)?;
            let timeout_ms = config.statement_timeout.as_millis().to_string();
            let options =
                options.application_name("ugc-subgraph").options([("statement_timeout", timeout_ms.as_str())]);
            Ok(PgPoolOptions::new()
                .max_connections(config.pool_size)
                .min_connections(1)
                .acquire_timeout(config.acquire_timeout)
                // sqlx pings a connection on every acquire by default, and
                // again when it goes back to the pool: three round trips
                // (and three wake-ups of its Postgres backend) per
                // statement. The ping on return stays (sqlx 0.8 always
                // makes it), so a connection handed out seconds after its
                // last use was checked then; only one that sat idle longer
                // is pinged again, as HikariCP does (its 500 ms bypass
                // window).
                .test_before_acquire(false)
                .before_acquire(|conn, meta| {
                    Box::pin(async move {
                        if meta.idle_for >= PING_IF_IDLE_FOR {
                            sqlx::Connection::ping(conn).await?;
                        }
                        Ok(true)
                    })
                })
                .connect_lazy_with(options))
        };
        let primary = pool(&config.url)?;
        let replica = config.read_url.as_deref().map(pool).transpose()?;
        Ok(Self { primary, replica, fence: Arc::default(), metrics })
    }

    /// Applies pending migrations.
    ///
    /// # Errors
    /// Postgres unreachable, or a migration failed.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.primary).await?;
        Ok(())
    }

    /// True when Postgres answers and every embedded migration is applied.
    ///
    /// # Errors
    /// Postgres unreachable.
    pub async fn ready(&self) -> Result<bool, StoreError> {
        let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
        let applied: Option<i64> = self
            .timed("migrations_applied", async {
                sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                    .fetch_one(&self.primary)
                    .await
            })
            .await?;
        Ok(applied == Some(latest))
    }

    /// The data epoch (see the `data_epoch` migration). Reads must then see
    /// the primary as it is now ([`Store::require`]): a seed (or a migration
    /// before start-up) moves the epoch without an outbox event, and a load
    /// from a replica that has not replayed it would be cached as fresh
    /// under the new epoch.
    ///
    /// # Errors
    /// Postgres unavailable or failing.
    pub async fn data_epoch(&self) -> Result<i64, StoreError> {
        let (epoch, lsn): (i64, i64) = self
            .timed(
                "data_epoch",
                sqlx::query_as(
                    "SELECT epoch, (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint FROM data_epoch WHERE singleton",
                )
                .fetch_one(&self.primary),
            )
            .await?;
        self.require(u64::try_from(lsn).unwrap_or(0));
        Ok(epoch)
    }

    /// Runs one statement, recording its latency and outcome.
    async fn timed<T>(
        &self,
        statement: &'static str,
        query: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        let span = crate::telemetry::traces::client_span("postgresql", statement);
        let started = Instant::now();
        let result = query.instrument(span.clone()).await;
        self.metrics.sql(statement, started.elapsed(), result.is_ok());
        if result.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        result.map_err(|e| classify(statement, e))
    }
}

/// Failures that say "Postgres cannot serve this now" (worth a retry:
/// 503) apart from those that say "this statement is wrong" (500).
fn classify(statement: &'static str, error: sqlx::Error) -> StoreError {
    match error {
        e @ (sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)) => StoreError::Unavailable(e),
        sqlx::Error::Database(db) if db.code().as_deref().is_some_and(transient) => {
            StoreError::Unavailable(sqlx::Error::Database(db))
        }
        source => StoreError::Query { statement, source },
    }
}

/// SQLSTATEs of an overloaded, restarting or unreachable server:
/// 57014 statement time-out (or cancel), 57P0x shutting down or starting,
/// 53xxx out of resources (too many connections), 08xxx connection failures,
/// 40001/40P01 serialisation failure and deadlock (retry-safe).
fn transient(code: &str) -> bool {
    matches!(code, "57014" | "57P01" | "57P02" | "57P03" | "40001" | "40P01")
        || code.starts_with("53")
        || code.starts_with("08")
}

/// The columns of [`review_from_row`], in order.
const REVIEW_COLUMNS: &str =
    "r.id, r.offer_id, r.author_id, r.rating, r.body, r.status, r.created_at, r.updated_at, r.version";

fn review_from_row(row: &sqlx::postgres::PgRow) -> Result<Review, StoreError> {
    let status: &str = row.try_get("status").map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    Ok(Review {
        id: row.try_get("id").map_err(get)?,
        offer_id: row.try_get("offer_id").map_err(get)?,
        author_id: row.try_get("author_id").map_err(get)?,
        rating: row.try_get("rating").map_err(get)?,
        text: row.try_get("body").map_err(get)?,
        status: ReviewStatus::parse(status).ok_or_else(|| StoreError::Corrupt(format!("review status {status:?}")))?,
        created_at: row.try_get("created_at").map_err(get)?,
        updated_at: row.try_get("updated_at").map_err(get)?,
        version: row.try_get("version").map_err(get)?,
    })
}
