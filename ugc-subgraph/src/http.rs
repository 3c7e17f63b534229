//! HTTP surface: routes and tower layers, no business logic.
//!
//! | route | what |
//! | --- | --- |
//! | `POST /graphql` | GraphQL over HTTP (JSON) |
//! | `GET /graphql` | GraphiQL page |
//! | `GET /health/live` | the process answers |
//! | `GET /health/ready` | Postgres reachable and migrated |
//! | `GET /metrics` | Prometheus text exposition |
//! | `POST /events` | entity-change events from other subgraphs (bearer token) |

pub mod auth;
mod events;
mod graphql;
mod health;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::state::AppState;

/// The service's router; `main` and the tests serve exactly this.
pub fn build_router(state: AppState) -> Router {
    let max_body = state.config.http.max_body_bytes;
    Router::new()
        .route("/graphql", get(graphql::graphiql).post(graphql::execute))
        .route("/events", axum::routing::post(events::receive))
        .route("/health/live", get(health::live))
        .route("/health/ready", get(health::ready))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(CatchPanicLayer::custom(graphql::panic_response))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

async fn metrics(State(state): State<AppState>) -> Response {
    state.cache.export_gauges();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}
