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
    // Redis is optional: its state is reported, it never makes us unready.
    // The ping goes through the circuit breaker: while the circuit is open it
    // is skipped, and once half-open it is the probe that closes it again.
    state.cache.ping_l2().await;
    let redis = match state.cache.l2_state() {
        None => "not configured",
        Some(crate::cache::BreakerState::Closed) => "ok",
        Some(crate::cache::BreakerState::HalfOpen) => "recovering (circuit half-open)",
        Some(crate::cache::BreakerState::Open) => "unavailable (circuit open; serving from L1 + Postgres)",
    };
    let ready = postgres == "ok";
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({
        "status": if ready { "ready" } else { "not ready" },
        "postgres": postgres,
        "redis": redis,
        "cache": if state.cache.enabled() { "on" } else { "off" },
    });
    (status, Json(body))
}
