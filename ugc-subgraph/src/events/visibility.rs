//! Visible at acknowledgement: a mutation answers only once every live
//! instance has applied its invalidation, or has stopped serving its L1.
//!
//! The protocol, on Postgres alone (the service runs without Redis):
//! * **Registry.** Every instance upserts a heartbeat row each second
//!   (`store/instances.rs`) once its invalidation listener is up. The live
//!   set is the rows younger than the lease (`UGC_INSTANCE_LEASE_MS`, 3 s).
//! * **Acknowledgements.** Having applied an invalidation (or relayed
//!   another instance's write), an instance sends
//!   `NOTIFY ugc_ack '<origin> <event ids>'`. A
//!   writer registers for its event's acknowledgements *before* relaying it,
//!   reads the live set *after* the tokens moved, in the relay's last
//!   statement (`Store::finish_own_event`; so an instance registered later
//!   cannot hold an older value: it opened its L1 after the write was in L2
//!   and Postgres), then waits until all of them acknowledged, at most
//!   `UGC_WRITE_VISIBILITY_TIMEOUT_MS` (W).
//! * **Self-fencing.** An instance that does not acknowledge in time is
//!   treated as dead, and it must then behave as one: it serves its L1 (and
//!   rendered entities) only while it can prove it is caught up. Every W/4 it
//!   notifies a channel of its own with the send time; the notification
//!   comes back through the same listener, after every notification
//!   committed before it, so when the tick sent at t0 has been processed,
//!   every write committed before t0 has been applied. L1 is served at time t
//!   only if such a t0 > t − W exists ([`crate::cache::L1Gate`]). A writer
//!   that timed out answered at least W after its commit, so any read that
//!   follows its answer finds the lagging instance either caught up or not
//!   serving L1. The gate also closes when the instance's own heartbeat is
//!   older than two thirds of the lease: an instance writers no
//!   longer wait for never serves L1.
//!
//! It must never let a writer answer early on an incomplete live set: a
//! failed registry read waits the full W (the gates cover the rest).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::CoherenceConfig;
use crate::loaders::ReadCache;
use crate::store::Store;
use crate::telemetry::metrics::Metrics;

/// Channel carrying acknowledgements to every instance.
pub const ACK_CHANNEL: &str = "ugc_ack";
/// The instance lease (`UGC_INSTANCE_LEASE_MS`, default 3 s) is split in
/// three: a heartbeat every third; an instance serves L1 for two thirds
/// after a heartbeat *began* (the last third is the margin for clocks and
/// delivery); writers wait for instances whose heartbeat is younger than
/// the whole lease.
fn heartbeat_period(lease: Duration) -> Duration {
    lease / 3
}

fn registered_margin(lease: Duration) -> Duration {
    lease * 2 / 3
}
/// Rows of instances silent this long are deleted.
const FORGET: Duration = Duration::from_secs(3600);
/// Acknowledgement payloads stay under Postgres's 8000-byte limit.
const MAX_PAYLOAD: usize = 7_900;

struct Waiter {
    acked: HashSet<i64>,
    wake: Arc<Notify>,
}

pub struct Visibility {
    origin: i64,
    timeout: Duration,
    lease: Duration,
    tick_channel: String,
    store: Store,
    cache: ReadCache,
    metrics: Arc<Metrics>,
    waiters: Mutex<HashMap<i64, Waiter>>,
    acks: mpsc::UnboundedSender<i64>,
    acks_rx: Mutex<Option<mpsc::UnboundedReceiver<i64>>>,
    /// Set once a tick came back: the listener is up, registration may start.
    listening: Notify,
}

/// A writer's registration for one event's acknowledgements (removed when
/// dropped).
pub struct Pending<'a> {
    visibility: &'a Visibility,
    event: i64,
    wake: Arc<Notify>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.visibility.lock().remove(&self.event);
    }
}

impl Visibility {
    /// `timeout` zero: the protocol is off (no waits, no ticks, L1 always served).
    pub fn new(
        origin: u64,
        coherence: &CoherenceConfig,
        store: Store,
        cache: ReadCache,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (timeout, lease) = (coherence.write_visibility_timeout, coherence.instance_lease);
        if !timeout.is_zero() {
            cache.gate().require_sync();
        }
        let (acks, acks_rx) = mpsc::unbounded_channel();
        let origin = origin as i64;
        Self {
            origin,
            timeout,
            lease,
            tick_channel: format!("ugc_tick_{:x}", origin as u64),
            store,
            cache,
            metrics,
            waiters: Mutex::new(HashMap::new()),
            acks,
            acks_rx: Mutex::new(Some(acks_rx)),
            listening: Notify::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.timeout.is_zero()
    }

    /// This instance's tick channel (it alone listens to it).
    pub fn tick_channel(&self) -> &str {
        &self.tick_channel
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Waiter>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts collecting acknowledgements of `event`: call before relaying it.
    pub fn expect(&self, event: i64) -> Option<Pending<'_>> {
        if !self.enabled() {
            return None;
        }
        let wake = Arc::new(Notify::new());
        self.lock().insert(event, Waiter { acked: HashSet::new(), wake: Arc::clone(&wake) });
        Some(Pending { visibility: self, event, wake })
    }

    /// What the live set is read with: this instance (left out) and the
    /// lease. A writer's relay reads it in its last statement
    /// (`Store::finish_own_event`), after the tokens moved.
    pub fn live_query(&self) -> (i64, Duration) {
        (self.origin, self.lease)
    }

    /// Waits, after the event was relayed, until every live instance has
    /// acknowledged it, or the time-out. `live`: the live set as the relay
    /// read it after relaying; `None` reads it now.
    pub async fn wait(&self, pending: Pending<'_>, live: Option<Vec<i64>>) {
        let started = Instant::now();
        let deadline = started + self.timeout;
        let live = match live {
            Some(live) => Ok(live),
            None => self.store.live_instances(self.origin, self.lease).await,
        };
        let live = match live {
            Ok(live) => {
                self.metrics.instances_live.set(live.len() as i64 + 1);
                Some(live)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the live instances; waiting the whole visibility time-out");
                None
            }
        };
        let outcome = loop {
            let notified = pending.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // `None`: the live set is unknown, so nobody can be counted out.
            let missing: Option<Vec<i64>> = match (&live, self.lock().get(&pending.event)) {
                (Some(live), Some(waiter)) => {
                    Some(live.iter().filter(|o| !waiter.acked.contains(o)).copied().collect())
                }
                _ => None,
            };
            if missing.as_ref().is_some_and(Vec::is_empty) {
                break "acknowledged";
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                self.metrics.write_visibility_timeouts.inc();
                let missing = missing.map_or_else(
                    || "unknown (live set not read)".to_owned(),
                    |m| m.iter().map(|o| format!("{:x}", *o as u64)).collect::<Vec<_>>().join(","),
                );
                tracing::warn!(
                    event = pending.event,
                    instances = %missing,
                    "instances did not acknowledge a write in time; they serve no L1 until caught up"
                );
                break "timeout";
            }
        };
        self.metrics
            .write_visibility_wait
            .get_or_create(&[("outcome", outcome)])
            .observe(started.elapsed().as_secs_f64());
    }

    /// The fan-out applied `event` on this instance: acknowledge it.
    pub fn applied(&self, event: i64) {
        if self.enabled() {
            let _ = self.acks.send(event);
        }
    }

    /// An acknowledgement arrived (`<origin> <id>,<id>…`).
    pub fn on_ack(&self, payload: &str) {
        let Some((origin, ids)) = payload.split_once(' ') else { return };
        let Ok(origin) = origin.parse::<i64>() else { return };
        let mut waiters = self.lock();
        for id in ids.split(',').filter_map(|id| id.parse::<i64>().ok()) {
            if let Some(waiter) = waiters.get_mut(&id) {
                waiter.acked.insert(origin);
                waiter.wake.notify_waiters();
            }
        }
    }

    /// One of this instance's ticks came back through the listener.
    pub fn on_tick(&self, payload: &str) {
        let Ok(stamp) = payload.parse::<u64>() else { return };
        let gate = self.cache.gate();
        gate.synced(gate.instant(stamp), self.timeout);
        self.listening.notify_one();
    }

    /// Ticks, heartbeats and acknowledgements until `stop`; then leaves the
    /// live set (closing the L1 gate first).
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        if !self.enabled() {
            return;
        }
        let Some(acks) = self.acks_rx.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
        let ticks = tokio::spawn(Arc::clone(&self).tick(stop.clone()));
        let sender = tokio::spawn(Arc::clone(&self).send_acks(acks, stop.clone()));
        // Registered only once listening: a writer that counts this instance
        // live gets its acknowledgement.
        tokio::select! {
            () = stop.cancelled() => {}
            () = self.listening.notified() => self.heartbeats(&stop).await,
        }
        self.cache.gate().close();
        if let Err(e) = self.store.deregister(self.origin).await {
            tracing::warn!(error = %e, "cannot leave the live set; writers will wait for this instance until its lease ends");
        }
        let _ = tokio::join!(ticks, sender);
    }

    async fn heartbeats(&self, stop: &CancellationToken) {
        let mut every = tokio::time::interval(heartbeat_period(self.lease));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut beats = 0u64;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            let started = std::time::Instant::now();
            match self.store.heartbeat(self.origin).await {
                Ok(()) => self.cache.gate().registered(started, registered_margin(self.lease)),
                Err(e) => tracing::warn!(error = %e, "heartbeat failed; L1 closes if it keeps failing"),
            }
            beats += 1;
            if beats % 600 == 1 {
                let _ = self.store.forget_instances(FORGET).await;
            }
        }
    }

    async fn tick(self: Arc<Self>, stop: CancellationToken) {
        let mut every = tokio::time::interval((self.timeout / 4).max(Duration::from_millis(5)));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            // Stamped when sent: a tick proves nothing committed after it.
            let stamp = self.cache.gate().stamp(std::time::Instant::now());
            if let Err(e) = self.store.notify_now("tick", &self.tick_channel, &stamp.to_string()).await {
                tracing::debug!(error = %e, "tick failed");
            }
        }
    }

    async fn send_acks(self: Arc<Self>, mut acks: mpsc::UnboundedReceiver<i64>, stop: CancellationToken) {
        loop {
            let first = tokio::select! {
                () = stop.cancelled() => return,
                id = acks.recv() => match id { Some(id) => id, None => return },
            };
            // Everything applied meanwhile goes in the same notification.
            let mut payload = format!("{} {first}", self.origin);
            while let Ok(id) = acks.try_recv() {
                if payload.len() > MAX_PAYLOAD {
                    self.send_ack(&payload).await;
                    payload = format!("{} {id}", self.origin);
                } else {
                    payload.push(',');
                    payload.push_str(&id.to_string());
                }
            }
            self.send_ack(&payload).await;
        }
    }

    async fn send_ack(&self, payload: &str) {
        match self.store.notify_now("ack", ACK_CHANNEL, payload).await {
            Ok(()) => {
                self.metrics.visibility_acks_sent.inc();
            }
            // The writer times out; this instance's gate covers the rest.
            Err(e) => tracing::warn!(error = %e, "acknowledgement not sent"),
        }
    }
}
