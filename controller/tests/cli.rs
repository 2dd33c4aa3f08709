//! End-to-end tests of the built `ferryctl` binary against real infrastructure:
//! the docker-registry at 127.0.0.1:5055 (scripts/env-up.sh; `FERRY_REGISTRY_ADDR` overrides,
//! as there), holding the images from `images/build.sh 127.0.0.1:5055`, and a mosquitto started
//! here on a free port.
//!
//! Infrastructure rules: when FERRY_REQUIRE_INFRA is unset and the registry (or the mosquitto
//! binary) is missing, a test skips with a loud message; with FERRY_REQUIRE_INFRA=1 it fails.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferry_protocol::{verify_notice, PublicKey, Strategy, Trust, TrustedKeys};
use ferry_registry::RegistryClient;

mod support;
use support::*;

/// `ferryctl` with a clean environment and its own state dir.
fn ferryctl(state: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferryctl"));
    for v in [
        "FERRY_BROKER",
        "FERRY_MQTT_USER",
        "FERRY_MQTT_PASSWORD",
        "FERRY_REGISTRY_USER",
        "FERRY_REGISTRY_PASSWORD",
        "RUST_LOG",
    ] {
        c.env_remove(v);
    }
    c.env("FERRY_STATE_DIR", state);
    c
}

fn run(c: &mut Command) -> Output {
    c.output().expect("run ferryctl")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited normally")
}

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", show(o)))
}

fn keygen(state: &Path, dir: &Path, name: &str) -> String {
    let o = run(ferryctl(state)
        .args(["keygen", "--json", "--name", name, "--out"])
        .arg(dir));
    assert_eq!(code(&o), 0, "{}", show(&o));
    json(&o)["keyid"].as_str().unwrap().to_string()
}

#[test]
fn keygen_sign_verify_publish_end_to_end() {
    if !registry_answers() {
        skip(&format!("no registry answers at http://{}/v2/", registry()));
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let keys = tmp.path().join("keys");

    // ---- keygen
    let release_id = keygen(&state, &keys, "release");
    let controller_id = keygen(&state, &keys, "controller");
    let other_id = keygen(&state, &keys, "other");
    assert_ne!(release_id, controller_id);
    assert_ne!(release_id, other_id);
    let again = run(ferryctl(&state)
        .args(["keygen", "--name", "release", "--out"])
        .arg(&keys));
    assert_eq!(code(&again), 1, "refuses to overwrite: {}", show(&again));

    // ---- release sign against the real registry
    let spec = tmp.path().join("sensor.toml");
    std::fs::write(
        &spec,
        format!(
            r#"
app = "sensor"
version = "1.0.0"
image = "{}:1.0.0"
platforms = ["linux/arm64", "linux/arm/v7"]

[container]
env = {{ MODE = "test" }}
ports = [{{ host = 18080, container = 8080 }}]

[health]
check = {{ http = {{ port = 8080, path = "/healthz" }} }}
grace_s = 1
interval_s = 1
successes = 2
"#,
            repo()
        ),
    )
    .unwrap();
    let release_file = tmp.path().join("sensor-1.0.0.json");
    let o = run(ferryctl(&state)
        .args(["release", "sign", "--json", "--key"])
        .arg(keys.join("release.key"))
        .arg("--spec")
        .arg(&spec)
        .arg("--out")
        .arg(&release_file));
    assert_eq!(
        code(&o),
        0,
        "{}\n(are the sample images pushed? images/build.sh {})",
        show(&o),
        registry()
    );
    let signed = json(&o);
    assert_eq!(signed["app"], "sensor");
    assert_eq!(signed["image"], repo().as_str());
    assert_eq!(signed["keyids"], serde_json::json!([release_id]));
    let platforms = signed["platforms"].as_object().unwrap();
    assert_eq!(platforms.len(), 2);
    // Per-platform IMAGE manifest digests, never the index digest.
    let client = RegistryClient::new(vec![], vec![]);
    let index = client.resolve_tag(&repo(), "1.0.0").unwrap();
    let want = client.platform_digests(&repo(), "1.0.0").unwrap();
    for (p, d) in platforms {
        assert_ne!(d.as_str().unwrap(), index.digest_of_tag);
        assert_eq!(
            Some(d.as_str().unwrap()),
            want.get(p).map(String::as_str),
            "{p}"
        );
    }

    // Friendly output too.
    let o = run(ferryctl(&state)
        .args(["release", "sign", "--key"])
        .arg(keys.join("release.key"))
        .arg("--key")
        .arg(keys.join("other.key"))
        .arg("--spec")
        .arg(&spec)
        .arg("--out")
        .arg(tmp.path().join("two-signers.json")));
    assert_eq!(code(&o), 0, "{}", show(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("linux/arm/v7") && text.contains(&release_id) && text.contains(&other_id),
        "{text}"
    );

    // ---- release verify
    let o = run(ferryctl(&state)
        .args(["release", "verify", "--trust"])
        .arg(keys.join("release.pub"))
        .arg(&release_file));
    assert_eq!(code(&o), 0, "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains(&release_id));
    let o = run(ferryctl(&state)
        .args(["release", "verify", "--json", "--trust"])
        .arg(keys.join("release.pub"))
        .arg(&release_file));
    assert_eq!(code(&o), 0, "{}", show(&o));
    assert_eq!(json(&o)["signers"][0]["keyid"], release_id.as_str());

    // Wrong key: exit 3 with the reason.
    let o = run(ferryctl(&state)
        .args(["release", "verify", "--trust"])
        .arg(keys.join("other.pub"))
        .arg(&release_file));
    assert_eq!(code(&o), 3, "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not trusted"),
        "{}",
        show(&o)
    );
    // Threshold 2 with both keys on a doubly signed release: ok; on the single one: exit 3.
    let o = run(ferryctl(&state)
        .args(["release", "verify", "--threshold", "2", "--trust"])
        .arg(keys.join("release.pub"))
        .arg("--trust")
        .arg(keys.join("other.pub"))
        .arg(tmp.path().join("two-signers.json")));
    assert_eq!(code(&o), 0, "{}", show(&o));
    let o = run(ferryctl(&state)
        .args(["release", "verify", "--threshold", "2", "--trust"])
        .arg(keys.join("release.pub"))
        .arg("--trust")
        .arg(keys.join("other.pub"))
        .arg(&release_file));
    assert_eq!(code(&o), 3, "{}", show(&o));
    // Tampered payload: exit 3.
    let mut env: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&release_file).unwrap()).unwrap();
    {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let body =
            String::from_utf8(b64.decode(env["payload"].as_str().unwrap()).unwrap()).unwrap();
        let forged = body.replace("\"version\":\"1.0.0\"", "\"version\":\"9.0.0\"");
        assert_ne!(forged, body);
        env["payload"] = b64.encode(forged).into();
    }
    let tampered = tmp.path().join("tampered.json");
    std::fs::write(&tampered, env.to_string()).unwrap();
    let o = run(ferryctl(&state)
        .args(["release", "verify", "--trust"])
        .arg(keys.join("release.pub"))
        .arg(&tampered));
    assert_eq!(code(&o), 3, "{}", show(&o));

    // ---- publish to a real mosquitto, read the retained notice back, verify it like a device
    let Some(broker) = Mosquitto::start() else {
        return;
    };
    let topic = "ferry/v1/devices/dev-001/desired";
    let trust = Trust {
        release: TrustedKeys::new([PublicKey::load(&keys.join("release.pub")).unwrap()]),
        release_threshold: 1,
        controller: TrustedKeys::new([PublicKey::load(&keys.join("controller.pub")).unwrap()]),
    };
    let publish = |extra: &[&str]| -> Output {
        run(ferryctl(&state)
            .args([
                "publish",
                "--json",
                "--device",
                "dev-001",
                "--broker",
                &broker.url(),
            ])
            .arg("--key")
            .arg(keys.join("controller.key"))
            .args(extra))
    };
    let rel = release_file.to_str().unwrap();
    let o = publish(&["--release", rel, "--rollout", "r-1", "--expires", "2h"]);
    assert_eq!(code(&o), 0, "{}", show(&o));
    let p = json(&o);
    assert_eq!(p["sequence"], 1);
    assert_eq!(p["topic"], topic);
    let raw = broker.retained(topic);
    let n = verify_notice(&raw, &trust).expect("the published notice verifies");
    assert_eq!(n.desired.device, "dev-001");
    assert_eq!(n.desired.sequence, 1);
    assert_eq!(n.desired.rollout.as_deref(), Some("r-1"));
    assert_eq!(n.desired.strategy, Strategy::StopFirst);
    assert!(!n.desired.force);
    assert_eq!(p["force"], false);
    let life = n.desired.expires_at - n.desired.issued_at;
    assert_eq!(life.num_seconds(), 7200);
    assert_eq!(n.releases["sensor"].release.platforms.len(), 2);
    assert_eq!(n.releases["sensor"].signers, vec![release_id.clone()]);

    // Second publish: the sequence increments and replaces the retained notice.
    let o = publish(&[
        "--release",
        rel,
        "--strategy",
        "start-first",
        "--trust-release",
        keys.join("release.pub").to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 0, "{}", show(&o));
    assert_eq!(json(&o)["sequence"], 2);
    let n = verify_notice(&broker.retained(topic), &trust).unwrap();
    assert_eq!(n.desired.sequence, 2);
    assert_eq!(n.desired.strategy, Strategy::StartFirst);
    // Signed with the wrong role's key it would not verify: the controller key is what signed.
    let wrong = Trust {
        controller: trust.release.clone(),
        ..trust.clone()
    };
    assert!(verify_notice(&broker.retained(topic), &wrong).is_err());

    // Empty set needs --empty; a refused jump and a failed publish never reuse a sequence.
    let o = publish(&[]);
    assert_eq!(code(&o), 2, "{}", show(&o));
    let o = publish(&["--empty", "--sequence", "2"]);
    assert_ne!(code(&o), 0, "{}", show(&o));
    let dead = run(ferryctl(&state)
        .args([
            "publish",
            "--empty",
            "--device",
            "dev-001",
            "--mqtt-timeout",
            "3",
        ])
        .args(["--broker", "mqtt://127.0.0.1:1"])
        .arg("--key")
        .arg(keys.join("controller.key")));
    assert_eq!(code(&dead), 1, "{}", show(&dead));
    let o = publish(&["--empty"]);
    assert_eq!(code(&o), 0, "{}", show(&o));
    assert_eq!(
        json(&o)["sequence"],
        4,
        "sequence 3 was consumed by the failed publish"
    );
    let n = verify_notice(&broker.retained(topic), &trust).unwrap();
    assert_eq!(n.desired.sequence, 4);
    assert!(n.desired.apps.is_empty());
    let o = publish(&["--empty", "--sequence", "100"]);
    assert_eq!(json(&o)["sequence"], 100);
    let stored = std::fs::read_to_string(state.join("dev-001.seq")).unwrap();
    assert_eq!(stored.trim(), "100");

    // --force: the notice asks the device to switch even while an app holds its update lock.
    let o = publish(&["--release", rel, "--force"]);
    assert_eq!(code(&o), 0, "{}", show(&o));
    assert_eq!(json(&o)["force"], true);
    let n = verify_notice(&broker.retained(topic), &trust).unwrap();
    assert_eq!((n.desired.sequence, n.desired.force), (101, true));
}

/// Start `ferryctl device watch` and wait until it is subscribed.
fn start_watch(state: &Path, broker: &Mosquitto, args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = ferryctl(state)
        .args(["device", "watch", "dev-007", "--broker", &broker.url()])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains("watching dev-007") => break,
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                panic!("watch did not subscribe within 10s");
            }
        }
    }
    (child, rx)
}

fn wait_with_timeout(mut child: Child, limit: Duration) -> (i32, String) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut out = String::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            return (st.code().unwrap(), out);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("watch did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn watch_until_phase() {
    let Some(broker) = Mosquitto::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let state: PathBuf = tmp.path().join("state");
    let t = "ferry/v1/devices/dev-007";
    let event = |seq: u64, phase: &str, extra: &str| {
        format!(
            r#"{{"device":"dev-007","sequence":{seq},"rollout":null,"phase":"{phase}","ts":"2026-11-22T10:00:00Z"{extra}}}"#
        )
    };

    // Friendly lines; exits 0 on committed.
    broker.publish_signed(&format!("{t}/online"), "1", true);
    let (child, _) = start_watch(
        &state,
        &broker,
        &["--until", "committed", "--timeout", "20s"],
    );
    broker.publish_signed(
        &format!("{t}/events"),
        &event(
            5,
            "downloading",
            r#","app":"sensor","bytes":1200000,"total":3400000"#,
        ),
        false,
    );
    broker.publish_signed(
        &format!("{t}/events"),
        &event(5, "health_checking", ""),
        false,
    );
    broker.publish_signed(&format!("{t}/events"), &event(5, "committed", ""), false);
    let (code, out) = wait_with_timeout(child, Duration::from_secs(20));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("dev-007 online"), "{out}");
    assert!(
        out.contains("dev-007 event downloading sensor 1.2/3.4 MB"),
        "{out}"
    );
    assert!(out.contains("event committed"), "{out}");

    // JSON lines; any-terminal ends on rolled_back with exit 1.
    let (child, _) = start_watch(
        &state,
        &broker,
        &["--json", "--until", "any-terminal", "--timeout", "20s"],
    );
    broker.publish_signed(
        &format!("{t}/events"),
        &event(
            6,
            "rolled_back",
            r#","reason":"health check failed","logs":["boom"]"#,
        ),
        false,
    );
    let (code, out) = wait_with_timeout(child, Duration::from_secs(20));
    assert_eq!(code, 1, "{out}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let last = lines.last().unwrap();
    assert_eq!(last["kind"], "events");
    assert_eq!(last["payload"]["phase"], "rolled_back");
    assert_eq!(last["payload"]["reason"], "health check failed");

    // Nothing arrives: timeout, exit 1.
    let (child, _) = start_watch(
        &state,
        &broker,
        &["--until", "committed", "--timeout", "1s"],
    );
    let (code, _) = wait_with_timeout(child, Duration::from_secs(15));
    assert_eq!(code, 1);
}

#[test]
fn usage_errors_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let o = run(ferryctl(tmp.path()).args(["publish", "--device", "d"]));
    assert_eq!(code(&o), 2, "{}", show(&o));
    let o = run(ferryctl(tmp.path()).args(["nonsense"]));
    assert_eq!(code(&o), 2, "{}", show(&o));
    let o = run(ferryctl(tmp.path()).args(["publish", "--expires", "soon"]));
    assert_eq!(code(&o), 2, "{}", show(&o));
    // A release comes from a spec or a compose file, not both, not neither; the compose
    // options need a compose file.
    for args in [
        &[
            "release",
            "sign",
            "--key",
            "k",
            "--out",
            "o",
            "--spec",
            "s",
            "--compose",
            "c",
        ][..],
        &["release", "sign", "--key", "k", "--out", "o"][..],
        &[
            "release",
            "sign",
            "--key",
            "k",
            "--out",
            "o",
            "--spec",
            "s",
            "--service",
            "web",
        ][..],
        &[
            "release",
            "sign",
            "--key",
            "k",
            "--out",
            "o",
            "--spec",
            "s",
            "--version",
            "1.0.0",
        ][..],
    ] {
        let o = run(ferryctl(tmp.path()).args(args));
        assert_eq!(code(&o), 2, "{args:?}: {}", show(&o));
    }
    let o = run(ferryctl(tmp.path()).args(["--help"]));
    assert_eq!(code(&o), 0, "{}", show(&o));
}
