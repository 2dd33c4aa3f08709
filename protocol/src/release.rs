//! The release record (protocol §3), signed by the `release` role.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::dsse::{self, Envelope, Expect, RELEASE_PAYLOAD_TYPE};
use crate::error::{EnvelopeError, RecordError};
use crate::keys::{PrivateKey, TrustedKeys};
use crate::names;
use crate::unique::unique_map;

/// The reserved app name of an agent release (Ferry updating itself, protocol §11): its image
/// holds the `ferry-agent` binary, one file per platform, and runs no container.
pub const AGENT_APP: &str = "ferry-agent";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub app: String,
    pub version: semver::Version,
    pub image: String,
    #[serde(deserialize_with = "unique_map")]
    pub platforms: BTreeMap<String, String>,
    #[serde(default)]
    pub container: ContainerSpec,
    #[serde(default)]
    pub health: HealthSpec,
    pub created_at: DateTime<Utc>,
}

/// How the container runs. Every field optional; defaults are the safe ones.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "unique_map"
    )]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub binds: Vec<BindSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub privileged: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_mode: Option<String>,
    /// Memory the app asks for, in MiB (its container's hard limit, no swap beyond it). The
    /// device's policy caps it (`policy.max_memory_mb`); without it the device's default applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// Processes and threads the app may have at once (the container's pids limit); capped by
    /// `policy.max_pids`, the device's default without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// Environment variables the controller may set per site or device (`crate::settings`):
    /// key → type and default. Left out when empty.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "unique_map"
    )]
    pub settings: BTreeMap<String, crate::settings::SettingDecl>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    pub host: u16,
    pub container: u16,
    #[serde(default)]
    pub proto: Proto,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindSpec {
    pub host: String,
    pub container: String,
    #[serde(default)]
    pub read_only: bool,
}

/// Health gate settings (Marathon semantics). Absent numbers take the agent's configured defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<HealthCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_s: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_s: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub successes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failures: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_s: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum HealthCheck {
    Http { port: u16, path: String },
    Tcp { port: u16 },
    Exec(Vec<String>),
    Docker {},
}

impl Release {
    /// Parse a verified body strictly and check every field's syntax.
    pub fn parse(body: &[u8]) -> Result<Release, RecordError> {
        let r: Release = serde_json::from_slice(body).map_err(|e| RecordError::Malformed {
            what: "release",
            detail: e.to_string(),
        })?;
        r.validate()?;
        Ok(r)
    }

    pub fn validate(&self) -> Result<(), RecordError> {
        let inv = |field: &str, detail: String| RecordError::Invalid {
            what: "release",
            field: field.to_string(),
            detail,
        };
        names::check_app_name(&self.app).map_err(|d| inv("app", d))?;
        names::check_date(&self.created_at).map_err(|d| inv("created_at", d))?;
        names::check_repository(&self.image).map_err(|d| inv("image", d))?;
        if self.platforms.is_empty() {
            return Err(inv("platforms", "no platform listed".into()));
        }
        for (p, d) in &self.platforms {
            names::check_platform(p).map_err(|e| inv("platforms", e))?;
            names::check_digest(d).map_err(|e| inv(&format!("platforms.{p}"), e))?;
        }
        let c = &self.container;
        if self.is_agent()
            && (*c != ContainerSpec::default() || self.health != HealthSpec::default())
        {
            return Err(inv(
                "container",
                format!("an agent release ({AGENT_APP}) runs no container: no container or health settings"),
            ));
        }
        if let Some(cmd) = &c.cmd {
            if cmd.is_empty() {
                return Err(inv("container.cmd", "empty argv".into()));
            }
        }
        for k in c.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(inv("container.env", format!("bad variable name {k:?}")));
            }
        }
        crate::settings::check_declarations(self).map_err(|(f, d)| inv(&f, d))?;
        for p in &c.ports {
            if p.host == 0 || p.container == 0 {
                return Err(inv("container.ports", "port 0".into()));
            }
        }
        for b in &c.binds {
            if !b.host.starts_with('/') || !b.container.starts_with('/') {
                return Err(inv(
                    "container.binds",
                    format!("{} -> {}: paths must be absolute", b.host, b.container),
                ));
            }
            if b.host.split('/').any(|s| s == "..") || b.container.split('/').any(|s| s == "..") {
                return Err(inv(
                    "container.binds",
                    format!("{} -> {}: '..' not allowed", b.host, b.container),
                ));
            }
        }
        for d in &c.devices {
            if !d.starts_with("/dev/") || d.split('/').any(|s| s == "..") {
                return Err(inv(
                    "container.devices",
                    format!("{d:?} is not a /dev path"),
                ));
            }
        }
        if let Some(m) = &c.network_mode {
            if !matches!(m.as_str(), "bridge" | "host" | "none") {
                return Err(inv(
                    "container.network_mode",
                    format!("{m:?}: one of bridge, host, none"),
                ));
            }
        }
        match &self.health.check {
            Some(HealthCheck::Exec(argv)) if argv.is_empty() => {
                return Err(inv("health.check.exec", "empty argv".into()))
            }
            Some(HealthCheck::Http { path, .. }) if !path.starts_with('/') => {
                return Err(inv("health.check.http.path", "must start with /".into()))
            }
            _ => {}
        }
        let h = &self.health;
        if h.interval_s == Some(0)
            || h.timeout_s == Some(0)
            || h.successes == Some(0)
            || h.max_failures == Some(0)
            || h.deadline_s == Some(0)
        {
            return Err(inv(
                "health",
                "interval_s, timeout_s, successes, max_failures and deadline_s must be positive"
                    .into(),
            ));
        }
        Ok(())
    }

    /// A release of the agent itself (app [`AGENT_APP`]).
    pub fn is_agent(&self) -> bool {
        self.app == AGENT_APP
    }

    /// The image reference to pull for `platform`: `image@digest`.
    pub fn reference_for(&self, platform: &str) -> Option<String> {
        self.platforms
            .get(platform)
            .map(|d| format!("{}@{}", self.image, d))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a release always serializes")
    }

    pub fn sign(&self, keys: &[&PrivateKey]) -> Envelope {
        Envelope::sign(RELEASE_PAYLOAD_TYPE, self.to_json().as_bytes(), keys)
    }
}

/// A release whose envelope verified against the release role and whose body parsed strictly.
#[derive(Clone, Debug)]
pub struct VerifiedRelease {
    pub release: Release,
    /// The envelope exactly as received.
    pub envelope: Vec<u8>,
    pub signers: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReleaseError {
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error(transparent)]
    Body(#[from] RecordError),
}

/// Verify a standalone release envelope (`ferryctl release verify`, the controller's catalogue).
pub fn verify_release(
    raw: &[u8],
    trusted: &TrustedKeys,
    threshold: usize,
) -> Result<VerifiedRelease, ReleaseError> {
    let v = dsse::verify(raw, Expect::release(threshold), trusted)?;
    let release = Release::parse(&v.body)?;
    Ok(VerifiedRelease {
        release,
        envelope: raw.to_vec(),
        signers: v.signers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn sample_json() -> serde_json::Value {
        serde_json::json!({
          "app": "sensor",
          "version": "2.0.0",
          "image": "registry.example.com:5000/ferry/sensor",
          "platforms": {"linux/arm64": format!("sha256:{}", "a".repeat(64)), "linux/arm/v7": format!("sha256:{}", "b".repeat(64))},
          "container": {
            "cmd": ["optional", "argv"],
            "env": {"KEY": "value"},
            "ports": [{"host": 8080, "container": 8080, "proto": "tcp"}],
            "binds": [{"host": "/var/lib/ferry-apps/sensor", "container": "/data", "read_only": false}],
            "devices": ["/dev/i2c-1"],
            "privileged": false,
            "network_mode": "bridge"
          },
          "health": {
            "check": {"http": {"port": 8080, "path": "/healthz"}},
            "grace_s": 5, "interval_s": 2, "timeout_s": 2,
            "successes": 3, "max_failures": 3, "deadline_s": 120
          },
          "created_at": "2026-11-22T10:00:00Z"
        })
    }

    /// Issue 13: an agent release carries only an image per platform.
    #[test]
    fn an_agent_release_runs_no_container() {
        let mut j = sample_json();
        j["app"] = AGENT_APP.into();
        let e = Release::parse(j.to_string().as_bytes()).unwrap_err();
        assert!(e.to_string().contains("runs no container"), "{e}");
        let o = j.as_object_mut().unwrap();
        o.remove("container");
        o.remove("health");
        let r = Release::parse(j.to_string().as_bytes()).unwrap();
        assert!(r.is_agent());
        assert!(!Release::parse(sample_json().to_string().as_bytes())
            .unwrap()
            .is_agent());
    }

    #[test]
    fn parses_protocol_example() {
        let r = Release::parse(sample_json().to_string().as_bytes()).unwrap();
        assert_eq!(r.app, "sensor");
        assert_eq!(r.version, semver::Version::new(2, 0, 0));
        assert_eq!(
            r.health.check,
            Some(HealthCheck::Http {
                port: 8080,
                path: "/healthz".into()
            })
        );
        assert_eq!(
            r.reference_for("linux/arm64").unwrap(),
            format!(
                "registry.example.com:5000/ferry/sensor@sha256:{}",
                "a".repeat(64)
            )
        );
        assert!(r.reference_for("linux/amd64").is_none());
        // Round trip.
        assert_eq!(Release::parse(r.to_json().as_bytes()).unwrap(), r);
    }

    #[test]
    fn each_check_kind_parses() {
        for (check, want) in [
            (
                serde_json::json!({"tcp": {"port": 1}}),
                HealthCheck::Tcp { port: 1 },
            ),
            (
                serde_json::json!({"exec": ["true"]}),
                HealthCheck::Exec(vec!["true".into()]),
            ),
            (serde_json::json!({"docker": {}}), HealthCheck::Docker {}),
        ] {
            let mut j = sample_json();
            j["health"]["check"] = check;
            assert_eq!(
                Release::parse(j.to_string().as_bytes())
                    .unwrap()
                    .health
                    .check,
                Some(want)
            );
        }
        let mut j = sample_json();
        j["health"].as_object_mut().unwrap().remove("check");
        assert_eq!(
            Release::parse(j.to_string().as_bytes())
                .unwrap()
                .health
                .check,
            None
        );
    }

    #[test]
    fn minimal_release_has_safe_defaults() {
        let j = serde_json::json!({
            "app": "a", "version": "1.0.0", "image": "r/a",
            "platforms": {"linux/arm64": format!("sha256:{}", "a".repeat(64))},
            "created_at": "2026-11-22T10:00:00Z"
        });
        let r = Release::parse(j.to_string().as_bytes()).unwrap();
        assert!(!r.container.privileged);
        assert!(
            r.container.ports.is_empty()
                && r.container.binds.is_empty()
                && r.container.devices.is_empty()
        );
        assert_eq!(r.container.network_mode, None);
    }

    #[test]
    fn strictness() {
        type Mutation = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(&str, Mutation)> = vec![
            (
                "unknown top-level field",
                Box::new(|j| j["extra"] = 1.into()),
            ),
            (
                "unknown container field",
                Box::new(|j| j["container"]["cap_add"] = serde_json::json!(["ALL"])),
            ),
            (
                "unknown health check",
                Box::new(|j| j["health"]["check"] = serde_json::json!({"grpc": {}})),
            ),
            (
                "unknown field in http check",
                Box::new(|j| j["health"]["check"]["http"]["host"] = "x".into()),
            ),
            ("bad version", Box::new(|j| j["version"] = "2.0".into())),
            ("bad app", Box::new(|j| j["app"] = "Sensor".into())),
            (
                "image with tag",
                Box::new(|j| j["image"] = "r:5000/ferry/sensor:2".into()),
            ),
            (
                "image with digest",
                Box::new(|j| j["image"] = format!("r/s@sha256:{}", "a".repeat(64)).into()),
            ),
            (
                "bad digest",
                Box::new(|j| j["platforms"]["linux/arm64"] = "sha256:xyz".into()),
            ),
            (
                "no platforms",
                Box::new(|j| j["platforms"] = serde_json::json!({})),
            ),
            (
                "relative bind",
                Box::new(|j| j["container"]["binds"][0]["host"] = "data".into()),
            ),
            (
                "dotdot bind",
                Box::new(|j| j["container"]["binds"][0]["host"] = "/var/../etc".into()),
            ),
            (
                "bad network mode",
                Box::new(|j| j["container"]["network_mode"] = "container:x".into()),
            ),
            (
                "bad device",
                Box::new(|j| j["container"]["devices"][0] = "/etc/shadow".into()),
            ),
            (
                "zero interval",
                Box::new(|j| j["health"]["interval_s"] = 0.into()),
            ),
            (
                "bad time",
                Box::new(|j| j["created_at"] = "yesterday".into()),
            ),
        ];
        for (name, mutate) in cases {
            let mut j = sample_json();
            mutate(&mut j);
            assert!(
                Release::parse(j.to_string().as_bytes()).is_err(),
                "{name} accepted"
            );
        }
    }

    #[test]
    fn duplicate_keys_rejected() {
        let s = sample_json().to_string().replacen(
            "\"platforms\":{",
            &format!(
                "\"platforms\":{{\"linux/arm64\":\"sha256:{}\",",
                "c".repeat(64)
            ),
            1,
        );
        let e = Release::parse(s.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("duplicate"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics(s in ".{0,400}") {
            let _ = Release::parse(s.as_bytes());
        }
    }
}
