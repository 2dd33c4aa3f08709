//! The health-gate driver: watches a started container through a [`ContainerRuntime`], probes it
//! on the [`Gate`]'s schedule and returns the gate's verdict.
//!
//! Time is tokio's clock (pausable in tests with tokio's `test-util`), counted from when [`watch()`] is called, which
//! the update engine does right after starting the container.

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::watch;

use crate::shutdown::StopFlag;
use tokio::time::Instant;
use tracing::{debug, info, info_span, warn, Instrument};

use super::gate::{Gate, Observation, Verdict};
use super::params::{fmt_secs, HealthParams};
use super::probe::{self, ProbeOutcome};
use crate::runtime::{ContainerInfo, ContainerRuntime};
use ferry_protocol::release::HealthCheck;

/// Watch `container` until its gate decides, or until `cancel` turns true
/// (`Unhealthy("cancelled")`).
///
/// Each `interval`, before every probe and before time alone decides, the container is
/// inspected: an exit, its disappearance, or a restart count above the one seen at the first
/// inspection decide the gate at once. Probes run when [`Gate::next_probe_at`] says. A failed
/// inspection (engine unreachable) is logged and counts as no news; with such an engine the
/// deadline decides. Never returns [`Verdict::Pending`].
pub async fn watch<R: ContainerRuntime>(
    rt: &R,
    container: &str,
    params: &HealthParams,
    mut cancel: watch::Receiver<bool>,
) -> Verdict {
    let started = Instant::now();
    let verdict = tokio::select! {
        biased;
        () = cancel.stopped() => Verdict::Unhealthy("cancelled".into()),
        v = drive(rt, container, params, started) => v,
    };
    let elapsed_s = started.elapsed().as_secs_f64();
    match &verdict {
        Verdict::Healthy => {
            info!(
                container,
                verdict = verdict.as_str(),
                elapsed_s,
                "health gate passed"
            )
        }
        Verdict::Unhealthy(reason) if reason == "cancelled" => {
            debug!(
                container,
                verdict = verdict.as_str(),
                reason = %reason,
                elapsed_s,
                "health gate cancelled"
            )
        }
        Verdict::Unhealthy(reason) => {
            warn!(
                container,
                verdict = verdict.as_str(),
                reason = %reason,
                elapsed_s,
                "health gate failed"
            )
        }
        Verdict::Pending => {}
    }
    verdict
}

/// Run the gates of several containers concurrently: `Ok` once every one is healthy; on the
/// first unhealthy verdict the others are cancelled and `Err((app, reason))` is returned.
/// `items`: `(app name, container name or id, params)`. No items: `Ok`.
pub async fn watch_all<R: ContainerRuntime>(
    rt: &R,
    items: &[(String, String, HealthParams)],
) -> Result<(), (String, String)> {
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let mut gates: FuturesUnordered<_> = items
        .iter()
        .map(|(app, container, params)| {
            let rx = cancel_rx.clone();
            async move {
                let v = watch(rt, container, params, rx)
                    .instrument(info_span!("health", app = %app, container = %container))
                    .await;
                (app, container, v)
            }
        })
        .collect();
    let mut failed = None;
    while let Some((app, container, verdict)) = gates.next().await {
        match verdict {
            Verdict::Healthy => {}
            Verdict::Unhealthy(reason) if failed.is_none() => {
                warn!(app = %app, container = %container, verdict = "unhealthy", reason = %reason,
                      others = gates.len(), "health gate failed; cancelling the others");
                failed = Some((app.clone(), reason));
                // The rest see the cancel on their next poll and return at once.
                let _ = cancel_tx.send(true);
            }
            Verdict::Unhealthy(_) => {}
            Verdict::Pending => {
                // `watch` never returns Pending; be safe rather than wave it through.
                if failed.is_none() {
                    failed = Some((app.clone(), "no verdict".into()));
                    let _ = cancel_tx.send(true);
                }
            }
        }
    }
    match failed {
        Some(f) => Err(f),
        None => {
            if !items.is_empty() {
                info!(apps = items.len(), "all health gates passed");
            }
            Ok(())
        }
    }
}

async fn drive<R: ContainerRuntime>(
    rt: &R,
    container: &str,
    params: &HealthParams,
    started: Instant,
) -> Verdict {
    let mut gate = Gate::new(params.clone());
    let params = gate.params().clone();
    debug!(
        container,
        check = ?params.check,
        grace_s = params.grace.as_secs_f64(),
        interval_s = params.interval.as_secs_f64(),
        successes = params.successes,
        max_failures = params.max_failures,
        deadline_s = params.deadline.as_secs_f64(),
        "health gate started"
    );
    if params.earliest_healthy() > params.deadline {
        warn!(
            container,
            earliest = %fmt_secs(params.earliest_healthy()),
            deadline = %fmt_secs(params.deadline),
            "health gate cannot pass: the deadline comes before the earliest possible verdict"
        );
    }
    let mut baseline: Option<u64> = None;
    let mut last_info: Option<ContainerInfo> = None;
    loop {
        let now = started.elapsed();
        let probe_due = gate.next_probe_at().is_some_and(|t| t <= now);
        // Every wake-up inspects: on the inspection schedule, before a probe, and before time
        // alone decides (so "still running at `grace + successes * interval`" is checked).
        let next_inspect = now + params.interval;
        let mut fresh = None;
        let v = match rt.inspect(container).await {
            Ok(Some(info)) => {
                let obs = container_observation(&info, &mut baseline);
                fresh = Some(info);
                gate.observe(started.elapsed(), obs)
            }
            Ok(None) => gate.observe(started.elapsed(), Observation::ContainerGone),
            Err(e) => {
                warn!(container, error = %e, "inspect failed");
                gate.observe(started.elapsed(), Observation::Tick)
            }
        };
        if v.is_decided() {
            return v;
        }
        if let Some(info) = &fresh {
            last_info = Some(info.clone());
        }

        if let (true, Some(check)) = (probe_due, &params.check) {
            let outcome = match (check, fresh.as_ref(), last_info.as_ref()) {
                // The image's HEALTHCHECK status must come from this round's inspection.
                (HealthCheck::Docker {}, Some(info), _) => probe::docker(info),
                (HealthCheck::Docker {}, None, _) => ProbeOutcome::NoResult,
                (_, _, Some(info)) => probe::probe(rt, info, check, params.timeout).await,
                (_, _, None) => ProbeOutcome::NoResult,
            };
            match &outcome {
                ProbeOutcome::Fail(reason) => {
                    debug!(
                        container,
                        reason = %reason,
                        failures = gate.consecutive_failures() + 1,
                        "probe failed"
                    )
                }
                o => debug!(container, result = ?o, "probe"),
            }
            let v = gate.observe(started.elapsed(), outcome.into());
            if v.is_decided() {
                return v;
            }
        }

        let wake = gate.wake_at().map_or(next_inspect, |w| w.min(next_inspect));
        tokio::time::sleep_until(started + wake).await;
    }
}

/// What one inspection says about the container's life. `baseline`: the restart count at the
/// first inspection (set here).
fn container_observation(info: &ContainerInfo, baseline: &mut Option<u64>) -> Observation {
    let count = info.state.restart_count;
    let base = *baseline.get_or_insert(count);
    let restarts = count.saturating_sub(base);
    if restarts > 0 {
        Observation::Restarted { count: restarts }
    } else if info.state.status == "restarting" {
        // It died and the engine is restarting it: the restart count has not moved yet.
        Observation::Restarted { count: 1 }
    } else if !info.state.running {
        Observation::ContainerExited {
            code: info.state.exit_code,
        }
    } else {
        Observation::Tick
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::fake::{Behaviour, FakeRuntime};
    use crate::runtime::{ContainerConfig, ContainerState, ImageInfo, RestartPolicy};
    use std::time::Duration;

    /// One "second" of the protocol's defaults, scaled down. The tests run on tokio's paused
    /// clock (the fake runtime never waits), so timings and call counts are exact and a
    /// loaded machine or qemu cannot make them flaky; only `http_check_end_to_end` talks to a
    /// real socket and runs in real time.
    const UNIT_MS: u64 = 40;

    fn s(n: u64) -> Duration {
        Duration::from_millis(n * UNIT_MS)
    }

    /// `took` is `expected` on the paused clock (which only moves to the next timer).
    #[track_caller]
    fn about(took: Duration, expected: Duration) {
        assert!(
            took >= expected && took < expected + Duration::from_millis(5),
            "took {took:?}, expected about {expected:?}"
        );
    }

    fn no_cancel() -> watch::Receiver<bool> {
        // The sender is dropped: never cancelled.
        watch::channel(false).1
    }

    /// The protocol's defaults (grace 5, interval 2, timeout 2, successes 3, max_failures 3), a
    /// 30 "second" deadline.
    fn params(check: Option<HealthCheck>) -> HealthParams {
        HealthParams {
            check,
            grace: s(5),
            interval: s(2),
            timeout: s(2),
            successes: 3,
            max_failures: 3,
            deadline: s(30),
        }
    }

    fn exec_check() -> Option<HealthCheck> {
        Some(HealthCheck::Exec(vec!["/check".into()]))
    }

    fn docker_check() -> Option<HealthCheck> {
        Some(HealthCheck::Docker {})
    }

    /// Start a container `name` from its own image with behaviour `b`; returns its id.
    async fn start(rt: &FakeRuntime, name: &str, b: Behaviour, policy: RestartPolicy) -> String {
        let image = format!("reg/{name}@sha256:1");
        rt.add_local_image(&image, ImageInfo::default());
        rt.set_image_behaviour(&image, b);
        let id = rt
            .create(&ContainerConfig {
                name: name.into(),
                image,
                restart_policy: policy,
                ..Default::default()
            })
            .await
            .unwrap();
        rt.start(&id).await.unwrap();
        id
    }

    async fn timed<F: std::future::Future>(f: F) -> (F::Output, Duration) {
        let t = Instant::now();
        let out = f.await;
        (out, t.elapsed())
    }

    fn bad() -> Behaviour {
        Behaviour {
            healthy: false,
            ..Default::default()
        }
    }

    fn crash_loop() -> Behaviour {
        Behaviour {
            crash_loop: true,
            ..Default::default()
        }
    }

    fn exits() -> Behaviour {
        Behaviour {
            exits_after_start: true,
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn checkless_healthy_after_grace_plus_successes_intervals() {
        let rt = FakeRuntime::new();
        let id = start(&rt, "app", Behaviour::default(), RestartPolicy::No).await;
        let (v, took) = timed(watch(&rt, &id, &params(None), no_cancel())).await;
        assert_eq!(v, Verdict::Healthy);
        about(took, s(11));
        // inspected every interval: 0, 2, ..., 10 and at 11
        assert_eq!(rt.call_count("inspect"), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn exec_check_healthy() {
        let rt = FakeRuntime::new();
        let id = start(&rt, "app", Behaviour::default(), RestartPolicy::No).await;
        let (v, took) = timed(watch(&rt, &id, &params(exec_check()), no_cancel())).await;
        assert_eq!(v, Verdict::Healthy);
        // probes at 5, 7, 9
        about(took, s(9));
        assert_eq!(rt.call_count("exec"), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn exec_check_unhealthy() {
        let rt = FakeRuntime::new();
        let id = start(&rt, "app", bad(), RestartPolicy::No).await;
        let (v, took) = timed(watch(&rt, &id, &params(exec_check()), no_cancel())).await;
        assert_eq!(
            v,
            Verdict::Unhealthy(
                "health check failed 3 consecutive times, last: exec /check: exit code 1".into()
            )
        );
        about(took, s(9));
    }

    #[tokio::test(start_paused = true)]
    async fn docker_check_healthy_and_unhealthy() {
        let rt = FakeRuntime::new();
        let good = start(&rt, "good", Behaviour::default(), RestartPolicy::No).await;
        let badc = start(&rt, "bad", bad(), RestartPolicy::No).await;
        let p = params(docker_check());
        assert_eq!(watch(&rt, &good, &p, no_cancel()).await, Verdict::Healthy);
        assert_eq!(rt.call_count("exec"), 0);
        assert_eq!(
            watch(&rt, &badc, &p, no_cancel()).await,
            Verdict::Unhealthy(
                "health check failed 3 consecutive times, last: docker HEALTHCHECK: unhealthy"
                    .into()
            )
        );
    }

    #[tokio::test(start_paused = true)]
    async fn docker_check_without_healthcheck() {
        let rt = FakeRuntime::new();
        let id = start(
            &rt,
            "app",
            Behaviour {
                has_healthcheck: false,
                ..Default::default()
            },
            RestartPolicy::No,
        )
        .await;
        let v = watch(&rt, &id, &params(docker_check()), no_cancel()).await;
        assert!(v.reason().unwrap().contains("no HEALTHCHECK"), "{v:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn crash_loop_is_caught_at_once() {
        for check in [None, exec_check(), docker_check()] {
            let rt = FakeRuntime::new();
            let id = start(&rt, "app", crash_loop(), RestartPolicy::UnlessStopped).await;
            let (v, took) = timed(watch(&rt, &id, &params(check), no_cancel())).await;
            let reason = v.reason().expect("unhealthy").to_string();
            assert!(
                reason.starts_with("container restarted") && reason.ends_with("(crash loop)"),
                "{reason}"
            );
            about(took, Duration::ZERO);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn crash_loop_with_policy_no_is_an_exit() {
        let rt = FakeRuntime::new();
        let id = start(&rt, "app", crash_loop(), RestartPolicy::No).await;
        let v = watch(&rt, &id, &params(None), no_cancel()).await;
        assert_eq!(v, Verdict::Unhealthy("container exited with code 1".into()));
    }

    #[tokio::test(start_paused = true)]
    async fn exiting_image() {
        let rt = FakeRuntime::new();
        let id = start(&rt, "app", exits(), RestartPolicy::No).await;
        let (v, took) = timed(watch(&rt, &id, &params(exec_check()), no_cancel())).await;
        assert_eq!(v, Verdict::Unhealthy("container exited with code 1".into()));
        about(took, Duration::ZERO);
        assert_eq!(rt.call_count("exec"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn crash_during_the_gate() {
        let rt = std::sync::Arc::new(FakeRuntime::new());
        let id = start(&rt, "app", Behaviour::default(), RestartPolicy::No).await;
        let (rt2, id2) = (rt.clone(), id.clone());
        tokio::spawn(async move {
            tokio::time::sleep(s(3)).await;
            rt2.crash(&id2, 137);
        });
        let (v, took) = timed(watch(&*rt, &id, &params(None), no_cancel())).await;
        assert_eq!(
            v,
            Verdict::Unhealthy("container exited with code 137".into())
        );
        // noticed at the next inspection
        about(took, s(4));
    }

    #[tokio::test(start_paused = true)]
    async fn restart_during_the_gate() {
        let rt = std::sync::Arc::new(FakeRuntime::new());
        let id = start(
            &rt,
            "app",
            Behaviour::default(),
            RestartPolicy::UnlessStopped,
        )
        .await;
        let (rt2, id2) = (rt.clone(), id.clone());
        tokio::spawn(async move {
            tokio::time::sleep(s(3)).await;
            rt2.crash(&id2, 1);
        });
        let v = watch(&*rt, &id, &params(exec_check()), no_cancel()).await;
        assert_eq!(
            v,
            Verdict::Unhealthy("container restarted 1 time (crash loop)".into())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn missing_container() {
        let rt = FakeRuntime::new();
        let v = watch(&rt, "nope", &params(None), no_cancel()).await;
        assert_eq!(v, Verdict::Unhealthy("container no longer exists".into()));
    }

    #[tokio::test(start_paused = true)]
    async fn unreachable_engine_ends_at_the_deadline() {
        let rt = FakeRuntime::new();
        let id = start(&rt, "app", Behaviour::default(), RestartPolicy::No).await;
        rt.set_unreachable(true);
        let (v, took) = timed(watch(&rt, &id, &params(exec_check()), no_cancel())).await;
        assert_eq!(
            v,
            Verdict::Unhealthy(format!("no verdict within {}", fmt_secs(s(30))))
        );
        about(took, s(30));
        // no probe could run without an inspection
        assert_eq!(rt.call_count("exec"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn flaky_inspect_does_not_fail_the_gate() {
        let rt = FakeRuntime::new();
        let id = start(&rt, "app", Behaviour::default(), RestartPolicy::No).await;
        rt.fail_next("inspect", "EOF");
        rt.fail_next("inspect", "EOF");
        let v = watch(&rt, &id, &params(exec_check()), no_cancel()).await;
        assert_eq!(v, Verdict::Healthy);
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_before_and_during() {
        let rt = FakeRuntime::new();
        let id = start(&rt, "app", Behaviour::default(), RestartPolicy::No).await;
        let (tx, rx) = watch::channel(true);
        assert_eq!(
            watch(&rt, &id, &params(None), rx).await,
            Verdict::Unhealthy("cancelled".into())
        );
        drop(tx);

        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            tokio::time::sleep(s(4)).await;
            tx.send(true).unwrap();
        });
        let (v, took) = timed(watch(&rt, &id, &params(None), rx)).await;
        assert_eq!(v, Verdict::Unhealthy("cancelled".into()));
        about(took, s(4));
    }

    fn item(app: &str, id: &str, p: HealthParams) -> (String, String, HealthParams) {
        (app.into(), id.into(), p)
    }

    #[tokio::test(start_paused = true)]
    async fn watch_all_healthy() {
        let rt = FakeRuntime::new();
        let a = start(&rt, "a", Behaviour::default(), RestartPolicy::No).await;
        let b = start(&rt, "b", Behaviour::default(), RestartPolicy::No).await;
        let items = [
            item("a", &a, params(None)),
            item("b", &b, params(exec_check())),
        ];
        let (r, took) = timed(watch_all(&rt, &items)).await;
        assert_eq!(r, Ok(()));
        // concurrently: the slower one (11 s), not the sum
        about(took, s(11));
        assert_eq!(watch_all(&rt, &[]).await, Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn watch_all_fails_fast_on_the_first_bad_one() {
        let rt = FakeRuntime::new();
        let good = start(&rt, "good", Behaviour::default(), RestartPolicy::No).await;
        let badc = start(&rt, "bad", bad(), RestartPolicy::No).await;
        let slow = HealthParams {
            grace: s(60),
            deadline: s(120),
            ..params(None)
        };
        let items = [
            item("good", &good, slow),
            item("bad", &badc, params(exec_check())),
        ];
        let (r, took) = timed(watch_all(&rt, &items)).await;
        assert_eq!(
            r,
            Err((
                "bad".into(),
                "health check failed 3 consecutive times, last: exec /check: exit code 1".into()
            ))
        );
        about(took, s(9));
        // the good one was cancelled: no inspection after the failure
        let inspects = rt.call_count("inspect");
        tokio::time::sleep(s(30)).await;
        assert_eq!(rt.call_count("inspect"), inspects);
    }

    #[tokio::test(start_paused = true)]
    async fn watch_all_crash_loop_and_exit() {
        let rt = FakeRuntime::new();
        let good = start(&rt, "good", Behaviour::default(), RestartPolicy::No).await;
        let loopy = start(&rt, "loopy", crash_loop(), RestartPolicy::UnlessStopped).await;
        let r = watch_all(
            &rt,
            &[
                item("good", &good, params(docker_check())),
                item("loopy", &loopy, params(docker_check())),
            ],
        )
        .await;
        let (app, reason) = r.unwrap_err();
        assert_eq!(app, "loopy");
        assert!(reason.ends_with("(crash loop)"), "{reason}");

        let gone = start(&rt, "gone", exits(), RestartPolicy::No).await;
        assert_eq!(
            watch_all(&rt, &[item("gone", &gone, params(None))]).await,
            Err(("gone".into(), "container exited with code 1".into()))
        );
    }

    /// Real time and real TCP: an http check against a local listener, container on the host
    /// network.
    #[tokio::test]
    async fn http_check_end_to_end() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hits.clone();
        tokio::spawn(async move {
            loop {
                let (mut c, _) = l.accept().await.unwrap();
                let n = h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 512];
                    let _ = c.read(&mut buf).await;
                    let reply: &[u8] = if n == 0 {
                        b"HTTP/1.1 503 Service Unavailable\r\n\r\n"
                    } else {
                        b"HTTP/1.1 200 OK\r\n\r\n"
                    };
                    let _ = c.write_all(reply).await;
                });
            }
        });
        let rt = FakeRuntime::new();
        rt.add_local_image("reg/web@sha256:1", ImageInfo::default());
        let id = rt
            .create(&ContainerConfig {
                name: "web".into(),
                image: "reg/web@sha256:1".into(),
                network_mode: Some("host".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        rt.start(&id).await.unwrap();
        let p = HealthParams {
            check: Some(HealthCheck::Http {
                port,
                path: "/healthz".into(),
            }),
            grace: Duration::ZERO,
            interval: Duration::from_millis(20),
            timeout: Duration::from_secs(2),
            successes: 2,
            max_failures: 3,
            deadline: Duration::from_secs(10),
        };
        assert_eq!(watch(&rt, &id, &p, no_cancel()).await, Verdict::Healthy);
        // one 503 then two 200s
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[test]
    fn inspections_map_to_observations() {
        let info = |status: &str, running: bool, code: Option<i64>, restarts: u64| ContainerInfo {
            state: ContainerState {
                status: status.into(),
                running,
                exit_code: code,
                restart_count: restarts,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut base = None;
        assert_eq!(
            container_observation(&info("running", true, None, 2), &mut base),
            Observation::Tick
        );
        assert_eq!(base, Some(2));
        assert_eq!(
            container_observation(&info("running", true, None, 4), &mut base),
            Observation::Restarted { count: 2 }
        );
        let mut base = None;
        assert_eq!(
            container_observation(&info("restarting", true, Some(1), 0), &mut base),
            Observation::Restarted { count: 1 }
        );
        assert_eq!(
            container_observation(&info("exited", false, Some(3), 0), &mut base),
            Observation::ContainerExited { code: Some(3) }
        );
        assert_eq!(
            container_observation(&info("paused", true, None, 0), &mut base),
            Observation::Tick
        );
    }
}
