//! Entity-change events: what changed, never what to do about caches. In
//! `domain` because the store writes them (outbox) and `events` reads them:
//! both sides depend on this, neither on the other.

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

/// Why reviews were removed in bulk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemovalCause {
    /// The user was anonymised or banned by the users subgraph.
    UserRemoved,
    /// The offer was removed by the offers subgraph.
    OfferRemoved,
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
    /// Many reviews removed at once by an event from another subgraph.
    ReviewsRemoved {
        cause: RemovalCause,
        /// The user or offer the event was about.
        subject: String,
        review_ids: Vec<i64>,
        offer_ids: Vec<String>,
        author_ids: Vec<String>,
    },
}
