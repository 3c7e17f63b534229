//! Reads: lists, orders, keyset pagination, aggregates, visibility.

use std::collections::HashSet;

use serde_json::{json, Value};

use crate::support::{error_code, TestApp};

const OFFER_PAGE: &str = "query($id: ID!, $first: Int, $after: String, $order: ReviewOrder) {
  offer(id: $id) {
    reviews(first: $first, after: $after, order: $order) {
      totalCount
      edges { cursor node { id rating createdAt status } }
      pageInfo { hasNextPage endCursor }
    }
  }
}";

/// Walks a whole list page by page; returns the nodes in order.
async fn walk(app: &TestApp, offer: &str, order: &str, first: i64) -> Vec<Value> {
    let mut after: Option<String> = None;
    let mut nodes = Vec::new();
    for _ in 0..1000 {
        let body = app.gql(OFFER_PAGE, json!({ "id": offer, "first": first, "after": after, "order": order })).await;
        let conn = &body["data"]["offer"]["reviews"];
        let edges = conn["edges"].as_array().unwrap_or_else(|| panic!("{body}"));
        nodes.extend(edges.iter().map(|e| e["node"].clone()));
        if !conn["pageInfo"]["hasNextPage"].as_bool().unwrap() {
            return nodes;
        }
        after = conn["pageInfo"]["endCursor"].as_str().map(str::to_owned);
    }
    panic!("pagination did not end");
}

fn key(node: &Value) -> (i64, String, i64) {
    (
        node["rating"].as_i64().unwrap(),
        node["createdAt"].as_str().unwrap().to_owned(),
        node["id"].as_str().unwrap().parse().unwrap(),
    )
}

#[tokio::test]
async fn every_order_pages_through_all_published_reviews_exactly_once_in_order() {
    let app = TestApp::start().await;
    app.seed(20, 400, 2000).await;
    let published = app
        .count("SELECT count(*) FROM reviews WHERE offer_id = 'offer-000001' AND status = 'PUBLISHED'")
        .await as usize;
    assert!(published > 50, "the hottest offer has many reviews");

    for order in ["NEWEST", "OLDEST", "HIGHEST_RATING", "LOWEST_RATING"] {
        let nodes = walk(&app, "offer-000001", order, 7).await;
        assert_eq!(nodes.len(), published, "{order}: every published review once");
        let ids: HashSet<_> = nodes.iter().map(|n| n["id"].as_str().unwrap().to_owned()).collect();
        assert_eq!(ids.len(), published, "{order}: no duplicates");
        assert!(nodes.iter().all(|n| n["status"] == "PUBLISHED"), "{order}: only published");
        let keys: Vec<_> = nodes.iter().map(key).collect();
        for pair in keys.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let newest_first = (&b.1, b.2) < (&a.1, a.2);
            let ok = match order {
                "NEWEST" => newest_first,
                "OLDEST" => !newest_first,
                "HIGHEST_RATING" => a.0 > b.0 || (a.0 == b.0 && newest_first),
                _ => a.0 < b.0 || (a.0 == b.0 && newest_first),
            };
            assert!(ok, "{order}: {a:?} then {b:?}");
        }
    }
}

#[tokio::test]
async fn pagination_is_stable_under_concurrent_inserts() {
    let app = TestApp::start().await;
    app.seed(5, 100, 200).await;
    let first = app.gql(OFFER_PAGE, json!({ "id": "offer-000001", "first": 5 })).await;
    let conn = &first["data"]["offer"]["reviews"];
    let seen: Vec<String> =
        conn["edges"].as_array().unwrap().iter().map(|e| e["node"]["id"].as_str().unwrap().into()).collect();
    // A new review lands on top of the list between two page reads.
    sqlx::query(
        "INSERT INTO reviews (offer_id, author_id, rating, body) VALUES ('offer-000001', 'newcomer', 5, 'new')",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let second =
        app.gql(OFFER_PAGE, json!({ "id": "offer-000001", "first": 5, "after": conn["pageInfo"]["endCursor"] })).await;
    let next: Vec<String> = second["data"]["offer"]["reviews"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["node"]["id"].as_str().unwrap().into())
        .collect();
    assert_eq!(next.len(), 5);
    assert!(next.iter().all(|id| !seen.contains(id)), "no review repeats: {seen:?} then {next:?}");
}

#[tokio::test]
async fn rating_aggregates_match_the_published_rows() {
    let app = TestApp::start().await;
    app.seed(10, 300, 1000).await;
    let body = app
        .gql(
            "{ offer(id: \"offer-000002\") { rating { average count distribution } } \
               empty: offer(id: \"no-such-offer\") { rating { average count distribution } reviews { totalCount edges { cursor } pageInfo { hasNextPage endCursor } } } }",
            json!({}),
        )
        .await;
    let rating = &body["data"]["offer"]["rating"];
    let (count, avg): (i64, f64) = sqlx::query_as(
        "SELECT count(*), avg(rating)::float8 FROM reviews WHERE offer_id = 'offer-000002' AND status = 'PUBLISHED'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(rating["count"], count);
    assert!((rating["average"].as_f64().unwrap() - avg).abs() < 1e-9);
    let dist: Vec<i64> = rating["distribution"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    assert_eq!(dist.len(), 5);
    assert_eq!(dist.iter().sum::<i64>(), count);
    assert_eq!(
        body["data"]["empty"],
        json!({ "rating": { "average": null, "count": 0, "distribution": [0, 0, 0, 0, 0] },
                "reviews": { "totalCount": 0, "edges": [], "pageInfo": { "hasNextPage": false, "endCursor": null } } })
    );
}

#[tokio::test]
async fn user_lists_and_counts_only_published_reviews() {
    let app = TestApp::start().await;
    app.seed(30, 20, 400).await;
    let published =
        app.count("SELECT count(*) FROM reviews WHERE author_id = 'user-000003' AND status = 'PUBLISHED'").await;
    let body = app
        .gql(
            "{ user(id: \"user-000003\") { reviewCount reviews(first: 100) { totalCount edges { node { status author { id } } } } } }",
            json!({}),
        )
        .await;
    let user = &body["data"]["user"];
    assert_eq!(user["reviewCount"], published);
    assert_eq!(user["reviews"]["totalCount"], published);
    let edges = user["reviews"]["edges"].as_array().unwrap();
    assert_eq!(edges.len() as i64, published);
    assert!(edges.iter().all(|e| e["node"]["status"] == "PUBLISHED" && e["node"]["author"]["id"] == "user-000003"));
}

#[tokio::test]
async fn cursors_from_another_list_or_order_are_refused() {
    let app = TestApp::start().await;
    app.seed(5, 100, 200).await;
    let body = app.gql(OFFER_PAGE, json!({ "id": "offer-000001", "first": 2 })).await;
    let cursor = body["data"]["offer"]["reviews"]["pageInfo"]["endCursor"].clone();
    for (offer, order) in [("offer-000002", "NEWEST"), ("offer-000001", "OLDEST")] {
        let body = app.gql(OFFER_PAGE, json!({ "id": offer, "first": 2, "after": cursor, "order": order })).await;
        assert_eq!(error_code(&body), Some("BAD_USER_INPUT"), "{body}");
    }
}

/// Review lists and ratings are resolved by a direct walk when the selection is plain
/// (`graphql/types/direct.rs`) and by the derived resolvers otherwise
/// (here: the same selection inside inline fragments, which the walk never
/// takes): both must give the same answer, field for field.
#[tokio::test]
async fn review_lists_resolved_directly_answer_as_the_derived_resolvers_do() {
    let app = TestApp::start_with(&[("UGC_ENTITY_CACHE", "off")]).await;
    app.seed(5, 30, 120).await;
    let list = |wrap: bool| {
        let on = |ty: &str, inner: &str| if wrap { format!("... on {ty} {{ {inner} }}") } else { inner.to_owned() };
        let author = on("User", "id __typename");
        let node = on("Review", &format!("id rating text status createdAt updatedAt __typename stars: rating author {{ {author} }} offer {{ id }}"));
        let edge = on("ReviewEdge", &format!("cursor __typename node {{ {node} }} again: node {{ id }}"));
        let info = on("PageInfo", "hasNextPage endCursor __typename");
        on("ReviewConnection", &format!("totalCount __typename edges {{ {edge} }} pageInfo {{ {info} }}"))
    };
    for wrap in [false, true] {
        assert_ne!(list(wrap).contains("... on"), !wrap);
    }
    let queries = |wrap: bool| {
        let l = list(wrap);
        let fields = "average count distribution __typename n: count";
        let rating = if wrap { format!("... on OfferRating {{ {fields} }}") } else { fields.to_owned() };
        [
            format!("query($id: ID!) {{ offer(id: $id) {{ reviews(first: 4, order: HIGHEST_RATING) {{ {l} }} }} }}"),
            format!("query($id: ID!) {{ user(id: \"user-000001\") {{ reviews(first: 3) {{ {l} }} }} other: offer(id: $id) {{ reviews(first: 2) {{ {l} }} }} }}"),
            format!("query($r: [_Any!]!) {{ _entities(representations: $r) {{ ... on Offer {{ id rating {{ {rating} }} reviews(first: 5) {{ {l} }} }} }} }}"),
        ]
    };
    let vars = json!({
        "id": "offer-000001",
        "r": [{ "__typename": "Offer", "id": "offer-000001" }, { "__typename": "Offer", "id": "offer-000002" }],
    });
    for (direct, derived) in queries(false).into_iter().zip(queries(true)) {
        let a = app.gql(&direct, vars.clone()).await;
        let b = app.gql(&derived, vars.clone()).await;
        assert!(a.get("errors").is_none(), "{a}");
        assert_eq!(a, b, "{direct}");
        let text = a.to_string();
        assert!(
            text.contains("\"stars\":") && text.contains("\"again\":") && text.contains("\"endCursor\":\""),
            "{text}"
        );
    }
    // A selection the walk does not take (a field that loads) answers through the derived resolvers.
    let counted = app
        .gql(
            "{ offer(id: \"offer-000001\") { reviews(first: 2) { edges { node { author { id reviewCount } } } } } }",
            json!({}),
        )
        .await;
    let author = &counted["data"]["offer"]["reviews"]["edges"][0]["node"]["author"];
    let expected = app
        .count(&format!(
            "SELECT count(*) FROM reviews WHERE author_id = '{}' AND status = 'PUBLISHED' AND deleted_at IS NULL",
            author["id"].as_str().unwrap_or_else(|| panic!("{counted}"))
        ))
        .await;
    assert_eq!(author["reviewCount"], expected, "{counted}");
}
