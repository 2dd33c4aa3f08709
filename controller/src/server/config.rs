//! `ferryctl serve`'s configuration: a TOML file loaded from an explicit path, safe defaults,
//! unknown keys are errors. Everything is checked at start-up (keys load, token non-empty,
//! broker URL parses), so a bad file stops the service with exit code 78 instead of a loop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_protocol::keys::{PrivateKey, TrustedKeys};
use ferry_protocol::topics::check_prefix;
use serde::Deserialize;

use crate::mqtt::parse_broker_url;
use crate::server::store::StoreUrl;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {cause}")]
    Read { path: String, cause: std::io::Error },
    #[error("{path}: {detail}")]
    Parse { path: String, detail: String },
    #[error("{path}: {field}: {detail}")]
    Invalid {
        path: String,
        field: &'static str,
        detail: String,
    },
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7878))
}
fn default_prefix() -> String {
    "ferry".into()
}
fn default_threshold() -> usize {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// HTTP API address. Keep it on loopback or behind a TLS proxy: the API speaks plain HTTP.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where the SQLite database (`ferry.db`) lives, when `[store] url` does not name one.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub store: StoreSection,
    #[serde(default)]
    pub replica: ReplicaSection,
    /// A file holding the API bearer token (one line, at least 16 characters).
    pub api_token_file: PathBuf,
    /// The controller's Ed25519 signing key (PKCS#8 PEM). The controller never holds a release key.
    pub controller_key: PathBuf,
    pub mqtt: MqttSection,
    pub trust: TrustSection,
    #[serde(default)]
    pub rollout: RolloutSection,
    #[serde(default)]
    pub retention: RetentionSection,
    #[serde(default)]
    pub enroll: EnrollSection,
}

/// `[store]`: the database (see `store/mod.rs`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// `sqlite:PATH` (relative to this file) or `postgres://USER[:PASSWORD]@HOST[:PORT]/DB`
    /// (`?sslmode=disable|prefer|require`); default `sqlite:DATA_DIR/ferry.db`.
    pub url: Option<String>,
    /// CA certificate(s) (PEM) for PostgreSQL over TLS; default: the system's roots.
    pub ca: Option<PathBuf>,
    /// A file holding the PostgreSQL user's password (one line), so that `url` carries none.
    pub password_file: Option<PathBuf>,
}

/// `[replica]`: several `ferryctl serve` on one PostgreSQL database (`lease.rs`). Without this
/// section a controller on PostgreSQL is a replica all the same, with these defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicaSection {
    /// This replica's id, unique among the replicas; default: the host name.
    pub id: Option<String>,
    /// How long the leader's lease lasts without a renewal (renewed every third of it): a
    /// dead leader is replaced within this plus half a second (a follower's next try).
    #[serde(with = "humantime_serde_compat")]
    pub lease: Duration,
    /// The API URL the other replicas forward calls to while this one leads; default
    /// `http://` + `listen` (set it when `listen` is a wildcard or behind NAT).
    pub advertise: Option<String>,
}

impl Default for ReplicaSection {
    fn default() -> ReplicaSection {
        ReplicaSection {
            id: None,
            lease: Duration::from_secs(8),
            advertise: None,
        }
    }
}

/// `[enroll]`: how devices get their keys admitted (PROTOCOL.md §9).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnrollSection {
    /// Fleet enrolment tokens: a device whose request proves one is admitted at once. Without
    /// any, every device waits for `ferryctl device approve` (or is provisioned by hand).
    pub tokens: Vec<String>,
    /// More tokens, one per line (`#` comments allowed).
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSection {
    /// `mqtt://HOST[:PORT]` or `mqtts://HOST[:PORT]`.
    pub url: String,
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) for mqtts://; default: the system's roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Client id; default `ferry-controller`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Client certificate and key (PEM) of the connection that reads the fleet, for a broker
    /// that requires certificates (`ferryctl cert issue ferry-controller --role controller`).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Client certificate and key of the connection that publishes notices (the `-notices`
    /// certificate). A broker that takes a certificate's identity as the client id allows one
    /// connection per certificate, so with `cert` these are required.
    #[serde(default)]
    pub notices_cert: Option<PathBuf>,
    #[serde(default)]
    pub notices_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustSection {
    /// Release public keys (SPKI PEM) that pushed releases must be signed by.
    pub release_keys: Vec<PathBuf>,
    #[serde(default = "default_threshold")]
    pub release_threshold: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutSection {
    /// How long a notified device may go without reporting progress, counting online time only
    /// and not while it waits for a maintenance window or an update lock (see API.md).
    #[serde(with = "humantime_serde_compat")]
    pub device_timeout: Duration,
    /// Lifetime of the desired-state notices the controller signs.
    #[serde(with = "humantime_serde_compat")]
    pub notice_expiry: Duration,
    /// How often rollouts are re-evaluated (soaks and timeouts).
    #[serde(with = "humantime_serde_compat")]
    pub tick: Duration,
    /// How often the signed heartbeat is published (protocol §10a; boxes without a recent one
    /// report `stale`). 0 turns it off.
    #[serde(with = "humantime_serde_compat")]
    pub heartbeat: Duration,
}

impl Default for RolloutSection {
    fn default() -> Self {
        RolloutSection {
            device_timeout: Duration::from_secs(600),
            notice_expiry: Duration::from_secs(30 * 86400),
            tick: Duration::from_millis(250),
            heartbeat: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSection {
    /// Events older than this are deleted.
    #[serde(with = "humantime_serde_compat")]
    pub events: Duration,
    /// Events kept per device at most.
    pub events_per_device: usize,
    /// Raw telemetry samples older than this are folded into hourly averages.
    #[serde(with = "humantime_serde_compat")]
    pub telemetry_raw: Duration,
    /// Hourly telemetry older than this is deleted.
    #[serde(with = "humantime_serde_compat")]
    pub telemetry: Duration,
}

impl Default for RetentionSection {
    fn default() -> Self {
        RetentionSection {
            events: Duration::from_secs(30 * 86400),
            events_per_device: 200,
            telemetry_raw: Duration::from_secs(7 * 86400),
            telemetry: Duration::from_secs(90 * 86400),
        }
    }
}

/// `"10m"`, `"1h 30m"`, `"7d"` as durations (humantime syntax).
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

/// A loaded, checked configuration with its keys and token.
pub struct Loaded {
    pub config: ServeConfig,
    pub path: PathBuf,
    pub key: PrivateKey,
    pub release_keys: TrustedKeys,
    pub token: String,
    pub mqtt_password: Option<String>,
    /// The database, from `[store] url` or `data_dir`.
    pub store: StoreUrl,
    /// `[enroll] tokens` and the lines of `token_file`.
    pub enroll_tokens: Vec<String>,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("config", &self.config)
            .field("path", &self.path)
            .field("store", &self.store.describe())
            .field("key", &self.key.public().id())
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Read, parse and check a configuration file, loading everything it points at. Relative paths
/// in the file are relative to the file's directory.
/// Client certificates: each with its key, readable, only for mqtts:// with a CA, and both
/// connections' certificates or neither.
fn check_client_certs(m: &MqttSection) -> Result<(), (&'static str, String)> {
    let pairs = [
        ("mqtt.cert", &m.cert, "mqtt.key", &m.key),
        (
            "mqtt.notices_cert",
            &m.notices_cert,
            "mqtt.notices_key",
            &m.notices_key,
        ),
    ];
    for (cf, c, kf, k) in pairs {
        match (c, k) {
            (Some(_), None) => return Err((kf, format!("{cf} is set without {kf}"))),
            (None, Some(_)) => return Err((cf, format!("{kf} is set without {cf}"))),
            (Some(c), Some(k)) => {
                for (f, p) in [(cf, c), (kf, k)] {
                    std::fs::metadata(p).map_err(|e| (f, format!("{}: {e}", p.display())))?;
                }
            }
            (None, None) => {}
        }
    }
    if m.cert.is_some() != m.notices_cert.is_some() {
        return Err((
            "mqtt.notices_cert",
            "the controller holds two connections, and a broker that takes a certificate's \
             identity as the client id allows one per certificate: set cert and notices_cert \
             (`ferryctl cert issue NAME --role controller` issues NAME and NAME-notices)"
                .into(),
        ));
    }
    if m.cert.is_some() {
        let tls = parse_broker_url(&m.url).map(|u| u.tls).unwrap_or(false);
        if !tls {
            return Err((
                "mqtt.cert",
                "client certificates need an mqtts:// url".into(),
            ));
        }
        if m.ca.is_none() {
            return Err((
                "mqtt.ca",
                "client certificates need the CA of the broker's certificate".into(),
            ));
        }
    }
    Ok(())
}

pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
        path: p.clone(),
        cause,
    })?;
    let mut config: ServeConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: p.clone(),
        detail: e.to_string(),
    })?;
    let base = path
        .parent()
        .filter(|b| !b.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let abs = |q: &mut PathBuf| {
        if q.is_relative() {
            *q = base.join(&*q);
        }
    };
    if let Some(d) = config.data_dir.as_mut() {
        abs(d);
    }
    if let Some(c) = config.store.ca.as_mut() {
        abs(c);
    }
    if let Some(c) = config.store.password_file.as_mut() {
        abs(c);
    }
    abs(&mut config.api_token_file);
    abs(&mut config.controller_key);
    config.trust.release_keys.iter_mut().for_each(abs);
    if let Some(c) = config.mqtt.ca.as_mut() {
        abs(c);
    }
    if let Some(c) = config.mqtt.password_file.as_mut() {
        abs(c);
    }
    for c in [
        &mut config.mqtt.cert,
        &mut config.mqtt.key,
        &mut config.mqtt.notices_cert,
        &mut config.mqtt.notices_key,
    ]
    .into_iter()
    .flatten()
    {
        abs(c);
    }
    if let Some(c) = config.enroll.token_file.as_mut() {
        abs(c);
    }
    let invalid = |field: &'static str, detail: String| ConfigError::Invalid {
        path: p.clone(),
        field,
        detail,
    };
    parse_broker_url(&config.mqtt.url).map_err(|e| invalid("mqtt.url", e.to_string()))?;
    if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&config.replica.lease) {
        return Err(invalid(
            "replica.lease",
            format!("{:?}: between 1s and 10m", config.replica.lease),
        ));
    }
    if let Some(a) = &config.replica.advertise {
        if !(a.starts_with("http://") || a.starts_with("https://")) {
            return Err(invalid(
                "replica.advertise",
                format!("{a:?}: http://HOST:PORT"),
            ));
        }
    }
    if config
        .replica
        .id
        .as_deref()
        .is_some_and(|i| i.is_empty() || i.len() > 128)
    {
        return Err(invalid("replica.id", "1 to 128 characters".into()));
    }
    let store = match (&config.store.url, &config.data_dir) {
        (Some(url), _) => StoreUrl::parse(url, base).map_err(|e| invalid("store.url", e))?,
        (None, Some(dir)) => StoreUrl::Sqlite(dir.join("ferry.db")),
        (None, None) => {
            return Err(invalid(
                "data_dir",
                "set data_dir (SQLite) or [store] url".into(),
            ))
        }
    };
    let store = match &config.store.password_file {
        Some(f) => {
            let password = std::fs::read_to_string(f)
                .map_err(|e| invalid("store.password_file", format!("{}: {e}", f.display())))?;
            store
                .with_password(password.trim_end_matches(['\r', '\n']))
                .map_err(|e| invalid("store.password_file", e))?
        }
        None => store,
    };
    check_prefix(&config.mqtt.topic_prefix).map_err(|e| invalid("mqtt.topic_prefix", e))?;
    check_client_certs(&config.mqtt).map_err(|(field, e)| invalid(field, e))?;
    let key = PrivateKey::load(&config.controller_key)
        .map_err(|e| invalid("controller_key", e.to_string()))?;
    if config.trust.release_keys.is_empty() {
        return Err(invalid(
            "trust.release_keys",
            "at least one release public key is needed to accept releases".into(),
        ));
    }
    let release_keys = TrustedKeys::load(&config.trust.release_keys)
        .map_err(|e| invalid("trust.release_keys", e.to_string()))?;
    if config.trust.release_threshold == 0 || config.trust.release_threshold > release_keys.len() {
        return Err(invalid(
            "trust.release_threshold",
            format!(
                "{} with {} distinct release key(s)",
                config.trust.release_threshold,
                release_keys.len()
            ),
        ));
    }
    let token = std::fs::read_to_string(&config.api_token_file)
        .map_err(|e| {
            invalid(
                "api_token_file",
                format!("{}: {e}", config.api_token_file.display()),
            )
        })?
        .trim()
        .to_string();
    if token.len() < 16 || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            "api_token_file",
            "the token must be one line of at least 16 printable characters".into(),
        ));
    }
    let mqtt_password = match &config.mqtt.password_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| invalid("mqtt.password_file", format!("{}: {e}", f.display())))?
                .trim_end_matches(['\r', '\n'])
                .to_string(),
        ),
        None => None,
    };
    if config.rollout.tick.is_zero() || config.rollout.device_timeout.is_zero() {
        return Err(invalid(
            "rollout",
            "tick and device_timeout must be positive".into(),
        ));
    }
    let mut enroll_tokens = config.enroll.tokens.clone();
    if let Some(f) = &config.enroll.token_file {
        let text = std::fs::read_to_string(f)
            .map_err(|e| invalid("enroll.token_file", format!("{}: {e}", f.display())))?;
        enroll_tokens.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
    }
    if let Some(t) = enroll_tokens.iter().find(|t| t.len() < 16) {
        return Err(invalid(
            "enroll.tokens",
            format!(
                "an enrolment token must have at least 16 characters (one has {})",
                t.len()
            ),
        ));
    }
    Ok(Loaded {
        store,
        config,
        path: path.to_path_buf(),
        key,
        release_keys,
        token,
        mqtt_password,
        enroll_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(extra: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let k = PrivateKey::from_seed([1; 32]).unwrap();
        std::fs::write(d.path().join("controller.key"), k.to_pem()).unwrap();
        let r = PrivateKey::from_seed([2; 32]).unwrap();
        std::fs::write(d.path().join("release.pub"), r.public().to_pem()).unwrap();
        std::fs::write(d.path().join("token"), "0123456789abcdef0123\n").unwrap();
        let cfg = format!(
            "data_dir = \"data\"\napi_token_file = \"token\"\ncontroller_key = \"controller.key\"\n\
             [mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\n[trust]\nrelease_keys = [\"release.pub\"]\n{extra}"
        );
        let p = d.path().join("controller.toml");
        std::fs::write(&p, cfg).unwrap();
        (d, p)
    }

    #[test]
    fn minimal_file_gets_safe_defaults_and_relative_paths() {
        let (d, p) = setup("");
        let l = load(&p).unwrap();
        assert_eq!(l.config.listen, default_listen());
        assert_eq!(l.config.data_dir, Some(d.path().join("data")));
        assert_eq!(l.store, StoreUrl::Sqlite(d.path().join("data/ferry.db")));
        assert_eq!(l.config.mqtt.topic_prefix, "ferry");
        assert_eq!(l.config.rollout.device_timeout, Duration::from_secs(600));
        assert_eq!(l.token, "0123456789abcdef0123");
        assert!(!format!("{l:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn client_certificates_come_in_pairs_for_both_connections_over_mqtts() {
        let with = |mqtt: &str| {
            let (d, p) = setup("");
            for f in ["c.crt", "c.key", "n.crt", "n.key", "ca.crt"] {
                std::fs::write(d.path().join(f), "pem").unwrap();
            }
            let t = std::fs::read_to_string(&p)
                .unwrap()
                .replace("url = \"mqtt://127.0.0.1:1883\"\n", mqtt);
            std::fs::write(&p, t).unwrap();
            let r = load(&p).map(|l| l.config.mqtt).map_err(|e| e.to_string());
            (d, r)
        };
        let full = "url = \"mqtts://b:8883\"\nca = \"ca.crt\"\ncert = \"c.crt\"\nkey = \"c.key\"\n\
                    notices_cert = \"n.crt\"\nnotices_key = \"n.key\"\n";
        let (d, ok) = with(full);
        let m = ok.unwrap();
        assert_eq!(m.cert, Some(d.path().join("c.crt")), "relative to the file");
        assert_eq!(m.notices_key, Some(d.path().join("n.key")));
        let err = |text: String, field: &str| {
            let (_d, r) = with(&text);
            let e = r.unwrap_err();
            assert!(e.contains(field), "{field}: {e}");
        };
        err(full.replace("key = \"c.key\"\n", ""), "mqtt.key");
        err(
            full.replace("notices_cert = \"n.crt\"\nnotices_key = \"n.key\"\n", ""),
            "mqtt.notices_cert",
        );
        err(full.replace("mqtts://", "mqtt://"), "mqtts://");
        err(full.replace("ca = \"ca.crt\"\n", ""), "mqtt.ca");
        err(full.replace("c.crt", "missing.crt"), "missing.crt");
    }

    #[test]
    fn durations_parse() {
        let (_d, p) = setup("[rollout]\ndevice_timeout = \"90s\"\nnotice_expiry = \"7d\"\n");
        let l = load(&p).unwrap();
        assert_eq!(l.config.rollout.device_timeout, Duration::from_secs(90));
        assert_eq!(
            l.config.rollout.notice_expiry,
            Duration::from_secs(7 * 86400)
        );
    }

    #[test]
    fn errors_are_clear() {
        let (_d, p) = setup("bogus = 1\n");
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("unknown field `bogus`"), "{e}");

        let (_d, p) = setup("[rollout]\ndevice_timeout = \"soon\"\n");
        assert!(load(&p).unwrap_err().to_string().contains("device_timeout"));

        let (d, p) = setup("");
        std::fs::write(d.path().join("token"), "short").unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("api_token_file"));

        let (d, p) = setup("");
        std::fs::remove_file(d.path().join("controller.key")).unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("controller_key"));

        let (_d, p) = setup("");
        let t = std::fs::read_to_string(&p)
            .unwrap()
            .replace("[trust]", "[trust]\nrelease_threshold = 2");
        std::fs::write(&p, t).unwrap();
        assert!(load(&p)
            .unwrap_err()
            .to_string()
            .contains("release_threshold"));
    }
}

#[cfg(test)]
mod example_file {
    /// The documented example parses, with every key it shows.
    #[test]
    fn examples_controller_toml_parses() {
        let text = include_str!("../../../examples/controller.toml");
        let c: super::ServeConfig = toml::from_str(text).unwrap();
        assert_eq!(c.listen.port(), 7878);
        assert_eq!(c.rollout.notice_expiry.as_secs(), 30 * 86400);
        assert_eq!(c.retention.events_per_device, 200);
    }
}
