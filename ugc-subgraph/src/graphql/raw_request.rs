//! A GraphQL request read straight from its HTTP body: the text and the
//! operation name borrowed, the variables left as JSON until something
//! asks for one of them.
//!
//! Why: an answer served from rendered fragments needs the query text, the
//! operation name and a few variables. Building async-graphql's `Request`
//! turns every variable into `Value`s, `Name`s and maps first: for a
//! 20-offer `_entities` fetch that was 13.8 % of such an answer's CPU
//! (perf). This reading is tried first; a body it cannot read this way (a
//! batch, a value of the wrong type, an escaped variable name) is left to
//! the full parse, which also reports what is wrong with it. It never
//! decides an answer, and nothing here allocates per variable value.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::HashMap;

use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::cost::CostVariables;

/// One request, as the GraphQL-over-HTTP body carries it.
#[derive(Deserialize)]
pub struct RawRequest<'a> {
    #[serde(default, borrow)]
    pub query: Cow<'a, str>,
    #[serde(default, rename = "operationName", borrow)]
    pub operation_name: Option<Cow<'a, str>>,
    /// Read in the same pass as the rest (a second pass over them, from
    /// a `RawValue`, was 2.5 % of a fragment answer's CPU): an object of
    /// plainly written names, or `null`, or absent; anything else makes
    /// the whole body one for the full parse.
    #[serde(default, borrow, deserialize_with = "variables")]
    variables: RawVariables<'a>,
    /// Read only to refuse what the full parse refuses (not an object).
    #[serde(default, borrow)]
    #[allow(dead_code)]
    extensions: Option<HashMap<Cow<'a, str>, IgnoredAny>>,
}

/// The request's variables by name, each still JSON text.
#[derive(Default)]
pub struct RawVariables<'a> {
    values: HashMap<&'a str, &'a RawValue, foldhash::fast::RandomState>,
    /// A list's length already known to whoever read the list (the entity
    /// cache reads the representations): not scanned again for the cost.
    known_len: Cell<Option<(&'a str, usize)>>,
}

impl<'a> RawRequest<'a> {
    /// The body as one request; `None` for a batch or anything unusual.
    pub fn parse(body: &'a [u8]) -> Option<Self> {
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return None;
        }
        serde_json::from_slice(body).ok()
    }

    /// Its variables (none sent, or `null`: none).
    pub fn variables(&self) -> &RawVariables<'a> {
        &self.variables
    }
}

/// Generic in both lifetimes: `RawVariables` is invariant in its own (a
/// `Cell` of borrowed names), so it is built at the request's.
fn variables<'de: 'a, 'a, D: serde::Deserializer<'de>>(d: D) -> Result<RawVariables<'a>, D::Error> {
    let values: Option<HashMap<&'a str, &'a RawValue, foldhash::fast::RandomState>> = Deserialize::deserialize(d)?;
    Ok(RawVariables { values: values.unwrap_or_default(), known_len: Cell::new(None) })
}

impl<'a> RawVariables<'a> {
    /// The JSON text of variable `name`, if it was sent.
    pub fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.values.get(name).copied()
    }

    /// Tells [`CostVariables::list_len`] that list `name` has `len` items
    /// (the caller has read it as a list).
    pub fn note_list_len(&self, name: &str, len: usize) {
        if let Some((&key, _)) = self.values.get_key_value(name) {
            self.known_len.set(Some((key, len)));
        }
    }

    /// Variable `name` as a string (escapes resolved), if it is one.
    pub fn string(&self, name: &str) -> Option<Cow<'a, str>> {
        #[derive(Deserialize)]
        struct Text<'t>(#[serde(borrow)] Cow<'t, str>);
        serde_json::from_str::<Text<'a>>(self.get(name)?.get()).ok().map(|t| t.0)
    }
}

impl CostVariables for RawVariables<'_> {
    fn count(&self, name: &str) -> Option<u64> {
        // As `Variables` reads it: a number is one whatever its form.
        let n: serde_json::Number = serde_json::from_str(self.get(name)?.get()).ok()?;
        Some(n.as_u64().unwrap_or(0))
    }

    fn list_len(&self, name: &str) -> Option<usize> {
        if let Some((known, len)) = self.known_len.get() {
            if known == name {
                return Some(len);
            }
        }
        serde_json::from_str::<Vec<IgnoredAny>>(self.get(name)?.get()).ok().map(|l| l.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_full_parse_reads() {
        let body = br#" {"query":"query Q($n: Int) { a }","operationName":"Q","variables":{"n":5,"s":"x\"y","l":[1,{}],"f":2.5}}"#;
        let raw = RawRequest::parse(body).unwrap();
        let full: async_graphql::Request = serde_json::from_slice(body).unwrap();
        assert_eq!(raw.query, full.query);
        assert!(matches!(raw.query, Cow::Borrowed(_)), "no copy of an unescaped text");
        assert_eq!(raw.operation_name.as_deref(), full.operation_name.as_deref());
        let vars = raw.variables();
        for name in ["n", "s", "l", "f", "absent"] {
            assert_eq!(vars.count(name), full.variables.count(name), "{name}");
            assert_eq!(vars.list_len(name), full.variables.list_len(name), "{name}");
        }
        assert_eq!(vars.string("s").as_deref(), Some("x\"y"));
        vars.note_list_len("l", 2);
        assert_eq!(vars.list_len("l"), Some(2));
        vars.note_list_len("absent", 9);
        assert_eq!(vars.list_len("absent"), None, "only a variable that was sent");
        assert_eq!(vars.string("n"), None);
    }

    #[test]
    fn leaves_anything_unusual_to_the_full_parse() {
        for body in [
            &br#"[{"query":"{ a }"}]"#[..],
            br#"{"query":"{ a }""#,
            br#"{"query":5}"#,
            br#"{"query":"{ a }","query":"{ b }"}"#,
            br#"{"query":"{ a }","extensions":[1]}"#,
            b"null",
            br#"{"query":"{ a }","variables":[1]}"#,
            br#"{"query":"{ a }","variables":{"\u006e":1}}"#,
        ] {
            assert!(RawRequest::parse(body).is_none(), "{}", String::from_utf8_lossy(body));
        }
        let none = RawRequest::parse(br#"{"query":"{ a }","variables":null}"#).unwrap();
        assert_eq!(none.variables().count("n"), None);
        let absent = RawRequest::parse(br#"{"query":"{ a }"}"#).unwrap();
        assert_eq!(absent.variables().count("n"), None);
    }
}
