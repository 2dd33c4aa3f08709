//! How the container engine gets an image without downloading it again: the agent serves its
//! content store read-only as a Registry v2 on a loopback port, and dockerd pulls
//! `127.0.0.1:<port>/<path>@<manifest digest>` from it (dockerd treats 127.0.0.0/8 as an
//! insecure registry by default, so plain HTTP needs no daemon configuration).
//!
//! Only what an import in progress offers is served: the offered manifest by digest, and the
//! blobs that manifest names. A blob the engine asks for that the store does not hold (the agent
//! predicted the engine had that layer, and it did not) is answered `404` and recorded as a miss;
//! the caller fetches it and imports again. Everything else is `404`. Range requests are
//! honoured. A TLS handshake (dockerd tries HTTPS first) gets the plain-HTTP `400` Go servers
//! give, so dockerd falls back to HTTP at once.
//!
//! Every path is served under the device's namespace
//! ([`crate::runtime::labels::image_namespace`]):
//! `127.0.0.1:<port>/ferry-<12 hex>/<path>@<digest>`. The names the engine records for an image
//! so tell which device's agent pulled it, and an agent removing an image takes away only its
//! own names ([`crate::runtime::docker::DockerRuntime::owning_names_under`]), never those of another
//! agent on the same engine nor the operator's.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::download::store::Store;

const MAX_HEAD: usize = 16 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// An image offered to the engine while it pulls.
#[derive(Clone, Debug)]
struct Offer {
    manifest_digest: String,
    media_type: String,
    blobs: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct Shared {
    /// repository path → offers (by manifest digest).
    offers: BTreeMap<String, BTreeMap<String, Offer>>,
    /// Offered blobs the engine asked for that the store does not hold.
    misses: BTreeSet<String>,
    /// Requests served (method, path, status), for tests and the debug log.
    served: u64,
}

/// The loopback registry. Cheap to clone.
#[derive(Clone, Debug)]
pub struct LocalRegistry {
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    /// Prefixed to every repository path offered (`<namespace>/<path>`), when set.
    namespace: Option<String>,
}

/// Withdraws its offer when dropped.
#[derive(Debug)]
pub struct OfferGuard {
    shared: Arc<Mutex<Shared>>,
    path: String,
    digest: String,
}

impl Drop for OfferGuard {
    fn drop(&mut self) {
        let mut s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = s.offers.get_mut(&self.path) {
            m.remove(&self.digest);
            if m.is_empty() {
                s.offers.remove(&self.path);
            }
        }
    }
}

impl LocalRegistry {
    /// Bind `addr` (a loopback address; port 0 picks one) and serve `store` until the runtime
    /// ends.
    pub async fn start(addr: &str, store: Arc<Store>) -> std::io::Result<LocalRegistry> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let reg = LocalRegistry {
            addr,
            shared: shared.clone(),
            namespace: None,
        };
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let (shared, store) = (shared.clone(), store.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve_conn(conn, &shared, &store).await {
                        tracing::debug!(error = %e, "local registry connection ended");
                    }
                });
            }
        });
        tracing::info!(%addr, "local registry for the container engine listening");
        Ok(reg)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Offer every path under `namespace` (see [`crate::runtime::labels::image_namespace`]).
    pub fn namespaced(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// The repository path the engine sees for `path`.
    fn repo(&self, path: &str) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{path}"),
            None => path.to_string(),
        }
    }

    /// What the engine pulls: `127.0.0.1:<port>/[<namespace>/]<path>@<digest>`.
    pub fn reference(&self, path: &str, digest: &str) -> String {
        format!("{}/{}@{digest}", self.addr, self.repo(path))
    }

    /// Offer an image under repository `path` until the guard drops.
    pub fn offer(
        &self,
        path: &str,
        manifest_digest: &str,
        media_type: &str,
        blobs: BTreeSet<String>,
    ) -> OfferGuard {
        let path = self.repo(path);
        let mut s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        s.offers.entry(path.clone()).or_default().insert(
            manifest_digest.to_string(),
            Offer {
                manifest_digest: manifest_digest.to_string(),
                media_type: media_type.to_string(),
                blobs,
            },
        );
        OfferGuard {
            shared: self.shared.clone(),
            path,
            digest: manifest_digest.to_string(),
        }
    }

    /// The misses recorded since the last call.
    pub fn take_misses(&self) -> BTreeSet<String> {
        std::mem::take(&mut self.shared.lock().unwrap_or_else(|e| e.into_inner()).misses)
    }

    pub fn served(&self) -> u64 {
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).served
    }
}

struct Head {
    method: String,
    path: String,
    range: Option<String>,
    close: bool,
}

/// Read one request head. `Ok(None)` on a clean end of the connection.
async fn read_head(conn: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<Head>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&buf[..end]).to_string();
            buf.drain(..end + 4);
            let mut lines = text.split("\r\n");
            let mut first = lines.next().unwrap_or("").split_whitespace();
            let method = first.next().unwrap_or("").to_string();
            let path = first.next().unwrap_or("").to_string();
            let version = first.next().unwrap_or("HTTP/1.1").to_string();
            let mut range = None;
            let mut close = version == "HTTP/1.0";
            for l in lines {
                if let Some((k, v)) = l.split_once(':') {
                    let (k, v) = (k.trim(), v.trim());
                    if k.eq_ignore_ascii_case("range") {
                        range = Some(v.to_string());
                    } else if k.eq_ignore_ascii_case("connection") {
                        close = v.eq_ignore_ascii_case("close");
                    }
                }
            }
            return Ok(Some(Head {
                method,
                path,
                range,
                close,
            }));
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(IO_TIMEOUT, conn.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "idle"))??;
        if n == 0 {
            return Ok(None);
        }
        if buf.is_empty() && chunk[0] == 0x16 {
            // A TLS ClientHello: answer as Go's net/http does, so the client falls back to HTTP.
            let _ = conn
                .write_all(b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
                .await;
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

enum Route {
    Base,
    Manifest { path: String, reference: String },
    Blob { path: String, digest: String },
    Unknown,
}

fn route(p: &str) -> Route {
    let p = p.split('?').next().unwrap_or("");
    if p == "/v2/" || p == "/v2" {
        return Route::Base;
    }
    let Some(rest) = p.strip_prefix("/v2/") else {
        return Route::Unknown;
    };
    for (marker, manifest) in [("/manifests/", true), ("/blobs/", false)] {
        if let Some(i) = rest.rfind(marker) {
            let (path, reference) = (&rest[..i], &rest[i + marker.len()..]);
            if path.is_empty() || reference.is_empty() || reference.contains('/') {
                return Route::Unknown;
            }
            return if manifest {
                Route::Manifest {
                    path: path.to_string(),
                    reference: reference.to_string(),
                }
            } else {
                Route::Blob {
                    path: path.to_string(),
                    digest: reference.to_string(),
                }
            };
        }
    }
    Route::Unknown
}

/// `bytes=N-` or `bytes=N-M` against a blob of `len` bytes → (start, end inclusive).
fn parse_range(v: &str, len: u64) -> Option<(u64, u64)> {
    let r = v.trim().strip_prefix("bytes=")?;
    let (a, b) = r.split_once('-')?;
    let start: u64 = a.trim().parse().ok()?;
    let end: u64 = if b.trim().is_empty() {
        len.checked_sub(1)?
    } else {
        b.trim().parse::<u64>().ok()?.min(len.checked_sub(1)?)
    };
    (start <= end && end < len).then_some((start, end))
}

async fn respond(
    conn: &mut TcpStream,
    status: u16,
    headers: &[(&str, String)],
    body: &[u8],
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        404 => "Not Found",
        405 => "Method Not Allowed",
        416 => "Range Not Satisfiable",
        _ => "Error",
    };
    let mut h =
        format!("HTTP/1.1 {status} {reason}\r\nDocker-Distribution-API-Version: registry/2.0\r\n");
    for (k, v) in headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    conn.write_all(h.as_bytes()).await?;
    if !head_only {
        conn.write_all(body).await?;
    }
    Ok(())
}

fn error_json(code: &str, message: &str) -> Vec<u8> {
    serde_json::json!({"errors": [{"code": code, "message": message}]})
        .to_string()
        .into_bytes()
}

async fn serve_conn(
    mut conn: TcpStream,
    shared: &Mutex<Shared>,
    store: &Store,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    while let Some(head) = read_head(&mut conn, &mut buf).await? {
        let head_only = head.method == "HEAD";
        if head.method != "GET" && !head_only {
            respond(
                &mut conn,
                405,
                &[],
                &error_json("UNSUPPORTED", "read-only"),
                false,
            )
            .await?;
            break;
        }
        let status = match route(&head.path) {
            Route::Base => {
                let h = [("Content-Type", "application/json".to_string())];
                respond(&mut conn, 200, &h, b"{}", head_only).await?;
                200
            }
            Route::Manifest { path, reference } => {
                let offer = {
                    let s = shared.lock().unwrap_or_else(|e| e.into_inner());
                    s.offers.get(&path).and_then(|m| m.get(&reference)).cloned()
                };
                match offer.and_then(|o| {
                    store
                        .read(&o.manifest_digest, ferry_registry::MAX_MANIFEST_BYTES)
                        .ok()
                        .map(|b| (o, b))
                }) {
                    Some((o, bytes)) => {
                        let h = [
                            ("Content-Type", o.media_type.clone()),
                            ("Docker-Content-Digest", o.manifest_digest.clone()),
                        ];
                        respond(&mut conn, 200, &h, &bytes, head_only).await?;
                        200
                    }
                    None => {
                        let body = error_json("MANIFEST_UNKNOWN", "manifest unknown");
                        respond(&mut conn, 404, &[], &body, head_only).await?;
                        404
                    }
                }
            }
            Route::Blob { path, digest } => {
                let offered = {
                    let s = shared.lock().unwrap_or_else(|e| e.into_inner());
                    s.offers
                        .get(&path)
                        .is_some_and(|m| m.values().any(|o| o.blobs.contains(&digest)))
                };
                let file = match (offered, store.blob_path(&digest)) {
                    (true, Ok(p)) => tokio::fs::File::open(&p).await.ok(),
                    _ => None,
                };
                match file {
                    Some(f) => {
                        serve_blob(&mut conn, f, &digest, head.range.as_deref(), head_only).await?
                    }
                    None => {
                        if offered {
                            tracing::info!(blob = %digest, "the engine asked for a layer the store does not hold");
                            shared
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .misses
                                .insert(digest.clone());
                        }
                        let body = error_json("BLOB_UNKNOWN", "blob unknown to registry");
                        respond(&mut conn, 404, &[], &body, head_only).await?;
                        404
                    }
                }
            }
            Route::Unknown => {
                let body = error_json("NAME_UNKNOWN", "unknown");
                respond(&mut conn, 404, &[], &body, head_only).await?;
                404
            }
        };
        {
            let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
            s.served += 1;
        }
        tracing::debug!(method = %head.method, path = %head.path, range = ?head.range, status, "local registry");
        if head.close {
            break;
        }
    }
    let _ = conn.shutdown().await;
    Ok(())
}

async fn serve_blob(
    conn: &mut TcpStream,
    mut file: tokio::fs::File,
    digest: &str,
    range: Option<&str>,
    head_only: bool,
) -> std::io::Result<u16> {
    let len = file.metadata().await?.len();
    let (status, start, end) = match range {
        None => (200, 0, len.saturating_sub(1)),
        Some(r) => match parse_range(r, len) {
            Some((s, e)) => (206, s, e),
            None => {
                let h = [("Content-Range", format!("bytes */{len}"))];
                respond(conn, 416, &h, b"", head_only).await?;
                return Ok(416);
            }
        },
    };
    let count = if len == 0 { 0 } else { end - start + 1 };
    let mut h = format!(
        "HTTP/1.1 {status} {}\r\nDocker-Distribution-API-Version: registry/2.0\r\nContent-Type: application/octet-stream\r\nDocker-Content-Digest: {digest}\r\nAccept-Ranges: bytes\r\nContent-Length: {count}\r\n",
        if status == 206 { "Partial Content" } else { "OK" }
    );
    if status == 206 {
        h.push_str(&format!("Content-Range: bytes {start}-{end}/{len}\r\n"));
    }
    h.push_str("\r\n");
    conn.write_all(h.as_bytes()).await?;
    if !head_only && count > 0 {
        file.seek(std::io::SeekFrom::Start(start)).await?;
        let mut limited = file.take(count);
        let copied = tokio::io::copy(&mut limited, conn).await?;
        if copied != count {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "blob shorter than its size",
            ));
        }
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(b: &[u8]) -> String {
        use sha2::Digest;
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
    }

    #[test]
    fn routes() {
        assert!(matches!(route("/v2/"), Route::Base));
        assert!(
            matches!(route("/v2/ferry/sensor/manifests/sha256:ab"), Route::Manifest { path, reference } if path == "ferry/sensor" && reference == "sha256:ab")
        );
        assert!(
            matches!(route("/v2/a/blobs/sha256:cd?x=1"), Route::Blob { path, digest } if path == "a" && digest == "sha256:cd")
        );
        assert!(matches!(route("/v2//blobs/x"), Route::Unknown));
        assert!(matches!(route("/etc/passwd"), Route::Unknown));
        assert_eq!(parse_range("bytes=10-", 100), Some((10, 99)));
        assert_eq!(parse_range("bytes=10-19", 100), Some((10, 19)));
        assert_eq!(parse_range("bytes=10-500", 100), Some((10, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=5-4", 100), None);
        assert_eq!(parse_range("items=0-", 100), None);
    }

    /// The client this crate's agent uses for the real registry reads the local one too: offered
    /// manifests and blobs (also from an offset), nothing else, misses recorded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_only_what_is_offered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let layer: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 256) as u8).collect();
        let layer_d = digest_of(&layer);
        store.put(&layer_d, &layer).unwrap();
        let missing_d = digest_of(b"not stored");
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": ferry_registry::DOCKER_MANIFEST,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": layer_d, "size": layer.len()},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": missing_d, "size": 10}]
        })
        .to_string()
        .into_bytes();
        let manifest_d = digest_of(&manifest);
        store.put(&manifest_d, &manifest).unwrap();
        let reg = LocalRegistry::start("127.0.0.1:0", store.clone())
            .await
            .unwrap();
        let repo = format!("{}/ferry/app", reg.addr());
        let client = ferry_registry::RegistryClient::new(vec![], vec![]);
        let (repo2, md, ld, xd) = (
            repo.clone(),
            manifest_d.clone(),
            layer_d.clone(),
            missing_d.clone(),
        );
        let c = client.clone();
        // Nothing is offered yet.
        let before = tokio::task::spawn_blocking(move || c.fetch_manifest_by_digest(&repo2, &md))
            .await
            .unwrap();
        assert!(before.is_err());
        let guard = reg.offer(
            "ferry/app",
            &manifest_d,
            ferry_registry::DOCKER_MANIFEST,
            [layer_d.clone(), missing_d.clone()].into(),
        );
        let (repo2, md) = (repo.clone(), manifest_d.clone());
        let got = tokio::task::spawn_blocking(move || {
            let m = client.fetch_manifest_by_digest(&repo2, &md)?;
            let full = client.fetch_blob(&repo2, &ld, 1 << 20)?;
            let mut s = client.open_blob(&repo2, &ld, 60_000, Duration::from_secs(5), 65536)?;
            let mut tail = Vec::new();
            let mut buf = [0u8; 8192];
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                tail.extend_from_slice(&buf[..n]);
            }
            let missing = client.fetch_blob(&repo2, &xd, 100);
            Ok::<_, ferry_registry::RegistryError>((m, full, s.status, tail, missing))
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(got.0.digest, manifest_d);
        assert_eq!(got.1, layer);
        assert_eq!(got.2, 206);
        assert_eq!(got.3, layer[60_000..]);
        assert!(got.4.is_err());
        assert_eq!(reg.take_misses(), [missing_d].into());
        assert!(reg.take_misses().is_empty());
        drop(guard);
        let c = ferry_registry::RegistryClient::new(vec![], vec![]);
        let after = tokio::task::spawn_blocking(move || c.fetch_blob(&repo, &layer_d, 1 << 20))
            .await
            .unwrap();
        assert!(after.is_err(), "withdrawn offers are not served");
    }

    #[tokio::test]
    async fn a_namespaced_registry_serves_its_offers_under_the_device_namespace_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": ferry_registry::DOCKER_MANIFEST,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": digest_of(b"{}"), "size": 2},
            "layers": []
        })
        .to_string()
        .into_bytes();
        let md = digest_of(&manifest);
        store.put(&md, &manifest).unwrap();
        let ns = crate::runtime::labels::image_namespace("Box 7/North");
        assert_eq!(ns.len(), 18, "{ns}");
        assert_ne!(ns, crate::runtime::labels::image_namespace("box 7/north"));
        assert!(crate::runtime::labels::is_image_namespace(&ns));
        let reg = LocalRegistry::start("127.0.0.1:0", store)
            .await
            .unwrap()
            .namespaced(ns.clone());
        let r = reg.reference("ferry/app", &md);
        assert_eq!(r, format!("{}/{ns}/ferry/app@{md}", reg.addr()));
        let _guard = reg.offer(
            "ferry/app",
            &md,
            ferry_registry::DOCKER_MANIFEST,
            BTreeSet::new(),
        );
        let c = ferry_registry::RegistryClient::new(vec![], vec![]);
        let (inside, plain) = (
            format!("{}/{ns}/ferry/app", reg.addr()),
            format!("{}/ferry/app", reg.addr()),
        );
        let md2 = md.clone();
        let (a, b) = tokio::task::spawn_blocking(move || {
            (
                c.fetch_manifest_by_digest(&inside, &md2),
                c.fetch_manifest_by_digest(&plain, &md2),
            )
        })
        .await
        .unwrap();
        assert_eq!(a.unwrap().digest, md);
        assert!(b.is_err(), "outside the namespace nothing is offered");
    }

    #[tokio::test]
    async fn a_tls_hello_gets_plain_http() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let reg = LocalRegistry::start("127.0.0.1:0", store).await.unwrap();
        let mut c = TcpStream::connect(reg.addr()).await.unwrap();
        c.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await.unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.unwrap();
        assert!(out.starts_with(b"HTTP/1.0 400 Bad Request"), "{out:?}");
    }
}
