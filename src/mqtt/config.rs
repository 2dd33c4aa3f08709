//! The agent's `[mqtt]` configuration table.
//!
//! ```toml
//! [mqtt]
//! url = "mqtts://broker.example.net:8883"
//! ca_file = "/etc/ferry/broker-ca.pem"     # required for mqtts: no system trust store on the box
//! cert_file = "/etc/ferry/device.crt"       # optional client certificate (with key_file)
//! key_file = "/etc/ferry/device.key"
//! username = "dev-001"                      # optional; password or password_file
//! password_file = "/etc/ferry/mqtt.pass"
//! keepalive = "5m"
//! ```
//!
//! Every field has a default, so an empty (or missing) table connects to a plaintext broker on
//! `127.0.0.1:1883` with client id `ferry-<device id>`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_protocol::dsse::MAX_DESIRED_ENVELOPE;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use super::MqttError;
use crate::config::durations::show;

pub const DEFAULT_URL: &str = "mqtt://127.0.0.1:1883";
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(300);
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(500);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_INCOMING_BYTES: usize = 1024 * 1024;
pub const DEFAULT_MAX_OUTGOING_BYTES: usize = 1024 * 1024;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Room for the fixed header, topic and packet id of a PUBLISH on top of its payload.
const PUBLISH_OVERHEAD: usize = 4 * 1024;

/// Largest packet MQTT 3.1.1 can express (remaining length is at most 268 435 455).
const MQTT_MAX_PACKET: usize = 268_435_455;

/// The `[mqtt]` table of the agent's configuration. Unknown keys are an error (a typo must not
/// silently fall back to a default); every key has a default.
///
/// ```toml
/// [mqtt]
/// url = "mqtts://broker.example.net:8883"
/// ca_file = "/etc/ferry/broker-ca.pem"     # required for mqtts: no system trust store on the box
/// cert_file = "/etc/ferry/device.crt"       # optional client certificate (with key_file)
/// key_file = "/etc/ferry/device.key"
/// username = "dev-001"                      # optional; with password or password_file
/// password_file = "/etc/ferry/mqtt.pass"
/// keepalive = "5m"
/// ```
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]` (default 8883).
    pub url: String,
    /// MQTT client id; `None` means `ferry-<device id>-<random>` (see [`MqttConfig::client_id_for`]).
    pub client_id: Option<String>,
    pub username: Option<String>,
    /// Inline password. Prefer `password_file`, which keeps the secret out of the config file.
    pub password: Option<String>,
    /// File holding the password (one trailing newline is ignored). Read at connect time.
    pub password_file: Option<PathBuf>,
    /// PEM file with the CA certificate(s) that sign the broker's certificate. Required for mqtts.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS; needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Topic prefix (protocol §5), default `ferry`.
    pub topic_prefix: String,
    /// MQTT keep-alive, whole seconds. Long by default: every ping costs cellular data and wakes
    /// the modem. The broker publishes the last will after 1.5 × this without traffic.
    #[serde(
        alias = "keepalive_s",
        deserialize_with = "crate::config::durations::secs"
    )]
    pub keepalive: Duration,
    /// First reconnect delay.
    #[serde(
        alias = "backoff_initial_ms",
        deserialize_with = "crate::config::durations::millis"
    )]
    pub backoff_initial: Duration,
    /// Longest reconnect delay.
    #[serde(
        alias = "backoff_max_s",
        deserialize_with = "crate::config::durations::secs"
    )]
    pub backoff_max: Duration,
    /// Largest packet accepted from the broker. Larger packets make rumqttc drop the connection,
    /// so this must stay well above the 256 KiB notice cap: the agent rejects an oversized notice
    /// itself, with a reason it can report.
    pub max_incoming_bytes: usize,
    /// Largest packet the agent sends; larger publishes are refused by `LinkHandle::publish`.
    pub max_outgoing_bytes: usize,
    /// Timeout for TCP connect + TLS handshake + CONNACK, and for flushing a write; whole seconds.
    #[serde(
        alias = "connect_timeout_s",
        deserialize_with = "crate::config::durations::secs"
    )]
    pub connect_timeout: Duration,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            url: DEFAULT_URL.to_string(),
            client_id: None,
            username: None,
            password: None,
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            topic_prefix: ferry_protocol::topics::DEFAULT_PREFIX.to_string(),
            keepalive: DEFAULT_KEEPALIVE,
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
            max_incoming_bytes: DEFAULT_MAX_INCOMING_BYTES,
            max_outgoing_bytes: DEFAULT_MAX_OUTGOING_BYTES,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// Debug output never shows the password.
impl fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttConfig")
            .field("url", &self.url)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("topic_prefix", &self.topic_prefix)
            .field("keepalive", &self.keepalive)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .field("max_incoming_bytes", &self.max_incoming_bytes)
            .field("max_outgoing_bytes", &self.max_outgoing_bytes)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

pub use ferry_protocol::BrokerUrl;

impl MqttConfig {
    /// Check every field without touching the file system. Messages name the offending key.
    pub fn validate(&self) -> Result<(), MqttError> {
        let bad =
            |field: &'static str, reason: String| Err(MqttError::InvalidConfig { field, reason });

        let broker = match BrokerUrl::parse(&self.url) {
            Ok(b) => b,
            Err(reason) => return bad("url", reason),
        };
        if broker.tls {
            if self.ca_file.is_none() {
                return bad(
                    "ca_file",
                    "mqtts needs ca_file: the agent does not use a system trust store".into(),
                );
            }
            if broker.host.starts_with('[') {
                return bad(
                    "url",
                    "mqtts to an IPv6 literal is not supported (rumqttc takes the TLS server \
                     name from the host); use a DNS name"
                        .into(),
                );
            }
        } else {
            for (field, value) in [
                ("ca_file", &self.ca_file),
                ("cert_file", &self.cert_file),
                ("key_file", &self.key_file),
            ] {
                if value.is_some() {
                    return bad(
                        field,
                        format!(
                            "is set but url {:?} is plaintext mqtt://; use mqtts:// for TLS",
                            self.url
                        ),
                    );
                }
            }
        }
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => return bad("key_file", "cert_file is set without key_file".into()),
            (None, Some(_)) => return bad("cert_file", "key_file is set without cert_file".into()),
            _ => {}
        }
        if let Some(id) = &self.client_id {
            if id.is_empty() || id.len() > 65535 || id.contains('\0') {
                return bad(
                    "client_id",
                    "must be 1 to 65535 bytes without NUL (leave it out for ferry-<device id>)"
                        .into(),
                );
            }
        }
        if self.password.is_some() && self.password_file.is_some() {
            return bad(
                "password",
                "set either password or password_file, not both".into(),
            );
        }
        if self.username.is_none() && (self.password.is_some() || self.password_file.is_some()) {
            return bad(
                "username",
                "a password needs a username (MQTT 3.1.1 does not allow a password alone)".into(),
            );
        }
        if let Err(reason) = ferry_protocol::topics::check_prefix(&self.topic_prefix) {
            return bad("topic_prefix", reason);
        }
        // MQTT counts the keep-alive in whole seconds (a u16).
        if !(1..=65535).contains(&self.keepalive.as_secs()) || self.keepalive.subsec_nanos() != 0 {
            return bad(
                "keepalive",
                format!(
                    "{} is not a whole number of seconds in the range 1s-65535s (0 would disable \
                     dead-link detection and with it the last will)",
                    show(self.keepalive)
                ),
            );
        }
        if self.backoff_initial < Duration::from_millis(1) {
            return bad("backoff_initial", "must be at least 1ms".into());
        }
        if self.backoff_max < self.backoff_initial {
            return bad(
                "backoff_max",
                format!(
                    "{} is below backoff_initial ({})",
                    show(self.backoff_max),
                    show(self.backoff_initial)
                ),
            );
        }
        let min_incoming = MAX_DESIRED_ENVELOPE + PUBLISH_OVERHEAD;
        if !(min_incoming..=MQTT_MAX_PACKET).contains(&self.max_incoming_bytes) {
            return bad(
                "max_incoming_bytes",
                format!(
                    "{} is out of range {min_incoming}-{MQTT_MAX_PACKET}: it must exceed the \
                     {MAX_DESIRED_ENVELOPE}-byte notice cap so that the agent, not the MQTT \
                     client, rejects an oversized notice",
                    self.max_incoming_bytes
                ),
            );
        }
        if !(PUBLISH_OVERHEAD..=MQTT_MAX_PACKET).contains(&self.max_outgoing_bytes) {
            return bad(
                "max_outgoing_bytes",
                format!(
                    "{} is out of range {PUBLISH_OVERHEAD}-{MQTT_MAX_PACKET}",
                    self.max_outgoing_bytes
                ),
            );
        }
        // rumqttc takes it in whole seconds.
        if !(1..=3600).contains(&self.connect_timeout.as_secs())
            || self.connect_timeout.subsec_nanos() != 0
        {
            return bad(
                "connect_timeout",
                format!(
                    "{} is not a whole number of seconds in the range 1s-1h",
                    show(self.connect_timeout)
                ),
            );
        }
        Ok(())
    }

    /// The broker URL, parsed. Call [`MqttConfig::validate`] first for a better message.
    pub fn broker(&self) -> Result<BrokerUrl, MqttError> {
        BrokerUrl::parse(&self.url).map_err(|reason| MqttError::InvalidConfig {
            field: "url",
            reason,
        })
    }

    /// The configured client id, or `ferry-<device_id>-<8 random hex digits>`, new at every
    /// start: on a broker that lets anyone claim any client id, a predictable id would let
    /// another client take the box's connection away again and again (the session is clean, so
    /// nothing else is lost by changing it). On the shipped broker the certificate's identity
    /// is the client id whatever the box sends.
    pub fn client_id_for(&self, device_id: &str) -> String {
        self.client_id.clone().unwrap_or_else(|| {
            let mut b = [0u8; 4];
            if getrandom::fill(&mut b).is_err() {
                b = std::process::id().to_le_bytes();
            }
            format!("ferry-{device_id}-{}", hex::encode(b))
        })
    }

    /// `(username, password)` if a username is configured; reads `password_file`.
    pub fn credentials(&self) -> Result<Option<(String, String)>, MqttError> {
        let Some(user) = &self.username else {
            return Ok(None);
        };
        let password = match (&self.password, &self.password_file) {
            (Some(p), _) => p.clone(),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|source| MqttError::ReadFile {
                    what: "password_file",
                    path: path.clone(),
                    source,
                })?;
                let text = text.strip_suffix('\n').unwrap_or(&text);
                text.strip_suffix('\r').unwrap_or(text).to_string()
            }
            (None, None) => String::new(),
        };
        Ok(Some((user.clone(), password)))
    }

    /// The rustls client configuration for mqtts (ring provider, roots from `ca_file` only,
    /// optional client certificate); `None` for plaintext mqtt.
    pub fn tls_client_config(&self) -> Result<Option<Arc<rustls::ClientConfig>>, MqttError> {
        if !self.broker()?.tls {
            return Ok(None);
        }
        let ca_file = self
            .ca_file
            .as_ref()
            .ok_or_else(|| MqttError::InvalidConfig {
                field: "ca_file",
                reason: "mqtts needs ca_file: the agent does not use a system trust store".into(),
            })?;

        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certs("ca_file", ca_file)? {
            roots.add(cert).map_err(|source| MqttError::Tls {
                context: format!("adding CA certificate from {}", ca_file.display()),
                source,
            })?;
        }

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|source| MqttError::Tls {
                context: "selecting TLS protocol versions".into(),
                source,
            })?
            .with_root_certificates(roots);

        let config = match (&self.cert_file, &self.key_file) {
            (Some(cert_file), Some(key_file)) => {
                let chain = read_certs("cert_file", cert_file)?;
                let bytes = read_file("key_file", key_file)?;
                let key =
                    PrivateKeyDer::from_pem_slice(&bytes).map_err(|source| MqttError::Pem {
                        what: "key_file",
                        path: key_file.clone(),
                        source,
                    })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|source| MqttError::Tls {
                        context: format!(
                            "using client certificate {} with key {}",
                            cert_file.display(),
                            key_file.display()
                        ),
                        source,
                    })?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Some(Arc::new(config)))
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, MqttError> {
    std::fs::read(path).map_err(|source| MqttError::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// All certificates of a PEM file; at least one.
fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, MqttError> {
    let bytes = read_file(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| MqttError::Pem {
            what,
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(MqttError::Pem {
            what,
            path: path.to_path_buf(),
            source: rustls::pki_types::pem::Error::NoItemsFound,
        });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<MqttConfig, toml::de::Error> {
        toml::from_str(toml_text)
    }

    fn invalid(cfg: &MqttConfig) -> (&'static str, String) {
        match cfg.validate() {
            Err(MqttError::InvalidConfig { field, reason }) => (field, reason),
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn empty_table_gives_defaults() {
        let cfg = parse("").unwrap();
        assert_eq!(cfg, MqttConfig::default());
        cfg.validate().unwrap();
        assert_eq!(cfg.url, "mqtt://127.0.0.1:1883");
        assert_eq!(cfg.topic_prefix, "ferry");
        assert_eq!(cfg.keepalive, Duration::from_secs(300));
        assert_eq!(cfg.backoff_initial, Duration::from_millis(500));
        assert_eq!(cfg.backoff_max, Duration::from_secs(300));
        assert_eq!(cfg.connect_timeout, Duration::from_secs(30));
        assert_eq!(cfg.max_incoming_bytes, 1024 * 1024);
        assert!(cfg.max_incoming_bytes > MAX_DESIRED_ENVELOPE);
        let id = cfg.client_id_for("dev-001");
        assert!(
            id.starts_with("ferry-dev-001-") && id.len() == "ferry-dev-001-".len() + 8,
            "{id}"
        );
        assert_ne!(cfg.client_id_for("dev-001"), id, "random at every start");
        assert_eq!(cfg.credentials().unwrap(), None);
        assert!(cfg.tls_client_config().unwrap().is_none());
        assert_eq!(
            cfg.broker().unwrap(),
            BrokerUrl {
                tls: false,
                host: "127.0.0.1".into(),
                port: 1883
            }
        );
    }

    #[test]
    fn full_table() {
        let cfg = parse(
            r#"
            url = "mqtts://broker.example.net"
            client_id = "box-7"
            username = "dev-001"
            password_file = "/etc/ferry/mqtt.pass"
            ca_file = "/etc/ferry/ca.pem"
            cert_file = "/etc/ferry/dev.crt"
            key_file = "/etc/ferry/dev.key"
            topic_prefix = "acme/ferry"
            keepalive = "2m"
            backoff_initial = "250ms"
            backoff_max = "1m"
            max_incoming_bytes = 2097152
            max_outgoing_bytes = 65536
            connect_timeout = "10s"
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.keepalive, Duration::from_secs(120));
        assert_eq!(cfg.backoff_initial, Duration::from_millis(250));
        assert_eq!(cfg.backoff_max, Duration::from_secs(60));
        assert_eq!(cfg.connect_timeout, Duration::from_secs(10));
        assert_eq!(cfg.client_id_for("dev-001"), "box-7");
        assert_eq!(cfg.broker().unwrap().port, 8883);
        assert!(cfg.broker().unwrap().tls);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = parse("urll = \"mqtt://x\"").unwrap_err().to_string();
        assert!(err.contains("unknown field `urll`"), "{err}");
    }

    #[test]
    fn debug_redacts_password() {
        let cfg = MqttConfig {
            username: Some("u".into()),
            password: Some("hunter2".into()),
            ..Default::default()
        };
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("<redacted>"), "{dbg}");
    }

    #[test]
    fn validation_messages() {
        let d = MqttConfig::default;

        let (f, r) = invalid(&MqttConfig {
            url: "mqtts://broker".into(),
            ..d()
        });
        assert_eq!(f, "ca_file");
        assert!(r.contains("mqtts needs ca_file"), "{r}");

        let (f, r) = invalid(&MqttConfig {
            ca_file: Some("/ca.pem".into()),
            ..d()
        });
        assert_eq!(f, "ca_file");
        assert!(r.contains("plaintext"), "{r}");

        let tls = || MqttConfig {
            url: "mqtts://broker".into(),
            ca_file: Some("/ca.pem".into()),
            ..d()
        };
        tls().validate().unwrap();
        assert_eq!(
            invalid(&MqttConfig {
                cert_file: Some("/c".into()),
                ..tls()
            })
            .0,
            "key_file"
        );
        assert_eq!(
            invalid(&MqttConfig {
                key_file: Some("/k".into()),
                ..tls()
            })
            .0,
            "cert_file"
        );
        assert_eq!(
            invalid(&MqttConfig {
                url: "mqtts://[::1]".into(),
                ..tls()
            })
            .0,
            "url"
        );

        assert_eq!(
            invalid(&MqttConfig {
                url: "x".into(),
                ..d()
            })
            .0,
            "url"
        );
        assert_eq!(
            invalid(&MqttConfig {
                password: Some("p".into()),
                ..d()
            })
            .0,
            "username"
        );
        assert_eq!(
            invalid(&MqttConfig {
                username: Some("u".into()),
                password: Some("p".into()),
                password_file: Some("/p".into()),
                ..d()
            })
            .0,
            "password"
        );
        assert_eq!(
            invalid(&MqttConfig {
                client_id: Some(String::new()),
                ..d()
            })
            .0,
            "client_id"
        );
        assert_eq!(
            invalid(&MqttConfig {
                topic_prefix: "a/#".into(),
                ..d()
            })
            .0,
            "topic_prefix"
        );
        let ms = Duration::from_millis;
        let secs = Duration::from_secs;
        let (f, r) = invalid(&MqttConfig {
            keepalive: secs(0),
            ..d()
        });
        assert_eq!(f, "keepalive");
        assert!(r.contains("last will"), "{r}");
        for k in [ms(1500), secs(65536)] {
            assert_eq!(
                invalid(&MqttConfig {
                    keepalive: k,
                    ..d()
                })
                .0,
                "keepalive",
                "{k:?}"
            );
        }
        assert_eq!(
            invalid(&MqttConfig {
                backoff_initial: secs(0),
                ..d()
            })
            .0,
            "backoff_initial"
        );
        assert_eq!(
            invalid(&MqttConfig {
                backoff_initial: ms(5000),
                backoff_max: secs(1),
                ..d()
            })
            .0,
            "backoff_max"
        );
        MqttConfig {
            backoff_initial: ms(5),
            backoff_max: ms(800),
            ..d()
        }
        .validate()
        .unwrap();
        let (f, r) = invalid(&MqttConfig {
            max_incoming_bytes: 256 * 1024,
            ..d()
        });
        assert_eq!(f, "max_incoming_bytes");
        assert!(r.contains("notice cap"), "{r}");
        assert_eq!(
            invalid(&MqttConfig {
                max_outgoing_bytes: 10,
                ..d()
            })
            .0,
            "max_outgoing_bytes"
        );
        for t in [secs(0), ms(2500), secs(3601)] {
            assert_eq!(
                invalid(&MqttConfig {
                    connect_timeout: t,
                    ..d()
                })
                .0,
                "connect_timeout",
                "{t:?}"
            );
        }

        let msg = MqttConfig {
            keepalive: secs(0),
            ..d()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(msg.starts_with("invalid [mqtt] keepalive:"), "{msg}");
    }

    #[test]
    fn password_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pass");
        std::fs::write(&path, "s3cret\n").unwrap();
        let cfg = MqttConfig {
            username: Some("dev".into()),
            password_file: Some(path.clone()),
            ..Default::default()
        };
        assert_eq!(
            cfg.credentials().unwrap(),
            Some(("dev".into(), "s3cret".into()))
        );
        std::fs::remove_file(&path).unwrap();
        let err = cfg.credentials().unwrap_err().to_string();
        assert!(
            err.contains("password_file") && err.contains("pass"),
            "{err}"
        );
    }

    #[test]
    fn tls_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let cfg = MqttConfig {
            url: "mqtts://broker".into(),
            ca_file: Some(ca.clone()),
            ..Default::default()
        };
        let err = cfg.tls_client_config().unwrap_err().to_string();
        assert!(err.contains("ca_file") && err.contains("ca.pem"), "{err}");

        std::fs::write(&ca, "not a certificate\n").unwrap();
        let err = cfg.tls_client_config().unwrap_err().to_string();
        assert!(err.contains("ca_file") && err.contains("ca.pem"), "{err}");

        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = cfg.tls_client_config().unwrap_err().to_string();
        assert!(
            err.contains("CA certificate") && err.contains("ca.pem"),
            "{err}"
        );
    }
}
