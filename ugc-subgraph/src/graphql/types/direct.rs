//! Review lists and rating aggregates resolved directly: a page (or an
//! aggregate) already loaded becomes its GraphQL value in one walk over the
//! selection, without a future per field.
//!
//! Why: async-graphql resolves every field of every object (and every item
//! of a list) as a boxed future polled through a `FuturesUnordered`. Under
//! an offer's `reviews` and `rating` everything is in memory once loaded,
//! yet a 20-offer `_entities` answer resolves ~700 such fields: that
//! machinery was ~35 % of the executed path's CPU (perf, data in L1). No
//! option of the library resolves a subtree synchronously, so this walk is
//! written by hand.
//!
//! Only plain selections are walked: fields without directives, aliases
//! allowed, each response key once, no fragment spreads, and only fields
//! that need no loader (not `author { reviews reviewCount }`, not a
//! `totalCount` that was not loaded with the page). Anything else goes
//! through the derived resolvers of `types.rs`, whole. The schema installs
//! no extension (`graphql::build`), so no per-field hook is skipped.
//!
//! It must never answer differently from the derived resolvers:
//! `tests/it/reads.rs` compares both on the same data.

use std::borrow::Cow;

use async_graphql::indexmap::IndexMap;
use async_graphql::parser::types::{Field, Selection, SelectionSet};
use async_graphql::registry::Registry;
use async_graphql::{ContextSelectionSet, InputType, Name, OutputType, Positioned, ServerResult, Value};

use super::{clamp_count, DateTime, OfferRating, Review, ReviewConnection};

/// A value of type `T` as a field's value: the same GraphQL type, resolved
/// by [`Walk::walk`] when the selection allows it, else by `T`'s derived
/// resolvers.
pub struct Direct<T>(pub T);

/// A type whose value the walk can build from a plain selection.
pub trait Walk: OutputType {
    /// The value for `set`, or `None` when the selection is not plain.
    fn walk(&self, set: &SelectionSet) -> Option<Value>;
}

impl<T: Walk> OutputType for Direct<T> {
    fn type_name() -> Cow<'static, str> {
        T::type_name()
    }

    fn create_type_info(registry: &mut Registry) -> String {
        T::create_type_info(registry)
    }

    async fn resolve(&self, ctx: &ContextSelectionSet<'_>, field: &Positioned<Field>) -> ServerResult<Value> {
        match self.0.walk(&ctx.item.node) {
            Some(value) => Ok(value),
            None => OutputType::resolve(&self.0, ctx, field).await,
        }
    }
}

impl Walk for OfferRating {
    fn walk(&self, set: &SelectionSet) -> Option<Value> {
        let summary = &self.0;
        object(set, |f| match f.name.node.as_str() {
            "__typename" => Some(typename("OfferRating")),
            "average" => Some(InputType::to_value(&summary.average())),
            "count" => Some(Value::from(clamp_count(summary.count))),
            "distribution" => {
                Some(Value::List(summary.distribution.iter().map(|&n| Value::from(clamp_count(n))).collect()))
            }
            _ => None,
        })
    }
}

impl Walk for ReviewConnection {
    fn walk(&self, set: &SelectionSet) -> Option<Value> {
        connection(self, set)
    }
}

/// The fields of a plain selection set (see the module docs), else `None`.
fn plain(set: &SelectionSet) -> Option<Vec<&Field>> {
    let mut fields = Vec::with_capacity(set.items.len());
    for selection in &set.items {
        let Selection::Field(field) = &selection.node else { return None };
        let field = &field.node;
        let key = field.response_key();
        if !field.directives.is_empty() || fields.iter().any(|f: &&Field| f.response_key().node == key.node) {
            return None;
        }
        fields.push(field);
    }
    Some(fields)
}

/// Builds an object from a plain selection, one value per field.
fn object(set: &SelectionSet, mut value: impl FnMut(&Field) -> Option<Value>) -> Option<Value> {
    let fields = plain(set)?;
    let mut out = IndexMap::with_capacity(fields.len());
    for field in fields {
        // A new name, not a clone of the document's: that one is shared by
        // every request of the same text, and the bump of its reference
        // count from both cores drew 43 % of the walk's own samples (perf
        // annotate).
        out.insert(Name::new(field.response_key().node.as_str()), value(field)?);
    }
    Some(Value::Object(out))
}

fn typename(name: &str) -> Value {
    Value::String(name.to_owned())
}

/// A plain selection set planned once for every object of a list: each
/// field with its response key as a [`Name`] made once (the edges of a page
/// share their selection, so the keys of 5 edges × 8 fields are 8 names,
/// cloned: request-local reference counts, not the document's shared ones,
/// and not an allocation per key; those were ~700 per 20-offer answer), and
/// the plan of its own selection when it has one.
struct Plan<'a> {
    fields: Vec<(&'a Field, Name, Option<Plan<'a>>)>,
}

impl<'a> Plan<'a> {
    /// `None` when the set, or one below it, is not plain.
    fn new(set: &'a SelectionSet) -> Option<Self> {
        let mut fields = Vec::new();
        for field in plain(set)? {
            let below = &field.selection_set.node;
            let sub = if below.items.is_empty() { None } else { Some(Plan::new(below)?) };
            fields.push((field, Name::new(field.response_key().node.as_str()), sub));
        }
        Some(Self { fields })
    }

    /// An object of this selection, one value per field.
    fn object(&self, mut value: impl FnMut(&Field, Option<&Plan<'a>>) -> Option<Value>) -> Option<Value> {
        let mut out = IndexMap::with_capacity(self.fields.len());
        for (field, name, sub) in &self.fields {
            out.insert(name.clone(), value(field, sub.as_ref())?);
        }
        Some(Value::Object(out))
    }
}

fn connection(c: &ReviewConnection, set: &SelectionSet) -> Option<Value> {
    object(set, |field| match field.name.node.as_str() {
        "__typename" => Some(typename("ReviewConnection")),
        "totalCount" => Some(Value::from(clamp_count(c.total?))),
        "edges" => {
            let plan = Plan::new(&field.selection_set.node)?;
            let edges = c.page.reviews.iter().map(|review| edge(c, review, &plan));
            Some(Value::List(edges.collect::<Option<_>>()?))
        }
        "pageInfo" => object(&field.selection_set.node, |f| match f.name.node.as_str() {
            "__typename" => Some(typename("PageInfo")),
            "hasNextPage" => Some(Value::Boolean(c.page.has_next)),
            "endCursor" => Some(c.page.reviews.last().map_or(Value::Null, |r| Value::String(c.cursor(r)))),
            _ => None,
        }),
        _ => None,
    })
}

fn edge(c: &ReviewConnection, review: &Review, plan: &Plan<'_>) -> Option<Value> {
    plan.object(|field, sub| match field.name.node.as_str() {
        "__typename" => Some(typename("ReviewEdge")),
        "cursor" => Some(Value::String(c.cursor(review))),
        "node" => self::review(review, sub?),
        _ => None,
    })
}

fn review(r: &Review, plan: &Plan<'_>) -> Option<Value> {
    plan.object(|field, sub| match field.name.node.as_str() {
        "__typename" => Some(typename("Review")),
        "id" => Some(Value::String(r.id.to_string())),
        "rating" => Some(Value::from(i32::from(r.rating))),
        "text" => Some(Value::String(r.text.clone())),
        "status" => Some(r.status.to_value()),
        "createdAt" => Some(InputType::to_value(&DateTime(r.created_at))),
        "updatedAt" => Some(InputType::to_value(&DateTime(r.updated_at))),
        "author" => reference(sub?, "User", &r.author_id),
        "offer" => reference(sub?, "Offer", &r.offer_id),
        _ => None,
    })
}

/// `author` or `offer` when only its `id` (or `__typename`) is selected.
fn reference(plan: &Plan<'_>, name: &str, id: &str) -> Option<Value> {
    plan.object(|field, _| match field.name.node.as_str() {
        "__typename" => Some(typename(name)),
        "id" => Some(Value::String(id.to_owned())),
        _ => None,
    })
}
