//! The outbox relay: claims unprocessed events (`FOR UPDATE SKIP LOCKED`),
//! applies each once to the shared L2 (new tag tokens), evicts this
//! instance's L1, and in the same transaction notifies every instance
//! (delivered on commit) and marks the events done. An event whose L2
//! invalidation failed (Redis down) still evicts every L1 but stays
//! unprocessed and is retried. Handlers are idempotent: applying an event
//! twice only costs a few cache misses.
//!
//! The writing instance relays its own event right after commit, before
//! answering the mutation: its caller's next read, anywhere, sees the change
//! (other instances' L1s within the fan-out lag). Background relays (every
//! instance runs one) pick up whatever that missed: a crash between commit
//! and relay, a Redis outage, another instance's write.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::cascade;
use super::visibility::Visibility;
use crate::cache::Tag;
use crate::config::CoherenceConfig;
use crate::loaders::ReadCache;
use crate::store::outbox::OutboxEvent;
use crate::store::{Store, StoreError};
use crate::telemetry::metrics::Metrics;

/// Channel carrying invalidations to every instance.
pub const INVALIDATE_CHANNEL: &str = "ugc_invalidate";
/// Postgres refuses notification payloads of 8000 bytes or more.
const MAX_PAYLOAD: usize = 7_900;
/// Events per relay transaction.
const BATCH: i64 = 200;
/// Fallback poll when no wake-up arrives.
const POLL: Duration = Duration::from_millis(500);
/// Processed events are kept this long (for inspection), then pruned.
const KEEP: Duration = Duration::from_secs(3600);

/// One notification: an event's tags, or "drop everything" when the tags do
/// not fit in a payload.
#[derive(Debug, Serialize, Deserialize)]
pub struct Invalidation {
    pub id: i64,
    /// Commit time of the event (µs since the epoch), for lag.
    pub at_us: i64,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub all: bool,
    /// The relaying instance, which invalidated its own L1 already.
    #[serde(default)]
    pub origin: u64,
}

#[derive(Clone)]
pub struct Events {
    /// Identifies this instance in its notifications.
    origin: u64,
    visibility: Arc<Visibility>,
    store: Store,
    cache: ReadCache,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
}

impl Events {
    pub fn new(store: Store, cache: ReadCache, metrics: Arc<Metrics>, coherence: &CoherenceConfig) -> Self {
        // Positive as an i64 too (the registry stores it as `bigint`).
        let origin = (rand::random::<u64>() >> 1) | 1;
        let visibility = Arc::new(Visibility::new(
            origin,
            coherence.write_visibility_timeout,
            store.clone(),
            cache.clone(),
            Arc::clone(&metrics),
        ));
        Self { origin, visibility, store, cache, metrics, wake: Arc::new(Notify::new()) }
    }

    pub fn visibility(&self) -> &Arc<Visibility> {
        &self.visibility
    }

    pub fn origin(&self) -> u64 {
        self.origin
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn cache(&self) -> &ReadCache {
        &self.cache
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Wakes the background relay (a write committed somewhere).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Relays one event right after its transaction committed. Waits for a
    /// relay that already holds it, so that on return the event has been
    /// applied by someone, then for every live instance to acknowledge it
    /// (bounded; see `visibility.rs`). Failures are logged: the background
    /// relay retries.
    pub async fn after_commit(&self, event_id: i64, tags: &[Tag]) {
        // Whatever happens below, this instance's L1 must not serve the old
        // value to this caller's next request.
        self.cache.invalidate_local(tags);
        // Before relaying: acknowledgements may arrive as soon as it commits.
        let pending = self.visibility.expect(event_id);
        if let Err(e) = self.relay(Some(event_id)).await {
            tracing::warn!(event_id, error = %e, "relaying after commit failed; the background relay will retry");
            self.wake();
        }
        if let Some(pending) = pending {
            self.visibility.wait(pending).await;
        }
    }

    /// Claims and applies events; returns how many were claimed.
    ///
    /// # Errors
    /// Postgres unavailable or failing.
    pub async fn relay(&self, only: Option<i64>) -> Result<usize, StoreError> {
        let (mut tx, events) = self.store.claim_events(only, BATCH).await?;
        if events.is_empty() {
            tx.commit().await.map_err(|e| StoreError::Query { statement: "commit", source: e })?;
            return Ok(0);
        }
        let (mut done, mut retry) = (Vec::new(), Vec::new());
        for OutboxEvent { id, event, created_at } in &events {
            let tags = cascade::tags(event);
            let token = u64::try_from(*id).unwrap_or(0);
            if self.cache.invalidate_shared(&tags, token).await {
                done.push(*id);
            } else {
                retry.push(*id);
            }
            self.cache.invalidate_local(&tags);
            let encoded: Vec<String> = tags.iter().map(cascade::encode).collect();
            let mut note = Invalidation {
                id: *id,
                at_us: created_at.timestamp_micros(),
                tags: encoded,
                all: false,
                origin: self.origin,
            };
            let mut payload = serde_json::to_string(&note).unwrap_or_default();
            if payload.len() > MAX_PAYLOAD {
                note.tags.clear();
                note.all = true;
                payload = serde_json::to_string(&note).unwrap_or_default();
            }
            self.store.notify(&mut tx, INVALIDATE_CHANNEL, &payload).await?;
            self.metrics.events_relayed.inc();
        }
        self.store.finish_events(&mut tx, &done, &retry).await?;
        tx.commit().await.map_err(|e| StoreError::Query { statement: "commit", source: e })?;
        if !retry.is_empty() {
            tracing::warn!(events = retry.len(), "shared cache invalidation deferred (Redis unavailable); will retry");
        }
        Ok(events.len())
    }

    /// Runs the background relay until `stop`: on every wake-up and at least
    /// every 500 ms, drains the outbox; prunes processed events hourly.
    pub async fn run_relay(self, stop: CancellationToken) {
        let mut last_prune = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(POLL) => {}
            }
            loop {
                match self.relay(None).await {
                    Ok(n) if n as i64 == BATCH => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox relay failed; retrying");
                        break;
                    }
                }
            }
            if last_prune.elapsed() > KEEP / 12 {
                last_prune = tokio::time::Instant::now();
                match self.store.prune_events(KEEP).await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(pruned = n, "outbox pruned"),
                    Err(e) => tracing::warn!(error = %e, "outbox pruning failed"),
                }
                if let Err(e) = self.store.prune_keys().await {
                    tracing::warn!(error = %e, "idempotency key pruning failed");
                }
            }
        }
    }
}
