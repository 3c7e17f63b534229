//! Replica fencing: reads go to the replica (`DATABASE_READ_URL`) only
//! when it has replayed every write whose invalidation this instance knows
//! of; otherwise to the primary.
//!
//! Why: a load taken after a write's cache tokens moved forward, but read
//! from a replica that has not replayed the write yet, would be cached as
//! fresh under the new token: poisoned until its TTL. The relay records the
//! primary's WAL position after the events it applies (≥ their commit
//! positions) in Redis with the tokens and in its notifications; a load
//! requires it ([`Store::require`]) before reading. The replica's replay
//! position is polled; a poll is a lower bound of the current one (replay
//! only moves forward), so the check can only err towards the primary.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{Store, StoreError};

/// How often the replica's replay position is read.
const POLL: Duration = Duration::from_millis(10);
/// A poll not answered within this makes the replica unavailable.
const POLL_TIMEOUT: Duration = Duration::from_millis(250);

#[derive(Default)]
pub struct ReplicaFence {
    /// The highest WAL position (bytes) a read must see.
    required: AtomicU64,
    /// The replica's replay position as last read.
    replayed: AtomicU64,
    /// The last poll succeeded (false until the first one does).
    available: AtomicBool,
}

/// What readiness says of the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    NotConfigured,
    /// Serving reads (when caught up with what this instance knows of).
    Available,
    /// Not answering: reads go to the primary.
    Unavailable,
}

impl Store {
    /// Reads must see every write up to WAL position `lsn`.
    pub fn require(&self, lsn: u64) {
        self.fence.required.fetch_max(lsn, Ordering::AcqRel);
    }

    /// The pool a read uses now.
    fn reader(&self) -> &PgPool {
        let Some(replica) = &self.replica else { return &self.primary };
        let fence = &self.fence;
        let usable = fence.available.load(Ordering::Acquire)
            && fence.replayed.load(Ordering::Acquire) >= fence.required.load(Ordering::Acquire);
        self.metrics.replica_routing.get_or_create(&[("pool", if usable { "replica" } else { "primary" })]).inc();
        if usable {
            replica
        } else {
            &self.primary
        }
    }

    /// Runs one read-path statement on [`Store::reader`]'s pool; when the
    /// replica fails it for a connection-class reason, marks it unavailable
    /// and runs it on the primary instead.
    pub(super) async fn read<T, F, Fut>(&self, statement: &'static str, run: F) -> Result<T, StoreError>
    where
        F: Fn(PgPool) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        let pool = self.reader();
        let on_replica = self.replica.as_ref().is_some_and(|r| std::ptr::eq(r, pool));
        match self.timed(statement, run(pool.clone())).await {
            Err(StoreError::Unavailable(e)) if on_replica => {
                self.replica_lost(&e.to_string());
                self.metrics.replica_routing.get_or_create(&[("pool", "primary")]).inc();
                self.timed(statement, run(self.primary.clone())).await
            }
            other => other,
        }
    }

    fn replica_lost(&self, why: &str) {
        if self.fence.available.swap(false, Ordering::AcqRel) {
            tracing::warn!(error = why, "read replica unavailable: reading from the primary");
        }
    }

    pub fn has_replica(&self) -> bool {
        self.replica.is_some()
    }

    pub fn replica_state(&self) -> ReplicaState {
        match (&self.replica, self.fence.available.load(Ordering::Acquire)) {
            (None, _) => ReplicaState::NotConfigured,
            (Some(_), true) => ReplicaState::Available,
            (Some(_), false) => ReplicaState::Unavailable,
        }
    }

    /// Polls the replica's replay position until `stop` (no replica: returns).
    pub async fn follow_replica(self, stop: CancellationToken) {
        let Some(replica) = self.replica.clone() else { return };
        loop {
            match tokio::time::timeout(POLL_TIMEOUT, self.replay_position(&replica)).await {
                Ok(Ok(lsn)) => {
                    self.fence.replayed.fetch_max(lsn, Ordering::AcqRel);
                    if !self.fence.available.swap(true, Ordering::AcqRel) {
                        tracing::info!("read replica available: reads go to it while it is caught up");
                    }
                }
                Ok(Err(e)) => self.replica_lost(&e.to_string()),
                Err(_) => self.replica_lost("no answer to the replay-position poll"),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// WAL bytes replayed (a server not in recovery has everything).
    async fn replay_position(&self, replica: &PgPool) -> Result<u64, StoreError> {
        let lsn: Option<i64> = self
            .timed(
                "replica_replay_lsn",
                sqlx::query_scalar("SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint").fetch_one(replica),
            )
            .await?;
        Ok(lsn.map_or(u64::MAX, |l| u64::try_from(l).unwrap_or(0)))
    }
}
