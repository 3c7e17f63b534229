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
//! The root fields `offer(id:)`, `user(id:)` and `review(id:)` are served
//! the same way when one of them is the query's only root field (alias
//! allowed): one fragment per (text, id, other variables' values), rendered
//! by executing the request as it is.
//!
//! `Offer` and `User` entities: nothing under them depends on who asks
//! (lists hold published reviews only). `Review` entities too, but a
//! rendering that looked past the public cache (the review is not public:
//! its author or a moderator would see it) is never kept, and its answer is
//! `private` (`loaders::Loaders::depends_on_viewer`). A query qualifies when
//! its only root field is an unaliased `_entities` whose `representations`
//! is one of the operation's variables, selecting inline fragments or named
//! fragments on those types (and `__typename`). Other variables (a gateway
//! passes `reviews(first: $n)` or `@include(if: $flag)` through) are part of
//! the fragment's key by their canonical values, defaults applied: the
//! rendering is then a function of the query text, those values and the
//! representation alone. Operation names and aliases below the root are
//! just part of the text.
//!
//! It never changes an answer: misses are rendered by normal execution
//! (their keys loaded first, all together, then one entity each from L1),
//! and anything unusual (other shapes) goes through normal
//! execution of the whole request. A render that fails (Postgres down) is
//! this request's answer for its entity, errors included: it is not run a
//! second time on the normal path.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_graphql::parser::types::{DocumentOperations, ExecutableDocument, OperationType, Selection};
use async_graphql::{Name, PathSegment, ServerError, Value as GqlValue, Variables};
use moka::sync::Cache as MokaSync;
use tokio::sync::watch;
use tracing::Instrument;

use super::raw_request::{RawRequest, RawVariables};
use super::{RequestAuth, UgcSchema};
use crate::cache::{Stamp, Tag};
use crate::events::cascade;
use crate::loaders::{discovering, failing, recording, ReadCache, Recorder};
use crate::telemetry::metrics::Metrics;

/// Qualifying query shapes remembered (by query text hash).
const SHAPES: u64 = 1_000;
/// Levels of nesting whose keys are loaded before rendering (offer → its
/// page → the page's reviews' authors …); deeper ones load while rendering.
const MAX_LEVELS: usize = 4;
/// Keys per load while preparing a rendering (the loader's batch size).
const LOAD_CHUNK: usize = 500;

#[derive(Clone, PartialEq, Eq, Hash)]
struct FragmentKey {
    /// The [`Known::serial`] of the query text: unique for the process's
    /// life, so fragments of two texts can never meet, not even when one
    /// text's shape was evicted and another with the same hash took its place.
    query: u64,
    /// The canonical JSON of the values of the operation's other variables,
    /// in definition order (empty when it has none).
    vars: Arc<str>,
    typename: &'static str,
    id: String,
}

/// A [`FragmentKey`] of borrowed parts, to look a fragment up without
/// building its key. Its fields are those of `FragmentKey`, in the same
/// order and hashed alike (`Arc<str>`, `String` and `&str` all hash as
/// `str`): the derived hashes are equal.
#[derive(Hash)]
struct KeyRef<'a> {
    query: u64,
    vars: &'a str,
    typename: &'static str,
    id: &'a str,
}

impl quick_cache::Equivalent<FragmentKey> for KeyRef<'_> {
    fn equivalent(&self, key: &FragmentKey) -> bool {
        self.query == key.query && self.typename == key.typename && self.id == key.id && self.vars == &*key.vars
    }
}

struct Fragment {
    json: Box<str>,
    /// The tokens its rendering read, as stamps (`Cache::stamps`).
    deps: Box<[Stamp]>,
    expires: Instant,
    /// The entity's cache tags for a router in front, as a JSON array.
    tags: Box<str>,
    /// The rendering depended on the viewer: this request's answer only.
    private: bool,
    /// [`Cache::invalidations`](crate::cache::Cache::invalidations) when
    /// `deps` were last all found current (`u64::MAX`: never): while it
    /// has not moved, they need no check.
    checked: AtomicU64,
}

/// An answer from rendered fragments: the body, and how long it stays
/// fresh (for `Cache-Control`).
pub struct Served {
    pub body: String,
    pub fresh_for: Duration,
    /// Some entity failed: the body carries errors, nothing may keep it.
    pub failed: bool,
    /// Some entity's rendering depended on the viewer.
    pub private: bool,
}

/// A request's every entity found current ([`EntityCache::hits`]).
pub struct Hits {
    parts: Vec<Arc<Fragment>>,
    /// Lookups per type, `[misses, hits]`.
    counts: [[u64; 2]; TYPES.len()],
    /// The root field's response key; `None`: `_entities`.
    field: Option<Name>,
}

/// What a qualifying query asks for, and the parsed document (parsed once
/// for all renders).
struct Shape {
    root: Root,
    /// The operation's other variables, with their defaults.
    extra: Extra,
    document: ExecutableDocument,
}

/// Variables (name, default) that key a fragment by their values.
type Extra = Vec<(Name, Option<GqlValue>)>;

/// The one root field of a qualifying query.
enum Root {
    /// `_entities(representations: $variable)`.
    Entities { variable: Name },
    /// `offer(id:)`, `user(id:)` or `review(id:)`, answered under `key`
    /// (its alias or name).
    Field { key: Name, typename: &'static str, id: IdArg },
}

/// The `id` argument of a root field: written in the text, or a variable.
enum IdArg {
    Literal(String),
    Variable(Name),
}

/// Root fields served from fragments, and the entity type each returns.
const ROOT_FIELDS: [(&str, &str); 3] = [("offer", "Offer"), ("user", "User"), ("review", "Review")];

/// What is known of one query text (with its operation name). The text is
/// kept and compared on every lookup: two texts whose 64-bit hashes collide
/// must never share a shape, nor therefore fragments (the later one simply
/// executes normally).
struct Known {
    serial: u64,
    query: Box<str>,
    operation: Option<Box<str>>,
    shape: Option<Shape>,
}

pub struct EntityCache {
    enabled: bool,
    router_tags: bool,
    shapes: MokaSync<u64, Arc<Known>, Hasher>,
    /// Hashes query texts for `shapes`.
    texts: Hasher,
    fragments: Fragments,
    /// Fragments being rendered now, by whichever request missed them
    /// first: a write to a hot offer makes every concurrent request miss
    /// its fragment at once, and they wait for one rendering instead of
    /// each running its own.
    rendering: Mutex<HashMap<FragmentKey, watch::Receiver<Option<Arc<Fragment>>>>>,
    cache: ReadCache,
    metrics: Arc<Metrics>,
}

/// Rendered fragments, bounded by bytes.
///
/// quick_cache, not moka: a fragment answer reads 20 or so entries and does
/// little else, and moka's per-read policy bookkeeping (each read logged,
/// then replayed into its LRU deques and frequency sketch) was 28 % of such
/// an answer's CPU (perf, 20-offer batches). quick_cache's read is a
/// shard's read lock and one bit set (CLOCK-Pro eviction). It has no time
/// to live: a fragment past `expires` is never served, and its bytes go
/// when eviction reaches them.
type Fragments = quick_cache::sync::Cache<FragmentKey, Arc<Fragment>, FragmentWeight, Hasher>;

/// What a fragment weighs against its budget (half of `UGC_L1_MAX_BYTES`).
#[derive(Clone)]
struct FragmentWeight;

impl quick_cache::Weighter<FragmentKey, Arc<Fragment>> for FragmentWeight {
    fn weight(&self, key: &FragmentKey, f: &Arc<Fragment>) -> u64 {
        (key.id.len() + key.vars.len() + f.json.len() + f.tags.len() + f.deps.len() * std::mem::size_of::<Stamp>() + 96)
            as u64
    }
}

/// foldhash, not SipHash: every request hashes its query text and 20 or so
/// fragment keys (SipHash was 5 % of an answer's CPU). Seeded per process;
/// texts are compared on every lookup, so a collision never mixes shapes.
type Hasher = foldhash::fast::RandomState;

impl EntityCache {
    /// `router_tags`: answers carry `apolloEntityCacheTags`.
    pub fn new(enabled: bool, router_tags: bool, max_bytes: u64, cache: ReadCache, metrics: Arc<Metrics>) -> Self {
        Self {
            enabled,
            router_tags,
            shapes: MokaSync::builder().max_capacity(SHAPES).build_with_hasher(Hasher::default()),
            texts: Hasher::default(),
            fragments: Fragments::with(
                usize::try_from(max_bytes / 4096).unwrap_or(usize::MAX).max(64),
                max_bytes,
                FragmentWeight,
                Hasher::default(),
                Default::default(),
            ),
            rendering: Mutex::default(),
            cache,
            metrics,
        }
    }

    /// The query's identity (text and operation name) and its shape.
    fn shape(&self, query: &str, operation: Option<&str>) -> Option<Arc<Known>> {
        let key = self.texts.hash_one(query) ^ operation.map_or(0, |o| self.texts.hash_one(o).rotate_left(1));
        self.known(key, query, operation)
    }

    /// The shape stored under `key`, only if it was stored for this very text.
    fn known(&self, key: u64, query: &str, operation: Option<&str>) -> Option<Arc<Known>> {
        let known = self.shapes.get_with(key, || {
            static SERIAL: AtomicU64 = AtomicU64::new(0);
            Arc::new(Known {
                serial: SERIAL.fetch_add(1, Ordering::Relaxed),
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
    ) -> Option<Served> {
        // Fragments are L1 too: not served while this instance may be
        // behind the invalidation stream.
        let now = Instant::now();
        if !self.enabled || !self.cache.gate().is_open(now) {
            return None;
        }
        let known = self.shape(&request.query, request.operation_name.as_deref())?;
        let shape = known.shape.as_ref()?;
        let variable = match &shape.root {
            Root::Entities { variable } => variable,
            Root::Field { key, typename, id } => {
                return self.execute_field(schema, request, &known, shape, auth, (key, typename, id)).await;
            }
        };
        let GqlValue::List(reps) = request.variables.get(variable)? else { return None };
        let vars: Arc<str> = if shape.extra.is_empty() {
            Arc::from("")
        } else {
            extra_values(shape, |name| Ok(request.variables.get(name).cloned()))?.into()
        };
        let mut keys = Vec::with_capacity(reps.len());
        for rep in reps {
            keys.push(representation(rep, known.serial, &vars)?);
        }

        let span = crate::child_span!(
            "entity_cache",
            entities = keys.len(),
            hits = tracing::field::Empty,
            misses = tracing::field::Empty,
        );
        let mut parts: Vec<Option<Arc<Fragment>>> = Vec::with_capacity(keys.len());
        let mut missing = Vec::new();
        // Counted once per type and outcome: a metric update per entity showed in the profile.
        let mut counts = [[0u64; 2]; TYPES.len()];
        for (i, key) in keys.iter().enumerate() {
            let hit = self.current(key, now);
            counts[type_index(key.typename)][usize::from(hit.is_some())] += 1;
            if hit.is_none() {
                missing.push(i);
            }
            parts.push(hit);
        }
        self.count(counts);

        // Renderings another request has under way: waited for, briefly.
        let waits = self.waits(&keys, &missing);
        self.take_rendered(&keys, &mut parts, &mut missing, waits).await;
        span.record("hits", keys.len() - missing.len());
        span.record("misses", missing.len());
        let mut claimed = Claim { cache: self, keys: Vec::new() };
        let theirs = claimed.claim(&keys, &missing);
        if !theirs.is_empty() {
            // Missed at the same moment as another request, which claimed
            // them first: waited for, not rendered twice (under writes every
            // request holding a just-invalidated hot offer misses it at
            // once). What it does not publish is rendered here.
            self.take_rendered(&keys, &mut parts, &mut missing, theirs).await;
            drop(claimed.claim(&keys, &missing));
        }
        if !missing.is_empty() {
            let reps: Vec<&GqlValue> = missing.iter().map(|&i| &reps[i]).collect();
            match self.render(schema, request, shape, variable, auth, &reps).instrument(span.clone()).await {
                Rendered::Fragments(fragments) => {
                    for (&i, fragment) in missing.iter().zip(fragments) {
                        // Fenced: a fragment whose reads were invalidated
                        // meanwhile (or that read values already past their
                        // freshness) is still this request's answer, but is
                        // not kept.
                        if fragment.private {
                            // Not shareable, and not a refused fill either.
                        } else if fragment.expires > Instant::now() && self.cache.stamps_current(&fragment.deps) {
                            self.fragments.insert(keys[i].clone(), Arc::clone(&fragment));
                            claimed.publish(&keys[i], &fragment);
                        } else {
                            self.metrics.fills_refused.get_or_create(&[("layer", "entity")]).inc();
                        }
                        parts[i] = Some(fragment);
                    }
                }
                // The failed rendering already is this request's answer for
                // the missing entities (partial data and errors): assembled,
                // not executed again on the normal path, which would repeat
                // every failing load (and, with Postgres down, its whole
                // time-out).
                Rendered::Failed(response) => {
                    let body = assemble(&parts, &missing, response)?;
                    return Some(Served { body, fresh_for: Duration::ZERO, failed: true, private: false });
                }
                Rendered::Unusual => return None,
            }
        }

        let parts: Vec<&Arc<Fragment>> = parts.iter().map(Option::as_ref).collect::<Option<_>>()?;
        Some(self.entities_body(&parts))
    }

    /// The current fragments of everything a request read straight from
    /// its body ([`RawRequest`]) asks for, when it qualifies and all of
    /// them are there (at most `max` entities): no `Request`, no key
    /// built, nothing rendered, nothing counted yet. `None` leaves it to
    /// [`EntityCache::execute`], which counts the lookups and renders the
    /// misses. Notes the representations' count in `variables` (for the
    /// cost).
    pub fn hits(&self, request: &RawRequest<'_>, variables: &RawVariables<'_>, max: usize) -> Option<Hits> {
        let now = Instant::now();
        if !self.enabled || !self.cache.gate().is_open(now) {
            return None;
        }
        let known = self.shape(&request.query, request.operation_name.as_deref())?;
        let shape = known.shape.as_ref()?;
        let vars = if shape.extra.is_empty() {
            String::new()
        } else {
            extra_values(shape, |name| variables.get(name).map(|raw| serde_json::from_str(raw.get())).transpose())?
        };
        let mut counts = [[0u64; 2]; TYPES.len()];
        let variable = match &shape.root {
            Root::Entities { variable } => variable,
            Root::Field { key, typename, id } => {
                let id = match id {
                    IdArg::Literal(id) => Cow::Borrowed(id.as_str()),
                    IdArg::Variable(name) => variables.string(name)?,
                };
                let fragment = self.current(&KeyRef { query: known.serial, vars: &vars, typename, id: &id }, now)?;
                counts[type_index(typename)][1] = 1;
                return Some(Hits { parts: vec![fragment], counts, field: Some(key.clone()) });
            }
        };
        let reps: Vec<RawRepresentation<'_>> = serde_json::from_str(variables.get(variable)?.get()).ok()?;
        if reps.len() > max {
            return None;
        }
        variables.note_list_len(variable, reps.len());
        let mut parts = Vec::with_capacity(reps.len());
        for rep in &reps {
            let typename = TYPES.into_iter().find(|known| *known == rep.typename)?;
            let key = KeyRef { query: known.serial, vars: &vars, typename, id: &rep.id };
            parts.push(self.current(&key, now)?);
            counts[type_index(typename)][1] += 1;
        }
        Some(Hits { parts, counts, field: None })
    }

    /// The answer of [`EntityCache::hits`], counted.
    pub fn serve(&self, hits: Hits) -> Served {
        self.count(hits.counts);
        match (&hits.field, &hits.parts[..]) {
            (Some(key), [fragment]) => self.field_body(key, fragment),
            _ => self.entities_body(&hits.parts.iter().collect::<Vec<_>>()),
        }
    }

    /// The fragment under `key`, if it is still fresh and current.
    fn current<Q>(&self, key: &Q, now: Instant) -> Option<Arc<Fragment>>
    where
        Q: std::hash::Hash + quick_cache::Equivalent<FragmentKey>,
    {
        self.fragments.get(key).filter(|f| f.expires > now && self.still_current(f))
    }

    /// Has none of `fragment`'s dependencies been invalidated since it was
    /// rendered? Checked tag by tag only when some invalidation was applied
    /// since they were last found current.
    fn still_current(&self, fragment: &Fragment) -> bool {
        let invalidations = self.cache.invalidations();
        if fragment.checked.load(Ordering::Relaxed) == invalidations {
            return true;
        }
        let current = self.cache.stamps_current(&fragment.deps);
        if current {
            fragment.checked.store(invalidations, Ordering::Relaxed);
        }
        current
    }

    /// Counts lookups `[misses, hits]` per entity type: once per type and
    /// outcome (a metric update per entity showed in the profile).
    fn count(&self, counts: [[u64; 2]; TYPES.len()]) {
        for (typename, [misses, hits]) in TYPES.into_iter().zip(counts) {
            for (n, result) in [(hits, "hit"), (misses, "miss")] {
                if n > 0 {
                    self.metrics.cache_n("entity", typename, result, n);
                }
            }
        }
    }

    /// `{"data":{"_entities":[…]}}` of `parts`, with the router's tags
    /// when answers carry them.
    fn entities_body(&self, parts: &[&Arc<Fragment>]) -> Served {
        let tags = |f: &Fragment| if self.router_tags { f.tags.len() + 1 } else { 0 };
        let size = 64 + parts.iter().map(|f| f.json.len() + 1 + tags(f)).sum::<usize>();
        let mut body = String::with_capacity(size);
        body.push_str(r#"{"data":{"_entities":["#);
        let mut expires = None::<Instant>;
        let mut private = false;
        for (n, part) in parts.iter().enumerate() {
            if n > 0 {
                body.push(',');
            }
            expires = Some(expires.map_or(part.expires, |e| e.min(part.expires)));
            private |= part.private;
            body.push_str(&part.json);
        }
        body.push_str("]}");
        if self.router_tags {
            body.push_str(r#","extensions":{"apolloEntityCacheTags":["#);
            for (n, part) in parts.iter().enumerate() {
                if n > 0 {
                    body.push(',');
                }
                body.push_str(&part.tags);
            }
            body.push_str("]}");
        }
        body.push('}');
        let fresh_for = expires.map_or(Duration::ZERO, |e| e.saturating_duration_since(Instant::now()));
        Served { body, fresh_for, failed: false, private }
    }

    /// The renderings another request has under way of the `missing` keys.
    fn waits(&self, keys: &[FragmentKey], missing: &[usize]) -> Vec<Wait> {
        let rendering = self.rendering.lock().unwrap_or_else(|e| e.into_inner());
        if rendering.is_empty() {
            return Vec::new();
        }
        missing.iter().filter_map(|&i| Some((i, rendering.get(&keys[i])?.clone()))).collect()
    }

    /// Takes, from the renderings `waits` of missing entities, the fragment
    /// each renders (if it is shareable and still current when it comes,
    /// within [`RENDER_WAIT`]); the others stay missing.
    async fn take_rendered(
        &self,
        keys: &[FragmentKey],
        parts: &mut [Option<Arc<Fragment>>],
        missing: &mut Vec<usize>,
        waits: Vec<Wait>,
    ) {
        if waits.is_empty() {
            return;
        }
        let rendered = futures::future::join_all(waits.into_iter().map(|(i, mut rendered)| async move {
            let _ = tokio::time::timeout(RENDER_WAIT, rendered.wait_for(Option::is_some)).await;
            let fragment = rendered.borrow().clone();
            (i, fragment)
        }))
        .await;
        let now = Instant::now();
        for (i, fragment) in rendered {
            if let Some(fragment) = fragment.filter(|f| f.expires > now && self.still_current(f)) {
                // Counted as a miss above, and as shared: served by another's rendering.
                self.metrics.cache("entity", keys[i].typename, "shared");
                parts[i] = Some(fragment);
            }
        }
        missing.retain(|&i| parts[i].is_none());
    }

    /// A root field (`offer(id:)`, `user(id:)`, `review(id:)`) from its
    /// fragment, or rendered by executing the request as it is, recording
    /// what it read; kept on the same terms as an entity's fragment.
    async fn execute_field(
        &self,
        schema: &UgcSchema,
        request: &async_graphql::Request,
        known: &Known,
        shape: &Shape,
        auth: &RequestAuth,
        (key, typename, id): (&Name, &'static str, &IdArg),
    ) -> Option<Served> {
        let id = match id {
            IdArg::Literal(id) => id.clone(),
            IdArg::Variable(name) => match request.variables.get(name) {
                Some(GqlValue::String(id)) => id.clone(),
                _ => return None,
            },
        };
        let vars: Arc<str> = if shape.extra.is_empty() {
            Arc::from("")
        } else {
            extra_values(shape, |name| Ok(request.variables.get(name).cloned()))?.into()
        };
        let fragment_key = FragmentKey { query: known.serial, vars, typename, id };
        let hit = self.current(&fragment_key, Instant::now());
        self.metrics.cache("entity", typename, if hit.is_some() { "hit" } else { "miss" });
        if let Some(fragment) = hit {
            return Some(self.field_body(key, &fragment));
        }

        let mut sub =
            async_graphql::Request::new(request.query.clone()).variables(request.variables.clone()).data(auth.clone());
        if let Some(name) = &request.operation_name {
            sub = sub.operation_name(name.clone());
        }
        sub.set_parsed_query(shape.document.clone());
        let recorder = Recorder::default();
        let response = recording(recorder.clone(), schema.execute(sub))
            .instrument(crate::child_span!("entity_cache", entities = 1))
            .await;
        let deps = recorder.take();
        if !response.errors.is_empty() {
            // A request error (no data) is cheap to reach again on the
            // normal path, which answers it as such; field errors are this
            // request's answer, not executed twice.
            if matches!(response.data, GqlValue::Null) {
                return None;
            }
            let body = serde_json::to_string(&response).ok()?;
            return Some(Served { body, fresh_for: Duration::ZERO, failed: true, private: false });
        }
        let GqlValue::Object(mut data) = response.data else { return None };
        let value = data.shift_remove(key)?;
        let rendered_at = Instant::now();
        let expires = deps.fresh_until.map_or(rendered_at, |t| t.min(rendered_at + self.cache.ttl()));
        let tags = if self.router_tags { router_tags(&deps.tags) } else { Box::from("") };
        let private = deps.private;
        let fragment = Arc::new(Fragment {
            json: serde_json::to_string(&value).ok()?.into(),
            deps: self.cache.stamps(&deps.distinct_tags()),
            expires,
            tags,
            private,
            checked: AtomicU64::new(u64::MAX),
        });
        if fragment.private {
            // This viewer's answer only.
        } else if fragment.expires > Instant::now() && self.cache.stamps_current(&fragment.deps) {
            self.fragments.insert(fragment_key, Arc::clone(&fragment));
        } else {
            self.metrics.fills_refused.get_or_create(&[("layer", "entity")]).inc();
        }
        Some(self.field_body(key, &fragment))
    }

    /// `{"data":{key:fragment}}`, with the router's tags when answers carry them.
    fn field_body(&self, key: &Name, fragment: &Fragment) -> Served {
        let mut body = String::with_capacity(fragment.json.len() + fragment.tags.len() + key.len() + 64);
        body.push_str(r#"{"data":{""#);
        // A GraphQL name: letters, digits and `_`, nothing to escape.
        body.push_str(key);
        body.push_str(r#"":"#);
        body.push_str(&fragment.json);
        body.push('}');
        if self.router_tags {
            body.push_str(r#","extensions":{"apolloCacheTags":"#);
            body.push_str(&fragment.tags);
            body.push('}');
        }
        body.push('}');
        let fresh_for = fragment.expires.saturating_duration_since(Instant::now());
        Served { body, fresh_for, failed: false, private: fragment.private }
    }

    /// Renders the missing entities, one fragment each with its own
    /// dependencies.
    ///
    /// First their keys are discovered and loaded, all entities together:
    /// an execution of all of them from L1 notes what it misses, one
    /// [`Cache::load`](crate::cache::Cache::load) fetches that (one statement
    /// per kind), and again for the next level of nesting (a review's
    /// author), until nothing is missing. Then each entity is rendered alone
    /// from L1, which is what makes its recorded dependencies its own
    /// (async-graphql resolves all representations of one execution under
    /// one path, so they cannot be told apart inside it). Rendering them one
    /// execution each from the start would split the loader's batches.
    async fn render(
        &self,
        schema: &UgcSchema,
        request: &async_graphql::Request,
        shape: &Shape,
        variable: &Name,
        auth: &RequestAuth,
        reps: &[&GqlValue],
    ) -> Rendered {
        let mut failure = None;
        for _ in 0..MAX_LEVELS {
            let all = sub_request(request, shape, variable, auth, reps.iter().map(|&r| r.clone()));
            let (_, keys) = discovering(schema.execute(all)).await;
            if keys.is_empty() {
                break;
            }
            let mut loaded = Ok(());
            for chunk in keys.chunks(LOAD_CHUNK) {
                loaded = self.cache.load(chunk).await.map(drop);
                if loaded.is_err() {
                    break;
                }
            }
            if let Err(error) = loaded {
                failure = Some(error);
                break;
            }
        }
        let renders = reps.iter().map(|&rep| {
            let sub = sub_request(request, shape, variable, auth, [rep.clone()]);
            let recorder = Recorder::default();
            let failure = failure.clone();
            async move {
                let render = recording(recorder.clone(), schema.execute(sub));
                let response = match failure {
                    Some(error) => failing(error, render).await,
                    None => render.await,
                };
                (response, recorder.take())
            }
        });
        let rendered = futures::future::join_all(renders).await;
        let rendered_at = Instant::now();
        let ttl = self.cache.ttl();
        let mut fragments = Vec::with_capacity(reps.len());
        let mut failed: Option<async_graphql::Response> = None;
        for (j, (response, deps)) in rendered.into_iter().enumerate() {
            let mut data = match response.data {
                GqlValue::Object(data) => data,
                _ => return Rendered::Unusual,
            };
            let Some(GqlValue::List(mut list)) = data.shift_remove("_entities") else { return Rendered::Unusual };
            let (Some(entity), true) = (list.pop(), list.is_empty()) else { return Rendered::Unusual };
            if !response.errors.is_empty() || failed.is_some() {
                // Gather every render into one response, errors moved to
                // their entity's place among the misses.
                let all = failed.get_or_insert_with(|| entities_response(fragments.iter().map(Fragment::value)));
                push_entity(all, entity, response.errors, j);
                continue;
            }
            let Ok(json) = serde_json::to_string(&entity) else { return Rendered::Unusual };
            // A fragment ages with its data: it is fresh until the oldest
            // value it read stops being fresh, and never past the TTL.
            let expires = deps.fresh_until.map_or(rendered_at, |t| t.min(rendered_at + ttl));
            // Only answers that carry them need the router's tag names.
            let tags = if self.router_tags { router_tags(&deps.tags) } else { Box::from("") };
            let private = deps.private;
            fragments.push(Arc::new(Fragment {
                json: json.into(),
                deps: self.cache.stamps(&deps.distinct_tags()),
                expires,
                tags,
                private,
                checked: AtomicU64::new(u64::MAX),
            }));
        }
        match failed {
            Some(response) => Rendered::Failed(response),
            None => Rendered::Fragments(fragments),
        }
    }
}

/// The public names of `deps`' tags, sorted and unique, as a JSON array.
pub fn router_tags(deps: &[(Tag, u64)]) -> Box<str> {
    let names: std::collections::BTreeSet<String> = deps.iter().map(|(tag, _)| cascade::public_name(tag)).collect();
    serde_json::to_string(&names).unwrap_or_else(|_| "[]".to_owned()).into()
}

/// How long a request waits for another's rendering of a fragment it
/// misses before rendering it itself.
const RENDER_WAIT: Duration = Duration::from_millis(250);

/// The fragments this request renders, announced in
/// [`EntityCache::rendering`]; withdrawn when it ends, however it ends
/// (waiters whose fragment was not published render it themselves).
struct Claim<'a> {
    cache: &'a EntityCache,
    keys: Vec<(FragmentKey, watch::Sender<Option<Arc<Fragment>>>)>,
}

/// A missing entity's place and the rendering of it another request announced.
type Wait = (usize, watch::Receiver<Option<Arc<Fragment>>>);

impl Claim<'_> {
    /// Announces the `missing` keys nobody is rendering yet; returns those
    /// another request announced first.
    fn claim(&mut self, keys: &[FragmentKey], missing: &[usize]) -> Vec<Wait> {
        use std::collections::hash_map::Entry;
        let mut rendering = self.cache.rendering.lock().unwrap_or_else(|e| e.into_inner());
        let mut theirs = Vec::new();
        for &i in missing {
            match rendering.entry(keys[i].clone()) {
                Entry::Vacant(slot) => {
                    let (tx, rx) = watch::channel(None);
                    slot.insert(rx);
                    self.keys.push((keys[i].clone(), tx));
                }
                Entry::Occupied(slot) => {
                    if !self.keys.iter().any(|(k, _)| k == &keys[i]) {
                        theirs.push((i, slot.get().clone()));
                    }
                }
            }
        }
        theirs
    }

    /// Hands a kept fragment to the requests waiting for it.
    fn publish(&self, key: &FragmentKey, fragment: &Arc<Fragment>) {
        if let Some((_, tx)) = self.keys.iter().find(|(k, _)| k == key) {
            tx.send_replace(Some(Arc::clone(fragment)));
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        let mut rendering = self.cache.rendering.lock().unwrap_or_else(|e| e.into_inner());
        for (key, tx) in self.keys.drain(..) {
            // Only our own announcement (a later request may have made its own).
            if rendering.get(&key).is_some_and(|rx| rx.same_channel(&tx.subscribe())) {
                rendering.remove(&key);
            }
        }
    }
}

/// What rendering the misses produced.
enum Rendered {
    /// One fragment per missing entity, in order.
    Fragments(Vec<Arc<Fragment>>),
    /// An `_entities` answer for the missing entities, in order, with errors.
    Failed(async_graphql::Response),
    /// Not the shape expected: execute the whole request normally.
    Unusual,
}

impl Fragment {
    fn value(self: &Arc<Self>) -> GqlValue {
        serde_json::from_str(&self.json).unwrap_or(GqlValue::Null)
    }
}

/// The request for some of `request`'s representations, with the same text,
/// operation and viewer.
fn sub_request(
    request: &async_graphql::Request,
    shape: &Shape,
    variable: &Name,
    auth: &RequestAuth,
    reps: impl IntoIterator<Item = GqlValue>,
) -> async_graphql::Request {
    let mut variables: async_graphql::indexmap::IndexMap<Name, GqlValue> =
        [(variable.clone(), GqlValue::List(reps.into_iter().collect()))].into_iter().collect();
    for (name, _) in &shape.extra {
        if let Some(value) = request.variables.get(name) {
            variables.insert(name.clone(), value.clone());
        }
    }
    let mut sub = async_graphql::Request::new(request.query.clone())
        .variables(Variables::from_value(GqlValue::Object(variables)))
        .data(auth.clone());
    if let Some(name) = &request.operation_name {
        sub = sub.operation_name(name.clone());
    }
    // Parsed once, when the shape was judged.
    sub.set_parsed_query(shape.document.clone());
    sub
}

/// An `_entities` response holding `entities`.
fn entities_response(entities: impl Iterator<Item = GqlValue>) -> async_graphql::Response {
    async_graphql::Response::new(GqlValue::Object(
        [(Name::new("_entities"), GqlValue::List(entities.collect()))].into_iter().collect(),
    ))
}

/// Appends `entity` (the `at`-th of its list) and its errors to `response`.
fn push_entity(response: &mut async_graphql::Response, entity: GqlValue, errors: Vec<ServerError>, at: usize) {
    if let GqlValue::Object(data) = &mut response.data {
        if let Some(GqlValue::List(list)) = data.get_mut("_entities") {
            list.push(entity);
        }
    }
    response.errors.extend(errors.into_iter().map(|e| moved(e, |_| at)));
}

/// `error` with its `_entities` index (if it has one) mapped by `to`.
fn moved(mut error: ServerError, to: impl Fn(usize) -> usize) -> ServerError {
    if let [PathSegment::Field(root), PathSegment::Index(index), ..] = error.path.as_mut_slice() {
        if root == "_entities" {
            *index = to(*index);
        }
    }
    error
}

/// The whole `_entities` answer when rendering failed: cached fragments as
/// they are, the failed rendering's entities (one per missing position, in
/// order) and its errors with their paths moved to the entity's place.
fn assemble(parts: &[Option<Arc<Fragment>>], missing: &[usize], failed: async_graphql::Response) -> Option<String> {
    let mut entities: Vec<GqlValue> =
        parts.iter().map(|p| p.as_ref().map_or(GqlValue::Null, Fragment::value)).collect();
    let mut data = match failed.data {
        GqlValue::Object(data) => data,
        _ => return None,
    };
    let Some(GqlValue::List(rendered)) = data.shift_remove("_entities") else { return None };
    if rendered.len() != missing.len() {
        return None;
    }
    for (&i, entity) in missing.iter().zip(rendered) {
        entities[i] = entity;
    }
    let mut response = entities_response(entities.into_iter());
    response.errors = failed.errors.into_iter().map(|e| moved(e, |j| missing.get(j).copied().unwrap_or(j))).collect();
    serde_json::to_string(&response).ok()
}

/// The entity types the cache renders.
const TYPES: [&str; 3] = ["Offer", "User", "Review"];

/// The place of one of [`TYPES`] in it.
fn type_index(typename: &str) -> usize {
    TYPES.iter().position(|t| *t == typename).unwrap_or(0)
}

/// `{ "__typename": "Offer" | "User" | "Review", "id": "…" }` and nothing else.
fn representation(rep: &GqlValue, query: u64, vars: &Arc<str>) -> Option<FragmentKey> {
    let GqlValue::Object(fields) = rep else { return None };
    if fields.len() != 2 {
        return None;
    }
    let GqlValue::String(t) = fields.get("__typename")? else { return None };
    let typename = TYPES.into_iter().find(|known| known == t)?;
    let GqlValue::String(id) = fields.get("id")? else { return None };
    Some(FragmentKey { query, vars: Arc::clone(vars), typename, id: id.clone() })
}

/// The canonical values of the shape's other variables: as `sent`, else
/// the default, else null (absent and null render alike), as one JSON
/// text. `None` when a value cannot be read or written (then the request
/// executes normally).
fn extra_values(shape: &Shape, sent: impl Fn(&str) -> Result<Option<GqlValue>, serde_json::Error>) -> Option<String> {
    let mut values = Vec::with_capacity(shape.extra.len());
    for (name, default) in &shape.extra {
        values.push(sent(name).ok()?.or_else(|| default.clone()).unwrap_or(GqlValue::Null));
    }
    serde_json::to_string(&values).ok()
}

/// A representation as the body carries it: `{ "__typename": …, "id": … }`
/// and nothing else, as [`representation`] requires.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRepresentation<'a> {
    #[serde(rename = "__typename", borrow)]
    typename: Cow<'a, str>,
    #[serde(borrow)]
    id: Cow<'a, str>,
}

/// Does the query qualify (see the module doc)? Returns its variable.
fn qualify(query: &str, operation: Option<&str>) -> Option<Shape> {
    let doc = async_graphql::parser::parse_query(query).ok()?;
    let op = match (&doc.operations, operation) {
        // An anonymous operation under a name: execution refuses it.
        (DocumentOperations::Single(_), Some(_)) => return None,
        (DocumentOperations::Single(op), None) => &op.node,
        (DocumentOperations::Multiple(ops), Some(name)) => &ops.get(name)?.node,
        // One named operation, sent without `operationName` (the parser
        // files every named operation under Multiple).
        (DocumentOperations::Multiple(ops), None) if ops.len() == 1 => &ops.values().next()?.node,
        (DocumentOperations::Multiple(_), None) => return None,
    };
    if op.ty != OperationType::Query || !op.directives.is_empty() {
        return None;
    }
    let [Selection::Field(root)] = op.selection_set.node.items.iter().map(|s| &s.node).collect::<Vec<_>>()[..] else {
        return None;
    };
    let root = &root.node;
    if let Some(&(_, typename)) = ROOT_FIELDS.iter().find(|(name, _)| root.name.node == *name) {
        let (root, extra) = qualify_field(root, typename, op)?;
        return Some(Shape { root, extra, document: doc });
    }
    if root.alias.is_some() || root.name.node != "_entities" || !root.directives.is_empty() || root.arguments.len() != 1
    {
        return None;
    }
    let (arg, value) = &root.arguments[0];
    let variable = match &value.node {
        async_graphql_value::Value::Variable(v) if arg.node == "representations" => v.clone(),
        _ => return None,
    };
    let mut extra = Vec::new();
    let mut defines_representations = false;
    for definition in &op.variable_definitions {
        let definition = &definition.node;
        if definition.name.node == variable {
            defines_representations = true;
        } else {
            let default = definition.default_value.as_ref().map(|d| d.node.clone());
            extra.push((definition.name.node.clone(), default));
        }
    }
    let on_known_type = |on: &Name| TYPES.contains(&on.as_str());
    let allowed = root.selection_set.node.items.iter().all(|s| match &s.node {
        Selection::InlineFragment(f) => {
            f.node.type_condition.as_ref().is_some_and(|t| on_known_type(&t.node.on.node))
                && f.node.directives.is_empty()
        }
        Selection::Field(f) => {
            f.node.name.node == "__typename" && f.node.alias.is_none() && f.node.directives.is_empty()
        }
        Selection::FragmentSpread(spread) => {
            spread.node.directives.is_empty()
                && doc
                    .fragments
                    .get(&spread.node.fragment_name.node)
                    .is_some_and(|f| on_known_type(&f.node.type_condition.node.on.node))
        }
    });
    (allowed && defines_representations).then(|| Shape { root: Root::Entities { variable }, extra, document: doc })
}

/// `offer(id: …)`, `user(id: …)` or `review(id: …)` as the only root field,
/// without directives, `id` a string or a variable; what it selects is
/// part of the text (its types' answers depend on the viewer only where
/// the loaders say so, and then nothing is kept).
fn qualify_field(
    root: &async_graphql::parser::types::Field,
    typename: &'static str,
    op: &async_graphql::parser::types::OperationDefinition,
) -> Option<(Root, Extra)> {
    if !root.directives.is_empty() || root.arguments.len() != 1 || root.arguments[0].0.node != "id" {
        return None;
    }
    let id = match &root.arguments[0].1.node {
        async_graphql_value::Value::String(id) => IdArg::Literal(id.clone()),
        async_graphql_value::Value::Variable(v) => IdArg::Variable(v.clone()),
        _ => return None,
    };
    let extra = op
        .variable_definitions
        .iter()
        .map(|d| &d.node)
        .filter(|d| !matches!(&id, IdArg::Variable(v) if *v == d.name.node))
        .map(|d| (d.name.node.clone(), d.default_value.as_ref().map(|v| v.node.clone())))
        .collect();
    let key = root.alias.as_ref().map_or_else(|| root.name.node.clone(), |a| a.node.clone());
    Some((Root::Field { key, typename, id }, extra))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_gateway_shaped_entity_queries_on_viewer_independent_types_qualify() {
        let ok = "query($representations: [_Any!]!) { _entities(representations: $representations) { __typename ... on Offer { id rating { count } } ... on User { reviewCount } } }";
        assert!(qualify(ok, None).is_some());
        for ok in [
            "query Offers__ugc__1($r: [_Any!]!, $n: Int = 5, $withText: Boolean!) { _entities(representations: $r) { ... on Offer { reviews(first: $n) { edges { node { id text @include(if: $withText) } } } } } }",
            "query($r: [_Any!]!) { _entities(representations: $r) { ...O ... on Review { id text } } } fragment O on Offer { id top: reviews(first: 1) { totalCount } }",
        ] {
            assert!(qualify(ok, None).is_some(), "{ok}");
        }
        let shape = qualify(
            "query($n: Int = 5, $r: [_Any!]!, $f: Boolean) { _entities(representations: $r) { ... on Offer { id } } }",
            None,
        )
        .unwrap();
        assert!(matches!(&shape.root, Root::Entities { variable } if variable.as_str() == "r"));
        let extra: Vec<(&str, Option<String>)> =
            shape.extra.iter().map(|(n, d)| (n.as_str(), d.as_ref().map(ToString::to_string))).collect();
        assert_eq!(extra, [("n", Some("5".to_owned())), ("f", None)]);
        for bad in [
            "query($r: [_Any!]!) { e: _entities(representations: $r) { ... on Offer { id } } }",
            "query($r: [_Any!]!) { _entities(representations: $r) { ... on Offer { id } } offer(id: \"x\") { id } }",
            "query($r: [_Any!]!) { _entities(representations: $r) { ...F } } fragment F on Query { __typename }",
            "query($r: [_Any!]!) { _entities(representations: $r) { ... on Offer @skip(if: true) { id } } }",
            "query($r: [_Any!]!) @cached { _entities(representations: $r) { ... on Offer { id } } }",
            "query { _entities(representations: [{ __typename: \"Offer\", id: \"x\" }]) { ... on Offer { id } } }",
            "mutation($r: [_Any!]!) { _entities(representations: $r) { ... on Offer { id } } }",
            "{ offer(id: \"x\") { id } user(id: \"u\") { id } }",
            "{ offer(id: \"x\") @skip(if: false) { id } }",
            "{ offer(id: 5) { id } }",
            "{ offers { id } }",
            "not graphql",
        ] {
            assert!(qualify(bad, None).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_lone_root_field_by_id_qualifies_with_its_key_and_other_variables() {
        let shape =
            qualify("query($id: ID!, $n: Int = 3) { o: offer(id: $id) { reviews(first: $n) { totalCount } } }", None)
                .unwrap();
        let Root::Field { key, typename, id: IdArg::Variable(id) } = &shape.root else { panic!("a root field") };
        assert_eq!((key.as_str(), *typename, id.as_str()), ("o", "Offer", "id"));
        assert_eq!(shape.extra.len(), 1, "the id is the key's own part, $n an extra");
        let shape = qualify("{ review(id: \"7\") { text } }", None).unwrap();
        assert!(matches!(&shape.root, Root::Field { typename: "Review", id: IdArg::Literal(id), .. } if id == "7"));
        assert!(qualify("mutation { review(id: \"7\") { text } }", None).is_none());
        assert!(qualify("{ review(id: \"7\") { text } }", Some("Named")).is_none(), "no such operation");
        assert!(qualify("query R { review(id: \"7\") { text } }", Some("R")).is_some());
        assert!(qualify("query R { review(id: \"7\") { text } }", Some("S")).is_none());
    }

    #[tokio::test]
    async fn texts_that_share_a_hash_never_share_a_shape() {
        let metrics = Arc::new(Metrics::new());
        let config = crate::config::Config::from_vars([("DATABASE_URL".into(), "postgres://x@h/d".into())]).unwrap();
        let store = crate::store::Store::connect(&config.database, Arc::clone(&metrics)).unwrap();
        {
            let loaders = crate::loaders::Loaders::build(&config, store, None, Arc::clone(&metrics));
            let cache = EntityCache::new(true, false, 1 << 20, loaders.cache.clone(), metrics);
            let a = "query($representations: [_Any!]!) { _entities(representations: $representations) { ... on Offer { id } } }";
            let b = "query($representations: [_Any!]!) { _entities(representations: $representations) { ... on User { id } } }";
            assert!(cache.known(42, a, None).is_some(), "a qualifies");
            assert!(cache.known(42, b, None).is_none(), "b collides with a's key: not a's shape");
            assert!(cache.known(42, a, Some("Op")).is_none(), "another operation name is another query");
            assert!(cache.known(43, b, None).is_some(), "b under its own key qualifies");
        }
    }

    #[test]
    fn a_borrowed_key_finds_what_its_owned_key_stored() {
        let owned = FragmentKey { query: 7, vars: Arc::from("[5]"), typename: "Offer", id: "offer-1".to_owned() };
        let borrowed = KeyRef { query: 7, vars: "[5]", typename: "Offer", id: "offer-1" };
        let hasher = Hasher::default();
        assert_eq!(hasher.hash_one(&owned), hasher.hash_one(&borrowed));
        let fragments: quick_cache::sync::Cache<FragmentKey, u8, quick_cache::UnitWeighter, Hasher> =
            quick_cache::sync::Cache::with(16, 16, quick_cache::UnitWeighter, Hasher::default(), Default::default());
        fragments.insert(owned, 1);
        assert_eq!(fragments.get(&borrowed), Some(1));
        for other in [
            KeyRef { query: 8, ..borrowed },
            KeyRef { vars: "[6]", ..borrowed },
            KeyRef { typename: "User", ..borrowed },
            KeyRef { id: "offer-2", ..borrowed },
        ] {
            assert_eq!(fragments.get(&other), None);
        }
    }

    #[test]
    fn representations_must_be_plain_keys() {
        let rep = |v: serde_json::Value| GqlValue::from_json(v).unwrap();
        let vars: Arc<str> = Arc::from("");
        let key = |v| representation(&rep(v), 1, &vars);
        assert!(key(serde_json::json!({"__typename": "Offer", "id": "o1"})).is_some());
        assert!(key(serde_json::json!({"__typename": "Review", "id": "1"})).is_some());
        assert!(key(serde_json::json!({"__typename": "Product", "id": "1"})).is_none());
        assert!(key(serde_json::json!({"__typename": "Offer", "id": "o1", "x": 1})).is_none());
        assert!(key(serde_json::json!({"__typename": "Offer", "id": 5})).is_none());
    }
}
