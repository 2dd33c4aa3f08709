//! `ferryctl device watch ID`: subscribe to a device's state, events, online flag and telemetry
//! and print each message as it arrives; with `--until PHASE`, exit once an event with that phase
//! arrives (0 for `committed`, 1 otherwise; 1 on timeout too).
//!
//! Signed (v2) reports are shown by their body, NOT verified (this is a display tool for people;
//! `ferryctl serve` verifies every report before it acts on it). Reports are JSON that may grow fields, so they are parsed leniently: typed when they
//! fit the protocol's report types, as generic JSON (or text) when they do not.

use std::time::Duration;

use anyhow::{anyhow, Context};
use chrono::{DateTime, Local, Utc};
use clap::{Args, ValueEnum};
use ferry_protocol::report::TelemetryMessage;
use ferry_protocol::topics::{self, check_prefix, DeviceTopics, Kind, DEFAULT_PREFIX};
use ferry_protocol::{Event, Phase, StateReport, Telemetry};
use rumqttc::{ConnectionError, Event as MqttEvent, Packet, QoS, SubscribeFilter};
use serde_json::Value;

use crate::mqtt::{self, MqttArgs};
use crate::{exit, short_digest, usage, Output};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Until {
    Committed,
    RolledBack,
    Failed,
    Rejected,
    Superseded,
    /// committed, rolled_back, failed, rejected or superseded
    AnyTerminal,
}

impl Until {
    pub fn matches(self, phase: Phase) -> bool {
        match self {
            Until::Committed => phase == Phase::Committed,
            Until::RolledBack => phase == Phase::RolledBack,
            Until::Failed => phase == Phase::Failed,
            Until::Rejected => phase == Phase::Rejected,
            Until::Superseded => phase == Phase::Superseded,
            Until::AnyTerminal => phase.is_terminal(),
        }
    }
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Device id.
    #[arg(value_name = "ID")]
    pub device: String,
    #[command(flatten)]
    pub mqtt: MqttArgs,
    /// Topic prefix.
    #[arg(long, default_value = DEFAULT_PREFIX)]
    pub prefix: String,
    /// Exit when an event with this phase arrives (exit 0 for committed, 1 otherwise).
    #[arg(long, value_enum, value_name = "PHASE")]
    pub until: Option<Until>,
    /// Give up after this long (e.g. 90s, 10m); default 10m with --until, forever without.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,
}

/// A received message, interpreted.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    Event(Box<Event>),
    State(Box<StateReport>),
    Telemetry(TelemetryMessage),
    Online(bool),
    /// Empty retained payload: the topic was cleared.
    Cleared,
    /// JSON that does not fit the typed report.
    Json(Value),
    Text(String),
}

/// Parse a payload of `kind` leniently.
pub fn interpret(kind: Kind, payload: &[u8]) -> Report {
    if payload.is_empty() {
        return Report::Cleared;
    }
    let unwrapped;
    let payload = match ferry_protocol::device_report::peek(payload) {
        Some(p) => {
            if kind == Kind::Online {
                if let Some(on) = p.body.get("online").and_then(Value::as_bool) {
                    return Report::Online(on);
                }
            }
            unwrapped = serde_json::to_vec(&p.body).unwrap_or_default();
            &unwrapped[..]
        }
        None => payload,
    };
    match kind {
        Kind::Online => match payload {
            b"1" => return Report::Online(true),
            b"0" => return Report::Online(false),
            _ => {}
        },
        Kind::Events => {
            if let Ok(e) = serde_json::from_slice::<Event>(payload) {
                return Report::Event(Box::new(e));
            }
        }
        Kind::State => {
            if let Ok(s) = serde_json::from_slice::<StateReport>(payload) {
                return Report::State(Box::new(s));
            }
        }
        Kind::Telemetry => {
            if let Ok(t) = serde_json::from_slice::<TelemetryMessage>(payload) {
                return Report::Telemetry(t);
            }
        }
        Kind::Desired | Kind::Enroll => {}
    }
    match serde_json::from_slice::<Value>(payload) {
        Ok(v) => Report::Json(v),
        Err(_) => Report::Text(String::from_utf8_lossy(payload).into_owned()),
    }
}

/// The phase of an event, typed or not.
pub fn event_phase(r: &Report) -> Option<Phase> {
    match r {
        Report::Event(e) => Some(e.phase),
        Report::Json(v) => v
            .get("phase")
            .and_then(|p| serde_json::from_value::<Phase>(p.clone()).ok()),
        _ => None,
    }
}

fn mb(b: u64) -> String {
    format!("{:.1}", b as f64 / 1_000_000.0)
}

fn telemetry_line(t: &Telemetry) -> String {
    let mut parts: Vec<String> = t
        .sensors
        .iter()
        .map(|(k, v)| format!("{k}={}", trim_float(*v)))
        .collect();
    let s = &t.system;
    parts.push(format!("cpu={}%", trim_float(s.cpu_pct)));
    parts.push(format!(
        "mem={}/{}MB",
        s.mem_used_bytes / 1_000_000,
        s.mem_total_bytes / 1_000_000
    ));
    parts.push(format!("disk_free={}MB", s.disk_free_bytes / 1_000_000));
    parts.push(format!(
        "up={}",
        humantime::format_duration(Duration::from_secs(s.uptime_s))
    ));
    for (k, why) in &t.missing {
        parts.push(format!("{k}=? ({why})"));
    }
    if let Some(d) = t.dropped {
        parts.push(format!("dropped={d}"));
    }
    parts.join(" ")
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

fn one_line(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() > max {
        format!("{}…", flat.chars().take(max).collect::<String>())
    } else {
        flat
    }
}

/// The human line(s) for one message: `12:00:01 dev-001 event downloading sensor 1.2/3.4 MB`.
pub fn render(time: &str, device: &str, kind: Kind, r: &Report) -> String {
    let base = format!("{time} {device}");
    let head = match kind {
        Kind::Events => format!("{base} event"),
        other => format!("{base} {}", other.as_str()),
    };
    match r {
        Report::Event(e) => {
            let mut line = format!("{head} {}", e.phase);
            if let Some(app) = &e.app {
                line.push_str(&format!(" {app}"));
            }
            match (e.bytes, e.total) {
                (Some(b), Some(t)) => line.push_str(&format!(" {}/{} MB", mb(b), mb(t))),
                (Some(b), None) => line.push_str(&format!(" {} MB", mb(b))),
                (None, Some(t)) => line.push_str(&format!(" of {} MB", mb(t))),
                (None, None) => {}
            }
            line.push_str(&format!(" (seq {}", e.sequence));
            if let Some(r) = &e.rollout {
                line.push_str(&format!(", rollout {r}"));
            }
            line.push(')');
            match (e.waiting, &e.reason) {
                (Some(w), Some(r)) => {
                    line.push_str(&format!(", waiting: {w} ({})", one_line(r, 500)))
                }
                (Some(w), None) => line.push_str(&format!(", waiting: {w}")),
                (None, Some(r)) => line.push_str(&format!(": {}", one_line(r, 500))),
                (None, None) => {}
            }
            if let Some(d) = &e.download {
                line.push_str(&format!(
                    " [{} MB fetched, {} skipped, {} retries, {} resumes, {} restarts]",
                    mb(d.fetched_bytes),
                    d.skipped_blobs,
                    d.retries,
                    d.resumes,
                    d.restarts
                ));
            }
            for l in e.logs.iter().flatten() {
                line.push_str(&format!("\n    | {}", one_line(l, 500)));
            }
            line
        }
        Report::State(s) => {
            let mut line = format!(
                "{head} seq {} agent {} {}",
                s.sequence, s.agent_version, s.platform
            );
            if s.apps.is_empty() {
                line.push_str(" apps: none");
            }
            for (name, a) in &s.apps {
                line.push_str(&format!(
                    " {name}={}({}, {})",
                    a.version,
                    a.health,
                    short_digest(&a.digest)
                ));
            }
            if let Some(u) = &s.update {
                line.push_str(&format!(" | update seq {} {}", u.sequence, u.phase));
                if let Some(err) = &u.error {
                    line.push_str(&format!(": {}", one_line(err, 300)));
                }
                if let Some(w) = u.waiting {
                    line.push_str(&format!(", waiting: {w}"));
                    if let Some(r) = &u.reason {
                        line.push_str(&format!(" ({})", one_line(r, 300)));
                    }
                }
            }
            line
        }
        Report::Telemetry(TelemetryMessage::One(t)) => format!("{head} {}", telemetry_line(t)),
        Report::Telemetry(TelemetryMessage::Batch(v)) => match v.last() {
            Some(t) => format!(
                "{head} batch of {} samples, latest {}: {}",
                v.len(),
                t.ts.with_timezone(&Local).format("%H:%M:%S"),
                telemetry_line(t)
            ),
            None => format!("{head} empty batch"),
        },
        Report::Online(true) => format!("{base} online"),
        Report::Online(false) => format!("{base} offline"),
        Report::Cleared => format!("{head} (cleared)"),
        Report::Json(v) => {
            let phase = v.get("phase").and_then(Value::as_str);
            match phase {
                Some(p) => format!("{head} {p} {}", one_line(&v.to_string(), 300)),
                None => format!("{head} {}", one_line(&v.to_string(), 300)),
            }
        }
        Report::Text(t) => format!("{head} {}", one_line(t, 300)),
    }
}

/// The JSON line for one message (`--json`).
pub fn render_json(
    received: DateTime<Utc>,
    device: &str,
    topic: &str,
    kind: Kind,
    payload: &[u8],
) -> Value {
    // A signed report: its body as `payload`, the signer and counter beside it (unverified).
    if let Some(p) = ferry_protocol::device_report::peek(payload) {
        let body = match (kind, p.body.get("online").and_then(Value::as_bool)) {
            (Kind::Online, Some(on)) => Value::from(u8::from(on)),
            _ => p.body,
        };
        return serde_json::json!({
            "received_at": received,
            "device": device,
            "kind": kind.as_str(),
            "topic": topic,
            "payload": body,
            "signed": {"counter": p.counter, "verified": false},
        });
    }
    let payload_value = if payload.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice::<Value>(payload)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(payload).into_owned()))
    };
    serde_json::json!({
        "received_at": received,
        "device": device,
        "kind": kind.as_str(),
        "topic": topic,
        "payload": payload_value,
    })
}

pub async fn run(args: WatchArgs, out: Output) -> anyhow::Result<u8> {
    check_prefix(&args.prefix).map_err(usage)?;
    let t = DeviceTopics::new(&args.prefix, &args.device).map_err(usage)?;
    mqtt::parse_broker_url(&args.mqtt.broker).map_err(|e| usage(e.to_string()))?;
    let timeout = args
        .timeout
        .or(args.until.map(|_| Duration::from_secs(600)));
    let subs = [t.state(), t.events(), t.online(), t.telemetry()];

    let watch = async {
        let (client, mut eventloop) = mqtt::connect(&args.mqtt, "watch").await?;
        let mut backoff = Duration::from_millis(500);
        // The first CONNACK was consumed by connect(): subscribe now, and again after every
        // reconnect (clean session).
        let mut need_subscribe = true;
        loop {
            if need_subscribe {
                // One SUBSCRIBE for all four topics: one SUBACK says we are listening.
                let filters = subs
                    .iter()
                    .map(|t| SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
                client
                    .subscribe_many(filters)
                    .await
                    .context("cannot subscribe")?;
                need_subscribe = false;
            }
            match eventloop.poll().await {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                    eprintln!("ferryctl: reconnected");
                    backoff = Duration::from_millis(500);
                    need_subscribe = true;
                }
                Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                    // Always on stderr: scripts wait for this line before acting.
                    eprintln!("ferryctl: watching {} on {}", args.device, args.mqtt.broker);
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    let Some((device, kind)) = topics::parse(&args.prefix, &p.topic) else {
                        continue;
                    };
                    let report = interpret(kind, &p.payload);
                    if out.json {
                        out.json_line(&render_json(
                            Utc::now(),
                            &device,
                            &p.topic,
                            kind,
                            &p.payload,
                        ));
                    } else {
                        let time = Local::now().format("%H:%M:%S").to_string();
                        println!("{}", render(&time, &device, kind, &report));
                    }
                    if kind == Kind::Events {
                        if let (Some(until), Some(phase)) = (args.until, event_phase(&report)) {
                            if until.matches(phase) {
                                let _ = client.disconnect().await;
                                return Ok(if phase == Phase::Committed {
                                    exit::OK
                                } else {
                                    exit::FAILURE
                                });
                            }
                        }
                    }
                }
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(code)) => {
                    return Err(anyhow!(
                        "{}",
                        mqtt::describe(&ConnectionError::ConnectionRefused(code))
                    ));
                }
                Err(e) => {
                    eprintln!(
                        "ferryctl: connection to {} lost: {}; retrying in {:?}",
                        args.mqtt.broker,
                        mqtt::describe(&e),
                        backoff
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    };
    match timeout {
        Some(limit) => match tokio::time::timeout(limit, watch).await {
            Ok(r) => r,
            Err(_) => {
                let what = match args.until {
                    Some(u) => format!(
                        "no {} event",
                        u.to_possible_value()
                            .map(|v| v.get_name().to_string())
                            .unwrap_or_default()
                    ),
                    None => "watch ended".to_string(),
                };
                eprintln!(
                    "ferryctl: {what} from {} within {}",
                    args.device,
                    humantime::format_duration(limit)
                );
                Ok(if args.until.is_some() {
                    exit::FAILURE
                } else {
                    exit::OK
                })
            }
        },
        None => watch.await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_line_matches_the_documented_shape() {
        let payload = br#"{"device":"dev-001","sequence":42,"rollout":"r-1","phase":"downloading","app":"sensor","bytes":1200000,"total":3400000,"ts":"2026-11-22T10:00:00Z","future_field":true}"#;
        let r = interpret(Kind::Events, payload);
        assert_eq!(event_phase(&r), Some(Phase::Downloading));
        let line = render("12:00:01", "dev-001", Kind::Events, &r);
        assert!(
            line.starts_with("12:00:01 dev-001 event downloading sensor 1.2/3.4 MB"),
            "{line}"
        );
        assert!(
            line.contains("seq 42") && line.contains("rollout r-1"),
            "{line}"
        );
    }

    #[test]
    fn waiting_events_and_states_say_what_for() {
        let payload = br#"{"device":"d","sequence":5,"rollout":"r-2","phase":"downloaded","waiting":"window","reason":"maintenance window 02:00-04:00 opens in 3 h","download":{"fetched_bytes":9000000,"skipped_blobs":2,"retries":1,"resumes":1,"restarts":0},"ts":"2026-11-22T10:00:00Z"}"#;
        let r = interpret(Kind::Events, payload);
        assert!(matches!(r, Report::Event(_)), "{r:?}");
        let line = render("t", "d", Kind::Events, &r);
        assert_eq!(
            line,
            "t d event downloaded (seq 5, rollout r-2), waiting: window (maintenance window 02:00-04:00 opens in 3 h) [9.0 MB fetched, 2 skipped, 1 retries, 1 resumes, 0 restarts]"
        );
        let state = serde_json::json!({
            "device": "d", "agent_version": "0.1.0", "platform": "linux/arm64", "sequence": 5,
            "apps": {},
            "update": {"sequence": 5, "rollout": null, "phase": "downloaded", "error": null,
                       "at": "2026-11-22T10:00:00Z", "waiting": "lock", "reason": "sensor holds its lock"},
            "ts": "2026-11-22T10:00:00Z"
        });
        let r = interpret(Kind::State, state.to_string().as_bytes());
        let line = render("t", "d", Kind::State, &r);
        assert!(
            line.ends_with("update seq 5 downloaded, waiting: lock (sensor holds its lock)"),
            "{line}"
        );
        assert!(Until::Superseded.matches(Phase::Superseded));
        assert!(Until::AnyTerminal.matches(Phase::Superseded));
    }

    #[test]
    fn rolled_back_event_with_reason_and_logs() {
        let payload = br#"{"device":"d","sequence":3,"rollout":null,"phase":"rolled_back","reason":"health check failed","logs":["boom","line 2"],"ts":"2026-11-22T10:00:00Z"}"#;
        let r = interpret(Kind::Events, payload);
        let line = render("t", "d", Kind::Events, &r);
        assert!(line.contains("rolled_back"), "{line}");
        assert!(line.contains(": health check failed"), "{line}");
        assert!(line.contains("\n    | boom"), "{line}");
        assert!(Until::AnyTerminal.matches(Phase::RolledBack));
        assert!(!Until::Committed.matches(Phase::RolledBack));
    }

    #[test]
    fn lenient_fallbacks() {
        // Missing required fields: generic JSON, phase still found.
        let r = interpret(Kind::Events, br#"{"phase":"committed"}"#);
        assert!(matches!(r, Report::Json(_)));
        assert_eq!(event_phase(&r), Some(Phase::Committed));
        let r = interpret(Kind::Events, br#"{"phase":"teleported"}"#);
        assert_eq!(event_phase(&r), None);
        assert!(matches!(
            interpret(Kind::State, b"not json"),
            Report::Text(_)
        ));
        assert_eq!(interpret(Kind::Online, b"1"), Report::Online(true));
        assert_eq!(interpret(Kind::Online, b"0"), Report::Online(false));
        assert_eq!(interpret(Kind::State, b""), Report::Cleared);
        assert_eq!(
            render("t", "d", Kind::Online, &Report::Online(false)),
            "t d offline"
        );
        assert_eq!(
            render("t", "d", Kind::Online, &Report::Online(true)),
            "t d online"
        );
    }

    #[test]
    fn state_and_telemetry_lines() {
        let state = serde_json::json!({
            "device": "d", "agent_version": "0.1.0", "platform": "linux/arm64", "sequence": 7,
            "apps": {"sensor": {"version": "2.0.0", "digest": format!("sha256:{}", "a".repeat(64)), "container": "c", "health": "healthy"}},
            "update": {"sequence": 7, "rollout": null, "phase": "committed", "error": null, "at": "2026-11-22T10:00:00Z"},
            "ts": "2026-11-22T10:00:00Z"
        });
        let r = interpret(Kind::State, state.to_string().as_bytes());
        assert!(matches!(r, Report::State(_)), "{r:?}");
        let line = render("t", "d", Kind::State, &r);
        assert!(
            line.contains("seq 7") && line.contains("sensor=2.0.0(healthy"),
            "{line}"
        );
        assert!(line.contains("update seq 7 committed"), "{line}");

        let tel = serde_json::json!({
            "device": "d", "ts": "2026-11-22T10:00:00Z",
            "sensors": {"temperature_c": 21.5, "humidity_pct": 40.0},
            "system": {"cpu_pct": 12.25, "mem_used_bytes": 100000000u64, "mem_total_bytes": 512000000u64, "disk_free_bytes": 1000000000u64, "uptime_s": 3600, "load1": 0.5}
        });
        let r = interpret(Kind::Telemetry, tel.to_string().as_bytes());
        let line = render("t", "d", Kind::Telemetry, &r);
        assert!(
            line.contains("temperature_c=21.5") && line.contains("humidity_pct=40"),
            "{line}"
        );
        assert!(
            line.contains("cpu=12.25%") && line.contains("mem=100/512MB"),
            "{line}"
        );
        let batch = serde_json::json!([tel, tel]);
        let r = interpret(Kind::Telemetry, batch.to_string().as_bytes());
        assert!(render("t", "d", Kind::Telemetry, &r).contains("batch of 2"));
    }

    #[test]
    fn json_lines_carry_the_raw_payload() {
        let v = render_json(
            Utc::now(),
            "d",
            "ferry/v1/devices/d/online",
            Kind::Online,
            b"1",
        );
        assert_eq!(v["kind"], "online");
        assert_eq!(v["payload"], 1);
        let v = render_json(Utc::now(), "d", "t", Kind::State, b"x y");
        assert_eq!(v["payload"], "x y");
    }
}
