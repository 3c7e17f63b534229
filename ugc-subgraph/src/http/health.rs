//! Liveness and readiness probes.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::state::AppState;

pub async fn live() -> Json<Value> {
    Json(json!({ "status": "alive" }))
}

/// Ready when Postgres answers and all migrations are applied.
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let postgres = match state.store.ready().await {
        Ok(true) => "ok",
        Ok(false) => "migrations pending",
        Err(e) => {
            tracing::warn!(error = %e, "readiness: postgres check failed");
            "unreachable"
        }
    };
    let ready = postgres == "ok";
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ready { "ready" } else { "not ready" },
        "postgres": postgres,
        "redis": if state.config.redis_url.is_some() { "configured" } else { "not configured" },
    });
    (status, Json(body))
}
