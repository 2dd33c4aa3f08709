//! Several `ferryctl serve` on one PostgreSQL database (README "Replicas"): real processes, a
//! real PostgreSQL (`scripts/env-up.sh`), a private mosquitto, real agents on dockerd with the
//! ARM sample images under qemu.
//!
//! - the follower forwards API reads and writes to the leader; the leader is SIGKILLed right
//!   after a wave's notices went out, and the follower takes over within the lease plus a
//!   renewal period and finishes the rollout: every device notified once for it, no sequence
//!   reused, no wave skipped or repeated;
//! - a leader cut from the database (a proxy gone dark) stops by itself (exit 75) before its
//!   lease expires, and the other replica takes over.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::faultproxy::FaultProxy;
use common::infra::{self, ARM64};
use common::postgres::TestDb;
use common::{desired, docker, release, AgentBuilder, Broker, Observer, Phase, TestAgent};
use common::{TestController, TestKeys, SLOW};

const LEASE: &str = "lease = \"3s\"";

fn metric(ctl: &TestController, name: &str) -> Option<u64> {
    let (status, body) = ctl.http_get("/metrics");
    if status != 200 {
        return None;
    }
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
}

fn leads(ctl: &TestController) -> bool {
    metric(ctl, "ferry_leader") == Some(1)
}

fn replica(broker: &Broker, keys: &TestKeys, db: &Arc<TestDb>, id: &str) -> TestController {
    let mut c = TestController::build_replica(broker, keys, db, &format!("id = \"{id}\"\n{LEASE}"));
    c.spawn();
    c
}

#[test]
fn the_follower_forwards_the_api_and_takes_over_when_the_leader_is_killed() {
    infra::require_infra();
    let _images = docker::exclusive_images();
    let broker = Broker::start();
    let keys = TestKeys::new();
    let mut nodes: Vec<(String, TestAgent, Observer)> = Vec::new();
    for s in ["a", "b"] {
        let id = infra::device_id(&format!("replicas-{s}"));
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
        nodes.push((id, agent, observer));
    }
    let db = Arc::new(TestDb::create());
    let mut a = replica(&broker, &keys, &db, "a");
    let b = replica(&broker, &keys, &db, "b");
    assert!(leads(&a), "the first replica leads:\n{}", a.log());
    assert!(!leads(&b), "the second follows:\n{}", b.log());

    let v1 = release("1.0.0").signed(&keys);
    for (id, _, obs) in &nodes {
        obs.publish_desired(
            &desired(id, 1)
                .app("sensor", v1.clone())
                .rollout(None)
                .signed(&keys),
        );
    }
    for (_, _, obs) in &nodes {
        assert_eq!(obs.wait_terminal(1, SLOW).phase, Phase::Committed);
    }
    // Reads on the follower are the leader's (forwarded).
    b.wait_devices("both devices on 1.0.0, through the follower", SLOW, |ds| {
        nodes.iter().all(|(id, _, _)| {
            ds.iter().any(|d| {
                d.id == *id
                    && d.online
                    && d.apps.get("sensor").is_some_and(|a| a.version == "1.0.0")
            })
        })
    });
    let (_, body) = b.http_get("/metrics");
    assert!(body.contains("ferry_leader 0"), "{body}");
    // Writes on the follower reach the leader: a release pushed and a rollout started there.
    b.push_release(&release("2.0.0").signed(&keys));
    assert!(
        a.releases().iter().any(|r| r.version == "2.0.0"),
        "the leader has the release pushed on the follower"
    );
    let r = b.start_rollout(&[
        "--app",
        "sensor",
        "--version",
        "2.0.0",
        "--select",
        "group=beta",
        "--waves",
        "1,100%",
        "--soak",
        "3s",
        "--max-failures",
        "0",
        "--device-timeout",
        "150s",
    ]);
    assert_eq!(r.summary.waves[0].notified, 1, "{:?}", r.summary);
    // The first wave's notice went out (the device has it): the leader dies.
    let planned = a.rollout(&r.id);
    let first = planned
        .devices
        .as_ref()
        .expect("rollout status with devices")
        .iter()
        .find(|(_, e)| e.wave == Some(0))
        .map(|(id, _)| id.clone())
        .expect("a device in wave 1");
    let (_, _, obs) = nodes.iter().find(|(id, _, _)| *id == first).unwrap();
    obs.wait_event_where("wave 1's notice", SLOW, |e| {
        e.rollout.as_deref() == Some(r.id.as_str()) && e.phase == Phase::Received
    });
    a.kill();
    let killed = Instant::now();
    infra::wait_for("the follower to lead", Duration::from_secs(30), || {
        leads(&b).then_some(()).ok_or_else(|| "not yet".to_string())
    });
    let took = killed.elapsed();
    eprintln!(
        "replicas: the follower leads {:.1} s after the leader's SIGKILL (lease 3 s)",
        took.as_secs_f64()
    );
    assert!(
        took < Duration::from_secs(3 + 1 + 4),
        "took {took:?}:\n{}",
        b.log()
    );
    let done = b.wait_rollout(&r.id, "completed", 2 * SLOW, |v| v.state != "running");
    assert_eq!(done.state, "completed", "{done:?}\n{}", b.log());
    assert_eq!(done.summary.succeeded, 2, "{:?}", done.summary);
    for (id, _, obs) in &nodes {
        let seqs: std::collections::BTreeSet<u64> = obs
            .events()
            .iter()
            .filter(|e| e.rollout.as_deref() == Some(r.id.as_str()))
            .map(|e| e.sequence)
            .collect();
        assert_eq!(
            seqs.len(),
            1,
            "{id}: one notice for the rollout: {seqs:?}\n{}",
            obs.describe_events()
        );
        let seq = *seqs.first().unwrap();
        assert_eq!(seq, 2, "{id}: sequence 2, never reused");
        let received = obs
            .events_for(seq)
            .iter()
            .filter(|e| e.phase == Phase::Received)
            .count();
        assert_eq!(
            received,
            1,
            "{id}: applied once:\n{}",
            obs.describe_events()
        );
        assert!(
            !obs.events().iter().any(|e| e.phase == Phase::Rejected),
            "{id}: nothing rejected:\n{}",
            obs.describe_events()
        );
    }
    assert!(b.log().contains("this replica leads"), "{}", b.log());
}

/// The leader's database connection goes through a proxy that goes dark: it cannot renew, stops
/// by itself (exit 75) before its lease runs out, and the other replica takes over after it.
#[test]
fn a_leader_cut_from_the_database_stops_by_itself_and_the_other_takes_over() {
    infra::require_infra();
    let broker = Broker::start();
    let keys = TestKeys::new();
    let db = Arc::new(TestDb::create());
    // Replica a reaches PostgreSQL through the proxy.
    let host = db
        .url
        .split('@')
        .nth(1)
        .and_then(|r| r.split('/').next())
        .expect("host:port in the URL")
        .to_string();
    let proxy = FaultProxy::start(&host);
    let via = Arc::new(TestDb::alias(
        &db,
        &db.url.replace(&host, &proxy.addr().to_string()),
    ));
    let mut a = replica(&broker, &keys, &via, "a");
    assert!(leads(&a), "{}", a.log());
    let mut b = replica(&broker, &keys, &db, "b");
    assert!(!leads(&b));
    proxy.dark(true);
    let cut = Instant::now();
    let status = infra::wait_for("the cut leader to stop", Duration::from_secs(10), || {
        a.exit_status().ok_or_else(|| "still running".to_string())
    });
    let stopped = cut.elapsed();
    assert_eq!(status.code(), Some(75), "{}", a.log());
    assert!(a.log().contains("not renewed in time"), "{}", a.log());
    infra::wait_for("b to lead", Duration::from_secs(10), || {
        leads(&b).then_some(()).ok_or_else(|| "not yet".to_string())
    });
    let took = cut.elapsed();
    eprintln!(
        "replicas: the cut leader stopped {:.1} s after the cut, the other led {:.1} s after it (lease 3 s)",
        stopped.as_secs_f64(),
        took.as_secs_f64()
    );
    assert!(
        stopped < took,
        "the old leader stopped before the new one led"
    );
    b.terminate();
}
