//! Every bad input gets a clear error and changes nothing.

use serde_json::{json, Value};

use crate::mutations::{create, CREATE};
use crate::support::{error_code, token, token_with, TestApp};

const UPDATE: &str = "mutation($id: ID!, $input: UpdateReviewInput!) { updateReview(id: $id, input: $input) { id } }";
const DELETE: &str = "mutation($id: ID!) { deleteReview(id: $id) }";
const PAGE: &str = "query($first: Int, $after: String) { offer(id: \"offer-x\") { reviews(first: $first, after: $after) { totalCount } } }";

/// Everything a bad request could have changed: rows, events, aggregates,
/// and what the caches hold.
async fn fingerprint(app: &TestApp) -> (String, i64, String, usize, f64) {
    let reviews: String =
        sqlx::query_scalar("SELECT coalesce(md5(string_agg(r::text, ',' ORDER BY id)), '') FROM reviews r")
            .fetch_one(&app.db)
            .await
            .unwrap();
    let aggregates: String =
        sqlx::query_scalar("SELECT coalesce(md5(string_agg(o::text, ',' ORDER BY offer_id)), '') FROM offer_ratings o")
            .fetch_one(&app.db)
            .await
            .unwrap();
    (
        reviews,
        app.count("SELECT count(*) FROM outbox").await,
        aggregates,
        app.redis_keys().await,
        app.metric("ugc_l1_entries", &[]).await,
    )
}

#[tokio::test]
async fn bad_graphql_inputs_get_a_clear_error_and_change_nothing() {
    let app = TestApp::start().await;
    let existing = create(&app, "alice", "offer-x", 4, "original").await["data"]["createReview"]["id"].clone();
    let before = fingerprint(&app).await;

    let alice = token("alice", &[]);
    let bob = token("bob", &[]);
    let expired = token_with("alice", &[], -3600, crate::support::SECRET);
    let forged = token_with("alice", &["moderator"], 3600, "not-the-secret-at-all-000000");
    let new = |rating: Value, text: Value| json!({ "input": { "offerId": "offer-y", "rating": rating, "text": text } });
    let long_text = "x".repeat(5001);
    let not_yet = {
        let now = chrono::Utc::now().timestamp();
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &json!({ "sub": "alice", "exp": now + 3600, "nbf": now + 600 }),
            &jsonwebtoken::EncodingKey::from_secret(crate::support::SECRET.as_bytes()),
        )
        .unwrap()
    };
    let alg_none = {
        use base64::Engine;
        let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let exp = chrono::Utc::now().timestamp() + 3600;
        format!(
            "{}.{}.",
            b64(json!({ "alg": "none" })),
            b64(json!({ "sub": "alice", "exp": exp, "roles": ["moderator"] }))
        )
    };

    #[rustfmt::skip]
    let cases: Vec<(&str, Option<&str>, &str, Value, &str)> = vec![
        ("no token", None, CREATE, new(json!(5), json!("hi")), "UNAUTHENTICATED"),
        ("expired token", Some(&expired), CREATE, new(json!(5), json!("hi")), "UNAUTHENTICATED"),
        ("forged token", Some(&forged), CREATE, new(json!(5), json!("hi")), "UNAUTHENTICATED"),
        ("garbage token", Some("not.a.jwt"), CREATE, new(json!(5), json!("hi")), "UNAUTHENTICATED"),
        ("rating 0", Some(&bob), CREATE, new(json!(0), json!("hi")), "BAD_USER_INPUT"),
        ("rating 6", Some(&bob), CREATE, new(json!(6), json!("hi")), "BAD_USER_INPUT"),
        ("empty text", Some(&bob), CREATE, new(json!(5), json!("")), "BAD_USER_INPUT"),
        ("blank text", Some(&bob), CREATE, new(json!(5), json!(" \n\t ")), "BAD_USER_INPUT"),
        ("5001 characters", Some(&bob), CREATE, new(json!(5), json!(long_text)), "BAD_USER_INPUT"),
        ("NUL in text", Some(&bob), CREATE, new(json!(5), json!("a\u{0}b")), "BAD_USER_INPUT"),
        ("empty offer id", Some(&bob), CREATE, json!({ "input": { "offerId": "", "rating": 5, "text": "hi" } }), "BAD_USER_INPUT"),
        ("65-char offer id", Some(&bob), CREATE, json!({ "input": { "offerId": "o".repeat(65), "rating": 5, "text": "hi" } }), "BAD_USER_INPUT"),
        ("rating as string", Some(&bob), CREATE, new(json!("five"), json!("hi")), "BAD_USER_INPUT"),
        ("rating as float", Some(&bob), CREATE, new(json!(4.5), json!("hi")), "BAD_USER_INPUT"),
        ("text as number", Some(&bob), CREATE, new(json!(5), json!(42)), "BAD_USER_INPUT"),
        ("missing input", Some(&bob), CREATE, json!({}), "GRAPHQL_VALIDATION_FAILED"),
        ("update rating 0", Some(&alice), UPDATE, json!({ "id": existing, "input": { "rating": 0 } }), "BAD_USER_INPUT"),
        ("update empty text", Some(&alice), UPDATE, json!({ "id": existing, "input": { "text": "  " } }), "BAD_USER_INPUT"),
        ("update nothing", Some(&alice), UPDATE, json!({ "id": existing, "input": {} }), "BAD_USER_INPUT"),
        ("update by another user", Some(&bob), UPDATE, json!({ "id": existing, "input": { "rating": 1 } }), "FORBIDDEN"),
        ("update unknown id", Some(&alice), UPDATE, json!({ "id": "987654321", "input": { "rating": 1 } }), "NOT_FOUND"),
        ("update malformed id", Some(&alice), UPDATE, json!({ "id": "1; DROP TABLE reviews", "input": { "rating": 1 } }), "NOT_FOUND"),
        ("update non-canonical id", Some(&alice), UPDATE, json!({ "id": format!("0{}", existing.as_str().unwrap()), "input": { "rating": 1 } }), "NOT_FOUND"),
        ("not-yet-valid token", Some(&not_yet), CREATE, new(json!(5), json!("hi")), "UNAUTHENTICATED"),
        ("alg none token", Some(&alg_none), CREATE, new(json!(5), json!("hi")), "UNAUTHENTICATED"),
        ("delete unknown id", Some(&alice), DELETE, json!({ "id": "987654321" }), "NOT_FOUND"),
        ("delete by another user", Some(&bob), DELETE, json!({ "id": existing }), "FORBIDDEN"),
        ("first 101", None, PAGE, json!({ "first": 101 }), "BAD_USER_INPUT"),
        ("first -1", None, PAGE, json!({ "first": -1 }), "BAD_USER_INPUT"),
        ("malformed cursor", None, PAGE, json!({ "first": 5, "after": "definitely-not-a-cursor" }), "BAD_USER_INPUT"),
        ("syntax error", None, "{ offer(id: ", json!({}), "GRAPHQL_VALIDATION_FAILED"),
        ("unknown field", None, "{ offer(id: \"x\") { nope } }", json!({}), "GRAPHQL_VALIDATION_FAILED"),
        ("too deep", None, "{ offer(id: \"x\") { reviews { edges { node { offer { reviews { edges { node { offer { reviews { edges { node { offer { reviews { edges { node { id } } } } } } } } } } } } } } } } }", json!({}), "MAX_DEPTH_LIMIT"),
    ];
    for (name, bearer, query, variables, expected) in cases {
        let body = app.gql_as(bearer, query, variables).await;
        assert_eq!(error_code(&body), Some(expected), "{name}: {body}");
        let message = body["errors"][0]["message"].as_str().unwrap_or("");
        assert!(!message.is_empty() && !message.contains("sqlx") && !message.contains("SELECT"), "{name}: {message}");
        assert_eq!(fingerprint(&app).await, before, "{name} changed something");
    }

    // An id the service did not issue, in any shape, is simply not there:
    // never another review, never an error.
    let id = existing.as_str().unwrap();
    let forty = "1".repeat(40);
    for unknown in
        ["987654321", "no-such-review", &format!("0{id}"), &format!("+{id}"), &format!(" {id}"), &forty, "-1", "0"]
    {
        let body = app.gql("query($id: ID!) { review(id: $id) { id } }", json!({ "id": unknown })).await;
        assert_eq!(body, json!({ "data": { "review": null } }), "{unknown:?}");
    }
    let body = app.gql("query($id: ID!) { review(id: $id) { id } }", json!({ "id": id })).await;
    assert_eq!(body["data"]["review"]["id"], id, "the canonical id still names it");
}

#[tokio::test]
async fn malformed_bodies_are_rejected_before_graphql_and_change_nothing() {
    let app = TestApp::start().await;
    create(&app, "alice", "offer-x", 4, "original").await;
    let before = fingerprint(&app).await;
    let url = app.url("/graphql");
    let bodies: Vec<(&str, Vec<u8>, &str, u16)> = vec![
        ("truncated JSON", b"{\"query\": \"{ offer(id".to_vec(), "application/json", 400),
        ("not JSON", b"query { offer }".to_vec(), "application/json", 400),
        ("JSON without query", b"{\"variables\": {}}".to_vec(), "application/json", 400),
        (
            "invalid UTF-8",
            b"{\"query\": \"{ review(id: \\\"\xff\xfe\\\") { id } }\"}".to_vec(),
            "application/json",
            400,
        ),
        ("wrong content type", b"{\"query\": \"{ __typename }\"}".to_vec(), "text/plain", 415),
        ("form content type", b"query=%7B__typename%7D".to_vec(), "application/x-www-form-urlencoded", 415),
        (
            "deeply nested variables",
            format!(
                "{{\"query\": \"{{ __typename }}\", \"variables\": {{\"v\": {}1{}}}}}",
                "[".repeat(5000),
                "]".repeat(5000)
            )
            .into_bytes(),
            "application/json",
            400,
        ),
        (
            "huge body",
            format!("{{\"query\": \"{}\"}}", "x".repeat(2 * 1024 * 1024)).into_bytes(),
            "application/json",
            413,
        ),
    ];
    // No content type at all: refused, not guessed (it would execute otherwise).
    let resp = app.client().post(&url).body(b"{\"query\": \"{ __typename }\"}".to_vec()).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 415);
    let json: Value = resp.json().await.unwrap();
    assert!(json["errors"][0]["message"].as_str().unwrap().contains("none was sent"), "{json}");
    for (name, body, content_type, status) in bodies {
        let resp = app.client().post(&url).header("content-type", content_type).body(body).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{name}");
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("application/json"), "{name}");
        let json: Value = resp.json().await.unwrap();
        assert!(json["errors"][0]["message"].as_str().is_some_and(|m| !m.is_empty()), "{name}: {json}");
        assert!(json["errors"][0]["extensions"]["code"].is_string(), "{name}: {json}");
    }
    assert_eq!(fingerprint(&app).await, before);
}

#[tokio::test]
async fn sql_looking_and_non_ascii_text_is_stored_and_returned_verbatim() {
    let app = TestApp::start().await;
    let texts = [
        "Robert'); DROP TABLE reviews;--",
        "' OR 1=1 -- \\\" $$ ; SELECT pg_sleep(10)",
        "日本語のレビュー ✓ Ünïcödé — émoji 🎉👍🏽, RTL: مرحبا",
        "<script>alert('x')</script> & %s %n {{}}",
    ];
    for (i, text) in texts.iter().enumerate() {
        let body = create(&app, &format!("user-{i}"), "offer-x", 3, text).await;
        assert_eq!(body["data"]["createReview"]["text"], *text, "{body}");
        let id = body["data"]["createReview"]["id"].clone();
        let read = app.gql("query($id: ID!) { review(id: $id) { text } }", json!({ "id": id })).await;
        assert_eq!(read["data"]["review"]["text"], *text);
    }
    assert_eq!(app.count("SELECT count(*) FROM reviews").await, texts.len() as i64, "the table is intact");
}

#[tokio::test]
async fn hostile_event_bodies_get_clear_errors_and_change_nothing() {
    const TOKEN: &str = "events-token-0123456789";
    let app = TestApp::start_with(&[("UGC_EVENTS_TOKEN", TOKEN)]).await;
    let post = |body: Vec<u8>| {
        let req = app.client().post(app.url("/events")).bearer_auth(TOKEN).header("content-type", "application/json");
        async move {
            let resp = req.body(body).send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let event = |key: &str, user: &str| json!({ "events": [{ "type": "user_removed", "key": key, "userId": user }] });
    let (status, body) = post(event("k-1", "user-1").to_string().into_bytes()).await;
    assert_eq!(status, 200, "{body}");
    let outbox = app.count("SELECT count(*) FROM outbox").await;

    let huge = json!({ "events": [{ "type": "user_removed", "key": "k", "userId": "u", "pad": "x".repeat(100_000) }] });
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("oversized", huge.to_string().into_bytes(), 413, "PAYLOAD_TOO_LARGE"),
        (
            "invalid UTF-8",
            b"{\"events\": [{\"type\": \"user_removed\", \"key\": \"\xff\", \"userId\": \"u\"}]}".to_vec(),
            400,
            "BAD_USER_INPUT",
        ),
        ("not JSON", b"events!".to_vec(), 400, "BAD_USER_INPUT"),
        ("key reused for another subject", event("k-1", "user-2").to_string().into_bytes(), 409, "CONFLICT"),
        (
            "key reused for another kind",
            json!({ "events": [{ "type": "offer_removed", "key": "k-1", "offerId": "user-1" }] })
                .to_string()
                .into_bytes(),
            409,
            "CONFLICT",
        ),
    ];
    for (name, body, status, code) in cases {
        let (got, answer) = post(body).await;
        assert_eq!((got, error_code(&answer)), (status, Some(code)), "{name}: {answer}");
        assert!(answer["errors"][0]["message"].as_str().is_some_and(|m| !m.is_empty()), "{name}");
    }
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, outbox, "nothing applied");
    // The true redelivery is still a quiet duplicate.
    let (status, body) = post(event("k-1", "user-1").to_string().into_bytes()).await;
    assert_eq!((status, &body["duplicates"]), (200, &json!(1)), "{body}");
}
