//! Tests of the wave specs, thresholds and the rollout state machine (`waves.rs`).

use super::*;
use proptest::prelude::*;

fn t(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
}

fn spec(s: &str) -> WaveSpec {
    s.parse().unwrap()
}

#[test]
fn wave_spec_parses_and_displays() {
    let s = spec("1, 10%,50%,all");
    assert_eq!(
        s.targets(),
        &[
            WaveTarget::Count(1),
            WaveTarget::Percent(10),
            WaveTarget::Percent(50),
            WaveTarget::Percent(100)
        ]
    );
    assert_eq!(s.to_string(), "1,10%,50%,100%");
    assert_eq!(spec("100%").to_string(), "100%");
    assert_eq!(spec("5,5,100%").targets().len(), 3);
    let j = serde_json::to_string(&s).unwrap();
    assert_eq!(j, r#""1,10%,50%,100%""#);
    assert_eq!(serde_json::from_str::<WaveSpec>(&j).unwrap(), s);
}

#[test]
fn wave_spec_errors() {
    let err = |s: &str| s.parse::<WaveSpec>().unwrap_err();
    assert_eq!(err(""), WaveError::Empty);
    assert_eq!(err("1,,100%"), WaveError::EmptyEntry { index: 2 });
    assert!(matches!(
        err("0,100%"),
        WaveError::BadEntry { index: 1, .. }
    ));
    assert!(matches!(err("0%,100%"), WaveError::BadEntry { .. }));
    assert!(matches!(err("101%"), WaveError::BadEntry { .. }));
    assert!(matches!(err("-1,100%"), WaveError::BadEntry { .. }));
    assert!(matches!(err("1.5%,100%"), WaveError::BadEntry { .. }));
    assert!(matches!(err("x,100%"), WaveError::BadEntry { .. }));
    assert!(matches!(
        err("10,5,100%"),
        WaveError::Decreasing { index: 2, .. }
    ));
    assert!(matches!(err("50%,10%,100%"), WaveError::Decreasing { .. }));
    let e = err("1,10%,50%");
    assert_eq!(e, WaveError::NotComplete { last: "50%".into() });
    assert!(e.to_string().contains("must be `100%` (or `all`)"));
    assert!(matches!(err("100%,5"), WaveError::NotComplete { .. }));
}

#[test]
fn plan_cumulative_counts() {
    let s = spec("1,10%,50%,100%");
    assert_eq!(plan(&s, 0), Vec::<usize>::new());
    assert_eq!(plan(&s, 1), vec![1]);
    assert_eq!(plan(&s, 2), vec![1, 2]);
    assert_eq!(plan(&s, 5), vec![1, 3, 5]);
    assert_eq!(plan(&s, 100), vec![1, 10, 50, 100]);
    assert_eq!(plan(&s, 101), vec![1, 11, 51, 101]);
    assert_eq!(plan(&spec("50,100%"), 10), vec![10]);
    // mixed kinds stay monotonic: 10% of 1000 = 100 covers the 20
    assert_eq!(plan(&spec("10%,20,100%"), 1000), vec![100, 1000]);
    assert_eq!(plan(&spec("10%,20,100%"), 100), vec![10, 20, 100]);
}

#[test]
fn thresholds() {
    let c: FailureThreshold = "1".parse().unwrap();
    assert!(!c.exceeded(1, 10));
    assert!(c.exceeded(2, 10));
    let z: FailureThreshold = "0".parse().unwrap();
    assert!(!z.exceeded(0, 10));
    assert!(z.exceeded(1, 10));
    let p: FailureThreshold = "5%".parse().unwrap();
    assert!(!p.exceeded(2, 40));
    assert!(p.exceeded(3, 40));
    assert!(p.exceeded(1, 10));
    assert!(!p.exceeded(1, 20));
    assert_eq!(p.to_string(), "5%");
    assert_eq!(serde_json::to_string(&p).unwrap(), r#""5%""#);
    for bad in ["", "x", "-1", "101%", "5 %", "%"] {
        assert!(bad.parse::<FailureThreshold>().is_err(), "{bad}");
    }
}

fn config(on_failure: OnFailure, max: &str) -> RolloutConfig {
    RolloutConfig {
        soak: Duration::from_secs(60),
        device_timeout: Duration::from_secs(300),
        max_failures: max.parse().unwrap(),
        on_failure,
    }
}

fn fleet(n: usize) -> Vec<(String, BTreeMap<String, String>)> {
    (0..n)
        .map(|i| {
            let labels = [("group".to_string(), "beta".to_string())].into();
            (format!("dev-{i:03}"), labels)
        })
        .collect()
}

fn rollout(n: usize, waves: &str, cfg: RolloutConfig) -> Rollout {
    let f = fleet(n);
    let cands = f.iter().map(|(id, l)| Candidate {
        id,
        labels: l,
        online: true,
    });
    Rollout::new("group=beta".parse().unwrap(), spec(waves), cfg, cands, t(0)).unwrap()
}

fn notify(d: &str) -> Action {
    Action::Notify { device: d.into() }
}

fn phase(p: Phase) -> DeviceReport {
    DeviceReport::Phase {
        sequence: 7,
        phase: p,
        reason: None,
        waiting: None,
    }
}

/// Record sequence 7 for the device and let it commit at `at`.
fn commit(r: &mut Rollout, d: &str, at: i64) -> Vec<Action> {
    assert!(r.notified(d, 7));
    r.on_report(d, phase(Phase::Committed), t(at))
}

#[test]
fn new_requires_a_match() {
    let none = BTreeMap::new();
    let e = Rollout::new(
        "group=beta".parse().unwrap(),
        spec("100%"),
        config(OnFailure::Pause, "0"),
        [Candidate {
            id: "x",
            labels: &none,
            online: true,
        }],
        t(0),
    )
    .unwrap_err();
    assert_eq!(e, RolloutError::EmptyFleet("group=beta".into()));
}

#[test]
fn happy_path_through_all_waves() {
    let mut r = rollout(4, "1,50%,100%", config(OnFailure::Pause, "0"));
    assert_eq!(r.targets(), &[1, 2, 4]);
    assert_eq!(
        r.on_tick(t(0)),
        vec![Action::StartWave { index: 0 }, notify("dev-000")]
    );
    assert_eq!(r.on_tick(t(1)), vec![]);
    assert_eq!(commit(&mut r, "dev-000", 10), vec![]);
    // soak not over yet
    assert_eq!(r.on_tick(t(69)), vec![]);
    assert_eq!(
        r.on_tick(t(70)),
        vec![
            Action::WaveCompleted { index: 0 },
            Action::StartWave { index: 1 },
            notify("dev-001")
        ]
    );
    assert_eq!(r.device("dev-000").unwrap().status, DeviceStatus::Succeeded);
    commit(&mut r, "dev-001", 80);
    assert_eq!(
        r.on_tick(t(140)),
        vec![
            Action::WaveCompleted { index: 1 },
            Action::StartWave { index: 2 },
            notify("dev-002"),
            notify("dev-003")
        ]
    );
    commit(&mut r, "dev-002", 150);
    commit(&mut r, "dev-003", 150);
    assert_eq!(
        r.on_tick(t(210)),
        vec![Action::WaveCompleted { index: 2 }, Action::Complete]
    );
    assert_eq!(r.state(), &RolloutState::Completed);
    assert_eq!(r.on_tick(t(1000)), vec![]);
}

#[test]
fn reports_for_other_sequences_are_ignored() {
    let mut r = rollout(1, "100%", config(OnFailure::Pause, "0"));
    r.on_tick(t(0));
    // no sequence recorded yet
    r.on_report("dev-000", phase(Phase::Committed), t(1));
    assert!(matches!(
        r.device("dev-000").unwrap().status,
        DeviceStatus::Notified { sequence: None, .. }
    ));
    r.notified("dev-000", 8);
    r.on_report("dev-000", phase(Phase::Failed), t(2));
    assert!(matches!(
        r.device("dev-000").unwrap().status,
        DeviceStatus::Notified {
            sequence: Some(8),
            ..
        }
    ));
    // progress phases change nothing; unknown devices are ignored
    let p = DeviceReport::Phase {
        sequence: 8,
        phase: Phase::Downloading,
        reason: None,
        waiting: None,
    };
    assert_eq!(r.on_report("dev-000", p.clone(), t(3)), vec![]);
    assert_eq!(r.on_report("nope", p, t(3)), vec![]);
    assert!(!r.notified("nope", 1));
}

#[test]
fn each_failure_phase_fails_the_device() {
    for (p, name) in [
        (Phase::RolledBack, "rolled_back"),
        (Phase::Failed, "failed"),
        (Phase::Rejected, "rejected"),
    ] {
        let mut r = rollout(2, "100%", config(OnFailure::Pause, "1"));
        r.on_tick(t(0));
        r.notified("dev-000", 7);
        assert_eq!(r.on_report("dev-000", phase(p), t(1)), vec![]);
        assert_eq!(
            r.device("dev-000").unwrap().status,
            DeviceStatus::Failed {
                reason: format!("reported {name}")
            }
        );
    }
}

#[test]
fn rolled_back_or_unhealthy_while_soaking_fails() {
    let mut r = rollout(2, "100%", config(OnFailure::Pause, "1"));
    r.on_tick(t(0));
    commit(&mut r, "dev-000", 1);
    commit(&mut r, "dev-001", 1);
    r.on_report("dev-000", phase(Phase::RolledBack), t(2));
    assert!(matches!(
        r.device("dev-000").unwrap().status,
        DeviceStatus::Failed { .. }
    ));
    let a = r.on_report(
        "dev-001",
        DeviceReport::Unhealthy {
            reason: "probe".into(),
        },
        t(3),
    );
    assert_eq!(
        r.device("dev-001").unwrap().status,
        DeviceStatus::Failed {
            reason: "unhealthy while soaking: probe".into()
        }
    );
    assert!(matches!(a.as_slice(), [Action::Pause { .. }]));
}

#[test]
fn timeout_counts_only_online_time() {
    let mut r = rollout(1, "100%", config(OnFailure::Pause, "0"));
    r.on_tick(t(0));
    r.on_report("dev-000", DeviceReport::Offline, t(100));
    // offline: no timeout however long
    assert_eq!(r.on_tick(t(10_000)), vec![]);
    r.on_report("dev-000", DeviceReport::Online, t(10_000));
    // a fresh window from coming back online
    assert_eq!(r.on_tick(t(10_299)), vec![]);
    let a = r.on_tick(t(10_300));
    assert!(matches!(
        r.device("dev-000").unwrap().status,
        DeviceStatus::Failed { ref reason } if reason.contains("no progress reported within 300s")
    ));
    assert!(matches!(a.as_slice(), [Action::Pause { .. }]));
}

#[test]
fn next_deadline_is_the_first_soak_end_or_timeout() {
    let mut r = rollout(3, "1,100%", config(OnFailure::Pause, "0"));
    assert_eq!(r.next_deadline(), None, "nothing started");
    r.on_tick(t(0));
    // dev-000 notified at 0: its timeout (300 s) is the only deadline
    assert_eq!(r.next_deadline(), Some(t(300)));
    commit(&mut r, "dev-000", 10);
    assert_eq!(r.next_deadline(), Some(t(70)), "the soak ends at 10 + 60");
    r.on_tick(t(70));
    // wave 2 notified dev-001 and dev-002 at 70; dev-002 goes offline (its timeout counts
    // online time only, so it has no deadline) and dev-001 commits at 75
    r.on_report("dev-002", DeviceReport::Offline, t(71));
    commit(&mut r, "dev-001", 75);
    assert_eq!(r.next_deadline(), Some(t(135)));
    r.on_tick(t(135));
    assert_eq!(r.next_deadline(), None, "only the offline device is left");
    r.on_report("dev-002", DeviceReport::Online, t(200));
    assert_eq!(r.next_deadline(), Some(t(500)), "online since 200 + 300");
    commit(&mut r, "dev-002", 210);
    r.on_tick(t(270));
    assert!(r.is_terminal());
    assert_eq!(r.next_deadline(), None);
}

#[test]
fn soak_waits_for_the_device_to_be_online() {
    let mut r = rollout(1, "100%", config(OnFailure::Pause, "0"));
    r.on_tick(t(0));
    commit(&mut r, "dev-000", 0);
    r.on_report("dev-000", DeviceReport::Offline, t(30));
    assert_eq!(r.on_tick(t(100)), vec![]);
    assert_eq!(
        r.on_report("dev-000", DeviceReport::Online, t(200)),
        vec![Action::WaveCompleted { index: 0 }, Action::Complete]
    );
}

#[test]
fn threshold_pauses_and_resume_forgives() {
    let mut r = rollout(10, "5,100%", config(OnFailure::Pause, "1"));
    let a = r.on_tick(t(0));
    assert_eq!(a.len(), 6);
    r.notified("dev-000", 7);
    r.notified("dev-001", 7);
    r.notified("dev-002", 7);
    // one failure is tolerated
    assert_eq!(r.on_report("dev-000", phase(Phase::Failed), t(1)), vec![]);
    let a = r.on_report("dev-001", phase(Phase::Failed), t(2));
    let reason = "wave 1: 2 of 5 devices failed (max failures 1)".to_string();
    assert_eq!(
        a,
        vec![Action::Pause {
            reason: reason.clone()
        }]
    );
    assert_eq!(r.state(), &RolloutState::Paused { reason });
    // while paused: soaks and timeouts go on, nothing new starts
    commit(&mut r, "dev-002", 3);
    assert_eq!(r.on_tick(t(1000)), vec![]);
    assert_eq!(r.device("dev-002").unwrap().status, DeviceStatus::Succeeded);
    assert!(r
        .on_report("dev-003", DeviceReport::Online, t(1000))
        .is_empty());
    // resume: the two failures are acknowledged; the rest of wave 0 timed out meanwhile
    let a = r.resume(t(1001)).unwrap();
    assert_eq!(
        a[..3],
        [
            Action::WaveCompleted { index: 0 },
            Action::StartWave { index: 1 },
            notify("dev-005")
        ]
    );
    assert_eq!(a.len(), 7);
    assert_eq!(r.state(), &RolloutState::Running);
    assert_eq!(
        r.resume(t(1002)).unwrap_err(),
        RolloutError::NotPaused("running".into())
    );
    // new failures in wave 1 count from zero again
    r.notified("dev-005", 7);
    assert_eq!(
        r.on_report("dev-005", phase(Phase::Failed), t(1003)),
        vec![]
    );
}

#[test]
fn resume_continues_with_the_next_wave() {
    let mut r = rollout(3, "1,100%", config(OnFailure::Pause, "0"));
    r.on_tick(t(0));
    r.notified("dev-000", 7);
    let a = r.on_report("dev-000", phase(Phase::Rejected), t(1));
    assert!(matches!(a.as_slice(), [Action::Pause { .. }]));
    assert_eq!(
        r.resume(t(2)).unwrap(),
        vec![
            Action::WaveCompleted { index: 0 },
            Action::StartWave { index: 1 },
            notify("dev-001"),
            notify("dev-002")
        ]
    );
    assert_eq!(r.state(), &RolloutState::Running);
}

#[test]
fn revert_sends_notified_devices_back() {
    let mut r = rollout(4, "2,100%", config(OnFailure::Revert, "0%"));
    r.on_tick(t(0));
    commit(&mut r, "dev-000", 1);
    r.notified("dev-001", 7);
    let a = r.on_report("dev-001", phase(Phase::Failed), t(2));
    assert_eq!(
        a,
        vec![
            Action::Pause {
                reason: "wave 1: 1 of 2 devices failed (max failures 0%)".into()
            },
            Action::Revert {
                devices: vec!["dev-000".into(), "dev-001".into()]
            }
        ]
    );
    assert!(matches!(r.state(), RolloutState::Reverted { .. }));
    assert!(r.resume(t(3)).is_err());
    assert_eq!(r.on_tick(t(1000)), vec![]);
}

#[test]
fn offline_devices_stay_pending_and_catch_up() {
    let f = fleet(3);
    let cands = f.iter().enumerate().map(|(i, (id, l))| Candidate {
        id,
        labels: l,
        online: i != 0,
    });
    let cfg = config(OnFailure::Pause, "0");
    let mut r = Rollout::new(Selector::all(), spec("1,100%"), cfg, cands, t(0)).unwrap();
    // dev-000 is offline: wave 0 takes dev-001
    assert_eq!(
        r.on_tick(t(0)),
        vec![Action::StartWave { index: 0 }, notify("dev-001")]
    );
    commit(&mut r, "dev-001", 0);
    assert_eq!(
        r.on_tick(t(60)),
        vec![
            Action::WaveCompleted { index: 0 },
            Action::StartWave { index: 1 },
            notify("dev-002")
        ]
    );
    commit(&mut r, "dev-002", 60);
    // the last wave waits for the offline device
    assert_eq!(r.on_tick(t(500)), vec![]);
    assert_eq!(r.device("dev-000").unwrap().status, DeviceStatus::Pending);
    assert_eq!(
        r.on_report("dev-000", DeviceReport::Online, t(600)),
        vec![notify("dev-000")]
    );
    assert_eq!(r.device("dev-000").unwrap().wave, Some(1));
    commit(&mut r, "dev-000", 600);
    assert_eq!(
        r.on_tick(t(660)),
        vec![Action::WaveCompleted { index: 1 }, Action::Complete]
    );
}

#[test]
fn an_empty_wave_waits_for_a_device() {
    let f = fleet(1);
    let cands = f.iter().map(|(id, l)| Candidate {
        id,
        labels: l,
        online: false,
    });
    let cfg = config(OnFailure::Pause, "0");
    let mut r = Rollout::new(Selector::all(), spec("100%"), cfg, cands, t(0)).unwrap();
    assert_eq!(r.on_tick(t(0)), vec![Action::StartWave { index: 0 }]);
    assert_eq!(r.on_tick(t(100)), vec![]);
    assert_eq!(r.state(), &RolloutState::Running);
}

#[test]
fn new_matching_devices_join_the_current_or_a_later_wave() {
    let mut r = rollout(2, "1,100%", config(OnFailure::Pause, "0"));
    r.on_tick(t(0));
    let beta: BTreeMap<String, String> = [("group".into(), "beta".into())].into();
    let alpha: BTreeMap<String, String> = [("group".into(), "alpha".into())].into();
    let cand = |id, labels| Candidate {
        id,
        labels,
        online: true,
    };
    // wave 0 is full (1 device): the newcomer waits
    assert_eq!(r.offer(cand("new-1", &beta), t(1)), vec![]);
    assert_eq!(r.offer(cand("other", &alpha), t(1)), vec![]);
    assert!(r.device("other").is_none());
    commit(&mut r, "dev-000", 1);
    assert_eq!(
        r.on_tick(t(61)),
        vec![
            Action::WaveCompleted { index: 0 },
            Action::StartWave { index: 1 },
            notify("dev-001"),
            notify("new-1")
        ]
    );
    // joins the running last wave right away; offering it again does nothing
    assert_eq!(r.offer(cand("new-2", &beta), t(62)), vec![notify("new-2")]);
    assert_eq!(r.offer(cand("new-2", &beta), t(63)), vec![]);
}

#[test]
fn serde_roundtrip_mid_wave() {
    let mut r = rollout(3, "1,100%", config(OnFailure::Pause, "0"));
    r.on_tick(t(0));
    commit(&mut r, "dev-000", 5);
    let j = serde_json::to_string(&r).unwrap();
    let mut back: Rollout = serde_json::from_str(&j).unwrap();
    assert_eq!(back, r);
    assert_eq!(back.on_tick(t(65)), r.on_tick(t(65)));
    assert_eq!(back, r);
}

// --- properties ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Tick(i64),
    Online(usize),
    Offline(usize),
    Notified(usize),
    Phase(usize, u8),
    Unhealthy(usize),
    Offer(usize),
    Resume,
}

const DEVICES: usize = 8;

/// The reports `Op::Phase` sends for sequence 7: results, progress, and progress that waits.
const REPORTS: [(Phase, Option<Waiting>); 10] = [
    (Phase::Committed, None),
    (Phase::Committed, None),
    (Phase::RolledBack, None),
    (Phase::Failed, None),
    (Phase::Superseded, None),
    (Phase::Downloading, None),
    (Phase::Downloading, Some(Waiting::Retrying)),
    (Phase::Downloaded, Some(Waiting::Window)),
    (Phase::Downloaded, Some(Waiting::Lock)),
    (Phase::Switching, None),
];

fn report_op(p: u8) -> DeviceReport {
    let (phase, waiting) = REPORTS[p as usize % REPORTS.len()];
    DeviceReport::Phase {
        sequence: 7,
        phase,
        reason: waiting.map(|w| format!("waits for {w}")),
        waiting,
    }
}

fn op() -> impl Strategy<Value = Op> {
    let d = 0..DEVICES;
    prop_oneof![
        3 => (1i64..200).prop_map(Op::Tick),
        1 => (d.clone()).prop_map(Op::Online),
        1 => (d.clone()).prop_map(Op::Offline),
        3 => (d.clone()).prop_map(Op::Notified),
        6 => (d.clone(), 0..REPORTS.len() as u8).prop_map(|(d, p)| Op::Phase(d, p)),
        1 => (d.clone()).prop_map(Op::Unhealthy),
        1 => (d.clone()).prop_map(Op::Offer),
        1 => Just(Op::Resume),
    ]
}

fn id(i: usize) -> String {
    format!("dev-{i:03}")
}

/// Runs one op; `now` advances. Returns the actions and whether it was a successful resume.
fn apply(r: &mut Rollout, op: &Op, now: &mut i64) -> (Vec<Action>, bool) {
    let labels: BTreeMap<String, String> = [("group".into(), "beta".into())].into();
    *now += 1;
    match *op {
        Op::Tick(s) => {
            *now += s;
            (r.on_tick(t(*now)), false)
        }
        Op::Online(d) => (r.on_report(&id(d), DeviceReport::Online, t(*now)), false),
        Op::Offline(d) => (r.on_report(&id(d), DeviceReport::Offline, t(*now)), false),
        Op::Notified(d) => {
            r.notified(&id(d), 7);
            (Vec::new(), false)
        }
        Op::Phase(d, p) => (r.on_report(&id(d), report_op(p), t(*now)), false),
        Op::Unhealthy(d) => {
            let rep = DeviceReport::Unhealthy { reason: "x".into() };
            (r.on_report(&id(d), rep, t(*now)), false)
        }
        Op::Offer(d) => {
            let c = Candidate {
                id: &format!("new-{d}"),
                labels: &labels,
                online: d % 2 == 0,
            };
            (r.offer(c, t(*now)), false)
        }
        Op::Resume => match r.resume(t(*now)) {
            Ok(a) => (a, true),
            Err(_) => (Vec::new(), false),
        },
    }
}

fn arb_rollout() -> impl Strategy<Value = Rollout> {
    (
        1usize..DEVICES,
        prop_oneof![Just("1,10%,50%,100%"), Just("100%"), Just("2,3,all")],
        prop_oneof![Just("0"), Just("1"), Just("30%")],
        any::<bool>(),
        proptest::collection::vec(any::<bool>(), DEVICES),
    )
        .prop_map(|(n, waves, max, revert, online)| {
            let f = fleet(n);
            let cands = f.iter().enumerate().map(|(i, (id, l))| Candidate {
                id,
                labels: l,
                online: online[i],
            });
            let mut cfg = config(
                if revert {
                    OnFailure::Revert
                } else {
                    OnFailure::Pause
                },
                max,
            );
            cfg.soak = Duration::from_secs(50);
            cfg.device_timeout = Duration::from_secs(150);
            Rollout::new(Selector::all(), spec(waves), cfg, cands, t(0)).unwrap()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn state_machine_invariants(
        mut r in arb_rollout(),
        ops in proptest::collection::vec(op(), 0..80),
    ) {
        let mut now = 0;
        let mut notified = std::collections::BTreeSet::new();
        let mut next_wave = 0;
        let mut paused = false;
        let mut actions = r.on_tick(t(0));
        let mut pauses = 0;
        for o in ops.iter().map(Some).chain([None]) {
            for a in &actions {
                match a {
                    // (a) never notified twice
                    Action::Notify { device } => {
                        prop_assert!(!paused, "Notify while paused: {:?}", actions);
                        prop_assert!(notified.insert(device.clone()), "{} twice", device);
                    }
                    // (b) waves start in order, never repeat
                    Action::StartWave { index } => {
                        prop_assert!(!paused);
                        prop_assert_eq!(*index, next_wave);
                        next_wave += 1;
                    }
                    // (c) nothing after Pause until resume
                    Action::Pause { .. } => {
                        paused = true;
                        pauses += 1;
                    }
                    _ => {}
                }
            }
            let Some(o) = o else { break };
            let (a, resumed) = apply(&mut r, o, &mut now);
            if resumed {
                prop_assert!(paused);
                paused = false;
            }
            actions = a;
        }
        prop_assert!(next_wave <= r.targets().len());
        prop_assert!(pauses <= 1 + ops.iter().filter(|o| matches!(o, Op::Resume)).count());
    }

    /// (e) `next_deadline` is exact: ticking just before it changes no device's status
    /// more than ticking now does, ticking at it changes one.
    #[test]
    fn next_deadline_is_when_time_changes_something(
        mut r in arb_rollout(),
        ops in proptest::collection::vec(op(), 0..60),
    ) {
        let kinds = |r: &Rollout| -> Vec<std::mem::Discriminant<DeviceStatus>> {
            r.devices().values().map(|d| std::mem::discriminant(&d.status)).collect()
        };
        let mut now = 0;
        r.on_tick(t(0));
        for o in &ops {
            apply(&mut r, o, &mut now);
            let Some(dl) = r.next_deadline() else { continue };
            prop_assert!(!r.is_terminal());
            let mut at_now = r.clone();
            at_now.on_tick(t(now));
            if dl <= t(now) {
                continue;
            }
            let mut before = r.clone();
            before.on_tick(dl - TimeDelta::milliseconds(1));
            prop_assert_eq!(kinds(&before), kinds(&at_now));
            // At the deadline: the device whose soak or timeout ends there changes.
            let mut at = r.clone();
            at.on_tick(dl);
            prop_assert_ne!(kinds(&at), kinds(&r));
        }
    }

    /// (d) a rollout restored from JSON behaves exactly like the original.
    #[test]
    fn serde_roundtrip_keeps_behaviour(
        mut r in arb_rollout(),
        before in proptest::collection::vec(op(), 0..40),
        after in proptest::collection::vec(op(), 0..40),
    ) {
        let mut now = 0;
        r.on_tick(t(0));
        for o in &before {
            apply(&mut r, o, &mut now);
        }
        let mut back: Rollout = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        prop_assert_eq!(&back, &r);
        let mut now2 = now;
        for o in &after {
            let a = apply(&mut r, o, &mut now);
            let b = apply(&mut back, o, &mut now2);
            prop_assert_eq!(a, b);
        }
        prop_assert_eq!(back, r);
    }

    #[test]
    fn plan_is_strictly_increasing_and_ends_at_the_fleet(
        entries in proptest::collection::vec(prop_oneof![
            (1usize..50).prop_map(WaveTarget::Count),
            (1u8..=100).prop_map(WaveTarget::Percent),
        ], 0..5),
        fleet in 0usize..500,
    ) {
        let mut targets = entries;
        targets.push(WaveTarget::Percent(100));
        let p = plan(&WaveSpec { targets: targets.clone() }, fleet);
        prop_assert!(p.len() <= targets.len());
        prop_assert!(p.windows(2).all(|w| w[0] < w[1]));
        if fleet == 0 {
            prop_assert!(p.is_empty());
        } else {
            prop_assert!(p[0] >= 1);
            prop_assert_eq!(*p.last().unwrap(), fleet);
        }
    }
}

#[test]
fn operator_pause_resume_and_abort() {
    let mut r = rollout(4, "1,100%", config(OnFailure::Pause, "1"));
    assert_eq!(
        r.on_tick(t(0)),
        vec![Action::StartWave { index: 0 }, notify("dev-000")]
    );
    r.pause("by operator").unwrap();
    assert_eq!(r.state().name(), "paused");
    assert_eq!(
        r.pause("again"),
        Err(RolloutError::NotRunning("paused".into()))
    );
    // results are recorded while paused, but no wave starts
    r.notified("dev-000", 7);
    commit(&mut r, "dev-000", 1);
    assert_eq!(r.on_tick(t(100)), vec![]);
    assert_eq!(r.device("dev-000").unwrap().status, DeviceStatus::Succeeded);
    let a = r.resume(t(101)).unwrap();
    assert_eq!(a[0], Action::WaveCompleted { index: 0 });
    assert_eq!(
        a.iter()
            .filter(|a| matches!(a, Action::Notify { .. }))
            .count(),
        3
    );
    r.abort("enough").unwrap();
    assert_eq!(
        r.state(),
        &RolloutState::Aborted {
            reason: "enough".into()
        }
    );
    assert!(r.state().is_terminal());
    assert_eq!(r.abort("twice"), Err(RolloutError::Ended("aborted".into())));
    assert_eq!(
        r.resume(t(102)),
        Err(RolloutError::NotPaused("aborted".into()))
    );
    assert_eq!(r.on_tick(t(200)), vec![]);
    assert_eq!(
        r.on_report("dev-001", phase(Phase::Committed), t(201)),
        vec![]
    );
}

#[test]
fn failure_reason_from_the_device_and_summary() {
    let mut r = rollout(3, "2,100%", config(OnFailure::Pause, "2"));
    r.on_tick(t(0));
    r.notified("dev-000", 7);
    r.notified("dev-001", 7);
    let rep = DeviceReport::Phase {
        sequence: 7,
        phase: Phase::RolledBack,
        reason: Some("health gate: http 500".into()),
        waiting: None,
    };
    r.on_report("dev-000", rep, t(1));
    commit(&mut r, "dev-001", 2);
    let s = r.summary();
    assert_eq!((s.devices, s.pending, s.soaking, s.failed), (3, 1, 1, 1));
    assert_eq!(
        s.failures,
        vec![(
            "rolled_back: health gate: http 500".to_string(),
            vec!["dev-000".to_string()]
        )]
    );
    assert_eq!(s.waves.len(), 2);
    assert_eq!(
        s.waves[0],
        WaveSummary {
            index: 0,
            target: 2,
            started: true,
            devices: 2,
            notified: 0,
            soaking: 1,
            succeeded: 0,
            failed: 1,
            ..Default::default()
        }
    );
    assert!(!s.waves[1].started);
}

#[test]
fn a_device_that_cannot_be_notified_fails() {
    let mut r = rollout(2, "100%", config(OnFailure::Pause, "1"));
    r.on_tick(t(0));
    assert_eq!(r.fail("dev-000", "no image for linux/s390x", t(1)), vec![]);
    assert_eq!(
        r.device("dev-000").unwrap().status,
        DeviceStatus::Failed {
            reason: "no image for linux/s390x".into()
        }
    );
    // only a notified device can fail this way
    r.notified("dev-001", 7);
    commit(&mut r, "dev-001", 2);
    r.fail("dev-001", "x", t(3));
    assert!(matches!(
        r.device("dev-001").unwrap().status,
        DeviceStatus::Committed { .. }
    ));
}

proptest! {
    /// Recording a batch then ticking once ends where reporting one by one does.
    #[test]
    fn prop_batched_reports_match_one_by_one(ops in proptest::collection::vec(op(), 1..40)) {
        let mut a = rollout(6, "1,50%,100%", config(OnFailure::Pause, "2"));
        let mut b = a.clone();
        a.on_tick(t(0));
        b.on_tick(t(0));
        for d in 0..6 {
            a.notified(&id(d), 7);
            b.notified(&id(d), 7);
        }
        let mut now = 1;
        for o in &ops {
            now += 1;
            let (dev, rep) = match *o {
                Op::Phase(d, p) => (id(d), report_op(p)),
                Op::Unhealthy(d) => (id(d), DeviceReport::Unhealthy { reason: "x".into() }),
                Op::Offline(d) => (id(d), DeviceReport::Offline),
                Op::Online(d) => (id(d), DeviceReport::Online),
                _ => continue,
            };
            a.on_report(&dev, rep.clone(), t(now));
            b.record(&dev, rep, t(now));
        }
        b.on_tick(t(now));
        a.on_tick(t(now));
        prop_assert_eq!(a.summary().failed, b.summary().failed);
        prop_assert_eq!(a.summary().soaking + a.summary().succeeded, b.summary().soaking + b.summary().succeeded);
        let waits = |s: Summary| (s.held_window, s.held_lock, s.retrying, s.waiting);
        prop_assert_eq!(waits(a.summary()), waits(b.summary()));
    }
}

// --- device timeout: online time without progress; holds -------------------------------------

fn report(sequence: u64, p: Phase, waiting: Option<Waiting>, reason: Option<&str>) -> DeviceReport {
    DeviceReport::Phase {
        sequence,
        phase: p,
        reason: reason.map(str::to_string),
        waiting,
    }
}

fn status(r: &Rollout, d: &str) -> DeviceStatus {
    r.device(d).unwrap().status.clone()
}

fn is_notified(r: &Rollout, d: &str) -> bool {
    matches!(status(r, d), DeviceStatus::Notified { .. })
}

/// One device, notified at 0 with sequence 7, timeout 300 s.
fn one_notified() -> Rollout {
    let mut r = rollout(1, "100%", config(OnFailure::Pause, "0"));
    r.on_tick(t(0));
    assert!(r.notified("dev-000", 7));
    r
}

#[test]
fn progress_restarts_the_device_timeout() {
    let mut r = one_notified();
    assert_eq!(r.next_deadline(), Some(t(300)));
    r.on_report("dev-000", phase(Phase::Received), t(100));
    assert_eq!(r.next_deadline(), Some(t(400)));
    r.on_report("dev-000", phase(Phase::Downloading), t(250));
    assert_eq!(r.next_deadline(), Some(t(550)));
    // past the old deadline (300 after the notice), still in its wave
    assert_eq!(r.on_tick(t(549)), vec![]);
    assert!(is_notified(&r, "dev-000"));
    // progress for another sequence is not progress of this notice
    r.on_report("dev-000", report(6, Phase::Downloading, None, None), t(540));
    assert_eq!(r.next_deadline(), Some(t(550)));
    let a = r.on_tick(t(550));
    assert_eq!(
        status(&r, "dev-000"),
        DeviceStatus::Failed {
            reason: "no progress reported within 300s online".into()
        }
    );
    assert!(matches!(a.as_slice(), [Action::Pause { .. }]));
}

#[test]
fn a_rollback_that_failed_fails_the_device() {
    // Not an end on the box (it keeps retrying), but the update has failed and the box runs
    // neither set: the rollout counts it at once.
    let mut r = one_notified();
    r.on_report("dev-000", phase(Phase::RollbackFailed), t(200));
    assert_eq!(
        status(&r, "dev-000"),
        DeviceStatus::Failed {
            reason: "reported rollback_failed".into()
        }
    );
}

#[test]
fn every_non_terminal_phase_is_progress() {
    // Except rollback_failed: see a_rollback_that_failed_fails_the_device.
    for p in Phase::ALL
        .into_iter()
        .filter(|p| !p.is_terminal() && *p != Phase::RollbackFailed)
    {
        let mut r = one_notified();
        r.on_report("dev-000", phase(p), t(200));
        r.on_tick(t(499));
        assert!(
            is_notified(&r, "dev-000"),
            "{p}: {:?}",
            status(&r, "dev-000")
        );
        r.on_tick(t(500));
        assert!(!is_notified(&r, "dev-000"), "{p}");
    }
}

#[test]
fn retrying_reports_keep_a_device_past_the_old_timeout() {
    let mut r = one_notified();
    // the registry is dark for an hour; the agent reports each retry (backoff capped at 60 s)
    let why = "registry 10.0.0.5:5000: connection refused; retrying in 60 s";
    for s in (30..3600).step_by(60) {
        let rep = report(7, Phase::Downloading, Some(Waiting::Retrying), Some(why));
        assert_eq!(r.on_report("dev-000", rep, t(s)), vec![]);
        assert_eq!(r.on_tick(t(s + 59)), vec![]);
    }
    assert!(is_notified(&r, "dev-000"));
    let s = r.summary();
    assert_eq!(
        (s.notified, s.retrying, s.held_window, s.held_lock),
        (1, 1, 0, 0)
    );
    assert_eq!((s.waves[0].notified, s.waves[0].retrying), (1, 1));
    assert_eq!(
        s.waiting,
        vec![WaitGroup {
            waiting: Waiting::Retrying,
            reason: Some(why.into()),
            devices: vec!["dev-000".into()]
        }]
    );
    // retrying is progress, not a hold: the clock runs from the last report (3570)
    assert_eq!(r.next_deadline(), Some(t(3870)));
    // the download resumes: a plain progress report ends the retrying
    r.on_report("dev-000", phase(Phase::Downloading), t(3600));
    assert_eq!(r.summary().retrying, 0);
    assert!(r.summary().waiting.is_empty());
    // then it goes silent while online: it times out 300 s after its last report
    assert_eq!(r.on_tick(t(3899)), vec![]);
    assert!(matches!(
        r.on_tick(t(3900)).as_slice(),
        [Action::Pause { .. }]
    ));
    assert!(matches!(status(&r, "dev-000"), DeviceStatus::Failed { .. }));
}

#[test]
fn window_and_lock_suspend_the_timeout_until_a_plain_report() {
    let mut r = one_notified();
    let window = "maintenance window 02:00-04:00 opens in 3 h";
    r.on_report(
        "dev-000",
        report(7, Phase::Downloaded, Some(Waiting::Window), Some(window)),
        t(100),
    );
    assert_eq!(r.next_deadline(), None, "held: no deadline");
    // hours of waiting for the window, online and silent: still in the wave
    assert_eq!(r.on_tick(t(10_000)), vec![]);
    assert!(is_notified(&r, "dev-000"));
    let s = r.summary();
    assert_eq!((s.held_window, s.held_lock, s.retrying), (1, 0, 0));
    assert_eq!(s.waves[0].held_window, 1);
    assert_eq!(s.waiting[0].reason.as_deref(), Some(window));
    // the same wait repeated with a newer reason keeps when it began
    let later = "maintenance window 02:00-04:00 opens in 1 h";
    r.on_report(
        "dev-000",
        report(7, Phase::Downloaded, Some(Waiting::Window), Some(later)),
        t(10_100),
    );
    let DeviceStatus::Notified { wait: Some(w), .. } = status(&r, "dev-000") else {
        panic!("{:?}", status(&r, "dev-000"))
    };
    assert_eq!(
        (w.kind, w.reason.as_deref(), w.since),
        (Waiting::Window, Some(later), t(100))
    );
    // going offline and back does not end the hold
    r.on_report("dev-000", DeviceReport::Offline, t(10_200));
    r.on_report("dev-000", DeviceReport::Online, t(10_300));
    assert_eq!(r.next_deadline(), None);
    assert_eq!(r.on_tick(t(20_000)), vec![]);
    // the window opens, an app holds its update lock: held still, now by the lock
    r.on_report(
        "dev-000",
        report(
            7,
            Phase::Downloaded,
            Some(Waiting::Lock),
            Some("sensor holds its update lock"),
        ),
        t(20_000),
    );
    let s = r.summary();
    assert_eq!((s.held_window, s.held_lock), (0, 1));
    assert_eq!(s.waves[0].held_lock, 1);
    assert_eq!(r.on_tick(t(30_000)), vec![]);
    assert_eq!(r.next_deadline(), None);
    // the lock is released: a report without window/lock resumes the clock from then
    r.on_report("dev-000", phase(Phase::Switching), t(30_000));
    assert_eq!(r.summary().held_lock, 0);
    assert_eq!(r.next_deadline(), Some(t(30_300)));
    assert_eq!(r.on_tick(t(30_299)), vec![]);
    r.on_tick(t(30_300));
    assert!(matches!(status(&r, "dev-000"), DeviceStatus::Failed { .. }));
}

#[test]
fn a_held_device_still_commits_or_fails() {
    let mut r = rollout(2, "100%", config(OnFailure::Pause, "1"));
    r.on_tick(t(0));
    for d in ["dev-000", "dev-001"] {
        r.notified(d, 7);
        let rep = report(7, Phase::Downloaded, Some(Waiting::Lock), Some("locked"));
        r.on_report(d, rep, t(1));
    }
    r.on_report("dev-000", phase(Phase::Committed), t(5000));
    assert!(matches!(
        status(&r, "dev-000"),
        DeviceStatus::Committed { .. }
    ));
    r.on_report(
        "dev-001",
        report(7, Phase::Failed, None, Some("disk full")),
        t(5000),
    );
    assert_eq!(
        status(&r, "dev-001"),
        DeviceStatus::Failed {
            reason: "failed: disk full".into()
        }
    );
    let s = r.summary();
    assert_eq!((s.held_lock, s.notified), (0, 0));
    assert!(s.waiting.is_empty());
}

#[test]
fn silence_while_online_still_times_out() {
    // notified, one progress report, then nothing while online
    let mut r = one_notified();
    r.on_report("dev-000", phase(Phase::Verified), t(50));
    assert_eq!(r.on_tick(t(349)), vec![]);
    let a = r.on_tick(t(350));
    assert!(matches!(a.as_slice(), [Action::Pause { .. }]));
    assert_eq!(
        status(&r, "dev-000"),
        DeviceStatus::Failed {
            reason: "no progress reported within 300s online".into()
        }
    );
}

#[test]
fn superseded_fails_the_device_with_the_agents_reason() {
    let mut r = one_notified();
    let rep = report(
        7,
        Phase::Superseded,
        None,
        Some("a newer notice (sequence 8) arrived before the switch"),
    );
    let a = r.on_report("dev-000", rep, t(10));
    assert_eq!(
        status(&r, "dev-000"),
        DeviceStatus::Failed {
            reason: "superseded: a newer notice (sequence 8) arrived before the switch".into()
        }
    );
    assert!(matches!(a.as_slice(), [Action::Pause { .. }]));
    // without a reason, like the other failure phases
    let mut r = one_notified();
    r.on_report("dev-000", phase(Phase::Superseded), t(10));
    assert_eq!(
        status(&r, "dev-000"),
        DeviceStatus::Failed {
            reason: "reported superseded".into()
        }
    );
    // superseded for another sequence changes nothing
    let mut r = one_notified();
    r.on_report("dev-000", report(6, Phase::Superseded, None, None), t(10));
    assert!(is_notified(&r, "dev-000"));
}

#[test]
fn waiting_groups_by_kind_and_reason_largest_first() {
    let mut r = rollout(5, "2,100%", config(OnFailure::Pause, "0"));
    r.on_tick(t(0));
    for d in ["dev-000", "dev-001"] {
        r.notified(d, 7);
    }
    let w = |kind, why: &str| report(7, Phase::Downloaded, Some(kind), Some(why));
    r.on_report("dev-000", w(Waiting::Window, "window 02:00-04:00"), t(1));
    r.on_report("dev-001", w(Waiting::Window, "window 02:00-04:00"), t(1));
    // wave 2 starts once wave 1 is done: it is not, the waits are shown per wave
    let s = r.summary();
    assert_eq!(s.waves[0].held_window, 2);
    assert_eq!(s.waves[1].held_window, 0);
    assert_eq!(s.waiting.len(), 1);
    assert_eq!(s.waiting[0].devices, ["dev-000", "dev-001"]);
    r.on_report("dev-001", w(Waiting::Lock, "sensor: locked"), t(2));
    let s = r.summary();
    assert_eq!(
        s.waiting
            .iter()
            .map(|g| (g.waiting, g.devices.len()))
            .collect::<Vec<_>>(),
        [(Waiting::Lock, 1), (Waiting::Window, 1)]
    );
    assert_eq!(
        serde_json::to_value(&s.waiting[0]).unwrap()["waiting"],
        "lock"
    );
}

/// A rollout as the previous version stored it (no progress or wait on its notified device):
/// it loads, and its notified device times out as before.
#[test]
fn a_rollout_stored_by_the_previous_version_loads() {
    let stored = r#"{"selector":"group=beta","spec":"2,100%","config":{"soak":{"secs":60,"nanos":0},"device_timeout":{"secs":300,"nanos":0},"max_failures":"0","on_failure":"pause"},"targets":[2,3],"waves":[{"started_at":"2023-11-14T22:13:20Z","forgiven":0}],"state":{"state":"running"},"devices":{"dev-000":{"status":{"status":"notified","sequence":7,"at":"2023-11-14T22:13:20Z"},"wave":0,"online":true,"online_since":"2023-11-14T22:13:20Z"},"dev-001":{"status":{"status":"committed","sequence":7,"at":"2023-11-14T22:13:30Z"},"wave":0,"online":true,"online_since":"2023-11-14T22:13:20Z"},"dev-002":{"status":{"status":"pending"},"wave":null,"online":true,"online_since":"2023-11-14T22:13:20Z"}}}"#;
    let mut r: Rollout = serde_json::from_str(stored).unwrap();
    assert_eq!(
        status(&r, "dev-000"),
        DeviceStatus::Notified {
            sequence: Some(7),
            at: t(0),
            progress_at: None,
            wait: None
        }
    );
    assert_eq!(r.next_deadline(), Some(t(70)), "dev-001's soak");
    r.on_tick(t(70));
    assert_eq!(r.next_deadline(), Some(t(300)), "dev-000's timeout");
    // and written back, a notified device without progress looks as it did
    let again = serde_json::to_string(&r).unwrap();
    assert!(
        again
            .contains(r#""status":{"status":"notified","sequence":7,"at":"2023-11-14T22:13:20Z"}"#),
        "{again}"
    );
    r.on_report("dev-000", phase(Phase::Downloading), t(100));
    assert_eq!(r.next_deadline(), Some(t(400)));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Time alone fails exactly the notified devices that are online, have a sequence or not,
    /// and are not held by a window or a lock; a held device stays however long it waits.
    #[test]
    fn time_alone_fails_exactly_the_online_unheld_notified_devices(
        mut r in arb_rollout(),
        ops in proptest::collection::vec(op(), 0..60),
    ) {
        let mut now = 0;
        r.on_tick(t(0));
        for o in &ops {
            apply(&mut r, o, &mut now);
        }
        if r.is_terminal() {
            return Ok(());
        }
        let mut later = r.clone();
        later.on_tick(t(now + 1_000_000));
        for (id, d) in r.devices() {
            let DeviceStatus::Notified { wait, .. } = &d.status else { continue };
            let held = wait
                .as_ref()
                .is_some_and(|w| matches!(w.kind, Waiting::Window | Waiting::Lock));
            let after = &later.device(id).unwrap().status;
            if held || !d.online {
                prop_assert!(matches!(after, DeviceStatus::Notified { .. }), "{} {:?}", id, after);
            } else {
                prop_assert!(
                    matches!(after, DeviceStatus::Failed { reason } if reason.starts_with("no progress")),
                    "{} {:?}", id, after
                );
            }
        }
    }
}
