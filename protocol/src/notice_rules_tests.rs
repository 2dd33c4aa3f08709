//! Unit tests of `notice_rules.rs`.

use std::collections::BTreeMap;

use super::*;
use crate::desired::Strategy;
use crate::release::{ContainerSpec, HealthSpec};
use proptest::prelude::*;

const SHA: [u8; 32] = [7; 32];

fn now() -> DateTime<Utc> {
    "2026-11-22T10:00:00Z".parse().unwrap()
}

fn release(app: &str, version: &str) -> Release {
    Release {
        app: app.into(),
        version: version.parse().unwrap(),
        image: format!("127.0.0.1:5055/ferry/{app}"),
        platforms: [
            (
                "linux/arm64".to_string(),
                format!("sha256:{}", "a".repeat(64)),
            ),
            (
                "linux/amd64".to_string(),
                format!("sha256:{}", "b".repeat(64)),
            ),
        ]
        .into(),
        container: ContainerSpec::default(),
        health: HealthSpec::default(),
        created_at: now(),
    }
}

fn desired(seq: u64) -> Desired {
    Desired {
        settings: Default::default(),
        force: false,
        device: "dev-001".into(),
        sequence: seq,
        issued_at: now(),
        expires_at: now() + Duration::days(30),
        // The rules read the verified releases, not the envelopes.
        apps: BTreeMap::new(),
        strategy: Strategy::StopFirst,
        allow_downgrade: false,
        rollout: Some("r-1".into()),
    }
}

fn nothing_committed<'a>(_: &str) -> Option<&'a semver::Version> {
    None
}

fn state<'a>() -> DeviceState<'a> {
    DeviceState {
        device: "dev-001",
        platform: "linux/arm64",
        last_sequence: 0,
        last_notice_sha256: None,
        trusted_time: None,
        now: now(),
        clock_skew: Duration::seconds(300),
        committed: &nothing_committed,
        local_policy: None,
    }
}

fn check(d: &Desired, releases: &[Release], s: &DeviceState<'_>) -> Result<Verdict, RuleViolation> {
    check_notice(
        d,
        &NoticeHashes {
            payload: SHA,
            envelope: [9; 32],
        },
        releases,
        s,
    )
}

fn violation(r: Result<Verdict, RuleViolation>) -> RuleViolation {
    match r {
        Err(v) => v,
        Ok(v) => panic!("not rejected: {v:?}"),
    }
}

#[test]
fn accepts_a_good_notice_and_an_empty_app_set() {
    let s = state();
    assert_eq!(
        check(&desired(1), &[release("sensor", "1.0.0")], &s),
        Ok(Verdict::Accept)
    );
    assert_eq!(check(&desired(1), &[], &s), Ok(Verdict::Accept));
}

// ----- rule 2 -------------------------------------------------------------------------------

#[test]
fn rule_2_other_device() {
    let mut d = desired(1);
    d.device = "dev-002".into();
    let v = violation(check(&d, &[], &state()));
    assert_eq!(
        v,
        RuleViolation::WrongDevice {
            notice: "dev-002".into(),
            device: "dev-001".into()
        }
    );
    assert_eq!(
        v.to_string(),
        r#"notice is for device "dev-002", this is "dev-001""#
    );
}

// ----- rule 3 -------------------------------------------------------------------------------

#[test]
fn rule_3_same_sequence_same_bytes_is_a_duplicate() {
    let mut s = state();
    s.last_sequence = 5;
    s.last_notice_sha256 = Some(SHA);
    assert_eq!(check(&desired(5), &[], &s), Ok(Verdict::Duplicate));
}

#[test]
fn rule_3_same_sequence_other_bytes_is_equivocation() {
    let mut s = state();
    s.last_sequence = 5;
    s.last_notice_sha256 = Some([8; 32]);
    let v = violation(check(&desired(5), &[], &s));
    assert_eq!(v, RuleViolation::Equivocation { sequence: 5 });
    assert_eq!(
        v.to_string(),
        "sequence 5 was already used by a different notice (equivocation)"
    );
    // No remembered hash (e.g. a journal without one): not a duplicate either.
    s.last_notice_sha256 = None;
    assert_eq!(
        check(&desired(5), &[], &s),
        Err(RuleViolation::Equivocation { sequence: 5 })
    );
}

#[test]
fn rule_3_older_sequence_is_a_replay() {
    let mut s = state();
    s.last_sequence = 5;
    s.last_notice_sha256 = Some(SHA);
    let v = violation(check(&desired(4), &[], &s));
    assert_eq!(
        v,
        RuleViolation::Replay {
            sequence: 4,
            last: 5
        }
    );
    assert_eq!(
        v.to_string(),
        "sequence 4 is not newer than the last accepted 5 (replay)"
    );
    assert_eq!(check(&desired(6), &[], &s), Ok(Verdict::Accept));
}

#[test]
fn rule_3_sequence_zero_is_never_accepted() {
    let mut s = state();
    s.last_notice_sha256 = Some(SHA);
    assert_eq!(
        check(&desired(0), &[], &s),
        Err(RuleViolation::Replay {
            sequence: 0,
            last: 0
        })
    );
}

// ----- rule 4 -------------------------------------------------------------------------------

#[test]
fn rule_4_issued_in_the_future_beyond_the_skew() {
    let mut d = desired(1);
    d.issued_at = now() + Duration::seconds(301);
    d.expires_at = now() + Duration::days(1);
    let v = violation(check(&d, &[], &state()));
    assert_eq!(
        v.to_string(),
        "issued_at 2026-11-22T10:05:01+00:00 lies in the future \
         (now 2026-11-22T10:00:00+00:00, allowed skew 300 s)"
    );
    d.issued_at = now() + Duration::seconds(300);
    assert_eq!(check(&d, &[], &state()), Ok(Verdict::Accept), "within skew");
}

#[test]
fn rule_4_expired_beyond_the_skew() {
    let mut d = desired(1);
    d.issued_at = now() - Duration::days(2);
    d.expires_at = now() - Duration::seconds(301);
    let v = violation(check(&d, &[], &state()));
    assert!(matches!(v, RuleViolation::Expired { .. }), "{v:?}");
    assert_eq!(
        v.to_string(),
        "notice expired at 2026-11-22T09:54:59+00:00 \
         (now 2026-11-22T10:00:00+00:00, allowed skew 300 s)"
    );
    d.expires_at = now() - Duration::seconds(300);
    assert_eq!(check(&d, &[], &state()), Ok(Verdict::Accept), "within skew");
}

#[test]
fn rule_4_dates_at_the_limits_are_judged_never_a_panic() {
    // `expires_at + skew` overflowed on the last representable date: with `panic = "abort"`
    // and a retained notice the agent crash-looped (issue 10).
    // The strict parser refuses such dates (`Desired::parse`); the rules hold without it.
    let far = r#"{"device": "dev-001", "sequence": 1,
        "issued_at": "2026-11-22T09:00:00Z", "expires_at": "+262142-12-31T23:59:59Z",
        "apps": {}, "strategy": "stop-first", "allow_downgrade": false, "rollout": null}"#;
    let e = Desired::parse(far.as_bytes()).unwrap_err().to_string();
    assert!(
        e.contains("expires_at") && e.contains("out of range"),
        "{e}"
    );
    let d: Desired = serde_json::from_str(far).unwrap();
    assert_eq!(check(&d, &[], &state()), Ok(Verdict::Accept));
    let mut d = desired(1);
    d.expires_at = DateTime::<Utc>::MAX_UTC;
    assert_eq!(check(&d, &[], &state()), Ok(Verdict::Accept));
    // The first date: issued long ago, never in the future; expired.
    d.issued_at = DateTime::<Utc>::MIN_UTC;
    d.expires_at = DateTime::<Utc>::MIN_UTC;
    assert!(matches!(
        check(&d, &[], &state()),
        Err(RuleViolation::Expired { .. })
    ));
    // A clock (or trusted time) at the end of time with the largest skew: judged, no panic.
    let mut s = state();
    s.trusted_time = Some(DateTime::<Utc>::MAX_UTC);
    s.clock_skew = Duration::MAX;
    let d = desired(1);
    assert_eq!(check(&d, &[], &s), Ok(Verdict::Accept));
    let mut d = desired(1);
    d.issued_at = DateTime::<Utc>::MAX_UTC;
    assert!(matches!(
        check(&d, &[], &state()),
        Err(RuleViolation::IssuedInFuture { .. })
    ));
    // A negative skew (never configured, but not a panic either).
    let mut s = state();
    s.clock_skew = Duration::MIN;
    let _ = check(&desired(1), &[], &s);
}

#[test]
fn rule_3_a_journal_holding_the_envelope_hash_still_sees_the_duplicate() {
    // Journals written before payload hashes hold the envelope's hash.
    let s = DeviceState {
        last_sequence: 4,
        last_notice_sha256: Some([9; 32]),
        ..state()
    };
    assert_eq!(check(&desired(4), &[], &s), Ok(Verdict::Duplicate));
    let s = DeviceState {
        last_notice_sha256: Some([10; 32]),
        ..s
    };
    assert_eq!(
        check(&desired(4), &[], &s),
        Err(RuleViolation::Equivocation { sequence: 4 })
    );
}

#[test]
fn rule_4_a_clock_set_back_cannot_revive_an_expired_notice() {
    let mut d = desired(1);
    d.issued_at = now() - Duration::days(10);
    d.expires_at = now() - Duration::days(5);
    let mut s = state();
    s.now = now() - Duration::days(7); // the clock was set back
    assert_eq!(
        check(&d, &[], &s),
        Ok(Verdict::Accept),
        "without memory the old clock accepts it"
    );
    s.trusted_time = Some(now());
    assert_eq!(
        check(&d, &[], &s),
        Err(RuleViolation::Expired {
            expires_at: d.expires_at,
            now: now(),
            skew: Duration::seconds(300)
        }),
        "the clock is judged to be at least the trusted time"
    );
    // A trusted time behind the clock changes nothing.
    s.now = now();
    s.trusted_time = Some(now() - Duration::days(30));
    let mut d = desired(1);
    d.issued_at = now() + Duration::seconds(299);
    assert_eq!(check(&d, &[], &s), Ok(Verdict::Accept));
}

#[test]
fn rule_4_trusted_time_only_moves_forward() {
    let d = desired(1);
    assert_eq!(trusted_time_after(None, &d), now());
    let later = now() + Duration::days(1);
    assert_eq!(trusted_time_after(Some(later), &d), later);
    let earlier = now() - Duration::days(1);
    assert_eq!(trusted_time_after(Some(earlier), &d), now());
}

// ----- rule 5 -------------------------------------------------------------------------------

#[test]
fn rule_5_downgrade_needs_permission() {
    let committed: BTreeMap<String, semver::Version> =
        [("sensor".to_string(), "2.0.0".parse().unwrap())].into();
    let lookup = |app: &str| committed.get(app);
    let s = DeviceState {
        committed: &lookup,
        ..state()
    };
    let v = violation(check(&desired(1), &[release("sensor", "1.0.0")], &s));
    assert_eq!(
        v,
        RuleViolation::Downgrade {
            app: "sensor".into(),
            version: "1.0.0".parse().unwrap(),
            committed: "2.0.0".parse().unwrap()
        }
    );
    assert_eq!(
        v.to_string(),
        "sensor 1.0.0 is older than the committed 2.0.0; a downgrade needs allow_downgrade"
    );
    let mut d = desired(1);
    d.allow_downgrade = true;
    assert_eq!(
        check(&d, &[release("sensor", "1.0.0")], &s),
        Ok(Verdict::Accept)
    );
    for same_or_newer in ["2.0.0", "2.0.1", "10.0.0"] {
        assert_eq!(
            check(&desired(1), &[release("sensor", same_or_newer)], &s),
            Ok(Verdict::Accept),
            "{same_or_newer} is not a downgrade"
        );
    }
    // An app the device does not run yet has no version to go below.
    assert_eq!(
        check(&desired(1), &[release("other", "0.0.1")], &s),
        Ok(Verdict::Accept)
    );
}

// ----- §3 platform --------------------------------------------------------------------------

#[test]
fn platform_must_be_present() {
    let s = DeviceState {
        platform: "linux/arm/v7",
        ..state()
    };
    let v = violation(check(&desired(1), &[release("sensor", "1.0.0")], &s));
    assert_eq!(
        v,
        RuleViolation::NoImageForPlatform {
            app: "sensor".into(),
            version: "1.0.0".parse().unwrap(),
            platform: "linux/arm/v7".into(),
            available: vec!["linux/amd64".into(), "linux/arm64".into()]
        }
    );
    assert_eq!(
        v.to_string(),
        "sensor 1.0.0 has no image for this device's platform linux/arm/v7 \
         (it has: linux/amd64, linux/arm64)"
    );
}

// ----- rule 7 -------------------------------------------------------------------------------

#[test]
fn rule_7_local_policy_is_applied_to_every_release_and_quoted_verbatim() {
    let policy = |r: &Release| {
        if r.app == "camera" {
            Err(format!("policy: {} {} is not welcome", r.app, r.version))
        } else {
            Ok(())
        }
    };
    let s = DeviceState {
        local_policy: Some(&policy),
        ..state()
    };
    assert_eq!(
        check(&desired(1), &[release("sensor", "1.0.0")], &s),
        Ok(Verdict::Accept)
    );
    let v = violation(check(
        &desired(1),
        &[release("sensor", "1.0.0"), release("camera", "3.1.0")],
        &s,
    ));
    assert_eq!(
        v,
        RuleViolation::LocalPolicy {
            app: "camera".into(),
            reason: "policy: camera 3.1.0 is not welcome".into()
        }
    );
    assert_eq!(v.to_string(), "policy: camera 3.1.0 is not welcome");
}

// ----- order --------------------------------------------------------------------------------

#[test]
fn rules_apply_in_order_and_release_by_release() {
    let committed: BTreeMap<String, semver::Version> =
        [("sensor".to_string(), "2.0.0".parse().unwrap())].into();
    let lookup = |app: &str| committed.get(app);
    let refuse_all = |r: &Release| Err(format!("policy: no {}", r.app));
    let mut s = DeviceState {
        committed: &lookup,
        local_policy: Some(&refuse_all),
        last_sequence: 5,
        last_notice_sha256: Some([8; 32]),
        ..state()
    };
    let mut d = desired(4);
    d.device = "dev-002".into();
    d.expires_at = now() - Duration::days(1);
    d.issued_at = now() - Duration::days(2);
    let mut no_platform = release("camera", "1.0.0");
    no_platform.platforms.remove("linux/arm64");
    let rels = [release("alpha", "1.0.0"), release("sensor", "1.0.0")];
    assert_eq!(
        violation(check(&d, &rels, &s)).rule(),
        "notice for another device"
    );
    d.device = "dev-001".into();
    assert_eq!(violation(check(&d, &rels, &s)).rule(), "replay");
    d.sequence = 5;
    assert_eq!(violation(check(&d, &rels, &s)).rule(), "equivocation");
    s.last_notice_sha256 = Some(SHA);
    assert_eq!(
        check(&d, &rels, &s),
        Ok(Verdict::Duplicate),
        "a duplicate is recognised before time and releases are judged"
    );
    d.sequence = 6;
    assert_eq!(violation(check(&d, &rels, &s)).rule(), "notice expired");
    d.expires_at = now() + Duration::days(1);
    // Per release: the first release's policy refusal comes before the second's downgrade.
    assert_eq!(
        violation(check(&d, &rels, &s)),
        RuleViolation::LocalPolicy {
            app: "alpha".into(),
            reason: "policy: no alpha".into()
        }
    );
    // Within a release: downgrade, then platform, then policy.
    let mut old_no_platform = release("sensor", "1.0.0");
    old_no_platform.platforms.remove("linux/arm64");
    assert_eq!(
        violation(check(&d, std::slice::from_ref(&old_no_platform), &s)).rule(),
        "downgrade without allow_downgrade"
    );
    assert_eq!(
        violation(check(&d, std::slice::from_ref(&no_platform), &s)).rule(),
        "no image for this device's platform"
    );
}

// ----- properties ---------------------------------------------------------------------------

proptest! {
    #[test]
    fn sequence_rule(last in 0u64..6, seq in 0u64..8, same_bytes in any::<bool>()) {
        let s = DeviceState {
            last_sequence: last,
            last_notice_sha256: Some(if same_bytes { SHA } else { [8; 32] }),
            ..state()
        };
        let got = check(&desired(seq), &[], &s);
        let want = if seq > last {
            Ok(Verdict::Accept)
        } else if seq == last && last > 0 && same_bytes {
            Ok(Verdict::Duplicate)
        } else if seq == last && last > 0 {
            Err(RuleViolation::Equivocation { sequence: seq })
        } else {
            Err(RuleViolation::Replay { sequence: seq, last })
        };
        prop_assert_eq!(got, want);
    }

    #[test]
    fn any_dates_and_skew_are_judged_without_a_panic(
        issued in any::<i64>(),
        expires in any::<i64>(),
        clock in any::<i64>(),
        trusted in proptest::option::of(any::<i64>()),
        skew in any::<i64>(),
    ) {
        let at = |ms: i64| {
            DateTime::<Utc>::from_timestamp_millis(ms)
                .unwrap_or(if ms < 0 { DateTime::<Utc>::MIN_UTC } else { DateTime::<Utc>::MAX_UTC })
        };
        let mut d = desired(1);
        d.issued_at = at(issued);
        d.expires_at = at(expires);
        let s = DeviceState {
            now: at(clock),
            trusted_time: trusted.map(at),
            clock_skew: Duration::try_milliseconds(skew).unwrap_or(Duration::MAX),
            ..state()
        };
        let _ = check(&d, &[], &s);
        let _ = trusted_time_after(s.trusted_time, &d);
    }

    #[test]
    fn time_rule(
        issued in -2_000i64..2_000,
        lifetime in 1i64..2_000,
        clock in -2_000i64..2_000,
        trusted in proptest::option::of(-2_000i64..2_000),
        skew in 0i64..600,
    ) {
        let at = |s: i64| now() + Duration::seconds(s);
        let mut d = desired(1);
        d.issued_at = at(issued);
        d.expires_at = at(issued + lifetime);
        let s = DeviceState {
            now: at(clock),
            trusted_time: trusted.map(at),
            clock_skew: Duration::seconds(skew),
            ..state()
        };
        let judged = clock.max(trusted.unwrap_or(i64::MIN));
        let got = check(&d, &[], &s);
        if issued > judged + skew {
            prop_assert!(matches!(got, Err(RuleViolation::IssuedInFuture { .. })), "{:?}", got);
        } else if issued + lifetime + skew < judged {
            prop_assert!(matches!(got, Err(RuleViolation::Expired { .. })), "{:?}", got);
        } else {
            prop_assert_eq!(got, Ok(Verdict::Accept));
        }
        // Whatever the clock: a notice accepted moves the trusted time to at least its
        // issued_at, never back.
        let t = trusted_time_after(s.trusted_time, &d);
        prop_assert!(t >= d.issued_at);
        prop_assert!(s.trusted_time.is_none_or(|old| t >= old));
    }

    #[test]
    fn downgrade_rule(
        committed in (0u64..3, 0u64..3, 0u64..3),
        offered in (0u64..3, 0u64..3, 0u64..3),
        allow in any::<bool>(),
    ) {
        let c = semver::Version::new(committed.0, committed.1, committed.2);
        let o = semver::Version::new(offered.0, offered.1, offered.2);
        let map: BTreeMap<String, semver::Version> = [("sensor".to_string(), c.clone())].into();
        let lookup = |app: &str| map.get(app);
        let s = DeviceState { committed: &lookup, ..state() };
        let mut d = desired(1);
        d.allow_downgrade = allow;
        let got = check(&d, &[release("sensor", &o.to_string())], &s);
        if o < c && !allow {
            prop_assert_eq!(got, Err(RuleViolation::Downgrade {
                app: "sensor".into(),
                version: o,
                committed: c,
            }));
        } else {
            prop_assert_eq!(got, Ok(Verdict::Accept));
        }
    }
}
