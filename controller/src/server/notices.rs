//! Building and signing a device's desired state (protocol §4) from the release catalogue.
//! Pure: no I/O, no clock (the caller passes `now`); the core allocates the sequence and
//! persists before publishing.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use ferry_protocol::desired::{embed_release, Desired, Strategy};
use ferry_protocol::dsse::{pae, Envelope, DESIRED_PAYLOAD_TYPE, MAX_DESIRED_ENVELOPE};
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
    #[error("{0}")]
    Settings(#[from] ferry_protocol::settings::SettingsError),
    #[error("settings for app {0}, which the notice does not name")]
    SettingsForAbsentApp(String),
    #[error("release {app} {version}: stored envelope is unusable: {detail}")]
    BadEnvelope {
        app: String,
        version: String,
        detail: String,
    },
}

/// A notice without settings.
pub static NO_SETTINGS: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();

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
    /// Switch even while an app holds its update lock.
    pub force: bool,
    /// app → setting → value (each checked against the release's declaration).
    pub settings: &'a BTreeMap<String, BTreeMap<String, String>>,
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
        let none = BTreeMap::new();
        let values = spec.settings.get(app).unwrap_or(&none);
        ferry_protocol::settings::resolve_declared(app, version, &r.settings, values)?;
    }
    if let Some(app) = spec.settings.keys().find(|a| !spec.apps.contains_key(*a)) {
        return Err(NoticeError::SettingsForAbsentApp(app.clone()));
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
    build_many(std::slice::from_ref(spec), releases, key, now).remove(0)
}

/// [`build`] for many notices, in the order of `specs`. The signatures (a wave of 9,000
/// notices is 9,000 Ed25519 signatures over a few KB each, the longest step between a wave's
/// start and its first device updating) are spread over the machine's cores, at most 4
/// threads, when there are enough to be worth it. Only the signing runs there: the threads
/// allocate nothing that outlives them, so the notices all live in the main heap.
pub fn build_many(
    specs: &[NoticeSpec<'_>],
    releases: &BTreeMap<(String, String), ReleaseEntry>,
    key: &PrivateKey,
    now: DateTime<Utc>,
) -> Vec<Result<SentDesired, NoticeError>> {
    const MIN_PER_THREAD: usize = 128;
    let bodies: Vec<Result<String, NoticeError>> =
        specs.iter().map(|s| body(s, releases, now)).collect();
    let sign = |b: &Result<String, NoticeError>| {
        b.as_ref()
            .ok()
            .map(|b| key.sign(&pae(DESIRED_PAYLOAD_TYPE, b.as_bytes())))
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4)
        .min(specs.len() / MIN_PER_THREAD);
    let signatures: Vec<Option<[u8; 64]>> = if threads < 2 {
        bodies.iter().map(sign).collect()
    } else {
        let chunk = bodies.len().div_ceil(threads);
        std::thread::scope(|s| {
            let handles: Vec<_> = bodies
                .chunks(chunk)
                .map(|c| s.spawn(move || c.iter().map(sign).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("a signing thread panicked"))
                .collect()
        })
    };
    specs
        .iter()
        .zip(bodies)
        .zip(signatures)
        .map(|((spec, body), sig)| {
            let body = body?;
            let sig = sig.expect("every body is signed");
            let envelope = Envelope::with_signatures(
                DESIRED_PAYLOAD_TYPE,
                body.as_bytes(),
                [(key.public().id(), sig)],
            )
            .to_json();
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
                settings: spec.settings.clone(),
            })
        })
        .collect()
}

/// The desired state's JSON, to be signed.
fn body(
    spec: &NoticeSpec<'_>,
    releases: &BTreeMap<(String, String), ReleaseEntry>,
    now: DateTime<Utc>,
) -> Result<String, NoticeError> {
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
        settings: spec.settings.clone(),
        force: spec.force,
        device: spec.device.to_string(),
        sequence: spec.sequence,
        issued_at,
        expires_at,
        apps,
        strategy: spec.strategy,
        allow_downgrade: spec.allow_downgrade,
        rollout: spec.rollout.map(str::to_string),
    };
    Ok(desired.to_json())
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
            settings: Default::default(),
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
            settings: &NO_SETTINGS,
            device: "dev-1",
            platform: Some(&platform),
            sequence: 9,
            apps: &apps,
            strategy: Strategy::StartFirst,
            allow_downgrade: true,
            rollout: Some("r-1"),
            expiry: Duration::from_secs(3600),
            force: true,
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
        assert!(v.desired.force);
        let unforced = NoticeSpec {
            settings: &NO_SETTINGS,
            force: false,
            ..spec.clone()
        };
        let sent = build(&unforced, &cat, &ck, Utc::now()).unwrap();
        assert!(
            !verify_notice(sent.envelope.as_bytes(), &trust)
                .unwrap()
                .desired
                .force
        );
        assert_eq!(v.releases[&r.app].release.version.to_string(), "2.0.0");

        // unknown release / platform / no platform
        let apps3 = BTreeMap::from([(r.app.clone(), "3.0.0".to_string())]);
        let s3 = NoticeSpec {
            settings: &NO_SETTINGS,
            apps: &apps3,
            ..spec.clone()
        };
        assert!(matches!(
            build(&s3, &cat, &ck, Utc::now()),
            Err(NoticeError::UnknownRelease { .. })
        ));
        let s4 = NoticeSpec {
            settings: &NO_SETTINGS,
            platform: Some("linux/s390x"),
            ..spec.clone()
        };
        assert!(matches!(
            build(&s4, &cat, &ck, Utc::now()),
            Err(NoticeError::NoImageForPlatform { .. })
        ));
        let s5 = NoticeSpec {
            settings: &NO_SETTINGS,
            platform: None,
            ..spec
        };
        assert_eq!(
            build(&s5, &cat, &ck, Utc::now()).unwrap_err(),
            NoticeError::UnknownPlatform
        );
    }

    #[test]
    fn build_many_equals_build_one_by_one_in_order() {
        let ck = PrivateKey::from_seed([1; 32]).unwrap();
        let rk = PrivateKey::from_seed([2; 32]).unwrap();
        let r = release(&rk, "2.0.0");
        let platform = r.images.keys().next().unwrap().clone();
        let cat = BTreeMap::from([((r.app.clone(), "2.0.0".to_string()), r.clone())]);
        let good = BTreeMap::from([(r.app.clone(), "2.0.0".to_string())]);
        let unknown = BTreeMap::from([(r.app.clone(), "9.9.9".to_string())]);
        let ids: Vec<String> = (0..700).map(|i| format!("dev-{i:04}")).collect();
        // enough for several threads, with failures mixed in to check the order
        let specs: Vec<NoticeSpec<'_>> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| NoticeSpec {
                settings: &NO_SETTINGS,
                device: id,
                platform: Some(&platform),
                sequence: i as u64 + 1,
                apps: if i % 97 == 0 { &unknown } else { &good },
                strategy: Strategy::StopFirst,
                allow_downgrade: false,
                rollout: Some("r-1"),
                expiry: Duration::from_secs(3600),
                force: i % 2 == 0,
            })
            .collect();
        let now = Utc::now();
        let many = build_many(&specs, &cat, &ck, now);
        let one: Vec<_> = specs.iter().map(|s| build(s, &cat, &ck, now)).collect();
        assert_eq!(many.len(), specs.len());
        // Ed25519 signatures are deterministic: the same notices, byte for byte
        assert_eq!(many, one);
        assert_eq!(many.iter().filter(|r| r.is_err()).count(), 8);
    }
}
