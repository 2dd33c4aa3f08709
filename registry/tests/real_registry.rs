//! Against the REAL docker-registry at 127.0.0.1:5055 (scripts/env-up.sh), holding the sample
//! images pushed by `images/build.sh 127.0.0.1:5055`: `ferry/sensor:{1.0.0,2.0.0,3.0.0}`
//! (multi-arch indexes with linux/arm64 and linux/arm/v7) and the per-platform tags
//! `V-arm64` / `V-armv7`.
//!
//! Skips (loudly) only when FERRY_REQUIRE_INFRA is unset and the registry does not answer;
//! with FERRY_REQUIRE_INFRA=1 a missing registry fails the test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use ferry_registry::{ManifestKind, RegistryClient, RegistryError};

const REGISTRY: &str = "127.0.0.1:5055";
const REPO: &str = "127.0.0.1:5055/ferry/sensor";

/// Does `GET /v2/` answer with an HTTP status line?
fn registry_answers() -> bool {
    let addr: SocketAddr = REGISTRY.parse().unwrap();
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    if s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1:5055\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 12];
    matches!(s.read(&mut buf), Ok(n) if n >= 12 && buf.starts_with(b"HTTP/1."))
}

/// `true` when the test may run; `false` (after a loud message) when it must skip.
fn infra_or_skip() -> bool {
    if registry_answers() {
        return true;
    }
    let required =
        std::env::var_os("FERRY_REQUIRE_INFRA").is_some_and(|v| !v.is_empty() && v != "0");
    if required {
        panic!("FERRY_REQUIRE_INFRA is set but the registry at http://{REGISTRY}/v2/ does not answer; run scripts/env-up.sh and images/build.sh {REGISTRY}");
    }
    eprintln!();
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!("!! SKIPPED: no registry answers at http://{REGISTRY}/v2/");
    eprintln!(
        "!! run scripts/env-up.sh && images/build.sh {REGISTRY}, or set FERRY_REQUIRE_INFRA=1"
    );
    eprintln!("!! to make this a failure.");
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    false
}

fn hint(e: &RegistryError) -> String {
    format!("{e}\n(are the sample images pushed? run: images/build.sh {REGISTRY})")
}

#[test]
fn multiarch_tags_resolve_to_per_platform_image_manifests() {
    if !infra_or_skip() {
        return;
    }
    let client = RegistryClient::new(vec![], vec![]);
    for version in ["1.0.0", "2.0.0", "3.0.0"] {
        let resolved = client
            .resolve_tag(REPO, version)
            .unwrap_or_else(|e| panic!("{}", hint(&e)));
        assert!(
            resolved.manifest.is_index(),
            "{REPO}:{version} should be a multi-arch index, got {}",
            resolved.manifest.media_type
        );
        let platforms = client
            .platform_digests(REPO, version)
            .unwrap_or_else(|e| panic!("{}", hint(&e)));
        let names: Vec<&str> = platforms.keys().map(String::as_str).collect();
        assert_eq!(names, ["linux/arm/v7", "linux/arm64"], "{version}");
        for (platform, digest) in &platforms {
            assert_ne!(digest, &resolved.digest_of_tag, "never the index digest");
            let m = client
                .fetch_manifest_by_digest(REPO, digest)
                .unwrap_or_else(|e| panic!("{platform}: {e}"));
            assert_eq!(&m.digest, digest);
            match &m.kind {
                ManifestKind::Image { layers, .. } => {
                    assert!(!layers.is_empty(), "{platform} has no layers");
                    assert!(m.layers_total() > 0);
                }
                ManifestKind::Index { .. } => panic!("{platform} resolved to an index"),
            }
        }
        // The index digest fetches by digest, too, and verifies.
        let again = client
            .fetch_manifest_by_digest(REPO, &resolved.digest_of_tag)
            .unwrap();
        assert_eq!(again.bytes, resolved.manifest.bytes);
    }
}

#[test]
fn single_platform_tags_resolve_via_config() {
    if !infra_or_skip() {
        return;
    }
    let client = RegistryClient::new(vec![], vec![]);
    let index = client
        .platform_digests(REPO, "1.0.0")
        .unwrap_or_else(|e| panic!("{}", hint(&e)));
    for (tag, platform) in [
        ("1.0.0-arm64", "linux/arm64"),
        ("1.0.0-armv7", "linux/arm/v7"),
    ] {
        let p = client
            .platform_digests(REPO, tag)
            .unwrap_or_else(|e| panic!("{}", hint(&e)));
        assert_eq!(p.len(), 1, "{tag}: {p:?}");
        let (name, digest) = p.iter().next().unwrap();
        assert_eq!(name, platform, "{tag}");
        // The per-platform tag is the very manifest the index lists (build.sh pushes both).
        assert_eq!(Some(digest), index.get(platform), "{tag}");
    }
}

#[test]
fn unknown_tag_and_digest_are_errors() {
    if !infra_or_skip() {
        return;
    }
    let client = RegistryClient::new(vec![], vec![]);
    let e = client.resolve_tag(REPO, "0.0.0-nope").unwrap_err();
    assert!(
        matches!(e, RegistryError::NotFound { status: 404, .. }),
        "{e:?}"
    );
    let missing = format!("sha256:{}", "0".repeat(64));
    let e = client.fetch_manifest_by_digest(REPO, &missing).unwrap_err();
    assert!(matches!(e, RegistryError::NotFound { .. }), "{e:?}");
}
