//! The review domain: entities, the validation rules of SPEC §3, and who may
//! do what. Pure code: no I/O, no SQL, no caching, no GraphQL execution.
//!
//! Everything a request controls passes through a constructor here
//! ([`Rating::new`], [`ReviewText::new`], [`EntityId::new`], [`PageSize::new`],
//! [`cursor::Cursor::decode`]) before it reaches the store, so the store only
//! ever sees valid values.

pub mod auth;
pub mod cursor;
pub mod event;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Longest id of an entity owned by another subgraph (Offer, User).
pub const MAX_ENTITY_ID_CHARS: usize = 64;
/// Longest review text, in characters, after trimming.
pub const MAX_TEXT_CHARS: usize = 5000;
/// Largest page a client may ask for.
pub const MAX_PAGE_SIZE: i32 = 100;

/// A rule a request broke. Each maps to `BAD_USER_INPUT` with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    #[error("rating must be between 1 and 5, got {0}")]
    Rating(i64),
    #[error("text must not be empty")]
    EmptyText,
    #[error("text must be at most {MAX_TEXT_CHARS} characters, got {0}")]
    TextTooLong(usize),
    #[error("text must not contain NUL characters")]
    NulInText,
    #[error("{field} must be 1 to {MAX_ENTITY_ID_CHARS} characters")]
    EntityId { field: &'static str },
    #[error("`first` must be between 0 and {MAX_PAGE_SIZE}, got {0}")]
    PageSize(i64),
    #[error("malformed review id")]
    ReviewId,
    #[error("malformed cursor")]
    Cursor,
    #[error("cursor does not belong to this list")]
    ForeignCursor,
    #[error("nothing to update: give a rating or a text")]
    EmptyUpdate,
}

/// Publication state of a review. Only `Published` reviews are listed,
/// counted and aggregated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, async_graphql::Enum)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReviewStatus {
    Published,
    Pending,
    Rejected,
}

impl ReviewStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Published => "PUBLISHED",
            Self::Pending => "PENDING",
            Self::Rejected => "REJECTED",
        }
    }

    /// Parses the database spelling; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "PUBLISHED" => Some(Self::Published),
            "PENDING" => Some(Self::Pending),
            "REJECTED" => Some(Self::Rejected),
            _ => None,
        }
    }
}

/// Sort order of an offer's review list. Ties always fall back to newest
/// first, so every order is a total order over (key, created_at, id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, async_graphql::Enum)]
pub enum ReviewOrder {
    #[default]
    Newest,
    Oldest,
    HighestRating,
    LowestRating,
}

/// A review as stored. `text` is the trimmed text the author wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Review {
    pub id: i64,
    pub offer_id: String,
    pub author_id: String,
    pub rating: i16,
    pub text: String,
    pub status: ReviewStatus,
    #[serde(with = "chrono::serde::ts_microseconds")]
    pub created_at: DateTime<Utc>,
    #[serde(with = "chrono::serde::ts_microseconds")]
    pub updated_at: DateTime<Utc>,
    /// Incremented by every change of the row.
    pub version: i64,
}

/// Aggregate over the published reviews of one offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RatingSummary {
    pub count: i64,
    pub sum: i64,
    /// How many reviews gave 1, 2, 3, 4 and 5 stars.
    pub distribution: [i64; 5],
}

impl RatingSummary {
    pub fn average(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum as f64 / self.count as f64)
    }
}

/// One page of a review list, plus whether more follow.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Page {
    pub reviews: Vec<Arc<Review>>,
    pub has_next: bool,
}

/// Who is asking: from a verified token, or nobody.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Viewer {
    #[default]
    Anonymous,
    User {
        id: String,
        moderator: bool,
    },
}

impl Viewer {
    pub fn user_id(&self) -> Option<&str> {
        match self {
            Self::Anonymous => None,
            Self::User { id, .. } => Some(id),
        }
    }

    pub fn is_moderator(&self) -> bool {
        matches!(self, Self::User { moderator: true, .. })
    }

    /// Published reviews are public; others only to their author and to
    /// moderators.
    pub fn can_see(&self, review: &Review) -> bool {
        review.status == ReviewStatus::Published || self.can_edit(review)
    }

    /// The author and moderators may change or delete a review.
    pub fn can_edit(&self, review: &Review) -> bool {
        self.is_moderator() || self.user_id() == Some(review.author_id.as_str())
    }
}

/// A star rating, 1 to 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rating(i16);

impl Rating {
    pub fn new(value: i64) -> Result<Self, InvalidInput> {
        match value {
            1..=5 => Ok(Self(value as i16)),
            _ => Err(InvalidInput::Rating(value)),
        }
    }

    pub fn get(self) -> i16 {
        self.0
    }
}

/// Review text: trimmed, 1 to 5000 characters, storable in Postgres.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewText(String);

impl ReviewText {
    pub fn new(raw: &str) -> Result<Self, InvalidInput> {
        let text = raw.trim();
        if text.is_empty() {
            return Err(InvalidInput::EmptyText);
        }
        // Postgres text cannot hold U+0000; refuse it here rather than let
        // the database fail the statement.
        if text.contains('\0') {
            return Err(InvalidInput::NulInText);
        }
        let chars = text.chars().count();
        if chars > MAX_TEXT_CHARS {
            return Err(InvalidInput::TextTooLong(chars));
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The id of an Offer or a User: opaque to us, 1 to 64 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EntityId(String);

impl EntityId {
    pub fn new(raw: &str, field: &'static str) -> Result<Self, InvalidInput> {
        let n = raw.chars().count();
        if n == 0 || n > MAX_ENTITY_ID_CHARS || raw.contains('\0') {
            return Err(InvalidInput::EntityId { field });
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// How many items a page holds, 0 to 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PageSize(u8);

impl PageSize {
    pub fn new(first: i64) -> Result<Self, InvalidInput> {
        if (0..=i64::from(MAX_PAGE_SIZE)).contains(&first) {
            Ok(Self(first as u8))
        } else {
            Err(InvalidInput::PageSize(first))
        }
    }

    pub fn get(self) -> usize {
        usize::from(self.0)
    }
}

/// Parses the API's review id (the decimal row id).
pub fn parse_review_id(raw: &str) -> Result<i64, InvalidInput> {
    // Canonical only: the decimal form the service issues. "0110", "+110"
    // or " 110" would otherwise name review 110 under another id (and
    // another cache key).
    let canonical =
        !raw.is_empty() && raw.len() <= 19 && raw.bytes().all(|b| b.is_ascii_digit()) && !raw.starts_with('0');
    match raw.parse::<i64>() {
        Ok(id) if canonical && id > 0 => Ok(id),
        _ => Err(InvalidInput::ReviewId),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// A review id is accepted only in the one form the service issues.
        #[test]
        fn review_ids_are_canonical(raw in ".{0,45}") {
            if let Ok(id) = parse_review_id(&raw) {
                proptest::prop_assert_eq!(id.to_string(), raw);
            }
        }

        #[test]
        fn every_issued_review_id_parses(id in 1i64..i64::MAX) {
            proptest::prop_assert_eq!(parse_review_id(&id.to_string()), Ok(id));
            let (zero, plus) = (format!("0{id}"), format!("+{id}"));
            proptest::prop_assert!(parse_review_id(&zero).is_err() && parse_review_id(&plus).is_err());
        }

        /// Entity ids: any string of 1 to 64 characters without NUL, kept as is.
        #[test]
        fn entity_ids_are_opaque_and_bounded(raw in "\\PC{0,70}") {
            let n = raw.chars().count();
            match EntityId::new(&raw, "id") {
                Ok(id) => proptest::prop_assert!(id.as_str() == raw && (1..=64).contains(&n)),
                Err(_) => proptest::prop_assert!(n == 0 || n > 64 || raw.contains('\0')),
            }
        }
    }

    #[test]
    fn rating_bounds() {
        assert_eq!(Rating::new(0), Err(InvalidInput::Rating(0)));
        assert_eq!(Rating::new(6), Err(InvalidInput::Rating(6)));
        assert_eq!(Rating::new(1).map(Rating::get), Ok(1));
        assert_eq!(Rating::new(5).map(Rating::get), Ok(5));
    }

    #[test]
    fn text_is_trimmed_and_counted_in_characters() {
        assert_eq!(ReviewText::new("  \n "), Err(InvalidInput::EmptyText));
        assert_eq!(ReviewText::new(" ok ").unwrap().as_str(), "ok");
        let max = "é".repeat(MAX_TEXT_CHARS);
        assert!(ReviewText::new(&max).is_ok(), "5000 two-byte chars are 5000 characters");
        assert_eq!(ReviewText::new(&format!("{max}x")), Err(InvalidInput::TextTooLong(5001)));
        assert_eq!(ReviewText::new("a\0b"), Err(InvalidInput::NulInText));
    }

    #[test]
    fn entity_ids_and_review_ids() {
        assert!(EntityId::new("", "offerId").is_err());
        assert!(EntityId::new(&"x".repeat(65), "offerId").is_err());
        assert!(EntityId::new(&"x".repeat(64), "offerId").is_ok());
        assert_eq!(parse_review_id("42"), Ok(42));
        for bad in ["0", "-1", "+1", "1.0", "abc", "", "99999999999999999999"] {
            assert_eq!(parse_review_id(bad), Err(InvalidInput::ReviewId), "{bad}");
        }
    }

    #[test]
    fn visibility_and_permissions() {
        let review = Review {
            id: 1,
            offer_id: "o".into(),
            author_id: "alice".into(),
            rating: 5,
            text: "t".into(),
            status: ReviewStatus::Pending,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            version: 1,
        };
        let alice = Viewer::User { id: "alice".into(), moderator: false };
        let bob = Viewer::User { id: "bob".into(), moderator: false };
        let moderator = Viewer::User { id: "mod".into(), moderator: true };
        assert!(alice.can_see(&review) && moderator.can_see(&review));
        assert!(!bob.can_see(&review) && !Viewer::Anonymous.can_see(&review));
        assert!(!bob.can_edit(&review));
        let published = Review { status: ReviewStatus::Published, ..review };
        assert!(Viewer::Anonymous.can_see(&published));
    }

    #[test]
    fn average_is_none_without_reviews() {
        assert_eq!(RatingSummary::default().average(), None);
        let s = RatingSummary { count: 2, sum: 9, distribution: [0, 0, 0, 1, 1] };
        assert_eq!(s.average(), Some(4.5));
    }
}
