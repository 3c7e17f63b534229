//! Mutations: each one is a single transaction that locks the review row,
//! checks who may change it, changes it, and appends the entity-change event
//! to the outbox. Aggregates follow through the table trigger in the same
//! transaction, so a committed write is visible to the very next read.

use sqlx::{PgConnection, Postgres, Row, Transaction};

use super::idempotency::{IdempotencyKey, Outcome};
use super::{review_from_row, Store, StoreError, WriteError, REVIEW_COLUMNS};
use crate::domain::event::{Event, ReviewChange};
use crate::domain::{EntityId, Rating, Review, ReviewStatus, ReviewText, Viewer};

/// Name of the unique index that allows one live review per (offer, author).
const ONE_REVIEW_PER_AUTHOR: &str = "reviews_one_live_per_author";

/// A validated review to create.
#[derive(Debug, Clone)]
pub struct NewReview {
    pub offer_id: EntityId,
    pub author_id: EntityId,
    pub rating: Rating,
    pub text: ReviewText,
    pub status: ReviewStatus,
}

/// A validated change; at least one field is set.
#[derive(Debug, Clone, Default)]
pub struct ReviewPatch {
    pub rating: Option<Rating>,
    pub text: Option<ReviewText>,
}

/// A committed write: its result and the event it appended to the outbox.
#[derive(Debug)]
pub struct Committed<T> {
    pub value: T,
    /// `None` when nothing changed (e.g. deleting a deleted review).
    pub event: Option<(i64, Event)>,
}

/// What a locked row looks like before the change.
enum Locked {
    Missing,
    Deleted(Review),
    Live(Review),
}

impl Store {
    /// Creates a review; `Conflict` when the author already has a live
    /// review of this offer.
    ///
    /// # Errors
    /// `Conflict`, or the store failing.
    pub async fn create_review(
        &self,
        new: NewReview,
        key: Option<&IdempotencyKey>,
    ) -> Result<Committed<Review>, WriteError> {
        // Without an idempotency key the write is one statement, its own
        // transaction: no BEGIN and COMMIT round trips on the write's path.
        let Some(key) = key else {
            let (review, event) = self.insert_review(&self.primary, &new).await?;
            return Ok(Committed { value: review, event: Some(event) });
        };
        let mut tx = self.begin_keyed(Some(key)).await?;
        let (review, event) = self.insert_review(&mut *tx, &new).await?;
        self.record(&mut tx, Some(key), || Outcome::Review(review.clone())).await?;
        self.commit(tx).await?;
        Ok(Committed { value: review, event: Some(event) })
    }

    /// Inserts the review and appends its event to the outbox in one
    /// statement (the insert also wakes the relays, as [`Store::append`]
    /// does). The event's id and version come from the inserted row: the
    /// rest of its payload is serialised here, and the statement sets those
    /// two fields (`tests/it/mutations.rs` reads the payload back).
    async fn insert_review<'c>(
        &self,
        conn: impl sqlx::PgExecutor<'c>,
        new: &NewReview,
    ) -> Result<(Review, (i64, Event)), WriteError> {
        let event = |review_id, version| Event::ReviewChanged {
            review_id,
            offer_id: new.offer_id.as_str().to_owned(),
            author_id: new.author_id.as_str().to_owned(),
            change: ReviewChange::Created,
            version,
        };
        let payload = serde_json::to_value(event(0, 0)).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let sql = format!(
            "WITH r AS (
                 INSERT INTO reviews AS r (offer_id, author_id, rating, body, status) VALUES ($1, $2, $3, $4, $5)
                 RETURNING {REVIEW_COLUMNS}
             ), e AS (
                 INSERT INTO outbox (event)
                 SELECT $6::jsonb || jsonb_build_object('review_id', r.id, 'version', r.version) FROM r
                 RETURNING id
             )
             SELECT r.*, e.id AS event_id FROM r, e, pg_notify($7, '')"
        );
        let inserted = self
            .timed(
                "insert_review",
                sqlx::query(&sql)
                    .bind(new.offer_id.as_str())
                    .bind(new.author_id.as_str())
                    .bind(new.rating.get())
                    .bind(new.text.as_str())
                    .bind(new.status.as_str())
                    .bind(payload)
                    .bind(super::outbox::WAKE_CHANNEL)
                    .fetch_one(conn),
            )
            .await;
        let row = match inserted {
            Err(StoreError::Query { source: sqlx::Error::Database(e), .. })
                if e.constraint() == Some(ONE_REVIEW_PER_AUTHOR) =>
            {
                return Err(WriteError::Conflict);
            }
            other => other?,
        };
        let review = review_from_row(&row)?;
        let event_id: i64 = row.try_get("event_id").map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let event = event(review.id, review.version);
        Ok((review, (event_id, event)))
    }

    /// Changes rating and/or text; only the author or a moderator.
    ///
    /// # Errors
    /// `NotFound` (also for a review the viewer may not see), `Forbidden`,
    /// or the store failing.
    pub async fn update_review(
        &self,
        viewer: &Viewer,
        id: i64,
        patch: ReviewPatch,
        key: Option<&IdempotencyKey>,
    ) -> Result<Committed<Review>, WriteError> {
        let mut tx = self.begin_keyed(key).await?;
        let current = live_editable(viewer, self.lock(&mut tx, id).await?)?;
        let sql = format!(
            "UPDATE reviews r SET rating = COALESCE($2, rating), body = COALESCE($3, body), \
                 updated_at = date_trunc('milliseconds', now()), version = version + 1 \
             WHERE id = $1 RETURNING {REVIEW_COLUMNS}"
        );
        let row = self
            .timed(
                "update_review",
                sqlx::query(&sql)
                    .bind(current.id)
                    .bind(patch.rating.map(Rating::get))
                    .bind(patch.text.as_ref().map(ReviewText::as_str))
                    .fetch_one(&mut *tx),
            )
            .await?;
        let review = review_from_row(&row)?;
        let event = self.append_event(&mut tx, &review, ReviewChange::Updated).await?;
        self.record(&mut tx, key, || Outcome::Review(review.clone())).await?;
        self.commit(tx).await?;
        Ok(Committed { value: review, event: Some(event) })
    }

    /// Soft-deletes a review; `Ok(false)` when the viewer's review was
    /// already deleted.
    ///
    /// # Errors
    /// `NotFound`, `Forbidden`, or the store failing.
    pub async fn delete_review(
        &self,
        viewer: &Viewer,
        id: i64,
        key: Option<&IdempotencyKey>,
    ) -> Result<Committed<bool>, WriteError> {
        let mut tx = self.begin_keyed(key).await?;
        let current = match self.lock(&mut tx, id).await? {
            Locked::Deleted(review) if viewer.can_edit(&review) => return Ok(Committed { value: false, event: None }),
            locked => live_editable(viewer, locked)?,
        };
        let sql = format!(
            "UPDATE reviews r SET deleted_at = now(), updated_at = date_trunc('milliseconds', now()), \
                 version = version + 1 \
             WHERE id = $1 RETURNING {REVIEW_COLUMNS}"
        );
        let row = self.timed("delete_review", sqlx::query(&sql).bind(current.id).fetch_one(&mut *tx)).await?;
        let review = review_from_row(&row)?;
        let event = self.append_event(&mut tx, &review, ReviewChange::Deleted).await?;
        self.record(&mut tx, key, || Outcome::Deleted(true)).await?;
        self.commit(tx).await?;
        Ok(Committed { value: true, event: Some(event) })
    }

    /// Sets a review's status. The caller has checked the viewer is a
    /// moderator.
    ///
    /// # Errors
    /// `NotFound`, or the store failing.
    pub async fn moderate_review(
        &self,
        id: i64,
        status: ReviewStatus,
        key: Option<&IdempotencyKey>,
    ) -> Result<Committed<Review>, WriteError> {
        let mut tx = self.begin_keyed(key).await?;
        let Locked::Live(current) = self.lock(&mut tx, id).await? else {
            return Err(WriteError::NotFound);
        };
        let sql = format!(
            "UPDATE reviews r SET status = $2, updated_at = date_trunc('milliseconds', now()), \
                 version = version + 1 \
             WHERE id = $1 RETURNING {REVIEW_COLUMNS}"
        );
        let row = self
            .timed("moderate_review", sqlx::query(&sql).bind(current.id).bind(status.as_str()).fetch_one(&mut *tx))
            .await?;
        let review = review_from_row(&row)?;
        let event = self.append_event(&mut tx, &review, ReviewChange::Moderated).await?;
        self.record(&mut tx, key, || Outcome::Review(review.clone())).await?;
        self.commit(tx).await?;
        Ok(Committed { value: review, event: Some(event) })
    }

    async fn begin(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.timed("begin", self.primary.begin()).await
    }

    /// Begins a write, claiming its idempotency key first: `Replayed` when
    /// a write with that key committed (after waiting for one in flight).
    async fn begin_keyed(&self, key: Option<&IdempotencyKey>) -> Result<Transaction<'static, Postgres>, WriteError> {
        let mut tx = self.begin().await?;
        if let Some(key) = key {
            if !self.claim_key(&mut tx, key).await? {
                return Err(WriteError::Replayed);
            }
        }
        Ok(tx)
    }

    /// Stores the outcome of a keyed write before it commits.
    async fn record(
        &self,
        conn: &mut PgConnection,
        key: Option<&IdempotencyKey>,
        outcome: impl FnOnce() -> Outcome,
    ) -> Result<(), StoreError> {
        match key {
            Some(key) => self.record_outcome(conn, key, &outcome()).await,
            None => Ok(()),
        }
    }

    async fn commit(&self, tx: Transaction<'static, Postgres>) -> Result<(), StoreError> {
        self.timed("commit", tx.commit()).await
    }

    /// Locks the row for the rest of the transaction.
    async fn lock(&self, conn: &mut PgConnection, id: i64) -> Result<Locked, StoreError> {
        let sql = format!(
            "SELECT {REVIEW_COLUMNS}, r.deleted_at IS NOT NULL AS deleted FROM reviews r WHERE r.id = $1 FOR UPDATE"
        );
        let row = self.timed("lock_review", sqlx::query(&sql).bind(id).fetch_optional(conn)).await?;
        let Some(row) = row else {
            return Ok(Locked::Missing);
        };
        let deleted: bool = sqlx::Row::try_get(&row, "deleted").map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let review = review_from_row(&row)?;
        Ok(if deleted { Locked::Deleted(review) } else { Locked::Live(review) })
    }

    /// Appends the event for `review` to the outbox (same transaction).
    async fn append_event(
        &self,
        conn: &mut PgConnection,
        review: &Review,
        change: ReviewChange,
    ) -> Result<(i64, Event), StoreError> {
        let event = Event::ReviewChanged {
            review_id: review.id,
            offer_id: review.offer_id.clone(),
            author_id: review.author_id.clone(),
            change,
            version: review.version,
        };
        let id = self.append(conn, &event).await?;
        Ok((id, event))
    }
}

/// A live review the viewer may change. A review the viewer may not even see
/// is reported as not found, so its existence does not leak.
fn live_editable(viewer: &Viewer, locked: Locked) -> Result<Review, WriteError> {
    match locked {
        Locked::Missing | Locked::Deleted(_) => Err(WriteError::NotFound),
        Locked::Live(review) if !viewer.can_see(&review) => Err(WriteError::NotFound),
        Locked::Live(review) if !viewer.can_edit(&review) => Err(WriteError::Forbidden),
        Locked::Live(review) => Ok(review),
    }
}
