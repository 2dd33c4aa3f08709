//! Rollouts wave by wave, failures, bad API input, offline devices and late joiners.

use super::*;

#[test]
fn a_rollout_goes_wave_by_wave_and_survives_a_restart() {
    for mut x in T::each() {
        x.fleet(4, "beta");
        x.push("1.0.0");
        x.push("2.0.0");
        let v = x.start("2.0.0", "2,100%", None);
        assert_eq!((v.id.as_str(), v.targets.clone()), ("r-1", vec![2, 4]));
        // wave 1: two devices, sequence = reported 1 + 1
        let n = x.notices();
        assert_eq!(
            n,
            vec![
                ("dev-0".into(), 2, "2.0.0".into(), false),
                ("dev-1".into(), 2, "2.0.0".into(), false)
            ]
        );
        // the controller "crashes" here and comes back: nothing is sent twice, nothing skipped.
        // (Device records are written lazily; on subscribing again the broker re-delivers every
        // device's retained `online` and `state`, which is what rebuilds them.)
        let mut x = x.reopen();
        for i in 0..4 {
            let d = format!("dev-{i}");
            x.core.ingest(
                Inbound::Online {
                    device: d.clone(),
                    online: true,
                },
                t(2),
            );
            x.core.ingest(state(&d, "1.0.0", 1, None, "beta"), t(2));
        }
        x.core.advance(true, t(2));
        assert!(x.notices().is_empty(), "no device is notified twice");
        for d in ["dev-0", "dev-1"] {
            x.core.ingest(event(d, 2, Phase::Committed, None), t(3));
            x.core.ingest(
                state(d, "2.0.0", 2, Some((2, Phase::Committed)), "beta"),
                t(3),
            );
        }
        x.core.advance(false, t(3));
        assert!(x.notices().is_empty(), "soaking");
        x.core.advance(true, t(14));
        let n = x.notices();
        assert_eq!(
            n.iter().map(|n| n.0.as_str()).collect::<Vec<_>>(),
            ["dev-2", "dev-3"]
        );
        for d in ["dev-2", "dev-3"] {
            x.core.ingest(event(d, 2, Phase::Committed, None), t(15));
        }
        x.core.advance(true, t(30));
        x.flush();
        let v = x.core.rollout("r-1", true).unwrap();
        assert_eq!((v.state.as_str(), v.summary.succeeded), ("completed", 4));
        assert_eq!(v.devices.as_ref().map(|d| d.len()), Some(4));
        let lean = x.core.rollout("r-1", false).unwrap();
        assert!(lean.devices.is_none(), "devices=false leaves the list out");
        assert_eq!(lean.summary, v.summary);
        // the device record knows what it ran before
        x.core
            .ingest(state("dev-0", "2.0.0", 2, None, "beta"), t(31));
        assert_eq!(
            x.core.device("dev-0").unwrap().device.previous["sensor"],
            "1.0.0"
        );
        // and a (graceful: device records are written lazily, the stop writes them) restart keeps
        // the completed rollout, the sequences and what each device ran before
        x.core.flush_all().unwrap();
        let mut x = x.reopen();
        assert_eq!(x.core.rollouts()[0].state, "completed");
        let r = x
            .core
            .rollback(&rollback_req("id in (dev-0)"), t(40))
            .unwrap();
        assert_eq!(r.devices[0].sequence, Some(3));
        assert_eq!(x.notices(), vec![("dev-0".into(), 3, "1.0.0".into(), true)]);
    }
}

#[test]
fn a_failed_wave_pauses_or_reverts() {
    for revert in [false, true] {
        for mut x in T::each() {
            x.fleet(4, "beta");
            x.push("1.0.0");
            x.push("3.0.0");
            let of = revert.then_some(crate::rollout::waves::OnFailure::Revert);
            x.start("3.0.0", "2,100%", of);
            assert_eq!(x.notices().len(), 2);
            x.core
                .ingest(event("dev-0", 2, Phase::Committed, None), t(2));
            x.core.ingest(
                event(
                    "dev-1",
                    2,
                    Phase::RolledBack,
                    Some("health gate: exec failed 3 times"),
                ),
                t(2),
            );
            x.core.advance(false, t(2));
            let n = x.notices();
            let v = x.core.rollout("r-1", true).unwrap();
            assert_eq!(
                v.summary.failures[0].0,
                "rolled_back: health gate: exec failed 3 times"
            );
            if revert {
                assert_eq!(v.state, "reverted");
                assert_eq!(
                    n,
                    vec![
                        ("dev-0".into(), 3, "1.0.0".into(), true),
                        ("dev-1".into(), 3, "1.0.0".into(), true)
                    ]
                );
            } else {
                assert_eq!(v.state, "paused");
                assert!(n.is_empty(), "wave 2 never starts: {n:?}");
            }
            x.core.advance(true, t(100));
            assert!(x.notices().is_empty());
        }
    }
}

#[test]
fn bad_api_input_changes_nothing() {
    for mut x in T::each() {
        x.fleet(2, "beta");
        x.push("2.0.0");
        let base = StartRollout {
            settings: Default::default(),
            app: "sensor".into(),
            version: "2.0.0".into(),
            select: "group=beta".into(),
            waves: "1,100%".into(),
            soak: "10s".into(),
            max_failures: "1".into(),
            device_timeout: None,
            strategy: None,
            on_failure: None,
            force: false,
        };
        let cases = [
            (
                StartRollout {
                    version: "9.9.9".into(),
                    ..base.clone()
                },
                422,
                "not in the catalogue",
            ),
            (
                StartRollout {
                    select: "group=gamma".into(),
                    ..base.clone()
                },
                422,
                "matches no device",
            ),
            (
                StartRollout {
                    waves: "50%,10%".into(),
                    ..base.clone()
                },
                400,
                "waves",
            ),
            (
                StartRollout {
                    soak: "soon".into(),
                    ..base.clone()
                },
                400,
                "soak",
            ),
            (
                StartRollout {
                    max_failures: "-1".into(),
                    ..base.clone()
                },
                400,
                "max_failures",
            ),
            (
                StartRollout {
                    select: "group==".into(),
                    ..base.clone()
                },
                400,
                "select",
            ),
        ];
        for (req, status, needle) in cases {
            let e = x.core.start_rollout(&req, t(1)).unwrap_err();
            assert_eq!(e.status, status, "{e}");
            assert!(e.message.contains(needle), "{} lacks {needle}", e.message);
        }
        assert!(x.flush().is_empty());
        assert!(x.core.rollouts().is_empty());
        // a forged release is refused
        let other = PrivateKey::from_seed([9; 32]).unwrap();
        let e = x
            .core
            .push_release(release_env(&other, "4.0.0").as_bytes(), t(1))
            .unwrap_err();
        assert_eq!(e.status, 422);
        assert!(x.core.releases().iter().all(|r| r.version != "4.0.0"));
        // one active rollout per app
        x.core.start_rollout(&base, t(1)).unwrap();
        assert_eq!(x.core.start_rollout(&base, t(1)).unwrap_err().status, 409);
        // a release with different content under the same version is refused
        let e = x
            .core
            .push_release(release_env(&x.ck, "2.0.0").as_bytes(), t(1));
        assert!(e.is_err());
    }
}

#[test]
fn offline_devices_catch_up_and_late_joiners_are_included() {
    for mut x in T::each() {
        x.fleet(2, "beta");
        x.core.ingest(
            Inbound::Online {
                device: "dev-1".into(),
                online: false,
            },
            t(0),
        );
        x.push("1.0.0");
        x.push("2.0.0");
        x.start("2.0.0", "100%", None);
        assert_eq!(
            x.notices().iter().map(|n| n.0.clone()).collect::<Vec<_>>(),
            ["dev-0"]
        );
        // dev-1 comes back; a new device appears with the right label
        x.core.ingest(
            Inbound::Online {
                device: "dev-1".into(),
                online: true,
            },
            t(5),
        );
        x.core.ingest(
            Inbound::Online {
                device: "new-9".into(),
                online: true,
            },
            t(5),
        );
        x.core
            .ingest(state("new-9", "1.0.0", 0, None, "beta"), t(5));
        x.core.advance(false, t(5));
        let mut got: Vec<String> = x.notices().into_iter().map(|n| n.0).collect();
        got.sort();
        assert_eq!(got, ["dev-1", "new-9"]);
    }
}

/// The console's preview: the same checks as a start and the devices each wave gets, with
/// nothing started, sent or stored.
#[test]
fn a_preview_plans_the_waves_and_starts_nothing() {
    for mut x in T::each() {
        x.fleet(5, "beta");
        x.push("1.0.0");
        x.push("2.0.0");
        let mut req = StartRollout {
            settings: Default::default(),
            app: "sensor".into(),
            version: "2.0.0".into(),
            select: "group=beta".into(),
            waves: "1,50%,100%".into(),
            soak: "10s".into(),
            max_failures: "0".into(),
            device_timeout: None,
            strategy: None,
            on_failure: None,
            force: false,
        };
        let p = x.core.preview_rollout(&req, t(1)).unwrap();
        assert_eq!((p.devices, p.online), (5, 5));
        assert_eq!(p.targets, vec![1, 3, 5]);
        assert_eq!(p.waves, vec![1, 2, 2]);
        assert!(x.core.rollouts().is_empty(), "nothing started");
        assert!(x.flush().is_empty(), "nothing sent");
        // It refuses what a start refuses, with the same words.
        for (field, value, status) in [
            ("version", "9.9.9", 422),
            ("select", "group=none", 422),
            ("waves", "50%,10%", 400),
        ] {
            let mut bad = req.clone();
            match field {
                "version" => bad.version = value.into(),
                "select" => bad.select = value.into(),
                _ => bad.waves = value.into(),
            }
            let e = x.core.preview_rollout(&bad, t(1)).unwrap_err();
            let s = x.core.start_rollout(&bad, t(1)).unwrap_err();
            assert_eq!((e.status, &e.message), (status, &s.message), "{field}");
        }
        // With a rollout of the app running, a preview says a start would conflict.
        req.waves = "100%".into();
        x.core.start_rollout(&req, t(1)).unwrap();
        let e = x.core.preview_rollout(&req, t(2)).unwrap_err();
        assert_eq!(e.status, 409, "{}", e.message);
    }
}
