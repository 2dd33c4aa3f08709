//! Telemetry from the box (issue 4): sensor readings from sysfs and system health, reported
//! frugally on `{prefix}/v1/devices/{id}/telemetry` (protocol §5), with store-and-forward while
//! the broker is unreachable.
//!
//! - [`config`]: the `[telemetry]` table.
//! - [`sysfs`]: hwmon / IIO / thermal readers; a broken sensor is missing with a reason.
//! - [`system`]: CPU, memory, disk, uptime, load via sysinfo and statvfs.
//! - [`policy`]: the pure publish-or-not decision (deadbands, missing/returned, heartbeat).
//! - [`buffer`]: the bounded on-disk buffer, flushed in order and in batches on reconnect.
//!
//! [`TelemetryTask::run`] ties them together as one task of the agent: every `sample` it
//! takes a sample; when the policy says so, the sample is published at once (QoS 1) if the link
//! is up and nothing is buffered, and appended to the buffer otherwise. While connected the
//! buffer is flushed oldest first, `batch_max` samples per message (a JSON array), each batch
//! removed from disk only after the broker acknowledged it.

pub mod buffer;
pub mod config;
pub mod http;
pub mod policy;
pub mod sysfs;
pub mod system;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use chrono::{SubsecRound, Utc};
use std::sync::Arc;

use ferry_protocol::device_report::Stream;
use ferry_protocol::report::{Telemetry, TelemetryMessage};
use ferry_protocol::topics::DeviceTopics;
use tokio::sync::watch;

use crate::shutdown::StopFlag;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use crate::identity::Seal;
use crate::mqtt::{LinkHandle, QoS};
pub use buffer::{Buffer, BufferError};
pub use config::{SensorConfig, SensorKind, TelemetryConfig};
pub use policy::{Reason, ReportPolicy};

/// Where the buffer lives under the state dir.
pub const BUFFER_DIR: &str = "telemetry";

/// How long a flushed batch may wait for its acknowledgement before the flush gives up (the
/// batch stays on disk and is sent again later).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Upper bound on one flushed message, whatever `max_outgoing_bytes` allows.
const MAX_BATCH_BYTES: u64 = 256 * 1024;

/// Takes samples: the configured sensors and the system metrics.
pub struct Sampler {
    device: String,
    sysfs_root: std::path::PathBuf,
    sensors: Vec<SensorConfig>,
    system: system::SystemSampler,
    http: http::HttpReader,
}

impl Sampler {
    pub fn new(
        cfg: &TelemetryConfig,
        device: &str,
        state_dir: &Path,
        docker_root: Option<String>,
    ) -> Sampler {
        Sampler {
            device: device.to_string(),
            sysfs_root: cfg.sysfs_root.clone(),
            sensors: cfg.sensors.clone(),
            system: system::SystemSampler::new(state_dir.to_path_buf(), docker_root),
            http: http::HttpReader::default(),
        }
    }

    pub fn sample(&mut self) -> Telemetry {
        let mut sensors = BTreeMap::new();
        let mut missing = BTreeMap::new();
        for s in &self.sensors {
            let reading = match s.kind {
                SensorKind::Http => self.http.read(
                    s.url.as_deref().unwrap_or_default(),
                    s.field.as_deref().unwrap_or_default(),
                ),
                _ => sysfs::read_sensor(&self.sysfs_root, s),
            };
            match reading {
                Ok(v) => {
                    sensors.insert(s.name.clone(), v);
                }
                Err(sysfs::Missing(reason)) => {
                    missing.insert(s.name.clone(), reason);
                }
            }
        }
        Telemetry {
            device: self.device.clone(),
            ts: Utc::now().trunc_subsecs(0),
            sensors,
            system: self.system.sample(),
            missing,
            dropped: None,
        }
    }
}

pub struct TelemetryTask {
    cfg: TelemetryConfig,
    topic: String,
    link: LinkHandle,
    /// Signs each message (one signature per batch).
    seal: Arc<dyn Seal>,
    /// `None` only while a sample is being taken on a blocking thread.
    sampler: Option<Sampler>,
    policy: ReportPolicy,
    buffer: Buffer,
    max_batch_bytes: u64,
}

impl TelemetryTask {
    /// Open the buffer under `state_dir`; `max_outgoing_bytes` bounds a flushed batch.
    pub fn new(
        cfg: &TelemetryConfig,
        topics: &DeviceTopics,
        device: &str,
        state_dir: &Path,
        docker_root: Option<String>,
        (link, seal): (LinkHandle, Arc<dyn Seal>),
        max_outgoing_bytes: usize,
    ) -> Result<TelemetryTask, BufferError> {
        let buffer = Buffer::open(&state_dir.join(BUFFER_DIR), cfg.buffer_max_bytes)?;
        if !buffer.is_empty() {
            info!(
                samples = buffer.len(),
                bytes = buffer.bytes(),
                "telemetry buffered before the restart will be sent once connected"
            );
        }
        let topic = topics.telemetry();
        // The topic, the packet header, and the signed envelope: base64 (4/3) plus its fields.
        let overhead = topic.len() as u64 + 16 + 512;
        Ok(TelemetryTask {
            cfg: cfg.clone(),
            max_batch_bytes: ((max_outgoing_bytes as u64).saturating_sub(overhead) / 4 * 3)
                .min(MAX_BATCH_BYTES),
            topic,
            link,
            seal,
            sampler: Some(Sampler::new(cfg, device, state_dir, docker_root)),
            policy: ReportPolicy::new(cfg.effective_deadbands(), cfg.max_interval),
            buffer,
        })
    }

    /// Sample, decide, publish or buffer, flush; until `stop` is true. What is buffered stays on
    /// disk for the next start.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        info!(
            sample = %crate::config::durations::show(self.cfg.sample),
            max_interval = %crate::config::durations::show(self.cfg.max_interval),
            sensors = self.cfg.sensors.len(),
            buffered = self.buffer.len(),
            "telemetry started"
        );
        let mut tick = tokio::time::interval(self.cfg.sample);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut connected = self.link.connected();
        let mut link_gone = false;
        loop {
            tokio::select! {
                biased;
                _ = stop.stopped() => break,
                at = tick.tick() => {
                    let Some(sample) = self.sample().await else { break };
                    self.on_sample(at, sample);
                    self.flush(&mut stop).await;
                }
                c = connected.changed(), if !link_gone => {
                    if c.is_err() {
                        link_gone = true;
                    } else if *connected.borrow_and_update() {
                        self.flush(&mut stop).await;
                    }
                }
            }
        }
        info!(buffered = self.buffer.len(), "telemetry stopped");
    }

    /// Take a sample on a blocking thread (sysfs reads of slow sensors such as a DHT11 and HTTP
    /// readings may take a moment); `None` if that thread panicked.
    async fn sample(&mut self) -> Option<Telemetry> {
        let mut sampler = self.sampler.take()?;
        match tokio::task::spawn_blocking(move || {
            let t = sampler.sample();
            (sampler, t)
        })
        .await
        {
            Ok((sampler, t)) => {
                self.sampler = Some(sampler);
                Some(t)
            }
            Err(e) => {
                tracing::error!(error = %e, "telemetry sampler failed; telemetry stops");
                None
            }
        }
    }

    fn on_sample(&mut self, at: Instant, sample: Telemetry) {
        let Some(reason) = self.policy.decide(at, &sample) else {
            return;
        };
        debug!(%reason, sensors = sample.sensors.len(), missing = sample.missing.len(), "telemetry sample to report");
        for (name, why) in &sample.missing {
            debug!(sensor = %name, reason = %why, "sensor missing");
        }
        if self.buffer.is_empty() && *self.link.connected().borrow() {
            let payload = self.encode(&TelemetryMessage::One(Box::new(sample.clone())));
            match self
                .link
                .publish(self.topic.clone(), payload, false, QoS::AtLeastOnce)
            {
                Ok(()) => {
                    debug!("telemetry sample published");
                    return;
                }
                Err(e) => warn!(error = %e, "telemetry publish not queued; buffering the sample"),
            }
        }
        match self.buffer.push(sample) {
            Ok(dropped) => debug!(
                buffered = self.buffer.len(),
                bytes = self.buffer.bytes(),
                dropped,
                "telemetry sample buffered"
            ),
            Err(e) => warn!(error = %e, "telemetry sample lost: cannot buffer it"),
        }
    }

    /// Send the buffer, oldest first, while connected; stop at the first batch that is not
    /// acknowledged (it stays on disk and is retried on the next tick or reconnect).
    async fn flush(&mut self, stop: &mut watch::Receiver<bool>) {
        let start = self.buffer.len();
        while !self.buffer.is_empty() && *self.link.connected().borrow() && !*stop.borrow() {
            let batch = self.buffer.front(self.cfg.batch_max, self.max_batch_bytes);
            let n = batch.len();
            let payload = self.encode(&TelemetryMessage::Batch(batch));
            let bytes = payload.len();
            let confirm = match self.link.publish_confirmed(self.topic.clone(), payload) {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "telemetry flush paused");
                    return;
                }
            };
            let acked = tokio::select! {
                r = tokio::time::timeout(ACK_TIMEOUT, confirm.acked()) => r.unwrap_or(false),
                _ = stop.stopped() => false,
            };
            if !acked {
                info!(
                    remaining = self.buffer.len(),
                    "telemetry batch not acknowledged; it stays buffered"
                );
                return;
            }
            if let Err(e) = self.buffer.remove_front(n) {
                warn!(error = %e, "cannot remove acknowledged telemetry from the buffer; it may be sent twice");
                return;
            }
            debug!(
                samples = n,
                bytes,
                remaining = self.buffer.len(),
                "telemetry batch acknowledged"
            );
        }
        if start > 0 && self.buffer.is_empty() {
            info!(samples = start, "telemetry buffer flushed");
        }
    }
}

impl TelemetryTask {
    fn encode(&self, m: &TelemetryMessage) -> Vec<u8> {
        let body = serde_json::to_value(m).expect("telemetry serializes");
        self.seal.report(Stream::Telemetry, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::sysfs::tests::{hwmon, FakeSysfs};

    #[test]
    fn a_sample_has_sensors_missing_and_system_and_is_compact() {
        let fs = FakeSysfs::new();
        fs.hwmon(
            1,
            "sht4x",
            &[("temp1_input", "23250"), ("humidity1_input", "41500")],
        );
        let cfg = TelemetryConfig {
            sysfs_root: fs.root().to_path_buf(),
            sensors: vec![
                hwmon("temperature_c", "sht4x", "temp1_input"),
                hwmon("humidity_pct", "sht4x", "humidity1_input"),
                hwmon("soil_c", "gone", "temp1_input"),
            ],
            ..Default::default()
        };
        let d = tempfile::tempdir().unwrap();
        let mut s = Sampler::new(&cfg, "dev-001", d.path(), None);
        let t = s.sample();
        assert_eq!(t.sensors["temperature_c"], 23.25);
        assert_eq!(t.sensors["humidity_pct"], 41.5);
        assert!(t.missing["soil_c"].contains("no hwmon device named \"gone\""));
        assert!(!t.sensors.contains_key("soil_c"));
        assert_eq!(t.ts.timestamp_subsec_nanos(), 0);
        let json = serde_json::to_string(&TelemetryMessage::One(Box::new(t))).unwrap();
        assert!(!json.contains(' ') || json.contains("named"), "{json}");
        assert!(
            json.contains("\"sensors\":{\"humidity_pct\":41.5,\"temperature_c\":23.25}"),
            "{json}"
        );
        assert!(
            json.contains("\"ts\":\"") && !json.contains(".000"),
            "{json}"
        );
        assert!(!json.contains("dropped"), "{json}");
        let back: TelemetryMessage = serde_json::from_str(&json).unwrap();
        assert!(matches!(back, TelemetryMessage::One(_)));
    }
}
