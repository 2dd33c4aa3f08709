//! An attacker on an open broker (anyone may publish) during a real rollout's soak, against real
//! agents and a real `ferryctl serve` (issue 9). While the canary soaks after committing 2.0.0,
//! the attacker publishes on the canary's topics:
//! - a forged `rolled_back` event (unsigned, v1 JSON),
//! - a forged unhealthy state claiming sequence 2^64−2 and a new label, signed by a key of its
//!   own (not the device's enrolled key), and the same state unsigned,
//! - a re-serialized copy of the canary's own notice (other bytes, the same signed payload),
//! - the other device's notice, copied onto the canary's `desired`.
//!
//! The rollout completes with the canary succeeded and nothing reverted; the controller counts
//! the forged reports as dropped; the canary rejects the copied notice with sequence 0 (nothing
//! the controller attributes to the rollout) and ignores its own re-serialized notice; the next
//! notice the controller signs for the canary carries the controller's own next sequence.

mod common;

use std::time::{Duration, Instant};

use common::infra::{self, ARM64};
use common::{
    desired, docker, release, release_with_image, AgentBuilder, Broker, Observer, Phase, TestAgent,
    TestController, TestKeys, SLOW,
};
use ferry_controller::rollout::waves::DeviceStatus;
use ferry_protocol::device_report::{self, Stream};
use ferry_protocol::PrivateKey;

const SOON: Duration = Duration::from_secs(60);

struct Node {
    _agent: TestAgent,
    observer: Observer,
    id: String,
}

#[test]
fn an_attacker_on_the_broker_during_the_soak_changes_nothing() {
    let t0 = Instant::now();
    infra::require_infra();
    let _images = docker::exclusive_images();
    let broker = Broker::start();
    let keys = TestKeys::new();
    let mut nodes = Vec::new();
    for s in ["a", "b"] {
        let id = infra::device_id(&format!("hostile-{s}"));
        docker::remove_device_containers(&id);
        let observer = Observer::start(&broker, &id);
        let agent = AgentBuilder::new(&id, &broker, &keys)
            .platform(Some(ARM64))
            .config(|t| {
                let mut labels = toml::Table::new();
                labels.insert("group".into(), "beta".into());
                t.insert("labels".into(), labels.into());
            })
            .start();
        observer.watch_agent(agent.liveness());
        nodes.push(Node {
            _agent: agent,
            observer,
            id,
        });
    }
    let ctl = TestController::start(&broker, &keys);
    let v1 = release("1.0.0").signed(&keys);
    for n in &nodes {
        let notice = desired(&n.id, 1)
            .app("sensor", v1.clone())
            .rollout(None)
            .signed(&keys);
        n.observer.publish_desired(&notice);
    }
    for n in &nodes {
        let ev = n.observer.wait_terminal(1, SLOW);
        assert_eq!(ev.phase, Phase::Committed, "{}: {ev:?}", n.id);
    }
    let ids: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
    ctl.wait_devices("both online on 1.0.0", SOON, |ds| {
        ids.iter().all(|id| {
            ds.iter().any(|d| {
                d.id == *id
                    && d.online
                    && d.apps.get("sensor").is_some_and(|a| a.version == "1.0.0")
            })
        })
    });

    ctl.push_release(&v1);
    ctl.push_release(&release("2.0.0").signed(&keys));
    let r = ctl.start_rollout(&[
        "--app",
        "sensor",
        "--version",
        "2.0.0",
        "--select",
        "group=beta",
        "--waves",
        "1,100%",
        "--soak",
        "20s",
        "--max-failures",
        "0",
        "--on-failure",
        "revert",
        "--device-timeout",
        "150s",
    ]);
    let wave0: Vec<String> = ctl
        .rollout(&r.id)
        .devices
        .expect("devices")
        .iter()
        .filter(|(_, e)| e.wave == Some(0))
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(wave0.len(), 1, "{wave0:?}");
    let (canary, other) = if nodes[0].id == wave0[0] {
        (&nodes[0], &nodes[1])
    } else {
        (&nodes[1], &nodes[0])
    };
    // The canary commits 2.0.0 and soaks.
    let seq = canary
        .observer
        .wait_event_where("a notice of the rollout", SLOW, |e| {
            e.rollout.as_deref() == Some(r.id.as_str())
        })
        .sequence;
    assert_eq!(
        canary.observer.wait_terminal(seq, SLOW).phase,
        Phase::Committed
    );
    ctl.wait_rollout(&r.id, "the canary soaking", SOON, |v| {
        v.devices.as_ref().is_some_and(|d| {
            d.get(&canary.id)
                .is_some_and(|e| matches!(e.status, DeviceStatus::Committed { .. }))
        })
    });
    let dropped_before = dropped_reports(&ctl);

    // ----- the attack, all on the canary's topics -------------------------------------------
    let topic = |kind: &str| format!("ferry/v1/devices/{}/{kind}", canary.id);
    // A forged rolled_back event, unsigned (v1).
    let mut ev = canary.observer.wait_terminal(seq, SLOW);
    ev.phase = Phase::RolledBack;
    ev.reason = Some("forged".into());
    broker.publish(&topic("events"), &serde_json::to_vec(&ev).unwrap(), false);
    // A forged unhealthy state at sequence 2^64-2 with a new label: unsigned, and signed by an
    // attacker's key with a counter above anything the box sent.
    let mut st = canary.observer.last_state().expect("a state of the canary");
    st.sequence = u64::MAX - 1;
    for a in st.apps.values_mut() {
        a.health = "unhealthy".into();
    }
    st.labels.insert("group".into(), "canary-takeover".into());
    let body = serde_json::to_value(&st).unwrap();
    broker.publish(&topic("state"), &serde_json::to_vec(&body).unwrap(), true);
    let attacker = PrivateKey::from_seed([0x66; 32]).unwrap();
    let forged = device_report::sign(&attacker, &canary.id, Stream::State, u64::MAX - 1, body);
    broker.publish(&topic("state"), &forged, true);
    // The canary's own notice re-serialized (pretty-printed: other bytes, same signed payload).
    let own = broker
        .retained(&topic("desired"))
        .expect("the canary's notice");
    let v: serde_json::Value = serde_json::from_slice(&own).unwrap();
    let pretty = serde_json::to_vec_pretty(&v).unwrap();
    assert_ne!(pretty, own);
    broker.publish(&topic("desired"), &pretty, true);
    // The other device's notice copied onto the canary's desired.
    let theirs = broker
        .retained(&format!("ferry/v1/devices/{}/desired", other.id))
        .expect("the other device's notice");
    broker.publish(&topic("desired"), &theirs, true);

    // ----- nothing changes ------------------------------------------------------------------
    let end = ctl.wait_rollout(&r.id, "the rollout to end", 2 * SLOW, |v| {
        v.state != "running"
    });
    let dump = serde_json::to_string_pretty(&end).unwrap();
    assert_eq!(end.state, "completed", "{dump}");
    assert!(end.reverted.is_empty(), "{dump}");
    let devs = end.devices.as_ref().unwrap();
    assert_eq!(devs[&canary.id].status, DeviceStatus::Succeeded, "{dump}");
    assert_eq!(devs[&other.id].status, DeviceStatus::Succeeded, "{dump}");
    // The forged reports were dropped and counted (the unsigned event, the unsigned state, the
    // state signed by another key).
    assert!(
        dropped_reports(&ctl) >= dropped_before + 3,
        "{}",
        ctl.http_get("/metrics").1
    );
    // The copied notice was rejected with sequence 0; the re-serialized own notice was silent.
    let rejected: Vec<_> = canary
        .observer
        .events()
        .into_iter()
        .filter(|e| e.phase == Phase::Rejected)
        .collect();
    assert_eq!(rejected.len(), 1, "{}", canary.observer.describe_events());
    assert_eq!(rejected[0].sequence, 0, "{:?}", rejected[0]);
    let view = ctl
        .devices(None)
        .into_iter()
        .find(|d| d.id == canary.id)
        .unwrap();
    assert_eq!(
        view.sequence, seq,
        "the inventory keeps the canary's real sequence"
    );
    assert_eq!(view.labels.get("group").map(String::as_str), Some("beta"));
    assert_eq!(view.health, "healthy");
    assert_eq!(view.apps["sensor"].version, "2.0.0");

    // The next notice for the canary carries the controller's own next sequence.
    ctl.push_release(&release_with_image("2.0.1", "2.0.0").signed(&keys));
    let r2 = ctl.start_rollout(&[
        "--app",
        "sensor",
        "--version",
        "2.0.1",
        "--select",
        &format!("id={}", canary.id),
        "--soak",
        "1s",
        "--device-timeout",
        "150s",
    ]);
    let next = canary
        .observer
        .wait_event_where("a notice of the second rollout", SLOW, |e| {
            e.rollout.as_deref() == Some(r2.id.as_str())
        })
        .sequence;
    assert_eq!(next, seq + 1, "{}", canary.observer.describe_events());
    assert_eq!(
        canary.observer.wait_terminal(next, SLOW).phase,
        Phase::Committed
    );
    eprintln!(
        "TIMING an_attacker_on_the_broker: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// `ferry_reports_dropped_total`, summed over its reasons.
fn dropped_reports(ctl: &TestController) -> u64 {
    let (status, body) = ctl.http_get("/metrics");
    assert_eq!(status, 200);
    body.lines()
        .filter(|l| l.starts_with("ferry_reports_dropped_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
