//! Every fetch shape a gateway sends is served from rendered fragments, with
//! the right answer: on a hit, after a write on another instance, and next to
//! a near-identical request that must not share its fragment. Answers are
//! compared with an instance of the same deployment that has the entity
//! cache off (normal execution).

use serde_json::{json, Value};

use crate::support::{token, TestApp};

const MODERATOR: &[&str] = &["moderator"];

async fn entity_hits(app: &TestApp) -> f64 {
    app.metric("ugc_cache_requests_total", &["layer=\"entity\"", "result=\"hit\""]).await
}

async fn data(app: &TestApp, auth: Option<&str>, query: &str, variables: &Value) -> Value {
    let body = app.gql_as(auth, query, variables.clone()).await;
    assert!(body["errors"].is_null(), "{body}");
    body["data"].clone()
}

struct Deployment {
    cached: TestApp,
    reference: TestApp,
    writer: TestApp,
}

impl Deployment {
    async fn start() -> Self {
        let cached = TestApp::start().await;
        cached.seed(6, 40, 120).await;
        let reference = TestApp::start_on(&cached.db_url, &[("UGC_ENTITY_CACHE", "off")]).await;
        let writer = TestApp::start_on(&cached.db_url, &[("UGC_MODERATE_ON_CREATE", "true")]).await;
        Self { cached, reference, writer }
    }

    /// The cached instance answers `query` like the reference, and the
    /// second time from its fragments.
    async fn same_and_hit(&self, query: &str, variables: &Value) -> Value {
        let expected = data(&self.reference, None, query, variables).await;
        let first = data(&self.cached, None, query, variables).await;
        assert_eq!(first, expected, "miss: {query} {variables}");
        let before = entity_hits(&self.cached).await;
        let again = data(&self.cached, None, query, variables).await;
        assert_eq!(again, expected, "hit: {query} {variables}");
        assert!(entity_hits(&self.cached).await > before, "not served from fragments: {query} {variables}");
        again
    }

    /// The newest published review of offer-000001, edited on the writer.
    async fn edit_top_review(&self, text: &str) -> i64 {
        let id: i64 = self
            .cached
            .count(
                "SELECT id FROM reviews WHERE offer_id = 'offer-000001' AND status = 'PUBLISHED' \
                 AND deleted_at IS NULL ORDER BY created_at DESC, id DESC LIMIT 1",
            )
            .await;
        let mutation = "mutation($id: ID!, $t: String!) { updateReview(id: $id, input: { text: $t }) { id } }";
        let done = self
            .writer
            .gql_as(Some(&token("mod", MODERATOR)), mutation, json!({ "id": id.to_string(), "t": text }))
            .await;
        assert!(done["errors"].is_null(), "{done}");
        id
    }

    /// A review by `author` that stays pending (the writer moderates new reviews); its id.
    async fn pending(&self, author: &str, offer: &str, text: &str) -> String {
        let mutation = "mutation($o: ID!, $t: String!) { createReview(input: { offerId: $o, rating: 2, text: $t }) { id status } }";
        let created = self.writer.gql_as(Some(author), mutation, json!({ "o": offer, "t": text })).await;
        assert_eq!(created["data"]["createReview"]["status"], "PENDING", "{created}");
        created["data"]["createReview"]["id"].as_str().unwrap().to_owned()
    }

    /// After a write on the writer, the cached instance answers like the
    /// reference and shows `text`.
    async fn fresh_after_write(&self, query: &str, variables: &Value, text: &str) {
        let got = data(&self.cached, None, query, variables).await;
        assert_eq!(got, data(&self.reference, None, query, variables).await, "after a write: {query}");
        assert!(got.to_string().contains(text), "the edit is not visible: {got}");
    }
}

fn offers(ids: &[&str]) -> Value {
    Value::Array(ids.iter().map(|id| json!({ "__typename": "Offer", "id": id })).collect())
}

#[tokio::test]
async fn a_variable_for_a_nested_argument_keys_the_fragment_by_its_value() {
    let d = Deployment::start().await;
    let query =
        "query Offers__ugc__1($representations: [_Any!]!, $n: Int!) { _entities(representations: $representations) \
        { ... on Offer { id reviews(first: $n) { totalCount edges { node { id text } } } } } }";
    let reps = offers(&["offer-000001", "offer-000002"]);
    let three = d.same_and_hit(query, &json!({ "representations": reps, "n": 3 })).await;
    let one = d.same_and_hit(query, &json!({ "representations": reps, "n": 1 })).await;
    assert_ne!(three, one, "n=1 must not be served n=3's fragment");
    assert_eq!(one["_entities"][0]["reviews"]["edges"].as_array().unwrap().len(), 1);
    d.edit_top_review("edited for the variable shape").await;
    d.fresh_after_write(query, &json!({ "representations": reps, "n": 3 }), "edited for the variable shape").await;
}

#[tokio::test]
async fn include_and_skip_with_variables_and_defaults() {
    let d = Deployment::start().await;
    let query = "query($r: [_Any!]!, $withText: Boolean!, $n: Int = 2) { _entities(representations: $r) \
        { __typename ... on Offer { id reviews(first: $n) { edges { node { id text @include(if: $withText) } } } } } }";
    let reps = offers(&["offer-000001", "offer-000003"]);
    let with = d.same_and_hit(query, &json!({ "r": reps, "withText": true })).await;
    let without = d.same_and_hit(query, &json!({ "r": reps, "withText": false })).await;
    assert_ne!(with, without);
    assert!(without["_entities"][0]["reviews"]["edges"][0]["node"].get("text").is_none(), "{without}");
    // The default and the same value sent explicitly are one key.
    let before = entity_hits(&d.cached).await;
    let explicit = data(&d.cached, None, query, &json!({ "r": reps, "withText": true, "n": 2 })).await;
    assert_eq!(explicit, with);
    assert!(entity_hits(&d.cached).await >= before + 2.0, "n=2 sent explicitly should hit the default's fragments");
    let n1 = d.same_and_hit(query, &json!({ "r": reps, "withText": true, "n": 1 })).await;
    assert_ne!(n1, with);
    d.edit_top_review("edited for the include shape").await;
    d.fresh_after_write(query, &json!({ "r": reps, "withText": true }), "edited for the include shape").await;
}

#[tokio::test]
async fn named_fragments_aliases_and_operation_names() {
    let d = Deployment::start().await;
    let query = "query Offers__ugc__2($representations: [_Any!]!) { _entities(representations: $representations) \
        { ...OfferParts } } fragment OfferParts on Offer { id top: reviews(first: 2, order: HIGHEST_RATING) \
        { edges { node { id stars: rating text } } } newest: reviews(first: 2) { edges { node { id text } } } }";
    let reps = offers(&["offer-000001", "offer-000002", "offer-000004"]);
    let got = d.same_and_hit(query, &json!({ "representations": reps })).await;
    assert!(got["_entities"][0]["top"]["edges"][0]["node"]["stars"].is_number(), "{got}");
    // Sent with its operationName, as gateways do.
    let named = d
        .cached
        .client()
        .post(d.cached.url("/graphql"))
        .json(&json!({ "query": query, "operationName": "Offers__ugc__2", "variables": { "representations": reps } }))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(named["data"], got);
    // The same text under another operation name is another query.
    let renamed = query.replace("Offers__ugc__2", "Offers__ugc__3");
    let again = d.same_and_hit(&renamed, &json!({ "representations": reps })).await;
    assert_eq!(again, got);
    d.edit_top_review("edited for the named fragment").await;
    d.fresh_after_write(query, &json!({ "representations": reps }), "edited for the named fragment").await;
}

#[tokio::test]
async fn review_entities_share_only_public_renderings() {
    let d = Deployment::start().await;
    let query = "query($representations: [_Any!]!) { _entities(representations: $representations) \
        { ... on Review { id text rating status } } }";
    let published: i64 = d
        .cached
        .count("SELECT id FROM reviews WHERE status = 'PUBLISHED' AND deleted_at IS NULL ORDER BY id LIMIT 1")
        .await;
    // A pending review (the writer moderates new reviews).
    let alice = token("alice", &[]);
    let pending = d.pending(&alice, "offer-000005", "pending words").await;
    let reps = |ids: &[&str]| Value::Array(ids.iter().map(|id| json!({ "__typename": "Review", "id": id })).collect());

    let public = d.same_and_hit(query, &json!({ "representations": reps(&[&published.to_string()]) })).await;
    assert_eq!(public["_entities"][0]["status"], "PUBLISHED");

    // Its author sees the pending review: a private answer, never kept.
    let vars = json!({ "representations": reps(&[&published.to_string(), &pending]) });
    let resp = d
        .cached
        .client()
        .post(d.cached.url("/graphql"))
        .bearer_auth(&alice)
        .json(&json!({ "query": query, "variables": vars }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["cache-control"], "private, no-store");
    let mine: Value = resp.json().await.unwrap();
    assert_eq!(mine["data"]["_entities"][1]["text"], "pending words", "{mine}");
    for _ in 0..2 {
        let anonymous = data(&d.cached, None, query, &vars).await;
        assert!(anonymous["_entities"][1].is_null(), "a private rendering was shared: {anonymous}");
        assert_eq!(anonymous, data(&d.reference, None, query, &vars).await);
    }

    // Edited on another instance: the public fragment follows.
    let mutation = "mutation($id: ID!) { updateReview(id: $id, input: { text: \"edited review entity\" }) { id } }";
    let done = d.writer.gql_as(Some(&token("mod", MODERATOR)), mutation, json!({ "id": published.to_string() })).await;
    assert!(done["errors"].is_null(), "{done}");
    d.fresh_after_write(query, &json!({ "representations": reps(&[&published.to_string()]) }), "edited review entity")
        .await;
}

#[tokio::test]
async fn root_fields_by_id_are_served_from_fragments_keyed_by_id_and_variables() {
    let d = Deployment::start().await;
    let offer = "query Offer($id: ID!, $n: Int = 2) { offer(id: $id) { id rating { count average } \
        reviews(first: $n) { totalCount edges { node { id text author { id } } } } } }";
    let one = d.same_and_hit(offer, &json!({ "id": "offer-000001" })).await;
    let two = d.same_and_hit(offer, &json!({ "id": "offer-000002" })).await;
    assert_ne!(one, two, "another id is another fragment");
    let three = d.same_and_hit(offer, &json!({ "id": "offer-000001", "n": 3 })).await;
    assert_eq!(three["offer"]["reviews"]["edges"].as_array().unwrap().len(), 3, "n=3 is not n=2's fragment");
    // Near-identical texts: a literal id, an alias — their own fragments, their own keys.
    let literal = d.same_and_hit("{ offer(id: \"offer-000001\") { id rating { count } } }", &json!({})).await;
    let aliased = d.same_and_hit("{ o: offer(id: \"offer-000001\") { id rating { count } } }", &json!({})).await;
    assert_eq!(literal["offer"], aliased["o"]);
    assert!(aliased.get("offer").is_none(), "{aliased}");

    let user = "query($id: ID!) { user(id: $id) { id reviewCount reviews(first: 2) { edges { node { id text } } } } }";
    let author: String = sqlx::query_scalar(
        "SELECT author_id FROM reviews WHERE offer_id = 'offer-000001' AND status = 'PUBLISHED' \
         AND deleted_at IS NULL ORDER BY created_at DESC, id DESC LIMIT 1",
    )
    .fetch_one(&d.cached.db)
    .await
    .unwrap();
    d.same_and_hit(user, &json!({ "id": author })).await;

    let review = "query($id: ID!) { review(id: $id) { id text rating status } }";
    let top = d.edit_top_review("before the root-field edit").await;
    d.same_and_hit(review, &json!({ "id": top.to_string() })).await;
    d.same_and_hit(offer, &json!({ "id": "offer-000001" })).await;

    // Edited on another instance: every root-field fragment that read it follows.
    d.edit_top_review("edited for the root fields").await;
    d.fresh_after_write(offer, &json!({ "id": "offer-000001" }), "edited for the root fields").await;
    d.fresh_after_write(review, &json!({ "id": top.to_string() }), "edited for the root fields").await;
    d.fresh_after_write(user, &json!({ "id": author }), "edited for the root fields").await;

    // A pending review: its author's answer is private and never shared.
    let alice = token("alice", &[]);
    let pending = d.pending(&alice, "offer-000006", "not yet public").await;
    let resp = d
        .cached
        .client()
        .post(d.cached.url("/graphql"))
        .bearer_auth(&alice)
        .json(&json!({ "query": review, "variables": { "id": pending } }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["cache-control"], "private, no-store");
    let mine: Value = resp.json().await.unwrap();
    assert_eq!(mine["data"]["review"]["text"], "not yet public", "{mine}");
    for _ in 0..2 {
        let anonymous = data(&d.cached, None, review, &json!({ "id": pending })).await;
        assert!(anonymous["review"].is_null(), "a private rendering was shared: {anonymous}");
    }
    // Nor is the anonymous null kept for her: it looked past the public cache too.
    let again = data(&d.cached, Some(&alice), review, &json!({ "id": pending })).await;
    assert_eq!(again["review"]["text"], "not yet public", "{again}");
}

#[tokio::test]
async fn concurrent_misses_of_a_fragment_wait_for_one_rendering() {
    let d = Deployment::start().await;
    let query = "query($representations: [_Any!]!) { _entities(representations: $representations) \
        { ... on Offer { id rating { count } reviews(first: 3) { edges { node { id text author { id } } } } } } }";
    let vars = json!({ "representations": offers(&["offer-000001", "offer-000002", "offer-000003"]) });
    let expected = data(&d.reference, None, query, &vars).await;
    let waits = async || d.cached.metric("ugc_cache_requests_total", &["layer=\"entity\"", "result=\"shared\""]).await;
    let before = waits().await;
    let answers = futures::future::join_all((0..40).map(|_| data(&d.cached, None, query, &vars))).await;
    assert!(answers.iter().all(|a| *a == expected), "every waiter gets the right answer");
    assert!(waits().await > before, "concurrent misses waited for another request's rendering");
    // After an edit elsewhere, the same burst renders the new text once and shares it.
    d.edit_top_review("edited under a burst").await;
    let expected = data(&d.reference, None, query, &vars).await;
    let answers = futures::future::join_all((0..40).map(|_| data(&d.cached, None, query, &vars))).await;
    assert!(answers.iter().all(|a| *a == expected), "after the edit");
    assert!(expected.to_string().contains("edited under a burst"));
}

/// Answers read straight from the body (every entity a current fragment)
/// pass the same checks as the rest: the representation limit, the
/// `Idempotency-Key` header, a malformed body.
#[tokio::test]
async fn answers_from_fragments_are_admitted_like_any_other() {
    let app = TestApp::start_with(&[("UGC_MAX_REPRESENTATIONS", "3")]).await;
    app.seed(6, 40, 120).await;
    let query = "query($r: [_Any!]!) { _entities(representations: $r) { ... on Offer { id rating { count } } } }";
    let three = offers(&["offer-000001", "offer-000002", "offer-000003"]);
    let first = data(&app, None, query, &json!({ "r": three })).await;
    let before = entity_hits(&app).await;
    assert_eq!(data(&app, None, query, &json!({ "r": three })).await, first);
    assert_eq!(entity_hits(&app).await, before + 3.0, "served from fragments");

    // Four representations, every one of them cached: still over the limit.
    let four = offers(&["offer-000001", "offer-000002", "offer-000003", "offer-000001"]);
    let over = app.gql(query, json!({ "r": four })).await;
    assert_eq!(over["errors"][0]["extensions"]["code"], "MAX_REPRESENTATIONS_LIMIT", "{over}");
    assert!(over["data"].is_null(), "{over}");

    let body = json!({ "query": query, "variables": { "r": three } });
    let post = |body: Vec<u8>, key: &'static str| {
        app.client()
            .post(app.url("/graphql"))
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(body)
            .send()
    };
    let bad_key = post(serde_json::to_vec(&body).unwrap(), "has a space").await.unwrap();
    assert_eq!(bad_key.status(), 400, "an invalid Idempotency-Key is refused, fragments or not");
    let mut truncated = serde_json::to_vec(&body).unwrap();
    truncated.pop();
    let malformed = post(truncated, "k").await.unwrap();
    assert_eq!(malformed.status(), 400, "a body missing its last brace");
    assert_eq!(entity_hits(&app).await, before + 3.0, "no refused request was served from fragments");
}
