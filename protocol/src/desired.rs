//! The desired-state notice (protocol §4), signed by the `controller` role, carrying the complete
//! set of apps a device must run as embedded release envelopes.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::dsse::{self, Envelope, Expect, DESIRED_PAYLOAD_TYPE};
use crate::error::{NoticeError, RecordError};
use crate::keys::{PrivateKey, TrustedKeys};
use crate::names;
use crate::release::{Release, VerifiedRelease};
use crate::unique::unique_map;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Old stops, new starts (needed when they share host ports).
    #[default]
    StopFirst,
    /// New starts and passes health before old stops (zero downtime).
    StartFirst,
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Strategy::StopFirst => "stop-first",
            Strategy::StartFirst => "start-first",
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Desired {
    pub device: String,
    pub sequence: u64,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// app name → release envelope, kept byte-exact as received.
    #[serde(deserialize_with = "unique_map")]
    pub apps: BTreeMap<String, Box<RawValue>>,
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default)]
    pub allow_downgrade: bool,
    #[serde(default)]
    pub rollout: Option<String>,
    /// Switch even while an app holds its update lock (never past the device's local policy or
    /// its maintenance windows). Left out of the JSON when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
    /// app → setting → value, for the keys its release declares settable
    /// (`crate::settings`); left out when empty.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "crate::unique::unique_nested"
    )]
    pub settings: BTreeMap<String, BTreeMap<String, String>>,
}

impl Desired {
    pub fn parse(body: &[u8]) -> Result<Desired, RecordError> {
        let d: Desired = serde_json::from_slice(body).map_err(|e| RecordError::Malformed {
            what: "desired state",
            detail: e.to_string(),
        })?;
        names::check_device_id(&d.device).map_err(|detail| RecordError::Invalid {
            what: "desired state",
            field: "device".into(),
            detail,
        })?;
        for k in d.apps.keys() {
            names::check_app_name(k).map_err(|detail| RecordError::Invalid {
                what: "desired state",
                field: "apps".into(),
                detail,
            })?;
        }
        for (app, values) in &d.settings {
            names::check_app_name(app).map_err(|detail| RecordError::Invalid {
                what: "desired state",
                field: "settings".into(),
                detail,
            })?;
            for key in values.keys() {
                crate::settings::check_key(key).map_err(|detail| RecordError::Invalid {
                    what: "desired state",
                    field: format!("settings.{app}"),
                    detail,
                })?;
            }
        }
        for (field, date) in [("issued_at", &d.issued_at), ("expires_at", &d.expires_at)] {
            names::check_date(date).map_err(|detail| RecordError::Invalid {
                what: "desired state",
                field: field.into(),
                detail,
            })?;
        }
        if d.expires_at <= d.issued_at {
            return Err(RecordError::Invalid {
                what: "desired state",
                field: "expires_at".into(),
                detail: "not after issued_at".into(),
            });
        }
        Ok(d)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a desired state always serializes")
    }

    pub fn sign(&self, keys: &[&PrivateKey]) -> Envelope {
        Envelope::sign(DESIRED_PAYLOAD_TYPE, self.to_json().as_bytes(), keys)
    }
}

/// Builds a desired state from release envelopes without anyone writing JSON by hand.
pub fn embed_release(envelope_json: &str) -> Result<Box<RawValue>, serde_json::Error> {
    // Re-serialize through the typed envelope so that what is embedded is exactly an envelope.
    let env: Envelope = serde_json::from_str(envelope_json)?;
    RawValue::from_string(env.to_json())
}

/// The keys and threshold a device trusts (protocol §1).
#[derive(Clone, Debug, Default)]
pub struct Trust {
    pub release: TrustedKeys,
    pub release_threshold: usize,
    pub controller: TrustedKeys,
}

/// A notice whose controller signature, every release signature and every body verified.
#[derive(Clone, Debug)]
pub struct VerifiedNotice {
    pub desired: Desired,
    pub releases: BTreeMap<String, VerifiedRelease>,
    /// SHA-256 of the notice exactly as received.
    pub raw_sha256: [u8; 32],
    /// SHA-256 of its signed payload (the decoded DSSE body): what makes two notices the same
    /// notice, whatever their envelope bytes (whitespace, key order, base64 spelling).
    pub payload_sha256: [u8; 32],
}

impl VerifiedNotice {
    /// The hashes the notice rules compare with the accepted notice's.
    pub fn hashes(&self) -> crate::notice_rules::NoticeHashes {
        crate::notice_rules::NoticeHashes {
            payload: self.payload_sha256,
            envelope: self.raw_sha256,
        }
    }
}

/// Verify a desired-state notice as received (protocol §2 and §4): the controller envelope first,
/// then the body strictly, then each embedded release envelope against the release role with its
/// threshold, then each release body, and that each app key equals its release's `app`.
pub fn verify_notice(raw: &[u8], trust: &Trust) -> Result<VerifiedNotice, NoticeError> {
    let v =
        dsse::verify(raw, Expect::desired(), &trust.controller).map_err(NoticeError::Desired)?;
    let desired = Desired::parse(&v.body).map_err(NoticeError::DesiredBody)?;
    if let Some(app) = desired
        .settings
        .keys()
        .find(|a| !desired.apps.contains_key(*a))
    {
        return Err(NoticeError::SettingsForAbsentApp { app: app.clone() });
    }
    let mut releases = BTreeMap::new();
    for (app, env) in &desired.apps {
        let rv = dsse::verify(
            env.get().as_bytes(),
            Expect::release(trust.release_threshold),
            &trust.release,
        )
        .map_err(|source| NoticeError::Release {
            app: app.clone(),
            source,
        })?;
        let release = Release::parse(&rv.body).map_err(|source| NoticeError::ReleaseBody {
            app: app.clone(),
            source,
        })?;
        if &release.app != app {
            return Err(NoticeError::AppMismatch {
                key: app.clone(),
                app: release.app,
            });
        }
        // The settings join the release's environment: what runs, and what a changed value
        // changes (the workload), is the release with its settings.
        let mut release = release;
        let values = desired.settings.get(app).cloned().unwrap_or_default();
        crate::settings::apply(&mut release, &values).map_err(|source| NoticeError::Settings {
            app: app.clone(),
            source,
        })?;
        releases.insert(
            app.clone(),
            VerifiedRelease {
                release,
                envelope: env.get().as_bytes().to_vec(),
                signers: rv.signers,
            },
        );
    }
    Ok(VerifiedNotice {
        desired,
        releases,
        raw_sha256: Sha256::digest(raw).into(),
        payload_sha256: Sha256::digest(&v.body).into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::{ContainerSpec, HealthSpec};

    fn key(n: u8) -> PrivateKey {
        PrivateKey::from_seed([n; 32]).unwrap()
    }

    fn release(app: &str) -> Release {
        Release {
            app: app.into(),
            version: semver::Version::new(1, 0, 0),
            image: "127.0.0.1:5055/ferry/sensor".into(),
            platforms: [(
                "linux/arm64".to_string(),
                format!("sha256:{}", "a".repeat(64)),
            )]
            .into(),
            container: ContainerSpec::default(),
            health: HealthSpec::default(),
            created_at: "2026-11-22T10:00:00Z".parse().unwrap(),
        }
    }

    fn desired(apps: &[(&str, Envelope)]) -> Desired {
        Desired {
            settings: Default::default(),
            force: false,
            device: "dev-001".into(),
            sequence: 42,
            issued_at: "2026-11-22T10:00:00Z".parse().unwrap(),
            expires_at: "2026-12-22T10:00:00Z".parse().unwrap(),
            apps: apps
                .iter()
                .map(|(a, e)| (a.to_string(), embed_release(&e.to_json()).unwrap()))
                .collect(),
            strategy: Strategy::StopFirst,
            allow_downgrade: false,
            rollout: Some("r-12".into()),
        }
    }

    fn trust(rel: &PrivateKey, ctl: &PrivateKey) -> Trust {
        Trust {
            release: TrustedKeys::new([rel.public().clone()]),
            release_threshold: 1,
            controller: TrustedKeys::new([ctl.public().clone()]),
        }
    }

    #[test]
    fn force_is_left_out_unless_set() {
        let mut d = desired(&[]);
        let plain = d.to_json();
        assert!(!plain.contains("force"), "{plain}");
        assert!(!Desired::parse(plain.as_bytes()).unwrap().force);
        d.force = true;
        let forced = d.to_json();
        assert!(forced.contains(r#""force":true"#), "{forced}");
        assert!(Desired::parse(forced.as_bytes()).unwrap().force);
    }

    #[test]
    fn verifies_full_notice() {
        let (rk, ck) = (key(1), key(2));
        let d = desired(&[("sensor", release("sensor").sign(&[&rk]))]);
        let raw = d.sign(&[&ck]).to_json();
        let n = verify_notice(raw.as_bytes(), &trust(&rk, &ck)).unwrap();
        assert_eq!(n.desired.sequence, 42);
        assert_eq!(n.releases["sensor"].release.app, "sensor");
        assert_eq!(n.desired.strategy, Strategy::StopFirst);
    }

    #[test]
    fn roles_are_not_interchangeable() {
        let (rk, ck) = (key(1), key(2));
        // Notice signed with the release key.
        let d = desired(&[("sensor", release("sensor").sign(&[&rk]))]);
        let raw = d.sign(&[&rk]).to_json();
        let e = verify_notice(raw.as_bytes(), &trust(&rk, &ck)).unwrap_err();
        assert!(matches!(e, NoticeError::Desired(_)), "{e}");
        // Release signed with the controller key.
        let d = desired(&[("sensor", release("sensor").sign(&[&ck]))]);
        let raw = d.sign(&[&ck]).to_json();
        let e = verify_notice(raw.as_bytes(), &trust(&rk, &ck)).unwrap_err();
        assert!(matches!(e, NoticeError::Release { .. }), "{e}");
    }

    #[test]
    fn app_key_must_match_release() {
        let (rk, ck) = (key(1), key(2));
        let d = desired(&[("other", release("sensor").sign(&[&rk]))]);
        let raw = d.sign(&[&ck]).to_json();
        let e = verify_notice(raw.as_bytes(), &trust(&rk, &ck)).unwrap_err();
        assert!(matches!(e, NoticeError::AppMismatch { .. }), "{e}");
    }

    /// Settings: the notice's values for the release's declared keys become the container's
    /// environment (defaults for the rest); anything else is refused with the key and why.
    #[test]
    fn settings_join_the_environment_or_refuse_the_notice() {
        use crate::settings::{SettingDecl, SettingType};
        let (rk, ck) = (key(1), key(2));
        let mut r = release("sensor");
        r.container.settings = [
            (
                "APN".to_string(),
                SettingDecl {
                    kind: SettingType::String,
                    default: Some("internet".into()),
                    description: None,
                },
            ),
            (
                "OFFSET".to_string(),
                SettingDecl {
                    kind: SettingType::Number,
                    default: Some("0".into()),
                    description: None,
                },
            ),
        ]
        .into();
        let env = r.sign(&[&rk]);
        let with = |values: &[(&str, &str, &str)]| {
            let mut d = desired(&[("sensor", env.clone())]);
            for (app, k, v) in values {
                d.settings
                    .entry(app.to_string())
                    .or_default()
                    .insert(k.to_string(), v.to_string());
            }
            let raw = d.sign(&[&ck]).to_json();
            verify_notice(raw.as_bytes(), &trust(&rk, &ck))
        };
        let n = with(&[("sensor", "OFFSET", "-1.25")]).unwrap();
        let got = &n.releases["sensor"].release.container.env;
        assert_eq!(got["OFFSET"], "-1.25");
        assert_eq!(got["APN"], "internet", "the default");
        let plain = with(&[]).unwrap();
        assert_eq!(
            plain.releases["sensor"].release.container.env["OFFSET"],
            "0"
        );
        assert!(
            !plain.desired.to_json().contains("settings"),
            "left out when empty"
        );
        let e = with(&[("sensor", "DEBUG", "1")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "app \"sensor\": setting DEBUG: release sensor 1.0.0 does not declare it settable"
        );
        let e = with(&[("sensor", "OFFSET", "warm")]).unwrap_err();
        assert!(matches!(e, NoticeError::Settings { .. }), "{e}");
        let e = with(&[("other", "APN", "x")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "settings for app \"other\", which the notice does not name"
        );
        let e = with(&[("sensor", "bad-key", "x")]).unwrap_err();
        assert!(matches!(e, NoticeError::DesiredBody(_)), "{e}");
        // A duplicate key inside an app's settings is refused, not resolved last-wins.
        let mut v: serde_json::Value =
            serde_json::from_str(&desired(&[("sensor", env.clone())]).to_json()).unwrap();
        v["settings"] = serde_json::json!({"sensor": {"APN": "a"}});
        let text = v
            .to_string()
            .replace(r#"{"APN":"a"}"#, r#"{"APN":"a","APN":"b"}"#);
        let e = Desired::parse(text.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("duplicate key"), "{e}");
    }

    /// Issue 10: dates beyond RFC 3339's years are refused with a reason naming the field.
    #[test]
    fn out_of_range_dates_are_refused() {
        let j = |issued: &str, expires: &str| {
            serde_json::json!({
                "device": "dev-001", "sequence": 1, "issued_at": issued, "expires_at": expires,
                "apps": {}, "strategy": "stop-first", "allow_downgrade": false, "rollout": null
            })
            .to_string()
        };
        let ok = "2026-11-22T10:00:00Z";
        for (issued, expires, field) in [
            (ok, "+262142-12-31T23:59:59Z", "expires_at"),
            (ok, "+10000-01-01T00:00:00Z", "expires_at"),
            ("-0001-12-31T23:59:59Z", ok, "issued_at"),
            ("-262143-01-01T00:00:00Z", ok, "issued_at"),
        ] {
            let e = Desired::parse(j(issued, expires).as_bytes()).unwrap_err();
            let e = e.to_string();
            assert!(e.contains(field) && e.contains("out of range"), "{e}");
        }
        let d = Desired::parse(j(ok, "9999-12-31T23:59:59Z").as_bytes()).unwrap();
        assert_eq!(d.expires_at.to_rfc3339(), "9999-12-31T23:59:59+00:00");
        // And a release's created_at.
        let mut r: serde_json::Value = serde_json::from_str(&release("sensor").to_json()).unwrap();
        r["created_at"] = "+262142-12-31T23:59:59Z".into();
        let e = Release::parse(r.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("created_at") && e.contains("out of range"),
            "{e}"
        );
    }

    #[test]
    fn empty_app_set_is_valid() {
        let (rk, ck) = (key(1), key(2));
        let raw = desired(&[]).sign(&[&ck]).to_json();
        let n = verify_notice(raw.as_bytes(), &trust(&rk, &ck)).unwrap();
        assert!(n.releases.is_empty());
    }

    #[test]
    fn protocol_example_strategy_spelling() {
        let j = serde_json::json!({
            "device": "dev-001", "sequence": 1,
            "issued_at": "2026-11-22T10:00:00Z", "expires_at": "2026-12-22T10:00:00Z",
            "apps": {}, "strategy": "start-first", "allow_downgrade": false, "rollout": null
        });
        let d = Desired::parse(j.to_string().as_bytes()).unwrap();
        assert_eq!(d.strategy, Strategy::StartFirst);
        let mut bad = j.clone();
        bad["strategy"] = "blue-green".into();
        assert!(Desired::parse(bad.to_string().as_bytes()).is_err());
        let mut bad = j.clone();
        bad["priority"] = 1.into();
        assert!(Desired::parse(bad.to_string().as_bytes()).is_err());
        let mut bad = j;
        bad["sequence"] = (-1).into();
        assert!(Desired::parse(bad.to_string().as_bytes()).is_err());
    }

    #[test]
    fn duplicate_app_keys_rejected() {
        let s = r#"{"device":"d","sequence":1,"issued_at":"2026-11-22T10:00:00Z","expires_at":"2026-12-22T10:00:00Z","apps":{"a":{},"a":{}}}"#;
        assert!(Desired::parse(s.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("duplicate"));
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics(s in ".{0,400}") {
            let _ = Desired::parse(s.as_bytes());
        }

        #[test]
        fn sequence_and_flags_round_trip(seq in 0u64..u64::MAX, down in proptest::bool::ANY, start_first in proptest::bool::ANY) {
            let ck = key(2);
            let rk = key(1);
            let mut d = desired(&[("sensor", release("sensor").sign(&[&rk]))]);
            d.sequence = seq;
            d.allow_downgrade = down;
            d.strategy = if start_first { Strategy::StartFirst } else { Strategy::StopFirst };
            let raw = d.sign(&[&ck]).to_json();
            let n = verify_notice(raw.as_bytes(), &trust(&rk, &ck)).unwrap();
            proptest::prop_assert_eq!(n.desired.sequence, seq);
            proptest::prop_assert_eq!(n.desired.allow_downgrade, down);
            proptest::prop_assert_eq!(n.desired.strategy, d.strategy);
        }
    }
}
