//! What the link hands the update engine: [`Inbound`] messages, unverified, over a bounded
//! channel that keeps the newest notice in one overflow slot when the engine falls behind.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, Notify};
use tracing::{debug, warn};

use super::link::Counters;

/// A message from the broker for the update engine.
#[derive(Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A message on the device's `desired` topic, unverified and unparsed: treat as hostile.
    /// `retained` is set when the broker replayed it on subscribe.
    Desired { payload: Vec<u8>, retained: bool },
    /// A message on the fleet-wide or the device's own trust topic (protocol §10), unverified.
    Trust { payload: Vec<u8>, retained: bool },
    /// A message on the controller's heartbeat topic (protocol §10a), unverified.
    Heartbeat { payload: Vec<u8> },
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Inbound::Desired { payload, retained } => f
                .debug_struct("Desired")
                .field("bytes", &payload.len())
                .field("retained", retained)
                .finish(),
            Inbound::Trust { payload, retained } => f
                .debug_struct("Trust")
                .field("bytes", &payload.len())
                .field("retained", retained)
                .finish(),
            Inbound::Heartbeat { payload } => f
                .debug_struct("Heartbeat")
                .field("bytes", &payload.len())
                .finish(),
        }
    }
}

/// The bounded inbound channel plus one overflow slot that keeps the newest notice while the
/// channel is full. A forwarder task moves the slot into the channel as soon as there is room.
pub(super) struct InboundQueue {
    tx: mpsc::Sender<Inbound>,
    overflow: Arc<Mutex<Option<Inbound>>>,
    notify: Arc<Notify>,
    counters: Arc<Counters>,
    forwarder: tokio::task::JoinHandle<()>,
}

impl InboundQueue {
    pub(super) fn new(tx: mpsc::Sender<Inbound>, counters: Arc<Counters>) -> Self {
        let overflow = Arc::new(Mutex::new(None::<Inbound>));
        let notify = Arc::new(Notify::new());
        let forwarder = tokio::spawn({
            let (tx, overflow, notify) = (tx.clone(), overflow.clone(), notify.clone());
            async move {
                loop {
                    notify.notified().await;
                    let Ok(permit) = tx.reserve().await else {
                        return; // the engine dropped its receiver
                    };
                    // Send under the lock, so that `deliver` cannot put a newer notice into the
                    // channel ahead of this older one.
                    let mut slot = overflow.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(item) = slot.take() {
                        permit.send(item);
                    }
                }
            }
        });
        InboundQueue {
            tx,
            overflow,
            notify,
            counters,
            forwarder,
        }
    }

    pub(super) fn deliver(&self, item: Inbound) {
        let mut slot = self.overflow.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            *slot = Some(item);
            let dropped = self
                .counters
                .inbound_dropped
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            warn!(
                dropped_total = dropped,
                "update engine is not keeping up: dropped an older desired notice, keeping the newest"
            );
            return;
        }
        match self.tx.try_send(item) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(item)) => {
                debug!("inbound channel full; holding the newest notice in the overflow slot");
                *slot = Some(item);
                drop(slot);
                self.notify.notify_one();
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                debug!("inbound receiver dropped; discarding desired notice");
            }
        }
    }
}

impl Drop for InboundQueue {
    fn drop(&mut self) {
        self.forwarder.abort();
    }
}
