//! HTTP behaviour: content negotiation, GraphiQL, health, metrics.

use serde_json::{json, Value};

use crate::support::TestApp;

#[tokio::test]
async fn responses_follow_the_graphql_over_http_content_negotiation() {
    let app = TestApp::start().await;
    let url = app.url("/graphql");
    let ok = json!({ "query": "{ offer(id: \"x\") { id } }" });
    let invalid = json!({ "query": "{ offer(id: \"x\") { nope } }" });

    let resp = app.client().post(&url).json(&ok).send().await.unwrap();
    assert_eq!(resp.headers()["content-type"], "application/json");

    for (accept, body, status, content_type) in [
        ("application/graphql-response+json", &ok, 200, "application/graphql-response+json"),
        (
            "application/graphql-response+json, application/json;q=0.9",
            &invalid,
            400,
            "application/graphql-response+json",
        ),
        ("application/json", &invalid, 200, "application/json"),
    ] {
        let resp = app.client().post(&url).header("accept", accept).json(body).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{accept} {body}");
        assert_eq!(resp.headers()["content-type"], content_type);
    }
}

#[tokio::test]
async fn graphiql_health_and_metrics_are_served() {
    let app = TestApp::start_with(&[("UGC_GRAPHIQL", "on")]).await;
    let page = app.client().get(app.url("/graphql")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-security-policy"].to_str().unwrap().contains("script-src"));
    let page = page.text().await.unwrap();
    assert!(page.to_lowercase().contains("graphiql"));
    // Every external script and style sheet is pinned by its hash.
    for tag in page.split('<').filter(|t| t.starts_with("script src") || t.starts_with("link rel=\"stylesheet\"")) {
        assert!(tag.contains("integrity=\"sha384-") && tag.contains("crossorigin"), "unpinned: <{tag}");
        assert!(!tag.contains("@latest") && !tag.contains("@3/"), "not an exact version: <{tag}");
    }
    assert!(page.matches("integrity=").count() >= 4);

    let live: Value = app.client().get(app.url("/health/live")).send().await.unwrap().json().await.unwrap();
    assert_eq!(live["status"], "alive");
    let ready = app.client().get(app.url("/health/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["postgres"], "ok");

    app.gql("{ offer(id: \"x\") { rating { count } } }", json!({})).await;
    let metrics = app.client().get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for name in [
        "ugc_sql_statements_total",
        "ugc_sql_statement_seconds",
        "ugc_graphql_request_seconds",
        "ugc_dataloader_batch_size",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
}

#[tokio::test]
async fn readiness_fails_while_postgres_is_unreachable() {
    // A database URL nothing listens on: the service still starts and answers.
    let config = ugc_subgraph::config::Config::from_vars([
        ("DATABASE_URL".to_string(), "postgres://postgres@127.0.0.1:1/none".to_string()),
        ("UGC_DB_ACQUIRE_TIMEOUT_MS".to_string(), "300".to_string()),
    ])
    .unwrap();
    let state = ugc_subgraph::http::state::AppState::build(config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(ugc_subgraph::server::serve(listener, state, std::future::pending()));
    let client = reqwest::Client::new();
    let ready = client.get(format!("http://{addr}/health/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let live = client.get(format!("http://{addr}/health/live")).send().await.unwrap();
    assert_eq!(live.status(), 200);
    let body: Value = client
        .post(format!("http://{addr}/graphql"))
        .json(&json!({ "query": "{ offer(id: \"x\") { rating { count } } }" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["errors"][0]["extensions"]["code"], "SERVICE_UNAVAILABLE", "{body}");
    assert!(!body.to_string().contains("127.0.0.1:1"), "no internals leak: {body}");
}

/// Clients that give up mid-request do not leave the in-flight gauge up.
#[tokio::test]
async fn aborted_requests_leave_nothing_in_flight() {
    let app = TestApp::start_with(&[("UGC_CACHE", "off")]).await;
    let mut lock = app.db.begin().await.unwrap();
    sqlx::query("LOCK TABLE offer_ratings IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();
    let query = json!({ "query": "{ offer(id: \"x\") { rating { count } } }" });
    let aborted: Vec<_> = (0..20)
        .map(|_| {
            let request = app.client().post(app.url("/graphql")).json(&query).send();
            tokio::spawn(tokio::time::timeout(std::time::Duration::from_millis(500), request))
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    assert!(app.metric("ugc_requests_in_flight", &[]).await >= 1.0, "they are in flight");
    for outcome in futures::future::join_all(aborted).await {
        assert!(outcome.unwrap().is_err(), "the request should still be waiting on the lock");
    }
    // The clients are gone: nothing of theirs stays counted.
    let settled = crate::support::eventually(std::time::Duration::from_secs(10), async || {
        app.metric("ugc_requests_in_flight", &[]).await == 0.0
    })
    .await;
    lock.commit().await.unwrap();
    assert!(settled, "in flight stays at {}", app.metric("ugc_requests_in_flight", &[]).await);
}

/// A probe is answered within its usual 1 s time-out even when Postgres hangs.
#[tokio::test]
async fn readiness_answers_quickly_while_postgres_hangs() {
    let app = TestApp::start().await;
    let mut lock = app.db.begin().await.unwrap();
    sqlx::query("LOCK TABLE _sqlx_migrations IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();
    let started = std::time::Instant::now();
    let ready = app.client().get(app.url("/health/ready")).send().await.unwrap();
    let took = started.elapsed();
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert!(body["postgres"].as_str().unwrap().contains("timed out"), "{body}");
    // Loose, for a debug build on a shared machine; it took 2 s and more before.
    assert!(took < std::time::Duration::from_millis(1500), "readiness took {took:?}");
    lock.commit().await.unwrap();
    assert_eq!(app.client().get(app.url("/health/ready")).send().await.unwrap().status(), 200);
}
