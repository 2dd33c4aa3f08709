//! `WWW-Authenticate` challenges (RFC 7235) and registry credentials.

use std::collections::BTreeMap;
use std::fmt;

/// Credentials for one registry host (`host[:port]`; `https://` and a trailing path are ignored,
/// Docker Hub aliases are equivalent). A credential without a port applies to every port.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub registry: String,
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("registry", &self.registry)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// One challenge: scheme (lowercased) and its parameters (names lowercased).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Challenge {
    pub scheme: String,
    pub params: BTreeMap<String, String>,
}

/// Parse a `WWW-Authenticate` value, which may hold several challenges:
/// `Bearer realm="https://a/token",service="reg",scope="repository:x:pull,push", Basic realm="r"`.
pub(crate) fn parse_challenges(value: &str) -> Vec<Challenge> {
    let mut out: Vec<Challenge> = Vec::new();
    let s = value.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < s.len() && (s[*i] == b' ' || s[*i] == b'\t' || s[*i] == b',') {
            *i += 1;
        }
    };
    let token = |i: &mut usize| -> String {
        let start = *i;
        while *i < s.len() && !matches!(s[*i], b' ' | b'\t' | b',' | b'=') {
            *i += 1;
        }
        value[start..*i].to_string()
    };
    loop {
        skip_ws(&mut i);
        if i >= s.len() {
            break;
        }
        let word = token(&mut i);
        // Peek past spaces: `=` means this word was a parameter name of the current challenge.
        let mut j = i;
        while j < s.len() && (s[j] == b' ' || s[j] == b'\t') {
            j += 1;
        }
        if j < s.len() && s[j] == b'=' && !out.is_empty() {
            i = j + 1;
            while i < s.len() && (s[i] == b' ' || s[i] == b'\t') {
                i += 1;
            }
            let val = if i < s.len() && s[i] == b'"' {
                i += 1;
                let mut v = String::new();
                while i < s.len() && s[i] != b'"' {
                    if s[i] == b'\\' && i + 1 < s.len() {
                        i += 1;
                    }
                    // Push whole UTF-8 characters.
                    let ch = value[i..].chars().next().unwrap_or('\u{fffd}');
                    v.push(ch);
                    i += ch.len_utf8();
                }
                i += 1; // closing quote
                v
            } else {
                token(&mut i)
            };
            if let Some(c) = out.last_mut() {
                c.params.insert(word.to_ascii_lowercase(), val);
            }
        } else if word.is_empty() {
            // A stray `=`: skip it.
            i += 1;
        } else {
            out.push(Challenge {
                scheme: word.to_ascii_lowercase(),
                params: BTreeMap::new(),
            });
        }
    }
    out
}

/// Percent-encode a query component (RFC 3986 unreserved characters pass).
pub(crate) fn query_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_with_comma_in_scope() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:samalba/my-app:pull,push""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].params["realm"], "https://auth.docker.io/token");
        assert_eq!(c[0].params["service"], "registry.docker.io");
        assert_eq!(c[0].params["scope"], "repository:samalba/my-app:pull,push");
    }

    #[test]
    fn several_challenges_and_tokens() {
        let c =
            parse_challenges(r#"Basic realm="Registry Realm", Bearer realm=x, service = "a\"b""#);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].params["realm"], "Registry Realm");
        assert_eq!(c[1].scheme, "bearer");
        assert_eq!(c[1].params["realm"], "x");
        assert_eq!(c[1].params["service"], "a\"b");
        assert!(parse_challenges("").is_empty());
        // Garbage does not panic.
        for s in [
            "=",
            "\"",
            "Bearer realm=\"unterminated",
            "a=b",
            "Bearer ,,, =,",
            "Basic é=\"ü\"",
        ] {
            let _ = parse_challenges(s);
        }
    }

    #[test]
    fn encodes_queries() {
        assert_eq!(
            query_encode("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
        assert_eq!(query_encode("a-b.c_d~"), "a-b.c_d~");
    }

    #[test]
    fn debug_redacts_password() {
        let c = Credential {
            registry: "r".into(),
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
