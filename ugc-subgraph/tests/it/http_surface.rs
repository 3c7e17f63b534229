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

/// Every family SPEC §7 names is exported, and moves with the traffic that
/// should move it.
#[tokio::test]
async fn metrics_cover_the_spec_and_move_with_traffic() {
    let app = TestApp::start_with(&[
        ("UGC_STALE_CHECK_RATE", "1"),
        ("UGC_RATE_LIMIT_USER_WRITE_BURST", "1"),
        ("UGC_RATE_LIMIT_USER_WRITE_PER_SEC", "1"),
        // The traffic below must reach the data caches (the stale-read
        // detector samples their hits), not rendered fragments in front.
        ("UGC_ENTITY_CACHE", "off"),
    ])
    .await;
    let scrape =
        async || -> String { app.client().get(app.url("/metrics")).send().await.unwrap().text().await.unwrap() };
    let before = scrape().await;
    for family in [
        "ugc_graphql_request_seconds",
        "ugc_http_responses",
        "ugc_requests_in_flight",
        "ugc_cache_requests",
        "ugc_cache_layer_seconds",
        "ugc_l1_bytes",
        "ugc_l1_entries",
        "ugc_l1_evictions",
        "ugc_redis_errors",
        "ugc_redis_breaker_state",
        "ugc_dataloader_batch_size",
        "ugc_sql_statements",
        "ugc_sql_statement_seconds",
        "ugc_events_relayed",
        "ugc_invalidation_lag_seconds",
        "ugc_stale_read_checks",
        "ugc_stale_reads_detected",
        "ugc_rate_limited",
        "ugc_load_shed",
        "ugc_cost_rejections",
        "ugc_write_visibility_wait_seconds",
        "ugc_router_invalidations",
        "ugc_process_resident_memory_bytes",
        "ugc_tokio_alive_tasks",
    ] {
        assert!(before.contains(&format!("# TYPE {family} ")), "{family} is not exported");
    }

    let alice = crate::support::token("alice", &[]);
    let write = "mutation { createReview(input: { offerId: \"offer-m\", rating: 5, text: \"metrics\" }) { id } }";
    app.gql_as(Some(&alice), write, json!({})).await;
    let refused = app.gql_as(Some(&alice), write, json!({})).await;
    assert_eq!(refused["errors"][0]["extensions"]["code"], "RATE_LIMITED", "{refused}");
    for _ in 0..3 {
        app.gql(
            "{ offer(id: \"offer-m\") { rating { count } reviews(first: 3) { edges { node { id } } } } }",
            json!({}),
        )
        .await;
    }
    let aliases: String = (0..60).map(|i| format!("a{i}: id ")).collect();
    let bomb = app.gql(&format!("{{ offer(id: \"x\") {{ {aliases} }} }}"), json!({})).await;
    assert_eq!(bomb["errors"][0]["extensions"]["code"], "MAX_ALIASES_LIMIT", "{bomb}");

    let sum = |text: &str, name: &str, label: &str| -> f64 {
        text.lines()
            .filter(|l| !l.starts_with('#') && l.split(['{', ' ']).next() == Some(name) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    // The stale-read check runs off the request path (a spawned query):
    // counted a moment after the read that sampled it.
    let checked = crate::support::eventually(std::time::Duration::from_secs(10), async || {
        sum(&scrape().await, "ugc_stale_read_checks_total", "") > sum(&before, "ugc_stale_read_checks_total", "")
    })
    .await;
    assert!(checked, "no stale-read check ran");
    let after = scrape().await;
    for (name, label) in [
        ("ugc_graphql_request_seconds_count", "operation=\"query\""),
        ("ugc_graphql_request_seconds_count", "operation=\"mutation\""),
        ("ugc_http_responses_total", "status=\"2xx\""),
        ("ugc_cache_requests_total", "layer=\"l1\""),
        ("ugc_cache_requests_total", "layer=\"l2\""),
        ("ugc_cache_requests_total", "layer=\"db\""),
        ("ugc_cache_layer_seconds_count", "layer=\"db\""),
        ("ugc_dataloader_batch_size_count", ""),
        ("ugc_sql_statements_total", ""),
        ("ugc_sql_statement_seconds_count", ""),
        ("ugc_events_relayed_total", ""),
        ("ugc_stale_read_checks_total", ""),
        ("ugc_rate_limited_total", "quota=\"user_write\""),
        ("ugc_cost_rejections_total", ""),
        ("ugc_write_visibility_wait_seconds_count", ""),
    ] {
        assert!(sum(&after, name, label) > sum(&before, name, label), "{name}{{{label}}} did not move");
    }
    // Gauges (L1's counts settle with moka's housekeeping: a moment later).
    for gauge in [
        "ugc_l1_entries",
        "ugc_l1_bytes",
        "ugc_process_resident_memory_bytes",
        "ugc_process_open_fds",
        "ugc_tokio_alive_tasks",
    ] {
        let up = crate::support::eventually(std::time::Duration::from_secs(10), async || {
            sum(&scrape().await, gauge, "") > 0.0
        });
        assert!(up.await, "{gauge} stays 0");
    }
    assert_eq!(sum(&after, "ugc_stale_reads_detected_total", ""), 0.0);
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
