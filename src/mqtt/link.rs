//! The connection task: one rumqttc event loop, reconnecting forever with backoff.
//!
//! rumqttc specifics this module relies on (0.25, MQTT 3.1.1):
//!
//! - `EventLoop::poll` reconnects by itself on the next call after an error, immediately: the
//!   backoff sleep between attempts is ours.
//! - `poll` is not cancel-safe while connected (a request taken from the queue can be lost if the
//!   future is dropped mid-write). The task therefore keeps polling the same pinned `poll` future
//!   when a shutdown request arrives, and only drops it when not connected (a connect attempt,
//!   safe to abandon) or once the drain deadline has passed (the connection is being abandoned
//!   anyway).
//! - After an error, rumqttc moves unacknowledged and still-queued requests into
//!   `EventLoop::pending`, and clears that list on the next CONNACK with `session_present = 0`,
//!   which a clean session always gets. We take the publishes out first and queue them again after
//!   the CONNACK, so they are not lost.
//! - A packet from the broker larger than the incoming limit is refused before it is read, and
//!   the connection is dropped (MQTT 3.1.1 has no way to tell the broker the limit). When it is
//!   the retained desired message, every new subscription would bring it back: the next
//!   connection deletes it before subscribing ([`Worker::on_error`]).
//! - A packet larger than the outgoing limit fails inside the event loop and drops the whole
//!   connection, so [`LinkHandle::publish`] checks the size first.
//! - Events name packets by packet id only, and the id of a publish is assigned inside the event
//!   loop. [`LinkHandle::publish_confirmed`] therefore queues an UNSUBSCRIBE of a topic the
//!   device never subscribes to right behind its publish, as a barrier: a broker processes the
//!   packets of a connection in order and answers QoS 1 publishes in order (MQTT 3.1.1 §4.6), so
//!   the UNSUBACK of the barrier arrives after the publish was accepted. The barriers are the only
//!   UNSUBSCRIBEs before a shutdown's drain, so the n-th UNSUBSCRIBE written belongs to the n-th
//!   barrier queued.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_protocol::topics::DeviceTopics;
use rumqttc::{
    AsyncClient, ClientError, Disconnect, Event, EventLoop, Incoming, LastWill, MqttOptions,
    NetworkOptions, Outgoing, Publish, QoS, Request, Subscribe, SubscribeFilter,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::shutdown::StopFlag;
use tokio::time::Instant;
use tracing::{debug, error, info, trace, warn};

use super::carry::{self, Confirm, Tracked};
use super::inbound::{Inbound, InboundQueue};
use super::{Backoff, MqttConfig, MqttError};
use crate::identity::{Seal, Unsigned};

/// Capacity of the channel of [`Inbound`] messages. When the engine lets it fill up, further
/// notices replace each other in one overflow slot: the engine gets the queued ones and then the
/// newest, and the ones in between are dropped (each desired notice is a complete state, so only
/// the latest matters).
pub const INBOUND_CAPACITY: usize = 8;

/// Capacity of rumqttc's request queue. [`LinkHandle::publish`] fails instead of waiting when it
/// is full (for example after a long outage on a chatty device).
pub const REQUEST_CAPACITY: usize = 64;

/// How long a graceful shutdown waits for queued publishes to be acknowledged.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the trust topics stay unsubscribed after an oversized retained trust message.
const TRUST_SKIP: Duration = Duration::from_secs(3600);

/// At most this many unacknowledged or queued publishes are carried over a reconnect.
const MAX_CARRIED: usize = REQUEST_CAPACITY + 100;

/// Counters of one link, for diagnostics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Successful connections (CONNACKs).
    pub connects: u64,
    /// Connection errors: failed attempts and lost connections.
    pub errors: u64,
    /// Desired notices dropped because the engine did not keep up.
    pub inbound_dropped: u64,
    /// Messages from the broker over `max_incoming_bytes`, dropped (each costs one reconnect).
    pub oversized_dropped: u64,
}

#[derive(Default)]
pub(super) struct Counters {
    connects: AtomicU64,
    errors: AtomicU64,
    pub(super) inbound_dropped: AtomicU64,
    oversized_dropped: AtomicU64,
}

/// Starts the MQTT link task.
pub struct MqttLink;

/// Resolves to `true` once the broker has acknowledged a [`LinkHandle::publish_confirmed`]
/// publish, `false` if the connection was lost first or the link stopped (then the publish is
/// NOT re-sent by the link: the caller still owns it).
pub struct Confirmation(oneshot::Receiver<bool>);

impl Confirmation {
    pub async fn acked(self) -> bool {
        self.0.await.unwrap_or(false)
    }
}

/// Cloneable handle to a running link.
#[derive(Clone)]
pub struct LinkHandle {
    client: AsyncClient,
    connected: watch::Receiver<bool>,
    closing: Arc<watch::Sender<bool>>,
    done: watch::Receiver<bool>,
    counters: Arc<Counters>,
    max_outgoing: usize,
    tracked: Arc<Mutex<Tracked>>,
    client_id: Arc<str>,
}

impl std::fmt::Debug for LinkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkHandle")
            .field("connected", &*self.connected.borrow())
            .field("closing", &*self.closing.borrow())
            .field("stats", &self.stats())
            .finish()
    }
}

impl MqttLink {
    /// Validate `cfg`, read its credential and TLS files, and spawn the link task on the current
    /// tokio runtime (panics outside one). Returns the handle and the channel of desired notices,
    /// which closes when the link task has ended.
    ///
    /// Connection failures never end the link. It ends on [`LinkHandle::shutdown`] (graceful:
    /// `online` = `0`, drain, DISCONNECT), or when `shutdown` is `true` and the link is not
    /// connected: the process-wide stop signal interrupts a backoff sleep or a connect attempt
    /// and prevents further reconnects, but leaves a live connection up so that the engine can
    /// still publish its final reports before the agent calls [`LinkHandle::shutdown`].
    pub fn start(
        cfg: &MqttConfig,
        device_id: &str,
        topics: DeviceTopics,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(LinkHandle, mpsc::Receiver<Inbound>), MqttError> {
        Self::start_sealed(cfg, device_id, topics, shutdown, Arc::new(Unsigned))
    }

    /// [`MqttLink::start`] with `online`, the last will and the enrolment request made by
    /// `seal` (the agent passes its [`crate::identity::DeviceIdentity`]: all signed).
    pub fn start_sealed(
        cfg: &MqttConfig,
        device_id: &str,
        topics: DeviceTopics,
        shutdown: watch::Receiver<bool>,
        seal: Arc<dyn Seal>,
    ) -> Result<(LinkHandle, mpsc::Receiver<Inbound>), MqttError> {
        cfg.validate()?;
        let broker = cfg.broker()?;
        let client_id = cfg.client_id_for(device_id);

        let mut options = MqttOptions::new(client_id.clone(), broker.host.clone(), broker.port);
        options
            .set_keep_alive(cfg.keepalive)
            .set_clean_session(true)
            .set_last_will(LastWill::new(
                topics.online(),
                seal.online(0, false),
                QoS::AtLeastOnce,
                true,
            ))
            .set_max_packet_size(cfg.max_incoming_bytes, cfg.max_outgoing_bytes);
        if let Some((user, password)) = cfg.credentials()? {
            options.set_credentials(user, password);
        }
        if let Some(tls) = cfg.tls_client_config()? {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        }

        let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
        let mut network = NetworkOptions::new();
        network.set_connection_timeout(cfg.connect_timeout.as_secs());
        eventloop.set_network_options(network);

        let (connected_tx, connected_rx) = watch::channel(false);
        let (done_tx, done_rx) = watch::channel(false);
        let closing = Arc::new(watch::channel(false).0);
        let counters = Arc::new(Counters::default());
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_CAPACITY);
        let inbound = InboundQueue::new(inbound_tx, counters.clone());

        let handle = LinkHandle {
            client: client.clone(),
            connected: connected_rx,
            closing: closing.clone(),
            done: done_rx,
            counters: counters.clone(),
            max_outgoing: cfg.max_outgoing_bytes,
            tracked: Arc::new(Mutex::new(Tracked::default())),
            client_id: Arc::from(client_id.as_str()),
        };

        info!(
            url = %cfg.url,
            client_id = %client_id,
            device = %device_id,
            keepalive = %crate::config::durations::show(cfg.keepalive),
            "starting MQTT link"
        );
        let worker = Worker {
            eventloop,
            client,
            online: topics.online(),
            enroll: topics.enroll(),
            desired: topics.desired(),
            trust: [topics.fleet_trust(), topics.trust()],
            heartbeat: topics.heartbeat(),
            subacks: 0,
            first_trust: true,
            skip_trust_until: None,
            seal,
            attempt: 0,
            backoff: Backoff::new(cfg.backoff_initial, cfg.backoff_max),
            connected: connected_tx,
            closing_tx: closing,
            closing: handle.closing.subscribe(),
            shutdown,
            inbound,
            counters,
            tracked: handle.tracked.clone(),
            done: done_tx,
            first_desired: true,
            clear_desired: false,
            max_incoming: cfg.max_incoming_bytes,
            is_connected: false,
            streak: 0,
            carried: Vec::new(),
            drain: None,
            clean: false,
        };
        tokio::spawn(worker.run());
        Ok((handle, inbound_rx))
    }
}

impl LinkHandle {
    /// Queue a publish without waiting. Fails when the request queue is full, the packet is over
    /// `max_outgoing_bytes`, the topic is not a valid topic name, or the link is shutting down.
    /// Success means queued, not delivered: QoS 1 publishes are re-sent across reconnects, but
    /// whatever is still queued when the agent stops is lost.
    pub fn publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
        qos: QoS,
    ) -> Result<(), MqttError> {
        if *self.closing.borrow() || *self.done.borrow() {
            return Err(MqttError::Closed { topic });
        }
        if let Err(reason) = check_topic_name(&topic) {
            return Err(MqttError::InvalidTopic { topic, reason });
        }
        let size = publish_packet_size(topic.len(), payload.len(), qos);
        if size > self.max_outgoing {
            return Err(MqttError::TooLarge {
                topic,
                size,
                max: self.max_outgoing,
            });
        }
        match self.client.try_publish(topic, qos, retain, payload) {
            Ok(()) => Ok(()),
            Err(e) => {
                let topic = match e {
                    ClientError::Request(Request::Publish(p))
                    | ClientError::TryRequest(Request::Publish(p)) => p.topic,
                    _ => String::new(),
                };
                if *self.done.borrow() {
                    Err(MqttError::Closed { topic })
                } else {
                    Err(MqttError::QueueFull {
                        topic,
                        capacity: REQUEST_CAPACITY,
                    })
                }
            }
        }
    }

    /// Queue a QoS 1 publish (not retained) whose acknowledgement the caller awaits with
    /// [`Confirmation::acked`]. Unlike [`LinkHandle::publish`], a confirmed publish is not
    /// carried over a reconnect: when the connection breaks before the acknowledgement it
    /// resolves `false` and the caller decides (store-and-forward keeps it on disk and sends it
    /// again). Costs one UNSUBSCRIBE/UNSUBACK (about 45 bytes) on the wire as the barrier.
    pub fn publish_confirmed(
        &self,
        topic: String,
        payload: Vec<u8>,
    ) -> Result<Confirmation, MqttError> {
        if *self.closing.borrow() || *self.done.borrow() {
            return Err(MqttError::Closed { topic });
        }
        if let Err(reason) = check_topic_name(&topic) {
            return Err(MqttError::InvalidTopic { topic, reason });
        }
        let size = publish_packet_size(topic.len(), payload.len(), QoS::AtLeastOnce);
        if size > self.max_outgoing {
            return Err(MqttError::TooLarge {
                topic,
                size,
                max: self.max_outgoing,
            });
        }
        let (tx, rx) = oneshot::channel();
        // Held while queueing, so that barriers are queued in the order of `queued`.
        let mut tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        let full = |topic: String| MqttError::QueueFull {
            topic,
            capacity: REQUEST_CAPACITY,
        };
        self.client
            .try_publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
            .map_err(|_| full(topic.clone()))?;
        if self.client.try_unsubscribe(topic.clone()).is_err() {
            // The publish is queued and will be delivered like an ordinary one, but it cannot
            // be confirmed; the caller keeps its copy, which may then arrive twice.
            warn!(topic = %topic, "request queue full behind a confirmed publish; it goes unconfirmed");
            return Err(full(topic));
        }
        tracked.queued.push_back(Confirm {
            topic,
            payload,
            done: tx,
        });
        Ok(Confirmation(rx))
    }

    /// Connection status: `true` between a CONNACK and the next connection error.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    /// Whether the link task has stopped.
    pub fn is_stopped(&self) -> bool {
        *self.done.borrow()
    }

    /// The client id this link connects with.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    pub fn stats(&self) -> LinkStats {
        LinkStats {
            connects: self.counters.connects.load(Ordering::Relaxed),
            errors: self.counters.errors.load(Ordering::Relaxed),
            inbound_dropped: self.counters.inbound_dropped.load(Ordering::Relaxed),
            oversized_dropped: self.counters.oversized_dropped.load(Ordering::Relaxed),
        }
    }

    /// Stop the link gracefully: refuse new publishes, publish `online` = `0` (retained) behind
    /// the ones already queued, wait up to [`DRAIN_TIMEOUT`] until the broker has acknowledged
    /// them, then send DISCONNECT. If the drain does not finish in time the connection is dropped
    /// without DISCONNECT, so the broker publishes the last will (`online` = `0`) instead. When
    /// not connected it stops at once. Returns when the link task has ended.
    pub async fn shutdown(&self) {
        self.closing.send_replace(true);
        let mut done = self.done.clone();
        let wait = done.wait_for(|d| *d);
        if tokio::time::timeout(DRAIN_TIMEOUT + Duration::from_secs(3), wait)
            .await
            .is_err()
        {
            warn!("MQTT link did not stop in time");
        }
    }
}

/// Size of a PUBLISH packet as rumqttc computes it for its outgoing limit.
fn publish_packet_size(topic_len: usize, payload_len: usize, qos: QoS) -> usize {
    let pkid = if qos == QoS::AtMostOnce { 0 } else { 2 };
    let len = 2 + topic_len + pkid + payload_len;
    let len_len = match len {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + len_len + len
}

/// A topic name (not filter) as MQTT 3.1.1 §4.7 allows it.
fn check_topic_name(topic: &str) -> Result<(), &'static str> {
    if topic.is_empty() {
        Err("empty")
    } else if topic.len() > 65535 {
        Err("longer than 65535 bytes")
    } else if topic.contains(['+', '#']) {
        Err("wildcards are not allowed in a topic name")
    } else if topic.contains('\0') {
        Err("contains NUL")
    } else {
        Ok(())
    }
}

/// Progress of a graceful shutdown while connected.
struct Drain {
    deadline: Instant,
    /// `online` = `0`, signed once when the drain begins.
    goodbye: Vec<u8>,
    online_queued: bool,
    unsubscribe_queued: bool,
    unsuback: bool,
    disconnect_queued: bool,
}

struct Worker {
    eventloop: EventLoop,
    client: AsyncClient,
    online: String,
    enroll: String,
    desired: String,
    /// The fleet-wide and the device's own trust topics, subscribed after `desired`.
    trust: [String; 2],
    /// The controller's heartbeat topic, subscribed with the trust topics.
    heartbeat: String,
    /// SUBACKs on this connection: the first answers `desired`, the second the trust topics.
    subacks: u32,
    /// No trust message yet since the trust topics' SUBACK.
    first_trust: bool,
    /// A retained trust message over `max_incoming_bytes` was met: the trust topics are left
    /// out of the subscriptions until then (a device cannot delete a fleet-wide message).
    skip_trust_until: Option<Instant>,
    /// Signs `online`, the last will and the enrolment request.
    seal: Arc<dyn Seal>,
    /// Connection attempts so far (the last will of attempt N is signed with it).
    attempt: u32,
    backoff: Backoff,
    connected: watch::Sender<bool>,
    closing_tx: Arc<watch::Sender<bool>>,
    closing: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
    inbound: InboundQueue,
    counters: Arc<Counters>,
    tracked: Arc<Mutex<Tracked>>,
    done: watch::Sender<bool>,
    /// No desired message yet on this connection (the first one after the SUBACK is the
    /// retained one, if any).
    first_desired: bool,
    /// Clear the retained desired state before subscribing on the next connection: it was over
    /// `max_incoming_bytes` (see [`Worker::on_error`]).
    clear_desired: bool,
    max_incoming: usize,
    is_connected: bool,
    /// Consecutive connection errors.
    streak: u64,
    /// Publishes to re-send after the next CONNACK.
    carried: Vec<Publish>,
    /// Set once a shutdown request is seen while connected.
    drain: Option<Drain>,
    /// Stopped after a DISCONNECT (rather than by dropping the connection).
    clean: bool,
}

impl Worker {
    async fn run(mut self) {
        loop {
            if !self.is_connected && *self.shutdown.borrow() {
                break; // stop signal: no (re)connect attempts any more
            }
            if self.drain.is_none() && *self.closing.borrow() {
                if !self.is_connected {
                    break;
                }
                self.begin_drain();
            }
            let Some(polled) = self.poll_once().await else {
                break;
            };
            let stop = match polled {
                Ok(event) => self.on_event(event),
                Err(err) => self.on_error(err).await,
            };
            if stop {
                break;
            }
        }

        self.closing_tx.send_replace(true);
        self.connected.send_replace(false);
        {
            // Unconfirmed publishes resolve `false`: their callers keep them.
            let mut t = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
            t.queued.clear();
            t.sent.clear();
        }
        info!(clean = self.clean, "MQTT link stopped");
        // Dropping the event loop closes the socket. Without a DISCONNECT before it, the broker
        // publishes the last will.
        drop(self.eventloop);
        self.done.send_replace(true);
    }

    /// Poll one event; `None` when the link must stop without waiting for it: a stop request
    /// while not connected, or the drain deadline. The same `poll` future is kept across a
    /// [`LinkHandle::shutdown`] request while connected (see the module docs on cancel safety).
    async fn poll_once(&mut self) -> Option<Result<Event, rumqttc::ConnectionError>> {
        let poll = self.eventloop.poll();
        tokio::pin!(poll);
        loop {
            let deadline = self.drain.as_ref().map(|d| d.deadline);
            let far = Instant::now() + Duration::from_secs(86_400);
            tokio::select! {
                biased;
                r = &mut poll => return Some(r),
                _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                    warn!(
                        timeout = ?DRAIN_TIMEOUT,
                        "MQTT drain timed out; dropping the connection (the broker publishes the last will)"
                    );
                    return None;
                }
                // Stop signal during a connect attempt: abandon it (safe: nothing is queued yet).
                _ = self.shutdown.stopped(), if !self.is_connected => return None,
                _ = self.closing.stopped(), if self.drain.is_none() => {}
            }
            // `LinkHandle::shutdown` was called while polling.
            if !self.is_connected {
                return None;
            }
            // Same as `begin_drain`, which cannot be called while `poll` borrows the event loop.
            let mut drain = Drain::new(self.seal.online(self.attempt, false));
            advance_drain(&self.client, &mut drain, &self.online, &self.desired);
            self.drain = Some(drain);
        }
    }

    fn begin_drain(&mut self) {
        let mut drain = Drain::new(self.seal.online(self.attempt, false));
        advance_drain(&self.client, &mut drain, &self.online, &self.desired);
        self.drain = Some(drain);
    }

    /// Handle one event; `true` to stop.
    fn on_event(&mut self, event: Event) -> bool {
        trace!(?event, "mqtt event");
        match event {
            Event::Incoming(Incoming::ConnAck(ack)) => {
                self.is_connected = true;
                let connects = self.counters.connects.fetch_add(1, Ordering::Relaxed) + 1;
                info!(
                    session_present = ack.session_present,
                    failed_attempts = self.streak,
                    connects,
                    carried = self.carried.len(),
                    "MQTT connected"
                );
                self.streak = 0;
                self.backoff.reset();
                self.on_connack();
                self.connected.send_replace(true);
            }
            Event::Incoming(Incoming::Publish(p)) if p.topic == self.desired => {
                self.first_desired = false;
                debug!(
                    bytes = p.payload.len(),
                    retained = p.retain,
                    "desired notice received"
                );
                self.inbound.deliver(Inbound::Desired {
                    payload: p.payload.to_vec(),
                    retained: p.retain,
                });
            }
            Event::Incoming(Incoming::Publish(p)) if self.trust.contains(&p.topic) => {
                self.first_trust = false;
                debug!(topic = %p.topic, bytes = p.payload.len(), retained = p.retain, "trust record received");
                self.inbound.deliver(Inbound::Trust {
                    payload: p.payload.to_vec(),
                    retained: p.retain,
                });
            }
            Event::Incoming(Incoming::Publish(p)) if p.topic == self.heartbeat => {
                self.first_trust = false;
                self.inbound.deliver(Inbound::Heartbeat {
                    payload: p.payload.to_vec(),
                });
            }
            Event::Incoming(Incoming::Publish(p)) => {
                debug!(topic = %p.topic, "ignoring message on an unexpected topic");
            }
            Event::Incoming(Incoming::SubAck(ack)) => {
                self.subacks += 1;
                let refused = ack.return_codes.contains(&SubscribeReasonCode::Failure);
                match (self.subacks, refused) {
                    (1, true) => error!(
                        topic = %self.desired,
                        "broker refused the subscription (check the broker ACL); no updates will arrive"
                    ),
                    (_, true) => warn!(
                        topics = ?self.trust,
                        "broker refused the trust topics (check the broker ACL); trust records arrive only from a file"
                    ),
                    (1, false) => debug!(topic = %self.desired, "subscribed"),
                    (_, false) => debug!(topics = ?self.trust, "subscribed"),
                }
            }
            Event::Outgoing(Outgoing::Unsubscribe(pkid)) => {
                let mut t = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
                t.barrier_written(pkid);
            }
            Event::Incoming(Incoming::UnsubAck(ack)) => {
                let confirm = {
                    let mut t = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
                    t.barrier_acked(ack.pkid)
                };
                if let Some(c) = confirm {
                    trace!(topic = %c.topic, bytes = c.payload.len(), "confirmed publish acknowledged");
                    let _ = c.done.send(true);
                }
                if let Some(d) = self.drain.as_mut() {
                    d.unsuback = true;
                }
            }
            Event::Outgoing(Outgoing::Disconnect) if self.drain.is_some() => {
                self.clean = true;
                return true;
            }
            _ => {}
        }
        if let Some(d) = self.drain.as_mut() {
            advance_drain(&self.client, d, &self.online, &self.desired);
            if d.unsuback && !d.disconnect_queued && self.eventloop.state.inflight() == 0 {
                // The broker has acknowledged everything queued before the shutdown request.
                self.eventloop
                    .pending
                    .push_back(Request::Disconnect(Disconnect));
                d.disconnect_queued = true;
            }
        }
        false
    }

    /// Handle a connection error: back off, or stop when shutting down. `true` to stop.
    async fn on_error(&mut self, err: rumqttc::ConnectionError) -> bool {
        // rumqttc reads packets in batches and returns a bad packet's error before the events
        // of the good ones read with it: handle those first, in order (they came before it on
        // the wire, and the oversized rule below depends on which SUBACKs were seen).
        let queued: Vec<Event> = self.eventloop.state.events.drain(..).collect();
        for event in queued {
            self.on_event(event);
        }
        let was_connected = self.is_connected;
        self.is_connected = false;
        self.connected.send_replace(false);
        let errors = self.counters.errors.fetch_add(1, Ordering::Relaxed) + 1;
        self.streak += 1;
        self.carry_over();
        if let rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(bytes),
        )) = &err
        {
            // rumqttc refuses a packet over the limit before reading it, and can only drop the
            // connection. The device subscribes to its desired topic alone, so the packet was a
            // desired message; when it came first after the subscription it is the retained one,
            // which the broker would send again on every subscription: a reconnect loop, deaf to
            // the fleet. It is too large to be a notice, so the next connection deletes it (an
            // empty retained message) before subscribing. One dropped message, one reconnect.
            self.counters
                .oversized_dropped
                .fetch_add(1, Ordering::Relaxed);
            // The trust topics are subscribed after `desired`, so the broker sends their retained
            // messages after the second SUBACK: an oversized packet first after it is the
            // retained trust record, which a device may not delete; the trust topics are left
            // out for TRUST_SKIP instead (the trust record waits, nothing else does).
            if self.subacks >= 2 {
                if self.first_trust {
                    self.skip_trust_until = Some(Instant::now() + TRUST_SKIP);
                    warn!(
                        bytes,
                        limit = self.max_incoming,
                        topics = ?self.trust,
                        skip_s = TRUST_SKIP.as_secs(),
                        "dropped a retained trust message over max_incoming_bytes; not subscribing to the trust topics for a while"
                    );
                }
            } else {
                self.clear_desired = self.first_desired;
            }
            warn!(
                bytes,
                limit = self.max_incoming,
                topic = %self.desired,
                retained = self.clear_desired,
                "dropped a message from the broker over max_incoming_bytes{}",
                if self.clear_desired {
                    "; deleting that retained desired state before subscribing again"
                } else {
                    ""
                }
            );
        }
        if self.drain.is_some() {
            warn!(error = %err, "MQTT connection lost during shutdown");
            return true;
        }
        // The next attempt gets its own will, signed to outrank everything this one said.
        self.attempt = self.attempt.saturating_add(1);
        self.eventloop.mqtt_options.set_last_will(LastWill::new(
            self.online.as_str(),
            self.seal.online(self.attempt, false),
            QoS::AtLeastOnce,
            true,
        ));
        let delay = self.backoff.next_jittered();
        if self.streak == 1 {
            warn!(
                error = %err,
                was_connected,
                retry_in = ?delay,
                "MQTT connection {}; reconnecting with backoff (further failures are logged at debug)",
                if was_connected { "lost" } else { "failed" },
            );
        } else {
            debug!(
                error = %err,
                attempt = self.streak,
                errors,
                retry_in = ?delay,
                "MQTT connect attempt failed"
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => false,
            _ = self.closing.stopped() => true,
            _ = self.shutdown.stopped() => true,
        }
    }

    /// After a CONNACK: announce, subscribe, then re-send what the previous connection left
    /// unacknowledged. These go to the front of rumqttc's queue, ahead of the engine's requests.
    fn on_connack(&mut self) {
        let mut announce = Publish::new(
            self.online.as_str(),
            QoS::AtLeastOnce,
            self.seal.online(self.attempt, true),
        );
        announce.retain = true;
        let enroll = self.seal.enroll();
        let pending = &mut self.eventloop.pending;
        if let Some(enroll) = enroll {
            let mut e = Publish::new(self.enroll.as_str(), QoS::AtLeastOnce, enroll);
            e.retain = true;
            pending.push_back(Request::Publish(e));
        }
        pending.push_back(Request::Publish(announce));
        if std::mem::take(&mut self.clear_desired) {
            // Ahead of the SUBSCRIBE on the same connection: the broker deletes the retained
            // message before it would send it.
            let mut clear = Publish::new(self.desired.as_str(), QoS::AtLeastOnce, Vec::new());
            clear.retain = true;
            pending.push_back(Request::Publish(clear));
        }
        self.first_desired = true;
        pending.push_back(Request::Subscribe(Subscribe::new(
            self.desired.as_str(),
            QoS::AtLeastOnce,
        )));
        self.subacks = 0;
        self.first_trust = true;
        if self.skip_trust_until.is_none_or(|t| Instant::now() >= t) {
            self.skip_trust_until = None;
            pending.push_back(Request::Subscribe(Subscribe::new_many(
                self.trust
                    .iter()
                    .chain([&self.heartbeat])
                    .map(|t| SubscribeFilter::new(t.clone(), QoS::AtLeastOnce)),
            )));
        }
        pending.extend(self.carried.drain(..).map(Request::Publish));
    }

    /// Take the publishes rumqttc saved for a session that a clean session will not resume
    /// (`carry::carry_over`). Confirmed publishes are not carried: their confirmations resolve
    /// `false` instead.
    fn carry_over(&mut self) {
        let pending: Vec<Request> = self.eventloop.pending.drain(..).collect();
        let out = {
            let mut tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
            carry::carry_over(
                &mut tracked,
                pending,
                &mut self.carried,
                [self.online.as_str(), self.enroll.as_str()],
                MAX_CARRIED,
            )
        };
        for c in out.unconfirmed {
            let _ = c.done.send(false);
        }
        if out.dropped > 0 {
            warn!(
                dropped = out.dropped,
                "too many publishes waiting for the broker; dropped the oldest"
            );
        }
    }
}

impl Drain {
    fn new(goodbye: Vec<u8>) -> Self {
        debug!("MQTT link draining before disconnect");
        Drain {
            deadline: Instant::now() + DRAIN_TIMEOUT,
            goodbye,
            online_queued: false,
            unsubscribe_queued: false,
            unsuback: false,
            disconnect_queued: false,
        }
    }
}

/// Queue `online` = `0` and an UNSUBSCRIBE behind everything already queued. The UNSUBACK then
/// proves that the broker has processed all of it (it answers in order). A full queue is retried
/// after the next event.
fn advance_drain(client: &AsyncClient, d: &mut Drain, online: &str, desired: &str) {
    if !d.online_queued {
        if client
            .try_publish(online, QoS::AtLeastOnce, true, d.goodbye.clone())
            .is_err()
        {
            return;
        }
        d.online_queued = true;
    }
    if !d.unsubscribe_queued {
        if client.try_unsubscribe(desired).is_err() {
            return;
        }
        d.unsubscribe_queued = true;
    }
}

#[cfg(test)]
#[path = "link_tests.rs"]
mod tests;
