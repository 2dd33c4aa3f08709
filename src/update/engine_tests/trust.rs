//! Trust records in the engine (protocol §10): a rotation takes effect at once, a refused
//! record changes nothing, a frozen sequence is recovered, and a crash between storing a
//! record and resetting the floor is finished at the next start.

use super::*;
use crate::verify::trust::TrustStore;
use ferry_protocol::trust_record::{RoleKeys, TrustRecord, TrustSet};

fn key(n: u8) -> PrivateKey {
    PrivateKey::from_seed([n; 32]).unwrap()
}

const ROOT: u8 = 50;

impl Fx {
    /// The fixture's keys as version 0, with root key 50.
    fn config_trust(&self) -> TrustSet {
        TrustSet::from_config(
            Trust {
                release: TrustedKeys::new([self.rk.public().clone()]),
                release_threshold: 1,
                controller: TrustedKeys::new([self.ck.public().clone()]),
            },
            TrustedKeys::new([key(ROOT).public().clone()]),
            1,
        )
    }

    fn trusting_engine(&self) -> Eng {
        self.engine()
            .with_trust(self.config_trust(), TrustStore::new(self.dir.path()))
            .unwrap()
    }

    /// Record `version` trusting controller key `ctl`, signed by the root key.
    fn record(&self, version: u64, ctl: u8, floor: Option<u64>) -> Vec<u8> {
        TrustRecord {
            version,
            expires_at: Utc::now() + chrono::Duration::days(30),
            root: RoleKeys {
                keys: vec![key(ROOT).public().to_pem()],
                threshold: 1,
            },
            release: RoleKeys {
                keys: vec![self.rk.public().to_pem()],
                threshold: 1,
            },
            controller: vec![key(ctl).public().to_pem()],
            sequence_floor: floor,
            devices: None,
        }
        .sign(&[&key(ROOT)])
        .to_json()
        .into_bytes()
    }

    fn last_state(&self) -> ferry_protocol::StateReport {
        self.out.states.lock().unwrap().last().cloned().unwrap()
    }
}

#[tokio::test(start_paused = true)]
async fn a_rotated_controller_key_is_refused_at_once_and_the_new_one_taken() {
    let fx = Fx::new();
    let mut e = fx.trusting_engine();
    committed_v1(&fx, &mut e).await;
    e.take_trust(&fx.record(1, 3, None)).await.unwrap();
    assert_eq!(e.trust_version(), 1);
    assert_eq!(fx.last_state().trust.unwrap().version, 1);
    // The removed key (2) signs sequence 2: refused, nothing runs differently.
    let old = fx.notice(2, Strategy::StopFirst, &[("sensor", "2.0.0")]);
    e.handle_notice(&old, &fx.stop).await.unwrap();
    let ev = fx.last_event();
    assert_eq!(ev.phase, Phase::Rejected);
    assert!(
        ev.reason.as_deref().unwrap().contains("controller"),
        "{ev:?}"
    );
    assert_eq!(fx.running(), vec![name("sensor", 1)]);
    // The new key (3) is taken.
    let new = fx.notice_by(&key(3), 2, Strategy::StopFirst, &[("sensor", "2.0.0")]);
    e.handle_notice(&new, &fx.stop).await.unwrap();
    assert_eq!(fx.running(), vec![name("sensor", 2)]);
    // And it survives a restart: the stored record, not the config.
    drop(e);
    let e = fx.trusting_engine();
    assert_eq!(e.trust_version(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_refused_record_changes_nothing_and_says_why() {
    let fx = Fx::new();
    let mut e = fx.trusting_engine();
    // Signed by a key that is not the root.
    let genuine: ferry_protocol::Envelope = serde_json::from_slice(&fx.record(1, 3, None)).unwrap();
    let forged = TrustRecord::parse(&genuine.decoded_payload("trust").unwrap())
        .unwrap()
        .sign(&[&key(51)]);
    e.take_trust(forged.to_json().as_bytes()).await.unwrap();
    assert_eq!(e.trust_version(), 0);
    let st = fx.last_state().trust.unwrap();
    assert!(
        st.error.as_deref().unwrap().contains("current root"),
        "{st:?}"
    );
    assert!(!fx.dir.path().join("trust.json").exists());
    // The config's controller key still works.
    committed_v1(&fx, &mut e).await;
}

#[tokio::test(start_paused = true)]
async fn a_notice_refused_before_the_record_is_tried_again_after_it() {
    let fx = Fx::new();
    let mut e = fx.trusting_engine();
    let new = fx.notice_by(&key(3), 1, Strategy::StopFirst, &[("sensor", "1.0.0")]);
    e.handle_notice(&new, &fx.stop).await.unwrap();
    assert_eq!(fx.last_event().phase, Phase::Rejected);
    e.take_trust(&fx.record(1, 3, None)).await.unwrap();
    let again = e
        .inbox()
        .take()
        .expect("the refused notice is queued again");
    e.handle_notice(&again, &fx.stop).await.unwrap();
    assert_eq!(fx.running(), vec![name("sensor", 1)]);
}

#[tokio::test(start_paused = true)]
async fn a_frozen_sequence_is_recovered_by_a_record_that_replaces_the_controller_key() {
    let fx = Fx::new();
    let mut e = fx.trusting_engine();
    committed_v1(&fx, &mut e).await;
    // A leaked controller key freezes the box at 2^64-1.
    let frozen = fx.notice(u64::MAX, Strategy::StopFirst, &[("sensor", "1.0.0")]);
    e.handle_notice(&frozen, &fx.stop).await.unwrap();
    assert_eq!(e.journal().last_sequence, u64::MAX);
    let honest = fx.notice_by(&key(3), 2, Strategy::StopFirst, &[("sensor", "2.0.0")]);
    e.handle_notice(&honest, &fx.stop).await.unwrap();
    assert_eq!(fx.last_event().phase, Phase::Rejected);
    // A floor reset that keeps the leaked key is refused.
    e.take_trust(&fx.record(1, 2, Some(1))).await.unwrap();
    assert_eq!(e.trust_version(), 0);
    assert_eq!(e.journal().last_sequence, u64::MAX);
    // With a new controller key: the floor goes to 1, and the honest notice is taken.
    e.take_trust(&fx.record(1, 3, Some(1))).await.unwrap();
    assert_eq!(e.trust_version(), 1);
    assert_eq!(e.journal().last_sequence, 1);
    e.handle_notice(&honest, &fx.stop).await.unwrap();
    assert_eq!(fx.running(), vec![name("sensor", 2)]);
    // A restart neither freezes it again nor applies the reset twice.
    drop(e);
    let e = fx.trusting_engine();
    assert_eq!(e.journal().last_sequence, 2);
    // The journal's previous version does not bring the frozen floor back either.
    std::fs::write(fx.dir.path().join("journal.json"), b"{").unwrap();
    drop(e);
    let e = fx.trusting_engine();
    assert!(e.journal().last_sequence < u64::MAX);
}

#[tokio::test(start_paused = true)]
async fn a_crash_between_storing_the_record_and_the_floor_reset_is_finished_at_start() {
    let fx = Fx::new();
    let mut e = fx.trusting_engine();
    let frozen = fx.notice(u64::MAX, Strategy::StopFirst, &[("sensor", "1.0.0")]);
    e.handle_notice(&frozen, &fx.stop).await.unwrap();
    drop(e);
    // The record stored, the agent killed before the floor moved.
    TrustStore::new(fx.dir.path())
        .save(&fx.record(1, 3, Some(0)))
        .unwrap();
    let e = fx.trusting_engine();
    assert_eq!(e.trust_version(), 1);
    assert_eq!(e.journal().last_sequence, 0);
}

#[tokio::test(start_paused = true)]
async fn an_expired_record_refuses_notices_until_a_newer_one() {
    let fx = Fx::new();
    let mut e = fx.trusting_engine();
    e.take_trust(&fx.record(1, 2, None)).await.unwrap();
    e.trust.set.expires_at = Some(Utc::now() - chrono::Duration::seconds(1));
    e.handle_notice(
        &fx.notice(1, Strategy::StopFirst, &[("sensor", "1.0.0")]),
        &fx.stop,
    )
    .await
    .unwrap();
    let ev = fx.last_event();
    assert!(ev.reason.as_deref().unwrap().contains("expired"), "{ev:?}");
    assert!(fx.running().is_empty());
    // An expired root can still rotate to a new record (TUF: the root is updated first).
    e.take_trust(&fx.record(2, 2, None)).await.unwrap();
    assert_eq!(e.trust_version(), 2);
    e.handle_notice(
        &fx.notice(1, Strategy::StopFirst, &[("sensor", "1.0.0")]),
        &fx.stop,
    )
    .await
    .unwrap();
    assert_eq!(fx.running(), vec![name("sensor", 1)]);
}

fn heartbeat(key: &PrivateKey, at: chrono::DateTime<Utc>) -> Vec<u8> {
    ferry_protocol::heartbeat::Heartbeat { issued_at: at }
        .sign(key)
        .to_json()
        .into_bytes()
}

#[tokio::test(start_paused = true)]
async fn a_box_without_a_recent_heartbeat_says_it_is_stale() {
    let fx = Fx::new();
    let mut e = fx
        .trusting_engine()
        .with_heartbeat_age(Duration::from_secs(600));
    // None yet: stale.
    e.check_stale().await;
    let st = fx.last_state().trust.unwrap();
    assert!(st.stale && st.heartbeat_at.is_none(), "{st:?}");
    // One by another key: ignored, still stale.
    e.take_heartbeat(&heartbeat(&key(9), Utc::now())).await;
    assert!(e.is_stale());
    // A valid one: fresh, reported once.
    let n = fx.out.states.lock().unwrap().len();
    let at = Utc::now() - chrono::Duration::seconds(60);
    e.take_heartbeat(&heartbeat(&fx.ck, at)).await;
    let st = fx.last_state().trust.unwrap();
    assert!(!st.stale, "{st:?}");
    assert_eq!(st.heartbeat_at, Some(at));
    assert_eq!(fx.out.states.lock().unwrap().len(), n + 1);
    e.check_stale().await;
    assert_eq!(
        fx.out.states.lock().unwrap().len(),
        n + 1,
        "no change, no report"
    );
    // An older one does not move it back.
    e.take_heartbeat(&heartbeat(&fx.ck, at - chrono::Duration::seconds(5)))
        .await;
    assert_eq!(e.heartbeat_at, Some(at));
    // Withheld for longer than the age: stale again.
    e.heartbeat_at = Some(Utc::now() - chrono::Duration::seconds(601));
    e.check_stale().await;
    assert!(fx.last_state().trust.unwrap().stale);
    // A rotated-out controller key's heartbeat no longer counts.
    e.take_trust(&fx.record(1, 3, None)).await.unwrap();
    e.take_heartbeat(&heartbeat(&fx.ck, Utc::now())).await;
    assert!(e.is_stale());
    e.take_heartbeat(&heartbeat(&key(3), Utc::now())).await;
    assert!(!e.is_stale());
}

#[tokio::test(start_paused = true)]
async fn heartbeats_are_not_judged_when_the_age_is_zero() {
    let fx = Fx::new();
    let e = fx.trusting_engine().with_heartbeat_age(Duration::ZERO);
    assert!(!e.is_stale());
}
