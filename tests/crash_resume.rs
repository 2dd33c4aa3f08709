//! The agent killed (SIGKILL) or stopped (SIGTERM) in the middle of an update, against the real
//! dockerd and registry: after a restart the box must end on exactly ONE committed set — the old
//! or the new, never none and never a mix (protocol §6.9) — with the journal's transaction closed,
//! one container of the app running, and the reported state matching what runs. What the design
//! gives (src/update/state.rs, `Input::Recover`):
//!
//! | interrupted in   | after the restart                                                 | ends on |
//! | ---------------- | ----------------------------------------------------------------- | ------- |
//! | the download     | redone from `verified`, resumed from the store (nothing visible changed) | new |
//! | the switch       | undone: `rolling_back`, the old set revived                       | old     |
//! | the health gate  | the gate runs again on what runs                                  | new (a healthy release) |
//! | SIGTERM in gate  | drained: the gate may finish within `drain_gate`                  | new (healthy), exit 0 |
//!
//! A notice arriving during the switch or the health gate waits until that update ends, then
//! runs. (One arriving during the download takes it over at once, `superseded`: the download
//! tests cover that.) Containers without the device's label (and one labelled for another device)
//! are never touched.
//!
//! The agent downloads images itself (into its content store under the state dir) and has
//! dockerd load them from its loopback registry. Each test's agent reaches the registry through
//! its own [`FaultProxy`] (the releases name `127.0.0.1:<proxy port>/ferry/...`), so a test can
//! slow the agent's download down and see its requests. The engine already holds the sample
//! sensor layers, so a sensor download transfers almost nothing; the download that must stay in
//! flight is of the `ferry/bulk` image after [`docker::evict_bulk`], through a throttled proxy.
//!
//! Run with `cargo test --test crash_resume -- --test-threads=2`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::faultproxy::FaultProxy;
use common::infra::{self, ARM64};
use common::release::ReleaseBuilder;
use common::{docker, fast_health, Phase, Rig, SLOW};
use ferry_protocol::release::HealthSpec;

/// Bound for things that follow an event closely (pruning, a state report, the journal).
const SOON: Duration = Duration::from_secs(60);
/// `update.stop_timeout` the harness configures: how long a stop may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

fn timing(name: &str, t0: Instant) {
    eprintln!("TIMING {name}: {:.1} s", t0.elapsed().as_secs_f64());
}

fn docker_cli(args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("docker {args:?}: {e}"))
}

// ----- containers the agent must never touch ---------------------------------------------------

/// Two sample containers that are not this device's: one without any Ferry label, one labelled
/// for another device. Removed on drop.
struct Bystanders {
    names: Vec<String>,
    before: Vec<String>,
}

fn fingerprint(name: &str) -> String {
    let out = docker_cli(&[
        "container",
        "inspect",
        "-f",
        "{{.Id}} running={{.State.Running}} started={{.State.StartedAt}} restarts={{.RestartCount}} \
         policy={{.HostConfig.RestartPolicy.Name}} labels={{json .Config.Labels}}",
        name,
    ]);
    if out.status.success() {
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    } else {
        format!("(gone: {})", String::from_utf8_lossy(&out.stderr).trim())
    }
}

impl Bystanders {
    fn start(tag: &str) -> Bystanders {
        infra::require_infra();
        let pid = std::process::id();
        let image = infra::reference("1.0.0", ARM64);
        let plain = format!("not-ferry-{tag}-{pid}");
        let other = format!("not-ferry-{tag}-other-device-{pid}");
        let other_device = format!("io.ferry.device=it-{tag}-elsewhere-{pid}");
        let mut b = Bystanders {
            names: vec![plain.clone(), other.clone()],
            before: Vec::new(),
        };
        for (name, labels) in [
            (&plain, vec![]),
            (
                &other,
                vec!["--label", &other_device, "--label", "io.ferry.app=sensor"],
            ),
        ] {
            let _ = docker_cli(&["rm", "-f", name]);
            let mut args = vec!["run", "-d", "--platform", ARM64, "--name", name];
            args.extend(labels);
            args.push(&image);
            let out = docker_cli(&args);
            assert!(
                out.status.success(),
                "docker run {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for name in &b.names {
            infra::wait_for(&format!("{name} to run"), SOON, || {
                match docker::inspect(name) {
                    Some(c) if c.running => Ok(()),
                    c => Err(format!("{c:?}")),
                }
            });
        }
        b.before = b.names.iter().map(|n| fingerprint(n)).collect();
        b
    }

    /// Same container, never restarted, still running, labels as they were.
    fn assert_untouched(&self) {
        let now: Vec<String> = self.names.iter().map(|n| fingerprint(n)).collect();
        assert_eq!(
            now, self.before,
            "a container that is not the device's was touched"
        );
        assert!(now.iter().all(|f| f.contains("running=true")), "{now:#?}");
    }
}

impl Drop for Bystanders {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = docker_cli(&["rm", "-f", n]);
        }
    }
}

// ----- one test's setup --------------------------------------------------------------------------

/// Fields drop in order: the agent and the device's containers first, then the bystanders, then
/// the proxy.
struct Case {
    rig: Rig,
    bystanders: Bystanders,
    proxy: FaultProxy,
}

/// A gate with a grace period: health checking lasts at least ~7 s, so a kill reliably lands in it.
fn slow_gate() -> HealthSpec {
    HealthSpec {
        grace_s: Some(4),
        successes: Some(3),
        ..fast_health()
    }
}

/// The 1.0.0 sample app behind a shell that ignores SIGTERM: stopping it takes the whole stop
/// timeout (5 s) instead of ~0.2 s, which keeps a stop-first switch under way long enough to kill
/// the agent inside it. (Docker signals only PID 1, the shell.)
const SLOW_STOP: [&str; 3] = [
    "/bin/sh",
    "-c",
    "trap '' TERM; /usr/local/bin/sensor & wait",
];

impl Case {
    fn start(name: &str) -> Case {
        infra::require_infra();
        let proxy = FaultProxy::registry();
        let bystanders = Bystanders::start(name);
        let rig = Rig::start(name);
        Case {
            rig,
            bystanders,
            proxy,
        }
    }

    /// The sample release `version`, downloaded through this test's proxy.
    fn release(&self, version: &str) -> ReleaseBuilder {
        self.rig
            .release(version)
            .image(&self.proxy.repo(infra::SENSOR_REPO))
    }

    /// The same app from the download-test image `ferry/bulk` `version`, through this test's
    /// proxy.
    fn bulk_release(&self, version: &str) -> ReleaseBuilder {
        self.rig
            .bulk_release(version)
            .image(&self.proxy.repo(infra::BULK_REPO))
    }

    /// Publish `sequence` = {sensor: `release`} (stop-first, `allow_downgrade`).
    fn publish(&self, sequence: u64, release: ReleaseBuilder, allow_downgrade: bool) {
        let keys = &self.rig.keys;
        let notice = self
            .rig
            .desired(sequence)
            .app("sensor", release.signed(keys))
            .stop_first()
            .allow_downgrade(allow_downgrade)
            .signed(keys);
        self.rig.publish(&notice);
    }

    /// Commit `release` as sequence 1 (the starting point); returns its running container.
    fn install(&self, release: ReleaseBuilder) -> docker::Container {
        let version = release.release.version.to_string();
        let repo = release.release.image.clone();
        let digest = release.release.platforms[ARM64].clone();
        self.publish(1, release, false);
        let end = self.rig.observer.wait_terminal(1, SLOW);
        assert_eq!(
            end.phase,
            Phase::Committed,
            "installing {version}: {end:?}\n{}",
            self.rig.observer.describe_events()
        );
        self.settled_on(
            1,
            Phase::Committed,
            &version,
            &repo,
            &digest,
            Duration::ZERO,
        )
    }

    /// The journal's open transaction (`null` when none).
    fn txn(&self) -> serde_json::Value {
        self.rig.agent.journal()["txn"].clone()
    }

    /// SIGKILL the agent and return the transaction its journal holds.
    fn kill(&mut self) -> serde_json::Value {
        self.rig.agent.kill();
        let txn = self.txn();
        eprintln!(
            "killed in state {} (created {}, stopped_old {}, pulled {}); containers: {:?}",
            txn["state"],
            txn["created"],
            txn["stopped_old"],
            txn["pulled"],
            self.rig
                .containers()
                .iter()
                .map(|c| format!("{} {}", c.name, c.status))
                .collect::<Vec<_>>()
        );
        txn
    }

    /// [`Case::settled_on`] the sample sensor image `version`.
    fn settled(
        &self,
        sequence: u64,
        phase: Phase,
        version: &str,
        stable: Duration,
    ) -> docker::Container {
        self.settled_on(
            sequence,
            phase,
            version,
            &infra::sensor_image(),
            &infra::digest(version, ARM64),
            stable,
        )
    }

    /// The update `sequence` ended with `phase`; check that the box is on ONE committed set —
    /// `version`, image manifest `digest` of `repo` — and stays there for `stable`:
    /// - the journal has no open transaction, commits `version`, records `phase` as the result;
    /// - exactly one container of the device exists and runs: the journal's, with `version`,
    ///   created from the image `digest` names (its id, the config digest);
    /// - the retained state reports that container, `version`, `digest`, healthy, and the outcome;
    /// - the app serves `version`; containers that are not the device's are untouched.
    fn settled_on(
        &self,
        sequence: u64,
        phase: Phase,
        version: &str,
        repo: &str,
        digest: &str,
        stable: Duration,
    ) -> docker::Container {
        let rig = &self.rig;
        infra::wait_for("the journal to close the transaction", SOON, || {
            let j = rig.agent.journal();
            if j["txn"].is_null() {
                Ok(())
            } else {
                Err(format!("txn still open: {}", j["txn"]))
            }
        });
        let j = rig.agent.journal();
        assert_eq!(
            rig.agent.committed_versions(),
            [("sensor".to_string(), version.to_string())].into(),
            "{j:#}"
        );
        assert_eq!(j["last_sequence"], sequence, "{j:#}");
        assert_eq!(j["last_result"]["sequence"], sequence, "{j:#}");
        assert_eq!(j["last_result"]["phase"], phase.to_string(), "{j:#}");
        let name = j["committed"]["sensor"]["container"]
            .as_str()
            .expect("committed container")
            .to_string();

        let one = |what: &str| -> Result<docker::Container, String> {
            let all = rig.containers();
            match all.as_slice() {
                [c] if c.running && c.name == name && c.version() == Some(version) => Ok(c.clone()),
                _ => Err(format!(
                    "{what}: want only {name} ({version}) running, have {:?}",
                    all.iter()
                        .map(|c| format!("{} {} {}", c.name, c.version().unwrap_or("?"), c.status))
                        .collect::<Vec<_>>()
                )),
            }
        };
        let c = infra::wait_for("exactly one container of the app", SOON, || one("settling"));
        let until = Instant::now() + stable;
        while Instant::now() < until {
            if let Err(e) = one("still") {
                panic!("{e}\nevents:\n{}", rig.observer.describe_events());
            }
            std::thread::sleep(Duration::from_millis(250));
        }

        let st = rig.observer.wait_state(
            |s| {
                s.sequence == sequence
                    && s.apps.len() == 1
                    && s.apps.get("sensor").is_some_and(|a| {
                        a.version == version && a.container == name && a.health == "healthy"
                    })
                    && s.update
                        .as_ref()
                        .is_some_and(|u| u.sequence == sequence && u.phase == phase)
            },
            SOON,
        );
        assert_eq!(st.apps["sensor"].digest, digest, "{st:?}");
        assert_eq!(
            c.image,
            infra::image_id(repo, digest),
            "{} is not created from the image of {repo}@{digest}",
            c.name
        );
        let r = docker::readings(&c.name, SOON);
        assert_eq!(r["version"], version, "{r}");
        self.bystanders.assert_untouched();
        c
    }

    fn phases(&self, sequence: u64) -> Vec<Phase> {
        self.rig.observer.phases_for(sequence)
    }
}

// ----- the tests -------------------------------------------------------------------------------

/// The link of [`kill_during_download_resumes_from_the_store`] until the kill: 256 KiB/s keeps
/// the ~7 MiB download of the bulk image in flight for half a minute.
const SLOW_LINK: u64 = 256 * 1024;
/// How many bytes of the data layer the store must have made durable before the kill.
const DURABLE_BEFORE_KILL: u64 = 1024 * 1024;

/// `<state_dir>/store/partial/sha256/<hex>.durable` of blob `digest`: how many of its bytes the
/// store made durable (0 when there is no partial).
fn durable_bytes(c: &Case, digest: &str) -> u64 {
    let hex = digest.strip_prefix("sha256:").unwrap();
    let path = c
        .rig
        .agent
        .state_dir()
        .join("store/partial/sha256")
        .join(format!("{hex}.durable"));
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

/// (a) SIGKILL while the agent downloads the new image into its content store (the bulk image,
/// whose layers the engine lacks, through a slow link): nothing has reached the engine and
/// nothing visible changed. After the restart the update is redone from `verified` and the
/// download resumes from the store — the data layer is asked for from its durable length on
/// (`Range`), not fetched again — and the new set is committed.
#[test]
fn kill_during_download_resumes_from_the_store() {
    let t0 = Instant::now();
    // The engine must lack the bulk layers for the whole test (other tests leave them alone).
    let bulk = docker::bulk_lock();
    let mut c = Case::start("crash-pull");
    let old = c.install(c.release("1.0.0"));
    docker::evict_bulk(&bulk);
    let digest = infra::bulk_digest("2.0.0", ARM64);
    let (data, data_size, _) = infra::bulk_data_layer();

    c.proxy.reset_counters();
    c.proxy.throttle(Some(SLOW_LINK));
    c.publish(2, c.bulk_release("2.0.0"), false);
    let planned = c
        .rig
        .observer
        .wait_event_where("download progress of sequence 2", SLOW, |e| {
            e.sequence == 2 && e.phase == Phase::Downloading && e.total.is_some()
        });
    let total = planned.total.unwrap();
    assert!(
        total >= data_size,
        "the engine lacks the data layer ({data_size} bytes), yet only {total} bytes are to be \
         fetched: {planned:?}"
    );
    let durable = infra::wait_for(
        "the store to hold a durable part of the data layer",
        SLOW,
        || match durable_bytes(&c, &data) {
            n if n >= DURABLE_BEFORE_KILL => Ok(n),
            n => Err(format!("{n} bytes durable; {}", c.proxy.describe())),
        },
    );
    let txn = c.kill();
    let down_at_kill = c.proxy.bytes_down();
    let requests_at_kill = c.proxy.requests().len();
    let durable = durable_bytes(&c, &data).max(durable);
    eprintln!("killed with {durable} bytes of {data} durable; {down_at_kill} bytes down");
    assert!(
        durable < data_size,
        "the data layer was complete at the kill"
    );
    assert_eq!(txn["state"], "downloading", "{txn:#}");
    assert_eq!(
        txn["pulled"],
        serde_json::json!([]),
        "nothing is in the engine before the download completes: {txn:#}"
    );
    assert!(
        !docker::image_with_digest(&digest),
        "bulk 2.0.0 is in the engine before its download completed"
    );
    // Nothing visible changed: the old container still runs alone.
    let running: Vec<String> = c.rig.running().into_iter().map(|c| c.name).collect();
    assert_eq!(running, vec![old.name.clone()]);

    c.proxy.throttle(None);
    c.rig.agent.spawn();
    let end = c.rig.observer.wait_terminal(2, SLOW);
    assert_eq!(
        end.phase,
        Phase::Committed,
        "{end:?}\n{}",
        c.rig.observer.describe_events()
    );
    c.rig.agent.wait_log("resuming an interrupted update", SOON);
    // Redone from `verified`: verified and downloading are reported a second time (downloading
    // once per progress report).
    let mut phases = c.phases(2);
    phases.dedup();
    assert_eq!(
        phases,
        vec![
            Phase::Received,
            Phase::Verified,
            Phase::Downloading,
            Phase::Verified,
            Phase::Downloading,
            Phase::Downloaded,
            Phase::Switching,
            Phase::HealthChecking,
            Phase::Committed
        ],
        "{}",
        c.rig.observer.describe_events()
    );
    // Resumed from the store: the restarted agent asks for the data layer from where the
    // durable part ends, the registry answers 206, and the bytes after the restart fall short
    // of the layers to fetch by at least what was durable.
    let after: Vec<_> = c.proxy.requests()[requests_at_kill..]
        .iter()
        .filter(|r| r.method == "GET" && r.path.ends_with(&format!("/blobs/{data}")))
        .cloned()
        .collect();
    let first = after.first().unwrap_or_else(|| {
        panic!(
            "the data layer was not asked for again: {}",
            c.proxy.describe()
        )
    });
    let from: u64 = first
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the data layer was asked for from the start: {first:?}"));
    assert!(
        from >= durable,
        "resumed at {from}, before the {durable} bytes made durable: {first:?}"
    );
    let downloaded = c.rig.observer.wait_event_for(2, Phase::Downloaded, SOON);
    let stats = downloaded
        .download
        .expect("download counters on downloaded");
    assert!(stats.resumes >= 1, "{stats:?}");
    assert_eq!(stats.restarts, 0, "{stats:?}");
    let down_after = c.proxy.bytes_down() - down_at_kill;
    assert!(
        down_after + durable <= total + 64 * 1024,
        "{down_after} bytes down after the restart, {durable} were stored, {total} to fetch"
    );
    let new = c.settled_on(
        2,
        Phase::Committed,
        "2.0.0",
        &infra::bulk_image(),
        &digest,
        Duration::from_secs(2),
    );
    assert!(
        docker::inspect(&old.name).is_none(),
        "the old container is pruned"
    );
    assert_ne!(new.id, old.id);
    drop(c);
    drop(bulk);
    timing("kill_during_download_resumes_from_the_store", t0);
}

/// (b) SIGKILL while the containers are being swapped: the switch is undone after the restart
/// and the old set — the very same container — runs again.
#[test]
fn kill_during_switch_rolls_back() {
    let t0 = Instant::now();
    let mut c = Case::start("crash-switch");
    let old = c.install(c.release("1.0.0").cmd(&SLOW_STOP));

    c.publish(2, c.release("2.0.0"), false);
    c.rig.observer.wait_event_for(2, Phase::Switching, SLOW);
    let txn = c.kill();
    assert_eq!(
        txn["state"], "switching",
        "the kill must land in the switch (the old container takes {STOP_TIMEOUT:?} to stop): {txn:#}"
    );

    c.rig.agent.spawn();
    let end = c.rig.observer.wait_terminal(2, SLOW);
    assert_eq!(
        end.phase,
        Phase::RolledBack,
        "{end:?}\n{}",
        c.rig.observer.describe_events()
    );
    assert!(
        end.reason
            .as_deref()
            .is_some_and(|r| r.contains("restarted during the switch")),
        "{end:?}"
    );
    let phases = c.phases(2);
    assert_eq!(
        &phases[phases.len() - 3..],
        &[Phase::Switching, Phase::RollingBack, Phase::RolledBack],
        "{}",
        c.rig.observer.describe_events()
    );
    // Long enough for a stop the killed agent had asked for to have completed.
    let now = c.settled(
        2,
        Phase::RolledBack,
        "1.0.0",
        STOP_TIMEOUT + Duration::from_secs(3),
    );
    assert_eq!(now.name, old.name, "the same container is revived");
    assert_eq!(now.id, old.id, "the same container is revived");
    assert_eq!(now.restart_policy, "unless-stopped");
    timing("kill_during_switch_rolls_back", t0);
}

/// (b') SIGKILL later in the switch: while the old container is being stopped (its restart policy
/// already cleared, the stop still under way in dockerd — which finishes it after the agent is
/// gone). The rollback must still leave the old container running, for good.
#[test]
fn kill_while_old_container_stops_rolls_back() {
    let t0 = Instant::now();
    let mut c = Case::start("crash-stopping");
    let old = c.install(c.release("1.0.0").cmd(&SLOW_STOP));

    c.publish(2, c.release("2.0.0"), false);
    c.rig.observer.wait_event_for(2, Phase::Switching, SLOW);
    infra::wait_for(
        "the old container to be stopping",
        SOON,
        || match docker::inspect(&old.name) {
            Some(o) if o.running && o.restart_policy == "no" => Ok(()),
            o => Err(format!("{o:?}")),
        },
    );
    let txn = c.kill();
    assert_eq!(txn["state"], "switching", "{txn:#}");
    assert_eq!(txn["stopped_old"], serde_json::json!(["sensor"]), "{txn:#}");

    c.rig.agent.spawn();
    let end = c.rig.observer.wait_terminal(2, SLOW);
    assert_eq!(
        end.phase,
        Phase::RolledBack,
        "{end:?}\n{}",
        c.rig.observer.describe_events()
    );
    // Long enough for the stop the killed agent had asked for to have completed.
    let now = c.settled(
        2,
        Phase::RolledBack,
        "1.0.0",
        STOP_TIMEOUT + Duration::from_secs(3),
    );
    assert_eq!(now.id, old.id, "the same container is revived");
    assert_eq!(now.restart_policy, "unless-stopped");
    timing("kill_while_old_container_stops_rolls_back", t0);
}

/// (c) SIGKILL during the health gate: the gate runs again after the restart on what runs; the
/// release is healthy, so the new set is committed.
#[test]
fn kill_during_health_gate_reruns_the_gate() {
    let t0 = Instant::now();
    let mut c = Case::start("crash-gate");
    let old = c.install(c.release("1.0.0"));

    c.publish(2, c.release("2.0.0").health(slow_gate()), false);
    c.rig
        .observer
        .wait_event_for(2, Phase::HealthChecking, SLOW);
    // The event leaves before the gate logs its start: kill once the gate has begun, so that
    // the log shows one gate before the kill and one after.
    let s2 = format!("ferry-{}-sensor-s2", c.rig.device);
    infra::wait_for("the gate of the new container to start", SOON, || {
        c.rig
            .agent
            .log()
            .lines()
            .any(|l| l.contains("health gate started") && l.contains(&s2))
            .then_some(())
            .ok_or_else(|| "not yet".to_string())
    });
    let txn = c.kill();
    assert_eq!(txn["state"], "health_checking", "{txn:#}");
    let candidate = txn["target"]["sensor"]["container"]
        .as_str()
        .unwrap()
        .to_string();

    c.rig.agent.spawn();
    let end = c.rig.observer.wait_terminal(2, SLOW);
    assert_eq!(
        end.phase,
        Phase::Committed,
        "{end:?}\n{}",
        c.rig.observer.describe_events()
    );
    c.rig.agent.wait_log("resuming an interrupted update", SOON);
    let gates = c
        .rig
        .agent
        .log()
        .lines()
        .filter(|l| l.contains("health gate started") && l.contains(&candidate))
        .count();
    assert_eq!(
        gates, 2,
        "the gate of {candidate} runs again after the restart"
    );
    let new = c.settled(2, Phase::Committed, "2.0.0", Duration::from_secs(2));
    assert_eq!(
        new.name, candidate,
        "the container that was being checked is kept"
    );
    assert!(
        docker::inspect(&old.name).is_none(),
        "the old container is pruned"
    );
    timing("kill_during_health_gate_reruns_the_gate", t0);
}

/// (d) SIGTERM during the health gate of a healthy release: the agent drains — the gate may
/// still finish within `update.drain_gate` — commits, and exits 0 on one committed set. A
/// restart then finds nothing to resume.
#[test]
fn sigterm_during_health_gate_drains_and_exits_0() {
    let t0 = Instant::now();
    let mut c = Case::start("drain");
    c.install(c.release("1.0.0"));

    c.publish(2, c.release("2.0.0").health(slow_gate()), false);
    c.rig
        .observer
        .wait_event_for(2, Phase::HealthChecking, SLOW);
    let asked = Instant::now();
    let status = c.rig.agent.terminate();
    let took = asked.elapsed();
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    // drain_gate (30 s by default) plus pruning the old container.
    assert!(took < Duration::from_secs(45), "draining took {took:?}");
    eprintln!("drained and exited 0 in {:.1} s", took.as_secs_f64());
    let end = c.rig.observer.wait_terminal(2, SOON);
    assert_eq!(
        end.phase,
        Phase::Committed,
        "{end:?}\n{}",
        c.rig.observer.describe_events()
    );
    let log = c.rig.agent.log();
    assert!(log.contains("shutdown requested; draining"), "{log}");
    let new = c.settled(2, Phase::Committed, "2.0.0", Duration::from_secs(2));

    // Back up: nothing to resume, nothing changes.
    let n_events = c.rig.observer.events().len();
    c.rig.agent.spawn();
    c.rig.observer.wait_online("1", SOON);
    c.rig.agent.wait_log("ferry-agent starting", SOON);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !c.rig.agent.log().contains("resuming an interrupted update"),
        "a drained agent leaves no open transaction"
    );
    assert_eq!(
        c.rig.observer.events().len(),
        n_events,
        "{}",
        c.rig.observer.describe_events()
    );
    let again = c.settled(2, Phase::Committed, "2.0.0", Duration::ZERO);
    assert_eq!(again.id, new.id);
    timing("sigterm_during_health_gate_drains_and_exits_0", t0);
}

/// (e) A notice arriving while an update runs waits for it to reach a safe point (its end), then
/// supersedes it: the final committed set is the newer notice's.
#[test]
fn newer_notice_supersedes_at_a_safe_point() {
    let t0 = Instant::now();
    let c = Case::start("supersede");
    c.install(c.release("1.0.0"));

    c.publish(2, c.release("2.0.0").health(slow_gate()), false);
    c.rig
        .observer
        .wait_event_for(2, Phase::HealthChecking, SLOW);
    // Back to 1.0.0 (a downgrade from 2.0.0 once sequence 2 commits), with a marker in its env.
    c.publish(
        3,
        c.release("1.0.0").env("FERRY_TEST_NOTICE", "seq-3"),
        true,
    );
    c.rig
        .agent
        .wait_log("a new notice arrived during an update", SOON);
    let end2 = c.rig.observer.wait_terminal(2, SLOW);
    assert_eq!(
        end2.phase,
        Phase::Committed,
        "{end2:?}\n{}",
        c.rig.observer.describe_events()
    );
    let end3 = c.rig.observer.wait_terminal(3, SLOW);
    assert_eq!(
        end3.phase,
        Phase::Committed,
        "{end3:?}\n{}",
        c.rig.observer.describe_events()
    );
    // Sequence 3 started only after sequence 2 had ended.
    let events = c.rig.observer.events();
    let end2_at = events
        .iter()
        .position(|e| e.sequence == 2 && e.phase == Phase::Committed)
        .unwrap();
    let first3 = events.iter().position(|e| e.sequence == 3).unwrap();
    assert!(
        first3 > end2_at,
        "sequence 3 began before sequence 2 ended:\n{}",
        c.rig.observer.describe_events()
    );
    let now = c.settled(3, Phase::Committed, "1.0.0", Duration::from_secs(2));
    assert!(now.name.ends_with("-s3"), "{}", now.name);
    let out = docker_cli(&[
        "container",
        "inspect",
        "-f",
        "{{json .Config.Env}}",
        &now.name,
    ]);
    let env = String::from_utf8_lossy(&out.stdout);
    assert!(env.contains("FERRY_TEST_NOTICE=seq-3"), "{env}");
    assert_eq!(c.rig.agent.journal()["committed_sequence"], 3);
    timing("newer_notice_supersedes_at_a_safe_point", t0);
}
