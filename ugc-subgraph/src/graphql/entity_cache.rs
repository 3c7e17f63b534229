//! The entity cache: rendered `_entities` results, one JSON fragment per
//! (query, entity), for the request the gateway sends most.
//!
//! Why: under read-heavy federated traffic the data is already in L1, and
//! what remains is GraphQL execution itself — a 20-offer `_entities` answer
//! resolves ~600 fields, each a future in async-graphql, on every request.
//! Caching the rendered entity skips that, as a router's entity cache does,
//! but stays coherent: a fragment records every cache tag its rendering read,
//! with the tag's token taken *before* the read, and is served only while all
//! of them are current. Any event that invalidates the data invalidates the
//! fragment (same stripes, same fan-out, same fencing).
//!
//! Only `Offer` and `User` entities: nothing under them depends on who asks
//! (lists hold published reviews only). `Review` entities do (a pending review
//! is visible to its author) and are never cached here. A query qualifies
//! when its only root field is an unaliased `_entities` whose
//! `representations` is the operation's only variable, selecting inline
//! fragments on `Offer`/`User` (and `__typename`): then the rendering is a
//! function of the query text and the representation alone.
//!
//! It never changes an answer: misses are rendered by normal execution, one
//! entity each, and anything unusual (other shapes) goes through normal
//! execution of the whole request. A render that fails (Postgres down) is
//! this request's answer for its entity, errors included: it is not run a
//! second time on the normal path.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_graphql::parser::types::{DocumentOperations, OperationType, Selection};
use async_graphql::{Name, PathSegment, Value as GqlValue, Variables};
use moka::sync::Cache as MokaSync;

use super::{RequestAuth, UgcSchema};
use crate::cache::Tag;
use crate::loaders::{recording, ReadCache, Recorder};
use crate::telemetry::metrics::Metrics;

/// Qualifying query shapes remembered (by query text hash).
const SHAPES: u64 = 1_000;

#[derive(Clone, PartialEq, Eq, Hash)]
struct FragmentKey {
    query: u64,
    typename: &'static str,
    id: String,
}

struct Fragment {
    json: Box<str>,
    deps: Vec<(Tag, u64)>,
    expires: Instant,
}

/// The variable that carries the representations, when the query qualifies.
#[derive(Clone)]
struct Shape {
    variable: Name,
}

/// What is known of one query text (with its operation name). The text is
/// kept and compared on every lookup: two texts whose 64-bit hashes collide
/// must never share a shape, nor therefore fragments (the later one simply
/// executes normally).
struct Known {
    query: Box<str>,
    operation: Option<Box<str>>,
    shape: Option<Shape>,
}

pub struct EntityCache {
    enabled: bool,
    shapes: MokaSync<u64, Arc<Known>>,
    fragments: MokaSync<FragmentKey, Arc<Fragment>>,
    cache: ReadCache,
    metrics: Arc<Metrics>,
}

fn hash(s: &str) -> u64 {
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

impl EntityCache {
    pub fn new(enabled: bool, max_bytes: u64, cache: ReadCache, metrics: Arc<Metrics>) -> Self {
        Self {
            enabled,
            shapes: MokaSync::new(SHAPES),
            fragments: MokaSync::builder()
                .max_capacity(max_bytes)
                .weigher(|k: &FragmentKey, f: &Arc<Fragment>| {
                    u32::try_from(k.id.len() + f.json.len() + f.deps.len() * 48 + 96).unwrap_or(u32::MAX)
                })
                .time_to_live(Duration::from_secs(3600))
                .build(),
            cache,
            metrics,
        }
    }

    /// The query's identity (text and operation name) and its shape.
    fn shape(&self, query: &str, operation: Option<&str>) -> (u64, Option<Arc<Known>>) {
        let key = hash(query) ^ operation.map_or(0, |o| hash(o).rotate_left(1));
        (key, self.known(key, query, operation))
    }

    /// The shape stored under `key`, only if it was stored for this very text.
    fn known(&self, key: u64, query: &str, operation: Option<&str>) -> Option<Arc<Known>> {
        let known = self.shapes.get_with(key, || {
            Arc::new(Known {
                query: query.into(),
                operation: operation.map(Into::into),
                shape: qualify(query, operation),
            })
        });
        let same = &*known.query == query && known.operation.as_deref() == operation;
        (same && known.shape.is_some()).then_some(known)
    }

    /// The complete JSON body of `request`, when it qualifies and can be
    /// answered from (or into) the entity cache; `None` means "execute it
    /// normally".
    pub async fn execute(
        &self,
        schema: &UgcSchema,
        request: &async_graphql::Request,
        auth: &RequestAuth,
    ) -> Option<String> {
        if !self.enabled {
            return None;
        }
        let (query_key, known) = self.shape(&request.query, request.operation_name.as_deref());
        let known = known?;
        let shape = known.shape.as_ref()?;
        let GqlValue::List(reps) = request.variables.get(&shape.variable)? else { return None };
        let mut keys = Vec::with_capacity(reps.len());
        for rep in reps {
            keys.push(representation(rep, query_key)?);
        }

        let now = Instant::now();
        let mut parts: Vec<Option<Arc<Fragment>>> = Vec::with_capacity(keys.len());
        let mut missing = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let hit = self.fragments.get(key).filter(|f| f.expires > now && self.cache.tokens_current(&f.deps));
            self.metrics.cache("entity", key.typename, if hit.is_some() { "hit" } else { "miss" });
            if hit.is_none() {
                missing.push(i);
            }
            parts.push(hit);
        }

        // Render the misses, one execution each, concurrently: the shared
        // DataLoader still batches their reads into one statement per kind.
        let renders = missing.iter().map(|&i| {
            let rep = reps[i].clone();
            let sub = async_graphql::Request::new(request.query.clone())
                .variables(Variables::from_value(GqlValue::Object(
                    [(shape.variable.clone(), GqlValue::List(vec![rep]))].into_iter().collect(),
                )))
                .data(auth.clone());
            let sub = match &request.operation_name {
                Some(name) => sub.operation_name(name.clone()),
                None => sub,
            };
            let recorder = Recorder::default();
            async move {
                let response = recording(recorder.clone(), schema.execute(sub)).await;
                (response, recorder.take())
            }
        });
        let rendered = futures::future::join_all(renders).await;
        let ttl = self.cache.ttl();
        let mut failed = Vec::new();
        for (&i, (response, deps)) in missing.iter().zip(rendered) {
            if !response.errors.is_empty() {
                failed.push((i, response));
                continue;
            }
            let entity = match response.data {
                GqlValue::Object(mut data) => match data.shift_remove("_entities") {
                    Some(GqlValue::List(mut list)) if list.len() == 1 => list.pop()?,
                    _ => return None,
                },
                _ => return None,
            };
            let fragment = Arc::new(Fragment {
                json: serde_json::to_string(&entity).ok()?.into(),
                deps,
                expires: Instant::now() + ttl,
            });
            // Fenced: a fragment whose reads were invalidated meanwhile is
            // still this request's answer, but is not kept.
            if self.cache.tokens_current(&fragment.deps) {
                self.fragments.insert(keys[i].clone(), Arc::clone(&fragment));
            } else {
                self.metrics.fills_refused.get_or_create(&[("layer", "entity")]).inc();
            }
            parts[i] = Some(fragment);
        }
        if !failed.is_empty() {
            // The failed renders already are this request's answer for their
            // entities (partial data and errors): assembled, not executed
            // again on the normal path, which would repeat every failing
            // load (and, with Postgres down, its whole time-out).
            return assemble(&parts, failed);
        }

        let mut body = String::with_capacity(32 + parts.iter().flatten().map(|f| f.json.len() + 1).sum::<usize>());
        body.push_str(r#"{"data":{"_entities":["#);
        for (n, part) in parts.iter().enumerate() {
            if n > 0 {
                body.push(',');
            }
            body.push_str(&part.as_ref()?.json);
        }
        body.push_str("]}}");
        Some(body)
    }
}

/// The whole `_entities` answer when some renders failed: cached and fresh
/// fragments as they are, each failed render's entity and errors with their
/// paths moved to the entity's place in the list.
fn assemble(parts: &[Option<Arc<Fragment>>], failed: Vec<(usize, async_graphql::Response)>) -> Option<String> {
    let mut entities: Vec<GqlValue> = Vec::with_capacity(parts.len());
    for part in parts {
        entities.push(match part {
            Some(fragment) => serde_json::from_str(&fragment.json).ok()?,
            None => GqlValue::Null,
        });
    }
    let mut errors = Vec::new();
    for (i, response) in failed {
        if let GqlValue::Object(mut data) = response.data {
            if let Some(GqlValue::List(mut list)) = data.shift_remove("_entities") {
                entities[i] = list.pop().unwrap_or(GqlValue::Null);
            }
        }
        for mut error in response.errors {
            if let [PathSegment::Field(root), PathSegment::Index(index), ..] = error.path.as_mut_slice() {
                if root == "_entities" {
                    *index = i;
                }
            }
            errors.push(error);
        }
    }
    let data = GqlValue::Object([(Name::new("_entities"), GqlValue::List(entities))].into_iter().collect());
    let mut response = async_graphql::Response::new(data);
    response.errors = errors;
    serde_json::to_string(&response).ok()
}

/// `{ "__typename": "Offer" | "User", "id": "…" }` and nothing else.
fn representation(rep: &GqlValue, query: u64) -> Option<FragmentKey> {
    let GqlValue::Object(fields) = rep else { return None };
    if fields.len() != 2 {
        return None;
    }
    let typename = match fields.get("__typename")? {
        GqlValue::String(t) if t == "Offer" => "Offer",
        GqlValue::String(t) if t == "User" => "User",
        _ => return None,
    };
    let GqlValue::String(id) = fields.get("id")? else { return None };
    Some(FragmentKey { query, typename, id: id.clone() })
}

/// Does the query qualify (see the module doc)? Returns its variable.
fn qualify(query: &str, operation: Option<&str>) -> Option<Shape> {
    let doc = async_graphql::parser::parse_query(query).ok()?;
    let op = match (&doc.operations, operation) {
        (DocumentOperations::Single(op), _) => &op.node,
        (DocumentOperations::Multiple(ops), Some(name)) => &ops.get(name)?.node,
        (DocumentOperations::Multiple(_), None) => return None,
    };
    if op.ty != OperationType::Query || op.variable_definitions.len() != 1 || !op.directives.is_empty() {
        return None;
    }
    let variable = op.variable_definitions[0].node.name.node.clone();
    let [Selection::Field(root)] = op.selection_set.node.items.iter().map(|s| &s.node).collect::<Vec<_>>()[..] else {
        return None;
    };
    let root = &root.node;
    if root.alias.is_some() || root.name.node != "_entities" || !root.directives.is_empty() || root.arguments.len() != 1
    {
        return None;
    }
    let (arg, value) = &root.arguments[0];
    match &value.node {
        async_graphql_value::Value::Variable(v) if arg.node == "representations" && *v == variable => {}
        _ => return None,
    }
    let allowed = root.selection_set.node.items.iter().all(|s| match &s.node {
        Selection::InlineFragment(f) => {
            f.node.type_condition.as_ref().is_some_and(|t| t.node.on.node == "Offer" || t.node.on.node == "User")
        }
        Selection::Field(f) => f.node.name.node == "__typename" && f.node.alias.is_none(),
        Selection::FragmentSpread(_) => false,
    });
    allowed.then_some(Shape { variable })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_gateway_shaped_entity_queries_on_viewer_independent_types_qualify() {
        let ok = "query($representations: [_Any!]!) { _entities(representations: $representations) { __typename ... on Offer { id rating { count } } ... on User { reviewCount } } }";
        assert!(qualify(ok, None).is_some());
        for bad in [
            "query($r: [_Any!]!) { _entities(representations: $r) { ... on Review { id text } } }",
            "query($r: [_Any!]!, $n: Int) { _entities(representations: $r) { ... on Offer { reviews(first: $n) { totalCount } } } }",
            "query($r: [_Any!]!) { e: _entities(representations: $r) { ... on Offer { id } } }",
            "query($r: [_Any!]!) { _entities(representations: $r) { ... on Offer { id } } offer(id: \"x\") { id } }",
            "query($r: [_Any!]!) { _entities(representations: $r) { ...F } } fragment F on Offer { id }",
            "mutation($r: [_Any!]!) { _entities(representations: $r) { ... on Offer { id } } }",
            "{ offer(id: \"x\") { id } }",
            "not graphql",
        ] {
            assert!(qualify(bad, None).is_none(), "{bad}");
        }
    }

    #[tokio::test]
    async fn texts_that_share_a_hash_never_share_a_shape() {
        let metrics = Arc::new(Metrics::new());
        let config = crate::config::Config::from_vars([("DATABASE_URL".into(), "postgres://x@h/d".into())]).unwrap();
        let store = crate::store::Store::connect(&config.database, Arc::clone(&metrics)).unwrap();
        {
            let loaders = crate::loaders::Loaders::build(&config, store, None, Arc::clone(&metrics));
            let cache = EntityCache::new(true, 1 << 20, loaders.cache.clone(), metrics);
            let a = "query($representations: [_Any!]!) { _entities(representations: $representations) { ... on Offer { id } } }";
            let b = "query($representations: [_Any!]!) { _entities(representations: $representations) { ... on User { id } } }";
            assert!(cache.known(42, a, None).is_some(), "a qualifies");
            assert!(cache.known(42, b, None).is_none(), "b collides with a's key: not a's shape");
            assert!(cache.known(42, a, Some("Op")).is_none(), "another operation name is another query");
            assert!(cache.known(43, b, None).is_some(), "b under its own key qualifies");
        }
    }

    #[test]
    fn representations_must_be_plain_keys() {
        let rep = |v: serde_json::Value| GqlValue::from_json(v).unwrap();
        assert!(representation(&rep(serde_json::json!({"__typename": "Offer", "id": "o1"})), 1).is_some());
        assert!(representation(&rep(serde_json::json!({"__typename": "Review", "id": "1"})), 1).is_none());
        assert!(representation(&rep(serde_json::json!({"__typename": "Offer", "id": "o1", "x": 1})), 1).is_none());
        assert!(representation(&rep(serde_json::json!({"__typename": "Offer", "id": 5})), 1).is_none());
    }
}
