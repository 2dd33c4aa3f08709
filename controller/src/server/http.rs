//! The HTTP JSON API (see `controller/API.md`). Every `/api/v1` route needs
//! `Authorization: Bearer <token>`; `/healthz` and `/metrics` do not. Bodies are parsed here
//! (strictly: unknown fields are errors) and every error is `{"error": "..."}` with a status
//! that says whose fault it is. The handlers only forward to the core loop.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use super::core::ApiError;
use super::metrics::Metrics;
use super::{Cmd, KeyOp, Reply};
use crate::api::{ErrorBody, RollbackRequest, StartRollout, PREFIX};

#[derive(Clone)]
pub struct AppState {
    pub cmd: mpsc::Sender<Cmd>,
    pub token: Arc<str>,
    pub metrics: Arc<Metrics>,
    /// Leading, or forwarding `/api/v1` to the leader (`forward.rs`).
    pub role: Arc<super::forward::Role>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

/// Release envelopes are at most 64 KiB (protocol); requests are small.
pub(crate) const BODY_LIMIT: usize = 128 * 1024;

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/devices", get(devices))
        .route("/devices/{id}", get(device))
        .route("/devices/{id}/telemetry", get(telemetry))
        .route("/devices/{id}/key", post(provision_key))
        .route("/devices/{id}/approve", post(approve_key))
        .route("/devices/{id}/revoke", post(revoke_key))
        .route("/keys", get(keys))
        .route("/releases", get(releases).post(push_release))
        .route("/rollouts", get(rollouts).post(start_rollout))
        .route("/rollouts/preview", post(preview_rollout))
        .route("/rollouts/{id}", get(rollout))
        .route("/rollouts/{id}/{op}", post(rollout_op))
        .route("/rollback", post(rollback))
        .fallback(|| async { ApiError::not_found("no such API route") })
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn_with_state(
            state.role.clone(),
            super::forward::forward,
        ))
        .layer(middleware::from_fn(super::etag::etag));
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(app_js))
        .route("/app.css", get(app_css))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .nest(PREFIX, api)
        .fallback(|| async { ApiError::not_found("not found") })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Constant-time comparison of the presented token.
fn token_ok(headers: &HeaderMap, token: &str) -> bool {
    let Some(got) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (a, b) = (got.as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(s): State<AppState>, req: Request, next: Next) -> Response {
    s.metrics.api_requests.inc();
    if !token_ok(req.headers(), &s.token) {
        s.metrics.api_errors.inc();
        debug!(path = %req.uri().path(), "API request without a valid token");
        return ApiError {
            status: 401,
            message: "missing or wrong bearer token (Authorization: Bearer <token>)".into(),
        }
        .into_response();
    }
    let resp = next.run(req).await;
    if !resp.status().is_success() {
        s.metrics.api_errors.inc();
    }
    resp
}

async fn call<T: Serialize>(
    s: &AppState,
    make: impl FnOnce(Reply<T>) -> Cmd,
) -> Result<Json<T>, ApiError> {
    let (tx, rx) = oneshot::channel();
    let unavailable = || ApiError {
        status: 503,
        message: "the controller is shutting down".into(),
    };
    s.cmd.send(make(tx)).await.map_err(|_| unavailable())?;
    rx.await.map_err(|_| unavailable())?.map(Json)
}

fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("request body: {e}")))
}

/// The console's page security: its own script and style only (no inline code, nothing from
/// elsewhere), no framing.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The console: static HTML and its script, which call the API with the token from the URL
/// fragment (`/#token=...`, never sent to the server, and taken out of the address bar on
/// load) or from a form; it is kept in the tab's sessionStorage.
async fn index() -> impl IntoResponse {
    static_file("text/html; charset=utf-8", include_str!("web/index.html"))
}

async fn app_js() -> impl IntoResponse {
    static_file("text/javascript; charset=utf-8", include_str!("web/app.js"))
}

async fn app_css() -> impl IntoResponse {
    static_file("text/css; charset=utf-8", include_str!("web/app.css"))
}

fn static_file(ctype: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, ctype),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    // Gauges are computed by the core on demand (a follower has none); counters are always
    // current.
    if s.role.is_leader() {
        let _ = call(&s, Cmd::Gauges).await;
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

#[derive(Deserialize)]
struct DevicesQuery {
    select: Option<String>,
    /// With it, one page (`DevicePage`); without, every device (an array).
    limit: Option<usize>,
    after: Option<String>,
}

async fn devices(State(s): State<AppState>, Query(q): Query<DevicesQuery>) -> Response {
    match q.limit {
        Some(limit) => call(&s, |r| Cmd::DevicePage(q.select, limit, q.after, r))
            .await
            .into_response(),
        None if q.after.is_some() => {
            ApiError::bad_request("after goes with limit".to_string()).into_response()
        }
        None => call(&s, |r| Cmd::Devices(q.select, r))
            .await
            .into_response(),
    }
}

async fn device(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    call(&s, |r| Cmd::Device(id, r)).await.into_response()
}

#[derive(Deserialize)]
struct TelemetryQuery {
    since: Option<String>,
    metric: Option<String>,
}

async fn telemetry(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<TelemetryQuery>,
) -> Response {
    let since = match q.since.as_deref().map(humantime::parse_duration) {
        None => std::time::Duration::from_secs(3600),
        Some(Ok(d)) => d,
        Some(Err(e)) => return ApiError::bad_request(format!("since: {e}")).into_response(),
    };
    call(&s, |reply| Cmd::Telemetry {
        device: id,
        since,
        metric: q.metric,
        reply,
    })
    .await
    .into_response()
}

async fn keys(State(s): State<AppState>) -> Response {
    call(&s, Cmd::Keys).await.into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvisionBody {
    public_key: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ApproveBody {
    #[serde(default)]
    keyid: Option<String>,
}

async fn provision_key(State(s): State<AppState>, Path(id): Path<String>, body: Bytes) -> Response {
    let b: ProvisionBody = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    call(&s, |r| Cmd::Key(id, KeyOp::Provision(b.public_key), r))
        .await
        .into_response()
}

async fn approve_key(State(s): State<AppState>, Path(id): Path<String>, body: Bytes) -> Response {
    let b: ApproveBody = if body.is_empty() {
        ApproveBody::default()
    } else {
        match parse_body(&body) {
            Ok(b) => b,
            Err(e) => return e.into_response(),
        }
    };
    call(&s, |r| Cmd::Key(id, KeyOp::Approve(b.keyid), r))
        .await
        .into_response()
}

async fn revoke_key(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    call(&s, |r| Cmd::Key(id, KeyOp::Revoke, r))
        .await
        .into_response()
}

async fn releases(State(s): State<AppState>) -> Response {
    call(&s, Cmd::Releases).await.into_response()
}

async fn push_release(State(s): State<AppState>, body: Bytes) -> Response {
    if body.is_empty() {
        return ApiError::bad_request("empty body: POST the release envelope").into_response();
    }
    let body = body.to_vec();
    call(&s, |r| Cmd::PushRelease(body, r))
        .await
        .into_response()
}

async fn rollouts(State(s): State<AppState>) -> Response {
    call(&s, Cmd::Rollouts).await.into_response()
}

async fn start_rollout(State(s): State<AppState>, body: Bytes) -> Response {
    let req: StartRollout = match parse_body(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match call(&s, |r| Cmd::StartRollout(req, r)).await {
        Ok(v) => (StatusCode::CREATED, v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn preview_rollout(State(s): State<AppState>, body: Bytes) -> Response {
    let req: StartRollout = match parse_body(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    call(&s, |r| Cmd::PreviewRollout(req, r))
        .await
        .into_response()
}

#[derive(Deserialize)]
struct RolloutQuery {
    /// `false`: leave out the per-device list (10,000 entries for a large fleet), for pollers
    /// that only need the state and the counts.
    devices: Option<bool>,
}

async fn rollout(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<RolloutQuery>,
) -> Response {
    let with_devices = q.devices.unwrap_or(true);
    call(&s, |r| Cmd::Rollout(id, with_devices, r))
        .await
        .into_response()
}

async fn rollout_op(State(s): State<AppState>, Path((id, op)): Path<(String, String)>) -> Response {
    let op: crate::api::RolloutOp = match op.parse() {
        Ok(op) => op,
        Err(e) => return ApiError::not_found(e).into_response(),
    };
    call(&s, |r| Cmd::RolloutOp(id, op, r))
        .await
        .into_response()
}

async fn rollback(State(s): State<AppState>, body: Bytes) -> Response {
    let req: RollbackRequest = match parse_body(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    call(&s, |r| Cmd::Rollback(req, r)).await.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_token_check() {
        let mut h = HeaderMap::new();
        assert!(!token_ok(&h, "secret-token-1234"));
        h.insert(
            header::AUTHORIZATION,
            "Bearer secret-token-1234".parse().unwrap(),
        );
        assert!(token_ok(&h, "secret-token-1234"));
        assert!(!token_ok(&h, "secret-token-1235"));
        assert!(!token_ok(&h, "secret-token-12345"));
        h.insert(
            header::AUTHORIZATION,
            "Basic secret-token-1234".parse().unwrap(),
        );
        assert!(!token_ok(&h, "secret-token-1234"));
    }
}
