//! Protection (SPEC §6): rate limits keyed by the real client and shared
//! across instances, clean rejections, query cost limits against bombs,
//! load shedding, connection limits, database time-outs, safe defaults.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::mutations::{create, CREATE};
use crate::support::{error_code, token, TestApp};

const CHEAP: &str = "{ __typename }";
const RATING: &str = "{ offer(id: \"offer-000001\") { rating { count } } }";

/// POSTs `query` as if forwarded for `xff` (when given); status, headers, body.
async fn post_from(app: &TestApp, xff: Option<&str>, query: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = app.client().post(app.url("/graphql")).json(&json!({ "query": query }));
    if let Some(xff) = xff {
        req = req.header("x-forwarded-for", xff);
    }
    let resp = req.send().await.unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    (status, headers, resp.json().await.unwrap())
}

/// Sends `n` requests; how many were admitted (200) and refused (429).
async fn burst(app: &TestApp, xff: Option<&str>, n: usize) -> (usize, usize) {
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..n {
        match post_from(app, xff, CHEAP).await.0 {
            200 => ok += 1,
            429 => limited += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    (ok, limited)
}

fn read_quota(per_sec: &'static str, burst: &'static str) -> [(&'static str, &'static str); 2] {
    [("UGC_RATE_LIMIT_READ_PER_SEC", per_sec), ("UGC_RATE_LIMIT_READ_BURST", burst)]
}

#[tokio::test]
async fn reads_are_limited_per_real_client_behind_trusted_proxies_only() {
    // Behind a trusted proxy (the test client is 127.0.0.1): X-Forwarded-For names the client.
    let [a, b] = read_quota("1", "5");
    let app = TestApp::start_with(&[a, b, ("UGC_TRUSTED_PROXIES", "127.0.0.1/32")]).await;
    assert_eq!(burst(&app, Some("203.0.113.1"), 8).await, (5, 3), "the burst, then refusals");
    assert_eq!(burst(&app, Some("203.0.113.2"), 5).await, (5, 0), "another client has its own budget");
    // A spoofed left-most entry does not help: the right-most untrusted hop counts.
    assert_eq!(burst(&app, Some("198.51.100.9, 203.0.113.1"), 1).await, (0, 1));

    // From an untrusted peer the header is ignored: every claim is one client.
    let app = TestApp::start_with(&[a, b]).await;
    let mut admitted = 0;
    for i in 0..8 {
        admitted += burst(&app, Some(&format!("203.0.113.{i}")), 1).await.0;
    }
    assert_eq!(admitted, 5, "X-Forwarded-For from an untrusted peer cannot be spoofed");
}

#[tokio::test]
async fn a_refusal_is_a_clean_429_that_costs_no_sql_cache_or_parsing() {
    let [a, b] = read_quota("1", "3");
    let app = TestApp::start_with(&[a, b]).await;
    app.seed(3, 10, 20).await;
    for _ in 0..3 {
        assert_eq!(post_from(&app, None, RATING).await.0, 200);
    }
    let before = (
        app.read_statements().await,
        app.metric("ugc_cache_requests_total", &[]).await,
        app.metric("ugc_graphql_request_seconds_count", &[]).await,
    );
    let (status, headers, body) = post_from(&app, None, RATING).await;
    assert_eq!(status, 429, "{body}");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1, "Retry-After {retry}");
    assert_eq!(headers["ratelimit-limit"], "3");
    assert_eq!(headers["ratelimit-remaining"], "0");
    assert!(headers.contains_key("ratelimit-reset") && headers.contains_key("ratelimit-policy"));
    assert_eq!(headers["connection"], "close", "refused before its body was read: the client reconnects");
    assert!(headers["content-type"].to_str().unwrap().starts_with("application/json"));
    assert_eq!(error_code(&body), Some("RATE_LIMITED"));
    assert_eq!(body["errors"][0]["extensions"]["retryAfter"], retry);
    assert_eq!(body["errors"][0]["extensions"]["limit"], "read");
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("UGC_RATE_LIMIT_READ_PER_SEC") && message.contains("retry after"), "{message}");
    for _ in 0..20 {
        assert_eq!(post_from(&app, None, RATING).await.0, 429);
    }
    let after = (
        app.read_statements().await,
        app.metric("ugc_cache_requests_total", &[]).await,
        app.metric("ugc_graphql_request_seconds_count", &[]).await,
    );
    assert_eq!(before, after, "refused requests touched SQL, a cache or GraphQL");
    assert!(app.metric("ugc_rate_limited_total", &["quota=\"read\""]).await >= 21.0);
    // Probes and metrics are never limited.
    assert_eq!(app.client().get(app.url("/health/live")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn two_instances_share_one_budget_within_five_percent() {
    let [a, b] = read_quota("50", "50");
    let first = TestApp::start_with(&[a, b]).await;
    let second = TestApp::start_on(&first.db_url, &[a, b]).await;
    let started = Instant::now();
    let (mut ok, mut sent) = (0usize, 0usize);
    // A client spread over both instances, far above its quota, for ~3 s.
    while started.elapsed() < Duration::from_secs(3) && sent < 20_000 {
        let app = if sent % 2 == 0 { &first } else { &second };
        match post_from(app, None, CHEAP).await.0 {
            200 => ok += 1,
            429 => {}
            other => panic!("unexpected status {other}"),
        }
        sent += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let expected = 50.0 + 50.0 * elapsed;
    let error = (ok as f64 - expected).abs() / expected;
    println!(
        "shared budget: {ok} admitted of {sent} in {elapsed:.2} s; expected {expected:.0}; error {:.1} %",
        error * 100.0
    );
    assert!(sent as f64 > expected * 2.0, "the client must exceed its quota: sent {sent}");
    assert!(error <= 0.05, "{ok} admitted, expected {expected:.0} (±5 %)");
    // Each instance alone would have admitted the whole quota: the budget is one.
    let denied = first.metric("ugc_rate_limited_total", &["decided_by=\"shared\""]).await
        + second.metric("ugc_rate_limited_total", &["decided_by=\"shared\""]).await;
    assert!(denied > 0.0, "the shared budget decided");
}

#[tokio::test]
async fn without_redis_the_local_limit_applies_and_reads_never_fail() {
    let [a, b] = read_quota("1", "4");
    let app = TestApp::start_with(&[a, b, ("REDIS_URL", "redis://127.0.0.1:1"), ("UGC_REDIS_TIMEOUT_MS", "50")]).await;
    assert_eq!(burst(&app, None, 7).await, (4, 3), "per-instance limit, no error");
}

#[tokio::test]
async fn mutations_are_limited_per_user_and_per_client() {
    let app = TestApp::start_with(&[
        ("UGC_RATE_LIMIT_USER_WRITE_PER_SEC", "1"),
        ("UGC_RATE_LIMIT_USER_WRITE_BURST", "2"),
        ("UGC_RATE_LIMIT_WRITE_PER_SEC", "1"),
        ("UGC_RATE_LIMIT_WRITE_BURST", "4"),
    ])
    .await;
    assert!(create(&app, "alice", "offer-1", 5, "one").await["errors"].is_null());
    assert!(create(&app, "alice", "offer-2", 5, "two").await["errors"].is_null());
    let refused = create(&app, "alice", "offer-3", 5, "three").await;
    assert_eq!(error_code(&refused), Some("RATE_LIMITED"), "{refused}");
    assert_eq!(refused["errors"][0]["extensions"]["limit"], "user_write");
    assert_eq!(app.count("SELECT count(*) FROM reviews WHERE author_id = 'alice'").await, 2, "nothing written");
    // Another user has their own quota, until the client's is spent too.
    assert!(create(&app, "bob", "offer-3", 5, "bob").await["errors"].is_null());
    let refused = create(&app, "carol", "offer-3", 5, "carol").await;
    assert_eq!(refused["errors"][0]["extensions"]["limit"], "write", "{refused}");
    // Reads are not writes.
    assert_eq!(post_from(&app, None, CHEAP).await.0, 200);
    let body = app
        .gql_as(
            Some(&token("alice", &[])),
            CREATE,
            json!({ "input": { "offerId": "offer-9", "rating": 1, "text": "x" } }),
        )
        .await;
    assert_eq!(error_code(&body), Some("RATE_LIMITED"));
}

#[tokio::test]
async fn events_are_limited_per_token() {
    const TOKEN: &str = "events-token-0123456789";
    let app = TestApp::start_with(&[
        ("UGC_EVENTS_TOKEN", TOKEN),
        ("UGC_RATE_LIMIT_EVENTS_PER_SEC", "1"),
        ("UGC_RATE_LIMIT_EVENTS_BURST", "2"),
    ])
    .await;
    let mut statuses = Vec::new();
    for i in 0..3 {
        let body = json!({ "events": [{ "type": "user_removed", "key": format!("k{i}"), "userId": "u" }] });
        let resp = app.client().post(app.url("/events")).bearer_auth(TOKEN).json(&body).send().await.unwrap();
        statuses.push(resp.status().as_u16());
        if resp.status() == 429 {
            assert!(resp.headers().contains_key("retry-after"));
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body["errors"][0]["extensions"]["limit"], "events");
        }
    }
    assert_eq!(statuses, [200, 200, 429]);
    assert_eq!(app.count("SELECT count(*) FROM external_events").await, 2);
}

/// Sends `body` and returns (status, code, seconds it took).
async fn bomb(app: &TestApp, body: &Value) -> (u16, Option<String>, f64) {
    let started = Instant::now();
    let resp = app.client().post(app.url("/graphql")).json(body).send().await.unwrap();
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    (status, error_code(&body).map(str::to_owned), started.elapsed().as_secs_f64())
}

#[tokio::test]
async fn query_bombs_are_refused_before_execution_without_delaying_others() {
    let app = TestApp::start().await;
    app.seed(5, 20, 40).await;
    assert_eq!(post_from(&app, None, RATING).await.0, 200);

    let mut fragment_bomb = String::from("query { ...F0 }");
    for i in 0..30 {
        fragment_bomb.push_str(&format!(" fragment F{i} on Query {{ ...F{n} ...F{n} }}", n = i + 1));
    }
    fragment_bomb.push_str(" fragment F30 on Query { __typename }");
    assert!(fragment_bomb.len() < 1300, "about a kilobyte");
    let wide = format!("{{ offer(id: \"x\") {{ {} }} }}", "id ".repeat(3000));
    let aliases = format!("{{ {} }}", (0..1000).map(|i| format!("a{i}: __typename")).collect::<Vec<_>>().join(" "));
    let roots = format!(
        "{{ {} }}",
        (0..30).map(|i| format!("o{i}: offer(id: \"{i}\") {{ id }}")).collect::<Vec<_>>().join(" ")
    );
    let nested = format!("{}{}", "{ a ".repeat(40_000), "}".repeat(40_000));
    let costly = "{ offer(id: \"offer-000001\") { reviews(first: 100) { edges { node { author { reviews(first: 100) { edges { node { id text rating } } } } } } } } }";
    let reps: Vec<Value> = (0..5000).map(|i| json!({ "__typename": "Offer", "id": format!("o{i}") })).collect();
    let entities = "query($r: [_Any!]!) { _entities(representations: $r) { ... on Offer { rating { count } } } }";
    let batch: Vec<Value> = (0..1500).map(|_| json!({ "query": CHEAP })).collect();
    let page_cost = "{ offer(id: \"offer-000001\") { reviews(first: 100) { edges { node { author { reviews(first: 100) { totalCount } } } } } } }";
    let pricey_batch: Vec<Value> = (0..10).map(|_| json!({ "query": page_cost })).collect();

    let cases: Vec<(&str, Value, &str)> = vec![
        ("fragment bomb", json!({ "query": fragment_bomb }), "MAX_FIELDS_LIMIT"),
        ("wide", json!({ "query": wide }), "MAX_FIELDS_LIMIT"),
        ("alias bomb", json!({ "query": aliases }), "MAX_ALIASES_LIMIT"),
        ("root fields", json!({ "query": roots }), "MAX_ROOT_FIELDS_LIMIT"),
        ("nesting", json!({ "query": nested }), "MAX_DEPTH_LIMIT"),
        ("complexity", json!({ "query": costly }), "MAX_COMPLEXITY_LIMIT"),
        ("representations", json!({ "query": entities, "variables": { "r": reps } }), "MAX_REPRESENTATIONS_LIMIT"),
        ("batch", Value::Array(batch), "MAX_BATCH_SIZE_LIMIT"),
        ("costly batch", Value::Array(pricey_batch), "MAX_REQUEST_COMPLEXITY_LIMIT"),
    ];

    // A cached read keeps being answered while the bombs arrive.
    let reader = {
        let (client, url) = (app.client().clone(), app.url("/graphql"));
        tokio::spawn(async move {
            let (mut slowest, started) = (0f64, Instant::now());
            while started.elapsed() < Duration::from_secs(3) {
                let t = Instant::now();
                let r = client.post(&url).json(&json!({ "query": RATING })).send().await.unwrap();
                assert_eq!(r.status(), 200);
                slowest = slowest.max(t.elapsed().as_secs_f64());
            }
            slowest
        })
    };
    let sql_before = app.read_statements().await;
    let cache_before = app.metric("ugc_cache_requests_total", &["kind=\"review\""]).await;
    for _round in 0..3 {
        for (name, body, code) in &cases {
            let (status, got, seconds) = bomb(&app, body).await;
            assert_eq!((status, got.as_deref()), (400, Some(*code)), "{name}");
            // Refused while the unprotected service took seconds or died;
            // a loose bound for a debug build on a shared machine.
            assert!(seconds < 2.0, "{name} took {seconds:.3} s");
        }
    }
    let slowest = reader.await.unwrap();
    println!("slowest concurrent cached read during the bombs: {:.1} ms", slowest * 1000.0);
    assert!(slowest < 1.0, "a cached read waited {slowest:.3} s behind the bombs");
    let fenced = app.metric("ugc_cache_requests_total", &["result=\"fenced\""]).await;
    let l1_miss = app.metric("ugc_cache_requests_total", &["layer=\"l1\"", "result=\"miss\""]).await;
    let refresh = app.metric("ugc_cache_refreshes_total", &[]).await;
    assert_eq!(
        app.read_statements().await,
        sql_before,
        "a bomb reached SQL (fenced {fenced}, l1 misses {l1_miss}, refreshes {refresh})"
    );
    assert_eq!(app.metric("ugc_cache_requests_total", &["kind=\"review\""]).await, cache_before);
    assert!(app.metric("ugc_cost_rejections_total", &["limit=\"fields\""]).await >= 6.0);
    // A fine query of the same shapes still runs.
    assert_eq!(post_from(&app, None, "{ ...F } fragment F on Query { offer(id: \"x\") { id } }").await.0, 200);
}

#[tokio::test]
async fn under_overload_requests_are_shed_at_once_and_service_recovers() {
    let app = TestApp::start_with(&[("UGC_MAX_CONCURRENT_REQUESTS", "2"), ("UGC_CACHE", "off")]).await;
    app.seed(3, 10, 20).await;
    // Two requests stuck on a lock hold both permits.
    let mut lock = app.db.begin().await.unwrap();
    sqlx::query("LOCK TABLE offer_ratings IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();
    let stuck: Vec<_> = (0..2)
        .map(|_| {
            let (client, url) = (app.client().clone(), app.url("/graphql"));
            tokio::spawn(
                async move { client.post(&url).json(&json!({ "query": RATING })).send().await.unwrap().status() },
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..20 {
        let started = Instant::now();
        let (status, headers, body) = post_from(&app, None, CHEAP).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(error_code(&body), Some("SERVICE_UNAVAILABLE"));
        assert!(body["errors"][0]["message"].as_str().unwrap().contains("UGC_MAX_CONCURRENT_REQUESTS"));
        assert_eq!(headers["retry-after"], "1");
        assert!(started.elapsed() < Duration::from_secs(2), "shed at once, not queued");
    }
    assert_eq!(app.client().get(app.url("/health/live")).send().await.unwrap().status(), 200, "probes are not shed");
    assert!(app.metric("ugc_load_shed_total", &[]).await >= 20.0);
    lock.commit().await.unwrap();
    for s in stuck {
        assert_eq!(s.await.unwrap(), 200, "admitted requests complete");
    }
    assert_eq!(post_from(&app, None, RATING).await.0, 200, "recovers at once");
}

#[tokio::test]
async fn database_time_outs_are_503_service_unavailable() {
    let app = TestApp::start_with(&[
        ("UGC_CACHE", "off"),
        ("UGC_DB_STATEMENT_TIMEOUT_MS", "300"),
        ("UGC_DB_POOL_SIZE", "2"),
        ("UGC_DB_ACQUIRE_TIMEOUT_MS", "300"),
    ])
    .await;
    app.seed(3, 10, 20).await;
    let mut lock = app.db.begin().await.unwrap();
    sqlx::query("LOCK TABLE offer_ratings IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();
    // Two wait on the lock until the statement time-out, one more for a connection.
    let all = futures::future::join_all((0..3).map(|_| post_from(&app, None, RATING))).await;
    for (status, headers, body) in all {
        assert_eq!(error_code(&body), Some("SERVICE_UNAVAILABLE"), "{body}");
        assert_eq!(status, 503, "{body}");
        assert_eq!(headers["retry-after"], "1");
    }
    lock.commit().await.unwrap();
    assert_eq!(post_from(&app, None, RATING).await.0, 200);
}

/// Opens a connection that sends its headers a byte every 100 ms; returns
/// when the server closes it (or after 10 s).
async fn slow_client(addr: std::net::SocketAddr) -> Duration {
    let started = Instant::now();
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else { return started.elapsed() };
    let request = b"POST /graphql HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Slow: ";
    let mut buf = [0u8; 256];
    for byte in request.iter().cycle().take(100) {
        if stream.write_all(&[*byte]).await.is_err() {
            return started.elapsed();
        }
        // A closed connection reads as 0 bytes (or a 408) at once.
        if tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await.is_ok() {
            return started.elapsed();
        }
    }
    started.elapsed()
}

#[tokio::test]
async fn slow_header_senders_are_dropped_and_connections_are_capped() {
    let app = TestApp::start_with(&[("UGC_HEADER_READ_TIMEOUT_MS", "300"), ("UGC_MAX_CONNECTIONS", "10")]).await;
    let slow: Vec<_> = (0..30).map(|_| tokio::spawn(slow_client(app.addr))).collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A normal client gets through while 30 slow ones hold (at most) 10 slots.
    let started = Instant::now();
    assert_eq!(post_from(&app, None, CHEAP).await.0, 200);
    let normal = started.elapsed();
    let mut held = Vec::new();
    for s in slow {
        held.push(s.await.unwrap());
    }
    let longest = held.iter().max().unwrap();
    println!("a normal request waited {normal:?}; slow connections were closed after at most {longest:?}");
    assert!(*longest < Duration::from_secs(8), "a slow client was held open for {longest:?}");
    assert!(normal < Duration::from_secs(5), "the normal client waited {normal:?}");
}

#[tokio::test]
async fn production_defaults_hide_introspection_graphiql_and_optionally_metrics() {
    let app = TestApp::start_with(&[("UGC_METRICS_LISTEN", "127.0.0.1:0")]).await;
    let body = app.gql("{ __schema { queryType { name } } t: __type(name: \"Review\") { name } }", json!({})).await;
    assert_eq!(body["data"], json!({ "__schema": null, "t": null }), "introspection is off: {body}");
    let sdl = app.gql("{ _service { sdl } }", json!({})).await;
    assert!(sdl["data"]["_service"]["sdl"].as_str().unwrap().contains("type Review"), "composition still works");
    let page = app.client().get(app.url("/graphql")).send().await.unwrap();
    assert!(page.status().is_client_error(), "no GraphiQL page: {}", page.status());
    let metrics = app.client().get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 404, "metrics only on their own listener");
    // The separate listener serves them.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (router, http) = (ugc_subgraph::http::metrics_router(app.state.clone()), app.state.config.http.clone());
    tokio::spawn(
        async move { ugc_subgraph::server::serve_router(listener, router, &http, std::future::pending()).await },
    );
    let text = app.client().get(format!("http://{addr}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("ugc_rate_limited"));
}

/// A Zipf-like draw over `n` items (deterministic).
fn zipf(n: u64, state: &mut u64) -> u64 {
    *state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
    let u = ((*state >> 11) as f64) / ((1u64 << 53) as f64);
    ((n as f64).powf(u) as u64).clamp(1, n)
}

async fn page_hit_rate(app: &TestApp, reads: usize, flood: bool, seed: &mut u64) -> f64 {
    let labels = |r: &'static str| ["layer=\"l1\"", "kind=\"offer_page\"", r];
    let (h0, m0) = (
        app.metric("ugc_cache_requests_total", &labels("result=\"hit\"")).await,
        app.metric("ugc_cache_requests_total", &labels("result=\"miss\"")).await,
    );
    for i in 0..reads {
        let offer = zipf(200, seed);
        let q = format!(
            "{{ offer(id: \"offer-{offer:06}\") {{ reviews(first: 5) {{ edges {{ node {{ id text }} }} }} }} }}"
        );
        assert_eq!(post_from(app, None, &q).await.0, 200);
        if flood {
            for j in 0..10 {
                let q = format!(
                    "{{ review(id: \"{}\") {{ id }} a: offer(id: \"nope-{i}-{j}\") {{ rating {{ count }} }} }}",
                    900_000_000 + i * 10 + j
                );
                assert_eq!(post_from(app, None, &q).await.0, 200);
            }
        }
    }
    let (h1, m1) = (
        app.metric("ugc_cache_requests_total", &labels("result=\"hit\"")).await,
        app.metric("ugc_cache_requests_total", &labels("result=\"miss\"")).await,
    );
    (h1 - h0) / ((h1 - h0) + (m1 - m0)).max(1.0)
}

#[tokio::test]
async fn a_random_id_flood_neither_fills_redis_nor_evicts_the_hot_set() {
    let app = TestApp::start_with(&[("UGC_L1_MAX_BYTES", "1048576")]).await;
    app.seed(200, 400, 3000).await;
    let mut seed = 42;
    page_hit_rate(&app, 300, false, &mut seed).await; // warm
    let quiet = page_hit_rate(&app, 400, false, &mut seed).await;
    let keys_before = app.redis_keys().await;
    let flooded = page_hit_rate(&app, 400, true, &mut seed).await;
    let keys_after = app.redis_keys().await;
    println!("L1 page hit rate: {:.1} % quiet, {:.1} % under a flood of 8,000 unknown ids; Redis keys {keys_before} → {keys_after}", quiet * 100.0, flooded * 100.0);
    assert!(quiet - flooded <= 0.05, "hit rate fell from {quiet:.3} to {flooded:.3}");
    assert!(keys_after - keys_before < 400, "8,000 unknown ids left {} Redis keys", keys_after - keys_before);
    // An unknown id read again is shared (a real miss worth sharing).
    let q = "{ review(id: \"999999999\") { id } }";
    app.gql(q, json!({})).await;
    app.state.cache.invalidate_all_local();
    app.gql(q, json!({})).await;
    assert!(app.metric("ugc_cache_negative_promotions_total", &[]).await >= 1.0);
}
