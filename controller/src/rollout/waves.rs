//! The rollout state machine (see the [module overview](super)); wave specs and failure
//! thresholds are in [`spec`](super::spec) and re-exported here.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use ferry_protocol::report::{Phase, Waiting};
use serde::{Deserialize, Serialize};

use super::selector::Selector;
pub use super::spec::{plan, FailureThreshold, WaveError, WaveSpec, WaveTarget};

// ---------------------------------------------------------------------------------------------
// The state machine.

/// What to do when a wave's failures pass the threshold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    #[default]
    Pause,
    /// Pause, and send every device the rollout notified back to its previous release.
    Revert,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutConfig {
    /// How long a device must stay healthy (and be seen online) after `committed`.
    pub soak: Duration,
    /// How long a notified device may go without progress, counting only time online: the
    /// clock restarts at every report for its notice that is not a result (and when it comes
    /// online), and stops while the device reports that its switch waits for a maintenance
    /// window or an update lock (see [`DeviceStatus::Notified`]).
    pub device_timeout: Duration,
    pub max_failures: FailureThreshold,
    pub on_failure: OnFailure,
}

/// A device the selector may match.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    pub id: &'a str,
    pub labels: &'a dyn crate::rollout::selector::Labels,
    pub online: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum DeviceStatus {
    /// Not yet in a wave (offline, or waiting for a later wave).
    Pending,
    /// Told to update at `at`; `sequence` is the desired-state sequence once the caller recorded
    /// it with [`Rollout::notified`].
    ///
    /// Device timeout: the device fails once it has been online for `device_timeout` since the
    /// latest of `at`, coming online and `progress_at`, unless `wait` holds it (window, lock).
    Notified {
        sequence: Option<u64>,
        at: DateTime<Utc>,
        /// The last report for `sequence` with a phase that is not a result (`received`,
        /// `downloading`, `downloaded`, ...): progress, it restarts the timeout.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        progress_at: Option<DateTime<Utc>>,
        /// What that last report said the update waits for, if anything.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wait: Option<Wait>,
    },
    /// Reported `committed`; soaking since `at`.
    Committed {
        sequence: u64,
        at: DateTime<Utc>,
    },
    Succeeded,
    Failed {
        reason: String,
    },
}

impl DeviceStatus {
    pub fn is_done(&self) -> bool {
        matches!(self, DeviceStatus::Succeeded | DeviceStatus::Failed { .. })
    }

    fn notified(at: DateTime<Utc>) -> DeviceStatus {
        DeviceStatus::Notified {
            sequence: None,
            at,
            progress_at: None,
            wait: None,
        }
    }
}

/// A notified device's update waits: `retrying` its download (progress: the timeout keeps
/// running and restarts at each report), or held by a maintenance `window` or an app's update
/// `lock` (the timeout is suspended until a report without either).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wait {
    pub kind: Waiting,
    /// The device's words (`maintenance window 02:00-04:00 opens in 3 h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Since when it has been reporting this kind of wait.
    pub since: DateTime<Utc>,
}

impl Wait {
    /// Window and lock hold the device: its timeout does not run.
    pub fn holds(&self) -> bool {
        matches!(self.kind, Waiting::Window | Waiting::Lock)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEntry {
    pub status: DeviceStatus,
    /// The wave the device was put in (set when it is notified).
    pub wave: Option<usize>,
    pub online: bool,
    /// When the device was last seen coming online; restarts its result timeout.
    pub online_since: Option<DateTime<Utc>>,
}

/// What a device told the controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceReport {
    Online,
    Offline,
    /// An update phase for a desired-state sequence: `committed` (success, starts the soak),
    /// `rolled_back`, `failed`, `rejected` and `superseded` (failure); any other phase is
    /// progress of a notified device (restarts its timeout; with `waiting` window or lock it
    /// holds the timeout until a report without either).
    Phase {
        sequence: u64,
        phase: Phase,
        /// The device's own explanation of a failure or of what it waits for, when it gave one.
        reason: Option<String>,
        /// What the update waits for (`retrying`, `window`, `lock`), as the device reported it.
        waiting: Option<Waiting>,
    },
    /// Health lost; fails a device that is soaking.
    Unhealthy {
        reason: String,
    },
}

/// What the caller must do, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    StartWave {
        index: usize,
    },
    /// Publish the new desired state to the device, then call [`Rollout::notified`].
    Notify {
        device: String,
    },
    WaveCompleted {
        index: usize,
    },
    Pause {
        reason: String,
    },
    /// Send these devices back to their previous release.
    Revert {
        devices: Vec<String>,
    },
    Complete,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RolloutState {
    Running,
    Paused {
        reason: String,
    },
    /// Terminal: the failure threshold passed with `--on-failure revert`.
    Reverted {
        reason: String,
    },
    /// Terminal: every device succeeded or failed, and the last wave stayed under the threshold.
    Completed,
    /// Terminal: stopped by the operator. Devices keep what they run; nothing more is sent.
    Aborted {
        reason: String,
    },
}

impl RolloutState {
    /// `running`, `paused`, `reverted`, `completed`, `aborted`.
    pub fn name(&self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused { .. } => "paused",
            RolloutState::Reverted { .. } => "reverted",
            RolloutState::Completed => "completed",
            RolloutState::Aborted { .. } => "aborted",
        }
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            RolloutState::Paused { reason }
            | RolloutState::Reverted { reason }
            | RolloutState::Aborted { reason } => Some(reason),
            RolloutState::Running | RolloutState::Completed => None,
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            RolloutState::Completed | RolloutState::Reverted { .. } | RolloutState::Aborted { .. }
        )
    }
}

/// Per-wave progress, for status displays. `held_window`, `held_lock` and `retrying` count
/// notified devices by what their last report said they wait for (a subset of `notified`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveSummary {
    pub index: usize,
    /// Cumulative target (devices in this and earlier waves).
    pub target: usize,
    pub started: bool,
    /// Devices put in this wave.
    pub devices: usize,
    pub notified: usize,
    /// Committed and soaking.
    pub soaking: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// Waiting for a maintenance window (timeout suspended).
    #[serde(default)]
    pub held_window: usize,
    /// Waiting for an app's update lock (timeout suspended).
    #[serde(default)]
    pub held_lock: usize,
    /// Retrying their download (registry unreachable or failing; timeout running).
    #[serde(default)]
    pub retrying: usize,
}

/// Notified devices waiting for the same thing, for the same reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitGroup {
    pub waiting: Waiting,
    pub reason: Option<String>,
    pub devices: Vec<String>,
}

/// A rollout's progress: per wave, per state, and failure and waiting reasons grouped.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub devices: usize,
    pub pending: usize,
    pub pending_offline: usize,
    pub notified: usize,
    pub soaking: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub waves: Vec<WaveSummary>,
    /// Failure reason → devices, largest group first.
    pub failures: Vec<(String, Vec<String>)>,
    /// Totals of the waves' `held_window`, `held_lock`, `retrying`.
    #[serde(default)]
    pub held_window: usize,
    #[serde(default)]
    pub held_lock: usize,
    #[serde(default)]
    pub retrying: usize,
    /// Notified devices that wait, grouped by what for and the reason, largest group first.
    #[serde(default)]
    pub waiting: Vec<WaitGroup>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Wave {
    started_at: DateTime<Utc>,
    /// Failures acknowledged by `resume`, not counted against the threshold again.
    forgiven: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RolloutError {
    #[error("the selector `{0}` matches no device")]
    EmptyFleet(String),
    #[error("the rollout is not paused (it is {0})")]
    NotPaused(String),
    #[error("the rollout is not running (it is {0})")]
    NotRunning(String),
    #[error("the rollout has ended (it is {0})")]
    Ended(String),
}

/// A rollout: plain data, serialize it after every call to survive a controller restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    selector: Selector,
    spec: WaveSpec,
    config: RolloutConfig,
    /// Cumulative device counts per wave, planned for the fleet matched at creation.
    targets: Vec<usize>,
    /// Started waves, in order; the last one is the current wave.
    waves: Vec<Wave>,
    state: RolloutState,
    devices: BTreeMap<String, DeviceEntry>,
}

fn at_least(since: DateTime<Utc>, d: Duration, now: DateTime<Utc>) -> bool {
    end(since, d).is_some_and(|end| now >= end)
}

fn end(since: DateTime<Utc>, d: Duration) -> Option<DateTime<Utc>> {
    TimeDelta::from_std(d)
        .ok()
        .and_then(|d| since.checked_add_signed(d))
}

/// When a notified device's timeout clock last (re)started: notified, came online, reported
/// progress. `None` while a window or a lock holds it, and for other statuses.
fn timeout_since(d: &DeviceEntry) -> Option<DateTime<Utc>> {
    match &d.status {
        DeviceStatus::Notified {
            at,
            progress_at,
            wait,
            ..
        } if !wait.as_ref().is_some_and(Wait::holds) => Some(
            (*at)
                .max(d.online_since.unwrap_or(*at))
                .max(progress_at.unwrap_or(*at)),
        ),
        _ => None,
    }
}

impl Rollout {
    /// A rollout over the candidates the selector matches. Nothing happens until the first
    /// [`Rollout::on_tick`], which starts wave 0.
    pub fn new<'a>(
        selector: Selector,
        spec: WaveSpec,
        config: RolloutConfig,
        fleet: impl IntoIterator<Item = Candidate<'a>>,
        now: DateTime<Utc>,
    ) -> Result<Rollout, RolloutError> {
        let mut devices = BTreeMap::new();
        for c in fleet {
            if selector.matches(c.id, c.labels) {
                devices.insert(c.id.to_string(), Self::entry(c.online, now));
            }
        }
        if devices.is_empty() {
            return Err(RolloutError::EmptyFleet(selector.to_string()));
        }
        Ok(Rollout {
            targets: plan(&spec, devices.len()),
            selector,
            spec,
            config,
            waves: Vec::new(),
            state: RolloutState::Running,
            devices,
        })
    }

    fn entry(online: bool, now: DateTime<Utc>) -> DeviceEntry {
        DeviceEntry {
            status: DeviceStatus::Pending,
            wave: None,
            online,
            online_since: online.then_some(now),
        }
    }

    pub fn selector(&self) -> &Selector {
        &self.selector
    }
    pub fn spec(&self) -> &WaveSpec {
        &self.spec
    }
    pub fn config(&self) -> &RolloutConfig {
        &self.config
    }
    /// Cumulative device counts per wave (see [`plan`]).
    pub fn targets(&self) -> &[usize] {
        &self.targets
    }
    pub fn state(&self) -> &RolloutState {
        &self.state
    }
    /// The index of the current (last started) wave.
    pub fn current_wave(&self) -> Option<usize> {
        self.waves.len().checked_sub(1)
    }
    pub fn devices(&self) -> &BTreeMap<String, DeviceEntry> {
        &self.devices
    }
    pub fn device(&self, id: &str) -> Option<&DeviceEntry> {
        self.devices.get(id)
    }

    /// A device seen (again) while the rollout runs: added as pending if the selector matches
    /// and it is new. It then fills the current wave if that has room, else a later wave.
    pub fn offer(&mut self, c: Candidate<'_>, now: DateTime<Utc>) -> Vec<Action> {
        if self.is_terminal()
            || self.devices.contains_key(c.id)
            || !self.selector.matches(c.id, c.labels)
        {
            return Vec::new();
        }
        self.devices
            .insert(c.id.to_string(), Self::entry(c.online, now));
        self.advance(now)
    }

    /// Record the sequence published for a device after a `Notify`; reports for other sequences
    /// are ignored. False if the device is not waiting for a result.
    pub fn notified(&mut self, device: &str, sequence: u64) -> bool {
        match self.devices.get_mut(device).map(|d| &mut d.status) {
            Some(DeviceStatus::Notified { sequence: s, .. }) => {
                *s = Some(sequence);
                true
            }
            _ => false,
        }
    }

    /// A device's report: record it, then advance.
    pub fn on_report(
        &mut self,
        device: &str,
        report: DeviceReport,
        now: DateTime<Utc>,
    ) -> Vec<Action> {
        if self.is_terminal() {
            return Vec::new();
        }
        self.record(device, report, now);
        self.advance(now)
    }

    /// A notified device that could not be sent its notice (e.g. its release has no image for
    /// its platform): it fails with `reason`.
    pub fn fail(&mut self, device: &str, reason: &str, now: DateTime<Utc>) -> Vec<Action> {
        if self.is_terminal() {
            return Vec::new();
        }
        if let Some(d) = self.devices.get_mut(device) {
            if let DeviceStatus::Notified { .. } = d.status {
                d.status = DeviceStatus::Failed {
                    reason: reason.to_string(),
                };
            }
        }
        self.advance(now)
    }

    /// Record a report without advancing: for a batch of reports, call this for each and
    /// [`Rollout::on_tick`] once (same result as [`Rollout::on_report`] for each, in O(batch +
    /// fleet) instead of O(batch × fleet)).
    pub fn record(&mut self, device: &str, report: DeviceReport, now: DateTime<Utc>) {
        if self.is_terminal() {
            return;
        }
        let Some(d) = self.devices.get_mut(device) else {
            return;
        };
        match report {
            DeviceReport::Online => {
                if !d.online {
                    d.online = true;
                    d.online_since = Some(now);
                }
            }
            DeviceReport::Offline => d.online = false,
            DeviceReport::Unhealthy { reason } => {
                if let DeviceStatus::Committed { .. } = d.status {
                    d.status = DeviceStatus::Failed {
                        reason: format!("unhealthy while soaking: {reason}"),
                    };
                }
            }
            DeviceReport::Phase {
                sequence,
                phase,
                reason,
                waiting,
            } => {
                let current = match d.status {
                    DeviceStatus::Notified { sequence: s, .. } => s,
                    DeviceStatus::Committed { sequence: s, .. } => Some(s),
                    _ => None,
                };
                if current == Some(sequence) {
                    // A device that reports is online.
                    if !d.online {
                        d.online = true;
                        d.online_since = Some(now);
                    }
                    match phase {
                        Phase::Committed => {
                            if let DeviceStatus::Notified { .. } = d.status {
                                d.status = DeviceStatus::Committed { sequence, at: now };
                            }
                        }
                        Phase::RolledBack
                        | Phase::Failed
                        | Phase::Rejected
                        | Phase::Superseded
                        | Phase::RollbackFailed => {
                            let name = phase.as_str();
                            d.status = DeviceStatus::Failed {
                                reason: match reason {
                                    Some(r) => format!("{name}: {r}"),
                                    None => format!("reported {name}"),
                                },
                            };
                        }
                        // Not a result: progress (restarts the timeout), held or not.
                        _ => {
                            if let DeviceStatus::Notified {
                                progress_at, wait, ..
                            } = &mut d.status
                            {
                                *progress_at = Some(now);
                                *wait = waiting.map(|kind| Wait {
                                    kind,
                                    reason,
                                    since: match wait {
                                        Some(w) if w.kind == kind => w.since,
                                        _ => now,
                                    },
                                });
                            }
                        }
                    }
                }
            }
        }
    }

    pub fn on_tick(&mut self, now: DateTime<Utc>) -> Vec<Action> {
        self.advance(now)
    }

    /// Continue a paused rollout. The current wave's failures so far are acknowledged: only new
    /// failures count against the threshold.
    pub fn resume(&mut self, now: DateTime<Utc>) -> Result<Vec<Action>, RolloutError> {
        if !matches!(self.state, RolloutState::Paused { .. }) {
            return Err(RolloutError::NotPaused(self.state.name().into()));
        }
        if let Some(w) = self.current_wave() {
            self.waves[w].forgiven = self.wave_counts(w).1;
        }
        self.state = RolloutState::Running;
        Ok(self.advance(now))
    }

    /// The operator pauses a running rollout: nothing more is notified and no wave starts until
    /// [`Rollout::resume`]; results keep being recorded.
    pub fn pause(&mut self, reason: &str) -> Result<(), RolloutError> {
        if self.state != RolloutState::Running {
            return Err(RolloutError::NotRunning(self.state.name().into()));
        }
        self.state = RolloutState::Paused {
            reason: reason.to_string(),
        };
        Ok(())
    }

    /// The operator stops the rollout for good. Devices keep what they run.
    pub fn abort(&mut self, reason: &str) -> Result<(), RolloutError> {
        if self.is_terminal() {
            return Err(RolloutError::Ended(self.state.name().into()));
        }
        self.state = RolloutState::Aborted {
            reason: reason.to_string(),
        };
        Ok(())
    }

    /// Progress per wave and state, with failure reasons grouped.
    pub fn summary(&self) -> Summary {
        let mut s = Summary {
            devices: self.devices.len(),
            waves: self
                .targets
                .iter()
                .enumerate()
                .map(|(index, &target)| WaveSummary {
                    index,
                    target,
                    started: index < self.waves.len(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let mut reasons: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut waits: BTreeMap<(&str, Option<&str>), WaitGroup> = BTreeMap::new();
        type Count = fn(&mut WaveSummary) -> &mut usize;
        for (id, d) in &self.devices {
            let mut waiting: Option<Count> = None;
            let (total, in_wave): (&mut usize, Count) = match &d.status {
                DeviceStatus::Pending => {
                    s.pending_offline += usize::from(!d.online);
                    s.pending += 1;
                    continue;
                }
                DeviceStatus::Notified { wait, .. } => {
                    if let Some(wait) = wait {
                        let (total, in_wave): (&mut usize, Count) = match wait.kind {
                            Waiting::Window => (&mut s.held_window, |w| &mut w.held_window),
                            Waiting::Lock => (&mut s.held_lock, |w| &mut w.held_lock),
                            Waiting::Retrying => (&mut s.retrying, |w| &mut w.retrying),
                        };
                        *total += 1;
                        waiting = Some(in_wave);
                        waits
                            .entry((wait.kind.as_str(), wait.reason.as_deref()))
                            .or_insert_with(|| WaitGroup {
                                waiting: wait.kind,
                                reason: wait.reason.clone(),
                                devices: Vec::new(),
                            })
                            .devices
                            .push(id.clone());
                    }
                    (&mut s.notified, |w| &mut w.notified)
                }
                DeviceStatus::Committed { .. } => (&mut s.soaking, |w| &mut w.soaking),
                DeviceStatus::Succeeded => (&mut s.succeeded, |w| &mut w.succeeded),
                DeviceStatus::Failed { reason } => {
                    reasons.entry(reason).or_default().push(id.clone());
                    (&mut s.failed, |w| &mut w.failed)
                }
            };
            *total += 1;
            if let Some(w) = d.wave.and_then(|w| s.waves.get_mut(w)) {
                w.devices += 1;
                *in_wave(w) += 1;
                if let Some(waiting) = waiting {
                    *waiting(w) += 1;
                }
            }
        }
        s.failures = reasons
            .into_iter()
            .map(|(r, ids)| (r.to_string(), ids))
            .collect();
        s.failures.sort_by_key(|f| std::cmp::Reverse(f.1.len()));
        s.waiting = waits.into_values().collect();
        s.waiting
            .sort_by_key(|g| std::cmp::Reverse(g.devices.len()));
        s
    }

    pub fn is_terminal(&self) -> bool {
        self.state.is_terminal()
    }

    /// The earliest moment [`Rollout::on_tick`] would change something by time alone: a soak
    /// that ends or a device timeout that runs out (online devices not held, as in `advance`).
    /// The controller wakes up then instead of waiting for its next tick.
    pub fn next_deadline(&self) -> Option<DateTime<Utc>> {
        if self.is_terminal() {
            return None;
        }
        let (timeout, soak) = (self.config.device_timeout, self.config.soak);
        self.devices
            .values()
            .filter(|d| d.online)
            .filter_map(|d| match d.status {
                DeviceStatus::Notified { .. } => end(timeout_since(d)?, timeout),
                DeviceStatus::Committed { at, .. } => end(at, soak),
                _ => None,
            })
            .min()
    }

    /// (devices in wave `w`, failed, done).
    fn wave_counts(&self, w: usize) -> (usize, usize, usize) {
        let mut r = (0, 0, 0);
        for d in self.devices.values().filter(|d| d.wave == Some(w)) {
            r.0 += 1;
            r.1 += matches!(d.status, DeviceStatus::Failed { .. }) as usize;
            r.2 += d.status.is_done() as usize;
        }
        r
    }

    fn advance(&mut self, now: DateTime<Utc>) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.is_terminal() {
            return actions;
        }
        // Timeouts (online time without progress, not while held) and soaks, also while paused.
        let (timeout, soak) = (self.config.device_timeout, self.config.soak);
        for d in self.devices.values_mut().filter(|d| d.online) {
            match d.status {
                DeviceStatus::Notified { .. }
                    if timeout_since(d).is_some_and(|since| at_least(since, timeout, now)) =>
                {
                    d.status = DeviceStatus::Failed {
                        reason: format!(
                            "no progress reported within {}s online",
                            timeout.as_secs_f64()
                        ),
                    };
                }
                DeviceStatus::Committed { at, .. } if at_least(at, soak, now) => {
                    d.status = DeviceStatus::Succeeded;
                }
                _ => {}
            }
        }
        if self.state != RolloutState::Running {
            return actions;
        }
        if self.waves.is_empty() {
            self.waves.push(Wave {
                started_at: now,
                forgiven: 0,
            });
            actions.push(Action::StartWave { index: 0 });
        }
        loop {
            let w = self.waves.len() - 1;
            let last = w + 1 == self.targets.len();
            // Fill the wave with online pending devices, in id order.
            let mut assigned = self.devices.values().filter(|d| d.wave.is_some()).count();
            for (id, d) in self.devices.iter_mut() {
                if !last && assigned >= self.targets[w] {
                    break;
                }
                if d.online && d.status == DeviceStatus::Pending {
                    d.status = DeviceStatus::notified(now);
                    d.wave = Some(w);
                    assigned += 1;
                    actions.push(Action::Notify { device: id.clone() });
                }
            }
            let (size, failed, done) = self.wave_counts(w);
            let wave = &self.waves[w];
            if self
                .config
                .max_failures
                .exceeded(failed - wave.forgiven, size)
            {
                let reason = format!(
                    "wave {}: {failed} of {size} devices failed (max failures {})",
                    w + 1,
                    self.config.max_failures
                );
                actions.push(Action::Pause {
                    reason: reason.clone(),
                });
                if self.config.on_failure == OnFailure::Revert {
                    let devices: Vec<String> = self
                        .devices
                        .iter()
                        .filter(|(_, d)| d.wave.is_some())
                        .map(|(id, _)| id.clone())
                        .collect();
                    actions.push(Action::Revert { devices });
                    self.state = RolloutState::Reverted { reason };
                } else {
                    self.state = RolloutState::Paused { reason };
                }
                return actions;
            }
            let pending = self
                .devices
                .values()
                .filter(|d| d.status == DeviceStatus::Pending);
            let complete = size > 0
                && done == size
                && if last {
                    pending.count() == 0
                } else {
                    // Filled as far as the online devices allow; later waves catch up.
                    assigned >= self.targets[w] || !pending.into_iter().any(|d| d.online)
                };
            if !complete {
                return actions;
            }
            actions.push(Action::WaveCompleted { index: w });
            if last {
                self.state = RolloutState::Completed;
                actions.push(Action::Complete);
                return actions;
            }
            self.waves.push(Wave {
                started_at: now,
                forgiven: 0,
            });
            actions.push(Action::StartWave { index: w + 1 });
        }
    }
}

#[cfg(test)]
#[path = "waves_tests.rs"]
mod tests;
