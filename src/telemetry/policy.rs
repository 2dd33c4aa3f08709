//! When to publish: a pure policy, no I/O and no clock of its own (the caller passes `now`).
//!
//! A sample is published when
//! - it is the first one,
//! - any metric with a deadband moved by more than its deadband relative to the LAST PUBLISHED
//!   value (not the previous sample, so a slow drift is reported once it adds up),
//! - a metric appeared or disappeared (a sensor went missing or came back),
//! - or `max_interval` has passed since the last publish (the heartbeat).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ferry_protocol::report::Telemetry;
use tokio::time::Instant;

/// Why a sample is published.
#[derive(Clone, Debug, PartialEq)]
pub enum Reason {
    First,
    Moved { metric: String, from: f64, to: f64 },
    Missing { metric: String },
    Returned { metric: String },
    Heartbeat,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::First => f.write_str("first sample"),
            Reason::Moved { metric, from, to } => write!(f, "{metric} moved {from} -> {to}"),
            Reason::Missing { metric } => write!(f, "{metric} went missing"),
            Reason::Returned { metric } => write!(f, "{metric} came back"),
            Reason::Heartbeat => f.write_str("heartbeat"),
        }
    }
}

#[derive(Debug)]
struct Published {
    at: Instant,
    values: BTreeMap<String, f64>,
}

#[derive(Debug)]
pub struct ReportPolicy {
    deadbands: BTreeMap<String, f64>,
    max_interval: Duration,
    last: Option<Published>,
}

/// The numeric metrics of a sample, by name: its sensors and its system metrics.
pub fn metrics(t: &Telemetry) -> BTreeMap<String, f64> {
    let s = &t.system;
    let mut m: BTreeMap<String, f64> = t.sensors.clone();
    m.insert("cpu_pct".into(), s.cpu_pct);
    m.insert("mem_used_bytes".into(), s.mem_used_bytes as f64);
    m.insert("mem_total_bytes".into(), s.mem_total_bytes as f64);
    m.insert("disk_free_bytes".into(), s.disk_free_bytes as f64);
    m.insert("uptime_s".into(), s.uptime_s as f64);
    for (k, v) in &s.extra {
        if let Some(x) = v.as_f64() {
            m.insert(k.clone(), x);
        }
    }
    m
}

impl ReportPolicy {
    pub fn new(deadbands: BTreeMap<String, f64>, max_interval: Duration) -> ReportPolicy {
        ReportPolicy {
            deadbands,
            max_interval,
            last: None,
        }
    }

    /// Decide about the sample taken at `now`. `Some(reason)` means publish it; the sample then
    /// becomes the reference for the deadbands and the heartbeat.
    pub fn decide(&mut self, now: Instant, sample: &Telemetry) -> Option<Reason> {
        let values = metrics(sample);
        let reason = self.reason(now, &values);
        if reason.is_some() {
            self.last = Some(Published { at: now, values });
        }
        reason
    }

    fn reason(&self, now: Instant, values: &BTreeMap<String, f64>) -> Option<Reason> {
        let Some(last) = &self.last else {
            return Some(Reason::First);
        };
        let old: BTreeSet<&String> = last.values.keys().collect();
        let new: BTreeSet<&String> = values.keys().collect();
        if let Some(m) = old.difference(&new).next() {
            return Some(Reason::Missing {
                metric: (*m).clone(),
            });
        }
        if let Some(m) = new.difference(&old).next() {
            return Some(Reason::Returned {
                metric: (*m).clone(),
            });
        }
        for (metric, to) in values {
            let (Some(band), Some(from)) = (self.deadbands.get(metric), last.values.get(metric))
            else {
                continue;
            };
            if (to - from).abs() > *band {
                return Some(Reason::Moved {
                    metric: metric.clone(),
                    from: *from,
                    to: *to,
                });
            }
        }
        if now.saturating_duration_since(last.at) >= self.max_interval {
            return Some(Reason::Heartbeat);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use ferry_protocol::report::SystemMetrics;
    use proptest::prelude::*;

    fn sample(temp: Option<f64>, cpu: f64, uptime: u64) -> Telemetry {
        let mut sensors = BTreeMap::new();
        let mut missing = BTreeMap::new();
        match temp {
            Some(t) => {
                sensors.insert("temperature_c".to_string(), t);
            }
            None => {
                missing.insert("temperature_c".to_string(), "vanished".to_string());
            }
        }
        Telemetry {
            device: "d".into(),
            ts: Utc::now(),
            sensors,
            system: SystemMetrics {
                cpu_pct: cpu,
                mem_used_bytes: 100 << 20,
                mem_total_bytes: 512 << 20,
                disk_free_bytes: 1 << 30,
                uptime_s: uptime,
                extra: BTreeMap::new(),
            },
            missing,
            dropped: None,
        }
    }

    fn policy() -> ReportPolicy {
        let bands = [("temperature_c", 0.5), ("cpu_pct", 25.0)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        ReportPolicy::new(bands, Duration::from_secs(900))
    }

    /// Drives the policy on tokio's paused clock, one sample per minute.
    #[tokio::test(start_paused = true)]
    async fn deadband_relative_to_last_published_and_heartbeat() {
        let mut p = policy();
        let t0 = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        let mut decisions = Vec::new();
        // Temperature creeps up 0.2 °C a minute; CPU and uptime jitter (no deadband on uptime).
        for i in 0..10u64 {
            let now = tick.tick().await;
            let temp = 20.0 + 0.2 * i as f64;
            let d = p.decide(
                now,
                &sample(Some(temp), 3.0 + (i % 3) as f64, 1000 + 60 * i),
            );
            decisions.push((now - t0, d));
        }
        let published: Vec<u64> = decisions
            .iter()
            .filter(|(_, d)| d.is_some())
            .map(|(at, _)| at.as_secs() / 60)
            .collect();
        // 20.0 first; 20.6 is > 0.5 away from 20.0; 21.2 from 20.6; 21.8 from 21.2.
        assert_eq!(published, vec![0, 3, 6, 9], "{decisions:?}");
        assert!(matches!(
            &decisions[3].1,
            Some(Reason::Moved { metric, .. }) if metric == "temperature_c"
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn steady_readings_publish_only_the_heartbeat() {
        let mut p = policy();
        let start = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        let mut at = Vec::new();
        for i in 0..61u64 {
            let now = tick.tick().await;
            if let Some(r) = p.decide(now, &sample(Some(21.0), 2.0, i * 60)) {
                at.push(((now - start).as_secs(), r));
            }
        }
        assert_eq!(
            at,
            vec![
                (0, Reason::First),
                (900, Reason::Heartbeat),
                (1800, Reason::Heartbeat),
                (2700, Reason::Heartbeat),
                (3600, Reason::Heartbeat),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn missing_and_returning_sensors_publish() {
        let mut p = policy();
        let now = Instant::now();
        assert_eq!(
            p.decide(now, &sample(Some(21.0), 1.0, 1)),
            Some(Reason::First)
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(
            p.decide(Instant::now(), &sample(None, 1.0, 2)),
            Some(Reason::Missing {
                metric: "temperature_c".into()
            })
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(p.decide(Instant::now(), &sample(None, 1.0, 3)), None);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(
            p.decide(Instant::now(), &sample(Some(21.0), 1.0, 4)),
            Some(Reason::Returned {
                metric: "temperature_c".into()
            })
        );
    }

    #[test]
    fn cpu_spike_past_its_deadband_publishes() {
        let mut p = policy();
        let now = Instant::now();
        p.decide(now, &sample(Some(21.0), 5.0, 1));
        assert_eq!(p.decide(now, &sample(Some(21.0), 29.0, 2)), None);
        assert!(matches!(
            p.decide(now, &sample(Some(21.0), 31.0, 3)),
            Some(Reason::Moved { metric, .. }) if metric == "cpu_pct"
        ));
    }

    proptest! {
        /// Whatever the readings: two consecutive publishes are never more than
        /// `max_interval` apart, and a skipped sample is within every deadband of the last
        /// published one.
        #[test]
        fn skipped_samples_are_within_deadband(temps in proptest::collection::vec(15.0f64..30.0, 1..200)) {
            let mut p = policy();
            let start = Instant::now();
            let mut last_pub: Option<(u64, f64)> = None;
            for (i, t) in temps.iter().enumerate() {
                let now = start + Duration::from_secs(60 * i as u64);
                let d = p.decide(now, &sample(Some(*t), 1.0, i as u64));
                match (d, last_pub) {
                    (Some(_), _) => last_pub = Some((i as u64, *t)),
                    (None, Some((at, lt))) => {
                        prop_assert!((t - lt).abs() <= 0.5);
                        prop_assert!((i as u64 - at) * 60 < 900);
                    }
                    (None, None) => prop_assert!(false, "first sample skipped"),
                }
            }
        }
    }
}
