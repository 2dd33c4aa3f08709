//! An MQTT observer (rumqttc) standing in for the controller: subscribed to a device's `events`,
//! `state` and `online` topics from before the agent starts, it collects every message; tests
//! wait on them with timeouts. It also publishes desired-state notices (retained, QoS 1).
//!
//! ```ignore
//! let obs = Observer::start(&broker, &device);
//! obs.publish_desired(&notice);
//! let ev = obs.wait_event_for(2, Phase::Committed, Duration::from_secs(120));
//! let st = obs.wait_state(|s| s.apps.get("sensor").is_some_and(|a| a.version == "2.0.0"), T);
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_protocol::topics::DeviceTopics;
use ferry_protocol::{Event, Phase, StateReport};
use rumqttc::{Client, Event as MqttEvent, MqttOptions, Outgoing, Packet, QoS, SubscribeFilter};

use super::agent::Liveness;
use super::broker::Broker;

/// One message as received.
#[derive(Clone, Debug)]
pub struct Message {
    pub topic: String,
    /// The report's body (a signed report unwrapped, unverified: [`super::report_body`]).
    pub payload: Vec<u8>,
    /// The bytes as published.
    pub raw: Vec<u8>,
    pub retain: bool,
    /// Since the observer started.
    pub at: Duration,
}

impl Message {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

#[derive(Default)]
struct Shared {
    messages: Mutex<Vec<Message>>,
    suback: AtomicU64,
    puback: AtomicU64,
    stop: AtomicBool,
}

pub struct Observer {
    pub device: String,
    pub topics: DeviceTopics,
    client: Client,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    started: Instant,
    agent: Mutex<Option<Liveness>>,
}

/// How long an agent may have died on its own before a wait gives up early.
const DEAD_AGENT_GRACE: Duration = Duration::from_secs(10);

/// Events with any of these phases end an update (`superseded`: a newer notice took over an
/// update that had not switched yet).
pub const TERMINAL: [Phase; 5] = [
    Phase::Committed,
    Phase::RolledBack,
    Phase::Failed,
    Phase::Rejected,
    Phase::Superseded,
];

impl Observer {
    /// Connect to `broker` with the default topic prefix `ferry`, subscribe, and return once the
    /// subscription is acknowledged (so nothing the agent publishes afterwards is missed).
    pub fn start(broker: &Broker, device: &str) -> Observer {
        Observer::start_with_prefix(broker, device, "ferry")
    }

    pub fn start_with_prefix(broker: &Broker, device: &str, prefix: &str) -> Observer {
        let topics = DeviceTopics::new(prefix, device).expect("topics");
        let mut opts = MqttOptions::new(
            format!("it-observer-{}", fastrand::u32(..)),
            "127.0.0.1",
            broker.port(),
        );
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(true);
        opts.set_max_packet_size(8 * 1024 * 1024, 8 * 1024 * 1024);
        let (client, mut conn) = Client::new(opts, 64);
        let shared = Arc::new(Shared::default());
        let started = Instant::now();
        let filters = vec![
            SubscribeFilter::new(topics.events(), QoS::AtLeastOnce),
            SubscribeFilter::new(topics.state(), QoS::AtLeastOnce),
            SubscribeFilter::new(topics.online(), QoS::AtLeastOnce),
        ];
        let thread = {
            let shared = shared.clone();
            let client = client.clone();
            std::thread::spawn(move || {
                for ev in conn.iter() {
                    if shared.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    match ev {
                        Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                            // (Re)subscribe on every connection: the session is clean.
                            let _ = client.try_subscribe_many(filters.clone());
                        }
                        Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                            shared.suback.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(MqttEvent::Incoming(Packet::PubAck(_))) => {
                            shared.puback.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                            shared.messages.lock().unwrap().push(Message {
                                topic: p.topic.clone(),
                                payload: super::report_body(&p.payload),
                                raw: p.payload.to_vec(),
                                retain: p.retain,
                                at: started.elapsed(),
                            });
                        }
                        Ok(MqttEvent::Outgoing(Outgoing::Disconnect)) => {}
                        Ok(_) => {}
                        Err(_) => {
                            if shared.stop.load(Ordering::SeqCst) {
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    }
                }
            })
        };
        let obs = Observer {
            device: device.to_string(),
            topics,
            client,
            shared,
            thread: Some(thread),
            started,
            agent: Mutex::new(None),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while obs.shared.suback.load(Ordering::SeqCst) == 0 {
            assert!(
                Instant::now() < deadline,
                "observer: no SUBACK from the broker on port {}",
                broker.port()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        obs
    }

    /// Make the waits fail early (after 10 s) when this agent process exits without the test
    /// stopping it. [`super::Rig`] does this for its agent.
    pub fn watch_agent(&self, l: Liveness) {
        *self.agent.lock().unwrap() = Some(l);
    }

    /// Panics when the watched agent has been dead for longer than the grace.
    fn check_agent(&self, what: &str, dead_since: &mut Option<Instant>) {
        let died = self.agent.lock().unwrap().as_ref().and_then(Liveness::died);
        match (died, *dead_since) {
            (None, _) => *dead_since = None,
            (Some(_), None) => *dead_since = Some(Instant::now()),
            (Some(pid), Some(t)) if t.elapsed() > DEAD_AGENT_GRACE => panic!(
                "waiting for {what}: the agent process {pid} of {} exited on its own \
                 (see its log below); events so far:\n{}",
                self.device,
                self.describe_events()
            ),
            _ => {}
        }
    }

    // ----- publishing --------------------------------------------------------------------------

    /// Publish on `topic` (QoS 1) and wait for the broker's PUBACK.
    pub fn publish(&self, topic: &str, payload: &[u8], retain: bool) {
        let before = self.shared.puback.load(Ordering::SeqCst);
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.to_vec())
            .expect("observer publish");
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.shared.puback.load(Ordering::SeqCst) <= before {
            assert!(Instant::now() < deadline, "no PUBACK for {topic}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Publish a notice on the device's `desired` topic, retained, QoS 1.
    pub fn publish_desired(&self, notice: &[u8]) {
        self.publish(&self.topics.desired(), notice, true);
    }

    /// Clear the retained notice.
    pub fn clear_desired(&self) {
        self.publish(&self.topics.desired(), b"", true);
    }

    // ----- reading -----------------------------------------------------------------------------

    /// Every message so far.
    pub fn messages(&self) -> Vec<Message> {
        self.shared.messages.lock().unwrap().clone()
    }

    fn on(&self, topic: &str) -> Vec<Message> {
        self.messages()
            .into_iter()
            .filter(|m| m.topic == topic)
            .collect()
    }

    /// Every event so far, in order of arrival (messages that do not parse are skipped).
    pub fn events(&self) -> Vec<Event> {
        self.on(&self.topics.events())
            .iter()
            .filter_map(|m| serde_json::from_slice(&m.payload).ok())
            .collect()
    }

    /// Events of one update (`sequence`), in order.
    pub fn events_for(&self, sequence: u64) -> Vec<Event> {
        self.events()
            .into_iter()
            .filter(|e| e.sequence == sequence)
            .collect()
    }

    /// The phases of `sequence`'s events with consecutive repeats collapsed (several
    /// `downloading` progress events count once).
    pub fn phases_for(&self, sequence: u64) -> Vec<Phase> {
        let mut v: Vec<Phase> = Vec::new();
        for e in self.events_for(sequence) {
            if v.last() != Some(&e.phase) {
                v.push(e.phase);
            }
        }
        v
    }

    /// Every event as raw JSON (fields the typed `Event` does not know included).
    pub fn events_json(&self) -> Vec<serde_json::Value> {
        self.on(&self.topics.events())
            .iter()
            .filter_map(|m| serde_json::from_slice(&m.payload).ok())
            .collect()
    }

    /// Every state report so far, in order (the retained one first if there was one).
    pub fn states(&self) -> Vec<StateReport> {
        self.on(&self.topics.state())
            .iter()
            .filter_map(|m| serde_json::from_slice(&m.payload).ok())
            .collect()
    }

    pub fn last_state(&self) -> Option<StateReport> {
        self.states().pop()
    }

    /// The last payload seen on `online` (`"1"` or `"0"`).
    pub fn online(&self) -> Option<String> {
        self.on(&self.topics.online()).pop().map(|m| m.text())
    }

    /// The first event (in arrival order) with `phase`, any sequence; waits up to `timeout`.
    pub fn wait_event(&self, phase: Phase, timeout: Duration) -> Event {
        self.wait_event_where(&format!("event {phase}"), timeout, |e| e.phase == phase)
    }

    /// The first event of `sequence` with `phase`.
    pub fn wait_event_for(&self, sequence: u64, phase: Phase, timeout: Duration) -> Event {
        self.wait_event_where(
            &format!("event {phase} of sequence {sequence}"),
            timeout,
            |e| e.sequence == sequence && e.phase == phase,
        )
    }

    /// The first terminal event (committed, rolled_back, failed, rejected, superseded) of
    /// `sequence`.
    pub fn wait_terminal(&self, sequence: u64, timeout: Duration) -> Event {
        self.wait_event_where(
            &format!(
                "the end (committed/rolled_back/failed/rejected/superseded) of sequence {sequence}"
            ),
            timeout,
            |e| e.sequence == sequence && TERMINAL.contains(&e.phase),
        )
    }

    /// The first event matching `pred`; panics after `timeout` listing the events seen.
    pub fn wait_event_where(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Event) -> bool,
    ) -> Event {
        let deadline = Instant::now() + timeout;
        let mut dead = None;
        loop {
            if let Some(e) = self.events().into_iter().find(|e| pred(e)) {
                return e;
            }
            self.check_agent(what, &mut dead);
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; events so far:\n{}",
                    self.describe_events()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until the LATEST state report satisfies `pred`; returns it.
    pub fn wait_state(
        &self,
        pred: impl Fn(&StateReport) -> bool,
        timeout: Duration,
    ) -> StateReport {
        let deadline = Instant::now() + timeout;
        let mut dead = None;
        loop {
            if let Some(s) = self.last_state() {
                if pred(&s) {
                    return s;
                }
            }
            self.check_agent("a state report", &mut dead);
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for a state report; the last one: {}",
                    self.on(&self.topics.state())
                        .pop()
                        .map(|m| m.text())
                        .unwrap_or_else(|| "(none)".into())
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until the last `online` payload equals `want`.
    pub fn wait_online(&self, want: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.online().as_deref() != Some(want) {
            assert!(
                Instant::now() < deadline,
                "online never became {want:?} (last {:?})",
                self.online()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Assert that no event matching `pred` arrives within `period` (a bounded observation, for
    /// "nothing happens" checks). Returns the events seen meanwhile.
    pub fn assert_no_event(&self, what: &str, period: Duration, pred: impl Fn(&Event) -> bool) {
        let deadline = Instant::now() + period;
        loop {
            if let Some(e) = self.events().into_iter().find(|e| pred(e)) {
                panic!(
                    "unexpected {what}: {e:?}; events:\n{}",
                    self.describe_events()
                );
            }
            if Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One line per event: `+12.3s seq=2 downloading app=sensor bytes=.. reason=..`.
    pub fn describe_events(&self) -> String {
        self.on(&self.topics.events())
            .iter()
            .map(|m| format!("  +{:.1}s {}", m.at.as_secs_f64(), m.text()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Time since the observer started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- MQTT events of {} -----\n{}\n----- last state -----\n{}",
                self.device,
                self.describe_events(),
                self.on(&self.topics.state())
                    .pop()
                    .map(|m| m.text())
                    .unwrap_or_else(|| "(none)".into())
            );
        }
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.client.try_disconnect();
        if let Some(t) = self.thread.take() {
            // The connection thread ends on the disconnect (or the next error).
            let deadline = Instant::now() + Duration::from_secs(3);
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}
