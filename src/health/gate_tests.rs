//! Unit tests of `gate.rs`.

use super::*;
use ferry_protocol::release::HealthCheck;
use proptest::prelude::*;

fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// grace 5, interval 2, successes 3, max_failures 3, deadline 120, with an http check.
fn checked() -> HealthParams {
    HealthParams {
        check: Some(HealthCheck::Http {
            port: 8080,
            path: "/healthz".into(),
        }),
        ..HealthParams::default()
    }
}

fn checkless() -> HealthParams {
    HealthParams::default()
}

fn fail(r: &str) -> Observation {
    Observation::ProbeFailed(r.into())
}

fn unhealthy(r: &str) -> Verdict {
    Verdict::Unhealthy(r.into())
}

// ---- grace ----

#[test]
fn failures_before_grace_are_ignored() {
    let mut g = Gate::new(checked());
    for t in 0..5 {
        assert_eq!(g.observe(s(t), fail("GET /healthz: 503")), Verdict::Pending);
    }
    assert_eq!(g.consecutive_failures(), 0);
    assert_eq!(g.last_failure(), Some("GET /healthz: 503"));
    // two more after grace: still below max_failures
    assert_eq!(g.observe(s(5), fail("x")), Verdict::Pending);
    assert_eq!(g.observe(s(7), fail("x")), Verdict::Pending);
    assert_eq!(g.consecutive_failures(), 2);
}

#[test]
fn passes_before_grace_do_not_count() {
    let mut g = Gate::new(checked());
    for t in 0..5 {
        assert_eq!(g.observe(s(t), Observation::ProbePassed), Verdict::Pending);
    }
    assert_eq!(g.consecutive_passes(), 0);
    assert_eq!(g.observe(s(5), Observation::ProbePassed), Verdict::Pending);
    assert_eq!(g.observe(s(7), Observation::ProbePassed), Verdict::Pending);
    assert_eq!(g.observe(s(9), Observation::ProbePassed), Verdict::Healthy);
    assert_eq!(g.decided_at(), Some(s(9)));
}

#[test]
fn a_probe_exactly_at_grace_counts() {
    let mut g = Gate::new(HealthParams {
        successes: 1,
        ..checked()
    });
    assert_eq!(
        g.observe(s(5) - ms(1), Observation::ProbePassed),
        Verdict::Pending
    );
    assert_eq!(g.observe(s(5), Observation::ProbePassed), Verdict::Healthy);
}

#[test]
fn zero_grace_counts_from_the_start() {
    let mut g = Gate::new(HealthParams {
        grace: s(0),
        successes: 1,
        ..checked()
    });
    assert_eq!(g.next_probe_at(), Some(s(0)));
    assert_eq!(g.observe(s(0), Observation::ProbePassed), Verdict::Healthy);
}

// ---- successes / failures ----

#[test]
fn successes_consecutive_passes_make_healthy() {
    let mut g = Gate::new(checked());
    assert_eq!(g.observe(s(5), Observation::ProbePassed), Verdict::Pending);
    assert_eq!(g.observe(s(7), Observation::ProbePassed), Verdict::Pending);
    assert_eq!(g.observe(s(9), Observation::ProbePassed), Verdict::Healthy);
}

#[test]
fn a_failure_resets_the_pass_streak() {
    let mut g = Gate::new(checked());
    g.observe(s(5), Observation::ProbePassed);
    g.observe(s(7), Observation::ProbePassed);
    assert_eq!(g.observe(s(9), fail("GET /healthz: 500")), Verdict::Pending);
    assert_eq!(g.consecutive_passes(), 0);
    assert_eq!(g.consecutive_failures(), 1);
    g.observe(s(11), Observation::ProbePassed);
    g.observe(s(13), Observation::ProbePassed);
    assert_eq!(g.observe(s(15), Observation::ProbePassed), Verdict::Healthy);
}

#[test]
fn max_failures_consecutive_failures_make_unhealthy() {
    let mut g = Gate::new(checked());
    assert_eq!(g.observe(s(5), fail("GET /healthz: 503")), Verdict::Pending);
    assert_eq!(g.observe(s(7), fail("GET /healthz: 503")), Verdict::Pending);
    assert_eq!(
        g.observe(s(9), fail("GET /healthz: 503")),
        unhealthy("health check failed 3 consecutive times, last: GET /healthz: 503")
    );
}

#[test]
fn a_pass_resets_the_failure_streak() {
    let mut g = Gate::new(checked());
    g.observe(s(5), fail("a"));
    g.observe(s(7), fail("b"));
    assert_eq!(g.observe(s(9), Observation::ProbePassed), Verdict::Pending);
    assert_eq!(g.consecutive_failures(), 0);
    g.observe(s(11), fail("c"));
    g.observe(s(13), fail("d"));
    assert_eq!(
        g.observe(s(15), fail("e")),
        unhealthy("health check failed 3 consecutive times, last: e")
    );
}

#[test]
fn single_failure_allowed_wording() {
    let mut g = Gate::new(HealthParams {
        max_failures: 1,
        ..checked()
    });
    assert_eq!(
        g.observe(s(5), fail("connect 172.17.0.3:8080: connection refused")),
        unhealthy("health check failed: connect 172.17.0.3:8080: connection refused")
    );
}

#[test]
fn ticks_and_no_results_do_not_break_streaks() {
    let mut g = Gate::new(checked());
    g.observe(s(5), Observation::ProbePassed);
    g.observe(s(6), Observation::Tick);
    g.observe(s(7), Observation::ProbeNoResult);
    g.observe(s(8), Observation::Restarted { count: 0 });
    g.observe(s(9), Observation::ProbePassed);
    assert_eq!(g.observe(s(11), Observation::ProbePassed), Verdict::Healthy);

    let mut g = Gate::new(checked());
    g.observe(s(5), fail("x"));
    g.observe(s(7), Observation::ProbeNoResult);
    g.observe(s(8), Observation::Tick);
    g.observe(s(9), fail("x"));
    assert!(g.observe(s(11), fail("x")).is_decided());
}

#[test]
fn no_result_alone_never_decides_before_deadline() {
    let mut g = Gate::new(checked());
    let mut t = s(5);
    while t < s(120) {
        assert_eq!(g.observe(t, Observation::ProbeNoResult), Verdict::Pending);
        t += s(2);
    }
    assert_eq!(
        g.observe(s(120), Observation::ProbeNoResult),
        unhealthy("no verdict within 120 s")
    );
}

// ---- container events ----

#[test]
fn exit_at_any_time_is_unhealthy() {
    for t in [0, 3, 5, 8, 119, 120] {
        let mut g = Gate::new(checked());
        assert_eq!(
            g.observe(s(t), Observation::ContainerExited { code: Some(1) }),
            unhealthy("container exited with code 1"),
            "at {t}"
        );
        let mut g = Gate::new(checkless());
        assert_eq!(
            g.observe(s(t), Observation::ContainerExited { code: Some(0) }),
            unhealthy("container exited with code 0"),
            "at {t}"
        );
    }
    let mut g = Gate::new(checked());
    assert_eq!(
        g.observe(s(1), Observation::ContainerExited { code: None }),
        unhealthy("container exited")
    );
}

#[test]
fn exit_even_with_a_pass_streak_in_progress() {
    let mut g = Gate::new(checked());
    g.observe(s(5), Observation::ProbePassed);
    g.observe(s(7), Observation::ProbePassed);
    assert_eq!(
        g.observe(s(8), Observation::ContainerExited { code: Some(137) }),
        unhealthy("container exited with code 137")
    );
}

#[test]
fn restart_at_any_time_is_a_crash_loop() {
    let mut g = Gate::new(checked());
    assert_eq!(
        g.observe(s(1), Observation::Restarted { count: 2 }),
        unhealthy("container restarted 2 times (crash loop)")
    );
    let mut g = Gate::new(checkless());
    assert_eq!(
        g.observe(s(10), Observation::Restarted { count: 1 }),
        unhealthy("container restarted 1 time (crash loop)")
    );
}

#[test]
fn restart_count_zero_is_nothing() {
    let mut g = Gate::new(checked());
    assert_eq!(
        g.observe(s(1), Observation::Restarted { count: 0 }),
        Verdict::Pending
    );
}

#[test]
fn vanished_container_is_unhealthy() {
    let mut g = Gate::new(checkless());
    assert_eq!(
        g.observe(s(3), Observation::ContainerGone),
        unhealthy("container no longer exists")
    );
}

// ---- deadline ----

#[test]
fn deadline_without_verdict_is_unhealthy() {
    let mut g = Gate::new(checked());
    assert_eq!(g.observe(s(119), Observation::Tick), Verdict::Pending);
    assert_eq!(
        g.observe(s(120), Observation::Tick),
        unhealthy("no verdict within 120 s")
    );
    assert_eq!(g.decided_at(), Some(s(120)));
}

#[test]
fn deadline_reason_mentions_the_last_failure() {
    let mut g = Gate::new(checked());
    g.observe(s(5), fail("GET /healthz: 503"));
    g.observe(s(7), Observation::ProbePassed);
    assert_eq!(
        g.observe(s(121), Observation::Tick),
        unhealthy("no verdict within 120 s (last failure: GET /healthz: 503)")
    );
}

#[test]
fn a_decisive_probe_exactly_at_the_deadline_counts() {
    let p = HealthParams {
        deadline: s(9),
        ..checked()
    };
    let mut g = Gate::new(p.clone());
    g.observe(s(5), Observation::ProbePassed);
    g.observe(s(7), Observation::ProbePassed);
    assert_eq!(g.observe(s(9), Observation::ProbePassed), Verdict::Healthy);

    let mut g = Gate::new(p);
    g.observe(s(5), Observation::ProbePassed);
    g.observe(s(7), Observation::ProbePassed);
    assert_eq!(
        g.observe(s(9) + ms(1), Observation::ProbePassed),
        unhealthy("no verdict within 9 s")
    );
}

#[test]
fn events_after_the_deadline_report_the_deadline() {
    let mut g = Gate::new(checked());
    assert_eq!(
        g.observe(s(200), Observation::ContainerExited { code: Some(1) }),
        unhealthy("no verdict within 120 s")
    );
}

#[test]
fn checkless_gate_that_cannot_finish_before_the_deadline() {
    let mut g = Gate::new(HealthParams {
        deadline: s(10),
        ..checkless()
    });
    assert_eq!(g.decides_by(), Some(s(10)));
    assert_eq!(
        g.observe(s(10), Observation::Tick),
        unhealthy("no verdict within 10 s")
    );
}

// ---- check-less gate ----

#[test]
fn checkless_healthy_after_grace_plus_successes_intervals() {
    let mut g = Gate::new(checkless());
    assert_eq!(g.next_probe_at(), None);
    assert_eq!(g.decides_by(), Some(s(11)));
    assert_eq!(g.wake_at(), Some(s(11)));
    for t in 0..11 {
        assert_eq!(g.observe(s(t), Observation::Tick), Verdict::Pending, "{t}");
    }
    assert_eq!(
        g.observe(s(11) - ms(1), Observation::Tick),
        Verdict::Pending
    );
    assert_eq!(g.observe(s(11), Observation::Tick), Verdict::Healthy);
    assert_eq!(g.wake_at(), None);
}

#[test]
fn checkless_ignores_probe_results() {
    let mut g = Gate::new(checkless());
    for t in 5..11 {
        assert_eq!(g.observe(s(t), fail("nope")), Verdict::Pending);
        assert_eq!(g.observe(s(t), Observation::ProbePassed), Verdict::Pending);
    }
    assert_eq!(g.last_failure(), None);
    assert_eq!(g.observe(s(11), fail("nope")), Verdict::Healthy);
}

#[test]
fn checkless_late_first_observation() {
    let mut g = Gate::new(checkless());
    assert_eq!(g.observe(s(60), Observation::Tick), Verdict::Healthy);
}

#[test]
fn checkless_restart_before_stable_is_unhealthy() {
    let mut g = Gate::new(checkless());
    g.observe(s(4), Observation::Tick);
    assert_eq!(
        g.observe(s(6), Observation::Restarted { count: 3 }),
        unhealthy("container restarted 3 times (crash loop)")
    );
}

// ---- stickiness, time ----

#[test]
fn verdicts_are_sticky() {
    let mut g = Gate::new(HealthParams {
        successes: 1,
        ..checked()
    });
    assert_eq!(g.observe(s(5), Observation::ProbePassed), Verdict::Healthy);
    assert_eq!(
        g.observe(s(6), Observation::ContainerExited { code: Some(1) }),
        Verdict::Healthy
    );
    assert_eq!(g.observe(s(500), Observation::Tick), Verdict::Healthy);
    assert_eq!(g.decided_at(), Some(s(5)));
    assert_eq!(g.verdict(), &Verdict::Healthy);

    let mut g = Gate::new(checked());
    g.observe(s(1), Observation::Restarted { count: 1 });
    for _ in 0..10 {
        assert_eq!(
            g.observe(s(10), Observation::ProbePassed),
            unhealthy("container restarted 1 time (crash loop)")
        );
    }
}

#[test]
fn time_never_goes_backwards() {
    let mut g = Gate::new(checked());
    g.observe(s(10), Observation::Tick);
    // stamped before grace but the gate has already seen t=10: counts as post-grace
    g.observe(s(1), Observation::ProbePassed);
    assert_eq!(g.consecutive_passes(), 1);
}

// ---- probe schedule ----

#[test]
fn probe_schedule() {
    let mut g = Gate::new(checked());
    assert_eq!(g.next_probe_at(), Some(s(5)));
    assert_eq!(g.wake_at(), Some(s(5)));
    // inspections and early probes do not move it
    g.observe(s(2), Observation::Tick);
    g.observe(s(3), Observation::ProbePassed);
    assert_eq!(g.next_probe_at(), Some(s(5)));
    // a probe finishing shortly after its due time: next one interval after the due time
    g.observe(s(5) + ms(300), Observation::ProbePassed);
    assert_eq!(g.next_probe_at(), Some(s(7)));
    g.observe(s(7) + ms(10), Observation::ProbeNoResult);
    assert_eq!(g.next_probe_at(), Some(s(9)));
    // a probe that took longer than the interval: the next one is due right away
    g.observe(s(13), fail("GET /healthz: timed out after 2 s"));
    assert_eq!(g.next_probe_at(), Some(s(13)));
    g.observe(s(14), fail("x"));
    assert_eq!(g.next_probe_at(), Some(s(15)));
    assert_eq!(g.wake_at(), Some(s(15)));
}

#[test]
fn no_schedule_once_decided() {
    let mut g = Gate::new(checked());
    g.observe(s(0), Observation::ContainerGone);
    assert_eq!(g.next_probe_at(), None);
    assert_eq!(g.decides_by(), None);
    assert_eq!(g.wake_at(), None);
}

#[test]
fn degenerate_params_are_clamped() {
    let mut g = Gate::new(HealthParams {
        interval: Duration::ZERO,
        successes: 0,
        max_failures: 0,
        ..checked()
    });
    assert_eq!(g.params().successes, 1);
    g.observe(s(5), Observation::ProbeNoResult);
    assert!(g.next_probe_at().unwrap() > s(5));
    assert_eq!(g.observe(s(6), Observation::ProbePassed), Verdict::Healthy);
}

#[test]
fn verdict_helpers() {
    assert!(!Verdict::Pending.is_decided());
    assert!(Verdict::Healthy.is_decided() && Verdict::Healthy.is_healthy());
    let u = unhealthy("x");
    assert!(u.is_decided() && !u.is_healthy());
    assert_eq!(u.reason(), Some("x"));
    assert_eq!(Verdict::Healthy.reason(), None);
    assert_eq!(u.to_string(), "unhealthy: x");
    assert_eq!(Verdict::Healthy.to_string(), "healthy");
    assert_eq!(Verdict::Pending.as_str(), "pending");
    assert_eq!(Verdict::default(), Verdict::Pending);
}

// ---- properties ----

fn arb_obs() -> impl Strategy<Value = Observation> {
    prop_oneof![
        6 => Just(Observation::ProbePassed),
        4 => Just(Observation::ProbeFailed("f".into())),
        2 => Just(Observation::ProbeNoResult),
        3 => Just(Observation::Tick),
        1 => proptest::option::of(-1i64..256)
            .prop_map(|code| Observation::ContainerExited { code }),
        1 => (0u64..4).prop_map(|count| Observation::Restarted { count }),
        1 => Just(Observation::ContainerGone),
    ]
}

fn arb_params() -> impl Strategy<Value = HealthParams> {
    (any::<bool>(), 0u64..10, 1u64..5, 1u32..5, 1u32..5, 1u64..60).prop_map(
        |(check, grace, interval, successes, max_failures, deadline)| HealthParams {
            check: check.then_some(HealthCheck::Tcp { port: 80 }),
            grace: s(grace),
            interval: s(interval),
            timeout: s(1),
            successes,
            max_failures,
            deadline: s(deadline),
        },
    )
}

/// Observations with non-decreasing times (deltas 0..3 s), some runs crossing the deadline.
fn arb_run() -> impl Strategy<Value = (HealthParams, Vec<(Duration, Observation)>)> {
    (
        arb_params(),
        proptest::collection::vec((0u64..3000, arb_obs()), 0..80),
    )
        .prop_map(|(p, steps)| {
            let mut t = Duration::ZERO;
            let run = steps
                .into_iter()
                .map(|(d, o)| {
                    t += ms(d);
                    (t, o)
                })
                .collect();
            (p, run)
        })
}

fn is_probe(o: &Observation) -> bool {
    matches!(o, Observation::ProbePassed | Observation::ProbeFailed(_))
}

fn is_container_event(o: &Observation) -> bool {
    matches!(
        o,
        Observation::ContainerExited { .. }
            | Observation::ContainerGone
            | Observation::Restarted { count: 1.. }
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn prop_verdict_is_sticky((p, run) in arb_run()) {
        let mut g = Gate::new(p);
        let mut first: Option<(Duration, Verdict)> = None;
        for (at, o) in run {
            let v = g.observe(at, o);
            prop_assert_eq!(&v, g.verdict());
            match &first {
                Some((when, d)) => {
                    prop_assert_eq!(&v, d);
                    prop_assert_eq!(g.decided_at(), Some(*when));
                }
                None if v.is_decided() => first = Some((at, v)),
                None => {}
            }
        }
    }

    #[test]
    fn prop_always_decided_by_the_deadline((p, run) in arb_run()) {
        let deadline = p.deadline;
        let mut g = Gate::new(p);
        for (at, o) in run {
            let v = g.observe(at, o);
            if at >= deadline {
                prop_assert!(v.is_decided(), "pending at {:?} >= {:?}", at, deadline);
            }
            if let Some(d) = g.decided_at() {
                prop_assert!(d <= deadline.max(at));
            }
        }
        // and a bare tick at the deadline always decides
        prop_assert!(g.observe(deadline, Observation::Tick).is_decided());
    }

    #[test]
    fn prop_healthy_needs_enough_post_grace_passes((p, run) in arb_run()) {
        let mut g = Gate::new(p.clone());
        let mut post_grace_probes: Vec<bool> = Vec::new();
        for (at, o) in run {
            if is_probe(&o) && at >= p.grace && at <= p.deadline {
                post_grace_probes.push(matches!(o, Observation::ProbePassed));
            }
            let was_pending = !g.verdict().is_decided();
            let v = g.observe(at, o.clone());
            if was_pending && v == Verdict::Healthy {
                prop_assert!(at <= p.deadline);
                prop_assert!(!is_container_event(&o));
                if p.check.is_some() {
                    let n = p.successes as usize;
                    prop_assert!(post_grace_probes.len() >= n);
                    prop_assert!(
                        post_grace_probes[post_grace_probes.len() - n..].iter().all(|ok| *ok),
                        "the last {} post-grace probes were not all passes", n
                    );
                } else {
                    prop_assert!(at >= p.stable_after());
                }
            }
        }
    }

    #[test]
    fn prop_probe_failures_alone_need_max_failures_in_a_row((p, run) in arb_run()) {
        let mut g = Gate::new(p.clone());
        let mut streak = 0u32;
        for (at, o) in run {
            if at >= p.grace && at <= p.deadline {
                match &o {
                    Observation::ProbePassed => streak = 0,
                    Observation::ProbeFailed(_) => streak += 1,
                    _ => {}
                }
            }
            let was_pending = !g.verdict().is_decided();
            let v = g.observe(at, o.clone());
            if was_pending {
                if let Verdict::Unhealthy(reason) = &v {
                    if !is_container_event(&o) {
                        let by_deadline = at >= p.deadline
                            && reason.starts_with("no verdict within");
                        let by_failures = p.check.is_some()
                            && matches!(o, Observation::ProbeFailed(_))
                            && streak >= p.max_failures;
                        prop_assert!(by_deadline || by_failures, "{} at {:?}", reason, at);
                    }
                }
            }
        }
    }

    #[test]
    fn prop_checkless_ignores_probes((p, run) in arb_run()) {
        // the same run with every probe result replaced by a tick decides identically
        let p = HealthParams { check: None, ..p };
        let mut a = Gate::new(p.clone());
        let mut b = Gate::new(p);
        for (at, o) in run {
            let o2 = if is_probe(&o) || o == Observation::ProbeNoResult {
                Observation::Tick
            } else {
                o.clone()
            };
            prop_assert_eq!(a.observe(at, o), b.observe(at, o2));
        }
    }

    #[test]
    fn prop_next_probe_is_never_before_grace_and_moves_forward((p, run) in arb_run()) {
        let p = HealthParams { check: Some(HealthCheck::Tcp { port: 1 }), ..p };
        let mut g = Gate::new(p.clone());
        let mut prev = g.next_probe_at().unwrap();
        prop_assert_eq!(prev, p.grace);
        for (at, o) in run {
            g.observe(at, o);
            match g.next_probe_at() {
                Some(n) => {
                    prop_assert!(n >= prev && n >= p.grace);
                    prev = n;
                }
                None => prop_assert!(g.verdict().is_decided()),
            }
        }
    }
}
