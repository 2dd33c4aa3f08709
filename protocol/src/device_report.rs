//! Signed device reports (protocol v2, PROTOCOL.md §9): every message a device sends the
//! controller — `state`, `events`, `telemetry`, `online`, and its `enroll` request — is a DSSE
//! envelope signed by the device's own Ed25519 key, whose payload names the device, the stream
//! and a monotonic counter, and carries the v1 body unchanged.
//!
//! ```text
//! payloadType: application/vnd.ferry.report.v2+json
//! payload:     {"device": "dev-1", "stream": "state", "counter": 7516192769, "body": {…v1 state…}}
//! ```
//!
//! Counters are `boot << 32 | n`: `boot` is persisted by the agent and raised at every start
//! (to at least the clock's Unix seconds, so a lost counter file recovers on a box with a sane
//! clock), `n` counts up within a process. The controller keeps the highest counter per device
//! and stream and applies a report only when its counter is higher: a replay is dropped, a
//! re-sent copy (QoS 1 after a reconnect) is a duplicate. On the `online` stream `n` is
//! `2·attempt + 1` for `online = 1` and `2·attempt + 2` for the matching `online = 0` (the
//! last will, signed at connect time): the will of a connection always outranks its announce,
//! and the next connection outranks both.
//!
//! Parsing happens in two steps so that the controller can look the key up in between:
//! [`open`] checks the size, the envelope, the payload type and the payload's device and stream
//! against the topic; [`Opened::verify`] checks the signature with the device's key.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::dsse::{pae, Envelope};
use crate::keys::{KeyId, PrivateKey, PublicKey};

pub const REPORT_PAYLOAD_TYPE: &str = "application/vnd.ferry.report.v2+json";
/// The largest report envelope a controller reads (a state with many apps and log lines).
pub const MAX_REPORT_ENVELOPE: usize = 512 * 1024;

/// The device streams a report can belong to (one per topic, plus `enroll`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    State,
    Events,
    Telemetry,
    Online,
    Enroll,
}

impl Stream {
    pub const ALL: [Stream; 5] = [
        Stream::State,
        Stream::Events,
        Stream::Telemetry,
        Stream::Online,
        Stream::Enroll,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stream::State => "state",
            Stream::Events => "events",
            Stream::Telemetry => "telemetry",
            Stream::Online => "online",
            Stream::Enroll => "enroll",
        }
    }

    /// Position in a per-device counter array.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The signed payload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportPayload {
    pub device: String,
    pub stream: Stream,
    pub counter: u64,
    pub body: serde_json::Value,
}

/// The body of `online` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnlineBody {
    pub online: bool,
}

/// The body of an `enroll` request: the key it is signed with, and optionally a proof that the
/// device holds the fleet's enrolment token ([`token_proof`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollBody {
    /// SPKI PEM of the device key (the key that signs this envelope).
    pub public_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_proof: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
}

/// `boot << 32 | n`.
pub fn counter(boot: u32, n: u32) -> u64 {
    (u64::from(boot) << 32) | u64::from(n)
}

/// The `n` of the `online` stream for connection `attempt` (announce, or its will).
pub fn online_n(attempt: u32, online: bool) -> u32 {
    attempt
        .saturating_mul(2)
        .saturating_add(if online { 1 } else { 2 })
}

/// `hex(HMAC-SHA256(token, "ferry-enroll-v1\0" device "\0" keyid))`: binds the token to this
/// device id and this key, so a proof seen on the broker is useless for any other key.
pub fn token_proof(token: &str, device: &str, key: &KeyId) -> String {
    hex::encode(token_mac(token, device, key).finalize().into_bytes())
}

/// The HMAC of [`token_proof`], fed but not finalized.
fn token_mac(token: &str, device: &str, key: &KeyId) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(token.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(b"ferry-enroll-v1\0");
    mac.update(device.as_bytes());
    mac.update(b"\0");
    mac.update(key.as_str().as_bytes());
    mac
}

/// Whether `proof` is [`token_proof`] of `token` (compared in constant time).
pub fn check_token_proof(token: &str, device: &str, key: &KeyId, proof: &str) -> bool {
    let Ok(raw) = hex::decode(proof) else {
        return false;
    };
    token_mac(token, device, key).verify_slice(&raw).is_ok()
}

/// Sign one report: the envelope's JSON bytes, ready to publish.
pub fn sign(
    key: &PrivateKey,
    device: &str,
    stream: Stream,
    counter: u64,
    body: serde_json::Value,
) -> Vec<u8> {
    let payload = ReportPayload {
        device: device.to_string(),
        stream,
        counter,
        body,
    };
    let bytes = serde_json::to_vec(&payload).expect("a report payload serializes");
    Envelope::sign(REPORT_PAYLOAD_TYPE, &bytes, &[key])
        .to_json()
        .into_bytes()
}

/// Why a report was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("report is {size} bytes, over the {max}-byte limit")]
    TooLarge { size: usize, max: usize },
    #[error("unsigned report (not a DSSE envelope: a v1 agent, or forged)")]
    Unsigned,
    #[error("malformed report envelope: {0}")]
    Malformed(String),
    #[error("wrong payloadType {0:?}: expected {REPORT_PAYLOAD_TYPE:?}")]
    WrongPayloadType(String),
    #[error("report envelope must carry exactly one signature, has {0}")]
    Signatures(usize),
    #[error("report on {topic_device}'s topic names device {named:?}")]
    WrongDevice { topic_device: String, named: String },
    #[error("report on the {topic} topic is for the {named} stream")]
    WrongStream { topic: Stream, named: Stream },
    #[error("report signed by key {keyid}, not the device's enrolled key {enrolled}")]
    WrongKey { keyid: String, enrolled: String },
    #[error("device {0} has no enrolled key")]
    Unenrolled(String),
    #[error("report signature does not verify")]
    BadSignature,
    #[error("enroll request: {0}")]
    BadEnrolment(String),
}

impl ReportError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ReportError::TooLarge { .. } => "too_large",
            ReportError::Unsigned => "unsigned",
            ReportError::Malformed(_) | ReportError::Signatures(_) => "malformed",
            ReportError::WrongPayloadType(_) => "malformed",
            ReportError::WrongDevice { .. } | ReportError::WrongStream { .. } => "wrong_device",
            ReportError::WrongKey { .. } | ReportError::BadSignature => "bad_signature",
            ReportError::Unenrolled(_) => "unenrolled",
            ReportError::BadEnrolment(_) => "bad_enrolment",
        }
    }
}

/// A report whose envelope and payload parsed and match their topic; not yet verified.
#[derive(Debug)]
pub struct Opened {
    pub payload: ReportPayload,
    pub keyid: String,
    sig: Vec<u8>,
    message: Vec<u8>,
}

/// Step one: size cap, envelope, payload type, one signature, payload, device and stream as the
/// topic says.
pub fn open(raw: &[u8], topic_device: &str, topic_stream: Stream) -> Result<Opened, ReportError> {
    if raw.len() > MAX_REPORT_ENVELOPE {
        return Err(ReportError::TooLarge {
            size: raw.len(),
            max: MAX_REPORT_ENVELOPE,
        });
    }
    let env: Envelope = match serde_json::from_slice(raw) {
        Ok(env) => env,
        // Only on the error path: JSON without `payloadType` (a v1 report, `1` / `0`) is
        // unsigned, anything else malformed.
        Err(e) => {
            return Err(match serde_json::from_slice::<serde_json::Value>(raw) {
                Ok(v) if v.get("payloadType").is_none() => ReportError::Unsigned,
                _ => ReportError::Malformed(e.to_string()),
            })
        }
    };
    if env.payload_type != REPORT_PAYLOAD_TYPE {
        return Err(ReportError::WrongPayloadType(env.payload_type));
    }
    if env.signatures.len() != 1 {
        return Err(ReportError::Signatures(env.signatures.len()));
    }
    let body = STANDARD
        .decode(env.payload.as_bytes())
        .map_err(|_| ReportError::Malformed("payload is not valid base64".into()))?;
    let sig = STANDARD
        .decode(env.signatures[0].sig.as_bytes())
        .map_err(|_| ReportError::Malformed("sig is not valid base64".into()))?;
    let payload: ReportPayload =
        serde_json::from_slice(&body).map_err(|e| ReportError::Malformed(e.to_string()))?;
    if payload.device != topic_device {
        return Err(ReportError::WrongDevice {
            topic_device: topic_device.to_string(),
            named: payload.device,
        });
    }
    if payload.stream != topic_stream {
        return Err(ReportError::WrongStream {
            topic: topic_stream,
            named: payload.stream,
        });
    }
    Ok(Opened {
        payload,
        keyid: env.signatures[0].keyid.clone(),
        message: pae(REPORT_PAYLOAD_TYPE, &body),
        sig,
    })
}

impl Opened {
    /// Step two: the signature, by `key` (the device's enrolled key).
    pub fn verify(self, key: &PublicKey) -> Result<ReportPayload, ReportError> {
        if self.keyid != key.id().as_str() {
            return Err(ReportError::WrongKey {
                keyid: self.keyid,
                enrolled: key.id().to_string(),
            });
        }
        if !key.verify_strict(&self.message, &self.sig) {
            return Err(ReportError::BadSignature);
        }
        Ok(self.payload)
    }

    /// For `enroll`: the key named in the body, which must be the one that signed it.
    pub fn verify_enrolment(self) -> Result<(PublicKey, EnrollBody, u64), ReportError> {
        let body: EnrollBody = serde_json::from_value(self.payload.body.clone())
            .map_err(|e| ReportError::BadEnrolment(e.to_string()))?;
        let key = PublicKey::from_pem(&body.public_key)
            .map_err(|e| ReportError::BadEnrolment(e.to_string()))?;
        let counter = self.payload.counter;
        self.verify(&key)?;
        Ok((key, body, counter))
    }
}

/// Step two for many reports at once, in order: what [`Opened::verify`] returns for each, with
/// the signatures checked by Ed25519 batch verification (one multiscalar multiplication for the
/// batch, about twice the throughput of one by one; `ferry-sim verify-bench --batch`). When the
/// batch fails, each report is verified on its own, so one bad report costs its batch the
/// speed-up, never a good report its place.
///
/// Batch verification is not `verify_strict`: it does not reject a signature whose `R` has a
/// small-order component. Such a signature can only be made from a genuine one (the keys are
/// never small-order: [`PublicKey`] refuses them), over the same payload, and so passes as
/// that payload, which the counter check then treats like the genuine report.
pub fn verify_batch(items: Vec<(Opened, PublicKey)>) -> Vec<Result<ReportPayload, ReportError>> {
    let mut out: Vec<Option<Result<ReportPayload, ReportError>>> =
        (0..items.len()).map(|_| None).collect();
    let mut batch: Vec<(usize, Opened, PublicKey, ed25519_dalek::Signature)> = Vec::new();
    for (i, (opened, key)) in items.into_iter().enumerate() {
        if opened.keyid != key.id().as_str() {
            out[i] = Some(Err(ReportError::WrongKey {
                keyid: opened.keyid,
                enrolled: key.id().to_string(),
            }));
            continue;
        }
        match ed25519_dalek::Signature::from_slice(&opened.sig) {
            Ok(sig) => batch.push((i, opened, key, sig)),
            Err(_) => out[i] = Some(Err(ReportError::BadSignature)),
        }
    }
    let together = batch.len() > 1 && {
        let messages: Vec<&[u8]> = batch
            .iter()
            .map(|(_, o, _, _)| o.message.as_slice())
            .collect();
        let sigs: Vec<ed25519_dalek::Signature> = batch.iter().map(|(_, _, _, s)| *s).collect();
        let keys: Vec<ed25519_dalek::VerifyingKey> = batch
            .iter()
            .map(|(_, _, k, _)| *k.verifying_key())
            .collect();
        ed25519_dalek::verify_batch(&messages, &sigs, &keys).is_ok()
    };
    for (i, opened, key, _) in batch {
        out[i] = Some(if together {
            Ok(opened.payload)
        } else {
            opened.verify(&key)
        });
    }
    out.into_iter()
        .map(|r| r.expect("every report has a result"))
        .collect()
}

/// Decode a report envelope's payload without verifying it (tools and tests that watch the
/// broker; never for deciding anything).
pub fn peek(raw: &[u8]) -> Option<ReportPayload> {
    let env: Envelope = serde_json::from_slice(raw).ok()?;
    if env.payload_type != REPORT_PAYLOAD_TYPE {
        return None;
    }
    let body = STANDARD.decode(env.payload.as_bytes()).ok()?;
    serde_json::from_slice(&body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(n: u8) -> PrivateKey {
        PrivateKey::from_seed([n; 32]).unwrap()
    }

    #[test]
    fn sign_open_verify() {
        let k = key(1);
        let raw = sign(&k, "d1", Stream::State, counter(3, 7), json!({"a": 1}));
        let p = open(&raw, "d1", Stream::State)
            .unwrap()
            .verify(k.public())
            .unwrap();
        assert_eq!(p.counter, (3u64 << 32) | 7);
        assert_eq!(p.body, json!({"a": 1}));
        assert_eq!(peek(&raw).unwrap(), p);
    }

    #[test]
    fn a_batch_verifies_like_one_by_one_and_a_bad_report_fails_alone() {
        let keys: Vec<PrivateKey> = (1..=5).map(key).collect();
        let open_one = |k: &PrivateKey, d: &str, n: u64| {
            let raw = sign(k, d, Stream::State, n, json!({"n": n}));
            open(&raw, d, Stream::State).unwrap()
        };
        let batch = |bad: Option<usize>, wrong_key: Option<usize>| {
            (0..20)
                .map(|i| {
                    let d = format!("d{}", i % 5);
                    let k = &keys[i % 5];
                    let mut o = open_one(k, &d, i as u64);
                    if bad == Some(i) {
                        // Another payload under the same signature.
                        o.message.push(b' ');
                    }
                    let trusted = if wrong_key == Some(i) {
                        keys[(i + 1) % 5].public().clone()
                    } else {
                        k.public().clone()
                    };
                    (o, trusted)
                })
                .collect::<Vec<_>>()
        };
        let ok = verify_batch(batch(None, None));
        assert_eq!(ok.len(), 20);
        for (i, r) in ok.iter().enumerate() {
            assert_eq!(r.as_ref().unwrap().counter, i as u64);
        }
        let one_bad = verify_batch(batch(Some(7), Some(11)));
        for (i, r) in one_bad.iter().enumerate() {
            match i {
                7 => assert_eq!(r.as_ref().unwrap_err(), &ReportError::BadSignature),
                11 => assert!(matches!(r, Err(ReportError::WrongKey { .. })), "{r:?}"),
                _ => assert_eq!(r.as_ref().unwrap().counter, i as u64, "{i}"),
            }
        }
        // One, and none.
        let single = verify_batch(vec![(
            open_one(&keys[0], "d0", 9),
            keys[0].public().clone(),
        )]);
        assert_eq!(single[0].as_ref().unwrap().counter, 9);
        assert!(verify_batch(Vec::new()).is_empty());
    }

    #[test]
    fn refuses_what_it_must() {
        let k = key(1);
        let other = key(2);
        let raw = sign(&k, "d1", Stream::Events, 1, json!({}));
        assert_eq!(
            open(b"1", "d1", Stream::Online).unwrap_err(),
            ReportError::Unsigned
        );
        assert_eq!(
            open(br#"{"device":"d1"}"#, "d1", Stream::State).unwrap_err(),
            ReportError::Unsigned
        );
        assert!(matches!(
            open(&raw, "d2", Stream::Events).unwrap_err(),
            ReportError::WrongDevice { .. }
        ));
        assert!(matches!(
            open(&raw, "d1", Stream::State).unwrap_err(),
            ReportError::WrongStream { .. }
        ));
        assert!(matches!(
            open(&raw, "d1", Stream::Events)
                .unwrap()
                .verify(other.public())
                .unwrap_err(),
            ReportError::WrongKey { .. }
        ));
        // The payload changed after signing.
        let mut env: Envelope = serde_json::from_slice(&raw).unwrap();
        let forged = ReportPayload {
            device: "d1".into(),
            stream: Stream::Events,
            counter: 99,
            body: json!({}),
        };
        env.payload = STANDARD.encode(serde_json::to_vec(&forged).unwrap());
        assert_eq!(
            open(env.to_json().as_bytes(), "d1", Stream::Events)
                .unwrap()
                .verify(k.public())
                .unwrap_err(),
            ReportError::BadSignature
        );
        // Two signatures, or none.
        let two = Envelope::sign(REPORT_PAYLOAD_TYPE, b"{}", &[&k, &other]);
        assert_eq!(
            open(two.to_json().as_bytes(), "d1", Stream::Events).unwrap_err(),
            ReportError::Signatures(2)
        );
        let big = vec![b' '; MAX_REPORT_ENVELOPE + 1];
        assert!(matches!(
            open(&big, "d1", Stream::State).unwrap_err(),
            ReportError::TooLarge { .. }
        ));
    }

    #[test]
    fn enrolment_is_signed_by_the_key_it_names() {
        let k = key(1);
        let body = EnrollBody {
            public_key: k.public().to_pem(),
            token_proof: Some(token_proof("tok", "d1", k.public().id())),
            agent_version: None,
        };
        let raw = sign(
            &k,
            "d1",
            Stream::Enroll,
            1,
            serde_json::to_value(&body).unwrap(),
        );
        let (pk, b, _) = open(&raw, "d1", Stream::Enroll)
            .unwrap()
            .verify_enrolment()
            .unwrap();
        assert_eq!(pk.id(), k.public().id());
        assert!(check_token_proof(
            "tok",
            "d1",
            pk.id(),
            b.token_proof.as_deref().unwrap()
        ));
        assert!(!check_token_proof(
            "other",
            "d1",
            pk.id(),
            b.token_proof.as_deref().unwrap()
        ));
        assert!(!check_token_proof(
            "tok",
            "d2",
            pk.id(),
            b.token_proof.as_deref().unwrap()
        ));
        // Someone else's key in the body: the signature is not by it.
        let thief = key(2);
        let raw = sign(
            &thief,
            "d1",
            Stream::Enroll,
            1,
            serde_json::to_value(&body).unwrap(),
        );
        assert!(open(&raw, "d1", Stream::Enroll)
            .unwrap()
            .verify_enrolment()
            .is_err());
    }

    #[test]
    fn a_connections_will_outranks_its_announce_and_the_next_connection_both() {
        let c = |a, on| counter(5, online_n(a, on));
        assert!(c(0, true) < c(0, false));
        assert!(c(0, false) < c(1, true));
        assert!(c(1, false) < counter(6, online_n(0, true)));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_open_and_verify(raw in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let k = key(9);
            let ok = open(&raw, "d1", Stream::State).and_then(|o| o.verify(k.public()));
            proptest::prop_assert!(ok.is_err());
        }
    }
}
