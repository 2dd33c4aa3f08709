//! `ferry-sim verify-bench`: how many signed state reports per second one core opens and
//! verifies (`device_report::open(..)?.verify(..)`, the controller's per-message cost in
//! protocol v2). The reports are built first, from the simulator's own state bodies (signed by
//! `--devices` distinct device keys, as `ferry-sim run` publishes them); only the verification
//! is timed, on the calling thread.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::Utc;
use clap::Args;
use ferry_protocol::device_report::{self, Stream};
use ferry_protocol::report::{Phase, UpdateStatus};
use ferry_protocol::PublicKey;
use serde::Serialize;
use std::sync::Arc;

use crate::device::{fake_digest, AppVersion, Device};
use crate::signing::{boot_now, DeviceKey, Signer};

/// The README's goal for one core.
pub const GOAL_PER_S: u64 = 20_000;

#[derive(Debug, Args)]
pub struct VerifyBenchArgs {
    /// Signed reports to verify.
    #[arg(long, default_value_t = 100_000)]
    pub n: usize,
    /// Distinct devices (keys) the reports come from.
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    #[arg(long, default_value = "sim-")]
    pub id_prefix: String,
    /// Reports per batch verification, as the controller's verifier drains its queue under
    /// load (its VERIFY_BATCH is 64); 1 measures only one by one.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct VerifyBenchResult {
    pub reports: usize,
    pub devices: usize,
    pub mean_envelope_bytes: usize,
    pub seconds: f64,
    pub per_s: f64,
    pub per_report_us: f64,
    /// In batches of `batch` (`device_report::verify_batch`, what the controller does when
    /// reports queue up).
    pub batch: usize,
    pub batched_per_s: f64,
    pub batched_per_report_us: f64,
    /// Of which parsing (`open` alone, measured in a separate pass).
    pub open_us: f64,
    pub goal_per_s: u64,
    pub goal_met: bool,
}

/// The state a device reports after a committed rollout: its apps, labels and last update.
fn realistic_state(dev: &Device, i: usize) -> serde_json::Value {
    let now = Utc::now();
    let mut s = dev.state(now);
    s.sequence = 1_800_000_000 + i as u64;
    s.update = Some(UpdateStatus {
        sequence: s.sequence,
        rollout: Some("r-20261122-100000-7f3a".into()),
        phase: Phase::Committed,
        error: None,
        at: now,
        waiting: None,
        reason: None,
    });
    serde_json::to_value(&s).expect("a state report serializes")
}

/// Build `n` signed state reports from `devices` devices: `(device index, envelope)`, and each
/// device's id and public key.
#[allow(clippy::type_complexity)]
pub fn build(
    n: usize,
    devices: usize,
    id_prefix: &str,
) -> (Vec<(usize, Vec<u8>)>, Vec<(String, PublicKey)>) {
    let boot = boot_now();
    let mut signers = Vec::with_capacity(devices);
    let mut sims = Vec::with_capacity(devices);
    let mut keys = Vec::with_capacity(devices);
    for d in 0..devices {
        let id = format!("{id_prefix}{d:05}");
        let key = Arc::new(DeviceKey::derive(&id, boot));
        keys.push((id.clone(), key.public().clone()));
        signers.push(Signer::new(key, None, "ferry-sim"));
        let version = "2.0.0";
        sims.push(Device::new(
            id,
            "linux/arm64".into(),
            concat!("ferry-sim-", env!("CARGO_PKG_VERSION")).into(),
            [
                ("fleet".to_string(), "sim".to_string()),
                ("site".to_string(), format!("site-{}", d % 16)),
            ]
            .into(),
            [(
                "sensor".to_string(),
                AppVersion {
                    version: version.parse().expect("a version"),
                    digest: fake_digest("sensor", version, "linux/arm64"),
                },
            )]
            .into(),
        ));
    }
    let reports = (0..n)
        .map(|i| {
            let d = i % devices;
            let body = realistic_state(&sims[d], i);
            (d, signers[d].sign(Stream::State, body))
        })
        .collect();
    (reports, keys)
}

/// Only [`device_report::open`] every report (envelope, base64, payload JSON; no signature):
/// the parsing share of the cost.
pub fn open_all(reports: &[(usize, Vec<u8>)], keys: &[(String, PublicKey)]) -> Duration {
    let start = Instant::now();
    for (d, raw) in reports {
        let _ = std::hint::black_box(device_report::open(raw, &keys[*d].0, Stream::State));
    }
    start.elapsed()
}

/// Open and verify every report on this thread; the time it took.
pub fn verify_all(
    reports: &[(usize, Vec<u8>)],
    keys: &[(String, PublicKey)],
) -> anyhow::Result<Duration> {
    let mut counters = 0u64;
    let start = Instant::now();
    for (d, raw) in reports {
        let (id, key) = &keys[*d];
        let p = device_report::open(raw, id, Stream::State)
            .and_then(|o| o.verify(key))
            .with_context(|| format!("report from {id}"))?;
        counters = counters.wrapping_add(p.counter);
    }
    let took = start.elapsed();
    std::hint::black_box(counters);
    Ok(took)
}

/// Open every report and verify them in batches of `batch`, on this thread; the time it took.
pub fn verify_batched(
    reports: &[(usize, Vec<u8>)],
    keys: &[(String, PublicKey)],
    batch: usize,
) -> anyhow::Result<Duration> {
    let mut counters = 0u64;
    let start = Instant::now();
    for chunk in reports.chunks(batch.max(1)) {
        let mut items = Vec::with_capacity(chunk.len());
        for (d, raw) in chunk {
            let (id, key) = &keys[*d];
            let o = device_report::open(raw, id, Stream::State)
                .with_context(|| format!("report from {id}"))?;
            items.push((o, key.clone()));
        }
        for r in device_report::verify_batch(items) {
            counters = counters.wrapping_add(r.context("a report in a batch")?.counter);
        }
    }
    let took = start.elapsed();
    std::hint::black_box(counters);
    Ok(took)
}

pub fn run(a: VerifyBenchArgs) -> anyhow::Result<()> {
    if a.n == 0 || a.devices == 0 {
        bail!("--n and --devices must be at least 1");
    }
    let devices = a.devices.min(a.n);
    if !a.json {
        eprintln!("signing {} state reports from {devices} devices…", a.n);
    }
    let (reports, keys) = build(a.n, devices, &a.id_prefix);
    let bytes: usize = reports.iter().map(|(_, r)| r.len()).sum();
    let took = verify_all(&reports, &keys)?;
    let opened = open_all(&reports, &keys);
    let batch = a.batch.max(1);
    let batched = verify_batched(&reports, &keys, batch)?
        .as_secs_f64()
        .max(1e-9);
    let batched_per_s = a.n as f64 / batched;
    let secs = took.as_secs_f64().max(1e-9);
    let per_s = a.n as f64 / secs;
    let r = VerifyBenchResult {
        reports: a.n,
        devices,
        mean_envelope_bytes: bytes / a.n,
        seconds: (secs * 1000.0).round() / 1000.0,
        per_s: per_s.round(),
        per_report_us: (secs * 1e7 / a.n as f64).round() / 10.0,
        open_us: (opened.as_secs_f64() * 1e7 / a.n as f64).round() / 10.0,
        batch,
        batched_per_s: batched_per_s.round(),
        batched_per_report_us: (batched * 1e7 / a.n as f64).round() / 10.0,
        goal_per_s: GOAL_PER_S,
        goal_met: per_s.max(batched_per_s) >= GOAL_PER_S as f64,
    };
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "verified {} signed reports on one core: one by one {}/s ({:.1} µs each, {:.1} µs of it parsing), in batches of {} {}/s ({:.1} µs each); {} B envelopes; goal ≥ {}/s",
            r.reports,
            thousands(per_s.round() as u64),
            r.per_report_us,
            r.open_us,
            r.batch,
            thousands(batched_per_s.round() as u64),
            r.batched_per_report_us,
            r.mean_envelope_bytes,
            thousands(GOAL_PER_S),
        );
    }
    Ok(())
}

/// `25600` → `25,600`.
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_reports_that_verify() {
        let (reports, keys) = build(20, 3, "sim-");
        assert_eq!((reports.len(), keys.len()), (20, 3));
        verify_all(&reports, &keys).unwrap();
        verify_batched(&reports, &keys, 8).unwrap();
        let p = device_report::peek(&reports[4].1).unwrap();
        assert_eq!(p.device, "sim-00001");
        assert_eq!(p.body["update"]["phase"], "committed");
        // A report verified against another device's key fails the bench instead of counting.
        let mut wrong = reports.clone();
        wrong[0].0 = 1;
        assert!(verify_all(&wrong, &keys).is_err());
        assert!(verify_batched(&wrong, &keys, 8).is_err());
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(25_600), "25,600");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
