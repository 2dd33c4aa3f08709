//! Ferry updates itself (issue 13), against the real agent binaries, mosquitto, dockerd and the
//! registry: the agent at the package's version (0.1.0) and the same source built as 0.1.1
//! (`scripts/build-agent-next.sh`), each shipped as a `FROM scratch` image holding one file.
//! - an agent release is staged through the content store, switched with one rename, and the
//!   agent restarts into it in the same process (exec): the new binary commits the update once
//!   it has reported, with its own version;
//! - a release whose binary exits at start (`/bin/false`, standing in for a broken build) is
//!   started three times by the launcher (the test restarts the process as systemd would), then
//!   the box goes back to 0.1.1 on its own and reports `rolled_back` with the reason;
//! - a downgrade without `allow_downgrade` is refused and changes nothing;
//! - a new agent that cannot reach the broker within `agent_confirm_timeout` exits; after three
//!   such starts the box is back on 0.1.0 on its own, with no network, and reports it once it can;
//! - a rollout of the agent through `ferryctl serve`, in a wave like an app's.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::infra::wait_for;
use common::*;
use ferry_protocol::release::{ContainerSpec, HealthSpec, AGENT_APP};
use ferry_protocol::{Phase, Release};

const AMD64: &str = "linux/amd64";

/// `target/selfupdate/ferry-agent-0.1.1`, next to the test's own agent binary.
fn next_agent() -> PathBuf {
    let own = Path::new(env!("CARGO_BIN_EXE_ferry-agent"));
    let p = own
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("selfupdate/ferry-agent-0.1.1");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/build-agent-next.sh (scripts/test.sh does)",
        p.display()
    );
    p
}

/// Push a `FROM scratch` image holding `binary` as `/ferry-agent`; its manifest digest. Once
/// per tag in this test binary (its tests run in parallel and share the tags).
fn push_agent_image(binary: &Path, tag: &str) -> String {
    static PUSHED: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());
    let mut pushed = PUSHED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, d)) = pushed.iter().find(|(t, _)| t == tag) {
        return d.clone();
    }
    let d = build_and_push(binary, tag);
    pushed.push((tag.to_string(), d.clone()));
    d
}

fn build_and_push(binary: &Path, tag: &str) -> String {
    let ctx = tempfile::tempdir().unwrap();
    std::fs::copy(binary, ctx.path().join("ferry-agent")).unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nCOPY ferry-agent /ferry-agent\n",
    )
    .unwrap();
    let image = format!("{}/ferry/agent:{tag}", infra::registry());
    let run = |args: &[&str]| {
        let out = Command::new("docker")
            .args(args)
            .env("DOCKER_BUILDKIT", "0")
            .output()
            .unwrap();
        assert!(out.status.success(), "docker {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&[
        "build",
        "-q",
        "--platform",
        AMD64,
        "-t",
        &image,
        ctx.path().to_str().unwrap(),
    ]);
    let pushed = run(&["push", &image]);
    let _ = run(&["rmi", &image]);
    pushed
        .split_whitespace()
        .skip_while(|w| *w != "digest:")
        .nth(1)
        .unwrap_or_else(|| panic!("no digest in: {pushed}"))
        .to_string()
}

/// Bytes of the agent image `digest` in the registry: manifest, config and layer.
fn image_bytes(digest: &str) -> u64 {
    let out = Command::new("curl")
        .args([
            "-fsS",
            "-H",
            "Accept: application/vnd.docker.distribution.manifest.v2+json",
            &format!(
                "http://{}/v2/ferry/agent/manifests/{digest}",
                infra::registry()
            ),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let layers: u64 = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .sum();
    out.stdout.len() as u64 + m["config"]["size"].as_u64().unwrap() + layers
}

fn agent_release(version: &str, digest: &str) -> Release {
    agent_release_from(
        &format!("{}/ferry/agent", infra::registry()),
        version,
        digest,
    )
}

fn agent_release_from(repo: &str, version: &str, digest: &str) -> Release {
    Release {
        app: AGENT_APP.into(),
        version: version.parse().unwrap(),
        image: repo.to_string(),
        platforms: [(AMD64.to_string(), digest.to_string())].into(),
        container: ContainerSpec::default(),
        health: HealthSpec::default(),
        created_at: chrono::Utc::now(),
    }
}

/// A box with no apps, for this machine's platform: the agent is all that changes.
fn amd64_rig(name: &str, confirm_s: u64) -> Rig {
    let rig = Rig::builder(name)
        .agent(move |b| {
            b.platform(Some(AMD64)).config(move |t| {
                t["update"].as_table_mut().unwrap().insert(
                    "agent_confirm_timeout".into(),
                    format!("{confirm_s}s").into(),
                );
            })
        })
        .start();
    rig.observer.wait_online("1", SLOW);
    rig
}

/// Play systemd's `Restart=on-failure` until `done` holds; the restarts made.
fn restart_until(rig: &mut Rig, what: &str, done: impl Fn(&Rig) -> bool) -> u32 {
    let mut restarts = 0;
    let deadline = Instant::now() + SLOW;
    while !done(rig) {
        assert!(Instant::now() < deadline, "{what}:\n{}", rig.agent.log());
        if let Some(st) = rig.agent.try_exit_status() {
            assert!(!st.success(), "{st:?}");
            restarts += 1;
            assert!(
                restarts <= 5,
                "restarted {restarts} times:\n{}",
                rig.agent.log()
            );
            rig.agent.spawn();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    restarts
}

/// Wait until the box's state reports agent `v`.
fn wait_agent_version(rig: &Rig, v: &str) {
    wait_for(&format!("the state to report agent {v}"), SLOW, || {
        (agent_version(rig).as_deref() == Some(v))
            .then_some(())
            .ok_or(format!("{:?}", agent_version(rig)))
    });
}

fn agent_version(rig: &Rig) -> Option<String> {
    rig.observer.last_state().map(|s| s.agent_version)
}

#[test]
fn the_agent_updates_itself_falls_back_from_a_broken_build_and_refuses_a_downgrade() {
    let t0 = Instant::now();
    let next = next_agent();
    let d011 = push_agent_image(&next, "0.1.1-test");
    let d012 = push_agent_image(Path::new("/bin/false"), "0.1.2-broken-test");
    let mut rig = amd64_rig("selfupdate", 60);
    assert_eq!(agent_version(&rig).as_deref(), Some("0.1.0"));
    let pid = rig.agent.pid().unwrap();
    let sign = |r: &Release| r.sign(&[&rig.keys.release.key]).to_json();

    // 1. 0.1.1: staged, switched, restarted into (the same process), committed by 0.1.1.
    let t1 = Instant::now();
    rig.publish(
        &rig.desired(1)
            .app(AGENT_APP, sign(&agent_release("0.1.1", &d011)))
            .signed(&rig.keys),
    );
    let end = rig.observer.wait_terminal(1, SLOW);
    let took = t1.elapsed();
    assert_eq!(
        end.phase,
        Phase::Committed,
        "{}",
        rig.observer.describe_events()
    );
    wait_agent_version(&rig, "0.1.1");
    assert_eq!(
        rig.agent.pid(),
        Some(pid),
        "the new agent runs in the same process (exec)"
    );
    assert!(rig.agent.is_running());
    let dir = rig.agent.state_dir().join("agent");
    assert_eq!(
        std::fs::read_link(dir.join("current")).unwrap(),
        Path::new("0.1.1")
    );
    assert!(
        !dir.join("trial.json").exists(),
        "committed: no longer on trial"
    );
    let fetched: u64 = rig
        .observer
        .events_for(1)
        .iter()
        .filter_map(|e| e.download.as_ref().map(|d| d.fetched_bytes))
        .max()
        .unwrap_or(0);
    let j = rig.agent.journal();
    assert_eq!(j["committed_sequence"], 1, "{j}");

    // 2. A downgrade without allow_downgrade: refused, nothing changes.
    rig.publish(
        &rig.desired(2)
            .app(AGENT_APP, sign(&agent_release("0.1.0", &d011)))
            .signed(&rig.keys),
    );
    let ev = rig.observer.wait_terminal(2, SLOW);
    assert_eq!(ev.phase, Phase::Rejected, "{ev:?}");
    assert!(
        ev.reason.as_deref().unwrap().contains("allow_downgrade"),
        "{ev:?}"
    );
    assert_eq!(
        std::fs::read_link(dir.join("current")).unwrap(),
        Path::new("0.1.1")
    );

    // A release for another platform only, and one signed by the controller key instead of
    // the release key: refused, nothing changes.
    let mut arm_only = agent_release("0.1.1", &d011);
    arm_only.platforms = [("linux/arm64".to_string(), d011.clone())].into();
    rig.publish(
        &rig.desired(3)
            .app(AGENT_APP, sign(&arm_only))
            .signed(&rig.keys),
    );
    let ev = rig.observer.wait_terminal(3, SLOW);
    assert_eq!(ev.phase, Phase::Rejected, "{ev:?}");
    assert!(ev.reason.as_deref().unwrap().contains(AMD64), "{ev:?}");
    let by_controller = agent_release("0.1.2", &d011)
        .sign(&[&rig.keys.controller.key])
        .to_json();
    // Its signature fails: the rejection carries no sequence (nothing verified says one).
    let rejections = || {
        rig.observer
            .events()
            .into_iter()
            .filter(|e| e.phase == Phase::Rejected)
            .count()
    };
    let before = rejections();
    rig.publish(
        &rig.desired(4)
            .app(AGENT_APP, by_controller)
            .signed(&rig.keys),
    );
    wait_for("the controller-signed release refused", SLOW, || {
        (rejections() > before)
            .then_some(())
            .ok_or_else(|| rig.observer.describe_events())
    });
    assert_eq!(
        std::fs::read_link(dir.join("current")).unwrap(),
        Path::new("0.1.1")
    );
    assert!(!dir.join("0.1.2").exists());

    // 3. 0.1.2 exits at start. systemd would restart it: so does this test, until the launcher
    //    has gone back to 0.1.1 on its own.
    rig.publish(
        &rig.desired(5)
            .app(AGENT_APP, sign(&agent_release("0.1.2", &d012)))
            .signed(&rig.keys),
    );
    let restarts = restart_until(&mut rig, "rolled_back for 0.1.2", |rig| {
        rig.observer
            .events_for(5)
            .iter()
            .any(|e| e.phase == Phase::RolledBack)
    });
    let end = rig.observer.wait_terminal(5, SLOW);
    assert_eq!(end.phase, Phase::RolledBack);
    let reason = end.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("0.1.2") && reason.contains("3 times"),
        "{reason}"
    );
    assert_eq!(restarts, 3, "three failed starts, then the fallback");
    assert_eq!(
        std::fs::read_link(dir.join("current")).unwrap(),
        Path::new("0.1.1")
    );
    wait_agent_version(&rig, "0.1.1");
    assert!(!dir.join("0.1.2").exists(), "the broken version is pruned");
    let j = rig.agent.journal();
    assert_eq!(j["committed_sequence"], 1, "{j}");
    assert!(j["txn"].is_null(), "{j}");
    eprintln!(
        "self-update: notice to 0.1.1 committed in {:.1} s, {fetched} bytes fetched; \
         broken 0.1.2: {restarts} failed starts then back to 0.1.1; total {:.1} s",
        took.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

/// The new agent runs but never reaches the broker (it went away during the download): each
/// start ends after `agent_confirm_timeout`, the launcher counts them, and the fourth start is the
/// packaged 0.1.0 again, decided on the box alone; it reports `rolled_back` once the broker is
/// back.
#[test]
fn a_new_agent_that_cannot_reach_the_broker_falls_back_without_the_network() {
    let next = next_agent();
    let digest = push_agent_image(&next, "0.1.1-test");
    let proxy = common::faultproxy::FaultProxy::registry();
    let mut rig = amd64_rig("selfupdate-nobroker", 3);
    // The registry is dark: the download waits (retrying), the box keeps its agent.
    proxy.dark(true);
    let rel = agent_release_from(&proxy.repo("ferry/agent"), "0.1.1", &digest);
    rig.publish(
        &rig.desired(1)
            .app(AGENT_APP, rel.sign(&[&rig.keys.release.key]).to_json())
            .signed(&rig.keys),
    );
    rig.observer
        .wait_event_where("a download retry", SLOW, |e| {
            e.sequence == 1 && e.waiting == Some(ferry_protocol::Waiting::Retrying)
        });
    // Now the broker goes, and the registry comes back: the switch happens with no broker.
    rig.broker.stop();
    proxy.dark(false);
    let dir = rig.agent.state_dir().join("agent");
    let restarts = restart_until(&mut rig, "the launcher to go back", |rig| {
        rig.agent.log().contains("going back to the previous agent")
            && rig.agent.journal()["txn"].is_null()
    });
    assert_eq!(restarts, 3, "{}", rig.agent.log());
    assert!(
        std::fs::read_link(dir.join("current")).is_err(),
        "back on the packaged binary"
    );
    assert!(rig.agent.is_running());
    let j = rig.agent.journal();
    assert_eq!(j["last_result"]["phase"], "rolled_back", "{j}");
    // The broker returns: the box says what happened, as 0.1.0.
    rig.broker.restart();
    // The events of the fallback may have gone before the observer was back: the retained
    // state says it.
    let st = rig.observer.wait_state(
        |s| {
            s.update
                .as_ref()
                .is_some_and(|u| u.sequence == 1 && u.phase == Phase::RolledBack)
        },
        SLOW,
    );
    let why = st.update.unwrap().error.unwrap_or_default();
    assert!(why.contains("3 times"), "{why}");
    wait_agent_version(&rig, "0.1.0");
}

/// `ferryctl rollout start --app ferry-agent`: the controller sends the agent release in a
/// wave like an app's; the box runs 0.1.1 and the controller sees it.
#[test]
fn a_rollout_of_the_agent_through_the_controller() {
    let next = next_agent();
    let digest = push_agent_image(&next, "0.1.1-test");
    let rig = amd64_rig("selfupdate-fleet", 60);
    let mut ctl = common::controller::TestController::build(&rig.broker, &rig.keys, "");
    ctl.spawn();
    ctl.wait_devices("the box known", SLOW, |v| {
        v.iter()
            .any(|d| d.id == rig.device && d.agent_version.as_deref() == Some("0.1.0"))
    });
    ctl.push_release(
        &agent_release("0.1.1", &digest)
            .sign(&[&rig.keys.release.key])
            .to_json(),
    );
    let select = format!("id={}", rig.device);
    let r = ctl.start_rollout(&[
        "--app",
        AGENT_APP,
        "--version",
        "0.1.1",
        "--select",
        &select,
        "--soak",
        "1s",
    ]);
    let done = ctl.wait_rollout(&r.id, "completed", SLOW, |v| v.state != "running");
    assert_eq!(done.state, "completed", "{done:?}\n{}", rig.agent.log());
    ctl.wait_devices("the box on 0.1.1", SLOW, |v| {
        v.iter()
            .any(|d| d.id == rig.device && d.agent_version.as_deref() == Some("0.1.1"))
    });
    assert_eq!(agent_version(&rig).as_deref(), Some("0.1.1"));
}

/// SIGKILL during the download of the agent image and again at the first start of the new
/// binary: each time one of the two binaries comes back (the test restarts it as systemd would),
/// the download resumes where it stopped (the layer is not fetched twice), and the update
/// commits with the journal intact.
#[test]
fn sigkill_during_the_download_and_at_the_first_start_of_the_new_agent() {
    let next = next_agent();
    let digest = push_agent_image(&next, "0.1.1-test");
    let proxy = common::faultproxy::FaultProxy::registry();
    // 1 MiB/s: the 7 MB layer takes seconds.
    proxy.throttle(Some(1024 * 1024));
    let mut rig = amd64_rig("selfupdate-kill", 60);
    let rel = agent_release_from(&proxy.repo("ferry/agent"), "0.1.1", &digest);
    rig.publish(
        &rig.desired(1)
            .app(AGENT_APP, rel.sign(&[&rig.keys.release.key]).to_json())
            .signed(&rig.keys),
    );
    rig.observer
        .wait_event_where("2 MB of the agent image", SLOW, |e| {
            e.sequence == 1 && e.phase == Phase::Downloading && e.bytes.unwrap_or(0) >= 2_000_000
        });
    rig.agent.kill();
    assert_eq!(rig.agent.journal()["txn"]["state"], "downloading");
    rig.agent.spawn();
    rig.agent.wait_log("resuming a blob", SLOW);
    // The broker goes before the switch: the new agent cannot confirm, so it is surely on trial
    // when it is killed.
    rig.broker.stop();
    proxy.throttle(None);
    wait_for("0.1.1 on trial", SLOW, || {
        let j = rig.agent.journal();
        (j["txn"]["state"] == "agent_trial")
            .then_some(())
            .ok_or(format!("{}", j["txn"]["state"]))
    });
    rig.agent.kill();
    // Back: the launcher starts 0.1.1 again (its second start on trial), which confirms.
    rig.broker.restart();
    rig.agent.spawn();
    // After the broker's restart the events may have gone before the observer was back: the
    // retained state says it.
    rig.observer.wait_state(
        |s| {
            s.update
                .as_ref()
                .is_some_and(|u| u.sequence == 1 && u.phase == Phase::Committed)
        },
        SLOW,
    );
    wait_agent_version(&rig, "0.1.1");
    let j = rig.agent.journal();
    assert_eq!(j["committed_sequence"], 1, "{j}");
    assert!(j["txn"].is_null(), "{j}");
    // Nothing fetched twice: what came through the proxy is the image once (its 3 blobs as the
    // first, uninterrupted test counts them), plus at most what was received but not yet made
    // durable when the agent was killed (`[download] sync_every_bytes`, 256 KiB) and HTTP
    // headers.
    let layer = std::fs::metadata(&next).map(|m| m.len()).unwrap_or(0);
    let down = proxy.bytes_down();
    let image = image_bytes(&digest);
    assert!(
        down < image + 256 * 1024 + 64 * 1024,
        "{down} bytes through the proxy for a {image}-byte image"
    );
    let resumed = proxy.requests().iter().any(|r| r.range.is_some());
    assert!(
        resumed,
        "the layer was resumed with a Range request: {}",
        proxy.describe()
    );
    eprintln!(
        "self-update kill -9: {down} bytes through the proxy for a {image}-byte image \
         (binary {layer} bytes)"
    );
}
