//! The outbox relay: claims unprocessed events (`FOR UPDATE SKIP LOCKED`),
//! applies each once to the shared L2 (new tag tokens), evicts this
//! instance's L1, and in the same transaction notifies every instance
//! (delivered on commit) and marks the events done. An event whose L2
//! invalidation failed (Redis down) still evicts every L1 but stays
//! unprocessed and is retried. Handlers are idempotent: applying an event
//! twice only costs a few cache misses.
//!
//! The writing instance relays its own event right after commit, before
//! answering the mutation, without claiming it (see
//! [`Events::after_commit`]): its caller's next read, anywhere, sees the change
//! (other instances' L1s within the fan-out lag). Background relays (every
//! instance runs one) pick up whatever that missed: a crash between commit
//! and relay, a Redis outage. A write's wake-up reaches them a grace later
//! (its writer is relaying it); a failed relay wakes them at once.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::cascade;
use super::router::RouterInvalidation;
use super::visibility::Visibility;
use crate::cache::Tag;
use crate::config::CoherenceConfig;
use crate::loaders::ReadCache;
use crate::store::outbox::{OutboxEvent, OwnPass};
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
/// How long after a write is notified the background relays look for what
/// its writer left. The writer relays its own event within milliseconds;
/// claiming at once (as this did) cost every instance a claim transaction
/// per write (~0.5 ms of Postgres time each, by its logged statements), and
/// the writer then often waited on the row lock of a relay that had won the
/// race. Only a writer that died between commit and relay leaves work.
const WRITTEN_GRACE: Duration = Duration::from_millis(100);
/// Processed events are kept this long (for inspection), then pruned.
const KEEP: Duration = Duration::from_secs(3600);
/// Tags per Redis call (each call has the Redis time-out to itself).
const L2_CHUNK: usize = 500;
/// Tags applied per event per relay pass: a huge event (an offer with
/// 100,000 reviews removed) is applied over several passes, resuming where
/// the last one stopped, so no pass holds the relay for long.
pub const TAGS_PER_PASS: usize = 10_000;
/// Failed passes before an event is parked (100 ms doubling to 60 s: about
/// 12 minutes of retries).
pub const MAX_ATTEMPTS: i32 = 20;

/// One notification: some of an event's tags (an event with many tags is
/// sent as several notifications, never as "drop everything"). `all` is only
/// ever read: older versions sent it.
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
    /// Relayed by the instance that wrote the event, which waits for the
    /// others' acknowledgements, not for its own.
    #[serde(default)]
    pub by_writer: bool,
    /// The primary's WAL position past the event's commit: reads must reach
    /// it (replica fencing).
    #[serde(default)]
    pub lsn: u64,
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
    /// A write committed somewhere (its writer relays it).
    written: Arc<Notify>,
    /// A router in front to tell about applied invalidations.
    router: Option<RouterInvalidation>,
}

impl Events {
    pub fn new(store: Store, cache: ReadCache, metrics: Arc<Metrics>, coherence: &CoherenceConfig) -> Self {
        // Positive as an i64 too (the registry stores it as `bigint`).
        let origin = (rand::random::<u64>() >> 1) | 1;
        let visibility =
            Arc::new(Visibility::new(origin, coherence, store.clone(), cache.clone(), Arc::clone(&metrics)));
        Self {
            origin,
            visibility,
            store,
            cache,
            metrics,
            wake: Arc::new(Notify::new()),
            written: Arc::new(Notify::new()),
            router: None,
        }
    }

    /// Forwards every invalidation this instance applies to `router`.
    #[must_use]
    pub fn with_router(mut self, router: Option<RouterInvalidation>) -> Self {
        self.router = router;
        self
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

    /// Wakes the background relay: there is work for it now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// A write committed somewhere: the background relay looks, after
    /// [`WRITTEN_GRACE`], for what its writer did not relay.
    pub fn written(&self) {
        self.written.notify_one();
    }

    /// Relays one event right after its transaction committed, then waits
    /// for every live instance to acknowledge it (bounded; see
    /// `visibility.rs`). Failures are logged: the background relay retries.
    ///
    /// The writer has the event in hand, so it does not claim it: it reads
    /// the write position, moves the tags' tokens, and marks the event done
    /// while sending its notifications and reading the live set, all in one
    /// statement (two statements and one Redis call on the request's
    /// critical path, where a claim took five statements). A background
    /// relay that claimed the same event meanwhile (a poll at that moment)
    /// applies it too: the handlers are idempotent, and tokens only move
    /// forward. An event with more tags than a pass takes the claimed path.
    pub async fn after_commit(&self, event_id: i64, tags: &[Tag]) {
        // Before relaying: acknowledgements may arrive as soon as it commits.
        let pending = self.visibility.expect(event_id);
        let relayed = if tags.len() <= TAGS_PER_PASS {
            let span = crate::work_span!("outbox.relay", events = 1, tags = tags.len());
            self.relay_own(event_id, tags, pending.is_some()).instrument(span).await
        } else {
            // The claimed path bumps this L1 only for what it claimed (here:
            // maybe nothing, another relay holding or having held it).
            self.relay(Some(event_id)).await.map(|_| {
                self.cache.invalidate_local(tags);
                None
            })
        };
        let live = relayed.unwrap_or_else(|e| {
            // This instance's L1 must not serve the old value to this caller's next request.
            self.cache.invalidate_local(tags);
            tracing::warn!(event_id, error = %e, "relaying after commit failed; the background relay will retry");
            self.wake();
            None
        });
        if let Some(pending) = pending {
            self.visibility.wait(pending, live).await;
        }
    }

    /// The writer's relay of its own event (see [`Events::after_commit`]);
    /// returns the live set when `live` asks for it. Tags Redis did not take
    /// are recorded as a failed pass, retried by the background relay after
    /// a back-off; the other instances are told at once all the same, as by
    /// a failed claimed pass.
    async fn relay_own(&self, id: i64, tags: &[Tag], live: bool) -> Result<Option<Vec<i64>>, StoreError> {
        // Commit time as the writer saw it return: the notifications' lag
        // is measured from here.
        let at_us = chrono::Utc::now().timestamp_micros();
        let position = self.store.write_position().await?;
        // Before any token moves (see `apply_claimed`).
        self.store.require(position);
        let applied = self.apply_shared(&mut Some(position), tags, id).await;
        // Once, after L2's tokens moved: bumping it also before refused
        // every fragment rendered in between from the old L2, and under
        // writes the hottest offers' waiting requests all rendered them again.
        self.cache.invalidate_local(tags);
        self.metrics.events_relayed.inc();
        let pass = if applied == tags.len() {
            OwnPass::Done
        } else {
            self.metrics.outbox_retries.inc();
            OwnPass::Failed { progress: applied, max_attempts: MAX_ATTEMPTS }
        };
        let notes = notes(id, at_us, self.origin, true, position, tags);
        let visibility = live.then(|| self.visibility.live_query());
        let (live, parked) = self.store.finish_own_event(id, pass, INVALIDATE_CHANNEL, &notes, visibility).await?;
        if let Some(router) = &self.router {
            router.forward(&tags[..applied]);
        }
        if parked {
            self.parked(id, applied, tags.len());
        } else if applied < tags.len() {
            tracing::warn!(event = id, "shared cache invalidation deferred (Redis unavailable); will retry");
        }
        Ok(live)
    }

    /// Moves the L2 tokens of `tags` to event `id`, in chunks, the
    /// watermark with the first chunk Redis takes; returns how many tags
    /// (from the start) it took.
    async fn apply_shared(&self, watermark: &mut Option<u64>, tags: &[Tag], id: i64) -> usize {
        let token = u64::try_from(id).unwrap_or(0);
        let mut applied = 0;
        for chunk in tags.chunks(L2_CHUNK) {
            if !self.cache.invalidate_shared_after(*watermark, chunk, token).await {
                break;
            }
            *watermark = None;
            applied += chunk.len();
        }
        applied
    }

    fn parked(&self, event: i64, applied: usize, tags: usize) {
        self.metrics.outbox_parked.inc();
        tracing::error!(
            event,
            applied,
            tags,
            "outbox event parked after {MAX_ATTEMPTS} failed passes; requeue it once Redis is healthy"
        );
    }

    /// Claims and applies events; returns how many were claimed.
    ///
    /// Per event and pass, at most [`TAGS_PER_PASS`] tags from where the last
    /// pass stopped: each chunk's L2 tokens are advanced, then every
    /// instance's L1 is told about the same tags (this one's at once, the
    /// others' by notifications sent on commit). A pass that fails keeps its
    /// progress, and the event is retried after a back-off; only the tags of
    /// the failed window are notified again then (an L1 may have refilled
    /// them from the not yet invalidated L2), never the whole L1.
    ///
    /// # Errors
    /// Postgres unavailable or failing.
    pub async fn relay(&self, only: Option<i64>) -> Result<usize, StoreError> {
        let (tx, events, position) = self.store.claim_events(only, BATCH).await?;
        if events.is_empty() {
            tx.commit().await.map_err(|e| StoreError::Query { statement: "commit", source: e })?;
            return Ok(0);
        }
        let span = crate::work_span!("outbox.relay", events = events.len(), tags = tracing::field::Empty);
        self.apply_claimed(tx, events, position, only.is_some(), &span).instrument(span.clone()).await
    }

    async fn apply_claimed(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
        events: Vec<OutboxEvent>,
        position: u64,
        by_writer: bool,
        span: &tracing::Span,
    ) -> Result<usize, StoreError> {
        // Before any token moves: a load that sees a moved token also sees
        // the position its read must reach (replica fencing).
        self.store.require(position);
        // Advanced with the first chunk of tags Redis takes (one round trip
        // on a single server); a pass that moves no token needs none.
        let mut watermark = Some(position);
        let mut done = Vec::new();
        let (mut retried, mut tags_applied) = (0, 0);
        let mut forwarded = Vec::new();
        let mut payloads = Vec::new();
        for OutboxEvent { id, event, created_at, progress, .. } in &events {
            let tags = cascade::tags(event);
            let start = (*progress).min(tags.len());
            let window = &tags[start..(start + TAGS_PER_PASS).min(tags.len())];
            let applied = self.apply_shared(&mut watermark, window, *id).await;
            self.cache.invalidate_local(window);
            if self.router.is_some() {
                forwarded.extend_from_slice(&window[..applied]);
            }
            payloads.extend(notes(*id, created_at.timestamp_micros(), self.origin, by_writer, position, window));
            self.metrics.events_relayed.inc();
            tags_applied += applied;
            let reached = start + applied;
            if reached == tags.len() {
                done.push(*id);
            } else if applied == window.len() {
                // Bounded, not failed: the next pass resumes at once.
                self.store.continue_event(&mut tx, *id, reached).await?;
                self.wake();
            } else {
                retried += 1;
                self.metrics.outbox_retries.inc();
                if self.store.retry_event(&mut tx, *id, reached, MAX_ATTEMPTS).await? {
                    self.parked(*id, reached, tags.len());
                }
            }
        }
        span.record("tags", tags_applied);
        self.store.finish_events(&mut tx, &done, INVALIDATE_CHANNEL, &payloads).await?;
        tx.commit().await.map_err(|e| StoreError::Query { statement: "commit", source: e })?;
        // After the commit that delivers the notifications (see router.rs
        // for why the router is told only a visibility window later).
        if let Some(router) = &self.router {
            router.forward(&forwarded);
        }
        if retried > 0 {
            tracing::warn!(events = retried, "shared cache invalidation deferred (Redis unavailable); will retry");
        }
        Ok(events.len())
    }

    /// Runs the background relay until `stop`: on every wake-up, a grace
    /// after a write was notified, and at least every 500 ms, drains the
    /// outbox; prunes processed events hourly.
    pub async fn run_relay(self, stop: CancellationToken) {
        let mut last_prune = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.wake.notified() => {}
                () = self.written.notified() => {
                    // Writes notified meanwhile are covered by this pass.
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = self.wake.notified() => {}
                        () = tokio::time::sleep(WRITTEN_GRACE) => {}
                    }
                }
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

/// The notifications for `tags` of event `id`: as few as fit under
/// Postgres's payload limit (tags are at most ~70 bytes, so every one fits).
fn notes(id: i64, at_us: i64, origin: u64, by_writer: bool, lsn: u64, tags: &[Tag]) -> Vec<String> {
    let encode = |tags: Vec<String>| {
        serde_json::to_string(&Invalidation { id, at_us, tags, all: false, origin, by_writer, lsn }).unwrap_or_default()
    };
    let envelope = encode(Vec::new()).len();
    let (mut out, mut batch, mut size) = (Vec::new(), Vec::new(), envelope);
    for tag in tags {
        let tag = cascade::encode(tag);
        // Quotes, escapes and the comma: at most twice the tag, plus 3.
        let cost = 2 * tag.len() + 3;
        if size + cost > MAX_PAYLOAD && !batch.is_empty() {
            out.push(encode(std::mem::take(&mut batch)));
            size = envelope;
        }
        size += cost;
        batch.push(tag);
    }
    if !batch.is_empty() || out.is_empty() {
        out.push(encode(batch));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_tags_travel_in_several_notifications_that_each_fit() {
        let tags: Vec<Tag> =
            (0..20_000).map(Tag::Review).chain((0..500).map(|i| Tag::Offer(format!("o-\"{i}\"")))).collect();
        let payloads = notes(7, 1, 3, false, u64::MAX, &tags);
        assert!(payloads.len() > 20, "{} notifications", payloads.len());
        let mut seen = Vec::new();
        for payload in &payloads {
            assert!(payload.len() <= MAX_PAYLOAD, "{} bytes", payload.len());
            let note: Invalidation = serde_json::from_str(payload).unwrap();
            assert!(!note.all && note.id == 7);
            seen.extend(note.tags.iter().filter_map(|t| cascade::decode(t)));
        }
        assert_eq!(seen, tags, "every tag once, in order");
        assert_eq!(
            notes(7, 1, 3, true, 0, &[]).len(),
            1,
            "an event without tags still notifies (for acknowledgements)"
        );
    }
}
