//! Entity-change events: what changed, never what to do about it.
//!
//! A mutation writes its [`Event`] to the outbox in the same transaction as
//! the data change; consumers (cache invalidation) derive their own actions
//! from it. Events are serialised as JSON in the outbox; the format is
//! versioned by its `type` tag and must stay readable across one deploy.

use serde::{Deserialize, Serialize};

/// What happened to a review.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviewChange {
    Created,
    Updated,
    Deleted,
    Moderated,
}

/// One entity change, with the related ids a cascade needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    ReviewChanged {
        review_id: i64,
        offer_id: String,
        author_id: String,
        change: ReviewChange,
        /// The review row's version after the change.
        version: i64,
    },
}
