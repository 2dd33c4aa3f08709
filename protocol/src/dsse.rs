//! DSSE v1 envelopes (protocol §2): pre-authentication encoding, signing, and verification
//! against the trusted keys of one role with a threshold of distinct keys.

use std::collections::BTreeSet;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::error::EnvelopeError;
use crate::keys::{KeyId, PrivateKey, Role, TrustedKeys};

pub const RELEASE_PAYLOAD_TYPE: &str = "application/vnd.ferry.release.v1+json";
pub const DESIRED_PAYLOAD_TYPE: &str = "application/vnd.ferry.desired.v1+json";
/// Size caps on envelopes as received.
pub const MAX_DESIRED_ENVELOPE: usize = 256 * 1024;
pub const MAX_RELEASE_ENVELOPE: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    pub payload: String,
    pub signatures: Vec<EnvelopeSignature>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeSignature {
    pub keyid: String,
    pub sig: String,
}

/// `PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`.
pub fn pae(payload_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload_type.len() + body.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(body);
    out
}

impl Envelope {
    /// Sign `body` with every key given (one signature each).
    pub fn sign(payload_type: &str, body: &[u8], keys: &[&PrivateKey]) -> Envelope {
        let msg = pae(payload_type, body);
        Envelope::with_signatures(
            payload_type,
            body,
            keys.iter().map(|k| (k.public().id(), k.sign(&msg))),
        )
    }

    /// An envelope from signatures made elsewhere over `pae(payload_type, body)` (e.g. on other
    /// threads, see the controller's notice batches). [`Envelope::sign`] is this with
    /// signatures made here.
    pub fn with_signatures<'k>(
        payload_type: &str,
        body: &[u8],
        signatures: impl IntoIterator<Item = (&'k KeyId, [u8; 64])>,
    ) -> Envelope {
        Envelope {
            payload_type: payload_type.to_string(),
            payload: STANDARD.encode(body),
            signatures: signatures
                .into_iter()
                .map(|(id, sig)| EnvelopeSignature {
                    keyid: id.to_string(),
                    sig: STANDARD.encode(sig),
                })
                .collect(),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an envelope always serializes")
    }

    /// The payload decoded, NOT verified (for tools that add signatures or show a record).
    pub fn decoded_payload(&self, what: &'static str) -> Result<Vec<u8>, EnvelopeError> {
        STANDARD
            .decode(self.payload.as_bytes())
            .map_err(|_| EnvelopeError::BadBase64 {
                what,
                field: "payload",
            })
    }

    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("an envelope always serializes")
    }
}

/// What to expect of an envelope: its kind, size cap, payload type, role and threshold.
#[derive(Clone, Copy, Debug)]
pub struct Expect<'a> {
    pub what: &'static str,
    pub max_len: usize,
    pub payload_type: &'a str,
    pub role: Role,
    pub threshold: usize,
}

impl Expect<'_> {
    pub fn desired() -> Expect<'static> {
        Expect {
            what: "desired-state",
            max_len: MAX_DESIRED_ENVELOPE,
            payload_type: DESIRED_PAYLOAD_TYPE,
            role: Role::Controller,
            threshold: 1,
        }
    }
    pub fn release(threshold: usize) -> Expect<'static> {
        Expect {
            what: "release",
            max_len: MAX_RELEASE_ENVELOPE,
            payload_type: RELEASE_PAYLOAD_TYPE,
            role: Role::Release,
            threshold: threshold.max(1),
        }
    }
}

/// A payload whose signatures met the threshold; its body is still untrusted *content* to be
/// parsed strictly, but it is authentic.
#[derive(Clone, Debug)]
pub struct Verified {
    pub body: Vec<u8>,
    /// Key ids of the distinct trusted keys whose signatures verified.
    pub signers: Vec<String>,
}

/// Verify an envelope as received, in the order protocol §2 prescribes:
/// size cap → parse → payloadType → decode → verify signatures of trusted keys of the role →
/// count distinct keys → threshold. Nothing of the body is looked at before all of that passed.
pub fn verify(
    raw: &[u8],
    expect: Expect<'_>,
    trusted: &TrustedKeys,
) -> Result<Verified, EnvelopeError> {
    let what = expect.what;
    if raw.len() > expect.max_len {
        return Err(EnvelopeError::TooLarge {
            what,
            size: raw.len(),
            max: expect.max_len,
        });
    }
    let env: Envelope = serde_json::from_slice(raw).map_err(|e| EnvelopeError::Malformed {
        what,
        detail: e.to_string(),
    })?;
    if env.payload_type != expect.payload_type {
        return Err(EnvelopeError::WrongPayloadType {
            expected: expect.payload_type.to_string(),
            got: env.payload_type,
        });
    }
    let body = STANDARD
        .decode(env.payload.as_bytes())
        .map_err(|_| EnvelopeError::BadBase64 {
            what,
            field: "payload",
        })?;
    if env.signatures.is_empty() {
        return Err(EnvelopeError::NoSignatures { what });
    }
    let msg = pae(&env.payload_type, &body);
    let mut distinct: BTreeSet<[u8; 32]> = BTreeSet::new();
    let mut signers = Vec::new();
    let mut untrusted = 0usize;
    let mut invalid = 0usize;
    for s in &env.signatures {
        let Some(key) = trusted.get(&s.keyid) else {
            untrusted += 1;
            continue;
        };
        let sig = STANDARD
            .decode(s.sig.as_bytes())
            .map_err(|_| EnvelopeError::BadBase64 { what, field: "sig" })?;
        if key.verify_strict(&msg, &sig) {
            if distinct.insert(*key.verifying_key().as_bytes()) {
                signers.push(key.id().to_string());
            }
        } else {
            invalid += 1;
        }
    }
    if distinct.len() < expect.threshold {
        let mut detail = String::new();
        if invalid > 0 {
            detail.push_str(&format!(
                "; {invalid} signature(s) by trusted keys did not verify"
            ));
        }
        if untrusted > 0 {
            detail.push_str(&format!(
                "; {untrusted} signature(s) by keys not trusted for the {} role",
                expect.role
            ));
        }
        return Err(EnvelopeError::ThresholdNotMet {
            what,
            role: expect.role.to_string(),
            valid: distinct.len(),
            required: expect.threshold,
            detail,
        });
    }
    Ok(Verified { body, signers })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> PrivateKey {
        PrivateKey::from_seed([n; 32]).unwrap()
    }

    #[test]
    fn pae_matches_dsse_spec_example() {
        // From the DSSE v1 specification.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }

    #[test]
    fn sign_then_verify() {
        let k = key(1);
        let env = Envelope::sign(RELEASE_PAYLOAD_TYPE, b"{}", &[&k]);
        let t = TrustedKeys::new([k.public().clone()]);
        let v = verify(env.to_json().as_bytes(), Expect::release(1), &t).unwrap();
        assert_eq!(v.body, b"{}");
        assert_eq!(v.signers, vec![k.public().id().to_string()]);
    }

    #[test]
    fn size_cap_checked_first() {
        let raw = vec![b'x'; MAX_RELEASE_ENVELOPE + 1];
        let e = verify(&raw, Expect::release(1), &TrustedKeys::default()).unwrap_err();
        assert!(matches!(e, EnvelopeError::TooLarge { .. }));
    }

    #[test]
    fn wrong_type_rejected_before_signatures() {
        let k = key(1);
        let env = Envelope::sign(DESIRED_PAYLOAD_TYPE, b"{}", &[&k]);
        let t = TrustedKeys::new([k.public().clone()]);
        let e = verify(env.to_json().as_bytes(), Expect::release(1), &t).unwrap_err();
        assert!(matches!(e, EnvelopeError::WrongPayloadType { .. }));
    }

    #[test]
    fn unknown_fields_rejected() {
        let k = key(1);
        let env = Envelope::sign(RELEASE_PAYLOAD_TYPE, b"{}", &[&k]);
        let mut v: serde_json::Value = serde_json::from_str(&env.to_json()).unwrap();
        v["extra"] = 1.into();
        let t = TrustedKeys::new([k.public().clone()]);
        let e = verify(v.to_string().as_bytes(), Expect::release(1), &t).unwrap_err();
        assert!(matches!(e, EnvelopeError::Malformed { .. }), "{e}");
    }

    #[test]
    fn forged_signature_rejected() {
        let k = key(1);
        let mut env = Envelope::sign(RELEASE_PAYLOAD_TYPE, b"{\"a\":1}", &[&k]);
        env.payload = STANDARD.encode(b"{\"a\":2}");
        let t = TrustedKeys::new([k.public().clone()]);
        let e = verify(env.to_json().as_bytes(), Expect::release(1), &t).unwrap_err();
        assert!(e.to_string().contains("did not verify"), "{e}");
    }

    #[test]
    fn key_of_other_role_not_trusted() {
        let release = key(1);
        let controller = key(2);
        let env = Envelope::sign(RELEASE_PAYLOAD_TYPE, b"{}", &[&controller]);
        let release_keys = TrustedKeys::new([release.public().clone()]);
        let e = verify(env.to_json().as_bytes(), Expect::release(1), &release_keys).unwrap_err();
        assert!(
            e.to_string().contains("not trusted for the release role"),
            "{e}"
        );
    }

    #[test]
    fn threshold_counts_distinct_keys_once() {
        let a = key(1);
        let b = key(2);
        let t = TrustedKeys::new([a.public().clone(), b.public().clone()]);
        // The same key twice is one key.
        let env = Envelope::sign(RELEASE_PAYLOAD_TYPE, b"{}", &[&a, &a]);
        let e = verify(env.to_json().as_bytes(), Expect::release(2), &t).unwrap_err();
        assert!(matches!(
            e,
            EnvelopeError::ThresholdNotMet {
                valid: 1,
                required: 2,
                ..
            }
        ));
        let env = Envelope::sign(RELEASE_PAYLOAD_TYPE, b"{}", &[&a, &b]);
        let v = verify(env.to_json().as_bytes(), Expect::release(2), &t).unwrap();
        assert_eq!(v.signers.len(), 2);
    }

    #[test]
    fn no_signatures_rejected() {
        let env = Envelope {
            payload_type: RELEASE_PAYLOAD_TYPE.into(),
            payload: STANDARD.encode(b"{}"),
            signatures: vec![],
        };
        let e = verify(
            env.to_json().as_bytes(),
            Expect::release(1),
            &TrustedKeys::default(),
        );
        assert!(matches!(e, Err(EnvelopeError::NoSignatures { .. })));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_verify(raw in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let k = key(9);
            let t = TrustedKeys::new([k.public().clone()]);
            proptest::prop_assert!(verify(&raw, Expect::release(1), &t).is_err());
        }

        #[test]
        fn any_single_byte_flip_breaks_verification(body in proptest::collection::vec(proptest::num::u8::ANY, 1..256), pos in 0usize..10_000, bit in 0u8..8) {
            let k = key(5);
            let t = TrustedKeys::new([k.public().clone()]);
            let raw = Envelope::sign(RELEASE_PAYLOAD_TYPE, &body, &[&k]).to_json().into_bytes();
            let mut bad = raw.clone();
            let i = pos % bad.len();
            bad[i] ^= 1 << bit;
            // A flip either breaks the envelope or, when it lands in JSON whitespace-equivalent
            // places, yields an envelope whose verified body is still exactly the signed one.
            if let Ok(v) = verify(&bad, Expect::release(1), &t) {
                proptest::prop_assert_eq!(v.body, body);
            }
        }
    }
}
