//! Entity-change events and what follows them: written to the outbox in the
//! mutation's transaction ([`crate::store`]), turned into cache
//! invalidations by one typed rule ([`cascade`]), applied once to the shared
//! L2 by a relay ([`relay`]) and to every instance's L1 through Postgres
//! `LISTEN/NOTIFY` ([`fanout`]).
//!
//! Why `LISTEN/NOTIFY` rather than Redis pub/sub: a notification sent in a
//! transaction is delivered exactly when it commits and never before, it
//! needs no second piece of infrastructure (the service runs without Redis),
//! and the outbox it rides on is already in Postgres. Lost delivery (a
//! dropped listener connection) is handled by dropping the instance's whole
//! L1 on reconnect; L2 invalidations are retried from the outbox until Redis
//! takes them.
//!
//! An [`Event`] says what changed, never what to do about caches.

pub mod cascade;
pub mod external;
pub mod fanout;
pub mod relay;
pub mod visibility;

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

pub use relay::Events;
