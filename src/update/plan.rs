//! What a transaction must do, computed purely from the committed set and the target set.

use std::collections::BTreeMap;

use ferry_protocol::VerifiedNotice;

use crate::update::journal::Deployment;

/// Container names: `ferry-<device>-<app>-s<sequence>`; unique per device, app and update, so
/// the old and the new container of an app can exist side by side.
pub fn container_name(device: &str, app: &str, sequence: u64) -> String {
    format!("ferry-{device}-{app}-s{sequence}")
}

/// The target set of a verified notice, for this device's platform.
pub fn target_set(
    device: &str,
    platform: &str,
    notice: &VerifiedNotice,
    committed: &BTreeMap<String, Deployment>,
) -> BTreeMap<String, Deployment> {
    let seq = notice.desired.sequence;
    notice
        .releases
        .iter()
        // The agent's own release runs no container (see `crate::selfupdate`).
        .filter(|(_, vr)| !vr.release.is_agent())
        .map(|(app, vr)| {
            let r = &vr.release;
            let digest = r.platforms[platform].clone();
            let mut d = Deployment {
                release: r.clone(),
                reference: format!("{}@{}", r.image, digest),
                digest,
                container: container_name(device, app, seq),
                image_id: None,
            };
            // An app whose workload is unchanged keeps its running container (and image).
            if let Some(cur) = committed.get(app) {
                if cur.same_workload(&d) {
                    d.container = cur.container.clone();
                    d.image_id = cur.image_id.clone();
                }
            }
            (app.clone(), d)
        })
        .collect()
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Apps that get a new container (new, or changed).
    pub start: Vec<String>,
    /// Apps changed: their previous container is replaced.
    pub replace: Vec<String>,
    /// Apps no longer wanted: stopped and removed once the new set is committed.
    pub remove: Vec<String>,
    /// Apps whose container stays as it is.
    pub keep: Vec<String>,
}

impl Plan {
    pub fn is_noop(&self) -> bool {
        self.start.is_empty() && self.remove.is_empty()
    }
}

pub fn plan(
    committed: &BTreeMap<String, Deployment>,
    target: &BTreeMap<String, Deployment>,
) -> Plan {
    let mut p = Plan::default();
    for (app, t) in target {
        match committed.get(app) {
            Some(c) if c.container == t.container => p.keep.push(app.clone()),
            Some(_) => {
                p.start.push(app.clone());
                p.replace.push(app.clone());
            }
            None => p.start.push(app.clone()),
        }
    }
    for app in committed.keys() {
        if !target.contains_key(app) {
            p.remove.push(app.clone());
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::release::{ContainerSpec, HealthSpec};
    use ferry_protocol::Release;

    fn dep(app: &str, version: &str, digest_char: char, container: &str) -> Deployment {
        let digest = format!("sha256:{}", digest_char.to_string().repeat(64));
        Deployment {
            release: Release {
                app: app.into(),
                version: version.parse().unwrap(),
                image: "r/x".into(),
                platforms: [("linux/arm64".to_string(), digest.clone())].into(),
                container: ContainerSpec::default(),
                health: HealthSpec::default(),
                created_at: chrono::Utc::now(),
            },
            reference: format!("r/x@{digest}"),
            digest,
            container: container.into(),
            image_id: None,
        }
    }

    #[test]
    fn names() {
        assert_eq!(
            container_name("dev-1", "sensor", 42),
            "ferry-dev-1-sensor-s42"
        );
    }

    #[test]
    fn diff() {
        let committed: BTreeMap<_, _> = [
            ("a".to_string(), dep("a", "1.0.0", 'a', "c-a")),
            ("b".to_string(), dep("b", "1.0.0", 'b', "c-b")),
            ("c".to_string(), dep("c", "1.0.0", 'c', "c-c")),
        ]
        .into();
        let target: BTreeMap<_, _> = [
            ("a".to_string(), dep("a", "1.0.0", 'a', "c-a")),
            ("b".to_string(), dep("b", "2.0.0", 'd', "c-b2")),
            ("d".to_string(), dep("d", "1.0.0", 'e', "c-d")),
        ]
        .into();
        let p = plan(&committed, &target);
        assert_eq!(p.keep, vec!["a"]);
        assert_eq!(p.start, vec!["b", "d"]);
        assert_eq!(p.replace, vec!["b"]);
        assert_eq!(p.remove, vec!["c"]);
        assert!(!p.is_noop());
        assert!(plan(&committed, &committed).is_noop());
    }

    #[test]
    fn same_workload_ignores_created_at_only() {
        let a = dep("a", "1.0.0", 'a', "x");
        let mut b = a.clone();
        b.release.created_at = chrono::Utc::now() + chrono::Duration::days(1);
        assert!(a.same_workload(&b));
        b.release.container.env.insert("K".into(), "V".into());
        assert!(!a.same_workload(&b));
    }
}
