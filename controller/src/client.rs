//! The CLI side of the API: a small blocking HTTP client (ureq) run off the async runtime.
//! Server errors come back as their `{"error"}` message, with the HTTP status.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::Args;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::{ErrorBody, PREFIX};
use crate::Failure;

#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// The controller's API address.
    #[arg(
        long,
        env = "FERRY_SERVER",
        default_value = "http://127.0.0.1:7878",
        value_name = "URL"
    )]
    pub server: String,
    /// File holding the API bearer token (or set FERRY_TOKEN).
    #[arg(long, env = "FERRY_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

impl ServerArgs {
    fn token(&self) -> anyhow::Result<String> {
        if let Some(f) = &self.token_file {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the token file {}", f.display()))?;
            return Ok(t.trim().to_string());
        }
        match std::env::var("FERRY_TOKEN") {
            Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
            _ => Err(Failure::Usage(
                "no API token: pass --token-file FILE or set FERRY_TOKEN_FILE / FERRY_TOKEN".into(),
            )
            .into()),
        }
    }
}

/// An API error answer.
#[derive(Debug, thiserror::Error)]
#[error("the controller answered {status}: {message}")]
pub struct ApiFailure {
    pub status: u16,
    pub message: String,
}

pub struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(args: &ServerArgs) -> anyhow::Result<Client> {
        let base = args.server.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Failure::Usage(format!(
                "--server {base:?}: expected http://HOST:PORT or https://HOST:PORT"
            ))
            .into());
        }
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(Duration::from_secs(60)))
            .user_agent(concat!("ferryctl/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Client {
            base,
            token: args.token()?,
            agent: ureq::Agent::new_with_config(config),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{PREFIX}{path}", self.base)
    }

    fn finish<T: DeserializeOwned>(
        &self,
        what: &str,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<T> {
        let mut resp =
            r.map_err(|e| anyhow!("cannot reach the controller at {}: {e}", self.base))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_vec()
            .with_context(|| format!("{what}: reading the answer"))?;
        if !(200..300).contains(&status) {
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body[..body.len().min(300)]).into());
            return Err(ApiFailure { status, message }.into());
        }
        serde_json::from_slice(&body).with_context(|| format!("{what}: unexpected answer"))
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let r = self
            .agent
            .get(self.url(path))
            .header("Authorization", format!("Bearer {}", self.token))
            .call();
        self.finish(path, r)
    }

    pub fn post_bytes<T: DeserializeOwned>(&self, path: &str, body: &[u8]) -> anyhow::Result<T> {
        let r = self
            .agent
            .post(self.url(path))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Content-Type", "application/json")
            .send(body);
        self.finish(path, r)
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let b = serde_json::to_vec(body).expect("request bodies serialize");
        self.post_bytes(path, &b)
    }
}

/// Run blocking client work off the async runtime.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow!("client task failed: {e}"))?
}

/// Percent-encode a query value.
pub fn query_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_escape() {
        assert_eq!(
            super::query_escape("group=beta,id in (a,b)"),
            "group%3Dbeta%2Cid%20in%20%28a%2Cb%29"
        );
    }
}
