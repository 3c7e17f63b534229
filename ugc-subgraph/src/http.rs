//! HTTP surface: routes and tower layers, no business logic.
//!
//! | route | what |
//! | --- | --- |
//! | `POST /graphql` | GraphQL over HTTP (JSON) |
//! | `GET /graphql` | GraphiQL page (only with `UGC_GRAPHIQL=on`) |
//! | `GET /health/live` | the process answers |
//! | `GET /health/ready` | Postgres reachable and migrated |
//! | `GET /metrics` | Prometheus text exposition (here, or on `UGC_METRICS_LISTEN`) |
//! | `POST /events` | entity-change events from other subgraphs (bearer token) |
//!
//! The protection stack of `/graphql` and `/events` is set here, in one
//! place, cheapest first ([`layers`] explains each step). Probes and
//! metrics are never rate limited or shed: an orchestrator must see an
//! overloaded instance as alive.

pub mod auth;
mod cache_control;
pub mod client;
mod events;
mod graphiql;
mod graphql;
mod health;
pub mod layers;
mod observe;
pub mod state;

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use tokio::sync::Semaphore;
use tower_http::catch_panic::CatchPanicLayer;

use crate::http::state::AppState;

/// The service's router; `main` and the tests serve exactly this.
pub fn build_router(state: AppState) -> Router {
    let config = &state.config;
    let limits = &state.limits;
    let permits = Arc::new(Semaphore::new(config.http.max_concurrent_requests));

    // Layers added later run first: the rate limits, then shedding.
    let mut graphql_route = layers::shedding(post(graphql::execute), &permits, &state.metrics);
    let mut events_route = layers::shedding(post(events::receive), &permits, &state.metrics)
        .layer(DefaultBodyLimit::max(events::MAX_EVENTS_BODY_BYTES));
    if limits.enabled {
        graphql_route = graphql_route
            .layer::<_, Infallible>(from_fn_with_state(Arc::clone(limits), layers::shared_read_limit))
            .layer(layers::governor(&limits.read, layers::ClientKey));
        events_route = events_route
            .layer::<_, Infallible>(from_fn_with_state(Arc::clone(limits), layers::shared_events_limit))
            .layer(layers::governor(&limits.events, layers::EventsKey));
    }
    if config.http.graphiql {
        graphql_route = graphql_route.get(graphiql::page);
    }
    let mut router = Router::new()
        .route("/graphql", graphql_route)
        .route("/events", events_route)
        .route("/health/live", get(health::live))
        .route("/health/ready", get(health::ready));
    if config.http.metrics_listen.is_none() {
        router = router.route("/metrics", metrics_route());
    }
    router
        .layer(DefaultBodyLimit::max(config.http.max_body_bytes))
        .layer(from_fn_with_state(Arc::clone(&state.clients), layers::resolve_client))
        .layer(CatchPanicLayer::custom(graphql::panic_response))
        .layer(from_fn_with_state(state.clone(), observe::observe))
        .with_state(state)
}

/// `/metrics` alone, for `UGC_METRICS_LISTEN`.
pub fn metrics_router(state: AppState) -> Router {
    Router::new().route("/metrics", metrics_route()).with_state(state)
}

fn metrics_route() -> MethodRouter<AppState> {
    get(metrics)
}

async fn metrics(State(state): State<AppState>) -> Response {
    state.cache.export_gauges().await;
    state.metrics.export_process();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}
