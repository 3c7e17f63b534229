//! Single-flight on one instance: concurrent misses of one key cause one
//! load; the others wait for the leader's fill (released when its guard
//! drops, also when the load fails).

use tokio::sync::watch;

use super::{CacheKey, Inner, Source};

/// Releases single-flight claims when the leader is done (or fails).
pub(super) struct ClaimGuard<'a, S: Source> {
    inner: &'a Inner<S>,
    keys: Vec<CacheKey>,
    _senders: Vec<watch::Sender<()>>,
}

impl<S: Source> Drop for ClaimGuard<'_, S> {
    fn drop(&mut self) {
        let mut inflight = self.inner.inflight.lock().unwrap_or_else(|e| e.into_inner());
        for key in &self.keys {
            inflight.remove(key);
        }
        // Dropping the senders (after this) wakes every waiter.
    }
}

/// What a batch of missing keys splits into.
pub(super) struct Claims<'a, S: Source> {
    /// Keys nobody on this instance is loading: this caller loads them.
    pub lead: Vec<CacheKey>,
    /// Keys another request is loading, with what to wait on.
    pub waits: Vec<(CacheKey, watch::Receiver<()>)>,
    /// Held while the lead keys load.
    pub guard: ClaimGuard<'a, S>,
}

impl<S: Source> Inner<S> {
    pub(super) fn claim(&self, keys: Vec<CacheKey>) -> Claims<'_, S> {
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        let (mut lead, mut waits, mut senders) = (Vec::new(), Vec::new(), Vec::new());
        for key in keys {
            match inflight.get(&key) {
                Some(rx) => waits.push((key, rx.clone())),
                None => {
                    let (tx, rx) = watch::channel(());
                    inflight.insert(key.clone(), rx);
                    senders.push(tx);
                    lead.push(key);
                }
            }
        }
        let guard = ClaimGuard { inner: self, keys: lead.clone(), _senders: senders };
        Claims { lead, waits, guard }
    }
}
