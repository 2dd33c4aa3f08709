//! A YAML document as a tree that remembers where each node and key stands (1-based lines), so
//! that a compose key Ferry cannot honour is named with its line. Anchors and aliases are
//! resolved; merge keys (`<<: *base`) merge a mapping's entries under the ones written beside
//! them, as Compose does.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    /// A scalar as written; `plain`: unquoted (so `null`, `true`, `8080` are what they look like).
    Scalar {
        value: String,
        plain: bool,
        line: usize,
    },
    Seq {
        items: Vec<Node>,
        line: usize,
    },
    Map {
        entries: Vec<Entry>,
        line: usize,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub key: String,
    pub line: usize,
    pub value: Node,
}

impl Node {
    pub fn line(&self) -> usize {
        match self {
            Node::Scalar { line, .. } | Node::Seq { line, .. } | Node::Map { line, .. } => *line,
        }
    }

    /// A plain `null`, `~` or nothing.
    pub fn is_null(&self) -> bool {
        matches!(self, Node::Scalar { value, plain: true, .. } if matches!(value.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Node::Scalar { value, .. } => Some(value),
            _ => None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Node::Scalar { .. } => "a scalar",
            Node::Seq { .. } => "a list",
            Node::Map { .. } => "a mapping",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("line {line}: {detail}")]
pub struct YamlError {
    pub line: usize,
    pub detail: String,
}

enum Open {
    Seq(Vec<Node>, usize, usize),
    /// entries, pending key (text, line), line, anchor, keys that came from a merge
    Map(
        Vec<Entry>,
        Option<(String, usize)>,
        usize,
        usize,
        Vec<String>,
    ),
}

#[derive(Default)]
struct Builder {
    stack: Vec<Open>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
    error: Option<YamlError>,
    documents: usize,
}

impl Builder {
    fn fail(&mut self, line: usize, detail: impl Into<String>) {
        if self.error.is_none() {
            self.error = Some(YamlError {
                line,
                detail: detail.into(),
            });
        }
    }

    fn push(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Open::Seq(items, _, _)) => items.push(node),
            Some(Open::Map(entries, key, _, _, merged_keys)) => match key.take() {
                None => match node {
                    Node::Scalar { value, line, .. } => *key = Some((value, line)),
                    other => {
                        let line = other.line();
                        self.fail(line, "a mapping key must be a scalar");
                    }
                },
                Some((k, kline)) => {
                    if k == "<<" {
                        let merged: Vec<Entry> = match node {
                            Node::Map { entries, .. } => entries,
                            Node::Seq { items, .. } => items
                                .into_iter()
                                .flat_map(|n| match n {
                                    Node::Map { entries, .. } => entries,
                                    _ => Vec::new(),
                                })
                                .collect(),
                            _ => {
                                self.fail(kline, "a merge key (<<) takes a mapping");
                                return;
                            }
                        };
                        // Merged entries yield to those written in the mapping itself.
                        for e in merged {
                            if !entries.iter().any(|have| have.key == e.key) {
                                merged_keys.push(e.key.clone());
                                entries.push(e);
                            }
                        }
                    } else if let Some(i) = merged_keys.iter().position(|m| *m == k) {
                        // Written beside a merge: this value wins.
                        merged_keys.remove(i);
                        let e = entries
                            .iter_mut()
                            .find(|e| e.key == k)
                            .expect("merged entry");
                        *e = Entry {
                            key: k,
                            line: kline,
                            value: node,
                        };
                    } else if entries.iter().any(|e| e.key == k) {
                        self.fail(kline, format!("key {k:?} appears twice"));
                    } else {
                        entries.push(Entry {
                            key: k,
                            line: kline,
                            value: node,
                        });
                    }
                }
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = mark.line();
        match ev {
            Event::DocumentStart => {
                self.documents += 1;
                if self.documents > 1 {
                    self.fail(line, "one YAML document per compose file");
                }
            }
            Event::Scalar(value, style, anchor, _tag) => {
                let plain = matches!(style, TScalarStyle::Plain);
                self.push(Node::Scalar { value, plain, line }, anchor);
            }
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some(n) => self.push(n, 0),
                None => self.fail(line, "an alias to an unknown anchor"),
            },
            Event::SequenceStart(anchor, _) => self.stack.push(Open::Seq(Vec::new(), line, anchor)),
            Event::MappingStart(anchor, _) => {
                self.stack
                    .push(Open::Map(Vec::new(), None, line, anchor, Vec::new()))
            }
            Event::SequenceEnd => {
                if let Some(Open::Seq(items, l, anchor)) = self.stack.pop() {
                    self.push(Node::Seq { items, line: l }, anchor);
                }
            }
            Event::MappingEnd => {
                if let Some(Open::Map(entries, _, l, anchor, _)) = self.stack.pop() {
                    self.push(Node::Map { entries, line: l }, anchor);
                }
            }
            _ => {}
        }
    }
}

/// Parse one YAML document.
pub fn parse(text: &str) -> Result<Node, YamlError> {
    let mut b = Builder::default();
    Parser::new_from_str(text)
        .load(&mut b, true)
        .map_err(|e| YamlError {
            line: e.marker().line(),
            detail: e.info().to_string(),
        })?;
    if let Some(e) = b.error {
        return Err(e);
    }
    b.root.ok_or(YamlError {
        line: 1,
        detail: "the file is empty".into(),
    })
}
