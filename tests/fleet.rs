//! Fleet rollouts through the real controller: `ferryctl serve` as a process (its SQLite data
//! dir in a temp dir), several real agents (the native `ferry-agent`, distinct device ids and
//! labels) on the one dockerd, a private mosquitto per test, the ARM sample images under qemu,
//! and the `ferryctl` client with `--json`.
//!
//! Run with `cargo build --workspace --bins && cargo test --test fleet -- --test-threads=2`. See
//! `tests/common/mod.rs` for the harness (`common::controller` for the controller).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::infra::{self, ARM64, ARMV7};
use common::{
    desired, docker, release, release_with_image, AgentBuilder, Broker, Event, Observer, Phase,
    TestAgent, TestController, TestKeys, SLOW,
};
use ferry_controller::api::{DeviceView, RolloutView};
use ferry_controller::rollout::waves::DeviceStatus;
use ferry_protocol::{verify_notice, Desired, Trust, TrustedKeys};

/// Bound for what follows an event closely (a state report, the controller noticing).
const SOON: Duration = Duration::from_secs(60);
/// The soak time of every rollout here.
const SOAK_S: i64 = 3;
const SOAK: &str = "3s";

fn timing(name: &str, t0: Instant) {
    eprintln!("TIMING {name}: {:.1} s", t0.elapsed().as_secs_f64());
}

/// One device: its agent and an MQTT observer of its topics. Fields drop in order: the agent
/// first (killed, its containers removed).
struct Node {
    agent: TestAgent,
    observer: Observer,
    id: String,
    platform: &'static str,
}

impl Node {
    /// Distinct sequences of the events that name `rollout`.
    fn rollout_sequences(&self, rollout: &str) -> BTreeSet<u64> {
        self.observer
            .events()
            .into_iter()
            .filter(|e| e.rollout.as_deref() == Some(rollout))
            .map(|e| e.sequence)
            .collect()
    }

    /// The one sequence the controller sent this device for `rollout`.
    fn only_rollout_sequence(&self, rollout: &str) -> u64 {
        let s = self.rollout_sequences(rollout);
        assert_eq!(
            s.len(),
            1,
            "{} should have been notified exactly once for {rollout}, got sequences {s:?}:\n{}",
            self.id,
            self.observer.describe_events()
        );
        *s.first().unwrap()
    }

    /// The first event of `sequence` with `phase`.
    fn event(&self, sequence: u64, phase: Phase) -> Event {
        self.observer
            .events_for(sequence)
            .into_iter()
            .find(|e| e.phase == phase)
            .unwrap_or_else(|| {
                panic!(
                    "{}: no {phase} event for sequence {sequence}:\n{}",
                    self.id,
                    self.observer.describe_events()
                )
            })
    }

    /// Sequences never go back and nothing is rejected: the sequences of the events, in order
    /// of arrival, never decrease, and no event is `rejected`.
    fn assert_sequences_increase(&self) {
        let evs = self.observer.events();
        let seqs: Vec<u64> = evs.iter().map(|e| e.sequence).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] <= w[1]),
            "{}: event sequences went back: {seqs:?}\n{}",
            self.id,
            self.observer.describe_events()
        );
        assert!(
            !evs.iter().any(|e| e.phase == Phase::Rejected),
            "{}: a notice was rejected:\n{}",
            self.id,
            self.observer.describe_events()
        );
    }

    /// Exactly one container of this device runs, the app at `version` from the sample image
    /// `image_version` for the device's platform (by its image id), named after the device.
    fn assert_runs(&self, version: &str, image_version: &str) {
        let running = docker::running(&self.id);
        assert_eq!(
            running.len(),
            1,
            "exactly one container of {} should run: {running:#?}",
            self.id
        );
        let c = &running[0];
        assert_eq!(c.version(), Some(version), "{}: {c:#?}", self.id);
        // Created from the image id (config digest) of exactly the signed manifest for the
        // device's platform.
        assert_eq!(
            c.image,
            infra::sensor_image_id(image_version, self.platform),
            "{}: not the image of sensor {image_version} for {} ({}): {c:#?}",
            self.id,
            self.platform,
            infra::digest(image_version, self.platform)
        );
        assert!(
            c.name.starts_with(&format!("ferry-{}-sensor-s", self.id)),
            "{}: container name {}",
            self.id,
            c.name
        );
        assert_eq!(
            c.label(docker::DEVICE_LABEL),
            Some(self.id.as_str()),
            "{c:#?}"
        );
    }

    /// The retained notice on the device's `desired` topic, verified with the test keys.
    fn retained_notice(&self, broker: &Broker, keys: &TestKeys) -> Option<Desired> {
        let raw = broker.retained(&self.observer.topics.desired())?;
        let trust = Trust {
            release: TrustedKeys::new([keys.release.key.public().clone()]),
            release_threshold: 1,
            controller: TrustedKeys::new([keys.controller.key.public().clone()]),
        };
        let v = verify_notice(&raw, &trust)
            .unwrap_or_else(|e| panic!("{}: retained notice does not verify: {e}", self.id));
        Some(v.desired)
    }
}

/// A device to start: name suffix, labels, platform.
struct Spec {
    suffix: &'static str,
    labels: &'static [(&'static str, &'static str)],
    platform: &'static str,
}

fn beta(suffix: &'static str) -> Spec {
    Spec {
        suffix,
        labels: &[("group", "beta")],
        platform: ARM64,
    }
}

/// A broker, the test keys, agents (one per spec, started) and the controller. Fields drop in
/// order: agents first, then the controller, then the broker, then the image claim.
///
/// A fleet holds [`docker::exclusive_images`]: its agents prune the images they no longer run
/// (by id, with all their names), and on one engine that can take an image away from another
/// test's agent between its download and its container create (which then loads it again). So
/// the fleet tests run one at a time; within a fleet, an image is pruned only when the devices
/// still needing it run it (an image in use is kept).
struct Fleet {
    nodes: Vec<Node>,
    ctl: TestController,
    broker: Broker,
    keys: TestKeys,
    /// The sensor 1.0.0 release envelope the devices were installed with.
    v1: String,
    _images: docker::ExclusiveImages,
}

impl Fleet {
    fn start(name: &str, specs: &[Spec]) -> Fleet {
        Fleet::start_on(name, specs, None)
    }

    /// With the controller on SQLite (`None`) or on a fresh PostgreSQL database, with these
    /// `[replica]` lines.
    fn start_on(name: &str, specs: &[Spec], replica: Option<&str>) -> Fleet {
        infra::require_infra();
        let images = docker::exclusive_images();
        let broker = Broker::start();
        let keys = TestKeys::new();
        let mut nodes = Vec::new();
        for s in specs {
            let id = infra::device_id(&format!("{name}-{}", s.suffix));
            docker::remove_device_containers(&id);
            let observer = Observer::start(&broker, &id);
            let labels: toml::Table = s
                .labels
                .iter()
                .map(|(k, v)| (k.to_string(), toml::Value::from(*v)))
                .collect();
            let agent = AgentBuilder::new(&id, &broker, &keys)
                .platform(Some(s.platform))
                .config(|t| {
                    t.insert("labels".into(), labels.into());
                })
                .start();
            observer.watch_agent(agent.liveness());
            nodes.push(Node {
                agent,
                observer,
                id,
                platform: s.platform,
            });
        }
        let mut ctl = match replica {
            Some(r) => TestController::build_replica(
                &broker,
                &keys,
                &std::sync::Arc::new(common::postgres::TestDb::create()),
                r,
            ),
            None => TestController::build(&broker, &keys, ""),
        };
        ctl.spawn();
        let v1 = release("1.0.0").signed(&keys);
        Fleet {
            nodes,
            ctl,
            broker,
            keys,
            v1,
            _images: images,
        }
    }

    fn by_id(&self, id: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// Install sensor 1.0.0 as sequence 1 on every device at once (direct notices, before the
    /// controller sends anything), wait until each committed it and the controller's inventory
    /// shows every device online on 1.0.0.
    fn install_v1(&self) {
        for n in &self.nodes {
            let notice = desired(&n.id, 1)
                .app("sensor", self.v1.clone())
                .rollout(None)
                .signed(&self.keys);
            n.observer.publish_desired(&notice);
        }
        for n in &self.nodes {
            let ev = n.observer.wait_terminal(1, SLOW);
            assert_eq!(
                ev.phase,
                Phase::Committed,
                "{}: installing 1.0.0: {ev:?}\n{}",
                n.id,
                n.observer.describe_events()
            );
        }
        let ids: Vec<String> = self.nodes.iter().map(|n| n.id.clone()).collect();
        self.ctl
            .wait_devices("every device online on sensor 1.0.0", SOON, |ds| {
                ids.iter().all(|id| {
                    ds.iter().any(|d| {
                        d.id == *id
                            && d.online
                            && d.sequence == 1
                            && d.apps.get("sensor").is_some_and(|a| a.version == "1.0.0")
                    })
                })
            });
    }

    fn device(&self, id: &str) -> DeviceView {
        self.ctl
            .devices(None)
            .into_iter()
            .find(|d| d.id == id)
            .unwrap_or_else(|| panic!("the controller does not list {id}"))
    }

    /// The rollout's device ids in wave `w`, sorted.
    fn wave(r: &RolloutView, w: usize) -> Vec<String> {
        r.devices
            .as_ref()
            .expect("rollout status with devices")
            .iter()
            .filter(|(_, e)| e.wave == Some(w))
            .map(|(id, _)| id.clone())
            .collect()
    }
}

fn ids(nodes: &[&Node]) -> Vec<String> {
    let mut v: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
    v.sort();
    v
}

/// Every device of the wave that starts later received its notice only after every device of
/// the earlier wave had committed and soaked.
fn assert_after_soak(f: &Fleet, rollout: &str, earlier: &[String], later: &[String]) {
    let committed: DateTime<Utc> = earlier
        .iter()
        .map(|id| {
            let n = f.by_id(id);
            n.event(n.only_rollout_sequence(rollout), Phase::Committed)
                .ts
        })
        .max()
        .unwrap();
    for id in later {
        let n = f.by_id(id);
        let received = n
            .event(n.only_rollout_sequence(rollout), Phase::Received)
            .ts;
        assert!(
            received >= committed + chrono::Duration::seconds(SOAK_S),
            "{id} was notified at {received}, before the earlier wave's last commit ({committed}) \
             plus the {SOAK} soak"
        );
    }
}

fn start_args<'a>(version: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "--app",
        "sensor",
        "--version",
        version,
        "--select",
        "group=beta",
        "--soak",
        SOAK,
        "--device-timeout",
        "150s",
    ];
    a.extend_from_slice(extra);
    a
}

// ----- an app that dies while soaking -----------------------------------------------------------

/// The agent watches its apps between updates and publishes its state when their health
/// changes; a device whose app dies during the soak fails its wave, and the rollout stops.
#[test]
fn an_app_that_dies_while_soaking_fails_its_device() {
    let t0 = Instant::now();
    let f = Fleet::start("soakdeath", &[beta("a"), beta("b")]);
    f.install_v1();
    f.ctl.push_release(&release("2.0.0").signed(&f.keys));
    let r = f.ctl.start_rollout(&[
        "--app",
        "sensor",
        "--version",
        "2.0.0",
        "--select",
        "group=beta",
        "--waves",
        "1,100%",
        "--soak",
        "90s",
        "--max-failures",
        "0",
        "--device-timeout",
        "150s",
    ]);
    let canary = &f.nodes[0];
    let seq = {
        let deadline = Instant::now() + SLOW;
        loop {
            let s = canary.rollout_sequences(&r.id);
            if let Some(s) = s.into_iter().next() {
                break s;
            }
            assert!(Instant::now() < deadline, "the canary got no notice");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert_eq!(
        canary.observer.wait_terminal(seq, SLOW).phase,
        Phase::Committed
    );
    // Soaking: the app dies (stopped outside Ferry).
    let c = docker::running(&canary.id);
    assert_eq!(c.len(), 1, "{c:?}");
    let out = Command::new("docker")
        .args(["stop", "-t", "1", &c[0].name])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let end = f
        .ctl
        .wait_rollout(&r.id, "paused", SOON, |v| v.state != "running");
    let dump = serde_json::to_string_pretty(&end).unwrap();
    assert_eq!(end.state, "paused", "{dump}");
    let (reason, who) = &end.summary.failures[0];
    assert!(
        reason.starts_with("unhealthy while soaking: sensor is "),
        "{dump}"
    );
    assert_eq!(who, &vec![canary.id.clone()]);
    assert!(!end.summary.waves[1].started, "{dump}");
    assert_eq!(
        f.device(&canary.id).health,
        "unhealthy",
        "the inventory shows it too"
    );
    assert!(
        f.nodes[1].rollout_sequences(&r.id).is_empty(),
        "wave 2 never started"
    );
    timing("an_app_that_dies_while_soaking_fails_its_device", t0);
}

// ----- 1. success in two waves -------------------------------------------------------------------

#[test]
fn rollout_over_four_devices_in_two_waves() {
    let t0 = Instant::now();
    let f = Fleet::start(
        "waves",
        &[
            Spec {
                suffix: "a",
                labels: &[("group", "beta"), ("site", "north")],
                platform: ARM64,
            },
            Spec {
                suffix: "b",
                labels: &[("group", "beta"), ("site", "south")],
                platform: ARMV7,
            },
            Spec {
                suffix: "c",
                labels: &[("group", "beta"), ("site", "north")],
                platform: ARM64,
            },
            Spec {
                suffix: "d",
                labels: &[("group", "beta"), ("site", "south")],
                platform: ARM64,
            },
            // Not selected: stays on 1.0.0, never hears from the controller.
            Spec {
                suffix: "e",
                labels: &[("group", "prod"), ("site", "north")],
                platform: ARM64,
            },
        ],
    );
    f.install_v1();
    let beta: Vec<&Node> = f.nodes[..4].iter().collect();
    let prod = &f.nodes[4];

    // Labels from each agent's config reach the inventory; selectors match on them.
    let sel = f.ctl.devices(Some("group=beta"));
    assert_eq!(
        sel.iter().map(|d| d.id.clone()).collect::<Vec<_>>(),
        ids(&beta)
    );
    let north = f.ctl.devices(Some("site=north,group=beta"));
    assert_eq!(north.len(), 2, "{north:#?}");
    assert_eq!(f.device(&beta[1].id).platform.as_deref(), Some(ARMV7));
    assert_eq!(f.device(&prod.id).labels["group"], "prod");

    f.ctl.push_release(&f.v1);
    let rel = f.ctl.push_release(&release("2.0.0").signed(&f.keys));
    assert_eq!(
        (rel.app.as_str(), rel.version.as_str()),
        ("sensor", "2.0.0")
    );
    assert_eq!(rel.images.len(), 2, "{rel:?}");

    let r = f.ctl.start_rollout(&start_args(
        "2.0.0",
        &["--waves", "2,100%", "--max-failures", "0"],
    ));
    assert_eq!(r.state, "running", "{r:?}");
    assert_eq!(r.targets, vec![2, 4]);
    assert_eq!(r.summary.devices, 4);
    let done = f
        .ctl
        .wait_rollout(&r.id, "completed", 2 * SLOW, |v| v.state != "running");
    assert_eq!(
        done.state,
        "completed",
        "{}",
        serde_json::to_string_pretty(&done).unwrap()
    );
    assert_eq!(done.summary.succeeded, 4, "{:?}", done.summary);
    assert_eq!(done.summary.failed, 0);
    assert!(done
        .summary
        .waves
        .iter()
        .all(|w| w.started && w.succeeded == 2));

    // Waves fill in device-id order; wave 2 started only after wave 1 had soaked.
    let (w0, w1) = (Fleet::wave(&done, 0), Fleet::wave(&done, 1));
    assert_eq!(w0, ids(&beta[..2]));
    assert_eq!(w1, ids(&beta[2..]));
    assert_after_soak(&f, &r.id, &w0, &w1);

    let mut names = BTreeSet::new();
    for n in &beta {
        let seq = n.only_rollout_sequence(&r.id);
        assert_eq!(
            seq, 2,
            "the controller continues after the device's sequence 1"
        );
        assert_eq!(
            n.event(seq, Phase::Committed).rollout.as_deref(),
            Some(r.id.as_str())
        );
        n.assert_sequences_increase();
        n.assert_runs("2.0.0", "2.0.0");
        names.insert(docker::running(&n.id)[0].name.clone());
        let d = f.device(&n.id);
        assert_eq!(d.apps["sensor"].version, "2.0.0", "{d:#?}");
        assert_eq!(d.health, "healthy", "{d:#?}");
        assert_eq!(d.previous.get("sensor").map(String::as_str), Some("1.0.0"));
        let last = d.last_result.as_ref().expect("a last result");
        assert_eq!(
            (last.phase, last.sequence, last.rollout.as_deref()),
            (Phase::Committed, seq, Some(r.id.as_str()))
        );
    }
    // Four devices on one engine, four distinct containers.
    assert_eq!(names.len(), 4, "{names:?}");

    // The unselected device: no notice, still 1.0.0.
    assert!(prod.rollout_sequences(&r.id).is_empty());
    assert_eq!(
        prod.retained_notice(&f.broker, &f.keys).map(|d| d.sequence),
        Some(1)
    );
    prod.assert_runs("1.0.0", "1.0.0");
    assert_eq!(f.device(&prod.id).apps["sensor"].version, "1.0.0");
    assert_eq!(f.ctl.device(&prod.id).desired_sequence, None);
    timing("rollout_over_four_devices_in_two_waves", t0);
}

// ----- 2. a broken release pauses in the first wave ----------------------------------------------

#[test]
fn broken_release_pauses_in_the_first_wave() {
    let t0 = Instant::now();
    let f = Fleet::start("broken", &[beta("a"), beta("b"), beta("c"), beta("d")]);
    f.install_v1();
    f.ctl.push_release(&release("3.0.0").signed(&f.keys));
    let r = f.ctl.start_rollout(&start_args(
        "3.0.0",
        &["--waves", "2,100%", "--max-failures", "1"],
    ));
    let paused = f
        .ctl
        .wait_rollout(&r.id, "paused", SLOW, |v| v.state != "running");
    let dump = serde_json::to_string_pretty(&paused).unwrap();
    assert_eq!(paused.state, "paused", "{dump}");
    assert_eq!(
        paused.reason.as_deref(),
        Some("wave 1: 2 of 2 devices failed (max failures 1)"),
        "{dump}"
    );
    assert_eq!(paused.current_wave, Some(0), "{dump}");
    assert!(!paused.summary.waves[1].started, "{dump}");
    let (first, second): (Vec<&Node>, Vec<&Node>) =
        (f.nodes[..2].iter().collect(), f.nodes[2..].iter().collect());
    assert_eq!(Fleet::wave(&paused, 0), ids(&first));
    assert!(Fleet::wave(&paused, 1).is_empty(), "{dump}");

    // The failure reason is the agent's, grouped over the wave.
    assert_eq!(paused.summary.failures.len(), 1, "{dump}");
    let (reason, who) = &paused.summary.failures[0];
    assert!(
        reason.starts_with("rolled_back: sensor: health check failed"),
        "{reason}"
    );
    assert_eq!(*who, ids(&first));

    // `rollout status` exits 1 for a paused rollout, with the reason in its text output.
    let out = f.ctl.ctl(&["rollout", "status", &r.id]);
    assert_eq!(out.code, 1, "{out}");
    let text = Command::new(common::controller::ferryctl_binary())
        .args(["rollout", "status", &r.id])
        .env("FERRY_SERVER", f.ctl.url())
        .env("FERRY_TOKEN_FILE", &f.ctl.token_file)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("state: paused"), "{text}");
    assert!(
        text.contains("rolled_back: sensor: health check failed"),
        "{text}"
    );

    for n in &first {
        let seq = n.only_rollout_sequence(&r.id);
        assert_eq!(n.observer.wait_terminal(seq, SOON).phase, Phase::RolledBack);
        let d = f.device(&n.id);
        let last = d.last_result.as_ref().expect("a last result");
        assert_eq!(last.phase, Phase::RolledBack, "{d:#?}");
        assert!(
            last.reason
                .as_deref()
                .is_some_and(|r| r.contains("health check failed")),
            "{d:#?}"
        );
    }
    // Wave 2 never started: its devices got nothing, now or a little later.
    for n in &second {
        let e = &paused.devices.as_ref().unwrap()[&n.id];
        assert_eq!(e.status, DeviceStatus::Pending, "{}: {e:?}", n.id);
    }
    let watch_from = Instant::now();
    for n in &second {
        let left = Duration::from_secs(4).saturating_sub(watch_from.elapsed());
        n.observer
            .assert_no_event("an event after the pause", left, |e| e.sequence != 1);
        assert_eq!(
            n.retained_notice(&f.broker, &f.keys).map(|d| d.sequence),
            Some(1)
        );
        assert_eq!(f.ctl.device(&n.id).desired_sequence, None);
        assert_eq!(
            n.agent.journal()["last_sequence"],
            1,
            "{}",
            n.agent.journal()
        );
    }
    for n in &f.nodes {
        n.assert_sequences_increase();
        n.assert_runs("1.0.0", "1.0.0");
        assert_eq!(f.device(&n.id).apps["sensor"].version, "1.0.0");
    }
    let still = f.ctl.rollout(&r.id);
    assert_eq!(still.state, "paused");
    assert!(!still.summary.waves[1].started);
    timing("broken_release_pauses_in_the_first_wave", t0);
}

// ----- 3. --on-failure revert --------------------------------------------------------------------

#[test]
fn on_failure_revert_sends_updated_devices_back() {
    let t0 = Instant::now();
    // `a` (arm64) is the canary; `b` (armv7) gets the release's broken armv7 build.
    let f = Fleet::start(
        "revert",
        &[
            beta("a"),
            Spec {
                suffix: "b",
                labels: &[("group", "beta")],
                platform: ARMV7,
            },
        ],
    );
    f.install_v1();
    let (a, b) = (&f.nodes[0], &f.nodes[1]);
    // 2.1.0: the arm64 build is fine (the 2.0.0 image), the armv7 build is broken (3.0.0's).
    let platforms = BTreeMap::from([
        (ARM64.to_string(), infra::digest("2.0.0", ARM64)),
        (ARMV7.to_string(), infra::digest("3.0.0", ARMV7)),
    ]);
    f.ctl.push_release(&f.v1);
    f.ctl.push_release(
        &release_with_image("2.1.0", "2.0.0")
            .platforms(platforms)
            .signed(&f.keys),
    );
    let r = f.ctl.start_rollout(&start_args(
        "2.1.0",
        &[
            "--waves",
            "1,100%",
            "--max-failures",
            "0",
            "--on-failure",
            "revert",
        ],
    ));
    assert_eq!(r.targets, vec![1, 2]);
    let end = f
        .ctl
        .wait_rollout(&r.id, "reverted", 2 * SLOW, |v| v.state != "running");
    let dump = serde_json::to_string_pretty(&end).unwrap();
    assert_eq!(end.state, "reverted", "{dump}");
    assert_eq!(
        end.reason.as_deref(),
        Some("wave 2: 1 of 1 devices failed (max failures 0)"),
        "{dump}"
    );
    assert_eq!(Fleet::wave(&end, 0), vec![a.id.clone()]);
    assert_eq!(Fleet::wave(&end, 1), vec![b.id.clone()]);
    assert!(end.reverted.contains(&a.id), "{dump}");
    assert_eq!(
        end.devices.as_ref().unwrap()[&a.id].status,
        DeviceStatus::Succeeded,
        "{dump}"
    );

    // The canary committed 2.1.0, then was sent back to 1.0.0 with a downgrade notice.
    let up = a.event(2, Phase::Committed).sequence;
    assert_eq!(
        a.event(up, Phase::Committed).rollout.as_deref(),
        Some(r.id.as_str())
    );
    // The revert notice is published with the state change: it may still be on its way.
    let back = a
        .observer
        .wait_event_where("the revert notice", SOON, |e| {
            e.rollout.as_deref() == Some(r.id.as_str()) && e.sequence > up
        })
        .sequence;
    let seqs: Vec<u64> = a.rollout_sequences(&r.id).into_iter().collect();
    assert_eq!(seqs, vec![up, back], "{}", a.observer.describe_events());
    a.event(up, Phase::Committed);
    assert_eq!(
        a.observer.wait_terminal(back, SLOW).phase,
        Phase::Committed,
        "{}",
        a.observer.describe_events()
    );
    let notice = a.retained_notice(&f.broker, &f.keys).expect("a notice");
    assert_eq!(notice.sequence, back);
    assert!(notice.allow_downgrade);
    assert_eq!(notice.rollout.as_deref(), Some(r.id.as_str()));
    a.observer.wait_state(
        |s| s.sequence == back && s.apps.get("sensor").is_some_and(|x| x.version == "1.0.0"),
        SOON,
    );
    a.assert_runs("1.0.0", "1.0.0");
    assert!(a.event(up, Phase::Committed).ts < a.event(back, Phase::Received).ts);

    // The device that failed rolled itself back; it ends on its previous release too.
    // It is sent its previous release as well (a no-op for it, under a new sequence).
    let failed = b.event(2, Phase::RolledBack).sequence;
    assert!(end.reverted.contains(&b.id), "{dump}");
    let again = b
        .observer
        .wait_event_where("the revert notice", SOON, |e| {
            e.rollout.as_deref() == Some(r.id.as_str()) && e.sequence > failed
        })
        .sequence;
    assert_eq!(
        b.observer.wait_terminal(again, SLOW).phase,
        Phase::Committed
    );
    b.observer.wait_state(
        |s| s.sequence == again && s.apps.get("sensor").is_some_and(|x| x.version == "1.0.0"),
        SOON,
    );
    b.assert_runs("1.0.0", "1.0.0");

    for n in &f.nodes {
        n.assert_sequences_increase();
    }
    let ds = f
        .ctl
        .wait_devices("both devices healthy on 1.0.0", SOON, |ds| {
            ds.iter().all(|d| {
                d.health == "healthy" && d.apps.get("sensor").is_some_and(|x| x.version == "1.0.0")
            })
        });
    assert_eq!(ds.len(), 2);
    timing("on_failure_revert_sends_updated_devices_back", t0);
}

// ----- 4. an offline device catches up -----------------------------------------------------------

#[test]
fn offline_device_catches_up_when_it_returns() {
    let t0 = Instant::now();
    let mut f = Fleet::start(
        "offline",
        &[
            beta("a"),
            beta("b"),
            beta("c"),
            // Not selected at first; relabelled into the rollout while it runs.
            Spec {
                suffix: "d",
                labels: &[("group", "alpha")],
                platform: ARM64,
            },
        ],
    );
    f.install_v1();
    f.ctl.push_release(&release("2.0.0").signed(&f.keys));

    // `c` goes away before the rollout starts.
    f.nodes[2].agent.terminate();
    let cid = f.nodes[2].id.clone();
    f.ctl.wait_devices("c offline", SOON, |ds| {
        ds.iter().any(|d| d.id == cid && !d.online)
    });

    let r = f
        .ctl
        .start_rollout(&start_args("2.0.0", &["--waves", "1,100%"]));
    assert_eq!(r.summary.devices, 3);
    assert_eq!(r.summary.pending_offline, 1, "{:?}", r.summary);
    let (aid, bid) = (f.nodes[0].id.clone(), f.nodes[1].id.clone());
    // The others go through both waves; `c` stays pending and the rollout keeps running.
    let waiting = f
        .ctl
        .wait_rollout(&r.id, "a and b succeeded", 2 * SLOW, |v| {
            let d = v.devices.as_ref().unwrap();
            v.state != "running"
                || (d[&aid].status == DeviceStatus::Succeeded
                    && d[&bid].status == DeviceStatus::Succeeded)
        });
    let dump = serde_json::to_string_pretty(&waiting).unwrap();
    assert_eq!(waiting.state, "running", "{dump}");
    let c = &waiting.devices.as_ref().unwrap()[&cid];
    assert_eq!(
        (&c.status, c.wave, c.online),
        (&DeviceStatus::Pending, None, false),
        "{dump}"
    );
    assert_eq!(waiting.summary.pending_offline, 1, "{dump}");
    assert_eq!(waiting.current_wave, Some(1), "{dump}");
    // Still nothing for `c` a little later.
    std::thread::sleep(Duration::from_secs(2));
    let still = f.ctl.rollout(&r.id);
    assert_eq!(still.state, "running");
    assert_eq!(
        still.devices.as_ref().unwrap()[&cid].status,
        DeviceStatus::Pending
    );
    assert_eq!(
        f.nodes[2]
            .retained_notice(&f.broker, &f.keys)
            .map(|d| d.sequence),
        Some(1)
    );

    // `d` starts matching the selector while the rollout runs (its agent.toml relabelled, the
    // agent restarted): it joins the running last wave and goes through it.
    let did = f.nodes[3].id.clone();
    assert!(!still.devices.as_ref().unwrap().contains_key(&did));
    f.nodes[3].agent.edit_config(|t| {
        t["labels"]
            .as_table_mut()
            .unwrap()
            .insert("group".into(), "beta".into());
    });
    f.nodes[3].agent.restart();
    let joined = f.ctl.wait_rollout(&r.id, "d succeeded", SLOW, |v| {
        v.state != "running"
            || v.devices.as_ref().unwrap().get(&did).map(|e| &e.status)
                == Some(&DeviceStatus::Succeeded)
    });
    let dump = serde_json::to_string_pretty(&joined).unwrap();
    assert_eq!(joined.state, "running", "{dump}");
    assert_eq!(joined.summary.devices, 4, "{dump}");
    assert_eq!(
        joined.devices.as_ref().unwrap()[&did].wave,
        Some(1),
        "{dump}"
    );
    assert_eq!(
        joined.devices.as_ref().unwrap()[&cid].status,
        DeviceStatus::Pending,
        "{dump}"
    );

    // `c` returns: it is notified, commits, soaks, and the rollout completes.
    f.nodes[2].agent.spawn();
    let done = f
        .ctl
        .wait_rollout(&r.id, "completed", SLOW, |v| v.state != "running");
    assert_eq!(
        done.state,
        "completed",
        "{}",
        serde_json::to_string_pretty(&done).unwrap()
    );
    assert_eq!(done.summary.succeeded, 4);
    assert_eq!(
        Fleet::wave(&done, 1),
        vec![bid.clone(), cid.clone(), did.clone()]
    );
    for n in &f.nodes {
        let seq = n.only_rollout_sequence(&r.id);
        assert_eq!(n.event(seq, Phase::Committed).sequence, seq);
        n.assert_sequences_increase();
        n.assert_runs("2.0.0", "2.0.0");
    }
    // `c` was notified after it came back, `d` after it was relabelled.
    let (b, c) = (f.by_id(&bid), f.by_id(&cid));
    let b_committed = b.event(b.only_rollout_sequence(&r.id), Phase::Committed).ts;
    assert!(c.event(c.only_rollout_sequence(&r.id), Phase::Received).ts > b_committed);
    let d = f.by_id(&did);
    assert!(d.event(d.only_rollout_sequence(&r.id), Phase::Received).ts > b_committed);
    timing("offline_device_catches_up_when_it_returns", t0);
}

// ----- 5. the controller killed mid-wave ---------------------------------------------------------

/// On PostgreSQL (`[store] url`): the store the other fleet tests run on is SQLite, and the
/// core's and store's own tests run on both.
#[test]
fn controller_killed_mid_wave_resumes() {
    let t0 = Instant::now();
    let mut f = Fleet::start_on(
        "crash",
        &[beta("a"), beta("b"), beta("c"), beta("d")],
        Some(""),
    );
    assert!(
        f.ctl.log().contains("database open db=postgres://"),
        "{}",
        f.ctl.log()
    );
    f.install_v1();
    f.ctl.push_release(&release("2.0.0").signed(&f.keys));
    // Crash 1, between the commit and the delivery: the broker is gone (SIGKILL: no wills, the
    // controller still sees every device online) when the rollout starts, so wave 1's notices
    // are committed to the database but still queued in the controller's MQTT client when it is
    // killed.
    f.broker.kill();
    let r = f.ctl.start_rollout(&start_args(
        "2.0.0",
        &["--waves", "2,100%", "--max-failures", "0"],
    ));
    assert_eq!(r.summary.waves[0].notified, 2, "{:?}", r.summary);
    let planned = f.ctl.rollout(&r.id);
    let first = Fleet::wave(&planned, 0);
    assert_eq!(first, ids(&f.nodes[..2].iter().collect::<Vec<_>>()));
    let second = ids(&f.nodes[2..].iter().collect::<Vec<_>>());
    f.ctl.kill();
    f.broker.restart();
    std::thread::sleep(Duration::from_secs(1));
    for n in &f.nodes {
        assert!(
            n.rollout_sequences(&r.id).is_empty(),
            "{} got a notice before the restart:\n{}",
            n.id,
            n.observer.describe_events()
        );
    }
    // The restarted controller publishes the stored notices again.
    f.ctl.spawn();
    for id in &first {
        f.by_id(id)
            .observer
            .wait_event_where("the re-published notice", SLOW, |e| {
                e.rollout.as_deref() == Some(r.id.as_str()) && e.phase == Phase::Received
            });
    }
    assert!(
        f.ctl
            .log()
            .contains("re-publishing notices not yet acknowledged notices=2"),
        "{}",
        f.ctl.log()
    );

    // Crash 2, mid-wave: wave 2's devices have their notice and are updating.
    for id in &second {
        f.by_id(id)
            .observer
            .wait_event_where("the rollout's notice", 2 * SLOW, |e| {
                e.rollout.as_deref() == Some(r.id.as_str()) && e.phase == Phase::Received
            });
    }
    let before = f.ctl.rollout(&r.id);
    assert_eq!(before.current_wave, Some(1), "{before:?}");
    assert_eq!(before.summary.succeeded, 2, "{:?}", before.summary);
    f.ctl.kill();
    // The devices go on without the controller.
    for id in &second {
        let n = f.by_id(id);
        let seq = n.only_rollout_sequence(&r.id);
        assert_eq!(n.observer.wait_terminal(seq, SLOW).phase, Phase::Committed);
    }
    f.ctl.spawn();
    let done = f
        .ctl
        .wait_rollout(&r.id, "completed", 2 * SLOW, |v| v.state != "running");
    let dump = serde_json::to_string_pretty(&done).unwrap();
    assert_eq!(done.state, "completed", "{dump}");
    assert_eq!(done.summary.succeeded, 4, "{dump}");
    assert_eq!(Fleet::wave(&done, 0), first);
    assert_eq!(Fleet::wave(&done, 1), second);
    assert_after_soak(&f, &r.id, &first, &second);
    for n in &f.nodes {
        // Notified exactly once for the rollout (one sequence, applied once), no sequence
        // reused or rejected.
        let seq = n.only_rollout_sequence(&r.id);
        assert_eq!(seq, 2);
        n.assert_sequences_increase();
        n.assert_runs("2.0.0", "2.0.0");
        assert_eq!(
            n.observer
                .events_for(seq)
                .iter()
                .filter(|e| e.phase == Phase::Received)
                .count(),
            1,
            "{}: the notice was applied more than once:\n{}",
            n.id,
            n.observer.describe_events()
        );
        // The controller still knows what it sent.
        assert_eq!(f.ctl.device(&n.id).desired_sequence, Some(2));
    }
    timing("controller_killed_mid_wave_resumes", t0);
}

// ----- 6. bad API input --------------------------------------------------------------------------

#[test]
fn bad_api_input_gets_a_clear_error_and_changes_nothing() {
    let t0 = Instant::now();
    // One device (nothing installed): enough for selectors to match or not.
    let f = Fleet::start("badinput", &[beta("a")]);
    let id = f.nodes[0].id.clone();
    f.ctl.wait_devices("the device", SOON, |ds| {
        ds.iter().any(|d| d.id == id && d.platform.is_some())
    });
    f.ctl.push_release(&release("2.0.0").signed(&f.keys));

    let fails = |args: &[&str], env: &[(&str, &str)], needles: &[&str]| {
        let mut a = vec!["rollout", "start"];
        a.extend_from_slice(args);
        let out = f.ctl.ctl_env(&a, env);
        assert_eq!(out.code, 1, "ferryctl {a:?} should fail: {out}");
        let j = out.json();
        assert_eq!(j["ok"], false, "{out}");
        assert_eq!(j["exit_code"], 1, "{out}");
        let msg = j["error"].as_str().unwrap_or_default();
        for n in needles {
            assert!(msg.contains(n), "{a:?}: {n:?} not in the error {msg:?}");
            assert!(out.stderr.contains(n), "{a:?}: {n:?} not on stderr: {out}");
        }
    };
    let ok = |v: &'static str| start_args(v, &["--waves", "1,100%"]);
    fails(
        &ok("9.9.9"),
        &[],
        &["422", "release sensor 9.9.9 is not in the catalogue"],
    );
    let mut a = ok("2.0.0");
    a[5] = "group=nobody";
    fails(
        &a,
        &[],
        &["422", "the selector `group=nobody` matches no device"],
    );
    let mut a = ok("2.0.0");
    a[5] = "group";
    fails(&a, &[], &["400", "select", "after the key"]);
    fails(
        &start_args("2.0.0", &["--waves", "1,10%,50%"]),
        &[],
        &["400", "waves", "must be `100%`"],
    );
    fails(
        &start_args("2.0.0", &["--waves", "5,2,100%"]),
        &[],
        &["400", "waves", "below an earlier wave"],
    );
    fails(
        &start_args("2.0.0", &["--waves", "1,100%", "--max-failures", "many"]),
        &[],
        &["400", "max_failures"],
    );
    let wrong = f.ctl.dir().join("wrong-token");
    std::fs::write(&wrong, "not-the-token-0123456789\n").unwrap();
    let wrong = wrong.display().to_string();
    fails(
        &ok("2.0.0"),
        &[("FERRY_TOKEN_FILE", &wrong)],
        &["401", "wrong bearer token"],
    );
    let out = f.ctl.ctl_env(&["devices"], &[("FERRY_TOKEN_FILE", &wrong)]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains("401"), "{out}");

    // A release signed by a key the controller does not trust is refused.
    let rogue = f.keys.extra("rogue");
    let env = release_with_image("2.1.0", "2.0.0").sign(&[&rogue.key]);
    let file = f.ctl.dir().join("rogue.json");
    std::fs::write(&file, env).unwrap();
    let out = f.ctl.ctl(&["release", "push", &file.display().to_string()]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains("does not verify"), "{out}");

    // Nothing changed.
    assert!(f.ctl.rollouts().is_empty());
    let rels = f.ctl.releases();
    assert_eq!(rels.len(), 1, "{rels:?}");
    assert_eq!(f.ctl.device(&id).desired_sequence, None);
    assert!(
        f.nodes[0].observer.events().is_empty(),
        "{}",
        f.nodes[0].observer.describe_events()
    );
    assert_eq!(
        f.nodes[0]
            .retained_notice(&f.broker, &f.keys)
            .map(|d| d.sequence),
        None
    );

    // Without a token: the API refuses, /metrics and /healthz answer.
    let (status, body) = f.ctl.http_get("/api/v1/rollouts");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("bearer token"), "{body}");
    let (status, metrics) = f.ctl.http_get("/metrics");
    assert_eq!(status, 200, "{metrics}");
    let n: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ferry_status_messages_total "))
        .unwrap_or_else(|| panic!("no ferry_status_messages_total in:\n{metrics}"))
        .trim()
        .parse()
        .unwrap();
    assert!(n > 0, "{metrics}");
    assert_eq!(f.ctl.http_get("/healthz").0, 200);
    timing("bad_api_input_gets_a_clear_error_and_changes_nothing", t0);
}
