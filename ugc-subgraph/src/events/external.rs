//! Events other subgraphs send to `POST /events`: parsing and validation
//! (all-or-nothing: one bad event rejects the batch), then each goes through
//! the store (same transaction + outbox as a mutation) and the relay.

use serde::Deserialize;

use super::{cascade, Events, RemovalCause};
use crate::domain::{EntityId, InvalidInput};
use crate::store::{ExternalOutcome, StoreError};

/// Most events in one request.
pub const MAX_BATCH: usize = 100;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    pub events: Vec<Incoming>,
}

/// One event as sent: an idempotency key and what happened.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Incoming {
    /// The user was anonymised or banned: their reviews disappear.
    UserRemoved {
        key: String,
        #[serde(rename = "userId")]
        user_id: String,
    },
    /// The offer was removed: its reviews and rating disappear.
    OfferRemoved {
        key: String,
        #[serde(rename = "offerId")]
        offer_id: String,
    },
}

/// A validated event.
pub struct External {
    key: String,
    cause: RemovalCause,
    subject: EntityId,
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("a batch holds 1 to {MAX_BATCH} events")]
    Size,
    #[error("event {index}: key must be 1 to 128 characters")]
    Key { index: usize },
    #[error("event {index}: {source}")]
    Invalid { index: usize, source: InvalidInput },
}

impl Batch {
    /// Validates every event before any is applied.
    ///
    /// # Errors
    /// The first invalid event.
    pub fn validate(self) -> Result<Vec<External>, BatchError> {
        if self.events.is_empty() || self.events.len() > MAX_BATCH {
            return Err(BatchError::Size);
        }
        self.events
            .into_iter()
            .enumerate()
            .map(|(index, event)| {
                let (key, cause, subject, field) = match event {
                    Incoming::UserRemoved { key, user_id } => (key, RemovalCause::UserRemoved, user_id, "userId"),
                    Incoming::OfferRemoved { key, offer_id } => (key, RemovalCause::OfferRemoved, offer_id, "offerId"),
                };
                if key.is_empty() || key.chars().count() > 128 {
                    return Err(BatchError::Key { index });
                }
                let subject = EntityId::new(&subject, field).map_err(|source| BatchError::Invalid { index, source })?;
                Ok(External { key, cause, subject })
            })
            .collect()
    }
}

/// Why a valid batch was not (wholly) applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("event {index}: key {key:?} was already used for another event (a different kind or subject)")]
    KeyReused { index: usize, key: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Outcome of a batch.
#[derive(Debug, Default, serde::Serialize)]
pub struct Applied {
    pub applied: usize,
    pub duplicates: usize,
    #[serde(rename = "reviewsRemoved")]
    pub reviews_removed: usize,
}

impl Events {
    /// Applies validated events in order; a redelivered key changes nothing.
    ///
    /// # Errors
    /// A key reused for another event, or Postgres unavailable or failing
    /// (events before the failure stay applied; redelivering the batch is safe).
    pub async fn apply_external(&self, events: Vec<External>) -> Result<Applied, ApplyError> {
        let mut out = Applied::default();
        for (index, e) in events.into_iter().enumerate() {
            match self.store().apply_external(&e.key, e.cause, e.subject.as_str()).await? {
                ExternalOutcome::Duplicate => {
                    out.duplicates += 1;
                    self.metrics().external_events.get_or_create(&[("outcome", "duplicate")]).inc();
                }
                ExternalOutcome::KeyReused => {
                    self.metrics().external_events.get_or_create(&[("outcome", "key_reused")]).inc();
                    return Err(ApplyError::KeyReused { index, key: e.key });
                }
                ExternalOutcome::Applied(id, event) => {
                    if let super::Event::ReviewsRemoved { review_ids, .. } = &event {
                        out.reviews_removed += review_ids.len();
                    }
                    self.after_commit(id, &cascade::tags(&event)).await;
                    out.applied += 1;
                    self.metrics().external_events.get_or_create(&[("outcome", "applied")]).inc();
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Any body: parsing and validation answer, never panic; whatever
        /// validates has a bounded batch of bounded keys and ids.
        #[test]
        fn any_events_body_is_answered(body in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            if let Ok(batch) = serde_json::from_slice::<Batch>(&body) {
                let _ = batch.validate();
            }
        }

        #[test]
        fn validated_events_respect_the_bounds(
            key in ".{0,140}", subject in ".{0,70}", offer in proptest::bool::ANY, n in 0usize..120,
        ) {
            let one = if offer {
                serde_json::json!({ "type": "offer_removed", "key": key, "offerId": subject })
            } else {
                serde_json::json!({ "type": "user_removed", "key": key, "userId": subject })
            };
            let body = serde_json::json!({ "events": vec![one; n] });
            let batch: Batch = serde_json::from_value(body).unwrap();
            match batch.validate() {
                Ok(events) => {
                    proptest::prop_assert!((1..=MAX_BATCH).contains(&events.len()));
                    for e in events {
                        proptest::prop_assert!((1..=128).contains(&e.key.chars().count()));
                        proptest::prop_assert!((1..=64).contains(&e.subject.as_str().chars().count()));
                    }
                }
                Err(_) => {
                    let bad_key = key.is_empty() || key.chars().count() > 128;
                    let bad_subject = subject.is_empty() || subject.chars().count() > 64 || subject.contains('\0');
                    proptest::prop_assert!(n == 0 || n > MAX_BATCH || bad_key || bad_subject);
                }
            }
        }
    }
}
