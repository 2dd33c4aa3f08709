//! What the simulator records, and the JSON it writes to `--stats` (periodically, atomically,
//! and once more at exit).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use serde::Serialize;

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Hot counters, bumped without a lock.
#[derive(Debug)]
pub struct Counters {
    /// Publishes handed to the MQTT client (state, events, online, enroll).
    pub published: AtomicU64,
    pub published_state: AtomicU64,
    pub published_events: AtomicU64,
    pub published_online: AtomicU64,
    pub published_enroll: AtomicU64,
    /// PUBACKs received for them.
    pub acked: AtomicU64,
    pub publish_errors: AtomicU64,
    pub connects: AtomicU64,
    pub connection_errors: AtomicU64,
    pub suback_failures: AtomicU64,
    /// Messages that arrived on a `desired` topic (before any verification).
    pub notices_received: AtomicU64,
    pub first_notice_ms: AtomicU64,
    pub last_notice_ms: AtomicU64,
    /// Messages for a device this simulator does not run, or on another topic.
    pub stray_messages: AtomicU64,
    /// Devices with an update in progress.
    pub busy: AtomicU64,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            published: AtomicU64::new(0),
            published_state: AtomicU64::new(0),
            published_events: AtomicU64::new(0),
            published_online: AtomicU64::new(0),
            published_enroll: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            publish_errors: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            connection_errors: AtomicU64::new(0),
            suback_failures: AtomicU64::new(0),
            notices_received: AtomicU64::new(0),
            first_notice_ms: AtomicU64::new(u64::MAX),
            last_notice_ms: AtomicU64::new(0),
            stray_messages: AtomicU64::new(0),
            busy: AtomicU64::new(0),
        }
    }
}

impl Counters {
    pub fn notice_arrived(&self, at_ms: u64) {
        self.notices_received.fetch_add(1, Relaxed);
        self.first_notice_ms.fetch_min(at_ms, Relaxed);
        self.last_notice_ms.fetch_max(at_ms, Relaxed);
    }
}

/// Per device: every accepted notice and how its update ended.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DeviceRecord {
    pub id: String,
    pub updates: Vec<UpdateRecord>,
    pub rejected: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct UpdateRecord {
    pub sequence: u64,
    pub rollout: Option<String>,
    pub notice_unix_ms: u64,
    pub committed_unix_ms: Option<u64>,
    pub result: Option<&'static str>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RolloutStats {
    /// Accepted notices of this rollout (one per device unless the controller re-sent).
    pub notices: u64,
    pub first_notice_unix_ms: Option<u64>,
    pub last_notice_unix_ms: Option<u64>,
    pub notices_per_s: Option<f64>,
    pub rejected: u64,
    pub committed: u64,
    pub rolled_back: u64,
    pub first_commit_unix_ms: Option<u64>,
    pub last_commit_unix_ms: Option<u64>,
    /// Notice arrival → `committed` published, over the committed devices.
    pub notice_to_commit_ms: Option<Percentiles>,
    #[serde(skip)]
    latencies: Vec<u64>,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn of(values: &[u64]) -> Option<Percentiles> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Some(Percentiles {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: *v.last().unwrap(),
        })
    }
}

/// One `--blast` round: every device published `per_device` extra state reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BlastStats {
    pub per_device: u32,
    pub messages: u64,
    pub start_unix_ms: u64,
    /// Every blast message handed to the MQTT client.
    pub queued_unix_ms: Option<u64>,
    /// Every publish up to the last blast message acknowledged by the broker.
    pub acked_unix_ms: Option<u64>,
    /// messages / (acked − start).
    pub per_s: Option<f64>,
}

#[derive(Debug, Default)]
struct Inner {
    ready_unix_ms: Option<u64>,
    accepted: u64,
    duplicates: u64,
    rejected: u64,
    repeated_rejections: u64,
    rollouts: BTreeMap<String, RolloutStats>,
    rejections: BTreeMap<String, u64>,
    blasts: Vec<BlastStats>,
    devices: Vec<DeviceRecord>,
}

const MAX_REASONS: usize = 20;
pub const NO_ROLLOUT: &str = "(none)";

/// Everything recorded during a run.
#[derive(Debug)]
pub struct Recorder {
    pub counters: Counters,
    pub started_unix_ms: u64,
    pub connections: usize,
    inner: Mutex<Inner>,
}

impl Recorder {
    pub fn new(device_ids: Vec<String>, connections: usize) -> Recorder {
        Recorder {
            counters: Counters::default(),
            started_unix_ms: unix_ms(),
            connections,
            inner: Mutex::new(Inner {
                devices: device_ids
                    .into_iter()
                    .map(|id| DeviceRecord {
                        id,
                        ..DeviceRecord::default()
                    })
                    .collect(),
                ..Inner::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn ready(&self) {
        self.lock().ready_unix_ms.get_or_insert(unix_ms());
    }

    pub fn is_ready(&self) -> bool {
        self.lock().ready_unix_ms.is_some()
    }

    pub fn duplicate(&self) {
        self.lock().duplicates += 1;
    }

    pub fn repeated_rejection(&self) {
        self.lock().repeated_rejections += 1;
    }

    pub fn accepted(&self, device: usize, sequence: u64, rollout: Option<&str>, arrived_ms: u64) {
        let mut g = self.lock();
        g.accepted += 1;
        let r = g
            .rollouts
            .entry(rollout.unwrap_or(NO_ROLLOUT).to_string())
            .or_default();
        r.notices += 1;
        r.first_notice_unix_ms = Some(
            r.first_notice_unix_ms
                .map_or(arrived_ms, |t| t.min(arrived_ms)),
        );
        r.last_notice_unix_ms = Some(
            r.last_notice_unix_ms
                .map_or(arrived_ms, |t| t.max(arrived_ms)),
        );
        if let Some(d) = g.devices.get_mut(device) {
            d.updates.push(UpdateRecord {
                sequence,
                rollout: rollout.map(str::to_string),
                notice_unix_ms: arrived_ms,
                committed_unix_ms: None,
                result: None,
            });
        }
    }

    pub fn rejected(&self, device: usize, rollout: Option<&str>, reason: &str) {
        let mut g = self.lock();
        g.rejected += 1;
        if let Some(r) = rollout {
            g.rollouts.entry(r.to_string()).or_default().rejected += 1;
        }
        // Reasons name the device: group them with the id taken out.
        let key = reason.replace(
            g.devices.get(device).map(|d| d.id.as_str()).unwrap_or("\0"),
            "{device}",
        );
        if g.rejections.len() < MAX_REASONS || g.rejections.contains_key(&key) {
            *g.rejections.entry(key).or_default() += 1;
        } else {
            *g.rejections.entry("(other reasons)".into()).or_default() += 1;
        }
        if let Some(d) = g.devices.get_mut(device) {
            d.rejected += 1;
        }
    }

    /// The update of `device` reached a terminal phase at `at_ms`.
    pub fn finished(
        &self,
        device: usize,
        rollout: Option<&str>,
        committed: bool,
        arrived_ms: u64,
        at_ms: u64,
    ) {
        let mut g = self.lock();
        let r = g
            .rollouts
            .entry(rollout.unwrap_or(NO_ROLLOUT).to_string())
            .or_default();
        if committed {
            r.committed += 1;
            r.first_commit_unix_ms = Some(r.first_commit_unix_ms.map_or(at_ms, |t| t.min(at_ms)));
            r.last_commit_unix_ms = Some(r.last_commit_unix_ms.map_or(at_ms, |t| t.max(at_ms)));
            r.latencies.push(at_ms.saturating_sub(arrived_ms));
        } else {
            r.rolled_back += 1;
        }
        if let Some(u) = g.devices.get_mut(device).and_then(|d| d.updates.last_mut()) {
            if committed {
                u.committed_unix_ms = Some(at_ms);
            }
            u.result = Some(if committed {
                "committed"
            } else {
                "rolled_back"
            });
        }
    }

    /// Start recording a blast; returns its index.
    pub fn blast_started(&self, per_device: u32, messages: u64) -> usize {
        let mut g = self.lock();
        g.blasts.push(BlastStats {
            per_device,
            messages,
            start_unix_ms: unix_ms(),
            ..BlastStats::default()
        });
        g.blasts.len() - 1
    }

    pub fn blast_queued(&self, i: usize) {
        if let Some(b) = self.lock().blasts.get_mut(i) {
            b.queued_unix_ms = Some(unix_ms());
        }
    }

    pub fn blast_acked(&self, i: usize) {
        if let Some(b) = self.lock().blasts.get_mut(i) {
            let now = unix_ms();
            b.acked_unix_ms = Some(now);
            let secs = (now.saturating_sub(b.start_unix_ms)).max(1) as f64 / 1000.0;
            b.per_s = Some(b.messages as f64 / secs);
        }
    }

    pub fn snapshot(&self, per_device: bool) -> StatsFile {
        let c = &self.counters;
        let g = self.lock();
        let first = c.first_notice_ms.load(Relaxed);
        let last = c.last_notice_ms.load(Relaxed);
        let received = c.notices_received.load(Relaxed);
        let (first, last) = if received == 0 {
            (None, None)
        } else {
            (Some(first), Some(last))
        };
        let rollouts = g
            .rollouts
            .iter()
            .map(|(k, r)| {
                let mut r = r.clone();
                r.notices_per_s = rate(r.notices, r.first_notice_unix_ms, r.last_notice_unix_ms);
                r.notice_to_commit_ms = Percentiles::of(&r.latencies);
                (k.clone(), r)
            })
            .collect();
        StatsFile {
            devices: g.devices.len(),
            connections: self.connections,
            started_unix_ms: self.started_unix_ms,
            ready_unix_ms: g.ready_unix_ms,
            written_unix_ms: unix_ms(),
            busy_devices: c.busy.load(Relaxed),
            notices: NoticeStats {
                received,
                accepted: g.accepted,
                duplicates: g.duplicates,
                rejected: g.rejected,
                repeated_rejections: g.repeated_rejections,
                first_unix_ms: first,
                last_unix_ms: last,
                per_s: rate(received, first, last),
            },
            rollouts,
            reports: ReportStats {
                published: c.published.load(Relaxed),
                acked: c.acked.load(Relaxed),
                state: c.published_state.load(Relaxed),
                events: c.published_events.load(Relaxed),
                online: c.published_online.load(Relaxed),
                enroll: c.published_enroll.load(Relaxed),
            },
            blasts: g.blasts.clone(),
            errors: ErrorStats {
                publish_errors: c.publish_errors.load(Relaxed),
                connection_errors: c.connection_errors.load(Relaxed),
                suback_failures: c.suback_failures.load(Relaxed),
                stray_messages: c.stray_messages.load(Relaxed),
                rejections: g.rejections.clone(),
            },
            mqtt_connects: c.connects.load(Relaxed),
            per_device: per_device.then(|| g.devices.clone()),
        }
    }
}

fn rate(n: u64, first: Option<u64>, last: Option<u64>) -> Option<f64> {
    let (first, last) = (first?, last?);
    if n < 2 || last <= first {
        return None;
    }
    Some((n - 1) as f64 * 1000.0 / (last - first) as f64)
}

#[derive(Debug, Serialize)]
pub struct StatsFile {
    pub devices: usize,
    pub connections: usize,
    pub started_unix_ms: u64,
    /// Every device subscribed and its `online` and `state` acknowledged by the broker.
    pub ready_unix_ms: Option<u64>,
    pub written_unix_ms: u64,
    pub busy_devices: u64,
    pub notices: NoticeStats,
    pub rollouts: BTreeMap<String, RolloutStats>,
    pub reports: ReportStats,
    pub blasts: Vec<BlastStats>,
    pub errors: ErrorStats,
    pub mqtt_connects: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_device: Option<Vec<DeviceRecord>>,
}

#[derive(Debug, Serialize)]
pub struct NoticeStats {
    /// Messages on a `desired` topic, before verification.
    pub received: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub repeated_rejections: u64,
    pub first_unix_ms: Option<u64>,
    pub last_unix_ms: Option<u64>,
    pub per_s: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct ReportStats {
    pub published: u64,
    pub acked: u64,
    pub state: u64,
    pub events: u64,
    pub online: u64,
    /// Enrolment requests (one per device and connection).
    pub enroll: u64,
}

#[derive(Debug, Serialize)]
pub struct ErrorStats {
    pub publish_errors: u64,
    pub connection_errors: u64,
    pub suback_failures: u64,
    pub stray_messages: u64,
    /// Rejection reasons (device id replaced by `{device}`) and how often each occurred.
    pub rejections: BTreeMap<String, u64>,
}

/// Write `stats` to `path` atomically (temp file + rename), so a reader never sees half a file.
pub fn write_atomic(path: &Path, stats: &StatsFile) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_vec_pretty(stats).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_a_rollout() {
        let r = Recorder::new(
            vec!["sim-00000".into(), "sim-00001".into(), "sim-00002".into()],
            1,
        );
        r.counters.notice_arrived(1000);
        r.counters.notice_arrived(1500);
        r.counters.notice_arrived(2000);
        r.accepted(0, 3, Some("r-1"), 1000);
        r.accepted(1, 3, Some("r-1"), 2000);
        r.rejected(
            2,
            Some("r-1"),
            "notice is for device \"x\", this is \"sim-00002\"",
        );
        r.finished(0, Some("r-1"), true, 1000, 1400);
        r.finished(1, Some("r-1"), false, 2000, 2600);
        let s = r.snapshot(true);
        assert_eq!(s.notices.received, 3);
        assert_eq!(s.notices.first_unix_ms, Some(1000));
        assert_eq!(s.notices.per_s, Some(2.0));
        let ro = &s.rollouts["r-1"];
        assert_eq!(
            (ro.notices, ro.committed, ro.rolled_back, ro.rejected),
            (2, 1, 1, 1)
        );
        assert_eq!(ro.last_notice_unix_ms, Some(2000));
        assert_eq!(ro.notice_to_commit_ms.unwrap().max, 400);
        assert_eq!(
            s.errors.rejections["notice is for device \"x\", this is \"{device}\""],
            1
        );
        let pd = s.per_device.unwrap();
        assert_eq!(pd[0].updates[0].committed_unix_ms, Some(1400));
        assert_eq!(pd[1].updates[0].result, Some("rolled_back"));
        assert_eq!(pd[2].rejected, 1);
    }

    #[test]
    fn percentiles() {
        let p = Percentiles::of(&(1..=100).collect::<Vec<_>>()).unwrap();
        assert_eq!((p.p50, p.p90, p.p99, p.max), (51, 90, 99, 100));
        assert!(Percentiles::of(&[]).is_none());
    }
}
