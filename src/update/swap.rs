//! Where containers are swapped: creating the new set, switching per strategy, rolling back to
//! the previous set, pruning after a commit, and making the runtime match the committed set.
//! Every operation here is idempotent, so a step cut short by a crash can simply be run again.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::runtime::{
    labels, BindMount, ContainerConfig, ContainerRuntime, PortMapping, RestartPolicy,
};
use crate::update::journal::Deployment;
use crate::update::lock;

/// Where a device's containers are placed: what the agent adds to every release's settings.
#[derive(Clone, Copy, Debug)]
pub struct Placement<'a> {
    pub device: &'a str,
    pub platform: &'a str,
    /// The host directory holding each app's update-lock directory (bound at
    /// [`lock::CONTAINER_DIR`]); `None`: no lock directory.
    pub lock_root: Option<&'a Path>,
    /// The local policy's bind prefixes: each release bind source is checked (no symlink below
    /// its prefix) and its missing directories created right before the container is created.
    pub bind_prefixes: &'a [String],
    /// The host address published ports bind to (local policy).
    pub port_address: std::net::IpAddr,
    /// The local policy, for each app's memory and pids limits.
    pub policy: &'a crate::verify::policy::Policy,
}

/// The container Ferry creates for a deployment: the release's settings, our labels and name,
/// the app's update-lock directory, and nothing else. The image is the engine's image id when
/// known (exactly what the signed manifest names), else the `repo@digest` reference.
pub fn container_config(at: &Placement<'_>, sequence: u64, d: &Deployment) -> ContainerConfig {
    let (device, platform) = (at.device, at.platform);
    let c = &d.release.container;
    let limits = at.policy.limits(c);
    let mut l = BTreeMap::new();
    l.insert(labels::DEVICE.to_string(), device.to_string());
    l.insert(labels::APP.to_string(), d.release.app.clone());
    l.insert(labels::VERSION.to_string(), d.release.version.to_string());
    l.insert(labels::DIGEST.to_string(), d.digest.clone());
    l.insert(labels::SEQUENCE.to_string(), sequence.to_string());
    l.insert(labels::ROLE.to_string(), labels::ROLE_CANDIDATE.to_string());
    ContainerConfig {
        name: d.container.clone(),
        image: d.image().to_string(),
        cmd: c.cmd.clone(),
        env: c.env.clone(),
        ports: c
            .ports
            .iter()
            .map(|p| PortMapping {
                host: p.host,
                container: p.container,
                proto: match p.proto {
                    ferry_protocol::release::Proto::Tcp => "tcp".into(),
                    ferry_protocol::release::Proto::Udp => "udp".into(),
                },
            })
            .collect(),
        port_address: Some(at.port_address),
        binds: c
            .binds
            .iter()
            .map(|b| BindMount {
                host: b.host.clone(),
                container: b.container.clone(),
                read_only: b.read_only,
            })
            .chain(at.lock_root.map(|root| BindMount {
                host: lock::app_dir(root, &d.release.app).display().to_string(),
                container: lock::CONTAINER_DIR.to_string(),
                read_only: false,
            }))
            .collect(),
        devices: c.devices.clone(),
        privileged: c.privileged,
        network_mode: c.network_mode.clone(),
        labels: l,
        restart_policy: RestartPolicy::UnlessStopped,
        platform: Some(platform.to_string()),
        memory_bytes: limits.memory_bytes,
        pids_limit: limits.pids,
    }
}

/// Create the app's update-lock directory before its container binds it.
fn prepare_lock(at: &Placement<'_>, app: &str) -> Result<(), String> {
    if let Some(root) = at.lock_root {
        lock::prepare(root, app)
            .map_err(|e| format!("lock directory of {app} under {}: {e}", root.display()))?;
    }
    Ok(())
}

/// Check the bind sources under the policy's prefixes once more, now, and create their missing
/// directories (see `verify/binds.rs`): a symlink planted since the notice was verified refuses
/// the container. Binds outside every prefix are the agent's own (the update-lock directory).
fn prepare_binds(at: &Placement<'_>, cfg: &ContainerConfig) -> Result<(), String> {
    for b in &cfg.binds {
        if let Some(prefix) = at
            .bind_prefixes
            .iter()
            .find(|p| crate::verify::policy::path_within(&b.host, p))
        {
            crate::verify::binds::prepare_source(&b.host, prefix)
                .map_err(|e| format!("{}: {e}", cfg.name))?;
        }
    }
    Ok(())
}

/// Create the container if it does not exist yet (idempotent).
pub async fn ensure_created<R: ContainerRuntime>(
    rt: &R,
    at: &Placement<'_>,
    app: &str,
    cfg: &ContainerConfig,
) -> Result<(), String> {
    match rt.inspect(&cfg.name).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => {
            prepare_lock(at, app)?;
            prepare_binds(at, cfg)?;
            rt.create(cfg)
                .await
                .map(|_| ())
                .map_err(|e| format!("create {}: {e}", cfg.name))
        }
        Err(e) => Err(format!("inspect {}: {e}", cfg.name)),
    }
}

/// Retire a container: clear its restart policy so Docker cannot revive it, then stop it.
/// If the engine refuses the policy change (a crash-looping container between restarts), the
/// container is stopped first — a stopped container's policy can always be changed — and the
/// policy cleared after.
pub async fn retire<R: ContainerRuntime>(
    rt: &R,
    name: &str,
    grace: Duration,
) -> Result<(), String> {
    match rt.inspect(name).await {
        Ok(None) => return Ok(()),
        Ok(Some(_)) => {}
        Err(e) => return Err(format!("inspect {name}: {e}")),
    }
    let cleared = rt.set_restart_policy(name, RestartPolicy::No).await;
    rt.stop(name, grace)
        .await
        .map_err(|e| format!("stop {name}: {e}"))?;
    if let Err(first) = cleared {
        tracing::debug!(container = name, error = %first, "restart policy cleared after the stop");
        rt.set_restart_policy(name, RestartPolicy::No)
            .await
            .map_err(|e| format!("clear restart policy of {name}: {e}"))?;
    }
    Ok(())
}

/// Make a container of the committed set run again (restart policy restored).
///
/// Only [`retire`] clears the restart policy, right before it stops the container. A container
/// still running without our policy may therefore have that stop in flight in the engine, asked
/// by an agent killed meanwhile: the engine finishes it (SIGKILL after the grace) and counts the
/// container as stopped by hand, so the restored `unless-stopped` would never bring it back and
/// the box would run nothing. Such a container is stopped here (which waits for that stop to
/// end) and started again.
pub async fn revive<R: ContainerRuntime>(
    rt: &R,
    at: &Placement<'_>,
    sequence: u64,
    d: &Deployment,
    grace: Duration,
) -> Result<(), String> {
    match rt.inspect(&d.container).await {
        Ok(Some(info)) => {
            let mut running = info.state.running;
            if info.restart_policy != RestartPolicy::UnlessStopped {
                if running {
                    tracing::warn!(container = %d.container, "a retired container still runs (a stop may be in flight); stopping it before starting it again");
                    rt.stop(&d.container, grace)
                        .await
                        .map_err(|e| format!("stop {}: {e}", d.container))?;
                    running = false;
                }
                rt.set_restart_policy(&d.container, RestartPolicy::UnlessStopped)
                    .await
                    .map_err(|e| format!("restore restart policy of {}: {e}", d.container))?;
            }
            if !running {
                rt.start(&d.container)
                    .await
                    .map_err(|e| format!("start {}: {e}", d.container))?;
            }
            Ok(())
        }
        Ok(None) => {
            // Removed behind our back: recreate it from the journal.
            tracing::warn!(container = %d.container, app = %d.release.app, "committed container missing; recreating it");
            let cfg = container_config(at, sequence, d);
            prepare_lock(at, &d.release.app)?;
            rt.create(&cfg)
                .await
                .map_err(|e| format!("recreate {}: {e}", d.container))?;
            rt.start(&d.container)
                .await
                .map_err(|e| format!("start {}: {e}", d.container))
        }
        Err(e) => Err(format!("inspect {}: {e}", d.container)),
    }
}

/// Remove a container for good (idempotent).
pub async fn discard<R: ContainerRuntime>(
    rt: &R,
    name: &str,
    grace: Duration,
) -> Result<(), String> {
    retire(rt, name, grace).await?;
    rt.remove(name)
        .await
        .map_err(|e| format!("remove {name}: {e}"))
}

/// The last log lines of a container, for the `rolled_back` event.
pub async fn last_logs<R: ContainerRuntime>(
    rt: &R,
    name: &str,
    lines: usize,
) -> Option<Vec<String>> {
    match rt.logs_tail(name, lines).await {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::debug!(container = name, error = %e, "no logs");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::fake::FakeRuntime;

    fn cfg(host: &str) -> ContainerConfig {
        ContainerConfig {
            name: "ferry-dev-sensor-s2".into(),
            image: "r/sensor@sha256:00".into(),
            binds: vec![BindMount {
                host: host.into(),
                container: "/data".into(),
                read_only: false,
            }],
            ..Default::default()
        }
    }

    /// Issue 10: a symlink planted under the prefix after the notice was verified still refuses
    /// the container at the switch; a missing source is created (the Mounts API needs it).
    #[tokio::test]
    async fn bind_sources_are_checked_again_and_created_at_the_switch() {
        let t = tempfile::tempdir().unwrap();
        let prefix = t.path().join("apps");
        std::fs::create_dir(&prefix).unwrap();
        let prefixes = vec![prefix.display().to_string()];
        let at = Placement {
            device: "dev",
            platform: "linux/arm64",
            lock_root: None,
            bind_prefixes: &prefixes,
            port_address: std::net::IpAddr::from([127, 0, 0, 1]),
            policy: &crate::verify::policy::Policy::default(),
        };
        let rt = FakeRuntime::new();
        rt.add_local_image("r/sensor@sha256:00", crate::runtime::ImageInfo::default());
        std::os::unix::fs::symlink("/etc", prefix.join("planted")).unwrap();
        let e = ensure_created(
            &rt,
            &at,
            "sensor",
            &cfg(&format!("{}/planted/x", prefix.display())),
        )
        .await
        .unwrap_err();
        assert!(e.contains("is a symlink"), "{e}");
        assert!(rt.containers().is_empty(), "nothing created");
        assert!(!std::path::Path::new("/etc/x").exists());
        let fresh = prefix.join("dev/data");
        ensure_created(&rt, &at, "sensor", &cfg(&fresh.display().to_string()))
            .await
            .unwrap();
        assert!(fresh.is_dir());
        assert_eq!(rt.containers().len(), 1);
    }
}
