//! A newer notice taking an update over, the retry pause, the wait for a maintenance window
//! and for an app's update lock, and `force`.

use super::*;

/// Run `handle_notice(raw)` in the background; returns the engine when it is done.
fn spawn_notice(
    mut e: Eng,
    raw: Vec<u8>,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<(Eng, Result<(), EngineError>)> {
    tokio::spawn(async move {
        let r = e.handle_notice(&raw, &stop).await;
        (e, r)
    })
}

async fn wait_event(fx: &Fx, what: &str, pred: impl Fn(&ferry_protocol::Event) -> bool) {
    for _ in 0..10_000 {
        if fx.out.events.lock().unwrap().iter().any(&pred) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no event {what}: {:#?}", fx.out.events.lock().unwrap());
}

#[tokio::test(start_paused = true)]
async fn a_newer_notice_takes_over_a_download_at_once() {
    let fx = Fx::new();
    let mut e = fx.engine();
    committed_v1(&fx, &mut e).await;
    *fx.src.slow.lock().unwrap() = Some(Duration::from_secs(3600));
    let inbox = e.inbox();
    let t0 = tokio::time::Instant::now();
    let run = spawn_notice(
        e,
        fx.notice(2, Strategy::StopFirst, &[("sensor", "2.0.0")]),
        fx.stop.clone(),
    );
    wait_event(&fx, "downloading 2", |e| {
        e.sequence == 2 && e.phase == Phase::Downloading
    })
    .await;
    // A rejected notice (an older sequence) changes nothing: the download goes on.
    inbox.put(fx.notice(1, Strategy::StopFirst, &[("sensor", "3.0.0")]));
    wait_event(&fx, "rejected", |e| e.phase == Phase::Rejected).await;
    assert!(!fx.out.phases().contains(&Phase::Superseded));
    // The same notice again (a retained copy): nothing.
    inbox.put(fx.notice(2, Strategy::StopFirst, &[("sensor", "2.0.0")]));
    // A newer one takes over.
    *fx.src.slow.lock().unwrap() = None;
    inbox.put(fx.notice(
        3,
        Strategy::StopFirst,
        &[("sensor", "3.0.0"), ("other", "1.0.0")],
    ));
    let (e, r) = run.await.unwrap();
    r.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
    let events = fx.out.events.lock().unwrap().clone();
    let sup = events
        .iter()
        .find(|e| e.phase == Phase::Superseded)
        .expect("a superseded event");
    assert_eq!(sup.sequence, 2);
    assert!(
        sup.reason.as_deref().unwrap().contains("sequence 3"),
        "{sup:?}"
    );
    assert!(!events
        .iter()
        .any(|e| e.sequence == 2 && matches!(e.phase, Phase::Switching | Phase::Failed)));
    // Sequence 3 ran to its end (3.0.0 is the unhealthy sample: rolled back to 1.0.0).
    assert_eq!(fx.last_event().sequence, 3);
    assert_eq!(fx.last_event().phase, Phase::RolledBack);
    assert_eq!(e.journal().last_sequence, 3);
    assert_eq!(fx.running(), vec![name("sensor", 1)]);
    let rejected: Vec<_> = events
        .iter()
        .filter(|e| e.phase == Phase::Rejected)
        .collect();
    assert_eq!(rejected.len(), 1, "the duplicate is silent: {events:#?}");
}

#[tokio::test(start_paused = true)]
async fn stop_during_a_retry_pause_leaves_a_resumable_journal() {
    let fx = Fx::new();
    let (tx, rx) = watch::channel(false);
    let e = fx.engine();
    fx.src.fail_next(transient("connection refused"));
    let run = spawn_notice(
        e,
        fx.notice(1, Strategy::StopFirst, &[("sensor", "1.0.0")]),
        rx,
    );
    wait_event(&fx, "retrying", |e| {
        e.waiting == Some(ferry_protocol::Waiting::Retrying)
    })
    .await;
    tx.send(true).unwrap();
    let (e, r) = run.await.unwrap();
    assert!(
        matches!(r, Err(EngineError::Interrupted(State::Downloading))),
        "{r:?}"
    );
    assert_eq!(e.journal().txn.as_ref().unwrap().state, State::Downloading);
    drop(e);
    let mut e = fx.engine();
    e.recover(&fx.stop).await.unwrap();
    assert_eq!(fx.running(), vec![name("sensor", 1)]);
}

/// 1.0.0 committed by an engine without windows, then an engine with `cfg` on that journal.
async fn committed_then(fx: &Fx, cfg: EngineConfig) -> Eng {
    let mut e = fx.engine();
    committed_v1(fx, &mut e).await;
    drop(e);
    fx.engine_with(cfg)
}

fn window_from_now(ahead: chrono::Duration, len: chrono::Duration) -> Window {
    let now = chrono::Local::now().time();
    let (a, b) = (now + ahead, now + ahead + len);
    format!("{}-{}", a.format("%H:%M:%S"), b.format("%H:%M:%S"))
        .parse()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn the_switch_waits_for_a_maintenance_window() {
    let fx = Fx::new();
    let mut cfg = fx.config();
    // Opens in two hours.
    cfg.windows = vec![window_from_now(
        chrono::Duration::hours(2),
        chrono::Duration::hours(1),
    )];
    let e = committed_then(&fx, cfg).await;
    let (tx, rx) = watch::channel(false);
    let run = spawn_notice(
        e,
        fx.notice(2, Strategy::StopFirst, &[("sensor", "2.0.0")]),
        rx,
    );
    wait_event(&fx, "waiting for the window", |e| {
        e.phase == Phase::Downloaded && e.waiting == Some(ferry_protocol::Waiting::Window)
    })
    .await;
    let ev = fx.last_event();
    assert!(
        ev.reason
            .as_deref()
            .unwrap()
            .contains("opens in 1 h 59 min")
            || ev
                .reason
                .as_deref()
                .unwrap()
                .contains("opens in 2 h 00 min"),
        "{ev:?}"
    );
    // Nothing was touched; the state says what it waits for.
    assert_eq!(fx.running(), vec![name("sensor", 1)]);
    assert_eq!(fx.rt.call_count("create"), 0);
    let st = fx.out.states.lock().unwrap().last().cloned().unwrap();
    let u = st.update.unwrap();
    assert_eq!(
        (u.phase, u.waiting),
        (Phase::Downloaded, Some(ferry_protocol::Waiting::Window))
    );
    // Waiting goes on (virtual minutes pass), reported once.
    tokio::time::sleep(Duration::from_secs(600)).await;
    let waits = fx
        .out
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.waiting == Some(ferry_protocol::Waiting::Window))
        .count();
    assert_eq!(waits, 1);
    tx.send(true).unwrap();
    let (_, r) = run.await.unwrap();
    assert!(
        matches!(r, Err(EngineError::Interrupted(State::Downloaded))),
        "{r:?}"
    );
    assert_eq!(fx.running(), vec![name("sensor", 1)]);
}

#[tokio::test(start_paused = true)]
async fn an_open_window_switches_at_once() {
    let fx = Fx::new();
    let mut cfg = fx.config();
    cfg.windows = vec![window_from_now(
        -chrono::Duration::minutes(10),
        chrono::Duration::hours(1),
    )];
    let mut e = fx.engine_with(cfg);
    committed_v1(&fx, &mut e).await;
    e.handle_notice(
        &fx.notice(2, Strategy::StopFirst, &[("sensor", "2.0.0")]),
        &fx.stop,
    )
    .await
    .unwrap();
    assert_eq!(fx.last_event().phase, Phase::Committed);
    assert!(!fx
        .out
        .events
        .lock()
        .unwrap()
        .iter()
        .any(|e| e.waiting.is_some()));
}

#[tokio::test(start_paused = true)]
async fn a_newer_notice_takes_over_while_waiting_for_the_window() {
    let fx = Fx::new();
    let mut cfg = fx.config();
    cfg.windows = vec![window_from_now(
        chrono::Duration::hours(2),
        chrono::Duration::hours(1),
    )];
    let e = committed_then(&fx, cfg).await;
    let inbox = e.inbox();
    let (tx, rx) = watch::channel(false);
    let run = spawn_notice(
        e,
        fx.notice(2, Strategy::StopFirst, &[("sensor", "2.0.0")]),
        rx,
    );
    wait_event(&fx, "waiting", |e| e.waiting.is_some()).await;
    inbox.put(fx.notice(
        3,
        Strategy::StopFirst,
        &[("sensor", "2.0.0"), ("other", "1.0.0")],
    ));
    wait_event(&fx, "superseded", |e| e.phase == Phase::Superseded).await;
    // Sequence 3 shares 2.0.0 with sequence 2: its image stays in the engine.
    assert!(fx
        .rt
        .local_images()
        .iter()
        .any(|i| i.id == image_id("sensor", "2.0.0")));
    wait_event(&fx, "3 waits too", |e| {
        e.sequence == 3 && e.waiting == Some(ferry_protocol::Waiting::Window)
    })
    .await;
    tx.send(true).unwrap();
    let (_, r) = run.await.unwrap();
    assert!(matches!(
        r,
        Err(EngineError::Interrupted(State::Downloaded))
    ));
}

fn locked_fx() -> (Fx, EngineConfig, tempfile::TempDir) {
    let fx = Fx::new();
    let locks = tempfile::tempdir().unwrap();
    let mut cfg = fx.config();
    cfg.lock_root = Some(locks.path().to_path_buf());
    cfg.max_lock = Duration::from_secs(30);
    (fx, cfg, locks)
}

#[tokio::test(start_paused = true)]
async fn the_switch_waits_for_the_update_lock_and_reports_a_long_one_once() {
    let (fx, cfg, locks) = locked_fx();
    let mut e = fx.engine_with(cfg);
    committed_v1(&fx, &mut e).await;
    // The running app's container binds its lock directory.
    let c = fx.rt.container(&name("sensor", 1)).unwrap();
    assert!(
        c.config
            .binds
            .iter()
            .any(|b| b.container == lock::CONTAINER_DIR
                && b.host == locks.path().join("sensor").display().to_string()),
        "{:?}",
        c.config.binds
    );
    // The app takes its lock (an hour ago: past max_lock_hold).
    let lock_file = locks.path().join("sensor").join(lock::LOCK_FILE);
    std::fs::write(&lock_file, b"").unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&lock_file)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let run = spawn_notice(
        e,
        fx.notice(2, Strategy::StopFirst, &[("sensor", "2.0.0")]),
        fx.stop.clone(),
    );
    wait_event(&fx, "waiting for the lock", |e| {
        e.phase == Phase::Downloaded && e.waiting == Some(ferry_protocol::Waiting::Lock)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    let waits: Vec<_> = fx
        .out
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.waiting == Some(ferry_protocol::Waiting::Lock))
        .cloned()
        .collect();
    assert_eq!(waits.len(), 1, "{waits:#?}");
    let reason = waits[0].reason.clone().unwrap();
    assert!(
        reason.contains("sensor holds its update lock (/run/ferry/updates.lock)")
            && reason.contains("more than max_lock_hold (30 s)"),
        "{reason}"
    );
    assert_eq!(fx.running(), vec![name("sensor", 1)], "nothing stopped");
    // The app lets go: the switch happens.
    std::fs::remove_file(&lock_file).unwrap();
    let (_, r) = run.await.unwrap();
    r.unwrap();
    assert_eq!(fx.last_event().phase, Phase::Committed);
    assert_eq!(fx.running(), vec![name("sensor", 2)]);
}

#[tokio::test(start_paused = true)]
async fn force_ignores_the_lock() {
    let (fx, cfg, locks) = locked_fx();
    let mut e = fx.engine_with(cfg);
    committed_v1(&fx, &mut e).await;
    std::fs::write(locks.path().join("sensor").join(lock::LOCK_FILE), b"").unwrap();
    let mut d: Desired = serde_json::from_slice(
        &ferry_protocol::dsse::verify(
            &fx.notice(2, Strategy::StopFirst, &[("sensor", "2.0.0")]),
            ferry_protocol::dsse::Expect::desired(),
            &TrustedKeys::new([fx.ck.public().clone()]),
        )
        .unwrap()
        .body,
    )
    .unwrap();
    d.force = true;
    let raw = d.sign(&[&fx.ck]).to_json().into_bytes();
    e.handle_notice(&raw, &fx.stop).await.unwrap();
    assert_eq!(fx.last_event().phase, Phase::Committed);
    assert_eq!(fx.running(), vec![name("sensor", 2)]);
    assert!(e.journal().last_result.is_some());
}
