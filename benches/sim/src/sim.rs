//! The MQTT side of the simulator: devices multiplexed over a few connections, one tokio task
//! per device (its update runs there, one notice after another, as in the agent), one task per
//! connection polling rumqttc's event loop and routing `desired` messages to their device.
//!
//! Every message is signed by the device's own key (protocol v2, [`crate::signing`]). On each
//! CONNACK a device publishes its enrolment request (retained), then `online` (retained), then
//! its state. A connection carries at most one last will, so only a device alone on its
//! connection (`--per-connection 1`) has one (its signed `online` = false, re-signed for every
//! connection attempt, as the agent does); the others publish nothing when their connection
//! goes down.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use bytes::Bytes;
use chrono::Utc;
use ferry_protocol::device_report::Stream;
use ferry_protocol::report::Phase;
use ferry_protocol::topics::{self, DeviceTopics, Kind};
use rumqttc::{
    AsyncClient, Event, EventLoop, Incoming, LastWill, MqttOptions, QoS, SubscribeFilter,
    SubscribeReasonCode,
};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, warn};

use crate::delay::Delay;
use crate::device::{
    fake_digest, next_phase, wait_before, AppVersion, Check, Device, Outcome, Report, Verifier,
    Wait,
};
use crate::signing::{DeviceKey, Signer};
use crate::stats::{unix_ms, Recorder};

/// Topic filters per SUBSCRIBE packet.
const FILTERS_PER_SUBSCRIBE: usize = 100;
pub const MAX_PACKET: usize = 1024 * 1024;

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub host: String,
    pub port: u16,
    pub prefix: String,
    pub devices: usize,
    /// Index of the first device (ids are `{id_prefix}{index:05}`).
    pub first: usize,
    pub id_prefix: String,
    pub per_connection: usize,
    pub platform: String,
    pub agent_version: String,
    pub labels: BTreeMap<String, String>,
    pub apps: BTreeMap<String, semver::Version>,
    pub failure_rate: f64,
    pub pull_delay: Delay,
    pub health_delay: Delay,
    pub seed: u64,
    /// Unacknowledged QoS 1 publishes per connection.
    pub inflight: u16,
    /// The `boot` half of every report counter (higher than in any earlier run).
    pub boot: u32,
    /// The fleet's enrolment token, proven in every enrolment request.
    pub enroll_token: Option<String>,
}

impl SimConfig {
    pub fn device_id(&self, i: usize) -> String {
        format!("{}{:05}", self.id_prefix, self.first + i)
    }

    pub fn connections(&self) -> usize {
        self.devices.div_ceil(self.per_connection.max(1))
    }
}

/// `mqtt://HOST[:PORT]`, parsed as the agent and the controller parse it
/// ([`ferry_protocol::BrokerUrl`]); plain TCP only (the benchmark runs on loopback).
pub fn parse_broker(url: &str) -> anyhow::Result<(String, u16)> {
    let u = ferry_protocol::BrokerUrl::parse(url).map_err(|e| anyhow!("broker: {e}"))?;
    if u.tls {
        bail!("broker {url:?}: the simulator speaks plain MQTT only (mqtt://)");
    }
    Ok((u.host, u.port))
}

enum Msg {
    /// (Re)connected (connection attempt `attempt`, from 0): publish the enrolment request,
    /// `online` and the retained state.
    Announce {
        attempt: u32,
    },
    Notice {
        raw: Bytes,
        arrived_ms: u64,
    },
    Blast {
        n: u32,
        then_offline: bool,
        done: Arc<Countdown>,
    },
}

/// Counts devices down; wakes the waiter at zero.
struct Countdown {
    left: AtomicUsize,
    zero: Notify,
}

impl Countdown {
    fn one_done(&self) {
        if self.left.fetch_sub(1, Relaxed) == 1 {
            self.zero.notify_one();
        }
    }
}

struct Shared {
    rec: Arc<Recorder>,
    verifier: Arc<Verifier>,
    cfg: SimConfig,
    /// Devices that published their `online` and `state` since start.
    announced: AtomicUsize,
    /// SUBSCRIBE packets not yet acknowledged.
    subacks_pending: AtomicU64,
    /// Notices routed to a device and not yet handled to the end of their update.
    pending: AtomicU64,
}

/// A running simulation.
pub struct Sim {
    shared: Arc<Shared>,
    senders: Vec<mpsc::UnboundedSender<Msg>>,
    stop: watch::Sender<bool>,
}

impl Sim {
    /// Connect every connection and start every device; returns at once (see [`Sim::is_ready`]).
    ///
    /// Connections run on `io`, devices (verification, updates) on `work`: with separate
    /// threads, a backlog of signatures to verify does not delay reading the sockets, so the
    /// recorded arrival time of a notice is when the broker delivered it.
    pub fn start(
        cfg: SimConfig,
        verifier: Verifier,
        rec: Arc<Recorder>,
        io: &Handle,
        work: &Handle,
    ) -> anyhow::Result<Sim> {
        topics::check_prefix(&cfg.prefix).map_err(|e| anyhow!(e))?;
        let shared = Arc::new(Shared {
            rec,
            verifier: Arc::new(verifier),
            cfg: cfg.clone(),
            announced: AtomicUsize::new(0),
            subacks_pending: AtomicU64::new(0),
            pending: AtomicU64::new(0),
        });
        let (stop, _) = watch::channel(false);
        let mut senders = Vec::with_capacity(cfg.devices);
        let pid = std::process::id();
        for c in 0..cfg.connections() {
            let lo = c * cfg.per_connection;
            let hi = ((c + 1) * cfg.per_connection).min(cfg.devices);
            let mut opts = MqttOptions::new(format!("ferry-sim-{pid}-{c}"), &cfg.host, cfg.port);
            opts.set_keep_alive(Duration::from_secs(60))
                .set_clean_session(true)
                .set_max_packet_size(MAX_PACKET, MAX_PACKET)
                .set_inflight(cfg.inflight);
            // Keys first: a device alone on its connection signs the connection's last will.
            let keys = (lo..hi)
                .map(|i| {
                    let id = cfg.device_id(i);
                    let t = DeviceTopics::new(&cfg.prefix, &id).map_err(|e| anyhow!(e))?;
                    Ok((i, t, Arc::new(DeviceKey::derive(&id, cfg.boot))))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let will = match keys.as_slice() {
                [(_, t, key)] => {
                    let w = Will {
                        topic: t.online(),
                        key: key.clone(),
                    };
                    opts.set_last_will(w.last_will(0));
                    Some(w)
                }
                _ => None,
            };
            let (client, eventloop) = AsyncClient::new(opts, (hi - lo).max(250) * 4);
            let mut routes = HashMap::with_capacity(hi - lo);
            let mut filters = Vec::with_capacity(hi - lo);
            for (i, t, key) in keys {
                let id = key.device().to_string();
                let (tx, rx) = mpsc::unbounded_channel();
                let apps = cfg
                    .apps
                    .iter()
                    .map(|(name, v)| {
                        (
                            name.clone(),
                            AppVersion {
                                version: v.clone(),
                                digest: fake_digest(name, &v.to_string(), &cfg.platform),
                            },
                        )
                    })
                    .collect();
                let dev = Device::new(
                    id.clone(),
                    cfg.platform.clone(),
                    cfg.agent_version.clone(),
                    cfg.labels.clone(),
                    apps,
                );
                let out = Outbox {
                    client: client.clone(),
                    state: t.state(),
                    events: t.events(),
                    online: t.online(),
                    enroll: t.enroll(),
                    signer: Signer::new(key, cfg.enroll_token.as_deref(), &cfg.agent_version),
                    rec: shared.rec.clone(),
                };
                let rng = fastrand::Rng::with_seed(
                    cfg.seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                );
                work.spawn(device_task(i, dev, rx, out, rng, shared.clone()));
                filters.push(SubscribeFilter::new(t.desired(), QoS::AtLeastOnce));
                routes.insert(id, (i, tx.clone()));
                senders.push(tx);
            }
            io.spawn(connection_task(
                c,
                eventloop,
                client,
                routes,
                filters,
                will,
                shared.clone(),
                stop.subscribe(),
            ));
        }
        info!(
            devices = cfg.devices,
            connections = cfg.connections(),
            "simulator started"
        );
        Ok(Sim {
            shared,
            senders,
            stop,
        })
    }

    /// Every device announced, every subscription acknowledged, every publish acknowledged.
    pub fn is_ready(&self) -> bool {
        let c = &self.shared.rec.counters;
        self.shared.announced.load(Relaxed) >= self.shared.cfg.devices
            && self.shared.subacks_pending.load(Relaxed) == 0
            && c.acked.load(Relaxed) >= c.published.load(Relaxed)
    }

    /// No notice waiting or being handled, and every publish acknowledged.
    pub fn is_idle(&self) -> bool {
        let c = &self.shared.rec.counters;
        self.shared.pending.load(Relaxed) == 0 && c.acked.load(Relaxed) >= c.published.load(Relaxed)
    }

    /// Every device publishes `n` extra state reports as fast as its connection takes them,
    /// then, with `then_offline`, `online` = `0` (a marker: a controller that shows every
    /// device offline has processed every blast message before it). Recorded in `blasts`.
    pub fn blast(&self, n: u32, then_offline: bool) {
        let rec = self.shared.rec.clone();
        let per_device = u64::from(n) + u64::from(then_offline);
        let i = rec.blast_started(n, self.senders.len() as u64 * per_device);
        let done = Arc::new(Countdown {
            left: AtomicUsize::new(self.senders.len()),
            zero: Notify::new(),
        });
        for tx in &self.senders {
            let _ = tx.send(Msg::Blast {
                n,
                then_offline,
                done: done.clone(),
            });
        }
        info!(per_device = n, "blast started");
        tokio::spawn(async move {
            while done.left.load(Relaxed) > 0 {
                let _ = tokio::time::timeout(Duration::from_millis(50), done.zero.notified()).await;
            }
            rec.blast_queued(i);
            let c = &rec.counters;
            let target = c.published.load(Relaxed);
            while c.acked.load(Relaxed) < target {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            rec.blast_acked(i);
            info!("blast acknowledged by the broker");
        });
    }

    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// The last will of a connection that carries a single device.
struct Will {
    topic: String,
    key: Arc<DeviceKey>,
}

impl Will {
    /// Signed for connection `attempt`: outranks that connection's announce, and is outranked
    /// by the next connection's.
    fn last_will(&self, attempt: u32) -> LastWill {
        LastWill::new(
            self.topic.as_str(),
            self.key.online(attempt, false),
            QoS::AtLeastOnce,
            true,
        )
    }
}

#[allow(clippy::too_many_arguments)]
async fn connection_task(
    idx: usize,
    mut eventloop: EventLoop,
    client: AsyncClient,
    routes: HashMap<String, (usize, mpsc::UnboundedSender<Msg>)>,
    filters: Vec<SubscribeFilter>,
    will: Option<Will>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let c = &shared.rec.counters;
    let prefix = shared.cfg.prefix.clone();
    // Connection attempts so far: the `n` of `online` (and of the will) depends on it.
    let mut attempt: u32 = 0;
    loop {
        let ev = tokio::select! {
            ev = eventloop.poll() => ev,
            _ = stop.changed() => break,
        };
        match ev {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                c.connects.fetch_add(1, Relaxed);
                debug!(connection = idx, "connected");
                let chunks: Vec<Vec<SubscribeFilter>> = filters
                    .chunks(FILTERS_PER_SUBSCRIBE)
                    .map(<[SubscribeFilter]>::to_vec)
                    .collect();
                shared
                    .subacks_pending
                    .fetch_add(chunks.len() as u64, Relaxed);
                let client = client.clone();
                let senders: Vec<_> = routes.values().map(|(_, tx)| tx.clone()).collect();
                let rec = shared.rec.clone();
                // Not inline: the request channel is drained by this very loop.
                tokio::spawn(async move {
                    for chunk in chunks {
                        if client.subscribe_many(chunk).await.is_err() {
                            rec.counters.publish_errors.fetch_add(1, Relaxed);
                        }
                    }
                    for tx in senders {
                        let _ = tx.send(Msg::Announce { attempt });
                    }
                });
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => {
                let now = unix_ms();
                match topics::parse(&prefix, &p.topic) {
                    Some((device, Kind::Desired)) => match routes.get(&device) {
                        Some((_, tx)) => {
                            c.notice_arrived(now);
                            shared.pending.fetch_add(1, Relaxed);
                            let _ = tx.send(Msg::Notice {
                                raw: p.payload,
                                arrived_ms: now,
                            });
                        }
                        None => {
                            c.stray_messages.fetch_add(1, Relaxed);
                        }
                    },
                    _ => {
                        c.stray_messages.fetch_add(1, Relaxed);
                    }
                }
            }
            Ok(Event::Incoming(Incoming::PubAck(_))) => {
                c.acked.fetch_add(1, Relaxed);
            }
            Ok(Event::Incoming(Incoming::SubAck(s))) => {
                shared.subacks_pending.fetch_sub(1, Relaxed);
                let failed = s
                    .return_codes
                    .iter()
                    .filter(|r| matches!(r, SubscribeReasonCode::Failure))
                    .count();
                if failed > 0 {
                    c.suback_failures.fetch_add(failed as u64, Relaxed);
                    warn!(
                        connection = idx,
                        failed, "subscriptions refused by the broker"
                    );
                }
            }
            Ok(_) => {}
            Err(e) => {
                c.connection_errors.fetch_add(1, Relaxed);
                if *stop.borrow() {
                    break;
                }
                // The next poll connects again: a new attempt, with its own will.
                attempt = attempt.saturating_add(1);
                if let Some(w) = &will {
                    eventloop.mqtt_options.set_last_will(w.last_will(attempt));
                }
                warn!(connection = idx, error = %e, "MQTT connection error; reconnecting in 1 s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => break,
                }
            }
        }
    }
    let _ = client.try_disconnect();
}

/// A device's publishing side: its topics and its [`Signer`]. Everything it sends is signed.
struct Outbox {
    client: AsyncClient,
    state: String,
    events: String,
    online: String,
    enroll: String,
    signer: Signer,
    rec: Arc<Recorder>,
}

impl Outbox {
    async fn publish(&mut self, r: &Report) {
        let c = &self.rec.counters;
        let Ok((stream, body)) = self.signer.report(r) else {
            c.publish_errors.fetch_add(1, Relaxed);
            return;
        };
        let (topic, retain, kind) = match stream {
            Stream::State => (&self.state, true, &c.published_state),
            _ => (&self.events, false, &c.published_events),
        };
        self.send(topic, retain, body, kind).await;
    }

    /// The enrolment request (retained): first thing on every connection.
    async fn enroll(&mut self) {
        let body = self.signer.enroll();
        let kind = &self.rec.counters.published_enroll;
        self.send(&self.enroll, true, body, kind).await;
    }

    /// `online` for connection `attempt`; `false` is the will's payload (the graceful goodbye).
    async fn online_flag(&self, attempt: u32, online: bool) {
        let kind = &self.rec.counters.published_online;
        let body = self.signer.key().online(attempt, online);
        self.send(&self.online, true, body, kind).await;
    }

    async fn send(&self, topic: &str, retain: bool, body: Vec<u8>, kind: &AtomicU64) {
        let c = &self.rec.counters;
        match self
            .client
            .publish(topic, QoS::AtLeastOnce, retain, body)
            .await
        {
            Ok(()) => {
                c.published.fetch_add(1, Relaxed);
                kind.fetch_add(1, Relaxed);
            }
            Err(e) => {
                c.publish_errors.fetch_add(1, Relaxed);
                debug!(topic, error = %e, "publish failed");
            }
        }
    }
}

async fn device_task(
    idx: usize,
    mut dev: Device,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    mut out: Outbox,
    mut rng: fastrand::Rng,
    shared: Arc<Shared>,
) {
    let mut announced = false;
    // The connection attempt last announced on (its will is what a graceful offline sends).
    let mut attempt = 0;
    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Announce { attempt: a } => {
                attempt = a;
                out.enroll().await;
                out.online_flag(attempt, true).await;
                out.publish(&Report::State(Box::new(dev.state(Utc::now()))))
                    .await;
                if !announced {
                    announced = true;
                    shared.announced.fetch_add(1, Relaxed);
                }
            }
            Msg::Blast {
                n,
                then_offline,
                done,
            } => {
                for _ in 0..n {
                    out.publish(&Report::State(Box::new(dev.state(Utc::now()))))
                        .await;
                }
                if then_offline {
                    out.online_flag(attempt, false).await;
                }
                done.one_done();
            }
            Msg::Notice { raw, arrived_ms } => {
                handle_notice(idx, &mut dev, &raw, arrived_ms, &mut out, &mut rng, &shared).await;
                shared.pending.fetch_sub(1, Relaxed);
            }
        }
    }
}

async fn handle_notice(
    idx: usize,
    dev: &mut Device,
    raw: &[u8],
    arrived_ms: u64,
    out: &mut Outbox,
    rng: &mut fastrand::Rng,
    shared: &Shared,
) {
    let cfg = &shared.cfg;
    let rec = &shared.rec;
    let outcome = if rng.f64() < cfg.failure_rate {
        Outcome::RollBack
    } else {
        Outcome::Commit
    };
    let mut u = match dev.check(raw, &shared.verifier, Utc::now(), outcome) {
        Check::Duplicate => {
            rec.duplicate();
            return;
        }
        Check::SameRejection => {
            rec.repeated_rejection();
            return;
        }
        Check::Reject(r) => {
            warn!(device = %dev.id, sequence = r.sequence, reason = %r.reason, "notice rejected");
            rec.rejected(idx, r.rollout.as_deref(), &r.key);
            for rep in dev.reject(&r, Utc::now()) {
                out.publish(&rep).await;
            }
            return;
        }
        Check::Accept(u) => u,
    };
    rec.accepted(idx, u.sequence, u.rollout.as_deref(), arrived_ms);
    shared.rec.counters.busy.fetch_add(1, Relaxed);
    while let Some(next) = next_phase(u.phase, u.outcome) {
        if let Some(w) = wait_before(next) {
            let d = match w {
                Wait::Pull => cfg.pull_delay,
                Wait::Health => cfg.health_delay,
            }
            .sample(rng);
            if !d.is_zero() {
                tokio::time::sleep(d).await;
            }
        }
        let Some((phase, reports)) = dev.advance(&mut u, Utc::now()) else {
            break;
        };
        for r in &reports {
            out.publish(r).await;
        }
        if phase.is_terminal() {
            rec.finished(
                idx,
                u.rollout.as_deref(),
                phase == Phase::Committed,
                arrived_ms,
                unix_ms(),
            );
        }
    }
    shared.rec.counters.busy.fetch_sub(1, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        assert_eq!(
            parse_broker("mqtt://127.0.0.1:1884").unwrap(),
            ("127.0.0.1".into(), 1884)
        );
        assert_eq!(
            parse_broker("mqtt://localhost").unwrap(),
            ("localhost".into(), 1883)
        );
        assert!(parse_broker("http://x").is_err());
        assert!(parse_broker("mqtt://h:x").is_err());
        assert!(parse_broker("mqtts://h").is_err());
    }

    #[test]
    fn ids_and_connections() {
        let cfg = SimConfig {
            host: "h".into(),
            port: 1,
            prefix: "ferry".into(),
            devices: 1001,
            first: 7,
            id_prefix: "sim-".into(),
            per_connection: 500,
            platform: "linux/arm64".into(),
            agent_version: "sim".into(),
            labels: BTreeMap::new(),
            apps: BTreeMap::new(),
            failure_rate: 0.0,
            pull_delay: Delay::default(),
            health_delay: Delay::default(),
            seed: 0,
            inflight: 100,
            boot: 1,
            enroll_token: None,
        };
        assert_eq!(cfg.device_id(0), "sim-00007");
        assert_eq!(cfg.connections(), 3);
    }
}
