//! The read path costs a constant number of SQL statements per request,
//! whatever the number of entities: proven from `/metrics`.

use serde_json::{json, Value};
use sqlx::PgPool;

use crate::cluster::PgCluster;
use crate::support::TestApp;

const ENTITIES: &str = "query($representations: [_Any!]!) {
  _entities(representations: $representations) {
    ... on Offer {
      id
      rating { average count distribution }
      reviews(first: 5) { totalCount edges { node { id rating text author { id } } } }
    }
  }
}";

fn offers(n: usize) -> Value {
    Value::Array((1..=n).map(|i| json!({ "__typename": "Offer", "id": format!("offer-{i:06}") })).collect())
}

async fn statements_for(app: &TestApp, n: usize) -> (u64, Value) {
    let before = app.sql_statements().await;
    let body = app.gql(ENTITIES, json!({ "representations": offers(n) })).await;
    assert!(body["errors"].is_null(), "{body}");
    (app.sql_statements().await - before, body)
}

#[tokio::test]
async fn a_hundred_offers_cost_a_constant_number_of_statements() {
    // The batching window is widened from its 1 ms default: this checks that
    // the cost does not grow with the number of offers, and an unoptimised
    // test build on a loaded 2-core machine can take longer than 1 ms just to
    // enqueue 100 entities' keys.
    let app = TestApp::start_with(&[("UGC_LOADER_DELAY_US", "20000")]).await;
    app.seed(150, 500, 5000).await;

    let (for_one, _) = statements_for(&app, 1).await;
    let (for_ten, _) = statements_for(&app, 10).await;
    let (for_hundred, body) = statements_for(&app, 100).await;
    println!("SQL statements: 1 offer → {for_one}, 10 offers → {for_ten}, 100 offers → {for_hundred}");
    assert!(for_hundred <= 4, "100 offers took {for_hundred} statements");
    assert_eq!(for_hundred, for_one, "the cost does not grow with the number of offers");

    let entities = body["data"]["_entities"].as_array().unwrap();
    assert_eq!(entities.len(), 100);
    for (i, offer) in entities.iter().enumerate() {
        assert_eq!(offer["id"], format!("offer-{:06}", i + 1), "answers come back in representation order");
        let edges = offer["reviews"]["edges"].as_array().unwrap();
        assert_eq!(edges.len().min(5), edges.len());
        assert_eq!(offer["reviews"]["totalCount"], offer["rating"]["count"]);
    }
    let hot = &entities[0];
    assert_eq!(hot["reviews"]["edges"].as_array().unwrap().len(), 5, "the hottest offer has a full first page");
}

#[tokio::test]
async fn unknown_or_hidden_reviews_resolve_to_null_entities() {
    let app = TestApp::start().await;
    let body = app
        .gql(
            "{ _entities(representations: [{ __typename: \"Review\", id: \"424242\" }, { __typename: \"Review\", id: \"junk\" }]) { ... on Review { id } } }",
            json!({}),
        )
        .await;
    assert_eq!(body["data"]["_entities"], json!([null, null]), "{body}");
}

/// Statements Postgres itself ran in database `db` since the last reset
/// (`pg_stat_statements`: it cannot miss one), with their texts.
async fn postgres_counts(admin: &PgPool, db: &str) -> (i64, Vec<String>) {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT s.query, s.calls FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
         WHERE d.datname = $1 AND s.toplevel",
    )
    .bind(db)
    .fetch_all(admin)
    .await
    .unwrap();
    (rows.iter().map(|(_, n)| n).sum(), rows.into_iter().map(|(q, n)| format!("{n}× {q}")).collect())
}

#[tokio::test]
async fn the_entity_cache_keeps_the_loaders_batches_by_postgres_own_count() {
    // A private cluster: pg_stat_statements must be preloaded, which the
    // machine's shared server is not (and must not be changed for).
    let cluster = PgCluster::start();
    let admin = PgPool::connect(&cluster.url("postgres")).await.unwrap();
    sqlx::query("CREATE EXTENSION pg_stat_statements").execute(&admin).await.unwrap();
    let db = format!("ugc_p_{}", std::process::id());
    sqlx::query(&format!("CREATE DATABASE {db}")).execute(&admin).await.unwrap();
    // Widened batching window: see `a_hundred_offers_cost_a_constant_number_of_statements`.
    // No background relay or listener: every statement counted is the request's.
    let app = TestApp::start_without_background_on(&cluster.url(&db), &[]).await;
    app.seed(300, 500, 8000).await;

    let reps = |from: usize, n: usize| -> Value {
        Value::Array(
            (from..from + n).map(|i| json!({ "__typename": "Offer", "id": format!("offer-{i:06}") })).collect(),
        )
    };
    let measure = async |label: &str, query: &str, representations: Value| -> i64 {
        sqlx::query("SELECT pg_stat_statements_reset()").execute(&admin).await.unwrap();
        let n = representations.as_array().unwrap().len();
        let body = app.gql(query, json!({ "representations": representations })).await;
        assert!(body["errors"].is_null(), "{body}");
        assert_eq!(body["data"]["_entities"].as_array().unwrap().len(), n);
        let (count, statements) = postgres_counts(&admin, &db).await;
        println!("{label}: {count} statements\n  {}", statements.join("\n  "));
        count
    };

    // Cold: nothing in L1, L2 or the entity cache.
    let cold_one = measure("offer 1, cold", ENTITIES, reps(1, 1)).await;
    let cold_hundred = measure("offers 101–200, cold", ENTITIES, reps(101, 100)).await;
    // Half rendered already (151–200), half not (201–250).
    let half = measure("offers 151–250, half rendered", ENTITIES, reps(151, 100)).await;
    let warm = measure("offers 151–250 again", ENTITIES, reps(151, 100)).await;

    // One level deeper (each review's author's count): one statement more,
    // still whatever the number of offers.
    let nested = "query($representations: [_Any!]!) { _entities(representations: $representations) {
      ... on Offer { rating { count } reviews(first: 5) { edges { node { id author { id reviewCount } } } } } } }";
    let deeper = measure("offers 251–300, cold, with authors' counts", nested, reps(251, 50)).await;

    assert!(deeper <= 3, "three kinds, three statements: {deeper}");
    assert!(cold_one <= 2, "one cold offer: {cold_one}");
    assert!(cold_hundred <= 3, "100 cold offers cost {cold_hundred} statements (entity cache off: 2)");
    assert!(half <= 3, "100 offers, 50 of them new: {half}");
    assert_eq!(warm, 0, "a warm entity fetch runs no SQL");
    drop(app);
    admin.close().await;
}
