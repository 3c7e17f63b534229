//! OpenTelemetry traces, for real: the binary exports OTLP/HTTP (JSON) to a
//! receiver this test runs; a request sent with a known W3C trace id yields
//! spans under that trace, with the expected parents.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use serde_json::{json, Value};

use crate::lifecycle::serve;
use crate::support::{eventually, redis_url, token};

type Spans = Arc<Mutex<Vec<Value>>>;

/// An OTLP/HTTP receiver: every span it is sent, flattened.
async fn receiver() -> (String, Spans) {
    let spans: Spans = Arc::default();
    let router = axum::Router::new()
        .route(
            "/v1/traces",
            post(|State(spans): State<Spans>, body: axum::Json<Value>| async move {
                let mut all = spans.lock().unwrap();
                for resource in body.0["resourceSpans"].as_array().into_iter().flatten() {
                    let service = resource["resource"]["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|a| a["key"] == "service.name")
                        .map(|a| a["value"]["stringValue"].clone());
                    for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                        for span in scope["spans"].as_array().into_iter().flatten() {
                            let mut span = span.clone();
                            span["service"] = service.clone().unwrap_or(Value::Null);
                            all.push(span);
                        }
                    }
                }
                axum::Json(json!({}))
            }),
        )
        .with_state(Arc::clone(&spans));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, spans)
}

fn attribute<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    let attr = span["attributes"].as_array()?.iter().find(|a| a["key"] == key)?;
    attr["value"].as_object()?.values().next()
}

#[tokio::test]
async fn a_traced_request_yields_spans_under_the_callers_trace() {
    let (endpoint, spans) = receiver().await;
    let redis = redis_url();
    let (_db, port, _child) = serve(&[
        ("REDIS_URL", &redis),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_SERVICE_NAME", "ugc-under-test"),
        // Roots (requests without a traceparent) are not sampled: only the
        // caller's sampled trace is exported.
        ("OTEL_TRACES_SAMPLER", "parentbased_always_off"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        // The execution path's tree (operation → batches → layers); a root
        // field served from the entity cache has the `entity_cache` span only.
        ("UGC_ENTITY_CACHE", "off"),
    ])
    .await;
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let ready = eventually(Duration::from_secs(30), async || {
        client.get(format!("{base}/health/ready")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ready, "the service did not become ready");

    // Untraced traffic first: a write and a read without a traceparent.
    let created = client
        .post(format!("{base}/graphql"))
        .bearer_auth(token("alice", &[]))
        .json(&json!({ "query": "mutation { createReview(input: { offerId: \"o-t\", rating: 4, text: \"traced\" }) { id } }" }))
        .send()
        .await
        .unwrap();
    // Not sampled: no span at all, so nothing to name in a traceresponse.
    assert_eq!(created.status(), 200);
    assert!(created.headers().get("traceresponse").is_none());

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let response = client
        .post(format!("{base}/graphql"))
        .header("traceparent", format!("00-{trace_id}-{parent}-01"))
        .json(&json!({
            "query": "query Reviews($id: ID!) { offer(id: $id) { rating { count } reviews(first: 5) { edges { node { id text } } } } }",
            "operationName": "Reviews",
            "variables": { "id": "o-t" },
        }))
        .send()
        .await
        .unwrap();
    let traceresponse = response.headers()["traceresponse"].to_str().unwrap().to_owned();
    assert!(traceresponse.starts_with(&format!("00-{trace_id}-")) && traceresponse.ends_with("-01"), "{traceresponse}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["data"]["offer"]["rating"]["count"], 1, "{body}");

    let ours = |spans: &[Value]| -> Vec<Value> { spans.iter().filter(|s| s["traceId"] == trace_id).cloned().collect() };
    let complete = eventually(Duration::from_secs(15), async || {
        let got = ours(&spans.lock().unwrap());
        ["POST /graphql", "query Reviews", "dataloader.batch", "cache.l1", "cache.l2", "cache.source"]
            .iter()
            .all(|name| got.iter().any(|s| s["name"].as_str().is_some_and(|n| n == *name || n.starts_with(name))))
            && got.iter().any(|s| attribute(s, "db.system.name").is_some_and(|v| v == "postgresql"))
            && got.iter().any(|s| attribute(s, "db.system.name").is_some_and(|v| v == "redis"))
    })
    .await;
    let got = ours(&spans.lock().unwrap());
    let names: Vec<&str> = got.iter().filter_map(|s| s["name"].as_str()).collect();
    assert!(complete, "spans of the trace: {names:?}");
    assert!(spans.lock().unwrap().iter().all(|s| s["traceId"] == trace_id), "an unsampled root was exported");

    // A traced write: its statements and its relay run under the mutation.
    let write_trace = "0af7651916cd43dd8448eb211c80319c";
    let written = client
        .post(format!("{base}/graphql"))
        .bearer_auth(token("bob", &[]))
        .header("traceparent", format!("00-{write_trace}-b7ad6b7169203331-01"))
        .json(&json!({ "query": "mutation Write { createReview(input: { offerId: \"o-t\", rating: 2, text: \"two\" }) { id } }" }))
        .send()
        .await
        .unwrap();
    assert_eq!(written.status(), 200);
    let relayed = eventually(Duration::from_secs(15), async || {
        let spans = spans.lock().unwrap();
        let write: Vec<&Value> = spans.iter().filter(|s| s["traceId"] == write_trace).collect();
        let op = write
            .iter()
            .find(|s| s["name"].as_str().is_some_and(|n| n.starts_with("mutation")))
            .map(|s| s["spanId"].clone());
        // The writer relays its own event, unless the background relay
        // (woken by the same commit) claimed it first: then the writer's
        // claim, found empty, is what its trace shows.
        op.is_some_and(|op| {
            write
                .iter()
                .any(|s| (s["name"] == "outbox.relay" || s["name"] == "claim_outbox") && s["parentSpanId"] == op)
        })
    })
    .await;
    let write: Vec<String> = spans
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s["traceId"] == write_trace)
        .map(|s| format!("{} {} <- {}", s["name"], s["spanId"], s["parentSpanId"]))
        .collect();
    assert!(relayed, "no outbox.relay span under the mutation: {write:?}");

    let by_id: HashMap<&str, &Value> = got.iter().map(|s| (s["spanId"].as_str().unwrap(), s)).collect();
    let named = |name: &str| got.iter().find(|s| s["name"].as_str().is_some_and(|n| n.starts_with(name))).unwrap();
    let parent_name = |span: &Value| -> String {
        by_id
            .get(span["parentSpanId"].as_str().unwrap_or(""))
            .map_or("-".into(), |p| p["name"].as_str().unwrap().into())
    };
    let server = named("POST /graphql");
    assert_eq!(server["parentSpanId"], parent, "the server span continues the caller's span");
    assert_eq!(server["kind"], 2, "SERVER");
    assert_eq!(server["service"], "ugc-under-test");
    assert!(traceresponse.contains(server["spanId"].as_str().unwrap()), "traceresponse names the server span");
    let status = attribute(server, "http.response.status_code").map(|v| v.to_string().replace('"', ""));
    assert_eq!(status.as_deref(), Some("200"), "{server}");

    let operation = named("query Reviews");
    assert_eq!(parent_name(operation), "POST /graphql");
    assert_eq!(attribute(operation, "graphql.operation.name"), Some(&json!("Reviews")));
    assert!(got.iter().all(|s| !s.to_string().contains("o-t")), "variables never in spans");

    // Loader batches hang off the operation; layers and SQL off them.
    for span in got.iter().filter(|s| s["name"] == "dataloader.batch") {
        assert_eq!(parent_name(span), "query Reviews", "{span}");
        assert!(attribute(span, "size").is_some() && attribute(span, "kind").is_some(), "{span}");
    }
    let l1 = named("cache.l1");
    assert_eq!(parent_name(l1), "dataloader.batch");
    assert!(attribute(l1, "misses").is_some(), "{l1}");
    assert_eq!(parent_name(named("cache.l2")), "cache.l1");
    assert_eq!(parent_name(named("cache.source")), "cache.l1");
    let sql = got.iter().filter(|s| attribute(s, "db.system.name").is_some_and(|v| v == "postgresql"));
    for span in sql {
        assert_eq!(parent_name(span), "cache.source", "{span}");
        assert_eq!(span["kind"], 3, "CLIENT");
    }
}
