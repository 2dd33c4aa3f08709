//! The controller's heartbeat (protocol §10a): a tiny record signed by the controller role,
//! published retained fleet-wide at a fixed interval. A box that holds no heartbeat newer than
//! `[trust] max_heartbeat_age` reports itself `stale`: a broker or network that withholds
//! notices is then visible, on the box and at the controller.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::dsse::{self, Envelope, Expect};
use crate::error::{EnvelopeError, RecordError};
use crate::keys::{PrivateKey, Role, TrustedKeys};
use crate::names;

pub const HEARTBEAT_PAYLOAD_TYPE: &str = "application/vnd.ferry.heartbeat.v1+json";
/// Size cap on a heartbeat envelope as received.
pub const MAX_HEARTBEAT_ENVELOPE: usize = 4 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub issued_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeartbeatError {
    #[error("heartbeat: {0}")]
    Envelope(#[source] EnvelopeError),
    #[error("heartbeat: {0}")]
    Body(#[source] RecordError),
    #[error(
        "heartbeat issued at {issued_at}, ahead of the box's clock ({now}) beyond the allowed skew"
    )]
    Future {
        issued_at: DateTime<Utc>,
        now: DateTime<Utc>,
    },
}

impl Heartbeat {
    pub fn sign(&self, key: &PrivateKey) -> Envelope {
        let body = serde_json::to_vec(self).expect("a heartbeat always serializes");
        Envelope::sign(HEARTBEAT_PAYLOAD_TYPE, &body, &[key])
    }
}

/// Verify a heartbeat as received against the controller keys; its time may be ahead of `now`
/// by at most `skew` (the box's clock may lag).
pub fn verify(
    raw: &[u8],
    controller: &TrustedKeys,
    now: DateTime<Utc>,
    skew: chrono::Duration,
) -> Result<Heartbeat, HeartbeatError> {
    let expect = Expect {
        what: "heartbeat",
        max_len: MAX_HEARTBEAT_ENVELOPE,
        payload_type: HEARTBEAT_PAYLOAD_TYPE,
        role: Role::Controller,
        threshold: 1,
    };
    let v = dsse::verify(raw, expect, controller).map_err(HeartbeatError::Envelope)?;
    let h: Heartbeat = serde_json::from_slice(&v.body).map_err(|e| {
        HeartbeatError::Body(RecordError::Malformed {
            what: "heartbeat",
            detail: e.to_string(),
        })
    })?;
    names::check_date(&h.issued_at).map_err(|detail| {
        HeartbeatError::Body(RecordError::Invalid {
            what: "heartbeat",
            field: "issued_at".into(),
            detail,
        })
    })?;
    if now
        .checked_add_signed(skew)
        .is_some_and(|limit| h.issued_at > limit)
    {
        return Err(HeartbeatError::Future {
            issued_at: h.issued_at,
            now,
        });
    }
    Ok(h)
}

/// Whether the newest heartbeat held (`None`: none yet) is older than `max_age` at `now`.
/// `max_age` zero disables the check.
pub fn is_stale(
    newest: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    max_age: chrono::Duration,
) -> bool {
    if max_age.is_zero() {
        return false;
    }
    match newest {
        None => true,
        Some(t) => now.signed_duration_since(t) > max_age,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> PrivateKey {
        PrivateKey::from_seed([n; 32]).unwrap()
    }

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn verify_and_judge() {
        let ck = key(2);
        let trusted = TrustedKeys::new([ck.public().clone()]);
        let now = t("2026-12-07T10:00:00Z");
        let skew = chrono::Duration::seconds(300);
        let raw = Heartbeat { issued_at: now }.sign(&ck).to_json();
        assert_eq!(
            verify(raw.as_bytes(), &trusted, now, skew)
                .unwrap()
                .issued_at,
            now
        );
        // Another key, or a time far ahead: refused.
        let other = Heartbeat { issued_at: now }.sign(&key(3)).to_json();
        assert!(matches!(
            verify(other.as_bytes(), &trusted, now, skew),
            Err(HeartbeatError::Envelope(_))
        ));
        let ahead = Heartbeat {
            issued_at: t("2026-12-07T11:00:00Z"),
        }
        .sign(&ck)
        .to_json();
        assert!(matches!(
            verify(ahead.as_bytes(), &trusted, now, skew),
            Err(HeartbeatError::Future { .. })
        ));
        // A date at chrono's limit neither panics nor passes.
        let body = br#"{"issued_at":"+262142-12-31T23:59:59Z"}"#;
        let far = Envelope::sign(HEARTBEAT_PAYLOAD_TYPE, body, &[&ck]).to_json();
        assert!(verify(far.as_bytes(), &trusted, now, skew).is_err());
        let unknown = Envelope::sign(
            HEARTBEAT_PAYLOAD_TYPE,
            br#"{"issued_at":"2026-12-07T10:00:00Z","x":1}"#,
            &[&ck],
        )
        .to_json();
        assert!(verify(unknown.as_bytes(), &trusted, now, skew).is_err());
    }

    #[test]
    fn staleness() {
        let now = t("2026-12-07T10:00:00Z");
        let hour = chrono::Duration::hours(1);
        assert!(is_stale(None, now, hour));
        assert!(!is_stale(Some(t("2026-12-07T09:30:00Z")), now, hour));
        assert!(is_stale(Some(t("2026-12-07T08:59:59Z")), now, hour));
        assert!(
            !is_stale(None, now, chrono::Duration::zero()),
            "0 disables it"
        );
    }
}
