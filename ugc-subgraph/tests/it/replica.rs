//! Read replicas never poison the shared caches: against a real streaming
//! replica (a private primary and a `pg_basebackup` of it), replay paused
//! with `pg_wal_replay_pause()`. And a replica that goes away costs no
//! failed read.

use std::time::Duration;

use serde_json::json;

use crate::cluster::PgCluster;
use crate::mutations::create;
use crate::support::{eventually, token, TestApp};

const REVIEW: &str = "query($id: ID!) { review(id: $id) { text } }";
const UPDATE: &str = "mutation($id: ID!) { updateReview(id: $id, input: { text: \"after\" }) { text } }";

#[tokio::test]
async fn a_lagging_replica_is_never_read_into_the_caches() {
    let primary = PgCluster::start();
    let db = format!("ugc_r_{}", std::process::id());
    primary.psql("postgres", &format!("CREATE DATABASE {db}"));
    let replica = primary.replica();
    let read_url = replica.url(&db);
    let vars = [("DATABASE_READ_URL", read_url.as_str())];
    let a = TestApp::start_on(&primary.url(&db), &vars).await;
    a.seed(5, 10, 20).await;
    let body = create(&a, "alice", "offer-replica", 4, "before").await;
    let id = body["data"]["createReview"]["id"].as_str().unwrap_or_else(|| panic!("{body}")).to_owned();
    let routed =
        async |app: &TestApp, pool: &str| app.metric("ugc_replica_routing_total", &[&format!("pool=\"{pool}\"")]).await;
    let text = async |app: &TestApp| app.gql(REVIEW, json!({ "id": id })).await["data"]["review"]["text"].clone();
    // A read no cache can answer (a new id each time): which pool served it?
    let probes = std::sync::atomic::AtomicU32::new(0);
    let served_by_replica = async |app: &TestApp| {
        let before = routed(app, "replica").await;
        let n = probes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        app.gql(&format!("{{ user(id: \"probe-{n}\") {{ reviewCount }} }}"), json!({})).await;
        routed(app, "replica").await > before
    };

    // Caught up, reads go to the replica.
    assert!(
        eventually(Duration::from_secs(10), async || replica
            .psql(&db, &format!("SELECT count(*) FROM reviews WHERE id = {id}"))
            == "1")
        .await
    );
    assert!(
        eventually(Duration::from_secs(10), async || served_by_replica(&a).await).await,
        "a caught-up replica serves reads"
    );
    assert_eq!(text(&a).await, "before");

    // The replica stops replaying; the write commits on the primary.
    replica.psql(&db, "SELECT pg_wal_replay_pause()");
    let updated = a.gql_as(Some(&token("alice", &[])), UPDATE, json!({ "id": id })).await;
    assert_eq!(updated["data"]["updateReview"]["text"], "after", "{updated}");
    assert_eq!(
        replica.psql(&db, &format!("SELECT body FROM reviews WHERE id = {id}")),
        "before",
        "the replica is behind the write"
    );

    // The reads after it, on this instance and on a fresh one (empty L1,
    // reading L2), see the write: served from the primary, and what they
    // cached is the new text.
    let primary_reads = routed(&a, "primary").await;
    assert_eq!(text(&a).await, "after", "a read from the lagging replica was served");
    assert!(routed(&a, "primary").await > primary_reads, "fenced to the primary");
    assert!(!served_by_replica(&a).await, "while the replica is behind, nothing is read from it");
    let b = TestApp::start_on(&primary.url(&db), &vars).await;
    assert_eq!(text(&b).await, "after", "another instance was served a poisoned L2 entry or the replica");
    assert_eq!(text(&b).await, "after");

    // Replay resumes: the replica serves again, and the caches still hold
    // the new text.
    replica.psql(&db, "SELECT pg_wal_replay_resume()");
    assert!(
        eventually(Duration::from_secs(10), async || served_by_replica(&b).await).await,
        "the replica serves again once it has replayed the write"
    );
    assert_eq!(text(&a).await, "after");

    // A seed moves the data epoch without an outbox event: the review
    // above is gone on the primary (ids restart), still there on a replica
    // that has not replayed the seed.
    replica.psql(&db, "SELECT pg_wal_replay_pause()");
    a.seed(5, 10, 20).await;
    assert_eq!(
        replica.psql(&db, &format!("SELECT body FROM reviews WHERE id = {id}")),
        "after",
        "the replica is behind the seed"
    );
    assert_eq!(text(&a).await, serde_json::Value::Null, "read from a replica that has not replayed the seed");
    replica.psql(&db, "SELECT pg_wal_replay_resume()");
    drop((a, b));
}

#[tokio::test]
async fn a_replica_that_goes_away_costs_no_failed_read_and_readiness_says_so() {
    let primary = PgCluster::start();
    let db = format!("ugc_rg_{}", std::process::id());
    primary.psql("postgres", &format!("CREATE DATABASE {db}"));
    let replica = primary.replica();
    let read_url = replica.url(&db);
    // Every read goes to Postgres: the pool that serves it is what is tested.
    let app =
        TestApp::start_on(&primary.url(&db), &[("DATABASE_READ_URL", read_url.as_str()), ("UGC_CACHE", "off")]).await;
    app.seed(5, 10, 20).await;
    let ready = async || -> serde_json::Value {
        app.client().get(app.url("/health/ready")).send().await.unwrap().json().await.unwrap()
    };
    let on_replica = async || app.metric("ugc_replica_routing_total", &["pool=\"replica\""]).await;
    let read = async || {
        let body = app
            .gql("{ offer(id: \"offer-000001\") { rating { count } reviews(first: 3) { totalCount } } }", json!({}))
            .await;
        let ok = body["errors"].is_null() && body["data"]["offer"]["rating"]["count"].is_number();
        if !ok {
            eprintln!("read failed: {body}");
        }
        ok
    };
    assert!(eventually(Duration::from_secs(10), async || ready().await["replica"] == "ok").await, "{}", ready().await);
    // Once it has replayed the seed (reads go to the primary until then).
    assert!(
        eventually(Duration::from_secs(10), async || {
            let before = on_replica().await;
            read().await && on_replica().await > before
        })
        .await,
        "a healthy replica serves reads"
    );

    // The replica crashes while reads keep coming.
    let reader = {
        let url = app.url("/graphql");
        let client = app.client().clone();
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let started = std::time::Instant::now();
            while started.elapsed() < Duration::from_secs(3) {
                let body: serde_json::Value = client
                    .post(&url)
                    .json(&json!({ "query": "{ offer(id: \"offer-000002\") { rating { count } reviews(first: 2) { totalCount } } }" }))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if body["errors"].is_null() {
                    ok += 1
                } else {
                    failed.push(body)
                }
            }
            (ok, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    replica.kill();
    let (ok, failed) = reader.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} reads failed while the replica went away: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        failed.first()
    );
    assert!(ok > 10, "only {ok} reads");
    let status = app.client().get(app.url("/health/ready")).send().await.unwrap();
    assert_eq!(status.status(), 200, "a missing replica does not make the instance unready");
    let body: serde_json::Value = status.json().await.unwrap();
    assert_eq!(body["replica"], "unavailable (reading from the primary)", "{body}");
    let before = on_replica().await;
    assert!(read().await);
    assert_eq!(on_replica().await, before, "reads went to the dead replica");

    // Back: reads return to it.
    replica.restart();
    assert!(eventually(Duration::from_secs(20), async || ready().await["replica"] == "ok").await, "{}", ready().await);
    let before = on_replica().await;
    assert!(read().await);
    assert!(on_replica().await > before, "the replica serves again once it answers");
}
