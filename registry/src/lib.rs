//! Ferry's Docker Registry HTTP API v2 client, shared by the agent and `ferryctl`.
//!
//! Everything it returns was hashed on arrival: a manifest fetched by digest is refused unless
//! the bytes served hash (SHA-256) to that digest, a tag's manifest is checked against the
//! `Docker-Content-Digest` the registry announced, and blobs are checked against their digest.
//!
//! The API is blocking (ureq); async callers use `tokio::task::spawn_blocking`. A client is cheap
//! to clone and clones share the token cache.
//!
//! ```no_run
//! use ferry_registry::RegistryClient;
//! let client = RegistryClient::new(vec![], vec![]);
//! let per_platform = client.platform_digests("127.0.0.1:5055/ferry/sensor", "1.0.0")?;
//! for (platform, digest) in &per_platform {
//!     println!("{platform} {digest}");
//! }
//! # Ok::<(), ferry_registry::RegistryError>(())
//! ```

mod auth;
mod blob;
mod error;
mod manifest;
mod reference;

#[cfg(any(test, feature = "testserver"))]
pub mod testserver;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use tracing::{debug, warn};

pub use auth::Credential;
pub use blob::{image_config, BlobStream, ImageConfig};
pub use error::RegistryError;
pub use manifest::{
    is_image_media_type, is_index_media_type, IndexEntry, Manifest, ManifestKind,
    ATTESTATION_PLATFORM, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, MANIFEST_ACCEPT, OCI_INDEX,
    OCI_MANIFEST,
};
pub use reference::{
    check_digest, check_tag, is_plain_http, normalize_platform, sha256_digest, ImageReference,
    Repository, DOCKER_HUB,
};

use auth::{parse_challenges, query_encode, Challenge};
use error::Ctx;

/// Largest manifest (or image config, or token response) accepted: 4 MiB.
pub const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one whole request, connect to last body byte.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Error bodies are only read this far, for their message.
const MAX_ERROR_BODY: u64 = 64 * 1024;

/// A tag resolved to the manifest it points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The digest of the manifest (or index) the tag points at, verified against the bytes.
    pub digest_of_tag: String,
    pub manifest: Manifest,
}

/// A Registry HTTP API v2 client. See the crate docs.
#[derive(Clone)]
pub struct RegistryClient {
    agent: ureq::Agent,
    creds: Vec<Credential>,
    insecure: Vec<String>,
    /// repository (`host/path`) → `Authorization` header value that worked.
    auth_cache: Arc<Mutex<HashMap<String, String>>>,
    max_manifest_bytes: u64,
}

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryClient")
            .field("creds", &self.creds)
            .field("insecure", &self.insecure)
            .field("max_manifest_bytes", &self.max_manifest_bytes)
            .finish_non_exhaustive()
    }
}

/// Per-request additions to a GET.
#[derive(Default)]
struct RequestExtra {
    /// `Range` header value.
    range: Option<String>,
    /// Per-read inactivity timeout instead of the whole-request bound (streamed blobs).
    read_timeout: Option<Duration>,
    /// Size of the connection's input buffer (what one socket read may take).
    input_buffer: Option<usize>,
}

/// What a successful GET returned.
struct Fetched {
    bytes: Vec<u8>,
    content_type: Option<String>,
    docker_digest: Option<String>,
}

impl RegistryClient {
    /// A client with `creds` per registry host, speaking plain HTTP to `localhost`,
    /// `127.0.0.0/8`, `[::1]` and the hosts in `insecure_registries` (`host` or `host:port`),
    /// HTTPS (ring-backed rustls, webpki roots) to everything else.
    pub fn new(creds: Vec<Credential>, insecure_registries: Vec<String>) -> RegistryClient {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(REQUEST_TIMEOUT))
            .max_redirects(5)
            .user_agent(concat!("ferry-registry/", env!("CARGO_PKG_VERSION")))
            .build();
        RegistryClient {
            agent: ureq::Agent::new_with_config(config),
            creds,
            insecure: insecure_registries,
            auth_cache: Arc::new(Mutex::new(HashMap::new())),
            max_manifest_bytes: MAX_MANIFEST_BYTES,
        }
    }

    /// Lower (or raise) the manifest size cap, e.g. on small devices.
    pub fn with_max_manifest_bytes(mut self, limit: u64) -> RegistryClient {
        self.max_manifest_bytes = limit;
        self
    }

    /// `http` or `https` for a registry host.
    pub fn scheme_for(&self, registry: &str) -> &'static str {
        if is_plain_http(registry, &self.insecure) {
            "http"
        } else {
            "https"
        }
    }

    /// GET `/v2/<path>/manifests/<digest>` and refuse it unless its SHA-256 equals `digest`.
    /// `repo` is `host[:port]/path`.
    pub fn fetch_manifest_by_digest(
        &self,
        repo: &str,
        digest: &str,
    ) -> Result<Manifest, RegistryError> {
        let repository = Repository::parse(repo)?;
        check_digest(digest).map_err(|message| RegistryError::InvalidReference {
            reference: format!("{repo}@{digest}"),
            message,
        })?;
        let ctx = ctx(&repository, digest);
        let f = self.get(
            &repository,
            &ctx,
            &format!("manifests/{digest}"),
            Some(MANIFEST_ACCEPT),
            self.max_manifest_bytes,
        )?;
        let actual = sha256_digest(&f.bytes);
        if actual != digest {
            return Err(ctx.mismatch(digest, &actual));
        }
        parse_manifest(&ctx, actual, f.bytes, f.content_type.as_deref())
    }

    /// GET `/v2/<path>/manifests/<tag>`; the digest is computed over the bytes received and must
    /// equal the registry's `Docker-Content-Digest` when it sends one. A `sha256:` digest in
    /// place of the tag fetches by digest.
    pub fn resolve_tag(&self, repo: &str, tag: &str) -> Result<Resolved, RegistryError> {
        if tag.starts_with("sha256:") {
            let manifest = self.fetch_manifest_by_digest(repo, tag)?;
            return Ok(Resolved {
                digest_of_tag: manifest.digest.clone(),
                manifest,
            });
        }
        let repository = Repository::parse(repo)?;
        check_tag(tag).map_err(|message| RegistryError::InvalidReference {
            reference: format!("{repo}:{tag}"),
            message,
        })?;
        let ctx = ctx(&repository, tag);
        let f = self.get(
            &repository,
            &ctx,
            &format!("manifests/{tag}"),
            Some(MANIFEST_ACCEPT),
            self.max_manifest_bytes,
        )?;
        let actual = sha256_digest(&f.bytes);
        match f.docker_digest.as_deref() {
            Some(announced) if announced.starts_with("sha256:") => {
                if announced != actual {
                    return Err(ctx.mismatch(announced, &actual));
                }
            }
            Some(other) => warn!(
                registry = %repository.registry, repo = %repository.path, tag,
                "Docker-Content-Digest {other:?} is not sha256; using the computed digest"
            ),
            None => debug!(
                registry = %repository.registry, repo = %repository.path, tag,
                "no Docker-Content-Digest header; using the computed digest"
            ),
        }
        let manifest = parse_manifest(&ctx, actual.clone(), f.bytes, f.content_type.as_deref())?;
        Ok(Resolved {
            digest_of_tag: actual,
            manifest,
        })
    }

    /// The IMAGE manifest digest of every platform `tag` (or a `sha256:` digest) provides.
    ///
    /// For an index: each entry's platform, skipping attestation entries (`unknown/unknown`);
    /// each entry's manifest is fetched and verified to be an image manifest; the index digest
    /// itself is never returned. For a single image manifest: the platform named by its config
    /// blob (fetched and digest-checked), mapped to the manifest's own digest.
    pub fn platform_digests(
        &self,
        repo: &str,
        tag: &str,
    ) -> Result<BTreeMap<String, String>, RegistryError> {
        let resolved = self.resolve_tag(repo, tag)?;
        let repository = Repository::parse(repo)?;
        let ctx = ctx(&repository, tag);
        let mut out = BTreeMap::new();
        match &resolved.manifest.kind {
            ManifestKind::Index { entries } => {
                for e in entries {
                    if e.attestation {
                        debug!(digest = %e.digest, "skipping attestation entry");
                        continue;
                    }
                    if out.contains_key(&e.platform) {
                        return Err(ctx.malformed(format!(
                            "the index lists platform {} twice; refusing to guess",
                            e.platform
                        )));
                    }
                    let child = self.fetch_manifest_by_digest(repo, &e.digest)?;
                    if child.is_index() {
                        return Err(ctx.malformed(format!(
                            "the index entry for {} ({}) is itself an index; nested indexes are not supported",
                            e.platform, e.digest
                        )));
                    }
                    out.insert(e.platform.clone(), e.digest.clone());
                }
                if out.is_empty() {
                    return Err(ctx.malformed("the index lists no runnable platform"));
                }
            }
            ManifestKind::Image { config_digest, .. } => {
                let config = self.fetch_blob(repo, config_digest, self.max_manifest_bytes)?;
                let platform = manifest::config_platform(&config)
                    .map_err(|m| ctx.malformed(format!("config {config_digest}: {m}")))?;
                out.insert(platform, resolved.digest_of_tag.clone());
            }
        }
        Ok(out)
    }

    /// GET `/v2/<path>/blobs/<digest>` (at most `limit` bytes) and refuse it unless its SHA-256
    /// equals `digest`. Meant for small blobs such as image configs.
    pub fn fetch_blob(
        &self,
        repo: &str,
        digest: &str,
        limit: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        let repository = Repository::parse(repo)?;
        check_digest(digest).map_err(|message| RegistryError::InvalidReference {
            reference: format!("{repo}@{digest}"),
            message,
        })?;
        let ctx = ctx(&repository, digest);
        let f = self.get(&repository, &ctx, &format!("blobs/{digest}"), None, limit)?;
        let actual = sha256_digest(&f.bytes);
        if actual != digest {
            return Err(ctx.mismatch(digest, &actual));
        }
        Ok(f.bytes)
    }

    fn credential_for(&self, registry: &str) -> Option<&Credential> {
        let want = reference::normalize_registry(registry);
        let (want_name, _) = reference::split_host_port(&want);
        let exact = self
            .creds
            .iter()
            .find(|c| reference::normalize_registry(&c.registry) == want);
        exact.or_else(|| {
            self.creds.iter().find(|c| {
                let n = reference::normalize_registry(&c.registry);
                let (name, port) = reference::split_host_port(&n);
                port.is_none() && name == want_name
            })
        })
    }

    fn cached_auth(&self, key: &str) -> Option<String> {
        self.auth_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    fn store_auth(&self, key: &str, value: Option<String>) {
        let mut cache = self.auth_cache.lock().unwrap_or_else(|e| e.into_inner());
        match value {
            Some(v) => cache.insert(key.to_string(), v),
            None => cache.remove(key),
        };
    }

    fn send(
        &self,
        url: &str,
        accept: Option<&str>,
        authorization: Option<&str>,
        extra: &RequestExtra,
        ctx: &Ctx,
    ) -> Result<ureq::http::Response<ureq::Body>, RegistryError> {
        let mut req = self.agent.get(url);
        if let Some(a) = accept {
            req = req.header("Accept", a);
        }
        if let Some(a) = authorization {
            req = req.header("Authorization", a);
        }
        if let Some(r) = &extra.range {
            req = req.header("Range", r);
        }
        let req = match extra.read_timeout {
            // A streamed body has no overall deadline; a read that waits longer than this for
            // the next byte fails instead (the caller resumes from what it has).
            Some(t) => req
                .config()
                .timeout_global(None)
                .timeout_connect(Some(CONNECT_TIMEOUT.min(t.max(Duration::from_secs(1)))))
                .timeout_per_read(Some(t))
                .input_buffer_size(extra.input_buffer.unwrap_or(128 * 1024))
                .build(),
            None => req,
        };
        req.call().map_err(|e| transport_error(ctx, url, e))
    }

    /// GET `/v2/<path>/<suffix>` with the auth dance: anonymous (or the cached authorization)
    /// first; on 401 answer the challenge (Basic or Bearer) once and retry. Returns the live
    /// response of a `200` (or `206` when `extra.range` asked for part of it), its body unread.
    fn open(
        &self,
        repo: &Repository,
        ctx: &Ctx,
        suffix: &str,
        accept: Option<&str>,
        extra: &RequestExtra,
    ) -> Result<ureq::http::Response<ureq::Body>, RegistryError> {
        let url = format!(
            "{}://{}/v2/{}/{}",
            self.scheme_for(&repo.registry),
            repo.api_host(),
            repo.path,
            suffix
        );
        let key = repo.full();
        let mut authorization = self.cached_auth(&key);
        let mut answered_challenge = false;
        loop {
            debug!(%url, authenticated = authorization.is_some(), range = ?extra.range, "GET");
            let mut resp = self.send(&url, accept, authorization.as_deref(), extra, ctx)?;
            let status = resp.status().as_u16();
            match status {
                200 => return Ok(resp),
                206 if extra.range.is_some() => return Ok(resp),
                401 if !answered_challenge => {
                    let challenges: Vec<Challenge> = resp
                        .headers()
                        .get_all("www-authenticate")
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .flat_map(parse_challenges)
                        .collect();
                    let value = self.answer_challenge(repo, ctx, &challenges)?;
                    self.store_auth(&key, Some(value.clone()));
                    authorization = Some(value);
                    answered_challenge = true;
                }
                401 | 403 => {
                    self.store_auth(&key, None);
                    let msg = error_message(&mut resp);
                    return Err(ctx.unauthorized(
                        status,
                        if answered_challenge {
                            format!("credentials or token refused: {msg}")
                        } else {
                            msg
                        },
                    ));
                }
                404 => return Err(ctx.not_found(status, error_message(&mut resp))),
                _ => return Err(ctx.status(status, error_message(&mut resp))),
            }
        }
    }

    /// [`RegistryClient::open`] and read the whole body (at most `limit` bytes).
    fn get(
        &self,
        repo: &Repository,
        ctx: &Ctx,
        suffix: &str,
        accept: Option<&str>,
        limit: u64,
    ) -> Result<Fetched, RegistryError> {
        let mut resp = self.open(repo, ctx, suffix, accept, &RequestExtra::default())?;
        let content_type = header(&resp, "content-type");
        let docker_digest = header(&resp, "docker-content-digest");
        let bytes = read_limited(&mut resp, limit, ctx)?;
        Ok(Fetched {
            bytes,
            content_type,
            docker_digest,
        })
    }

    /// An `Authorization` header value answering one of `challenges`.
    fn answer_challenge(
        &self,
        repo: &Repository,
        ctx: &Ctx,
        challenges: &[Challenge],
    ) -> Result<String, RegistryError> {
        let cred = self.credential_for(&repo.registry);
        if let Some(c) = challenges.iter().find(|c| c.scheme == "bearer") {
            return self.fetch_token(repo, ctx, c, cred);
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            return match cred {
                Some(c) => Ok(basic(c)),
                None => Err(ctx.unauthorized(
                    401,
                    format!(
                        "the registry wants basic credentials and none are configured for {}",
                        repo.registry
                    ),
                )),
            };
        }
        let schemes: Vec<&str> = challenges.iter().map(|c| c.scheme.as_str()).collect();
        Err(ctx.unauthorized(
            401,
            format!("no supported WWW-Authenticate challenge (got {schemes:?})"),
        ))
    }

    /// The token flow: GET realm?service=..&scope=.. (with basic credentials when configured).
    fn fetch_token(
        &self,
        repo: &Repository,
        ctx: &Ctx,
        challenge: &Challenge,
        cred: Option<&Credential>,
    ) -> Result<String, RegistryError> {
        let realm = challenge
            .params
            .get("realm")
            .ok_or_else(|| ctx.unauthorized(401, "Bearer challenge without realm"))?;
        let realm_host = realm
            .strip_prefix("https://")
            .map(|r| (r, true))
            .or_else(|| realm.strip_prefix("http://").map(|r| (r, false)));
        let Some((rest, tls)) = realm_host else {
            return Err(
                ctx.unauthorized(401, format!("token realm {realm:?} is not an http(s) URL"))
            );
        };
        let host = rest.split(['/', '?', '#']).next().unwrap_or("");
        let mut url = realm.clone();
        let mut sep = if url.contains('?') { '&' } else { '?' };
        if let Some(service) = challenge.params.get("service") {
            url.push_str(&format!("{sep}service={}", query_encode(service)));
            sep = '&';
        }
        let scope = challenge
            .params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| format!("repository:{}:pull", repo.path));
        url.push_str(&format!("{sep}scope={}", query_encode(&scope)));
        let mut authorization = None;
        if let Some(c) = cred {
            if tls || is_plain_http(host, &self.insecure) {
                authorization = Some(basic(c));
            } else {
                warn!(realm = %realm, "not sending registry credentials to a plain-HTTP token realm");
            }
        }
        debug!(%url, with_credentials = authorization.is_some(), "fetching registry token");
        let mut resp = self.send(
            &url,
            None,
            authorization.as_deref(),
            &RequestExtra::default(),
            ctx,
        )?;
        let status = resp.status().as_u16();
        if status != 200 {
            let msg = error_message(&mut resp);
            return Err(ctx.unauthorized(status, format!("token endpoint {realm}: {msg}")));
        }
        let body = read_limited(&mut resp, MAX_MANIFEST_BYTES, ctx)?;
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            ctx.malformed(format!(
                "token endpoint {realm}: response is not token JSON: {e}"
            ))
        })?;
        match t.token.or(t.access_token).filter(|t| !t.is_empty()) {
            Some(tok) => Ok(format!("Bearer {tok}")),
            None => {
                Err(ctx.unauthorized(status, format!("token endpoint {realm} returned no token")))
            }
        }
    }
}

fn ctx(repo: &Repository, reference: &str) -> Ctx {
    Ctx {
        registry: repo.registry.clone(),
        repo: repo.path.clone(),
        reference: reference.to_string(),
    }
}

fn basic(c: &Credential) -> String {
    format!(
        "Basic {}",
        STANDARD.encode(format!("{}:{}", c.username, c.password))
    )
}

fn header(resp: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
}

fn parse_manifest(
    ctx: &Ctx,
    digest: String,
    bytes: Vec<u8>,
    content_type: Option<&str>,
) -> Result<Manifest, RegistryError> {
    manifest::parse(digest, bytes, content_type).map_err(|e| match e {
        manifest::ParseError::Unsupported(mt) => ctx.unsupported(&mt),
        manifest::ParseError::Malformed(m) => ctx.malformed(m),
    })
}

fn read_limited(
    resp: &mut ureq::http::Response<ureq::Body>,
    limit: u64,
    ctx: &Ctx,
) -> Result<Vec<u8>, RegistryError> {
    if let Some(len) = resp.body().content_length() {
        if len > limit {
            return Err(ctx.too_large(limit));
        }
    }
    resp.body_mut()
        .with_config()
        .limit(limit)
        .read_to_vec()
        .map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => ctx.too_large(limit),
            other => ctx.transport(format!("reading the response: {other}")),
        })
}

/// The registry's error message (`{"errors":[{"code","message"}]}`) or a short body excerpt.
fn error_message(resp: &mut ureq::http::Response<ureq::Body>) -> String {
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_ERROR_BODY)
        .read_to_vec()
        .unwrap_or_default();
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorItem>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorItem {
        code: Option<String>,
        message: Option<String>,
    }
    if let Ok(e) = serde_json::from_slice::<Errors>(&body) {
        let parts: Vec<String> = e
            .errors
            .into_iter()
            .map(|i| match (i.code, i.message) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(c), None) => c,
                (None, Some(m)) => m,
                (None, None) => "error".into(),
            })
            .collect();
        if !parts.is_empty() {
            return parts.join("; ");
        }
    }
    let text = String::from_utf8_lossy(&body);
    let text = text.trim();
    if text.is_empty() {
        "(no body)".to_string()
    } else {
        text.chars().take(300).collect()
    }
}

fn transport_error(ctx: &Ctx, url: &str, e: ureq::Error) -> RegistryError {
    let text = e.to_string();
    let tls_trouble = matches!(e, ureq::Error::Tls(_) | ureq::Error::Rustls(_))
        || [
            "certificate",
            "tls",
            "InvalidContentType",
            "corrupt message",
        ]
        .iter()
        .any(|w| text.contains(w));
    let hint = if url.starts_with("https://") && tls_trouble {
        " (TLS failed: a plain-HTTP registry must be listed as insecure; certificates are checked against the webpki roots)"
    } else {
        ""
    };
    ctx.transport(format!("GET {url}: {text}{hint}"))
}

#[cfg(test)]
mod tests;
