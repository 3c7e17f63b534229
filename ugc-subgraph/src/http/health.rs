//! Liveness and readiness probes.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::http::state::AppState;

pub async fn live() -> Json<Value> {
    Json(json!({ "status": "alive" }))
}

/// How long the Postgres check may take: a probe must be answered well
/// inside an orchestrator's usual 1 s time-out, even when Postgres hangs.
const POSTGRES_CHECK: Duration = Duration::from_millis(400);

/// Ready when Postgres answers and all migrations are applied, and the
/// instance is not draining for a shutdown.
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    if state.draining.load(std::sync::atomic::Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "draining: shutting down" })));
    }
    let postgres = match tokio::time::timeout(POSTGRES_CHECK, state.store.ready()).await {
        Ok(Ok(true)) => "ok",
        Ok(Ok(false)) => "migrations pending",
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: postgres check failed");
            "unreachable"
        }
        Err(_) => {
            tracing::warn!("readiness: postgres did not answer within 400 ms");
            "not answering (timed out after 400 ms)"
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
    // A replica is optional too: reads fall back to the primary.
    let replica = match state.store.replica_state() {
        crate::store::ReplicaState::NotConfigured => "not configured",
        crate::store::ReplicaState::Available => "ok",
        crate::store::ReplicaState::Unavailable => "unavailable (reading from the primary)",
    };
    let ready = postgres == "ok";
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({
        "status": if ready { "ready" } else { "not ready" },
        "postgres": postgres,
        "redis": redis,
        "replica": replica,
        "cache": if state.cache.enabled() { "on" } else { "off" },
    });
    (status, Json(body))
}
