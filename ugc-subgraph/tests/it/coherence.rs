//! Coherence across instances: entity-change events, outbox, cascade
//! invalidation, fenced fills (issue: coherence).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::oneshot;
use ugc_subgraph::cache::CacheKey;

use crate::mutations::create;
use crate::support::{eventually, token, TestApp};

/// How soon every instance must see a committed write.
const WINDOW: Duration = Duration::from_millis(500);

const VIEW: &str = "query($id: ID!, $offer: ID!, $author: ID!) {
  review(id: $id) { text rating }
  offer(id: $offer) { rating { count distribution } reviews(first: 10) { totalCount edges { node { id text } } } }
  user(id: $author) { reviewCount reviews { edges { node { text } } } }
}";

async fn three_instances() -> (TestApp, TestApp, TestApp) {
    // Readers sample a fifth of their cache hits against Postgres.
    let detector = [("UGC_STALE_CHECK_RATE", "0.2"), ("UGC_STALE_WINDOW_MS", "500")];
    let a = TestApp::start().await;
    let b = TestApp::start_on(&a.db_url, &detector).await;
    let c = TestApp::start_on(&a.db_url, &detector).await;
    (a, b, c)
}

fn texts(view: &Value) -> (String, String, String) {
    (
        view["data"]["review"]["text"].as_str().unwrap_or("<none>").to_owned(),
        view["data"]["offer"]["reviews"]["edges"][0]["node"]["text"].as_str().unwrap_or("<none>").to_owned(),
        view["data"]["user"]["reviews"]["edges"][0]["node"]["text"].as_str().unwrap_or("<none>").to_owned(),
    )
}

#[tokio::test]
async fn a_write_on_one_instance_is_visible_on_every_instance_within_the_window() {
    let (a, b, c) = three_instances().await;
    let id = create(&a, "alice", "offer-c", 3, "before").await["data"]["createReview"]["id"].clone();
    let vars = json!({ "id": id, "offer": "offer-c", "author": "alice" });
    for app in [&a, &b, &c] {
        for _ in 0..2 {
            assert_eq!(texts(&app.gql(VIEW, vars.clone()).await).0, "before", "caches warm");
        }
    }

    let update = "mutation($id: ID!) { updateReview(id: $id, input: { text: \"after\", rating: 5 }) { text } }";
    let written = Instant::now();
    a.gql_as(Some(&token("alice", &[])), update, json!({ "id": id })).await;
    // The writer's own instance: the very next read.
    assert_eq!(texts(&a.gql(VIEW, vars.clone()).await), ("after".into(), "after".into(), "after".into()));
    for app in [&b, &c] {
        let seen = eventually(WINDOW, async || {
            texts(&app.gql(VIEW, vars.clone()).await) == ("after".into(), "after".into(), "after".into())
        })
        .await;
        assert!(seen, "not visible within {WINDOW:?}");
        let view = app.gql(VIEW, vars.clone()).await;
        assert_eq!(view["data"]["offer"]["rating"]["distribution"], json!([0, 0, 0, 0, 1]), "aggregate follows");
    }
    println!("visible on 3 instances {:?} after the write", written.elapsed());
    // Whichever instance relayed the event (the writer after commit, or a
    // background relay that claimed it first) invalidated itself; the
    // others learnt it by fan-out and measured the lag.
    let mut learnt = 0.0;
    let mut lag_samples = 0.0;
    for app in [&b, &c] {
        learnt += app.metric("ugc_events_applied_total", &[]).await + app.metric("ugc_events_relayed_total", &[]).await;
        lag_samples += app.metric("ugc_invalidation_lag_seconds_count", &[]).await;
    }
    assert!(learnt >= 2.0, "both other instances learnt of the write");
    assert!(lag_samples >= 1.0);
}

#[tokio::test]
async fn rendered_entities_follow_writes_on_every_instance() {
    let (a, b, _c) = three_instances().await;
    create(&a, "alice", "offer-e", 2, "first").await;
    // Warm only once every instance has learnt of that write (relayed it,
    // or applied the relaying instance's notification): a late
    // notification would rightly invalidate a fragment rendered before it.
    for app in [&a, &b] {
        assert!(
            eventually(WINDOW, async || {
                app.metric("ugc_events_applied_total", &[]).await + app.metric("ugc_events_relayed_total", &[]).await
                    >= 1.0
            })
            .await
        );
    }
    let query = "query($representations: [_Any!]!) { _entities(representations: $representations) { ... on Offer { id rating { count average } reviews(first: 3) { totalCount edges { node { text } } } } ... on User { id reviewCount } } }";
    let vars = json!({ "representations": [{ "__typename": "Offer", "id": "offer-e" }, { "__typename": "User", "id": "alice" }] });
    for app in [&a, &b] {
        for _ in 0..2 {
            let body = app.gql(query, vars.clone()).await;
            assert_eq!(body["data"]["_entities"][0]["rating"]["count"], 1, "{body}");
        }
        assert!(app.metric("ugc_cache_requests_total", &["layer=\"entity\"", "result=\"hit\""]).await >= 2.0);
    }
    let bob = create(&a, "bob", "offer-e", 4, "second").await;
    assert!(bob["errors"].is_null());
    // The writer's instance: at once. Another instance: within the window.
    let expect = |body: &Value| {
        body["data"]["_entities"][0]["rating"] == json!({ "count": 2, "average": 3.0 })
            && body["data"]["_entities"][0]["reviews"]["edges"][0]["node"]["text"] == "second"
    };
    assert!(expect(&a.gql(query, vars.clone()).await));
    assert!(
        eventually(WINDOW, async || expect(&b.gql(query, vars.clone()).await)).await,
        "b's fragment was invalidated"
    );
    // Bob's User entity, rendered for the first time, counts his review.
    let bob_vars = json!({ "representations": [{ "__typename": "User", "id": "bob" }] });
    assert_eq!(b.gql(query, bob_vars).await["data"]["_entities"][0]["reviewCount"], 1);
}

#[tokio::test]
async fn a_fill_that_raced_a_write_is_never_cached() {
    let a = TestApp::start().await;
    let b = TestApp::start_on(&a.db_url, &[]).await;
    let id = create(&a, "alice", "offer-f", 3, "old text").await["data"]["createReview"]["id"].clone();
    let review_id: i64 = id.as_str().unwrap().parse().unwrap();

    // Pause the next fill of this review between its load and its fill.
    let (paused_tx, paused_rx) = oneshot::channel::<()>();
    let (resume_tx, resume_rx) = oneshot::channel::<()>();
    let gate = Arc::new(Mutex::new(Some((paused_tx, resume_rx))));
    a.state.cache.set_fill_hook(Some(Arc::new(move |keys: Vec<CacheKey>| {
        let gate = Arc::clone(&gate);
        Box::pin(async move {
            if !keys.contains(&CacheKey::Review(review_id)) {
                return;
            }
            let taken = gate.lock().unwrap().take();
            if let Some((paused, resume)) = taken {
                let _ = paused.send(());
                let _ = resume.await;
            }
        })
    })));
    let reader = {
        let url = a.url("/graphql");
        let id = id.clone();
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .json(&json!({ "query": "query($id: ID!) { review(id: $id) { text } }", "variables": { "id": id } }))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    paused_rx.await.expect("the reader loaded the old row and paused before filling");
    // The write commits and invalidates while the reader holds the old value.
    let update = "mutation($id: ID!) { updateReview(id: $id, input: { text: \"new text\" }) { text } }";
    let written = a.gql_as(Some(&token("alice", &[])), update, json!({ "id": id })).await;
    assert_eq!(written["data"]["updateReview"]["text"], "new text");
    resume_tx.send(()).unwrap();
    let raced = reader.await.unwrap();
    assert_eq!(raced["data"]["review"]["text"], "old text", "that reader read before the write");
    a.state.cache.set_fill_hook(None);

    // The old value was not cached: not in L1 (a), not in L2 (b reads L2 first).
    let query = "query($id: ID!) { review(id: $id) { text } }";
    assert_eq!(a.gql(query, json!({ "id": id })).await["data"]["review"]["text"], "new text");
    assert_eq!(b.gql(query, json!({ "id": id })).await["data"]["review"]["text"], "new text");
    assert!(a.metric("ugc_cache_fills_refused_total", &["layer=\"l1\""]).await >= 1.0);
    assert!(a.metric("ugc_cache_fills_refused_total", &["layer=\"l2\""]).await >= 1.0);
}

#[tokio::test]
async fn an_event_committed_but_never_relayed_is_applied_by_the_background_relay() {
    let (a, b, _c) = three_instances().await;
    let id = create(&a, "alice", "offer-g", 4, "v1").await["data"]["createReview"]["id"].clone();
    let vars = json!({ "id": id, "offer": "offer-g", "author": "alice" });
    assert_eq!(texts(&b.gql(VIEW, vars.clone()).await).0, "v1");
    // A writer that died right after commit: row and outbox event, no relay, no notify.
    let review_id: i64 = id.as_str().unwrap().parse().unwrap();
    let mut tx = a.db.begin().await.unwrap();
    sqlx::query("UPDATE reviews SET body = 'v2', version = version + 1 WHERE id = $1")
        .bind(review_id)
        .execute(&mut *tx)
        .await
        .unwrap();
    let event = json!({ "type": "review_changed", "review_id": review_id, "offer_id": "offer-g", "author_id": "alice", "change": "updated", "version": 2 });
    sqlx::query("INSERT INTO outbox (event) VALUES ($1)").bind(event).execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
    let seen = eventually(Duration::from_secs(3), async || {
        texts(&b.gql(VIEW, vars.clone()).await) == ("v2".into(), "v2".into(), "v2".into())
    })
    .await;
    assert!(seen, "the background relay picked the event up");
    assert!(
        eventually(Duration::from_secs(2), async || a
            .count("SELECT count(*) FROM outbox WHERE processed_at IS NULL")
            .await
            == 0)
        .await
    );
}

#[tokio::test]
async fn losing_the_listener_connection_drops_l1() {
    let a = TestApp::start().await;
    create(&a, "alice", "offer-l", 4, "x").await;
    a.gql("{ offer(id: \"offer-l\") { rating { count } } }", json!({})).await;
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND query ILIKE 'LISTEN%' AND pid <> pg_backend_pid()",
    )
    .fetch_one(&a.db)
    .await
    .unwrap();
    assert!(killed >= 1, "found the listener");
    assert!(eventually(Duration::from_secs(10), async || a.metric("ugc_l1_dropped_total", &[]).await >= 1.0).await);
    // And it is listening again: a write elsewhere reaches it.
    let b = TestApp::start_on(&a.db_url, &[]).await;
    let learnt =
        async || a.metric("ugc_events_applied_total", &[]).await + a.metric("ugc_events_relayed_total", &[]).await;
    let before = learnt().await;
    create(&b, "bob", "offer-l", 2, "y").await;
    assert!(eventually(Duration::from_secs(5), async || learnt().await > before).await);
}

#[tokio::test]
async fn external_events_remove_a_users_and_an_offers_reviews_idempotently() {
    let a = TestApp::start_with(&[("UGC_EVENTS_TOKEN", "events-token-0123456789")]).await;
    a.seed(20, 40, 300).await;
    let b = TestApp::start_on(&a.db_url, &[("UGC_EVENTS_TOKEN", "events-token-0123456789")]).await;
    let view = "{ user(id: \"user-000001\") { reviewCount reviews { totalCount } } offer(id: \"offer-000002\") { rating { count } reviews { edges { node { id } } } } o1: offer(id: \"offer-000001\") { rating { count } } }";
    let before = b.gql(view, json!({})).await;
    assert!(before["data"]["user"]["reviewCount"].as_i64().unwrap() > 0);
    let post = |body: Value, bearer: Option<&'static str>| {
        let mut req = a.client().post(a.url("/events")).json(&body);
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        async move {
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let outbox = a.count("SELECT count(*) FROM outbox").await;
    let good = json!({ "events": [{ "type": "user_removed", "key": "evt-1", "userId": "user-000001" }] });
    const TOKEN: Option<&str> = Some("events-token-0123456789");
    for (body, bearer, status) in [
        (good.clone(), None, 401),
        (good.clone(), Some("wrong-token-wrong-token"), 401),
        (json!({ "events": [] }), TOKEN, 422),
        (json!({ "events": [{ "type": "user_removed", "key": "", "userId": "u" }] }), TOKEN, 422),
        (json!({ "events": [{ "type": "user_removed", "key": "k", "userId": "x".repeat(65) }] }), TOKEN, 422),
        (json!({ "events": [{ "type": "galaxy_exploded", "key": "k" }] }), TOKEN, 400),
        (json!({ "nope": 1 }), TOKEN, 400),
    ] {
        let (got, answer) = post(body, bearer).await;
        assert_eq!(got, status, "{answer}");
        assert!(answer["errors"][0]["message"].is_string());
    }
    assert_eq!(a.count("SELECT count(*) FROM outbox").await, outbox, "rejected bodies change nothing");

    let (status, applied) = post(good.clone(), TOKEN).await;
    assert_eq!(status, 200, "{applied}");
    assert_eq!(applied["applied"], 1);
    // Another instance sees it within the fan-out window.
    assert!(eventually(WINDOW, async || b.gql(view, json!({})).await["data"]["user"]["reviewCount"] == 0).await);
    let after = b.gql(view, json!({})).await;
    assert_eq!(after["data"]["user"]["reviewCount"], 0, "{after}");
    assert_eq!(after["data"]["user"]["reviews"]["totalCount"], 0);
    let o1 = a.count("SELECT count(*) FROM reviews WHERE offer_id = 'offer-000001' AND status = 'PUBLISHED' AND deleted_at IS NULL").await;
    assert_eq!(after["data"]["o1"]["rating"]["count"], o1, "aggregates follow");

    let (status, again) = post(good, TOKEN).await;
    assert_eq!((status, again["duplicates"].clone()), (200, json!(1)), "redelivery is recognised");

    let (status, _) =
        post(json!({ "events": [{ "type": "offer_removed", "key": "evt-2", "offerId": "offer-000002" }] }), TOKEN)
            .await;
    assert_eq!(status, 200);
    assert!(eventually(WINDOW, async || b.gql(view, json!({})).await["data"]["offer"]["rating"]["count"] == 0).await);
    let gone = b.gql(view, json!({})).await;
    assert_eq!(gone["data"]["offer"]["rating"]["count"], 0);
    assert_eq!(gone["data"]["offer"]["reviews"]["edges"], json!([]));
}

#[tokio::test]
async fn concurrent_writers_and_readers_find_no_stale_read_after_the_window() {
    let (a, b, c) = three_instances().await;
    let id = create(&a, "alice", "offer-s", 3, "v0").await["data"]["createReview"]["id"].clone();
    let vars = json!({ "id": id, "offer": "offer-s", "author": "alice" });
    // (version, committed at) of every write.
    let log: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::new(Mutex::new(vec![(0, Instant::now())]));
    let stop_at = Instant::now() + Duration::from_secs(3);
    let writer = {
        let (log, id) = (Arc::clone(&log), id.clone());
        let a = &a;
        async move {
            let update = "mutation($id: ID!, $t: String!) { updateReview(id: $id, input: { text: $t }) { text } }";
            let mut n = 0u64;
            while Instant::now() < stop_at && n < 200 {
                n += 1;
                a.gql_as(Some(&token("alice", &[])), update, json!({ "id": id, "t": format!("v{n}") })).await;
                log.lock().unwrap().push((n, Instant::now()));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let reader = async |app: &TestApp| {
        let (log, vars) = (Arc::clone(&log), vars.clone());
        {
            let (mut reads, mut stale) = (0, Vec::new());
            while Instant::now() < stop_at {
                let started = Instant::now();
                let view = app.gql(VIEW, vars.clone()).await;
                reads += 1;
                // The newest version committed at least WINDOW before this read began.
                let floor = log
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(_, at)| *at + WINDOW <= started)
                    .map(|(n, _)| *n)
                    .max()
                    .unwrap_or(0);
                let (r, p, u) = texts(&view);
                for seen in [r, p, u] {
                    let version: u64 = seen.trim_start_matches('v').parse().unwrap_or(0);
                    if version < floor {
                        stale.push((seen, floor));
                    }
                }
            }
            (reads, stale)
        }
    };
    let (b, c) = (&b, &c);
    let ((), (reads_b, stale_b), (reads_c, stale_c)) = tokio::join!(writer, reader(b), reader(c));
    let writes = log.lock().unwrap().len() - 1;
    println!(
        "{writes} writes, {} reads on 2 other instances, stale after {WINDOW:?}: {}",
        reads_b + reads_c,
        stale_b.len() + stale_c.len()
    );
    assert!(writes >= 10 && reads_b + reads_c >= 20, "the test exercised something");
    assert!(stale_b.is_empty() && stale_c.is_empty(), "stale reads: {stale_b:?} {stale_c:?}");
    let checks =
        b.metric("ugc_stale_read_checks_total", &[]).await + c.metric("ugc_stale_read_checks_total", &[]).await;
    let detected =
        b.metric("ugc_stale_reads_detected_total", &[]).await + c.metric("ugc_stale_reads_detected_total", &[]).await;
    println!("stale-read detector: {checks} sampled hits checked, {detected} stale");
    assert!(checks > 0.0);
    assert_eq!(detected, 0.0, "the detector agrees");
}

#[tokio::test]
async fn the_stale_read_detector_flags_a_cache_that_missed_an_invalidation() {
    // The detector samples data-cache hits: no rendered fragments in front.
    let vars = [("UGC_STALE_CHECK_RATE", "1"), ("UGC_STALE_WINDOW_MS", "100"), ("UGC_ENTITY_CACHE", "off")];
    let a = TestApp::start_with(&vars).await;
    let id = create(&a, "alice", "offer-d", 4, "cached").await["data"]["createReview"]["id"].clone();
    let query = "query($id: ID!) { review(id: $id) { text } }";
    a.gql(query, json!({ "id": id })).await;
    assert_eq!(a.metric("ugc_stale_reads_detected_total", &[]).await, 0.0);
    // Change the row behind the pipeline's back (no outbox event): the cache
    // now holds a stale value the events will never fix.
    sqlx::query("UPDATE reviews SET body = 'changed', version = version + 1, updated_at = now() - interval '1 second' WHERE id = $1")
        .bind(id.as_str().unwrap().parse::<i64>().unwrap())
        .execute(&a.db)
        .await
        .unwrap();
    assert_eq!(a.gql(query, json!({ "id": id })).await["data"]["review"]["text"], "cached");
    assert!(
        eventually(Duration::from_secs(3), async || a.metric("ugc_stale_reads_detected_total", &[]).await >= 1.0).await
    );
}

#[tokio::test]
async fn processed_outbox_rows_are_pruned_and_pending_ones_kept() {
    let a = TestApp::start().await;
    create(&a, "alice", "offer-p1", 5, "one").await;
    create(&a, "bob", "offer-p1", 4, "two").await;
    assert!(
        eventually(Duration::from_secs(3), async || a
            .count("SELECT count(*) FROM outbox WHERE processed_at IS NULL")
            .await
            == 0)
        .await
    );
    // Two processed an hour ago and more; then a new one arrives.
    sqlx::query("UPDATE outbox SET processed_at = now() - interval '2 hours' WHERE processed_at IS NOT NULL")
        .execute(&a.db)
        .await
        .unwrap();
    sqlx::query("INSERT INTO outbox (event) VALUES ('{\"type\": \"review_changed\", \"review_id\": 1, \"offer_id\": \"x\", \"author_id\": \"y\", \"change\": \"updated\", \"version\": 9}')")
        .execute(&a.db)
        .await
        .unwrap();
    let pruned = a.state.store.prune_events(Duration::from_secs(3600)).await.unwrap();
    assert_eq!(pruned, 2);
    assert!(a.count("SELECT count(*) FROM outbox").await >= 1, "the recent event is kept, processed or not");
}

/// A retried or late invalidation carrying an older event id must not move
/// a tag's token back: that would revive entries a newer write invalidated.
#[tokio::test]
async fn a_late_out_of_order_invalidation_never_revives_old_entries() {
    let a = TestApp::start_with(&[("UGC_ENTITY_CACHE", "off")]).await;
    let id = create(&a, "alice", "offer-late", 3, "first text").await["data"]["createReview"]["id"].clone();
    let first_event: i64 = a.count("SELECT max(id) FROM outbox").await;
    let page = "query { offer(id: \"offer-late\") { reviews(first: 5) { edges { node { text } } } } }";
    // Fill L2 under the first event's token.
    assert_eq!(a.gql(page, json!({})).await["data"]["offer"]["reviews"]["edges"][0]["node"]["text"], "first text");
    let edit = "mutation($id: ID!) { updateReview(id: $id, input: { text: \"second text\" }) { id } }";
    let edited = a.gql_as(Some(&token("alice", &[])), edit, json!({ "id": id })).await;
    assert!(edited["errors"].is_null(), "{edited}");
    // The first invalidation arrives again, late (a relay retry).
    let tag = ugc_subgraph::cache::Tag::Offer("offer-late".into());
    assert!(a.state.cache.invalidate_shared(&[tag], first_event as u64).await);
    // A fresh instance reads L2: the entry filled under the first token must stay dead.
    let b = TestApp::start_on(&a.db_url, &[("UGC_ENTITY_CACHE", "off")]).await;
    let seen = b.gql(page, json!({})).await;
    assert_eq!(seen["data"]["offer"]["reviews"]["edges"][0]["node"]["text"], "second text", "{seen}");
}

/// The writer relays its own event before answering, without claiming it:
/// when a background relay holds that outbox row (it claimed it at the same
/// moment), the writer applies the event to L2 all the same, so nothing
/// waits on the other relay's Redis call; it answers once that relay let go
/// of the row, and marks it processed itself when the other gave it back.
#[tokio::test]
async fn a_writer_applies_its_own_event_even_while_a_relay_holds_it() {
    use ugc_subgraph::domain::{EntityId, Rating, ReviewStatus, ReviewText};
    use ugc_subgraph::events::cascade;
    use ugc_subgraph::store::NewReview;

    let a = TestApp::start_without_background(&[("UGC_ENTITY_CACHE", "off")]).await;
    let page = "query { offer(id: \"offer-held\") { rating { count } } }";
    assert_eq!(a.gql(page, json!({})).await["data"]["offer"]["rating"]["count"], 0, "filled, empty");
    let new = NewReview {
        offer_id: EntityId::new("offer-held", "offerId").unwrap(),
        author_id: EntityId::new("alice", "sub").unwrap(),
        rating: Rating::new(5).unwrap(),
        text: ReviewText::new("held").unwrap(),
        status: ReviewStatus::Published,
    };
    let (id, event) = a.state.store.create_review(new, None).await.unwrap().event.unwrap();
    let tags = cascade::tags(&event);
    // A "background relay" claims the row first, and applies nothing.
    let mut relay = a.db.begin().await.unwrap();
    sqlx::query("SELECT id FROM outbox WHERE id = $1 FOR UPDATE").bind(id).execute(&mut *relay).await.unwrap();
    let events = a.state.events.clone();
    let writer = {
        let tags = tags.clone();
        tokio::spawn(async move { events.after_commit(id, &tags).await })
    };
    // Another instance reads L2 while the row is held: the writer's tokens moved.
    let b = TestApp::start_on(&a.db_url, &[("UGC_ENTITY_CACHE", "off")]).await;
    assert!(
        eventually(Duration::from_secs(5), async || {
            b.gql(page, json!({})).await["data"]["offer"]["rating"]["count"] == 1
        })
        .await,
        "the writer applied its event while another relay held the row"
    );
    assert!(!writer.is_finished(), "the writer answered while the other relay still held its row");
    // The other relay gives the row back unprocessed.
    relay.rollback().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .expect("the writer finishes once the row is free")
        .unwrap();
    let processed: bool = sqlx::query_scalar("SELECT processed_at IS NOT NULL FROM outbox WHERE id = $1")
        .bind(id)
        .fetch_one(&a.db)
        .await
        .unwrap();
    assert!(processed, "the writer marked its event processed");
}

/// Black-box, over two instances: ids are canonical and opaque. A review id
/// in any other shape names nothing (a `null` entity, never another review),
/// and offers whose ids look like another key's suffix keep their own data.
#[tokio::test]
async fn ids_are_canonical_and_never_collide_across_instances() {
    let a = TestApp::start().await;
    let b = TestApp::start_on(&a.db_url, &[]).await;
    let id = create(&a, "alice", "X", 5, "on X").await["data"]["createReview"]["id"].as_str().unwrap().to_owned();
    for (i, offer) in ["X:lease", "X:", "lease", "g:o:X"].iter().enumerate() {
        assert!(create(&a, &format!("user-{i}"), offer, 1, "elsewhere").await["errors"].is_null());
    }
    let rating = "query($o: ID!) { offer(id: $o) { rating { count average } reviews { edges { node { text } } } } }";
    for app in [&a, &b] {
        for _ in 0..2 {
            let x = app.gql(rating, json!({ "o": "X" })).await;
            assert_eq!(x["data"]["offer"]["rating"], json!({ "count": 1, "average": 5.0 }), "{x}");
            let lease = app.gql(rating, json!({ "o": "X:lease" })).await;
            assert_eq!(lease["data"]["offer"]["rating"], json!({ "count": 1, "average": 1.0 }), "{lease}");
        }
    }
    let entities = "query($r: [_Any!]!) { _entities(representations: $r) { ... on Review { id text } } }";
    for app in [&a, &b] {
        let shapes = [id.clone(), format!("0{id}"), format!("+{id}"), "1".repeat(40), "no-such-review".into()];
        let reps: Vec<Value> = shapes.iter().map(|s| json!({ "__typename": "Review", "id": s })).collect();
        let body = app.gql(entities, json!({ "r": reps })).await;
        assert!(body["errors"].is_null(), "{body}");
        let list = body["data"]["_entities"].as_array().unwrap();
        assert_eq!(list[0]["id"], id.as_str(), "the canonical id answers with that very id");
        assert!(list[1..].iter().all(Value::is_null), "{body}");
        let long = app.gql(rating, json!({ "o": "o".repeat(65) })).await;
        assert_eq!(long["errors"][0]["extensions"]["code"], "BAD_USER_INPUT", "{long}");
    }
}

/// `seed` replaces every review without outbox events (and ids restart):
/// afterwards no instance and no Redis entry may serve pre-seed data, and
/// writes after it invalidate as before (their event ids start again at 1).
#[tokio::test]
async fn after_seed_nothing_from_before_is_served_anywhere() {
    let a = TestApp::start_with(&[("UGC_ENTITY_CACHE", "off")]).await;
    a.seed(5, 60, 200).await;
    let b = TestApp::start_on(&a.db_url, &[("UGC_ENTITY_CACHE", "off")]).await;
    let view = "{ offer(id: \"offer-000001\") { rating { count } reviews(first: 1) { edges { node { id text } } } } review(id: \"1\") { text } }";
    let truth = |app: &TestApp| {
        let db = app.db.clone();
        async move {
            let count: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM reviews WHERE offer_id = 'offer-000001' AND status = 'PUBLISHED' AND deleted_at IS NULL",
            )
            .fetch_one(&db)
            .await
            .unwrap();
            let text: Option<String> =
                sqlx::query_scalar("SELECT body FROM reviews WHERE id = 1").fetch_optional(&db).await.unwrap();
            (count, text)
        }
    };
    let seen = |v: &Value| {
        (
            v["data"]["offer"]["rating"]["count"].as_i64().unwrap(),
            v["data"]["review"]["text"].as_str().map(str::to_owned),
        )
    };
    // Cached everywhere (L1 of both, L2).
    for app in [&a, &b] {
        for _ in 0..2 {
            assert_eq!(seen(&app.gql(view, json!({})).await), truth(&a).await);
        }
    }
    // Re-seeded with other data: same ids, other contents.
    a.state
        .store
        .seed(ugc_subgraph::store::seed::SeedPlan { offers: 5, users: 60, reviews: 150, seed: 99 })
        .await
        .unwrap();
    let after = truth(&a).await;
    for app in [&a, &b] {
        assert!(
            eventually(WINDOW, async || seen(&app.gql(view, json!({})).await) == after).await,
            "pre-seed data served"
        );
    }
    let c = TestApp::start_on(&a.db_url, &[("UGC_ENTITY_CACHE", "off")]).await;
    assert_eq!(seen(&c.gql(view, json!({})).await), after, "a new instance reads no pre-seed entry from Redis");
    // Writes after the seed (event ids from 1 again) still invalidate everywhere.
    create(&a, "new-author", "offer-000001", 5, "after the seed").await;
    let count = after.0 + 1;
    for app in [&a, &b, &c] {
        assert!(
            eventually(WINDOW, async || seen(&app.gql(view, json!({})).await).0 == count).await,
            "write after seed lost"
        );
    }
}
