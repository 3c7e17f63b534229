//! The protection stack's tower layers and the responses of what they
//! refuse (SPEC §6). Cheapest first — the order is set in [`super::build_router`]:
//!
//! 1. the connection loop (`server`): a cap on open connections, a
//!    header-read timeout;
//! 2. [`resolve_client`]: who the client is ([`ClientAddr`]);
//! 3. the per-instance read limit (tower-governor), then the shared read
//!    budget ([`shared_read_limit`]): a refused request is not read further;
//! 4. the concurrency limit with load shedding ([`shedding`]): 503 at once
//!    instead of an unbounded queue;
//! 5. the body limit; then, in the handler, parsing, the cost checks and
//!    the write limits, and only then execution.
//!
//! Nothing here reads a body, parses GraphQL or touches a cache.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::MethodRouter;
use tokio::sync::Semaphore;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;
use tower::{BoxError, ServiceBuilder};
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::KeyExtractor;
use tower_governor::{GovernorError, GovernorLayer};

use super::client::{ClientAddr, ClientResolver};
use crate::config::Quota;
use crate::http::state::AppState;
use crate::ratelimit::{fingerprint, Limit, RateLimits, Refusal};
use crate::telemetry::metrics::Metrics;

/// How often the per-instance limiters drop the state of idle clients.
const FORGET_IDLE_CLIENTS: Duration = Duration::from_secs(60);

/// A GraphQL-shaped error body.
pub fn error_body(code: &str, message: &str) -> serde_json::Value {
    serde_json::json!({ "errors": [{ "message": message, "extensions": { "code": code } }] })
}

pub fn json(status: StatusCode, body: &serde_json::Value) -> Response {
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// 429 with `Retry-After`, the `RateLimit-*` headers, and a body a client
/// can act on: which quota, its setting, when to come back.
pub fn too_many_requests(refusal: &Refusal) -> Response {
    let retry = refusal.retry_after_secs();
    let Quota { per_sec, burst } = refusal.quota;
    let message = format!(
        "rate limit exceeded: the {} quota allows {per_sec} requests per second (bursts of {burst}); \
         retry after {retry} s (configured by {})",
        refusal.limit, refusal.setting
    );
    let body = serde_json::json!({ "errors": [{ "message": message, "extensions": {
        "code": "RATE_LIMITED", "retryAfter": retry, "limit": refusal.limit } }] });
    let mut response = json(StatusCode::TOO_MANY_REQUESTS, &body);
    let h = response.headers_mut();
    h.insert(header::RETRY_AFTER, HeaderValue::from(retry));
    h.insert("ratelimit-limit", HeaderValue::from(burst));
    h.insert("ratelimit-remaining", HeaderValue::from(0));
    h.insert("ratelimit-reset", HeaderValue::from(retry));
    if let Ok(policy) =
        HeaderValue::from_str(&format!("{burst};w={};policy=\"{}\"", burst.div_ceil(per_sec), refusal.limit))
    {
        h.insert("ratelimit-policy", policy);
    }
    response
}

/// A refusal sent before the request body was read: the connection cannot
/// be reused (its unread body is in the way), so the client is told to
/// open a new one instead of finding this one closed under its next request.
fn unread(mut response: Response) -> Response {
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// 503 with `Retry-After`: the service is overloaded or a dependency is.
pub fn unavailable(message: &str) -> Response {
    let mut response = json(StatusCode::SERVICE_UNAVAILABLE, &error_body("SERVICE_UNAVAILABLE", message));
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
    response
}

/// Sets [`ClientAddr`] on every request.
pub async fn resolve_client(State(clients): State<Arc<ClientResolver>>, request: Request, next: Next) -> Response {
    next.run(clients.resolve(request)).await
}

fn client_of(request: &Request) -> IpAddr {
    request.extensions().get::<ClientAddr>().map_or(IpAddr::from([127, 0, 0, 1]), |c| c.0)
}

/// The read budget shared by all instances (after the per-instance one).
pub async fn shared_read_limit(State(limits): State<Arc<RateLimits>>, request: Request, next: Next) -> Response {
    match limits.read.check_shared(&client_of(&request).to_string()).await {
        Ok(()) => next.run(request).await,
        Err(refusal) => unread(too_many_requests(&refusal)),
    }
}

/// The events budget shared by all instances (after the per-instance one).
pub async fn shared_events_limit(State(limits): State<Arc<RateLimits>>, request: Request, next: Next) -> Response {
    match limits.events.check_shared(&EventsKey::key(&request)).await {
        Ok(()) => next.run(request).await,
        Err(refusal) => unread(too_many_requests(&refusal)),
    }
}

/// Keys requests by [`ClientAddr`] for tower-governor.
#[derive(Debug, Clone, Copy)]
pub struct ClientKey;

impl KeyExtractor for ClientKey {
    type Key = IpAddr;

    fn extract<T>(&self, request: &axum::http::Request<T>) -> Result<IpAddr, GovernorError> {
        Ok(request.extensions().get::<ClientAddr>().map_or(IpAddr::from([127, 0, 0, 1]), |c| c.0))
    }
}

/// Keys `/events` requests by their bearer token (fingerprinted, never
/// stored), or by client address when they carry none.
#[derive(Debug, Clone, Copy)]
pub struct EventsKey;

impl EventsKey {
    fn key<T>(request: &axum::http::Request<T>) -> String {
        match bearer(request.headers()) {
            Some(token) => format!("t{}", fingerprint(token)),
            None => {
                format!("a{}", request.extensions().get::<ClientAddr>().map_or(IpAddr::from([127, 0, 0, 1]), |c| c.0))
            }
        }
    }
}

impl KeyExtractor for EventsKey {
    type Key = String;

    fn extract<T>(&self, request: &axum::http::Request<T>) -> Result<String, GovernorError> {
        Ok(Self::key(request))
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
}

/// The per-instance limit of `limit` as a tower-governor layer, keyed by `K`.
pub fn governor<K>(limit: &Arc<Limit>, key: K) -> GovernorLayer<K, governor::middleware::NoOpMiddleware, Body>
where
    K: KeyExtractor + Send + Sync + 'static,
    K::Key: Send + Sync,
{
    let Quota { per_sec, burst } = limit.quota;
    let config = GovernorConfigBuilder::default()
        .key_extractor(key)
        .period(Duration::from_nanos(1_000_000_000 / u64::from(per_sec.max(1))).max(Duration::from_nanos(1)))
        .burst_size(burst.max(1))
        .finish()
        .expect("a period and a burst above zero");
    // Clients that went quiet are forgotten (bounded memory), until the
    // router holding the limiter is dropped.
    let limiter = Arc::downgrade(config.limiter());
    tokio::spawn(async move {
        let mut every = tokio::time::interval(FORGET_IDLE_CLIENTS);
        every.tick().await;
        loop {
            every.tick().await;
            let Some(limiter) = limiter.upgrade() else { return };
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    });
    let limit = Arc::clone(limit);
    GovernorLayer::new(config).error_handler(move |error| match error {
        GovernorError::TooManyRequests { wait_time, .. } => {
            unread(too_many_requests(&limit.refused_locally(Duration::from_secs(wait_time))))
        }
        _ => json(StatusCode::INTERNAL_SERVER_ERROR, &error_body("INTERNAL_SERVER_ERROR", "internal error")),
    })
}

/// At most `permits` requests execute at once across the routes given the
/// same semaphore; one more is answered 503 at once (shed), not queued.
pub fn shedding(
    route: MethodRouter<AppState>,
    permits: &Arc<Semaphore>,
    metrics: &Arc<Metrics>,
) -> MethodRouter<AppState> {
    let metrics = Arc::clone(metrics);
    route.layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(move |_: BoxError| {
                let metrics = Arc::clone(&metrics);
                async move {
                    metrics.load_shed.inc();
                    unread(unavailable(
                        "the service is at its concurrency limit (UGC_MAX_CONCURRENT_REQUESTS); retry shortly",
                    ))
                }
            }))
            .layer(LoadShedLayer::new())
            .layer(GlobalConcurrencyLimitLayer::with_semaphore(Arc::clone(permits))),
    )
}
