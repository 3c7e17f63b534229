//! Fan-out: every instance listens for invalidations (and relay wake-ups)
//! and evicts its L1. When the listening connection drops, notifications
//! sent meanwhile are lost, so the instance drops its whole L1 when it
//! reconnects: no lost invalidation, ever, at the cost of a cold L1.

use std::time::Duration;

use chrono::Utc;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use super::cascade;
use super::relay::{Events, Invalidation, INVALIDATE_CHANNEL};
use super::visibility::ACK_CHANNEL;
use crate::store::outbox::{EPOCH_CHANNEL, WAKE_CHANNEL};

/// Listens until `stop`, reconnecting with back-off.
pub async fn run(events: Events, pool: sqlx::PgPool, stop: CancellationToken) {
    let mut first = true;
    let mut backoff = Duration::from_millis(100);
    while !stop.is_cancelled() {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the invalidation listener; retrying");
                tokio::select! { () = stop.cancelled() => return, () = tokio::time::sleep(backoff) => {} }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let visibility = events.visibility();
        let mut channels = vec![INVALIDATE_CHANNEL, WAKE_CHANNEL, EPOCH_CHANNEL];
        if visibility.enabled() {
            channels.extend([ACK_CHANNEL, visibility.tick_channel()]);
        }
        if let Err(e) = listener.listen_all(channels).await {
            tracing::warn!(error = %e, "LISTEN failed; retrying");
            continue;
        }
        backoff = Duration::from_millis(100);
        // Listening now: an epoch change from here on is notified; one
        // made before (or while disconnected) is read here.
        sync_epoch(&events).await;
        if !first {
            lost(&events, "listener reconnected");
        }
        first = false;
        loop {
            let received = tokio::select! {
                () = stop.cancelled() => return,
                r = listener.try_recv() => r,
            };
            match received {
                Ok(Some(n)) if n.channel() == WAKE_CHANNEL => events.written(),
                Ok(Some(n)) if n.channel() == EPOCH_CHANNEL => sync_epoch(&events).await,
                Ok(Some(n)) if n.channel() == ACK_CHANNEL => visibility.on_ack(n.payload()),
                Ok(Some(n)) if n.channel() == visibility.tick_channel() => visibility.on_tick(n.payload()),
                Ok(Some(n)) => apply(&events, n.payload()),
                // The connection dropped; try_recv reconnects next time.
                Ok(None) => lost(&events, "listener connection lost"),
                Err(e) => {
                    tracing::warn!(error = %e, "invalidation listener failed; reconnecting");
                    break;
                }
            }
        }
    }
}

/// Reads the data epoch and moves the cache to it (a failure is retried at
/// the next reconnect; until then the instance keeps its current epoch).
pub async fn sync_epoch(events: &Events) {
    match events.store().data_epoch().await {
        Ok(epoch) => {
            events.cache().set_epoch(epoch);
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the data epoch"),
    }
}

fn lost(events: &Events, why: &'static str) {
    tracing::warn!(why, "invalidations may have been missed: dropping this instance's L1");
    events.cache().invalidate_all_local();
    events.metrics().l1_dropped.inc();
}

fn apply(events: &Events, payload: &str) {
    let span = crate::work_span!("invalidation.fanout", event = tracing::field::Empty, tags = tracing::field::Empty);
    let _entered = span.enter();
    let Ok(note) = serde_json::from_str::<Invalidation>(payload) else {
        tracing::error!("unreadable invalidation; dropping L1 to stay correct");
        events.cache().invalidate_all_local();
        return;
    };
    span.record("event", note.id);
    span.record("tags", note.tags.len());
    // Before the L1 bump: a load that misses after it reads far enough.
    events.store().require(note.lsn);
    if note.origin == events.origin() {
        // Our own relay: this instance's L1 was invalidated before the
        // notify. Acknowledged for a writer elsewhere whose event this
        // relayed; a writer does not wait for its own acknowledgement.
        if !note.by_writer {
            events.visibility().applied(note.id);
        }
        return;
    }
    if note.all {
        events.cache().invalidate_all_local();
    } else {
        let tags: Vec<_> = note.tags.iter().filter_map(|t| cascade::decode(t)).collect();
        events.cache().invalidate_local(&tags);
    }
    events.visibility().applied(note.id);
    let lag = (Utc::now().timestamp_micros() - note.at_us).max(0) as f64 / 1e6;
    events.metrics().invalidation_lag.observe(lag);
    events.metrics().events_applied.inc();
}
