//! Opaque keyset cursors.
//!
//! A cursor names the last row of a page by its sort key — (rating,
//! created_at, id) — plus the list it came from (which offer or author, which
//! order). The next page starts strictly after that key, so pages stay stable
//! while reviews are inserted concurrently (no OFFSET). A cursor from another
//! list, or one that does not parse, is refused as bad input; it never reaches
//! SQL.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};

use super::{InvalidInput, PageSize, Review, ReviewOrder};

const VERSION: &str = "c1";

/// Which list a cursor belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ListScope {
    Offer(String),
    Author(String),
}

/// The sort key of the last row of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub rating: i16,
    pub created_at_micros: i64,
    pub id: i64,
}

impl Position {
    pub fn of(review: &Review) -> Self {
        Self { rating: review.rating, created_at_micros: review.created_at.timestamp_micros(), id: review.id }
    }

    pub fn created_at(&self) -> DateTime<Utc> {
        // In range by construction: decode() refuses anything else.
        DateTime::from_timestamp_micros(self.created_at_micros).unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub scope: ListScope,
    pub order: ReviewOrder,
    pub position: Position,
}

impl Cursor {
    pub fn encode(&self) -> String {
        let (kind, id) = match &self.scope {
            ListScope::Offer(id) => ('o', id),
            ListScope::Author(id) => ('a', id),
        };
        let order = match self.order {
            ReviewOrder::Newest => 'n',
            ReviewOrder::Oldest => 'o',
            ReviewOrder::HighestRating => 'h',
            ReviewOrder::LowestRating => 'l',
        };
        let p = self.position;
        // The scope id goes last: it is the only field that may contain ':'.
        let raw = format!("{VERSION}:{kind}:{order}:{}:{}:{}:{id}", p.rating, p.created_at_micros, p.id);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Parses a cursor and checks it belongs to `expected` list in `order`.
    pub fn decode(raw: &str, expected: &ListScope, order: ReviewOrder) -> Result<Self, InvalidInput> {
        let cursor = Self::parse(raw).ok_or(InvalidInput::Cursor)?;
        if &cursor.scope != expected || cursor.order != order {
            return Err(InvalidInput::ForeignCursor);
        }
        Ok(cursor)
    }

    fn parse(raw: &str) -> Option<Self> {
        if raw.len() > 512 {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(raw).ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let mut parts = text.splitn(7, ':');
        if parts.next()? != VERSION {
            return None;
        }
        let kind = parts.next()?;
        let order = match parts.next()? {
            "n" => ReviewOrder::Newest,
            "o" => ReviewOrder::Oldest,
            "h" => ReviewOrder::HighestRating,
            "l" => ReviewOrder::LowestRating,
            _ => return None,
        };
        let rating: i16 = parts.next()?.parse().ok()?;
        let created_at_micros: i64 = parts.next()?.parse().ok()?;
        let id: i64 = parts.next()?.parse().ok()?;
        let scope_id = parts.next()?.to_owned();
        if !(1..=5).contains(&rating) || id <= 0 || DateTime::from_timestamp_micros(created_at_micros).is_none() {
            return None;
        }
        let scope = match kind {
            "o" => ListScope::Offer(scope_id),
            "a" => ListScope::Author(scope_id),
            _ => return None,
        };
        Some(Self { scope, order, position: Position { rating, created_at_micros, id } })
    }
}

/// One page of one list: what the loaders, the cache keys and the store
/// all name (here, so that none of them imports another for it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PageKey {
    pub scope: ListScope,
    pub order: ReviewOrder,
    pub size: PageSize,
    /// Start strictly after this position; `None` for the first page.
    pub after: Option<Position>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor(scope: ListScope) -> Cursor {
        Cursor {
            scope,
            order: ReviewOrder::HighestRating,
            position: Position { rating: 4, created_at_micros: 1_763_700_000_123_000, id: 77 },
        }
    }

    fn any_order() -> impl proptest::strategy::Strategy<Value = ReviewOrder> {
        proptest::sample::select(vec![
            ReviewOrder::Newest,
            ReviewOrder::Oldest,
            ReviewOrder::HighestRating,
            ReviewOrder::LowestRating,
        ])
    }

    proptest::proptest! {
        /// Whatever a client sends, decoding answers (never panics), and
        /// what it accepts is a cursor of the expected list.
        #[test]
        fn decoding_anything_never_panics(raw in ".{0,600}", order in any_order()) {
            let scope = ListScope::Offer("o".into());
            if let Ok(c) = Cursor::decode(&raw, &scope, order) {
                proptest::prop_assert_eq!(c.scope, scope);
                proptest::prop_assert_eq!(c.order, order);
            }
        }

        /// Base64 of arbitrary bytes (past the first gate) is refused cleanly too.
        #[test]
        fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = Cursor::decode(&URL_SAFE_NO_PAD.encode(&bytes), &ListScope::Author("a".into()), ReviewOrder::Newest);
        }

        #[test]
        fn every_cursor_round_trips(
            id in "[^\\x00]{1,64}", rating in 1i16..=5, micros in 0i64..4_102_444_800_000_000, row in 1i64..i64::MAX,
            order in any_order(), author in proptest::bool::ANY,
        ) {
            let scope = if author { ListScope::Author(id) } else { ListScope::Offer(id) };
            let c = Cursor { scope: scope.clone(), order, position: Position { rating, created_at_micros: micros, id: row } };
            proptest::prop_assert_eq!(Cursor::decode(&c.encode(), &scope, order), Ok(c));
        }
    }

    #[test]
    fn round_trips_even_with_colons_in_ids() {
        let scope = ListScope::Offer("weird:id:with:colons".into());
        let c = cursor(scope.clone());
        assert_eq!(Cursor::decode(&c.encode(), &scope, ReviewOrder::HighestRating), Ok(c));
    }

    #[test]
    fn refuses_foreign_and_malformed_cursors() {
        let c = cursor(ListScope::Offer("a".into())).encode();
        assert_eq!(
            Cursor::decode(&c, &ListScope::Offer("b".into()), ReviewOrder::HighestRating),
            Err(InvalidInput::ForeignCursor)
        );
        assert_eq!(
            Cursor::decode(&c, &ListScope::Author("a".into()), ReviewOrder::HighestRating),
            Err(InvalidInput::ForeignCursor)
        );
        assert_eq!(
            Cursor::decode(&c, &ListScope::Offer("a".into()), ReviewOrder::Newest),
            Err(InvalidInput::ForeignCursor)
        );
        let scope = ListScope::Offer("a".into());
        let forged = URL_SAFE_NO_PAD.encode("c1:o:h:9:0:1:a");
        for bad in ["", "!!!", "bm90IGEgY3Vyc29y", forged.as_str(), &"A".repeat(600)] {
            assert_eq!(Cursor::decode(bad, &scope, ReviewOrder::HighestRating), Err(InvalidInput::Cursor), "{bad}");
        }
    }
}
