//! `POST /graphql` per the GraphQL-over-HTTP spec.
//!
//! Requests that never reach GraphQL execution (missing or wrong content
//! type, body too large, malformed JSON, invalid UTF-8, too many operations,
//! over a cost limit, over the write quota) get a GraphQL-shaped JSON error
//! with a 4xx status. Responses are `application/json` unless the client's
//! `Accept` asks for `application/graphql-response+json`, in which case a
//! request error (parse or validation, no data) is sent with status 400. A
//! response whose only errors are `SERVICE_UNAVAILABLE` and that carries no
//! data is a 503 with `Retry-After`, so a gateway or client can retry it.

use std::any::Any;
use std::time::Instant;

use async_graphql::{BatchRequest, BatchResponse, ErrorExtensionValues, Value};
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use tracing::Instrument;

use super::cache_control;
use super::client::ClientAddr;
use super::layers::{error_body, too_many_requests};
use crate::graphql::cost::{self, Admitted, CostError, Verdict};
use crate::graphql::entity_cache::Served;
use crate::graphql::raw_request::RawRequest;
use crate::graphql::{IdempotencyHeader, RequestAuth};
use crate::http::state::AppState;
use crate::loaders::{recording, Recorder};

const JSON: &str = "application/json";
/// Only a safety net for mutations (see `execute`): far above what their
/// few statements, each under `UGC_DB_STATEMENT_TIMEOUT_MS`, can take.
const MUTATION_TIMEOUT_CEILING: std::time::Duration = std::time::Duration::from_secs(300);
const GRAPHQL_RESPONSE_JSON: &str = "application/graphql-response+json";

pub async fn execute(
    State(state): State<AppState>,
    client: Option<Extension<ClientAddr>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let format = negotiate(&headers);
    // A POST without a JSON content type is refused, not guessed at: a
    // form or text/plain POST is what a browser sends cross-site without a
    // preflight (CSRF).
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !content_type.to_ascii_lowercase().starts_with(JSON) {
        let sent = if content_type.is_empty() { "none was sent".to_owned() } else { format!("got {content_type:?}") };
        return reject(
            &state,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "BAD_REQUEST",
            &format!("content-type must be application/json ({sent})"),
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
    if let Some(response) = from_fragments(&state, &headers, &body, format) {
        return response;
    }
    let batch = match parse_body(&body) {
        Ok(batch) => batch,
        Err(e) => {
            return reject(&state, StatusCode::BAD_REQUEST, "BAD_REQUEST", &format!("malformed request body: {e}"))
        }
    };
    if requests(&batch).any(|r| r.query.trim().is_empty()) {
        return reject(&state, StatusCode::BAD_REQUEST, "BAD_REQUEST", "the request has no `query`");
    }
    // Cost limits, before anything is executed.
    let admitted = match admit(&state, &batch) {
        Ok(admitted) => admitted,
        Err(error) => {
            state.metrics.cost_rejections.get_or_create(&[("limit", error.label())]).inc();
            return reject(&state, StatusCode::BAD_REQUEST, error.code(), &error.to_string());
        }
    };
    let idempotency = match idempotency_header(&headers) {
        Ok(key) => key,
        Err(message) => return reject(&state, StatusCode::BAD_REQUEST, "BAD_USER_INPUT", message),
    };
    let auth = RequestAuth(state.auth.viewer(&headers));
    if admitted.mutation && state.limits.enabled {
        let client = client.map_or_else(|| "127.0.0.1".to_owned(), |Extension(c)| c.0.to_string());
        let user = auth.0.as_ref().ok().and_then(|v| v.user_id());
        if let Err(refusal) = state.limits.check_write(&client, user).await {
            return too_many_requests(&refusal);
        }
    }
    let operation = if admitted.mutation { "mutation" } else { "query" };
    let span = crate::child_span!(
        "graphql.operation",
        otel.name = %format_args!("{operation} {}", operation_name(&batch)),
        graphql.operation.type = operation,
        graphql.operation.name = operation_name(&batch),
        graphql.operations = requests(&batch).count(),
    );
    run(state, batch, auth, idempotency, admitted, format).instrument(span).await
}

/// The answer of a request whose every entity has a current rendered
/// fragment, read straight from the body ([`RawRequest`]) under the same
/// cost limits. `None`: the body goes the whole way, which also answers
/// every refusal (this path only ever serves). Its operation span is
/// recorded once it has served: one that did not serve leaves no trace.
fn from_fragments(state: &AppState, headers: &HeaderMap, body: &[u8], format: &'static str) -> Option<Response> {
    let started = Instant::now();
    let request = RawRequest::parse(body)?;
    let variables = request.variables();
    if request.query.trim().is_empty() || idempotency_header(headers).is_err() {
        return None;
    }
    let limits = state.cost.limits();
    let Verdict::Analysed(analysis) = state.cost.analyse(&request.query) else { return None };
    let hits = state.entity_cache.hits(&request, variables, limits.max_representations)?;
    let operation = request.operation_name.as_deref();
    let admitted = analysis.as_ref().as_ref().ok()?.admit(operation, variables, limits).ok()?;
    if admitted.mutation || cost::check_request(1, admitted.cost, limits).is_err() {
        return None;
    }
    let served = state.entity_cache.serve(hits);
    let name = operation.unwrap_or("anonymous");
    let _span = crate::child_span!(
        "graphql.operation",
        otel.name = %format_args!("query {name}"),
        graphql.operation.type = "query",
        graphql.operation.name = name,
        graphql.operations = 1,
    )
    .entered();
    observe(state, "query", state.config.metrics_operations.label(name), "ok", started);
    Some(fragments_response(format, served))
}

/// One request (a JSON object) or a batch (a non-empty array of them).
///
/// Not `BatchRequest`'s own `Deserialize`: it is `#[serde(untagged)]`, so
/// serde first copies the whole body into its generic `Content` tree and
/// then deserialises that — 12.6 % of the CPU of an answer served from
/// rendered fragments (7.5 % the copy alone; perf, 20-offer batches). The
/// first byte decides instead, and the error names what was wrong.
fn parse_body(body: &[u8]) -> Result<BatchRequest, serde_json::Error> {
    use serde::de::Error as _;
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => match serde_json::from_slice::<Vec<async_graphql::Request>>(body)? {
            batch if batch.is_empty() => Err(serde_json::Error::custom("the batch holds no request")),
            batch => Ok(BatchRequest::Batch(batch)),
        },
        _ => serde_json::from_slice(body).map(BatchRequest::Single),
    }
}

/// The operation name for spans: the request's, else `anonymous`
/// (a batch: `batch`). Never variables.
fn operation_name(batch: &BatchRequest) -> &str {
    match batch {
        BatchRequest::Single(r) => r.operation_name.as_deref().unwrap_or("anonymous"),
        BatchRequest::Batch(_) => "batch",
    }
}

/// An admitted request: the entity cache, else execution.
async fn run(
    state: AppState,
    mut batch: BatchRequest,
    auth: RequestAuth,
    idempotency: Option<IdempotencyHeader>,
    admitted: Admitted,
    format: &'static str,
) -> Response {
    let operation = if admitted.mutation { "mutation" } else { "query" };
    // A metric label: only a name the operator listed, never the client's string.
    let name = state.config.metrics_operations.label(operation_name(&batch));
    let in_flight = InFlight::enter(&state.metrics.in_flight);
    let started = Instant::now();
    // The gateway's entity fetches may be answered from rendered fragments.
    if let BatchRequest::Single(request) = &batch {
        let cached = tokio::time::timeout(
            state.config.http.request_timeout,
            state.entity_cache.execute(&state.schema, request, &auth),
        )
        .await;
        match cached {
            Ok(Some(served)) => {
                drop(in_flight);
                observe(&state, operation, name, if served.failed { "error" } else { "ok" }, started);
                return fragments_response(format, served);
            }
            // Not an entity fetch the cache serves: execute it below.
            Ok(None) => {}
            // Out of time already: executing again would double the wait.
            Err(_) => {
                drop(in_flight);
                observe(&state, operation, name, "timeout", started);
                return reject(&state, StatusCode::GATEWAY_TIMEOUT, "TIMEOUT", "request timed out");
            }
        }
    }
    for request in requests_mut(&mut batch) {
        // Parsed once per text, with its cost analysis (see `cost`).
        if let Some(doc) = state.cost.document(&request.query) {
            request.set_parsed_query(doc);
        }
    }
    let mut batch = batch.data(auth);
    if let Some(key) = idempotency {
        batch = batch.data(key);
    }
    // A mutation is not cut off by the request time-out: once its
    // transaction commits, the answer must say so (a 504 for a committed
    // write makes the client's retry a second write, or a CONFLICT).
    // Postgres's statement and pool time-outs bound it instead.
    let timeout = if admitted.mutation { MUTATION_TIMEOUT_CEILING } else { state.config.http.request_timeout };
    // What a query reads decides what caches in front may do with it (a
    // mutation's answer is never stored: nothing to record).
    let recorder = Recorder::default();
    let execution = state.schema.execute_batch(batch);
    let outcome = if admitted.mutation {
        tokio::time::timeout(timeout, execution).await
    } else {
        tokio::time::timeout(timeout, recording(recorder.clone(), execution)).await
    };
    drop(in_flight);
    let Ok(mut response) = outcome else {
        observe(&state, operation, name, "timeout", started);
        return reject(&state, StatusCode::GATEWAY_TIMEOUT, "TIMEOUT", "request timed out");
    };
    let deps = recorder.take();
    let hint = if admitted.mutation {
        cache_control::NO_STORE
    } else {
        cache_control::for_query(&deps, response.is_ok(), state.cache.ttl())
    };
    if let (BatchResponse::Single(single), false, true) = (&mut response, admitted.mutation, state.config.router.tags) {
        cache_control::add_tags(single, &deps);
    }
    let outcome = add_default_codes(&mut response);
    observe(&state, operation, name, if response.is_ok() { "ok" } else { "error" }, started);

    let status = match outcome {
        Outcome::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Outcome::RequestError if format == GRAPHQL_RESPONSE_JSON => StatusCode::BAD_REQUEST,
        _ => StatusCode::OK,
    };
    let mut response = json_response(status, format, &response);
    response.headers_mut().insert(header::CACHE_CONTROL, hint);
    if outcome == Outcome::Unavailable {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
    }
    response
}

/// Every operation of the request checked against the cost limits (by
/// their cached analyses); what the request is, if admitted.
fn admit(state: &AppState, batch: &BatchRequest) -> Result<Admitted, CostError> {
    let limits = state.cost.limits();
    let requests: &[async_graphql::Request] = match batch {
        BatchRequest::Single(r) => std::slice::from_ref(r),
        BatchRequest::Batch(rs) => rs,
    };
    // Counted before a single operation is parsed.
    cost::check_request(requests.len(), 0, limits)?;
    let mut total = Admitted { mutation: false, cost: 0 };
    for request in requests.iter() {
        let Verdict::Analysed(analysis) = state.cost.analyse(&request.query) else {
            // Not a document: execution answers with the syntax error.
            continue;
        };
        let analysis = analysis.as_ref().as_ref().map_err(Clone::clone)?;
        let one = analysis.admit(request.operation_name.as_deref(), &request.variables, limits)?;
        total.mutation |= one.mutation;
        total.cost = total.cost.saturating_add(one.cost);
    }
    cost::check_request(requests.len(), total.cost, limits)?;
    Ok(total)
}

/// Counts a request in flight until dropped: also when the client goes away
/// and its handler is dropped mid-request.
struct InFlight<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn observe(state: &AppState, operation: &'static str, name: &'static str, outcome: &'static str, started: Instant) {
    state
        .metrics
        .graphql_seconds
        .get_or_create(&[("operation", operation), ("name", name), ("outcome", outcome)])
        .observe(started.elapsed().as_secs_f64());
}

fn requests(batch: &BatchRequest) -> impl Iterator<Item = &async_graphql::Request> {
    match batch {
        BatchRequest::Single(r) => std::slice::from_ref(r).iter(),
        BatchRequest::Batch(rs) => rs.iter(),
    }
}

fn requests_mut(batch: &mut BatchRequest) -> impl Iterator<Item = &mut async_graphql::Request> {
    match batch {
        BatchRequest::Single(r) => std::slice::from_mut(r).iter_mut(),
        BatchRequest::Batch(rs) => rs.iter_mut(),
    }
}

/// Gives every error without a code one: errors of our resolvers always have
/// one, so what is left comes from async-graphql itself. A value of the wrong
/// type (literal or variable) is `BAD_USER_INPUT`, as Apollo Server reports
/// it; other request errors (syntax, unknown fields, depth and complexity
/// limits: no data) are `GRAPHQL_VALIDATION_FAILED`.
/// Returns what kind of failure the response is, if any.
fn add_default_codes(response: &mut BatchResponse) -> Outcome {
    let responses: Vec<&mut async_graphql::Response> = match response {
        BatchResponse::Single(r) => vec![r],
        BatchResponse::Batch(rs) => rs.iter_mut().collect(),
    };
    let mut request_error = false;
    let (mut unavailable, mut other, mut data) = (false, false, false);
    for r in responses {
        let no_data = matches!(r.data, Value::Null);
        request_error |= no_data && !r.errors.is_empty();
        data |= match &r.data {
            Value::Object(fields) => fields.values().any(|v| !matches!(v, Value::Null)),
            Value::Null => false,
            _ => true,
        };
        for error in &mut r.errors {
            let existing = error.extensions.as_ref().and_then(|e| e.get("code"));
            let has_code = existing.is_some();
            match existing {
                Some(Value::String(c)) if c == "SERVICE_UNAVAILABLE" => unavailable = true,
                _ => other = true,
            }
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
    match (unavailable && !other && !data, request_error) {
        (true, _) => Outcome::Unavailable,
        (false, true) => Outcome::RequestError,
        (false, false) => Outcome::Done,
    }
}

/// What a response says about the request, for its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Done,
    /// Parse or validation failed: no data.
    RequestError,
    /// Only `SERVICE_UNAVAILABLE` errors and no data: worth a retry.
    Unavailable,
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

/// An answer from rendered fragments, with what caches in front may do with it.
fn fragments_response(content_type: &'static str, served: Served) -> Response {
    let mut response = Response::new(Body::from(served.body));
    let hint = match (served.failed, served.private) {
        (true, _) => cache_control::NO_STORE,
        (false, true) => cache_control::PRIVATE,
        (false, false) => cache_control::public(served.fresh_for),
    };
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, hint);
    response
}

/// A rejection before execution, shaped like a GraphQL response.
fn reject(state: &AppState, status: StatusCode, code: &'static str, message: &str) -> Response {
    state.metrics.http_rejections.get_or_create(&[("reason", code)]).inc();
    let mut response = json_response(status, JSON, &error_body(code, message));
    response.headers_mut().insert(header::CACHE_CONTROL, cache_control::NO_STORE);
    response
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

/// The `Idempotency-Key` header: 1–255 visible ASCII characters.
fn idempotency_header(headers: &HeaderMap) -> Result<Option<IdempotencyHeader>, &'static str> {
    const INVALID: &str = "the Idempotency-Key header must be 1 to 255 visible ASCII characters";
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let key = value.to_str().map_err(|_| INVALID)?;
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(INVALID);
    }
    Ok(Some(IdempotencyHeader(key.to_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_one_request_or_a_non_empty_batch() {
        let single = parse_body(br#" {"query":"{ a }","operationName":"A","variables":{"x":[1]}}"#).unwrap();
        let BatchRequest::Single(one) = single else { panic!("one request") };
        assert_eq!((one.query.as_str(), one.operation_name.as_deref()), ("{ a }", Some("A")));
        assert_eq!(one.variables.get("x").map(ToString::to_string).as_deref(), Some("[1]"));
        let BatchRequest::Batch(two) = parse_body(br#"[{"query":"{ a }"},{"query":"{ b }"}]"#).unwrap() else {
            panic!("a batch")
        };
        assert_eq!(two.len(), 2);
        for bad in [&b"[]"[..], b"", b"null", b"\"{ a }\"", b"{\"query\": 5}", b"{\"query\":\"{ a }\"", b"[1]"] {
            assert!(parse_body(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
