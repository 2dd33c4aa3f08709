//! Registry credentials from the agent's config: a registry with htpasswd auth (the real
//! docker-registry, serving the same sample images) refuses an agent without credentials — the
//! update fails with the registry's reason and nothing changes — and serves one with them. The
//! agent downloads the image itself and hands it to the engine through its loopback registry, so
//! the engine never needs the credentials: the container runs the image the signed manifest
//! names, by its id.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct AuthRegistry {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for AuthRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const USER: &str = "fleet";
const PASS: &str = "s3cret-pass";

fn start_auth_registry() -> AuthRegistry {
    let dir = tempfile::tempdir().unwrap();
    let port = broker::free_port();
    let root = std::env::var("FERRY_REGISTRY_ROOT")
        .unwrap_or_else(|_| "/var/lib/ferry-test/registry".into());
    let htpasswd = dir.path().join("htpasswd");
    let hash = bcrypt::hash(PASS, 5).unwrap();
    std::fs::write(&htpasswd, format!("{USER}:{hash}\n")).unwrap();
    let cfg = dir.path().join("config.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root}\n  maintenance:\n    uploadpurging:\n      enabled: false\n    readonly:\n      enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\nauth:\n  htpasswd:\n    realm: ferry-test\n    path: {}\n",
            htpasswd.display()
        ),
    )
    .unwrap();
    let child = Command::new("docker-registry")
        .args(["serve", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker-registry (Debian package docker-registry)");
    let addr = format!("127.0.0.1:{port}");
    let t0 = Instant::now();
    loop {
        // 401 without credentials means it is up and enforcing auth.
        let r = ureq::get(&format!("http://{addr}/v2/")).call();
        match r {
            Err(ureq::Error::StatusCode(401)) => break,
            Ok(_) => panic!("registry on {addr} does not enforce auth"),
            _ if t0.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(100))
            }
            other => panic!("auth registry on {addr} did not come up: {other:?}"),
        }
    }
    AuthRegistry {
        child,
        addr,
        _dir: dir,
    }
}

#[test]
fn credentials_from_config_are_used_for_the_download() {
    infra::require_infra();
    let reg = start_auth_registry();
    let repo = format!("{}/ferry/sensor", reg.addr);

    // Without credentials: failed, with the registry's answer as the reason.
    let rig = Rig::start("regauth-none");
    let rel = rig.release("1.0.0").image(&repo).signed(&rig.keys);
    rig.publish(&rig.desired(1).app("sensor", rel).signed(&rig.keys));
    let ev = rig.observer.wait_terminal(1, SLOW);
    assert_eq!(
        ev.phase,
        Phase::Failed,
        "{}",
        rig.observer.describe_events()
    );
    let reason = ev.reason.unwrap_or_default();
    assert!(
        reason.contains("401") || reason.to_lowercase().contains("unauthorized"),
        "{reason}"
    );
    assert!(rig.containers().is_empty());
    drop(rig);

    // With credentials in [[registry.credentials]]: committed.
    let addr = reg.addr.clone();
    let rig = Rig::builder("regauth-ok")
        .agent(move |b| {
            b.config(move |t| {
                let mut cred = toml::Table::new();
                cred.insert("registry".into(), addr.clone().into());
                cred.insert("username".into(), USER.into());
                cred.insert("password".into(), PASS.into());
                let mut registry = toml::Table::new();
                registry.insert(
                    "credentials".into(),
                    toml::Value::Array(vec![toml::Value::Table(cred)]),
                );
                t.insert("registry".into(), toml::Value::Table(registry));
            })
        })
        .start();
    let rel = rig.release("1.0.0").image(&repo).signed(&rig.keys);
    rig.publish(&rig.desired(1).app("sensor", rel).signed(&rig.keys));
    let ev = rig.observer.wait_terminal(1, SLOW);
    assert_eq!(
        ev.phase,
        Phase::Committed,
        "{}",
        rig.observer.describe_events()
    );
    let running = rig.running();
    assert_eq!(running.len(), 1);
    // Created from the image id (config digest) the signed manifest names (read from the
    // registry without auth: the same storage).
    assert_eq!(
        running[0].image,
        infra::sensor_image_id("1.0.0", infra::ARM64),
        "{:#?}",
        running[0]
    );
    // What the agent fetched came from the registry that demands the credentials (the manifest
    // and config at least: the engine may hold the layers already).
    let fetched = rig
        .observer
        .events_for(1)
        .iter()
        .filter_map(|e| e.download.as_ref().map(|d| d.fetched_bytes))
        .max()
        .unwrap_or(0);
    assert!(fetched > 0, "{}", rig.observer.describe_events());
}
