//! The agent's entry point tests can drive (after mini-redis): [`run`] takes a loaded config and
//! a shutdown future, and returns once it has drained to a safe point.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ferry_protocol::topics::DeviceTopics;
use tokio::sync::watch;

use crate::shutdown::StopFlag;

use crate::config::Loaded;
use crate::download::blob::BlobSettings;
use crate::download::rate::RateLimiter;
use crate::download::serve::LocalRegistry;
use crate::download::source::{StoreLimits, StoreSource};
use crate::download::store::Store;
use crate::mqtt::{Inbound, MqttLink};
use crate::outbox::MqttOutbox;
use crate::runtime::docker::DockerRuntime;
use crate::runtime::ContainerRuntime;
use crate::sdnotify;
use crate::telemetry::TelemetryTask;
use crate::update::engine::{Engine, EngineConfig, EngineError};
use crate::update::journal::JournalStore;
use crate::verify::trust::TrustStore;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("state directory {path}: {source}")]
    StateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("content store {path}: {source}")]
    Store {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("registry credentials for {registry}: {source}")]
    Credentials {
        registry: String,
        #[source]
        source: std::io::Error,
    },
    #[error("mqtt: {0}")]
    Mqtt(String),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(
        "agent {version} on trial did not reach the broker and report within {}",
        crate::health::params::fmt_secs(*.within)
    )]
    NotConfirmed { version: String, within: Duration },
    #[error("shut down before the container engine answered: {0}")]
    Runtime(String),
}

type Eng = Engine<DockerRuntime, StoreSource<DockerRuntime>, MqttOutbox>;
type Running = Pin<Box<dyn Future<Output = (Eng, Result<(), EngineError>)>>>;

/// How long READY waits for the broker before declaring itself ready anyway (the agent works,
/// and keeps the box on its committed set, without a broker).
const READY_WAIT: Duration = Duration::from_secs(15);
/// How often the agent looks for a record left by `ferry-agent trust install`.
const TRUST_POLL: Duration = Duration::from_secs(2);
/// Trust records held while an update runs (the oldest go first).
const MAX_QUEUED_TRUST: usize = 4;

/// How [`run`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// A shutdown request: drained to a safe point.
    Shutdown,
    /// The agent switched to another version of itself: start the binary the launcher picks
    /// (`crate::selfupdate::launch`).
    Restart,
}

pub async fn run(
    loaded: Loaded,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Stopped, AgentError> {
    let cfg = &loaded.config;
    let device = cfg.device_id.clone();
    if let Some(source) = loaded.device_id_source {
        tracing::info!(device = %device, source = source.as_str(), "device id derived from the hardware");
    }
    std::fs::create_dir_all(&cfg.state_dir).map_err(|source| AgentError::StateDir {
        path: cfg.state_dir.display().to_string(),
        source,
    })?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&cfg.state_dir, std::fs::Permissions::from_mode(0o700));
    }
    // The shutdown request becomes a watch flag every phase can look at, start-up included.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    {
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
    }
    let mut shutdown = stop_rx.clone();

    // The container engine may come up after us: wait for it, but stay stoppable.
    let (rt, docker_root) = loop {
        let attempt = async {
            let rt = DockerRuntime::connect(&cfg.docker.socket)
                .await
                .map_err(|e| e.to_string())?;
            let info = rt.info().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((rt, info.root_dir))
        };
        match attempt.await {
            Ok(found) => break found,
            Err(e) => {
                tracing::warn!(socket = %cfg.docker.socket, error = %e, "container engine not answering; retrying in 2 s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = shutdown.stopped() => return Err(AgentError::Runtime(e)),
                }
            }
        }
    };
    // Names the engine gives images this agent pulls carry the device's namespace, and removing
    // an image takes only those names (another agent, or the operator, may share the engine).
    let namespace = crate::runtime::labels::image_namespace(&device);
    let rt = Arc::new(rt.owning_names_under(namespace.clone()));

    let mut creds = Vec::new();
    for c in &cfg.registry.credentials {
        creds.push(ferry_registry::Credential {
            registry: c.registry.clone(),
            username: c.username.clone(),
            password: c.password().map_err(|source| AgentError::Credentials {
                registry: c.registry.clone(),
                source,
            })?,
        });
    }
    let store_dir = cfg.download.dir(&cfg.state_dir);
    let store_err = |source| AgentError::Store {
        path: store_dir.display().to_string(),
        source,
    };
    let store = Arc::new(Store::open(&store_dir).map_err(store_err)?);
    let local = LocalRegistry::start(&cfg.download.local_registry, store.clone())
        .await
        .map_err(store_err)?
        .namespaced(namespace);
    let dl = &cfg.download;
    let source = Arc::new(StoreSource::new(
        rt.clone(),
        ferry_registry::RegistryClient::new(creds, cfg.registry.insecure.clone()),
        store,
        local,
        BlobSettings {
            stall: dl.stall_timeout,
            sync_bytes: dl.sync_every_bytes,
            sync_interval: dl.sync_every,
            rate: RateLimiter::new(dl.max_rate),
        },
        StoreLimits {
            cap: dl.max_store_bytes,
            margin: cfg.update.disk_margin_mb * 1024 * 1024,
            extraction_factor: dl.extraction_factor,
            parallel: dl.parallel,
        },
        loaded.platform.clone(),
        (!docker_root.is_empty()).then(|| std::path::PathBuf::from(&docker_root)),
    ));

    let topics = DeviceTopics::new(&cfg.mqtt.topic_prefix, &device).map_err(AgentError::Mqtt)?;
    let identity: Arc<dyn crate::identity::Seal> = Arc::new(crate::identity::DeviceIdentity::open(
        &cfg.identity,
        &cfg.state_dir,
        &device,
    )?);
    let (link, mut inbound) = MqttLink::start_sealed(
        &cfg.mqtt,
        &device,
        topics.clone(),
        stop_rx.clone(),
        identity.clone(),
    )
    .map_err(|e| AgentError::Mqtt(e.to_string()))?;
    let telemetry = start_telemetry(&loaded, &topics, docker_root, &link, &identity, &stop_rx);
    let out = Arc::new(MqttOutbox {
        link: link.clone(),
        topics,
        seal: identity,
    });

    let ecfg = EngineConfig {
        device: device.clone(),
        platform: loaded.platform.clone(),
        labels: cfg.labels.clone(),
        clock_skew: chrono::Duration::from_std(cfg.clock_skew).unwrap_or(chrono::Duration::MAX),
        stop_grace: cfg.update.stop_timeout,
        health: cfg.health.clone(),
        progress_every: cfg.update.progress_interval,
        log_lines: cfg.update.log_lines,
        drain_gate: cfg.update.drain_gate,
        rollback_retry: Duration::from_secs(2),
        retry_initial: dl.retry_initial,
        retry_max: dl.retry_max,
        windows: cfg
            .update
            .windows
            .iter()
            .filter_map(|w| w.parse().ok())
            .collect(),
        lock_root: Some(cfg.state_dir.join("locks")),
        max_lock: cfg.update.max_lock_hold,
        lock_poll: Duration::from_secs(1),
        agent_version: crate::semver(),
        agent_exe: std::env::current_exe().unwrap_or_default(),
        agent_dir: crate::selfupdate::layout::AgentDir::new(&cfg.state_dir),
    };
    let engine = Engine::new(
        ecfg,
        rt.clone(),
        source,
        out,
        loaded.trust.clone(),
        cfg.policy.clone(),
        JournalStore::new(&cfg.state_dir),
    )?
    .with_trust(loaded.trust_set(), TrustStore::new(&cfg.state_dir))?
    .with_heartbeat_age(cfg.trust.max_heartbeat_age);
    let trust_files = TrustStore::new(&cfg.state_dir);
    tracing::info!(device = %device, platform = %loaded.platform, version = crate::version(), "ferry-agent starting");

    let mut connected = link.connected();
    let ready_deadline = tokio::time::sleep(READY_WAIT);
    tokio::pin!(ready_deadline);
    let mut ready = false;
    let mut watchdog =
        tokio::time::interval(sdnotify::watchdog_interval().unwrap_or(Duration::from_secs(3600)));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // 0 disables the health watch.
    let watch_every = cfg.update.health_watch;
    let mut health_watch = tokio::time::interval(watch_every.max(Duration::from_secs(1)));
    health_watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    // Notices go through the engine's inbox: a running update may take a newer one over
    // (while it downloads or waits to switch); what is left there runs once it is done.
    let inbox = engine.inbox();
    // First, finish or undo whatever the journal says was under way, then run the committed set.
    // It runs as the first "update" of the loop: notices that arrive meanwhile reach the inbox
    // (a rollback that cannot finish yields to a newer one), and SIGTERM drains it like any other.
    let mut idle: Option<Eng> = None;
    let mut recovering = true;
    let mut running: Option<Running> = Some(Box::pin({
        let stop = stop_rx.clone();
        let mut e = engine;
        async move {
            let r = e.recover(&stop).await;
            (e, r)
        }
    }));
    let mut stopping = false;
    let mut restart = false;
    // A new agent on trial has this long to reach the broker and report.
    let confirm_by = tokio::time::sleep(cfg.update.agent_confirm_timeout);
    tokio::pin!(confirm_by);
    // Trust records wait here while an update runs; they are taken before the next notice.
    let mut trust_queue: std::collections::VecDeque<Vec<u8>> = Default::default();
    // The newest heartbeat that arrived while an update ran.
    let mut heartbeat: Option<Vec<u8>> = None;
    let mut trust_poll = tokio::time::interval(TRUST_POLL);
    trust_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        if let Some(e) = idle.as_mut() {
            while let Some(raw) = trust_queue.pop_front() {
                e.take_trust(&raw).await?;
            }
            if let Some(raw) = heartbeat.take() {
                e.take_heartbeat(&raw).await;
            }
        }
        // A new agent on trial confirms once it is connected: then its transaction commits.
        let trial = idle.as_ref().is_some_and(|e| e.awaiting_agent_confirm());
        if trial && running.is_none() && !stopping && *connected.borrow() {
            let mut e = idle.take().expect("idle");
            let stop = stop_rx.clone();
            running = Some(Box::pin(async move {
                e.publish_state().await;
                let r = e.confirm_agent(&stop).await;
                (e, r)
            }));
        }
        if running.is_none() && !stopping && !trial {
            if let Some(raw) = inbox.take() {
                let mut e = idle.take().expect("engine is idle when nothing runs");
                let stop = stop_rx.clone();
                running = Some(Box::pin(async move {
                    let r = e.handle_notice(&raw, &stop).await;
                    (e, r)
                }));
            }
        }
        if stopping && running.is_none() {
            break;
        }
        tokio::select! {
            done = async { running.as_mut().expect("guarded").await }, if running.is_some() => {
                let (e, r) = done;
                idle = Some(e);
                running = None;
                let was_recovery = std::mem::replace(&mut recovering, false);
                if let Err(err) = r {
                    match err {
                        EngineError::Interrupted(state) if was_recovery => tracing::info!(
                            ?state,
                            "shut down during start-up recovery; the journal resumes it next time"
                        ),
                        EngineError::Interrupted(_) => tracing::info!(error = %err, "update paused for shutdown"),
                        EngineError::Restart(version) => {
                            tracing::info!(%version, "restarting into the new agent");
                            restart = true;
                            stopping = true;
                            // Everything else stops too (telemetry, the link), as at a shutdown.
                            let _ = stop_tx.send(true);
                        }
                        // A recovery that cannot run leaves nothing safe to do.
                        other if was_recovery => return Err(other.into()),
                        other => {
                            tracing::error!(error = %other, "update engine error");
                            if matches!(other, EngineError::Journal(_)) {
                                // Without a journal nothing may be done safely.
                                return Err(other.into());
                            }
                        }
                    }
                }
            }
            m = inbound.recv() => match m {
                Some(Inbound::Desired { payload, .. }) => {
                    if running.is_some() {
                        tracing::info!("a new notice arrived during an update; it takes over a download, or runs once the update reaches a safe point");
                    }
                    inbox.put(payload);
                }
                Some(Inbound::Heartbeat { payload }) => heartbeat = Some(payload),
                Some(Inbound::Trust { payload, .. }) => {
                    if trust_queue.len() >= MAX_QUEUED_TRUST {
                        trust_queue.pop_front();
                    }
                    trust_queue.push_back(payload);
                }
                None => {
                    tracing::warn!("mqtt link closed");
                    stopping = true;
                }
            },
            c = connected.changed() => {
                if c.is_ok() && *connected.borrow_and_update() {
                    if !ready {
                        ready = true;
                        let _ = sdnotify::ready();
                    }
                    if let Some(e) = &idle {
                        e.publish_state().await;
                    }
                }
            }
            _ = &mut ready_deadline, if !ready => {
                ready = true;
                tracing::warn!("broker not reached yet; reporting ready anyway");
                let _ = sdnotify::ready();
            }
            _ = watchdog.tick() => { let _ = sdnotify::watchdog(); }
            _ = trust_poll.tick(), if !stopping => {
                if let Some(e) = &idle {
                    e.check_stale().await;
                }
                // `ferry-agent trust install FILE` leaves its record here.
                match trust_files.take_pending() {
                    Ok(Some(raw)) => {
                        tracing::info!("trust record from `ferry-agent trust install`");
                        trust_queue.push_back(raw);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot take the installed trust record"),
                }
            }
            _ = health_watch.tick(), if !watch_every.is_zero() && running.is_none() && !stopping => {
                if let Some(e) = &idle {
                    e.watch_health().await;
                }
            }
            _ = &mut confirm_by, if trial && running.is_none() && !stopping => {
                return Err(AgentError::NotConfirmed {
                    version: crate::version().to_string(),
                    within: cfg.update.agent_confirm_timeout,
                });
            }
            _ = shutdown.stopped(), if !stopping => {
                tracing::info!(busy = running.is_some(), "shutdown requested; draining to a safe point");
                let _ = sdnotify::stopping();
                stopping = true;
            }
        }
    }
    join_telemetry(telemetry).await;
    link.shutdown().await;
    tracing::info!("ferry-agent stopped");
    Ok(if restart {
        Stopped::Restart
    } else {
        Stopped::Shutdown
    })
}

/// Spawn the telemetry task (`[telemetry]`), which ends when `stop` becomes true. Telemetry
/// never stops the agent: if its buffer cannot be opened, the agent runs without it.
fn start_telemetry(
    loaded: &Loaded,
    topics: &DeviceTopics,
    docker_root: String,
    link: &crate::mqtt::LinkHandle,
    seal: &Arc<dyn crate::identity::Seal>,
    stop: &watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let cfg = &loaded.config;
    if !cfg.telemetry.enabled {
        tracing::info!("telemetry disabled");
        return None;
    }
    match TelemetryTask::new(
        &cfg.telemetry,
        topics,
        &cfg.device_id,
        &cfg.state_dir,
        Some(docker_root),
        (link.clone(), seal.clone()),
        cfg.mqtt.max_outgoing_bytes,
    ) {
        Ok(task) => Some(tokio::spawn(task.run(stop.clone()))),
        Err(e) => {
            tracing::error!(error = %e, "telemetry disabled: cannot open its buffer");
            None
        }
    }
}

/// Wait for the telemetry task to end (it stops on the shutdown flag; what it had not sent is
/// on disk).
async fn join_telemetry(task: Option<tokio::task::JoinHandle<()>>) {
    if let Some(t) = task {
        if tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .is_err()
        {
            tracing::warn!("telemetry task did not stop in time");
        }
    }
}
