//! Mutations: auth, permissions, conflicts, and read-after-write.

use serde_json::{json, Value};

use crate::support::{error_code, token, TestApp};

pub const CREATE: &str = "mutation($input: CreateReviewInput!) {
  createReview(input: $input) { id rating text status offer { id } author { id } createdAt updatedAt }
}";
const UPDATE: &str = "mutation($id: ID!, $input: UpdateReviewInput!) { updateReview(id: $id, input: $input) { id rating text updatedAt } }";
const DELETE: &str = "mutation($id: ID!) { deleteReview(id: $id) }";
const MODERATE: &str =
    "mutation($id: ID!, $status: ReviewStatus!) { moderateReview(id: $id, status: $status) { id status } }";
const OFFER: &str = "query($id: ID!) { offer(id: $id) { rating { count average distribution } reviews(first: 10) { totalCount edges { node { id text rating } } } } }";
const REVIEW: &str = "query($id: ID!) { review(id: $id) { id status text } }";

pub async fn create(app: &TestApp, who: &str, offer: &str, rating: i64, text: &str) -> Value {
    app.gql_as(Some(&token(who, &[])), CREATE, json!({ "input": { "offerId": offer, "rating": rating, "text": text } }))
        .await
}

#[tokio::test]
async fn a_created_review_is_visible_in_the_very_next_read() {
    let app = TestApp::start().await;
    let body = create(&app, "alice", "offer-x", 4, "  Solid product.  ").await;
    let review = &body["data"]["createReview"];
    assert_eq!(review["text"], "Solid product.", "text is trimmed: {body}");
    assert_eq!(review["status"], "PUBLISHED");
    assert_eq!(review["author"]["id"], "alice");
    assert_eq!(review["offer"]["id"], "offer-x");
    assert!(review["createdAt"].as_str().unwrap().ends_with('Z'));

    let offer = app.gql(OFFER, json!({ "id": "offer-x" })).await;
    assert_eq!(
        offer["data"]["offer"]["rating"],
        json!({ "count": 1, "average": 4.0, "distribution": [0, 0, 0, 1, 0] })
    );
    assert_eq!(offer["data"]["offer"]["reviews"]["edges"][0]["node"]["id"], review["id"]);
    let user = app.gql("{ user(id: \"alice\") { reviewCount } }", json!({})).await;
    assert_eq!(user["data"]["user"]["reviewCount"], 1);
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, 1, "the event is in the outbox");
}

/// A create is one statement that also appends its event: the event the
/// outbox holds (what a background relay reads after a crash) is exactly
/// the one the writer relayed from memory, id and version included, with
/// and without an idempotency key; and a refused create appends nothing.
#[tokio::test]
async fn a_created_reviews_outbox_event_is_the_one_its_writer_relayed() {
    use ugc_subgraph::domain::event::{Event, ReviewChange};
    use ugc_subgraph::domain::{EntityId, Rating, ReviewStatus, ReviewText};
    use ugc_subgraph::store::idempotency::IdempotencyKey;
    use ugc_subgraph::store::NewReview;

    let app = TestApp::start_without_background(&[]).await;
    let new = |author: &str| NewReview {
        offer_id: EntityId::new("offer-outbox", "offerId").unwrap(),
        author_id: EntityId::new(author, "sub").unwrap(),
        rating: Rating::new(4).unwrap(),
        text: ReviewText::new("payload").unwrap(),
        status: ReviewStatus::Published,
    };
    let key = IdempotencyKey { user: "bob".into(), key: "k-1".into(), fingerprint: "createReview".into() };
    for (author, key) in [("alice", None), ("bob", Some(&key))] {
        let committed = app.state.store.create_review(new(author), key).await.unwrap();
        let (event_id, event) = committed.event.unwrap();
        let expected = Event::ReviewChanged {
            review_id: committed.value.id,
            offer_id: "offer-outbox".into(),
            author_id: author.into(),
            change: ReviewChange::Created,
            version: committed.value.version,
        };
        assert_eq!(event, expected);
        let stored: serde_json::Value = sqlx::query_scalar("SELECT event FROM outbox WHERE id = $1")
            .bind(event_id)
            .fetch_one(&app.db)
            .await
            .unwrap();
        assert_eq!(serde_json::from_value::<Event>(stored).unwrap(), expected, "as the relay reads it");
    }
    let events =
        async || -> i64 { sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&app.db).await.unwrap() };
    let before = events().await;
    assert!(app.state.store.create_review(new("alice"), None).await.is_err(), "alice already reviewed it");
    assert_eq!(events().await, before, "a refused create appends no event");
}

#[tokio::test]
async fn one_review_per_user_and_offer() {
    let app = TestApp::start().await;
    create(&app, "alice", "offer-x", 4, "first").await;
    let second = create(&app, "alice", "offer-x", 2, "second").await;
    assert_eq!(error_code(&second), Some("CONFLICT"), "{second}");
    assert_eq!(app.count("SELECT count(*) FROM reviews").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, 1, "no event for a failed write");
    assert_eq!(error_code(&create(&app, "bob", "offer-x", 2, "other author").await), None);
}

#[tokio::test]
async fn only_the_author_or_a_moderator_may_update_or_delete() {
    let app = TestApp::start().await;
    let id = create(&app, "alice", "offer-x", 4, "mine").await["data"]["createReview"]["id"].clone();

    let bob = app.gql_as(Some(&token("bob", &[])), UPDATE, json!({ "id": id, "input": { "rating": 1 } })).await;
    assert_eq!(error_code(&bob), Some("FORBIDDEN"), "{bob}");
    let bob = app.gql_as(Some(&token("bob", &[])), DELETE, json!({ "id": id })).await;
    assert_eq!(error_code(&bob), Some("FORBIDDEN"), "{bob}");

    let alice =
        app.gql_as(Some(&token("alice", &[])), UPDATE, json!({ "id": id, "input": { "text": "edited" } })).await;
    assert_eq!(alice["data"]["updateReview"]["text"], "edited", "{alice}");
    assert_eq!(alice["data"]["updateReview"]["rating"], 4, "untouched field kept");
    let moderator =
        app.gql_as(Some(&token("mod", &["moderator"])), UPDATE, json!({ "id": id, "input": { "rating": 2 } })).await;
    assert_eq!(moderator["data"]["updateReview"]["rating"], 2, "{moderator}");

    let offer = app.gql(OFFER, json!({ "id": "offer-x" })).await;
    assert_eq!(offer["data"]["offer"]["rating"]["distribution"], json!([0, 1, 0, 0, 0]), "aggregate follows the edit");
    assert_eq!(offer["data"]["offer"]["reviews"]["edges"][0]["node"]["text"], "edited");

    let deleted = app.gql_as(Some(&token("alice", &[])), DELETE, json!({ "id": id })).await;
    assert_eq!(deleted["data"]["deleteReview"], true);
    let again = app.gql_as(Some(&token("alice", &[])), DELETE, json!({ "id": id })).await;
    assert_eq!(again["data"]["deleteReview"], false, "already deleted: {again}");

    let offer = app.gql(OFFER, json!({ "id": "offer-x" })).await;
    assert_eq!(offer["data"]["offer"]["rating"]["count"], 0);
    assert_eq!(offer["data"]["offer"]["reviews"]["totalCount"], 0);
    let by_id = app.gql_as(Some(&token("alice", &[])), REVIEW, json!({ "id": id })).await;
    assert_eq!(by_id["data"]["review"], Value::Null, "deleted reviews vanish, even for the author");
    assert_eq!(app.count("SELECT count(*) FROM reviews WHERE deleted_at IS NOT NULL").await, 1, "soft delete");
    // Deleting frees the (offer, author) slot for a new review.
    assert_eq!(error_code(&create(&app, "alice", "offer-x", 5, "again").await), None);
}

#[tokio::test]
async fn moderation_hides_and_restores_reviews() {
    let app = TestApp::start().await;
    let id = create(&app, "alice", "offer-x", 5, "great").await["data"]["createReview"]["id"].clone();
    let not_mod = app.gql_as(Some(&token("alice", &[])), MODERATE, json!({ "id": id, "status": "REJECTED" })).await;
    assert_eq!(error_code(&not_mod), Some("FORBIDDEN"));
    let anonymous = app.gql(MODERATE, json!({ "id": id, "status": "REJECTED" })).await;
    assert_eq!(error_code(&anonymous), Some("UNAUTHENTICATED"));

    let m = app.gql_as(Some(&token("mod", &["moderator"])), MODERATE, json!({ "id": id, "status": "PENDING" })).await;
    assert_eq!(m["data"]["moderateReview"]["status"], "PENDING", "{m}");
    let offer = app.gql(OFFER, json!({ "id": "offer-x" })).await;
    assert_eq!(offer["data"]["offer"]["rating"]["count"], 0, "pending reviews are not aggregated");
    assert_eq!(offer["data"]["offer"]["reviews"]["edges"], json!([]));

    // A pending review: visible to its author and moderators only.
    assert_eq!(app.gql(REVIEW, json!({ "id": id })).await["data"]["review"], Value::Null);
    let bob = app.gql_as(Some(&token("bob", &[])), REVIEW, json!({ "id": id })).await;
    assert_eq!(bob["data"]["review"], Value::Null);
    let alice = app.gql_as(Some(&token("alice", &[])), REVIEW, json!({ "id": id })).await;
    assert_eq!(alice["data"]["review"]["status"], "PENDING");
    let moderator = app.gql_as(Some(&token("mod", &["moderator"])), REVIEW, json!({ "id": id })).await;
    assert_eq!(moderator["data"]["review"]["status"], "PENDING");
    // Bob cannot learn it exists by trying to edit it.
    let bob = app.gql_as(Some(&token("bob", &[])), UPDATE, json!({ "id": id, "input": { "rating": 1 } })).await;
    assert_eq!(error_code(&bob), Some("NOT_FOUND"));

    app.gql_as(Some(&token("mod", &["moderator"])), MODERATE, json!({ "id": id, "status": "PUBLISHED" })).await;
    let offer = app.gql(OFFER, json!({ "id": "offer-x" })).await;
    assert_eq!(offer["data"]["offer"]["rating"]["count"], 1);
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, 3, "create + 2 moderations");
}

#[tokio::test]
async fn moderation_on_create_starts_reviews_pending() {
    let app = TestApp::start_with(&[("UGC_MODERATE_ON_CREATE", "true")]).await;
    let body = create(&app, "alice", "offer-x", 5, "waiting").await;
    assert_eq!(body["data"]["createReview"]["status"], "PENDING", "{body}");
    let offer = app.gql(OFFER, json!({ "id": "offer-x" })).await;
    assert_eq!(offer["data"]["offer"]["rating"]["count"], 0);
}

#[tokio::test]
async fn concurrent_writers_keep_aggregates_exact() {
    let app = TestApp::start().await;
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let app = &app;
            async move { create(app, &format!("user-{i}"), "offer-hot", (i % 5) + 1, "concurrent").await }
        })
        .collect();
    let results = futures::future::join_all(tasks).await;
    assert!(results.iter().all(|r| error_code(r).is_none()));
    let offer = app.gql(OFFER, json!({ "id": "offer-hot" })).await;
    assert_eq!(
        offer["data"]["offer"]["rating"],
        json!({ "count": 40, "average": 3.0, "distribution": [8, 8, 8, 8, 8] })
    );
}

/// A write that commits after the request time-out is still answered as the
/// success it is: a 504 would make the client's retry a second write.
#[tokio::test]
async fn a_committed_write_is_answered_as_success_even_past_the_request_timeout() {
    let app = TestApp::start_with(&[("UGC_REQUEST_TIMEOUT_MS", "300")]).await;
    let id = create(&app, "alice", "offer-slow", 3, "before").await["data"]["createReview"]["id"].clone();
    // Postgres stalls the write: its row is locked for longer than the time-out.
    let mut lock = app.db.begin().await.unwrap();
    sqlx::query("SELECT id FROM reviews WHERE id = $1 FOR UPDATE")
        .bind(id.as_str().unwrap().parse::<i64>().unwrap())
        .execute(&mut *lock)
        .await
        .unwrap();
    let write = {
        let (client, url, bearer) = (app.client().clone(), app.url("/graphql"), token("alice", &[]));
        tokio::spawn(async move {
            let body = json!({ "query": UPDATE, "variables": { "id": id, "input": { "text": "after" } } });
            let resp = client.post(&url).bearer_auth(bearer).json(&body).send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    lock.commit().await.unwrap();
    let (status, body) = write.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["updateReview"]["text"], "after", "{body}");
    assert_eq!(app.count("SELECT count(*) FROM reviews WHERE body = 'after'").await, 1);
    // Reads keep their time-out.
    let read = app.gql("{ __typename }", json!({})).await;
    assert!(read["errors"].is_null());
}

/// A client that lost a write's answer retries with the same
/// `Idempotency-Key` and gets the first answer: no second effect, no
/// CONFLICT, also when both attempts run at once.
#[tokio::test]
async fn a_write_retried_with_its_idempotency_key_gets_the_first_answer() {
    let app = TestApp::start().await;
    let alice = token("alice", &[]);
    let send = async |key: &str, query: &str, variables: Value| -> (u16, Value) {
        let r = app
            .client()
            .post(app.url("/graphql"))
            .bearer_auth(&alice)
            .header("Idempotency-Key", key)
            .json(&json!({ "query": query, "variables": variables }))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    };
    let input = json!({ "input": { "offerId": "offer-idem", "rating": 4, "text": "First try." } });

    // Two attempts at once, then a late retry: one review, one answer.
    let (first, second) =
        tokio::join!(send("create-1", CREATE, input.clone()), send("create-1", CREATE, input.clone()));
    let late = send("create-1", CREATE, input.clone()).await;
    for (status, body) in [&first, &second, &late] {
        assert_eq!(*status, 200, "{body}");
        assert!(body["errors"].is_null(), "{body}");
        assert_eq!(body["data"]["createReview"], first.1["data"]["createReview"], "the first answer, again");
    }
    let id = first.1["data"]["createReview"]["id"].as_str().unwrap().to_owned();
    assert_eq!(app.count("SELECT count(*) FROM reviews WHERE offer_id = 'offer-idem'").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, 1, "one write, one event");
    // Without a key, a second create is still a CONFLICT.
    assert_eq!(error_code(&create(&app, "alice", "offer-idem", 4, "again").await), Some("CONFLICT"));

    // An update retried: the version moves once, the answer repeats.
    let patch = json!({ "id": id, "input": { "text": "Edited once." } });
    let (_, edited) = send("update-1", UPDATE, patch.clone()).await;
    let (_, retried) = send("update-1", UPDATE, patch).await;
    assert_eq!(edited["data"]["updateReview"]["text"], "Edited once.", "{edited}");
    assert_eq!(retried, edited);
    assert_eq!(app.count("SELECT version FROM reviews WHERE offer_id = 'offer-idem'").await, 2);

    // The same key for another write is refused and changes nothing.
    let (status, reused) = send("update-1", UPDATE, json!({ "id": id, "input": { "text": "Sneaky." } })).await;
    assert_eq!((status, error_code(&reused)), (200, Some("BAD_USER_INPUT")), "{reused}");
    assert!(reused["errors"][0]["message"].as_str().unwrap().contains("Idempotency-Key"));
    assert_eq!(app.gql(REVIEW, json!({ "id": id })).await["data"]["review"]["text"], "Edited once.");

    // A delete retried answers true twice (not false the second time).
    let (_, deleted) = send("delete-1", DELETE, json!({ "id": id })).await;
    let (_, again) = send("delete-1", DELETE, json!({ "id": id })).await;
    assert_eq!(
        (deleted["data"]["deleteReview"].clone(), again["data"]["deleteReview"].clone()),
        (json!(true), json!(true))
    );

    // A malformed key is a clear 400 before anything runs.
    let (status, bad) = send(&"k".repeat(256), DELETE, json!({ "id": id })).await;
    assert_eq!((status, error_code(&bad)), (400, Some("BAD_USER_INPUT")), "{bad}");
    assert_eq!(app.count("SELECT count(*) FROM idempotency_keys").await, 3, "create, update, delete");
}

/// Pooled connections are not pinged before every statement (see
/// `Store::connect`), only once they sat idle: one that Postgres closed
/// meanwhile is replaced, not handed to a write.
#[tokio::test]
async fn a_write_after_postgres_dropped_the_idle_pool_gets_a_live_connection() {
    let app = TestApp::start_without_background(&[]).await;
    let first = create(&app, "alice", "offer-p", 4, "before").await;
    assert!(first["errors"].is_null(), "{first}");
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'ugc-subgraph' \
           AND query NOT ILIKE 'LISTEN%' AND pid <> pg_backend_pid()",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(killed >= 1, "found the pool's connections");
    tokio::time::sleep(std::time::Duration::from_millis(1_300)).await;
    let second = create(&app, "bob", "offer-p", 2, "after").await;
    assert!(second["errors"].is_null(), "the dead connection was not used: {second}");
    assert_eq!(second["data"]["createReview"]["text"], "after");
}
