//! Local policy (protocol §6.7): the device's own config wins over any signed request.
//! Privileged containers, host binds outside an allow-list, devices outside an allow-list, host
//! ports outside an allow-list and host networking are refused unless this box's config permits
//! them. The text rules are here; what the bind paths really are on disk is `binds.rs`'s.

use std::net::IpAddr;

use ferry_protocol::Release;
use serde::Deserialize;

use crate::verify::binds;

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    pub allow_privileged: bool,
    /// Host paths that may be bind-mounted, as directory prefixes (matched per path component;
    /// no component below the prefix may be a symlink).
    pub allowed_bind_prefixes: Vec<String>,
    /// Each app binds only from its own directory under a prefix, `<prefix>/<app>` (default
    /// true): one app cannot read or overwrite another's data. False: anywhere under a prefix.
    pub per_app_binds: bool,
    /// Directories under a prefix that every app may bind (e.g. a sensor directory the box's
    /// hardware fills in); nothing else is shared.
    pub shared_bind_dirs: Vec<String>,
    /// Device nodes that may be passed through, exactly.
    pub allowed_devices: Vec<String>,
    pub allow_host_network: bool,
    /// Host ports a release may publish, as `"N"` or `"LOW-HIGH"` (default `1024-65535`: no
    /// privileged port).
    pub allowed_host_ports: Vec<PortRange>,
    /// The host address published ports bind to (default `0.0.0.0`; e.g. `127.0.0.1` to keep
    /// every app's ports on the box).
    pub host_port_address: IpAddr,
    /// Memory limit of an app whose release asks for none, MiB (default 256; 0: unlimited).
    pub default_memory_mb: u64,
    /// The most a release may ask for, MiB (default 512; 0: no cap).
    pub max_memory_mb: u64,
    /// Pids limit of an app whose release asks for none (default 512; 0: unlimited).
    pub default_pids: u64,
    /// The most a release may ask for (default 4096; 0: no cap).
    pub max_pids: u64,
}

/// An app's resource limits as the policy grants them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<i64>,
    pub pids: Option<i64>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allow_privileged: false,
            allowed_bind_prefixes: vec!["/var/lib/ferry-apps".into()],
            per_app_binds: true,
            shared_bind_dirs: Vec::new(),
            allowed_devices: Vec::new(),
            allow_host_network: false,
            allowed_host_ports: vec![PortRange {
                low: 1024,
                high: 65535,
            }],
            host_port_address: IpAddr::from([0, 0, 0, 0]),
            default_memory_mb: 256,
            max_memory_mb: 512,
            default_pids: 512,
            max_pids: 4096,
        }
    }
}

/// An inclusive range of ports, written `"8080"` or `"1024-65535"` in the config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct PortRange {
    pub low: u16,
    pub high: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }
}

impl TryFrom<String> for PortRange {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let port = |t: &str| {
            t.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("bad port {t:?} in port range {s:?} (1-65535)"))
        };
        let (low, high) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(&s)?, port(&s)?),
        };
        if low > high {
            return Err(format!("port range {s:?} is empty"));
        }
        Ok(PortRange { low, high })
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.low == self.high {
            write!(f, "{}", self.low)
        } else {
            write!(f, "{}-{}", self.low, self.high)
        }
    }
}

impl Policy {
    /// `Err` says which rule the release breaks.
    pub fn check(&self, r: &Release) -> Result<(), String> {
        let c = &r.container;
        if c.privileged && !self.allow_privileged {
            return Err(format!(
                "policy: {} {} asks for a privileged container; this device does not allow it (policy.allow_privileged)",
                r.app, r.version
            ));
        }
        if c.network_mode.as_deref() == Some("host") && !self.allow_host_network {
            return Err(format!(
                "policy: {} {} asks for host networking; this device does not allow it (policy.allow_host_network)",
                r.app, r.version
            ));
        }
        for p in &c.ports {
            if !self.allowed_host_ports.iter().any(|r| r.contains(p.host)) {
                let allowed: Vec<String> = self
                    .allowed_host_ports
                    .iter()
                    .map(|r| r.to_string())
                    .collect();
                return Err(format!(
                    "policy: {} {} publishes host port {} which is outside policy.allowed_host_ports {:?}",
                    r.app, r.version, p.host, allowed
                ));
            }
        }
        for b in &c.binds {
            binds::check_container_path(&b.container)
                .map_err(|e| format!("policy: {} {} binds {}: {e}", r.app, r.version, b.host))?;
            if path_within(&b.container, crate::update::lock::CONTAINER_DIR) {
                return Err(format!(
                    "policy: {} {} binds {} inside {}, where the agent puts the app's update lock",
                    r.app,
                    r.version,
                    b.container,
                    crate::update::lock::CONTAINER_DIR
                ));
            }
            if !self
                .allowed_bind_prefixes
                .iter()
                .any(|p| path_within(&b.host, p))
            {
                return Err(format!(
                    "policy: {} {} binds host path {} which is outside policy.allowed_bind_prefixes {:?}",
                    r.app, r.version, b.host, self.allowed_bind_prefixes
                ));
            }
            if !self.app_may_bind(&r.app, &b.host) {
                let own: Vec<String> = self
                    .allowed_bind_prefixes
                    .iter()
                    .map(|p| app_dir(p, &r.app))
                    .collect();
                return Err(format!(
                    "policy: {} {} binds host path {} which is outside its own directory {own:?} \
                     (policy.per_app_binds) and the shared ones (policy.shared_bind_dirs {:?})",
                    r.app, r.version, b.host, self.shared_bind_dirs
                ));
            }
        }
        if let (Some(asked), max) = (c.memory_mb, self.max_memory_mb) {
            if asked == 0 || (max > 0 && asked > max) {
                return Err(format!(
                    "policy: {} {} asks for {asked} MiB of memory; this device allows 1 to {} (policy.max_memory_mb)",
                    r.app, r.version, if max > 0 { max.to_string() } else { "any".into() }
                ));
            }
        }
        if let (Some(asked), max) = (c.pids, self.max_pids) {
            if asked == 0 || (max > 0 && asked > max) {
                return Err(format!(
                    "policy: {} {} asks for {asked} pids; this device allows 1 to {} (policy.max_pids)",
                    r.app, r.version, if max > 0 { max.to_string() } else { "any".into() }
                ));
            }
        }
        for d in &c.devices {
            if !self.allowed_devices.iter().any(|a| a == d) {
                return Err(format!(
                    "policy: {} {} asks for device {} which is not in policy.allowed_devices {:?}",
                    r.app, r.version, d, self.allowed_devices
                ));
            }
        }
        Ok(())
    }

    /// The limits an app runs under: what its release asks for (checked by [`Policy::check`]),
    /// else the device's defaults; 0 = unlimited.
    pub fn limits(&self, c: &ferry_protocol::release::ContainerSpec) -> Limits {
        const MIB: u64 = 1024 * 1024;
        let nonzero = |v: u64| (v > 0).then_some(v);
        Limits {
            memory_bytes: c
                .memory_mb
                .or(nonzero(self.default_memory_mb))
                .and_then(|mb| mb.checked_mul(MIB))
                .and_then(|b| i64::try_from(b).ok()),
            pids: c
                .pids
                .or(nonzero(self.default_pids))
                .and_then(|n| i64::try_from(n).ok()),
        }
    }

    /// Whether `app` may bind `host` (already known to lie within an allowed prefix): within
    /// `<prefix>/<app>`, or a shared directory, or anywhere when `per_app_binds` is off.
    pub fn app_may_bind(&self, app: &str, host: &str) -> bool {
        !self.per_app_binds
            || self
                .allowed_bind_prefixes
                .iter()
                .any(|p| path_within(host, &app_dir(p, app)))
            || self.shared_bind_dirs.iter().any(|d| path_within(host, d))
    }

    /// The allowed prefix a host path lies within (the first listed).
    pub fn prefix_of(&self, host: &str) -> Option<&str> {
        self.allowed_bind_prefixes
            .iter()
            .find(|p| path_within(host, p))
            .map(String::as_str)
    }

    /// What [`Policy::check`] cannot see in the text: each bind source as it is on disk now
    /// (no symlink below its prefix; see `binds.rs`). Run after [`Policy::check`].
    pub fn check_on_disk(&self, r: &Release) -> Result<(), String> {
        for b in &r.container.binds {
            let prefix = self.prefix_of(&b.host).ok_or_else(|| {
                format!(
                    "policy: {} {} binds host path {} which is outside policy.allowed_bind_prefixes {:?}",
                    r.app, r.version, b.host, self.allowed_bind_prefixes
                )
            })?;
            binds::check_source(&b.host, prefix)
                .map_err(|e| format!("policy: {} {}: {e}", r.app, r.version))?;
        }
        Ok(())
    }
}

/// An app's own directory under `prefix`. App names are checked by the protocol
/// (`[a-z0-9][a-z0-9-]*`): never a separator, `.` or `..`.
pub fn app_dir(prefix: &str, app: &str) -> String {
    format!("{}/{app}", prefix.trim_end_matches('/'))
}

/// `path` equals `prefix` or lies below it, compared per path component (so `/data-evil` is not
/// within `/data`). Paths with `..` or `.` components are never within anything.
pub fn path_within(path: &str, prefix: &str) -> bool {
    let comps = |s: &str| -> Option<Vec<String>> {
        if !s.starts_with('/') {
            return None;
        }
        let v: Vec<String> = s
            .split('/')
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect();
        if v.iter().any(|c| c == ".." || c == ".") {
            return None;
        }
        Some(v)
    };
    match (comps(path), comps(prefix)) {
        (Some(p), Some(q)) => p.len() >= q.len() && p[..q.len()] == q[..],
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::release::{BindSpec, ContainerSpec, HealthSpec};

    #[test]
    fn memory_and_pids_come_from_the_release_within_the_caps_else_the_defaults() {
        let p = Policy::default();
        let mib = 1024 * 1024;
        // Nothing asked: the defaults.
        assert_eq!(
            p.limits(&ContainerSpec::default()),
            Limits {
                memory_bytes: Some(256 * mib),
                pids: Some(512)
            }
        );
        // Asked within the caps: granted.
        let asks = ContainerSpec {
            memory_mb: Some(384),
            pids: Some(64),
            ..Default::default()
        };
        assert!(p.check(&release(asks.clone())).is_ok());
        assert_eq!(
            p.limits(&asks),
            Limits {
                memory_bytes: Some(384 * mib),
                pids: Some(64)
            }
        );
        // Above the caps, or zero: refused, naming the key.
        for (c, key) in [
            (
                ContainerSpec {
                    memory_mb: Some(513),
                    ..Default::default()
                },
                "policy.max_memory_mb",
            ),
            (
                ContainerSpec {
                    memory_mb: Some(0),
                    ..Default::default()
                },
                "policy.max_memory_mb",
            ),
            (
                ContainerSpec {
                    pids: Some(4097),
                    ..Default::default()
                },
                "policy.max_pids",
            ),
            (
                ContainerSpec {
                    pids: Some(0),
                    ..Default::default()
                },
                "policy.max_pids",
            ),
            (
                ContainerSpec {
                    memory_mb: Some(u64::MAX),
                    ..Default::default()
                },
                "policy.max_memory_mb",
            ),
        ] {
            let e = p.check(&release(c)).unwrap_err();
            assert!(e.contains(key), "{e}");
        }
        // An operator who sets 0: unlimited by default, no cap; a huge ask does not overflow.
        let open = Policy {
            default_memory_mb: 0,
            max_memory_mb: 0,
            default_pids: 0,
            max_pids: 0,
            ..Policy::default()
        };
        assert_eq!(open.limits(&ContainerSpec::default()), Limits::default());
        let huge = ContainerSpec {
            memory_mb: Some(u64::MAX),
            ..Default::default()
        };
        assert!(open.check(&release(huge.clone())).is_ok());
        assert_eq!(
            open.limits(&huge).memory_bytes,
            None,
            "no overflow, no limit"
        );
    }

    fn release(c: ContainerSpec) -> Release {
        Release {
            app: "a".into(),
            version: semver::Version::new(1, 0, 0),
            image: "r/a".into(),
            platforms: Default::default(),
            container: c,
            health: HealthSpec::default(),
            created_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn the_update_lock_directory_is_reserved() {
        let r = release(ContainerSpec {
            binds: vec![BindSpec {
                host: "/var/lib/ferry-apps/a".into(),
                container: "/run/ferry".into(),
                read_only: false,
            }],
            ..Default::default()
        });
        let e = Policy::default().check(&r).unwrap_err();
        assert!(e.contains("update lock"), "{e}");
    }

    #[test]
    fn safe_release_passes_default_policy() {
        assert!(Policy::default()
            .check(&release(ContainerSpec::default()))
            .is_ok());
    }

    #[test]
    fn privileged_refused_unless_allowed() {
        let r = release(ContainerSpec {
            privileged: true,
            ..Default::default()
        });
        assert!(Policy::default()
            .check(&r)
            .unwrap_err()
            .contains("privileged"));
        let p = Policy {
            allow_privileged: true,
            ..Default::default()
        };
        assert!(p.check(&r).is_ok());
    }

    #[test]
    fn host_network_refused_unless_allowed() {
        let r = release(ContainerSpec {
            network_mode: Some("host".into()),
            ..Default::default()
        });
        assert!(Policy::default()
            .check(&r)
            .unwrap_err()
            .contains("host networking"));
        let p = Policy {
            allow_host_network: true,
            ..Default::default()
        };
        assert!(p.check(&r).is_ok());
    }

    #[test]
    fn binds_must_lie_within_allowed_prefixes() {
        let bind = |h: &str| {
            release(ContainerSpec {
                binds: vec![BindSpec {
                    host: h.into(),
                    container: "/data".into(),
                    read_only: false,
                }],
                ..Default::default()
            })
        };
        let p = Policy {
            per_app_binds: false,
            ..Default::default()
        };
        assert!(p.check(&bind("/var/lib/ferry-apps/sensor")).is_ok());
        assert!(p.check(&bind("/var/lib/ferry-apps")).is_ok());
        assert!(p.check(&bind("/var/lib/ferry-apps-evil")).is_err());
        assert!(p.check(&bind("/etc")).is_err());
        assert!(p.check(&bind("/")).is_err());
    }

    /// Issue 10: by default an app binds only from its own directory under the prefix, and from
    /// the shared directories the box lists: one app cannot read another's data.
    #[test]
    fn an_app_binds_only_its_own_directory_and_the_shared_ones() {
        let bind = |app: &str, h: &str| {
            let mut r = release(ContainerSpec {
                binds: vec![BindSpec {
                    host: h.into(),
                    container: "/data".into(),
                    read_only: false,
                }],
                ..Default::default()
            });
            r.app = app.into();
            r
        };
        let p = Policy {
            shared_bind_dirs: vec!["/var/lib/ferry-apps/site/sensors".into()],
            ..Default::default()
        };
        assert!(p.per_app_binds, "confined by default");
        for ok in [
            ("sensor", "/var/lib/ferry-apps/sensor"),
            ("sensor", "/var/lib/ferry-apps/sensor/data"),
            ("modem", "/var/lib/ferry-apps/modem/apn"),
            ("sensor", "/var/lib/ferry-apps/site/sensors"),
            ("modem", "/var/lib/ferry-apps/site/sensors/temp1_input"),
        ] {
            assert!(p.check(&bind(ok.0, ok.1)).is_ok(), "{ok:?}");
        }
        for (app, host) in [
            // Another app's data, the whole prefix, a sibling sharing the name's start, above
            // a shared dir.
            ("sensor", "/var/lib/ferry-apps/modem"),
            ("sensor", "/var/lib/ferry-apps/modem/apn"),
            ("sensor", "/var/lib/ferry-apps"),
            ("sensor", "/var/lib/ferry-apps/sensor-b"),
            ("sensor", "/var/lib/ferry-apps/site"),
        ] {
            let e = p.check(&bind(app, host)).unwrap_err();
            assert!(
                e.contains("outside its own directory") && e.contains("policy.per_app_binds"),
                "{app} {host}: {e}"
            );
        }
        // Outside every prefix stays the prefix rule's refusal.
        let e = p.check(&bind("sensor", "/etc")).unwrap_err();
        assert!(e.contains("policy.allowed_bind_prefixes"), "{e}");
    }

    #[test]
    fn devices_must_be_listed() {
        let r = release(ContainerSpec {
            devices: vec!["/dev/i2c-1".into()],
            ..Default::default()
        });
        assert!(Policy::default()
            .check(&r)
            .unwrap_err()
            .contains("/dev/i2c-1"));
        let p = Policy {
            allowed_devices: vec!["/dev/i2c-1".into()],
            ..Default::default()
        };
        assert!(p.check(&r).is_ok());
    }

    #[test]
    fn container_paths_cannot_carry_mount_options() {
        for bad in ["/data:rshared", "/data,ro", "data", "/"] {
            let r = release(ContainerSpec {
                binds: vec![BindSpec {
                    host: "/var/lib/ferry-apps/a".into(),
                    container: bad.into(),
                    read_only: false,
                }],
                ..Default::default()
            });
            let e = Policy::default().check(&r).unwrap_err();
            assert!(e.contains("container path"), "{bad}: {e}");
        }
    }

    #[test]
    fn host_ports_must_be_allowed() {
        let r = |host: u16| {
            release(ContainerSpec {
                ports: vec![ferry_protocol::release::PortSpec {
                    host,
                    container: 80,
                    proto: Default::default(),
                }],
                ..Default::default()
            })
        };
        let p = Policy::default();
        assert!(p.check(&r(8080)).is_ok());
        assert!(p.check(&r(1024)).is_ok());
        let e = p.check(&r(80)).unwrap_err();
        assert!(
            e.contains("host port 80") && e.contains("1024-65535"),
            "{e}"
        );
        let p: Policy = toml::from_str(
            "allowed_host_ports = [\"80\", \"8000-8099\"]\nhost_port_address = \"127.0.0.1\"",
        )
        .unwrap();
        assert!(p.check(&r(80)).is_ok() && p.check(&r(8099)).is_ok());
        assert!(p.check(&r(8100)).is_err() && p.check(&r(1024)).is_err());
        assert_eq!(p.host_port_address.to_string(), "127.0.0.1");
        for bad in ["\"0\"", "\"9-8\"", "\"x\"", "\"70000\""] {
            let e = toml::from_str::<Policy>(&format!("allowed_host_ports = [{bad}]"));
            assert!(e.is_err(), "{bad}");
        }
    }

    #[test]
    fn path_within_is_component_wise() {
        assert!(path_within("/a/b", "/a"));
        assert!(path_within("/a/b/", "/a/"));
        assert!(!path_within("/ab", "/a"));
        assert!(!path_within("/a/../etc", "/a"));
        assert!(!path_within("a/b", "/a"));
    }
}
