//! [`ContainerRuntime`] over the Docker Engine API (bollard), through the local unix socket.
//!
//! The client negotiates the API version at connect time, so it works against the dockerd 20.10
//! (API 1.41) that Debian ships as well as newer engines.
//!
//! Error mapping: a 404 from the daemon becomes [`RuntimeError::NotFound`] (or `Ok(None)` /
//! `Ok(())` where the trait says so), any other daemon answer [`RuntimeError::Op`] carrying the
//! daemon's own message, a transport failure [`RuntimeError::Unreachable`], and a request that
//! got no answer in time [`RuntimeError::Timeout`].

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bollard::auth::DockerCredentials;
use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerUpdateBody, DeviceMapping,
    HealthStatusEnum, HostConfig, ImageInspect, Mount, MountBindOptions,
    MountBindOptionsPropagationEnum, MountType, PortBinding, RestartPolicy as DockerRestartPolicy,
    RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, InspectContainerOptions, ListContainersOptions,
    LogsOptions, RemoveContainerOptions, RemoveImageOptions, StopContainerOptions,
};
use bollard::{Docker, API_DEFAULT_VERSION};
use futures_util::StreamExt;
use tracing::{debug, info, trace, warn};

use super::{
    ContainerConfig, ContainerInfo, ContainerRuntime, ContainerState, ImageInfo, PullProgress,
    RegistryAuth, RestartPolicy, RuntimeError, RuntimeInfo,
};

/// Timeout for ordinary requests (time until the daemon answers with headers; streamed bodies
/// such as pulls and logs are not bounded by it).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Extra time granted to a stop request beyond the container's grace period.
const STOP_SLACK: Duration = Duration::from_secs(30);
/// How often `exec` re-inspects an exec whose output ended but which is not reported done yet.
const EXEC_POLL: Duration = Duration::from_millis(50);

/// The Docker engine, reached over its unix socket.
#[derive(Clone, Debug)]
pub struct DockerRuntime {
    docker: Docker,
    endpoint: String,
    /// The namespace of the names this agent has the engine pull (see
    /// [`DockerRuntime::owning_names_under`]); `None`: every name of an image is its own.
    namespace: Option<String>,
}

impl DockerRuntime {
    /// Connect to the engine at `socket_path` (`/var/run/docker.sock` or
    /// `unix:///var/run/docker.sock`) and negotiate the API version (the lower of the daemon's and
    /// bollard's), so that an API 1.41 daemon (dockerd 20.10) is spoken to in 1.41.
    pub async fn connect(socket_path: &str) -> Result<Self, RuntimeError> {
        let endpoint = socket_path.to_string();
        let unreachable = |e: BollardError| RuntimeError::Unreachable {
            endpoint: endpoint.clone(),
            detail: error_chain(&e),
        };
        let docker =
            Docker::connect_with_unix(socket_path, REQUEST_TIMEOUT.as_secs(), API_DEFAULT_VERSION)
                .map_err(unreachable)?;
        let docker = docker.negotiate_version().await.map_err(unreachable)?;
        debug!(
            endpoint = %endpoint,
            api_version = %docker.client_version(),
            "connected to container engine"
        );
        Ok(Self {
            docker,
            endpoint,
            namespace: None,
        })
    }

    /// Removing an image by id takes away only the names under `namespace` (the device's, from
    /// [`super::labels::image_namespace`]) and loopback names from before namespaces
    /// (see [`owned_name`]), then the image if no other name is left. Another agent on the same
    /// engine, or the operator, keeps its names and so its image.
    pub fn owning_names_under(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// The API version in use after negotiation, e.g. "1.41".
    pub fn api_version(&self) -> String {
        self.docker.client_version().to_string()
    }

    /// The underlying bollard client, for callers that need an endpoint the trait lacks.
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    fn err(&self, op: &'static str, target: &str, e: BollardError) -> RuntimeError {
        map_error(&self.endpoint, op, target, e, self.docker.timeout())
    }

    /// Inspect; 404 → `Ok(None)`.
    async fn inspect_raw(
        &self,
        name_or_id: &str,
    ) -> Result<Option<ContainerInspectResponse>, RuntimeError> {
        match self
            .docker
            .inspect_container(name_or_id, None::<InspectContainerOptions>)
            .await
        {
            Ok(r) => Ok(Some(r)),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(self.err("inspect", name_or_id, e)),
        }
    }
}

/// The HTTP status of a daemon error answer, if it is one.
fn status_of(e: &BollardError) -> Option<u16> {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// The error and all its sources, joined: hyper's top-level messages alone ("client error
/// (Connect)") do not say what went wrong.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        src = s.source();
    }
    out
}

fn map_error(
    endpoint: &str,
    op: &'static str,
    target: &str,
    e: BollardError,
    timeout: Duration,
) -> RuntimeError {
    match e {
        BollardError::DockerResponseServerError {
            status_code: 404, ..
        } => RuntimeError::NotFound {
            op,
            target: target.to_string(),
        },
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => RuntimeError::Op {
            op,
            target: target.to_string(),
            detail: if message.trim().is_empty() {
                format!("HTTP {status_code}")
            } else {
                message.trim().to_string()
            },
        },
        BollardError::DockerStreamError { error } => RuntimeError::Op {
            op,
            target: target.to_string(),
            detail: error,
        },
        BollardError::RequestTimeoutError => RuntimeError::Timeout {
            op,
            target: target.to_string(),
            after: timeout,
        },
        e @ (BollardError::SocketNotFoundError(_)
        | BollardError::HyperLegacyError { .. }
        | BollardError::IOError { .. }) => RuntimeError::Unreachable {
            endpoint: endpoint.to_string(),
            detail: format!("{op} {target}: {}", error_chain(&e)),
        },
        e => RuntimeError::Op {
            op,
            target: target.to_string(),
            detail: error_chain(&e),
        },
    }
}

/// Whether an update refusal is the engine's race with a container between two restarts
/// (retried), not a refusal that stays (a container being removed, a bad request).
fn between_restarts(message: &str) -> bool {
    message.contains("container not running")
        || message.contains("cannot update a stopped container")
}

fn docker_restart_policy(p: RestartPolicy) -> DockerRestartPolicy {
    DockerRestartPolicy {
        name: Some(match p {
            RestartPolicy::UnlessStopped => RestartPolicyNameEnum::UNLESS_STOPPED,
            RestartPolicy::No => RestartPolicyNameEnum::NO,
        }),
        maximum_retry_count: None,
    }
}

fn policy_name(p: RestartPolicy) -> &'static str {
    match p {
        RestartPolicy::UnlessStopped => "unless-stopped",
        RestartPolicy::No => "no",
    }
}

/// The create request for `config`. Pure, so it is unit-tested without an engine.
fn create_body(config: &ContainerConfig) -> ContainerCreateBody {
    let mut exposed = Vec::new();
    let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for p in &config.ports {
        let key = format!("{}/{}", p.container, p.proto);
        if !exposed.contains(&key) {
            exposed.push(key.clone());
        }
        bindings
            .entry(key)
            .or_insert_with(|| Some(Vec::new()))
            .get_or_insert_with(Vec::new)
            .push(PortBinding {
                host_ip: Some(
                    config
                        .port_address
                        .map_or_else(|| "0.0.0.0".to_string(), |a| a.to_string()),
                ),
                host_port: Some(p.host.to_string()),
            });
    }
    // The Mounts API, never `Binds` strings: a `:` or `,` in a path cannot smuggle options
    // (`:rshared`), and a missing source is an error instead of a directory dockerd creates.
    let mounts: Vec<Mount> = config
        .binds
        .iter()
        .map(|b| Mount {
            target: Some(b.container.clone()),
            source: Some(b.host.clone()),
            typ: Some(MountType::BIND),
            read_only: Some(b.read_only),
            bind_options: Some(MountBindOptions {
                propagation: Some(MountBindOptionsPropagationEnum::RPRIVATE),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    let devices: Vec<DeviceMapping> = config
        .devices
        .iter()
        .map(|d| DeviceMapping {
            path_on_host: Some(d.clone()),
            path_in_container: Some(d.clone()),
            cgroup_permissions: Some("rwm".to_string()),
        })
        .collect();
    let host_config = HostConfig {
        mounts: (!mounts.is_empty()).then_some(mounts),
        devices: (!devices.is_empty()).then_some(devices),
        port_bindings: (!bindings.is_empty()).then_some(bindings),
        privileged: Some(config.privileged),
        network_mode: Some(
            config
                .network_mode
                .clone()
                .unwrap_or_else(|| "bridge".to_string()),
        ),
        restart_policy: Some(docker_restart_policy(config.restart_policy)),
        memory: config.memory_bytes,
        // Swap included in the limit: none beyond it (flash wears, and a box swapping to it
        // is a box that stops answering).
        memory_swap: config.memory_bytes,
        pids_limit: config.pids_limit,
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(config.image.clone()),
        cmd: config.cmd.clone(),
        env: (!config.env.is_empty())
            .then(|| config.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        labels: (!config.labels.is_empty()).then(|| {
            config
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        host_config: Some(host_config),
        ..Default::default()
    }
}

/// `"8080/tcp"` → 8080; other protocols → None.
fn tcp_port(key: &str) -> Option<u16> {
    let (port, proto) = key.split_once('/').unwrap_or((key, "tcp"));
    if proto != "tcp" {
        return None;
    }
    port.parse().ok()
}

fn first_host_port(bindings: &Option<Vec<PortBinding>>) -> Option<u16> {
    bindings
        .as_ref()?
        .iter()
        .filter_map(|b| b.host_port.as_deref()?.parse::<u16>().ok())
        .find(|p| *p != 0)
}

/// Map an inspect answer to [`ContainerInfo`]. Pure, so it is unit-tested without an engine.
fn container_info(r: ContainerInspectResponse) -> ContainerInfo {
    let state = r.state.unwrap_or_default();
    let status = state.status.map(|s| s.to_string()).unwrap_or_default();
    let running = state.running.unwrap_or(false);
    let health = state.health.and_then(|h| h.status).and_then(|s| match s {
        HealthStatusEnum::EMPTY | HealthStatusEnum::NONE => None,
        s => Some(s.to_string()),
    });
    let started_at = state
        .started_at
        .filter(|s| !s.is_empty() && !s.starts_with("0001-01-01"));
    let exit_code = match status.as_str() {
        "created" | "running" | "" => None,
        _ => state.exit_code,
    };

    let host_config = r.host_config.unwrap_or_default();
    let network = r.network_settings.unwrap_or_default();

    // Configured bindings first (known even when the container is stopped), then what the
    // daemon actually bound while running (differs only for ephemeral host ports).
    let mut host_ports = BTreeMap::new();
    for (key, bindings) in host_config.port_bindings.iter().flatten() {
        if let (Some(cport), Some(hport)) = (tcp_port(key), first_host_port(bindings)) {
            host_ports.insert(cport, hport);
        }
    }
    for (key, bindings) in network.ports.iter().flatten() {
        if let (Some(cport), Some(hport)) = (tcp_port(key), first_host_port(bindings)) {
            host_ports.insert(cport, hport);
        }
    }

    let mut networks: Vec<_> = network.networks.into_iter().flatten().collect();
    networks.sort_by(|a, b| a.0.cmp(&b.0));
    let ip_address = networks
        .into_iter()
        .filter_map(|(_, ep)| ep.ip_address)
        .find(|ip| !ip.is_empty());

    let network_mode = match host_config.network_mode.as_deref() {
        None | Some("") | Some("default") => "bridge".to_string(),
        Some(m) => m.to_string(),
    };
    let restart_policy = match host_config.restart_policy.and_then(|p| p.name) {
        Some(RestartPolicyNameEnum::UNLESS_STOPPED) => RestartPolicy::UnlessStopped,
        _ => RestartPolicy::No,
    };
    let config = r.config.unwrap_or_default();

    ContainerInfo {
        id: r.id.unwrap_or_default(),
        name: r
            .name
            .map(|n| n.trim_start_matches('/').to_string())
            .unwrap_or_default(),
        image: config.image.unwrap_or_default(),
        image_id: r.image.unwrap_or_default(),
        labels: config.labels.unwrap_or_default().into_iter().collect(),
        state: ContainerState {
            status,
            running,
            exit_code,
            restart_count: r.restart_count.unwrap_or(0).max(0) as u64,
            health,
            started_at,
        },
        ip_address,
        host_ports,
        network_mode,
        restart_policy,
    }
}

fn image_info(i: ImageInspect) -> ImageInfo {
    ImageInfo {
        id: i.id.unwrap_or_default(),
        repo_digests: i.repo_digests.unwrap_or_default(),
        os: i.os.unwrap_or_default(),
        architecture: i.architecture.unwrap_or_default(),
        variant: i.variant.filter(|v| !v.is_empty()),
        size: i.size.unwrap_or(0).max(0) as u64,
        layers: i.root_fs.and_then(|r| r.layers).unwrap_or_default(),
    }
}

/// Per-layer pull progress, summed. A layer's bytes are its latest `Downloading` current; once
/// it is complete (or already present) it counts as its full size.
#[derive(Debug, Default)]
struct PullTracker {
    layers: BTreeMap<String, (u64, u64)>,
}

impl PullTracker {
    /// Feed one status message; returns true when the sum may have changed.
    fn update(
        &mut self,
        id: Option<&str>,
        status: &str,
        current: Option<i64>,
        total: Option<i64>,
    ) -> bool {
        let Some(id) = id.filter(|i| !i.is_empty()) else {
            return false;
        };
        let current = current.filter(|c| *c >= 0).map(|c| c as u64);
        let total = total.filter(|t| *t > 0).map(|t| t as u64);
        match status {
            "Pulling fs layer" | "Waiting" => {
                self.layers.entry(id.to_string()).or_default();
                true
            }
            "Downloading" => {
                let e = self.layers.entry(id.to_string()).or_default();
                if let Some(t) = total {
                    e.1 = t;
                }
                if let Some(c) = current {
                    e.0 = c;
                }
                true
            }
            "Download complete" | "Pull complete" | "Already exists" => {
                let e = self.layers.entry(id.to_string()).or_default();
                if let Some(t) = total {
                    e.1 = t;
                }
                if e.1 == 0 {
                    e.1 = e.0;
                }
                e.0 = e.1;
                true
            }
            // "Verifying Checksum", "Extracting", "Retrying in …": no download bytes.
            _ => false,
        }
    }

    fn sum(&self) -> PullProgress {
        let (bytes, total) = self
            .layers
            .values()
            .fold((0u64, 0u64), |(b, t), (lb, lt)| (b + lb, t + lt.max(lb)));
        PullProgress { bytes, total }
    }
}

impl ContainerRuntime for DockerRuntime {
    async fn info(&self) -> Result<RuntimeInfo, RuntimeError> {
        let info = self
            .docker
            .info()
            .await
            .map_err(|e| self.err("info", &self.endpoint, e))?;
        Ok(RuntimeInfo {
            root_dir: info.docker_root_dir.unwrap_or_default(),
            server_version: info.server_version.unwrap_or_default(),
            api_version: self.api_version(),
        })
    }

    async fn list(&self, labels: &[(&str, &str)]) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let target = labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>();
        let mut filters = HashMap::new();
        if !target.is_empty() {
            filters.insert("label".to_string(), target.clone());
        }
        let opts = ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let summaries = self
            .docker
            .list_containers(Some(opts))
            .await
            .map_err(|e| self.err("list", &target.join(","), e))?;
        let mut out = Vec::with_capacity(summaries.len());
        for s in summaries {
            let Some(id) = s.id else { continue };
            // A container removed between list and inspect is simply gone.
            if let Some(r) = self.inspect_raw(&id).await? {
                out.push(container_info(r));
            }
        }
        trace!(labels = %target.join(","), count = out.len(), "listed containers");
        Ok(out)
    }

    async fn inspect(&self, name_or_id: &str) -> Result<Option<ContainerInfo>, RuntimeError> {
        Ok(self.inspect_raw(name_or_id).await?.map(container_info))
    }

    async fn create(&self, config: &ContainerConfig) -> Result<String, RuntimeError> {
        let opts = CreateContainerOptions {
            name: (!config.name.is_empty()).then(|| config.name.clone()),
            platform: config.platform.clone().unwrap_or_default(),
        };
        let target = if config.name.is_empty() {
            &config.image
        } else {
            &config.name
        };
        let resp = self
            .docker
            .create_container(Some(opts), create_body(config))
            .await
            .map_err(|e| match e {
                // 404 here means the image is missing: keep the daemon's "No such image" text.
                BollardError::DockerResponseServerError {
                    status_code: 404,
                    message,
                } => RuntimeError::Op {
                    op: "create",
                    target: target.to_string(),
                    detail: message,
                },
                e => self.err("create", target, e),
            })?;
        for w in resp.warnings.iter().filter(|w| !w.is_empty()) {
            warn!(container = %config.name, warning = %w, "engine warning on create");
        }
        info!(
            container = %config.name,
            id = %resp.id,
            image = %config.image,
            "container created"
        );
        Ok(resp.id)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        // 304 (already running) is a success for bollard.
        self.docker
            .start_container(id, None)
            .await
            .map_err(|e| self.err("start", id, e))?;
        debug!(container = %id, "container started");
        Ok(())
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        // Whole seconds, rounded up: a sub-second grace must not become "kill at once".
        let t = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
        let t = i32::try_from(t).unwrap_or(i32::MAX);
        // The daemon answers only once the container is down: allow for the grace period.
        let client = self
            .docker
            .clone()
            .with_timeout(REQUEST_TIMEOUT.max(grace + STOP_SLACK));
        match client
            .stop_container(
                id,
                Some(StopContainerOptions {
                    t: Some(t),
                    signal: None,
                }),
            )
            .await
        {
            Ok(()) => {
                debug!(container = %id, grace_s = t, "container stopped");
                Ok(())
            }
            Err(e) if status_of(&e) == Some(404) => {
                debug!(container = %id, "stop: no such container");
                Ok(())
            }
            Err(e) => Err(map_error(&self.endpoint, "stop", id, e, client.timeout())),
        }
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let opts = RemoveContainerOptions {
            force: true,
            // Anonymous volumes die with the container: they would otherwise leak disk.
            v: true,
            link: false,
        };
        match self.docker.remove_container(id, Some(opts)).await {
            Ok(()) => {
                info!(container = %id, "container removed");
                Ok(())
            }
            Err(e) if status_of(&e) == Some(404) => {
                debug!(container = %id, "remove: no such container");
                Ok(())
            }
            Err(BollardError::DockerResponseServerError {
                status_code: 409,
                message,
            }) if message.contains("already in progress") => {
                debug!(container = %id, detail = %message, "remove: already being removed");
                Ok(())
            }
            Err(e) => Err(self.err("remove", id, e)),
        }
    }

    async fn set_restart_policy(
        &self,
        id: &str,
        policy: RestartPolicy,
    ) -> Result<(), RuntimeError> {
        // dockerd refuses an update while a crash-looping container sits between two restarts:
        // it saw the container running, then containerd found its task gone ("Cannot update
        // container ...: runc ... container not running" on 20.10, "... cannot update a stopped
        // container" on later engines). The state flips within moments, so try again briefly
        // before giving up.
        let mut attempt = 0;
        loop {
            let body = ContainerUpdateBody {
                restart_policy: Some(docker_restart_policy(policy)),
                ..Default::default()
            };
            match self.docker.update_container(id, body).await {
                Ok(_) => break,
                Err(e) if attempt < 20 && between_restarts(&e.to_string()) => {
                    attempt += 1;
                    debug!(container = %id, attempt, "container between restarts; retrying the update");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(self.err("set_restart_policy", id, e)),
            }
        }
        debug!(container = %id, policy = policy_name(policy), "restart policy set");
        Ok(())
    }

    async fn exec(
        &self,
        id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<i64, RuntimeError> {
        let run = async {
            let created = self
                .docker
                .create_exec(
                    id,
                    CreateExecOptions {
                        attach_stdout: Some(true),
                        attach_stderr: Some(true),
                        cmd: Some(argv.to_vec()),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| self.err("exec", id, e))?;
            let started = self
                .docker
                .start_exec(
                    &created.id,
                    Some(StartExecOptions {
                        detach: false,
                        tty: false,
                        output_capacity: None,
                    }),
                )
                .await
                .map_err(|e| self.err("exec", id, e))?;
            let mut output_bytes = 0usize;
            if let StartExecResults::Attached { mut output, .. } = started {
                while let Some(chunk) = output.next().await {
                    match chunk {
                        Ok(out) => output_bytes += out.as_ref().len(),
                        // The hijacked stream can end abruptly when the process exits; the
                        // exit code below is what counts.
                        Err(e) => {
                            trace!(container = %id, error = %e, "exec output stream ended");
                            break;
                        }
                    }
                }
            }
            loop {
                let ins = self
                    .docker
                    .inspect_exec(&created.id)
                    .await
                    .map_err(|e| self.err("exec", id, e))?;
                if ins.running != Some(true) {
                    let code = ins.exit_code.ok_or_else(|| RuntimeError::Op {
                        op: "exec",
                        target: id.to_string(),
                        detail: "exec finished without an exit code".to_string(),
                    })?;
                    return Ok((code, output_bytes));
                }
                tokio::time::sleep(EXEC_POLL).await;
            }
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(Ok((code, output_bytes))) => {
                debug!(container = %id, argv = ?argv, exit_code = code, output_bytes, "exec finished");
                Ok(code)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(RuntimeError::Timeout {
                op: "exec",
                target: id.to_string(),
                after: timeout,
            }),
        }
    }

    async fn logs_tail(&self, id: &str, lines: usize) -> Result<Vec<String>, RuntimeError> {
        let opts = LogsOptions {
            stdout: true,
            stderr: true,
            tail: lines.to_string(),
            ..Default::default()
        };
        let mut stream = self.docker.logs(id, Some(opts));
        let mut buf = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk: LogOutput = chunk.map_err(|e| self.err("logs_tail", id, e))?;
            buf.extend_from_slice(chunk.as_ref());
        }
        let text = String::from_utf8_lossy(&buf);
        let all: Vec<&str> = text
            .split('\n')
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .collect();
        // A trailing newline yields one empty last piece: drop it.
        let all = match all.split_last() {
            Some((&"", rest)) => rest,
            _ => &all[..],
        };
        let skip = all.len().saturating_sub(lines);
        Ok(all[skip..].iter().map(|l| l.to_string()).collect())
    }

    async fn pull(
        &self,
        reference: &str,
        platform: &str,
        auth: Option<RegistryAuth>,
        progress: &(dyn Fn(PullProgress) + Send + Sync),
    ) -> Result<(), RuntimeError> {
        let opts = CreateImageOptions {
            from_image: Some(reference.to_string()),
            platform: platform.to_string(),
            ..Default::default()
        };
        let credentials = auth.map(|a| DockerCredentials {
            username: Some(a.username),
            password: Some(a.password),
            serveraddress: Some(a.server),
            ..Default::default()
        });
        info!(image = %reference, platform = %platform, "pulling image");
        let mut stream = self.docker.create_image(Some(opts), None, credentials);
        let mut tracker = PullTracker::default();
        let mut last = PullProgress::default();
        while let Some(item) = stream.next().await {
            let item = item.map_err(|e| match e {
                // Before streaming starts the daemon answers with an HTTP error, e.g. 404
                // "manifest for … not found: manifest unknown": keep its message.
                BollardError::DockerResponseServerError { message, .. } => RuntimeError::Op {
                    op: "pull",
                    target: reference.to_string(),
                    detail: message,
                },
                e => self.err("pull", reference, e),
            })?;
            let status = item.status.as_deref().unwrap_or("");
            if let Some(warning) = status.strip_prefix("WARNING: ") {
                // dockerd 20.10 pulls a single-platform manifest of another platform and only
                // warns; a container create for `platform` would then fail. Fail here instead.
                if warning.contains("does not match the specified platform") {
                    return Err(RuntimeError::Op {
                        op: "pull",
                        target: reference.to_string(),
                        detail: warning.to_string(),
                    });
                }
                warn!(image = %reference, warning = %warning, "engine warning on pull");
            } else if status.starts_with("Status: ") || status.starts_with("Digest: ") {
                debug!(image = %reference, status, "pull status");
            }
            let (current, total) = item
                .progress_detail
                .as_ref()
                .map(|d| (d.current, d.total))
                .unwrap_or((None, None));
            trace!(image = %reference, layer = ?item.id, status, ?current, ?total, "pull status");
            if tracker.update(item.id.as_deref(), status, current, total) {
                let now = tracker.sum();
                if now != last {
                    last = now;
                    progress(now);
                }
            }
        }
        info!(image = %reference, bytes = last.bytes, total = last.total, "image pulled");
        Ok(())
    }

    async fn list_images(&self) -> Result<Vec<ImageInfo>, RuntimeError> {
        let summaries = self
            .docker
            .list_images(None::<bollard::query_parameters::ListImagesOptions>)
            .await
            .map_err(|e| self.err("list_images", "all", e))?;
        let mut out = Vec::with_capacity(summaries.len());
        for s in summaries {
            // An image removed between list and inspect is simply gone.
            if let Some(i) = self.image_inspect(&s.id).await? {
                out.push(i);
            }
        }
        Ok(out)
    }

    async fn image_inspect(&self, reference: &str) -> Result<Option<ImageInfo>, RuntimeError> {
        match self.docker.inspect_image(reference).await {
            Ok(i) => Ok(Some(image_info(i))),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(self.err("image_inspect", reference, e)),
        }
    }

    async fn remove_image(&self, reference: &str) -> Result<(), RuntimeError> {
        // An id: each of its names first (removing an id that has several names is refused).
        if reference.starts_with("sha256:") && !reference.contains('@') {
            if let Some(img) = self.image_inspect(reference).await? {
                let (mine, others): (Vec<&String>, Vec<&String>) = img
                    .repo_digests
                    .iter()
                    .partition(|n| match &self.namespace {
                        Some(ns) => owned_name(n, ns),
                        None => true,
                    });
                for name in mine {
                    self.remove_one_image(name).await?;
                }
                if !others.is_empty() {
                    debug!(image = %reference, names = ?others, "remove_image: named by others too, kept");
                    return Ok(());
                }
            }
        }
        self.remove_one_image(reference).await
    }
}

/// Whether the engine's name `name` (`host:port/path@digest`) was pulled by the agent whose
/// loopback names live under `namespace`: a loopback host, and the path under `namespace`, or
/// not under any device namespace at all (the names agents gave before namespaces existed, so an
/// upgraded box still removes its old images).
pub fn owned_name(name: &str, namespace: &str) -> bool {
    let Some((host, rest)) = name.split_once('/') else {
        return false;
    };
    let loopback = host.starts_with("127.0.0.1:") || host.starts_with("localhost:");
    let first = rest.split(['/', '@']).next().unwrap_or("");
    loopback && (first == namespace || !super::labels::is_image_namespace(first))
}

impl DockerRuntime {
    async fn remove_one_image(&self, reference: &str) -> Result<(), RuntimeError> {
        let opts = RemoveImageOptions {
            force: false,
            noprune: false,
            platforms: None,
        };
        match self.docker.remove_image(reference, Some(opts), None).await {
            Ok(items) => {
                info!(image = %reference, deleted = items.len(), "image removed");
                Ok(())
            }
            Err(e) if status_of(&e) == Some(404) => {
                debug!(image = %reference, "remove_image: no such image");
                Ok(())
            }
            Err(BollardError::DockerResponseServerError {
                status_code: 409,
                message,
            }) => {
                debug!(image = %reference, detail = %message, "remove_image: image in use, kept");
                Ok(())
            }
            Err(e) => Err(self.err("remove_image", reference, e)),
        }
    }
}

#[cfg(test)]
#[path = "docker_tests.rs"]
mod tests;
