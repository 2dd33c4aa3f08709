//! The controller's MQTT side: one connection that subscribes to every device's `state`,
//! `online` and `events` (re-subscribing on every CONNACK, so retained states refresh the
//! inventory after an outage), parses them off the core's loop, and carries the notices the
//! core publishes. Reconnects forever with capped exponential backoff.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use std::sync::Mutex;

use chrono::{DateTime, Utc};
use ferry_protocol::device_report::{self, OnlineBody, ReportError, Stream};
use ferry_protocol::report::{Event, StateReport, TelemetryMessage};
use ferry_protocol::topics::{self, Kind};
use rumqttc::v5::mqttbytes::v5::{Filter, Packet as Packet5};
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::{AsyncClient as AsyncClient5, Event as MqttEvent5};
use rumqttc::{AsyncClient, Event as MqttEvent, Packet};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::config::MqttSection;
use super::core::Inbound;
use super::enrolment::{self, Dropped, Registry};
use super::metrics::Metrics;
use crate::mqtt::{describe, describe_v5, options, options_v5, MqttArgs, MAX_PACKET};

/// Two connections: one subscribes and reads the devices' messages (MQTT 5, so that the broker
/// drops messages over [`MAX_PACKET`] for it instead of one such message breaking the
/// connection in a loop; see [`options_v5`]), the other carries the notices out (MQTT 3.1.1). On one connection rumqttc's event loop interleaves one outgoing publish per
/// round with batches of incoming messages, so a wave's notices would trickle out at the pace
/// of the reports flooding back (measured with `benches/scale.sh`: ~1,000 notices/s).
pub struct Link {
    pub client: AsyncClient5,
    pub publisher: AsyncClient,
    pub task: JoinHandle<()>,
    pub publisher_task: JoinHandle<()>,
    /// Verifies the device messages the MQTT task reads, in batches when they queue up.
    pub verifier_task: JoinHandle<()>,
}

/// Why a device message was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadMessage {
    /// Not signed by the device's key, replayed, unenrolled, ... (see [`Dropped`]).
    #[error("{kind} from {device}: {why}")]
    Unverified {
        device: String,
        kind: &'static str,
        why: Dropped,
    },
    #[error("{kind} from {device}: {detail}")]
    Malformed {
        device: String,
        kind: &'static str,
        detail: String,
    },
    #[error("{kind} on {device}'s topic names device {named:?}")]
    WrongDevice {
        device: String,
        kind: &'static str,
        named: String,
    },
}

impl BadMessage {
    /// The `reason` label of `ferry_reports_dropped_total`.
    pub fn label(&self) -> &'static str {
        match self {
            BadMessage::Unverified { why, .. } => why.label(),
            BadMessage::Malformed { .. } => "malformed",
            BadMessage::WrongDevice { .. } => "wrong_device",
        }
    }
}

/// Verify and parse one device message. `Ok(None)`: not for us (other topics, cleared retained
/// messages) or an enrolment request (handled by the registry).
pub fn parse(
    prefix: &str,
    topic: &str,
    payload: &[u8],
    registry: &Mutex<Registry>,
    now: DateTime<Utc>,
) -> Result<Option<Inbound>, BadMessage> {
    let Some((device, kind)) = topics::parse(prefix, topic) else {
        return Ok(None);
    };
    let Some(stream) = kind.stream() else {
        return Ok(None);
    };
    if payload.is_empty() {
        return Ok(None);
    }
    let name = stream.as_str();
    let Some(report) =
        enrolment::verify(registry, &device, stream, payload, now).map_err(|why| {
            BadMessage::Unverified {
                device: device.clone(),
                kind: name,
                why,
            }
        })?
    else {
        return Ok(None);
    };
    parse_body(device, stream, report.body)
}

/// Reports verified together at most (what one wake-up of the verifier drains from its queue).
pub const VERIFY_BATCH: usize = 64;

/// [`parse`] for several messages at once, in order, with the signatures checked by one batch
/// verification ([`device_report::verify_batch`]): the same result for each message as
/// [`parse`] one by one. Enrolment requests are handled as they come (they are rare), before
/// the reports after them are looked up, as one by one.
pub fn parse_batch(
    prefix: &str,
    messages: &[(String, bytes::Bytes)],
    registry: &Mutex<Registry>,
    now: DateTime<Utc>,
) -> Vec<Result<Option<Inbound>, BadMessage>> {
    let lock = || registry.lock().unwrap_or_else(|p| p.into_inner());
    let mut out: Vec<Option<Result<Option<Inbound>, BadMessage>>> =
        (0..messages.len()).map(|_| None).collect();
    // (index, device, stream) of the reports to verify, and what to verify them with.
    let mut pending = Vec::new();
    let mut items = Vec::new();
    for (i, (topic, payload)) in messages.iter().enumerate() {
        let Some((device, kind)) = topics::parse(prefix, topic) else {
            out[i] = Some(Ok(None));
            continue;
        };
        let (Some(stream), false) = (kind.stream(), payload.is_empty()) else {
            out[i] = Some(Ok(None));
            continue;
        };
        let unverified = |device: &str, why: Dropped| BadMessage::Unverified {
            device: device.to_string(),
            kind: stream.as_str(),
            why,
        };
        if stream == Stream::Enroll {
            out[i] = Some(
                enrolment::verify(registry, &device, stream, payload, now)
                    .map(|_| None)
                    .map_err(|why| unverified(&device, why)),
            );
            continue;
        }
        let opened = match device_report::open(payload, &device, stream) {
            Ok(o) => o,
            Err(e) => {
                out[i] = Some(Err(unverified(&device, e.into())));
                continue;
            }
        };
        let Some(key) = lock().key_of(&device) else {
            let why = ReportError::Unenrolled(device.clone()).into();
            out[i] = Some(Err(unverified(&device, why)));
            continue;
        };
        pending.push((i, device, stream));
        items.push((opened, key));
    }
    let verified = device_report::verify_batch(items);
    for ((i, device, stream), result) in pending.into_iter().zip(verified) {
        let unverified = |why: Dropped| BadMessage::Unverified {
            device: device.clone(),
            kind: stream.as_str(),
            why,
        };
        out[i] = Some(match result {
            Err(e) => Err(unverified(e.into())),
            Ok(payload) => match lock().admit(&payload) {
                Err(why) => Err(unverified(why)),
                Ok(()) => parse_body(device.clone(), stream, payload.body),
            },
        });
    }
    out.into_iter()
        .map(|r| r.expect("every message has a result"))
        .collect()
}

/// A device message as the MQTT task hands it to the verifier, in the order they arrived.
enum Raw {
    /// The connection is (back) up: passed on to the core behind the messages before it.
    Connected,
    Message(String, bytes::Bytes),
}

/// The v1 body of a verified report.
fn parse_body(device: String, stream: Stream, body: Value) -> Result<Option<Inbound>, BadMessage> {
    let malformed = |kind: &'static str, detail: String| BadMessage::Malformed {
        device: device.clone(),
        kind,
        detail,
    };
    match stream {
        Stream::State => {
            let s: StateReport =
                serde_json::from_value(body).map_err(|e| malformed("state", e.to_string()))?;
            if s.device != device {
                return Err(BadMessage::WrongDevice {
                    device,
                    kind: "state",
                    named: s.device,
                });
            }
            Ok(Some(Inbound::State(Box::new(s))))
        }
        Stream::Events => {
            let e: Event =
                serde_json::from_value(body).map_err(|e| malformed("event", e.to_string()))?;
            if e.device != device {
                return Err(BadMessage::WrongDevice {
                    device,
                    kind: "event",
                    named: e.device,
                });
            }
            Ok(Some(Inbound::Event(Box::new(e))))
        }
        Stream::Online => {
            let o: OnlineBody =
                serde_json::from_value(body).map_err(|e| malformed("online", e.to_string()))?;
            Ok(Some(Inbound::Online {
                device,
                online: o.online,
            }))
        }
        Stream::Telemetry => {
            let m: TelemetryMessage =
                serde_json::from_value(body).map_err(|e| malformed("telemetry", e.to_string()))?;
            let samples = match m {
                TelemetryMessage::One(t) => vec![*t],
                TelemetryMessage::Batch(v) => v,
            };
            if let Some(s) = samples.iter().find(|s| s.device != device) {
                return Err(BadMessage::WrongDevice {
                    device,
                    kind: "telemetry",
                    named: s.device.clone(),
                });
            }
            Ok(Some(Inbound::Telemetry { device, samples }))
        }
        Stream::Enroll => Ok(None),
    }
}

pub fn start(
    cfg: &MqttSection,
    password: Option<String>,
    tx: mpsc::Sender<Inbound>,
    registry: Arc<Mutex<Registry>>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) -> Result<Link, String> {
    let args = MqttArgs {
        broker: cfg.url.clone(),
        mqtt_user: cfg.username.clone(),
        mqtt_password: password,
        mqtt_ca: cfg.ca.clone(),
        mqtt_cert: cfg.cert.clone(),
        mqtt_key: cfg.key.clone(),
        mqtt_timeout: 30,
    };
    let notice_args = MqttArgs {
        mqtt_cert: cfg.notices_cert.clone(),
        mqtt_key: cfg.notices_key.clone(),
        ..args.clone()
    };
    let (mut opts, url) = options_v5(&args, "serve").map_err(|e| format!("{e:#}"))?;
    let (mut popts, _) = options(&notice_args, "serve").map_err(|e| format!("{e:#}"))?;
    if let Some(id) = &cfg.client_id {
        opts.set_client_id(id.clone());
    }
    opts.set_keep_alive(Duration::from_secs(30));
    popts.set_keep_alive(Duration::from_secs(30));
    popts.set_inflight(1000);
    popts.set_client_id(format!("{}-notices", opts.client_id()));
    let (client, mut eventloop) = AsyncClient5::new(opts, 64);
    // Room for a whole fleet's notices in one round (10,000 devices).
    let (publisher, mut peventloop) = AsyncClient::new(popts, 20_000);
    let pub_url = url.clone();
    let mut pstop = stop.clone();
    let pub_metrics = metrics.clone();
    let publisher_task = tokio::spawn(async move {
        let mut backoff = Duration::from_millis(500);
        loop {
            let ev = tokio::select! {
                _ = pstop.wait_for(|s| *s) => break,
                ev = peventloop.poll() => ev,
            };
            match ev {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                    debug!(broker = %pub_url, "notice connection up");
                    backoff = Duration::from_millis(500);
                }
                Ok(_) => {}
                Err(e) => {
                    pub_metrics.publish_errors.inc();
                    debug!(broker = %pub_url, error = %describe(&e), retry_in = ?backoff, "notice connection down");
                    tokio::select! {
                        _ = pstop.wait_for(|s| *s) => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    });
    let prefix = cfg.topic_prefix.clone();
    let sub = client.clone();
    // The verifier: off the MQTT task, so that reads go on while it verifies; whatever queued
    // meanwhile is verified as one batch (up to VERIFY_BATCH).
    let (raw_tx, mut raw_rx) = mpsc::channel::<Raw>(4 * VERIFY_BATCH);
    let vprefix = prefix.clone();
    let vmetrics = metrics.clone();
    let verifier_task = tokio::spawn(async move {
        let mut batch: Vec<(String, bytes::Bytes)> = Vec::with_capacity(VERIFY_BATCH);
        let mut next: Option<Raw> = None;
        loop {
            let first = match next.take() {
                Some(r) => r,
                None => match raw_rx.recv().await {
                    Some(r) => r,
                    None => break,
                },
            };
            let Raw::Message(topic, payload) = first else {
                if tx.send(Inbound::Connected).await.is_err() {
                    break;
                }
                continue;
            };
            batch.push((topic, payload));
            while batch.len() < VERIFY_BATCH {
                match raw_rx.try_recv() {
                    Ok(Raw::Message(t, p)) => batch.push((t, p)),
                    // Behind this batch, in order.
                    Ok(Raw::Connected) => {
                        next = Some(Raw::Connected);
                        break;
                    }
                    Err(_) => break,
                }
            }
            let results = parse_batch(&vprefix, &batch, &registry, Utc::now());
            for ((topic, _), result) in batch.drain(..).zip(results) {
                match result {
                    Ok(Some(m)) => {
                        match &m {
                            Inbound::State(_) => vmetrics.state_messages.inc(),
                            Inbound::Online { .. } => vmetrics.online_messages.inc(),
                            Inbound::Event(_) => vmetrics.event_messages.inc(),
                            Inbound::Telemetry { .. } => vmetrics.telemetry_messages.inc(),
                            Inbound::Connected => {}
                        }
                        if tx.send(m).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        vmetrics.bad_messages.inc();
                        vmetrics.report_dropped(e.label());
                        // A flood of forgeries must not flood the log: the count is in
                        // /metrics, the first of each kind per minute in the log.
                        if e.label() != "duplicate" && vmetrics.should_log_drop(e.label()) {
                            warn!(topic, reason = e.label(), error = %e, "device message dropped");
                        } else {
                            debug!(topic, reason = e.label(), error = %e, "device message dropped");
                        }
                    }
                }
            }
        }
    });
    let task = tokio::spawn(async move {
        let filters: Vec<Filter> = [
            Kind::Enroll,
            Kind::State,
            Kind::Online,
            Kind::Events,
            Kind::Telemetry,
        ]
        .into_iter()
        .map(|k| Filter::new(topics::all_devices(&prefix, k), QoS5::AtLeastOnce))
        .collect();
        let mut backoff = Duration::from_millis(500);
        loop {
            let ev = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                ev = eventloop.poll() => ev,
            };
            match ev {
                Ok(MqttEvent5::Incoming(Packet5::ConnAck(ack))) => {
                    let max = ack.properties.as_ref().and_then(|p| p.max_packet_size);
                    info!(broker = %url, max_packet_in = MAX_PACKET, broker_max_packet = ?max,
                          "connected to the broker");
                    metrics.mqtt_connected.store(1, Ordering::Relaxed);
                    backoff = Duration::from_millis(500);
                    if let Err(e) = sub.try_subscribe_many(filters.clone()) {
                        warn!(error = %e, "cannot subscribe");
                    }
                    if raw_tx.send(Raw::Connected).await.is_err() {
                        break;
                    }
                }
                Ok(MqttEvent5::Incoming(Packet5::Publish(p))) => {
                    let Ok(topic) = std::str::from_utf8(&p.topic) else {
                        metrics.bad_messages.inc();
                        warn!(topic = ?p.topic, "device message dropped: topic is not UTF-8");
                        continue;
                    };
                    if raw_tx
                        .send(Raw::Message(topic.to_string(), p.payload))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Ok(other) => debug!(?other, "mqtt"),
                Err(e) => {
                    if metrics.mqtt_connected.swap(0, Ordering::Relaxed) == 1 {
                        warn!(broker = %url, error = %describe_v5(&e), "lost the broker; reconnecting");
                    } else {
                        debug!(broker = %url, error = %describe_v5(&e), retry_in = ?backoff, "broker unreachable");
                    }
                    let jitter = fastrand::u64(0..=backoff.as_millis() as u64 / 2);
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => break,
                        _ = tokio::time::sleep(backoff + Duration::from_millis(jitter)) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        metrics.mqtt_connected.store(0, Ordering::Relaxed);
    });
    Ok(Link {
        client,
        publisher,
        task,
        publisher_task,
        verifier_task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::device_report::{self as dr, EnrollBody};
    use ferry_protocol::keys::PrivateKey;

    /// The outcome of a message, comparable (Inbound is not `PartialEq`).
    fn outcome(r: &Result<Option<Inbound>, BadMessage>) -> String {
        match r {
            Ok(None) => "none".into(),
            Ok(Some(m)) => format!("{m:?}"),
            Err(e) => format!("dropped {}: {e}", e.label()),
        }
    }

    #[test]
    fn a_batch_gives_what_one_by_one_gives() {
        let p = "ferry";
        let now = Utc::now();
        let token = "0123456789abcdef";
        let ka = PrivateKey::from_seed([7; 32]).unwrap();
        let kb = PrivateKey::from_seed([8; 32]).unwrap();
        let enroll = |k: &PrivateKey, d: &str| {
            let body = EnrollBody {
                public_key: k.public().to_pem(),
                token_proof: Some(dr::token_proof(token, d, k.public().id())),
                agent_version: None,
            };
            dr::sign(k, d, Stream::Enroll, 1, serde_json::to_value(body).unwrap())
        };
        let online = |k: &PrivateKey, d: &str, c: u64| {
            dr::sign(k, d, Stream::Online, c, serde_json::json!({"online": true}))
        };
        let event = |k: &PrivateKey, d: &str, c: u64| {
            let ev = serde_json::json!({"device": d, "sequence": c, "rollout": null,
                                        "phase": "committed", "ts": "2026-11-22T10:00:00Z"});
            dr::sign(k, d, Stream::Events, c, ev)
        };
        let mut forged = event(&ka, "d1", 9);
        let at = forged.len() / 2;
        forged[at] ^= 1;
        let topic = |d: &str, s: &str| format!("ferry/v1/devices/{d}/{s}");
        let msgs: Vec<(String, bytes::Bytes)> = vec![
            (topic("d1", "online"), online(&ka, "d1", 1)), // not enrolled yet
            (topic("d1", "enroll"), enroll(&ka, "d1")),
            (topic("d1", "online"), online(&ka, "d1", 2)),
            (topic("d1", "events"), event(&ka, "d1", 3)),
            (topic("d1", "events"), event(&ka, "d1", 3)), // duplicate
            (topic("d1", "events"), event(&ka, "d1", 2)), // replayed
            (topic("d1", "events"), forged),              // bad signature (or malformed)
            (topic("d1", "events"), event(&kb, "d1", 4)), // another key
            (topic("d2", "enroll"), enroll(&kb, "d2")),
            (topic("d2", "events"), event(&kb, "d2", 5)),
            (
                topic("d2", "state"),
                dr::sign(&kb, "d2", Stream::State, 6, serde_json::json!({})),
            ),
            (topic("d1", "state"), Vec::new()),
            ("other/topic".into(), b"x".to_vec()),
            (topic("d1", "online"), b"1".to_vec()), // unsigned
            (topic("d1", "events"), event(&ka, "d1", 10)),
        ]
        .into_iter()
        .map(|(t, b)| (t, bytes::Bytes::from(b)))
        .collect();
        let fresh = || Mutex::new(Registry::new(vec![], vec![token.into()]));
        let one = fresh();
        let one_by_one: Vec<String> = msgs
            .iter()
            .map(|(t, b)| outcome(&parse(p, t, b, &one, now)))
            .collect();
        let batched = fresh();
        let together: Vec<String> = parse_batch(p, &msgs, &batched, now)
            .iter()
            .map(outcome)
            .collect();
        assert_eq!(together, one_by_one);
        // And it says what it should.
        assert!(one_by_one[0].contains("unenrolled"), "{}", one_by_one[0]);
        assert!(one_by_one[2].starts_with("Online"), "{}", one_by_one[2]);
        assert!(one_by_one[4].contains("duplicate"), "{}", one_by_one[4]);
        assert!(one_by_one[5].contains("replayed"), "{}", one_by_one[5]);
        assert!(one_by_one[6].starts_with("dropped"), "{}", one_by_one[6]);
        assert!(one_by_one[7].contains("bad_signature"), "{}", one_by_one[7]);
        assert!(one_by_one[9].starts_with("Event"), "{}", one_by_one[9]);
        assert!(one_by_one[14].starts_with("Event"), "{}", one_by_one[14]);
    }

    #[test]
    fn parses_verified_device_messages_and_refuses_bad_ones() {
        let p = "ferry";
        let now = Utc::now();
        let reg = Mutex::new(Registry::new(vec![], vec!["0123456789abcdef".into()]));
        let k = PrivateKey::from_seed([7; 32]).unwrap();
        let sign = |d: &str, s, c, body: Value| dr::sign(&k, d, s, c, body);
        let enroll = EnrollBody {
            public_key: k.public().to_pem(),
            token_proof: Some(dr::token_proof("0123456789abcdef", "d1", k.public().id())),
            agent_version: None,
        };
        let online = sign("d1", Stream::Online, 1, serde_json::json!({"online": true}));
        // Not enrolled yet.
        assert!(matches!(
            parse(p, "ferry/v1/devices/d1/online", &online, &reg, now),
            Err(BadMessage::Unverified { .. })
        ));
        let raw = sign(
            "d1",
            Stream::Enroll,
            1,
            serde_json::to_value(enroll).unwrap(),
        );
        assert!(matches!(
            parse(p, "ferry/v1/devices/d1/enroll", &raw, &reg, now),
            Ok(None)
        ));
        assert!(matches!(
            parse(p, "ferry/v1/devices/d1/online", &online, &reg, now),
            Ok(Some(Inbound::Online { online: true, .. }))
        ));
        // v1 bytes are unsigned.
        let e = parse(p, "ferry/v1/devices/d1/online", b"1", &reg, now).unwrap_err();
        assert_eq!(e.label(), "unsigned");
        // A signed event whose body names another device.
        let ev = serde_json::json!({"device": "d2", "sequence": 1, "rollout": null,
                                    "phase": "committed", "ts": "2026-11-22T10:00:00Z"});
        assert!(matches!(
            parse(
                p,
                "ferry/v1/devices/d1/events",
                &sign("d1", Stream::Events, 5, ev.clone()),
                &reg,
                now
            ),
            Err(BadMessage::WrongDevice { .. })
        ));
        let mut ok = ev.clone();
        ok["device"] = "d1".into();
        assert!(matches!(
            parse(
                p,
                "ferry/v1/devices/d1/events",
                &sign("d1", Stream::Events, 6, ok),
                &reg,
                now
            ),
            Ok(Some(Inbound::Event(_)))
        ));
        assert!(matches!(
            parse(
                p,
                "ferry/v1/devices/d1/state",
                &sign("d1", Stream::State, 7, serde_json::json!({"x": 1})),
                &reg,
                now
            ),
            Err(BadMessage::Malformed { kind: "state", .. })
        ));
        // cleared retained message, foreign topic
        assert!(matches!(
            parse(p, "ferry/v1/devices/d1/state", b"", &reg, now),
            Ok(None)
        ));
        assert!(matches!(parse(p, "other/x", b"1", &reg, now), Ok(None)));
    }
}
