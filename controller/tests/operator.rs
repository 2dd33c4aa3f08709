//! The operator's commands (the built `ferryctl`) against a real `ferryctl serve` (in-process)
//! fed by a real mosquitto: `rollout start --force` signs notices with `force`, devices that
//! wait (a maintenance window, a registry that is down) show in `rollout status` (text and
//! JSON), `devices` and `device show`, and `rollback --force` is forced too.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use ferry_controller::server::{self, config};
use ferry_protocol::desired::{verify_notice, Trust};
use ferry_protocol::keys::{PrivateKey, TrustedKeys};
use ferry_protocol::release::Release;
use ferry_protocol::report::{AppState, Event, Phase, StateReport, UpdateStatus, Waiting};
use support::*;

const WINDOW: &str = "maintenance window 02:00-04:00 opens in 3 h";
const DARK: &str = "registry 127.0.0.1:5055: connection refused; retrying in 60 s";

fn state(device: &str, version: &str, sequence: u64, update: Option<UpdateStatus>) -> String {
    serde_json::to_string(&StateReport {
        trust: None,
        device: device.into(),
        agent_version: "0.1.0".into(),
        platform: "linux/arm64".into(),
        sequence,
        apps: BTreeMap::from([(
            "sensor".to_string(),
            AppState {
                version: version.into(),
                digest: format!("sha256:{}", "c".repeat(64)),
                container: format!("ferry-{device}-sensor"),
                health: "healthy".into(),
            },
        )]),
        update,
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

struct Ctl {
    url: String,
    token: PathBuf,
}

impl Ctl {
    fn run(&self, args: &[&str]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ferryctl"));
        for v in ["FERRY_TOKEN", "RUST_LOG"] {
            c.env_remove(v);
        }
        c.env("FERRY_SERVER", &self.url)
            .env("FERRY_TOKEN_FILE", &self.token)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ferryctl")
    }

    /// Exit 0, stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert_eq!(
            o.status.code(),
            Some(0),
            "ferryctl {args:?}\n--- stdout\n{out}\n--- stderr\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ok(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    fn wait(&self, what: &str, args: &[&str], ok: &dyn Fn(&serde_json::Value) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.json(args);
            if ok(&v) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {v:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn forced_rollout_and_waiting_devices_through_ferryctl() {
    let Some(broker) = Mosquitto::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ck = PrivateKey::from_seed([11; 32]).unwrap();
    let rk = PrivateKey::from_seed([12; 32]).unwrap();
    write(dir.path(), "controller.key", &ck.to_pem());
    write(dir.path(), "release.pub", &rk.public().to_pem());
    let token = write(dir.path(), "token", "operator-test-token-0123456789");
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
    let ctl = Ctl {
        url: format!("http://{addr}"),
        token,
    };
    let trust = Trust {
        release: TrustedKeys::new([rk.public().clone()]),
        release_threshold: 1,
        controller: TrustedKeys::new([ck.public().clone()]),
    };
    let notice = |device: &str| {
        let raw = broker.retained(&format!("ferry/v1/devices/{device}/desired"));
        verify_notice(&raw, &trust)
            .expect("the notice verifies")
            .desired
    };

    for d in ["op-1", "op-2"] {
        broker.publish_signed(&format!("ferry/v1/devices/{d}/online"), "1", true);
        broker.publish_signed(
            &format!("ferry/v1/devices/{d}/state"),
            &state(d, "1.0.0", 1, None),
            true,
        );
    }
    ctl.wait("devices not ingested", &["devices"], &|v| {
        v.as_array()
            .unwrap()
            .iter()
            .filter(|d| d["online"] == true)
            .count()
            == 2
    });
    for v in ["1.0.0", "2.0.0"] {
        let f = write(dir.path(), &format!("sensor-{v}.json"), &release(&rk, v));
        ctl.ok(&["release", "push", f.to_str().unwrap()]);
    }

    // ---- rollout start --force: every notice it signs asks for force
    let started = ctl.json(&[
        "rollout",
        "start",
        "--app",
        "sensor",
        "--version",
        "2.0.0",
        "--select",
        "all",
        "--waves",
        "100%",
        "--soak",
        "30s",
        "--device-timeout",
        "60s",
        "--force",
    ]);
    assert_eq!(started["force"], true, "{started:#}");
    let id = started["id"].as_str().unwrap().to_string();
    for d in ["op-1", "op-2"] {
        let n = notice(d);
        assert_eq!((n.sequence, n.force), (2, true), "{d}");
        assert_eq!(n.rollout.as_deref(), Some(id.as_str()));
    }

    // ---- op-1 waits for its maintenance window (retained state), op-2's registry is dark
    let held = UpdateStatus {
        sequence: 2,
        rollout: Some(id.clone()),
        phase: Phase::Downloaded,
        error: None,
        at: Utc::now(),
        waiting: Some(Waiting::Window),
        reason: Some(WINDOW.into()),
    };
    broker.publish_signed(
        "ferry/v1/devices/op-1/state",
        &state("op-1", "1.0.0", 2, Some(held)),
        true,
    );
    let mut retry = Event::new("op-2", 2, Some(id.clone()), Phase::Downloading);
    retry.waiting = Some(Waiting::Retrying);
    retry.reason = Some(DARK.into());
    broker.publish_signed(
        "ferry/v1/devices/op-2/events",
        &serde_json::to_string(&retry).unwrap(),
        false,
    );
    ctl.wait(
        "the waits did not reach the rollout",
        &["rollout", "status", &id],
        &|v| v["summary"]["held_window"] == 1 && v["summary"]["retrying"] == 1,
    );
    let v = ctl.json(&["rollout", "status", &id]);
    assert_eq!(v["summary"]["waves"][0]["held_window"], 1, "{v:#}");
    assert_eq!(v["summary"]["waves"][0]["retrying"], 1, "{v:#}");
    assert_eq!(
        v["summary"]["waiting"],
        serde_json::json!([
            {"waiting": "retrying", "reason": DARK, "devices": ["op-2"]},
            {"waiting": "window", "reason": WINDOW, "devices": ["op-1"]},
        ])
    );
    assert_eq!(v["devices"]["op-1"]["status"]["wait"]["kind"], "window");

    let text = ctl.ok(&["rollout", "status", &id]);
    assert!(text.contains("force (update locks ignored)"), "{text}");
    assert!(
        text.contains("of the notified: 1 held by a maintenance window, 0 held by an update lock"),
        "{text}"
    );
    assert!(text.contains("1 retrying their download"), "{text}");
    assert!(
        text.contains(&format!("1 x window ({WINDOW}): op-1")),
        "{text}"
    );
    assert!(
        text.contains(&format!("1 x retrying ({DARK}): op-2")),
        "{text}"
    );

    // In pages: one device, then the other, then none left.
    let page = ctl.json(&["devices", "--limit", "1"]);
    assert_eq!(
        (page["total"].as_u64(), page["next"].as_str()),
        (Some(2), Some("op-1")),
        "{page}"
    );
    let page = ctl.json(&["devices", "--limit", "1", "--after", "op-1"]);
    assert_eq!(page["devices"][0]["id"], "op-2", "{page}");
    assert!(page["next"].is_null(), "{page}");
    let text = ctl.ok(&["devices", "--limit", "1"]);
    assert!(
        text.contains("1 of 2 device(s); next page: --after op-1"),
        "{text}"
    );

    let table = ctl.ok(&["devices"]);
    assert!(
        table.contains(&format!("downloaded (seq 2), waiting: window ({WINDOW})")),
        "{table}"
    );
    assert!(
        table.contains(&format!("downloading (seq 2), waiting: retrying ({DARK})")),
        "{table}"
    );
    let show = ctl.ok(&["device", "show", "op-2"]);
    assert!(
        show.contains(&format!(
            "last update  downloading (seq 2), waiting: retrying ({DARK})"
        )),
        "{show}"
    );
    assert!(
        show.contains(&format!("waiting: retrying ({DARK})")),
        "{show}"
    );

    // ---- rollback --force: op-2 reports 2.0.0 (it ran 1.0.0 before) and is sent back, forced
    broker.publish_signed(
        "ferry/v1/devices/op-2/state",
        &state("op-2", "2.0.0", 2, None),
        true,
    );
    ctl.wait("op-2's new version", &["devices"], &|v| {
        v.as_array()
            .unwrap()
            .iter()
            .any(|d| d["id"] == "op-2" && d["previous"]["sensor"] == "1.0.0")
    });
    let r = ctl.json(&[
        "rollback", "--select", "id=op-2", "--app", "sensor", "--force",
    ]);
    assert_eq!(r["devices"][0]["sequence"], 3, "{r:#}");
    let n = notice("op-2");
    assert_eq!((n.sequence, n.force, n.allow_downgrade), (3, true, true));

    let _ = stop_tx.send(());
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(15), server)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap()
    });
}
