//! Where the box keeps its trust record (protocol §10): `trust.json` in `state_dir`, the
//! envelope exactly as taken, written atomically (the previous one kept as `trust.prev.json`),
//! and `trust.pending.json`, where `ferry-agent trust install FILE` leaves a record for the
//! running agent (or the next start) to take through the same checks as one from MQTT.
//!
//! Without a stored record the box trusts the keys of its config (version 0).

use std::path::{Path, PathBuf};

use ferry_protocol::trust_record::{self, AcceptedTrust, TrustSet};

use crate::fsutil::write_atomic;

#[derive(Debug, thiserror::Error)]
pub enum TrustStoreError {
    #[error("cannot write the trust record {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The box's trust as loaded: the set and the SHA-256 of the record's body (none: the config).
#[derive(Clone, Debug)]
pub struct Current {
    pub set: TrustSet,
    pub body_sha256: Option<String>,
    /// The record's `sequence_floor`, if it set one.
    pub sequence_floor: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct TrustStore {
    path: PathBuf,
    prev: PathBuf,
    pending: PathBuf,
}

impl TrustStore {
    pub fn new(state_dir: &Path) -> TrustStore {
        TrustStore {
            path: state_dir.join("trust.json"),
            prev: state_dir.join("trust.prev.json"),
            pending: state_dir.join("trust.pending.json"),
        }
    }

    /// The stored record if one verifies against its own root keys, else the previous one,
    /// else the config's keys. A stored record that does not verify is logged loudly: with
    /// atomic writes it only happens when someone edited the file.
    pub fn load(&self, config: TrustSet) -> Current {
        for p in [&self.path, &self.prev] {
            match std::fs::read(p) {
                Ok(raw) => match trust_record::load_stored(&raw) {
                    Ok(a) => return current(a),
                    Err(e) => {
                        tracing::error!(path = %p.display(), error = %e, "stored trust record does not verify; ignored")
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(path = %p.display(), error = %e, "cannot read the stored trust record")
                }
            }
        }
        Current {
            set: config,
            body_sha256: None,
            sequence_floor: None,
        }
    }

    /// Store a record that was taken (the old one becomes `trust.prev.json`).
    pub fn save(&self, raw: &[u8]) -> Result<(), TrustStoreError> {
        let werr = |p: &Path, source| TrustStoreError::Write {
            path: p.display().to_string(),
            source,
        };
        if let Ok(old) = std::fs::read(&self.path) {
            write_atomic(&self.prev, &old).map_err(|e| werr(&self.prev, e))?;
        }
        write_atomic(&self.path, raw).map_err(|e| werr(&self.path, e))
    }

    /// Leave a record for the agent to take (`ferry-agent trust install`).
    pub fn put_pending(&self, raw: &[u8]) -> Result<(), TrustStoreError> {
        write_atomic(&self.pending, raw).map_err(|source| TrustStoreError::Write {
            path: self.pending.display().to_string(),
            source,
        })
    }

    /// The record left by `trust install`, removed from disk. It is checked like one from MQTT;
    /// if the agent dies before it is stored, `trust install` is simply run again.
    pub fn take_pending(&self) -> Result<Option<Vec<u8>>, TrustStoreError> {
        match std::fs::read(&self.pending) {
            Ok(raw) => {
                std::fs::remove_file(&self.pending).map_err(|source| TrustStoreError::Write {
                    path: self.pending.display().to_string(),
                    source,
                })?;
                Ok(Some(raw))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(TrustStoreError::Read {
                path: self.pending.display().to_string(),
                source,
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

pub fn current(a: AcceptedTrust) -> Current {
    Current {
        set: a.set,
        body_sha256: Some(a.body_sha256),
        sequence_floor: a.record.sequence_floor,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::trust_record::{RoleKeys, TrustRecord};
    use ferry_protocol::{PrivateKey, Trust, TrustedKeys};

    fn key(n: u8) -> PrivateKey {
        PrivateKey::from_seed([n; 32]).unwrap()
    }

    fn config() -> TrustSet {
        TrustSet::from_config(
            Trust {
                release: TrustedKeys::new([key(100).public().clone()]),
                release_threshold: 1,
                controller: TrustedKeys::new([key(110).public().clone()]),
            },
            TrustedKeys::new([key(1).public().clone()]),
            1,
        )
    }

    fn record(version: u64) -> Vec<u8> {
        TrustRecord {
            version,
            expires_at: "2099-01-01T00:00:00Z".parse().unwrap(),
            root: RoleKeys {
                keys: vec![key(1).public().to_pem()],
                threshold: 1,
            },
            release: RoleKeys {
                keys: vec![key(100).public().to_pem()],
                threshold: 1,
            },
            controller: vec![key(111).public().to_pem()],
            sequence_floor: None,
            devices: None,
        }
        .sign(&[&key(1)])
        .to_json()
        .into_bytes()
    }

    #[test]
    fn config_then_stored_then_previous() {
        let dir = tempfile::tempdir().unwrap();
        let s = TrustStore::new(dir.path());
        assert_eq!(s.load(config()).set.version, 0);
        s.save(&record(1)).unwrap();
        s.save(&record(2)).unwrap();
        let c = s.load(config());
        assert_eq!(c.set.version, 2);
        assert!(c.body_sha256.is_some());
        // A damaged trust.json: the previous record, not the config.
        std::fs::write(s.path(), b"{").unwrap();
        assert_eq!(s.load(config()).set.version, 1);
    }

    #[test]
    fn pending_is_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = TrustStore::new(dir.path());
        assert_eq!(s.take_pending().unwrap(), None);
        s.put_pending(b"x").unwrap();
        assert_eq!(s.take_pending().unwrap().as_deref(), Some(&b"x"[..]));
        assert_eq!(s.take_pending().unwrap(), None);
    }
}
