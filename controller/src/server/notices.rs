//! Building and signing a device's desired state (protocol §4) from the release catalogue.
//! Pure: no I/O, no clock (the caller passes `now`); the core allocates the sequence and
//! persists before publishing.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use ferry_protocol::desired::{embed_release, Desired, Strategy};
use ferry_protocol::dsse::MAX_DESIRED_ENVELOPE;
use ferry_protocol::keys::PrivateKey;

use super::model::{ReleaseEntry, SentDesired};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoticeError {
    #[error(
        "release {app} {version} is not in the catalogue (push it with `ferryctl release push`)"
    )]
    UnknownRelease { app: String, version: String },
    #[error("release {app} {version} has no image for the device's platform {platform}")]
    NoImageForPlatform {
        app: String,
        version: String,
        platform: String,
    },
    #[error("the device has not reported its platform yet")]
    UnknownPlatform,
    #[error(
        "the notice would be {size} bytes, over the protocol's {MAX_DESIRED_ENVELOPE}-byte limit"
    )]
    TooLarge { size: usize },
    #[error("release {app} {version}: stored envelope is unusable: {detail}")]
    BadEnvelope {
        app: String,
        version: String,
        detail: String,
    },
}

/// What to send one device.
#[derive(Debug, Clone)]
pub struct NoticeSpec<'a> {
    pub device: &'a str,
    pub platform: Option<&'a str>,
    pub sequence: u64,
    /// The COMPLETE app set: app → version.
    pub apps: &'a BTreeMap<String, String>,
    pub strategy: Strategy,
    pub allow_downgrade: bool,
    pub rollout: Option<&'a str>,
    pub expiry: Duration,
}

/// Check a notice can be built (catalogue and platform) without signing it.
pub fn check(
    spec: &NoticeSpec<'_>,
    releases: &BTreeMap<(String, String), ReleaseEntry>,
) -> Result<(), NoticeError> {
    let platform = spec.platform.ok_or(NoticeError::UnknownPlatform)?;
    for (app, version) in spec.apps {
        let r = releases
            .get(&(app.clone(), version.clone()))
            .ok_or_else(|| NoticeError::UnknownRelease {
                app: app.clone(),
                version: version.clone(),
            })?;
        if !r.images.contains_key(platform) {
            return Err(NoticeError::NoImageForPlatform {
                app: app.clone(),
                version: version.clone(),
                platform: platform.to_string(),
            });
        }
    }
    Ok(())
}

/// Build and sign the notice.
pub fn build(
    spec: &NoticeSpec<'_>,
    releases: &BTreeMap<(String, String), ReleaseEntry>,
    key: &PrivateKey,
    now: DateTime<Utc>,
) -> Result<SentDesired, NoticeError> {
    check(spec, releases)?;
    let mut apps = BTreeMap::new();
    for (app, version) in spec.apps {
        let r = &releases[&(app.clone(), version.clone())];
        let raw = embed_release(&r.envelope).map_err(|e| NoticeError::BadEnvelope {
            app: app.clone(),
            version: version.clone(),
            detail: e.to_string(),
        })?;
        apps.insert(app.clone(), raw);
    }
    let issued_at = now.trunc_subsecs(0);
    let expires_at =
        issued_at + chrono::Duration::from_std(spec.expiry).unwrap_or(chrono::Duration::days(30));
    let desired = Desired {
        device: spec.device.to_string(),
        sequence: spec.sequence,
        issued_at,
        expires_at,
        apps,
        strategy: spec.strategy,
        allow_downgrade: spec.allow_downgrade,
        rollout: spec.rollout.map(str::to_string),
    };
    let envelope = desired.sign(&[key]).to_json();
    if envelope.len() > MAX_DESIRED_ENVELOPE {
        return Err(NoticeError::TooLarge {
            size: envelope.len(),
        });
    }
    Ok(SentDesired {
        sequence: spec.sequence,
        apps: spec.apps.clone(),
        rollout: spec.rollout.map(str::to_string),
        at: now,
        envelope,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::desired::{verify_notice, Trust};
    use ferry_protocol::keys::TrustedKeys;
    use ferry_protocol::release::Release;

    fn release(rk: &PrivateKey, version: &str) -> ReleaseEntry {
        let r = Release {
            app: "sensor".into(),
            version: version.parse().unwrap(),
            image: "127.0.0.1:5000/ferry/sensor".into(),
            platforms: BTreeMap::from([(
                "linux/arm64".to_string(),
                format!("sha256:{}", "a".repeat(64)),
            )]),
            container: Default::default(),
            health: Default::default(),
            created_at: Utc::now(),
        };
        ReleaseEntry {
            app: r.app.clone(),
            version: version.into(),
            images: r
                .platforms
                .keys()
                .map(|p| (p.clone(), r.reference_for(p).unwrap()))
                .collect(),
            signers: vec![],
            pushed_at: Utc::now(),
            envelope: r.sign(&[rk]).to_json(),
        }
    }

    #[test]
    fn builds_a_notice_a_device_verifies() {
        let ck = PrivateKey::from_seed([1; 32]).unwrap();
        let rk = PrivateKey::from_seed([2; 32]).unwrap();
        let r = release(&rk, "2.0.0");
        let platform = r.images.keys().next().unwrap().clone();
        let cat = BTreeMap::from([((r.app.clone(), "2.0.0".to_string()), r.clone())]);
        let apps = BTreeMap::from([(r.app.clone(), "2.0.0".to_string())]);
        let spec = NoticeSpec {
            device: "dev-1",
            platform: Some(&platform),
            sequence: 9,
            apps: &apps,
            strategy: Strategy::StartFirst,
            allow_downgrade: true,
            rollout: Some("r-1"),
            expiry: Duration::from_secs(3600),
        };
        let sent = build(&spec, &cat, &ck, Utc::now()).unwrap();
        let trust = Trust {
            release: TrustedKeys::new([rk.public().clone()]),
            release_threshold: 1,
            controller: TrustedKeys::new([ck.public().clone()]),
        };
        let v = verify_notice(sent.envelope.as_bytes(), &trust).unwrap();
        assert_eq!(v.desired.sequence, 9);
        assert_eq!(v.desired.rollout.as_deref(), Some("r-1"));
        assert!(v.desired.allow_downgrade);
        assert_eq!(v.desired.strategy, Strategy::StartFirst);
        assert_eq!(v.releases[&r.app].release.version.to_string(), "2.0.0");

        // unknown release / platform / no platform
        let apps3 = BTreeMap::from([(r.app.clone(), "3.0.0".to_string())]);
        let s3 = NoticeSpec {
            apps: &apps3,
            ..spec.clone()
        };
        assert!(matches!(
            build(&s3, &cat, &ck, Utc::now()),
            Err(NoticeError::UnknownRelease { .. })
        ));
        let s4 = NoticeSpec {
            platform: Some("linux/s390x"),
            ..spec.clone()
        };
        assert!(matches!(
            build(&s4, &cat, &ck, Utc::now()),
            Err(NoticeError::NoImageForPlatform { .. })
        ));
        let s5 = NoticeSpec {
            platform: None,
            ..spec
        };
        assert_eq!(
            build(&s5, &cat, &ck, Utc::now()).unwrap_err(),
            NoticeError::UnknownPlatform
        );
    }
}
