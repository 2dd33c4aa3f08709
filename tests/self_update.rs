//! Ferry updates itself (issue 13), against the real agent binaries, mosquitto, dockerd and the
//! registry: the agent at the package's version (0.1.0) and the same source built as 0.1.1
//! (`scripts/build-agent-next.sh`), each shipped as a `FROM scratch` image holding one file.
//! - an agent release is staged through the content store, switched with one rename, and the
//!   agent restarts into it in the same process (exec): the new binary commits the update once
//!   it has reported, with its own version;
//! - a release whose binary exits at start (`/bin/false`, standing in for a broken build) is
//!   started three times by the launcher (the test restarts the process as systemd would), then
//!   the box goes back to 0.1.1 on its own and reports `rolled_back` with the reason;
//! - a downgrade without `allow_downgrade` is refused and changes nothing.

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

/// Push a `FROM scratch` image holding `binary` as `/ferry-agent`; its manifest digest.
fn push_agent_image(binary: &Path, tag: &str) -> String {
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

fn agent_release(version: &str, digest: &str) -> Release {
    Release {
        app: AGENT_APP.into(),
        version: version.parse().unwrap(),
        image: format!("{}/ferry/agent", infra::registry()),
        platforms: [(AMD64.to_string(), digest.to_string())].into(),
        container: ContainerSpec::default(),
        health: HealthSpec::default(),
        created_at: chrono::Utc::now(),
    }
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
    // A box with no apps, for this machine's platform: the agent is all that changes.
    let mut rig = Rig::builder("selfupdate")
        .agent(|b| {
            b.platform(Some(AMD64)).config(|t| {
                t["update"]
                    .as_table_mut()
                    .unwrap()
                    .insert("agent_confirm_s".into(), toml::Value::Integer(60));
            })
        })
        .start();
    rig.observer.wait_online("1", SLOW);
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
    wait_for("the state to report agent 0.1.1", SLOW, || {
        (agent_version(&rig).as_deref() == Some("0.1.1"))
            .then_some(())
            .ok_or(format!("{:?}", agent_version(&rig)))
    });
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

    // 3. 0.1.2 exits at start. systemd would restart it: so does this test, until the launcher
    //    has gone back to 0.1.1 on its own.
    rig.publish(
        &rig.desired(3)
            .app(AGENT_APP, sign(&agent_release("0.1.2", &d012)))
            .signed(&rig.keys),
    );
    let mut restarts = 0;
    let deadline = Instant::now() + SLOW;
    loop {
        assert!(Instant::now() < deadline, "{}", rig.agent.log());
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
        let done = rig
            .observer
            .events_for(3)
            .iter()
            .any(|e| e.phase == Phase::RolledBack);
        if done {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let end = rig.observer.wait_terminal(3, SLOW);
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
    wait_for("the state to report agent 0.1.1 again", SLOW, || {
        (agent_version(&rig).as_deref() == Some("0.1.1"))
            .then_some(())
            .ok_or(format!("{:?}", agent_version(&rig)))
    });
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
