//! Query cost limits, checked before anything executes (SPEC §6).
//!
//! async-graphql's own checks (depth, complexity, recursion, directives)
//! walk fragment spreads by expanding them, so a document of thirty named
//! fragments that each spread the next twice makes them visit 2³⁰ fields:
//! one request of a kilobyte took gigabytes and seconds. Everything here is
//! computed with one memoised pass per fragment, linear in the size of the
//! document, and a document is refused the moment a count passes its limit;
//! only then does async-graphql see it. Before parsing, a lexical scan
//! bounds the nesting of brackets, so the recursive-descent parser cannot
//! exhaust the stack.
//!
//! An analysis depends only on the query text, so it is kept per text: the
//! cached read path pays a hash lookup and the evaluation of a small cost
//! tree against the request's variables, not a parse. This module must
//! never execute, and never allocate in proportion to the expanded size of
//! a query that is over the limits.

use std::collections::HashMap;
use std::sync::Arc;

use async_graphql::parser::types::{
    DocumentOperations, ExecutableDocument, FragmentDefinition, OperationType, Selection, SelectionSet,
};
use async_graphql::{Name, Positioned, Value as ConstValue, Variables};
use async_graphql_value::Value;

use crate::config::GraphqlConfig;
use crate::domain::MAX_PAGE_SIZE;

/// Brackets (`{`, `(`, `[`) open at once, at most. Far above any real
/// query's nesting, far below what could exhaust the parser's stack.
pub const MAX_NESTING: usize = 128;
/// Analyses kept (by query text), weighed by the text's length.
const ANALYSES_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// A page size when `first` is not given (the schema's default).
const DEFAULT_FIRST: u64 = 10;

/// Why a query was refused. Each names the setting that bounds it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CostError {
    #[error("the query nests brackets deeper than {MAX_NESTING}")]
    Nesting,
    #[error("fragment `{0}` spreads itself")]
    FragmentCycle(String),
    #[error("the query selects more than {limit} fields after fragment expansion (UGC_MAX_FIELDS)")]
    Fields { limit: usize },
    #[error("the query is deeper than {limit} levels (UGC_MAX_DEPTH)")]
    Depth { limit: usize },
    #[error("the query uses more than {limit} aliases (UGC_MAX_ALIASES)")]
    Aliases { limit: usize },
    #[error("the query selects more than {limit} root fields (UGC_MAX_ROOT_FIELDS)")]
    RootFields { limit: usize },
    #[error("the query costs {cost}, more than {limit} (UGC_MAX_COMPLEXITY; lists count `first` times, _entities once per representation)")]
    Complexity { cost: u64, limit: usize },
    #[error("the request has {count} representations, more than {limit} (UGC_MAX_REPRESENTATIONS)")]
    Representations { count: u64, limit: usize },
    #[error("the batch holds {count} operations, more than {limit} (UGC_MAX_BATCH_OPERATIONS)")]
    Batch { count: usize, limit: usize },
    #[error("the request's operations cost {cost} together, more than {limit} (UGC_MAX_REQUEST_COMPLEXITY)")]
    RequestComplexity { cost: u64, limit: usize },
}

impl CostError {
    /// `extensions.code` (named as Apollo Router names its operation limits).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Nesting | Self::Depth { .. } => "MAX_DEPTH_LIMIT",
            Self::FragmentCycle(_) => "GRAPHQL_VALIDATION_FAILED",
            Self::Fields { .. } => "MAX_FIELDS_LIMIT",
            Self::Aliases { .. } => "MAX_ALIASES_LIMIT",
            Self::RootFields { .. } => "MAX_ROOT_FIELDS_LIMIT",
            Self::Complexity { .. } => "MAX_COMPLEXITY_LIMIT",
            Self::Representations { .. } => "MAX_REPRESENTATIONS_LIMIT",
            Self::Batch { .. } => "MAX_BATCH_SIZE_LIMIT",
            Self::RequestComplexity { .. } => "MAX_REQUEST_COMPLEXITY_LIMIT",
        }
    }

    /// The metric label of the limit.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Nesting => "nesting",
            Self::FragmentCycle(_) => "fragment_cycle",
            Self::Fields { .. } => "fields",
            Self::Depth { .. } => "depth",
            Self::Aliases { .. } => "aliases",
            Self::RootFields { .. } => "root_fields",
            Self::Complexity { .. } => "complexity",
            Self::Representations { .. } => "representations",
            Self::Batch { .. } => "batch",
            Self::RequestComplexity { .. } => "request_complexity",
        }
    }
}

/// How many times a field's children are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Times {
    Fixed(u64),
    /// `first: $var` (the schema's default when the variable is absent).
    First(Name),
    /// `_entities(representations: $var)`: the list's length.
    Representations(Name),
}

/// A field of the expanded query, for the cost (at most `max_fields` nodes).
#[derive(Debug, Clone)]
struct Node {
    times: Times,
    /// Literal representations of `_entities`, counted toward their limit.
    entities: bool,
    children: Vec<Node>,
}

/// What one operation costs, independent of the variables.
#[derive(Debug)]
struct Operation {
    name: Option<Name>,
    mutation: bool,
    roots: Vec<Node>,
}

/// The variable-independent facts of one query text.
#[derive(Debug)]
pub struct Analysis {
    operations: Vec<Operation>,
    /// The parsed text, cloned into every executed request of this text:
    /// parsing it again (a PEG parser) was 6 % of an executed answer's CPU,
    /// and left the profile with this.
    document: ExecutableDocument,
}

/// What a request's operation is, once admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    pub mutation: bool,
    pub cost: u64,
}

impl Analysis {
    /// The cost and kind of the operation a request executes (all of them,
    /// taken together, when the name picks none: execution refuses that).
    ///
    /// # Errors
    /// Over the complexity or representation limit.
    pub fn admit(
        &self,
        operation: Option<&str>,
        variables: &impl CostVariables,
        limits: &GraphqlConfig,
    ) -> Result<Admitted, CostError> {
        let picked: Vec<&Operation> = match operation {
            Some(name) => self.operations.iter().filter(|o| o.name.as_deref() == Some(name)).collect(),
            None if self.operations.len() == 1 => self.operations.iter().collect(),
            None => Vec::new(),
        };
        let picked = if picked.is_empty() { self.operations.iter().collect() } else { picked };
        let mut admitted = Admitted { mutation: false, cost: 0 };
        let mut representations = 0u64;
        for op in picked {
            admitted.mutation |= op.mutation;
            for root in &op.roots {
                admitted.cost = admitted.cost.saturating_add(cost(root, variables, &mut representations));
            }
        }
        if representations > limits.max_representations as u64 {
            return Err(CostError::Representations { count: representations, limit: limits.max_representations });
        }
        if admitted.cost > limits.max_complexity as u64 {
            return Err(CostError::Complexity { cost: admitted.cost, limit: limits.max_complexity });
        }
        Ok(admitted)
    }
}

/// What the cost reads of a request's variables. Implemented for parsed
/// [`Variables`] and for a body's unparsed ones
/// ([`RawVariables`](super::raw_request::RawVariables)): an answer from
/// rendered fragments is admitted without building `Variables`.
pub trait CostVariables {
    /// The variable's value when it is a number, as a count (a fraction or
    /// a negative number: 0).
    fn count(&self, name: &str) -> Option<u64>;
    /// The variable's length when it is a list.
    fn list_len(&self, name: &str) -> Option<usize>;
}

impl CostVariables for Variables {
    fn count(&self, name: &str) -> Option<u64> {
        match self.get(name) {
            Some(ConstValue::Number(n)) => Some(n.as_u64().unwrap_or(0)),
            _ => None,
        }
    }

    fn list_len(&self, name: &str) -> Option<usize> {
        match self.get(name) {
            Some(ConstValue::List(list)) => Some(list.len()),
            _ => None,
        }
    }
}

fn cost(node: &Node, variables: &impl CostVariables, representations: &mut u64) -> u64 {
    let times = match &node.times {
        Times::Fixed(n) => *n,
        Times::First(var) => variables.count(var).map_or(DEFAULT_FIRST, |n| n.min(MAX_PAGE_SIZE as u64)),
        Times::Representations(var) => variables.list_len(var).map_or(0, |n| n as u64),
    };
    if node.entities {
        *representations = representations.saturating_add(times);
    }
    let children = node.children.iter().fold(0u64, |sum, c| sum.saturating_add(cost(c, variables, representations)));
    1u64.saturating_add(times.max(1).saturating_mul(children))
}

/// Analyses by query text; refusals are kept too, so a repeated bomb costs
/// one lookup.
pub struct CostGuard {
    limits: GraphqlConfig,
    /// Keyed by the whole text (no hash collision can confuse two
    /// queries); foldhash, because SipHash over every query text showed in
    /// the cached path's profile.
    analyses: moka::sync::Cache<String, Arc<Result<Analysis, CostError>>, foldhash::fast::RandomState>,
}

/// The outcome of looking at a query text.
pub enum Verdict {
    Analysed(Arc<Result<Analysis, CostError>>),
    /// Not a parsable document: execution reports the syntax error.
    Unparsable,
}

impl CostGuard {
    pub fn new(limits: GraphqlConfig) -> Self {
        Self {
            limits,
            analyses: moka::sync::Cache::builder()
                .max_capacity(ANALYSES_MAX_BYTES)
                // The parsed tree weighs several times its text.
                .weigher(|q: &String, _| u32::try_from(q.len() * 8 + 256).unwrap_or(u32::MAX))
                .build_with_hasher(foldhash::fast::RandomState::default()),
        }
    }

    pub fn limits(&self) -> &GraphqlConfig {
        &self.limits
    }

    /// The analysis of `query`, from the cache or computed now.
    pub fn analyse(&self, query: &str) -> Verdict {
        if let Some(known) = self.analyses.get(query) {
            return Verdict::Analysed(known);
        }
        if nesting(query) > MAX_NESTING {
            let refused = Arc::new(Err(CostError::Nesting));
            self.analyses.insert(query.to_owned(), Arc::clone(&refused));
            return Verdict::Analysed(refused);
        }
        let Ok(doc) = async_graphql::parser::parse_query(query) else {
            return Verdict::Unparsable;
        };
        let analysis =
            Arc::new(operations(&doc, &self.limits).map(|operations| Analysis { operations, document: doc }));
        self.analyses.insert(query.to_owned(), Arc::clone(&analysis));
        Verdict::Analysed(analysis)
    }

    /// The parsed document of an admitted `query`, for execution: taken
    /// only when a request is executed (an answer from rendered fragments
    /// needs none).
    pub fn document(&self, query: &str) -> Option<ExecutableDocument> {
        Some(self.analyses.get(query)?.as_ref().as_ref().ok()?.document.clone())
    }
}

/// The deepest bracket nesting of a GraphQL text, outside strings and comments.
pub fn nesting(query: &str) -> usize {
    let bytes = query.as_bytes();
    let (mut depth, mut deepest, mut i) = (0usize, 0usize, 0usize);
    while i < bytes.len() {
        match bytes[i] {
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'"' if bytes[i..].starts_with(b"\"\"\"") => {
                i += 3;
                while i < bytes.len() && !bytes[i..].starts_with(b"\"\"\"") {
                    i += if bytes[i..].starts_with(b"\\\"\"\"") { 4 } else { 1 };
                }
                i += 2;
            }
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' && bytes[i] != b'\n' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'{' | b'(' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b')' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    deepest
}

/// Counts of one selection set with every fragment expanded.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    fields: usize,
    depth: usize,
    aliases: usize,
    /// Fields at this level (root fields, for an operation).
    top: usize,
}

struct Counter<'d> {
    fragments: &'d HashMap<Name, Positioned<FragmentDefinition>>,
    memo: HashMap<&'d str, Counts>,
    visiting: Vec<&'d str>,
    max_fields: usize,
}

impl<'d> Counter<'d> {
    fn selection_set(&mut self, set: &'d SelectionSet) -> Result<Counts, CostError> {
        let mut c = Counts::default();
        for selection in &set.items {
            let inner = match &selection.node {
                Selection::Field(field) => {
                    let field = &field.node;
                    let sub = self.selection_set(&field.selection_set.node)?;
                    Counts {
                        fields: sub.fields.saturating_add(1),
                        depth: sub.depth + 1,
                        aliases: sub.aliases + usize::from(field.alias.is_some()),
                        top: 1,
                    }
                }
                Selection::InlineFragment(inline) => self.selection_set(&inline.node.selection_set.node)?,
                Selection::FragmentSpread(spread) => self.fragment(spread.node.fragment_name.node.as_str())?,
            };
            c.fields = c.fields.saturating_add(inner.fields);
            c.aliases = c.aliases.saturating_add(inner.aliases);
            c.top = c.top.saturating_add(inner.top);
            c.depth = c.depth.max(inner.depth);
            if c.fields > self.max_fields {
                return Err(CostError::Fields { limit: self.max_fields });
            }
        }
        Ok(c)
    }

    fn fragment(&mut self, name: &'d str) -> Result<Counts, CostError> {
        if let Some(known) = self.memo.get(name) {
            return Ok(*known);
        }
        // An unknown fragment counts nothing here; validation names it.
        let Some((key, fragment)) = self.fragments.get_key_value(name) else { return Ok(Counts::default()) };
        if self.visiting.contains(&name) {
            return Err(CostError::FragmentCycle(name.to_owned()));
        }
        self.visiting.push(name);
        let counts = self.selection_set(&fragment.node.selection_set.node)?;
        self.visiting.pop();
        self.memo.insert(key.as_str(), counts);
        Ok(counts)
    }
}

/// Every operation of `doc` counted against the limits and expanded.
fn operations(doc: &ExecutableDocument, limits: &GraphqlConfig) -> Result<Vec<Operation>, CostError> {
    let mut counter = Counter {
        fragments: &doc.fragments,
        memo: HashMap::new(),
        visiting: Vec::new(),
        max_fields: limits.max_fields,
    };
    let operations: Vec<(Option<&Name>, &Positioned<async_graphql::parser::types::OperationDefinition>)> =
        match &doc.operations {
            DocumentOperations::Single(op) => vec![(None, op)],
            DocumentOperations::Multiple(ops) => ops.iter().map(|(name, op)| (Some(name), op)).collect(),
        };
    let mut total_fields = 0usize;
    let mut out = Vec::with_capacity(operations.len());
    for (name, op) in operations {
        let set = &op.node.selection_set.node;
        let counts = counter.selection_set(set)?;
        total_fields = total_fields.saturating_add(counts.fields);
        if total_fields > limits.max_fields {
            return Err(CostError::Fields { limit: limits.max_fields });
        }
        if counts.depth > limits.max_depth {
            return Err(CostError::Depth { limit: limits.max_depth });
        }
        if counts.aliases > limits.max_aliases {
            return Err(CostError::Aliases { limit: limits.max_aliases });
        }
        if counts.top > limits.max_root_fields {
            return Err(CostError::RootFields { limit: limits.max_root_fields });
        }
        // Within the field limit: the expanded tree is small, build it.
        out.push(Operation {
            name: name.cloned(),
            mutation: op.node.ty == OperationType::Mutation,
            roots: expand(doc, set),
        });
    }
    Ok(out)
}

/// The fields of a selection set with fragments expanded (only called once
/// the expanded size is known to be within the limit; cycles were refused).
fn expand(doc: &ExecutableDocument, set: &SelectionSet) -> Vec<Node> {
    let mut nodes = Vec::new();
    for selection in &set.items {
        match &selection.node {
            Selection::Field(field) => {
                let field = &field.node;
                let (times, entities) = multiplier(field.name.node.as_str(), &field.arguments);
                nodes.push(Node { times, entities, children: expand(doc, &field.selection_set.node) });
            }
            Selection::InlineFragment(inline) => nodes.extend(expand(doc, &inline.node.selection_set.node)),
            Selection::FragmentSpread(spread) => {
                if let Some(fragment) = doc.fragments.get(&spread.node.fragment_name.node) {
                    nodes.extend(expand(doc, &fragment.node.selection_set.node));
                }
            }
        }
    }
    nodes
}

/// Lists resolve their children `first` times, `_entities` once per
/// representation; everything else once.
fn multiplier(field: &str, arguments: &[(Positioned<Name>, Positioned<Value>)]) -> (Times, bool) {
    let arg = |name: &str| arguments.iter().find(|(n, _)| n.node.as_str() == name).map(|(_, v)| &v.node);
    match field {
        "reviews" => match arg("first") {
            Some(Value::Variable(var)) => (Times::First(var.clone()), false),
            Some(Value::Number(n)) => (Times::Fixed(n.as_u64().unwrap_or(0).min(MAX_PAGE_SIZE as u64)), false),
            _ => (Times::Fixed(DEFAULT_FIRST), false),
        },
        "_entities" => match arg("representations") {
            Some(Value::Variable(var)) => (Times::Representations(var.clone()), true),
            Some(Value::List(list)) => (Times::Fixed(list.len() as u64), true),
            _ => (Times::Fixed(0), true),
        },
        _ => (Times::Fixed(1), false),
    }
}

/// The whole HTTP request: how many operations, and their summed cost.
///
/// # Errors
/// Too many operations, or too costly together.
pub fn check_request(count: usize, total_cost: u64, limits: &GraphqlConfig) -> Result<(), CostError> {
    if count > limits.max_batch_operations {
        return Err(CostError::Batch { count, limit: limits.max_batch_operations });
    }
    if total_cost > limits.max_request_complexity as u64 {
        return Err(CostError::RequestComplexity { cost: total_cost, limit: limits.max_request_complexity });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn limits() -> GraphqlConfig {
        Config::from_vars([("DATABASE_URL".to_owned(), "postgres://x@h/d".to_owned())]).unwrap().graphql
    }

    fn analyse(query: &str) -> Result<Admitted, CostError> {
        let guard = CostGuard::new(limits());
        let vars = Variables::from_json(serde_json::json!({ "n": 50, "reps": vec![serde_json::json!({}); 30] }));
        match guard.analyse(query) {
            Verdict::Analysed(a) => match &*a {
                Ok(a) => a.admit(None, &vars, guard.limits()),
                Err(e) => Err(e.clone()),
            },
            Verdict::Unparsable => panic!("unparsable: {query}"),
        }
    }

    /// `levels` fragments, each spreading the next twice.
    fn fragment_bomb(levels: usize) -> String {
        let mut q = String::from("query { ...F0 }");
        for i in 0..levels {
            q.push_str(&format!(" fragment F{i} on Query {{ ...F{n} ...F{n} }}", n = i + 1));
        }
        q.push_str(&format!(" fragment F{levels} on Query {{ __typename }}"));
        q
    }

    #[test]
    fn a_fragment_bomb_is_counted_without_expanding_it() {
        assert_eq!(analyse(&fragment_bomb(30)), Err(CostError::Fields { limit: limits().max_fields }));
        assert!(analyse(&fragment_bomb(4)).is_ok(), "16 fields are fine");
    }

    #[test]
    fn cycles_and_nesting_are_refused() {
        let cycle = "query { ...A } fragment A on Query { ...B } fragment B on Query { ...A }";
        assert!(matches!(analyse(cycle), Err(CostError::FragmentCycle(_))));
        let deep = format!("{}{}", "{ a ".repeat(200), "}".repeat(200));
        assert_eq!(analyse(&deep), Err(CostError::Nesting));
        assert_eq!(nesting("{ a(s: \"{{{{\") # {{{{\n }"), 2, "strings and comments do not nest");
        assert_eq!(nesting("{ a(s: \"\"\"{{{{ \\\"\"\" {{\"\"\") }"), 2, "block strings neither");
    }

    #[test]
    fn aliases_depth_and_root_fields_are_counted_after_expansion() {
        let aliases = format!("{{ {} }}", (0..60).map(|i| format!("a{i}: __typename")).collect::<Vec<_>>().join(" "));
        assert_eq!(analyse(&aliases), Err(CostError::Aliases { limit: 50 }));
        let roots = format!(
            "{{ ...R }} fragment R on Query {{ {} }}",
            (0..21).map(|i| format!("offer(id: \"{i}\") {{ id }}")).collect::<Vec<_>>().join(" ")
        );
        assert_eq!(analyse(&roots), Err(CostError::RootFields { limit: 20 }));
        // 16 levels, half of them inside a fragment: depth counts through spreads.
        let deep = format!(
            "{{ {}...D{} }} fragment D on T {{ {}x{} }}",
            "a { ".repeat(8),
            " }".repeat(8),
            "b { ".repeat(7),
            " }".repeat(7)
        );
        assert_eq!(analyse(&deep), Err(CostError::Depth { limit: 15 }));
        let fine = format!(
            "{{ {}...D{} }} fragment D on T {{ {}x{} }}",
            "a { ".repeat(7),
            " }".repeat(7),
            "b { ".repeat(7),
            " }".repeat(7)
        );
        assert!(analyse(&fine).is_ok());
    }

    #[test]
    fn lists_cost_first_times_and_entities_once_per_representation() {
        let page = "query($n: Int) { offer(id: \"x\") { reviews(first: $n) { edges { node { id } } } } }";
        // offer 1 + reviews (1 + 50 × (edges 1 + node (1 + id 1))) = 1 + 1 + 50 × 3
        assert_eq!(analyse(page).unwrap().cost, 1 + 1 + 50 * 3);
        let entities =
            "query($reps: [_Any!]!) { _entities(representations: $reps) { ... on Offer { rating { count } } } }";
        assert_eq!(analyse(entities).unwrap().cost, 1 + 30 * 2);
        let too_many = "query($reps: [_Any!]!) { a: _entities(representations: $reps) { __typename } b: _entities(representations: $reps) { __typename } }";
        let mut l = limits();
        l.max_representations = 50;
        let guard = CostGuard::new(l.clone());
        let Verdict::Analysed(a) = guard.analyse(too_many) else { panic!() };
        let vars = Variables::from_json(serde_json::json!({ "reps": vec![serde_json::json!({}); 30] }));
        assert_eq!(
            a.as_ref().as_ref().unwrap().admit(None, &vars, &l),
            Err(CostError::Representations { count: 60, limit: 50 })
        );
    }

    proptest::proptest! {
        /// Any text: the analysis answers (refusal, unparsable or admitted),
        /// never panics, however the brackets and fragments are arranged.
        #[test]
        fn any_query_text_is_answered(query in "[{}()\\[\\]a-z.:$ \"#\n]{0,300}|(fragment F on Q \\{ \\.\\.\\.F \\}|query \\{ \\.\\.\\.F a \\}){1,5}") {
            let guard = CostGuard::new(limits());
            if let Verdict::Analysed(a) = guard.analyse(&query) {
                if let Ok(a) = &*a {
                    let _ = a.admit(None, &Variables::default(), guard.limits());
                }
            }
        }
    }

    #[test]
    fn mutations_are_recognised_by_the_executed_operation() {
        let doc = "query Q { __typename } mutation M { deleteReview(id: \"1\") }";
        let guard = CostGuard::new(limits());
        let Verdict::Analysed(a) = guard.analyse(doc) else { panic!() };
        let a = a.as_ref().as_ref().unwrap();
        let vars = Variables::default();
        assert!(!a.admit(Some("Q"), &vars, guard.limits()).unwrap().mutation);
        assert!(a.admit(Some("M"), &vars, guard.limits()).unwrap().mutation);
        assert!(a.admit(None, &vars, guard.limits()).unwrap().mutation, "ambiguous: the most restrictive reading");
    }
}
