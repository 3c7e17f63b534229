//! Batched point reads: reviews by id, rating aggregates by offer, review
//! counts by author. One statement per call, whatever the number of keys.

use std::collections::HashMap;

use sqlx::Row;

use super::{review_from_row, Store, StoreError, REVIEW_COLUMNS};
use crate::domain::{RatingSummary, Review};

impl Store {
    /// Live (not deleted) reviews with these ids, in any status. Ids that
    /// match nothing are absent from the result.
    ///
    /// # Errors
    /// Postgres unavailable or failing.
    pub async fn reviews_by_ids(&self, ids: &[i64]) -> Result<Vec<Review>, StoreError> {
        let sql = format!("SELECT {REVIEW_COLUMNS} FROM reviews r WHERE r.id = ANY($1) AND r.deleted_at IS NULL");
        let rows = self
            .read("reviews_by_ids", |pool| {
                let sql = &sql;
                async move { sqlx::query(sql).bind(ids).fetch_all(&pool).await }
            })
            .await?;
        rows.iter().map(review_from_row).collect()
    }

    /// Rating aggregates of these offers; offers without published reviews
    /// get the empty summary.
    ///
    /// # Errors
    /// Postgres unavailable or failing.
    pub async fn offer_ratings(&self, offer_ids: &[String]) -> Result<HashMap<String, RatingSummary>, StoreError> {
        let rows = self
            .read("offer_ratings", |pool| async move {
                sqlx::query(
                    "SELECT offer_id, review_count, rating_sum, stars_1, stars_2, stars_3, stars_4, stars_5 \
                     FROM offer_ratings WHERE offer_id = ANY($1)",
                )
                .bind(offer_ids)
                .fetch_all(&pool)
                .await
            })
            .await?;
        let mut out: HashMap<String, RatingSummary> =
            offer_ids.iter().map(|id| (id.clone(), RatingSummary::default())).collect();
        for row in rows {
            let corrupt = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
            let mut summary = RatingSummary {
                count: row.try_get("review_count").map_err(corrupt)?,
                sum: row.try_get("rating_sum").map_err(corrupt)?,
                distribution: [0; 5],
            };
            for (i, column) in ["stars_1", "stars_2", "stars_3", "stars_4", "stars_5"].into_iter().enumerate() {
                summary.distribution[i] = row.try_get(column).map_err(corrupt)?;
            }
            out.insert(row.try_get("offer_id").map_err(corrupt)?, summary);
        }
        Ok(out)
    }

    /// Published review counts of these authors (0 for unknown authors).
    ///
    /// # Errors
    /// Postgres unavailable or failing.
    pub async fn author_review_counts(&self, author_ids: &[String]) -> Result<HashMap<String, i64>, StoreError> {
        let rows: Vec<(String, i64)> = self
            .read("author_review_counts", |pool| async move {
                sqlx::query_as("SELECT author_id, review_count FROM author_review_counts WHERE author_id = ANY($1)")
                    .bind(author_ids)
                    .fetch_all(&pool)
                    .await
            })
            .await?;
        let mut out: HashMap<String, i64> = author_ids.iter().map(|id| (id.clone(), 0)).collect();
        out.extend(rows);
        Ok(out)
    }

    /// Current version, visibility and last change of these reviews, for
    /// the stale-read detector.
    ///
    /// # Errors
    /// Postgres unavailable or failing.
    pub async fn review_versions(&self, ids: &[i64]) -> Result<Vec<RowVersion>, StoreError> {
        let rows: Vec<(i64, i64, bool, chrono::DateTime<chrono::Utc>)> = self
            .timed(
                "stale_check",
                sqlx::query_as(
                    "SELECT id, version, status = 'PUBLISHED' AND deleted_at IS NULL, updated_at \
                     FROM reviews WHERE id = ANY($1)",
                )
                .bind(ids)
                .fetch_all(&self.primary),
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, version, public, updated_at)| RowVersion { id, version, public, updated_at })
            .collect())
    }
}

/// What the stale-read detector compares a cached review with.
#[derive(Debug, Clone, Copy)]
pub struct RowVersion {
    pub id: i64,
    pub version: i64,
    pub public: bool,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}
