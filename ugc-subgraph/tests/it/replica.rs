//! Read replicas never poison the shared caches: against a real streaming
//! replica (a private primary and a `pg_basebackup` of it), replay paused
//! with `pg_wal_replay_pause()`.

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
    drop((a, b));
}
