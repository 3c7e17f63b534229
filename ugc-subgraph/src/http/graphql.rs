//! `POST /graphql` per the GraphQL-over-HTTP spec, and the GraphiQL page.
//!
//! Requests that never reach GraphQL execution (wrong content type, body too
//! large, malformed JSON, invalid UTF-8) get a GraphQL-shaped JSON error with
//! a 4xx status. Responses are `application/json` unless the client's
//! `Accept` asks for `application/graphql-response+json`, in which case a
//! request error (parse or validation, no data) is sent with status 400.

use std::any::Any;
use std::time::Instant;

use async_graphql::{BatchRequest, BatchResponse, ErrorExtensionValues, Value};
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};

use crate::graphql::RequestAuth;
use crate::state::AppState;

const JSON: &str = "application/json";
const GRAPHQL_RESPONSE_JSON: &str = "application/graphql-response+json";

pub async fn graphiql() -> Html<String> {
    Html(async_graphql::http::GraphiQLSource::build().endpoint("/graphql").finish())
}

pub async fn execute(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let format = negotiate(&headers);
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or(JSON);
    if !content_type.to_ascii_lowercase().starts_with(JSON) {
        return reject(
            &state,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "BAD_REQUEST",
            "content-type must be application/json",
        );
    }
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let limit = state.config.http.max_body_bytes;
            return reject(
                &state,
                StatusCode::PAYLOAD_TOO_LARGE,
                "PAYLOAD_TOO_LARGE",
                &format!("request body exceeds {limit} bytes"),
            );
        }
        Err(rejection) => return reject(&state, StatusCode::BAD_REQUEST, "BAD_REQUEST", &rejection.body_text()),
    };
    let batch: BatchRequest = match serde_json::from_slice(&body) {
        Ok(batch) => batch,
        Err(e) => {
            return reject(&state, StatusCode::BAD_REQUEST, "BAD_REQUEST", &format!("malformed request body: {e}"))
        }
    };
    if requests(&batch).any(|r| r.query.trim().is_empty()) {
        return reject(&state, StatusCode::BAD_REQUEST, "BAD_REQUEST", "the request has no `query`");
    }
    let operation = operation_kind(&batch);
    let auth = RequestAuth(state.auth.viewer(&headers));

    state.metrics.in_flight.inc();
    let started = Instant::now();
    // The gateway's entity fetches may be answered from rendered fragments.
    if let BatchRequest::Single(request) = &batch {
        let cached = tokio::time::timeout(
            state.config.http.request_timeout,
            state.entity_cache.execute(&state.schema, request, &auth),
        )
        .await;
        if let Ok(Some(body)) = cached {
            state.metrics.in_flight.dec();
            observe(&state, operation, "ok", started);
            return raw_json_response(format, body);
        }
    }
    let batch = batch.data(auth);
    let outcome = tokio::time::timeout(state.config.http.request_timeout, state.schema.execute_batch(batch)).await;
    state.metrics.in_flight.dec();
    let Ok(mut response) = outcome else {
        observe(&state, operation, "timeout", started);
        return reject(&state, StatusCode::GATEWAY_TIMEOUT, "TIMEOUT", "request timed out");
    };
    let request_error = add_default_codes(&mut response);
    observe(&state, operation, if response.is_ok() { "ok" } else { "error" }, started);

    let status =
        if format == GRAPHQL_RESPONSE_JSON && request_error { StatusCode::BAD_REQUEST } else { StatusCode::OK };
    json_response(status, format, &response)
}

fn observe(state: &AppState, operation: &'static str, outcome: &'static str, started: Instant) {
    state
        .metrics
        .graphql_seconds
        .get_or_create(&[("operation", operation), ("outcome", outcome)])
        .observe(started.elapsed().as_secs_f64());
}

fn requests(batch: &BatchRequest) -> impl Iterator<Item = &async_graphql::Request> {
    match batch {
        BatchRequest::Single(r) => std::slice::from_ref(r).iter(),
        BatchRequest::Batch(rs) => rs.iter(),
    }
}

/// `query` or `mutation`: a bounded label, not the client's operation name.
fn operation_kind(batch: &BatchRequest) -> &'static str {
    match requests(batch).next().map(|r| r.query.trim_start()) {
        Some(q) if q.starts_with("mutation") => "mutation",
        _ => "query",
    }
}

/// Gives every error without a code one: errors of our resolvers always have
/// one, so what is left comes from async-graphql itself. A value of the wrong
/// type (literal or variable) is `BAD_USER_INPUT`, as Apollo Server reports
/// it; other request errors (syntax, unknown fields, depth and complexity
/// limits: no data) are `GRAPHQL_VALIDATION_FAILED`.
/// Returns whether any response is a request error.
fn add_default_codes(response: &mut BatchResponse) -> bool {
    let responses: Vec<&mut async_graphql::Response> = match response {
        BatchResponse::Single(r) => vec![r],
        BatchResponse::Batch(rs) => rs.iter_mut().collect(),
    };
    let mut request_error = false;
    for r in responses {
        let no_data = matches!(r.data, Value::Null);
        request_error |= no_data && !r.errors.is_empty();
        for error in &mut r.errors {
            let has_code = error.extensions.as_ref().is_some_and(|e| e.get("code").is_some());
            let wrong_value = error.message.starts_with("Invalid value for argument");
            let code = match (wrong_value, has_code) {
                (true, _) => "BAD_USER_INPUT",
                (false, true) => continue,
                (false, false) if no_data => "GRAPHQL_VALIDATION_FAILED",
                (false, false) => "BAD_USER_INPUT",
            };
            error.extensions.get_or_insert_with(ErrorExtensionValues::default).set("code", code);
        }
    }
    request_error
}

fn negotiate(headers: &HeaderMap) -> &'static str {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    if accept.contains(GRAPHQL_RESPONSE_JSON) {
        GRAPHQL_RESPONSE_JSON
    } else {
        JSON
    }
}

fn json_response(status: StatusCode, content_type: &'static str, body: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => {
            let mut response = Response::new(Body::from(bytes));
            *response.status_mut() = status;
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            response
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn raw_json_response(content_type: &'static str, body: String) -> Response {
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn error_body(code: &str, message: &str) -> serde_json::Value {
    serde_json::json!({ "errors": [{ "message": message, "extensions": { "code": code } }] })
}

/// A rejection before execution, shaped like a GraphQL response.
fn reject(state: &AppState, status: StatusCode, code: &'static str, message: &str) -> Response {
    state.metrics.http_rejections.get_or_create(&[("reason", code)]).inc();
    json_response(status, JSON, &error_body(code, message))
}

/// A panic in a handler: logged, answered as an internal error.
pub fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    tracing::error!(panic = detail, "handler panicked");
    json_response(StatusCode::INTERNAL_SERVER_ERROR, JSON, &error_body("INTERNAL_SERVER_ERROR", "internal error"))
}
