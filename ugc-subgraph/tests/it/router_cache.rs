//! The caching protocol for a router in front: `Cache-Control` from the
//! cache's real freshness, `private`/`no-store` whenever the viewer could
//! change the answer, Apollo Router's cache tags in the extensions, and the
//! forwarder that sends our invalidations to a router's endpoint.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use serde_json::{json, Value};

use crate::mutations::create;
use crate::support::{eventually, token, TestApp};

const ENTITIES: &str = "query($representations: [_Any!]!) { _entities(representations: $representations) { \
    ... on Offer { id rating { count average } reviews(first: 5) { edges { node { id text } } } } } }";

async fn post_graphql(app: &TestApp, auth: Option<&str>, query: &str, variables: Value) -> (HeaderMap, Value) {
    let mut req = app.client().post(app.url("/graphql")).json(&json!({ "query": query, "variables": variables }));
    if let Some(t) = auth {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let headers = resp.headers().clone();
    (headers, resp.json().await.unwrap())
}

fn max_age(headers: &HeaderMap) -> Option<u64> {
    headers.get("cache-control")?.to_str().ok()?.strip_prefix("public, max-age=")?.parse().ok()
}

#[tokio::test]
async fn public_reads_get_max_age_from_freshness_and_the_cascade_tags() {
    let app = TestApp::start_with(&[("UGC_ROUTER_CACHE_TAGS", "on"), ("UGC_CACHE_TTL_SECS", "30")]).await;
    let review = create(&app, "alice", "offer-a", 5, "great").await["data"]["createReview"]["id"].clone();
    let id = review.as_str().unwrap();
    let reps = json!({ "representations": [
        { "__typename": "Offer", "id": "offer-a" }, { "__typename": "Offer", "id": "offer-b" } ] });

    // Cold (execution path), then warm (rendered fragments): both public,
    // fresh no longer than the TTL, tagged per entity.
    for round in ["cold", "warm"] {
        let (headers, body) = post_graphql(&app, None, ENTITIES, reps.clone()).await;
        assert!(body["errors"].is_null(), "{body}");
        let age = max_age(&headers).unwrap_or_else(|| panic!("{round}: {:?}", headers.get("cache-control")));
        assert!(age <= 33, "{round}: max-age {age} beyond the TTL (+ jitter)");
        let tags = &body["extensions"]["apolloEntityCacheTags"];
        assert_eq!(tags.as_array().map(Vec::len), Some(2), "{round}: {body}");
        // The offer's rating and pages all hang on its one tag (which an
        // edit of any of its reviews invalidates, see cascade.rs).
        assert_eq!(tags[0], json!(["offer-offer-a"]), "{round}: {body}");
        if round == "warm" {
            // Rendered alone, each fragment has its own tags.
            assert_eq!(tags[1], json!(["offer-offer-b"]), "{round}: {body}");
        }
    }

    // A root field: one list of tags.
    let (headers, body) =
        post_graphql(&app, None, "query($id: ID!) { review(id: $id) { id text } }", json!({ "id": id })).await;
    assert!(max_age(&headers).is_some(), "{:?}", headers.get("cache-control"));
    assert_eq!(body["extensions"]["apolloCacheTags"], json!([format!("review-{id}")]), "{body}");

    // With the cache off nothing is fresh: max-age=0.
    let off = TestApp::start_on(&app.db_url, &[("UGC_CACHE", "off")]).await;
    let (headers, _) = post_graphql(&off, None, ENTITIES, reps).await;
    assert_eq!(headers["cache-control"], "public, max-age=0");
}

#[tokio::test]
async fn answers_the_viewer_could_change_are_never_public() {
    let app = TestApp::start_with(&[("UGC_MODERATE_ON_CREATE", "true"), ("UGC_ROUTER_CACHE_TAGS", "on")]).await;
    let alice = token("alice", &[]);
    let created = create(&app, "alice", "offer-p", 3, "pending one").await;
    let id = created["data"]["createReview"]["id"].as_str().unwrap().to_owned();
    let review = "query($id: ID!) { review(id: $id) { id status } }";

    // The mutation itself.
    let (headers, _) = post_graphql(
        &app,
        Some(&alice),
        "mutation($input: CreateReviewInput!) { createReview(input: $input) { id } }",
        json!({ "input": { "offerId": "offer-p", "rating": 4, "text": "second" } }),
    )
    .await;
    assert_eq!(headers["cache-control"], "no-store");

    // The author reads her pending review: private.
    let (headers, body) = post_graphql(&app, Some(&alice), review, json!({ "id": id })).await;
    assert_eq!(body["data"]["review"]["status"], "PENDING", "{body}");
    assert_eq!(headers["cache-control"], "private, no-store");

    // Mixed: public offer data next to the private review: private.
    let mixed = "query($id: ID!) { offer(id: \"offer-p\") { rating { count } } review(id: $id) { id } }";
    let (headers, body) = post_graphql(&app, Some(&alice), mixed, json!({ "id": id })).await;
    assert!(body["errors"].is_null(), "{body}");
    assert_eq!(headers["cache-control"], "private, no-store");

    // Anonymous, the answer is null, but another viewer's would not be:
    // not shareable either.
    let (headers, body) = post_graphql(&app, None, review, json!({ "id": id })).await;
    assert!(body["data"]["review"].is_null(), "{body}");
    assert_eq!(headers["cache-control"], "private, no-store");

    // Published by a moderator, it is the same for everyone: public.
    let moderate = "mutation($id: ID!) { moderateReview(id: $id, status: PUBLISHED) { id } }";
    let (_, body) = post_graphql(&app, Some(&token("mod", &["moderator"])), moderate, json!({ "id": id })).await;
    assert!(body["errors"].is_null(), "{body}");
    let (headers, body) = post_graphql(&app, Some(&alice), review, json!({ "id": id })).await;
    assert_eq!(body["data"]["review"]["status"], "PUBLISHED", "{body}");
    assert!(max_age(&headers).is_some(), "{:?}", headers.get("cache-control"));

    // Errors are never stored.
    let (headers, _) = post_graphql(&app, None, "{ offer(id: \"\") { id } }", json!({})).await;
    assert_eq!(headers["cache-control"], "no-store");
    let (headers, _) = post_graphql(&app, None, "{ nope }", json!({})).await;
    assert_eq!(headers["cache-control"], "no-store");
}

type Received = Arc<Mutex<Vec<(HeaderMap, Value)>>>;

/// A router's invalidation endpoint, recording what it is sent.
async fn receiver() -> (String, Received) {
    let got: Received = Arc::default();
    let router = axum::Router::new()
        .route(
            "/invalidation",
            post(|State(got): State<Received>, headers: HeaderMap, body: axum::Json<Value>| async move {
                got.lock().unwrap().push((headers, body.0));
                (axum::http::StatusCode::ACCEPTED, axum::Json(json!({ "count": 1 })))
            }),
        )
        .with_state(Arc::clone(&got));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/invalidation", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, got)
}

#[tokio::test]
async fn invalidations_are_forwarded_to_the_routers_endpoint_with_its_secret() {
    let (url, got) = receiver().await;
    let app = TestApp::start_with(&[
        ("UGC_ROUTER_INVALIDATION_URL", &url),
        ("UGC_ROUTER_INVALIDATION_SECRET", "router-shared-key"),
        ("UGC_ROUTER_SUBGRAPH_NAME", "reviews"),
    ])
    .await;
    let created = create(&app, "bob", "offer-f", 4, "forward me").await;
    let id = created["data"]["createReview"]["id"].as_str().unwrap().to_owned();
    let expected = [format!("review-{id}"), "offer-offer-f".to_owned(), "author-bob".to_owned()];

    let sent = eventually(Duration::from_secs(10), async || {
        let got = got.lock().unwrap();
        let tags: Vec<String> = got
            .iter()
            .flat_map(|(_, body)| body.as_array().cloned().unwrap_or_default())
            .filter_map(|r| r["cache_tag"].as_str().map(str::to_owned))
            .collect();
        expected.iter().all(|t| tags.contains(t))
    })
    .await;
    assert!(sent, "forwarded: {:?}", got.lock().unwrap());
    for (headers, body) in got.lock().unwrap().iter() {
        assert_eq!(headers["authorization"], "router-shared-key");
        assert!(headers["content-type"].to_str().unwrap().starts_with("application/json"));
        for request in body.as_array().unwrap() {
            assert_eq!(request["kind"], "cache_tag", "{request}");
            assert_eq!(request["subgraphs"], json!(["reviews"]), "{request}");
        }
    }
    assert!(app.metric("ugc_router_invalidations_total", &["outcome=\"sent\""]).await >= 3.0);
}
