//! Reverts, restarts and reconnects; progress and holds; forced rollouts.

use super::*;

#[test]
fn revert_needs_the_running_releases_catalogued_and_reconnects_republish() {
    for mut x in T::each() {
        x.fleet(2, "beta");
        x.push("3.0.0");
        let req = StartRollout {
            settings: Default::default(),
            app: "sensor".into(),
            version: "3.0.0".into(),
            select: "group=beta".into(),
            waves: "1,100%".into(),
            soak: "10s".into(),
            max_failures: "0".into(),
            device_timeout: None,
            strategy: None,
            on_failure: Some(crate::rollout::waves::OnFailure::Revert),
            force: false,
        };
        let e = x.core.start_rollout(&req, t(1)).unwrap_err();
        assert_eq!(e.status, 422);
        assert!(
            e.message.contains("sensor 1.0.0 (on dev-0, dev-1)"),
            "{}",
            e.message
        );
        assert!(x.core.rollouts().is_empty());
        x.push("1.0.0");
        x.core.start_rollout(&req, t(1)).unwrap();
        let sent = x.notices();
        assert_eq!(sent.len(), 1);
        // the broker comes back without its retained messages: the unacknowledged notice is
        // published again, byte-identical; an acknowledged one is not
        x.core.ingest(Inbound::Connected, t(2));
        let again = x.flush();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].topic, "ferry/v1/devices/dev-0/desired");
        x.core.ingest(
            state("dev-0", "3.0.0", 2, Some((2, Phase::Committed)), "beta"),
            t(3),
        );
        x.core.ingest(Inbound::Connected, t(4));
        assert!(x.flush().is_empty());
    }
}

/// A notice's envelope leaves memory once its round is committed (100,000 of them are
/// ~250 MB); re-publishing reads it back from the store, byte for byte, in the same process
/// and after a restart.
#[test]
fn stored_notices_leave_memory_and_come_back_byte_identical() {
    for mut x in T::each() {
        x.fleet(2, "beta");
        x.push("1.0.0");
        x.push("2.0.0");
        x.start("2.0.0", "100%", None);
        let sent: BTreeMap<String, String> = x
            .verified()
            .into_iter()
            .map(|(v, envelope)| (v.desired.device, envelope))
            .collect();
        assert_eq!(sent.len(), 2);
        assert!(
            x.core.desired.values().all(|s| s.envelope.is_empty()),
            "committed envelopes are not kept in memory"
        );
        let again = |x: &mut T| -> BTreeMap<String, String> {
            x.core.ingest(Inbound::Connected, t(5));
            x.flush()
                .into_iter()
                .map(|o| {
                    let device = o.topic.split('/').nth(3).unwrap().to_string();
                    (device, o.payload)
                })
                .collect()
        };
        assert_eq!(again(&mut x), sent, "re-published from the store");
        x.core.flush_all().unwrap();
        let mut x = x.reopen();
        assert!(x.core.desired.values().all(|s| s.envelope.is_empty()));
        assert_eq!(again(&mut x), sent, "and after a restart");
    }
}

#[test]
fn after_a_restart_a_device_is_notified_only_once_its_current_state_arrived() {
    for mut x in T::each() {
        x.fleet(2, "beta");
        x.push("1.0.0");
        x.push("2.0.0");
        x.core.flush_all().unwrap();
        // While the controller is down, dev-0 gets sequence 5 from someone else (`ferryctl
        // publish`): the stored record still says 1.
        let mut x = x.reopen();
        // The broker re-delivers the retained messages; `online` may come before `state`.
        for d in ["dev-0", "dev-1"] {
            x.core.ingest(
                Inbound::Online {
                    device: d.into(),
                    online: true,
                },
                t(2),
            );
        }
        let v = x.start("2.0.0", "100%", None);
        assert_eq!(v.summary.devices, 2);
        x.core.advance(true, t(2));
        assert!(
            x.notices().is_empty(),
            "no notice is built on a record older than the device's retained state"
        );
        x.core
            .ingest(state("dev-0", "1.0.0", 5, None, "beta"), t(3));
        x.core.advance(false, t(3));
        assert_eq!(
            x.notices(),
            vec![("dev-0".into(), 6, "2.0.0".into(), false)],
            "the sequence follows the state that just arrived"
        );
        x.core
            .ingest(state("dev-1", "1.0.0", 1, None, "beta"), t(4));
        x.core.advance(false, t(4));
        assert_eq!(
            x.notices(),
            vec![("dev-1".into(), 2, "2.0.0".into(), false)]
        );
        // A device that is offline (its will said 0) is not used because its state arrived.
        let mut x = x.reopen();
        x.core.ingest(
            Inbound::Online {
                device: "dev-0".into(),
                online: false,
            },
            t(5),
        );
        x.core.ingest(
            state("dev-0", "2.0.0", 6, Some((6, Phase::Committed)), "beta"),
            t(5),
        );
        let r = x.core.rollout("r-1", true).unwrap();
        let e = &r.devices.as_ref().unwrap()["dev-0"];
        assert!(!e.online, "a retained state is not a sign of life");
        assert!(
            matches!(e.status, DeviceStatus::Committed { sequence: 6, .. }),
            "but its result counts: {:?}",
            e.status
        );
        // its `online = 1` when it comes back: now it soaks
        x.core.ingest(
            Inbound::Online {
                device: "dev-0".into(),
                online: true,
            },
            t(6),
        );
        let r = x.core.rollout("r-1", true).unwrap();
        assert!(r.devices.as_ref().unwrap()["dev-0"].online);
    }
}

/// Device timeout 60 s: a device retrying its download (events) stays in its wave past it, a
/// device held by its maintenance window (the retained state's update) stays for hours, one
/// that goes silent while online times out; superseded fails with the agent's reason.
#[test]
fn progress_and_holds_reach_the_rollout_from_events_and_states() {
    for mut x in T::each() {
        x.fleet(3, "beta");
        x.push("1.0.0");
        x.push("2.0.0");
        let req = StartRollout {
            settings: Default::default(),
            app: "sensor".into(),
            version: "2.0.0".into(),
            select: "group=beta".into(),
            waves: "100%".into(),
            soak: "10s".into(),
            max_failures: "2".into(),
            device_timeout: Some("60s".into()),
            strategy: None,
            on_failure: None,
            force: false,
        };
        x.core.start_rollout(&req, t(0)).unwrap();
        assert_eq!(x.notices().len(), 3, "sequence 2 for each");
        let dark = "registry 127.0.0.1:5055: connection refused; retrying in 60 s";
        let window = "maintenance window 02:00-04:00 opens in 3 h";
        let retry = || waiting_event("dev-0", 2, Phase::Downloading, Waiting::Retrying, dark);
        // dev-2: one progress report, then silence while online
        x.core
            .ingest(event("dev-2", 2, Phase::Downloading, None), t(10));
        // dev-1: everything downloaded, the switch waits for its window (retained state only)
        let held = state("dev-1", "1.0.0", 2, Some((2, Phase::Downloaded)), "beta");
        x.core
            .ingest(waiting_state(held, Waiting::Window, window), t(20));
        // dev-0: the registry is dark, it reports each retry (events)
        x.core.ingest(retry(), t(30));
        x.core.advance(true, t(69));
        let v = x.core.rollout("r-1", true).unwrap();
        let status = |v: &RolloutView, d: &str| v.devices.as_ref().unwrap()[d].status.clone();
        assert!(matches!(status(&v, "dev-2"), DeviceStatus::Notified { .. }));
        x.core.advance(true, t(70));
        let v = x.core.rollout("r-1", true).unwrap();
        assert_eq!(
            status(&v, "dev-2"),
            DeviceStatus::Failed {
                reason: "no progress reported within 60s online".into()
            }
        );
        // ... for ten minutes
        for s in (80..600).step_by(50) {
            x.core.ingest(retry(), t(s));
            x.core.advance(true, t(s + 49));
        }
        x.core.advance(true, t(630));
        let v = x.core.rollout("r-1", true).unwrap();
        assert!(matches!(status(&v, "dev-0"), DeviceStatus::Notified { .. }));
        assert!(
            matches!(status(&v, "dev-1"), DeviceStatus::Notified { wait: Some(ref w), .. } if w.holds()),
            "{:?}",
            status(&v, "dev-1")
        );
        assert_eq!(v.state, "running");
        let s = &v.summary;
        assert_eq!((s.retrying, s.held_window, s.held_lock), (1, 1, 0));
        assert_eq!((s.waves[0].retrying, s.waves[0].held_window), (1, 1));
        assert_eq!(
            s.waiting
                .iter()
                .map(|g| (g.waiting, g.reason.as_deref().unwrap(), g.devices.clone()))
                .collect::<Vec<_>>(),
            [
                (Waiting::Retrying, dark, vec!["dev-0".to_string()]),
                (Waiting::Window, window, vec!["dev-1".to_string()])
            ]
        );
        // the inventory shows the update in progress and what it waits for
        assert!(x.flush().is_empty(), "nothing to publish");
        let d1 = x.core.device("dev-1").unwrap().device;
        assert_eq!(
            d1.update.as_ref().unwrap().describe(),
            format!("downloaded (seq 2), waiting: window ({window})")
        );
        let d0 = x.core.device("dev-0").unwrap();
        assert_eq!(
            d0.device.update.as_ref().unwrap().waiting,
            Some(Waiting::Retrying)
        );
        let e = &d0.events[0];
        assert_eq!(
            (e.waiting, e.reason.as_deref()),
            (Some(Waiting::Retrying), Some(dark))
        );
        assert_eq!(e.download.unwrap().resumes, 2);
        // hours later, dev-1 still waits; dev-0 went silent after its last retry (580) and times out
        x.core.advance(true, t(20_000));
        let v = x.core.rollout("r-1", true).unwrap();
        assert!(matches!(status(&v, "dev-0"), DeviceStatus::Failed { .. }));
        assert!(matches!(status(&v, "dev-1"), DeviceStatus::Notified { .. }));
        // a graceful restart keeps the hold (and the retained state brings it again anyway)
        x.core.flush_all().unwrap();
        let mut x = x.reopen();
        let v = x.core.rollout("r-1", true).unwrap();
        assert!(
            matches!(status(&v, "dev-1"), DeviceStatus::Notified { wait: Some(ref w), .. } if w.kind == Waiting::Window)
        );
        // a newer notice took over on the device: superseded, with the agent's reason
        x.core.ingest(
            event(
                "dev-1",
                2,
                Phase::Superseded,
                Some("sequence 3 arrived before the switch"),
            ),
            t(20_001),
        );
        x.core.advance(false, t(20_001));
        let v = x.core.rollout("r-1", true).unwrap();
        assert_eq!(
            status(&v, "dev-1"),
            DeviceStatus::Failed {
                reason: "superseded: sequence 3 arrived before the switch".into()
            }
        );
        assert!(x.core.device("dev-1").unwrap().device.update.is_none());
        assert_eq!(v.state, "paused", "3 failures > max 2");
    }
}

/// `force` on a rollout reaches every notice it signs, its reverts too, and `rollback
/// --force`'s; without it the notice has no `force` at all.
#[test]
fn force_reaches_the_signed_notices() {
    let forced = |v: &[(ferry_protocol::desired::VerifiedNotice, String)]| {
        v.iter()
            .map(|(n, _)| (n.desired.device.clone(), n.desired.force))
            .collect::<Vec<_>>()
    };
    for mut x in T::each() {
        x.fleet(2, "beta");
        x.push("1.0.0");
        x.push("2.0.0");
        let req = StartRollout {
            settings: Default::default(),
            app: "sensor".into(),
            version: "2.0.0".into(),
            select: "group=beta".into(),
            waves: "1,100%".into(),
            soak: "10s".into(),
            max_failures: "0".into(),
            device_timeout: None,
            strategy: None,
            on_failure: Some(crate::rollout::waves::OnFailure::Revert),
            force: true,
        };
        let v = x.core.start_rollout(&req, t(1)).unwrap();
        assert!(v.force);
        let sent = x.verified();
        assert_eq!(forced(&sent), [("dev-0".to_string(), true)]);
        // persisted with the rollout: after a restart, the next wave's notices are forced too
        x.core.flush_all().unwrap();
        let mut x = x.reopen();
        assert!(x.core.rollout("r-1", false).unwrap().force);
        for d in ["dev-0", "dev-1"] {
            x.core.ingest(
                Inbound::Online {
                    device: d.into(),
                    online: true,
                },
                t(2),
            );
            x.core.ingest(state(d, "1.0.0", 1, None, "beta"), t(2));
        }
        x.core
            .ingest(event("dev-0", 2, Phase::Committed, None), t(3));
        x.core.advance(true, t(14));
        assert_eq!(forced(&x.verified()), [("dev-1".to_string(), true)]);
        // dev-1 fails: the revert notices (back to 1.0.0) are forced as well
        x.core
            .ingest(event("dev-1", 2, Phase::Failed, Some("disk full")), t(15));
        x.core.advance(false, t(15));
        let reverts = x.verified();
        assert_eq!(
            forced(&reverts),
            [("dev-0".to_string(), true), ("dev-1".to_string(), true)]
        );
        assert!(reverts.iter().all(|(n, _)| n.desired.allow_downgrade));
        // rollback: forced only when asked
        let mut rb = rollback_req("id in (dev-0)");
        x.core
            .ingest(state("dev-0", "2.0.0", 3, None, "beta"), t(16));
        x.core.rollback(&rb, t(17)).unwrap();
        let plain = x.verified();
        assert_eq!(forced(&plain), [("dev-0".to_string(), false)]);
        assert!(!plain[0].1.contains("force"), "no force field at all");
        rb.force = true;
        x.core.rollback(&rb, t(18)).unwrap();
        assert_eq!(forced(&x.verified()), [("dev-0".to_string(), true)]);
    }
}

/// Rollout records written before `force` existed load, unforced.
#[test]
fn rollout_records_without_force_load() {
    for mut x in T::each() {
        x.fleet(1, "beta");
        x.push("2.0.0");
        x.start("2.0.0", "100%", None);
        x.core.flush_all().unwrap();
        let rec = &x.core.rollouts["r-1"];
        let mut old = serde_json::to_value(rec).unwrap();
        assert_eq!(old["force"], false);
        old.as_object_mut().unwrap().remove("force");
        let back: RolloutRecord = serde_json::from_value(old).unwrap();
        assert_eq!(&back, rec);
    }
}
