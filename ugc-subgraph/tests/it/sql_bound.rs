//! The read path costs a constant number of SQL statements per request,
//! whatever the number of entities: proven from `/metrics`.

use serde_json::{json, Value};

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
