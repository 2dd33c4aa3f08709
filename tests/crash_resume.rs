//! The agent killed (SIGKILL) or stopped (SIGTERM) in the middle of an update, against the real
//! dockerd and registry: after a restart the box must end on exactly ONE committed set — the old
//! or the new, never none and never a mix (protocol §6.9) — with the journal's transaction closed,
//! one container of the app running, and the reported state matching what runs. What the design
//! gives (src/update/state.rs, `Input::Recover`):
//!
//! | interrupted in   | after the restart                                 | ends on |
//! | ---------------- | ------------------------------------------------- | ------- |
//! | the pull         | redone from `verified` (nothing visible changed)  | new     |
//! | the switch       | undone: `rolling_back`, the old set revived       | old     |
//! | the health gate  | the gate runs again on what runs                  | new (a healthy release) |
//! | SIGTERM in gate  | drained: the gate may finish within `drain_gate_s`| new (healthy), exit 0 |
//!
//! A notice arriving during an update waits until that update ends, then runs (supersedes).
//! Containers without the device's label (and one labelled for another device) are never touched.
//!
//! Each test talks to the registry through its own little TCP proxy ([`RegistryProxy`]): the
//! releases name `127.0.0.1:<proxy port>/ferry/sensor`, so the image references the test's agent
//! pulls and prunes are its own (agents of parallel tests prune the shared
//! `127.0.0.1:5055/...` references), and the proxy can hold dockerd's manifest request to keep a
//! pull in flight while the agent is killed.
//!
//! Run with `cargo test --test crash_resume -- --test-threads=2`.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::infra::{self, ARM64};
use common::release::ReleaseBuilder;
use common::{docker, fast_health, Phase, Rig, SLOW};
use ferry_protocol::release::HealthSpec;

/// Bound for things that follow an event closely (pruning, a state report, the journal).
const SOON: Duration = Duration::from_secs(60);
/// `update.stop_timeout_s` the harness configures: how long a stop may take.
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

// ----- a registry proxy that can hold dockerd's pull -------------------------------------------

/// A TCP proxy to the sample registry on a free port of 127.0.0.1 (a loopback registry, so
/// dockerd and the agent speak plain HTTP to it). While [`RegistryProxy::hold`] is on, requests
/// from the engine (`User-Agent: docker/...`) for a manifest are held before being forwarded, so
/// a `docker pull` stays in flight; the agent's own manifest check (`ferry-registry/...`) passes.
/// Inspection is per read chunk: enough for the short, single-write HTTP requests of a pull.
struct RegistryProxy {
    addr: SocketAddr,
    hold: Arc<AtomicBool>,
    held: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl RegistryProxy {
    fn start() -> RegistryProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        let upstream = infra::registry();
        let hold = Arc::new(AtomicBool::new(false));
        let held = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (hold, held, stop) = (hold.clone(), held.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = conn else { continue };
                    let (upstream, hold, held, stop) =
                        (upstream.clone(), hold.clone(), held.clone(), stop.clone());
                    std::thread::spawn(move || relay(client, &upstream, &hold, &held, &stop));
                }
            });
        }
        RegistryProxy {
            addr,
            hold,
            held,
            stop,
        }
    }

    /// The sample image's repository as seen through this proxy.
    fn repo(&self) -> String {
        format!("{}/{}", self.addr, infra::SENSOR_REPO)
    }

    /// `repo@digest` of sample image `version` for linux/arm64 through this proxy.
    fn reference(&self, version: &str) -> String {
        format!("{}@{}", self.repo(), infra::digest(version, ARM64))
    }

    fn hold(&self, on: bool) {
        self.hold.store(on, Ordering::SeqCst);
    }

    /// How many engine manifest requests have been held so far.
    fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }
}

fn relay(
    client: TcpStream,
    upstream: &str,
    hold: &AtomicBool,
    held: &AtomicUsize,
    stop: &AtomicBool,
) {
    let Ok(up) = TcpStream::connect(upstream) else {
        return;
    };
    let (Ok(mut up_read), Ok(mut client_write)) = (up.try_clone(), client.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut up_read, &mut client_write);
        let _ = client_write.shutdown(Shutdown::Write);
    });
    let (mut client, mut up) = (client, up);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        if hold.load(Ordering::SeqCst) && is_engine_manifest_request(chunk) {
            held.fetch_add(1, Ordering::SeqCst);
            while hold.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if up.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = up.shutdown(Shutdown::Write);
}

fn is_engine_manifest_request(chunk: &[u8]) -> bool {
    let text = String::from_utf8_lossy(chunk).to_ascii_lowercase();
    (text.starts_with("get ") || text.starts_with("head "))
        && text.contains("/manifests/")
        && text.contains("\r\nuser-agent: docker/")
}

impl Drop for RegistryProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.hold.store(false, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wakes the accept loop
                                               // Untag the references pulled through this proxy (the images keep their other names).
        for v in ["1.0.0", "2.0.0", "3.0.0"] {
            let _ = docker_cli(&["image", "rm", &self.reference(v)]);
        }
    }
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
/// the proxy (which untags its image references).
struct Case {
    rig: Rig,
    bystanders: Bystanders,
    proxy: RegistryProxy,
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
        let proxy = RegistryProxy::start();
        let bystanders = Bystanders::start(name);
        let rig = Rig::start(name);
        Case {
            rig,
            bystanders,
            proxy,
        }
    }

    /// The sample release `version` pulled through this test's proxy.
    fn release(&self, version: &str) -> ReleaseBuilder {
        self.rig.release(version).image(&self.proxy.repo())
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
        self.publish(1, release, false);
        let end = self.rig.observer.wait_terminal(1, SLOW);
        assert_eq!(
            end.phase,
            Phase::Committed,
            "installing {version}: {end:?}\n{}",
            self.rig.observer.describe_events()
        );
        self.settled(1, Phase::Committed, &version, Duration::ZERO)
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

    /// The update `sequence` ended with `phase`; check that the box is on ONE committed set —
    /// `version` — and stays there for `stable`:
    /// - the journal has no open transaction, commits `version`, records `phase` as the result;
    /// - exactly one container of the device exists and runs: the journal's, with `version`;
    /// - the retained state reports that container, `version`, healthy, and the outcome;
    /// - the app serves `version`; containers that are not the device's are untouched.
    fn settled(
        &self,
        sequence: u64,
        phase: Phase,
        version: &str,
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
        assert_eq!(
            st.apps["sensor"].digest,
            infra::digest(version, ARM64),
            "{st:?}"
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

/// (a) SIGKILL while dockerd is pulling the new image: the pull is redone after the restart and
/// the new set is committed.
#[test]
fn kill_during_pull_resumes_the_pull() {
    let t0 = Instant::now();
    let mut c = Case::start("crash-pull");
    let old = c.install(c.release("1.0.0"));

    c.proxy.hold(true);
    c.publish(2, c.release("2.0.0"), false);
    c.rig.observer.wait_event_for(2, Phase::Downloading, SLOW);
    infra::wait_for("dockerd's manifest request to be held", SOON, || {
        if c.proxy.held() > 0 {
            Ok(())
        } else {
            Err("none held yet".to_string())
        }
    });
    let txn = c.kill();
    assert_eq!(txn["state"], "downloading", "{txn:#}");
    let pulled = c.proxy.reference("2.0.0");
    assert!(
        txn["pulled"]
            .as_array()
            .is_some_and(|p| p.iter().any(|r| r == pulled.as_str())),
        "the journal records the pull before it starts: {txn:#}"
    );
    // Nothing visible changed yet: the old container still runs alone.
    let running: Vec<String> = c.rig.running().into_iter().map(|c| c.name).collect();
    assert_eq!(running, vec![old.name.clone()]);

    c.proxy.hold(false);
    c.rig.agent.spawn();
    let end = c.rig.observer.wait_terminal(2, SLOW);
    assert_eq!(
        end.phase,
        Phase::Committed,
        "{end:?}\n{}",
        c.rig.observer.describe_events()
    );
    c.rig.agent.wait_log("resuming an interrupted update", SOON);
    // Redone from `verified`: verified and downloading are reported a second time.
    let phases = c.phases(2);
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
    let new = c.settled(2, Phase::Committed, "2.0.0", Duration::from_secs(2));
    assert_eq!(new.image, pulled);
    assert!(
        docker::inspect(&old.name).is_none(),
        "the old container is pruned"
    );
    timing("kill_during_pull_resumes_the_pull", t0);
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
/// still finish within `update.drain_gate_s` — commits, and exits 0 on one committed set. A
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
    // drain_gate_s (30 s by default) plus pruning the old container.
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
