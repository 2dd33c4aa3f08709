//! Device selectors: which devices a rollout targets.
//!
//! Grammar (whitespace around tokens is allowed; the canonical form has none except around `in`):
//!
//! ```text
//! selector := "all" | "*" | term ("," term)*
//! term     := key "=" value | key "!=" value | key " in (" value ("," value)* ")"
//! key      := "id" (the device id) | label key
//! ```
//!
//! Keys and values are made of ASCII letters, digits and `. _ - / :`. Terms are ANDed.
//! `key!=value` also matches devices that do not carry the label `key` at all (as in Kubernetes);
//! `key=value` and `key in (...)` require the label. An empty selector is an error: `all` selects
//! every device, and cannot be combined with other terms.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A parsed selector; serializes as its canonical string form ([`fmt::Display`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Selector {
    /// ANDed terms; empty means `all`.
    terms: Vec<Term>,
}

/// One condition on a device.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Term {
    pub key: Key,
    pub op: Op,
}

/// What a term looks at.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    /// The device id (`id=...`).
    Id,
    /// A label.
    Label(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Eq(String),
    /// Also true when the label is missing.
    Ne(String),
    /// A non-empty set (sorted, duplicates dropped).
    In(BTreeSet<String>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("empty selector: use `all` to select every device")]
    Empty,
    #[error("`all` selects every device and cannot be combined with other terms")]
    AllCombined,
    #[error("empty term at column {column}: terms are separated by single commas")]
    EmptyTerm { column: usize },
    #[error("expected {expected} at column {column}, found {found}")]
    Expected {
        column: usize,
        expected: &'static str,
        found: String,
    },
}

impl Selector {
    /// The selector that matches every device.
    pub fn all() -> Selector {
        Selector { terms: Vec::new() }
    }

    pub fn is_all(&self) -> bool {
        self.terms.is_empty()
    }

    /// The ANDed terms (empty for `all`).
    pub fn terms(&self) -> &[Term] {
        &self.terms
    }

    pub fn parse(s: &str) -> Result<Selector, SelectorError> {
        s.parse()
    }

    /// Whether a device with this id and these labels is selected.
    pub fn matches(&self, id: &str, labels: &(impl Labels + ?Sized)) -> bool {
        self.terms.iter().all(|t| t.matches(id, labels))
    }
}

/// What a selector reads of a device: its labels, in whichever map holds them.
pub trait Labels: fmt::Debug {
    fn label(&self, key: &str) -> Option<&str>;
}

impl Labels for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

impl Labels for crate::vecmap::VecMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

impl Term {
    pub fn matches(&self, id: &str, labels: &(impl Labels + ?Sized)) -> bool {
        let actual = match &self.key {
            Key::Id => Some(id),
            Key::Label(k) => labels.label(k),
        };
        match (&self.op, actual) {
            (Op::Eq(v), Some(a)) => a == v,
            (Op::Ne(v), Some(a)) => a != v,
            (Op::Ne(_), None) => true,
            (Op::In(vs), Some(a)) => vs.contains(a),
            (Op::Eq(_) | Op::In(_), None) => false,
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Id => f.write_str("id"),
            Key::Label(k) => f.write_str(k),
        }
    }
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.op {
            Op::Eq(v) => write!(f, "{}={v}", self.key),
            Op::Ne(v) => write!(f, "{}!={v}", self.key),
            Op::In(vs) => {
                write!(f, "{} in (", self.key)?;
                for (i, v) in vs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    f.write_str(v)?;
                }
                f.write_str(")")
            }
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terms.is_empty() {
            return f.write_str("all");
        }
        for (i, t) in self.terms.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{t}")?;
        }
        Ok(())
    }
}

impl From<Selector> for String {
    fn from(s: Selector) -> String {
        s.to_string()
    }
}

impl TryFrom<String> for Selector {
    type Error = SelectorError;
    fn try_from(s: String) -> Result<Selector, SelectorError> {
        s.parse()
    }
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':')
}

struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl Cursor<'_> {
    fn rest(&self) -> &str {
        &self.s[self.pos..]
    }
    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }
    fn skip_ws(&mut self) {
        let rest = self.rest();
        self.pos += rest.len() - rest.trim_start().len();
    }
    fn expected(&self, expected: &'static str) -> SelectorError {
        SelectorError::Expected {
            column: self.pos + 1,
            expected,
            found: match self.peek() {
                None => "the end of the selector".into(),
                Some(c) => format!("`{c}`"),
            },
        }
    }
    fn word(&mut self, expected: &'static str) -> Result<String, SelectorError> {
        let len = self
            .rest()
            .find(|c: char| !is_word_char(c))
            .unwrap_or(self.rest().len());
        if len == 0 {
            return Err(self.expected(expected));
        }
        let w = self.rest()[..len].to_string();
        self.pos += len;
        Ok(w)
    }
    fn eat(&mut self, s: &str) -> bool {
        if self.rest().starts_with(s) {
            self.pos += s.len();
            true
        } else {
            false
        }
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Selector, SelectorError> {
        match s.trim() {
            "" => return Err(SelectorError::Empty),
            "all" | "*" => return Ok(Selector::all()),
            _ => {}
        }
        let mut c = Cursor { s, pos: 0 };
        let mut terms = Vec::new();
        loop {
            c.skip_ws();
            match c.peek() {
                None | Some(',') => return Err(SelectorError::EmptyTerm { column: c.pos + 1 }),
                Some('*') => return Err(SelectorError::AllCombined),
                _ => {}
            }
            let key = c.word("a label key or `id`")?;
            c.skip_ws();
            if key == "all" && matches!(c.peek(), None | Some(',')) {
                return Err(SelectorError::AllCombined);
            }
            let key = if key == "id" {
                Key::Id
            } else {
                Key::Label(key)
            };
            let op = if c.eat("!=") {
                c.skip_ws();
                Op::Ne(c.word("a value")?)
            } else if c.eat("=") {
                c.skip_ws();
                Op::Eq(c.word("a value")?)
            } else if c.rest().starts_with("in")
                && c.rest()[2..]
                    .chars()
                    .next()
                    .is_some_and(|ch| ch == '(' || ch.is_whitespace())
            {
                c.pos += 2;
                c.skip_ws();
                if !c.eat("(") {
                    return Err(c.expected("`(` after `in`"));
                }
                let mut vs = BTreeSet::new();
                loop {
                    c.skip_ws();
                    vs.insert(c.word("a value")?);
                    c.skip_ws();
                    if c.eat(")") {
                        break;
                    }
                    if !c.eat(",") {
                        return Err(c.expected("`,` or `)` in the value list"));
                    }
                }
                Op::In(vs)
            } else {
                return Err(c.expected("`=`, `!=` or `in (...)` after the key"));
            };
            terms.push(Term { key, op });
            c.skip_ws();
            if c.peek().is_none() {
                return Ok(Selector { terms });
            }
            if !c.eat(",") {
                return Err(c.expected("`,` between terms"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(s: &str) -> Selector {
        s.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn all_and_star_match_everything() {
        for s in ["all", "*", "  all "] {
            let x = sel(s);
            assert!(x.is_all());
            assert_eq!(x.to_string(), "all");
            assert!(x.matches("dev-1", &labels(&[])));
        }
    }

    #[test]
    fn equality_and_and() {
        let l = labels(&[("group", "beta"), ("site", "north")]);
        assert!(sel("group=beta").matches("d", &l));
        assert!(!sel("group=alpha").matches("d", &l));
        assert!(sel("group=beta,site=north").matches("d", &l));
        assert!(!sel("group=beta,site=south").matches("d", &l));
        assert!(!sel("zone=x").matches("d", &l));
    }

    #[test]
    fn not_equal_matches_missing_label() {
        assert!(!sel("group!=beta").matches("d", &labels(&[("group", "beta")])));
        assert!(sel("group!=beta").matches("d", &labels(&[("group", "alpha")])));
        assert!(sel("group!=beta").matches("d", &labels(&[])));
    }

    #[test]
    fn ids_and_in_lists() {
        let none = labels(&[]);
        assert!(sel("id=dev-001").matches("dev-001", &none));
        assert!(!sel("id=dev-001").matches("dev-002", &none));
        let s = sel("id in (dev-002, dev-001 ,dev-001)");
        assert_eq!(s.to_string(), "id in (dev-001,dev-002)");
        assert!(s.matches("dev-002", &none));
        assert!(!s.matches("dev-003", &none));
        let g = sel("group in(a,b)");
        assert!(g.matches("x", &labels(&[("group", "b")])));
        assert!(!g.matches("x", &labels(&[("group", "c")])));
        assert!(!g.matches("x", &none));
        // a label may be called `in`
        assert!(sel("in=x").matches("d", &labels(&[("in", "x")])));
    }

    #[test]
    fn canonical_form() {
        assert_eq!(
            sel(" group = beta , site!=north,id in ( a )").to_string(),
            "group=beta,site!=north,id in (a)"
        );
    }

    #[test]
    fn errors_are_clear() {
        let err = |s: &str| s.parse::<Selector>().unwrap_err();
        assert_eq!(err(""), SelectorError::Empty);
        assert_eq!(err("   "), SelectorError::Empty);
        assert!(err("").to_string().contains("use `all`"));
        assert_eq!(err("all,group=a"), SelectorError::AllCombined);
        assert_eq!(err("group=a,*"), SelectorError::AllCombined);
        assert_eq!(
            err("group=a,,site=b"),
            SelectorError::EmptyTerm { column: 9 }
        );
        assert_eq!(err("group=a,"), SelectorError::EmptyTerm { column: 9 });
        assert_eq!(
            err("group=").to_string(),
            "expected a value at column 7, found the end of the selector"
        );
        assert_eq!(
            err("group==beta").to_string(),
            "expected a value at column 7, found `=`"
        );
        assert!(matches!(err("group"), SelectorError::Expected { .. }));
        assert!(matches!(err("group in ()"), SelectorError::Expected { .. }));
        assert!(matches!(
            err("group in (a,b"),
            SelectorError::Expected { .. }
        ));
        assert!(matches!(err("group in a"), SelectorError::Expected { .. }));
        assert!(matches!(
            err("group=beta site=x"),
            SelectorError::Expected { .. }
        ));
        assert!(matches!(err("grüp=x"), SelectorError::Expected { .. }));
        assert!(matches!(err("ALL"), SelectorError::Expected { .. }));
    }

    #[test]
    fn serde_is_the_string_form() {
        let s = sel("group=beta,id in (a,b)");
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(j, r#""group=beta,id in (a,b)""#);
        assert_eq!(serde_json::from_str::<Selector>(&j).unwrap(), s);
        assert!(serde_json::from_str::<Selector>(r#""""#).is_err());
    }

    fn word() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9._/:-]{1,8}"
    }

    fn term() -> impl Strategy<Value = Term> {
        let key = prop_oneof![
            Just(Key::Id),
            word()
                .prop_filter("`id` is the device id", |k| k != "id")
                .prop_map(Key::Label),
        ];
        let op = prop_oneof![
            word().prop_map(Op::Eq),
            word().prop_map(Op::Ne),
            proptest::collection::btree_set(word(), 1..4).prop_map(Op::In),
        ];
        (key, op).prop_map(|(key, op)| Term { key, op })
    }

    proptest! {
        #[test]
        fn parse_display_roundtrip(terms in proptest::collection::vec(term(), 0..5)) {
            let s = Selector { terms };
            let text = s.to_string();
            prop_assert_eq!(text.parse::<Selector>(), Ok(s.clone()), "{}", text);
            let j = serde_json::to_string(&s).unwrap();
            prop_assert_eq!(serde_json::from_str::<Selector>(&j).unwrap(), s);
        }

        #[test]
        fn parse_never_panics(s in "[a-z=!,() *]{0,20}") {
            let _ = s.parse::<Selector>();
        }
    }
}
