//! ETags on the API's reads, so a console polling every few seconds costs a hash and a
//! `304 Not Modified` while nothing changed, not a re-sent fleet page and a re-drawn table.
//!
//! The tag is the SHA-256 of the body (its first 16 bytes), computed on every successful
//! `GET`; `If-None-Match` with that tag (or `*`) gets a 304 without a body. The layer sits
//! outside the forwarding one, so a follower answers 304s for what it forwarded too. Responses
//! say `Cache-Control: no-store`: a page that revalidates keeps its own copy (`web/app.js`),
//! and no shared cache keeps a response to an authenticated request.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

/// Bodies larger than this are sent as they are, without a tag (the whole fleet unpaged).
const MAX_TAGGED: usize = 32 * 1024 * 1024;

pub fn tag(body: &[u8]) -> String {
    let d = Sha256::digest(body);
    format!("\"{}\"", hex::encode(&d[..16]))
}

/// Does an `If-None-Match` value name `tag`? (A list, weak tags compared weakly, or `*`.)
fn matches(if_none_match: &str, tag: &str) -> bool {
    if_none_match
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == tag)
}

pub async fn etag(req: Request, next: Next) -> Response {
    if req.method() != Method::GET {
        return next.run(req).await;
    }
    let wanted = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let resp = next.run(req).await;
    if resp.status() != StatusCode::OK {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_TAGGED).await {
        Ok(b) => b,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("response body: {e}"),
            )
                .into_response()
        }
    };
    let tag = tag(&bytes);
    let value = HeaderValue::from_str(&tag).expect("hex in quotes is a header value");
    parts
        .headers
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if wanted.as_deref().is_some_and(|w| matches(w, &tag)) {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r.headers_mut().insert(header::ETAG, value);
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        return r;
    }
    parts.headers.insert(header::ETAG, value);
    Response::from_parts(parts, Body::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_names_its_body_and_lists_match() {
        let t = tag(b"[1,2]");
        assert_eq!(t.len(), 34);
        assert_eq!(t, tag(b"[1,2]"));
        assert_ne!(t, tag(b"[1,2,3]"));
        assert!(matches(&t, &t));
        assert!(matches(&format!("\"x\", W/{t}"), &t));
        assert!(matches("*", &t));
        assert!(!matches("\"0000\"", &t));
        assert!(!matches("", &t));
    }
}
