//! Recovery from every journaled state (an agent killed in it), the health gate's bound across
//! restarts, and rollbacks that cannot finish: backoff, SIGTERM, and yielding to a newer notice.

use super::*;

/// Leave the box as an agent killed in `state` of the 1.0.0 → 2.0.0 update would: the journal
/// with the open transaction, and — when the switch had begun — the new container running and
/// the old one stopped with its restart policy cleared. Returns a freshly started engine.
async fn crashed_in(fx: &Fx, state: State) -> Eng {
    let mut e = fx.engine();
    committed_v1(fx, &mut e).await;
    let mut j = e.journal().clone();
    let mut target = j.committed.clone();
    {
        let d = target.get_mut("sensor").unwrap();
        d.release = release("sensor", "2.0.0");
        d.digest = digest("sensor", "2.0.0");
        d.reference = reference("sensor", "2.0.0");
        d.container = name("sensor", 2);
    }
    let switched = matches!(state, State::Switching | State::HealthChecking);
    if switched {
        fx.rt
            .pull(&reference("sensor", "2.0.0"), PLATFORM, None, &|_| {})
            .await
            .unwrap();
        target.get_mut("sensor").unwrap().image_id = Some(image_id("sensor", "2.0.0"));
        let cfg = swap::container_config(&e.placement(), 2, &target["sensor"]);
        fx.rt.create(&cfg).await.unwrap();
        fx.rt.start(&cfg.name).await.unwrap();
        let old = name("sensor", 1);
        fx.rt
            .set_restart_policy(&old, RestartPolicy::No)
            .await
            .unwrap();
        fx.rt.stop(&old, Duration::from_secs(1)).await.unwrap();
    }
    let marks = |on: bool| -> std::collections::BTreeSet<String> {
        if on {
            ["sensor".to_string()].into()
        } else {
            Default::default()
        }
    };
    j.last_sequence = 2;
    j.txn = Some(Txn {
        sequence: 2,
        rollout: None,
        strategy: Strategy::StopFirst,
        state,
        target,
        created: marks(switched),
        stopped_old: marks(switched),
        pulled: if switched {
            [image_id("sensor", "2.0.0")].into()
        } else {
            Default::default()
        },
        force: false,
        gate_runs: 0,
        agent: None,
        error: None,
        logs: None,
        started_at: Utc::now(),
    });
    JournalStore::new(fx.dir.path()).save(&j).unwrap();
    drop(e);
    fx.engine()
}

#[tokio::test(start_paused = true)]
async fn recovery_from_an_interrupted_switch_restores_the_old_set() {
    let fx = Fx::new();
    let mut e = crashed_in(&fx, State::Switching).await;
    e.recover(&fx.stop).await.unwrap();
    assert_eq!(fx.running(), vec![name("sensor", 1)]);
    assert!(fx.rt.container(&name("sensor", 2)).is_none());
    let j = e.journal();
    assert!(j.txn.is_none());
    assert_eq!(j.committed["sensor"].release.version.to_string(), "1.0.0");
    let last = j.last_result.as_ref().unwrap();
    assert_eq!(last.phase, Phase::RolledBack);
    assert!(last
        .error
        .as_deref()
        .unwrap()
        .contains("restarted during the switch"));
    assert_eq!(
        fx.rt.container(&name("sensor", 1)).unwrap().restart_policy,
        RestartPolicy::UnlessStopped
    );
}

#[tokio::test(start_paused = true)]
async fn recovery_resumes_a_health_gate_and_commits() {
    let fx = Fx::new();
    let mut e = crashed_in(&fx, State::HealthChecking).await;
    e.recover(&fx.stop).await.unwrap();
    assert_eq!(fx.running(), vec![name("sensor", 2)]);
    assert!(
        fx.rt.container(&name("sensor", 1)).is_none(),
        "old pruned after commit"
    );
    assert_eq!(
        e.journal().committed["sensor"].release.version.to_string(),
        "2.0.0"
    );
}

/// A gate cut short by a crash runs again, and each start is journaled first; after
/// MAX_GATE_RUNS starts without a verdict the release is rolled back instead.
#[tokio::test(start_paused = true)]
async fn a_health_gate_interrupted_again_and_again_ends_in_a_rollback() {
    let fx = Fx::new();
    let e = crashed_in(&fx, State::HealthChecking).await;
    drop(e);
    // Two earlier starts of the gate, both cut short: one more run is allowed, and it is
    // journaled before it starts.
    let store = JournalStore::new(fx.dir.path());
    let mut j = store.load().unwrap();
    j.txn.as_mut().unwrap().gate_runs = 2;
    store.save(&j).unwrap();
    let mut e = fx.engine();
    e.recover(&fx.stop).await.unwrap();
    assert_eq!(
        e.journal().committed["sensor"].release.version.to_string(),
        "2.0.0",
        "the third run reached a verdict"
    );

    // Three starts without a verdict: taken as unhealthy, the old set comes back.
    let fx = Fx::new();
    let e = crashed_in(&fx, State::HealthChecking).await;
    drop(e);
    let store = JournalStore::new(fx.dir.path());
    let mut j = store.load().unwrap();
    j.txn.as_mut().unwrap().gate_runs = MAX_GATE_RUNS;
    store.save(&j).unwrap();
    let mut e = fx.engine();
    e.recover(&fx.stop).await.unwrap();
    assert_eq!(fx.running(), vec![name("sensor", 1)]);
    let j = e.journal();
    assert_eq!(j.committed["sensor"].release.version.to_string(), "1.0.0");
    let last = j.last_result.as_ref().unwrap();
    assert_eq!(last.phase, Phase::RolledBack);
    assert!(
        last.error
            .as_deref()
            .unwrap()
            .contains("started 3 times without a verdict"),
        "{last:?}"
    );
}

/// The count is on disk before the gate starts (a crash during the gate leaves it counted).
#[tokio::test(start_paused = true)]
async fn a_gate_start_is_journaled_before_the_gate_runs() {
    let fx = Fx::new();
    let e = crashed_in(&fx, State::HealthChecking).await;
    drop(e);
    // The gate takes (paused, virtual) seconds; meanwhile the journal on disk says one run
    // has started.
    let mut e = fx.engine();
    let stop = fx.stop.clone();
    let task = tokio::spawn(async move {
        let _ = e.recover(&stop).await;
        e
    });
    let store = JournalStore::new(fx.dir.path());
    let mut runs = 0;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        runs = store.load().unwrap().txn.map_or(0, |t| t.gate_runs);
        if runs > 0 {
            break;
        }
    }
    assert_eq!(runs, 1);
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn recovery_resumes_an_interrupted_download() {
    for state in [State::Verified, State::Downloading, State::Downloaded] {
        let fx = Fx::new();
        let mut e = crashed_in(&fx, state).await;
        e.recover(&fx.stop).await.unwrap();
        assert_eq!(fx.running(), vec![name("sensor", 2)], "{state:?}");
        assert_eq!(e.journal().committed_sequence, 2);
    }
}

#[tokio::test(start_paused = true)]
async fn recovery_finishes_an_interrupted_rollback() {
    let fx = Fx::new();
    let mut e = crashed_in(&fx, State::RollingBack).await;
    e.recover(&fx.stop).await.unwrap();
    assert_eq!(fx.running(), vec![name("sensor", 1)]);
    assert_eq!(
        e.journal().last_result.as_ref().unwrap().phase,
        Phase::RolledBack
    );
}

/// Issue 10: a rollback whose steps keep failing retried every 2 s forever, re-journaling each
/// time, and ignored SIGTERM. Now: capped backoff, one `rollback_failed` event with the reason,
/// the journal untouched, and a stop request ends it at once (resumed at the next start).
#[tokio::test(start_paused = true)]
async fn a_rollback_that_keeps_failing_backs_off_reports_once_and_stops_on_sigterm() {
    let fx = Fx::new();
    let mut e = crashed_in(&fx, State::RollingBack).await;
    let journal = fx.dir.path().join("journal.json");
    fx.rt.set_unreachable(true);
    let (tx, rx) = watch::channel(false);
    {
        let run = e.recover(&rx);
        tokio::pin!(run);
        tokio::select! {
            r = &mut run => panic!("the rollback ended: {r:?}"),
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        let written = std::fs::metadata(&journal).unwrap().modified().unwrap();
        tokio::select! {
            r = &mut run => panic!("the rollback ended: {r:?}"),
            _ = tokio::time::sleep(Duration::from_secs(3540)) => {}
        }
        // An hour of failures: without backoff (10 ms here, 2 s on a box) ~360,000 attempts.
        let calls = fx.rt.calls().len();
        assert!(
            (10..200).contains(&calls),
            "{calls} engine calls in an hour"
        );
        let failed: Vec<_> = fx
            .out
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.phase == Phase::RollbackFailed)
            .cloned()
            .collect();
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].sequence, 2);
        assert!(
            failed[0]
                .reason
                .as_deref()
                .unwrap()
                .contains("rollback step failed"),
            "{failed:?}"
        );
        assert_eq!(
            std::fs::metadata(&journal).unwrap().modified().unwrap(),
            written,
            "the journal is not rewritten by the retries"
        );
        tx.send(true).unwrap();
        let r = tokio::time::timeout(Duration::from_secs(1), run)
            .await
            .expect("a stop request ends the retries at once");
        assert!(
            matches!(r, Err(EngineError::Interrupted(State::RollingBack))),
            "{r:?}"
        );
    }
    assert_eq!(e.journal().txn.as_ref().unwrap().state, State::RollingBack);
    // The engine is back: the next start finishes the rollback.
    fx.rt.set_unreachable(false);
    let mut e = fx.engine();
    e.recover(&fx.stop).await.unwrap();
    assert_eq!(fx.running(), vec![name("sensor", 1)]);
    assert_eq!(fx.last_event().phase, Phase::RolledBack);
}

/// Issue 10: a rollback that keeps failing waited for the engine forever and ignored newer
/// notices. Now a newer verified notice takes over: the stuck update ends `failed` naming why, and
/// the newer one starts from the committed set. An older or forged notice changes nothing.
#[tokio::test(start_paused = true)]
async fn a_failing_rollback_yields_to_a_newer_notice() {
    let fx = Fx::new();
    let mut e = crashed_in(&fx, State::RollingBack).await;
    // The committed set cannot come back: its container and its image are gone.
    fx.rt.remove(&name("sensor", 1)).await.unwrap();
    fx.rt
        .remove_image(&image_id("sensor", "1.0.0"))
        .await
        .unwrap();
    let inbox = e.inbox();
    let forged = PrivateKey::from_seed([9; 32]).unwrap();
    {
        let run = e.recover(&fx.stop);
        tokio::pin!(run);
        tokio::select! {
            r = &mut run => panic!("the rollback ended: {r:?}"),
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        // Neither a replay of an older sequence nor a forged newer one takes it over.
        inbox.put(fx.notice(1, Strategy::StopFirst, &[("sensor", "1.0.0")]));
        tokio::select! {
            r = &mut run => panic!("an older notice ended the rollback: {r:?}"),
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        inbox.put(fx.notice_by(&forged, 3, Strategy::StopFirst, &[("sensor", "1.0.0")]));
        tokio::select! {
            r = &mut run => panic!("a forged notice ended the rollback: {r:?}"),
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        assert_eq!(e_phases(&fx, 2).last(), Some(&Phase::RollbackFailed));
        inbox.put(fx.notice(3, Strategy::StopFirst, &[("sensor", "1.0.0")]));
        tokio::time::timeout(Duration::from_secs(600), run)
            .await
            .expect("the newer notice ends the stuck rollback")
            .unwrap();
    }
    let ev = fx.out.events.lock().unwrap().clone();
    let two: Vec<_> = ev.iter().filter(|e| e.sequence == 2).collect();
    let end = two.last().unwrap();
    assert_eq!(end.phase, Phase::Failed, "{two:?}");
    let reason = end.reason.as_deref().unwrap();
    assert!(
        reason.contains("rollback step failed") && reason.contains("sequence 3"),
        "{reason}"
    );
    assert_eq!(
        two.iter()
            .filter(|e| e.phase == Phase::RollbackFailed)
            .count(),
        1
    );
    // The newer notice brought the image again and committed.
    assert_eq!(fx.last_event().sequence, 3);
    assert_eq!(fx.last_event().phase, Phase::Committed);
    assert_eq!(fx.running(), vec![name("sensor", 3)]);
    assert_eq!(e.journal().committed_sequence, 3);
    assert!(e.journal().txn.is_none());
}

fn e_phases(fx: &Fx, seq: u64) -> Vec<Phase> {
    fx.out
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.sequence == seq)
        .map(|e| e.phase)
        .collect()
}
