//! **The controller's database**, behind [`Store`]: SQLite in the data directory (embedded, the
//! default for one server) or PostgreSQL (`[store] url = "postgres://…"`, for a database run as
//! a service). Both keep the same records: JSON documents keyed by id, per-device sequence
//! counters as 8-byte big-endian byte strings (every u64 keeps its value, and `max` orders them
//! bytewise), events, and telemetry with its hourly downsampling.
//!
//! The core writes everything one loop iteration changed in ONE transaction, before it
//! publishes anything (see `core.rs`): after `kill -9` the database is the truth.
//!
//! Each backend has versioned migrations ([`SCHEMA_VERSION`]): opening applies the missing ones
//! in a transaction; a database written by a newer controller is refused
//! ([`StoreError::SchemaTooNew`], exit 78), never written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::enrolment::{KeyChanges, KeyRecord};
use super::model::{Device, ReleaseEntry, RolloutRecord, SentDesired, StoredEvent};

mod postgres;
mod sqlite;
#[cfg(test)]
pub(crate) mod testdb;
#[cfg(test)]
mod tests;

pub use self::postgres::{Fence, PgStore, PgThread};
pub use self::sqlite::SqliteStore;

/// The schema version this controller writes (both backends: migration N is the same change).
/// 1: the baseline (the tables every earlier controller created, adopted as they are).
/// 2: the replicas' leader lease (PostgreSQL).
pub const SCHEMA_VERSION: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the data directory {path}: {cause}")]
    Dir { path: String, cause: std::io::Error },
    #[error("database {path}: {cause}")]
    Sqlite {
        path: String,
        cause: rusqlite::Error,
    },
    #[error("database {db}: {}", pg_detail(cause))]
    Postgres {
        db: String,
        #[source]
        cause: ::postgres::Error,
    },
    #[error("database {db}: {detail}")]
    Tls { db: String, detail: String },
    #[error(
        "database {db}: this replica ({holder}) no longer holds the leader lease (token \
         {token}): it writes nothing more"
    )]
    Fenced {
        db: String,
        holder: String,
        token: i64,
    },
    #[error("cannot start the database thread: {0}")]
    Thread(std::io::Error),
    #[error("database {path}: corrupt {what} record {key:?}: {detail}")]
    Corrupt {
        path: String,
        what: &'static str,
        key: String,
        detail: String,
    },
    #[error(
        "database {db} has schema version {found}, this controller knows up to {supported}: \
         it was written by a newer ferryctl; run that one (or a newer one), never an older one"
    )]
    SchemaTooNew {
        db: String,
        found: u32,
        supported: u32,
    },
}

/// A PostgreSQL error as people need it: the server's message and SQLSTATE (the client's
/// `Display` says only "db error"), or the client's error and its causes.
fn pg_detail(e: &::postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
    }
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

impl StoreError {
    /// An error restarting cannot fix (systemd: exit 78, not restarted).
    pub fn is_config(&self) -> bool {
        match self {
            StoreError::SchemaTooNew { .. } | StoreError::Tls { .. } => true,
            // SQLSTATE class 28, invalid authorization: a wrong user or password.
            StoreError::Postgres { cause, .. } => {
                cause.code().is_some_and(|c| c.code().starts_with("28"))
            }
            _ => false,
        }
    }
}

/// One telemetry point: unix milliseconds and the value; `min`/`max` for downsampled hours.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Point {
    pub ts: i64,
    pub value: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

/// A telemetry reading to store: (device, metric, unix ms, value).
pub type Reading = (String, String, i64, f64);

/// Everything the core keeps in memory, as loaded at start-up.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub devices: BTreeMap<String, Device>,
    pub releases: BTreeMap<(String, String), ReleaseEntry>,
    pub rollouts: BTreeMap<String, RolloutRecord>,
    pub sequences: BTreeMap<String, u64>,
    /// Without their envelopes (see [`SentDesired::envelope`]).
    pub desired: BTreeMap<String, SentDesired>,
    /// The number of the last rollout created (ids are `r-<n>`).
    pub rollout_seq: u64,
    /// Device keys (approved and pending) with their report counters.
    pub device_keys: Vec<KeyRecord>,
}

/// One transaction's worth of changes.
#[derive(Debug, Default)]
pub struct Changes<'a> {
    pub devices: Vec<&'a Device>,
    pub releases: Vec<&'a ReleaseEntry>,
    pub rollouts: Vec<(&'a RolloutRecord, u64)>,
    pub sequences: Vec<(&'a str, u64)>,
    pub desired: Vec<(&'a str, &'a SentDesired)>,
    pub events: Vec<StoredEvent>,
    pub telemetry: Vec<Reading>,
    pub rollout_seq: Option<u64>,
    pub keys: KeyChanges,
}

impl Changes<'_> {
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
            && self.releases.is_empty()
            && self.rollouts.is_empty()
            && self.sequences.is_empty()
            && self.desired.is_empty()
            && self.events.is_empty()
            && self.telemetry.is_empty()
            && self.rollout_seq.is_none()
            && self.keys.put.is_empty()
            && self.keys.delete.is_empty()
    }
}

/// The controller's database. Every method is one transaction (or one read); `commit` is
/// durable when it returns.
pub trait Store: Send {
    /// Where it is, for logs: a path, or a URL without its password.
    fn describe(&self) -> String;
    /// From now on every commit checks this replica still holds the leader lease (PostgreSQL;
    /// SQLite has one server and no lease).
    fn set_fence(&mut self, _fence: Option<Fence>) {}
    /// Everything the core keeps in memory; the notices in [`Snapshot::desired`] without their
    /// envelopes (read those with [`Store::notices`] when they are needed).
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// The stored notices of `devices` (device → the envelope, byte for byte as signed), for
    /// re-publishing them; a device without a stored notice is left out.
    fn notices(&self, devices: &[String]) -> Result<BTreeMap<String, String>, StoreError>;
    /// Write all changes in one transaction. A sequence counter never goes backwards, whatever
    /// is passed; a telemetry reading already stored (same device, metric, time) is kept once.
    fn commit(&mut self, c: &Changes<'_>) -> Result<(), StoreError>;
    /// The device's most recent events, newest first.
    fn recent_events(&self, device: &str, limit: usize) -> Result<Vec<StoredEvent>, StoreError>;
    /// Delete events older than `before` (unix seconds) and all but the newest `keep` per device.
    fn prune_events(&mut self, before: i64, keep: usize) -> Result<usize, StoreError>;
    /// A device's telemetry since `since_ms` (unix ms), per metric, oldest first: hourly
    /// averages (with min/max) for downsampled periods, then raw samples.
    fn telemetry(
        &self,
        device: &str,
        since_ms: i64,
        metric: Option<&str>,
    ) -> Result<BTreeMap<String, Vec<Point>>, StoreError>;
    /// Retention: raw samples older than `raw_before_ms` become hourly averages (min, max,
    /// count); hourly rows older than `keep_before_ms` are deleted. Returns (raw rows folded,
    /// hourly rows deleted). One transaction.
    fn downsample(
        &mut self,
        raw_before_ms: i64,
        keep_before_ms: i64,
    ) -> Result<(usize, usize), StoreError>;
}

/// `[store] url`: which database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite:PATH` (relative to the config file's directory), or the default
    /// `DATA_DIR/ferry.db`.
    Sqlite(PathBuf),
    /// `postgres://` or `postgresql://` (libpq's URL form; `sslmode=disable|prefer|require`).
    Postgres(String),
}

impl StoreUrl {
    /// Parse `url`, a relative SQLite path taken from `base`.
    pub fn parse(url: &str, base: &Path) -> Result<StoreUrl, String> {
        if let Some(p) = url.strip_prefix("sqlite:") {
            let p = p.strip_prefix("//").unwrap_or(p);
            if p.is_empty() {
                return Err(
                    "sqlite: needs a path (sqlite:/var/lib/ferry-controller/ferry.db)".into(),
                );
            }
            let p = PathBuf::from(p);
            return Ok(StoreUrl::Sqlite(if p.is_relative() {
                base.join(p)
            } else {
                p
            }));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            url.parse::<::postgres::Config>()
                .map_err(|e| format!("{}: {e}", redact(url)))?;
            return Ok(StoreUrl::Postgres(url.to_string()));
        }
        Err(format!(
            "{:?}: not a store URL (sqlite:PATH or postgres://USER@HOST/DB)",
            redact(url)
        ))
    }

    /// A PostgreSQL URL with `password` put in (percent-encoded) as its user's password: what
    /// `[store] password_file` does, so that the secret need not sit in the config file. The URL
    /// must name a user and carry no password of its own.
    pub fn with_password(self, password: &str) -> Result<StoreUrl, String> {
        let StoreUrl::Postgres(url) = self else {
            return Err("password_file is for a postgres:// URL".into());
        };
        let scheme_end = url.find("://").map(|i| i + 3).unwrap_or(0);
        let rest = &url[scheme_end..];
        let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let Some(at) = rest[..auth_end].rfind('@') else {
            return Err(format!(
                "{}: password_file needs a user in the URL (postgres://USER@HOST/DB)",
                redact(&url)
            ));
        };
        if rest[..at].contains(':') || url.contains("password=") {
            return Err(format!(
                "{}: the URL has a password already; keep it in password_file only",
                redact(&url)
            ));
        }
        let mut enc = String::with_capacity(password.len() * 3);
        for b in password.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                enc.push(b as char);
            } else {
                enc.push_str(&format!("%{b:02X}"));
            }
        }
        let at = scheme_end + at;
        let with = format!("{}:{enc}{}", &url[..at], &url[at..]);
        with.parse::<::postgres::Config>()
            .map_err(|e| format!("{}: {e}", redact(&with)))?;
        Ok(StoreUrl::Postgres(with))
    }

    /// For logs: the URL without a password.
    pub fn describe(&self) -> String {
        match self {
            StoreUrl::Sqlite(p) => p.display().to_string(),
            StoreUrl::Postgres(u) => redact(u),
        }
    }
}

/// `scheme://user:secret@host/…` → `scheme://user:***@host/…` (and `password=` parameters).
pub fn redact(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest = &out[scheme_end + 3..];
        let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..auth_end].rfind('@') {
            if let Some(colon) = rest[..at].find(':') {
                let start = scheme_end + 3 + colon + 1;
                out.replace_range(start..scheme_end + 3 + at, "***");
            }
        }
    }
    if let Some(i) = out.find("password=") {
        let end = out[i..].find('&').map_or(out.len(), |e| i + e);
        out.replace_range(i + "password=".len()..end, "***");
    }
    out
}

/// Open the store `url` names (creating and migrating it). `ca`: PEM roots for PostgreSQL over
/// TLS (default: the system's).
pub fn open(url: &StoreUrl, ca: Option<&Path>) -> Result<Box<dyn Store>, StoreError> {
    Ok(match url {
        StoreUrl::Sqlite(path) => Box::new(SqliteStore::open_file(path)?),
        StoreUrl::Postgres(u) => Box::new(PgStore::connect(u, ca)?),
    })
}

pub(crate) fn decode<T: DeserializeOwned>(
    db: &str,
    what: &'static str,
    key: &str,
    data: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(data).map_err(|e| StoreError::Corrupt {
        path: db.to_string(),
        what,
        key: key.to_string(),
        detail: e.to_string(),
    })
}

pub(crate) fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("records always serialize")
}

/// A sequence counter as stored: 8 bytes big-endian.
pub(crate) fn sequence_from_bytes(b: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(b).ok().map(u64::from_be_bytes)
}
