//! What an answer tells a cache in front of this service (Apollo Router's
//! response cache, a CDN): `Cache-Control`, and, with
//! `UGC_ROUTER_CACHE_TAGS=on`, the cache tags Apollo Router reads from the
//! response extensions (`apolloCacheTags` for root fields,
//! `apolloEntityCacheTags` per entity of `_entities`). Tags are the public
//! names of the same tags the cascade rule invalidates
//! (`events/cascade.rs`), so the forwarder's invalidations
//! (`events/router.rs`) reach exactly what they should.
//!
//! Public answers get `public, max-age` = how long the oldest value they
//! read stays fresh in this service's cache. Anything that depends on the
//! viewer is `private, no-store`; mutations and answers with errors are
//! `no-store`. Never `public` for what the viewer could change.

use std::time::{Duration, Instant};

use async_graphql::{Response, Value};
use axum::http::HeaderValue;

use crate::graphql::entity_cache::router_tags;
use crate::loaders::Deps;

pub const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
pub const PRIVATE: HeaderValue = HeaderValue::from_static("private, no-store");

/// `public, max-age=<whole seconds of freshness left>`.
pub fn public(fresh_for: Duration) -> HeaderValue {
    HeaderValue::from_str(&format!("public, max-age={}", fresh_for.as_secs())).unwrap_or(NO_STORE)
}

/// The `Cache-Control` of an executed query that read `deps`: `ok` when it
/// has no errors. A query that read nothing cached (a stub such as
/// `user(id) { id }`) is as fresh as the cache's TTL.
pub fn for_query(deps: &Deps, ok: bool, ttl: Duration) -> HeaderValue {
    if !ok {
        return NO_STORE;
    }
    if deps.private {
        return PRIVATE;
    }
    public(deps.fresh_until.map_or(ttl, |t| t.saturating_duration_since(Instant::now())))
}

/// Adds the router's cache tags to an executed query's response: the
/// union of what it read, for the root fields and for each entity (the
/// execution path cannot tell entities' reads apart; more tags than needed
/// only invalidate more, never less).
pub fn add_tags(response: &mut Response, deps: &Deps) {
    let tags: Value = serde_json::from_str::<serde_json::Value>(&router_tags(&deps.tags))
        .ok()
        .and_then(|v| Value::from_json(v).ok())
        .unwrap_or(Value::List(Vec::new()));
    let entities = match &response.data {
        Value::Object(data) => match data.get("_entities") {
            Some(Value::List(list)) => Some(list.len()),
            _ => None,
        },
        _ => None,
    };
    match entities {
        Some(n) => response.extensions.insert("apolloEntityCacheTags".to_owned(), Value::List(vec![tags; n])),
        None => response.extensions.insert("apolloCacheTags".to_owned(), tags),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Tag;

    #[test]
    fn public_private_and_failed_answers_get_their_header() {
        let ttl = Duration::from_secs(60);
        let fresh = Deps { fresh_until: Some(Instant::now() + Duration::from_secs(30)), ..Deps::default() };
        let max_age: u64 =
            for_query(&fresh, true, ttl).to_str().unwrap().strip_prefix("public, max-age=").unwrap().parse().unwrap();
        assert!((28..=30).contains(&max_age), "{max_age}");
        assert_eq!(for_query(&Deps::default(), true, ttl), "public, max-age=60");
        assert_eq!(for_query(&Deps { private: true, ..Deps::default() }, true, ttl), "private, no-store");
        assert_eq!(for_query(&fresh, false, ttl), "no-store");
        let stale = Deps { fresh_until: Some(Instant::now()), ..Deps::default() };
        assert_eq!(for_query(&stale, true, ttl), "public, max-age=0");
    }

    #[test]
    fn entities_get_one_tag_list_each_and_root_fields_one_list() {
        let deps = Deps {
            tags: vec![(Tag::Offer("o1".into()), 1), (Tag::Review(7), 2), (Tag::Offer("o1".into()), 3)],
            ..Deps::default()
        };
        let mut entities = Response::new(Value::from_json(serde_json::json!({"_entities": [{}, {}]})).unwrap());
        add_tags(&mut entities, &deps);
        assert_eq!(
            serde_json::to_value(&entities.extensions).unwrap(),
            serde_json::json!({"apolloEntityCacheTags": [["offer-o1", "review-7"], ["offer-o1", "review-7"]]})
        );
        let mut root = Response::new(Value::from_json(serde_json::json!({"offer": {}})).unwrap());
        add_tags(&mut root, &deps);
        assert_eq!(
            serde_json::to_value(&root.extensions).unwrap(),
            serde_json::json!({"apolloCacheTags": ["offer-o1", "review-7"]})
        );
    }
}
