//! The transactional outbox: appending events inside write transactions,
//! claiming them for the relay (`FOR UPDATE SKIP LOCKED`, so several
//! instances share the work without blocking each other), marking them done,
//! and pruning.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Postgres, Transaction};

use super::{Store, StoreError};
use crate::domain::event::Event;

/// Channel a write notifies on commit, to wake the relays.
pub const WAKE_CHANNEL: &str = "ugc_outbox";
/// Notified (empty payload) when the data epoch changes.
pub const EPOCH_CHANNEL: &str = "ugc_epoch";

/// An event as stored, with its id (unique, increasing), commit time, and
/// how far the relay got with it.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    pub id: i64,
    pub event: Event,
    pub created_at: DateTime<Utc>,
    /// Tags (in [`crate::events::cascade::tags`] order) already applied to L2.
    pub progress: usize,
    /// Failed passes so far.
    pub attempts: i32,
}

/// How a writer's pass over its own event ended ([`Store::finish_own_event`]).
#[derive(Debug, Clone, Copy)]
pub enum OwnPass {
    Done,
    /// Redis took the first `progress` tags only; parked once
    /// `max_attempts` passes failed.
    Failed {
        progress: usize,
        max_attempts: i32,
    },
}

/// Back-off of a failed event: 100 ms doubling per attempt, at most 60 s.
const BACKOFF_SQL: &str = "now() + make_interval(secs => least(0.1 * power(2, attempts), 60))";

impl Store {
    /// Appends `event` in the caller's transaction; returns its id.
    pub(super) async fn append(&self, conn: &mut PgConnection, event: &Event) -> Result<i64, StoreError> {
        let payload = serde_json::to_value(event).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let id: i64 = self
            .timed(
                "insert_outbox",
                sqlx::query_scalar(
                    "WITH e AS (INSERT INTO outbox (event) VALUES ($1) RETURNING id) \
                     SELECT id FROM e, pg_notify($2, '')",
                )
                .bind(payload)
                .bind(WAKE_CHANNEL)
                .fetch_one(conn),
            )
            .await?;
        Ok(id)
    }

    /// Starts a relay transaction and locks up to `limit` unprocessed events
    /// (with the primary's current WAL position);
    /// rows other relays hold are skipped. With `only` (a writer relaying its
    /// own event of more tags than a relay pass), a row another relay holds
    /// is waited for instead: when the
    /// call returns, that relay has applied it (the row is then processed and
    /// not returned) or given it back unapplied (it is returned, to apply now).
    ///
    /// # Errors
    /// Postgres unavailable or failing.
    pub async fn claim_events(
        &self,
        only: Option<i64>,
        limit: i64,
    ) -> Result<(Transaction<'static, Postgres>, Vec<OutboxEvent>, u64), StoreError> {
        let mut tx = self.timed("begin", self.primary.begin()).await?;
        let sql = match only {
            None => {
                "SELECT id, event, created_at, progress, attempts, (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint \
                 FROM outbox \
                 WHERE processed_at IS NULL AND parked_at IS NULL AND (next_attempt_at IS NULL OR next_attempt_at <= now()) \
                 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED"
            }
            Some(_) => {
                "SELECT id, event, created_at, progress, attempts, (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint \
                 FROM outbox WHERE processed_at IS NULL AND parked_at IS NULL AND id = $1 LIMIT $2 FOR UPDATE"
            }
        };
        let rows: Vec<(i64, serde_json::Value, DateTime<Utc>, i32, i32, i64)> =
            self.timed("claim_outbox", sqlx::query_as(sql).bind(only).bind(limit).fetch_all(&mut *tx)).await?;
        // The primary's WAL insert position now: past the commit record of
        // every claimed event (they are committed rows), so a replica that
        // replayed it has them (store/replica.rs). Not the write position:
        // with `synchronous_commit = off` a commit can still be unwritten.
        let position = rows.first().map_or(0, |r| u64::try_from(r.5).unwrap_or(0));
        let mut events = Vec::with_capacity(rows.len());
        for (id, payload, created_at, progress, attempts, _) in rows {
            match serde_json::from_value(payload) {
                Ok(event) => events.push(OutboxEvent {
                    id,
                    event,
                    created_at,
                    progress: usize::try_from(progress).unwrap_or(0),
                    attempts,
                }),
                Err(e) => {
                    // An event this version cannot read is a bug; parked
                    // (and counted) rather than blocking the outbox.
                    tracing::error!(id, error = %e, "unreadable outbox event parked");
                    self.park_event(&mut tx, id).await?;
                    self.metrics.outbox_parked.inc();
                }
            }
        }
        Ok((tx, events, position))
    }

    /// Marks `done` processed and sends `notes` on `channel`, in one
    /// statement of the caller's transaction (notifications are delivered
    /// on commit): the writer's relay is on its request's critical path,
    /// and every statement there is a round trip.
    ///
    /// # Errors
    /// Postgres unavailable or failing.
    pub async fn finish_events(
        &self,
        conn: &mut PgConnection,
        done: &[i64],
        channel: &str,
        notes: &[String],
    ) -> Result<(), StoreError> {
        if done.is_empty() && notes.is_empty() {
            return Ok(());
        }
        self.timed(
            "finish_outbox",
            sqlx::query(
                "WITH finished AS (
                     UPDATE outbox SET processed_at = clock_timestamp(), progress = 0 WHERE id = ANY($1)
                 )
                 SELECT pg_notify($2, note) FROM unnest($3::text[]) AS note",
            )
            .bind(done)
            .bind(channel)
            .bind(notes)
            .execute(&mut *conn),
        )
        .await?;
        Ok(())
    }

    /// The primary's WAL insert position now: past the commit record of
    /// every transaction that committed before it (see [`Store::claim_events`]).
    /// One statement outside any transaction: a writer relaying its own
    /// event needs no claim (see `events/relay.rs`).
    ///
    /// # Errors
    /// Postgres unavailable or failing.
    pub async fn write_position(&self) -> Result<u64, StoreError> {
        let lsn: i64 = self
            .timed(
                "write_position",
                sqlx::query_scalar("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint")
                    .fetch_one(&self.primary),
            )
            .await?;
        Ok(u64::try_from(lsn).unwrap_or(0))
    }

    /// Finishes a writer's relay of its own event in one statement, its own
    /// transaction: records `pass` (the event done, or a failed pass as
    /// [`Store::retry_event`] does), sends `notes` on `channel` (delivered
    /// on its commit), and reads the instances other than `live.0` whose
    /// heartbeat is younger than `live.1` (the visibility protocol's live
    /// set, read after the tokens moved, as `events/visibility.rs`
    /// requires). Returns that live set, and whether the event was parked.
    ///
    /// Committed with `synchronous_commit = off`: if Postgres loses it in
    /// a crash, the event is simply relayed again (its handlers are
    /// idempotent), and this write's answer does not wait on a second
    /// flush of the WAL.
    ///
    /// # Errors
    /// Postgres unavailable or failing.
    pub async fn finish_own_event(
        &self,
        id: i64,
        pass: OwnPass,
        channel: &str,
        notes: &[String],
        live: Option<(i64, std::time::Duration)>,
    ) -> Result<(Option<Vec<i64>>, bool), StoreError> {
        let set = match pass {
            OwnPass::Done => Cow::Borrowed("processed_at = clock_timestamp(), progress = 0"),
            OwnPass::Failed { .. } => Cow::Owned(format!(
                "progress = $7, attempts = attempts + 1, next_attempt_at = {BACKOFF_SQL}, \
                 parked_at = CASE WHEN attempts + 1 >= $8 THEN now() END"
            )),
        };
        // One row per note (there is always one); the uncorrelated `ARRAY`
        // is an init plan, read once.
        let sql = format!(
            "WITH finished AS (
                 UPDATE outbox SET {set} WHERE id = $1 AND processed_at IS NULL
                 RETURNING parked_at IS NOT NULL AS parked
             )
             SELECT CASE WHEN $4 THEN ARRAY(
                        SELECT origin FROM instances
                        WHERE origin <> $5 AND heartbeat_at > now() - make_interval(secs => $6)
                    ) END,
                    EXISTS (SELECT 1 FROM finished WHERE parked)
             FROM unnest($3::text[]) AS note,
                  LATERAL (SELECT pg_notify($2, note), set_config('synchronous_commit', 'off', true)) AS sent"
        );
        let (origin, lease) = live.unwrap_or_default();
        let mut query = sqlx::query_as(&sql)
            .bind(id)
            .bind(channel)
            .bind(notes)
            .bind(live.is_some())
            .bind(origin)
            .bind(lease.as_secs_f64());
        if let OwnPass::Failed { progress, max_attempts } = pass {
            query = query.bind(i32::try_from(progress).unwrap_or(i32::MAX)).bind(max_attempts);
        }
        let rows: Vec<(Option<Vec<i64>>, bool)> = self.timed("finish_outbox", query.fetch_all(&self.primary)).await?;
        Ok(rows.into_iter().next().unwrap_or_default())
    }

    /// Records how far a bounded pass got; the event is claimable again at once.
    ///
    /// # Errors
    /// Postgres unavailable or failing.
    pub async fn continue_event(&self, conn: &mut PgConnection, id: i64, progress: usize) -> Result<(), StoreError> {
        self.timed(
            "continue_outbox",
            sqlx::query("UPDATE outbox SET progress = $2, next_attempt_at = NULL WHERE id = $1")
                .bind(id)
                .bind(i32::try_from(progress).unwrap_or(i32::MAX))
                .execute(&mut *conn),
        )
        .await?;
        Ok(())
    }

    /// Records a failed pass: progress kept, retried after a back-off, parked
    /// once `max_attempts` passes failed. Returns whether it was parked.
    ///
    /// # Errors
    /// Postgres unavailable or failing.
    pub async fn retry_event(
        &self,
        conn: &mut PgConnection,
        id: i64,
        progress: usize,
        max_attempts: i32,
    ) -> Result<bool, StoreError> {
        let parked: bool = self
            .timed(
                "retry_outbox",
                sqlx::query_scalar(&format!(
                    "UPDATE outbox SET progress = $2, attempts = attempts + 1, next_attempt_at = {BACKOFF_SQL}, \
                         parked_at = CASE WHEN attempts + 1 >= $3 THEN now() END \
                     WHERE id = $1 RETURNING parked_at IS NOT NULL"
                ))
                .bind(id)
                .bind(i32::try_from(progress).unwrap_or(i32::MAX))
                .bind(max_attempts)
                .fetch_one(&mut *conn),
            )
            .await?;
        Ok(parked)
    }

    async fn park_event(&self, conn: &mut PgConnection, id: i64) -> Result<(), StoreError> {
        self.timed(
            "park_outbox",
            sqlx::query("UPDATE outbox SET parked_at = now() WHERE id = $1").bind(id).execute(conn),
        )
        .await?;
        Ok(())
    }

    /// Deletes processed events older than `keep`.
    ///
    /// # Errors
    /// Postgres unavailable or failing.
    pub async fn prune_events(&self, keep: std::time::Duration) -> Result<u64, StoreError> {
        let secs = keep.as_secs_f64();
        let done = self
            .timed(
                "prune_outbox",
                sqlx::query("DELETE FROM outbox WHERE processed_at < now() - make_interval(secs => $1)")
                    .bind(secs)
                    .execute(&self.primary),
            )
            .await?;
        Ok(done.rows_affected())
    }

    /// A dedicated connection pool entry for LISTEN (the relay and fan-out).
    pub fn listen_pool(&self) -> &sqlx::PgPool {
        &self.primary
    }
}
