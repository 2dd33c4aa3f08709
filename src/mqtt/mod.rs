//! The agent's MQTT link (protocol §5).
//!
//! [`MqttLink::start`] spawns one tokio task that owns the rumqttc event loop and keeps the device
//! connected for as long as the agent runs:
//!
//! - connects with a clean session and the last will `<prefix>/v1/devices/<id>/online` = `0`
//!   (retained, QoS 1), so the controller sees the device go offline when the link dies;
//! - on every CONNACK publishes `online` = `1` (retained, QoS 1), (re)subscribes to the device's
//!   `desired` topic (QoS 1) and resets the reconnect backoff;
//! - hands every message on `desired` to the update engine as [`Inbound::Desired`] over a bounded
//!   channel that keeps the newest notice when the engine falls behind;
//! - after any connection error waits a capped, jittered exponential [`Backoff`] before the next
//!   attempt (rumqttc alone would retry in a tight loop), forever;
//! - re-sends publishes that were queued or unacknowledged when the connection broke (a clean
//!   session would otherwise silently drop them), so QoS 1 stays at-least-once across reconnects;
//! - on [`LinkHandle::shutdown`] publishes `online` = `0`, waits up to 2 s for queued publishes to
//!   be acknowledged and disconnects cleanly. The process-wide stop signal given to
//!   [`MqttLink::start`] only stops reconnecting: a live connection stays up for the engine's
//!   final reports until `shutdown` is called.
//!
//! Engines publish through a cloneable [`LinkHandle`] that never blocks: a full queue is an error.
//! [`LinkHandle::publish_confirmed`] is for callers that keep their own copy until the broker has
//! it (the telemetry buffer): it returns a [`Confirmation`] and is not re-sent over a reconnect.
//! [`MqttConfig`] is the `[mqtt]` table of the agent's configuration.

mod carry;
mod config;
mod inbound;
mod link;

pub use crate::backoff::Backoff;
pub use config::{BrokerUrl, MqttConfig};
pub use inbound::Inbound;
pub use link::{
    Confirmation, LinkHandle, LinkStats, MqttLink, DRAIN_TIMEOUT, INBOUND_CAPACITY,
    REQUEST_CAPACITY,
};
pub use rumqttc::QoS;

use std::path::PathBuf;

/// Errors of the MQTT link. Each variant carries what it was doing and with which file or topic.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("invalid [mqtt] {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },

    #[error("cannot read {what} {}: {source}", path.display())]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot parse PEM {what} {}: {source}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },

    #[error("TLS setup failed while {context}: {source}")]
    Tls {
        context: String,
        #[source]
        source: rustls::Error,
    },

    #[error("invalid topic {topic:?}: {reason}")]
    InvalidTopic { topic: String, reason: &'static str },

    #[error("publish to {topic} is {size} bytes, over the {max}-byte limit (max_outgoing_bytes)")]
    TooLarge {
        topic: String,
        size: usize,
        max: usize,
    },

    #[error("MQTT request queue is full ({capacity} requests); publish to {topic} not queued")]
    QueueFull { topic: String, capacity: usize },

    #[error("MQTT link is shut down; publish to {topic} not queued")]
    Closed { topic: String },
}
