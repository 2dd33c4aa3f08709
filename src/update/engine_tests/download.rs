//! The download phase against the fake source: permanent errors fail at once, transient ones
//! are retried without limit with backoff and reported `retrying`.

use super::*;

#[tokio::test(start_paused = true)]
async fn a_permanent_download_error_fails_at_once_and_changes_nothing() {
    let fx = Fx::new();
    let mut e = fx.engine();
    committed_v1(&fx, &mut e).await;
    let releases = fx.src.releases.load(Ordering::SeqCst);
    fx.src.fail_next(DownloadError::DigestMismatch {
        image: "127.0.0.1:5055/ferry/sensor@sha256:m".into(),
        digest: "sha256:layer".into(),
        actual: "sha256:other".into(),
    });
    e.handle_notice(
        &fx.notice(2, Strategy::StopFirst, &[("sensor", "2.0.0")]),
        &fx.stop,
    )
    .await
    .unwrap();
    let ev = fx.last_event();
    assert_eq!(ev.phase, Phase::Failed);
    assert!(ev.reason.unwrap().contains("blob sha256:layer"));
    assert_eq!(
        fx.src.attempts.load(Ordering::SeqCst),
        2,
        "one attempt each"
    );
    assert!(!fx.out.phases().contains(&Phase::Downloaded));
    assert_eq!(fx.rt.call_count("create"), 0);
    assert_eq!(fx.rt.call_count("stop"), 0);
    assert_eq!(fx.running(), vec![name("sensor", 1)]);
    // The store is told the update ended (its partial files go).
    assert_eq!(fx.src.releases.load(Ordering::SeqCst), releases + 1);
}

#[tokio::test(start_paused = true)]
async fn a_network_blip_is_retried_with_backoff_and_never_fails() {
    let fx = Fx::new();
    let mut e = fx.engine();
    for what in [
        "connection refused",
        "stalled: no data for 30 s",
        "HTTP 503",
    ] {
        fx.src.fail_next(transient(what));
    }
    let t0 = tokio::time::Instant::now();
    e.handle_notice(
        &fx.notice(1, Strategy::StopFirst, &[("sensor", "1.0.0")]),
        &fx.stop,
    )
    .await
    .unwrap();
    assert_eq!(fx.last_event().phase, Phase::Committed);
    assert_eq!(fx.src.attempts.load(Ordering::SeqCst), 4);
    let events = fx.out.events.lock().unwrap().clone();
    assert!(!events.iter().any(|e| e.phase == Phase::Failed));
    let retries: Vec<_> = events
        .iter()
        .filter(|e| e.waiting == Some(ferry_protocol::Waiting::Retrying))
        .collect();
    assert_eq!(retries.len(), 3, "{events:#?}");
    for r in &retries {
        assert_eq!(r.phase, Phase::Downloading);
        assert!(
            r.reason.as_deref().unwrap().starts_with("retrying in "),
            "{r:?}"
        );
    }
    assert!(retries[2].reason.as_deref().unwrap().contains("HTTP 503"));
    assert_eq!(retries[2].download.unwrap().retries, 3);
    // Backoff with no progress in between: 1 s, then 1-2 s, then 1-4 s (3-7 s in all), plus
    // the health gate (about 3 s here): no tight loop, and no runaway delay either.
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited <= Duration::from_secs(12),
        "{waited:?}"
    );
    // The `downloaded` event carries the counters.
    let done = events
        .iter()
        .find(|e| e.phase == Phase::Downloaded)
        .unwrap();
    assert_eq!(done.download.unwrap().retries, 3);
}

#[tokio::test(start_paused = true)]
async fn retries_go_on_without_limit_and_the_state_says_retrying() {
    let fx = Fx::new();
    let mut cfg = fx.config();
    cfg.retry_max = Duration::from_secs(2);
    let mut e = fx.engine_with(cfg);
    for _ in 0..50 {
        fx.src.fail_next(transient("connection refused"));
    }
    e.handle_notice(
        &fx.notice(1, Strategy::StopFirst, &[("sensor", "1.0.0")]),
        &fx.stop,
    )
    .await
    .unwrap();
    assert_eq!(fx.last_event().phase, Phase::Committed);
    assert_eq!(fx.src.attempts.load(Ordering::SeqCst), 51);
    let held = fx
        .out
        .states
        .lock()
        .unwrap()
        .iter()
        .filter(|s| {
            s.update.as_ref().is_some_and(|u| {
                u.phase == Phase::Downloading
                    && u.waiting == Some(ferry_protocol::Waiting::Retrying)
                    && u.reason.as_deref().is_some_and(|r| r.contains("refused"))
            })
        })
        .count();
    assert_eq!(held, 50);
}

/// A source whose attempts fetch some bytes, then fail transiently (a link cut every so often).
#[tokio::test(start_paused = true)]
async fn an_attempt_that_made_progress_resumes_at_once() {
    let fx = Fx::new();
    let mut cfg = fx.config();
    cfg.retry_initial = Duration::from_secs(4);
    let mut e = fx.engine_with(cfg);
    *fx.src.progress_then_fail.lock().unwrap() = 5;
    let t0 = tokio::time::Instant::now();
    e.handle_notice(
        &fx.notice(1, Strategy::StopFirst, &[("sensor", "1.0.0")]),
        &fx.stop,
    )
    .await
    .unwrap();
    assert_eq!(fx.last_event().phase, Phase::Committed);
    assert_eq!(fx.src.attempts.load(Ordering::SeqCst), 6);
    // Five retries after progress: at most 1 s each (a quarter of the 4 s first delay), where a
    // backoff would have taken 4 s or more each; plus the health gate.
    let waited = t0.elapsed();
    assert!(waited < Duration::from_secs(10), "{waited:?}");
}
