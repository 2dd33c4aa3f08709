//! The agent's configuration: one TOML file (`/etc/ferry/agent.toml`), loaded from an explicit
//! path, with safe defaults; unknown keys are errors. `ferry-agent check-config` validates it.
//!
//! Durations are humantime strings (`stop_timeout = "10s"`); the older integer keys with the unit
//! in their name (`stop_timeout_s = 10`) still parse, see [`durations`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_protocol::{Trust, TrustedKeys};
use serde::Deserialize;

use crate::download::DownloadConfig;
use crate::health::HealthDefaults;
use crate::mqtt::MqttConfig;
use crate::telemetry::TelemetryConfig;
use crate::verify::Policy;

pub mod durations;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {detail}")]
    Parse { path: String, detail: String },
    #[error("config {path}: {field}: {detail}")]
    Invalid {
        path: String,
        field: String,
        detail: String,
    },
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The box's id, or `"auto"`: derived from the hardware (`src/hardware_id.rs`), replaced
    /// here by the derived id once loaded.
    pub device_id: String,
    /// Default: detected from the binary (`linux/arm64`, `linux/arm/v7`, ...).
    #[serde(default)]
    pub platform: Option<String>,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Reported in the state, matched by rollout selectors (`group = "beta"`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Allowance for clock differences when checking `issued_at` / `expires_at`.
    #[serde(
        default = "default_skew",
        alias = "clock_skew_s",
        deserialize_with = "durations::secs"
    )]
    pub clock_skew: Duration,
    #[serde(default)]
    pub mqtt: MqttConfig,
    pub trust: TrustConfig,
    #[serde(default)]
    pub docker: DockerConfig,
    #[serde(default)]
    pub registry: RegistryConfig,
    #[serde(default)]
    pub policy: Policy,
    #[serde(default)]
    pub health: HealthDefaults,
    #[serde(default)]
    pub update: UpdateConfig,
    #[serde(default)]
    pub download: DownloadConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// The device key and the enrolment token (signed reports, protocol v2).
    #[serde(default)]
    pub identity: crate::identity::IdentityConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// SPKI PEM files of the release role.
    pub release_keys: Vec<PathBuf>,
    #[serde(default = "one")]
    pub release_threshold: usize,
    /// SPKI PEM files of the controller role.
    pub controller_keys: Vec<PathBuf>,
    /// SPKI PEM files of the offline root role, which signs trust records (protocol §10).
    /// Without them the box keeps the keys above and takes no trust record.
    #[serde(default)]
    pub root_keys: Vec<PathBuf>,
    #[serde(default = "one")]
    pub root_threshold: usize,
    /// Without a controller heartbeat newer than this the box reports `stale` (protocol
    /// §10a); zero (`"0s"`) turns the check off.
    #[serde(
        default = "default_heartbeat_age",
        alias = "max_heartbeat_age_s",
        deserialize_with = "durations::secs"
    )]
    pub max_heartbeat_age: Duration,
}

fn default_heartbeat_age() -> Duration {
    Duration::from_secs(3600)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    pub socket: String,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            socket: "/var/run/docker.sock".into(),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Registries reached over plain HTTP (loopback ones always are).
    pub insecure: Vec<String>,
    pub credentials: Vec<RegistryCredential>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryCredential {
    /// `host[:port]` as in image names.
    pub registry: String,
    pub username: String,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpdateConfig {
    /// SIGTERM grace given to a container being stopped (whole seconds, rounded up).
    #[serde(alias = "stop_timeout_s", deserialize_with = "durations::secs")]
    pub stop_timeout: Duration,
    /// Free space kept beyond a download and its extraction estimate, on each file system.
    pub disk_margin_mb: u64,
    /// At most one `downloading` event per this long.
    #[serde(alias = "progress_interval_ms", deserialize_with = "durations::millis")]
    pub progress_interval: Duration,
    /// Log lines of a failed container carried in the `rolled_back` event.
    pub log_lines: usize,
    /// After SIGTERM, how long a running health gate may still take before the update is
    /// rolled back so the agent stops on a committed set. Keep it below systemd's TimeoutStopSec.
    #[serde(alias = "drain_gate_s", deserialize_with = "durations::secs")]
    pub drain_gate: Duration,
    /// Between updates, how often the running set's health is checked; the retained state is
    /// published again when an app's health changes (a controller soaking a rollout sees it).
    /// Zero turns it off; below 1 s counts as 1 s.
    #[serde(alias = "health_watch_s", deserialize_with = "durations::secs")]
    pub health_watch: Duration,
    /// Local maintenance windows (`"02:00-04:00"`, the box's local time; several allowed): a
    /// downloaded update switches only inside one. Empty: any time.
    pub windows: Vec<String>,
    /// An app's update lock held longer than this is reported (the switch keeps waiting).
    #[serde(alias = "max_lock_s", deserialize_with = "durations::secs")]
    pub max_lock_hold: Duration,
    /// A new agent on trial (after a self-update) must reach the broker and report within this
    /// long of its start, or it exits and the launcher counts a failed start.
    #[serde(alias = "agent_confirm_s", deserialize_with = "durations::secs")]
    pub agent_confirm_timeout: Duration,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        UpdateConfig {
            stop_timeout: Duration::from_secs(10),
            disk_margin_mb: 64,
            progress_interval: Duration::from_millis(1000),
            log_lines: 20,
            drain_gate: Duration::from_secs(30),
            health_watch: Duration::from_secs(10),
            windows: Vec::new(),
            max_lock_hold: Duration::from_secs(3600),
            agent_confirm_timeout: Duration::from_secs(120),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A level (`info`) or per-target directives (`info,ferry_agent=debug`); `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/ferry")
}
fn default_skew() -> Duration {
    Duration::from_secs(300)
}
fn one() -> usize {
    1
}

/// A config that parsed and validated, with its keys loaded.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub path: PathBuf,
    pub config: AgentConfig,
    /// Where the device id came from with `device_id = "auto"`.
    pub device_id_source: Option<crate::hardware_id::Source>,
    pub platform: String,
    /// The keys of `[trust]`: version 0 of the box's trust (a stored trust record replaces them).
    pub trust: Trust,
    /// The root keys of `[trust] root_keys` (empty: no trust record is taken).
    pub root: TrustedKeys,
    pub root_threshold: usize,
}

impl Loaded {
    /// Version 0 of the box's trust: the config's keys.
    pub fn trust_set(&self) -> ferry_protocol::trust_record::TrustSet {
        ferry_protocol::trust_record::TrustSet::from_config(
            self.trust.clone(),
            self.root.clone(),
            self.root_threshold,
        )
    }
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    pub fn from_toml(text: &str, path: &Path) -> Result<Loaded, ConfigError> {
        let p = path.display().to_string();
        let inv = |field: &str, detail: String| ConfigError::Invalid {
            path: p.clone(),
            field: field.to_string(),
            detail,
        };
        // The duration keys first, on the bare tree: which of the two names a setting was given
        // under (not both), and the form each name takes. Text that is not TOML at all gets its
        // parse error below.
        if let Ok(tree) =
            toml::from_str::<std::collections::BTreeMap<String, durations::Probe>>(text)
        {
            durations::check(&tree).map_err(|(field, detail)| inv(&field, detail))?;
        }
        let mut config: AgentConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: p.clone(),
            detail: e.to_string(),
        })?;
        let device_id_source = if config.device_id == "auto" {
            let root = config
                .identity
                .hardware_root
                .clone()
                .unwrap_or_else(|| PathBuf::from("/"));
            let (id, source) =
                crate::hardware_id::resolve(&root, &config.identity.device_id_prefix)
                    .map_err(|d| inv("device_id", d))?;
            config.device_id = id;
            Some(source)
        } else {
            None
        };
        ferry_protocol::names::check_device_id(&config.device_id)
            .map_err(|d| inv("device_id", d))?;
        let platform = config
            .platform
            .clone()
            .unwrap_or_else(|| crate::platform::detect().to_string());
        ferry_protocol::names::check_platform(&platform).map_err(|d| inv("platform", d))?;
        if !config.state_dir.is_absolute() {
            return Err(inv("state_dir", "must be an absolute path".into()));
        }
        config
            .mqtt
            .validate()
            .map_err(|d| inv("mqtt", d.to_string()))?;
        let t = &config.trust;
        if t.release_keys.is_empty() {
            return Err(inv(
                "trust.release_keys",
                "at least one release key is required".into(),
            ));
        }
        if t.controller_keys.is_empty() {
            return Err(inv(
                "trust.controller_keys",
                "at least one controller key is required".into(),
            ));
        }
        let release = TrustedKeys::load(&t.release_keys)
            .map_err(|e| inv("trust.release_keys", e.to_string()))?;
        let controller = TrustedKeys::load(&t.controller_keys)
            .map_err(|e| inv("trust.controller_keys", e.to_string()))?;
        if t.release_threshold == 0 || t.release_threshold > release.len() {
            return Err(inv(
                "trust.release_threshold",
                format!(
                    "{} must be between 1 and the number of distinct release keys ({})",
                    t.release_threshold,
                    release.len()
                ),
            ));
        }
        let root =
            TrustedKeys::load(&t.root_keys).map_err(|e| inv("trust.root_keys", e.to_string()))?;
        if !root.is_empty() && (t.root_threshold == 0 || t.root_threshold > root.len()) {
            return Err(inv(
                "trust.root_threshold",
                format!(
                    "{} must be between 1 and the number of distinct root keys ({})",
                    t.root_threshold,
                    root.len()
                ),
            ));
        }
        if root
            .ids()
            .any(|id| release.ids().chain(controller.ids()).any(|r| r == id))
        {
            return Err(inv(
                "trust.root_keys",
                "a root key is also listed for the release or the controller role; the roles must use separate keys".into(),
            ));
        }
        if controller.ids().any(|id| release.ids().any(|r| r == id)) {
            return Err(inv(
                "trust",
                "a key is listed for both the release and the controller role; the roles must use separate keys".into(),
            ));
        }
        for c in &config.registry.credentials {
            if c.password.is_some() == c.password_file.is_some() {
                return Err(inv(
                    "registry.credentials",
                    format!(
                        "{}: give exactly one of password, password_file",
                        c.registry
                    ),
                ));
            }
        }
        for prefix in &config.policy.allowed_bind_prefixes {
            if !prefix.starts_with('/') || prefix.split('/').any(|c| c == "..") {
                return Err(inv(
                    "policy.allowed_bind_prefixes",
                    format!("{prefix:?} must be an absolute path without .."),
                ));
            }
        }
        for dir in &config.policy.shared_bind_dirs {
            if config.policy.prefix_of(dir).is_none() {
                return Err(inv(
                    "policy.shared_bind_dirs",
                    format!(
                        "{dir:?} must be an absolute path within policy.allowed_bind_prefixes {:?}",
                        config.policy.allowed_bind_prefixes
                    ),
                ));
            }
        }
        config
            .telemetry
            .validate()
            .map_err(|(field, detail)| inv(&field, detail))?;
        config
            .download
            .validate()
            .map_err(|(field, detail)| inv(&field, detail))?;
        for w in &config.update.windows {
            w.parse::<crate::update::window::Window>()
                .map_err(|d| inv("update.windows", d))?;
        }
        if !matches!(config.log.format.as_str(), "text" | "json") {
            return Err(inv("log.format", "text or json".into()));
        }
        let trust = Trust {
            release,
            release_threshold: t.release_threshold,
            controller,
        };
        let root_threshold = t.root_threshold;
        Ok(Loaded {
            path: path.to_path_buf(),
            config,
            device_id_source,
            platform,
            trust,
            root,
            root_threshold,
        })
    }
}

impl RegistryCredential {
    pub fn password(&self) -> Result<String, std::io::Error> {
        match (&self.password, &self.password_file) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(f)) => Ok(std::fs::read_to_string(f)?.trim_end().to_string()),
            (None, None) => Ok(String::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::PrivateKey;

    pub(super) fn keys(dir: &Path) -> (PathBuf, PathBuf) {
        let r = dir.join("release.pub");
        let c = dir.join("controller.pub");
        std::fs::write(
            &r,
            PrivateKey::from_seed([1; 32]).unwrap().public().to_pem(),
        )
        .unwrap();
        std::fs::write(
            &c,
            PrivateKey::from_seed([2; 32]).unwrap().public().to_pem(),
        )
        .unwrap();
        (r, c)
    }

    pub(super) fn minimal(dir: &Path) -> String {
        let (r, c) = keys(dir);
        format!(
            "device_id = \"dev-001\"\n[trust]\nrelease_keys = [\"{}\"]\ncontroller_keys = [\"{}\"]\n",
            r.display(),
            c.display()
        )
    }

    #[test]
    fn minimal_config_gets_safe_defaults() {
        let d = tempfile::tempdir().unwrap();
        let l = AgentConfig::from_toml(&minimal(d.path()), Path::new("agent.toml")).unwrap();
        assert_eq!(l.config.state_dir, PathBuf::from("/var/lib/ferry"));
        assert_eq!(l.config.clock_skew, Duration::from_secs(300));
        assert!(!l.config.policy.allow_privileged);
        assert!(!l.config.policy.allow_host_network);
        assert_eq!(l.config.docker.socket, "/var/run/docker.sock");
        assert_eq!(l.trust.release_threshold, 1);
        assert_eq!(l.platform, crate::platform::detect());
        assert_eq!(l.config.telemetry, TelemetryConfig::default());
        assert_eq!(l.config.download, DownloadConfig::default());
        assert!(l.config.update.windows.is_empty());
    }

    #[test]
    fn unknown_keys_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let t = minimal(d.path()) + "\n[policy]\nallow_everything = true\n";
        let e = AgentConfig::from_toml(&t, Path::new("agent.toml")).unwrap_err();
        assert!(e.to_string().contains("allow_everything"), "{e}");
    }

    #[test]
    fn bad_values_are_explained() {
        let d = tempfile::tempdir().unwrap();
        let base = minimal(d.path());
        for (patch, want) in [
            (base.replace("dev-001", "dev/001"), "device_id"),
            (
                base.replace("device_id", "platform = \"arm\"\ndevice_id"),
                "platform",
            ),
            (
                base.replace("device_id", "state_dir = \"rel\"\ndevice_id"),
                "state_dir",
            ),
            (
                base.clone() + "release_threshold = 2\n",
                "release_threshold",
            ),
            (base.replace("release.pub", "missing.pub"), "release_keys"),
            (
                base.clone() + "[telemetry]\nsample = \"0s\"\n",
                "telemetry.sample",
            ),
            (
                base.clone() + "[telemetry]\nsample_s = 0\n",
                "telemetry.sample",
            ),
            (
                base.clone() + "[update]\nwindows = [\"2-4\"]\n",
                "update.windows",
            ),
            (
                base.clone() + "[download]\nlocal_registry = \"0.0.0.0:0\"\n",
                "download.local_registry",
            ),
        ] {
            let e = AgentConfig::from_toml(&patch, Path::new("agent.toml")).unwrap_err();
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn root_keys_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (r, c) = keys(dir.path());
        let root = dir.path().join("root.pub");
        std::fs::write(
            &root,
            ferry_protocol::PrivateKey::from_seed([9; 32])
                .unwrap()
                .public()
                .to_pem(),
        )
        .unwrap();
        let cfg = |root: &Path, t: usize| {
            format!(
                "device_id = \"dev-001\"\n[trust]\nrelease_keys = [{r:?}]\ncontroller_keys = [{c:?}]\nroot_keys = [{root:?}]\nroot_threshold = {t}\n"
            )
        };
        let l = AgentConfig::from_toml(&cfg(&root, 1), Path::new("a.toml")).unwrap();
        assert_eq!(l.trust_set().root.len(), 1);
        assert_eq!(l.trust_set().version, 0);
        let e = AgentConfig::from_toml(&cfg(&root, 2), Path::new("a.toml")).unwrap_err();
        assert!(e.to_string().contains("root_threshold"), "{e}");
        // A root key that is also the controller key: refused.
        let e = AgentConfig::from_toml(&cfg(&c, 1), Path::new("a.toml")).unwrap_err();
        assert!(e.to_string().contains("root_keys"), "{e}");
    }

    #[test]
    fn same_key_for_both_roles_refused() {
        let d = tempfile::tempdir().unwrap();
        let t = minimal(d.path()).replace("controller.pub", "release.pub");
        let e = AgentConfig::from_toml(&t, Path::new("agent.toml")).unwrap_err();
        assert!(e.to_string().contains("both"), "{e}");
    }
}

#[cfg(test)]
mod auto_id_tests {
    use super::*;

    #[test]
    fn device_id_auto_takes_the_hardware_id_with_the_prefix() {
        let d = tempfile::tempdir().unwrap();
        let hw = d.path().join("hw");
        std::fs::create_dir_all(hw.join("proc/device-tree")).unwrap();
        std::fs::write(
            hw.join("proc/device-tree/serial-number"),
            b"00000000c0ffee42\0",
        )
        .unwrap();
        let mut keys = Vec::new();
        for (seed, name) in [(3, "r.pub"), (4, "c.pub")] {
            let k = ferry_protocol::keys::PrivateKey::from_seed([seed; 32]).unwrap();
            let p = d.path().join(name);
            std::fs::write(&p, k.public().to_pem()).unwrap();
            keys.push(p);
        }
        let (rel, ctl) = (&keys[0], &keys[1]);
        let text = |hw: &Path| {
            format!(
                "device_id = \"auto\"\n[identity]\ndevice_id_prefix = \"mifi-\"\n\
                 hardware_root = {:?}\n[trust]\nrelease_keys = [{rel:?}]\ncontroller_keys = [{ctl:?}]\n",
                hw.display().to_string()
            )
        };
        let l = AgentConfig::from_toml(&text(&hw), Path::new("/etc/ferry/agent.toml")).unwrap();
        assert_eq!(l.config.device_id, "mifi-00000000c0ffee42");
        assert_eq!(
            l.device_id_source,
            Some(crate::hardware_id::Source::DeviceTree)
        );
        // Nothing to derive it from: a config error naming device_id.
        let e = AgentConfig::from_toml(&text(&d.path().join("empty")), Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("device_id") && e.contains("set device_id explicitly"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    pub(super) const EXAMPLE: &str = include_str!("../examples/agent.toml");

    /// The example with every optional key uncommented.
    pub(super) fn uncommented(text: &str) -> String {
        text.lines()
            .map(|l| {
                let t = l.trim_start();
                let uncomment =
                    (t.starts_with("# ") && t[2..].contains(" = ") && !t[2..].starts_with('['))
                        || t.starts_with("# [[");
                if uncomment {
                    t[2..].to_string()
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The documented example (shipped as /etc/ferry/agent.toml) stays in step with the code.
    #[test]
    fn example_config_parses() {
        let c: AgentConfig = toml::from_str(EXAMPLE).unwrap();
        assert_eq!(c.device_id, "dev-001");
        // Uncommenting every optional key must parse too.
        let all = uncommented(EXAMPLE);
        let c: AgentConfig = toml::from_str(&all).unwrap_or_else(|e| panic!("{e}\n{all}"));
        assert_eq!(c.labels["group"], "beta");
        assert_eq!(c.registry.credentials.len(), 1);
        assert_eq!(c.telemetry.sensors.len(), 4);
        assert!(c.telemetry.validate().is_ok());
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod duration_tests;
