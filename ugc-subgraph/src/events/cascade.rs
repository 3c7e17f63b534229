//! The cascade rule: which cache tags an event invalidates. One table, no
//! I/O. Every cached entry depends on exactly one tag (see
//! `cache/key.rs`), so invalidating a tag invalidates all of its entries —
//! every page in every order and from every cursor, the aggregate, the count
//! — in O(1).

use super::Event;
use crate::cache::Tag;

/// | event | review | its offer (pages, rating) | its author (pages, count) |
/// | --- | --- | --- | --- |
/// | review created/updated/deleted/moderated | ✓ | ✓ | ✓ |
/// | reviews removed (user or offer removed) | each | each affected | each affected |
pub fn tags(event: &Event) -> Vec<Tag> {
    match event {
        Event::ReviewChanged { review_id, offer_id, author_id, .. } => {
            vec![Tag::Review(*review_id), Tag::Offer(offer_id.clone()), Tag::Author(author_id.clone())]
        }
        Event::ReviewsRemoved { review_ids, offer_ids, author_ids, .. } => review_ids
            .iter()
            .map(|id| Tag::Review(*id))
            .chain(offer_ids.iter().cloned().map(Tag::Offer))
            .chain(author_ids.iter().cloned().map(Tag::Author))
            .collect(),
    }
}

/// Tags as they travel in notifications: `r:<id>`, `o:<offer>`, `a:<author>`.
pub fn encode(tag: &Tag) -> String {
    match tag {
        Tag::Review(id) => format!("r:{id}"),
        Tag::Offer(id) => format!("o:{id}"),
        Tag::Author(id) => format!("a:{id}"),
    }
}

/// The name a cache in front (Apollo Router's response cache, a CDN) knows
/// a tag by: `review-<id>`, `offer-<id>`, `author-<id>`. Responses carry
/// these (`apolloCacheTags`, `apolloEntityCacheTags`) and the invalidation
/// forwarder sends the same names, so one rule decides both.
pub fn public_name(tag: &Tag) -> String {
    match tag {
        Tag::Review(id) => format!("review-{id}"),
        Tag::Offer(id) => format!("offer-{id}"),
        Tag::Author(id) => format!("author-{id}"),
    }
}

pub fn decode(raw: &str) -> Option<Tag> {
    let (kind, id) = raw.split_once(':')?;
    match kind {
        "r" => id.parse().ok().map(Tag::Review),
        "o" => Some(Tag::Offer(id.to_owned())),
        "a" => Some(Tag::Author(id.to_owned())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{RemovalCause, ReviewChange};

    #[test]
    fn a_review_change_invalidates_the_review_its_offer_and_its_author() {
        for change in [ReviewChange::Created, ReviewChange::Updated, ReviewChange::Deleted, ReviewChange::Moderated] {
            let event = Event::ReviewChanged {
                review_id: 7,
                offer_id: "offer-1".into(),
                author_id: "user-1".into(),
                change,
                version: 2,
            };
            assert_eq!(
                tags(&event),
                vec![Tag::Review(7), Tag::Offer("offer-1".into()), Tag::Author("user-1".into())],
                "{change:?}"
            );
        }
    }

    #[test]
    fn bulk_removals_invalidate_everything_they_touched() {
        let event = Event::ReviewsRemoved {
            cause: RemovalCause::UserRemoved,
            subject: "user-9".into(),
            review_ids: vec![1, 2],
            offer_ids: vec!["o1".into(), "o2".into()],
            author_ids: vec!["user-9".into()],
        };
        let t = tags(&event);
        assert_eq!(t.len(), 5);
        assert!(
            t.contains(&Tag::Review(2))
                && t.contains(&Tag::Offer("o2".into()))
                && t.contains(&Tag::Author("user-9".into()))
        );
    }

    #[test]
    fn tags_survive_the_wire_even_with_colons_in_ids() {
        for tag in [Tag::Review(42), Tag::Offer("a:b:c".into()), Tag::Author("ü".into())] {
            assert_eq!(decode(&encode(&tag)), Some(tag));
        }
        assert_eq!(decode("x:1"), None);
        assert_eq!(decode("r:abc"), None);
    }
}
