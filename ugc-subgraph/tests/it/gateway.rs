//! End to end through a real Apollo gateway (`gateway/`, @apollo/gateway with
//! IntrospectAndCompose) composing ugc-subgraph with the demo offers subgraph.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::process::{Child, Command};

use crate::mutations::create;
use crate::support::{error_code, eventually, token, TestApp};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn node(script: &str, env: &[(&str, String)]) -> Child {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("gateway");
    Command::new("node")
        .arg(dir.join(script))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node is required (make gateway-deps)")
}

struct Gateway {
    url: String,
    client: reqwest::Client,
    _processes: (Child, Child),
}

impl Gateway {
    async fn start(app: &TestApp) -> Self {
        let (offers_port, gateway_port) = (free_port(), free_port());
        let offers = node("offers.mjs", &[("OFFERS_PORT", offers_port.to_string())]);
        let client = reqwest::Client::new();
        let offers_url = format!("http://127.0.0.1:{offers_port}/graphql");
        let probe = json!({ "query": "{ __typename }" });
        assert!(
            eventually(Duration::from_secs(30), async || client.post(&offers_url).json(&probe).send().await.is_ok())
                .await,
            "offers subgraph did not start"
        );
        let gateway = node(
            "gateway.mjs",
            &[("GATEWAY_PORT", gateway_port.to_string()), ("OFFERS_URL", offers_url), ("UGC_URL", app.url("/graphql"))],
        );
        let url = format!("http://127.0.0.1:{gateway_port}/");
        let started = eventually(Duration::from_secs(60), async || match client.post(&url).json(&probe).send().await {
            Ok(r) => r.status().is_success(),
            Err(_) => false,
        })
        .await;
        assert!(started, "gateway did not start");
        Self { url, client, _processes: (offers, gateway) }
    }

    async fn query(&self, bearer: Option<&str>, query: &str, variables: Value) -> Value {
        let mut req = self.client.post(&self.url).json(&json!({ "query": query, "variables": variables }));
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap().json().await.unwrap()
    }

    /// A query as if an edge proxy in front of the gateway had forwarded it for `client`.
    async fn query_for(&self, client: &str, query: &str) -> Value {
        let req = self.client.post(&self.url).header("x-forwarded-for", client).json(&json!({ "query": query }));
        req.send().await.unwrap().json().await.unwrap()
    }
}

#[tokio::test]
async fn federated_queries_and_mutations_through_the_gateway() {
    let app = TestApp::start().await;
    app.seed(20, 200, 800).await;
    let gateway = Gateway::start(&app).await;

    // Offers come from the offers subgraph; ratings and reviews from ours.
    let body = gateway
        .query(
            None,
            "{ offers(first: 3) { id title rating { count average distribution }
                 reviews(first: 2) { totalCount edges { node { id rating author { id name } offer { id title } } } } } }",
            json!({}),
        )
        .await;
    assert!(body["errors"].is_null(), "{body}");
    let offers = body["data"]["offers"].as_array().unwrap();
    assert_eq!(offers.len(), 3);
    for offer in offers {
        let id = offer["id"].as_str().unwrap();
        assert_eq!(offer["title"], format!("Title of {id}"));
        let direct = app
            .gql(
                "query($id: ID!) { offer(id: $id) { rating { count average distribution } reviews(first: 2) { totalCount edges { node { id rating author { id } } } } } }",
                json!({ "id": id }),
            )
            .await;
        assert_eq!(offer["rating"], direct["data"]["offer"]["rating"], "same answer through the gateway");
        assert_eq!(offer["reviews"]["totalCount"], direct["data"]["offer"]["reviews"]["totalCount"]);
        let edges = offer["reviews"]["edges"].as_array().unwrap();
        assert_eq!(edges.len(), 2);
        for (edge, direct_edge) in edges.iter().zip(direct["data"]["offer"]["reviews"]["edges"].as_array().unwrap()) {
            assert_eq!(edge["node"]["id"], direct_edge["node"]["id"]);
            let author = edge["node"]["author"]["id"].as_str().unwrap();
            assert_eq!(edge["node"]["author"]["name"], format!("Name of {author}"), "User joined from offers");
            assert_eq!(edge["node"]["offer"]["title"], format!("Title of {id}"));
        }
    }

    // A mutation through the gateway: the Authorization header is forwarded.
    let create_via_gateway = "mutation($input: CreateReviewInput!) { createReview(input: $input) { id rating author { id name } offer { id title } } }";
    let input = json!({ "input": { "offerId": "offer-000003", "rating": 5, "text": "via the gateway" } });
    let anonymous = gateway.query(None, create_via_gateway, input.clone()).await;
    assert_eq!(error_code(&anonymous), Some("UNAUTHENTICATED"), "{anonymous}");
    let created = gateway.query(Some(&token("gw-user", &[])), create_via_gateway, input).await;
    assert!(created["errors"].is_null(), "{created}");
    assert_eq!(created["data"]["createReview"]["author"], json!({ "id": "gw-user", "name": "Name of gw-user" }));
    assert_eq!(created["data"]["createReview"]["offer"]["title"], "Title of offer-000003");

    let after = gateway
        .query(
            None,
            "{ offers(first: 3) { id rating { count } reviews(first: 1) { edges { node { author { id } } } } } }",
            json!({}),
        )
        .await;
    let third = &after["data"]["offers"][2];
    assert_eq!(third["rating"]["count"].as_i64().unwrap(), offers[2]["rating"]["count"].as_i64().unwrap() + 1);
    assert_eq!(third["reviews"]["edges"][0]["node"]["author"]["id"], "gw-user", "newest first");
    // The same through the subgraph directly, for good measure.
    let again = create(&app, "gw-user", "offer-000003", 1, "twice").await;
    assert_eq!(error_code(&again), Some("CONFLICT"));
}

#[tokio::test]
async fn rate_limits_follow_the_client_the_gateway_forwards() {
    // The gateway runs on 127.0.0.1 and is trusted; it appends its peer to
    // X-Forwarded-For, so the subgraph limits the client, not the gateway.
    let app = TestApp::start_with(&[
        ("UGC_TRUSTED_PROXIES", "127.0.0.1"),
        ("UGC_RATE_LIMIT_READ_PER_SEC", "1"),
        ("UGC_RATE_LIMIT_READ_BURST", "3"),
    ])
    .await;
    app.seed(5, 20, 40).await;
    let gateway = Gateway::start(&app).await;
    let query = "{ offers(first: 1) { id rating { count } } }";
    let mut answers = Vec::new();
    for _ in 0..5 {
        answers.push(gateway.query_for("203.0.113.50", query).await);
    }
    let limited = |a: &Value| a.to_string().contains("RATE_LIMITED") || a.to_string().contains("429");
    assert!(answers[..3].iter().all(|a| a["errors"].is_null()), "{answers:?}");
    assert!(answers[3..].iter().all(limited), "the client's budget is spent: {answers:?}");
    // Another client behind the same gateway is not affected.
    let other = gateway.query_for("203.0.113.51", query).await;
    assert!(other["errors"].is_null(), "{other}");
    assert!(app.metric("ugc_rate_limited_total", &["quota=\"read\""]).await >= 2.0);
}
