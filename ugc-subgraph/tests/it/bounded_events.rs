//! Events with many tags and events that keep failing: bounded passes,
//! resumable progress, back-off, parking, and never a fleet-wide L1 flush.

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::postgres::PgListener;

use crate::support::{eventually, TestApp};

const TOKEN: &str = "events-token-0123456789";

async fn post_event(app: &TestApp, body: Value) -> (u16, Value) {
    let resp = app.client().post(app.url("/events")).bearer_auth(TOKEN).json(&body).send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// Every invalidation notification received so far (non-blocking drain).
async fn drain(listener: &mut PgListener) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(Ok(Some(n))) = tokio::time::timeout(Duration::from_millis(200), listener.try_recv()).await {
        out.push(n.payload().to_owned());
    }
    out
}

#[tokio::test]
async fn a_huge_removal_is_applied_in_bounded_passes_without_dropping_any_l1() {
    // L1's own entries are measured: no rendered fragments in front.
    let vars = [("UGC_EVENTS_TOKEN", TOKEN), ("UGC_ENTITY_CACHE", "off")];
    let a = TestApp::start_with(&vars).await;
    a.seed(5, 60, 100).await;
    let b = TestApp::start_on(&a.db_url, &vars).await;
    // 12,000 reviews of one offer, each by its own author: 24,001 tags, more
    // than two relay passes' worth.
    sqlx::query(
        "INSERT INTO reviews (offer_id, author_id, rating, body, status) \
         SELECT 'offer-huge', 'bulk-' || g, 1 + g % 5, 'bulk review', 'PUBLISHED' FROM generate_series(1, 12000) g",
    )
    .execute(&a.db)
    .await
    .unwrap();
    let some_review: i64 =
        sqlx::query_scalar("SELECT max(id) FROM reviews WHERE offer_id = 'offer-huge'").fetch_one(&a.db).await.unwrap();
    let review = format!("{{ review(id: \"{some_review}\") {{ id }} }}");
    let huge = "{ offer(id: \"offer-huge\") { rating { count } } }";
    // Unrelated reviews, warm in B's L1.
    let unrelated: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM reviews WHERE offer_id <> 'offer-huge' AND status = 'PUBLISHED' AND deleted_at IS NULL",
    )
    .fetch_all(&a.db)
    .await
    .unwrap();
    let read_unrelated = async || {
        for id in &unrelated {
            let body = b.gql(&format!("{{ review(id: \"{id}\") {{ id }} }}"), json!({})).await;
            assert!(body["data"]["review"]["id"].is_string(), "{body}");
        }
    };
    assert_eq!(b.gql(huge, json!({})).await["data"]["offer"]["rating"]["count"], 12000);
    assert!(b.gql(&review, json!({})).await["data"]["review"]["id"].is_string());
    read_unrelated().await;

    let mut listener = PgListener::connect(&a.db_url).await.unwrap();
    listener.listen("ugc_invalidate").await.unwrap();
    let (status, body) =
        post_event(&a, json!({ "events": [{ "type": "offer_removed", "key": "huge-1", "offerId": "offer-huge" }] }))
            .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        eventually(Duration::from_secs(20), async || {
            a.count("SELECT count(*) FROM outbox WHERE processed_at IS NULL").await == 0
        })
        .await,
        "the event is fully applied, pass after pass"
    );
    assert!(
        eventually(Duration::from_secs(5), async || b.gql(&review, json!({})).await["data"]["review"].is_null()).await,
        "a removed review disappears from B's L1"
    );
    assert_eq!(b.gql(huge, json!({})).await["data"]["offer"]["rating"]["count"], 0);

    let notes = drain(&mut listener).await;
    let total_tags: usize = notes
        .iter()
        .map(|n| {
            let note: Value = serde_json::from_str(n).unwrap();
            assert!(n.len() < 8000, "a payload Postgres accepts");
            assert_ne!(note["all"], true, "never a whole-L1 drop");
            note["tags"].as_array().unwrap().len()
        })
        .sum();
    assert_eq!(total_tags, 24_001, "each tag told to every L1 once, over {} notifications", notes.len());
    let passes = a.metric("ugc_events_relayed_total", &[]).await + b.metric("ugc_events_relayed_total", &[]).await;
    assert_eq!(passes, 3.0, "24,001 tags in passes of 10,000, each resuming where the last stopped");

    // B's unrelated entries survived: no whole-L1 drop. (A tag shares one
    // of 65,536 L1 stripes with others, so 24,001 tags make about 31 % of
    // unrelated entries miss once; a whole-L1 drop would make all of them.
    // Alone this keeps 58-84 %; in the full suite on 2 loaded cores it kept
    // 30 % once, so the bound is set far from both a drop and that.)
    assert_eq!(b.metric("ugc_l1_dropped_total", &[]).await, 0.0, "B never dropped its whole L1");
    let review_hits =
        async || b.metric("ugc_cache_requests_total", &["layer=\"l1\"", "kind=\"review\"", "result=\"hit\""]).await;
    let hits = review_hits().await;
    read_unrelated().await;
    let kept = (review_hits().await - hits) / unrelated.len() as f64;
    println!("{} unrelated reviews: {:.0} % still L1 hits", unrelated.len(), kept * 100.0);
    assert!(unrelated.len() >= 20 && kept >= 0.15, "{:.0} % of B's unrelated L1 entries survived", kept * 100.0);
    assert_eq!(b.metric("ugc_l1_dropped_total", &[]).await, 0.0);
}

#[tokio::test]
async fn an_event_that_keeps_failing_backs_off_and_is_parked() {
    // Redis unreachable: every L2 invalidation fails. No background relay:
    // the test runs each pass.
    let app = TestApp::start_without_background(&[
        ("UGC_EVENTS_TOKEN", TOKEN),
        ("REDIS_URL", "redis://127.0.0.1:1"),
        ("UGC_REDIS_TIMEOUT_MS", "50"),
    ])
    .await;
    app.seed(3, 5, 10).await;
    let mut listener = PgListener::connect(&app.db_url).await.unwrap();
    listener.listen("ugc_invalidate").await.unwrap();
    let (status, body) = post_event(
        &app,
        json!({ "events": [{ "type": "offer_removed", "key": "fail-1", "offerId": "offer-000001" }] }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let state = async || -> (i32, f64, bool) {
        sqlx::query_as(
            "SELECT attempts, extract(epoch FROM next_attempt_at - now())::float8, parked_at IS NOT NULL FROM outbox",
        )
        .fetch_one(&app.db)
        .await
        .unwrap()
    };
    let (attempts, _, parked) = state().await;
    assert_eq!((attempts, parked), (1, false), "the writer's own pass failed once");
    assert_eq!(app.state.events.relay(None).await.unwrap(), 0, "not retried before its back-off");

    let mut delays = Vec::new();
    for pass in 2..=20 {
        sqlx::query("UPDATE outbox SET next_attempt_at = now()").execute(&app.db).await.unwrap();
        assert_eq!(app.state.events.relay(None).await.unwrap(), 1);
        let (attempts, delay, parked) = state().await;
        assert_eq!(attempts, pass);
        assert_eq!(parked, pass == 20, "parked after 20 failed passes, not before");
        delays.push(delay);
    }
    println!("back-off after passes 2–20 (s): {delays:.1?}");
    assert!(delays[0] > 0.1 && delays[0] < 0.3, "second failure: ~0.2 s ({})", delays[0]);
    assert!(delays[3] > 1.4 && delays[3] < 1.8, "fifth failure: ~1.6 s ({})", delays[3]);
    assert!(delays[15] > 59.0 && delays[15] <= 60.0, "capped at 60 s ({})", delays[15]);
    assert_eq!(app.metric("ugc_outbox_parked_total", &[]).await, 1.0);
    assert_eq!(app.metric("ugc_outbox_retries_total", &[]).await, 20.0);

    sqlx::query("UPDATE outbox SET next_attempt_at = now()").execute(&app.db).await.unwrap();
    assert_eq!(app.state.events.relay(None).await.unwrap(), 0, "a parked event is not retried");
    for note in drain(&mut listener).await {
        assert!(!note.contains("\"all\":true"), "a retry never drops whole L1s: {note}");
    }
}
