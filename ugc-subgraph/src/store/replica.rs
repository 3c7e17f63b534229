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

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{Store, StoreError};

/// How often the replica's replay position is read.
const POLL: Duration = Duration::from_millis(10);

#[derive(Default)]
pub struct ReplicaFence {
    /// The highest WAL position (bytes) a read must see.
    required: AtomicU64,
    /// The replica's replay position as last read.
    replayed: AtomicU64,
}

impl Store {
    /// Reads must see every write up to WAL position `lsn`.
    pub fn require(&self, lsn: u64) {
        self.fence.required.fetch_max(lsn, Ordering::AcqRel);
    }

    /// The pool a read uses now.
    pub(super) fn reader(&self) -> &PgPool {
        let Some(replica) = &self.replica else { return &self.primary };
        let caught_up = self.fence.replayed.load(Ordering::Acquire) >= self.fence.required.load(Ordering::Acquire);
        self.metrics.replica_routing.get_or_create(&[("pool", if caught_up { "replica" } else { "primary" })]).inc();
        if caught_up {
            replica
        } else {
            &self.primary
        }
    }

    pub fn has_replica(&self) -> bool {
        self.replica.is_some()
    }

    /// Polls the replica's replay position until `stop` (no replica: returns).
    pub async fn follow_replica(self, stop: CancellationToken) {
        let Some(replica) = self.replica.clone() else { return };
        loop {
            match self.replay_position(&replica).await {
                Ok(lsn) => {
                    self.fence.replayed.fetch_max(lsn, Ordering::AcqRel);
                }
                Err(e) => tracing::debug!(error = %e, "cannot read the replica's replay position"),
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
