//! Trust records against a real agent, mosquitto, dockerd and the ARM sample images
//! (protocol §10), written and published with the real `ferryctl trust` commands:
//! - a controller key rotated over MQTT: the old key is refused at once, the new one taken;
//!   a record the root did not sign changes nothing and the box says why in its state;
//! - a box frozen at sequence 2^64−1 by a leaked controller key, recovered without the network
//!   by `ferry-agent trust install FILE` (a record that replaces the controller key and lowers
//!   the floor), surviving a kill -9 of the agent.

mod common;

use std::path::Path;
use std::process::Command;

use common::controller::ferryctl_binary;
use common::infra::wait_for;
use common::keys::Key;
use common::*;
use ferry_protocol::Phase;

fn ferryctl(args: &[&str]) -> String {
    let out = Command::new(ferryctl_binary())
        .args(args)
        .output()
        .expect("run ferryctl");
    assert!(
        out.status.success(),
        "ferryctl {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A rig whose agent trusts root key `root` (besides the usual release and controller keys).
fn rig_with_root(name: &str) -> (Rig, Key) {
    let mut rig = Rig::builder(name).stopped().start();
    let root = rig.keys.extra("root");
    let pem = root.public_pem.display().to_string();
    rig.agent.edit_config(|t| {
        let trust = t["trust"].as_table_mut().unwrap();
        trust.insert("root_keys".into(), vec![pem].into());
    });
    rig.agent.spawn();
    rig.observer.wait_online("1", SLOW);
    (rig, root)
}

/// Publish `notice` and wait for a rejection after it (a notice whose signature fails carries
/// no sequence: it is reported as sequence 0).
fn publish_expect_rejected(rig: &Rig, notice: &[u8]) -> ferry_protocol::Event {
    let rejected = || -> Vec<ferry_protocol::Event> {
        rig.observer
            .events()
            .into_iter()
            .filter(|e| e.phase == Phase::Rejected)
            .collect()
    };
    let before = rejected().len();
    rig.publish(notice);
    wait_for("a rejection", SLOW, || {
        rejected()
            .get(before)
            .cloned()
            .ok_or_else(|| rig.observer.describe_events())
    })
}

fn trust_version(rig: &Rig) -> Option<u64> {
    rig.observer.last_state()?.trust.map(|t| t.version)
}

#[test]
fn a_controller_key_rotated_over_mqtt_takes_effect_at_once() {
    let (rig, root) = rig_with_root("trust-rotate");
    rig.install(1, "1.0.0");
    let new_ctl = rig.keys.extra("controller2");
    let dir = rig.keys.dir();
    let v1 = dir.join("trust-v1.json");

    // A record signed by a key that is not the root: refused, and said so in the state.
    let rogue = rig.keys.extra("rogue");
    ferryctl(&[
        "trust",
        "init",
        "--root",
        p(&rogue.public_pem),
        "--release",
        p(&rig.keys.release.public_pem),
        "--controller",
        p(&new_ctl.public_pem),
        "--sign",
        p(&rogue.private_pem),
        "--out",
        p(&v1),
    ]);
    ferryctl(&["trust", "publish", p(&v1), "--broker", &rig.broker.url()]);
    let st = rig.observer.wait_state(
        |s| s.trust.as_ref().is_some_and(|t| t.error.is_some()),
        SLOW,
    );
    let t = st.trust.unwrap();
    assert_eq!(t.version, 0);
    assert!(t.error.unwrap().contains("current root keys"));
    assert!(!rig.agent.state_dir().join("trust.json").exists());

    // The real record: init without signatures, then the root key holder signs, then show.
    ferryctl(&[
        "trust",
        "init",
        "--root",
        p(&root.public_pem),
        "--release",
        p(&rig.keys.release.public_pem),
        "--controller",
        p(&new_ctl.public_pem),
        "--out",
        p(&v1),
    ]);
    let shown = ferryctl(&["--json", "trust", "show", p(&v1)]);
    assert!(shown.contains("\"ready\": false"), "{shown}");
    ferryctl(&["trust", "sign", p(&v1), "--key", p(&root.private_pem)]);
    let shown = ferryctl(&["--json", "trust", "show", p(&v1)]);
    assert!(shown.contains("\"ready\": true"), "{shown}");
    ferryctl(&["trust", "publish", p(&v1), "--broker", &rig.broker.url()]);
    wait_for("trust version 1 in the state", SLOW, || {
        (trust_version(&rig) == Some(1))
            .then_some(())
            .ok_or_else(|| "not yet".to_string())
    });
    let t = rig.observer.last_state().unwrap().trust.unwrap();
    assert_eq!(t.error, None, "a taken record clears the refusal");
    assert!(rig.agent.state_dir().join("trust.json").exists());

    // The removed controller key: refused with a reason, the box keeps 1.0.0.
    let rel = rig.release("2.0.0").signed(&rig.keys);
    let old = rig.desired(2).app("sensor", rel.clone()).signed(&rig.keys);
    let ev = publish_expect_rejected(&rig, &old);
    assert!(
        ev.reason.as_deref().unwrap().contains("controller"),
        "{ev:?}"
    );
    assert_eq!(rig.agent.committed_versions()["sensor"], "1.0.0");

    // The new key: taken.
    let new = rig.desired(3).app("sensor", rel).sign(&[&new_ctl.key]);
    rig.publish(&new);
    let ev = rig.observer.wait_terminal(3, SLOW);
    assert_eq!(
        ev.phase,
        Phase::Committed,
        "{}",
        rig.observer.describe_events()
    );
    assert_eq!(rig.agent.committed_versions()["sensor"], "2.0.0");
}

#[test]
fn a_frozen_sequence_is_recovered_from_a_file_without_the_network() {
    let (mut rig, root) = rig_with_root("trust-frozen");
    rig.install(1, "1.0.0");
    // A leaked controller key signs sequence 2^64-1 (the same app set): the box takes it.
    let rel1 = rig.release("1.0.0").signed(&rig.keys);
    let frozen = rig.desired(u64::MAX).app("sensor", rel1).signed(&rig.keys);
    rig.publish(&frozen);
    wait_for("sequence 2^64-1 accepted", SLOW, || {
        (rig.agent.journal()["last_sequence"].as_u64() == Some(u64::MAX))
            .then_some(())
            .ok_or_else(|| "not yet".to_string())
    });
    // The honest controller (a new key) can no longer reach it.
    let new_ctl = rig.keys.extra("controller2");
    let rel2 = rig.release("2.0.0").signed(&rig.keys);
    let honest = rig
        .desired(2)
        .app("sensor", rel2.clone())
        .sign(&[&new_ctl.key]);
    let ev = publish_expect_rejected(&rig, &honest);
    assert_eq!(ev.sequence, 0, "{ev:?}");

    // The root writes version 1 for the fleet, then version 2 for this box, which replaces
    // the controller key and sets the floor to 0; v1 never reached the box: v2 is checked
    // against the box's own root keys (the same root) and its version is higher.
    let dir = rig.keys.dir();
    let (v1, v2) = (dir.join("trust-v1.json"), dir.join("trust-v2.json"));
    ferryctl(&[
        "trust",
        "init",
        "--root",
        p(&root.public_pem),
        "--release",
        p(&rig.keys.release.public_pem),
        "--controller",
        p(&rig.keys.controller.public_pem),
        "--sign",
        p(&root.private_pem),
        "--out",
        p(&v1),
    ]);
    ferryctl(&[
        "trust",
        "rotate",
        "--from",
        p(&v1),
        "--controller",
        p(&new_ctl.public_pem),
        "--sequence-floor",
        "0",
        "--device",
        &rig.device,
        "--sign",
        p(&root.private_pem),
        "--out",
        p(&v2),
    ]);
    // Without the network: stop the broker, install from the file.
    rig.broker.stop();
    let bin = rig.agent.binary().path.clone();
    let out = Command::new(&bin)
        .args([
            "--config",
            p(rig.agent.config_path()),
            "trust",
            "install",
            p(&v2),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    rig.agent.wait_log("trust record taken", SLOW);
    // The notice the box refused before (sequence 2, by the new key) is tried again and taken,
    // the broker still down: the images come from the registry, not the broker.
    wait_for(
        "2.0.0 committed from the notice refused before",
        SLOW,
        || {
            let v = rig.agent.committed_versions();
            (v.get("sensor").map(String::as_str) == Some("2.0.0"))
                .then_some(())
                .ok_or(format!("{v:?}"))
        },
    );
    assert_eq!(rig.agent.journal()["last_sequence"].as_u64(), Some(2));
    // kill -9 and start again: neither frozen again nor reset twice.
    rig.agent.kill();
    rig.agent.spawn();
    rig.broker.restart();
    wait_for("trust version 2 after the restart", SLOW, || {
        (trust_version(&rig) == Some(2))
            .then_some(())
            .ok_or_else(|| "not yet".to_string())
    });
    assert_eq!(rig.agent.journal()["last_sequence"].as_u64(), Some(2));
    // The honest controller's next notice is taken.
    let rel1 = rig.release("1.0.0").signed(&rig.keys);
    rig.publish(
        &rig.desired(3)
            .app("sensor", rel1.clone())
            .allow_downgrade(true)
            .sign(&[&new_ctl.key]),
    );
    let ev = rig.observer.wait_terminal(3, SLOW);
    assert_eq!(
        ev.phase,
        Phase::Committed,
        "{}",
        rig.observer.describe_events()
    );
    assert_eq!(rig.agent.committed_versions()["sensor"], "1.0.0");
    // The leaked key's notices are refused from now on.
    let leaked = rig.desired(4).app("sensor", rel2).signed(&rig.keys);
    let ev = publish_expect_rejected(&rig, &leaked);
    assert!(
        ev.reason.as_deref().unwrap().contains("controller"),
        "{ev:?}"
    );
    assert_eq!(rig.agent.committed_versions()["sensor"], "1.0.0");
}

/// Freeze detection (PROTOCOL.md §10a) with a real `ferryctl serve`: it publishes its signed
/// heartbeat at start (then, here, only every hour); the box holds it and is not stale; once it
/// is older than the box's `max_heartbeat_age_s` the box reports `stale`, and the controller
/// shows it in `ferryctl devices`. A forged heartbeat on the open broker does not refresh it.
#[test]
fn a_box_without_a_recent_heartbeat_is_stale_at_the_box_and_the_controller() {
    let rig = Rig::builder("trust-stale")
        .agent(|b| {
            b.config(|t| {
                t["trust"]
                    .as_table_mut()
                    .unwrap()
                    .insert("max_heartbeat_age_s".into(), toml::Value::Integer(4));
            })
        })
        .start();
    let ctl =
        common::controller::TestController::build(&rig.broker, &rig.keys, "heartbeat = \"1h\"\n");
    let mut ctl = ctl;
    ctl.spawn();
    let fresh = rig.observer.wait_state(
        |s| {
            s.trust
                .as_ref()
                .is_some_and(|t| t.heartbeat_at.is_some() && !t.stale)
        },
        SLOW,
    );
    let at = fresh.trust.unwrap().heartbeat_at.unwrap();
    // A forged heartbeat (not the controller's key), newer: ignored.
    let forged = ferry_protocol::heartbeat::Heartbeat {
        issued_at: chrono::Utc::now(),
    }
    .sign(&rig.keys.extra("forger").key)
    .to_json();
    rig.broker
        .publish("ferry/v1/heartbeat", forged.as_bytes(), false);
    // Older than 4 s: stale, at the box and at the controller.
    let st = rig
        .observer
        .wait_state(|s| s.trust.as_ref().is_some_and(|t| t.stale), SLOW);
    assert_eq!(
        st.trust.unwrap().heartbeat_at,
        Some(at),
        "the forged one did not count"
    );
    let devs = ctl.wait_devices("the device stale", SLOW, |v| {
        v.iter()
            .any(|d| d.id == rig.device && d.trust.as_ref().is_some_and(|t| t.stale))
    });
    assert!(devs.iter().any(|d| d.id == rig.device));
    // A controller restart publishes a new one: fresh again.
    ctl.terminate();
    ctl.spawn();
    rig.observer.wait_state(
        |s| {
            s.trust
                .as_ref()
                .is_some_and(|t| !t.stale && t.heartbeat_at.is_some_and(|h| h > at))
        },
        SLOW,
    );
}
