//! `POST /events`: entity-change events from other subgraphs, authenticated
//! with the bearer token `UGC_EVENTS_TOKEN` (the endpoint answers 503 when
//! none is configured). Bad bodies get 4xx and change nothing.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::events::external::{ApplyError, Batch};
use crate::http::state::AppState;

/// Largest body: 100 events of the longest keys and ids fit in a quarter of this.
pub const MAX_EVENTS_BODY_BYTES: usize = 64 * 1024;

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "errors": [{ "message": message, "extensions": { "code": code } }] }))).into_response()
}

/// Compares in time independent of where the strings differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some(expected) = state.config.events_token.as_deref() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "NOT_CONFIGURED",
            "the events endpoint is disabled (UGC_EVENTS_TOKEN)",
        );
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !same(presented.as_bytes(), expected.as_bytes()) {
        return error(StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", "a valid bearer token is required");
    }
    let body = match body {
        Ok(body) => body,
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "PAYLOAD_TOO_LARGE",
                &format!("an events body is at most {MAX_EVENTS_BODY_BYTES} bytes; send fewer events per request"),
            )
        }
        Err(r) => return error(r.status(), "BAD_REQUEST", &r.body_text()),
    };
    let batch: Batch = match serde_json::from_slice(&body) {
        Ok(batch) => batch,
        Err(e) => return error(StatusCode::BAD_REQUEST, "BAD_USER_INPUT", &format!("malformed events: {e}")),
    };
    let events = match batch.validate() {
        Ok(events) => events,
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, "BAD_USER_INPUT", &e.to_string()),
    };
    match state.events.apply_external(events).await {
        Ok(applied) => (StatusCode::OK, Json(applied)).into_response(),
        Err(e @ ApplyError::KeyReused { .. }) => error(StatusCode::CONFLICT, "CONFLICT", &e.to_string()),
        Err(ApplyError::Store(e)) => {
            tracing::error!(error = %e, "applying external events failed");
            error(StatusCode::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE", "events could not be applied; redeliver them")
        }
    }
}
