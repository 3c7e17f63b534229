//! Forwards applied invalidations to a router in front: Apollo Router's
//! response-cache invalidation endpoint (`POST /invalidation`, body
//! `[{"kind":"cache_tag","subgraphs":[<name>],"cache_tag":<tag>}, …]`,
//! `Authorization: <shared_key>`), so that what the router cached from our
//! answers (tagged by `http/cache_control.rs` with the same public names)
//! goes when our caches' entries go.
//!
//! Not before every instance's L1 has let go: the relay hands tags over
//! after the commit that notifies the instances, and the worker sends them
//! one write-visibility window (`UGC_WRITE_VISIBILITY_TIMEOUT_MS`) later.
//! By then each instance applied the invalidation or has its L1 fenced
//! (`cache/gate.rs`), so a router refetching at once gets the new value,
//! never an old one to keep for a whole `max-age`.
//!
//! Off the write path: the relay hands tags over without waiting; a worker
//! coalesces them (at most [`MAX_TAGS_PER_REQUEST`] per request) and retries
//! a failed request [`ATTEMPTS`] times. What it cannot deliver is counted
//! and logged; the router's copy then lives until its `max-age` (our
//! freshness), which bounds the damage. Never blocks or fails a write.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderValue, Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

use super::cascade;
use crate::cache::Tag;
use crate::config::RouterCacheConfig;
use crate::telemetry::metrics::Metrics;

/// Tags queued at most (beyond, they are dropped and counted).
const QUEUE: usize = 100_000;
pub const MAX_TAGS_PER_REQUEST: usize = 500;
const ATTEMPTS: u32 = 4;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// The sending half; cheap to clone.
#[derive(Clone)]
pub struct RouterInvalidation {
    queue: mpsc::Sender<(Instant, String)>,
    /// How long after the notifying commit a tag may be sent.
    delay: Duration,
    metrics: Arc<Metrics>,
}

impl RouterInvalidation {
    /// Starts the worker when `UGC_ROUTER_INVALIDATION_URL` is set. Must
    /// run inside the Tokio runtime.
    pub fn start(config: &RouterCacheConfig, visibility: Duration, metrics: &Arc<Metrics>) -> Option<Self> {
        let (url, secret) = (config.invalidation_url.clone()?, config.invalidation_secret.clone()?);
        let secret = HeaderValue::from_str(&secret).ok()?;
        let (queue, rx) = mpsc::channel(QUEUE);
        let worker = Worker {
            client: Client::builder(TokioExecutor::new()).build_http(),
            url,
            secret,
            subgraph: config.subgraph_name.clone(),
            metrics: Arc::clone(metrics),
        };
        tokio::spawn(worker.run(rx));
        // With visibility waits off there is no window to rely on: the
        // fan-out's usual lag, with room.
        let delay = visibility.max(Duration::from_millis(100)) + Duration::from_millis(10);
        Some(Self { queue, delay, metrics: Arc::clone(metrics) })
    }

    /// Queues `tags` for the router; never waits.
    pub fn forward(&self, tags: &[Tag]) {
        let not_before = Instant::now() + self.delay;
        for tag in tags {
            if self.queue.try_send((not_before, cascade::public_name(tag))).is_err() {
                self.metrics.router_invalidations.get_or_create(&[("outcome", "dropped")]).inc();
            }
        }
    }
}

struct Worker {
    client: Client<HttpConnector, Body>,
    url: String,
    secret: HeaderValue,
    subgraph: String,
    metrics: Arc<Metrics>,
}

impl Worker {
    async fn run(self, mut rx: mpsc::Receiver<(Instant, String)>) {
        let mut queued = Vec::with_capacity(MAX_TAGS_PER_REQUEST);
        // Ends when every sender is gone (the process is stopping).
        while rx.recv_many(&mut queued, MAX_TAGS_PER_REQUEST).await > 0 {
            // In queue order: the last one is due last.
            if let Some(&(due, _)) = queued.last() {
                tokio::time::sleep_until(due.into()).await;
            }
            let mut tags: Vec<String> = queued.drain(..).map(|(_, tag)| tag).collect();
            tags.sort_unstable();
            tags.dedup();
            let outcome = self.send(&tags).await;
            self.metrics.router_invalidations.get_or_create(&[("outcome", outcome)]).inc_by(tags.len() as u64);
        }
    }

    /// One request for `tags`, retried with back-off: `sent` or `failed`.
    async fn send(&self, tags: &[String]) -> &'static str {
        let body: Vec<serde_json::Value> = tags
            .iter()
            .map(|tag| serde_json::json!({ "kind": "cache_tag", "subgraphs": [self.subgraph], "cache_tag": tag }))
            .collect();
        let body = serde_json::to_vec(&body).unwrap_or_default();
        let mut pause = Duration::from_millis(100);
        for attempt in 1..=ATTEMPTS {
            let request = Request::builder()
                .method(Method::POST)
                .uri(&self.url)
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::AUTHORIZATION, self.secret.clone())
                .body(Body::from(body.clone()));
            let Ok(request) = request else { return "failed" };
            match tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(request)).await {
                Ok(Ok(response)) if response.status().is_success() => return "sent",
                Ok(Ok(response)) if response.status().is_client_error() => {
                    // A wrong secret or URL: retrying cannot help.
                    tracing::error!(status = %response.status(), tags = tags.len(), "router refused our invalidation");
                    return "failed";
                }
                outcome => {
                    let why = match outcome {
                        Ok(Ok(response)) => response.status().to_string(),
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => "timeout".to_owned(),
                    };
                    tracing::warn!(attempt, error = why, "router invalidation failed; retrying");
                }
            }
            if attempt < ATTEMPTS {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
        }
        tracing::error!(tags = tags.len(), "router invalidation undelivered; its copies live until their max-age");
        "failed"
    }
}
