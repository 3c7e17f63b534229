//! The binary: start-up validation and graceful shutdown on SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::process::Command;

use crate::support::{eventually, token, TestDb, SECRET};

const BIN: &str = env!("CARGO_BIN_EXE_ugc-subgraph");

#[tokio::test]
async fn a_bad_setting_names_the_variable_and_exits_non_zero() {
    for (name, value) in [("UGC_DB_POOL_SIZE", "lots"), ("UGC_LISTEN", "localhost"), ("UGC_TYPO", "1")] {
        let out = Command::new(BIN)
            .env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
            .env(name, value)
            .output()
            .await
            .unwrap();
        assert!(!out.status.success(), "{name}={value} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(name), "{name}: {stderr}");
    }
    let out = Command::new(BIN).env_remove("DATABASE_URL").output().await.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("DATABASE_URL"));
}

/// The binary serving a fresh database on a free port: (database, port, process).
pub async fn serve(vars: &[(&str, &str)]) -> (TestDb, u16, tokio::process::Child) {
    let db = TestDb::create().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(BIN)
        .arg("serve")
        .env("DATABASE_URL", &db.url)
        .env("UGC_CACHE_PREFIX", &db.prefix)
        .env("UGC_LISTEN", format!("127.0.0.1:{port}"))
        .env("UGC_JWT_SECRET", SECRET)
        .envs(vars.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    (db, port, child)
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_then_exits() {
    let (test_db, port, mut child) = serve(&[]).await;
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    assert!(
        eventually(Duration::from_secs(30), async || client
            .get(format!("{base}/health/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200))
        .await,
        "the service did not become ready"
    );
    let gql = |query: &'static str, variables: Value| {
        let client = client.clone();
        let url = format!("{base}/graphql");
        async move {
            client
                .post(url)
                .bearer_auth(token("alice", &[]))
                .json(&json!({ "query": query, "variables": variables }))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let created =
        gql("mutation { createReview(input: { offerId: \"o\", rating: 3, text: \"before\" }) { id } }", json!({}))
            .await;
    let id = created["data"]["createReview"]["id"].clone();

    // Hold the row lock so the next update is still in flight at SIGTERM.
    let db = sqlx::PgPool::connect(&test_db.url).await.unwrap();
    let mut blocker = db.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM reviews FOR UPDATE").execute(&mut *blocker).await.unwrap();
    let in_flight = tokio::spawn(gql(
        "mutation($id: ID!) { updateReview(id: $id, input: { text: \"during shutdown\" }) { text } }",
        json!({ "id": id }),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().await.unwrap().success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    blocker.rollback().await.unwrap();

    let answer = in_flight.await.unwrap();
    assert_eq!(answer["data"]["updateReview"]["text"], "during shutdown", "{answer}");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("exits").unwrap();
    assert!(status.success(), "{status}");
}

/// On SIGTERM readiness fails at once, yet new requests are still served
/// for the drain period; then the process stops accepting and exits.
#[tokio::test]
async fn sigterm_fails_readiness_first_and_keeps_serving_through_the_drain() {
    let (_db, port, mut child) = serve(&[("UGC_SHUTDOWN_DRAIN_MS", "2000")]).await;
    let base = format!("http://127.0.0.1:{port}");
    let ready = |client: reqwest::Client| {
        let url = format!("{base}/health/ready");
        async move { client.get(url).send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
    };
    let client = reqwest::Client::new();
    assert!(eventually(Duration::from_secs(30), async || ready(client.clone()).await == 200).await);
    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().await.unwrap().success());
    assert!(eventually(Duration::from_secs(1), async || ready(client.clone()).await == 503).await, "readiness first");
    // A new client, on a new connection, during the drain: still served.
    let fresh = reqwest::Client::new();
    let answer: Value = fresh
        .post(format!("{base}/graphql"))
        .json(&json!({ "query": "{ offer(id: \"x\") { id } }" }))
        .send()
        .await
        .expect("served during the drain")
        .json()
        .await
        .unwrap();
    assert_eq!(answer["data"]["offer"]["id"], "x");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("exits").unwrap();
    assert!(status.success(), "{status}");
}
