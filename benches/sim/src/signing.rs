//! Signed device reports (protocol v2, PROTOCOL.md §9) as the agent makes them
//! (`src/identity.rs`): every simulated device has its own Ed25519 key and signs each message
//! it publishes with [`ferry_protocol::device_report::sign`].
//!
//! - The key's seed is `sha256("ferry-sim-device-key\0" + device id)`: reproducible across runs
//!   (a controller that enrolled `sim-00042` once knows its key the next time) and cheap.
//! - `boot` is the Unix time in seconds at start ([`boot_now`]), so every run outranks the last.
//! - `state`, `events` and `enroll` share one counter `n` per device, starting at 1; `online`
//!   uses `online_n(attempt, online)` of the device's connection attempt.

use std::sync::Arc;

use ferry_protocol::device_report::{self, EnrollBody, OnlineBody, Stream};
use ferry_protocol::{PrivateKey, PublicKey};
use sha2::{Digest, Sha256};

use crate::device::Report;

/// The deterministic key seed of a simulated device.
pub fn device_seed(device: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"ferry-sim-device-key\0");
    h.update(device.as_bytes());
    h.finalize().into()
}

/// The `boot` half of the counters for a run starting now: the Unix time in seconds.
pub fn boot_now() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs().min(u64::from(u32::MAX)) as u32)
        .unwrap_or(1)
        .max(1)
}

/// A device's key and `boot`: immutable, shared by its task and (for the last will) its
/// connection.
pub struct DeviceKey {
    device: String,
    key: PrivateKey,
    boot: u32,
}

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceKey({}, {}, boot {})",
            self.device,
            self.key.public().id(),
            self.boot
        )
    }
}

impl DeviceKey {
    /// The key of `device` ([`device_seed`]).
    pub fn derive(device: &str, boot: u32) -> DeviceKey {
        DeviceKey {
            device: device.to_string(),
            key: PrivateKey::from_seed(device_seed(device))
                .expect("every 32-byte seed is an Ed25519 key"),
            boot,
        }
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    pub fn public(&self) -> &PublicKey {
        self.key.public()
    }

    pub fn boot(&self) -> u32 {
        self.boot
    }

    /// `online` for connection `attempt`: `true` is the announce, `false` the last will (and
    /// the graceful goodbye, which publishes the same bytes).
    pub fn online(&self, attempt: u32, online: bool) -> Vec<u8> {
        let body = serde_json::to_value(OnlineBody { online }).expect("serializes");
        let counter = device_report::counter(self.boot, device_report::online_n(attempt, online));
        device_report::sign(&self.key, &self.device, Stream::Online, counter, body)
    }
}

/// What a device task signs its reports with: the key and the device's counter.
pub struct Signer {
    key: Arc<DeviceKey>,
    /// The `n` of the next `state` / `events` / `telemetry` / `enroll` message.
    next: u32,
    /// The enrolment request's body, built once (the PEM and the token proof do not change).
    enroll: serde_json::Value,
}

impl Signer {
    /// `token`: the fleet's enrolment token, proven in every enrolment request when set.
    pub fn new(key: Arc<DeviceKey>, token: Option<&str>, agent_version: &str) -> Signer {
        let public = key.public();
        let body = EnrollBody {
            public_key: public.to_pem(),
            token_proof: token.map(|t| device_report::token_proof(t, &key.device, public.id())),
            agent_version: Some(agent_version.to_string()),
        };
        Signer {
            enroll: serde_json::to_value(body).expect("serializes"),
            key,
            next: 1,
        }
    }

    pub fn key(&self) -> &Arc<DeviceKey> {
        &self.key
    }

    fn counter(&mut self) -> u64 {
        // Saturates like the agent: 4 billion reports from one device in one run.
        let n = self.next;
        self.next = n.saturating_add(1);
        device_report::counter(self.key.boot, n)
    }

    /// One `state`, `events` or `telemetry` message: `body` is the v1 report.
    pub fn sign(&mut self, stream: Stream, body: serde_json::Value) -> Vec<u8> {
        let counter = self.counter();
        device_report::sign(&self.key.key, &self.key.device, stream, counter, body)
    }

    /// The enrolment request, published (retained) at the start of every connection.
    pub fn enroll(&mut self) -> Vec<u8> {
        let body = self.enroll.clone();
        let counter = self.counter();
        device_report::sign(
            &self.key.key,
            &self.key.device,
            Stream::Enroll,
            counter,
            body,
        )
    }

    /// A report as published: its stream and the signed envelope of its v1 JSON.
    pub fn report(&mut self, r: &Report) -> serde_json::Result<(Stream, Vec<u8>)> {
        let (stream, body) = match r {
            Report::State(s) => (Stream::State, serde_json::to_value(&**s)?),
            Report::Event(e) => (Stream::Events, serde_json::to_value(&**e)?),
        };
        Ok((stream, self.sign(stream, body)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{fake_digest, AppVersion, Device};
    use chrono::{DateTime, Utc};
    use ferry_protocol::device_report::{check_token_proof, open};
    use ferry_protocol::report::{Event, Phase};

    fn now() -> DateTime<Utc> {
        "2026-11-22T10:00:00Z".parse().unwrap()
    }

    fn device(id: &str) -> Device {
        Device::new(
            id.into(),
            "linux/arm64".into(),
            "sim-test".into(),
            [("fleet".to_string(), "sim".to_string())].into(),
            [(
                "sensor".to_string(),
                AppVersion {
                    version: semver::Version::new(1, 0, 0),
                    digest: fake_digest("sensor", "1.0.0", "linux/arm64"),
                },
            )]
            .into(),
        )
    }

    #[test]
    fn keys_are_deterministic_and_per_device() {
        let a = DeviceKey::derive("sim-00001", 5);
        assert_eq!(
            a.public().id(),
            DeviceKey::derive("sim-00001", 9).public().id()
        );
        assert_ne!(
            a.public().id(),
            DeviceKey::derive("sim-00002", 5).public().id()
        );
        assert!(boot_now() > 1_700_000_000);
    }

    #[test]
    fn published_reports_open_verify_and_count_up() {
        let boot = 1_800_000_000;
        let id = "sim-00042";
        let key = Arc::new(DeviceKey::derive(id, boot));
        let pk = key.public().clone();
        let mut s = Signer::new(key.clone(), Some("fleet-token"), "sim-test");
        let dev = device(id);

        // What a connection publishes first: enroll (with the token proof), then online.
        let raw = s.enroll();
        let opened = open(&raw, id, Stream::Enroll).unwrap();
        let (enrolled, body, c_enroll) = opened.verify_enrolment().unwrap();
        assert_eq!(enrolled.id(), pk.id());
        assert_eq!(body.agent_version.as_deref(), Some("sim-test"));
        assert!(check_token_proof(
            "fleet-token",
            id,
            pk.id(),
            body.token_proof.as_deref().unwrap()
        ));
        assert_eq!(c_enroll, device_report::counter(boot, 1));
        let on = open(&key.online(0, true), id, Stream::Online)
            .unwrap()
            .verify(&pk)
            .unwrap();
        assert_eq!(on.body, serde_json::json!({"online": true}));
        let will = open(&key.online(0, false), id, Stream::Online)
            .unwrap()
            .verify(&pk)
            .unwrap();
        assert_eq!(will.body, serde_json::json!({"online": false}));
        let next_on = open(&key.online(1, true), id, Stream::Online)
            .unwrap()
            .verify(&pk)
            .unwrap();
        assert!(on.counter < will.counter && will.counter < next_on.counter);

        // Then state and events: the v1 bodies, unchanged, with a counter that only goes up.
        let state = dev.state(now());
        let event = Event::new(id, 3, Some("r-1".into()), Phase::Received);
        let mut last = c_enroll;
        for r in [
            Report::State(Box::new(state.clone())),
            Report::Event(Box::new(event.clone())),
            Report::State(Box::new(state.clone())),
        ] {
            let (stream, raw) = s.report(&r).unwrap();
            let p = open(&raw, id, stream).unwrap().verify(&pk).unwrap();
            assert!(p.counter > last, "{} after {last}", p.counter);
            assert_eq!(p.counter >> 32, u64::from(boot));
            last = p.counter;
            let v1 = match &r {
                Report::State(s) => serde_json::to_value(&**s).unwrap(),
                Report::Event(e) => serde_json::to_value(&**e).unwrap(),
            };
            assert_eq!(p.body, v1);
            // Bound to the device and stream of its topic, and to this device's key.
            assert!(open(&raw, "sim-00043", stream).is_err());
            let other = DeviceKey::derive("sim-00043", boot);
            assert!(open(&raw, id, stream)
                .unwrap()
                .verify(other.public())
                .is_err());
        }
        assert_eq!(last, device_report::counter(boot, 4));
        // A later run (higher boot) outranks everything this one sent.
        let mut later = Signer::new(Arc::new(DeviceKey::derive(id, boot + 1)), None, "x");
        let raw = later.enroll();
        let p = open(&raw, id, Stream::Enroll).unwrap();
        assert!(p.payload.counter > last);
        let (_, body, _) = p.verify_enrolment().unwrap();
        assert_eq!(body.token_proof, None);
    }
}
