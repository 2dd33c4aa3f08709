//! Prometheus metrics: counters bumped where things happen (lock-free), gauges recomputed by
//! the core after each commit, rendered as text exposition format on `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub state_messages: Counter,
    pub online_messages: Counter,
    pub event_messages: Counter,
    pub telemetry_messages: Counter,
    /// Device messages that did not parse (dropped, logged).
    pub bad_messages: Counter,
    /// States whose sequence was too far ahead of the controller's own to be believed.
    pub disbelieved_sequences: Counter,
    pub notices_published: Counter,
    pub publish_errors: Counter,
    pub rollout_pauses: Counter,
    pub api_requests: Counter,
    pub api_errors: Counter,
    pub mqtt_connected: AtomicU64,
    /// 1 while this replica holds the leader lease (always, without replicas).
    pub leader: AtomicU64,
    /// Device reports dropped by reason (`unsigned`, `bad_signature`, `replayed`, ...).
    pub dropped_reports: Mutex<BTreeMap<&'static str, u64>>,
    /// When each drop reason was last logged at warn (unix seconds).
    drop_logged: Mutex<BTreeMap<&'static str, u64>>,
    /// `name{labels}` → value, replaced by the core after each commit.
    pub gauges: Mutex<BTreeMap<String, u64>>,
}

impl Metrics {
    pub fn report_dropped(&self, reason: &'static str) {
        *self
            .dropped_reports
            .lock()
            .expect("metrics lock")
            .entry(reason)
            .or_default() += 1;
    }

    /// At most one warn line per reason per minute.
    pub fn should_log_drop(&self, reason: &'static str) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut m = self.drop_logged.lock().expect("metrics lock");
        let last = m.entry(reason).or_insert(0);
        if now >= *last + 60 {
            *last = now;
            true
        } else {
            false
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let status =
            self.state_messages.get() + self.online_messages.get() + self.event_messages.get();
        let counters = [
            (
                "ferry_status_messages_total",
                "Device state, online and event messages ingested.",
                None,
                status,
            ),
            (
                "ferry_device_messages_total",
                "Device messages by kind.",
                Some("kind=\"state\""),
                self.state_messages.get(),
            ),
            (
                "ferry_device_messages_total",
                "",
                Some("kind=\"online\""),
                self.online_messages.get(),
            ),
            (
                "ferry_device_messages_total",
                "",
                Some("kind=\"events\""),
                self.event_messages.get(),
            ),
            (
                "ferry_device_messages_total",
                "",
                Some("kind=\"telemetry\""),
                self.telemetry_messages.get(),
            ),
            (
                "ferry_bad_messages_total",
                "Device messages dropped because they did not parse.",
                None,
                self.bad_messages.get(),
            ),
            (
                "ferry_disbelieved_sequences_total",
                "Device states whose sequence lay too far ahead of the controller's own to be believed (kept at the last believable one).",
                None,
                self.disbelieved_sequences.get(),
            ),
            (
                "ferry_notices_published_total",
                "Signed desired-state notices handed to the broker.",
                None,
                self.notices_published.get(),
            ),
            (
                "ferry_publish_errors_total",
                "Notices the MQTT client refused.",
                None,
                self.publish_errors.get(),
            ),
            (
                "ferry_rollout_pauses_total",
                "Rollouts paused because a wave failed.",
                None,
                self.rollout_pauses.get(),
            ),
            (
                "ferry_api_requests_total",
                "HTTP API requests.",
                None,
                self.api_requests.get(),
            ),
            (
                "ferry_api_errors_total",
                "HTTP API requests answered with an error.",
                None,
                self.api_errors.get(),
            ),
        ];
        let mut last = "";
        for (name, help, labels, v) in counters {
            if name != last {
                let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
                last = name;
            }
            match labels {
                Some(l) => {
                    let _ = writeln!(s, "{name}{{{l}}} {v}");
                }
                None => {
                    let _ = writeln!(s, "{name} {v}");
                }
            }
        }
        let _ = writeln!(
            s,
            "# HELP ferry_reports_dropped_total Device reports dropped before the core saw them, by reason (unsigned, bad_signature, replayed, duplicate, unenrolled, wrong_device, malformed, too_large, bad_enrolment).\n# TYPE ferry_reports_dropped_total counter"
        );
        for (reason, n) in self.dropped_reports.lock().expect("metrics lock").iter() {
            let _ = writeln!(s, "ferry_reports_dropped_total{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(
            s,
            "# HELP ferry_mqtt_connected 1 while the controller is connected to the broker.\n# TYPE ferry_mqtt_connected gauge\nferry_mqtt_connected {}",
            self.mqtt_connected.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            s,
            "# HELP ferry_leader 1 while this replica leads (drives rollouts, signs notices).\n# TYPE ferry_leader gauge\nferry_leader {}",
            self.leader.load(Ordering::Relaxed)
        );
        let gauges = self.gauges.lock().expect("metrics lock");
        let mut last = String::new();
        for (k, v) in gauges.iter() {
            let name = k.split('{').next().unwrap_or(k);
            if name != last {
                let _ = writeln!(s, "# TYPE {name} gauge");
                last = name.to_string();
            }
            let _ = writeln!(s, "{k} {v}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_exposition_format() {
        let m = Metrics::default();
        m.state_messages.add(3);
        m.event_messages.add(2);
        m.gauges
            .lock()
            .unwrap()
            .insert("ferry_devices{health=\"healthy\"}".into(), 4);
        let t = m.render();
        assert!(t.contains("ferry_status_messages_total 5\n"), "{t}");
        assert!(t.contains("ferry_device_messages_total{kind=\"state\"} 3\n"));
        assert!(t.contains("# TYPE ferry_devices gauge\nferry_devices{health=\"healthy\"} 4\n"));
        // one TYPE line per metric name
        assert_eq!(t.matches("# TYPE ferry_device_messages_total").count(), 1);
    }
}
