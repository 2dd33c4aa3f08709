//! Local policy (protocol §6.7): the device's own config wins over any signed request.
//! Privileged containers, host binds outside an allow-list, devices outside an allow-list and
//! host networking are refused unless this box's config permits them.

use ferry_protocol::Release;
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    pub allow_privileged: bool,
    /// Host paths that may be bind-mounted, as directory prefixes (matched per path component).
    pub allowed_bind_prefixes: Vec<String>,
    /// Device nodes that may be passed through, exactly.
    pub allowed_devices: Vec<String>,
    pub allow_host_network: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allow_privileged: false,
            allowed_bind_prefixes: vec!["/var/lib/ferry-apps".into()],
            allowed_devices: Vec::new(),
            allow_host_network: false,
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
        for b in &c.binds {
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
        let p = Policy::default();
        assert!(p.check(&bind("/var/lib/ferry-apps/sensor")).is_ok());
        assert!(p.check(&bind("/var/lib/ferry-apps")).is_ok());
        assert!(p.check(&bind("/var/lib/ferry-apps-evil")).is_err());
        assert!(p.check(&bind("/etc")).is_err());
        assert!(p.check(&bind("/")).is_err());
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
    fn path_within_is_component_wise() {
        assert!(path_within("/a/b", "/a"));
        assert!(path_within("/a/b/", "/a/"));
        assert!(!path_within("/ab", "/a"));
        assert!(!path_within("/a/../etc", "/a"));
        assert!(!path_within("a/b", "/a"));
    }
}
