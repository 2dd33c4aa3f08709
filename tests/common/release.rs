//! Builders for signed protocol documents, always through `ferry_protocol` types (never JSON by
//! hand):
//!
//! ```ignore
//! let rel = release("2.0.0").sensors(&sensors).signed(&keys);          // release envelope JSON
//! let raw = desired(&device, 2).app("sensor", rel).start_first().signed(&keys); // notice bytes
//! ```

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use ferry_protocol::desired::embed_release;
use ferry_protocol::release::{BindSpec, ContainerSpec, HealthSpec};
use ferry_protocol::{Desired, Envelope, HealthCheck, PrivateKey, Release, Strategy};

use super::infra;
use super::keys::TestKeys;
use super::sensors::{SensorDir, CONTAINER_DIR};

/// The health gate the tests use: an HTTP check of `/healthz` on 8080 (reached via the
/// container's bridge IP), short timings, a generous deadline for qemu.
pub fn fast_health() -> HealthSpec {
    HealthSpec {
        check: Some(HealthCheck::Http {
            port: 8080,
            path: "/healthz".into(),
        }),
        grace_s: Some(1),
        interval_s: Some(1),
        timeout_s: Some(2),
        successes: Some(2),
        max_failures: Some(3),
        deadline_s: Some(90),
    }
}

/// A release under construction.
#[derive(Clone, Debug)]
pub struct ReleaseBuilder {
    pub release: Release,
}

/// Sample app `sensor` at `version`: image `<registry>/ferry/sensor`, the platforms and digests of
/// sample image `version` (see [`ReleaseBuilder::images_of`] for versions without an image), no
/// ports, no binds (add [`ReleaseBuilder::sensors`]), [`fast_health`].
pub fn release(version: &str) -> ReleaseBuilder {
    release_with_image(version, version)
}

/// Like [`release`] for a version that has no sample image of its own: `version` in the record,
/// the digests of sample image `image_version`.
pub fn release_with_image(version: &str, image_version: &str) -> ReleaseBuilder {
    ReleaseBuilder {
        release: Release {
            platforms: infra::platforms(image_version),
            ..release_fields(version)
        },
    }
}

/// Sample app `sensor` at `version` from the download-test image `<registry>/ferry/bulk` (the
/// sensor app of that version with a 6 MiB data layer shared by 1.0.0 and 2.0.0, see
/// [`infra::bulk_image`]): the platforms and digests of bulk image `version`, otherwise as
/// [`release`]. Through a proxy: `.image(&proxy.repo(infra::BULK_REPO))`.
pub fn release_bulk(version: &str) -> ReleaseBuilder {
    ReleaseBuilder {
        release: Release {
            image: infra::bulk_image(),
            platforms: infra::bulk_platforms(version),
            ..release_fields(version)
        },
    }
}

fn release_fields(version: &str) -> Release {
    Release {
        app: "sensor".into(),
        version: version
            .parse()
            .unwrap_or_else(|e| panic!("version {version:?}: {e}")),
        image: infra::sensor_image(),
        platforms: BTreeMap::new(),
        container: ContainerSpec::default(),
        health: fast_health(),
        created_at: Utc::now(),
    }
}

impl ReleaseBuilder {
    /// The app name (must equal the key it is listed under in a notice).
    pub fn app(mut self, name: &str) -> Self {
        self.release.app = name.into();
        self
    }

    /// The version in the record (the digests stay).
    pub fn version(mut self, v: &str) -> Self {
        self.release.version = v.parse().unwrap();
        self
    }

    /// Use the platforms and digests of sample image `version`.
    pub fn images_of(mut self, version: &str) -> Self {
        self.release.platforms = infra::platforms(version);
        self
    }

    /// Switch to the download-test image: `<registry>/ferry/bulk` with the platforms and digests
    /// of bulk image `<the record's version>` (see [`release_bulk`]).
    pub fn bulk(self) -> Self {
        let version = self.release.version.to_string();
        self.bulk_images_of(&version)
    }

    /// Image `<registry>/ferry/bulk` with the platforms and digests of bulk image `version`.
    pub fn bulk_images_of(mut self, version: &str) -> Self {
        self.release.image = infra::bulk_image();
        self.release.platforms = infra::bulk_platforms(version);
        self
    }

    /// Replace the platform map.
    pub fn platforms(mut self, p: BTreeMap<String, String>) -> Self {
        self.release.platforms = p;
        self
    }

    /// Keep only `platform` in the platform map.
    pub fn only_platform(mut self, platform: &str) -> Self {
        self.release.platforms.retain(|p, _| p == platform);
        assert!(!self.release.platforms.is_empty(), "no {platform} digest");
        self
    }

    pub fn image(mut self, repo: &str) -> Self {
        self.release.image = repo.into();
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.release.container.env.insert(k.into(), v.into());
        self
    }

    pub fn bind(mut self, host: &str, container: &str, read_only: bool) -> Self {
        self.release.container.binds.push(BindSpec {
            host: host.into(),
            container: container.into(),
            read_only,
        });
        self
    }

    /// Bind the device's sensor dir read-only at `/sensors` (where the sample app reads).
    pub fn sensors(self, s: &SensorDir) -> Self {
        let host = s.host_path();
        self.bind(&host, CONTAINER_DIR, true)
    }

    pub fn cmd(mut self, argv: &[&str]) -> Self {
        self.release.container.cmd = Some(argv.iter().map(|s| s.to_string()).collect());
        self
    }

    pub fn health(mut self, h: HealthSpec) -> Self {
        self.release.health = h;
        self
    }

    pub fn created_at(mut self, t: DateTime<Utc>) -> Self {
        self.release.created_at = t;
        self
    }

    /// Any other change.
    pub fn edit(mut self, f: impl FnOnce(&mut Release)) -> Self {
        f(&mut self.release);
        self
    }

    pub fn build(self) -> Release {
        self.release
    }

    /// The release envelope (JSON) signed by `keys` (one signature each).
    pub fn sign(self, keys: &[&PrivateKey]) -> String {
        self.release.sign(keys).to_json()
    }

    /// The release envelope signed by the test's release key.
    pub fn signed(self, keys: &TestKeys) -> String {
        self.sign(&[&keys.release.key])
    }
}

/// A desired-state notice under construction.
#[derive(Clone, Debug)]
pub struct DesiredBuilder {
    pub device: String,
    pub sequence: u64,
    /// app name -> release envelope JSON.
    pub apps: BTreeMap<String, String>,
    pub strategy: Strategy,
    pub allow_downgrade: bool,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub rollout: Option<String>,
    pub force: bool,
    /// app → setting → value.
    pub settings: BTreeMap<String, BTreeMap<String, String>>,
}

/// A notice for `device` with `sequence`: no apps yet, stop-first, no downgrade, issued now,
/// expiring in one hour, rollout `r-<sequence>`.
pub fn desired(device: &str, sequence: u64) -> DesiredBuilder {
    let now = Utc::now();
    DesiredBuilder {
        device: device.into(),
        sequence,
        apps: BTreeMap::new(),
        strategy: Strategy::StopFirst,
        allow_downgrade: false,
        issued_at: now,
        expires_at: now + Duration::hours(1),
        rollout: Some(format!("r-{sequence}")),
        force: false,
        settings: BTreeMap::new(),
    }
}

impl DesiredBuilder {
    /// Add app `name` with a release envelope (as produced by [`ReleaseBuilder::sign`]).
    pub fn app(mut self, name: &str, release_envelope: impl Into<String>) -> Self {
        self.apps.insert(name.into(), release_envelope.into());
        self
    }

    pub fn strategy(mut self, s: Strategy) -> Self {
        self.strategy = s;
        self
    }

    pub fn start_first(self) -> Self {
        self.strategy(Strategy::StartFirst)
    }

    pub fn stop_first(self) -> Self {
        self.strategy(Strategy::StopFirst)
    }

    pub fn allow_downgrade(mut self, yes: bool) -> Self {
        self.allow_downgrade = yes;
        self
    }

    pub fn issued_at(mut self, t: DateTime<Utc>) -> Self {
        self.issued_at = t;
        self
    }

    pub fn expires_at(mut self, t: DateTime<Utc>) -> Self {
        self.expires_at = t;
        self
    }

    /// `expires_at = issued_at + d`.
    pub fn expires_in(mut self, d: Duration) -> Self {
        self.expires_at = self.issued_at + d;
        self
    }

    pub fn rollout(mut self, r: Option<&str>) -> Self {
        self.rollout = r.map(str::to_string);
        self
    }

    /// Switch even while an app holds its update lock.
    pub fn force(mut self, yes: bool) -> Self {
        self.force = yes;
        self
    }

    /// A value for one of `app`'s settable keys.
    pub fn setting(mut self, app: &str, key: &str, value: &str) -> Self {
        self.settings
            .entry(app.into())
            .or_default()
            .insert(key.into(), value.into());
        self
    }

    /// The typed body.
    pub fn build(&self) -> Desired {
        Desired {
            settings: self.settings.clone(),
            force: self.force,
            device: self.device.clone(),
            sequence: self.sequence,
            issued_at: self.issued_at,
            expires_at: self.expires_at,
            apps: self
                .apps
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        embed_release(v).unwrap_or_else(|e| {
                            panic!("app {k}: not a release envelope ({e}): {v}")
                        }),
                    )
                })
                .collect(),
            strategy: self.strategy,
            allow_downgrade: self.allow_downgrade,
            rollout: self.rollout.clone(),
        }
    }

    /// The signed envelope, for tests that tamper with it.
    pub fn envelope(&self, keys: &[&PrivateKey]) -> Envelope {
        self.build().sign(keys)
    }

    /// The notice bytes as published, signed by `keys`.
    pub fn sign(&self, keys: &[&PrivateKey]) -> Vec<u8> {
        self.envelope(keys).to_json().into_bytes()
    }

    /// The notice bytes signed by the test's controller key.
    pub fn signed(&self, keys: &TestKeys) -> Vec<u8> {
        self.sign(&[&keys.controller.key])
    }
}
