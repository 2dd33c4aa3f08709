//! A real `ferryctl serve` (in-process) on a real, open mosquitto (anyone may publish), fed
//! what an attacker on the broker would send (issue 9):
//! - a retained message over the client's 1 MiB limit on another device's topic: the controller
//!   stays connected (one connection in the broker's log, MQTT 5) and keeps ingesting;
//! - a forged state claiming sequence 2^64−2: the next notice's sequence is the controller's own.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::Utc;
use ferry_controller::server::{self, config};
use ferry_protocol::desired::{verify_notice, Trust};
use ferry_protocol::keys::{PrivateKey, TrustedKeys};
use ferry_protocol::release::Release;
use ferry_protocol::report::{AppState, StateReport};
use support::*;

fn state(device: &str, sequence: u64) -> String {
    serde_json::to_string(&StateReport {
        device: device.into(),
        agent_version: "0.1.0".into(),
        platform: "linux/arm64".into(),
        sequence,
        apps: BTreeMap::from([(
            "sensor".to_string(),
            AppState {
                version: "1.0.0".into(),
                digest: format!("sha256:{}", "c".repeat(64)),
                container: format!("ferry-{device}-sensor"),
                health: "healthy".into(),
            },
        )]),
        update: None,
        ts: Utc::now(),
        labels: BTreeMap::from([("group".to_string(), "beta".to_string())]),
    })
    .unwrap()
}

fn release(rk: &PrivateKey, version: &str) -> String {
    Release {
        app: "sensor".into(),
        version: version.parse().unwrap(),
        image: "127.0.0.1:5055/ferry/sensor".into(),
        platforms: BTreeMap::from([(
            "linux/arm64".to_string(),
            format!("sha256:{}", "a".repeat(64)),
        )]),
        container: Default::default(),
        health: Default::default(),
        created_at: Utc::now(),
    }
    .sign(&[rk])
    .to_json()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// `ferryctl serve` in this process, and a way to call its API.
struct Serve {
    rt: tokio::runtime::Runtime,
    server: Option<tokio::task::JoinHandle<Result<(), server::ServeError>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    api: String,
    token: String,
    ck: PrivateKey,
    rk: PrivateKey,
    _dir: tempfile::TempDir,
}

impl Serve {
    fn start(broker: &Mosquitto) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let ck = PrivateKey::from_seed([21; 32]).unwrap();
        let rk = PrivateKey::from_seed([22; 32]).unwrap();
        write(dir.path(), "controller.key", &ck.to_pem());
        write(dir.path(), "release.pub", &rk.public().to_pem());
        let token = "hostile-test-token-0123456789".to_string();
        write(dir.path(), "token", &token);
        let cfg = write(
            dir.path(),
            "controller.toml",
            &format!(
                "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\napi_token_file = \"token\"\n\
                 controller_key = \"controller.key\"\n[mqtt]\nurl = \"{}\"\n\
                 [trust]\nrelease_keys = [\"release.pub\"]\n[rollout]\ntick = \"200ms\"\n",
                broker.url()
            ),
        );
        let loaded = config::load(&cfg).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = rt.spawn(server::run(
            loaded,
            async {
                let _ = stop_rx.await;
            },
            Some(bound_tx),
        ));
        let addr = rt.block_on(bound_rx).expect("server bound").http;
        Serve {
            rt,
            server: Some(server),
            stop: Some(stop_tx),
            api: format!("http://{addr}"),
            token,
            ck,
            rk,
            _dir: dir,
        }
    }

    fn get(&self, path: &str) -> String {
        let mut r = ureq::get(&format!("{}{path}", self.api))
            .header("Authorization", &format!("Bearer {}", self.token))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        r.body_mut().read_to_string().unwrap()
    }

    fn post(&self, path: &str, body: &str) -> serde_json::Value {
        let mut r = ureq::post(&format!("{}{path}", self.api))
            .header("Authorization", &format!("Bearer {}", self.token))
            .header("Content-Type", "application/json")
            .send(body)
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
    }

    fn devices(&self) -> serde_json::Value {
        serde_json::from_str(&self.get("/api/v1/devices")).unwrap()
    }

    fn wait_device(&self, what: &str, ok: &dyn Fn(&serde_json::Value) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.devices();
            if v.as_array().unwrap().iter().any(ok) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {v:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(15), server).await });
        }
    }
}

/// Lines of the broker's log about the controller's device connection connecting.
fn controller_connects(broker: &Mosquitto) -> Vec<String> {
    broker
        .log()
        .lines()
        .filter(|l| l.contains("New client connected") && l.contains("as ferryctl-serve-"))
        .filter(|l| !l.contains("-notices"))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_retained_message_over_the_limit_leaves_the_controller_listening() {
    let Some(broker) = Mosquitto::start() else {
        return;
    };
    // Before the controller starts (delivered on its subscribe) and while it runs.
    let big = vec![b'x'; 2 * 1024 * 1024];
    broker.publish_bytes("ferry/v1/devices/big-0/state", &big, true);
    let serve = Serve::start(&broker);
    broker.publish("ferry/v1/devices/early/online", "1", true);
    broker.publish("ferry/v1/devices/early/state", &state("early", 1), true);
    serve.wait_device("a device before the big message", &|d| {
        d["id"] == "early" && d["online"] == true
    });
    broker.publish_bytes("ferry/v1/devices/big-1/events", &big, false);
    broker.publish_bytes("ferry/v1/devices/big-2/state", &big, true);
    // Let a client that would fail on them fail and reconnect (its first backoff is 0.5 s).
    std::thread::sleep(Duration::from_secs(3));
    broker.publish("ferry/v1/devices/late/online", "1", true);
    broker.publish("ferry/v1/devices/late/state", &state("late", 1), true);
    serve.wait_device("a device that came online after the big messages", &|d| {
        d["id"] == "late" && d["online"] == true
    });
    let connects = controller_connects(&broker);
    assert_eq!(
        connects.len(),
        1,
        "the controller connected more than once:\n{}",
        connects.join("\n")
    );
    assert!(
        connects[0].contains("(p5,"),
        "MQTT 5, which carries the Maximum Packet Size: {}",
        connects[0]
    );
    let metrics = serve.get("/metrics");
    assert!(metrics.contains("ferry_mqtt_connected 1"), "{metrics}");
    let ids: Vec<String> = serve
        .devices()
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        !ids.iter().any(|i| i.starts_with("big")),
        "the oversized messages created devices: {ids:?}"
    );
}

#[test]
fn a_forged_sequence_near_the_end_does_not_steer_the_next_notice() {
    let Some(broker) = Mosquitto::start() else {
        return;
    };
    let serve = Serve::start(&broker);
    broker.publish("ferry/v1/devices/victim/online", "1", true);
    broker.publish("ferry/v1/devices/victim/state", &state("victim", 1), true);
    serve.wait_device("the victim", &|d| {
        d["id"] == "victim" && d["online"] == true
    });
    // The attacker's state: sequence 2^64 − 2.
    broker.publish(
        "ferry/v1/devices/victim/state",
        &state("victim", u64::MAX - 1),
        true,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !serve
        .get("/metrics")
        .contains("ferry_disbelieved_sequences_total 1")
    {
        assert!(Instant::now() < deadline, "{}", serve.get("/metrics"));
        std::thread::sleep(Duration::from_millis(100));
    }
    for v in ["1.0.0", "2.0.0"] {
        serve.post("/api/v1/releases", &release(&serve.rk, v));
    }
    let started = serve.post(
        "/api/v1/rollouts",
        &serde_json::json!({"app": "sensor", "version": "2.0.0", "select": "id=victim",
                            "waves": "100%", "soak": "1s", "max_failures": "0"})
        .to_string(),
    );
    assert!(started["id"].is_string(), "{started:#}");
    let trust = Trust {
        release: TrustedKeys::new([serve.rk.public().clone()]),
        release_threshold: 1,
        controller: TrustedKeys::new([serve.ck.public().clone()]),
    };
    let raw = broker.retained("ferry/v1/devices/victim/desired");
    let notice = verify_notice(&raw, &trust)
        .expect("the notice verifies")
        .desired;
    assert_eq!(
        notice.sequence, 2,
        "the controller's own next sequence, not one past the forged 2^64 − 2"
    );
}
