//! Root rotation, modelled on python-tuf's key-rotation table
//! (`tests/test_updater_key_rotations.py`): each case is a chain of root versions, each with
//! its keys, threshold and signers; the box starts at version 0 (its config) and takes the chain
//! one record at a time. A failing step must change nothing: the box keeps the previous set.

use super::*;
use crate::keys::PrivateKey;

fn key(n: u8) -> PrivateKey {
    PrivateKey::from_seed([n; 32]).unwrap()
}

fn pems(ids: &[u8]) -> Vec<String> {
    ids.iter().map(|i| key(*i).public().to_pem()).collect()
}

fn now() -> DateTime<Utc> {
    "2026-12-07T10:00:00Z".parse().unwrap()
}

/// Root keys are seeds 1..=9, release 100, controller 110 (or `controller`).
fn record(version: u64, root: &[u8], threshold: usize, controller: u8) -> TrustRecord {
    TrustRecord {
        version,
        expires_at: "2027-12-07T10:00:00Z".parse().unwrap(),
        root: RoleKeys {
            keys: pems(root),
            threshold,
        },
        release: RoleKeys {
            keys: pems(&[100]),
            threshold: 1,
        },
        controller: pems(&[controller]),
        sequence_floor: None,
        devices: None,
    }
}

fn signed(r: &TrustRecord, signers: &[u8]) -> Vec<u8> {
    let keys: Vec<PrivateKey> = signers.iter().map(|i| key(*i)).collect();
    let refs: Vec<&PrivateKey> = keys.iter().collect();
    r.sign(&refs).to_json().into_bytes()
}

fn config(root: &[u8], threshold: usize) -> TrustSet {
    TrustSet::from_config(
        crate::Trust {
            release: TrustedKeys::new([key(100).public().clone()]),
            release_threshold: 1,
            controller: TrustedKeys::new([key(110).public().clone()]),
        },
        TrustedKeys::new(root.iter().map(|i| key(*i).public().clone())),
        threshold,
    )
}

/// Take one record: the new set on success, the same set on failure.
fn step(
    cur: &(TrustSet, Option<String>),
    raw: &[u8],
) -> Result<(TrustSet, Option<String>), TrustError> {
    match check_next(raw, &cur.0, cur.1.as_deref(), "dev-001", now())? {
        TrustOutcome::Accept(a) => Ok((a.set, Some(a.body_sha256))),
        TrustOutcome::Same | TrustOutcome::NotForThisDevice => Ok(cur.clone()),
    }
}

struct Step {
    root: &'static [u8],
    threshold: usize,
    signers: &'static [u8],
}

const fn s(root: &'static [u8], threshold: usize, signers: &'static [u8]) -> Step {
    Step {
        root,
        threshold,
        signers,
    }
}

#[test]
fn python_tuf_key_rotation_table() {
    // (name, the config's root keys and threshold, the chain, Ok or the failing step's index)
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, (&[u8], usize), Vec<Step>, Option<usize>)> = vec![
        (
            "1-of-1 rotation",
            (&[1], 1),
            vec![s(&[2], 1, &[1, 2])],
            None,
        ),
        (
            "1-of-1 rotation, unused signatures",
            (&[1], 1),
            vec![s(&[2], 1, &[3, 1, 4, 2])],
            None,
        ),
        (
            "1-of-1 rotation fails: not signed by the old key",
            (&[1], 1),
            vec![s(&[2], 1, &[2, 3, 4])],
            Some(0),
        ),
        (
            "1-of-1 rotation fails: not signed by the new key",
            (&[1], 1),
            vec![s(&[2], 1, &[1, 3, 4])],
            Some(0),
        ),
        (
            "3-of-5, different key combinations",
            (&[1, 2, 3, 4, 5], 3),
            vec![
                s(&[1, 2, 3, 4, 5], 3, &[1, 2, 3]),
                s(&[1, 2, 3, 4, 5], 3, &[1, 4, 5]),
                s(&[1, 2, 3, 4, 5], 3, &[3, 4, 5]),
            ],
            None,
        ),
        (
            "3-of-5, one key rotated",
            (&[1, 2, 3, 4, 5], 3),
            vec![s(&[1, 2, 3, 4, 6], 3, &[1, 2, 3, 6])],
            None,
        ),
        (
            "3-of-5, rotation fails: 3 new keys not reached",
            (&[1, 2, 3, 4, 5], 3),
            vec![s(&[1, 2, 6, 7, 8], 3, &[1, 3, 4, 6])],
            Some(0),
        ),
        (
            "3-of-5, rotation fails: 3 old keys not reached",
            (&[1, 2, 3, 4, 5], 3),
            vec![s(&[1, 2, 3, 4, 6], 3, &[1, 2, 6])],
            Some(0),
        ),
        (
            "1-of-3 threshold bump to 2-of-3",
            (&[1, 2, 3], 1),
            vec![s(&[1, 2, 3], 2, &[1, 2])],
            None,
        ),
        (
            "2-of-3 threshold decrease to 1-of-3",
            (&[1, 2, 3], 2),
            vec![s(&[1, 2, 3], 1, &[1, 2]), s(&[1, 2, 3], 1, &[3])],
            None,
        ),
        (
            "1-of-3 bump to 2-of-3 fails: new threshold not reached",
            (&[1, 2, 3], 1),
            vec![s(&[1, 2, 3], 2, &[1])],
            Some(0),
        ),
        (
            "2-of-3 decrease to 1-of-3 fails: old threshold not reached",
            (&[1, 2, 3], 2),
            vec![s(&[1, 2, 3], 1, &[1])],
            Some(0),
        ),
        (
            "1-of-2 bump to 2-of-2",
            (&[1, 2], 1),
            vec![s(&[1, 2], 2, &[1, 2])],
            None,
        ),
        (
            "a chain 1 -> 2 -> 3, each signed by the previous and the next",
            (&[1], 1),
            vec![s(&[2], 1, &[1, 2]), s(&[3], 1, &[2, 3])],
            None,
        ),
        (
            "a chain cannot skip: version 2's root cannot sign after version 3",
            (&[1], 1),
            vec![
                s(&[2], 1, &[1, 2]),
                s(&[3], 1, &[2, 3]),
                s(&[4], 1, &[2, 4]),
            ],
            Some(2),
        ),
    ];
    for (name, (root, t), chain, fails_at) in cases {
        let mut cur = (config(root, t), None);
        for (i, st) in chain.iter().enumerate() {
            let rec = record(i as u64 + 1, st.root, st.threshold, 110);
            let before = (cur.0.version, cur.1.clone());
            match step(&cur, &signed(&rec, st.signers)) {
                Ok(next) => {
                    assert_ne!(fails_at, Some(i), "{name}: step {i} should have failed");
                    assert_eq!(next.0.version, i as u64 + 1, "{name}");
                    cur = next;
                }
                Err(e) => {
                    assert_eq!(fails_at, Some(i), "{name}: step {i}: {e}");
                    assert_eq!(
                        (cur.0.version, cur.1.clone()),
                        before,
                        "{name}: nothing changes"
                    );
                    assert!(
                        matches!(e, TrustError::CurrentRoot { .. } | TrustError::NewRoot(_)),
                        "{name}: {e}"
                    );
                    break;
                }
            }
        }
    }
}

#[test]
fn versions_only_go_up_and_the_same_record_is_a_duplicate() {
    let cur = (config(&[1], 1), None);
    let two = signed(&record(2, &[1], 1, 110), &[1]);
    let cur = step(&cur, &two).unwrap();
    assert_eq!(cur.0.version, 2);
    // The same record again (even re-serialized): nothing to do.
    let again = check_next(&two, &cur.0, cur.1.as_deref(), "dev-001", now()).unwrap();
    assert!(matches!(again, TrustOutcome::Same));
    let mut spaced = String::from_utf8(two.clone()).unwrap();
    spaced.insert(1, ' ');
    let again = check_next(
        spaced.as_bytes(),
        &cur.0,
        cur.1.as_deref(),
        "dev-001",
        now(),
    )
    .unwrap();
    assert!(matches!(again, TrustOutcome::Same));
    // Another body with the same version, or an older version: refused.
    for v in [1, 2] {
        let other = signed(&record(v, &[1], 1, 111), &[1]);
        let e = step(&cur, &other).unwrap_err();
        assert_eq!(e, TrustError::NotNewer { got: v, current: 2 });
    }
}

#[test]
fn a_removed_controller_key_is_not_trusted_after_rotation() {
    let cur = (config(&[1], 1), None);
    assert!(cur
        .0
        .trust
        .controller
        .get(key(110).public().id().as_str())
        .is_some());
    let next = step(&cur, &signed(&record(1, &[1], 1, 111), &[1])).unwrap();
    assert!(next
        .0
        .trust
        .controller
        .get(key(110).public().id().as_str())
        .is_none());
    assert!(next
        .0
        .trust
        .controller
        .get(key(111).public().id().as_str())
        .is_some());
}

#[test]
fn no_root_no_record() {
    let cur = config(&[], 1);
    let raw = signed(&record(1, &[1], 1, 110), &[1]);
    let e = check_next(&raw, &cur, None, "dev-001", now()).unwrap_err();
    assert_eq!(e, TrustError::NoRoot);
}

#[test]
fn expired_records_are_refused() {
    let cur = config(&[1], 1);
    let mut r = record(1, &[1], 1, 110);
    r.expires_at = "2026-12-07T09:59:59Z".parse().unwrap();
    let e = check_next(&signed(&r, &[1]), &cur, None, "dev-001", now()).unwrap_err();
    assert!(matches!(e, TrustError::Expired { version: 1, .. }), "{e}");
    let mut set = cur.clone();
    set.expires_at = Some(r.expires_at);
    assert_eq!(set.expired(now()), Some(r.expires_at));
}

#[test]
fn a_lowered_floor_needs_new_controller_keys() {
    let cur = config(&[1], 1);
    let mut r = record(1, &[1], 1, 110);
    r.sequence_floor = Some(0);
    let e = check_next(&signed(&r, &[1]), &cur, None, "dev-001", now()).unwrap_err();
    assert!(
        matches!(e, TrustError::FloorWithOldController { .. }),
        "{e}"
    );
    r.controller = pems(&[111]);
    match check_next(&signed(&r, &[1]), &cur, None, "dev-001", now()).unwrap() {
        TrustOutcome::Accept(a) => assert_eq!(a.record.sequence_floor, Some(0)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn per_device_records() {
    let cur = config(&[1], 1);
    let mut r = record(1, &[1], 1, 111);
    r.devices = Some(vec!["dev-002".into()]);
    let raw = signed(&r, &[1]);
    assert!(matches!(
        check_next(&raw, &cur, None, "dev-001", now()).unwrap(),
        TrustOutcome::NotForThisDevice
    ));
    assert!(matches!(
        check_next(&raw, &cur, None, "dev-002", now()).unwrap(),
        TrustOutcome::Accept(_)
    ));
}

#[test]
fn bodies_are_checked() {
    let cur = config(&[1], 1);
    let base = record(1, &[1], 1, 110);
    type Edit = Box<dyn Fn(&mut TrustRecord)>;
    let bad: Vec<(&str, Edit)> = vec![
        ("version", Box::new(|r| r.version = 0)),
        ("root.threshold", Box::new(|r| r.root.threshold = 2)),
        ("release.threshold", Box::new(|r| r.release.threshold = 0)),
        ("controller", Box::new(|r| r.controller.clear())),
        (
            "root.keys",
            Box::new(|r| r.root.keys.push(r.root.keys[0].clone())),
        ),
        ("keys", Box::new(|r| r.controller = r.release.keys.clone())),
        (
            "release.keys[0]",
            Box::new(|r| r.release.keys[0] = "nope".into()),
        ),
        ("devices", Box::new(|r| r.devices = Some(vec![]))),
        (
            "expires_at",
            Box::new(|r| r.expires_at = "+262142-12-31T23:59:59Z".parse().unwrap()),
        ),
    ];
    for (field, f) in bad {
        let mut r = base.clone();
        f(&mut r);
        // Signed by root 1 (a record with two root keys still carries 1's signature).
        let e = check_next(&signed(&r, &[1]), &cur, None, "dev-001", now()).unwrap_err();
        assert!(
            matches!(&e, TrustError::Body(RecordError::Invalid { field: f, .. }) if f == field),
            "{field}: {e}"
        );
    }
}

#[test]
fn stored_records_reload_and_signatures_add_up() {
    let r = record(1, &[1, 2], 2, 110);
    let one = r.sign(&[&key(1)]);
    assert!(load_stored(one.to_json().as_bytes()).is_err(), "1 of 2");
    let two = add_signatures(&one, &[&key(2), &key(1)]).unwrap();
    assert_eq!(two.signatures.len(), 2, "key 1 is not added twice");
    let a = load_stored(two.to_json().as_bytes()).unwrap();
    assert_eq!(a.set.version, 1);
    assert_eq!(a.set.root_threshold, 2);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]
    /// Any bytes, signed or not: an error or a record, never a panic.
    #[test]
    fn check_never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..600), sign in proptest::bool::ANY) {
        let cur = config(&[1], 1);
        let raw = if sign {
            Envelope::sign(TRUST_PAYLOAD_TYPE, &body, &[&key(1)]).to_json().into_bytes()
        } else {
            body
        };
        let _ = check_next(&raw, &cur, None, "dev-001", now());
        let _ = load_stored(&raw);
    }
}
