//! Wave specs, failure thresholds and the rollout state machine (see the [module
//! overview](super)).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use ferry_protocol::report::Phase;
use serde::{Deserialize, Serialize};

use super::selector::Selector;

/// One entry of a wave spec: a cumulative target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WaveTarget {
    /// This many devices in total (>= 1).
    Count(usize),
    /// This percentage (1..=100) of the matched fleet in total; `all` is `100%`.
    Percent(u8),
}

/// Cumulative wave targets such as `1,10%,50%,100%`; serializes as that string.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WaveSpec {
    targets: Vec<WaveTarget>,
}

/// At most this many failed devices per wave: an absolute count or a percentage of the wave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum FailureThreshold {
    Count(usize),
    /// 0..=100.
    Percent(u8),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WaveError {
    #[error("empty wave list: give cumulative targets such as `1,10%,50%,100%`")]
    Empty,
    #[error("wave {index} is empty: targets are separated by single commas")]
    EmptyEntry { index: usize },
    #[error("wave {index} (`{entry}`): expected a device count (>= 1), a percentage (1% to 100%) or `all`")]
    BadEntry { index: usize, entry: String },
    #[error("wave {index} (`{entry}`) is below an earlier wave (`{earlier}`): targets are cumulative and must not decrease")]
    Decreasing {
        index: usize,
        entry: String,
        earlier: String,
    },
    #[error("the last wave is `{last}`: it must be `100%` (or `all`) so that the rollout reaches every matched device")]
    NotComplete { last: String },
    #[error("bad failure threshold `{0}`: expected a device count (e.g. `1`) or a percentage of the wave (`0%` to `100%`)")]
    BadThreshold(String),
}

impl fmt::Display for WaveTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaveTarget::Count(n) => write!(f, "{n}"),
            WaveTarget::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// `N` or `N%` with N a plain decimal number (no sign).
fn parse_amount(s: &str) -> Option<(usize, bool)> {
    let (digits, percent) = match s.strip_suffix('%') {
        Some(d) => (d, true),
        None => (s, false),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((digits.parse().ok()?, percent))
}

impl WaveSpec {
    pub fn targets(&self) -> &[WaveTarget] {
        &self.targets
    }

    pub fn parse(s: &str) -> Result<WaveSpec, WaveError> {
        s.parse()
    }
}

impl FromStr for WaveSpec {
    type Err = WaveError;

    /// Entries are 1-based in error messages.
    fn from_str(s: &str) -> Result<WaveSpec, WaveError> {
        if s.trim().is_empty() {
            return Err(WaveError::Empty);
        }
        let mut targets: Vec<WaveTarget> = Vec::new();
        for (i, raw) in s.split(',').enumerate() {
            let index = i + 1;
            let entry = raw.trim();
            if entry.is_empty() {
                return Err(WaveError::EmptyEntry { index });
            }
            let bad = || WaveError::BadEntry {
                index,
                entry: entry.to_string(),
            };
            let t = if entry == "all" {
                WaveTarget::Percent(100)
            } else {
                match parse_amount(entry).ok_or_else(bad)? {
                    (n @ 1..=100, true) => WaveTarget::Percent(n as u8),
                    (n @ 1.., false) => WaveTarget::Count(n),
                    _ => return Err(bad()),
                }
            };
            // Counts and percentages only compare once the fleet size is known; `plan` keeps the
            // mixed case monotonic.
            let earlier = targets.iter().find(|e| match (e, &t) {
                (WaveTarget::Count(a), WaveTarget::Count(b)) => a > b,
                (WaveTarget::Percent(a), WaveTarget::Percent(b)) => a > b,
                _ => false,
            });
            if let Some(e) = earlier {
                return Err(WaveError::Decreasing {
                    index,
                    entry: entry.to_string(),
                    earlier: e.to_string(),
                });
            }
            targets.push(t);
        }
        match targets.last() {
            Some(WaveTarget::Percent(100)) => Ok(WaveSpec { targets }),
            _ => Err(WaveError::NotComplete {
                last: s.rsplit(',').next().unwrap_or_default().trim().to_string(),
            }),
        }
    }
}

impl fmt::Display for WaveSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.targets.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{t}")?;
        }
        Ok(())
    }
}

impl From<WaveSpec> for String {
    fn from(s: WaveSpec) -> String {
        s.to_string()
    }
}

impl TryFrom<String> for WaveSpec {
    type Error = WaveError;
    fn try_from(s: String) -> Result<WaveSpec, WaveError> {
        s.parse()
    }
}

/// Cumulative device counts per wave for a fleet of `fleet_size` devices.
///
/// Percentages round up (10% of 5 devices is 1 device, so the first wave always has one);
/// counts are capped at the fleet size; a wave that would add no device to the previous ones
/// (`1,10%` on 5 devices, `50,100%` on 10) is dropped, so the result is strictly increasing,
/// every wave has at least one device, and it ends at `fleet_size`. Empty for an empty fleet.
pub fn plan(spec: &WaveSpec, fleet_size: usize) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    if fleet_size == 0 {
        return out;
    }
    for t in &spec.targets {
        let n = match *t {
            WaveTarget::Count(n) => n,
            WaveTarget::Percent(p) => ((fleet_size as u128 * p as u128).div_ceil(100)) as usize,
        };
        let n = n.clamp(1, fleet_size);
        if out.last().is_none_or(|&prev| n > prev) {
            out.push(n);
        }
    }
    out
}

impl FailureThreshold {
    /// Whether `failed` failures in a wave of `wave_size` devices pass the threshold: strictly
    /// more than the count (`1` tolerates one failure, `0` none), or strictly more than the
    /// percentage of the wave (`5%` of 40 devices tolerates 2, of 10 devices none: 1 > 0.5).
    pub fn exceeded(&self, failed: usize, wave_size: usize) -> bool {
        match *self {
            FailureThreshold::Count(n) => failed > n,
            FailureThreshold::Percent(p) => failed as u128 * 100 > p as u128 * wave_size as u128,
        }
    }
}

impl FromStr for FailureThreshold {
    type Err = WaveError;
    fn from_str(s: &str) -> Result<FailureThreshold, WaveError> {
        match parse_amount(s.trim()) {
            Some((n @ 0..=100, true)) => Ok(FailureThreshold::Percent(n as u8)),
            Some((n, false)) => Ok(FailureThreshold::Count(n)),
            _ => Err(WaveError::BadThreshold(s.to_string())),
        }
    }
}

impl fmt::Display for FailureThreshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureThreshold::Count(n) => write!(f, "{n}"),
            FailureThreshold::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl From<FailureThreshold> for String {
    fn from(t: FailureThreshold) -> String {
        t.to_string()
    }
}

impl TryFrom<String> for FailureThreshold {
    type Error = WaveError;
    fn try_from(s: String) -> Result<FailureThreshold, WaveError> {
        s.parse()
    }
}

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
    /// How long a notified device may take to report a result, counting only time online.
    pub device_timeout: Duration,
    pub max_failures: FailureThreshold,
    pub on_failure: OnFailure,
}

/// A device the selector may match.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    pub id: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub online: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum DeviceStatus {
    /// Not yet in a wave (offline, or waiting for a later wave).
    Pending,
    /// Told to update at `at`; `sequence` is the desired-state sequence once the caller recorded
    /// it with [`Rollout::notified`].
    Notified {
        sequence: Option<u64>,
        at: DateTime<Utc>,
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
    /// An update phase for a desired-state sequence. Only `committed` (success, starts the soak),
    /// `rolled_back`, `failed` and `rejected` (failure) change anything.
    Phase {
        sequence: u64,
        phase: Phase,
        /// The device's own explanation of a failure, when it gave one.
        reason: Option<String>,
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

/// Per-wave progress, for status displays.
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
}

/// A rollout's progress: per wave, per state, and failure reasons grouped.
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
    TimeDelta::from_std(d)
        .ok()
        .and_then(|d| since.checked_add_signed(d))
        .is_some_and(|end| now >= end)
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
                        Phase::RolledBack | Phase::Failed | Phase::Rejected => {
                            let name = serde_json::to_value(phase)
                                .ok()
                                .and_then(|v| v.as_str().map(str::to_string))
                                .unwrap_or_else(|| format!("{phase:?}"));
                            d.status = DeviceStatus::Failed {
                                reason: match reason {
                                    Some(r) => format!("{name}: {r}"),
                                    None => format!("reported {name}"),
                                },
                            };
                        }
                        _ => {}
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
        for (id, d) in &self.devices {
            let w = d.wave.and_then(|w| s.waves.get_mut(w));
            let bump = |f: fn(&mut WaveSummary) -> &mut usize| {
                if let Some(w) = w {
                    w.devices += 1;
                    *f(w) += 1;
                }
            };
            match &d.status {
                DeviceStatus::Pending => {
                    s.pending += 1;
                    s.pending_offline += usize::from(!d.online);
                }
                DeviceStatus::Notified { .. } => {
                    s.notified += 1;
                    bump(|w| &mut w.notified);
                }
                DeviceStatus::Committed { .. } => {
                    s.soaking += 1;
                    bump(|w| &mut w.soaking);
                }
                DeviceStatus::Succeeded => {
                    s.succeeded += 1;
                    bump(|w| &mut w.succeeded);
                }
                DeviceStatus::Failed { reason } => {
                    s.failed += 1;
                    bump(|w| &mut w.failed);
                    reasons.entry(reason).or_default().push(id.clone());
                }
            }
        }
        s.failures = reasons
            .into_iter()
            .map(|(r, ids)| (r.to_string(), ids))
            .collect();
        s.failures.sort_by_key(|f| std::cmp::Reverse(f.1.len()));
        s
    }

    pub fn is_terminal(&self) -> bool {
        self.state.is_terminal()
    }

    /// The earliest moment [`Rollout::on_tick`] would change something by time alone: a soak
    /// that ends or a device timeout that runs out (online devices only, as in `advance`).
    /// The controller wakes up then instead of waiting for its next tick.
    pub fn next_deadline(&self) -> Option<DateTime<Utc>> {
        if self.is_terminal() {
            return None;
        }
        let end = |since: DateTime<Utc>, d: Duration| {
            TimeDelta::from_std(d)
                .ok()
                .and_then(|d| since.checked_add_signed(d))
        };
        let (timeout, soak) = (self.config.device_timeout, self.config.soak);
        self.devices
            .values()
            .filter(|d| d.online)
            .filter_map(|d| match d.status {
                DeviceStatus::Notified { at, .. } => {
                    end(d.online_since.map_or(at, |o| o.max(at)), timeout)
                }
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
        // Timeouts (online time only) and soaks, also while paused.
        let (timeout, soak) = (self.config.device_timeout, self.config.soak);
        for d in self.devices.values_mut().filter(|d| d.online) {
            match d.status {
                DeviceStatus::Notified { at, .. } => {
                    let since = d.online_since.map_or(at, |o| o.max(at));
                    if at_least(since, timeout, now) {
                        d.status = DeviceStatus::Failed {
                            reason: format!("no result within {}s online", timeout.as_secs_f64()),
                        };
                    }
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
                    d.status = DeviceStatus::Notified {
                        sequence: None,
                        at: now,
                    };
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
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
    }

    fn spec(s: &str) -> WaveSpec {
        s.parse().unwrap()
    }

    #[test]
    fn wave_spec_parses_and_displays() {
        let s = spec("1, 10%,50%,all");
        assert_eq!(
            s.targets(),
            &[
                WaveTarget::Count(1),
                WaveTarget::Percent(10),
                WaveTarget::Percent(50),
                WaveTarget::Percent(100)
            ]
        );
        assert_eq!(s.to_string(), "1,10%,50%,100%");
        assert_eq!(spec("100%").to_string(), "100%");
        assert_eq!(spec("5,5,100%").targets().len(), 3);
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(j, r#""1,10%,50%,100%""#);
        assert_eq!(serde_json::from_str::<WaveSpec>(&j).unwrap(), s);
    }

    #[test]
    fn wave_spec_errors() {
        let err = |s: &str| s.parse::<WaveSpec>().unwrap_err();
        assert_eq!(err(""), WaveError::Empty);
        assert_eq!(err("1,,100%"), WaveError::EmptyEntry { index: 2 });
        assert!(matches!(
            err("0,100%"),
            WaveError::BadEntry { index: 1, .. }
        ));
        assert!(matches!(err("0%,100%"), WaveError::BadEntry { .. }));
        assert!(matches!(err("101%"), WaveError::BadEntry { .. }));
        assert!(matches!(err("-1,100%"), WaveError::BadEntry { .. }));
        assert!(matches!(err("1.5%,100%"), WaveError::BadEntry { .. }));
        assert!(matches!(err("x,100%"), WaveError::BadEntry { .. }));
        assert!(matches!(
            err("10,5,100%"),
            WaveError::Decreasing { index: 2, .. }
        ));
        assert!(matches!(err("50%,10%,100%"), WaveError::Decreasing { .. }));
        let e = err("1,10%,50%");
        assert_eq!(e, WaveError::NotComplete { last: "50%".into() });
        assert!(e.to_string().contains("must be `100%` (or `all`)"));
        assert!(matches!(err("100%,5"), WaveError::NotComplete { .. }));
    }

    #[test]
    fn plan_cumulative_counts() {
        let s = spec("1,10%,50%,100%");
        assert_eq!(plan(&s, 0), Vec::<usize>::new());
        assert_eq!(plan(&s, 1), vec![1]);
        assert_eq!(plan(&s, 2), vec![1, 2]);
        assert_eq!(plan(&s, 5), vec![1, 3, 5]);
        assert_eq!(plan(&s, 100), vec![1, 10, 50, 100]);
        assert_eq!(plan(&s, 101), vec![1, 11, 51, 101]);
        assert_eq!(plan(&spec("50,100%"), 10), vec![10]);
        // mixed kinds stay monotonic: 10% of 1000 = 100 covers the 20
        assert_eq!(plan(&spec("10%,20,100%"), 1000), vec![100, 1000]);
        assert_eq!(plan(&spec("10%,20,100%"), 100), vec![10, 20, 100]);
    }

    #[test]
    fn thresholds() {
        let c: FailureThreshold = "1".parse().unwrap();
        assert!(!c.exceeded(1, 10));
        assert!(c.exceeded(2, 10));
        let z: FailureThreshold = "0".parse().unwrap();
        assert!(!z.exceeded(0, 10));
        assert!(z.exceeded(1, 10));
        let p: FailureThreshold = "5%".parse().unwrap();
        assert!(!p.exceeded(2, 40));
        assert!(p.exceeded(3, 40));
        assert!(p.exceeded(1, 10));
        assert!(!p.exceeded(1, 20));
        assert_eq!(p.to_string(), "5%");
        assert_eq!(serde_json::to_string(&p).unwrap(), r#""5%""#);
        for bad in ["", "x", "-1", "101%", "5 %", "%"] {
            assert!(bad.parse::<FailureThreshold>().is_err(), "{bad}");
        }
    }

    fn config(on_failure: OnFailure, max: &str) -> RolloutConfig {
        RolloutConfig {
            soak: Duration::from_secs(60),
            device_timeout: Duration::from_secs(300),
            max_failures: max.parse().unwrap(),
            on_failure,
        }
    }

    fn fleet(n: usize) -> Vec<(String, BTreeMap<String, String>)> {
        (0..n)
            .map(|i| {
                let labels = [("group".to_string(), "beta".to_string())].into();
                (format!("dev-{i:03}"), labels)
            })
            .collect()
    }

    fn rollout(n: usize, waves: &str, cfg: RolloutConfig) -> Rollout {
        let f = fleet(n);
        let cands = f.iter().map(|(id, l)| Candidate {
            id,
            labels: l,
            online: true,
        });
        Rollout::new("group=beta".parse().unwrap(), spec(waves), cfg, cands, t(0)).unwrap()
    }

    fn notify(d: &str) -> Action {
        Action::Notify { device: d.into() }
    }

    fn phase(p: Phase) -> DeviceReport {
        DeviceReport::Phase {
            sequence: 7,
            phase: p,
            reason: None,
        }
    }

    /// Record sequence 7 for the device and let it commit at `at`.
    fn commit(r: &mut Rollout, d: &str, at: i64) -> Vec<Action> {
        assert!(r.notified(d, 7));
        r.on_report(d, phase(Phase::Committed), t(at))
    }

    #[test]
    fn new_requires_a_match() {
        let none = BTreeMap::new();
        let e = Rollout::new(
            "group=beta".parse().unwrap(),
            spec("100%"),
            config(OnFailure::Pause, "0"),
            [Candidate {
                id: "x",
                labels: &none,
                online: true,
            }],
            t(0),
        )
        .unwrap_err();
        assert_eq!(e, RolloutError::EmptyFleet("group=beta".into()));
    }

    #[test]
    fn happy_path_through_all_waves() {
        let mut r = rollout(4, "1,50%,100%", config(OnFailure::Pause, "0"));
        assert_eq!(r.targets(), &[1, 2, 4]);
        assert_eq!(
            r.on_tick(t(0)),
            vec![Action::StartWave { index: 0 }, notify("dev-000")]
        );
        assert_eq!(r.on_tick(t(1)), vec![]);
        assert_eq!(commit(&mut r, "dev-000", 10), vec![]);
        // soak not over yet
        assert_eq!(r.on_tick(t(69)), vec![]);
        assert_eq!(
            r.on_tick(t(70)),
            vec![
                Action::WaveCompleted { index: 0 },
                Action::StartWave { index: 1 },
                notify("dev-001")
            ]
        );
        assert_eq!(r.device("dev-000").unwrap().status, DeviceStatus::Succeeded);
        commit(&mut r, "dev-001", 80);
        assert_eq!(
            r.on_tick(t(140)),
            vec![
                Action::WaveCompleted { index: 1 },
                Action::StartWave { index: 2 },
                notify("dev-002"),
                notify("dev-003")
            ]
        );
        commit(&mut r, "dev-002", 150);
        commit(&mut r, "dev-003", 150);
        assert_eq!(
            r.on_tick(t(210)),
            vec![Action::WaveCompleted { index: 2 }, Action::Complete]
        );
        assert_eq!(r.state(), &RolloutState::Completed);
        assert_eq!(r.on_tick(t(1000)), vec![]);
    }

    #[test]
    fn reports_for_other_sequences_are_ignored() {
        let mut r = rollout(1, "100%", config(OnFailure::Pause, "0"));
        r.on_tick(t(0));
        // no sequence recorded yet
        r.on_report("dev-000", phase(Phase::Committed), t(1));
        assert!(matches!(
            r.device("dev-000").unwrap().status,
            DeviceStatus::Notified { sequence: None, .. }
        ));
        r.notified("dev-000", 8);
        r.on_report("dev-000", phase(Phase::Failed), t(2));
        assert!(matches!(
            r.device("dev-000").unwrap().status,
            DeviceStatus::Notified {
                sequence: Some(8),
                ..
            }
        ));
        // progress phases change nothing; unknown devices are ignored
        let p = DeviceReport::Phase {
            sequence: 8,
            phase: Phase::Downloading,
            reason: None,
        };
        assert_eq!(r.on_report("dev-000", p.clone(), t(3)), vec![]);
        assert_eq!(r.on_report("nope", p, t(3)), vec![]);
        assert!(!r.notified("nope", 1));
    }

    #[test]
    fn each_failure_phase_fails_the_device() {
        for (p, name) in [
            (Phase::RolledBack, "rolled_back"),
            (Phase::Failed, "failed"),
            (Phase::Rejected, "rejected"),
        ] {
            let mut r = rollout(2, "100%", config(OnFailure::Pause, "1"));
            r.on_tick(t(0));
            r.notified("dev-000", 7);
            assert_eq!(r.on_report("dev-000", phase(p), t(1)), vec![]);
            assert_eq!(
                r.device("dev-000").unwrap().status,
                DeviceStatus::Failed {
                    reason: format!("reported {name}")
                }
            );
        }
    }

    #[test]
    fn rolled_back_or_unhealthy_while_soaking_fails() {
        let mut r = rollout(2, "100%", config(OnFailure::Pause, "1"));
        r.on_tick(t(0));
        commit(&mut r, "dev-000", 1);
        commit(&mut r, "dev-001", 1);
        r.on_report("dev-000", phase(Phase::RolledBack), t(2));
        assert!(matches!(
            r.device("dev-000").unwrap().status,
            DeviceStatus::Failed { .. }
        ));
        let a = r.on_report(
            "dev-001",
            DeviceReport::Unhealthy {
                reason: "probe".into(),
            },
            t(3),
        );
        assert_eq!(
            r.device("dev-001").unwrap().status,
            DeviceStatus::Failed {
                reason: "unhealthy while soaking: probe".into()
            }
        );
        assert!(matches!(a.as_slice(), [Action::Pause { .. }]));
    }

    #[test]
    fn timeout_counts_only_online_time() {
        let mut r = rollout(1, "100%", config(OnFailure::Pause, "0"));
        r.on_tick(t(0));
        r.on_report("dev-000", DeviceReport::Offline, t(100));
        // offline: no timeout however long
        assert_eq!(r.on_tick(t(10_000)), vec![]);
        r.on_report("dev-000", DeviceReport::Online, t(10_000));
        // a fresh window from coming back online
        assert_eq!(r.on_tick(t(10_299)), vec![]);
        let a = r.on_tick(t(10_300));
        assert!(matches!(
            r.device("dev-000").unwrap().status,
            DeviceStatus::Failed { ref reason } if reason.contains("no result within 300s")
        ));
        assert!(matches!(a.as_slice(), [Action::Pause { .. }]));
    }

    #[test]
    fn next_deadline_is_the_first_soak_end_or_timeout() {
        let mut r = rollout(3, "1,100%", config(OnFailure::Pause, "0"));
        assert_eq!(r.next_deadline(), None, "nothing started");
        r.on_tick(t(0));
        // dev-000 notified at 0: its timeout (300 s) is the only deadline
        assert_eq!(r.next_deadline(), Some(t(300)));
        commit(&mut r, "dev-000", 10);
        assert_eq!(r.next_deadline(), Some(t(70)), "the soak ends at 10 + 60");
        r.on_tick(t(70));
        // wave 2 notified dev-001 and dev-002 at 70; dev-002 goes offline (its timeout counts
        // online time only, so it has no deadline) and dev-001 commits at 75
        r.on_report("dev-002", DeviceReport::Offline, t(71));
        commit(&mut r, "dev-001", 75);
        assert_eq!(r.next_deadline(), Some(t(135)));
        r.on_tick(t(135));
        assert_eq!(r.next_deadline(), None, "only the offline device is left");
        r.on_report("dev-002", DeviceReport::Online, t(200));
        assert_eq!(r.next_deadline(), Some(t(500)), "online since 200 + 300");
        commit(&mut r, "dev-002", 210);
        r.on_tick(t(270));
        assert!(r.is_terminal());
        assert_eq!(r.next_deadline(), None);
    }

    #[test]
    fn soak_waits_for_the_device_to_be_online() {
        let mut r = rollout(1, "100%", config(OnFailure::Pause, "0"));
        r.on_tick(t(0));
        commit(&mut r, "dev-000", 0);
        r.on_report("dev-000", DeviceReport::Offline, t(30));
        assert_eq!(r.on_tick(t(100)), vec![]);
        assert_eq!(
            r.on_report("dev-000", DeviceReport::Online, t(200)),
            vec![Action::WaveCompleted { index: 0 }, Action::Complete]
        );
    }

    #[test]
    fn threshold_pauses_and_resume_forgives() {
        let mut r = rollout(10, "5,100%", config(OnFailure::Pause, "1"));
        let a = r.on_tick(t(0));
        assert_eq!(a.len(), 6);
        r.notified("dev-000", 7);
        r.notified("dev-001", 7);
        r.notified("dev-002", 7);
        // one failure is tolerated
        assert_eq!(r.on_report("dev-000", phase(Phase::Failed), t(1)), vec![]);
        let a = r.on_report("dev-001", phase(Phase::Failed), t(2));
        let reason = "wave 1: 2 of 5 devices failed (max failures 1)".to_string();
        assert_eq!(
            a,
            vec![Action::Pause {
                reason: reason.clone()
            }]
        );
        assert_eq!(r.state(), &RolloutState::Paused { reason });
        // while paused: soaks and timeouts go on, nothing new starts
        commit(&mut r, "dev-002", 3);
        assert_eq!(r.on_tick(t(1000)), vec![]);
        assert_eq!(r.device("dev-002").unwrap().status, DeviceStatus::Succeeded);
        assert!(r
            .on_report("dev-003", DeviceReport::Online, t(1000))
            .is_empty());
        // resume: the two failures are acknowledged; the rest of wave 0 timed out meanwhile
        let a = r.resume(t(1001)).unwrap();
        assert_eq!(
            a[..3],
            [
                Action::WaveCompleted { index: 0 },
                Action::StartWave { index: 1 },
                notify("dev-005")
            ]
        );
        assert_eq!(a.len(), 7);
        assert_eq!(r.state(), &RolloutState::Running);
        assert_eq!(
            r.resume(t(1002)).unwrap_err(),
            RolloutError::NotPaused("running".into())
        );
        // new failures in wave 1 count from zero again
        r.notified("dev-005", 7);
        assert_eq!(
            r.on_report("dev-005", phase(Phase::Failed), t(1003)),
            vec![]
        );
    }

    #[test]
    fn resume_continues_with_the_next_wave() {
        let mut r = rollout(3, "1,100%", config(OnFailure::Pause, "0"));
        r.on_tick(t(0));
        r.notified("dev-000", 7);
        let a = r.on_report("dev-000", phase(Phase::Rejected), t(1));
        assert!(matches!(a.as_slice(), [Action::Pause { .. }]));
        assert_eq!(
            r.resume(t(2)).unwrap(),
            vec![
                Action::WaveCompleted { index: 0 },
                Action::StartWave { index: 1 },
                notify("dev-001"),
                notify("dev-002")
            ]
        );
        assert_eq!(r.state(), &RolloutState::Running);
    }

    #[test]
    fn revert_sends_notified_devices_back() {
        let mut r = rollout(4, "2,100%", config(OnFailure::Revert, "0%"));
        r.on_tick(t(0));
        commit(&mut r, "dev-000", 1);
        r.notified("dev-001", 7);
        let a = r.on_report("dev-001", phase(Phase::Failed), t(2));
        assert_eq!(
            a,
            vec![
                Action::Pause {
                    reason: "wave 1: 1 of 2 devices failed (max failures 0%)".into()
                },
                Action::Revert {
                    devices: vec!["dev-000".into(), "dev-001".into()]
                }
            ]
        );
        assert!(matches!(r.state(), RolloutState::Reverted { .. }));
        assert!(r.resume(t(3)).is_err());
        assert_eq!(r.on_tick(t(1000)), vec![]);
    }

    #[test]
    fn offline_devices_stay_pending_and_catch_up() {
        let f = fleet(3);
        let cands = f.iter().enumerate().map(|(i, (id, l))| Candidate {
            id,
            labels: l,
            online: i != 0,
        });
        let cfg = config(OnFailure::Pause, "0");
        let mut r = Rollout::new(Selector::all(), spec("1,100%"), cfg, cands, t(0)).unwrap();
        // dev-000 is offline: wave 0 takes dev-001
        assert_eq!(
            r.on_tick(t(0)),
            vec![Action::StartWave { index: 0 }, notify("dev-001")]
        );
        commit(&mut r, "dev-001", 0);
        assert_eq!(
            r.on_tick(t(60)),
            vec![
                Action::WaveCompleted { index: 0 },
                Action::StartWave { index: 1 },
                notify("dev-002")
            ]
        );
        commit(&mut r, "dev-002", 60);
        // the last wave waits for the offline device
        assert_eq!(r.on_tick(t(500)), vec![]);
        assert_eq!(r.device("dev-000").unwrap().status, DeviceStatus::Pending);
        assert_eq!(
            r.on_report("dev-000", DeviceReport::Online, t(600)),
            vec![notify("dev-000")]
        );
        assert_eq!(r.device("dev-000").unwrap().wave, Some(1));
        commit(&mut r, "dev-000", 600);
        assert_eq!(
            r.on_tick(t(660)),
            vec![Action::WaveCompleted { index: 1 }, Action::Complete]
        );
    }

    #[test]
    fn an_empty_wave_waits_for_a_device() {
        let f = fleet(1);
        let cands = f.iter().map(|(id, l)| Candidate {
            id,
            labels: l,
            online: false,
        });
        let cfg = config(OnFailure::Pause, "0");
        let mut r = Rollout::new(Selector::all(), spec("100%"), cfg, cands, t(0)).unwrap();
        assert_eq!(r.on_tick(t(0)), vec![Action::StartWave { index: 0 }]);
        assert_eq!(r.on_tick(t(100)), vec![]);
        assert_eq!(r.state(), &RolloutState::Running);
    }

    #[test]
    fn new_matching_devices_join_the_current_or_a_later_wave() {
        let mut r = rollout(2, "1,100%", config(OnFailure::Pause, "0"));
        r.on_tick(t(0));
        let beta: BTreeMap<String, String> = [("group".into(), "beta".into())].into();
        let alpha: BTreeMap<String, String> = [("group".into(), "alpha".into())].into();
        let cand = |id, labels| Candidate {
            id,
            labels,
            online: true,
        };
        // wave 0 is full (1 device): the newcomer waits
        assert_eq!(r.offer(cand("new-1", &beta), t(1)), vec![]);
        assert_eq!(r.offer(cand("other", &alpha), t(1)), vec![]);
        assert!(r.device("other").is_none());
        commit(&mut r, "dev-000", 1);
        assert_eq!(
            r.on_tick(t(61)),
            vec![
                Action::WaveCompleted { index: 0 },
                Action::StartWave { index: 1 },
                notify("dev-001"),
                notify("new-1")
            ]
        );
        // joins the running last wave right away; offering it again does nothing
        assert_eq!(r.offer(cand("new-2", &beta), t(62)), vec![notify("new-2")]);
        assert_eq!(r.offer(cand("new-2", &beta), t(63)), vec![]);
    }

    #[test]
    fn serde_roundtrip_mid_wave() {
        let mut r = rollout(3, "1,100%", config(OnFailure::Pause, "0"));
        r.on_tick(t(0));
        commit(&mut r, "dev-000", 5);
        let j = serde_json::to_string(&r).unwrap();
        let mut back: Rollout = serde_json::from_str(&j).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.on_tick(t(65)), r.on_tick(t(65)));
        assert_eq!(back, r);
    }

    // --- properties ---------------------------------------------------------------------------

    #[derive(Clone, Debug)]
    enum Op {
        Tick(i64),
        Online(usize),
        Offline(usize),
        Notified(usize),
        Phase(usize, u8),
        Unhealthy(usize),
        Offer(usize),
        Resume,
    }

    const DEVICES: usize = 8;

    fn op() -> impl Strategy<Value = Op> {
        let d = 0..DEVICES;
        prop_oneof![
            3 => (1i64..200).prop_map(Op::Tick),
            1 => (d.clone()).prop_map(Op::Online),
            1 => (d.clone()).prop_map(Op::Offline),
            3 => (d.clone()).prop_map(Op::Notified),
            4 => (d.clone(), 0u8..5).prop_map(|(d, p)| Op::Phase(d, p)),
            1 => (d.clone()).prop_map(Op::Unhealthy),
            1 => (d.clone()).prop_map(Op::Offer),
            1 => Just(Op::Resume),
        ]
    }

    fn id(i: usize) -> String {
        format!("dev-{i:03}")
    }

    /// Runs one op; `now` advances. Returns the actions and whether it was a successful resume.
    fn apply(r: &mut Rollout, op: &Op, now: &mut i64) -> (Vec<Action>, bool) {
        let labels: BTreeMap<String, String> = [("group".into(), "beta".into())].into();
        *now += 1;
        match *op {
            Op::Tick(s) => {
                *now += s;
                (r.on_tick(t(*now)), false)
            }
            Op::Online(d) => (r.on_report(&id(d), DeviceReport::Online, t(*now)), false),
            Op::Offline(d) => (r.on_report(&id(d), DeviceReport::Offline, t(*now)), false),
            Op::Notified(d) => {
                r.notified(&id(d), 7);
                (Vec::new(), false)
            }
            Op::Phase(d, p) => {
                let phase = [
                    Phase::Committed,
                    Phase::Committed,
                    Phase::RolledBack,
                    Phase::Failed,
                    Phase::Downloading,
                ][p as usize];
                let rep = DeviceReport::Phase {
                    sequence: 7,
                    phase,
                    reason: None,
                };
                (r.on_report(&id(d), rep, t(*now)), false)
            }
            Op::Unhealthy(d) => {
                let rep = DeviceReport::Unhealthy { reason: "x".into() };
                (r.on_report(&id(d), rep, t(*now)), false)
            }
            Op::Offer(d) => {
                let c = Candidate {
                    id: &format!("new-{d}"),
                    labels: &labels,
                    online: d % 2 == 0,
                };
                (r.offer(c, t(*now)), false)
            }
            Op::Resume => match r.resume(t(*now)) {
                Ok(a) => (a, true),
                Err(_) => (Vec::new(), false),
            },
        }
    }

    fn arb_rollout() -> impl Strategy<Value = Rollout> {
        (
            1usize..DEVICES,
            prop_oneof![Just("1,10%,50%,100%"), Just("100%"), Just("2,3,all")],
            prop_oneof![Just("0"), Just("1"), Just("30%")],
            any::<bool>(),
            proptest::collection::vec(any::<bool>(), DEVICES),
        )
            .prop_map(|(n, waves, max, revert, online)| {
                let f = fleet(n);
                let cands = f.iter().enumerate().map(|(i, (id, l))| Candidate {
                    id,
                    labels: l,
                    online: online[i],
                });
                let mut cfg = config(
                    if revert {
                        OnFailure::Revert
                    } else {
                        OnFailure::Pause
                    },
                    max,
                );
                cfg.soak = Duration::from_secs(50);
                cfg.device_timeout = Duration::from_secs(150);
                Rollout::new(Selector::all(), spec(waves), cfg, cands, t(0)).unwrap()
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn state_machine_invariants(
            mut r in arb_rollout(),
            ops in proptest::collection::vec(op(), 0..80),
        ) {
            let mut now = 0;
            let mut notified = std::collections::BTreeSet::new();
            let mut next_wave = 0;
            let mut paused = false;
            let mut actions = r.on_tick(t(0));
            let mut pauses = 0;
            for o in ops.iter().map(Some).chain([None]) {
                for a in &actions {
                    match a {
                        // (a) never notified twice
                        Action::Notify { device } => {
                            prop_assert!(!paused, "Notify while paused: {:?}", actions);
                            prop_assert!(notified.insert(device.clone()), "{} twice", device);
                        }
                        // (b) waves start in order, never repeat
                        Action::StartWave { index } => {
                            prop_assert!(!paused);
                            prop_assert_eq!(*index, next_wave);
                            next_wave += 1;
                        }
                        // (c) nothing after Pause until resume
                        Action::Pause { .. } => {
                            paused = true;
                            pauses += 1;
                        }
                        _ => {}
                    }
                }
                let Some(o) = o else { break };
                let (a, resumed) = apply(&mut r, o, &mut now);
                if resumed {
                    prop_assert!(paused);
                    paused = false;
                }
                actions = a;
            }
            prop_assert!(next_wave <= r.targets().len());
            prop_assert!(pauses <= 1 + ops.iter().filter(|o| matches!(o, Op::Resume)).count());
        }

        /// (e) `next_deadline` is exact: ticking just before it changes no device's status
        /// more than ticking now does, ticking at it changes one.
        #[test]
        fn next_deadline_is_when_time_changes_something(
            mut r in arb_rollout(),
            ops in proptest::collection::vec(op(), 0..60),
        ) {
            let kinds = |r: &Rollout| -> Vec<std::mem::Discriminant<DeviceStatus>> {
                r.devices().values().map(|d| std::mem::discriminant(&d.status)).collect()
            };
            let mut now = 0;
            r.on_tick(t(0));
            for o in &ops {
                apply(&mut r, o, &mut now);
                let Some(dl) = r.next_deadline() else { continue };
                prop_assert!(!r.is_terminal());
                let mut at_now = r.clone();
                at_now.on_tick(t(now));
                if dl <= t(now) {
                    continue;
                }
                let mut before = r.clone();
                before.on_tick(dl - TimeDelta::milliseconds(1));
                prop_assert_eq!(kinds(&before), kinds(&at_now));
                // At the deadline: the device whose soak or timeout ends there changes.
                let mut at = r.clone();
                at.on_tick(dl);
                prop_assert_ne!(kinds(&at), kinds(&r));
            }
        }

        /// (d) a rollout restored from JSON behaves exactly like the original.
        #[test]
        fn serde_roundtrip_keeps_behaviour(
            mut r in arb_rollout(),
            before in proptest::collection::vec(op(), 0..40),
            after in proptest::collection::vec(op(), 0..40),
        ) {
            let mut now = 0;
            r.on_tick(t(0));
            for o in &before {
                apply(&mut r, o, &mut now);
            }
            let mut back: Rollout = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
            prop_assert_eq!(&back, &r);
            let mut now2 = now;
            for o in &after {
                let a = apply(&mut r, o, &mut now);
                let b = apply(&mut back, o, &mut now2);
                prop_assert_eq!(a, b);
            }
            prop_assert_eq!(back, r);
        }

        #[test]
        fn plan_is_strictly_increasing_and_ends_at_the_fleet(
            entries in proptest::collection::vec(prop_oneof![
                (1usize..50).prop_map(WaveTarget::Count),
                (1u8..=100).prop_map(WaveTarget::Percent),
            ], 0..5),
            fleet in 0usize..500,
        ) {
            let mut targets = entries;
            targets.push(WaveTarget::Percent(100));
            let p = plan(&WaveSpec { targets: targets.clone() }, fleet);
            prop_assert!(p.len() <= targets.len());
            prop_assert!(p.windows(2).all(|w| w[0] < w[1]));
            if fleet == 0 {
                prop_assert!(p.is_empty());
            } else {
                prop_assert!(p[0] >= 1);
                prop_assert_eq!(*p.last().unwrap(), fleet);
            }
        }
    }

    #[test]
    fn operator_pause_resume_and_abort() {
        let mut r = rollout(4, "1,100%", config(OnFailure::Pause, "1"));
        assert_eq!(
            r.on_tick(t(0)),
            vec![Action::StartWave { index: 0 }, notify("dev-000")]
        );
        r.pause("by operator").unwrap();
        assert_eq!(r.state().name(), "paused");
        assert_eq!(
            r.pause("again"),
            Err(RolloutError::NotRunning("paused".into()))
        );
        // results are recorded while paused, but no wave starts
        r.notified("dev-000", 7);
        commit(&mut r, "dev-000", 1);
        assert_eq!(r.on_tick(t(100)), vec![]);
        assert_eq!(r.device("dev-000").unwrap().status, DeviceStatus::Succeeded);
        let a = r.resume(t(101)).unwrap();
        assert_eq!(a[0], Action::WaveCompleted { index: 0 });
        assert_eq!(
            a.iter()
                .filter(|a| matches!(a, Action::Notify { .. }))
                .count(),
            3
        );
        r.abort("enough").unwrap();
        assert_eq!(
            r.state(),
            &RolloutState::Aborted {
                reason: "enough".into()
            }
        );
        assert!(r.state().is_terminal());
        assert_eq!(r.abort("twice"), Err(RolloutError::Ended("aborted".into())));
        assert_eq!(
            r.resume(t(102)),
            Err(RolloutError::NotPaused("aborted".into()))
        );
        assert_eq!(r.on_tick(t(200)), vec![]);
        assert_eq!(
            r.on_report("dev-001", phase(Phase::Committed), t(201)),
            vec![]
        );
    }

    #[test]
    fn failure_reason_from_the_device_and_summary() {
        let mut r = rollout(3, "2,100%", config(OnFailure::Pause, "2"));
        r.on_tick(t(0));
        r.notified("dev-000", 7);
        r.notified("dev-001", 7);
        let rep = DeviceReport::Phase {
            sequence: 7,
            phase: Phase::RolledBack,
            reason: Some("health gate: http 500".into()),
        };
        r.on_report("dev-000", rep, t(1));
        commit(&mut r, "dev-001", 2);
        let s = r.summary();
        assert_eq!((s.devices, s.pending, s.soaking, s.failed), (3, 1, 1, 1));
        assert_eq!(
            s.failures,
            vec![(
                "rolled_back: health gate: http 500".to_string(),
                vec!["dev-000".to_string()]
            )]
        );
        assert_eq!(s.waves.len(), 2);
        assert_eq!(
            s.waves[0],
            WaveSummary {
                index: 0,
                target: 2,
                started: true,
                devices: 2,
                notified: 0,
                soaking: 1,
                succeeded: 0,
                failed: 1
            }
        );
        assert!(!s.waves[1].started);
    }

    #[test]
    fn a_device_that_cannot_be_notified_fails() {
        let mut r = rollout(2, "100%", config(OnFailure::Pause, "1"));
        r.on_tick(t(0));
        assert_eq!(r.fail("dev-000", "no image for linux/s390x", t(1)), vec![]);
        assert_eq!(
            r.device("dev-000").unwrap().status,
            DeviceStatus::Failed {
                reason: "no image for linux/s390x".into()
            }
        );
        // only a notified device can fail this way
        r.notified("dev-001", 7);
        commit(&mut r, "dev-001", 2);
        r.fail("dev-001", "x", t(3));
        assert!(matches!(
            r.device("dev-001").unwrap().status,
            DeviceStatus::Committed { .. }
        ));
    }

    proptest! {
        /// Recording a batch then ticking once ends where reporting one by one does.
        #[test]
        fn prop_batched_reports_match_one_by_one(ops in proptest::collection::vec(op(), 1..40)) {
            let mut a = rollout(6, "1,50%,100%", config(OnFailure::Pause, "2"));
            let mut b = a.clone();
            a.on_tick(t(0));
            b.on_tick(t(0));
            for d in 0..6 {
                a.notified(&id(d), 7);
                b.notified(&id(d), 7);
            }
            let mut now = 1;
            for o in &ops {
                now += 1;
                let (dev, rep) = match *o {
                    Op::Phase(d, p) => (id(d), DeviceReport::Phase {
                        sequence: 7,
                        phase: [Phase::Committed, Phase::RolledBack, Phase::Failed, Phase::Downloading][p as usize % 4],
                        reason: None,
                    }),
                    Op::Unhealthy(d) => (id(d), DeviceReport::Unhealthy { reason: "x".into() }),
                    Op::Offline(d) => (id(d), DeviceReport::Offline),
                    Op::Online(d) => (id(d), DeviceReport::Online),
                    _ => continue,
                };
                a.on_report(&dev, rep.clone(), t(now));
                b.record(&dev, rep, t(now));
            }
            b.on_tick(t(now));
            a.on_tick(t(now));
            prop_assert_eq!(a.summary().failed, b.summary().failed);
            prop_assert_eq!(a.summary().soaking + a.summary().succeeded, b.summary().soaking + b.summary().succeeded);
        }
    }
}
