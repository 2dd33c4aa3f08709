//! Image manifests and indexes (OCI and Docker v2 schema 2), parsed from the exact bytes whose
//! digest was checked.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::reference::{check_digest, normalize_platform};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The `Accept` header of manifest requests: every type this client understands.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// The platform string docker gives attestation (provenance/SBOM) entries of an index.
pub const ATTESTATION_PLATFORM: &str = "unknown/unknown";

pub fn is_image_media_type(mt: &str) -> bool {
    mt == OCI_MANIFEST || mt == DOCKER_MANIFEST
}

pub fn is_index_media_type(mt: &str) -> bool {
    mt == OCI_INDEX || mt == DOCKER_MANIFEST_LIST
}

/// A manifest exactly as served, with its verified digest and what it describes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// `sha256:` of `bytes` (checked against what was asked for or announced).
    pub digest: String,
    /// The bytes the registry served.
    pub bytes: Vec<u8>,
    /// From `Content-Type`, falling back to the body's `mediaType`.
    pub media_type: String,
    pub kind: ManifestKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManifestKind {
    /// A single-platform image.
    Image {
        config_digest: String,
        config_size: u64,
        /// `(digest, size)` of each layer, in order.
        layers: Vec<(String, u64)>,
    },
    /// A multi-platform index (OCI index or Docker manifest list).
    Index { entries: Vec<IndexEntry> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub digest: String,
    /// `os/arch[/variant]`, normalized (see [`crate::normalize_platform`]); `unknown/unknown`
    /// when the entry names no platform.
    pub platform: String,
    pub media_type: String,
    pub size: u64,
    /// A docker attestation manifest (platform `unknown/unknown` or annotated as such), not an
    /// image anyone runs.
    pub attestation: bool,
}

impl Manifest {
    /// Total bytes of the layers to download (0 for an index).
    pub fn layers_total(&self) -> u64 {
        match &self.kind {
            // Saturating, though `parse` refuses sums that overflow: sizes are input.
            ManifestKind::Image { layers, .. } => layers
                .iter()
                .fold(0u64, |sum, (_, s)| sum.saturating_add(*s)),
            ManifestKind::Index { .. } => 0,
        }
    }

    pub fn is_index(&self) -> bool {
        matches!(self.kind, ManifestKind::Index { .. })
    }
}

#[derive(Debug)]
pub(crate) enum ParseError {
    Unsupported(String),
    Malformed(String),
}

#[derive(Deserialize)]
struct RawManifest {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<u32>,
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    config: Option<RawDescriptor>,
    layers: Option<Vec<RawDescriptor>>,
    manifests: Option<Vec<RawEntry>>,
}

#[derive(Deserialize)]
struct RawDescriptor {
    digest: String,
    size: u64,
}

#[derive(Deserialize)]
struct RawEntry {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    digest: String,
    size: u64,
    platform: Option<RawPlatform>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct RawPlatform {
    os: String,
    architecture: String,
    variant: Option<String>,
}

/// The `Content-Type` without parameters, lowercased.
pub(crate) fn bare_media_type(ct: &str) -> String {
    ct.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Parse manifest `bytes` (already digest-checked) served with `content_type`.
pub(crate) fn parse(
    digest: String,
    bytes: Vec<u8>,
    content_type: Option<&str>,
) -> Result<Manifest, ParseError> {
    let raw: RawManifest = serde_json::from_slice(&bytes)
        .map_err(|e| ParseError::Malformed(format!("manifest is not valid JSON: {e}")))?;
    if let Some(v) = raw.schema_version {
        if v != 2 {
            return Err(ParseError::Unsupported(format!("schemaVersion {v}")));
        }
    }
    let header = content_type
        .map(bare_media_type)
        .filter(|m| is_image_media_type(m) || is_index_media_type(m));
    let body = raw.media_type.clone();
    if let (Some(h), Some(b)) = (&header, &body) {
        if is_index_media_type(h) != is_index_media_type(b) {
            return Err(ParseError::Malformed(format!(
                "Content-Type says {h} but the body says {b}"
            )));
        }
    }
    let media_type = match (header, body) {
        (Some(h), _) => h,
        (None, Some(b)) => b,
        // OCI allows mediaType to be absent: infer from the shape.
        (None, None) if raw.manifests.is_some() => OCI_INDEX.to_string(),
        (None, None) if raw.config.is_some() => OCI_MANIFEST.to_string(),
        (None, None) => {
            return Err(ParseError::Malformed(
                "neither a manifest nor an index (no mediaType, config or manifests)".into(),
            ))
        }
    };
    let kind = if is_image_media_type(&media_type) {
        let config = raw
            .config
            .ok_or_else(|| ParseError::Malformed("image manifest without config".into()))?;
        check_digest(&config.digest).map_err(ParseError::Malformed)?;
        let layers = raw
            .layers
            .ok_or_else(|| ParseError::Malformed("image manifest without layers".into()))?;
        let mut out = Vec::with_capacity(layers.len());
        // Checked: the sizes feed the disk and store-cap checks, where a wrapped sum would pass.
        let mut sum = config.size;
        for l in layers {
            check_digest(&l.digest).map_err(ParseError::Malformed)?;
            sum = sum.checked_add(l.size).ok_or_else(|| {
                ParseError::Malformed(format!(
                    "the sizes of the config and layers overflow 64 bits (layer {} of {} bytes)",
                    l.digest, l.size
                ))
            })?;
            out.push((l.digest, l.size));
        }
        ManifestKind::Image {
            config_digest: config.digest,
            config_size: config.size,
            layers: out,
        }
    } else if is_index_media_type(&media_type) {
        let entries = raw
            .manifests
            .ok_or_else(|| ParseError::Malformed("index without manifests".into()))?;
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            check_digest(&e.digest).map_err(ParseError::Malformed)?;
            let platform = match &e.platform {
                Some(p) => normalize_platform(&p.os, &p.architecture, p.variant.as_deref()),
                None => ATTESTATION_PLATFORM.to_string(),
            };
            let attestation = platform == ATTESTATION_PLATFORM
                || e.annotations
                    .get("vnd.docker.reference.type")
                    .is_some_and(|t| t == "attestation-manifest");
            out.push(IndexEntry {
                digest: e.digest,
                platform,
                media_type: e.media_type.unwrap_or_default(),
                size: e.size,
                attestation,
            });
        }
        ManifestKind::Index { entries: out }
    } else {
        return Err(ParseError::Unsupported(media_type));
    };
    Ok(Manifest {
        digest,
        bytes,
        media_type,
        kind,
    })
}

/// The platform an image config describes (`os`, `architecture`, `variant`).
pub(crate) fn config_platform(config: &[u8]) -> Result<String, String> {
    #[derive(Deserialize)]
    struct Config {
        os: Option<String>,
        architecture: Option<String>,
        variant: Option<String>,
    }
    let c: Config = serde_json::from_slice(config)
        .map_err(|e| format!("image config is not valid JSON: {e}"))?;
    match (c.os, c.architecture) {
        (Some(os), Some(arch)) if !os.is_empty() && !arch.is_empty() => {
            Ok(normalize_platform(&os, &arch, c.variant.as_deref()))
        }
        _ => Err("image config names no os/architecture".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn image_manifest() {
        let body = serde_json::json!({
            "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": "x", "digest": d('c'), "size": 10},
            "layers": [{"digest": d('1'), "size": 100}, {"digest": d('2'), "size": 23}]
        })
        .to_string();
        let m = parse(d('f'), body.into_bytes(), None).unwrap();
        assert_eq!(m.media_type, DOCKER_MANIFEST);
        assert_eq!(m.layers_total(), 123);
        assert!(!m.is_index());
    }

    #[test]
    fn header_wins_and_params_stripped_and_conflict_refused() {
        let body = serde_json::json!({
            "schemaVersion": 2,
            "config": {"digest": d('c'), "size": 10}, "layers": []
        })
        .to_string();
        let m = parse(
            d('f'),
            body.clone().into_bytes(),
            Some("application/vnd.oci.image.manifest.v1+json; charset=utf-8"),
        )
        .unwrap();
        assert_eq!(m.media_type, OCI_MANIFEST);
        // Generic content types fall back to the body / the shape.
        let m = parse(d('f'), body.into_bytes(), Some("application/json")).unwrap();
        assert_eq!(m.media_type, OCI_MANIFEST);
        let idx = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
            .to_string();
        assert!(matches!(
            parse(d('f'), idx.into_bytes(), Some(OCI_MANIFEST)),
            Err(ParseError::Malformed(_))
        ));
    }

    #[test]
    fn index_entries() {
        let body = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": d('a'), "size": 1, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                {"mediaType": OCI_MANIFEST, "digest": d('b'), "size": 2, "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
                {"mediaType": OCI_MANIFEST, "digest": d('e'), "size": 3, "platform": {"os": "unknown", "architecture": "unknown"},
                 "annotations": {"vnd.docker.reference.type": "attestation-manifest"}}
            ]
        })
        .to_string();
        let m = parse(d('f'), body.into_bytes(), None).unwrap();
        let ManifestKind::Index { entries } = &m.kind else {
            panic!("not an index")
        };
        let p: Vec<_> = entries
            .iter()
            .map(|e| (e.platform.as_str(), e.attestation))
            .collect();
        assert_eq!(
            p,
            [
                ("linux/arm64", false),
                ("linux/arm/v7", false),
                ("unknown/unknown", true)
            ]
        );
        assert_eq!(m.layers_total(), 0);
    }

    #[test]
    fn refuses_unsupported_and_malformed() {
        let v1 = serde_json::json!({"schemaVersion": 1, "name": "x"}).to_string();
        assert!(matches!(
            parse(d('f'), v1.into_bytes(), None),
            Err(ParseError::Unsupported(_))
        ));
        let other =
            serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.x"}).to_string();
        assert!(matches!(
            parse(d('f'), other.into_bytes(), None),
            Err(ParseError::Unsupported(_))
        ));
        assert!(matches!(
            parse(d('f'), b"nope".to_vec(), None),
            Err(ParseError::Malformed(_))
        ));
        let bad_layer = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"digest": d('c'), "size": 1}, "layers": [{"digest": "md5:00", "size": 1}]
        })
        .to_string();
        assert!(matches!(
            parse(d('f'), bad_layer.into_bytes(), None),
            Err(ParseError::Malformed(_))
        ));
    }

    #[test]
    fn sizes_that_overflow_are_refused_not_wrapped() {
        let m = |config: u64, layers: &[u64]| {
            serde_json::json!({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"digest": d('c'), "size": config},
                "layers": layers.iter().map(|s| serde_json::json!({"digest": d('1'), "size": s}))
                    .collect::<Vec<_>>()
            })
            .to_string()
            .into_bytes()
        };
        // Wrapped, these would sum to 1 byte and pass every disk and store-cap check.
        match parse(d('f'), m(1, &[u64::MAX]), None) {
            Err(ParseError::Malformed(e)) => assert!(e.contains("overflow"), "{e}"),
            other => panic!("accepted: {other:?}"),
        }
        match parse(d('f'), m(0, &[u64::MAX / 2 + 1, u64::MAX / 2 + 1]), None) {
            Err(ParseError::Malformed(e)) => assert!(e.contains("overflow"), "{e}"),
            other => panic!("accepted: {other:?}"),
        }
        // The largest sum that fits is a manifest like any other.
        let ok = parse(d('f'), m(1, &[u64::MAX - 2, 1]), None).unwrap();
        assert_eq!(ok.layers_total(), u64::MAX - 1);
    }

    #[test]
    fn config_platforms() {
        assert_eq!(
            config_platform(br#"{"os":"linux","architecture":"arm","variant":"v7","rootfs":{}}"#)
                .unwrap(),
            "linux/arm/v7"
        );
        assert_eq!(
            config_platform(br#"{"os":"linux","architecture":"arm64"}"#).unwrap(),
            "linux/arm64"
        );
        assert!(config_platform(br#"{"os":"linux"}"#).is_err());
    }
}
