//! `ferryctl serve`: the long-running controller.
//!
//! - [`config`]: the TOML file (exit 78 when it is wrong).
//! - [`store`]: SQLite in the data directory; [`model`]: the records it holds.
//! - [`core`]: inventory, catalogue, rollouts, sequence counters — one owner, no I/O.
//! - [`notices`]: a device's signed desired state from the catalogue.
//! - [`ingest`]: the MQTT side (subscribe to every device's state/online/events, publish notices).
//! - [`http`]: the JSON API (bearer token) and `/metrics` ([`metrics`]).
//!
//! [`run`] wires them: device messages and API commands go to one loop that owns the [`Core`];
//! each round ends with one database commit, and only after it are notices published and
//! API callers answered.

pub mod config;
pub mod core;
pub mod enrolment;
mod etag;
pub mod forward;
pub mod http;
pub mod ingest;
pub mod lease;
pub mod metrics;
pub mod model;
pub mod notices;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rumqttc::QoS;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use self::core::{ApiError, Core, CoreParams, Inbound, Outgoing};
use crate::api::{
    DeviceDetail, DeviceView, ReleaseView, RollbackRequest, RollbackResult, RolloutView,
    StartRollout,
};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot listen on {addr}: {cause}")]
    Bind {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("MQTT: {0}")]
    Mqtt(String),
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
}

pub type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

/// An API request for the core loop.
pub enum Cmd {
    PushRelease(Vec<u8>, Reply<ReleaseView>),
    Releases(Reply<Vec<ReleaseView>>),
    Devices(Option<String>, Reply<Vec<DeviceView>>),
    /// A page of devices: selector, limit, after.
    DevicePage(
        Option<String>,
        usize,
        Option<String>,
        Reply<crate::api::DevicePage>,
    ),
    Device(String, Reply<DeviceDetail>),
    StartRollout(StartRollout, Reply<RolloutView>),
    PreviewRollout(StartRollout, Reply<crate::api::RolloutPreview>),
    Rollouts(Reply<Vec<RolloutView>>),
    /// A rollout, with its per-device list or not.
    Rollout(String, bool, Reply<RolloutView>),
    RolloutOp(String, crate::api::RolloutOp, Reply<RolloutView>),
    Rollback(RollbackRequest, Reply<RollbackResult>),
    Telemetry {
        device: String,
        since: Duration,
        metric: Option<String>,
        reply: Reply<crate::api::TelemetrySeries>,
    },
    /// Recompute the gauges for `/metrics`.
    Gauges(Reply<()>),
    /// Device keys, approved and pending.
    Keys(Reply<Vec<enrolment::KeyRecord>>),
    /// Approve, provision or revoke a device's key.
    Key(String, KeyOp, Reply<KeyAnswer>),
}

/// What an operator does to a device's key.
#[derive(Debug, Clone)]
pub enum KeyOp {
    /// Approve the pending request (only if its key id starts with this).
    Approve(Option<String>),
    /// Install this SPKI PEM key as the device's.
    Provision(String),
    Revoke,
}

/// The answer to a [`Cmd::Key`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct KeyAnswer {
    pub device: String,
    /// `approved`, `provisioned` or `revoked`.
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<enrolment::KeyRecord>,
}

impl Cmd {
    /// Reads change nothing, so they are answered without a round.
    fn is_read_only(&self) -> bool {
        match self {
            Cmd::Releases(_)
            | Cmd::Devices(..)
            | Cmd::DevicePage(..)
            | Cmd::Device(..)
            | Cmd::Rollouts(_)
            | Cmd::Rollout(..)
            | Cmd::PreviewRollout(..)
            | Cmd::Telemetry { .. }
            | Cmd::Gauges(_)
            | Cmd::Keys(_) => true,
            Cmd::PushRelease(..)
            | Cmd::StartRollout(..)
            | Cmd::RolloutOp(..)
            | Cmd::Rollback(..)
            | Cmd::Key(..) => false,
        }
    }
}

/// What a started server listens on (for tests binding port 0).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub http: SocketAddr,
}

/// Run the controller until `shutdown` resolves. `bound` learns the HTTP address once listening.
pub async fn run(
    loaded: config::Loaded,
    shutdown: impl Future<Output = ()> + Send + 'static,
    bound: Option<oneshot::Sender<Bound>>,
) -> Result<(), ServeError> {
    let cfg = loaded.config.clone();
    // The heartbeat is signed by the controller key, beside the core's own copy.
    let heartbeat_key =
        ferry_protocol::PrivateKey::from_pem(&loaded.key.to_pem()).expect("a loaded key re-parses");
    let metrics = Arc::new(metrics::Metrics::default());
    let mut st = store::open(&loaded.store, cfg.store.ca.as_deref())?;
    info!(db = %st.describe(), "database open");

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|cause| ServeError::Bind {
            addr: cfg.listen,
            cause,
        })?;
    let http_addr = listener.local_addr().map_err(ServeError::Http)?;

    // On PostgreSQL every controller is a replica: the leader lease decides which one drives
    // rollouts; the others forward the API to it and wait to take over (`lease.rs`).
    let mut replica = match &loaded.store {
        store::StoreUrl::Postgres(url) => {
            let me = cfg.replica.id.clone().unwrap_or_else(host_name);
            let advertise = cfg
                .replica
                .advertise
                .clone()
                .unwrap_or_else(|| format!("http://{http_addr}"));
            let lease = lease::Lease::open(
                url,
                cfg.store.ca.as_deref(),
                &me,
                &advertise,
                cfg.replica.lease,
            )?;
            Some(lease::Replica::start(lease, metrics.clone()))
        }
        store::StoreUrl::Sqlite(_) => {
            metrics.leader.store(1, std::sync::atomic::Ordering::SeqCst);
            None
        }
    };
    let role = replica
        .as_ref()
        .map_or_else(forward::Role::single, |r| r.role.clone());

    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Cmd>(256);
    let app = http::router(http::AppState {
        cmd: cmd_tx,
        token: Arc::from(loaded.token.as_str()),
        metrics: metrics.clone(),
        role,
    });
    let mut http_stop = stop_rx.clone();
    let http_task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|s| *s).await;
            })
            .await
    });
    info!(http = %http_addr, broker = %cfg.mqtt.url, "controller serving");
    if let Some(b) = bound {
        let _ = b.send(Bound { http: http_addr });
    }
    if let Some(r) = replica.as_mut() {
        match r.wait_leading(&mut stop_rx.clone()).await {
            Some(fence) => {
                info!(replica = %fence.holder, token = fence.token, "leading: loading the fleet from the database");
                st.set_fence(Some(fence));
            }
            None => {
                info!("controller stopping (a follower)");
                if let Some(r) = replica.take() {
                    r.stop();
                }
                let _ = tokio::time::timeout(Duration::from_secs(10), http_task).await;
                return Ok(());
            }
        }
    }

    let mut core = Core::new(
        st,
        CoreParams {
            key: loaded.key,
            release_keys: loaded.release_keys,
            release_threshold: cfg.trust.release_threshold,
            rollout: cfg.rollout.clone(),
            prefix: cfg.mqtt.topic_prefix.clone(),
            metrics: metrics.clone(),
            enroll_tokens: loaded.enroll_tokens.clone(),
        },
    )?;

    // Small: when the core lags, the backlog waits in the broker, not parsed in our memory.
    let (in_tx, mut in_rx) = mpsc::channel::<Inbound>(4_096);
    let link = ingest::start(
        &cfg.mqtt,
        loaded.mqtt_password.clone(),
        in_tx,
        core.registry(),
        metrics.clone(),
        stop_rx.clone(),
    )
    .map_err(ServeError::Mqtt)?;

    // Notices committed before a crash but perhaps never delivered are published again on
    // every CONNACK (see `Inbound::Connected`).

    let mut tick = tokio::time::interval(cfg.rollout.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prune = tokio::time::interval(Duration::from_secs(3600));
    let heartbeat_every = cfg.rollout.heartbeat;
    let mut heartbeat = tokio::time::interval(heartbeat_every.max(Duration::from_secs(1)));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let heartbeat_topic = ferry_protocol::topics::heartbeat(&cfg.mqtt.topic_prefix);
    let mut stop = stop_rx.clone();
    // Device messages are applied as they come, but rollouts advance and the database is
    // written at most every ROUND (or at once for an API command or a tick): a round walks
    // every device of an active rollout, so a flood of reports is handled in few rounds.
    const ROUND: Duration = Duration::from_millis(50);
    let mut last_round = tokio::time::Instant::now();
    let mut pending = false;
    let mut heap = HeapTrim::default();
    // When the next soak ends or device times out: advancing right then, not up to a tick
    // later, takes up to `tick` off every wave.
    let mut deadline: Option<tokio::time::Instant> = None;
    let result: Result<(), ServeError> = loop {
        let mut replies: Vec<Box<dyn FnOnce(bool) + Send>> = Vec::new();
        let mut now_round = false;
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break Ok(()),
            Some(cmd) = cmd_rx.recv() => {
                // Take what else is queued, to share the commit. Reads are answered at once:
                // they change nothing, so they need no round (pollers cost no commits).
                let mut next = Some(cmd);
                while let Some(cmd) = next.take().or_else(|| cmd_rx.try_recv().ok()) {
                    let write = !cmd.is_read_only();
                    let reply = handle(&mut core, cmd);
                    if write {
                        replies.push(reply);
                        now_round = true;
                    } else {
                        reply(true);
                    }
                }
                if !now_round {
                    continue;
                }
            }
            Some(m) = in_rx.recv() => {
                let now = Utc::now();
                core.ingest(m, now);
                let mut n = 1;
                while n < 8192 {
                    match in_rx.try_recv() {
                        Ok(m) => { core.ingest(m, now); n += 1; }
                        Err(_) => break,
                    }
                }
                heap.ingested += n;
                pending = true;
            }
            _ = tokio::time::sleep_until(last_round + ROUND), if pending => {}
            _ = tick.tick() => { core.advance(true, Utc::now()); now_round = true; }
            _ = sleep_until_some(deadline) => {
                deadline = None;
                core.advance(true, Utc::now());
                now_round = true;
            }
            _ = prune.tick() => core.prune(&cfg.retention, Utc::now()),
            _ = heartbeat.tick(), if !heartbeat_every.is_zero() => {
                let hb = ferry_protocol::heartbeat::Heartbeat {
                    issued_at: chrono::SubsecRound::trunc_subsecs(Utc::now(), 0),
                };
                let payload = hb.sign(&heartbeat_key).to_json().into_bytes();
                if let Err(e) = link
                    .publisher
                    .try_publish(heartbeat_topic.clone(), QoS::AtLeastOnce, true, payload)
                {
                    warn!(error = %e, "heartbeat not handed to the broker");
                }
                continue;
            }
        }
        if !(now_round || (pending && last_round.elapsed() >= ROUND)) {
            continue;
        }
        core.advance(false, Utc::now());
        pending = false;
        last_round = tokio::time::Instant::now();
        deadline = core.next_deadline().map(|at| {
            let wait = (at - Utc::now()).to_std().unwrap_or_default();
            // 1 ms late rather than early: `at_least` compares `now >= end`.
            last_round + wait + Duration::from_millis(1)
        });
        match core.flush() {
            Ok(out) => {
                replies.into_iter().for_each(|r| r(true));
                publish(&link.publisher, out, &metrics).await;
                if in_rx.is_empty() {
                    heap.after_a_burst();
                }
            }
            Err(e) => {
                error!(error = %e, "cannot write the database; stopping");
                replies.into_iter().for_each(|r| r(false));
                break Err(e.into());
            }
        }
    };
    info!("controller stopping");
    if result.is_ok() {
        // What was written lazily (device records, rollout progress) goes to disk now; notices
        // of this last round are stored and go out at the next start.
        if let Err(e) = core.flush_all() {
            warn!(error = %e, "cannot write the last changes");
        }
    }
    // After the last commit: the lease goes, and another replica takes over at once.
    if let Some(r) = replica.take() {
        r.stop();
    }
    let _ = link.publisher.disconnect().await;
    let _ = link.client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), link.task).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), link.publisher_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), link.verifier_task).await;
    match tokio::time::timeout(Duration::from_secs(10), http_task).await {
        Ok(Ok(Err(e))) => warn!(error = %e, "HTTP server ended with an error"),
        Ok(_) => {}
        Err(_) => warn!("HTTP server did not drain within 10 s"),
    }
    result
}

/// This machine's host name: a replica's default id.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "ferryctl".into())
}

/// Gives the heap's free pages back to the system once a burst of reports is over. A wave's
/// flood (10,000 devices × 13 signed reports) leaves glibc's heap fragmented around the records
/// that stay, and without this the RSS only ever grows from burst to burst.
#[derive(Default)]
struct HeapTrim {
    /// Reports applied since the last trim.
    ingested: usize,
    last: Option<tokio::time::Instant>,
}

impl HeapTrim {
    /// At most every 2 s, and only after at least 1,000 reports.
    fn after_a_burst(&mut self) {
        if self.ingested < 1_000
            || self
                .last
                .is_some_and(|t| t.elapsed() < Duration::from_secs(2))
        {
            return;
        }
        self.ingested = 0;
        self.last = Some(tokio::time::Instant::now());
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Sleeps until `at`, or forever when there is none.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn publish(client: &rumqttc::AsyncClient, out: Vec<Outgoing>, metrics: &metrics::Metrics) {
    for o in out {
        match client
            .publish(
                o.topic.clone(),
                QoS::AtLeastOnce,
                true,
                o.payload.into_bytes(),
            )
            .await
        {
            Ok(()) => metrics.notices_published.inc(),
            Err(e) => {
                // Only when the MQTT task is gone (shutdown): the notice is stored and is
                // published again at the next start.
                metrics.publish_errors.inc();
                warn!(topic = %o.topic, error = %e, "notice not handed to the broker");
            }
        }
    }
}

/// Run one API command; the returned closure answers the caller once the round is committed
/// (`true`) or failed to commit (`false`: a 500, the change is lost with the process).
fn handle(core: &mut Core, cmd: Cmd) -> Box<dyn FnOnce(bool) + Send> {
    fn answer<T: Send + 'static>(
        reply: Reply<T>,
        r: Result<T, ApiError>,
    ) -> Box<dyn FnOnce(bool) + Send> {
        Box::new(move |committed| {
            let r = if committed {
                r
            } else {
                Err(ApiError {
                    status: 500,
                    message: "the controller could not write its database".into(),
                })
            };
            let _ = reply.send(r);
        })
    }
    let now = Utc::now();
    match cmd {
        Cmd::PushRelease(body, reply) => answer(reply, core.push_release(&body, now)),
        Cmd::Releases(reply) => answer(reply, Ok(core.releases())),
        Cmd::Devices(sel, reply) => answer(reply, core.devices(sel.as_deref())),
        Cmd::DevicePage(sel, limit, after, reply) => answer(
            reply,
            core.device_page(sel.as_deref(), limit, after.as_deref()),
        ),
        Cmd::Device(id, reply) => answer(reply, core.device(&id)),
        Cmd::StartRollout(req, reply) => answer(reply, core.start_rollout(&req, now)),
        Cmd::PreviewRollout(req, reply) => answer(reply, core.preview_rollout(&req, now)),
        Cmd::Rollouts(reply) => answer(reply, Ok(core.rollouts())),
        Cmd::Rollout(id, with_devices, reply) => answer(reply, core.rollout(&id, with_devices)),
        Cmd::RolloutOp(id, op, reply) => answer(reply, core.rollout_op(&id, op, now)),
        Cmd::Rollback(req, reply) => answer(reply, core.rollback(&req, now)),
        Cmd::Telemetry {
            device,
            since,
            metric,
            reply,
        } => answer(
            reply,
            core.telemetry(&device, since, metric.as_deref(), now),
        ),
        Cmd::Gauges(reply) => {
            core.update_gauges();
            answer(reply, Ok(()))
        }
        Cmd::Keys(reply) => answer(reply, Ok(lock(&core.registry()).list())),
        Cmd::Key(device, op, reply) => answer(reply, key_op(core, device, op, now)),
    }
}

fn lock(
    r: &std::sync::Mutex<enrolment::Registry>,
) -> std::sync::MutexGuard<'_, enrolment::Registry> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

fn key_op(
    core: &mut Core,
    device: String,
    op: KeyOp,
    now: chrono::DateTime<Utc>,
) -> Result<KeyAnswer, ApiError> {
    ferry_protocol::names::check_device_id(&device).map_err(ApiError::bad_request)?;
    let registry = core.registry();
    let mut r = lock(&registry);
    let (action, key) = match op {
        KeyOp::Approve(keyid) => (
            "approved",
            Some(
                r.approve(&device, keyid.as_deref(), now)
                    .map_err(ApiError::not_found)?,
            ),
        ),
        KeyOp::Provision(pem) => {
            let k = ferry_protocol::keys::PublicKey::from_pem(&pem)
                .map_err(|e| ApiError::bad_request(format!("public_key: {e}")))?;
            ("provisioned", Some(r.provision(&device, k, now)))
        }
        KeyOp::Revoke => {
            r.revoke(&device).map_err(ApiError::not_found)?;
            ("revoked", None)
        }
    };
    info!(device = %device, action, key = ?key.as_ref().map(|k| &k.keyid), "device key changed by the operator");
    Ok(KeyAnswer {
        device,
        action: action.into(),
        key,
    })
}
