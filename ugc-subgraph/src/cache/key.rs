//! What is cached: keys, the tag each key depends on, and values.
//!
//! Every entry depends on exactly one [`Tag`]; invalidating the tag
//! invalidates every entry under it in O(1) (see `cache/generations.rs`).
//! Public entries only: everything a key names is visible to every caller
//! (published reviews, aggregates over published reviews).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::domain::cursor::PageKey;
use crate::domain::cursor::{ListScope, Position};
use crate::domain::{Page, RatingSummary, Review, ReviewOrder};

/// Bump when the encoding of any cached value changes: a deploy then never
/// decodes entries written by the previous version (keys differ).
/// Version 2: keys carry their tag's Redis Cluster hash tag.
pub const SCHEMA_VERSION: u32 = 2;

/// A cached thing. Hash/Eq make it the L1 key as is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CacheKey {
    /// A review by id, if published.
    Review(i64),
    /// The rating aggregate of an offer.
    Rating(String),
    /// The published review count of an author.
    AuthorCount(String),
    /// One page of an offer's or author's list.
    Page(PageKey),
}

/// The invalidation unit an entry depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tag {
    Review(i64),
    Offer(String),
    Author(String),
}

/// A [`Tag`] borrowed from a key: what the generation stripes hash, so
/// that an L1 read finds its tag's token without allocating the tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TagRef<'a> {
    Review(i64),
    Offer(&'a str),
    Author(&'a str),
}

impl Tag {
    pub fn as_ref(&self) -> TagRef<'_> {
        match self {
            Self::Review(id) => TagRef::Review(*id),
            Self::Offer(id) => TagRef::Offer(id),
            Self::Author(id) => TagRef::Author(id),
        }
    }
}

/// Kinds, for metrics labels and TTL choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Review,
    Rating,
    AuthorCount,
    OfferPage,
    AuthorPage,
}

impl Kind {
    /// Every kind, in declaration order (`kind as usize` indexes it).
    pub const ALL: [Self; 5] = [Self::Review, Self::Rating, Self::AuthorCount, Self::OfferPage, Self::AuthorPage];

    pub fn label(self) -> &'static str {
        match self {
            Self::Review => "review",
            Self::Rating => "rating",
            Self::AuthorCount => "author_count",
            Self::OfferPage => "offer_page",
            Self::AuthorPage => "author_page",
        }
    }
}

impl CacheKey {
    pub fn kind(&self) -> Kind {
        match self {
            Self::Review(_) => Kind::Review,
            Self::Rating(_) => Kind::Rating,
            Self::AuthorCount(_) => Kind::AuthorCount,
            Self::Page(PageKey { scope: ListScope::Offer(_), .. }) => Kind::OfferPage,
            Self::Page(PageKey { scope: ListScope::Author(_), .. }) => Kind::AuthorPage,
        }
    }

    pub fn tag(&self) -> Tag {
        match self.tag_ref() {
            TagRef::Review(id) => Tag::Review(id),
            TagRef::Offer(id) => Tag::Offer(id.to_owned()),
            TagRef::Author(id) => Tag::Author(id.to_owned()),
        }
    }

    pub fn tag_ref(&self) -> TagRef<'_> {
        match self {
            Self::Review(id) => TagRef::Review(*id),
            Self::Rating(offer) => TagRef::Offer(offer),
            Self::AuthorCount(author) => TagRef::Author(author),
            Self::Page(PageKey { scope: ListScope::Offer(id), .. }) => TagRef::Offer(id),
            Self::Page(PageKey { scope: ListScope::Author(id), .. }) => TagRef::Author(id),
        }
    }

    /// The Redis key of the entry: `{prefix}:v{SCHEMA_VERSION}:{kind}:{…}:{tag}`,
    /// ending in its tag's hash tag (`{o:ID}`) so that on a Redis Cluster
    /// the entry, its lease and its tag's token share a slot: the fenced
    /// fill reads the token and writes the entry in one script, which a
    /// cluster runs only on keys of one slot.
    /// Ids go last so that no id can forge another key's layout.
    pub fn redis_key(&self, prefix: &str) -> String {
        let v = SCHEMA_VERSION;
        let tag = self.tag().hash_tag();
        match self {
            Self::Review(_) => format!("{prefix}:v{v}:r:{tag}"),
            Self::Rating(_) => format!("{prefix}:v{v}:rt:{tag}"),
            Self::AuthorCount(_) => format!("{prefix}:v{v}:ac:{tag}"),
            Self::Page(k) => {
                let order = match k.order {
                    ReviewOrder::Newest => 'n',
                    ReviewOrder::Oldest => 'o',
                    ReviewOrder::HighestRating => 'h',
                    ReviewOrder::LowestRating => 'l',
                };
                let after = match k.after {
                    None => "-".to_owned(),
                    Some(Position { rating, created_at_micros, id }) => format!("{rating}.{created_at_micros}.{id}"),
                };
                let kind = match &k.scope {
                    ListScope::Offer(_) => "po",
                    ListScope::Author(_) => "pa",
                };
                format!("{prefix}:v{v}:{kind}:{order}:{}:{after}:{tag}", k.size.get())
            }
        }
    }
}

impl CacheKey {
    /// The Redis key of the entry's load lease. Its own namespace (`lease`
    /// is no kind of entry): an entry key with a suffix would let an offer
    /// named `X:lease` take offer `X`'s lease.
    pub fn lease_key(&self, prefix: &str) -> String {
        let entry = self.redis_key(prefix);
        format!("{prefix}:lease:{}", &entry[prefix.len() + 1..])
    }
}

impl Tag {
    /// The Redis key holding the tag's current invalidation token.
    pub fn redis_key(&self, prefix: &str) -> String {
        format!("{prefix}:g:{}", self.hash_tag())
    }

    /// `{o:ID}`: Redis Cluster hashes only what is inside the first braces
    /// of a key, so every key ending in this lands in one slot. (An id with
    /// a `}` cuts the hashed part short, identically in every key of the tag.)
    fn hash_tag(&self) -> String {
        match self {
            Self::Review(id) => format!("{{r:{id}}}"),
            Self::Offer(id) => format!("{{o:{id}}}"),
            Self::Author(id) => format!("{{a:{id}}}"),
        }
    }
}

/// A cached value. Reviews are cached only when published: a review in any
/// other state is cached as `Review(None)`, exactly what an anonymous reader
/// may see.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CachedValue {
    Review(Option<Arc<Review>>),
    Rating(RatingSummary),
    Count(i64),
    Page(Arc<Page>),
}

impl CachedValue {
    /// A negative result gets the shorter TTL.
    pub fn is_negative(&self) -> bool {
        match self {
            Self::Review(r) => r.is_none(),
            Self::Rating(s) => s.count == 0,
            Self::Count(n) => *n == 0,
            Self::Page(p) => p.reviews.is_empty(),
        }
    }

    /// Approximate heap footprint, for the L1 byte budget.
    pub fn weight(&self) -> u32 {
        fn review(r: &Review) -> usize {
            std::mem::size_of::<Review>() + r.offer_id.len() + r.author_id.len() + r.text.len()
        }
        let bytes = match self {
            Self::Review(r) => 64 + r.as_deref().map_or(0, review),
            Self::Rating(_) | Self::Count(_) => 96,
            Self::Page(p) => 96 + p.reviews.iter().map(|r| review(r) + 16).sum::<usize>(),
        };
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::PageSize;

    fn page_key(scope: ListScope, order: ReviewOrder, size: PageSize, after: Option<Position>) -> CacheKey {
        CacheKey::Page(PageKey { scope, order, size, after })
    }

    #[test]
    fn keys_are_versioned_namespaced_and_distinct() {
        let size = PageSize::new(5).unwrap();
        let keys = [
            CacheKey::Review(7),
            CacheKey::Rating("o:1".into()),
            CacheKey::AuthorCount("o:1".into()),
            page_key(ListScope::Offer("o:1".into()), ReviewOrder::Newest, size, None),
            page_key(ListScope::Author("o:1".into()), ReviewOrder::Newest, size, None),
            page_key(ListScope::Offer("o:1".into()), ReviewOrder::Oldest, size, None),
        ];
        let rendered: std::collections::HashSet<_> = keys.iter().map(|k| k.redis_key("t1")).collect();
        assert_eq!(rendered.len(), keys.len());
        assert!(rendered.iter().all(|k| k.starts_with(&format!("t1:v{SCHEMA_VERSION}:"))));
        assert_eq!(keys[1].tag(), keys[3].tag(), "an offer's rating and pages share its tag");
    }

    /// Every key is (kind, id) with the id last and the kind fixed: no id,
    /// however shaped, names another key, a lease or a tag.
    #[test]
    fn no_id_can_collide_with_another_key() {
        let size = PageSize::new(5).unwrap();
        let ids = [
            "X",
            "X:lease",
            "lease",
            "X:",
            ":X",
            "v1:rt:X",
            "g:o:X",
            "X\n",
            "",
            "rl:read:X",
            "po:n:5:-:X",
            "X}",
            "{X}",
            "}",
        ];
        let mut all = std::collections::HashSet::new();
        let mut count = 0;
        for id in ids {
            let keys = [
                CacheKey::Rating(id.into()),
                CacheKey::AuthorCount(id.into()),
                page_key(ListScope::Offer(id.into()), ReviewOrder::Newest, size, None),
                page_key(ListScope::Author(id.into()), ReviewOrder::Newest, size, None),
            ];
            for key in &keys {
                all.insert(key.redis_key("p"));
                all.insert(key.lease_key("p"));
                all.insert(key.tag().redis_key("p"));
                count += 3;
            }
        }
        // Tags are shared by an offer's rating and pages (and an author's
        // count and pages): 2 shared tags per id.
        assert_eq!(all.len(), count - 2 * ids.len());
        assert_ne!(CacheKey::Rating("X:lease".into()).redis_key("p"), CacheKey::Rating("X".into()).lease_key("p"));
        assert!(CacheKey::Review(7).lease_key("p").starts_with("p:lease:"));
    }

    /// On a Redis Cluster a fenced fill (entry + token) and a lease (lease +
    /// entry) are single-slot commands: every key of a tag hashes alike.
    #[test]
    fn an_entry_its_lease_and_its_token_share_a_cluster_slot() {
        use redis::cluster_routing::Slot;
        let size = PageSize::new(5).unwrap();
        for id in ["X", "X}Y", "{", "}", "", "o:1", "a{b}c"] {
            for key in [
                CacheKey::Rating(id.into()),
                CacheKey::AuthorCount(id.into()),
                page_key(ListScope::Offer(id.into()), ReviewOrder::Newest, size, None),
                page_key(ListScope::Author(id.into()), ReviewOrder::Oldest, size, None),
                CacheKey::Review(42),
            ] {
                let token = Slot::for_key(key.tag().redis_key("p:e3"));
                assert_eq!(Slot::for_key(key.redis_key("p:e3")), token, "{key:?}");
                assert_eq!(Slot::for_key(key.lease_key("p:e3")), token, "{key:?}");
            }
        }
        let offers: std::collections::HashSet<_> =
            (0..64).map(|i| Slot::for_key(Tag::Offer(format!("o{i}")).redis_key("p"))).collect();
        assert!(offers.len() > 32, "different tags spread over slots");
    }

    #[test]
    fn values_round_trip_through_the_codec() {
        let review = Review {
            id: 1,
            offer_id: "o".into(),
            author_id: "a".into(),
            rating: 5,
            text: "naïve ✓".into(),
            status: crate::domain::ReviewStatus::Published,
            created_at: chrono::DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            updated_at: chrono::DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            version: 3,
        };
        let value = CachedValue::Page(Arc::new(Page { reviews: vec![Arc::new(review)], has_next: true }));
        let bytes = postcard::to_stdvec(&value).unwrap();
        assert_eq!(postcard::from_bytes::<CachedValue>(&bytes).unwrap(), value);
        assert!(postcard::from_bytes::<CachedValue>(&bytes[..bytes.len() / 2]).is_err());
    }
}
