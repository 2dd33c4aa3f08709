//! The HTTP JSON API between `ferryctl` and `ferryctl serve`: request and response bodies,
//! shared by the server and the client so neither builds JSON by hand. Documented in
//! `controller/API.md`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use ferry_protocol::desired::Strategy;
use ferry_protocol::report::AppState;
use serde::{Deserialize, Serialize};

use crate::rollout::waves::{DeviceEntry, OnFailure, Summary};
use crate::server::model::{CurrentUpdate, LastResult, LatestTelemetry, StoredEvent};
use crate::server::store::Point;

/// The API version prefix.
pub const PREFIX: &str = "/api/v1";

/// What `POST /api/v1/rollouts/{id}/{op}` does to a rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RolloutOp {
    Pause,
    Resume,
    Abort,
}

impl RolloutOp {
    pub const ALL: [RolloutOp; 3] = [RolloutOp::Pause, RolloutOp::Resume, RolloutOp::Abort];

    /// The path segment.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutOp::Pause => "pause",
            RolloutOp::Resume => "resume",
            RolloutOp::Abort => "abort",
        }
    }
}

impl std::str::FromStr for RolloutOp {
    type Err = String;
    fn from_str(s: &str) -> Result<RolloutOp, String> {
        RolloutOp::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| format!("no operation {s:?} (pause, resume, abort)"))
    }
}

impl std::fmt::Display for RolloutOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every error response: `{"error": "..."}` with a 4xx/5xx status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceView {
    pub id: String,
    pub platform: Option<String>,
    pub agent_version: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub apps: BTreeMap<String, AppState>,
    /// `healthy`, `unhealthy`, `empty`, `unknown`.
    pub health: String,
    pub online: bool,
    pub last_seen: Option<DateTime<Utc>>,
    pub sequence: u64,
    pub phase: Option<String>,
    pub last_result: Option<LastResult>,
    /// The update in progress (no result yet), with what it waits for.
    #[serde(default)]
    pub update: Option<CurrentUpdate>,
    pub previous: BTreeMap<String, String>,
    /// The newest telemetry sample, flattened.
    #[serde(default)]
    pub telemetry: Option<LatestTelemetry>,
    /// The box's trust record version, and `stale` when it holds no recent controller heartbeat
    /// (notices may be withheld from it; PROTOCOL.md §10a).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<ferry_protocol::TrustStatus>,
}

/// One page of the fleet (`GET /api/v1/devices?limit=N[&after=ID][&select=S]`), in device id
/// order: what a console shows of 100,000 devices without drawing them all.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DevicePage {
    pub devices: Vec<DeviceView>,
    /// Devices the selector matches, on every page together.
    pub total: usize,
    /// Pass as `after` for the next page; `None` on the last one.
    pub next: Option<String>,
}

/// The largest `limit` of a device page.
pub const MAX_PAGE: usize = 1000;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceDetail {
    #[serde(flatten)]
    pub device: DeviceView,
    /// The last desired state the controller sent: sequence and app → version.
    pub desired_sequence: Option<u64>,
    pub desired_apps: Option<BTreeMap<String, String>>,
    /// Newest first.
    pub events: Vec<StoredEvent>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseView {
    pub app: String,
    pub version: String,
    /// platform → image reference.
    pub images: BTreeMap<String, String>,
    pub signers: Vec<String>,
    pub pushed_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRollout {
    pub app: String,
    pub version: String,
    /// Selector: `group=beta,site!=north`, `id in (a,b)`, `all`.
    pub select: String,
    /// Cumulative waves: `1,10%,50%,100%`.
    pub waves: String,
    /// Soak time, humantime (`60s`, `5m`).
    pub soak: String,
    /// `1` or `5%` per wave.
    pub max_failures: String,
    /// Online time without progress after which a notified device fails (humantime); default
    /// from the server's config.
    #[serde(default)]
    pub device_timeout: Option<String>,
    #[serde(default)]
    pub strategy: Option<Strategy>,
    #[serde(default)]
    pub on_failure: Option<OnFailure>,
    /// Every notice of the rollout (reverts included) asks the devices to switch even while an
    /// app holds its update lock. Left out when false (servers before it refuse the field).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
    /// Values for the release's settable keys (`--set KEY=VALUE`), over each device's own.
    /// Left out when empty (servers before it refuse the field).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub settings: BTreeMap<String, String>,
}

/// `POST /api/v1/rollouts/preview`: what a `StartRollout` would get, without starting it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutPreview {
    /// Devices the selector matches (with a known platform).
    pub devices: usize,
    /// Of them, online now.
    pub online: usize,
    /// Cumulative device counts per wave.
    pub targets: Vec<usize>,
    /// Devices each wave adds.
    pub waves: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutView {
    pub id: String,
    pub app: String,
    pub version: String,
    pub strategy: Strategy,
    pub select: String,
    pub waves: String,
    pub targets: Vec<usize>,
    pub soak_s: f64,
    pub device_timeout_s: f64,
    pub max_failures: String,
    pub on_failure: OnFailure,
    /// Its notices carry `force` (switch despite an app's update lock).
    #[serde(default)]
    pub force: bool,
    /// The setting values its notices give the app.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub settings: BTreeMap<String, String>,
    /// `running`, `paused`, `reverted`, `completed`, `aborted`.
    pub state: String,
    pub reason: Option<String>,
    pub current_wave: Option<usize>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub summary: Summary,
    pub reverted: Vec<String>,
    /// Devices that could not be sent back, with why.
    #[serde(default)]
    pub revert_failed: BTreeMap<String, String>,
    /// Per device (only in `GET /rollouts/{id}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<BTreeMap<String, DeviceEntry>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    pub select: String,
    pub app: String,
    /// The notices carry `force` (switch despite an app's update lock). Left out when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackItem {
    pub device: String,
    pub from: Option<String>,
    pub to: Option<String>,
    /// The sequence sent, or why nothing was sent.
    pub sequence: Option<u64>,
    pub skipped: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackResult {
    pub app: String,
    pub devices: Vec<RollbackItem>,
}

/// `GET /devices/{id}/telemetry?since=1h&metric=humidity_pct`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TelemetrySeries {
    pub device: String,
    pub since_ms: i64,
    /// metric → points, oldest first (hourly averages with min/max for downsampled periods).
    pub series: BTreeMap<String, Vec<Point>>,
}
