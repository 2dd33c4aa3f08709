//! The trust record (protocol §10): which keys a box trusts for each role, signed by the
//! offline `root` role, versioned, and rotated after TUF's root role.
//!
//! A box starts from the keys in its config (version 0, with the root keys listed there). It
//! takes a new record only when **a threshold of the current root keys and a threshold of the
//! new record's own root keys** signed it and its version is higher; from then on the record's
//! release and controller keys are the only ones trusted. A record may carry a
//! `sequence_floor`: the box's accepted-sequence floor is set to it (recovery from a sequence
//! frozen at 2^64−1 by a leaked controller key). Such a record must replace every controller
//! key, so no notice signed before it can be replayed under the lowered floor.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::dsse::{self, Envelope, Expect};
use crate::error::{EnvelopeError, RecordError};
use crate::keys::{PrivateKey, PublicKey, Role, TrustedKeys};
use crate::names;

pub const TRUST_PAYLOAD_TYPE: &str = "application/vnd.ferry.trust.v1+json";
/// Size cap on a trust envelope as received.
pub const MAX_TRUST_ENVELOPE: usize = 64 * 1024;
/// At most this many keys per role in one record.
pub const MAX_KEYS_PER_ROLE: usize = 16;
/// At most this many device ids in a per-device record.
pub const MAX_DEVICES: usize = 1024;

/// One role's keys (SPKI PEM, as operators keep them) and threshold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleKeys {
    pub keys: Vec<String>,
    pub threshold: usize,
}

/// The signed body of a trust record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustRecord {
    /// 1 and up; a box takes only a higher version than the one it holds.
    pub version: u64,
    /// After this a box refuses notices until it has a newer record (freeze protection).
    pub expires_at: DateTime<Utc>,
    pub root: RoleKeys,
    pub release: RoleKeys,
    /// Notices need one valid signature by any of these.
    pub controller: Vec<String>,
    /// When set, a box taking this record sets its accepted-sequence floor to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence_floor: Option<u64>,
    /// When set, only these devices take the record; the others leave it aside unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<String>>,
}

/// A trust record's keys, parsed.
#[derive(Clone, Debug)]
pub struct TrustSet {
    /// 0 for the keys of the config, which no record signed.
    pub version: u64,
    pub expires_at: Option<DateTime<Utc>>,
    pub root: TrustedKeys,
    pub root_threshold: usize,
    pub trust: crate::Trust,
}

impl TrustSet {
    /// Version 0: the keys of the config, with the root keys listed there (none: the box takes
    /// no record).
    pub fn from_config(trust: crate::Trust, root: TrustedKeys, root_threshold: usize) -> TrustSet {
        TrustSet {
            version: 0,
            expires_at: None,
            root,
            root_threshold: root_threshold.max(1),
            trust,
        }
    }

    /// The expiry when it has passed at `now`.
    pub fn expired(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.expires_at.filter(|e| *e <= now)
    }
}

impl TrustRecord {
    /// Parse and check a body that verified (or is about to be signed).
    pub fn parse(body: &[u8]) -> Result<TrustRecord, RecordError> {
        let r: TrustRecord = serde_json::from_slice(body).map_err(|e| RecordError::Malformed {
            what: "trust record",
            detail: e.to_string(),
        })?;
        r.check()?;
        Ok(r)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a trust record always serializes")
    }

    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("a trust record always serializes")
    }

    /// An envelope over this body signed by `keys` (possibly none: signatures added later).
    pub fn sign(&self, keys: &[&PrivateKey]) -> Envelope {
        Envelope::sign(TRUST_PAYLOAD_TYPE, self.to_json().as_bytes(), keys)
    }

    fn check(&self) -> Result<(), RecordError> {
        let inv = |field: &str, detail: String| RecordError::Invalid {
            what: "trust record",
            field: field.to_string(),
            detail,
        };
        if self.version == 0 {
            return Err(inv(
                "version",
                "must be 1 or more (0 is the config's keys)".into(),
            ));
        }
        names::check_date(&self.expires_at).map_err(|d| inv("expires_at", d))?;
        self.keys().map(|_| ())?;
        if let Some(devices) = &self.devices {
            if devices.is_empty() || devices.len() > MAX_DEVICES {
                return Err(inv(
                    "devices",
                    format!("must list 1 to {MAX_DEVICES} device ids"),
                ));
            }
            for d in devices {
                names::check_device_id(d).map_err(|e| inv("devices", e))?;
            }
        }
        Ok(())
    }

    /// The record's keys parsed, each role checked: 1..=16 distinct keys, a threshold between
    /// 1 and their number, no key in two roles.
    pub fn keys(&self) -> Result<TrustSet, RecordError> {
        let inv = |field: &str, detail: String| RecordError::Invalid {
            what: "trust record",
            field: field.to_string(),
            detail,
        };
        let parse = |field: &str, pems: &[String]| -> Result<TrustedKeys, RecordError> {
            if pems.is_empty() || pems.len() > MAX_KEYS_PER_ROLE {
                return Err(inv(
                    field,
                    format!("must list 1 to {MAX_KEYS_PER_ROLE} keys"),
                ));
            }
            let mut keys = Vec::new();
            for (i, pem) in pems.iter().enumerate() {
                keys.push(
                    PublicKey::from_pem(pem)
                        .map_err(|e| inv(&format!("{field}[{i}]"), e.to_string()))?,
                );
            }
            let set = TrustedKeys::new(keys);
            if set.len() != pems.len() {
                return Err(inv(field, "lists a key twice".into()));
            }
            Ok(set)
        };
        let root = parse("root.keys", &self.root.keys)?;
        let release = parse("release.keys", &self.release.keys)?;
        let controller = parse("controller", &self.controller)?;
        for (field, t, n) in [
            ("root.threshold", self.root.threshold, root.len()),
            ("release.threshold", self.release.threshold, release.len()),
        ] {
            if t == 0 || t > n {
                return Err(inv(
                    field,
                    format!("{t} must be between 1 and the number of keys ({n})"),
                ));
            }
        }
        let ids = |s: &TrustedKeys| s.ids().cloned().collect::<BTreeSet<_>>();
        let (r, l, c) = (ids(&root), ids(&release), ids(&controller));
        if !r.is_disjoint(&l) || !r.is_disjoint(&c) || !l.is_disjoint(&c) {
            return Err(inv(
                "keys",
                "a key is listed for two roles; root, release and controller must use separate keys"
                    .into(),
            ));
        }
        Ok(TrustSet {
            version: self.version,
            expires_at: Some(self.expires_at),
            root,
            root_threshold: self.root.threshold,
            trust: crate::Trust {
                release,
                release_threshold: self.release.threshold,
                controller,
            },
        })
    }
}

/// Why a trust record was not taken. Nothing changes on the box in any of these cases.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TrustError {
    #[error("this box has no root keys ([trust] root_keys), so it takes no trust record")]
    NoRoot,
    #[error(
        "trust record, checked against the box's current root keys (version {current}): {source}"
    )]
    CurrentRoot {
        current: u64,
        #[source]
        source: EnvelopeError,
    },
    #[error("trust record, checked against its own new root keys: {0}")]
    NewRoot(#[source] EnvelopeError),
    #[error("trust record: {0}")]
    Body(#[source] RecordError),
    #[error("trust record version {got} is not higher than the box's version {current}")]
    NotNewer { got: u64, current: u64 },
    #[error("trust record version {version} expired at {expires_at}")]
    Expired {
        version: u64,
        expires_at: DateTime<Utc>,
    },
    #[error(
        "trust record version {version} lowers the sequence floor but keeps controller key {key}: \
         a lowered floor needs an entirely new controller key set, or notices signed before it \
         could be replayed"
    )]
    FloorWithOldController { version: u64, key: String },
}

/// What checking a record against the box's current trust gave.
#[derive(Debug)]
pub enum TrustOutcome {
    /// The record the box holds already (its exact signed body).
    Same,
    /// A valid record for other devices: left aside.
    NotForThisDevice,
    /// Take it: the record, its keys, and the body's SHA-256.
    Accept(Box<AcceptedTrust>),
}

#[derive(Debug)]
pub struct AcceptedTrust {
    pub record: TrustRecord,
    pub set: TrustSet,
    /// SHA-256 (hex) of the signed body.
    pub body_sha256: String,
}

/// Check `raw` (a trust envelope as received) as the next record of a box whose trust is
/// `current`, whose id is `device`, at `now`. The order is TUF's: the current root's threshold
/// first (nothing of the body is read before), then the body, then the new root's own
/// threshold, then the version, then the expiry.
pub fn check_next(
    raw: &[u8],
    current: &TrustSet,
    current_body_sha256: Option<&str>,
    device: &str,
    now: DateTime<Utc>,
) -> Result<TrustOutcome, TrustError> {
    if current.root.is_empty() {
        return Err(TrustError::NoRoot);
    }
    let expect = |threshold: usize| Expect {
        what: "trust",
        max_len: MAX_TRUST_ENVELOPE,
        payload_type: TRUST_PAYLOAD_TYPE,
        role: Role::Root,
        threshold,
    };
    let v = dsse::verify(raw, expect(current.root_threshold), &current.root).map_err(|source| {
        TrustError::CurrentRoot {
            current: current.version,
            source,
        }
    })?;
    let record = TrustRecord::parse(&v.body).map_err(TrustError::Body)?;
    let set = record.keys().map_err(TrustError::Body)?;
    dsse::verify(raw, expect(set.root_threshold), &set.root).map_err(TrustError::NewRoot)?;
    let body_sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&v.body));
    if record.version <= current.version {
        if record.version == current.version && current_body_sha256 == Some(body_sha256.as_str()) {
            return Ok(TrustOutcome::Same);
        }
        return Err(TrustError::NotNewer {
            got: record.version,
            current: current.version,
        });
    }
    if let Some(devices) = &record.devices {
        if !devices.iter().any(|d| d == device) {
            return Ok(TrustOutcome::NotForThisDevice);
        }
    }
    if record.expires_at <= now {
        return Err(TrustError::Expired {
            version: record.version,
            expires_at: record.expires_at,
        });
    }
    if record.sequence_floor.is_some() {
        if let Some(kept) = set
            .trust
            .controller
            .ids()
            .find(|id| current.trust.controller.get(id.as_str()).is_some())
        {
            return Err(TrustError::FloorWithOldController {
                version: record.version,
                key: kept.to_string(),
            });
        }
    }
    Ok(TrustOutcome::Accept(Box::new(AcceptedTrust {
        record,
        set,
        body_sha256,
    })))
}

/// Re-read a record the box stored itself: it must still verify against its own root keys
/// (its chain to the config was checked when it was taken).
pub fn load_stored(raw: &[u8]) -> Result<AcceptedTrust, TrustError> {
    let env: Envelope = serde_json::from_slice(raw).map_err(|e| {
        TrustError::Body(RecordError::Malformed {
            what: "trust record",
            detail: e.to_string(),
        })
    })?;
    let body = env.decoded_payload("trust").map_err(TrustError::NewRoot)?;
    let record = TrustRecord::parse(&body).map_err(TrustError::Body)?;
    let set = record.keys().map_err(TrustError::Body)?;
    let expect = Expect {
        what: "trust",
        max_len: MAX_TRUST_ENVELOPE,
        payload_type: TRUST_PAYLOAD_TYPE,
        role: Role::Root,
        threshold: set.root_threshold,
    };
    dsse::verify(raw, expect, &set.root).map_err(TrustError::NewRoot)?;
    Ok(AcceptedTrust {
        body_sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body)),
        record,
        set,
    })
}

/// Add `keys`' signatures to an envelope (the offline ceremony: each root key holder signs in
/// turn); a key that signed already is not added twice.
pub fn add_signatures(env: &Envelope, keys: &[&PrivateKey]) -> Result<Envelope, EnvelopeError> {
    let body = env.decoded_payload("trust")?;
    let signed = Envelope::sign(&env.payload_type, &body, keys);
    let mut out = env.clone();
    for s in signed.signatures {
        if !out.signatures.iter().any(|o| o.keyid == s.keyid) {
            out.signatures.push(s);
        }
    }
    Ok(out)
}

#[cfg(test)]
#[path = "trust_record_tests.rs"]
mod tests;
