//! An in-memory, deterministic [`ContainerRuntime`] for tests of the update engine.
//!
//! It models what the engine relies on, the way dockerd 20.10 behaves:
//!
//! - a **registry** ([`FakeRuntime::add_registry_image`]) and **local images**: `pull` copies a
//!   registry image into the local store (or fails with "manifest unknown"), calling the progress
//!   callback a few times; `create` needs the image locally ("No such image" otherwise);
//!   `remove_image` keeps an image a container still uses (Docker's 409, reported as Ok).
//! - **containers** with Docker's states ("created", "running", "restarting", "exited"):
//!   create fails on a name conflict; **start** fails when a host port is published by another
//!   running container ("port is already allocated"), exactly where Docker fails, so stop-first vs
//!   start-first can be tested. Stop / remove are idempotent; start of a running container is Ok.
//! - per-image scripted **behaviour** ([`Behaviour`], via [`FakeRuntime::set_image_behaviour`]):
//!   health status and exec exit codes, exiting right after start, crash loops, log lines.
//! - **failure injection** per operation ([`FakeRuntime::fail_next`]) and an unreachable engine
//!   ([`FakeRuntime::set_unreachable`]).
//! - a **call log** ([`FakeRuntime::calls`]) so tests can assert ordering, e.g.
//!   `["pull repo@sha256:… linux/arm64", "create ferry-dev-sensor-s2", "start <id>", "stop <id>"]`.
//! - a crash and a daemon restart ([`FakeRuntime::crash`], [`FakeRuntime::restart_daemon`]) that
//!   honour the restart policy, for recovery tests.
//!
//! Container ids are deterministic: `id-<name>-<n>` where n counts creates from 1. Everything is
//! behind one `std::sync::Mutex`; no method awaits or sleeps, so tests run instantly.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::{
    ContainerConfig, ContainerInfo, ContainerRuntime, ContainerState, ImageInfo, PullProgress,
    RegistryAuth, RestartPolicy, RuntimeError, RuntimeInfo,
};

/// The operation names accepted by [`FakeRuntime::fail_next`] (the trait's method names).
pub const OPS: &[&str] = &[
    "info",
    "list",
    "inspect",
    "create",
    "start",
    "stop",
    "remove",
    "set_restart_policy",
    "exec",
    "logs_tail",
    "pull",
    "image_inspect",
    "remove_image",
];

/// How containers of one image behave once started. The default is a well-behaved app: it
/// stays up, is healthy, and logs nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Behaviour {
    /// Exec checks exit 0 and the image's HEALTHCHECK reports "healthy"; otherwise exec checks
    /// exit 1 and the status is "unhealthy".
    pub healthy: bool,
    /// The process exits with code 1 right after start: the container ends "exited" (the
    /// restart policy is not applied, as if Docker's back-off had not fired yet).
    pub exits_after_start: bool,
    /// The process keeps crashing: with restart policy unless-stopped the container is
    /// "restarting" and its restart count grows by one each time it is observed (inspect or
    /// list); with policy no it ends "exited" with code 1. Exec fails while restarting.
    pub crash_loop: bool,
    /// Lines the app writes to its log on every start.
    pub logs: Vec<String>,
    /// Whether the image has a Docker HEALTHCHECK (so `ContainerState::health` is reported).
    pub has_healthcheck: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            healthy: true,
            exits_after_start: false,
            crash_loop: false,
            logs: Vec::new(),
            has_healthcheck: true,
        }
    }
}

/// A snapshot of one fake container, for assertions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeContainer {
    pub id: String,
    pub config: ContainerConfig,
    /// The local image id it was created from.
    pub image_id: String,
    pub status: String,
    pub exit_code: Option<i64>,
    pub restart_count: u64,
    pub restart_policy: RestartPolicy,
    /// Effective starts (a start of a running container does not count).
    pub starts: u64,
    /// Effective stops (a stop of a stopped container does not count).
    pub stops: u64,
    /// The grace period of the last effective stop.
    pub last_stop_grace: Option<Duration>,
    pub logs: Vec<String>,
    /// Stopped by `stop` (Docker then does not revive it on a daemon restart).
    pub stopped_by_user: bool,
    /// A fake timestamp of the last (re)start: later starts sort later.
    pub started_at: Option<String>,
}

impl FakeContainer {
    fn running(&self) -> bool {
        self.status == "running" || self.status == "restarting"
    }
}

#[derive(Debug, Default)]
struct State {
    registry: BTreeMap<String, ImageInfo>,
    /// Local images, in pull order.
    images: Vec<ImageInfo>,
    behaviours: HashMap<String, Behaviour>,
    /// Creation order.
    containers: Vec<FakeContainer>,
    failures: HashMap<&'static str, VecDeque<String>>,
    unreachable: bool,
    calls: Vec<String>,
    created: u64,
    clock: u64,
    ip_seq: u8,
    ips: HashMap<String, String>,
}

impl State {
    /// Record the call, then apply an unreachable engine or an injected failure.
    fn enter(&mut self, op: &'static str, call: String, target: &str) -> Result<(), RuntimeError> {
        self.calls.push(call);
        if self.unreachable {
            return Err(RuntimeError::Unreachable {
                endpoint: "fake".to_string(),
                detail: format!("{op} {target}: connection refused"),
            });
        }
        if let Some(detail) = self.failures.get_mut(op).and_then(VecDeque::pop_front) {
            return Err(RuntimeError::Op {
                op,
                target: target.to_string(),
                detail,
            });
        }
        Ok(())
    }

    /// Docker's lookup: exact id, exact name, then a unique id prefix.
    fn find(&self, name_or_id: &str) -> Option<usize> {
        let name = name_or_id.trim_start_matches('/');
        if let Some(i) = self
            .containers
            .iter()
            .position(|c| c.id == name_or_id || c.config.name == name)
        {
            return Some(i);
        }
        let mut hits = self
            .containers
            .iter()
            .enumerate()
            .filter(|(_, c)| !name_or_id.is_empty() && c.id.starts_with(name_or_id));
        match (hits.next(), hits.next()) {
            (Some((i, _)), None) => Some(i),
            _ => None,
        }
    }

    fn find_image(&self, reference: &str) -> Option<usize> {
        self.images
            .iter()
            .position(|i| i.id == reference || i.repo_digests.iter().any(|d| d == reference))
    }

    /// By the name a container was created from, or (created from an image id) by any of the
    /// image's names.
    fn behaviour(&self, image: &str) -> Behaviour {
        if let Some(b) = self.behaviours.get(image) {
            return b.clone();
        }
        self.images
            .iter()
            .filter(|i| i.id == image)
            .flat_map(|i| i.repo_digests.iter())
            .find_map(|d| self.behaviours.get(d))
            .cloned()
            .unwrap_or_default()
    }

    fn tick(&mut self) -> String {
        self.clock += 1;
        let s = self.clock;
        format!(
            "2026-01-01T{:02}:{:02}:{:02}Z",
            (s / 3600) % 24,
            (s / 60) % 60,
            s % 60
        )
    }

    /// Crash loops make progress each time a container is looked at.
    fn observe(&mut self, idx: usize) {
        let c = &self.containers[idx];
        if c.status == "restarting" {
            self.containers[idx].restart_count += 1;
        }
    }

    fn info(&self, idx: usize) -> ContainerInfo {
        let c = &self.containers[idx];
        let b = self.behaviour(&c.config.image);
        let running = c.running();
        let network_mode = c
            .config
            .network_mode
            .clone()
            .unwrap_or_else(|| "bridge".to_string());
        let health = (b.has_healthcheck && running).then(|| {
            if c.status == "restarting" || !b.healthy {
                "unhealthy".to_string()
            } else {
                "healthy".to_string()
            }
        });
        ContainerInfo {
            id: c.id.clone(),
            name: c.config.name.clone(),
            image: c.config.image.clone(),
            image_id: c.image_id.clone(),
            labels: c.config.labels.clone(),
            state: ContainerState {
                status: c.status.clone(),
                running,
                exit_code: c.exit_code,
                restart_count: c.restart_count,
                health,
                started_at: c.started_at.clone(),
            },
            ip_address: if running && network_mode == "bridge" {
                self.ips.get(&c.id).cloned()
            } else {
                None
            },
            host_ports: c
                .config
                .ports
                .iter()
                .filter(|p| p.proto == "tcp")
                .map(|p| (p.container, p.host))
                .collect(),
            network_mode,
            restart_policy: c.restart_policy,
        }
    }

    /// Put a (re)started process into the state its image's behaviour dictates. `by_start`:
    /// an explicit `start` (counted), not a revival by the restart policy.
    fn run(&mut self, idx: usize, by_start: bool) {
        let b = self.behaviour(&self.containers[idx].config.image);
        let stamp = self.tick();
        let c = &mut self.containers[idx];
        if by_start {
            c.starts += 1;
        }
        c.started_at = Some(stamp);
        c.stopped_by_user = false;
        c.logs.extend(b.logs.iter().cloned());
        if b.exits_after_start || (b.crash_loop && c.restart_policy == RestartPolicy::No) {
            c.status = "exited".to_string();
            c.exit_code = Some(1);
        } else if b.crash_loop {
            c.status = "restarting".to_string();
            c.exit_code = Some(1);
        } else {
            c.status = "running".to_string();
            c.exit_code = None;
        }
        if c.running() && !self.ips.contains_key(&c.id) {
            self.ip_seq = self.ip_seq.wrapping_add(1).max(2);
            let ip = format!("172.17.0.{}", self.ip_seq);
            let id = c.id.clone();
            self.ips.insert(id, ip);
        }
    }
}

/// See the [module documentation](self).
#[derive(Debug, Default)]
pub struct FakeRuntime {
    state: Mutex<State>,
}

fn not_found(op: &'static str, target: &str) -> RuntimeError {
    RuntimeError::NotFound {
        op,
        target: target.to_string(),
    }
}

fn op_err(op: &'static str, target: &str, detail: impl Into<String>) -> RuntimeError {
    RuntimeError::Op {
        op,
        target: target.to_string(),
        detail: detail.into(),
    }
}

fn policy_name(p: RestartPolicy) -> &'static str {
    match p {
        RestartPolicy::UnlessStopped => "unless-stopped",
        RestartPolicy::No => "no",
    }
}

impl FakeRuntime {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not poison the fake for the others.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publish an image in the fake registry under `reference` (`repo@sha256:…`). Its
    /// `repo_digests` gets `reference` on pull if it does not list it; an empty `id` becomes
    /// `reference`. A non-empty `architecture` must match the platform asked for on pull.
    pub fn add_registry_image(&self, reference: &str, info: ImageInfo) {
        self.lock().registry.insert(reference.to_string(), info);
    }

    /// Put an image straight into the local store (as if pulled earlier).
    pub fn add_local_image(&self, reference: &str, info: ImageInfo) {
        let mut s = self.lock();
        let info = localize(reference, info);
        if s.find_image(reference).is_none() {
            s.images.push(info);
        }
    }

    /// Script how containers created from `image_ref` (the exact `ContainerConfig::image`)
    /// behave. Applies to later starts and to every later observation (health, exec).
    pub fn set_image_behaviour(&self, image_ref: &str, behaviour: Behaviour) {
        self.lock()
            .behaviours
            .insert(image_ref.to_string(), behaviour);
    }

    /// The next call of `op` (one of [`OPS`]) fails with `RuntimeError::Op` carrying
    /// `message`. Calls queue up: two `fail_next("start", …)` fail the next two starts.
    ///
    /// # Panics
    /// On an unknown op name (a typo would otherwise make a test silently pass).
    pub fn fail_next(&self, op: &str, message: impl Into<String>) {
        let op =
            OPS.iter().copied().find(|o| *o == op).unwrap_or_else(|| {
                panic!("FakeRuntime::fail_next: unknown op {op:?}; known: {OPS:?}")
            });
        self.lock()
            .failures
            .entry(op)
            .or_default()
            .push_back(message.into());
    }

    /// While set, every call fails with `RuntimeError::Unreachable` (the engine is down).
    pub fn set_unreachable(&self, unreachable: bool) {
        self.lock().unreachable = unreachable;
    }

    /// Every call so far, in order: `"<op> <argument>"` with the argument as the caller passed
    /// it (`create` logs the container name, `pull` the reference and platform,
    /// `set_restart_policy` the id and policy, `exec` the id and argv joined by spaces, `list`
    /// the `k=v` filters joined by commas). Failed calls are logged too.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// Forget the call log.
    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// How many calls of `op` were made (successful or not).
    pub fn call_count(&self, op: &str) -> usize {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.split(' ').next() == Some(op))
            .count()
    }

    /// A snapshot of the container `name_or_id`, if it exists.
    pub fn container(&self, name_or_id: &str) -> Option<FakeContainer> {
        let s = self.lock();
        s.find(name_or_id).map(|i| s.containers[i].clone())
    }

    /// All containers, in creation order.
    pub fn containers(&self) -> Vec<FakeContainer> {
        self.lock().containers.clone()
    }

    /// Names of running (or restarting) containers, in creation order.
    pub fn running_names(&self) -> Vec<String> {
        self.lock()
            .containers
            .iter()
            .filter(|c| c.running())
            .map(|c| c.config.name.clone())
            .collect()
    }

    /// Local images, in pull order.
    pub fn local_images(&self) -> Vec<ImageInfo> {
        self.lock().images.clone()
    }

    /// Append a line to a container's log.
    pub fn push_log(&self, name_or_id: &str, line: &str) {
        let mut s = self.lock();
        if let Some(i) = s.find(name_or_id) {
            s.containers[i].logs.push(line.to_string());
        }
    }

    /// The container's process dies with `exit_code`. With restart policy unless-stopped Docker
    /// revives it (restart count + 1, running again); with no it stays "exited".
    pub fn crash(&self, name_or_id: &str, exit_code: i64) {
        let mut s = self.lock();
        let Some(i) = s.find(name_or_id) else { return };
        if !s.containers[i].running() {
            return;
        }
        if s.containers[i].restart_policy == RestartPolicy::UnlessStopped {
            s.containers[i].restart_count += 1;
            s.run(i, false);
        } else {
            let c = &mut s.containers[i];
            c.status = "exited".to_string();
            c.exit_code = Some(exit_code);
        }
    }

    /// The engine (or the whole box) restarts: every process dies; containers with policy
    /// unless-stopped that were not stopped by `stop` come back, the others stay "exited".
    pub fn restart_daemon(&self) {
        let mut s = self.lock();
        s.ips.clear();
        for i in 0..s.containers.len() {
            let c = &s.containers[i];
            let was_up =
                c.running() || (c.status == "exited" && !c.stopped_by_user && c.starts > 0);
            let revive = was_up && c.restart_policy == RestartPolicy::UnlessStopped;
            if revive {
                s.run(i, false);
            } else if s.containers[i].running() {
                let c = &mut s.containers[i];
                c.status = "exited".to_string();
                c.exit_code = Some(255);
            }
        }
    }
}

fn localize(reference: &str, mut info: ImageInfo) -> ImageInfo {
    if info.id.is_empty() {
        info.id = reference.to_string();
    }
    if !info.repo_digests.iter().any(|d| d == reference) && reference.contains('@') {
        info.repo_digests.push(reference.to_string());
    }
    info
}

/// `os/arch[/variant]` of an image.
fn image_platform(i: &ImageInfo) -> String {
    match &i.variant {
        Some(v) if !v.is_empty() => format!("{}/{}/{}", i.os, i.architecture, v),
        _ => format!("{}/{}", i.os, i.architecture),
    }
}

impl ContainerRuntime for FakeRuntime {
    async fn info(&self) -> Result<RuntimeInfo, RuntimeError> {
        let mut s = self.lock();
        s.enter("info", "info".to_string(), "fake")?;
        Ok(RuntimeInfo {
            root_dir: "/var/lib/docker".to_string(),
            server_version: "20.10.24-fake".to_string(),
            api_version: "1.41".to_string(),
        })
    }

    async fn list(&self, labels: &[(&str, &str)]) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let filter = labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut s = self.lock();
        s.enter("list", format!("list {filter}"), &filter)?;
        let hits: Vec<usize> = (0..s.containers.len())
            .filter(|&i| {
                labels.iter().all(|(k, v)| {
                    s.containers[i].config.labels.get(*k).map(String::as_str) == Some(*v)
                })
            })
            .collect();
        Ok(hits
            .into_iter()
            .map(|i| {
                s.observe(i);
                s.info(i)
            })
            .collect())
    }

    async fn inspect(&self, name_or_id: &str) -> Result<Option<ContainerInfo>, RuntimeError> {
        let mut s = self.lock();
        s.enter("inspect", format!("inspect {name_or_id}"), name_or_id)?;
        Ok(s.find(name_or_id).map(|i| {
            s.observe(i);
            s.info(i)
        }))
    }

    async fn create(&self, config: &ContainerConfig) -> Result<String, RuntimeError> {
        let mut s = self.lock();
        s.enter("create", format!("create {}", config.name), &config.name)?;
        if config.name.is_empty() {
            return Err(op_err("create", "", "the fake needs container names"));
        }
        if s.containers.iter().any(|c| c.config.name == config.name) {
            return Err(op_err(
                "create",
                &config.name,
                format!(
                    "Conflict. The container name \"/{}\" is already in use",
                    config.name
                ),
            ));
        }
        let Some(img) = s.find_image(&config.image) else {
            return Err(op_err(
                "create",
                &config.name,
                format!("No such image: {}", config.image),
            ));
        };
        if let Some(p) = config.platform.as_deref() {
            let image = &s.images[img];
            if !image.architecture.is_empty() && image_platform(image) != p {
                return Err(op_err(
                    "create",
                    &config.name,
                    format!(
                        "image with reference {} was found but does not match the specified platform: wanted {p}, actual: {}",
                        config.image,
                        image_platform(image)
                    ),
                ));
            }
        }
        s.created += 1;
        let id = format!("id-{}-{}", config.name, s.created);
        let image_id = s.images[img].id.clone();
        s.containers.push(FakeContainer {
            id: id.clone(),
            config: config.clone(),
            image_id,
            status: "created".to_string(),
            exit_code: None,
            restart_count: 0,
            restart_policy: config.restart_policy,
            starts: 0,
            stops: 0,
            last_stop_grace: None,
            logs: Vec::new(),
            stopped_by_user: false,
            started_at: None,
        });
        Ok(id)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let mut s = self.lock();
        s.enter("start", format!("start {id}"), id)?;
        let i = s.find(id).ok_or_else(|| not_found("start", id))?;
        if s.containers[i].running() {
            return Ok(());
        }
        let me = &s.containers[i];
        let host_net = me.config.network_mode.as_deref() == Some("host");
        for p in me.config.ports.iter().filter(|_| !host_net) {
            let taken = s.containers.iter().any(|o| {
                o.id != me.id
                    && o.running()
                    && o.config.network_mode.as_deref() != Some("host")
                    && o.config
                        .ports
                        .iter()
                        .any(|q| q.host == p.host && q.proto == p.proto)
            });
            if taken {
                return Err(op_err(
                    "start",
                    id,
                    format!(
                        "driver failed programming external connectivity on endpoint {}: Bind for 0.0.0.0:{} failed: port is already allocated",
                        me.config.name, p.host
                    ),
                ));
            }
        }
        s.run(i, true);
        Ok(())
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let mut s = self.lock();
        s.enter("stop", format!("stop {id}"), id)?;
        let Some(i) = s.find(id) else { return Ok(()) };
        let c = &mut s.containers[i];
        c.stopped_by_user = true;
        if c.running() {
            c.status = "exited".to_string();
            c.exit_code = Some(0);
            c.stops += 1;
            c.last_stop_grace = Some(grace);
            let cid = c.id.clone();
            s.ips.remove(&cid);
        }
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let mut s = self.lock();
        s.enter("remove", format!("remove {id}"), id)?;
        if let Some(i) = s.find(id) {
            let c = s.containers.remove(i);
            s.ips.remove(&c.id);
        }
        Ok(())
    }

    async fn set_restart_policy(
        &self,
        id: &str,
        policy: RestartPolicy,
    ) -> Result<(), RuntimeError> {
        let mut s = self.lock();
        s.enter(
            "set_restart_policy",
            format!("set_restart_policy {id} {}", policy_name(policy)),
            id,
        )?;
        let i = s
            .find(id)
            .ok_or_else(|| not_found("set_restart_policy", id))?;
        s.containers[i].restart_policy = policy;
        Ok(())
    }

    async fn exec(
        &self,
        id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<i64, RuntimeError> {
        let mut s = self.lock();
        s.enter("exec", format!("exec {id} {}", argv.join(" ")), id)?;
        let _ = timeout;
        let i = s.find(id).ok_or_else(|| not_found("exec", id))?;
        let c = &s.containers[i];
        match c.status.as_str() {
            "running" => {}
            "restarting" => {
                return Err(op_err(
                    "exec",
                    id,
                    format!(
                        "Container {} is restarting, wait until the container is running",
                        c.id
                    ),
                ))
            }
            _ => {
                return Err(op_err(
                    "exec",
                    id,
                    format!("Container {} is not running", c.id),
                ))
            }
        }
        Ok(if s.behaviour(&c.config.image).healthy {
            0
        } else {
            1
        })
    }

    async fn logs_tail(&self, id: &str, lines: usize) -> Result<Vec<String>, RuntimeError> {
        let mut s = self.lock();
        s.enter("logs_tail", format!("logs_tail {id} {lines}"), id)?;
        let i = s.find(id).ok_or_else(|| not_found("logs_tail", id))?;
        let logs = &s.containers[i].logs;
        Ok(logs[logs.len().saturating_sub(lines)..].to_vec())
    }

    async fn pull(
        &self,
        reference: &str,
        platform: &str,
        auth: Option<RegistryAuth>,
        progress: &(dyn Fn(PullProgress) + Send + Sync),
    ) -> Result<(), RuntimeError> {
        let _ = auth;
        let total = {
            let mut s = self.lock();
            s.enter("pull", format!("pull {reference} {platform}"), reference)?;
            let Some(info) = s.registry.get(reference).cloned() else {
                return Err(op_err(
                    "pull",
                    reference,
                    format!(
                        "manifest for {reference} not found: manifest unknown: manifest unknown"
                    ),
                ));
            };
            if !info.architecture.is_empty() && image_platform(&info) != platform {
                return Err(op_err(
                    "pull",
                    reference,
                    format!(
                        "image operating system / architecture {} cannot be used on this platform ({platform})",
                        image_platform(&info)
                    ),
                ));
            }
            let size = info.size;
            if s.find_image(reference).is_none() {
                let local = localize(reference, info);
                s.images.push(local);
            }
            size
        };
        // Outside the lock: the callback may look at the fake.
        for bytes in [0, total / 2, total] {
            progress(PullProgress { bytes, total });
        }
        Ok(())
    }

    async fn list_images(&self) -> Result<Vec<ImageInfo>, RuntimeError> {
        let mut s = self.lock();
        s.enter("list_images", "list_images".to_string(), "all")?;
        Ok(s.images.clone())
    }

    async fn image_inspect(&self, reference: &str) -> Result<Option<ImageInfo>, RuntimeError> {
        let mut s = self.lock();
        s.enter(
            "image_inspect",
            format!("image_inspect {reference}"),
            reference,
        )?;
        Ok(s.find_image(reference).map(|i| s.images[i].clone()))
    }

    async fn remove_image(&self, reference: &str) -> Result<(), RuntimeError> {
        let mut s = self.lock();
        s.enter(
            "remove_image",
            format!("remove_image {reference}"),
            reference,
        )?;
        let Some(i) = s.find_image(reference) else {
            return Ok(());
        };
        let id = s.images[i].id.clone();
        if s.containers.iter().any(|c| c.image_id == id) {
            // Docker answers 409 "image is being used by container"; the trait says Ok.
            return Ok(());
        }
        s.images.remove(i);
        Ok(())
    }
}

#[cfg(test)]
#[path = "fake_tests.rs"]
mod tests;
