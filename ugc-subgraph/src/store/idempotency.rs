//! Idempotency keys: a write made with a client's `Idempotency-Key` claims
//! the key first thing in its transaction and stores its outcome before
//! committing, so the key is stored exactly when the write committed. A
//! concurrent duplicate waits on the claim, then finds it taken.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::PgConnection;

use super::{Store, StoreError};
use crate::domain::Review;

/// Keys are kept this long.
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);

/// A client's key for one write: whose, which, and what the write asked
/// (a retry must ask the same).
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    pub user: String,
    pub key: String,
    pub fingerprint: String,
}

/// What a keyed write answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Outcome {
    Review(Review),
    Deleted(bool),
}

/// A stored key: what was asked and answered.
#[derive(Debug)]
pub struct Recorded {
    pub fingerprint: String,
    pub outcome: Outcome,
}

impl Store {
    /// The stored outcome of `key`, if its write committed.
    ///
    /// # Errors
    /// Postgres unavailable or failing.
    pub async fn recorded(&self, key: &IdempotencyKey) -> Result<Option<Recorded>, StoreError> {
        let row: Option<(String, Option<serde_json::Value>)> = self
            .timed(
                "idempotency_lookup",
                sqlx::query_as("SELECT fingerprint, outcome FROM idempotency_keys WHERE user_id = $1 AND key = $2")
                    .bind(&key.user)
                    .bind(&key.key)
                    .fetch_optional(&self.primary),
            )
            .await?;
        let Some((fingerprint, Some(outcome))) = row else { return Ok(None) };
        let outcome = serde_json::from_value(outcome).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(Some(Recorded { fingerprint, outcome }))
    }

    /// Claims `key` in the write's transaction; false when another write
    /// committed with it (waits for one still in flight).
    pub(super) async fn claim_key(&self, conn: &mut PgConnection, key: &IdempotencyKey) -> Result<bool, StoreError> {
        let claimed: Option<bool> = self
            .timed(
                "idempotency_claim",
                sqlx::query_scalar(
                    "INSERT INTO idempotency_keys (user_id, key, fingerprint) VALUES ($1, $2, $3) \
                     ON CONFLICT DO NOTHING RETURNING true",
                )
                .bind(&key.user)
                .bind(&key.key)
                .bind(&key.fingerprint)
                .fetch_optional(conn),
            )
            .await?;
        Ok(claimed.is_some())
    }

    /// Stores the outcome of the write that claimed `key` (same transaction).
    pub(super) async fn record_outcome(
        &self,
        conn: &mut PgConnection,
        key: &IdempotencyKey,
        outcome: &Outcome,
    ) -> Result<(), StoreError> {
        let outcome = serde_json::to_value(outcome).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.timed(
            "idempotency_record",
            sqlx::query("UPDATE idempotency_keys SET outcome = $3 WHERE user_id = $1 AND key = $2")
                .bind(&key.user)
                .bind(&key.key)
                .bind(outcome)
                .execute(conn),
        )
        .await?;
        Ok(())
    }

    /// Deletes keys older than [`RETENTION`].
    ///
    /// # Errors
    /// Postgres unavailable or failing.
    pub async fn prune_keys(&self) -> Result<u64, StoreError> {
        let done = self
            .timed(
                "idempotency_prune",
                sqlx::query("DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)")
                    .bind(RETENTION.as_secs_f64())
                    .execute(&self.primary),
            )
            .await?;
        Ok(done.rows_affected())
    }
}
