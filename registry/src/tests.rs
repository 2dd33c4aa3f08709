//! Client tests against the in-process server in `testserver.rs`, serving canned manifests.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::testserver::{Request, Response, TestServer};
use super::*;

const REPO_PATH: &str = "ferry/sensor";

/// Canned content: `manifests/<ref>` and `blobs/<digest>` → (content type, bytes, announced digest).
#[derive(Default, Clone)]
struct Content {
    items: BTreeMap<String, (String, Vec<u8>, Option<String>)>,
}

impl Content {
    fn manifest(&mut self, reference: &str, media_type: &str, bytes: &[u8]) -> String {
        let d = sha256_digest(bytes);
        self.items.insert(
            format!("manifests/{reference}"),
            (media_type.to_string(), bytes.to_vec(), Some(d.clone())),
        );
        d
    }
    /// Serve a manifest under its own digest and under `tag`.
    fn tagged(&mut self, tag: &str, media_type: &str, bytes: &[u8]) -> String {
        let d = self.manifest(tag, media_type, bytes);
        self.manifest(&d, media_type, bytes);
        d
    }
    fn blob(&mut self, bytes: &[u8]) -> String {
        let d = sha256_digest(bytes);
        self.items.insert(
            format!("blobs/{d}"),
            ("application/octet-stream".into(), bytes.to_vec(), None),
        );
        d
    }
    fn respond(&self, req: &Request) -> Response {
        let prefix = format!("/v2/{REPO_PATH}/");
        let Some(rest) = req.path.strip_prefix(&prefix) else {
            return Response::new(404).body(r#"{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known to registry"}]}"#);
        };
        match self.items.get(rest) {
            Some((ct, bytes, digest)) => {
                let mut r = Response::new(200)
                    .header("Content-Type", ct)
                    .body(bytes.clone());
                if let Some(d) = digest {
                    r = r.header("Docker-Content-Digest", d);
                }
                r
            }
            None => Response::new(404)
                .body(r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#),
        }
    }
}

fn config(arch: &str, variant: Option<&str>) -> Vec<u8> {
    let mut c = serde_json::json!({"os": "linux", "architecture": arch, "rootfs": {"type": "layers", "diff_ids": []}});
    if let Some(v) = variant {
        c["variant"] = v.into();
    }
    c.to_string().into_bytes()
}

fn image_manifest(config_digest: &str, config_len: usize, layer_sizes: &[u64]) -> Vec<u8> {
    let layers: Vec<_> = layer_sizes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": sha256_digest(format!("layer{i}-{s}").as_bytes()),
                "size": s
            })
        })
        .collect();
    serde_json::to_vec_pretty(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_len},
        "layers": layers
    }))
    .unwrap()
}

/// A multi-arch fixture: arm64 (announced as arm64/v8), arm/v7 and an attestation entry,
/// tagged `2.0.0`. Returns (content, index digest, arm64 digest, armv7 digest).
fn multiarch() -> (Content, String, String, String) {
    let mut c = Content::default();
    let mut entries = vec![];
    let mut digests = vec![];
    for (arch, variant) in [("arm64", Some("v8")), ("arm", Some("v7"))] {
        let cfg = config(arch, variant);
        let cd = c.blob(&cfg);
        let m = image_manifest(&cd, cfg.len(), &[1000, 234]);
        let md = c.manifest(&sha256_digest(&m), OCI_MANIFEST, &m);
        entries.push(serde_json::json!({
            "mediaType": OCI_MANIFEST, "digest": md, "size": m.len(),
            "platform": {"os": "linux", "architecture": arch, "variant": variant}
        }));
        digests.push(md);
    }
    let att = b"{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"digest\":\"sha256:0000000000000000000000000000000000000000000000000000000000000000\",\"size\":1},\"layers\":[]}";
    let ad = c.manifest(&sha256_digest(att), OCI_MANIFEST, att);
    entries.push(serde_json::json!({
        "mediaType": OCI_MANIFEST, "digest": ad, "size": att.len(),
        "platform": {"os": "unknown", "architecture": "unknown"},
        "annotations": {"vnd.docker.reference.type": "attestation-manifest", "vnd.docker.reference.digest": digests[0]}
    }));
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries
    }))
    .unwrap();
    let id = c.tagged("2.0.0", OCI_INDEX, &index);
    (c, id, digests[0].clone(), digests[1].clone())
}

fn serve(content: Content) -> TestServer {
    TestServer::start(move |req| content.respond(req))
}

fn repo(s: &TestServer) -> String {
    format!("{}/{REPO_PATH}", s.host())
}

fn anon() -> RegistryClient {
    RegistryClient::new(vec![], vec![])
}

#[test]
fn fetch_by_digest_verifies_and_parses() {
    let (c, _, arm64, _) = multiarch();
    let s = serve(c);
    let m = anon().fetch_manifest_by_digest(&repo(&s), &arm64).unwrap();
    assert_eq!(m.digest, arm64);
    assert_eq!(sha256_digest(&m.bytes), arm64);
    assert_eq!(m.media_type, OCI_MANIFEST);
    assert_eq!(m.layers_total(), 1234);
    let ManifestKind::Image {
        config_size,
        layers,
        ..
    } = &m.kind
    else {
        panic!("not an image")
    };
    assert!(*config_size > 0);
    assert_eq!(layers.len(), 2);
    // It asked over plain HTTP with every manifest type in Accept.
    let r = &s.requests()[0];
    assert_eq!(r.path, format!("/v2/{REPO_PATH}/manifests/{arm64}"));
    let accept = r.header("accept").unwrap();
    for mt in [
        OCI_MANIFEST,
        OCI_INDEX,
        DOCKER_MANIFEST,
        DOCKER_MANIFEST_LIST,
    ] {
        assert!(accept.contains(mt), "{accept}");
    }
}

#[test]
fn digest_mismatch_refused() {
    let mut c = Content::default();
    let real = image_manifest(&sha256_digest(b"cfg"), 3, &[1]);
    let wanted = sha256_digest(b"something else entirely");
    // The registry serves `real` under a digest it does not hash to.
    c.items.insert(
        format!("manifests/{wanted}"),
        (OCI_MANIFEST.into(), real.clone(), Some(wanted.clone())),
    );
    // And a tag whose announced digest lies.
    c.items.insert(
        "manifests/1.0.0".into(),
        (OCI_MANIFEST.into(), real.clone(), Some(wanted.clone())),
    );
    let s = serve(c);
    let e = anon()
        .fetch_manifest_by_digest(&repo(&s), &wanted)
        .unwrap_err();
    match &e {
        RegistryError::DigestMismatch {
            expected,
            actual,
            registry,
            repo,
            ..
        } => {
            assert_eq!(expected, &wanted);
            assert_eq!(actual, &sha256_digest(&real));
            assert_eq!(registry, &s.host());
            assert_eq!(repo, REPO_PATH);
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    assert!(e.to_string().contains(&wanted) && e.to_string().contains("refusing"));
    let e = anon().resolve_tag(&repo(&s), "1.0.0").unwrap_err();
    assert!(matches!(e, RegistryError::DigestMismatch { .. }), "{e:?}");
    let e = anon().platform_digests(&repo(&s), "1.0.0").unwrap_err();
    assert!(matches!(e, RegistryError::DigestMismatch { .. }), "{e:?}");
}

#[test]
fn blob_digest_mismatch_refused() {
    let mut c = Content::default();
    let cfg = config("arm64", None);
    let fake = sha256_digest(b"not the config");
    c.items.insert(
        format!("blobs/{fake}"),
        ("application/octet-stream".into(), cfg.clone(), None),
    );
    let m = image_manifest(&fake, cfg.len(), &[5]);
    c.tagged("1.0.0", OCI_MANIFEST, &m);
    let s = serve(c);
    let e = anon().platform_digests(&repo(&s), "1.0.0").unwrap_err();
    assert!(
        matches!(e, RegistryError::DigestMismatch { ref expected, .. } if *expected == fake),
        "{e:?}"
    );
}

#[test]
fn index_resolution_gives_image_manifest_digests() {
    let (c, index, arm64, armv7) = multiarch();
    let s = serve(c);
    let client = anon();
    let r = client.resolve_tag(&repo(&s), "2.0.0").unwrap();
    assert_eq!(r.digest_of_tag, index);
    assert_eq!(r.manifest.media_type, OCI_INDEX);
    let ManifestKind::Index { entries } = &r.manifest.kind else {
        panic!("not an index")
    };
    assert_eq!(entries.len(), 3);
    assert!(entries[2].attestation);

    let p = client.platform_digests(&repo(&s), "2.0.0").unwrap();
    let want: BTreeMap<String, String> = [
        ("linux/arm64".to_string(), arm64.clone()),
        ("linux/arm/v7".to_string(), armv7.clone()),
    ]
    .into();
    assert_eq!(p, want);
    assert!(!p.values().any(|d| *d == index), "never the index digest");
    // The same by the index digest.
    assert_eq!(client.platform_digests(&repo(&s), &index).unwrap(), want);
}

#[test]
fn index_with_duplicate_platform_or_nested_index_refused() {
    let (mut c, _, arm64, _) = multiarch();
    let dup = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": arm64, "size": 1, "platform": {"os": "linux", "architecture": "arm64"}},
            {"mediaType": OCI_MANIFEST, "digest": arm64, "size": 1, "platform": {"os": "linux", "architecture": "aarch64"}}
        ]
    }))
    .unwrap();
    let dup_d = c.tagged("dup", OCI_INDEX, &dup);
    let nested = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": OCI_INDEX, "digest": dup_d, "size": 1, "platform": {"os": "linux", "architecture": "arm64"}}
        ]
    }))
    .unwrap();
    c.tagged("nested", OCI_INDEX, &nested);
    let s = serve(c);
    let e = anon().platform_digests(&repo(&s), "dup").unwrap_err();
    assert!(e.to_string().contains("twice"), "{e}");
    let e = anon().platform_digests(&repo(&s), "nested").unwrap_err();
    assert!(e.to_string().contains("nested"), "{e}");
}

#[test]
fn single_manifest_platform_from_config_blob() {
    let mut c = Content::default();
    let cfg = config("arm", Some("v7"));
    let cd = c.blob(&cfg);
    let m = image_manifest(&cd, cfg.len(), &[10, 20]);
    // Docker v2 schema 2 content type this time.
    let md = c.tagged("1.0.0", DOCKER_MANIFEST, &m);
    let s = serve(c);
    let p = anon().platform_digests(&repo(&s), "1.0.0").unwrap();
    assert_eq!(
        p,
        BTreeMap::from([("linux/arm/v7".to_string(), md.clone())])
    );
    assert!(s
        .requests()
        .iter()
        .any(|r| r.path == format!("/v2/{REPO_PATH}/blobs/{cd}")));
    let r = anon().resolve_tag(&repo(&s), "1.0.0").unwrap();
    assert_eq!(r.manifest.media_type, DOCKER_MANIFEST);
    assert_eq!(r.digest_of_tag, md);
}

#[test]
fn media_type_falls_back_to_body() {
    let mut c = Content::default();
    let m = image_manifest(&sha256_digest(b"c"), 1, &[1]);
    c.tagged("1.0.0", "application/octet-stream", &m);
    let s = serve(c);
    let r = anon().resolve_tag(&repo(&s), "1.0.0").unwrap();
    assert_eq!(r.manifest.media_type, OCI_MANIFEST);
}

#[test]
fn missing_docker_content_digest_uses_computed() {
    let mut c = Content::default();
    let m = image_manifest(&sha256_digest(b"c"), 1, &[1]);
    c.items
        .insert("manifests/t".into(), (OCI_MANIFEST.into(), m.clone(), None));
    let s = serve(c);
    let r = anon().resolve_tag(&repo(&s), "t").unwrap();
    assert_eq!(r.digest_of_tag, sha256_digest(&m));
}

fn basic_protected(content: Content, user: &'static str, pass: &'static str) -> TestServer {
    let want = format!("Basic {}", STANDARD.encode(format!("{user}:{pass}")));
    TestServer::start(move |req| {
        if req.header("authorization") == Some(want.as_str()) {
            content.respond(req)
        } else {
            Response::new(401)
                .header("WWW-Authenticate", "Basic realm=\"Registry Realm\"")
                .body(r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#)
        }
    })
}

#[test]
fn basic_auth() {
    let (c, _, arm64, _) = multiarch();
    let s = basic_protected(c, "alice", "s3cret");
    // Anonymous: refused with the registry's words.
    let e = anon()
        .fetch_manifest_by_digest(&repo(&s), &arm64)
        .unwrap_err();
    assert!(
        matches!(e, RegistryError::Unauthorized { status: 401, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("none are configured"), "{e}");
    let start = s.requests().len();
    // Right credentials, keyed by host:port.
    let ok = RegistryClient::new(
        vec![Credential {
            registry: s.host(),
            username: "alice".into(),
            password: "s3cret".into(),
        }],
        vec![],
    );
    let p = ok.platform_digests(&repo(&s), "2.0.0").unwrap();
    assert_eq!(p.len(), 2);
    // First request anonymous, then basic; afterwards the cached header is sent straight away.
    let reqs = s.requests();
    assert!(reqs[start].header("authorization").is_none());
    assert!(reqs[start + 1]
        .header("authorization")
        .unwrap()
        .starts_with("Basic "));
    let before = reqs.len();
    ok.fetch_manifest_by_digest(&repo(&s), &arm64).unwrap();
    assert_eq!(s.requests().len(), before + 1, "cached credentials reused");
    // Credentials keyed by host name only (any port), with a scheme prefix.
    let by_name = RegistryClient::new(
        vec![Credential {
            registry: "http://127.0.0.1/".into(),
            username: "alice".into(),
            password: "s3cret".into(),
        }],
        vec![],
    );
    by_name.fetch_manifest_by_digest(&repo(&s), &arm64).unwrap();
    // Wrong password: one retry, then a clear refusal.
    let bad = RegistryClient::new(
        vec![Credential {
            registry: s.host(),
            username: "alice".into(),
            password: "wrong".into(),
        }],
        vec![],
    );
    let e = bad.fetch_manifest_by_digest(&repo(&s), &arm64).unwrap_err();
    assert!(
        matches!(e, RegistryError::Unauthorized { status: 401, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("refused"), "{e}");
}

/// A registry with a token server on the same port: `/token` (basic creds required when
/// `need_creds`) hands out `tok-N`; manifests need the current token.
struct BearerRegistry {
    server: TestServer,
    token_requests: Arc<AtomicUsize>,
    current: Arc<Mutex<String>>,
}

fn bearer_registry(content: Content, need_creds: bool) -> BearerRegistry {
    let token_requests = Arc::new(AtomicUsize::new(0));
    let current = Arc::new(Mutex::new(String::new()));
    let (tr, cur) = (token_requests.clone(), current.clone());
    let creds = format!("Basic {}", STANDARD.encode("bob:pw"));
    let server = TestServer::start(move |req| {
        let host = req.header("host").unwrap_or("").to_string();
        if let Some(q) = req.path.strip_prefix("/token?") {
            let n = tr.fetch_add(1, Ordering::SeqCst) + 1;
            let scope_ok = q.contains("scope=repository%3Aferry%2Fsensor%3Apull")
                && q.contains("service=test-registry");
            if !scope_ok {
                return Response::new(400).body(format!("bad query {q}"));
            }
            if need_creds && req.header("authorization") != Some(creds.as_str()) {
                return Response::new(401).body("bad credentials");
            }
            let tok = format!("tok-{n}");
            *cur.lock().unwrap() = tok.clone();
            return Response::new(200)
                .header("Content-Type", "application/json")
                .body(serde_json::json!({"token": tok, "expires_in": 300}).to_string());
        }
        let want = format!("Bearer {}", cur.lock().unwrap());
        if req.header("authorization") == Some(want.as_str()) && want != "Bearer " {
            content.respond(req)
        } else {
            Response::new(401).header(
                "WWW-Authenticate",
                &format!(
                    "Bearer realm=\"http://{host}/token\",service=\"test-registry\",scope=\"repository:{REPO_PATH}:pull\""
                ),
            )
        }
    });
    BearerRegistry {
        server,
        token_requests,
        current,
    }
}

#[test]
fn bearer_token_flow() {
    let (c, _, arm64, armv7) = multiarch();
    let b = bearer_registry(c, true);
    let r = repo(&b.server);
    let client = RegistryClient::new(
        vec![Credential {
            registry: b.server.host(),
            username: "bob".into(),
            password: "pw".into(),
        }],
        vec![],
    );
    let p = client.platform_digests(&r, "2.0.0").unwrap();
    assert_eq!(p["linux/arm64"], arm64);
    assert_eq!(p["linux/arm/v7"], armv7);
    // One token for the repository, reused for the index, both children (cache).
    assert_eq!(b.token_requests.load(Ordering::SeqCst), 1);
    let token_req = b
        .server
        .requests()
        .into_iter()
        .find(|r| r.path.starts_with("/token"))
        .unwrap();
    assert!(token_req
        .header("authorization")
        .unwrap()
        .starts_with("Basic "));
    // A clone shares the cache.
    client.clone().fetch_manifest_by_digest(&r, &arm64).unwrap();
    assert_eq!(b.token_requests.load(Ordering::SeqCst), 1);
    // Token rotated server-side: the stale one gets a 401 and the client fetches a new one.
    *b.current.lock().unwrap() = "revoked".into();
    client.fetch_manifest_by_digest(&r, &armv7).unwrap();
    assert_eq!(b.token_requests.load(Ordering::SeqCst), 2);

    // Without credentials the token endpoint refuses: an Unauthorized naming the endpoint.
    let e = anon().fetch_manifest_by_digest(&r, &arm64).unwrap_err();
    assert!(
        matches!(e, RegistryError::Unauthorized { status: 401, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("token endpoint"), "{e}");
}

#[test]
fn anonymous_bearer_token() {
    let (c, _, arm64, _) = multiarch();
    let b = bearer_registry(c, false);
    let m = anon()
        .fetch_manifest_by_digest(&repo(&b.server), &arm64)
        .unwrap();
    assert_eq!(m.digest, arm64);
    let token_req = b
        .server
        .requests()
        .into_iter()
        .find(|r| r.path.starts_with("/token"))
        .unwrap();
    assert!(token_req.header("authorization").is_none());
}

#[test]
fn oversized_body_refused() {
    let big = vec![b' '; (MAX_MANIFEST_BYTES + 1) as usize];
    let d = sha256_digest(&big);
    let big2 = big.clone();
    let s = TestServer::start(move |req| {
        let r = Response::new(200)
            .header("Content-Type", OCI_MANIFEST)
            .body(big2.clone());
        if req.path.ends_with("/chunked") {
            r.chunked()
        } else {
            r
        }
    });
    let e = anon().fetch_manifest_by_digest(&repo(&s), &d).unwrap_err();
    assert!(
        matches!(e, RegistryError::TooLarge { limit, .. } if limit == MAX_MANIFEST_BYTES),
        "{e:?}"
    );
    // Without Content-Length the reader stops at the limit.
    let e = anon().resolve_tag(&repo(&s), "chunked").unwrap_err();
    assert!(matches!(e, RegistryError::TooLarge { .. }), "{e:?}");
    // A smaller configured cap applies too.
    let small = anon().with_max_manifest_bytes(1024);
    let e = small.resolve_tag(&repo(&s), "chunked").unwrap_err();
    assert!(
        matches!(e, RegistryError::TooLarge { limit: 1024, .. }),
        "{e:?}"
    );
}

#[test]
fn errors_carry_context() {
    let (c, _, _, _) = multiarch();
    let s = serve(c);
    let e = anon().resolve_tag(&repo(&s), "9.9.9").unwrap_err();
    match &e {
        RegistryError::NotFound {
            registry,
            repo,
            reference,
            status,
            message,
        } => {
            assert_eq!(registry, &s.host());
            assert_eq!(repo, REPO_PATH);
            assert_eq!(reference, "9.9.9");
            assert_eq!(*status, 404);
            assert!(message.contains("MANIFEST_UNKNOWN"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!e.is_transient());
    let s500 = TestServer::start(|_| Response::new(503).body("busy"));
    let e = anon().resolve_tag(&repo(&s500), "1").unwrap_err();
    assert!(
        matches!(e, RegistryError::Status { status: 503, .. }),
        "{e:?}"
    );
    assert!(e.is_transient());
    assert_eq!(e.status(), Some(503));
    // Nobody listening.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let e = anon()
        .resolve_tag(&format!("127.0.0.1:{port}/a/b"), "1")
        .unwrap_err();
    assert!(matches!(e, RegistryError::Transport { .. }), "{e:?}");
    assert!(e.is_transient());
    // Bad inputs never reach the network.
    assert!(matches!(
        anon().fetch_manifest_by_digest("127.0.0.1:1/a", "sha256:abc"),
        Err(RegistryError::InvalidReference { .. })
    ));
    assert!(matches!(
        anon().resolve_tag("127.0.0.1:1/a", "a/b"),
        Err(RegistryError::InvalidReference { .. })
    ));
}

#[test]
fn unsupported_schema1_refused() {
    let mut c = Content::default();
    let v1 = br#"{"schemaVersion":1,"name":"ferry/sensor","tag":"old","fsLayers":[]}"#;
    c.tagged(
        "old",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        v1,
    );
    let s = serve(c);
    let e = anon().resolve_tag(&repo(&s), "old").unwrap_err();
    assert!(
        matches!(e, RegistryError::UnsupportedMediaType { .. }),
        "{e:?}"
    );
}

#[test]
fn scheme_selection() {
    let c = RegistryClient::new(vec![], vec!["reg.lan:5000".into()]);
    assert_eq!(c.scheme_for("127.0.0.1:5055"), "http");
    assert_eq!(c.scheme_for("localhost:5000"), "http");
    assert_eq!(c.scheme_for("[::1]:5000"), "http");
    assert_eq!(c.scheme_for("reg.lan:5000"), "http");
    assert_eq!(c.scheme_for("reg.lan:443"), "https");
    assert_eq!(c.scheme_for("registry.example.com"), "https");
    assert!(!format!("{c:?}").is_empty());
}
