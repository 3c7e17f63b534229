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
pub mod router;
pub mod visibility;

pub use crate::domain::event::{Event, RemovalCause, ReviewChange};
pub use relay::Events;
