//! The multi-level cache on the read path (issue: L1 moka + L2 Redis).

use std::process::Stdio;
use std::time::Duration;

use deadpool_redis::redis;
use serde_json::{json, Value};
use tokio::process::Command;
use ugc_subgraph::cache::key::CacheKey;

use crate::mutations::create;
use crate::support::{error_code, eventually, token, TestApp};

const OFFERS: &str = "query($representations: [_Any!]!) {
  _entities(representations: $representations) {
    ... on Offer { id rating { average count distribution } reviews(first: 5) { totalCount edges { node { id rating author { id } } } } }
  }
}";

fn offers(range: std::ops::RangeInclusive<usize>) -> Value {
    Value::Array(range.map(|i| json!({ "__typename": "Offer", "id": format!("offer-{i:06}") })).collect())
}

async fn sql_delta(app: &TestApp, query: &str, variables: Value) -> (u64, Value) {
    let before = app.sql_statements().await;
    let body = app.gql(query, variables).await;
    assert!(body["errors"].is_null(), "{body}");
    (app.sql_statements().await - before, body)
}

#[tokio::test]
async fn warm_reads_come_from_l1_and_other_instances_read_l2() {
    let a = TestApp::start_with(&[("UGC_LOADER_DELAY_US", "20000")]).await;
    a.seed(40, 300, 2000).await;
    let b = TestApp::start_on(&a.db_url, &[]).await;
    let vars = json!({ "representations": offers(1..=20) });

    let (cold, first) = sql_delta(&a, OFFERS, vars.clone()).await;
    assert_eq!(cold, 2, "cold: one statement per kind");
    let (warm, again) = sql_delta(&a, OFFERS, vars.clone()).await;
    assert_eq!(warm, 0, "warm: no SQL");
    assert_eq!(first, again);
    assert!(
        a.metric("ugc_cache_requests_total", &["layer=\"entity\"", "result=\"hit\""]).await >= 20.0,
        "the gateway's entity fetch is answered from rendered fragments"
    );
    // Other query shapes read the same data from L1.
    let l1_before = a.metric("ugc_cache_requests_total", &["layer=\"l1\"", "result=\"hit\""]).await;
    let (direct, _) = sql_delta(
        &a,
        "{ offer(id: \"offer-000003\") { rating { count } reviews(first: 5) { totalCount } } }",
        json!({}),
    )
    .await;
    assert_eq!(direct, 0);
    assert!(a.metric("ugc_cache_requests_total", &["layer=\"l1\"", "result=\"hit\""]).await >= l1_before + 2.0);

    let (other, from_l2) = sql_delta(&b, OFFERS, vars).await;
    assert_eq!(other, 0, "another instance is served by L2");
    assert_eq!(from_l2, first);
    assert!(b.metric("ugc_cache_requests_total", &["layer=\"l2\"", "result=\"hit\""]).await >= 40.0);
}

#[tokio::test]
async fn two_hundred_concurrent_cold_requests_over_two_instances_load_once() {
    // Generous Redis timeouts: an unoptimised test build serving 200
    // concurrent requests can exceed 50 ms, and a timed-out call is a miss.
    // This checks single-flight, not timeouts (the outage test does those).
    let vars = [("UGC_LEASE_WAIT_MS", "3000"), ("UGC_REDIS_TIMEOUT_MS", "2000")];
    let a = TestApp::start_with(&vars).await;
    a.seed(10, 300, 1000).await;
    let b = TestApp::start_on(&a.db_url, &vars).await;
    let query = "{ offer(id: \"offer-000001\") { rating { count average } reviews(first: 5) { totalCount edges { node { id } } } } }";
    let before = a.read_statements().await + b.read_statements().await;
    let requests = (0..200).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        app.gql(query, json!({}))
    });
    let answers = futures::future::join_all(requests).await;
    let after = a.read_statements().await + b.read_statements().await;
    assert!(answers.iter().all(|r| r["errors"].is_null() && r == &answers[0]), "all 200 agree");
    let waits =
        a.metric("ugc_singleflight_waits_total", &[]).await + b.metric("ugc_singleflight_waits_total", &[]).await;
    let contention =
        a.metric("ugc_lease_contention_total", &[]).await + b.metric("ugc_lease_contention_total", &[]).await;
    let redis_errors = a.metric("ugc_redis_errors_total", &[]).await + b.metric("ugc_redis_errors_total", &[]).await;
    println!(
        "200 cold requests over 2 instances: {} SQL statements, {waits} single-flight waits, {contention} lease contentions, {redis_errors} Redis errors",
        after - before
    );
    assert_eq!(after - before, 2.0, "one rating and one page statement in all");
}

#[tokio::test]
async fn negative_results_get_the_shorter_ttl() {
    let app = TestApp::start_with(&[("UGC_CACHE_NEGATIVE_TTL_SECS", "5"), ("UGC_CACHE_MAX_STALE_SECS", "1")]).await;
    let id =
        create(&app, "alice", "offer-x", 4, "present").await["data"]["createReview"]["id"].as_str().unwrap().to_owned();
    let read = format!("{{ a: review(id: \"{id}\") {{ id }} b: review(id: \"999999\") {{ id }} }}");
    app.gql(&read, json!({})).await;
    let conn = crate::support::redis_conn().await;
    let ttl = |key: String| {
        let mut conn = conn.clone();
        async move { redis::cmd("PTTL").arg(key).query_async::<i64>(&mut conn).await.unwrap() }
    };
    // An unknown id read once stays out of Redis (a random-id scan must not
    // fill it); read again after L1 lost it, it is shared.
    assert_eq!(
        ttl(CacheKey::Review(999_999).redis_key(&app.l2_prefix().await)).await,
        -2,
        "no L2 entry for a first negative read"
    );
    app.state.cache.invalidate_all_local();
    app.gql(&read, json!({})).await;
    let positive = ttl(CacheKey::Review(id.parse().unwrap()).redis_key(&app.l2_prefix().await)).await;
    let negative = ttl(CacheKey::Review(999_999).redis_key(&app.l2_prefix().await)).await;
    println!("PTTL positive {positive} ms, negative {negative} ms");
    assert!(negative > 0 && negative <= 6_600, "negative: 5 s ±10 % + 1 s stale, got {negative}");
    assert!(positive > 60_000, "positive review entries live far longer, got {positive}");
}

#[tokio::test]
async fn pending_reviews_never_reach_anonymous_readers_through_any_cache() {
    let a = TestApp::start().await;
    let b = TestApp::start_on(&a.db_url, &[]).await;
    let id = create(&a, "alice", "offer-p", 5, "secret draft").await["data"]["createReview"]["id"].clone();
    let moderator = token("mod", &["moderator"]);
    a.gql_as(
        Some(&moderator),
        "mutation($id: ID!) { moderateReview(id: $id, status: PENDING) { id } }",
        json!({ "id": id }),
    )
    .await;
    let query = "query($id: ID!) { review(id: $id) { id status text } offer(id: \"offer-p\") { reviews { edges { node { id } } } } }";
    for _ in 0..3 {
        for app in [&a, &b] {
            let author = app.gql_as(Some(&token("alice", &[])), query, json!({ "id": id })).await;
            assert_eq!(author["data"]["review"]["status"], "PENDING", "{author}");
            let m = app.gql_as(Some(&moderator), query, json!({ "id": id })).await;
            assert_eq!(m["data"]["review"]["text"], "secret draft");
            for reader in [None, Some(token("bob", &[]))] {
                let body = app.gql_as(reader.as_deref(), query, json!({ "id": id })).await;
                assert_eq!(body["data"]["review"], Value::Null, "{body}");
                assert_eq!(body["data"]["offer"]["reviews"]["edges"], json!([]));
            }
        }
    }
}

#[tokio::test]
async fn stale_values_are_served_while_postgres_fails() {
    let app = TestApp::start_with(&[("UGC_CACHE_TTL_SECS", "1"), ("UGC_CACHE_MAX_STALE_SECS", "60")]).await;
    app.seed(5, 50, 100).await;
    let query = "{ offer(id: \"offer-000001\") { rating { count average } } }";
    let fresh = app.gql(query, json!({})).await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    sqlx::query("ALTER TABLE offer_ratings RENAME TO offer_ratings_gone").execute(&app.db).await.unwrap();
    let stale = app.gql(query, json!({})).await;
    assert_eq!(stale, fresh, "the last good value, not an error");
    let never_cached = app.gql("{ offer(id: \"offer-000002\") { rating { count } } }", json!({})).await;
    assert!(error_code(&never_cached).is_some(), "Postgres really is failing: {never_cached}");
    assert!(app.metric("ugc_stale_served_total", &[]).await >= 1.0);
    sqlx::query("ALTER TABLE offer_ratings_gone RENAME TO offer_ratings").execute(&app.db).await.unwrap();
}

#[tokio::test]
async fn hot_keys_are_recorded_and_warmed_into_a_new_instance() {
    // The data cache's hot keys: no rendered fragments in front.
    let a = TestApp::start_with(&[("UGC_HOT_KEY_PER_SEC", "5"), ("UGC_ENTITY_CACHE", "off")]).await;
    a.seed(5, 50, 100).await;
    let query = "{ offer(id: \"offer-000001\") { rating { count } } }";
    for _ in 0..20 {
        a.gql(query, json!({})).await;
    }
    assert!(a.metric("ugc_hot_keys_total", &[]).await >= 1.0, "offer-000001's rating became hot");
    a.state.cache.record_hot_keys().await;

    let b = TestApp::start_on(&a.db_url, &[]).await;
    let warmed = b.state.cache.warm_up(100).await;
    assert!(warmed >= 1, "warm-up loaded the recorded keys");
    let l2_before = b.metric("ugc_cache_requests_total", &["layer=\"l2\""]).await;
    let sql_before = b.sql_statements().await;
    b.gql(query, json!({})).await;
    assert_eq!(b.sql_statements().await, sql_before);
    assert_eq!(b.metric("ugc_cache_requests_total", &["layer=\"l2\""]).await, l2_before, "served from L1, no L2 trip");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn redis_server(port: u16) -> tokio::process::Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server is required (make services)")
}

#[tokio::test]
async fn a_redis_outage_fails_no_request_and_heals_by_itself() {
    let port = free_port();
    let mut redis = redis_server(port);
    let url = format!("redis://127.0.0.1:{port}");
    let ping = || async {
        let Ok(client) = redis::Client::open(url.as_str()) else { return false };
        client.get_multiplexed_async_connection().await.is_ok()
    };
    assert!(eventually(Duration::from_secs(10), ping).await, "test redis did not start");
    let vars = [("REDIS_URL", url.as_str()), ("UGC_REDIS_TIMEOUT_MS", "50")];
    let a = TestApp::start_with(&vars).await;
    a.seed(60, 300, 2000).await;
    let b = TestApp::start_on(&a.db_url, &vars).await;
    let read = async |app: &TestApp, i: usize| {
        let body = app.gql(OFFERS, json!({ "representations": offers(i % 50 + 1..=i % 50 + 5) })).await;
        assert!(body["errors"].is_null(), "request {i} failed: {body}");
    };
    let (a, b) = (&a, &b);
    for i in 0..20 {
        read(a, i).await;
    }

    redis.kill().await.unwrap();
    for i in 20..80 {
        read(if i % 2 == 0 { a } else { b }, i).await;
    }
    let ready = a.client().get(a.url("/health/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "still ready without Redis");
    let health: Value = ready.json().await.unwrap();
    assert!(health["redis"].as_str().unwrap().starts_with("unavailable"), "{health}");
    assert!(a.metric("ugc_redis_errors_total", &[]).await >= 1.0);

    let _redis = redis_server(port);
    let recovered = eventually(Duration::from_secs(15), async || {
        read(a, 7).await;
        let h: Value = a.client().get(a.url("/health/ready")).send().await.unwrap().json().await.unwrap();
        h["redis"] == "ok"
    })
    .await;
    assert!(recovered, "the circuit closed again once Redis was back");
    // L2 works again (it restarted empty): what a fills now, b reads
    // without Postgres. Offers 56-60 were never read before.
    let fresh = json!({ "representations": offers(56..=60) });
    assert!(a.gql(OFFERS, fresh.clone()).await["errors"].is_null());
    let before = b.sql_statements().await;
    let body = b.gql(OFFERS, fresh).await;
    assert!(body["errors"].is_null());
    assert_eq!(b.sql_statements().await, before, "served from the recovered L2");
}

#[tokio::test]
async fn an_undecodable_l2_value_is_a_miss_not_an_error() {
    let a = TestApp::start().await;
    let id =
        create(&a, "alice", "offer-z", 5, "intact").await["data"]["createReview"]["id"].as_str().unwrap().to_owned();
    let mut conn = crate::support::redis_conn().await;
    let _: () = redis::cmd("SET")
        .arg(CacheKey::Review(id.parse().unwrap()).redis_key(&a.l2_prefix().await))
        .arg(b"\xff\x00 not postcard".as_slice())
        .query_async(&mut conn)
        .await
        .unwrap();
    let body = a.gql("query($id: ID!) { review(id: $id) { text } }", json!({ "id": id })).await;
    assert_eq!(body["data"]["review"]["text"], "intact", "{body}");
    assert!(a.metric("ugc_cache_decode_errors_total", &[]).await >= 1.0);
}

#[tokio::test]
async fn with_the_cache_off_every_read_goes_to_postgres() {
    let app = TestApp::start_with(&[("UGC_CACHE", "off")]).await;
    app.seed(5, 50, 100).await;
    let vars = json!({ "representations": offers(1..=3) });
    let (first, body) = sql_delta(&app, OFFERS, vars.clone()).await;
    let (second, again) = sql_delta(&app, OFFERS, vars).await;
    assert!(first >= 2 && second == first, "no caching: {first} then {second}");
    assert_eq!(body, again);
    assert_eq!(app.metric("ugc_cache_requests_total", &[]).await, 0.0, "no cache layer consulted");
    let health: Value = app.client().get(app.url("/health/ready")).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["cache"], "off");
}

/// With Postgres failing, an entity fetch answered through the entity cache
/// fails once — its renders are the answer — and says what the normal path
/// says; it is not executed a second time.
#[tokio::test]
async fn a_failed_entity_fetch_runs_once_and_answers_like_the_normal_path() {
    let vars = [("UGC_DB_STATEMENT_TIMEOUT_MS", "300")];
    let fragments = TestApp::start_with(&vars).await;
    fragments.seed(5, 20, 40).await;
    let plain = TestApp::start_on(&fragments.db_url, &[vars[0], ("UGC_ENTITY_CACHE", "off")]).await;
    let query = "query($representations: [_Any!]!) { _entities(representations: $representations) { ... on Offer { id rating { count } } } }";
    let vars = json!({ "representations": offers(1..=3) });
    let mut lock = fragments.db.begin().await.unwrap();
    sqlx::query("LOCK TABLE offer_ratings IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();
    let failed = ["statement=\"offer_ratings\""];
    let before = fragments.metric("ugc_sql_errors_total", &failed).await;
    let cached_path = fragments.gql(query, vars.clone()).await;
    let after = fragments.metric("ugc_sql_errors_total", &failed).await;
    assert_eq!(after - before, 1.0, "one failed batch, not two: {cached_path}");
    let normal_path = plain.gql(query, vars).await;
    lock.commit().await.unwrap();
    let shape = |body: &Value| {
        let mut errors: Vec<(String, String)> = body["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["path"].to_string(), e["extensions"]["code"].as_str().unwrap().to_owned()))
            .collect();
        errors.sort();
        (body["data"].clone(), errors)
    };
    assert_eq!(shape(&cached_path), shape(&normal_path), "{cached_path} vs {normal_path}");
    assert!(cached_path.to_string().contains("SERVICE_UNAVAILABLE"), "{cached_path}");
}

/// An entity fetch that runs out of time is answered 504 once: not executed
/// again on the normal path for a second full time-out.
#[tokio::test]
async fn an_entity_fetch_out_of_time_is_not_executed_twice() {
    let app = TestApp::start_with(&[("UGC_REQUEST_TIMEOUT_MS", "1000")]).await;
    app.seed(5, 20, 40).await;
    let query = "query($representations: [_Any!]!) { _entities(representations: $representations) { ... on Offer { id rating { count } } } }";
    let mut lock = app.db.begin().await.unwrap();
    sqlx::query("LOCK TABLE offer_ratings IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();
    let started = std::time::Instant::now();
    let resp = app
        .client()
        .post(app.url("/graphql"))
        .json(&json!({ "query": query, "variables": { "representations": offers(1..=3) } }))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    lock.commit().await.unwrap();
    assert_eq!(resp.status(), 504);
    // One time-out (1 s), not two; loose for a debug build on a shared machine.
    assert!(took < std::time::Duration::from_millis(1700), "took {took:?}");
    assert_eq!(app.metric("ugc_graphql_request_seconds_count", &["outcome=\"timeout\""]).await, 1.0);
}

/// A rendered entity ages with the values it read: rendered on instance B
/// from an L2 entry that A filled 1.4 s earlier (TTL 2 s), it stops being
/// served when that entry stops being fresh, not a whole TTL after it was
/// rendered.
#[tokio::test]
async fn a_fragment_expires_with_the_oldest_value_it_read() {
    let ttl = [("UGC_CACHE_TTL_SECS", "2")];
    let a = TestApp::start_with(&ttl).await;
    a.seed(5, 10, 20).await;
    let b = TestApp::start_on(&a.db_url, &ttl).await;
    let query = "query($representations: [_Any!]!) { _entities(representations: $representations) { ... on Offer { rating { count } } } }";
    let vars = json!({ "representations": offers(1..=1) });
    let entity = async |app: &TestApp, result: &str| {
        app.metric("ugc_cache_requests_total", &["layer=\"entity\"", &format!("result=\"{result}\"")]).await
    };

    let first = a.gql("{ offer(id: \"offer-000001\") { rating { count } } }", json!({})).await;
    assert!(first["errors"].is_null(), "{first}");
    tokio::time::sleep(Duration::from_millis(1400)).await;
    // B: an L1 miss, an L2 hit that is fresh for 0.4–0.8 s more (±10 % jitter).
    let rendered = b.gql(query, vars.clone()).await;
    assert!(rendered["errors"].is_null(), "{rendered}");
    assert_eq!(entity(&b, "miss").await, 1.0);
    let again = b.gql(query, vars.clone()).await;
    assert_eq!(again, rendered);
    assert_eq!(entity(&b, "hit").await, 1.0, "the fragment is served while its data is fresh");

    // 2.6 s after A's load: past the L2 value's freshness (at most 2.2 s),
    // well before the render plus a TTL (at least 3.2 s).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let late = b.gql(query, vars).await;
    assert!(late["errors"].is_null(), "{late}");
    assert_eq!(entity(&b, "hit").await, 1.0, "the fragment outlived the value it was rendered from");
    assert_eq!(entity(&b, "miss").await, 2.0);
}
