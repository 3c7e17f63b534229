//! The live-instance registry and the notifications of the write
//! visibility protocol (`events/visibility.rs`): heartbeats, the live set,
//! acknowledgements and ticks. SQL only; the protocol lives in `events`.

use std::time::Duration;

use super::{Store, StoreError};

impl Store {
    /// Records that instance `origin` is alive now.
    ///
    /// # Errors
    /// Postgres unavailable or failing.
    pub async fn heartbeat(&self, origin: i64) -> Result<(), StoreError> {
        self.timed(
            "heartbeat",
            sqlx::query(
                "INSERT INTO instances (origin, heartbeat_at) VALUES ($1, now()) \
                 ON CONFLICT (origin) DO UPDATE SET heartbeat_at = now()",
            )
            .bind(origin)
            .execute(&self.primary),
        )
        .await?;
        Ok(())
    }

    /// Instances other than `origin` whose heartbeat is younger than `lease`
    /// (by Postgres's clock, the same one that stamped the heartbeats).
    ///
    /// # Errors
    /// Postgres unavailable or failing.
    pub async fn live_instances(&self, origin: i64, lease: Duration) -> Result<Vec<i64>, StoreError> {
        self.timed(
            "live_instances",
            sqlx::query_scalar(
                "SELECT origin FROM instances \
                 WHERE origin <> $1 AND heartbeat_at > now() - make_interval(secs => $2)",
            )
            .bind(origin)
            .bind(lease.as_secs_f64())
            .fetch_all(&self.primary),
        )
        .await
    }

    /// Removes `origin` from the registry (it is stopping).
    ///
    /// # Errors
    /// Postgres unavailable or failing.
    pub async fn deregister(&self, origin: i64) -> Result<(), StoreError> {
        self.timed(
            "deregister",
            sqlx::query("DELETE FROM instances WHERE origin = $1").bind(origin).execute(&self.primary),
        )
        .await?;
        Ok(())
    }

    /// Forgets instances silent for longer than `silent` (they crashed).
    ///
    /// # Errors
    /// Postgres unavailable or failing.
    pub async fn forget_instances(&self, silent: Duration) -> Result<u64, StoreError> {
        let done = self
            .timed(
                "forget_instances",
                sqlx::query("DELETE FROM instances WHERE heartbeat_at < now() - make_interval(secs => $1)")
                    .bind(silent.as_secs_f64())
                    .execute(&self.primary),
            )
            .await?;
        Ok(done.rows_affected())
    }

    /// Sends a notification at once (outside any transaction).
    ///
    /// # Errors
    /// Postgres unavailable or failing.
    pub async fn notify_now(&self, statement: &'static str, channel: &str, payload: &str) -> Result<(), StoreError> {
        self.timed(
            statement,
            sqlx::query("SELECT pg_notify($1, $2)").bind(channel).bind(payload).execute(&self.primary),
        )
        .await?;
        Ok(())
    }
}
