//! A write is visible everywhere when it is acknowledged (events/visibility.rs):
//! black-box over HTTP against three instances, and an instance that stops
//! acknowledging stops serving its L1.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::mutations::create;
use crate::support::{eventually, token, TestApp};

const UPDATE: &str = "mutation($id: ID!, $text: String!) { updateReview(id: $id, input: { text: $text }) { id text } }";
const REVIEW: &str = "query($id: ID!) { review(id: $id) { text } }";
const OFFER_PAGE: &str = "query($representations: [_Any!]!) { _entities(representations: $representations) {
  ... on Offer { reviews(first: 20) { edges { node { id text } } } } } }";

/// The version number in a text written as `… v<n>`.
fn version(text: &Value) -> Option<u64> {
    text.as_str()?.rsplit_once(" v")?.1.parse().ok()
}

/// The versions two read paths show of review `id` on `app`: `review(id:)`
/// (L1) and the offer's first page through the entity cache.
async fn read_versions(app: &TestApp, id: &str, offer: &str) -> [Option<u64>; 2] {
    let direct = app.gql(REVIEW, json!({ "id": id })).await;
    let page = app.gql(OFFER_PAGE, json!({ "representations": [{ "__typename": "Offer", "id": offer }] })).await;
    let in_page = page["data"]["_entities"][0]["reviews"]["edges"]
        .as_array()
        .and_then(|edges| edges.iter().find(|e| e["node"]["id"] == id))
        .and_then(|e| version(&e["node"]["text"]));
    [version(&direct["data"]["review"]["text"]), in_page]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test]
async fn a_read_sent_after_an_acknowledged_write_never_sees_an_older_version() {
    // The production default window (100 ms).
    let vars = [("UGC_WRITE_VISIBILITY_TIMEOUT_MS", "100")];
    let a = Arc::new(TestApp::start_with(&vars).await);
    a.seed(10, 20, 40).await;
    let b = Arc::new(TestApp::start_on(&a.db_url, &vars).await);
    let others = listener_backends(&a).await;
    let c = Arc::new(TestApp::start_on(&a.db_url, &vars).await);
    let c_listener = listener_backends(&a).await.into_iter().find(|pid| !others.contains(pid)).unwrap();
    let apps = [Arc::clone(&a), Arc::clone(&b), Arc::clone(&c)];

    // Two writers, each on its own review of its own offer.
    const WRITES: u64 = 30;
    let mut reviews = Vec::new();
    for w in 0..2 {
        let offer = format!("offer-vis-{w}");
        let body = create(&a, &format!("writer-{w}"), &offer, 4, "initial v0").await;
        let id = body["data"]["createReview"]["id"].as_str().unwrap_or_else(|| panic!("{body}")).to_owned();
        reviews.push((w, id, offer));
    }

    // Readers keep every instance's L1 and rendered entities warm with
    // whatever is current, so that a missed invalidation would be served.
    let done = Arc::new(AtomicBool::new(false));
    let background_reads = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for app in &apps {
        for (_, id, offer) in &reviews {
            let (app, id, offer, done, n) =
                (Arc::clone(app), id.clone(), offer.clone(), Arc::clone(&done), Arc::clone(&background_reads));
            readers.push(tokio::spawn(async move {
                while !done.load(Ordering::Relaxed) {
                    read_versions(&app, &id, &offer).await;
                    n.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }

    // C's listener is slow: stalled for 40 ms out of every 80 (its backend
    // stopped and continued), as a loaded instance would be. Its L1 lags
    // the writes by up to 40 ms; the writers' wait covers it.
    let flapping = {
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let stalled = Stalled::new(c_listener);
                tokio::time::sleep(Duration::from_millis(40)).await;
                drop(stalled);
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };

    let writers = reviews.iter().cloned().map(|(w, id, offer)| {
        let apps = apps.clone();
        tokio::spawn(async move {
            let writer = token(&format!("writer-{w}"), &[]);
            let (mut stale, mut checked, mut latencies) = (Vec::new(), 0u32, Vec::new());
            for n in 1..=WRITES {
                let at = &apps[(n as usize + w) % 3];
                let started = Instant::now();
                let body = at.gql_as(Some(&writer), UPDATE, json!({ "id": id, "text": format!("w{w} v{n}") })).await;
                latencies.push(started.elapsed().as_secs_f64() * 1000.0);
                assert_eq!(version(&body["data"]["updateReview"]["text"]), Some(n), "{body}");
                // Sent after the acknowledgement: every instance, both paths.
                for (i, app) in apps.iter().enumerate() {
                    for (path, seen) in
                        ["review(id)", "offer page (entity cache)"].iter().zip(read_versions(app, &id, &offer).await)
                    {
                        checked += 1;
                        if seen.is_none_or(|v| v < n) {
                            stale.push(format!("instance {i}, {path}: saw {seen:?} after v{n} was acknowledged"));
                        }
                    }
                }
            }
            (stale, checked, latencies)
        })
    });
    let (mut stale, mut checked, mut latencies) = (Vec::new(), 0, Vec::new());
    for writer in futures::future::join_all(writers).await {
        let (s, c, l) = writer.unwrap();
        stale.extend(s);
        checked += c;
        latencies.extend(l);
    }
    done.store(true, Ordering::Relaxed);
    flapping.await.unwrap();
    for r in readers {
        r.await.unwrap();
    }

    latencies.sort_by(f64::total_cmp);
    let (mut waited, mut timeouts) = (0.0, 0.0);
    for app in &apps {
        waited += app.metric("ugc_write_visibility_wait_seconds_count", &[]).await;
        timeouts += app.metric("ugc_write_visibility_timeouts_total", &[]).await;
    }
    println!(
        "{} writes, {checked} reads after acknowledgement ({} in the background): {} older; write latency p50 {:.1} ms, \
         p99 {:.1} ms; {waited} waits, {timeouts} time-outs",
        latencies.len(),
        background_reads.load(Ordering::Relaxed),
        stale.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
    );
    assert!(stale.is_empty(), "reads older than an acknowledged write:\n{}", stale.join("\n"));
    assert_eq!(waited, (2 * WRITES + 2) as f64, "every mutation waited for the others' acknowledgements");
    assert!(a.metric("ugc_instances_live", &[]).await >= 3.0, "the writer saw the three instances");
}

/// Acknowledgements are for writers elsewhere: an instance that relayed its
/// own write does not acknowledge it (nobody waits for that), the others do.
#[tokio::test]
async fn a_writer_is_acknowledged_by_the_others_and_not_by_itself() {
    let vars = [("UGC_WRITE_VISIBILITY_TIMEOUT_MS", "2000")];
    let a = TestApp::start_with(&vars).await;
    let b = TestApp::start_on(&a.db_url, &vars).await;
    for (n, offer) in ["offer-ack-1", "offer-ack-2"].iter().enumerate() {
        let body = create(&a, &format!("acker-{n}"), offer, 5, "acknowledged").await;
        assert!(body["data"]["createReview"]["id"].is_string(), "{body}");
    }
    // Each answer waited for B's acknowledgement, which A's listener heard
    // after its own notifications of the same writes (commit order).
    assert_eq!(a.metric("ugc_write_visibility_timeouts_total", &[]).await, 0.0, "B acknowledged both writes");
    assert_eq!(a.metric("ugc_write_visibility_wait_seconds_count", &[]).await, 2.0);
    assert!(b.metric("ugc_visibility_acks_sent_total", &[]).await >= 1.0, "B acknowledged");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.metric("ugc_visibility_acks_sent_total", &[]).await, 0.0, "A acknowledged its own writes");
}

/// The Postgres backend serving an instance's invalidation listener,
/// stopped with SIGSTOP until dropped: the instance keeps running but hears
/// nothing, as when its listener stalls.
struct Stalled(i32);

impl Stalled {
    fn new(pid: i32) -> Self {
        assert!(Command::new("kill").args(["-STOP", &pid.to_string()]).status().unwrap().success());
        Self(pid)
    }
}

impl Drop for Stalled {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0.to_string()]).status();
    }
}

async fn listener_backends(app: &TestApp) -> Vec<i32> {
    let db = app.db_url.rsplit('/').next().unwrap().to_owned();
    sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = $1 AND query LIKE 'LISTEN%' ORDER BY pid")
        .bind(db)
        .fetch_all(&app.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_instance_that_does_not_acknowledge_serves_no_l1_until_it_has_caught_up() {
    // L1 itself is measured: no rendered fragments in front of it (they
    // close with the same gate; entity_shapes checks them).
    let vars = [("UGC_WRITE_VISIBILITY_TIMEOUT_MS", "300"), ("UGC_ENTITY_CACHE", "off")];
    let b = TestApp::start_with(&vars).await;
    b.seed(5, 10, 20).await;
    let b_listener = listener_backends(&b).await;
    assert_eq!(b_listener.len(), 1, "{b_listener:?}");
    let a = TestApp::start_on(&b.db_url, &vars).await;
    let body = create(&a, "alice", "offer-stall", 5, "before v1").await;
    let id = body["data"]["createReview"]["id"].as_str().unwrap().to_owned();
    let text = async |app: &TestApp| app.gql(REVIEW, json!({ "id": id })).await["data"]["review"]["text"].clone();
    let l1 = async |app: &TestApp, result: &str| {
        app.metric("ugc_cache_requests_total", &["layer=\"l1\"", "kind=\"review\"", &format!("result=\"{result}\"")])
            .await
    };

    assert_eq!(text(&b).await, "before v1");
    let hits = l1(&b, "hit").await;
    assert_eq!(text(&b).await, "before v1");
    assert_eq!(l1(&b, "hit").await, hits + 1.0, "B serves the review from its L1");

    let stalled = Stalled::new(b_listener[0]);
    let writer = token("alice", &[]);
    let started = Instant::now();
    let updated = a.gql_as(Some(&writer), UPDATE, json!({ "id": id, "text": "after v2" })).await;
    let took = started.elapsed();
    assert_eq!(updated["data"]["updateReview"]["text"], "after v2", "{updated}");
    assert_eq!(a.metric("ugc_write_visibility_timeouts_total", &[]).await, 1.0, "B did not acknowledge");
    assert!(took >= Duration::from_millis(300), "the writer waited the whole time-out for B: {took:?}");

    // B never heard of the write, yet does not serve its old L1 entry.
    let fenced = l1(&b, "fenced").await;
    assert_eq!(text(&b).await, "after v2", "B served a value older than an acknowledged write");
    assert!(l1(&b, "fenced").await > fenced, "B's L1 is closed while it is behind");

    // Caught up, B acknowledges again and serves L1 again.
    drop(stalled);
    assert!(
        eventually(Duration::from_secs(10), async || b.state.cache.gate().is_open(std::time::Instant::now())).await,
        "B's L1 reopens once its listener catches up"
    );
    let again = a.gql_as(Some(&writer), UPDATE, json!({ "id": id, "text": "again v3" })).await;
    assert_eq!(again["data"]["updateReview"]["text"], "again v3", "{again}");
    assert_eq!(a.metric("ugc_write_visibility_timeouts_total", &[]).await, 1.0, "B acknowledged the next write");
    assert_eq!(text(&b).await, "again v3");
    let hits = l1(&b, "hit").await;
    assert_eq!(text(&b).await, "again v3");
    assert_eq!(l1(&b, "hit").await, hits + 1.0, "B serves from L1 again");
}

/// The writer's own relay is on its request's critical path, so it is
/// kept to the fewest round trips: no claim (the writer has its event in
/// hand), one statement for the write position, the watermark with the
/// tokens (one Redis call on a single server; a cluster keeps it on another
/// node and pays a second), and one statement that marks the event
/// processed, sends the notifications and reads the live set. And the other
/// instance is still told: its warm page shows the write once it is
/// acknowledged.
#[tokio::test]
async fn a_writers_relay_costs_one_redis_call_and_two_statements_and_still_reaches_the_others() {
    let a = TestApp::start().await;
    a.seed(5, 10, 20).await;
    let b = TestApp::start_on(&a.db_url, &[]).await;
    let offer = "offer-000001";
    let texts = |body: Value| -> Vec<Value> {
        let edges = body["data"]["_entities"][0]["reviews"]["edges"].as_array().cloned();
        edges.unwrap_or_else(|| panic!("{body}")).iter().map(|e| e["node"]["text"].clone()).collect()
    };
    let reps = json!({ "representations": [{ "__typename": "Offer", "id": offer }] });
    let b_hits = async || b.metric("ugc_cache_requests_total", &["layer=\"entity\"", "result=\"hit\""]).await;
    let before_write = texts(b.gql(OFFER_PAGE, reps.clone()).await);
    let hits = b_hits().await;
    assert_eq!(texts(b.gql(OFFER_PAGE, reps.clone()).await), before_write);
    assert!(b_hits().await > hits, "B's page is warm: the second read is served from its rendered fragment");

    let metric = async |name: &str, label: &str| a.metric(name, &[label]).await;
    let calls = metric("ugc_redis_calls_total", "op=\"invalidate\"").await;
    let statements = async || {
        let mut counts = Vec::new();
        for name in ["write_position", "finish_outbox", "live_instances"] {
            counts.push(metric("ugc_sql_statements_total", &format!("statement=\"{name}\"")).await);
        }
        counts
    };
    let before = statements().await;
    let body = create(&a, "relay-writer", offer, 5, "relayed in one round trip").await;
    assert!(body["errors"].is_null(), "{body}");

    let after_write = texts(b.gql(OFFER_PAGE, reps).await);
    assert!(
        after_write.contains(&json!("relayed in one round trip")),
        "B shows the acknowledged write: {after_write:?}"
    );
    let per_write = if crate::support::redis_cluster_urls().is_some() { 2.0 } else { 1.0 };
    assert_eq!(metric("ugc_redis_calls_total", "op=\"invalidate\"").await - calls, per_write);
    let after = statements().await;
    let spent: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(spent, [1.0, 1.0, 0.0], "write_position, finish_outbox, and no live_instances of its own");
    assert_eq!(metric("ugc_sql_statements_total", "statement=\"notify\"").await, 0.0, "no statement of its own");
}
