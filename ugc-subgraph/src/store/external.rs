//! Changes other subgraphs announce (POST /events): a user removed
//! (anonymised or banned) or an offer removed. Their reviews are
//! soft-deleted in one transaction with the outbox event, exactly like a
//! mutation; aggregates follow through the trigger. Idempotent by the
//! sender's event key.

use super::{Store, StoreError};
use crate::domain::event::{Event, RemovalCause};

/// What became of one external event.
#[derive(Debug)]
pub enum ExternalOutcome {
    /// Applied now: the outbox event id and the event.
    Applied(i64, Event),
    /// The same key, kind and subject were applied before: nothing changes.
    Duplicate,
    /// The key was used before for another kind or subject: nothing changes.
    KeyReused,
}

impl Store {
    /// Applies one external event, once per key.
    ///
    /// # Errors
    /// Postgres unavailable or failing.
    pub async fn apply_external(
        &self,
        key: &str,
        cause: RemovalCause,
        subject: &str,
    ) -> Result<ExternalOutcome, StoreError> {
        let mut tx = self.timed("begin", self.primary.begin()).await?;
        let kind = match cause {
            RemovalCause::UserRemoved => "user_removed",
            RemovalCause::OfferRemoved => "offer_removed",
        };
        let fresh: Option<i32> = self
            .timed(
                "insert_external_event",
                sqlx::query_scalar(
                    "INSERT INTO external_events (event_key, kind, subject) VALUES ($1, $2, $3) \
                     ON CONFLICT DO NOTHING RETURNING 1",
                )
                .bind(key)
                .bind(kind)
                .bind(subject)
                .fetch_optional(&mut *tx),
            )
            .await?;
        if fresh.is_none() {
            let (seen_kind, seen_subject): (String, Option<String>) = self
                .timed(
                    "external_event_by_key",
                    sqlx::query_as("SELECT kind, subject FROM external_events WHERE event_key = $1")
                        .bind(key)
                        .fetch_one(&mut *tx),
                )
                .await?;
            let same = seen_kind == kind && seen_subject.as_deref().is_none_or(|s| s == subject);
            return Ok(if same { ExternalOutcome::Duplicate } else { ExternalOutcome::KeyReused });
        }
        let column = match cause {
            RemovalCause::UserRemoved => "author_id",
            RemovalCause::OfferRemoved => "offer_id",
        };
        let removed: Vec<(i64, String, String)> = self
            .timed(
                "remove_reviews",
                sqlx::query_as(&format!(
                    "UPDATE reviews SET deleted_at = now(), updated_at = date_trunc('milliseconds', now()), \
                         version = version + 1 \
                     WHERE {column} = $1 AND deleted_at IS NULL RETURNING id, offer_id, author_id"
                ))
                .bind(subject)
                .fetch_all(&mut *tx),
            )
            .await?;
        let mut offer_ids: Vec<String> = removed.iter().map(|r| r.1.clone()).collect();
        let mut author_ids: Vec<String> = removed.iter().map(|r| r.2.clone()).collect();
        offer_ids.sort_unstable();
        offer_ids.dedup();
        author_ids.sort_unstable();
        author_ids.dedup();
        // The subject's own lists are invalidated even when it had nothing
        // cached as removable (e.g. only pending reviews).
        match cause {
            RemovalCause::UserRemoved if !author_ids.iter().any(|a| a == subject) => {
                author_ids.push(subject.to_owned())
            }
            RemovalCause::OfferRemoved if !offer_ids.iter().any(|o| o == subject) => offer_ids.push(subject.to_owned()),
            _ => {}
        }
        let event = Event::ReviewsRemoved {
            cause,
            subject: subject.to_owned(),
            review_ids: removed.iter().map(|r| r.0).collect(),
            offer_ids,
            author_ids,
        };
        let id = self.append(&mut tx, &event).await?;
        self.timed("commit", tx.commit()).await?;
        Ok(ExternalOutcome::Applied(id, event))
    }
}
