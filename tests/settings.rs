//! Settings that roll out like a version, on real boxes: a release declares a settable key
//! (`container.settings`), `ferryctl rollout start --set KEY=VALUE` gives it a value, the value
//! travels in the controller-signed notice, the agent checks it against the release and runs
//! the container with it. A value that fails the health gate rolls the first wave's box back
//! to its last good value by itself and pauses the rollout; the second box is never touched.
//! A notice with a key the release does not declare is refused by the box with the reason.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::nodes::{beta_fleet, install_v1, wait_known};
use common::{desired, docker, release, Broker, Phase, TestController, TestKeys, SLOW};
use ferry_protocol::release::{HealthCheck, HealthSpec};
use ferry_protocol::settings::{SettingDecl, SettingType};

/// The environment the running container was created with.
fn container_env(name: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["inspect", "-f", "{{json .Config.Env}}", name])
        .output()
        .expect("docker inspect");
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// The one running sensor container's SENSOR_SITE.
fn site_of(device: &str) -> String {
    let running = docker::running(device);
    assert_eq!(running.len(), 1, "{device}: {running:?}");
    container_env(&running[0].name)
        .into_iter()
        .find_map(|e| e.strip_prefix("SENSOR_SITE=").map(str::to_string))
        .unwrap_or_else(|| panic!("{device}: no SENSOR_SITE in {}", running[0].name))
}

#[test]
fn a_setting_rolls_out_in_waves_and_a_bad_value_rolls_back() {
    common::infra::require_infra();
    let _images = docker::exclusive_images();
    let broker = Broker::start();
    let keys = TestKeys::new();
    let nodes = beta_fleet(&broker, &keys, "settings");
    install_v1(&nodes, &keys);
    let ctl = TestController::start(&broker, &keys);
    wait_known(&ctl, &nodes);
    ctl.push_release(&release("1.0.0").signed(&keys));
    // Sensor 2.0.0 declares SENSOR_SITE; its gate needs the HTTP check to pass and the value
    // not to be "broken" (what a bad APN or server URL does to a real app).
    let gate = HealthSpec {
        check: Some(HealthCheck::Exec(vec![
            "sh".into(),
            "-c".into(),
            "test \"$SENSOR_SITE\" != broken && wget -q -O /dev/null http://127.0.0.1:8080/healthz"
                .into(),
        ])),
        grace_s: Some(1),
        interval_s: Some(1),
        timeout_s: Some(3),
        successes: Some(2),
        max_failures: Some(2),
        deadline_s: Some(90),
    };
    let v2 = release("2.0.0")
        .health(gate)
        .edit(|r| {
            r.container.settings = BTreeMap::from([(
                "SENSOR_SITE".to_string(),
                SettingDecl {
                    kind: SettingType::String,
                    default: Some("unset".into()),
                    description: Some("the site the box serves".into()),
                },
            )]);
        })
        .signed(&keys);
    ctl.push_release(&v2);
    let start = |set: &str| {
        ctl.start_rollout(&[
            "--app",
            "sensor",
            "--version",
            "2.0.0",
            "--select",
            "group=beta",
            "--waves",
            "1,100%",
            "--soak",
            "2s",
            "--max-failures",
            "0",
            "--device-timeout",
            "150s",
            "--set",
            set,
        ])
    };

    // 1. A value the CLI and the server check before anything is sent.
    let bad = ctl.ctl(&[
        "rollout",
        "start",
        "--app",
        "sensor",
        "--version",
        "2.0.0",
        "--select",
        "group=beta",
        "--set",
        "APN=internet",
    ]);
    assert_ne!(bad.code, 0);
    assert!(
        bad.stderr
            .contains("setting APN: release sensor 2.0.0 does not declare it settable"),
        "{bad}"
    );

    // 2. SENSOR_SITE=north rolls out in two waves; both boxes run it.
    let r = start("SENSOR_SITE=north");
    assert_eq!(r.targets, vec![1, 2]);
    assert_eq!(r.settings["SENSOR_SITE"], "north");
    let done = ctl.wait_rollout(&r.id, "completed", 2 * SLOW, |v| v.state != "running");
    assert_eq!(done.state, "completed", "{done:?}");
    for (id, _, _) in &nodes {
        assert_eq!(site_of(id), "north", "{id}");
    }

    // 3. SENSOR_SITE=broken: the first wave's box fails its gate and goes back to "north" by
    // itself; the rollout pauses; the other box is never sent the value.
    let r = start("SENSOR_SITE=broken");
    let paused = ctl.wait_rollout(&r.id, "paused", 2 * SLOW, |v| v.state != "running");
    assert_eq!(paused.state, "paused", "{paused:?}");
    let first = paused
        .devices
        .as_ref()
        .expect("per-device entries")
        .iter()
        .find(|(_, d)| d.wave == Some(0))
        .map(|(id, _)| id.clone())
        .expect("a device in wave 1");
    let (_, agent, obs) = nodes.iter().find(|(id, _, _)| *id == first).unwrap();
    let rolled = obs.wait_event_where("the bad value's rollback", SLOW, |e| {
        e.rollout.as_deref() == Some(r.id.as_str()) && e.phase == Phase::RolledBack
    });
    assert!(rolled.reason.is_some(), "{rolled:?}");
    assert!(
        agent.log().contains("health gate"),
        "the gate ran: {}",
        agent.log()
    );
    for (id, _, obs) in &nodes {
        assert_eq!(site_of(id), "north", "{id}: the last good value runs");
        if *id != first {
            assert!(
                !obs.events()
                    .iter()
                    .any(|e| e.rollout.as_deref() == Some(r.id.as_str())),
                "{id} was not notified:\n{}",
                obs.describe_events()
            );
        }
    }

    // 4. A notice with a key the release does not declare (signed by the controller's key,
    // so only the box's check stands in the way): refused with the reason, nothing changes.
    let (id, _, obs) = &nodes[0];
    obs.publish_desired(
        &desired(id, 100)
            .app("sensor", v2.clone())
            .setting("sensor", "DEBUG", "1")
            .signed(&keys),
    );
    // A notice that does not verify has no trusted sequence: the rejection reports 0.
    let rejected = obs.wait_event_where("the rejection", SLOW, |e| e.phase == Phase::Rejected);
    let why = rejected.reason.clone().unwrap_or_default();
    assert_eq!(
        why, "app \"sensor\": setting DEBUG: release sensor 2.0.0 does not declare it settable",
        "{rejected:?}"
    );
    assert_eq!(site_of(id), "north");
}
