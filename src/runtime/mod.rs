//! The container runtime, behind a trait (as in Azure IoT Edge's edgelet): Docker is one
//! implementation ([`docker::DockerRuntime`]); unit tests use the in-memory `fake::FakeRuntime` (`cfg(test)`).
//!
//! The runtime knows nothing of releases or the protocol: the update engine maps a release to a
//! [`ContainerConfig`]. Every container Ferry creates carries the labels in [`labels`], and Ferry
//! only ever touches containers that carry its own device's label.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

pub mod docker;
/// The in-memory engine the unit tests drive; not in a build that ships.
#[cfg(test)]
pub mod fake;
pub mod labels;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("container engine unreachable at {endpoint}: {detail}")]
    Unreachable { endpoint: String, detail: String },
    #[error("{op} {target}: {detail}")]
    Op {
        op: &'static str,
        target: String,
        detail: String,
    },
    #[error("{op} {target}: not found")]
    NotFound { op: &'static str, target: String },
    #[error("{op} {target}: timed out after {after:?}")]
    Timeout {
        op: &'static str,
        target: String,
        after: Duration,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RestartPolicy {
    /// Docker restarts it after a crash and after a daemon restart (the running set).
    #[default]
    UnlessStopped,
    /// Nothing revives it (containers being retired, and candidates under a health gate that
    /// must not be resurrected after a rollback).
    No,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortMapping {
    pub host: u16,
    pub container: u16,
    /// "tcp" or "udp".
    pub proto: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindMount {
    pub host: String,
    pub container: String,
    pub read_only: bool,
}

/// Everything needed to create one container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerConfig {
    pub name: String,
    /// Image reference, always `repo@sha256:...` for app containers.
    pub image: String,
    pub cmd: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub ports: Vec<PortMapping>,
    /// The host address the ports bind to; `None`: every address (`0.0.0.0`).
    pub port_address: Option<std::net::IpAddr>,
    /// Bind mounts, made through the engine's Mounts API (never a `host:container:opts`
    /// string), private propagation.
    pub binds: Vec<BindMount>,
    pub devices: Vec<String>,
    pub privileged: bool,
    /// "bridge" (default when None), "host" or "none".
    pub network_mode: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub restart_policy: RestartPolicy,
    /// e.g. "linux/arm64": the platform of the image to run.
    pub platform: Option<String>,
    /// Hard memory limit in bytes (swap included: none beyond it); `None`: unlimited.
    pub memory_bytes: Option<i64>,
    /// Most processes and threads at once; `None`: unlimited.
    pub pids_limit: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerState {
    /// Docker's status: "created", "running", "restarting", "exited", "paused", "dead", "removing".
    pub status: String,
    pub running: bool,
    pub exit_code: Option<i64>,
    pub restart_count: u64,
    /// The image's own HEALTHCHECK status when it has one: "starting", "healthy", "unhealthy".
    pub health: Option<String>,
    pub started_at: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    /// Without the leading '/'.
    pub name: String,
    /// The image reference it was created from.
    pub image: String,
    /// The local image id (`sha256:...` of the config).
    pub image_id: String,
    pub labels: BTreeMap<String, String>,
    pub state: ContainerState,
    /// First non-empty IP address on any network (bridge), if any.
    pub ip_address: Option<String>,
    /// container port (tcp) → host port, for published ports.
    pub host_ports: BTreeMap<u16, u16>,
    pub network_mode: String,
    pub restart_policy: RestartPolicy,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageInfo {
    pub id: String,
    /// `repo@sha256:...` entries: the manifest digests this image was pulled by.
    pub repo_digests: Vec<String>,
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
    pub size: u64,
    /// The diff ids of its layers, bottom first (`RootFS.Layers`): the chains the engine holds.
    pub layers: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuntimeInfo {
    /// Docker's data root (free space is checked here before pulls).
    pub root_dir: String,
    pub server_version: String,
    pub api_version: String,
}

/// Pull progress summed over all layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PullProgress {
    pub bytes: u64,
    pub total: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
    pub server: String,
}

/// What the update engine needs from a container engine. Implementations must be idempotent
/// where noted: stopping a stopped container or removing a missing one is not an error.
pub trait ContainerRuntime: Send + Sync + 'static {
    fn info(&self) -> impl Future<Output = Result<RuntimeInfo, RuntimeError>> + Send;
    /// All containers (running or not) carrying every one of `labels`.
    fn list(
        &self,
        labels: &[(&str, &str)],
    ) -> impl Future<Output = Result<Vec<ContainerInfo>, RuntimeError>> + Send;
    /// `Ok(None)` when no such container exists.
    fn inspect(
        &self,
        name_or_id: &str,
    ) -> impl Future<Output = Result<Option<ContainerInfo>, RuntimeError>> + Send;
    /// Create (not start); returns the id.
    fn create(
        &self,
        config: &ContainerConfig,
    ) -> impl Future<Output = Result<String, RuntimeError>> + Send;
    /// Idempotent: starting a running container is Ok.
    fn start(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Idempotent: stopping a stopped or missing container is Ok. SIGTERM, then SIGKILL after
    /// `grace`.
    fn stop(
        &self,
        id: &str,
        grace: Duration,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Force-remove; idempotent (missing is Ok).
    fn remove(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn set_restart_policy(
        &self,
        id: &str,
        policy: RestartPolicy,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Run `argv` inside a running container; returns the exit code. Bounded by `timeout`
    /// (`RuntimeError::Timeout`; Docker cannot kill an exec, so the process may run on).
    fn exec(
        &self,
        id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> impl Future<Output = Result<i64, RuntimeError>> + Send;
    /// The last `lines` lines of stdout+stderr.
    fn logs_tail(
        &self,
        id: &str,
        lines: usize,
    ) -> impl Future<Output = Result<Vec<String>, RuntimeError>> + Send;
    /// Pull `reference` (always `repo@digest`) for `platform`, reporting progress. Fails when
    /// `reference` is an image of another platform (dockerd 20.10 itself only warns).
    fn pull(
        &self,
        reference: &str,
        platform: &str,
        auth: Option<RegistryAuth>,
        progress: &(dyn Fn(PullProgress) + Send + Sync),
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Every image the engine holds (with its layers).
    fn list_images(&self) -> impl Future<Output = Result<Vec<ImageInfo>, RuntimeError>> + Send;
    /// `Ok(None)` when the image is not present.
    fn image_inspect(
        &self,
        reference: &str,
    ) -> impl Future<Output = Result<Option<ImageInfo>, RuntimeError>> + Send;
    /// Remove an image (not forced: an image in use stays). Missing is Ok. Given a reference,
    /// that name goes (and the image with its last name); given an image id (`sha256:...`),
    /// every name it carries goes, then the image.
    fn remove_image(
        &self,
        reference: &str,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
}
