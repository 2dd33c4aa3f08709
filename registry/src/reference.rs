//! Image references: `host[:port]/path[:tag][@sha256:...]`, digests, and which registries are
//! spoken to over plain HTTP.

use std::net::Ipv4Addr;

use sha2::{Digest, Sha256};

use crate::error::RegistryError;

/// The registry name used for references without a host (Docker Hub).
pub const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A repository split into its registry host (`host[:port]`) and its path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Repository {
    /// `host[:port]` as written (`docker.io` when the reference had none).
    pub registry: String,
    /// The repository path inside the registry, e.g. `ferry/sensor`.
    pub path: String,
}

impl Repository {
    /// Parse `host[:port]/path`. The first component is a host when it contains `.` or `:`, is
    /// `localhost`, or is a bracketed IPv6 address; otherwise the repository is on Docker Hub
    /// (and a single-component path gets the `library/` prefix, as docker does).
    pub fn parse(repo: &str) -> Result<Repository, RegistryError> {
        let bad = |message: &str| RegistryError::InvalidReference {
            reference: repo.to_string(),
            message: message.to_string(),
        };
        if repo.is_empty() || repo.len() > 255 {
            return Err(bad("empty or longer than 255 characters"));
        }
        if repo.contains('@') {
            return Err(bad("a repository carries no digest"));
        }
        let (registry, path) = match repo.split_once('/') {
            Some((first, rest))
                if first.contains('.')
                    || first.contains(':')
                    || first.starts_with('[')
                    || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => {
                let path = if repo.contains('/') {
                    repo.to_string()
                } else {
                    format!("library/{repo}")
                };
                (DOCKER_HUB.to_string(), path)
            }
        };
        check_host(&registry).map_err(|m| bad(&m))?;
        for comp in path.split('/') {
            let ok = !comp.is_empty()
                && comp.bytes().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
                })
                && comp.as_bytes()[0].is_ascii_alphanumeric()
                && comp.as_bytes()[comp.len() - 1].is_ascii_alphanumeric();
            if !ok {
                return Err(bad(&format!(
                    "bad path component {comp:?} (lowercase letters, digits, '.', '_', '-')"
                )));
            }
        }
        Ok(Repository { registry, path })
    }

    /// `host[:port]/path`.
    pub fn full(&self) -> String {
        format!("{}/{}", self.registry, self.path)
    }

    /// The host the HTTP API is reached at (Docker Hub's API host differs from its name).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }
}

fn check_host(host: &str) -> Result<(), String> {
    let (name, port) = split_host_port(host);
    let name_ok = if let Some(v6) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        !v6.is_empty()
            && v6
                .bytes()
                .all(|c| c.is_ascii_hexdigit() || c == b':' || c == b'.')
    } else {
        !name.is_empty()
            && name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-')
    };
    if !name_ok {
        return Err(format!("bad registry host {host:?}"));
    }
    if let Some(p) = port {
        if p.parse::<u16>().is_err() {
            return Err(format!("bad registry port in {host:?}"));
        }
    }
    Ok(())
}

/// Split `host[:port]`, `[v6]` or `[v6]:port` into the host and the port.
pub(crate) fn split_host_port(host: &str) -> (&str, Option<&str>) {
    if host.starts_with('[') {
        match host.find(']') {
            Some(end) => {
                let (name, rest) = host.split_at(end + 1);
                (name, rest.strip_prefix(':'))
            }
            None => (host, None),
        }
    } else {
        match host.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        }
    }
}

/// Whether `host` (a `host[:port]`) is spoken to over plain HTTP: `localhost`, `127.0.0.0/8`,
/// `[::1]`, and hosts listed as insecure (either with the port, or by name for every port).
pub fn is_plain_http(host: &str, insecure: &[String]) -> bool {
    let (name, _) = split_host_port(host);
    if name.eq_ignore_ascii_case("localhost") || name == "[::1]" {
        return true;
    }
    if let Ok(ip) = name.parse::<Ipv4Addr>() {
        if ip.is_loopback() {
            return true;
        }
    }
    insecure.iter().any(|i| {
        let i = normalize_registry(i);
        i.eq_ignore_ascii_case(host) || i.eq_ignore_ascii_case(name)
    })
}

/// `https://host:port/` → `host:port`; Docker Hub aliases → `docker.io`.
pub(crate) fn normalize_registry(s: &str) -> String {
    let s = s.trim();
    let s = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .unwrap_or(s);
    let s = s.split('/').next().unwrap_or(s);
    match s {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DOCKER_HUB.to_string()
        }
        _ => s.to_ascii_lowercase(),
    }
}

/// A full image reference: repository plus tag and/or digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageReference {
    pub repository: Repository,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl ImageReference {
    /// Parse `host[:port]/path:tag`, `host[:port]/path@sha256:...` or `...:tag@sha256:...`
    /// (the digest then wins). A reference with neither is accepted; see [`Self::reference`].
    pub fn parse(s: &str) -> Result<ImageReference, RegistryError> {
        let bad = |message: String| RegistryError::InvalidReference {
            reference: s.to_string(),
            message,
        };
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                check_digest(d).map_err(bad)?;
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (repo, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (&rest[..at], Some(rest[at + 1..].to_string()))
            }
            None => (rest, None),
        };
        if let Some(t) = &tag {
            check_tag(t).map_err(bad)?;
        }
        Ok(ImageReference {
            repository: Repository::parse(repo)?,
            tag,
            digest,
        })
    }

    /// What to ask the registry for: the digest if there is one, else the tag.
    pub fn reference(&self) -> Option<&str> {
        self.digest.as_deref().or(self.tag.as_deref())
    }
}

/// `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`
pub fn check_tag(tag: &str) -> Result<(), String> {
    let b = tag.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{tag:?} is not a tag ([A-Za-z0-9_][A-Za-z0-9._-]{{0,127}})"
        ))
    }
}

/// `sha256:` and 64 lowercase hex digits: the only digest algorithm this client accepts
/// (the protocol's own check, so both crates agree on what a digest is).
pub use ferry_protocol::names::check_digest;

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The platform string `os/arch[/variant]`, normalized like containerd does so that one
/// platform has one spelling: `aarch64` → `arm64`, `arm64/v8` → `arm64`, `x86_64` → `amd64`,
/// `arm` without variant → `arm/v7`; everything lowercase.
pub fn normalize_platform(os: &str, arch: &str, variant: Option<&str>) -> String {
    let os = os.to_ascii_lowercase();
    let arch = arch.to_ascii_lowercase();
    let variant = variant
        .map(|v| v.to_ascii_lowercase())
        .filter(|v| !v.is_empty());
    let (arch, variant) = match (arch.as_str(), variant.as_deref()) {
        ("aarch64" | "arm64", Some("v8") | None) => ("arm64".to_string(), None),
        ("aarch64", Some(v)) => ("arm64".to_string(), Some(v.to_string())),
        ("x86_64" | "x86-64", v) => ("amd64".to_string(), v.map(str::to_string)),
        ("arm", None) => ("arm".to_string(), Some("v7".to_string())),
        ("armhf", _) => ("arm".to_string(), Some("v7".to_string())),
        ("armel", _) => ("arm".to_string(), Some("v6".to_string())),
        (a, v) => (a.to_string(), v.map(str::to_string)),
    };
    match variant {
        Some(v) => format!("{os}/{arch}/{v}"),
        None => format!("{os}/{arch}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories() {
        let r = Repository::parse("127.0.0.1:5055/ferry/sensor").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5055");
        assert_eq!(r.path, "ferry/sensor");
        assert_eq!(r.full(), "127.0.0.1:5055/ferry/sensor");
        let r = Repository::parse("busybox").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.path.as_str()),
            ("docker.io", "library/busybox")
        );
        assert_eq!(r.api_host(), "registry-1.docker.io");
        let r = Repository::parse("[::1]:5000/a/b").unwrap();
        assert_eq!(r.registry, "[::1]:5000");
        assert!(Repository::parse("r:5000/Ferry").is_err());
        assert!(Repository::parse("r:x/ferry").is_err());
        assert!(Repository::parse("r:5000/a//b").is_err());
        assert!(Repository::parse("r:5000/a?b").is_err());
        assert!(Repository::parse("a b/c").is_err());
    }

    #[test]
    fn references() {
        let r = ImageReference::parse("127.0.0.1:5055/ferry/sensor:1.0.0").unwrap();
        assert_eq!(r.repository.full(), "127.0.0.1:5055/ferry/sensor");
        assert_eq!(r.tag.as_deref(), Some("1.0.0"));
        assert_eq!(r.reference(), Some("1.0.0"));
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageReference::parse(&format!("localhost:5000/x:t@{d}")).unwrap();
        assert_eq!(r.reference(), Some(d.as_str()));
        let r = ImageReference::parse("localhost:5000/x").unwrap();
        assert_eq!(r.reference(), None);
        assert_eq!(r.repository.registry, "localhost:5000");
        assert!(ImageReference::parse("localhost:5000/x:bad/tag").is_err());
        assert!(ImageReference::parse("localhost:5000/x@sha256:zz").is_err());
        assert!(ImageReference::parse("localhost:5000/x:-t").is_err());
    }

    #[test]
    fn plain_http_hosts() {
        let none: Vec<String> = vec![];
        assert!(is_plain_http("localhost:5000", &none));
        assert!(is_plain_http("localhost", &none));
        assert!(is_plain_http("127.0.0.1:5055", &none));
        assert!(is_plain_http("127.8.9.10", &none));
        assert!(is_plain_http("[::1]:5000", &none));
        assert!(!is_plain_http("128.0.0.1:5000", &none));
        assert!(!is_plain_http("registry.example.com", &none));
        assert!(!is_plain_http("localhost.example.com", &none));
        let ins = vec!["reg.lan:5000".to_string(), "http://other.lan/".to_string()];
        assert!(is_plain_http("reg.lan:5000", &ins));
        assert!(!is_plain_http("reg.lan:5001", &ins));
        assert!(is_plain_http("other.lan:443", &ins));
        assert!(is_plain_http("other.lan", &ins));
    }

    #[test]
    fn platforms_normalize() {
        assert_eq!(
            normalize_platform("linux", "arm64", Some("v8")),
            "linux/arm64"
        );
        assert_eq!(normalize_platform("linux", "aarch64", None), "linux/arm64");
        assert_eq!(
            normalize_platform("linux", "arm", Some("v7")),
            "linux/arm/v7"
        );
        assert_eq!(normalize_platform("linux", "arm", None), "linux/arm/v7");
        assert_eq!(
            normalize_platform("linux", "arm", Some("v6")),
            "linux/arm/v6"
        );
        assert_eq!(normalize_platform("linux", "x86_64", None), "linux/amd64");
        assert_eq!(
            normalize_platform("Linux", "AMD64", Some("")),
            "linux/amd64"
        );
    }

    #[test]
    fn digests_and_tags() {
        assert!(check_digest(&format!("sha256:{}", "0".repeat(64))).is_ok());
        assert!(check_digest(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(check_digest("sha512:00").is_err());
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(check_tag("1.0.0").is_ok());
        assert!(check_tag("latest").is_ok());
        assert!(check_tag(".x").is_err());
        assert!(check_tag(&"a".repeat(129)).is_err());
    }
}
