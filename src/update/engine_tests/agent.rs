//! The agent's own release inside a transaction (issue 13): staged with the download, switched
//! after the apps' gate, committed only by the new binary once it has reported; rolled back with
//! the apps when the launcher went back; refused as a downgrade.

use super::*;
use crate::selfupdate::layout::{AgentDir, Fallback};
use ferry_protocol::release::AGENT_APP;

fn agent_release(version: &str) -> Release {
    Release {
        app: AGENT_APP.into(),
        version: version.parse().unwrap(),
        image: "127.0.0.1:5055/ferry/agent".into(),
        platforms: [(PLATFORM.to_string(), digest(AGENT_APP, version))].into(),
        container: ContainerSpec::default(),
        health: HealthSpec::default(),
        created_at: Utc::now(),
    }
}

/// `sensor` at `sensor_v` and the agent at `agent_v`.
fn notice_with_agent(fx: &Fx, seq: u64, sensor_v: &str, agent_v: &str, downgrade: bool) -> Vec<u8> {
    let apps = [
        ("sensor".to_string(), release("sensor", sensor_v)),
        (AGENT_APP.to_string(), agent_release(agent_v)),
    ]
    .into_iter()
    .map(|(a, r)| (a, embed_release(&r.sign(&[&fx.rk]).to_json()).unwrap()))
    .collect();
    Desired {
        settings: Default::default(),
        force: false,
        device: DEV.into(),
        sequence: seq,
        issued_at: Utc::now(),
        expires_at: Utc::now() + chrono::Duration::days(1),
        apps,
        strategy: Strategy::StopFirst,
        allow_downgrade: downgrade,
        rollout: Some("r-agent".into()),
    }
    .sign(&[&fx.ck])
    .to_json()
    .into_bytes()
}

fn v(s: &str) -> semver::Version {
    s.parse().unwrap()
}

/// The engine as the binary of `version` would run it (installed under the state dir when it is
/// not the packaged 0.1.0).
fn engine_as(fx: &Fx, version: &str) -> Eng {
    let mut cfg = fx.config();
    cfg.agent_version = v(version);
    if version != "0.1.0" {
        cfg.agent_exe = AgentDir::new(fx.dir.path()).binary(&v(version));
    }
    fx.engine_with(cfg)
}

/// Up to the restart: 0.1.0 accepts sequence 2 (sensor 2.0.0 and agent 0.1.1), stages the
/// binary, switches the sensor, gates it, makes 0.1.1 current on trial and asks to restart.
async fn switched_to_0_1_1(fx: &Fx) {
    let mut e = engine_as(fx, "0.1.0");
    committed_v1(fx, &mut e).await;
    let r = e
        .handle_notice(&notice_with_agent(fx, 2, "2.0.0", "0.1.1", false), &fx.stop)
        .await;
    assert!(
        matches!(r, Err(EngineError::Restart(ref to)) if *to == v("0.1.1")),
        "{r:?}"
    );
    assert_eq!(fx.src.agent_fetches.load(Ordering::SeqCst), 1);
    let dir = AgentDir::new(fx.dir.path());
    assert_eq!(dir.current(), Some(v("0.1.1")));
    let trial = dir.trial().unwrap();
    assert_eq!((trial.from, trial.sequence), (v("0.1.0"), 2));
    let txn = e.journal().txn.clone().unwrap();
    assert_eq!(txn.state, State::AgentSwitching);
    assert_eq!(
        fx.running(),
        vec![name("sensor", 2)],
        "the apps switched first"
    );
    assert!(
        !fx.out
            .events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.phase == Phase::Committed),
        "nothing is committed before the new agent confirms"
    );
}

#[tokio::test(start_paused = true)]
async fn the_new_agent_commits_the_update_once_it_confirms() {
    let fx = Fx::new();
    switched_to_0_1_1(&fx).await;
    // The launcher started 0.1.1: on trial until it has reported.
    let mut e = engine_as(&fx, "0.1.1");
    e.recover(&fx.stop).await.unwrap();
    assert!(e.awaiting_agent_confirm());
    assert_eq!(e.journal().txn.as_ref().unwrap().state, State::AgentTrial);
    // A restart during the trial (the launcher counts it) stays on trial.
    let mut e = engine_as(&fx, "0.1.1");
    e.recover(&fx.stop).await.unwrap();
    assert!(e.awaiting_agent_confirm());
    e.confirm_agent(&fx.stop).await.unwrap();
    assert!(!e.awaiting_agent_confirm());
    let last = fx.last_event();
    assert_eq!((last.sequence, last.phase), (2, Phase::Committed));
    assert_eq!(e.journal().committed_sequence, 2);
    assert_eq!(e.journal().committed["sensor"].release.version, v("2.0.0"));
    assert!(!e.journal().committed.contains_key(AGENT_APP));
    let dir = AgentDir::new(fx.dir.path());
    assert_eq!(dir.trial(), None);
    assert_eq!(dir.current(), Some(v("0.1.1")));
    // The same notice's agent version is now the running one: nothing to do for it.
    assert_eq!(fx.running(), vec![name("sensor", 2)]);
}

#[tokio::test(start_paused = true)]
async fn when_the_launcher_goes_back_the_old_agent_rolls_the_apps_back() {
    let fx = Fx::new();
    switched_to_0_1_1(&fx).await;
    // 0.1.1 never confirmed: the launcher went back to the packaged 0.1.0.
    let dir = AgentDir::new(fx.dir.path());
    dir.fall_back(&Fallback {
        version: v("0.1.1"),
        back_to: v("0.1.0"),
        sequence: 2,
        reason: "agent 0.1.1 was started 3 times without confirming".into(),
    })
    .unwrap();
    let mut e = engine_as(&fx, "0.1.0");
    e.recover(&fx.stop).await.unwrap();
    let last = fx.last_event();
    assert_eq!((last.sequence, last.phase), (2, Phase::RolledBack));
    assert!(
        last.reason.as_deref().unwrap().contains("3 times"),
        "{last:?}"
    );
    assert_eq!(
        fx.running(),
        vec![name("sensor", 1)],
        "the apps went back too"
    );
    assert_eq!(e.journal().committed_sequence, 1);
    assert!(e.journal().txn.is_none());
    assert_eq!(dir.fallback(), None, "reported once");
    assert!(
        !dir.binary(&v("0.1.1")).exists(),
        "the failed version is pruned"
    );
}

#[tokio::test(start_paused = true)]
async fn an_agent_downgrade_needs_allow_downgrade_and_the_same_version_is_no_agent_step() {
    let fx = Fx::new();
    let mut e = engine_as(&fx, "0.1.0");
    committed_v1(&fx, &mut e).await;
    e.handle_notice(
        &notice_with_agent(&fx, 2, "1.0.0", "0.0.9", false),
        &fx.stop,
    )
    .await
    .unwrap();
    let last = fx.last_event();
    assert_eq!(last.phase, Phase::Rejected);
    assert!(
        last.reason.as_deref().unwrap().contains("allow_downgrade"),
        "{last:?}"
    );
    assert_eq!(AgentDir::new(fx.dir.path()).current(), None);
    // The running version named: an ordinary update.
    e.handle_notice(
        &notice_with_agent(&fx, 3, "2.0.0", "0.1.0", false),
        &fx.stop,
    )
    .await
    .unwrap();
    assert_eq!(fx.last_event().phase, Phase::Committed);
    assert_eq!(fx.src.agent_fetches.load(Ordering::SeqCst), 0);
}
