//! The device's identity: its Ed25519 key and the counter that orders its reports (protocol v2,
//! PROTOCOL.md §9). Every report the agent publishes goes through a [`Seal`]: the agent uses
//! [`DeviceIdentity`] (signed), library tests of the link and telemetry may use [`Unsigned`]
//! (the v1 bytes).
//!
//! - The key is `[identity] key` (default `<state_dir>/device.key`), PKCS#8 PEM, mode 0600,
//!   generated at first start from the OS's randomness or provisioned by the operator. The agent
//!   refuses to start on a key file it cannot parse (a config error) instead of replacing it.
//! - `<state_dir>/report_boot` holds the `boot` half of every counter; each start raises it to
//!   `max(stored + 1, Unix seconds)` and writes it atomically before anything is signed.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use ferry_protocol::device_report::{self, EnrollBody, OnlineBody, Stream};
use ferry_protocol::keys::PrivateKey;
use serde::Deserialize;

/// `[identity]` in agent.toml.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// The device key (PKCS#8 PEM). Default `<state_dir>/device.key`, generated when missing.
    pub key: Option<PathBuf>,
    /// The fleet enrolment token (baked into the image); a controller configured with it admits
    /// the device at once. Without it an operator approves the device (`ferryctl device approve`).
    pub enroll_token: Option<String>,
    /// The token in a file (first line), instead of `enroll_token`.
    pub enroll_token_file: Option<PathBuf>,
    /// With `device_id = "auto"`: put in front of the hardware id (e.g. `"mifi-"`).
    pub device_id_prefix: String,
    /// With `device_id = "auto"`: where `/proc`, `/sys` and `/etc` are looked up (default `/`;
    /// see `src/hardware_id.rs`).
    pub hardware_root: Option<PathBuf>,
}

impl IdentityConfig {
    pub fn key_path(&self, state_dir: &Path) -> PathBuf {
        self.key
            .clone()
            .unwrap_or_else(|| state_dir.join("device.key"))
    }

    pub fn token(&self) -> std::io::Result<Option<String>> {
        if let Some(t) = &self.enroll_token {
            return Ok(Some(t.clone()));
        }
        match &self.enroll_token_file {
            Some(p) => Ok(std::fs::read_to_string(p)?
                .lines()
                .next()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())),
            None => Ok(None),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("device key {path}: {detail}")]
    Key { path: String, detail: String },
    #[error("report counter file {path}: {source}")]
    Counter {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("enrolment token file: {0}")]
    Token(#[source] std::io::Error),
}

/// What turns a report body into the bytes published.
pub trait Seal: Send + Sync + 'static {
    /// A `state`, `events` or `telemetry` report.
    fn report(&self, stream: Stream, body: serde_json::Value) -> Vec<u8>;
    /// `online` for connection `attempt` (`false`: its last will, or the graceful goodbye).
    fn online(&self, attempt: u32, online: bool) -> Vec<u8>;
    /// The enrolment request published (retained) on every connection, if any.
    fn enroll(&self) -> Option<Vec<u8>>;
}

/// Protocol v1: the bodies as they are, `online` as `1` / `0`, no enrolment. For tests of the
/// link's own mechanics; a v2 controller drops these.
pub struct Unsigned;

impl Seal for Unsigned {
    fn report(&self, _stream: Stream, body: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&body).expect("a JSON value serializes")
    }
    fn online(&self, _attempt: u32, online: bool) -> Vec<u8> {
        if online { b"1" } else { b"0" }.to_vec()
    }
    fn enroll(&self) -> Option<Vec<u8>> {
        None
    }
}

/// The device key, its counter, and what it enrols with.
pub struct DeviceIdentity {
    device: String,
    key: PrivateKey,
    boot: u32,
    next: AtomicU32,
    token: Option<String>,
}

impl DeviceIdentity {
    /// Load (or create) the key, raise the boot counter.
    pub fn open(
        cfg: &IdentityConfig,
        state_dir: &Path,
        device: &str,
    ) -> Result<DeviceIdentity, IdentityError> {
        let key = load_or_create_key(&cfg.key_path(state_dir))?;
        let boot = raise_boot(&state_dir.join("report_boot"), unix_now())?;
        let token = cfg.token().map_err(IdentityError::Token)?;
        tracing::info!(device, key = %key.public().id(), boot, enrol_token = token.is_some(), "device identity");
        Ok(DeviceIdentity {
            device: device.to_string(),
            key,
            boot,
            next: AtomicU32::new(1),
            token,
        })
    }

    pub fn key(&self) -> &PrivateKey {
        &self.key
    }

    fn counter(&self) -> u64 {
        // Saturates rather than wrapping: 4 billion reports in one process lifetime.
        let n = self
            .next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_add(1))
            .unwrap_or(u32::MAX);
        device_report::counter(self.boot, n)
    }
}

impl Seal for DeviceIdentity {
    fn report(&self, stream: Stream, body: serde_json::Value) -> Vec<u8> {
        device_report::sign(&self.key, &self.device, stream, self.counter(), body)
    }
    fn online(&self, attempt: u32, online: bool) -> Vec<u8> {
        let body = serde_json::to_value(OnlineBody { online }).expect("serializes");
        let counter = device_report::counter(self.boot, device_report::online_n(attempt, online));
        device_report::sign(&self.key, &self.device, Stream::Online, counter, body)
    }
    fn enroll(&self) -> Option<Vec<u8>> {
        let id = self.key.public().id();
        let body = EnrollBody {
            public_key: self.key.public().to_pem(),
            token_proof: self
                .token
                .as_deref()
                .map(|t| device_report::token_proof(t, &self.device, id)),
            agent_version: Some(crate::version().to_string()),
        };
        let body = serde_json::to_value(body).expect("serializes");
        Some(device_report::sign(
            &self.key,
            &self.device,
            Stream::Enroll,
            self.counter(),
            body,
        ))
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Read the key, or generate one into a new 0600 file (never over an existing one).
pub fn load_or_create_key(path: &Path) -> Result<PrivateKey, IdentityError> {
    let err = |detail: String| IdentityError::Key {
        path: path.display().to_string(),
        detail,
    };
    match std::fs::read_to_string(path) {
        Ok(pem) => return PrivateKey::from_pem(&pem).map_err(|e| err(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e.to_string())),
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| err(format!("no randomness: {e}")))?;
    let key = PrivateKey::from_seed(seed).map_err(|e| err(e.to_string()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    let tmp = dir.join(format!(
        ".{}.new",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| err(e.to_string()))?;
    f.write_all(key.to_pem().as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| err(e.to_string()))?;
    drop(f);
    // A key another process wrote meanwhile wins (hard link fails on an existing target).
    match std::fs::hard_link(&tmp, path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let _ = std::fs::remove_file(&tmp);
            return load_or_create_key(path);
        }
        Err(e) => return Err(err(e.to_string())),
    }
    let _ = std::fs::remove_file(&tmp);
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| err(e.to_string()))?;
    tracing::info!(path = %path.display(), key = %key.public().id(), "generated the device key");
    Ok(key)
}

/// `max(stored + 1, now)`, written atomically before it is used.
pub fn raise_boot(path: &Path, now: u64) -> Result<u32, IdentityError> {
    let stored: u32 = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let boot = stored
        .saturating_add(1)
        .max(u32::try_from(now).unwrap_or(u32::MAX));
    crate::fsutil::write_atomic(path, boot.to_string().as_bytes()).map_err(|source| {
        IdentityError::Counter {
            path: path.display().to_string(),
            source,
        }
    })?;
    Ok(boot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_key_is_generated_once_0600_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/device.key");
        let a = load_or_create_key(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = load_or_create_key(&p).unwrap();
        assert_eq!(a.public().id(), b.public().id());
        // A corrupt key is an error, never silently replaced.
        std::fs::write(&p, "garbage").unwrap();
        assert!(load_or_create_key(&p).is_err());
    }

    #[test]
    fn boot_always_rises_even_with_a_clock_in_1970_or_a_lost_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("report_boot");
        assert_eq!(raise_boot(&p, 1_000).unwrap(), 1_000);
        assert_eq!(raise_boot(&p, 0).unwrap(), 1_001, "clock went back");
        assert_eq!(raise_boot(&p, 5_000).unwrap(), 5_000);
        std::fs::remove_file(&p).unwrap();
        assert_eq!(
            raise_boot(&p, 6_000).unwrap(),
            6_000,
            "file lost, sane clock"
        );
    }

    #[test]
    fn reports_verify_and_counters_rise_across_starts() {
        let d = tempfile::tempdir().unwrap();
        let cfg = IdentityConfig {
            enroll_token: Some("tok".into()),
            ..Default::default()
        };
        let id = DeviceIdentity::open(&cfg, d.path(), "d1").unwrap();
        let pk = id.key().public().clone();
        let open = |raw: &[u8], s| {
            device_report::open(raw, "d1", s)
                .unwrap()
                .verify(&pk)
                .unwrap()
        };
        let a = open(
            &id.report(Stream::State, serde_json::json!({"x": 1})),
            Stream::State,
        );
        let b = open(
            &id.report(Stream::Events, serde_json::json!({})),
            Stream::Events,
        );
        assert!(b.counter > a.counter);
        let on = open(&id.online(0, true), Stream::Online);
        let off = open(&id.online(0, false), Stream::Online);
        assert!(off.counter > on.counter);
        let enroll = device_report::open(&id.enroll().unwrap(), "d1", Stream::Enroll)
            .unwrap()
            .verify_enrolment()
            .unwrap();
        assert!(device_report::check_token_proof(
            "tok",
            "d1",
            pk.id(),
            enroll.1.token_proof.as_deref().unwrap()
        ));
        // The next start signs higher, whatever the clock says.
        let again = DeviceIdentity::open(&cfg, d.path(), "d1").unwrap();
        let c = open(
            &again.report(Stream::State, serde_json::json!({})),
            Stream::State,
        );
        assert!(c.counter > b.counter);
        assert_eq!(again.key().public().id(), pk.id());
    }
}
