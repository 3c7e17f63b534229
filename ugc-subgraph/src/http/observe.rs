//! The outermost layer: one span per request (continuing the caller's W3C
//! trace, answered with `traceresponse`) and responses counted by route
//! and status class. Routes are the fixed set this service serves, so the
//! labels stay bounded whatever paths clients send.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use crate::http::state::AppState;
use crate::telemetry::traces;

/// The label of a path: one of the routes, or `other`.
fn route(path: &str) -> &'static str {
    match path {
        "/graphql" => "/graphql",
        "/events" => "/events",
        "/health/live" => "/health/live",
        "/health/ready" => "/health/ready",
        "/metrics" => "/metrics",
        _ => "other",
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

pub async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = route(request.uri().path());
    let span = traces::request_span(request.headers(), || {
        tracing::debug_span!(
            "http.request",
            otel.name = %format_args!("{} {route}", request.method()),
            otel.kind = "server",
            http.request.method = %request.method(),
            http.route = route,
            http.response.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        )
    });
    let mut response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    state.metrics.http_responses.get_or_create(&[("route", route), ("status", status_class(status))]).inc();
    if !span.is_disabled() {
        span.record("http.response.status_code", status);
        if status >= 500 {
            span.record("otel.status_code", "ERROR");
        }
        if let Some(value) = traces::trace_response(&span) {
            response.headers_mut().insert("traceresponse", value);
        }
    }
    response
}
