//! Against the REAL docker-registry at 127.0.0.1:5055 (scripts/env-up.sh; `FERRY_REGISTRY_ADDR`
//! overrides, as there), holding the sample
//! images pushed by `images/build.sh 127.0.0.1:5055`: `ferry/sensor:{1.0.0,2.0.0,3.0.0}`
//! (multi-arch indexes with linux/arm64 and linux/arm/v7) and the per-platform tags
//! `V-arm64` / `V-armv7`.
//!
//! Skips (loudly) only when FERRY_REQUIRE_INFRA is unset and the registry does not answer;
//! with FERRY_REQUIRE_INFRA=1 a missing registry fails the test.

use std::io::Write;

use ferry_registry::{ManifestKind, RegistryClient, RegistryError};

/// `FERRY_REGISTRY_ADDR` (as in scripts/env-up.sh), default 127.0.0.1:5055.
fn registry() -> String {
    std::env::var("FERRY_REGISTRY_ADDR")
        .ok()
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| "127.0.0.1:5055".to_string())
}

fn repo() -> String {
    format!("{}/ferry/sensor", registry())
}

#[path = "../../tests/common/registry_probe.rs"]
mod registry_probe;

/// Does `GET /v2/` on the test registry answer with an HTTP status line?
fn registry_answers() -> bool {
    registry_probe::registry_answers(&registry())
}

/// `true` when the test may run; `false` (after a loud message) when it must skip.
fn infra_or_skip() -> bool {
    if registry_answers() {
        return true;
    }
    let required =
        std::env::var_os("FERRY_REQUIRE_INFRA").is_some_and(|v| !v.is_empty() && v != "0");
    if required {
        panic!(
            "FERRY_REQUIRE_INFRA is set but the registry at http://{0}/v2/ does not answer; \
             run scripts/env-up.sh and images/build.sh {0}",
            registry()
        );
    }
    // Straight to the stderr handle: libtest captures eprintln! of passing tests, and a skip
    // must be seen.
    let bar = "!".repeat(80);
    let _ = writeln!(
        std::io::stderr(),
        "\n{bar}\n!! SKIPPED: {}\n!! run scripts/env-up.sh && images/build.sh {}, or set FERRY_REQUIRE_INFRA=1\n!! to make this a failure.\n{bar}",
        format_args!("no registry answers at http://{}/v2/", registry()),
        registry()
    );
    false
}

fn hint(e: &RegistryError) -> String {
    format!(
        "{e}\n(are the sample images pushed? run: images/build.sh {})",
        registry()
    )
}

#[test]
fn multiarch_tags_resolve_to_per_platform_image_manifests() {
    if !infra_or_skip() {
        return;
    }
    let client = RegistryClient::new(vec![], vec![]);
    for version in ["1.0.0", "2.0.0", "3.0.0"] {
        let resolved = client
            .resolve_tag(&repo(), version)
            .unwrap_or_else(|e| panic!("{}", hint(&e)));
        assert!(
            resolved.manifest.is_index(),
            "{}:{version} should be a multi-arch index, got {}",
            repo(),
            resolved.manifest.media_type
        );
        let platforms = client
            .platform_digests(&repo(), version)
            .unwrap_or_else(|e| panic!("{}", hint(&e)));
        let names: Vec<&str> = platforms.keys().map(String::as_str).collect();
        assert_eq!(names, ["linux/arm/v7", "linux/arm64"], "{version}");
        for (platform, digest) in &platforms {
            assert_ne!(digest, &resolved.digest_of_tag, "never the index digest");
            let m = client
                .fetch_manifest_by_digest(&repo(), digest)
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
            .fetch_manifest_by_digest(&repo(), &resolved.digest_of_tag)
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
        .platform_digests(&repo(), "1.0.0")
        .unwrap_or_else(|e| panic!("{}", hint(&e)));
    for (tag, platform) in [
        ("1.0.0-arm64", "linux/arm64"),
        ("1.0.0-armv7", "linux/arm/v7"),
    ] {
        let p = client
            .platform_digests(&repo(), tag)
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
    let e = client.resolve_tag(&repo(), "0.0.0-nope").unwrap_err();
    assert!(
        matches!(e, RegistryError::NotFound { status: 404, .. }),
        "{e:?}"
    );
    let missing = format!("sha256:{}", "0".repeat(64));
    let e = client
        .fetch_manifest_by_digest(&repo(), &missing)
        .unwrap_err();
    assert!(matches!(e, RegistryError::NotFound { .. }), "{e:?}");
}
