//! The journal: the agent's durable memory. One JSON file under `state_dir`, replaced atomically
//! (temp + fsync + rename + fsync dir) before every step, so that after a power cut or SIGKILL
//! the agent knows exactly what it had done and finishes or undoes it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use ferry_protocol::{Release, Strategy, UpdateStatus};
use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;
use crate::update::state::State;

pub const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot read journal {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("journal {path} is corrupt: {detail}")]
    Corrupt { path: String, detail: String },
    #[error("cannot write journal {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// One app as deployed (or to be deployed): its release and the container that runs it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    pub release: Release,
    /// The manifest digest for this device's platform.
    pub digest: String,
    /// `repo@digest`.
    pub reference: String,
    /// Container name.
    pub container: String,
    /// The engine's image id (the config digest the signed manifest names), once the image is
    /// in the engine; containers are created from it. Absent in journals of agents that had
    /// the engine pull by `reference`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
}

impl Deployment {
    /// Two deployments run the same thing when version, digest, container and health settings
    /// are equal (a re-signed release with a new `created_at` does not restart anything).
    pub fn same_workload(&self, other: &Deployment) -> bool {
        self.digest == other.digest
            && self.release.version == other.release.version
            && self.release.container == other.release.container
            && self.release.health == other.release.health
    }

    /// What the engine knows the image by: its id when recorded, else the reference.
    pub fn image(&self) -> &str {
        self.image_id.as_deref().unwrap_or(&self.reference)
    }
}

/// An open update transaction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Txn {
    pub sequence: u64,
    pub rollout: Option<String>,
    pub strategy: Strategy,
    pub state: State,
    /// The complete new set.
    pub target: BTreeMap<String, Deployment>,
    /// Apps whose new container has been created.
    #[serde(default)]
    pub created: BTreeSet<String>,
    /// Apps whose previous container has been stopped.
    #[serde(default)]
    pub stopped_old: BTreeSet<String>,
    /// Images (ids, or references for older journals) this transaction brought into the engine
    /// (removed again if it does not commit).
    #[serde(default)]
    pub pulled: BTreeSet<String>,
    /// The notice asked to switch even while an app holds its update lock.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
    /// Health gates started for this transaction, journaled before each starts: a gate cut
    /// short by an agent crash (kill, power cut, OOM) runs again at the next start, at most
    /// [`crate::update::engine::MAX_GATE_RUNS`] times.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gate_runs: u32,
    /// The agent itself changes in this transaction (an agent release, issue 13): switched
    /// after the apps passed their gate, committed once the new binary confirmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentStep>,
    pub error: Option<String>,
    /// The failed container's last log lines, for the `rolled_back` event.
    #[serde(default)]
    pub logs: Option<Vec<String>>,
    pub started_at: DateTime<Utc>,
}

/// The agent release of a transaction: what to install and what it replaces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStep {
    pub version: semver::Version,
    /// The agent that accepted the notice.
    pub from: semver::Version,
    /// Repository and manifest digest of the agent image for this platform.
    pub repo: String,
    pub digest: String,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Journal {
    pub format: u32,
    /// The last accepted sequence. Persisted before any action on it.
    pub last_sequence: u64,
    /// SHA-256 (hex) of the notice accepted with `last_sequence`.
    pub last_notice_sha256: Option<String>,
    /// The newest `issued_at` ever accepted: a clock behind it cannot revive an old notice.
    pub trusted_time: Option<DateTime<Utc>>,
    /// The committed set: what the box runs when no transaction is open.
    pub committed: BTreeMap<String, Deployment>,
    pub committed_sequence: u64,
    pub txn: Option<Txn>,
    /// The outcome of the last transaction, reported in the retained state.
    pub last_result: Option<UpdateStatus>,
}

impl Default for Journal {
    fn default() -> Self {
        Journal {
            format: FORMAT,
            last_sequence: 0,
            last_notice_sha256: None,
            trusted_time: None,
            committed: BTreeMap::new(),
            committed_sequence: 0,
            txn: None,
            last_result: None,
        }
    }
}

/// The floor (issue 10): what the box has accepted, in its own small record (`floor.json`),
/// written (atomically, fsynced) before the journal whenever it moves, never lowered, and read
/// before the journal. A journal restored from `journal.prev.json` after corruption is one step
/// behind; without the floor it would accept that step's sequence again (a replay) and trust an
/// older time.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Floor {
    /// The highest sequence ever accepted.
    pub sequence: u64,
    /// SHA-256 (hex) of the notice accepted at `sequence`.
    pub notice_sha256: Option<String>,
    /// The newest `issued_at` ever accepted.
    pub trusted_time: Option<DateTime<Utc>>,
    /// The newest trust record whose `sequence_floor` was applied (protocol §10): the one
    /// way the floor goes down, once per record.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub trust_version: u64,
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

impl Floor {
    fn of(j: &Journal) -> Floor {
        Floor {
            sequence: j.last_sequence,
            notice_sha256: j.last_notice_sha256.clone(),
            trusted_time: j.trusted_time,
            trust_version: 0,
        }
    }

    /// The larger of the two, field by field (the hash goes with the larger sequence).
    fn max(self, other: Floor) -> Floor {
        let (sequence, notice_sha256) = if other.sequence > self.sequence {
            (other.sequence, other.notice_sha256)
        } else {
            (self.sequence, self.notice_sha256)
        };
        Floor {
            sequence,
            notice_sha256,
            trusted_time: self.trusted_time.max(other.trusted_time),
            trust_version: self.trust_version.max(other.trust_version),
        }
    }

    /// Raise the journal's memory to the floor.
    fn lift(&self, j: &mut Journal) {
        if self.sequence > j.last_sequence {
            tracing::warn!(
                journal = j.last_sequence,
                floor = self.sequence,
                "the journal is behind the accepted-sequence floor (restored from its previous \
                 version?): sequences up to the floor stay refused"
            );
            j.last_sequence = self.sequence;
            j.last_notice_sha256 = self.notice_sha256.clone();
        }
        j.trusted_time = j.trusted_time.max(self.trusted_time);
    }
}

/// Where the journal lives. The previous version is kept beside it as a fallback; the floor
/// beside both.
#[derive(Clone, Debug)]
pub struct JournalStore {
    path: PathBuf,
    prev: PathBuf,
    floor: PathBuf,
}

impl JournalStore {
    pub fn new(state_dir: &Path) -> Self {
        JournalStore {
            path: state_dir.join("journal.json"),
            prev: state_dir.join("journal.prev.json"),
            floor: state_dir.join("floor.json"),
        }
    }

    /// The floor on disk; a missing one is zero. A corrupt one (atomic writes make it all but
    /// impossible) is logged and ignored: it only ever adds to what the journal knows.
    pub fn floor(&self) -> Floor {
        match std::fs::read(&self.floor) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::error!(path = %self.floor.display(), error = %e, "floor record corrupt; ignored");
                Floor::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Floor::default(),
            Err(e) => {
                tracing::error!(path = %self.floor.display(), error = %e, "cannot read the floor record; ignored");
                Floor::default()
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Load the journal; a missing file is a fresh device. A corrupt file (which atomic writes
    /// make all but impossible) falls back to the previous version, and fails loudly if that is
    /// corrupt too — the agent must not guess what the box runs.
    /// The floor is read first and lifts whatever journal is loaded.
    pub fn load(&self) -> Result<Journal, JournalError> {
        let floor = self.floor();
        let mut j = match self.read(&self.path)? {
            Some(Ok(j)) => j,
            None => Journal::default(),
            Some(Err(detail)) => {
                tracing::error!(path = %self.path.display(), %detail, "journal corrupt; trying the previous version");
                match self.read(&self.prev)? {
                    Some(Ok(j)) => j,
                    _ => {
                        return Err(JournalError::Corrupt {
                            path: self.path.display().to_string(),
                            detail,
                        })
                    }
                }
            }
        };
        floor.lift(&mut j);
        Ok(j)
    }

    fn read(&self, p: &Path) -> Result<Option<Result<Journal, String>>, JournalError> {
        match std::fs::read(p) {
            Ok(bytes) => Ok(Some(
                serde_json::from_slice::<Journal>(&bytes)
                    .map_err(|e| e.to_string())
                    .and_then(|j| {
                        if j.format == FORMAT {
                            Ok(j)
                        } else {
                            Err(format!("unknown journal format {}", j.format))
                        }
                    }),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(JournalError::Read {
                path: p.display().to_string(),
                source,
            }),
        }
    }

    /// Set the accepted-sequence floor to `sequence`, lower or not, as trust record
    /// `trust_version` says (protocol §10). The floor record first, then the journal, written
    /// as both the journal and its previous version (a fallback must not bring the old floor
    /// back). A crash in between is finished at the next start: the floor record says the
    /// record was applied, and the journal is lifted to it, not above.
    pub fn reset_floor(
        &self,
        j: &mut Journal,
        sequence: u64,
        trust_version: u64,
    ) -> Result<(), JournalError> {
        let werr = |p: &Path, source| JournalError::Write {
            path: p.display().to_string(),
            source,
        };
        let floor = Floor {
            sequence,
            notice_sha256: None,
            trusted_time: self.floor().trusted_time.max(j.trusted_time),
            trust_version,
        };
        let f = serde_json::to_vec(&floor).expect("the floor always serializes");
        write_atomic(&self.floor, &f).map_err(|e| werr(&self.floor, e))?;
        j.last_sequence = sequence;
        j.last_notice_sha256 = None;
        let data = serde_json::to_vec_pretty(j).expect("the journal always serializes");
        write_atomic(&self.prev, &data).map_err(|e| werr(&self.prev, e))?;
        write_atomic(&self.path, &data).map_err(|e| werr(&self.path, e))
    }

    pub fn save(&self, j: &Journal) -> Result<(), JournalError> {
        let data = serde_json::to_vec_pretty(j).expect("the journal always serializes");
        let werr = |p: &Path, source| JournalError::Write {
            path: p.display().to_string(),
            source,
        };
        // The floor first, and only when it moves (one more fsync per accepted notice).
        let on_disk = self.floor();
        let floor = on_disk.clone().max(Floor::of(j));
        if floor != on_disk {
            let f = serde_json::to_vec(&floor).expect("the floor always serializes");
            write_atomic(&self.floor, &f).map_err(|e| werr(&self.floor, e))?;
        }
        if let Ok(old) = std::fs::read(&self.path) {
            write_atomic(&self.prev, &old).map_err(|e| werr(&self.prev, e))?;
        }
        write_atomic(&self.path, &data).map_err(|e| werr(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_then_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let s = JournalStore::new(d.path());
        assert_eq!(s.load().unwrap(), Journal::default());
        let j = Journal {
            last_sequence: 7,
            ..Default::default()
        };
        s.save(&j).unwrap();
        assert_eq!(s.load().unwrap().last_sequence, 7);
    }

    #[test]
    fn corrupt_journal_falls_back_to_previous() {
        let d = tempfile::tempdir().unwrap();
        let s = JournalStore::new(d.path());
        s.save(&Journal {
            last_sequence: 1,
            ..Default::default()
        })
        .unwrap();
        s.save(&Journal {
            last_sequence: 2,
            ..Default::default()
        })
        .unwrap();
        std::fs::write(s.path(), b"{not json").unwrap();
        let j = s.load().unwrap();
        assert!(j.committed.is_empty(), "the previous version's set");
        assert_eq!(j.last_sequence, 2, "the floor keeps the accepted sequence");
        std::fs::write(d.path().join("journal.prev.json"), b"").unwrap();
        assert!(matches!(s.load(), Err(JournalError::Corrupt { .. })));
    }

    /// Issue 10: the fallback to `journal.prev.json` lowered the accepted-sequence high-water
    /// mark and the trusted time by one step; the floor record keeps both.
    #[test]
    fn the_floor_never_goes_down() {
        let d = tempfile::tempdir().unwrap();
        let s = JournalStore::new(d.path());
        let t1: DateTime<Utc> = "2026-12-01T00:00:00Z".parse().unwrap();
        let t2: DateTime<Utc> = "2026-12-02T00:00:00Z".parse().unwrap();
        let at = |seq: u64, sha: &str, t| Journal {
            last_sequence: seq,
            last_notice_sha256: Some(sha.into()),
            trusted_time: Some(t),
            ..Default::default()
        };
        s.save(&at(4, "aa", t1)).unwrap();
        s.save(&at(5, "bb", t2)).unwrap();
        // The newest journal lost: the previous one (4, t1) is lifted to the floor (5, t2).
        std::fs::write(s.path(), b"").unwrap();
        let j = s.load().unwrap();
        assert_eq!(
            (
                j.last_sequence,
                j.last_notice_sha256.as_deref(),
                j.trusted_time
            ),
            (5, Some("bb"), Some(t2))
        );
        // A journal saved with less never lowers the floor.
        s.save(&at(3, "cc", t1)).unwrap();
        assert_eq!(s.floor().sequence, 5);
        assert_eq!(s.load().unwrap().last_sequence, 5);
        // Both files gone but the floor: a fresh journal, the same floor.
        std::fs::remove_file(s.path()).unwrap();
        std::fs::remove_file(d.path().join("journal.prev.json")).unwrap();
        let j = s.load().unwrap();
        assert_eq!((j.last_sequence, j.trusted_time), (5, Some(t2)));
        // A corrupt floor is ignored (it only adds).
        std::fs::write(d.path().join("floor.json"), b"{").unwrap();
        assert_eq!(s.load().unwrap().last_sequence, 0);
    }
}
