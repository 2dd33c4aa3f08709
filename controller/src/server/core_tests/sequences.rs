//! The notice sequence: what a report may steer, and values near the end.

use super::*;

#[test]
fn next_sequence_believes_a_report_only_within_the_lead() {
    assert_eq!(next_sequence(0, 0), Some(1));
    assert_eq!(next_sequence(5, 3), Some(6), "behind: our own");
    assert_eq!(
        next_sequence(5, 9),
        Some(10),
        "ahead (publish from elsewhere)"
    );
    assert_eq!(
        next_sequence(5, 5 + MAX_SEQUENCE_LEAD),
        Some(6 + MAX_SEQUENCE_LEAD)
    );
    assert_eq!(
        next_sequence(5, 6 + MAX_SEQUENCE_LEAD),
        Some(6),
        "too far: forged"
    );
    assert_eq!(next_sequence(5, u64::MAX - 1), Some(6));
    assert_eq!(next_sequence(u64::MAX - 3, u64::MAX - 1), Some(u64::MAX));
    assert_eq!(next_sequence(u64::MAX, 0), None, "exhausted");
}

/// Issue 9: a forged state claiming sequence 2^64−2 made the controller sign 2^64−1, after which
/// the box could never accept another notice.
#[test]
fn a_reported_sequence_near_the_end_does_not_steer_the_next_notice() {
    for mut x in T::each() {
        x.fleet(1, "beta");
        x.push("1.0.0");
        x.push("2.0.0");
        x.core
            .ingest(state("dev-0", "1.0.0", u64::MAX - 1, None, "beta"), t(1));
        x.start("2.0.0", "100%", None);
        let n = x.notices();
        assert_eq!(n, vec![("dev-0".into(), 2, "2.0.0".into(), false)]);
        assert_eq!(
            x.core.device("dev-0").unwrap().device.sequence,
            1,
            "not believed"
        );
        assert_eq!(x.core.metrics.disbelieved_sequences.get(), 1);
    }
}

/// Issue 9: a sequence above i64::MAX was stored negative and the controller then refused to
/// start. Stored and reloaded, it is the next notice's base.
#[test]
fn a_sequence_above_i64_max_survives_a_restart() {
    for mut x in T::each() {
        x.fleet(1, "beta");
        x.push("1.0.0");
        x.push("2.0.0");
        let big = i64::MAX as u64 + 10;
        x.core
            .ingest(state("dev-0", "1.0.0", big, None, "beta"), t(1));
        x.core.sequences.insert("dev-0".into(), big - 1);
        x.core.dirty.sequences.insert("dev-0".into());
        x.core.flush_all().unwrap();
        let mut x = x.reopen();
        assert_eq!(x.core.sequences["dev-0"], big - 1);
        x.core.ingest(
            Inbound::Online {
                device: "dev-0".into(),
                online: true,
            },
            t(2),
        );
        x.core
            .ingest(state("dev-0", "1.0.0", big, None, "beta"), t(2));
        x.start("2.0.0", "100%", None);
        let n = x.notices();
        assert_eq!(n, vec![("dev-0".into(), big + 1, "2.0.0".into(), false)]);
        let x = x.reopen();
        assert_eq!(x.core.sequences["dev-0"], big + 1);
    }
}
