//! The controller's core: inventory, catalogue, rollouts and sequence counters in memory, one
//! owner (no locks), written through to the store. No network I/O here: the serve loop feeds it
//! device messages, API commands and ticks, then calls [`Core::flush`] which commits every
//! change of the round in ONE transaction and only then hands back the notices to publish.
//!
//! Crash safety (`kill -9` at any point): a sequence and the notice that uses it, and the
//! rollout step that decided it, are committed together before the notice leaves; at start-up
//! [`Core::pending_notices`] re-publishes (byte-identical, so devices treat it as a duplicate)
//! every stored notice a device has not acknowledged yet. No sequence is reused, no wave is
//! skipped or repeated.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ferry_protocol::desired::Strategy;
use ferry_protocol::keys::{PrivateKey, TrustedKeys};
use ferry_protocol::release::verify_release;
use ferry_protocol::report::{Event, Phase, StateReport, Telemetry};
use ferry_protocol::topics::DeviceTopics;
use tracing::{debug, error, info, warn};

use super::config::RolloutSection;
use super::enrolment::Registry;
use super::metrics::Metrics;
use super::model::{Device, ReleaseEntry, RolloutRecord, SentDesired, StoredEvent};
use super::notices::{self, NoticeSpec};
use super::store::{Changes, Snapshot, Store, StoreError};
use crate::api::{
    DeviceDetail, DeviceView, ReleaseView, RollbackItem, RollbackRequest, RollbackResult,
    RolloutPreview, RolloutView, StartRollout,
};
use crate::rollout::selector::Selector;
use crate::rollout::waves::{
    Action, Candidate, DeviceReport, FailureThreshold, Rollout, RolloutConfig, WaveSpec,
};

/// A device message, parsed by the MQTT task.
#[derive(Debug, Clone)]
pub enum Inbound {
    State(Box<StateReport>),
    Online {
        device: String,
        online: bool,
    },
    Event(Box<Event>),
    /// One sample, or a batch flushed after an outage (oldest first).
    Telemetry {
        device: String,
        samples: Vec<Telemetry>,
    },
    /// The broker accepted the controller's connection (first or again).
    Connected,
}

/// An API error: HTTP status and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(m: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: m.into(),
        }
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        ApiError {
            status: 404,
            message: m.into(),
        }
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        ApiError {
            status: 409,
            message: m.into(),
        }
    }
    pub fn unprocessable(m: impl Into<String>) -> Self {
        ApiError {
            status: 422,
            message: m.into(),
        }
    }
}

/// A notice to publish (retained, QoS 1) after the round's commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: String,
}

/// What the outbox holds until the round's commit: a message, or a notice signed this round,
/// whose envelope stays in `Core::desired` (for the commit) and moves out of it into the
/// message after the commit: one copy of each notice in memory, never two.
#[derive(Debug)]
enum Queued {
    Ready(Outgoing),
    Notice { device: String, topic: String },
}

/// A notice ready to be signed (see [`Core::prepare`]).
struct Prepared {
    device: String,
    topic: String,
    platform: Option<String>,
    sequence: u64,
    apps: BTreeMap<String, String>,
    settings: BTreeMap<String, BTreeMap<String, String>>,
    how: How,
}

/// A notified device's app before the notice: its version (`None`: not installed) and its
/// settings, what a revert sends back.
type Before = (Option<String>, BTreeMap<String, String>);

/// The settings a notice gives one of its apps.
#[derive(Debug, Clone)]
enum AppSettings<'a> {
    /// What the device was last sent, with these values over it (a rollout's `--set`).
    Carry(&'a str, &'a BTreeMap<String, String>),
    /// Exactly these (a revert: the values from before the rollout).
    Exactly(&'a str, BTreeMap<String, String>),
}

/// How a notice asks for its app set.
#[derive(Debug, Clone)]
struct How {
    strategy: Strategy,
    allow_downgrade: bool,
    rollout: Option<String>,
    /// Switch even while an app holds its update lock.
    force: bool,
}

#[derive(Default)]
struct Dirty {
    /// Inventory records changed by device messages: written at most every [`LAZY_WRITE`],
    /// like `lazy_rollouts`. Everything in them comes from the devices' retained `state` and
    /// `online` (re-delivered on every subscribe) or is history (`last_seen`), so a crash loses
    /// nothing that is not sent again; a 10,000-device wave is not 60,000 row writes.
    devices: BTreeSet<String>,
    releases: BTreeSet<(String, String)>,
    rollouts: BTreeSet<String>,
    /// Rollouts changed by recorded reports only: written at most every [`LAZY_WRITE`]. After a crash the devices' retained states record those reports
    /// again; what must never be lost (a notice sent, a wave started) is written at once.
    lazy_rollouts: BTreeSet<String>,
    sequences: BTreeSet<String>,
    desired: BTreeSet<String>,
    events: Vec<StoredEvent>,
    telemetry: Vec<super::store::Reading>,
    rollout_seq: bool,
}

/// How often device records and rollouts changed only by device reports are written (see
/// `Dirty`; a graceful stop writes them at once, [`Core::flush_all`]).
const LAZY_WRITE: Duration = Duration::from_secs(2);

/// How far ahead of the controller's own counter a device's reported sequence may be and still
/// be believed. A device is legitimately ahead when notices reached it from elsewhere (`ferryctl
/// publish`, a controller whose database was restored from a backup); a report claiming more is
/// taken to be forged (reports are not yet signed: anyone who can publish on the broker can send
/// one) and ignored, so that it cannot make the controller sign a sequence near `u64::MAX`, after
/// which the box could never accept another notice.
pub const MAX_SEQUENCE_LEAD: u64 = 1_000_000;

/// The sequence of the next notice to a device: one past the larger of what this controller
/// signed (`own`) and what the device reports having accepted, the latter only when it is within
/// [`MAX_SEQUENCE_LEAD`] of `own`. `None` when the counter is exhausted.
pub fn next_sequence(own: u64, reported: u64) -> Option<u64> {
    let believed = if reported <= own.saturating_add(MAX_SEQUENCE_LEAD) {
        reported
    } else {
        0
    };
    own.max(believed).checked_add(1)
}

pub struct Core {
    store: Box<dyn Store>,
    last_lazy_write: std::time::Instant,
    key: PrivateKey,
    release_keys: TrustedKeys,
    release_threshold: usize,
    cfg: RolloutSection,
    prefix: String,
    metrics: Arc<Metrics>,
    devices: BTreeMap<String, Device>,
    releases: BTreeMap<(String, String), ReleaseEntry>,
    rollouts: BTreeMap<String, RolloutRecord>,
    /// Rollout id → creation order (for the store).
    rollout_order: BTreeMap<String, u64>,
    sequences: BTreeMap<String, u64>,
    desired: BTreeMap<String, SentDesired>,
    rollout_seq: u64,
    dirty: Dirty,
    outbox: Vec<Queued>,
    /// Devices whose `state` / `online = 1` arrived since this process started. Rollouts see a
    /// device as online only once both have: a notice is built on the device's app set, and the
    /// stored record may be older than its retained state (records are written lazily, and the
    /// device may have changed while the controller was down).
    state_seen: BTreeSet<String>,
    online_seen: BTreeSet<String>,
    /// Rollouts with recorded reports not yet advanced.
    touched: BTreeSet<String>,
    /// Device keys and report counters, shared with the MQTT side that verifies reports.
    registry: Arc<std::sync::Mutex<Registry>>,
}

pub struct CoreParams {
    pub key: PrivateKey,
    pub release_keys: TrustedKeys,
    pub release_threshold: usize,
    pub rollout: RolloutSection,
    pub prefix: String,
    pub metrics: Arc<Metrics>,
    /// Fleet enrolment tokens (`[enroll] tokens`).
    pub enroll_tokens: Vec<String>,
}

impl Core {
    pub fn new(store: Box<dyn Store>, p: CoreParams) -> Result<Core, StoreError> {
        let Snapshot {
            devices,
            releases,
            rollouts,
            sequences,
            desired,
            rollout_seq,
            device_keys,
        } = store.load()?;
        let rollout_order = rollouts
            .keys()
            .enumerate()
            .map(|(i, k)| (k.clone(), i as u64))
            .collect();
        let mut core = Core {
            store,
            last_lazy_write: std::time::Instant::now(),
            key: p.key,
            release_keys: p.release_keys,
            release_threshold: p.release_threshold,
            cfg: p.rollout,
            prefix: p.prefix,
            metrics: p.metrics,
            devices,
            releases,
            rollouts,
            rollout_order,
            sequences,
            desired,
            rollout_seq,
            dirty: Dirty::default(),
            outbox: Vec::new(),
            state_seen: BTreeSet::new(),
            online_seen: BTreeSet::new(),
            touched: BTreeSet::new(),
            registry: Arc::new(std::sync::Mutex::new(Registry::new(
                device_keys,
                p.enroll_tokens,
            ))),
        };
        // Until the broker says otherwise, nobody is known to be online.
        for d in core.devices.values_mut() {
            d.online = false;
        }
        for r in core.rollouts.values_mut() {
            let ids: Vec<String> = r.machine.devices().keys().cloned().collect();
            for id in ids {
                r.machine.record(&id, DeviceReport::Offline, Utc::now());
            }
        }
        info!(
            devices = core.devices.len(),
            releases = core.releases.len(),
            rollouts = core.rollouts.len(),
            active = core.active_rollouts().len(),
            "controller state loaded"
        );
        Ok(core)
    }

    /// The device keys, for the MQTT side (which verifies every report) and the API.
    pub fn registry(&self) -> Arc<std::sync::Mutex<Registry>> {
        self.registry.clone()
    }

    fn topics(&self, device: &str) -> Option<DeviceTopics> {
        DeviceTopics::new(&self.prefix, device).ok()
    }

    fn active_rollouts(&self) -> Vec<String> {
        self.rollouts
            .iter()
            .filter(|(_, r)| !r.machine.is_terminal())
            .map(|(id, _)| id.clone())
            .collect()
    }

    // ---- device messages ------------------------------------------------------------------

    /// Apply one device message. Rollouts are advanced by the next [`Core::advance`].
    pub fn ingest(&mut self, msg: Inbound, now: DateTime<Utc>) {
        match msg {
            Inbound::Connected => {
                // A broker restarted without persistence lost its retained notices: publish
                // again, byte-identical, every notice a device has not acknowledged yet.
                match self.pending_notices() {
                    Ok(pending) => {
                        if !pending.is_empty() {
                            info!(
                                notices = pending.len(),
                                "re-publishing notices not yet acknowledged"
                            );
                        }
                        self.outbox.extend(pending.into_iter().map(Queued::Ready));
                    }
                    // The next connection tries again; the notices stay stored.
                    Err(e) => error!(
                        error = %e,
                        "cannot read the notices to re-publish from the database"
                    ),
                }
            }
            Inbound::State(s) => {
                let id = s.device.clone();
                let own = self.sequences.get(&id).copied().unwrap_or(0);
                let dev = self
                    .devices
                    .entry(id.clone())
                    .or_insert_with(|| Device::new(&id));
                let was_known = dev.platform.is_some();
                let old_labels = dev.labels.clone();
                let believed = dev.sequence;
                let lost = dev.apply_state(&s, now);
                if dev.sequence > own.saturating_add(MAX_SEQUENCE_LEAD) {
                    // See MAX_SEQUENCE_LEAD: kept at the last sequence that was believable.
                    warn!(device = %id, reported = s.sequence, own,
                          "the device reports a sequence far ahead of any this controller signed; not believed");
                    self.metrics.disbelieved_sequences.inc();
                    dev.sequence = believed;
                }
                self.dirty.devices.insert(id.clone());
                // Its current state is known now: if it is online, rollouts may use it.
                let ready = self.state_seen.insert(id.clone()) && self.online_seen.contains(&id);
                if ready {
                    self.record_all(&id, &DeviceReport::Online, now);
                }
                if ready
                    || (self.online_seen.contains(&id) && (!was_known || old_labels != s.labels))
                {
                    self.offer(&id, now);
                }
                let live = self.live(&id);
                for r in self.active_rollouts() {
                    let rec = self.rollouts.get_mut(&r).expect("active rollout exists");
                    if !rec.machine.devices().contains_key(&id) {
                        continue;
                    }
                    if let Some(u) = &s.update {
                        rec.machine.record(
                            &id,
                            DeviceReport::Phase {
                                sequence: u.sequence,
                                phase: u.phase,
                                reason: u.error.clone().or_else(|| u.reason.clone()),
                                waiting: u.waiting,
                            },
                            now,
                        );
                        if !live {
                            // A retained state is not a sign of life (`record` takes a
                            // report for the current sequence as one): the result counts,
                            // the device stays offline until its `online = 1`.
                            rec.machine.record(&id, DeviceReport::Offline, now);
                        }
                    }
                    for (app, health) in &lost {
                        if *app == rec.app {
                            rec.machine.record(
                                &id,
                                DeviceReport::Unhealthy {
                                    reason: format!("{app} is {health}"),
                                },
                                now,
                            );
                        }
                    }
                    self.touched.insert(r);
                }
            }
            Inbound::Online { device, online } => {
                let dev = self
                    .devices
                    .entry(device.clone())
                    .or_insert_with(|| Device::new(&device));
                if dev.online == online && !online {
                    return;
                }
                dev.online = online;
                if online {
                    dev.last_seen = Some(now);
                    self.online_seen.insert(device.clone());
                    if !self.state_seen.contains(&device) {
                        // Not for rollouts yet: its retained state (the app set a notice
                        // builds on) has not arrived since the controller started. It
                        // counts as online when it does (`Inbound::State`).
                        self.dirty.devices.insert(device);
                        return;
                    }
                } else {
                    self.online_seen.remove(&device);
                }
                self.dirty.devices.insert(device.clone());
                let report = if online {
                    DeviceReport::Online
                } else {
                    DeviceReport::Offline
                };
                self.record_all(&device, &report, now);
                if online {
                    self.offer(&device, now);
                }
            }
            Inbound::Telemetry { device, samples } => {
                let dev = self
                    .devices
                    .entry(device.clone())
                    .or_insert_with(|| Device::new(&device));
                for s in &samples {
                    dev.apply_telemetry(s, now);
                    let ts = s.ts.timestamp_millis();
                    for (metric, value) in super::model::flatten(s) {
                        self.dirty
                            .telemetry
                            .push((device.clone(), metric, ts, value));
                    }
                    if let Some(n) = s.dropped.filter(|n| *n > 0) {
                        warn!(device = %device, dropped = n, "the device dropped telemetry samples while offline");
                    }
                }
                self.dirty.devices.insert(device);
            }
            Inbound::Event(e) => {
                let id = e.device.clone();
                let dev = self
                    .devices
                    .entry(id.clone())
                    .or_insert_with(|| Device::new(&id));
                dev.apply_event(&e, now);
                self.dirty.devices.insert(id.clone());
                self.dirty.events.push(StoredEvent::from(&*e));
                if e.phase.is_terminal() {
                    let level_failed = e.phase != Phase::Committed;
                    if level_failed {
                        warn!(device = %id, sequence = e.sequence, phase = %e.phase,
                              reason = e.reason.as_deref().unwrap_or(""), "device update failed");
                    } else {
                        info!(device = %id, sequence = e.sequence, "device committed");
                    }
                }
                let report = DeviceReport::Phase {
                    sequence: e.sequence,
                    phase: e.phase,
                    reason: e.reason.clone(),
                    waiting: e.waiting,
                };
                self.record_all(&id, &report, now);
            }
        }
    }

    fn record_all(&mut self, device: &str, report: &DeviceReport, now: DateTime<Utc>) {
        for r in self.active_rollouts() {
            let rec = self.rollouts.get_mut(&r).expect("active rollout exists");
            if rec.machine.devices().contains_key(device) {
                rec.machine.record(device, report.clone(), now);
                self.touched.insert(r);
            }
        }
    }

    /// Online for rollouts: `online = 1` and its state have both arrived since the start (see
    /// `state_seen`).
    fn live(&self, device: &str) -> bool {
        self.devices.get(device).is_some_and(|d| d.online)
            && self.online_seen.contains(device)
            && self.state_seen.contains(device)
    }

    /// Offer a (new or relabelled) device to every active rollout whose selector matches.
    fn offer(&mut self, device: &str, now: DateTime<Utc>) {
        let Some(dev) = self.devices.get(device) else {
            return;
        };
        if dev.platform.is_none() {
            return; // not enough known to update it yet; offered again on its first state
        }
        let (labels, online) = (dev.labels.clone(), self.live(device));
        for r in self.active_rollouts() {
            let rec = self.rollouts.get_mut(&r).expect("active rollout exists");
            if rec.machine.devices().contains_key(device) {
                continue;
            }
            let c = Candidate {
                id: device,
                labels: &labels,
                online,
            };
            let actions = rec.machine.offer(c, now);
            if rec.machine.devices().contains_key(device) {
                info!(rollout = %r, device, "device joins the rollout");
                self.dirty.rollouts.insert(r.clone());
            }
            self.carry_out(&r, actions, now);
        }
    }

    /// The next moment a rollout changes by time alone (a soak ends, a device times out): the
    /// serve loop advances then rather than at its next tick.
    pub fn next_deadline(&self) -> Option<DateTime<Utc>> {
        self.rollouts
            .values()
            .filter_map(|r| r.machine.next_deadline())
            .min()
    }

    /// Advance rollouts: those touched by reports since the last call, or all on a tick.
    pub fn advance(&mut self, all: bool, now: DateTime<Utc>) {
        let touched = std::mem::take(&mut self.touched);
        let ids: Vec<String> = if all {
            self.active_rollouts()
        } else {
            touched.iter().cloned().collect()
        };
        for id in ids {
            let Some(rec) = self.rollouts.get_mut(&id) else {
                continue;
            };
            // Touched rollouts had reports recorded: they changed. Otherwise only soaks and
            // timeouts can change something on a tick, and those show in the summary (cheaper
            // to compare than cloning a 10,000-device rollout). Changes without actions are
            // written lazily (see `flush`); actions (notices, waves, pauses) at once.
            let quiet = !touched.contains(&id);
            let before = quiet.then(|| (rec.machine.summary(), rec.machine.state().clone()));
            let actions = rec.machine.on_tick(now);
            let after = quiet.then(|| (rec.machine.summary(), rec.machine.state().clone()));
            if !actions.is_empty() {
                self.dirty.rollouts.insert(id.clone());
            } else if !quiet || before != after {
                self.dirty.lazy_rollouts.insert(id.clone());
            }
            self.carry_out(&id, actions, now);
        }
    }

    fn carry_out(&mut self, id: &str, actions: Vec<Action>, now: DateTime<Utc>) {
        if actions.is_empty() {
            return;
        }
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(a) = queue.pop_front() {
            self.dirty.rollouts.insert(id.to_string());
            match a {
                Action::StartWave { index } => {
                    info!(rollout = id, wave = index + 1, "wave started")
                }
                Action::WaveCompleted { index } => {
                    info!(rollout = id, wave = index + 1, "wave completed")
                }
                Action::Complete => info!(rollout = id, "rollout completed"),
                Action::Pause { reason } => {
                    self.metrics.rollout_pauses.inc();
                    warn!(rollout = id, reason = %reason, "rollout paused")
                }
                Action::Notify { device } => {
                    // The whole run of notifications (a wave's start) in one batch.
                    let mut batch = vec![device];
                    while let Some(Action::Notify { .. }) = queue.front() {
                        if let Some(Action::Notify { device }) = queue.pop_front() {
                            batch.push(device);
                        }
                    }
                    for (device, reason) in self.notify_for_rollout(id, batch, now) {
                        warn!(rollout = id, device = %device, reason = %reason,
                              "device cannot be sent the release");
                        let rec = self.rollouts.get_mut(id).expect("rollout exists");
                        queue.extend(rec.machine.fail(&device, &reason, now));
                    }
                }
                Action::Revert { devices } => {
                    warn!(
                        rollout = id,
                        devices = devices.len(),
                        "reverting every device the rollout updated"
                    );
                    for d in devices {
                        match self.revert_device(id, &d, now) {
                            Ok(()) => {
                                let rec = self.rollouts.get_mut(id).expect("rollout exists");
                                rec.reverted.push(d);
                            }
                            Err(reason) => {
                                warn!(rollout = id, device = %d, reason = %reason, "cannot revert");
                                let rec = self.rollouts.get_mut(id).expect("rollout exists");
                                rec.revert_failed.insert(d, reason);
                            }
                        }
                    }
                }
            }
        }
        if let Some(rec) = self.rollouts.get_mut(id) {
            rec.updated_at = now;
        }
    }
}

mod api;
mod notify;
mod persist;

#[cfg(test)]
#[path = "core_tests/mod.rs"]
mod tests;
