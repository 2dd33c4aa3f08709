//! A real `ferryctl serve` (in-process) on a real, open mosquitto (anyone may publish), fed
//! what an attacker on the broker would send (issue 9):
//! - a retained message over the client's 1 MiB limit on another device's topic: the controller
//!   stays connected (one connection in the broker's log, MQTT 5) and keeps ingesting;
//! - a forged state claiming sequence 2^64−2: the next notice's sequence is the controller's own;
//! - during a rollout's soak: a forged `rolled_back` event, a forged unhealthy state claiming
//!   sequence 2^64−2 and a new label, a replay of the device's own older report, another
//!   device's signed report on its topic and an enrolment request with another key: all
//!   dropped (counted by reason), the rollout completes with the device succeeded, no revert.
//!
//! The devices here are the tests' own signers (`support::publish_signed`): each report signed by
//! a key enrolled with the fleet token, as a real agent does.

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
        trust: None,
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
                 [trust]\nrelease_keys = [\"release.pub\"]\n{}[rollout]\ntick = \"200ms\"\n",
                broker.url(),
                enroll_section()
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
    broker.publish_signed("ferry/v1/devices/early/online", "1", true);
    broker.publish_signed("ferry/v1/devices/early/state", &state("early", 1), true);
    serve.wait_device("a device before the big message", &|d| {
        d["id"] == "early" && d["online"] == true
    });
    broker.publish_bytes("ferry/v1/devices/big-1/events", &big, false);
    broker.publish_bytes("ferry/v1/devices/big-2/state", &big, true);
    // Let a client that would fail on them fail and reconnect (its first backoff is 0.5 s).
    std::thread::sleep(Duration::from_secs(3));
    broker.publish_signed("ferry/v1/devices/late/online", "1", true);
    broker.publish_signed("ferry/v1/devices/late/state", &state("late", 1), true);
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

/// Wait until `/metrics` has `line`.
fn wait_metric(serve: &Serve, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = serve.get("/metrics");
        if m.contains(line) {
            return;
        }
        assert!(Instant::now() < deadline, "no {line:?} in\n{m}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn trust_of(serve: &Serve) -> Trust {
    Trust {
        release: TrustedKeys::new([serve.rk.public().clone()]),
        release_threshold: 1,
        controller: TrustedKeys::new([serve.ck.public().clone()]),
    }
}

#[test]
fn a_forged_sequence_near_the_end_does_not_steer_the_next_notice() {
    let Some(broker) = Mosquitto::start() else {
        return;
    };
    let serve = Serve::start(&broker);
    broker.publish_signed("ferry/v1/devices/victim/online", "1", true);
    broker.publish_signed("ferry/v1/devices/victim/state", &state("victim", 1), true);
    serve.wait_device("the victim", &|d| {
        d["id"] == "victim" && d["online"] == true
    });
    // The attacker's state, unsigned: sequence 2^64 − 2. Dropped before the core sees it.
    broker.publish(
        "ferry/v1/devices/victim/state",
        &state("victim", u64::MAX - 1),
        true,
    );
    wait_metric(&serve, "ferry_reports_dropped_total{reason=\"unsigned\"} 1");
    // The same claim signed by the device's own key (a compromised or broken box): believed
    // only within 10^6 of the controller's own sequence.
    broker.publish_signed(
        "ferry/v1/devices/victim/state",
        &state("victim", u64::MAX - 1),
        true,
    );
    wait_metric(&serve, "ferry_disbelieved_sequences_total 1");
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
    let raw = broker.retained("ferry/v1/devices/victim/desired");
    let notice = verify_notice(&raw, &trust_of(&serve))
        .expect("the notice verifies")
        .desired;
    assert_eq!(
        notice.sequence, 2,
        "the controller's own next sequence, not one past the forged 2^64 − 2"
    );
}

/// A state of `device` on `version` at `sequence`, healthy or not, with `labels`.
fn state_v(device: &str, version: &str, sequence: u64, health: &str, group: &str) -> String {
    let mut s: StateReport = serde_json::from_str(&state(device, sequence)).unwrap();
    let app = s.apps.get_mut("sensor").unwrap();
    app.version = version.into();
    app.health = health.into();
    s.labels = BTreeMap::from([("group".to_string(), group.to_string())]);
    serde_json::to_string(&s).unwrap()
}

#[test]
fn forged_reports_during_the_soak_change_nothing() {
    let Some(broker) = Mosquitto::start() else {
        return;
    };
    let serve = Serve::start(&broker);
    let t = "ferry/v1/devices/victim";
    broker.publish_signed(&format!("{t}/online"), "1", true);
    // Kept to replay later: the device's own, genuinely signed state on 1.0.0.
    let old_state = sign_report(
        &format!("{t}/state"),
        &state_v("victim", "1.0.0", 1, "healthy", "beta"),
    );
    broker.publish_bytes(&format!("{t}/state"), &old_state, true);
    broker.publish_signed("ferry/v1/devices/other/online", "1", true);
    serve.wait_device("the victim", &|d| {
        d["id"] == "victim" && d["online"] == true
    });
    for v in ["1.0.0", "2.0.0"] {
        serve.post("/api/v1/releases", &release(&serve.rk, v));
    }
    let started = serve.post(
        "/api/v1/rollouts",
        &serde_json::json!({"app": "sensor", "version": "2.0.0", "select": "id=victim",
                            "waves": "100%", "soak": "4s", "max_failures": "0",
                            "on_failure": "revert"})
        .to_string(),
    );
    let id = started["id"].as_str().expect("rollout id").to_string();
    let notice = verify_notice(&broker.retained(&format!("{t}/desired")), &trust_of(&serve))
        .unwrap()
        .desired;
    assert_eq!(notice.sequence, 2);
    // The device commits 2.0.0.
    let event = |device: &str, phase: &str| {
        serde_json::json!({"device": device, "sequence": 2, "rollout": id, "phase": phase,
                           "ts": Utc::now(), "reason": "forged"})
        .to_string()
    };
    broker.publish_signed(&format!("{t}/events"), &event("victim", "committed"), false);
    broker.publish_signed(
        &format!("{t}/state"),
        &state_v("victim", "2.0.0", 2, "healthy", "beta"),
        true,
    );
    serve.wait_device("the victim on 2.0.0", &|d| {
        d["id"] == "victim" && d["apps"]["sensor"]["version"] == "2.0.0"
    });

    // ---- the attacks, during the soak
    // 1. a forged rolled_back event and a forged unhealthy state claiming 2^64 − 2 and the
    //    canary label, unsigned;
    broker.publish(
        &format!("{t}/events"),
        &event("victim", "rolled_back"),
        false,
    );
    broker.publish(
        &format!("{t}/state"),
        &state_v("victim", "1.0.0", u64::MAX - 1, "unhealthy", "canary"),
        true,
    );
    // 2. the same, signed by the attacker's own key;
    let thief = PrivateKey::from_seed([66; 32]).unwrap();
    let forged = ferry_protocol::device_report::sign(
        &thief,
        "victim",
        ferry_protocol::device_report::Stream::State,
        u64::MAX,
        serde_json::from_str(&state_v(
            "victim",
            "1.0.0",
            u64::MAX - 1,
            "unhealthy",
            "canary",
        ))
        .unwrap(),
    );
    broker.publish_bytes(&format!("{t}/state"), &forged, true);
    // 3. the device's own older state, replayed;
    broker.publish_bytes(&format!("{t}/state"), &old_state, true);
    // 4. another enrolled device's genuinely signed rolled_back, copied onto the victim's topic;
    let copied = sign_report(
        "ferry/v1/devices/other/events",
        &event("other", "rolled_back"),
    );
    broker.publish_bytes(&format!("{t}/events"), &copied, false);
    // 5. an enrolment request for the victim with the attacker's key and the fleet token.
    let body = ferry_protocol::device_report::EnrollBody {
        public_key: thief.public().to_pem(),
        token_proof: Some(ferry_protocol::device_report::token_proof(
            ENROLL_TOKEN,
            "victim",
            thief.public().id(),
        )),
        agent_version: None,
    };
    broker.publish_bytes(
        &format!("{t}/enroll"),
        &ferry_protocol::device_report::sign(
            &thief,
            "victim",
            ferry_protocol::device_report::Stream::Enroll,
            u64::MAX,
            serde_json::to_value(body).unwrap(),
        ),
        true,
    );

    for line in [
        "ferry_reports_dropped_total{reason=\"unsigned\"} 2",
        "ferry_reports_dropped_total{reason=\"bad_signature\"} 1",
        "ferry_reports_dropped_total{reason=\"replayed\"} 1",
        "ferry_reports_dropped_total{reason=\"wrong_device\"} 1",
        "ferry_device_keys{status=\"pending\"} 1",
    ] {
        wait_metric(&serve, line);
    }
    // The rollout completes with the device succeeded; nothing was reverted.
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = loop {
        let r: serde_json::Value =
            serde_json::from_str(&serve.get(&format!("/api/v1/rollouts/{id}"))).unwrap();
        if r["state"] != "running" {
            break r;
        }
        assert!(Instant::now() < deadline, "{r:#}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(r["state"], "completed", "{r:#}");
    assert_eq!(r["summary"]["succeeded"], 1, "{r:#}");
    assert_eq!(r["summary"]["failed"], 0, "{r:#}");
    let d: serde_json::Value = serde_json::from_str(&serve.get("/api/v1/devices/victim")).unwrap();
    let d = if d.get("device").is_some() {
        &d["device"]
    } else {
        &d
    };
    assert_eq!(d["apps"]["sensor"]["version"], "2.0.0", "{d:#}");
    assert_eq!(d["apps"]["sensor"]["health"], "healthy", "{d:#}");
    assert_eq!(d["labels"]["group"], "beta", "{d:#}");
    assert!(d["sequence"].as_u64().unwrap() < 1_000, "{d:#}");
    let n = verify_notice(&broker.retained(&format!("{t}/desired")), &trust_of(&serve))
        .unwrap()
        .desired;
    assert_eq!(n.sequence, 2, "no revert notice was signed");
    // The victim keeps its key; the attacker's waits as a pending re-key.
    let keys: serde_json::Value = serde_json::from_str(&serve.get("/api/v1/keys")).unwrap();
    let approved: Vec<&serde_json::Value> = keys
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["device"] == "victim")
        .collect();
    assert_eq!(approved.len(), 2, "{keys:#}");
    assert_eq!(approved[0]["status"], "approved");
    assert_eq!(
        approved[0]["keyid"],
        device_key("victim").public().id().to_string()
    );
    assert_eq!(approved[1]["status"], "pending");
    assert_eq!(approved[1]["keyid"], thief.public().id().to_string());
}
