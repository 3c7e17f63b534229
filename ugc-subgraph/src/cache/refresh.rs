//! Background refresh: stale-while-revalidate and XFetch early refreshes,
//! batched off the request path. A refresh reloads through L2 and the
//! source (never from L1, which holds the value being replaced).

use std::sync::Weak;

use tokio::sync::mpsc;

use super::{CacheKey, Inner, Source, Through};

/// Why a key is refreshed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Refresh {
    /// Served stale: L2 may already hold a fresher value.
    Stale,
    /// XFetch: still fresh here, and L2 holds the same ageing value, so
    /// the source is read.
    Early,
}

impl Refresh {
    fn label(self) -> &'static str {
        match self {
            Self::Stale => "stale",
            Self::Early => "early",
        }
    }

    fn through(self) -> Through {
        match self {
            Self::Stale => Through::L2,
            Self::Early => Through::SourceOnly,
        }
    }
}

impl<S: Source> Inner<S> {
    pub(super) fn schedule_refresh(&self, key: &CacheKey, why: Refresh) {
        let queued = self.refreshing.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone());
        if queued {
            self.metrics.refreshes.get_or_create(&[("trigger", why.label())]).inc();
            let _ = self.refresh_tx.send((key.clone(), why));
        }
    }
}

/// Batches queued keys and reloads them.
pub(super) async fn refresher<S: Source>(inner: Weak<Inner<S>>, mut rx: mpsc::UnboundedReceiver<(CacheKey, Refresh)>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 200 {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        for why in [Refresh::Stale, Refresh::Early] {
            let keys: Vec<CacheKey> = batch.iter().filter(|(_, w)| *w == why).map(|(k, _)| k.clone()).collect();
            if !keys.is_empty() && inner.load_through(&keys, why.through()).await.is_err() {
                tracing::debug!(keys = keys.len(), "background refresh failed; stale values stay until max_stale");
            }
        }
        let mut refreshing = inner.refreshing.lock().unwrap_or_else(|e| e.into_inner());
        for (key, _) in &batch {
            refreshing.remove(key);
        }
    }
}
