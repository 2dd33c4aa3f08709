//! Where reports go: the update engine emits events and state through the [`Outbox`] trait; the
//! MQTT implementation publishes them (state retained QoS1, events QoS1), tests collect them.

use std::sync::Mutex;

use ferry_protocol::device_report::Stream;
use ferry_protocol::report::{Event, StateReport};
use ferry_protocol::topics::DeviceTopics;

pub trait Outbox: Send + Sync + 'static {
    fn event(&self, e: &Event);
    fn state(&self, s: &StateReport);
}

/// Collects reports in memory (unit tests, and the agent's own log of what it said).
#[derive(Default)]
pub struct MemoryOutbox {
    pub events: Mutex<Vec<Event>>,
    pub states: Mutex<Vec<StateReport>>,
}

impl Outbox for MemoryOutbox {
    fn event(&self, e: &Event) {
        self.events.lock().unwrap().push(e.clone());
    }
    fn state(&self, s: &StateReport) {
        self.states.lock().unwrap().push(s.clone());
    }
}

impl MemoryOutbox {
    pub fn phases(&self) -> Vec<ferry_protocol::Phase> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.phase)
            .collect()
    }
}

/// Publishes over the MQTT link. Publishing never blocks the engine: when the link's queue is
/// full or the broker is away the report is logged and dropped (the retained state is
/// republished after every transition and on reconnect, so the latest state always arrives).
pub struct MqttOutbox {
    pub link: crate::mqtt::LinkHandle,
    pub topics: DeviceTopics,
    /// Signs every report (the device key).
    pub seal: std::sync::Arc<dyn crate::identity::Seal>,
}

impl Outbox for MqttOutbox {
    fn event(&self, e: &Event) {
        let body = serde_json::to_value(e).expect("events serialize");
        let payload = self.seal.report(Stream::Events, body);
        if let Err(err) = self.link.publish(
            self.topics.events(),
            payload,
            false,
            rumqttc::QoS::AtLeastOnce,
        ) {
            tracing::warn!(phase = %e.phase, error = %err, "event not published");
        }
    }
    fn state(&self, s: &StateReport) {
        let body = serde_json::to_value(s).expect("state serializes");
        let payload = self.seal.report(Stream::State, body);
        if let Err(err) = self.link.publish(
            self.topics.state(),
            payload,
            true,
            rumqttc::QoS::AtLeastOnce,
        ) {
            tracing::warn!(error = %err, "state not published");
        }
    }
}
