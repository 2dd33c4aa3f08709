//! **API calls on a follower reach the leader.** Every replica serves the web page, `/healthz`
//! and `/metrics` itself; an `/api/v1` call on a replica that does not lead is forwarded as it
//! came (method, path, query, body, `Authorization`) to the leader's API URL from the lease row,
//! and the leader's answer is returned as it is: the leader authenticates it, and reads and
//! writes see one state. A forwarded call that reaches a replica which does not lead either (the
//! lease moved meanwhile) is answered 503, never forwarded again; so is a call while no replica
//! leads (a take-over under way). `controller/API.md` has the details for clients.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::{ErrorBody, PREFIX};

/// Set on a forwarded call: the receiver never forwards it again.
pub const FORWARDED: &str = "x-ferry-forwarded-by";

/// This replica's part: leading or not, and where the leader is.
#[derive(Debug)]
pub struct Role {
    me: String,
    leader: AtomicBool,
    leader_url: Mutex<Option<(String, String)>>,
}

impl Role {
    /// A controller without replicas (SQLite): always the leader.
    pub fn single() -> Arc<Role> {
        let r = Role::follower("single");
        r.leader.store(true, Ordering::SeqCst);
        r
    }

    pub fn follower(me: &str) -> Arc<Role> {
        Arc::new(Role {
            me: me.to_string(),
            leader: AtomicBool::new(false),
            leader_url: Mutex::new(None),
        })
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    pub fn set_leader(&self, on: bool) {
        self.leader.store(on, Ordering::SeqCst);
    }

    /// The leader the lease row names (its id and API URL), or none.
    pub fn set_leader_url(&self, l: Option<(String, String)>) {
        *self.leader_url.lock().expect("not poisoned") = l;
    }

    fn leader_url(&self) -> Option<(String, String)> {
        self.leader_url.lock().expect("not poisoned").clone()
    }
}

fn unavailable(message: String) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, HeaderValue::from_static("2"))],
        axum::Json(ErrorBody { error: message }),
    )
        .into_response()
}

/// The middleware: pass the call on when leading, forward it to the leader otherwise.
pub async fn forward(State(role): State<Arc<Role>>, req: Request, next: Next) -> Response {
    if role.is_leader() {
        return next.run(req).await;
    }
    if req.headers().contains_key(FORWARDED) {
        return unavailable(format!(
            "replica {} does not lead (the lease moved); try again",
            role.me
        ));
    }
    let Some((leader, base)) = role.leader_url() else {
        return unavailable("no replica leads right now (a take-over under way); try again".into());
    };
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, super::http::BODY_LIMIT).await {
        Ok(b) => b,
        Err(e) => {
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                axum::Json(ErrorBody {
                    error: format!("request body: {e}"),
                }),
            )
                .into_response()
        }
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_string(), |p| p.as_str().to_string());
    let url = format!("{}{}{path}", base.trim_end_matches('/'), PREFIX);
    let me = role.me.clone();
    let method = parts.method.clone();
    let auth = parts.headers.get(header::AUTHORIZATION).cloned();
    let ctype = parts.headers.get(header::CONTENT_TYPE).cloned();
    tracing::debug!(%method, %url, %leader, "forwarding an API call to the leader");
    let answer = tokio::task::spawn_blocking(move || {
        let mut b = ureq::http::Request::builder()
            .method(method.as_str())
            .uri(&url)
            .header(FORWARDED, me.as_str());
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION.as_str(), a.as_bytes());
        }
        if let Some(c) = ctype {
            b = b.header(header::CONTENT_TYPE.as_str(), c.as_bytes());
        }
        let req = b.body(body.to_vec()).map_err(|e| e.to_string())?;
        let mut resp = agent().run(req).map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let ctype = resp
            .headers()
            .get(header::CONTENT_TYPE.as_str())
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_vec()
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((status, ctype, body))
    })
    .await;
    match answer {
        Ok(Ok((status, ctype, body))) => {
            let mut r = Response::new(Body::from(body));
            *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            if let Some(c) = ctype.and_then(|c| HeaderValue::from_str(&c).ok()) {
                r.headers_mut().insert(header::CONTENT_TYPE, c);
            }
            if let Ok(v) = HeaderValue::from_str(&leader) {
                r.headers_mut().insert("x-ferry-leader", v);
            }
            r
        }
        Ok(Err(e)) => unavailable(format!("the leader ({leader}) did not answer: {e}")),
        Err(e) => unavailable(format!("forwarding failed: {e}")),
    }
}

fn agent() -> &'static ureq::Agent {
    static AGENT: std::sync::OnceLock<ureq::Agent> = std::sync::OnceLock::new();
    AGENT.get_or_init(|| {
        ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_connect(Some(Duration::from_secs(3)))
                .timeout_global(Some(Duration::from_secs(60)))
                .build(),
        )
    })
}
