//! Unit tests of `fake.rs`.

use super::*;
use crate::runtime::PortMapping;
use std::sync::atomic::{AtomicUsize, Ordering};

const IMG1: &str = "reg:5000/ferry/sensor@sha256:1111";
const IMG2: &str = "reg:5000/ferry/sensor@sha256:2222";

fn image(id: &str) -> ImageInfo {
    ImageInfo {
        id: id.to_string(),
        repo_digests: vec![],
        os: "linux".into(),
        architecture: "arm64".into(),
        variant: None,
        layers: vec![],
        size: 1000,
    }
}

fn cfg(name: &str, image: &str, port: u16) -> ContainerConfig {
    ContainerConfig {
        name: name.into(),
        image: image.into(),
        ports: vec![PortMapping {
            host: port,
            container: 8080,
            proto: "tcp".into(),
        }],
        labels: BTreeMap::from([("io.ferry.device".into(), "dev".into())]),
        platform: Some("linux/arm64".into()),
        ..Default::default()
    }
}

async fn fake_with_images() -> FakeRuntime {
    let f = FakeRuntime::new();
    f.add_registry_image(IMG1, image("sha256:aaaa"));
    f.add_registry_image(IMG2, image("sha256:bbbb"));
    for r in [IMG1, IMG2] {
        f.pull(r, "linux/arm64", None, &|_| {}).await.unwrap();
    }
    f.clear_calls();
    f
}

#[tokio::test]
async fn pull_copies_registry_image_and_reports_progress() {
    let f = FakeRuntime::new();
    f.add_registry_image(IMG1, image("sha256:aaaa"));
    let seen = Mutex::new(Vec::new());
    f.pull(IMG1, "linux/arm64", None, &|p| seen.lock().unwrap().push(p))
        .await
        .unwrap();
    let seen = seen.into_inner().unwrap();
    assert!(seen.len() >= 2);
    assert_eq!(
        *seen.last().unwrap(),
        PullProgress {
            bytes: 1000,
            total: 1000
        }
    );
    let local = f.image_inspect(IMG1).await.unwrap().unwrap();
    assert_eq!(local.id, "sha256:aaaa");
    assert_eq!(local.repo_digests, vec![IMG1.to_string()]);
    assert_eq!(f.image_inspect("sha256:aaaa").await.unwrap(), Some(local));

    let err = f
        .pull(IMG2, "linux/arm64", None, &|_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("manifest unknown"), "{err}");
    assert_eq!(f.image_inspect(IMG2).await.unwrap(), None);
    let err = f
        .pull(IMG1, "linux/arm/v7", None, &|_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot be used"), "{err}");
}

#[tokio::test]
async fn lifecycle_and_call_log() {
    let f = fake_with_images().await;
    let id = f
        .create(&cfg("ferry-dev-sensor-s2", IMG1, 8080))
        .await
        .unwrap();
    assert_eq!(
        f.inspect(&id).await.unwrap().unwrap().state.status,
        "created"
    );
    f.start(&id).await.unwrap();
    f.start(&id).await.unwrap(); // idempotent, not a second start
    let i = f.inspect("ferry-dev-sensor-s2").await.unwrap().unwrap();
    assert!(i.state.running);
    assert_eq!(i.state.health.as_deref(), Some("healthy"));
    assert_eq!(i.host_ports, BTreeMap::from([(8080, 8080)]));
    assert!(i.ip_address.is_some());
    assert_eq!(
        f.exec(&id, &["true".into()], Duration::from_secs(1))
            .await
            .unwrap(),
        0
    );
    f.stop(&id, Duration::from_secs(7)).await.unwrap();
    f.stop(&id, Duration::from_secs(7)).await.unwrap();
    let c = f.container(&id).unwrap();
    assert_eq!((c.starts, c.stops), (1, 1));
    assert_eq!(c.last_stop_grace, Some(Duration::from_secs(7)));
    assert!(f
        .exec(&id, &["true".into()], Duration::from_secs(1))
        .await
        .is_err());
    f.remove(&id).await.unwrap();
    f.remove(&id).await.unwrap();
    f.stop(&id, Duration::ZERO).await.unwrap();
    assert_eq!(f.inspect(&id).await.unwrap(), None);
    assert!(matches!(
        f.start(&id).await,
        Err(RuntimeError::NotFound { op: "start", .. })
    ));
    let calls = f.calls();
    assert_eq!(calls[0], "create ferry-dev-sensor-s2");
    assert_eq!(calls[1], format!("inspect {id}"));
    assert_eq!(calls[2], format!("start {id}"));
    assert_eq!(f.call_count("stop"), 3);
    assert_eq!(f.call_count("remove"), 2);
}

#[tokio::test]
async fn create_conflicts_and_host_ports() {
    let f = fake_with_images().await;
    let old = f.create(&cfg("app-s1", IMG1, 8080)).await.unwrap();
    f.start(&old).await.unwrap();
    let err = f.create(&cfg("app-s1", IMG2, 8080)).await.unwrap_err();
    assert!(err.to_string().contains("already in use"), "{err}");
    let err = f
        .create(&cfg("app-x", "nope@sha256:0", 1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("No such image"), "{err}");

    // start-first with a shared host port: the new one cannot start while the old runs.
    let new = f.create(&cfg("app-s2", IMG2, 8080)).await.unwrap();
    let err = f.start(&new).await.unwrap_err();
    assert!(
        err.to_string().contains("port is already allocated"),
        "{err}"
    );
    assert_eq!(f.container(&new).unwrap().status, "created");
    // stop-first works.
    f.stop(&old, Duration::from_secs(1)).await.unwrap();
    f.start(&new).await.unwrap();
    assert_eq!(f.running_names(), vec!["app-s2".to_string()]);
    // A stopped container does not hold its port.
    let other = f.create(&cfg("app-s3", IMG2, 9090)).await.unwrap();
    f.start(&other).await.unwrap();
}

#[tokio::test]
async fn behaviours_drive_health_exec_and_logs() {
    let f = fake_with_images().await;
    f.set_image_behaviour(
        IMG2,
        Behaviour {
            healthy: false,
            logs: vec!["boot".into(), "panic: bad config".into()],
            ..Default::default()
        },
    );
    let id = f.create(&cfg("a", IMG2, 1)).await.unwrap();
    f.start(&id).await.unwrap();
    let i = f.inspect(&id).await.unwrap().unwrap();
    assert_eq!(i.state.health.as_deref(), Some("unhealthy"));
    assert_eq!(
        f.exec(&id, &["check".into()], Duration::from_secs(1))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        f.logs_tail(&id, 1).await.unwrap(),
        vec!["panic: bad config".to_string()]
    );
    assert_eq!(f.logs_tail(&id, 10).await.unwrap().len(), 2);

    f.set_image_behaviour(
        IMG1,
        Behaviour {
            exits_after_start: true,
            ..Default::default()
        },
    );
    let id = f.create(&cfg("b", IMG1, 2)).await.unwrap();
    f.start(&id).await.unwrap();
    let i = f.inspect(&id).await.unwrap().unwrap();
    assert_eq!(
        (i.state.status.as_str(), i.state.running),
        ("exited", false)
    );
    assert_eq!(i.state.exit_code, Some(1));

    f.set_image_behaviour(
        IMG1,
        Behaviour {
            crash_loop: true,
            ..Default::default()
        },
    );
    let mut c = cfg("c", IMG1, 3);
    c.restart_policy = RestartPolicy::UnlessStopped;
    let id = f.create(&c).await.unwrap();
    f.start(&id).await.unwrap();
    let r1 = f.inspect(&id).await.unwrap().unwrap().state.restart_count;
    let r2 = f.list(&[]).await.unwrap()[2].state.restart_count;
    assert!(r2 > r1);
    assert_eq!(
        f.inspect(&id).await.unwrap().unwrap().state.status,
        "restarting"
    );
    assert!(f
        .exec(&id, &["true".into()], Duration::from_secs(1))
        .await
        .is_err());
}

#[tokio::test]
async fn failure_injection_and_unreachable() {
    let f = fake_with_images().await;
    f.fail_next("create", "disk full");
    let err = f.create(&cfg("a", IMG1, 1)).await.unwrap_err();
    assert_eq!(err.to_string(), "create a: disk full");
    let id = f.create(&cfg("a", IMG1, 1)).await.unwrap();
    f.fail_next("start", "boom");
    f.fail_next("start", "boom again");
    assert!(f.start(&id).await.is_err());
    assert!(f.start(&id).await.is_err());
    f.start(&id).await.unwrap();
    f.set_unreachable(true);
    assert!(matches!(
        f.info().await,
        Err(RuntimeError::Unreachable { .. })
    ));
    f.set_unreachable(false);
    f.info().await.unwrap();
    assert_eq!(f.call_count("create"), 2);
}

#[test]
#[should_panic(expected = "unknown op")]
fn fail_next_rejects_typos() {
    FakeRuntime::new().fail_next("strat", "x");
}

#[tokio::test]
async fn list_filters_policy_images_and_restarts() {
    let f = fake_with_images().await;
    let a = f.create(&cfg("a", IMG1, 1)).await.unwrap();
    let mut other = cfg("b", IMG2, 2);
    other.labels = BTreeMap::from([("io.ferry.device".into(), "other".into())]);
    f.create(&other).await.unwrap();
    let listed = f.list(&[("io.ferry.device", "dev")]).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, a);
    assert_eq!(f.list(&[]).await.unwrap().len(), 2);

    f.set_restart_policy(&a, RestartPolicy::UnlessStopped)
        .await
        .unwrap();
    assert_eq!(
        f.inspect(&a).await.unwrap().unwrap().restart_policy,
        RestartPolicy::UnlessStopped
    );
    f.start(&a).await.unwrap();
    f.crash(&a, 137);
    let i = f.inspect(&a).await.unwrap().unwrap();
    assert!(i.state.running);
    assert_eq!(i.state.restart_count, 1);

    // In use: kept. Unused: removed. Missing: Ok.
    f.remove_image(IMG1).await.unwrap();
    assert!(f.image_inspect(IMG1).await.unwrap().is_some());
    f.remove("b").await.unwrap();
    f.remove_image(IMG2).await.unwrap();
    assert!(f.image_inspect(IMG2).await.unwrap().is_none());
    f.remove_image(IMG2).await.unwrap();

    // Daemon restart: unless-stopped comes back, policy no does not, stopped stays stopped.
    let mut n = cfg("n", IMG1, 3);
    n.restart_policy = RestartPolicy::No;
    let n = f.create(&n).await.unwrap();
    f.start(&n).await.unwrap();
    f.restart_daemon();
    assert_eq!(f.running_names(), vec!["a".to_string()]);
    f.stop(&a, Duration::from_secs(1)).await.unwrap();
    f.restart_daemon();
    assert!(f.running_names().is_empty());
}

#[tokio::test]
async fn shared_between_tasks() {
    let f = std::sync::Arc::new(fake_with_images().await);
    let n = std::sync::Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for k in 0..8 {
        let (f, n) = (f.clone(), n.clone());
        tasks.push(tokio::spawn(async move {
            let id = f
                .create(&cfg(&format!("c{k}"), IMG1, 1000 + k))
                .await
                .unwrap();
            f.start(&id).await.unwrap();
            n.fetch_add(1, Ordering::SeqCst);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(n.load(Ordering::SeqCst), 8);
    assert_eq!(f.running_names().len(), 8);
}
