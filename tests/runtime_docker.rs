//! `DockerRuntime` against the real engine.
//!
//! Needs root, dockerd (API 1.41 is what Debian's docker.io 20.10 speaks), the plain-HTTP
//! registry on 127.0.0.1:5055 and the sample image `127.0.0.1:5055/ferry/sensor:1.0.0`
//! (a multi-arch index; the tests resolve and use its linux/arm64 manifest, run under qemu).
//! When the engine or the registry does not answer the tests run `scripts/env-up.sh`; when the
//! image is missing they run `images/build.sh 127.0.0.1:5055` (both idempotent). Set
//! `FERRY_TEST_NO_SETUP=1` to fail instead.
//!
//! - Container tests use the shared engine at /var/run/docker.sock, with names and labels unique
//!   to the test and the process, and remove what they create (also on panic).
//! - Pull / image tests need an image that is NOT present yet (a present image reports no
//!   progress) and must delete images, which would disturb anyone else using the shared engine:
//!   they run against a private dockerd (own data root, exec root, socket and bridge, no
//!   iptables) that the test starts and stops.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use ferry_agent::runtime::docker::DockerRuntime;
use ferry_agent::runtime::{
    labels, ContainerConfig, ContainerRuntime, PortMapping, PullProgress, RestartPolicy,
    RuntimeError,
};

const SOCKET: &str = "/var/run/docker.sock";
const REGISTRY: &str = "127.0.0.1:5055";
const REPO: &str = "127.0.0.1:5055/ferry/sensor";
const TAG: &str = "1.0.0";
/// Everything here runs emulated: be generous.
const SLOW: Duration = Duration::from_secs(120);

struct Images {
    /// `repo@sha256:…` of the linux/arm64 manifest of `REPO:TAG`.
    arm64: String,
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `GET /_ping` over a unix socket: true when a Docker engine answers there.
fn engine_answers(socket: &str) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.") && out.contains(" 200 ")
}

fn http_get(url: &str, accept: Option<&str>) -> Result<String, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut req = agent.get(url);
    if let Some(a) = accept {
        req = req.header("Accept", a);
    }
    let mut resp = req.call().map_err(|e| format!("GET {url}: {e}"))?;
    resp.body_mut()
        .read_to_string()
        .map_err(|e| format!("GET {url}: {e}"))
}

fn run_script(rel: &str, args: &[&str]) {
    let path = manifest_dir().join(rel);
    eprintln!(
        "runtime_docker: running {} {}",
        path.display(),
        args.join(" ")
    );
    let status = Command::new("bash")
        .arg(&path)
        .args(args)
        .env("CI", "true")
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    assert!(status.success(), "{} failed: {status}", path.display());
}

fn arm64_digest() -> Result<String, String> {
    let body = http_get(
        &format!("http://{REGISTRY}/v2/ferry/sensor/manifests/{TAG}"),
        Some(
            "application/vnd.docker.distribution.manifest.list.v2+json, \
             application/vnd.oci.image.index.v1+json",
        ),
    )?;
    let index: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("index JSON: {e}"))?;
    index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == "arm64")
        .and_then(|m| m["digest"].as_str())
        .map(str::to_string)
        .ok_or_else(|| format!("no linux/arm64 manifest in {REPO}:{TAG}: {body}"))
}

/// The diff ids (`rootfs.diff_ids`, bottom first) of image manifest `digest` in `ferry/sensor`,
/// from its config in the registry.
fn config_diff_ids(digest: &str) -> Vec<String> {
    let body = http_get(
        &format!("http://{REGISTRY}/v2/ferry/sensor/manifests/{digest}"),
        Some(
            "application/vnd.docker.distribution.manifest.v2+json, \
             application/vnd.oci.image.manifest.v1+json",
        ),
    )
    .unwrap();
    let m: serde_json::Value = serde_json::from_str(&body).unwrap();
    let config = m["config"]["digest"].as_str().expect("config digest");
    let body = http_get(
        &format!("http://{REGISTRY}/v2/ferry/sensor/blobs/{config}"),
        None,
    )
    .unwrap();
    let c: serde_json::Value = serde_json::from_str(&body).unwrap();
    c["rootfs"]["diff_ids"]
        .as_array()
        .expect("rootfs.diff_ids")
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect()
}

/// Copy image manifest `digest` of `ferry/sensor` into repository `to` of the same registry
/// (blobs mounted across repositories, the manifest's bytes as they are, so its digest stays):
/// what another device's agent would have the engine pull under its own namespace.
fn copy_into_repo(digest: &str, to: &str) {
    let media = "application/vnd.docker.distribution.manifest.v2+json";
    let body = http_get(
        &format!("http://{REGISTRY}/v2/ferry/sensor/manifests/{digest}"),
        Some(&format!(
            "{media}, application/vnd.oci.image.manifest.v1+json"
        )),
    )
    .unwrap();
    let m: serde_json::Value = serde_json::from_str(&body).unwrap();
    let media = m["mediaType"].as_str().unwrap_or(media).to_string();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let blobs = std::iter::once(&m["config"])
        .chain(m["layers"].as_array().unwrap().iter())
        .map(|b| b["digest"].as_str().unwrap().to_string());
    for b in blobs {
        let url = format!("http://{REGISTRY}/v2/{to}/blobs/uploads/?mount={b}&from=ferry/sensor");
        let r = agent.post(&url).send_empty().unwrap();
        assert_eq!(r.status().as_u16(), 201, "mount {b} into {to}");
    }
    let url = format!("http://{REGISTRY}/v2/{to}/manifests/{digest}");
    let r = agent
        .put(&url)
        .header("Content-Type", &media)
        .send(body.as_bytes())
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "put the manifest into {to}");
}

/// Engine, registry and sample image, set up once per test process.
fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let setup = std::env::var_os("FERRY_TEST_NO_SETUP").is_none();
        let registry_up = || http_get(&format!("http://{REGISTRY}/v2/"), None).is_ok();
        if !engine_answers(SOCKET) || !registry_up() {
            assert!(
                setup,
                "no engine at {SOCKET} or no registry at {REGISTRY}: run scripts/env-up.sh"
            );
            run_script("scripts/env-up.sh", &[]);
        }
        let digest = match arm64_digest() {
            Ok(d) => d,
            Err(e) => {
                assert!(setup, "{e}: run images/build.sh {REGISTRY}");
                run_script("images/build.sh", &[REGISTRY]);
                arm64_digest().unwrap_or_else(|e| panic!("after images/build.sh: {e}"))
            }
        };
        Images {
            arm64: format!("{REPO}@{digest}"),
        }
    })
}

async fn shared_engine() -> DockerRuntime {
    let _ = images();
    DockerRuntime::connect(SOCKET)
        .await
        .expect("connect to the shared engine")
}

/// Pull into the shared engine (usually already present: then it is a fast no-op).
async fn ensure_pulled(rt: &DockerRuntime, reference: &str) {
    rt.pull(reference, "linux/arm64", None, &|_| {})
        .await
        .unwrap_or_else(|e| panic!("pull {reference}: {e}"));
}

#[path = "common/ports.rs"]
mod ports;
use ports::free_port;

fn unique(test: &str) -> String {
    format!("ferry-rt-{test}-{}", std::process::id())
}

/// Force-removes the named containers on drop (also when the test panics), through the CLI so
/// that it needs no async context.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("docker")
                .args(["rm", "-f", "-v", name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn base_config(name: &str, image: &str, device: &str) -> ContainerConfig {
    ContainerConfig {
        name: name.to_string(),
        image: image.to_string(),
        labels: [
            (labels::DEVICE.to_string(), device.to_string()),
            (labels::APP.to_string(), "sensor".to_string()),
        ]
        .into(),
        restart_policy: RestartPolicy::No,
        platform: Some("linux/arm64".to_string()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_lifecycle_on_shared_engine() {
    let t0 = Instant::now();
    let img = images();
    let rt = shared_engine().await;
    ensure_pulled(&rt, &img.arm64).await;

    let name = unique("lifecycle");
    let other = format!("{name}-unlabelled");
    let foreign = format!("{name}-foreign");
    let _cleanup = Cleanup(vec![name.clone(), other.clone(), foreign.clone()]);
    let device = unique("dev-lifecycle");
    let host_port = free_port();

    let mut cfg = base_config(&name, &img.arm64, &device);
    // PID 1 ignores SIGTERM (no handler), so stop has to wait for the grace period.
    cfg.cmd = Some(vec![
        "/bin/sh".into(),
        "-c".into(),
        "echo line1; echo line2; sleep 1; echo \"err:$FERRY_TEST_VALUE\" >&2; exec sleep 3600"
            .into(),
    ]);
    cfg.env = [("FERRY_TEST_VALUE".to_string(), "hello env".to_string())].into();
    cfg.ports = vec![PortMapping {
        host: host_port,
        container: 8080,
        proto: "tcp".into(),
    }];

    // Memory (swap included) and pids limits, as the policy grants them.
    cfg.memory_bytes = Some(96 * 1024 * 1024);
    cfg.pids_limit = Some(64);

    let id = rt.create(&cfg).await.expect("create");
    assert_eq!(id.len(), 64, "id {id}");
    let out = std::process::Command::new("docker")
        .args(["-H", &format!("unix://{SOCKET}"), "inspect", "-f"])
        .arg("{{.HostConfig.Memory}} {{.HostConfig.MemorySwap}} {{.HostConfig.PidsLimit}}")
        .arg(&id)
        .output()
        .expect("docker inspect");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{0} {0} 64", 96 * 1024 * 1024),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = rt
        .create(&cfg)
        .await
        .expect_err("a second create with the same name");
    assert!(
        matches!(&err, RuntimeError::Op { op: "create", detail, .. } if detail.contains("already in use")),
        "{err}"
    );

    let created = rt.inspect(&name).await.unwrap().expect("inspect created");
    assert_eq!(created.id, id);
    assert_eq!(created.name, name);
    assert_eq!(created.image, img.arm64);
    assert!(
        created.image_id.starts_with("sha256:"),
        "{}",
        created.image_id
    );
    assert_eq!(created.state.status, "created");
    assert!(!created.state.running);
    assert_eq!(created.state.exit_code, None);
    assert_eq!(created.labels.get(labels::DEVICE), Some(&device));
    assert_eq!(created.restart_policy, RestartPolicy::No);
    assert_eq!(created.network_mode, "bridge");
    assert_eq!(created.host_ports.get(&8080), Some(&host_port));

    rt.start(&id).await.expect("start");
    rt.start(&id).await.expect("start is idempotent");
    let running = rt.inspect(&id).await.unwrap().expect("inspect running");
    assert!(running.state.running, "{:?}", running.state);
    assert_eq!(running.state.status, "running");
    assert!(running.state.started_at.is_some());
    assert_eq!(running.state.restart_count, 0);
    let ip = running.ip_address.clone().expect("bridge IP");
    assert!(ip.parse::<std::net::Ipv4Addr>().is_ok(), "{ip}");
    assert_eq!(running.host_ports.get(&8080), Some(&host_port));

    // exec: exit codes, and the timeout.
    let exec = |argv: &[&str]| argv.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(rt.exec(&id, &exec(&["true"]), SLOW).await.unwrap(), 0);
    assert_eq!(rt.exec(&id, &exec(&["false"]), SLOW).await.unwrap(), 1);
    assert_eq!(
        rt.exec(
            &id,
            &exec(&["sh", "-c", "echo out; echo err >&2; exit 7"]),
            SLOW
        )
        .await
        .unwrap(),
        7
    );
    let started = Instant::now();
    let err = rt
        .exec(&id, &exec(&["sleep", "30"]), Duration::from_secs(2))
        .await
        .expect_err("exec beyond its timeout");
    assert!(
        matches!(err, RuntimeError::Timeout { op: "exec", .. }),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));

    // logs: stdout and stderr, in order, without trailing newlines.
    let logs = wait_for("three log lines", SLOW, || async {
        let l = rt.logs_tail(&id, 10).await.unwrap();
        (l.len() >= 3).then_some(l)
    })
    .await;
    assert_eq!(logs, vec!["line1", "line2", "err:hello env"]);
    assert_eq!(rt.logs_tail(&id, 1).await.unwrap(), vec!["err:hello env"]);
    assert_eq!(
        rt.logs_tail(&id, 2).await.unwrap(),
        vec!["line2", "err:hello env"]
    );

    // restart policy.
    rt.set_restart_policy(&id, RestartPolicy::UnlessStopped)
        .await
        .unwrap();
    assert_eq!(
        rt.inspect(&id).await.unwrap().unwrap().restart_policy,
        RestartPolicy::UnlessStopped
    );
    rt.set_restart_policy(&id, RestartPolicy::No).await.unwrap();
    assert_eq!(
        rt.inspect(&id).await.unwrap().unwrap().restart_policy,
        RestartPolicy::No
    );

    // list: by label only, including stopped containers.
    let mut unlabelled = base_config(&other, &img.arm64, &device);
    unlabelled.labels.clear();
    rt.create(&unlabelled).await.unwrap();
    let foreign_id = rt
        .create(&base_config(
            &foreign,
            &img.arm64,
            &format!("{device}-other"),
        ))
        .await
        .unwrap();
    let listed = rt.list(&[(labels::DEVICE, &device)]).await.unwrap();
    assert_eq!(
        listed.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        vec![id.as_str()]
    );
    assert!(listed[0].state.running);
    assert_eq!(listed[0].host_ports.get(&8080), Some(&host_port));
    let both = rt
        .list(&[(labels::DEVICE, &device), (labels::APP, "sensor")])
        .await
        .unwrap();
    assert_eq!(both.len(), 1);
    assert!(rt
        .list(&[(labels::DEVICE, &device), (labels::APP, "other")])
        .await
        .unwrap()
        .is_empty());
    let foreign_listed = rt
        .list(&[(labels::DEVICE, &format!("{device}-other"))])
        .await
        .unwrap();
    assert_eq!(foreign_listed.len(), 1);
    assert_eq!(foreign_listed[0].id, foreign_id);
    assert_eq!(foreign_listed[0].state.status, "created");

    // stop honours the grace (default would be 10 s) and is idempotent.
    let started = Instant::now();
    rt.stop(&id, Duration::from_secs(1)).await.expect("stop");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(8),
        "stop with 1 s grace took {took:?}"
    );
    let stopped = rt.inspect(&id).await.unwrap().unwrap();
    assert!(!stopped.state.running);
    assert_eq!(stopped.state.status, "exited");
    assert_eq!(
        stopped.state.exit_code,
        Some(137),
        "SIGKILLed after the grace"
    );
    rt.stop(&id, Duration::from_secs(1))
        .await
        .expect("stop again");
    rt.stop(&format!("{name}-missing"), Duration::from_secs(1))
        .await
        .expect("stop of a missing container");

    // Missing containers.
    let missing = format!("{name}-missing");
    assert!(rt.inspect(&missing).await.unwrap().is_none());
    assert!(matches!(
        rt.start(&missing).await,
        Err(RuntimeError::NotFound { op: "start", .. })
    ));
    assert!(matches!(
        rt.set_restart_policy(&missing, RestartPolicy::No).await,
        Err(RuntimeError::NotFound { .. })
    ));
    assert!(matches!(
        rt.exec(&missing, &exec(&["true"]), SLOW).await,
        Err(RuntimeError::NotFound { op: "exec", .. })
    ));
    assert!(matches!(
        rt.logs_tail(&missing, 5).await,
        Err(RuntimeError::NotFound { .. })
    ));
    // exec in a stopped container: the daemon's message.
    let err = rt.exec(&id, &exec(&["true"]), SLOW).await.unwrap_err();
    assert!(err.to_string().contains("is not running"), "{err}");

    // remove: forced (works on a running container too) and idempotent.
    rt.remove(&id).await.expect("remove");
    rt.remove(&id).await.expect("remove again");
    assert!(rt.inspect(&id).await.unwrap().is_none());
    rt.start(&foreign_id).await.unwrap();
    rt.remove(&foreign_id).await.expect("remove running");
    assert!(rt.inspect(&foreign_id).await.unwrap().is_none());
    rt.remove(&other).await.unwrap();
    assert!(rt
        .list(&[(labels::DEVICE, &device)])
        .await
        .unwrap()
        .is_empty());
    eprintln!("container_lifecycle_on_shared_engine: {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_restarts_and_published_port() {
    let t0 = Instant::now();
    let img = images();
    let rt = shared_engine().await;
    ensure_pulled(&rt, &img.arm64).await;
    let device = unique("dev-health");
    let app = unique("health-app");
    let crash = unique("health-crash");
    let _cleanup = Cleanup(vec![app.clone(), crash.clone()]);

    // The sample app with its own HEALTHCHECK, published on a free host port.
    let host_port = free_port();
    let mut cfg = base_config(&app, &img.arm64, &device);
    cfg.ports = vec![PortMapping {
        host: host_port,
        container: 8080,
        proto: "tcp".into(),
    }];
    cfg.restart_policy = RestartPolicy::UnlessStopped;
    let id = rt.create(&cfg).await.unwrap();
    rt.start(&id).await.unwrap();
    let first = rt.inspect(&id).await.unwrap().unwrap();
    assert!(
        matches!(first.state.health.as_deref(), Some("starting" | "healthy")),
        "{:?}",
        first.state.health
    );
    assert_eq!(first.restart_policy, RestartPolicy::UnlessStopped);
    wait_for("the image's HEALTHCHECK to pass", SLOW, || async {
        let i = rt.inspect(&id).await.unwrap().unwrap();
        (i.state.health.as_deref() == Some("healthy")).then_some(())
    })
    .await;
    // The published port really reaches the app.
    let body = wait_for("GET /healthz through the published port", SLOW, || async {
        tokio::task::spawn_blocking(move || {
            http_get(&format!("http://127.0.0.1:{host_port}/healthz"), None).ok()
        })
        .await
        .unwrap()
    })
    .await;
    assert_eq!(body.trim(), "ok");
    rt.stop(&id, Duration::from_secs(10)).await.unwrap();
    let stopped = rt.inspect(&id).await.unwrap().unwrap();
    assert!(!stopped.state.running);
    rt.remove(&id).await.unwrap();

    // A crash loop: restart count grows under unless-stopped.
    let mut cfg = base_config(&crash, &img.arm64, &device);
    cfg.cmd = Some(vec![
        "/bin/sh".into(),
        "-c".into(),
        "echo crashing; exit 3".into(),
    ]);
    cfg.restart_policy = RestartPolicy::UnlessStopped;
    let id = rt.create(&cfg).await.unwrap();
    rt.start(&id).await.unwrap();
    let info = wait_for("two restarts", SLOW, || async {
        let i = rt.inspect(&id).await.unwrap().unwrap();
        (i.state.restart_count >= 2).then_some(i)
    })
    .await;
    assert!(info.state.restart_count >= 2);
    // Stop the loop, then the last exit code is the app's.
    rt.set_restart_policy(&id, RestartPolicy::No).await.unwrap();
    rt.stop(&id, Duration::from_secs(5)).await.unwrap();
    let done = wait_for("the loop to end", SLOW, || async {
        let i = rt.inspect(&id).await.unwrap().unwrap();
        (i.state.status == "exited").then_some(i)
    })
    .await;
    assert!(
        matches!(done.state.exit_code, Some(3) | Some(137) | Some(143)),
        "{:?}",
        done.state
    );
    let logs = rt.logs_tail(&id, 50).await.unwrap();
    assert!(
        logs.len() >= 2 && logs.iter().all(|l| l == "crashing"),
        "{logs:?}"
    );
    rt.remove(&id).await.unwrap();
    eprintln!("health_restarts_and_published_port: {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_and_unreachable_engine() {
    let rt = shared_engine().await;
    let info = rt.info().await.expect("info");
    assert!(!info.root_dir.is_empty());
    assert!(!info.server_version.is_empty());
    assert_eq!(info.api_version, rt.api_version());
    if info.server_version.starts_with("20.10") {
        assert_eq!(
            info.api_version, "1.41",
            "negotiated down to the daemon's API"
        );
    }
    match DockerRuntime::connect("/nonexistent/ferry-test.sock").await {
        Err(RuntimeError::Unreachable { endpoint, .. }) => {
            assert_eq!(endpoint, "/nonexistent/ferry-test.sock")
        }
        Err(e) => panic!("expected Unreachable, got {e}"),
        Ok(_) => panic!("connected to a missing socket"),
    }
}

/// A private dockerd, stopped and deleted on drop.
///
/// NOT `--bridge none`: dockerd 20.10 then deletes the host's `docker0` at startup
/// (`removeDefaultBridgeInterface`), cutting the shared engine's bridge network. The private
/// engine gets its own bridge instead (`frt<pid>`, 10.254.x.1/24, no iptables, no masquerade).
struct IsolatedEngine {
    child: Child,
    dir: tempfile::TempDir,
    socket: String,
    bridge: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl IsolatedEngine {
    fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ferry-rt-")
            .tempdir_in("/tmp")
            .unwrap();
        let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
        let pid = std::process::id();
        let bridge = format!("frt{pid}");
        let _ = ip(&["link", "del", &bridge]); // left over by a killed run
        assert!(
            ip(&["link", "add", "name", &bridge, "type", "bridge"])
                && ip(&[
                    "addr",
                    "add",
                    &format!("10.254.{}.1/24", pid % 250),
                    "dev",
                    &bridge
                ])
                && ip(&["link", "set", &bridge, "up"]),
            "cannot create bridge {bridge} (needs root and iproute2)"
        );
        let socket = p("d.sock");
        let log = std::fs::File::create(dir.path().join("dockerd.log")).unwrap();
        let dockerd = ["/usr/sbin/dockerd", "/usr/bin/dockerd"]
            .into_iter()
            .find(|d| Path::new(d).exists())
            .unwrap_or("dockerd");
        let spawned = Command::new(dockerd)
            .args(["--data-root", &p("data"), "--exec-root", &p("exec")])
            .args([
                "--pidfile",
                &p("dockerd.pid"),
                "--host",
                &format!("unix://{socket}"),
            ])
            .args([
                "--bridge",
                &bridge,
                "--iptables=false",
                "--ip-masq=false",
                "--ip-forward=false",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = ip(&["link", "del", &bridge]);
                panic!("cannot start {dockerd} (needs root): {e}");
            }
        };
        let mut engine = Self {
            child,
            dir,
            socket,
            bridge,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !engine_answers(&engine.socket) {
            if let Ok(Some(status)) = engine.child.try_wait() {
                panic!("private dockerd exited: {status}; log:\n{}", engine.log());
            }
            assert!(
                Instant::now() < deadline,
                "private dockerd did not answer; log:\n{}",
                engine.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        engine
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }
}

impl Drop for IsolatedEngine {
    fn drop(&mut self) {
        // SIGTERM our own child only; it stops its containerd and unmounts.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_image_inspect_and_remove_image_on_private_engine() {
    let t0 = Instant::now();
    let img = images();
    let engine = tokio::task::spawn_blocking(IsolatedEngine::start)
        .await
        .unwrap();
    let rt = DockerRuntime::connect(&engine.socket)
        .await
        .expect("connect to the private engine");
    let info = rt.info().await.unwrap();
    assert_eq!(
        Path::new(&info.root_dir),
        engine.dir.path().join("data"),
        "root_dir is the data root"
    );
    assert!(rt.image_inspect(&img.arm64).await.unwrap().is_none());

    // Pull by digest, with progress summed over the layers.
    let seen: Mutex<Vec<PullProgress>> = Mutex::new(Vec::new());
    let started = Instant::now();
    rt.pull(&img.arm64, "linux/arm64", None, &|p| {
        seen.lock().unwrap().push(p)
    })
    .await
    .expect("pull");
    let pull_time = started.elapsed();
    let seen = seen.into_inner().unwrap();
    assert!(!seen.is_empty(), "no progress reported");
    let last = *seen.last().unwrap();
    assert!(
        last.total > 0 && last.bytes == last.total,
        "final progress {last:?}"
    );
    assert!(
        seen.windows(2).all(|w| w[1].bytes >= w[0].bytes),
        "bytes never go back: {seen:?}"
    );
    assert!(seen.iter().all(|p| p.bytes <= p.total), "{seen:?}");

    let image = rt
        .image_inspect(&img.arm64)
        .await
        .unwrap()
        .expect("pulled image is present");
    assert!(
        image.repo_digests.contains(&img.arm64),
        "{:?}",
        image.repo_digests
    );
    assert_eq!(image.os, "linux");
    assert_eq!(image.architecture, "arm64");
    assert!(image.id.starts_with("sha256:"), "{}", image.id);
    assert!(image.size > 0);
    // The summed layer sizes (compressed) are in the same range as the image (uncompressed).
    assert!(last.total <= image.size * 2, "{last:?} vs {}", image.size);
    // By id too.
    assert_eq!(
        rt.image_inspect(&image.id).await.unwrap(),
        Some(image.clone())
    );

    // A present image: Ok, fast.
    rt.pull(&img.arm64, "linux/arm64", None, &|_| {})
        .await
        .expect("pull of a present image");

    // Errors carry the daemon's message.
    let missing = format!("{REPO}@sha256:{}", "0".repeat(64));
    let err = rt
        .pull(&missing, "linux/arm64", None, &|_| {})
        .await
        .expect_err("pull of an unknown manifest");
    assert!(
        matches!(&err, RuntimeError::Op { op: "pull", detail, .. } if detail.contains("manifest unknown")),
        "{err}"
    );
    let err = rt
        .pull(&img.arm64, "linux/arm/v7", None, &|_| {})
        .await
        .expect_err("an arm64 manifest pulled for linux/arm/v7");
    assert!(err.to_string().contains("does not match"), "{err}");

    // In use by a container: remove_image is Ok but the image stays.
    let name = unique("rmi-user");
    let mut cfg = base_config(&name, &img.arm64, "private");
    cfg.network_mode = Some("none".into());
    let id = rt.create(&cfg).await.expect("create on the private engine");
    // A wrong platform is refused at create with the daemon's message.
    let mut wrong = base_config(&format!("{name}-v7"), &img.arm64, "private");
    wrong.network_mode = Some("none".into());
    wrong.platform = Some("linux/arm/v7".into());
    let err = rt
        .create(&wrong)
        .await
        .expect_err("create for the wrong platform");
    assert!(err.to_string().contains("does not match"), "{err}");
    rt.remove_image(&img.arm64)
        .await
        .expect("remove_image in use");
    assert!(rt.image_inspect(&img.arm64).await.unwrap().is_some());
    rt.remove(&id).await.unwrap();

    rt.remove_image(&img.arm64).await.expect("remove_image");
    assert!(rt.image_inspect(&img.arm64).await.unwrap().is_none());
    assert!(rt.image_inspect(&image.id).await.unwrap().is_none());
    rt.remove_image(&img.arm64)
        .await
        .expect("remove_image again");
    rt.remove_image(&missing)
        .await
        .expect("remove_image of a missing image");

    // By id, as the agent prunes (it creates containers from image ids and the engine names an
    // image once per registry it was pulled from): every name goes, then the image.
    let other = img.arm64.replacen("127.0.0.1:", "localhost:", 1);
    for r in [&img.arm64, &other] {
        rt.pull(r, "linux/arm64", None, &|_| {})
            .await
            .unwrap_or_else(|e| panic!("pull {r}: {e}"));
    }
    let named = rt
        .image_inspect(&image.id)
        .await
        .unwrap()
        .expect("pulled again");
    assert!(
        named.repo_digests.contains(&img.arm64) && named.repo_digests.contains(&other),
        "{:?}",
        named.repo_digests
    );
    // Listed with its layers: the chain a download skips.
    let digest = img.arm64.rsplit_once('@').unwrap().1;
    let listed = rt.list_images().await.expect("list_images");
    let mine = listed
        .iter()
        .find(|i| i.id == image.id)
        .unwrap_or_else(|| panic!("{} not listed: {listed:?}", image.id));
    assert_eq!(mine.layers, config_diff_ids(digest));
    // In use: the image stays, by its id.
    let id = rt.create(&cfg).await.expect("create again");
    rt.remove_image(&image.id)
        .await
        .expect("remove_image by id in use");
    assert!(rt.image_inspect(&image.id).await.unwrap().is_some());
    rt.remove(&id).await.unwrap();
    rt.remove_image(&image.id)
        .await
        .expect("remove_image by id");
    assert!(rt.image_inspect(&image.id).await.unwrap().is_none());
    for r in [&img.arm64, &other] {
        assert!(rt.image_inspect(r).await.unwrap().is_none(), "{r} left");
    }
    assert!(
        rt.list_images()
            .await
            .unwrap()
            .iter()
            .all(|i| i.id != image.id),
        "still listed"
    );

    // Two agents on one engine (each device's names under its namespace), and a name from an
    // agent before namespaces: an agent removing the image by id takes its own names and the
    // old loopback one, never the other agent's, so the image stays for it.
    let digest = img.arm64.rsplit_once('@').unwrap().1;
    let (ns_a, ns_b) = ("ferry-00000000000a", "ferry-00000000000b");
    let a = format!("{REGISTRY}/{ns_a}/ferry/sensor@{digest}");
    let b = format!("{REGISTRY}/{ns_b}/ferry/sensor@{digest}");
    copy_into_repo(digest, &format!("{ns_a}/ferry/sensor"));
    copy_into_repo(digest, &format!("{ns_b}/ferry/sensor"));
    for r in [&a, &b, &img.arm64] {
        rt.pull(r, "linux/arm64", None, &|_| {})
            .await
            .unwrap_or_else(|e| panic!("pull {r}: {e}"));
    }
    let rt_a = rt.clone().owning_names_under(ns_a);
    let rt_b = rt.clone().owning_names_under(ns_b);
    rt_a.remove_image(&image.id).await.expect("agent A prunes");
    let left = rt
        .image_inspect(&image.id)
        .await
        .unwrap()
        .expect("the image stays for agent B");
    assert_eq!(left.repo_digests, vec![b.clone()]);
    rt_b.remove_image(&image.id).await.expect("agent B prunes");
    assert!(rt.image_inspect(&image.id).await.unwrap().is_none());

    drop(rt);
    drop(engine);
    eprintln!(
        "pull_image_inspect_and_remove_image_on_private_engine: {:?} (pull {pull_time:?})",
        t0.elapsed()
    );
}
