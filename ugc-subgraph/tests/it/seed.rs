//! `seed`: deterministic, id formats of the spec, Zipf-skewed, one review
//! per (user, offer), aggregates consistent with the rows.

use crate::support::TestApp;

async fn content_hash(app: &TestApp) -> String {
    sqlx::query_scalar("SELECT md5(string_agg(id || offer_id || author_id || rating || body || status || created_at, ',' ORDER BY id)) FROM reviews")
        .fetch_one(&app.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn seeding_is_deterministic_and_shaped_as_specified() {
    let app = TestApp::start().await;
    app.seed(50, 300, 3000).await;
    let first = content_hash(&app).await;
    app.seed(50, 300, 3000).await;
    assert_eq!(content_hash(&app).await, first, "same plan and seed, same rows");

    assert_eq!(app.count("SELECT count(*) FROM reviews").await, 3000);
    assert_eq!(
        app.count(
            "SELECT count(*) FROM reviews WHERE offer_id !~ '^offer-[0-9]{6}$' OR author_id !~ '^user-[0-9]{6}$'"
        )
        .await,
        0
    );
    assert_eq!(
        app.count("SELECT count(*) FROM (SELECT 1 FROM reviews GROUP BY offer_id, author_id HAVING count(*) > 1) d")
            .await,
        0
    );
    let hottest = app.count("SELECT count(*) FROM reviews WHERE offer_id = 'offer-000001'").await;
    let coldest = app.count("SELECT count(*) FROM reviews WHERE offer_id = 'offer-000050'").await;
    assert!(hottest > 10 * coldest, "Zipf: {hottest} vs {coldest}");
    let high = app.count("SELECT count(*) FROM reviews WHERE rating >= 4").await;
    assert!(high > 3000 * 6 / 10, "ratings skew to 4–5 stars: {high}");
    // Aggregates rebuilt after the bulk load agree with the rows.
    let mismatched = app
        .count(
            "SELECT count(*) FROM (SELECT offer_id, count(*) c, sum(rating) s FROM reviews \
             WHERE status = 'PUBLISHED' AND deleted_at IS NULL GROUP BY offer_id) t \
             FULL JOIN offer_ratings o USING (offer_id) \
             WHERE o.review_count IS DISTINCT FROM t.c OR o.rating_sum IS DISTINCT FROM t.s",
        )
        .await;
    assert_eq!(mismatched, 0);
}
