//! Deterministic demo and benchmark data.
//!
//! The same `(offers, users, reviews, seed)` always produces the same rows
//! with the same ids: offers `offer-000001…`, users `user-000001…`, review
//! counts per offer following a Zipf law (offer 1 is the hottest), ratings
//! skewed to 4–5 stars, one review per (user, offer). Rows go in with `COPY`
//! with the aggregate trigger and secondary indexes off, then the indexes and
//! aggregates are rebuilt in one pass each: a million reviews in seconds.

use std::fmt::Write as _;
use std::time::Instant;

use chrono::{DateTime, Duration, Utc};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Store, StoreError};

/// What to generate.
#[derive(Debug, Clone, Copy)]
pub struct SeedPlan {
    pub offers: u32,
    pub users: u32,
    pub reviews: u64,
    pub seed: u64,
}

/// What was loaded, and how long it took.
#[derive(Debug, Clone, Copy)]
pub struct SeedReport {
    pub reviews: u64,
    pub elapsed: std::time::Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("{reviews} reviews cannot fit {offers} offers × {users} users with one review per (user, offer)")]
    TooMany { reviews: u64, offers: u32, users: u32 },
    #[error("offers and users must be between 1 and 999999")]
    BadSize,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Zipf exponent: offer k gets a share proportional to 1 / k^s.
const ZIPF_S: f64 = 1.0;
/// Share of reviews per star, 1 to 5 (skewed towards 4–5).
const STAR_WEIGHTS: [u32; 5] = [4, 5, 10, 31, 50];
/// Reviews dated over the two years before this instant (fixed, so that
/// seeding is reproducible).
const NEWEST_REVIEW: i64 = 1_763_683_200; // 2025-11-21T00:00:00Z
const SPAN_SECS: i64 = 2 * 365 * 24 * 3600;
const ROWS_PER_CHUNK: usize = 20_000;

const PHRASES: &[&str] = &[
    "Exactly as described, fast delivery.",
    "Good value for the money.",
    "Works fine, packaging could be better.",
    "Seller answered all my questions quickly.",
    "Not what I expected, but it does the job.",
    "Excellent quality, would buy again!",
    "Arrived late and slightly scratched.",
    "Très bien, je recommande. 👍",
];

/// How many reviews each offer gets: Zipf shares, capped at `users` (one
/// review per user and offer), summing exactly to `reviews`.
pub fn reviews_per_offer(plan: &SeedPlan) -> Result<Vec<u64>, SeedError> {
    if plan.offers == 0 || plan.users == 0 || plan.offers > 999_999 || plan.users > 999_999 {
        return Err(SeedError::BadSize);
    }
    let cap = u64::from(plan.users);
    if plan.reviews > u64::from(plan.offers) * cap {
        return Err(SeedError::TooMany { reviews: plan.reviews, offers: plan.offers, users: plan.users });
    }
    let weights: Vec<f64> = (1..=plan.offers).map(|k| 1.0 / f64::from(k).powf(ZIPF_S)).collect();
    let total: f64 = weights.iter().sum();
    let mut counts: Vec<u64> = weights.iter().map(|w| ((plan.reviews as f64 * w / total) as u64).min(cap)).collect();
    // Hand out what flooring and capping left over, hottest offers first.
    let mut left = plan.reviews - counts.iter().sum::<u64>();
    while left > 0 {
        for c in counts.iter_mut().filter(|c| **c < cap) {
            if left == 0 {
                break;
            }
            *c += 1;
            left -= 1;
        }
    }
    Ok(counts)
}

fn pick_stars(rng: &mut ChaCha8Rng) -> u8 {
    let mut roll = rng.random_range(0..STAR_WEIGHTS.iter().sum::<u32>());
    for (i, w) in STAR_WEIGHTS.iter().enumerate() {
        if roll < *w {
            return i as u8 + 1;
        }
        roll -= w;
    }
    5
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Store {
    /// Replaces all reviews with generated ones.
    ///
    /// # Errors
    /// An impossible plan, or the store failing.
    pub async fn seed(&self, plan: SeedPlan) -> Result<SeedReport, SeedError> {
        let started = Instant::now();
        let counts = reviews_per_offer(&plan)?;
        let mut rng = ChaCha8Rng::seed_from_u64(plan.seed);
        let newest = DateTime::<Utc>::from_timestamp(NEWEST_REVIEW, 0).unwrap_or_default();
        let q = |e: sqlx::Error| StoreError::Query { statement: "seed", source: e };

        let mut tx = self.primary.begin().await.map_err(q)?;
        // Bulk work: the per-statement timeout that protects the API does not apply.
        sqlx::query("SET LOCAL statement_timeout = 0").execute(&mut *tx).await.map_err(q)?;
        sqlx::query("TRUNCATE reviews, offer_ratings, author_review_counts, outbox RESTART IDENTITY")
            .execute(&mut *tx)
            .await
            .map_err(q)?;
        // Secondary indexes are rebuilt after the load: far faster than
        // maintaining six b-trees row by row.
        let indexes: Vec<(String, String)> = sqlx::query_as(
            "SELECT indexname::text, indexdef FROM pg_indexes \
             WHERE schemaname = current_schema() AND tablename = 'reviews' AND indexname <> 'reviews_pkey'",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(q)?;
        for (name, _) in &indexes {
            sqlx::query(&format!("DROP INDEX {name}")).execute(&mut *tx).await.map_err(q)?;
        }
        sqlx::query("ALTER TABLE reviews DISABLE TRIGGER reviews_aggregates_insert")
            .execute(&mut *tx)
            .await
            .map_err(q)?;

        let mut copy = tx
            .copy_in_raw("COPY reviews (offer_id, author_id, rating, body, status, created_at, updated_at) FROM STDIN")
            .await
            .map_err(q)?;
        let users = u64::from(plan.users);
        let mut buf = String::with_capacity(ROWS_PER_CHUNK * 120);
        let mut rows_in_buf = 0;
        for (offer_index, &count) in counts.iter().enumerate() {
            let offer = offer_index + 1;
            // count distinct users: walk the users with a stride coprime to
            // their number from a random start.
            let start = rng.random_range(0..users);
            let mut stride = rng.random_range(1..=users);
            while gcd(stride, users) != 1 {
                stride = stride % users + 1;
            }
            for j in 0..count {
                let user = (start + j * stride) % users + 1;
                let stars = pick_stars(&mut rng);
                let created = newest - Duration::milliseconds(rng.random_range(0..SPAN_SECS * 1000));
                let roll = rng.random_range(0..1000);
                let status = match roll {
                    0..=4 => "REJECTED",
                    5..=19 => "PENDING",
                    _ => "PUBLISHED",
                };
                let phrase = PHRASES[rng.random_range(0..PHRASES.len())];
                let ts = created.format("%Y-%m-%d %H:%M:%S%.3f+00");
                // Tab-separated COPY text; our values contain no tabs,
                // newlines or backslashes.
                let _ = writeln!(
                    buf,
                    "offer-{offer:06}\tuser-{user:06}\t{stars}\t{stars}/5 for offer-{offer:06}. {phrase}\t{status}\t{ts}\t{ts}"
                );
                rows_in_buf += 1;
                if rows_in_buf == ROWS_PER_CHUNK {
                    copy.send(buf.as_bytes()).await.map_err(q)?;
                    buf.clear();
                    rows_in_buf = 0;
                }
            }
        }
        if !buf.is_empty() {
            copy.send(buf.as_bytes()).await.map_err(q)?;
        }
        let loaded = copy.finish().await.map_err(q)?;

        for (_, definition) in &indexes {
            sqlx::query(definition).execute(&mut *tx).await.map_err(q)?;
        }
        sqlx::query("ALTER TABLE reviews ENABLE TRIGGER reviews_aggregates_insert")
            .execute(&mut *tx)
            .await
            .map_err(q)?;
        sqlx::query(
            "INSERT INTO offer_ratings (offer_id, review_count, rating_sum, stars_1, stars_2, stars_3, stars_4, stars_5) \
             SELECT offer_id, count(*), sum(rating), \
                    count(*) FILTER (WHERE rating = 1), count(*) FILTER (WHERE rating = 2), \
                    count(*) FILTER (WHERE rating = 3), count(*) FILTER (WHERE rating = 4), \
                    count(*) FILTER (WHERE rating = 5) \
             FROM reviews WHERE status = 'PUBLISHED' AND deleted_at IS NULL GROUP BY offer_id",
        )
        .execute(&mut *tx)
        .await
        .map_err(q)?;
        sqlx::query(
            "INSERT INTO author_review_counts (author_id, review_count) \
             SELECT author_id, count(*) FROM reviews \
             WHERE status = 'PUBLISHED' AND deleted_at IS NULL GROUP BY author_id",
        )
        .execute(&mut *tx)
        .await
        .map_err(q)?;
        // Every review, aggregate and event id was replaced without an
        // outbox event (and ids restart): a new data epoch, committed with
        // the data, tells every instance that no cached value survives it.
        sqlx::query("UPDATE data_epoch SET epoch = epoch + 1 WHERE singleton").execute(&mut *tx).await.map_err(q)?;
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(super::outbox::EPOCH_CHANNEL)
            .execute(&mut *tx)
            .await
            .map_err(q)?;
        tx.commit().await.map_err(q)?;
        sqlx::query("ANALYZE reviews, offer_ratings, author_review_counts").execute(&self.primary).await.map_err(q)?;
        Ok(SeedReport { reviews: loaded, elapsed: started.elapsed() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_counts_sum_exactly_and_respect_the_user_cap() {
        let plan = SeedPlan { offers: 1000, users: 500, reviews: 100_000, seed: 1 };
        let counts = reviews_per_offer(&plan).unwrap();
        assert_eq!(counts.iter().sum::<u64>(), 100_000);
        assert!(counts.iter().all(|&c| c <= 500));
        assert!(counts[0] >= counts[10] && counts[10] >= counts[999], "hot head, long tail");
        assert!(counts[999] > 0);
    }

    #[test]
    fn impossible_plans_are_refused() {
        let plan = SeedPlan { offers: 2, users: 3, reviews: 7, seed: 1 };
        assert!(matches!(reviews_per_offer(&plan), Err(SeedError::TooMany { .. })));
    }

    #[test]
    fn stars_skew_high() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut hist = [0u32; 5];
        for _ in 0..10_000 {
            hist[usize::from(pick_stars(&mut rng)) - 1] += 1;
        }
        assert!(hist[4] > hist[3] && hist[3] > hist[2] && hist[2] > hist[0], "{hist:?}");
    }
}
