//! Which key speaks for which device, and how far each device's report counters have come
//! (protocol v2, PROTOCOL.md §9). This is where a device report is verified.
//!
//! - A device enrols by publishing a request on its `enroll` topic, signed by the key it names.
//!   A request proving one of the fleet's enrolment tokens (`[enroll] tokens`) is approved at
//!   once; any other waits as `pending` for `ferryctl device approve`. An operator can also
//!   provision a key (`ferryctl device enroll ID --key FILE`) or revoke one.
//! - A device that has a key keeps it: a request with a different key becomes a pending
//!   re-key, never a replacement (an attacker with the token cannot take over an enrolled
//!   device; the operator approves a genuinely new key).
//! - Every other report must be signed by the device's approved key and carry a counter
//!   above the last one applied on its stream (equal is a re-delivery: applied again on the
//!   retained streams, dropped on `events` and `telemetry`). Anything else is dropped, logged
//!   and counted by reason; nothing of it reaches the core.
//!
//! Counters are persisted lazily (with the inventory, every 2 s at most): after a crash a
//! replay of a report from those last seconds, which was applied already, can be applied again.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use ferry_protocol::device_report::{self, Opened, ReportError, ReportPayload, Stream};
use ferry_protocol::keys::PublicKey;
use serde::{Deserialize, Serialize};

/// The state of a key record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    Approved,
    Pending,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Approved => "approved",
            KeyStatus::Pending => "pending",
        }
    }
}

/// One device key, as stored and shown by the API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub device: String,
    pub status: KeyStatus,
    pub keyid: String,
    /// SPKI PEM.
    pub public_key: String,
    /// `token`, `operator` (provisioned or approved), or `request` (pending).
    pub via: String,
    pub since: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Highest counter applied per stream ([`Stream::index`]).
    #[serde(default)]
    pub counters: [u64; 5],
}

/// Why a report was dropped (with the protocol's reasons and the counter check).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Dropped {
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error("replayed {stream} report: counter {counter} is below the last applied {last}")]
    Replayed {
        stream: Stream,
        counter: u64,
        last: u64,
    },
    #[error("duplicate {stream} report (counter {counter} already applied)")]
    Duplicate { stream: Stream, counter: u64 },
}

impl Dropped {
    pub fn label(&self) -> &'static str {
        match self {
            Dropped::Report(r) => r.label(),
            Dropped::Replayed { .. } => "replayed",
            Dropped::Duplicate { .. } => "duplicate",
        }
    }
}

/// What an enrolment request led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enrolled {
    /// Approved now (by token).
    Approved,
    /// The key is the approved one already.
    Known,
    /// Waiting for an operator (no token, or a different key than the approved one).
    Pending { rekey: bool },
}

#[derive(Default)]
pub struct Registry {
    approved: HashMap<String, (PublicKey, KeyRecord)>,
    pending: BTreeMap<String, KeyRecord>,
    tokens: Vec<String>,
    /// (device, status) records to write now / at the next lazy write / to delete.
    dirty: BTreeSet<(String, KeyStatus)>,
    dirty_lazy: BTreeSet<String>,
    removed: BTreeSet<(String, KeyStatus)>,
}

/// What [`Registry::take_changes`] hands the store.
#[derive(Debug, Default)]
pub struct KeyChanges {
    pub put: Vec<KeyRecord>,
    pub delete: Vec<(String, KeyStatus)>,
}

impl Registry {
    pub fn new(records: Vec<KeyRecord>, tokens: Vec<String>) -> Registry {
        let mut r = Registry {
            tokens,
            ..Default::default()
        };
        for rec in records {
            match rec.status {
                KeyStatus::Approved => match PublicKey::from_pem(&rec.public_key) {
                    Ok(k) => {
                        r.approved.insert(rec.device.clone(), (k, rec));
                    }
                    Err(e) => tracing::error!(device = %rec.device, error = %e,
                        "stored device key does not parse; the device must enrol again"),
                },
                KeyStatus::Pending => {
                    r.pending.insert(rec.device.clone(), rec);
                }
            }
        }
        r
    }

    pub fn approved_count(&self) -> usize {
        self.approved.len()
    }

    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// The approved key of `device`, for verification outside the lock.
    pub fn key_of(&self, device: &str) -> Option<PublicKey> {
        self.approved.get(device).map(|(k, _)| k.clone())
    }

    /// Every record, approved first, by device.
    pub fn list(&self) -> Vec<KeyRecord> {
        let mut v: Vec<KeyRecord> = self.approved.values().map(|(_, r)| r.clone()).collect();
        v.extend(self.pending.values().cloned());
        v.sort_by(|a, b| (&a.device, a.status).cmp(&(&b.device, b.status)));
        v
    }

    /// Step three of a report (after [`device_report::open`] and the signature): the counter.
    /// Records it when the report is to be applied.
    pub fn admit(&mut self, payload: &ReportPayload) -> Result<(), Dropped> {
        let Some((_, rec)) = self.approved.get_mut(&payload.device) else {
            return Err(ReportError::Unenrolled(payload.device.clone()).into());
        };
        let stream = payload.stream;
        let last = &mut rec.counters[stream.index()];
        let counter = payload.counter;
        if counter < *last {
            return Err(Dropped::Replayed {
                stream,
                counter,
                last: *last,
            });
        }
        if counter == *last {
            return match stream {
                // A retained message again (after a reconnect, or the controller's restart).
                Stream::State | Stream::Online | Stream::Enroll => Ok(()),
                Stream::Events | Stream::Telemetry => Err(Dropped::Duplicate { stream, counter }),
            };
        }
        *last = counter;
        self.dirty_lazy.insert(payload.device.clone());
        Ok(())
    }

    /// An enrolment request whose signature verified (by the key it names).
    pub fn enrol(
        &mut self,
        device: &str,
        key: PublicKey,
        token_proof: Option<&str>,
        agent_version: Option<String>,
        now: DateTime<Utc>,
    ) -> Enrolled {
        if let Some((k, _)) = self.approved.get(device) {
            if k.id() == key.id() {
                return Enrolled::Known;
            }
        }
        let by_token = token_proof.is_some_and(|p| {
            self.tokens
                .iter()
                .any(|t| device_report::check_token_proof(t, device, key.id(), p))
        });
        let rekey = self.approved.contains_key(device);
        let mut rec = KeyRecord {
            device: device.to_string(),
            status: KeyStatus::Pending,
            keyid: key.id().to_string(),
            public_key: key.to_pem(),
            via: "request".into(),
            since: now,
            agent_version,
            counters: [0; 5],
        };
        if by_token && !rekey {
            rec.status = KeyStatus::Approved;
            rec.via = "token".into();
            self.pending.remove(device);
            self.removed
                .insert((device.to_string(), KeyStatus::Pending));
            self.put_approved(key, rec);
            return Enrolled::Approved;
        }
        if self.pending.get(device).map(|p| &p.keyid) != Some(&rec.keyid) {
            self.dirty.insert((device.to_string(), KeyStatus::Pending));
            self.removed
                .remove(&(device.to_string(), KeyStatus::Pending));
            self.pending.insert(device.to_string(), rec);
        }
        Enrolled::Pending { rekey }
    }

    fn put_approved(&mut self, key: PublicKey, rec: KeyRecord) {
        let device = rec.device.clone();
        self.removed.remove(&(device.clone(), KeyStatus::Approved));
        self.dirty.insert((device.clone(), KeyStatus::Approved));
        self.approved.insert(device, (key, rec));
    }

    /// The operator approves the pending key of `device` (only `keyid` if given). Counters
    /// start over for the new key.
    pub fn approve(
        &mut self,
        device: &str,
        keyid: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<KeyRecord, String> {
        let Some(p) = self.pending.get(device) else {
            return Err(format!("device {device} has no pending enrolment request"));
        };
        if let Some(want) = keyid {
            if !p.keyid.starts_with(want) || want.is_empty() {
                return Err(format!(
                    "device {device}'s pending key is {}, not {want}",
                    p.keyid
                ));
            }
        }
        let mut rec = self.pending.remove(device).expect("checked above");
        self.removed
            .insert((device.to_string(), KeyStatus::Pending));
        let key = PublicKey::from_pem(&rec.public_key).map_err(|e| e.to_string())?;
        rec.status = KeyStatus::Approved;
        rec.via = "operator".into();
        rec.since = now;
        rec.counters = [0; 5];
        self.put_approved(key, rec.clone());
        Ok(rec)
    }

    /// The operator provisions `key` for `device` (replacing any key it had).
    pub fn provision(&mut self, device: &str, key: PublicKey, now: DateTime<Utc>) -> KeyRecord {
        let rec = KeyRecord {
            device: device.to_string(),
            status: KeyStatus::Approved,
            keyid: key.id().to_string(),
            public_key: key.to_pem(),
            via: "operator".into(),
            since: now,
            agent_version: None,
            counters: [0; 5],
        };
        if self
            .pending
            .get(device)
            .is_some_and(|p| p.keyid == rec.keyid)
        {
            self.pending.remove(device);
            self.removed
                .insert((device.to_string(), KeyStatus::Pending));
        }
        self.put_approved(key, rec.clone());
        rec
    }

    /// Remove `device`'s keys (approved and pending): its reports are dropped from now on.
    pub fn revoke(&mut self, device: &str) -> Result<(), String> {
        let a = self.approved.remove(device).is_some();
        let p = self.pending.remove(device).is_some();
        if !a && !p {
            return Err(format!("device {device} has no key"));
        }
        for s in [KeyStatus::Approved, KeyStatus::Pending] {
            self.dirty.remove(&(device.to_string(), s));
            self.removed.insert((device.to_string(), s));
        }
        self.dirty_lazy.remove(device);
        Ok(())
    }

    /// What to write: key changes always, counters when `lazy_due`.
    pub fn take_changes(&mut self, lazy_due: bool) -> KeyChanges {
        let mut keys: BTreeSet<(String, KeyStatus)> = std::mem::take(&mut self.dirty);
        if lazy_due {
            for d in std::mem::take(&mut self.dirty_lazy) {
                keys.insert((d, KeyStatus::Approved));
            }
        }
        let put = keys
            .into_iter()
            .filter_map(|(d, s)| match s {
                KeyStatus::Approved => self.approved.get(&d).map(|(_, r)| r.clone()),
                KeyStatus::Pending => self.pending.get(&d).cloned(),
            })
            .collect();
        KeyChanges {
            put,
            delete: std::mem::take(&mut self.removed).into_iter().collect(),
        }
    }
}

/// Verify one device message (the topic said `device` and `stream`) against `registry`: the
/// envelope, the key, the signature, the counter. Returns the payload to apply, or `None` for
/// an enrolment request (handled here).
pub fn verify(
    registry: &std::sync::Mutex<Registry>,
    device: &str,
    stream: Stream,
    raw: &[u8],
    now: DateTime<Utc>,
) -> Result<Option<ReportPayload>, Dropped> {
    let opened: Opened = device_report::open(raw, device, stream)?;
    let lock = || registry.lock().unwrap_or_else(|p| p.into_inner());
    if stream == Stream::Enroll {
        let (key, body, _) = opened.verify_enrolment()?;
        let keyid = key.id().to_string();
        let outcome = lock().enrol(
            device,
            key,
            body.token_proof.as_deref(),
            body.agent_version,
            now,
        );
        match outcome {
            Enrolled::Approved => {
                tracing::info!(device, key = %keyid, "device enrolled by token")
            }
            Enrolled::Known => tracing::debug!(device, "enrolment request of a known key"),
            Enrolled::Pending { rekey: false } => tracing::info!(device, key = %keyid,
                "enrolment request waits for an operator (ferryctl device approve)"),
            Enrolled::Pending { rekey: true } => tracing::warn!(device, key = %keyid,
                "enrolment request with a key other than the device's approved one: kept pending, not applied"),
        }
        return Ok(None);
    }
    let Some(key) = lock().key_of(device) else {
        return Err(ReportError::Unenrolled(device.to_string()).into());
    };
    let payload = opened.verify(&key)?;
    lock().admit(&payload)?;
    Ok(Some(payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::keys::PrivateKey;
    use serde_json::json;
    use std::sync::Mutex;

    fn key(n: u8) -> PrivateKey {
        PrivateKey::from_seed([n; 32]).unwrap()
    }

    fn enroll_raw(k: &PrivateKey, device: &str, token: Option<&str>) -> Vec<u8> {
        let body = device_report::EnrollBody {
            public_key: k.public().to_pem(),
            token_proof: token.map(|t| device_report::token_proof(t, device, k.public().id())),
            agent_version: None,
        };
        device_report::sign(
            k,
            device,
            Stream::Enroll,
            1,
            serde_json::to_value(body).unwrap(),
        )
    }

    fn state(k: &PrivateKey, device: &str, counter: u64) -> Vec<u8> {
        device_report::sign(k, device, Stream::State, counter, json!({"x": counter}))
    }

    #[test]
    fn a_token_admits_a_device_and_its_signed_reports_apply_in_order() {
        let reg = Mutex::new(Registry::new(vec![], vec!["fleet-token".into()]));
        let k = key(1);
        let now = Utc::now();
        // Before enrolment: dropped as unenrolled.
        let e = verify(&reg, "d1", Stream::State, &state(&k, "d1", 5), now).unwrap_err();
        assert_eq!(e.label(), "unenrolled");
        assert_eq!(
            verify(
                &reg,
                "d1",
                Stream::Enroll,
                &enroll_raw(&k, "d1", Some("fleet-token")),
                now
            ),
            Ok(None)
        );
        assert_eq!(reg.lock().unwrap().approved_count(), 1);
        assert!(verify(&reg, "d1", Stream::State, &state(&k, "d1", 5), now)
            .unwrap()
            .is_some());
        // The retained copy again: applied (idempotent); an older one: a replay.
        assert!(verify(&reg, "d1", Stream::State, &state(&k, "d1", 5), now).is_ok());
        let e = verify(&reg, "d1", Stream::State, &state(&k, "d1", 4), now).unwrap_err();
        assert!(matches!(e, Dropped::Replayed { last: 5, .. }), "{e}");
        // Events: a duplicate is dropped.
        let ev = device_report::sign(&k, "d1", Stream::Events, 9, json!({}));
        assert!(verify(&reg, "d1", Stream::Events, &ev, now).is_ok());
        assert_eq!(
            verify(&reg, "d1", Stream::Events, &ev, now)
                .unwrap_err()
                .label(),
            "duplicate"
        );
        // Another key signing for d1; unsigned v1 bytes; d1's report on d2's topic.
        let thief = key(2);
        assert_eq!(
            verify(&reg, "d1", Stream::State, &state(&thief, "d1", 50), now)
                .unwrap_err()
                .label(),
            "bad_signature"
        );
        assert_eq!(
            verify(&reg, "d1", Stream::State, br#"{"device":"d1"}"#, now)
                .unwrap_err()
                .label(),
            "unsigned"
        );
        assert_eq!(
            verify(&reg, "d2", Stream::State, &state(&k, "d1", 51), now)
                .unwrap_err()
                .label(),
            "wrong_device"
        );
    }

    #[test]
    fn without_the_token_a_request_waits_and_a_new_key_never_replaces_the_approved_one() {
        let reg = Mutex::new(Registry::new(vec![], vec!["fleet-token".into()]));
        let now = Utc::now();
        let k = key(1);
        verify(
            &reg,
            "d1",
            Stream::Enroll,
            &enroll_raw(&k, "d1", Some("wrong")),
            now,
        )
        .unwrap();
        assert_eq!(reg.lock().unwrap().approved_count(), 0);
        assert_eq!(reg.lock().unwrap().pending_count(), 1);
        let rec = reg
            .lock()
            .unwrap()
            .approve("d1", Some(&k.public().id().to_string()[..8]), now)
            .unwrap();
        assert_eq!(rec.via, "operator");
        assert!(verify(&reg, "d1", Stream::State, &state(&k, "d1", 1), now).is_ok());
        // An attacker who has the token enrols another key for d1: pending, d1 keeps its key.
        let thief = key(2);
        verify(
            &reg,
            "d1",
            Stream::Enroll,
            &enroll_raw(&thief, "d1", Some("fleet-token")),
            now,
        )
        .unwrap();
        let r = reg.lock().unwrap();
        assert_eq!(r.key_of("d1").unwrap().id(), k.public().id());
        assert_eq!(r.pending_count(), 1);
        drop(r);
        assert!(verify(&reg, "d1", Stream::State, &state(&thief, "d1", 99), now).is_err());
        // Revoked: nothing applies any more.
        reg.lock().unwrap().revoke("d1").unwrap();
        assert_eq!(
            verify(&reg, "d1", Stream::State, &state(&k, "d1", 100), now)
                .unwrap_err()
                .label(),
            "unenrolled"
        );
    }

    #[test]
    fn changes_are_written_keys_at_once_counters_lazily_and_reload() {
        let mut reg = Registry::new(vec![], vec![]);
        let now = Utc::now();
        let k = key(1);
        reg.provision("d1", k.public().clone(), now);
        let c = reg.take_changes(false);
        assert_eq!(c.put.len(), 1);
        let payload = device_report::open(&state(&k, "d1", 7), "d1", Stream::State)
            .unwrap()
            .verify(k.public())
            .unwrap();
        reg.admit(&payload).unwrap();
        assert!(reg.take_changes(false).put.is_empty(), "counters wait");
        let c = reg.take_changes(true);
        assert_eq!(c.put[0].counters[Stream::State.index()], 7);
        let reloaded = Registry::new(c.put, vec![]);
        assert_eq!(reloaded.key_of("d1").unwrap().id(), k.public().id());
        let mut reloaded = reloaded;
        assert!(
            reloaded.admit(&payload).is_ok(),
            "equal: re-delivered state"
        );
        let old = device_report::open(&state(&k, "d1", 6), "d1", Stream::State)
            .unwrap()
            .verify(k.public())
            .unwrap();
        assert!(reloaded.admit(&old).is_err(), "counters survive a restart");
    }
}
