//! Reports a device publishes (protocol §5): retained state, events, telemetry. Reports are plain
//! JSON to which fields may be added, so readers ignore unknown fields (unlike signed records).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The phases of an update, as reported in events and in the state's `update.phase`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Received,
    Rejected,
    Verified,
    Downloading,
    Downloaded,
    Switching,
    HealthChecking,
    Committed,
    RollingBack,
    RolledBack,
    Failed,
    /// The update was abandoned before its switch because a newer verified notice arrived
    /// (nothing that runs was touched; blobs the newer one shares are kept).
    Superseded,
    /// Restoring the previous set failed; the agent keeps retrying with a capped backoff.
    /// Reported once per rollback, with the reason. Not an end: `rolled_back` follows when a
    /// retry succeeds.
    RollbackFailed,
}

impl Phase {
    pub const ALL: [Phase; 13] = [
        Phase::Received,
        Phase::Rejected,
        Phase::Verified,
        Phase::Downloading,
        Phase::Downloaded,
        Phase::Switching,
        Phase::HealthChecking,
        Phase::Committed,
        Phase::RollingBack,
        Phase::RolledBack,
        Phase::Failed,
        Phase::Superseded,
        Phase::RollbackFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Received => "received",
            Phase::Rejected => "rejected",
            Phase::Verified => "verified",
            Phase::Downloading => "downloading",
            Phase::Downloaded => "downloaded",
            Phase::Switching => "switching",
            Phase::HealthChecking => "health_checking",
            Phase::Committed => "committed",
            Phase::RollingBack => "rolling_back",
            Phase::RolledBack => "rolled_back",
            Phase::Failed => "failed",
            Phase::Superseded => "superseded",
            Phase::RollbackFailed => "rollback_failed",
        }
    }

    /// An update ends in one of these.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Phase::Committed
                | Phase::RolledBack
                | Phase::Failed
                | Phase::Rejected
                | Phase::Superseded
        )
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateReport {
    pub device: String,
    pub agent_version: String,
    pub platform: String,
    /// The last accepted sequence.
    pub sequence: u64,
    /// The committed set: what the device runs.
    pub apps: BTreeMap<String, AppState>,
    pub update: Option<UpdateStatus>,
    pub ts: DateTime<Utc>,
    /// Labels from the agent's config (`group=beta`, `site=north`), for selectors.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The trust record the box holds, and why it refused the last one it did not take
    /// (protocol §10). Absent from agents before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<TrustStatus>,
}

/// The box's trust (protocol §10): version 0 is the keys of its config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustStatus {
    pub version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Why the last trust record that arrived was refused (cleared when one is taken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `issued_at` of the newest valid controller heartbeat held (protocol §10a).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_at: Option<DateTime<Utc>>,
    /// No heartbeat newer than the box's `max_heartbeat_age`: notices may be withheld.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stale: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AppState {
    pub version: String,
    pub digest: String,
    pub container: String,
    /// `healthy`, `unhealthy`, `starting`, `stopped`, `missing`.
    pub health: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpdateStatus {
    pub sequence: u64,
    pub rollout: Option<String>,
    pub phase: Phase,
    pub error: Option<String>,
    pub at: DateTime<Utc>,
    /// Set while the update is held (`downloading` + `retrying`, `downloaded` + `window`/`lock`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
    /// What it waits for, for people (e.g. "maintenance window 02:00-04:00 opens in 3 h 10 min").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Why an update in progress does not move on. None of these is a failure: a controller keeps
/// such a device in its wave (see `controller/API.md`, device timeout).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Waiting {
    /// `downloading`: the registry could not be reached or failed transiently (connection
    /// refused or cut, stalled, timeout, HTTP 5xx/429); the download resumes after a backoff.
    Retrying,
    /// `downloaded`: everything is verified and staged; the switch waits for a local
    /// maintenance window (`[update] windows`).
    Window,
    /// `downloaded`: an app holds its update lock (`/run/ferry/updates.lock`).
    Lock,
}

impl Waiting {
    pub fn as_str(self) -> &'static str {
        match self {
            Waiting::Retrying => "retrying",
            Waiting::Window => "window",
            Waiting::Lock => "lock",
        }
    }
}

impl std::fmt::Display for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counters of one update's download, on `downloading` and `downloaded` events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadStats {
    /// Bytes of blob content received from the registry for this update (every attempt).
    pub fetched_bytes: u64,
    /// Blobs the engine already had, not fetched at all.
    pub skipped_blobs: u64,
    /// Attempts that ended in a transient error and were retried.
    pub retries: u64,
    /// Blob requests continued from a partial file (`Range`, answered `206`).
    pub resumes: u64,
    /// Blobs restarted from zero because the registry answered a ranged request with `200`.
    pub restarts: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub device: String,
    pub sequence: u64,
    pub rollout: Option<String>,
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<Vec<String>>,
    /// Set on a `downloading` event while retrying, on a `downloaded` event while the switch
    /// waits; `reason` then says for what.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<DownloadStats>,
    pub ts: DateTime<Utc>,
}

impl Event {
    pub fn new(device: &str, sequence: u64, rollout: Option<String>, phase: Phase) -> Event {
        Event {
            device: device.to_string(),
            sequence,
            rollout,
            phase,
            app: None,
            bytes: None,
            total: None,
            reason: None,
            logs: None,
            waiting: None,
            download: None,
            ts: Utc::now(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    pub device: String,
    pub ts: DateTime<Utc>,
    /// Named readings: `temperature_c`, `humidity_pct`, `cpu_temp_c`, ...
    pub sensors: BTreeMap<String, f64>,
    pub system: SystemMetrics,
    /// Configured sensors that gave no reading this time, with the reason.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub missing: BTreeMap<String, String>,
    /// Samples dropped from the offline buffer since the last report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SystemMetrics {
    pub cpu_pct: f64,
    pub mem_used_bytes: u64,
    pub mem_total_bytes: u64,
    pub disk_free_bytes: u64,
    pub uptime_s: u64,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// A telemetry message: one sample, or a batch flushed after an outage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TelemetryMessage {
    One(Box<Telemetry>),
    Batch(Vec<Telemetry>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_spelling_matches_protocol() {
        for p in Phase::ALL {
            assert_eq!(
                serde_json::to_string(&p).unwrap(),
                format!("\"{}\"", p.as_str())
            );
        }
    }

    #[test]
    fn readers_ignore_added_fields() {
        let j = serde_json::json!({"device":"d","sequence":1,"rollout":null,"phase":"committed","ts":"2026-11-22T10:00:00Z","new_field":1});
        let e: Event = serde_json::from_value(j).unwrap();
        assert_eq!(e.phase, Phase::Committed);
    }

    #[test]
    fn telemetry_one_or_batch() {
        let t = Telemetry {
            device: "d".into(),
            ts: Utc::now(),
            sensors: [("temperature_c".to_string(), 21.5)].into(),
            system: SystemMetrics::default(),
            missing: BTreeMap::new(),
            dropped: None,
        };
        let one = serde_json::to_string(&TelemetryMessage::One(Box::new(t.clone()))).unwrap();
        assert!(one.starts_with('{'));
        let batch = serde_json::to_string(&TelemetryMessage::Batch(vec![t.clone(), t])).unwrap();
        assert!(
            matches!(serde_json::from_str(&batch).unwrap(), TelemetryMessage::Batch(v) if v.len() == 2)
        );
        assert!(matches!(
            serde_json::from_str(&one).unwrap(),
            TelemetryMessage::One(_)
        ));
    }
}
