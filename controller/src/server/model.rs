//! The controller's records: what it knows about each device, the release catalogue, the
//! rollouts it runs, the last desired state it sent. Plain data; the store persists it, the
//! core mutates it, the API shows it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use ferry_protocol::desired::Strategy;
use ferry_protocol::report::{
    AppState, DownloadStats, Event, Phase, StateReport, Telemetry, Waiting,
};
use serde::{Deserialize, Serialize};

use crate::rollout::waves::Rollout;
use crate::vecmap::VecMap;

/// The result of a device's last update, as it reported it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LastResult {
    pub sequence: u64,
    pub rollout: Option<String>,
    pub phase: Phase,
    pub reason: Option<String>,
    pub at: DateTime<Utc>,
}

/// An update in progress, as the device last reported it (a phase that is not a result).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CurrentUpdate {
    pub sequence: u64,
    pub rollout: Option<String>,
    pub phase: Phase,
    /// What it waits for (`retrying`, `window`, `lock`), with `reason` saying what exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at: DateTime<Utc>,
}

impl CurrentUpdate {
    /// `downloaded (seq 5), waiting: window (maintenance window 02:00-04:00 opens in 3 h)`.
    pub fn describe(&self) -> String {
        let mut s = format!("{} (seq {})", self.phase, self.sequence);
        if let Some(w) = self.waiting {
            s.push_str(&format!(", waiting: {w}"));
            if let Some(r) = &self.reason {
                s.push_str(&format!(" ({r})"));
            }
        }
        s
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub id: String,
    pub platform: Option<String>,
    pub agent_version: Option<String>,
    /// (Small maps on an exact `Vec`, not `BTreeMap`s: see `vecmap.rs`; the same JSON.)
    #[serde(default)]
    pub labels: VecMap<String, String>,
    /// The committed set the device reports running.
    #[serde(default)]
    pub apps: VecMap<String, AppState>,
    /// The version each app ran before its current one (for `rollback`).
    #[serde(default)]
    pub previous: VecMap<String, String>,
    /// The last sequence the device accepted.
    #[serde(default)]
    pub sequence: u64,
    /// Current update phase, when one is in progress or just ended.
    pub phase: Option<Phase>,
    pub last_result: Option<LastResult>,
    /// The update in progress, if the last report of one was not its result.
    #[serde(default)]
    pub update: Option<CurrentUpdate>,
    pub online: bool,
    pub last_seen: Option<DateTime<Utc>>,
    /// The newest telemetry sample.
    #[serde(default)]
    pub telemetry: Option<LatestTelemetry>,
    /// The box's trust record version and heartbeat status (protocol §10, §10a).
    #[serde(default)]
    pub trust: Option<ferry_protocol::TrustStatus>,
}

/// A device's newest readings, flattened (`temperature_c`, `humidity_pct`, `cpu_pct`, ...).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatestTelemetry {
    pub ts: DateTime<Utc>,
    pub values: VecMap<String, f64>,
    /// Configured sensors that gave no reading, with the reason.
    #[serde(default)]
    pub missing: VecMap<String, String>,
}

/// Every numeric reading of a sample under one flat name: the sensors by their configured
/// names, the system metrics by their field names (`cpu_pct`, `mem_used_bytes`, `load1`, ...).
pub fn flatten(t: &Telemetry) -> BTreeMap<String, f64> {
    let mut v: BTreeMap<String, f64> = t
        .sensors
        .iter()
        .filter(|(_, x)| x.is_finite())
        .map(|(k, x)| (k.clone(), *x))
        .collect();
    let s = &t.system;
    v.insert("cpu_pct".into(), s.cpu_pct);
    v.insert("mem_used_bytes".into(), s.mem_used_bytes as f64);
    v.insert("mem_total_bytes".into(), s.mem_total_bytes as f64);
    v.insert("disk_free_bytes".into(), s.disk_free_bytes as f64);
    v.insert("uptime_s".into(), s.uptime_s as f64);
    for (k, x) in &s.extra {
        if let Some(f) = x.as_f64().filter(|f| f.is_finite()) {
            v.insert(k.clone(), f);
        }
    }
    v
}

impl Device {
    pub fn new(id: &str) -> Device {
        Device {
            id: id.to_string(),
            ..Default::default()
        }
    }

    /// `healthy` when every app is, `unhealthy` when one is not, `unknown` before any state
    /// report, `empty` when the device runs nothing.
    pub fn health(&self) -> &'static str {
        if self.platform.is_none() {
            "unknown"
        } else if self.apps.is_empty() {
            "empty"
        } else if self.apps.values().all(|a| a.health == "healthy") {
            "healthy"
        } else {
            "unhealthy"
        }
    }

    /// Apply a retained state report. Returns the apps whose health went from healthy to
    /// something else (for rollouts soaking on this device).
    pub fn apply_state(&mut self, s: &StateReport, now: DateTime<Utc>) -> Vec<(String, String)> {
        let mut lost = Vec::new();
        for (name, new) in &s.apps {
            if let Some(old) = self.apps.get(name) {
                if old.version != new.version {
                    self.previous.insert(name.clone(), old.version.clone());
                }
                if old.health == "healthy" && new.health != "healthy" && old.version == new.version
                {
                    lost.push((name.clone(), new.health.clone()));
                }
            }
        }
        self.platform = Some(s.platform.clone());
        self.agent_version = Some(s.agent_version.clone());
        self.labels = s.labels.clone().into();
        self.apps = s.apps.clone().into();
        self.trust = s.trust.clone();
        self.sequence = self.sequence.max(s.sequence);
        match &s.update {
            Some(u) => {
                self.phase = Some(u.phase);
                if u.phase.is_terminal() {
                    self.result(LastResult {
                        sequence: u.sequence,
                        rollout: u.rollout.clone(),
                        phase: u.phase,
                        reason: u.error.clone(),
                        at: u.at,
                    });
                } else {
                    self.progress(CurrentUpdate {
                        sequence: u.sequence,
                        rollout: u.rollout.clone(),
                        phase: u.phase,
                        waiting: u.waiting,
                        reason: u.reason.clone().or_else(|| u.error.clone()),
                        at: u.at,
                    });
                }
            }
            // The retained state is the device's whole picture: nothing in progress.
            None => self.update = None,
        }
        self.seen(now);
        lost
    }

    pub fn apply_event(&mut self, e: &Event, now: DateTime<Utc>) {
        self.phase = Some(e.phase);
        if e.phase.is_terminal() {
            self.result(LastResult {
                sequence: e.sequence,
                rollout: e.rollout.clone(),
                phase: e.phase,
                reason: e.reason.clone(),
                at: e.ts,
            });
        } else {
            self.progress(CurrentUpdate {
                sequence: e.sequence,
                rollout: e.rollout.clone(),
                phase: e.phase,
                waiting: e.waiting,
                reason: e.reason.clone(),
                at: e.ts,
            });
        }
        self.seen(now);
    }

    fn result(&mut self, r: LastResult) {
        if self
            .update
            .as_ref()
            .is_some_and(|u| u.sequence <= r.sequence)
        {
            self.update = None;
        }
        self.last_result = Some(r);
    }

    /// Progress of an update that has no result yet and is not older than the one shown (a
    /// late report of an earlier update is left out).
    fn progress(&mut self, u: CurrentUpdate) {
        let ended = self
            .last_result
            .as_ref()
            .is_some_and(|r| r.sequence >= u.sequence);
        let older = self
            .update
            .as_ref()
            .is_some_and(|c| c.sequence > u.sequence);
        if !ended && !older {
            self.update = Some(u);
        }
    }

    /// Keep the newest sample (batches flushed after an outage arrive oldest first).
    pub fn apply_telemetry(&mut self, t: &Telemetry, now: DateTime<Utc>) {
        if self.telemetry.as_ref().is_none_or(|l| l.ts <= t.ts) {
            self.telemetry = Some(LatestTelemetry {
                ts: t.ts,
                values: flatten(t).into(),
                missing: t.missing.clone().into(),
            });
        }
        self.seen(now);
    }

    pub fn seen(&mut self, now: DateTime<Utc>) {
        self.online = true;
        self.last_seen = Some(now);
    }
}

/// A catalogued release: verified against the controller's trusted release keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReleaseEntry {
    pub app: String,
    pub version: String,
    /// platform → image reference (`repo@sha256:...`).
    pub images: BTreeMap<String, String>,
    pub signers: Vec<String>,
    pub pushed_at: DateTime<Utc>,
    /// The envelope exactly as pushed.
    pub envelope: String,
    /// The keys it declares settable (`container.settings`), read from it when pushed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub settings: BTreeMap<String, ferry_protocol::settings::SettingDecl>,
}

/// What a rollout rolls out, and what it needs to revert.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub id: String,
    pub app: String,
    pub version: String,
    pub strategy: Strategy,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The app's version on each notified device before it was notified (`None`: not installed).
    #[serde(default)]
    pub from: BTreeMap<String, Option<String>>,
    /// Devices sent back to `from` after the rollout failed with `--on-failure revert`.
    #[serde(default)]
    pub reverted: Vec<String>,
    /// Devices that could not be sent back, with why.
    #[serde(default)]
    pub revert_failed: BTreeMap<String, String>,
    /// Its notices (reverts included) carry `force`: switch despite an app's update lock.
    #[serde(default)]
    pub force: bool,
    /// Setting values its notices give the app (`--set KEY=VALUE`), over each device's own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub settings: BTreeMap<String, String>,
    /// The app's settings on each notified device before it was notified (what a revert
    /// sends back with `from`); devices without any are left out.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub from_settings: BTreeMap<String, BTreeMap<String, String>>,
    pub machine: Rollout,
}

/// The last desired state the controller sent a device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SentDesired {
    pub sequence: u64,
    /// app → version.
    pub apps: BTreeMap<String, String>,
    pub rollout: Option<String>,
    pub at: DateTime<Utc>,
    /// The signed notice, stored to re-publish it byte-identical after a restart or a
    /// take-over. In memory only until its round's commit has stored it: [`Store::load`] leaves
    /// it out and [`Store::notices`] reads it back (100,000 devices' notices are ~250 MB).
    ///
    /// [`Store::load`]: super::store::Store::load
    /// [`Store::notices`]: super::store::Store::notices
    #[serde(default)]
    pub envelope: String,
    /// app → setting → value, as the notice gave them: what the next notice carries on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub settings: BTreeMap<String, BTreeMap<String, String>>,
}

/// One stored event, for `device show`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub device: String,
    pub sequence: u64,
    pub rollout: Option<String>,
    pub phase: Phase,
    pub app: Option<String>,
    pub reason: Option<String>,
    pub logs: Option<Vec<String>>,
    /// What the update waits for (`reason` says what exactly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
    /// The download's counters so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<DownloadStats>,
    pub ts: DateTime<Utc>,
}

impl From<&Event> for StoredEvent {
    fn from(e: &Event) -> Self {
        StoredEvent {
            device: e.device.clone(),
            sequence: e.sequence,
            rollout: e.rollout.clone(),
            phase: e.phase,
            app: e.app.clone(),
            reason: e.reason.clone(),
            logs: e.logs.clone(),
            waiting: e.waiting,
            download: e.download,
            ts: e.ts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::report::UpdateStatus;

    fn app(v: &str, h: &str) -> AppState {
        AppState {
            version: v.into(),
            digest: "sha256:00".into(),
            container: "c".into(),
            health: h.into(),
        }
    }

    fn report(apps: &[(&str, AppState)], update: Option<UpdateStatus>) -> StateReport {
        StateReport {
            trust: None,
            device: "d".into(),
            agent_version: "0.1.0".into(),
            platform: "linux/arm64".into(),
            sequence: 3,
            apps: apps
                .iter()
                .map(|(n, a)| (n.to_string(), a.clone()))
                .collect(),
            update,
            ts: Utc::now(),
            labels: [("group".to_string(), "beta".to_string())].into(),
        }
    }

    #[test]
    fn state_reports_track_previous_versions_health_and_results() {
        let now = Utc::now();
        let mut d = Device::new("d");
        assert_eq!(d.health(), "unknown");
        assert!(d
            .apply_state(&report(&[("sensor", app("1.0.0", "healthy"))], None), now)
            .is_empty());
        assert_eq!(d.health(), "healthy");
        assert!(d.previous.is_empty());
        let upd = UpdateStatus {
            waiting: None,
            reason: None,
            sequence: 4,
            rollout: Some("r-1".into()),
            phase: Phase::Committed,
            error: None,
            at: now,
        };
        d.apply_state(
            &report(&[("sensor", app("2.0.0", "healthy"))], Some(upd)),
            now,
        );
        assert_eq!(d.previous["sensor"], "1.0.0");
        assert_eq!(d.last_result.as_ref().unwrap().phase, Phase::Committed);
        assert_eq!(d.labels["group"], "beta");
        // health lost on the same version is reported
        let lost = d.apply_state(&report(&[("sensor", app("2.0.0", "unhealthy"))], None), now);
        assert_eq!(lost, vec![("sensor".to_string(), "unhealthy".to_string())]);
        assert_eq!(d.health(), "unhealthy");
        assert_eq!(d.previous["sensor"], "1.0.0");
    }

    #[test]
    fn the_update_in_progress_is_shown_until_its_result() {
        let now = Utc::now();
        let mut d = Device::new("d");
        let ev = |seq: u64, phase: Phase, waiting: Option<Waiting>, reason: Option<&str>| {
            let mut e = Event::new("d", seq, Some("r-1".into()), phase);
            e.waiting = waiting;
            e.reason = reason.map(str::to_string);
            e
        };
        d.apply_event(&ev(5, Phase::Downloading, None, None), now);
        assert_eq!(d.update.as_ref().unwrap().describe(), "downloading (seq 5)");
        d.apply_event(
            &ev(
                5,
                Phase::Downloaded,
                Some(Waiting::Lock),
                Some("sensor holds its lock"),
            ),
            now,
        );
        assert_eq!(
            d.update.as_ref().unwrap().describe(),
            "downloaded (seq 5), waiting: lock (sensor holds its lock)"
        );
        // a late report of an older update does not replace it
        d.apply_event(&ev(4, Phase::Downloading, None, None), now);
        assert_eq!(d.update.as_ref().unwrap().sequence, 5);
        // its result ends it; a late progress report of it is left out
        d.apply_event(&ev(5, Phase::Committed, None, None), now);
        assert!(d.update.is_none());
        assert_eq!(d.last_result.as_ref().unwrap().sequence, 5);
        d.apply_event(&ev(5, Phase::Switching, None, None), now);
        assert!(d.update.is_none());
        // the retained state's update, with its wait
        let upd = UpdateStatus {
            waiting: Some(Waiting::Window),
            reason: Some("window 02:00-04:00 opens in 3 h".into()),
            sequence: 6,
            rollout: None,
            phase: Phase::Downloaded,
            error: None,
            at: now,
        };
        d.apply_state(&report(&[], Some(upd)), now);
        let u = d.update.clone().unwrap();
        assert_eq!((u.sequence, u.waiting), (6, Some(Waiting::Window)));
        // a state without an update in progress clears it
        d.apply_state(&report(&[], None), now);
        assert!(d.update.is_none());
        // and a record stored before the field existed loads
        let mut old = serde_json::to_value(&d).unwrap();
        old.as_object_mut().unwrap().remove("update");
        assert_eq!(serde_json::from_value::<Device>(old).unwrap(), d);
    }
}
