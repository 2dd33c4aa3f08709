//! Ferry wire protocol v1 — the one place that knows the bytes on the wire.
//!
//! Both `ferry-agent` and `ferryctl` use this crate; neither builds protocol JSON by hand.
//!
//! - [`keys`]: Ed25519 keys as PKCS#8 / SPKI PEM, key ids, trusted key sets per role (§1)
//! - [`dsse`]: DSSE v1 envelopes, PAE, signing and threshold verification (§2)
//! - [`release`]: the release record (§3)
//! - [`desired`]: the desired-state notice and full notice verification (§4)
//! - [`notice_rules`]: the rules a device applies to a verified notice (§6)
//! - [`topics`]: MQTT topic names (§5)
//! - [`report`]: state, event and telemetry reports (§5)
//! - [`trust_record`]: the root-signed trust record and its rotation rules (§10)
//! - [`device_report`]: v2, reports signed by the device key with a monotonic counter (§9)
//! - [`broker_url`]: the broker's `mqtt://` / `mqtts://` URL, parsed one way everywhere

pub mod broker_url;
pub mod desired;
pub mod device_report;
pub mod dsse;
pub mod error;
pub mod heartbeat;
pub mod keys;
pub mod names;
pub mod notice_rules;
pub mod release;
pub mod report;
pub mod settings;
pub mod topics;
pub mod trust_record;
mod unique;

pub use broker_url::BrokerUrl;
pub use desired::{verify_notice, Desired, Strategy, Trust, VerifiedNotice};
pub use dsse::Envelope;
pub use error::{EnvelopeError, KeyError, NoticeError, RecordError};
pub use keys::{KeyId, PrivateKey, PublicKey, Role, TrustedKeys};
pub use notice_rules::{check_notice, NoticeHashes, RuleViolation};
pub use release::{verify_release, HealthCheck, Release, VerifiedRelease};
pub use report::{
    AppState, DownloadStats, Event, Phase, StateReport, Telemetry, TrustStatus, UpdateStatus,
    Waiting,
};
