//! Trust records against a real agent, mosquitto, dockerd and the ARM sample images
//! (protocol §10), written and published with the real `ferryctl trust` commands:
//! - a controller key rotated over MQTT: the old key is refused at once, the new one taken;
//!   a record the root did not sign changes nothing and the box says why in its state;
//! - a box frozen at sequence 2^64−1 by a leaked controller key, recovered without the network
//!   by `ferry-agent trust install FILE` (a record that replaces the controller key and lowers
//!   the floor), surviving a kill -9 of the agent;
//! - the README's key ceremony, taken from README.md and run as written, step by step;
//! - freeze detection with a real `ferryctl serve`.

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
    wait_version(&rig, 1);
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
    wait_version(&rig, 2);
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
/// is older than the box's `max_heartbeat_age` the box reports `stale`, and the controller
/// shows it in `ferryctl devices`. A forged heartbeat on the open broker does not refresh it.
#[test]
fn a_box_without_a_recent_heartbeat_is_stale_at_the_box_and_the_controller() {
    let rig = Rig::builder("trust-stale")
        .agent(|b| {
            b.config(|t| {
                // Deliberately the older integer key (`max_heartbeat_age = "4s"` today): the
                // conffiles already on boxes keep working.
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

/// The key ceremony block of README.md ("Keys that rotate"), split at its `# N.` steps.
fn wait_version(rig: &Rig, v: u64) {
    wait_for(&format!("trust version {v} in the state"), SLOW, || {
        (trust_version(rig) == Some(v))
            .then_some(())
            .ok_or_else(|| format!("{:?}", rig.observer.last_state().map(|s| s.trust)))
    })
}

fn readme_ceremony() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(common::infra::root().join("README.md")).unwrap();
    let from = readme
        .find("The ceremony, as commands")
        .expect("README has the key ceremony");
    let rest = &readme[from..];
    let start = rest.find("```sh\n").expect("its sh block") + "```sh\n".len();
    let block = &rest[start..start + rest[start..].find("```").unwrap()];
    let mut steps: Vec<(String, String)> = Vec::new();
    for line in block.lines() {
        let numbered = line
            .strip_prefix("# ")
            .and_then(|l| l.split_once(". "))
            .is_some_and(|(n, _)| n.parse::<u32>().is_ok());
        if numbered {
            steps.push((line.to_string(), String::new()));
        }
        let (_, script) = steps.last_mut().expect("the block starts with step 1");
        script.push_str(line);
        script.push('\n');
    }
    steps
}

/// Issue 10's documentation test: the README's key ceremony runs as written (create the root
/// offline, rotate the controller key, revoke a release key, recover a frozen box from a file),
/// each step against a real agent, and the box behaves after each as the README says.
#[test]
fn the_readme_key_ceremony_runs_as_written() {
    let mut rig = Rig::start("ceremony");
    rig.install(1, "1.0.0");
    let steps = readme_ceremony();
    assert_eq!(steps.len(), 4, "{steps:#?}");
    // The operator's working directory: today's public keys, the tools on PATH.
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let offline = w.join("offline");
    std::fs::copy(&rig.keys.release.public_pem, w.join("release.pub")).unwrap();
    std::fs::copy(&rig.keys.controller.public_pem, w.join("controller.pub")).unwrap();
    let bin = w.join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(ferryctl_binary(), bin.join("ferryctl")).unwrap();
    std::os::unix::fs::symlink(&rig.agent.binary().path, bin.join("ferry-agent")).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let (broker, device, config) = (
        rig.broker.url(),
        rig.device.clone(),
        rig.agent.config_path().to_path_buf(),
    );
    let run = |(title, script): &(String, String)| -> String {
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", script])
            .current_dir(w)
            .env("PATH", &path)
            .env("OFFLINE", &offline)
            .env("BROKER", &broker)
            .env("DEVICE", &device)
            .env("FERRY_AGENT_CONFIG", &config)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "README step {title:?} failed:\n{text}"
        );
        text
    };
    let key = |p: std::path::PathBuf| ferry_protocol::PrivateKey::load(&p).unwrap();

    // 1. The root, and version 1; the box is given the root's public keys and takes it.
    let out = run(&steps[0]);
    assert!(out.contains("ready to publish"), "{out}");
    let roots: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|k| offline.join(format!("root-{k}.pub")).display().to_string())
        .collect();
    rig.agent.edit_config(|t| {
        let trust = t["trust"].as_table_mut().unwrap();
        trust.insert("root_keys".into(), roots.into());
        trust.insert("root_threshold".into(), toml::Value::Integer(2));
    });
    rig.agent.restart();
    rig.observer.watch_agent(rig.agent.liveness());
    wait_version(&rig, 1);

    // 2. The controller key rotated: the old one is refused, the new one taken.
    run(&steps[1]);
    wait_version(&rig, 2);
    let ctl2 = key(w.join("controller-2.key"));
    let rel = rig.release("2.0.0").signed(&rig.keys);
    let ev = publish_expect_rejected(
        &rig,
        &rig.desired(2).app("sensor", rel.clone()).signed(&rig.keys),
    );
    assert!(
        ev.reason.as_deref().unwrap().contains("controller"),
        "{ev:?}"
    );
    rig.publish(&rig.desired(3).app("sensor", rel).sign(&[&ctl2]));
    assert_eq!(rig.observer.wait_terminal(3, SLOW).phase, Phase::Committed);

    // 3. The release key revoked: a release it signs is refused, one by the new key taken.
    run(&steps[2]);
    wait_version(&rig, 3);
    let rel2 = key(offline.join("release-2.key"));
    let old_rel = rig.release("1.0.0").signed(&rig.keys);
    let ev = publish_expect_rejected(
        &rig,
        &rig.desired(4)
            .app("sensor", old_rel)
            .allow_downgrade(true)
            .sign(&[&ctl2]),
    );
    assert!(ev.reason.as_deref().unwrap().contains("release"), "{ev:?}");
    let new_rel = rig.release("1.0.0").sign(&[&rel2]);
    rig.publish(
        &rig.desired(5)
            .app("sensor", new_rel.clone())
            .allow_downgrade(true)
            .sign(&[&ctl2]),
    );
    assert_eq!(rig.observer.wait_terminal(5, SLOW).phase, Phase::Committed);
    assert_eq!(rig.agent.committed_versions()["sensor"], "1.0.0");

    // 4. The controller-2 key leaks and freezes the box at 2^64-1; the README's recovery, from
    //    a file on the box, brings it back.
    rig.publish(
        &rig.desired(u64::MAX)
            .app("sensor", new_rel.clone())
            .sign(&[&ctl2]),
    );
    wait_for("sequence 2^64-1 accepted", SLOW, || {
        (rig.agent.journal()["last_sequence"].as_u64() == Some(u64::MAX))
            .then_some(())
            .ok_or_else(|| "not yet".to_string())
    });
    let out = run(&steps[3]);
    assert!(out.contains("version"), "{out}");
    wait_version(&rig, 4);
    let ctl3 = key(w.join("controller-3.key"));
    let rel_2 = rig.release("2.0.0").sign(&[&rel2]);
    rig.publish(&rig.desired(6).app("sensor", rel_2.clone()).sign(&[&ctl3]));
    let ev = rig.observer.wait_terminal(6, SLOW);
    assert_eq!(
        ev.phase,
        Phase::Committed,
        "{}",
        rig.observer.describe_events()
    );
    assert_eq!(rig.agent.committed_versions()["sensor"], "2.0.0");
    // The leaked key is refused from now on.
    let ev = publish_expect_rejected(&rig, &rig.desired(7).app("sensor", rel_2).sign(&[&ctl2]));
    assert!(
        ev.reason.as_deref().unwrap().contains("controller"),
        "{ev:?}"
    );
}
