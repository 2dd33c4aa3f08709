//! The controller's database: SQLite (bundled) in the data directory, WAL journal, `synchronous
//! = FULL` so a committed transaction survives a crash or power loss. Records are stored as
//! JSON documents keyed by id; the per-device sequence counters are 8-byte big-endian BLOBs (a
//! u64 without sign loss, ordered by SQL's `max()`).
//!
//! The core writes everything one loop iteration changed in ONE transaction, before it
//! publishes anything (see `core.rs`): after `kill -9` the database is the truth.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::enrolment::{KeyChanges, KeyRecord};
use super::model::{Device, ReleaseEntry, RolloutRecord, SentDesired, StoredEvent};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the data directory {path}: {cause}")]
    Dir { path: String, cause: std::io::Error },
    #[error("database {path}: {cause}")]
    Sqlite {
        path: String,
        cause: rusqlite::Error,
    },
    #[error("database {path}: corrupt {what} record {key:?}: {detail}")]
    Corrupt {
        path: String,
        what: &'static str,
        key: String,
        detail: String,
    },
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (id TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS device_keys (device TEXT NOT NULL, status TEXT NOT NULL,
  data TEXT NOT NULL, PRIMARY KEY (device, status));
CREATE TABLE IF NOT EXISTS releases (app TEXT NOT NULL, version TEXT NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (app, version));
CREATE TABLE IF NOT EXISTS rollouts (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sequences (device TEXT PRIMARY KEY, last BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS desired (device TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL,
    ts INTEGER NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_device ON events (device, id);
CREATE INDEX IF NOT EXISTS events_by_ts ON events (ts);
CREATE TABLE IF NOT EXISTS telemetry (device TEXT NOT NULL, metric TEXT NOT NULL,
    ts INTEGER NOT NULL, value REAL NOT NULL, PRIMARY KEY (device, metric, ts)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS telemetry_hourly (device TEXT NOT NULL, metric TEXT NOT NULL,
    hour INTEGER NOT NULL, avg REAL NOT NULL, min REAL NOT NULL, max REAL NOT NULL,
    n INTEGER NOT NULL, PRIMARY KEY (device, metric, hour)) WITHOUT ROWID;
";

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

pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    /// Open (creating) `DIR/ferry.db`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|cause| StoreError::Dir {
            path: dir.display().to_string(),
            cause,
        })?;
        let path = dir.join("ferry.db");
        let conn = Connection::open(&path).map_err(|cause| StoreError::Sqlite {
            path: path.display().to_string(),
            cause,
        })?;
        let s = Store { conn, path };
        s.conn
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| s.err(e))?;
        s.conn
            .pragma_update(None, "synchronous", "FULL")
            .map_err(|e| s.err(e))?;
        s.conn
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|e| s.err(e))?;
        s.conn.execute_batch(SCHEMA).map_err(|e| s.err(e))?;
        Ok(s)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.display().to_string(),
            cause: source,
        }
    }

    fn decode<T: DeserializeOwned>(
        &self,
        what: &'static str,
        key: &str,
        data: &str,
    ) -> Result<T, StoreError> {
        serde_json::from_str(data).map_err(|e| StoreError::Corrupt {
            path: self.path.display().to_string(),
            what,
            key: key.to_string(),
            detail: e.to_string(),
        })
    }

    fn rows(&self, sql: &str) -> Result<Vec<(String, String)>, StoreError> {
        let mut st = self.conn.prepare(sql).map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// The sequence counters. Stored as 8-byte big-endian BLOBs, so that every u64 keeps its
    /// value and SQL's `max()` orders them (memcmp); rows written by older versions hold an
    /// INTEGER, where a value above `i64::MAX` was stored as its two's complement (they load as
    /// the u64 they meant, and SQLite sorts every BLOB after every INTEGER, so the next write
    /// replaces them).
    fn sequence_rows(&self) -> Result<Vec<(String, u64)>, StoreError> {
        use rusqlite::types::ValueRef;
        let mut st = self
            .conn
            .prepare("SELECT device, last FROM sequences")
            .map_err(|e| self.err(e))?;
        let mut rows = st.query([]).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(|e| self.err(e))? {
            let device: String = r.get(0).map_err(|e| self.err(e))?;
            let last = match r.get_ref(1).map_err(|e| self.err(e))? {
                ValueRef::Blob(b) => <[u8; 8]>::try_from(b).ok().map(u64::from_be_bytes),
                ValueRef::Integer(i) => Some(i as u64),
                _ => None,
            };
            let last = last.ok_or_else(|| StoreError::Corrupt {
                path: self.path.display().to_string(),
                what: "sequence",
                key: device.clone(),
                detail: format!("{:?}", r.get_ref(1).ok()),
            })?;
            out.push((device, last));
        }
        Ok(out)
    }

    pub fn load(&self) -> Result<Snapshot, StoreError> {
        let mut s = Snapshot::default();
        for (id, data) in self.rows("SELECT id, data FROM devices")? {
            s.devices
                .insert(id.clone(), self.decode("device", &id, &data)?);
        }
        for (key, data) in self.rows("SELECT app || ' ' || version, data FROM releases")? {
            let r: ReleaseEntry = self.decode("release", &key, &data)?;
            s.releases.insert((r.app.clone(), r.version.clone()), r);
        }
        for (id, data) in self.rows("SELECT id, data FROM rollouts ORDER BY seq")? {
            s.rollouts
                .insert(id.clone(), self.decode("rollout", &id, &data)?);
        }
        for (device, last) in self.sequence_rows()? {
            s.sequences.insert(device, last);
        }
        for (id, data) in self.rows("SELECT device || ' ' || status, data FROM device_keys")? {
            s.device_keys.push(self.decode("device key", &id, &data)?);
        }
        for (id, data) in self.rows("SELECT device, data FROM desired")? {
            s.desired
                .insert(id.clone(), self.decode("desired", &id, &data)?);
        }
        s.rollout_seq = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'rollout_seq'",
                [],
                |r| r.get::<_, String>(0),
            )
            .optional()
            .map_err(|e| self.err(e))?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok(s)
    }

    /// Write all changes in one transaction (durable when this returns).
    pub fn commit(&mut self, c: &Changes<'_>) -> Result<(), StoreError> {
        if c.is_empty() {
            return Ok(());
        }
        let path = self.path.display().to_string();
        let err = |cause| StoreError::Sqlite {
            path: path.clone(),
            cause,
        };
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut put = tx
                .prepare_cached("INSERT OR REPLACE INTO devices (id, data) VALUES (?1, ?2)")
                .map_err(err)?;
            for d in &c.devices {
                put.execute(params![d.id, json(d)]).map_err(err)?;
            }
            let mut put = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO releases (app, version, data) VALUES (?1, ?2, ?3)",
                )
                .map_err(err)?;
            for r in &c.releases {
                put.execute(params![r.app, r.version, json(r)])
                    .map_err(err)?;
            }
            let mut put = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO rollouts (id, seq, data) VALUES (?1, ?2, ?3)",
                )
                .map_err(err)?;
            for (r, seq) in &c.rollouts {
                put.execute(params![r.id, *seq as i64, json(r)])
                    .map_err(err)?;
            }
            // A counter never goes backwards, whatever the caller passes.
            let mut put = tx
                .prepare_cached(
                    "INSERT INTO sequences (device, last) VALUES (?1, ?2) ON CONFLICT(device) \
                     DO UPDATE SET last = max(last, excluded.last)",
                )
                .map_err(err)?;
            for (d, n) in &c.sequences {
                put.execute(params![d, n.to_be_bytes().as_slice()])
                    .map_err(err)?;
            }
            let mut put = tx
                .prepare_cached("INSERT OR REPLACE INTO desired (device, data) VALUES (?1, ?2)")
                .map_err(err)?;
            for (d, s) in &c.desired {
                put.execute(params![d, json(s)]).map_err(err)?;
            }
            let mut put = tx
                .prepare_cached("INSERT INTO events (device, ts, data) VALUES (?1, ?2, ?3)")
                .map_err(err)?;
            for e in &c.events {
                put.execute(params![e.device, e.ts.timestamp(), json(e)])
                    .map_err(err)?;
            }
            // A batch re-sent after a lost PUBACK carries the same timestamps: stored once.
            let mut put = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO telemetry (device, metric, ts, value) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(err)?;
            for (d, m, ts, v) in &c.telemetry {
                put.execute(params![d, m, ts, v]).map_err(err)?;
            }
            let mut put = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO device_keys (device, status, data) VALUES (?1, ?2, ?3)",
                )
                .map_err(err)?;
            for k in &c.keys.put {
                put.execute(params![k.device, k.status.as_str(), json(k)])
                    .map_err(err)?;
            }
            let mut del = tx
                .prepare_cached("DELETE FROM device_keys WHERE device = ?1 AND status = ?2")
                .map_err(err)?;
            for (d, st) in &c.keys.delete {
                del.execute(params![d, st.as_str()]).map_err(err)?;
            }
            if let Some(n) = c.rollout_seq {
                tx.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('rollout_seq', ?1)",
                    params![n.to_string()],
                )
                .map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// The device's most recent events, newest first.
    pub fn recent_events(
        &self,
        device: &str,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT data FROM events WHERE device = ?1 ORDER BY id DESC LIMIT ?2")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![device, limit as i64], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for data in rows {
            let data = data.map_err(|e| self.err(e))?;
            out.push(self.decode("event", device, &data)?);
        }
        Ok(out)
    }

    /// Delete events older than `before` (unix seconds) and all but the newest `keep` per device.
    pub fn prune_events(&mut self, before: i64, keep: usize) -> Result<usize, StoreError> {
        let mut n = self
            .conn
            .execute("DELETE FROM events WHERE ts < ?1", params![before])
            .map_err(|e| self.err(e))?;
        n += self
            .conn
            .execute(
                "DELETE FROM events WHERE id IN (SELECT id FROM (SELECT id, ROW_NUMBER() OVER \
                 (PARTITION BY device ORDER BY id DESC) AS rn FROM events) WHERE rn > ?1)",
                params![keep as i64],
            )
            .map_err(|e| self.err(e))?;
        Ok(n)
    }
}

impl Store {
    /// A device's telemetry since `since_ms` (unix ms), per metric, oldest first: hourly
    /// averages (with min/max) for downsampled periods, then raw samples.
    pub fn telemetry(
        &self,
        device: &str,
        since_ms: i64,
        metric: Option<&str>,
    ) -> Result<BTreeMap<String, Vec<Point>>, StoreError> {
        let mut out: BTreeMap<String, Vec<Point>> = BTreeMap::new();
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT metric, hour * 1000, avg, min, max FROM telemetry_hourly                  WHERE device = ?1 AND hour * 1000 >= ?2 - 3600000 AND (?3 IS NULL OR metric = ?3)                  ORDER BY metric, hour",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![device, since_ms, metric], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Point {
                        ts: r.get(1)?,
                        value: r.get(2)?,
                        min: Some(r.get(3)?),
                        max: Some(r.get(4)?),
                    },
                ))
            })
            .map_err(|e| self.err(e))?;
        for row in rows {
            let (m, p) = row.map_err(|e| self.err(e))?;
            out.entry(m).or_default().push(p);
        }
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT metric, ts, value FROM telemetry WHERE device = ?1 AND ts >= ?2                  AND (?3 IS NULL OR metric = ?3) ORDER BY metric, ts",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![device, since_ms, metric], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Point {
                        ts: r.get(1)?,
                        value: r.get(2)?,
                        min: None,
                        max: None,
                    },
                ))
            })
            .map_err(|e| self.err(e))?;
        for row in rows {
            let (m, p) = row.map_err(|e| self.err(e))?;
            out.entry(m).or_default().push(p);
        }
        Ok(out)
    }

    /// Retention: raw samples older than `raw_before_ms` become hourly averages (min, max,
    /// count); hourly rows older than `keep_before_ms` are deleted. Returns (raw rows folded,
    /// hourly rows deleted). One transaction.
    pub fn downsample(
        &mut self,
        raw_before_ms: i64,
        keep_before_ms: i64,
    ) -> Result<(usize, usize), StoreError> {
        let path = self.path.display().to_string();
        let err = |cause| StoreError::Sqlite {
            path: path.clone(),
            cause,
        };
        let tx = self.conn.transaction().map_err(err)?;
        // Fold into existing hours by weighted average.
        tx.execute(
            "INSERT INTO telemetry_hourly (device, metric, hour, avg, min, max, n)              SELECT device, metric, (ts / 3600000) * 3600, avg(value), min(value), max(value), count(*)              FROM telemetry WHERE ts < ?1 GROUP BY device, metric, ts / 3600000              ON CONFLICT(device, metric, hour) DO UPDATE SET                avg = (avg * n + excluded.avg * excluded.n) / (n + excluded.n),                min = min(min, excluded.min), max = max(max, excluded.max), n = n + excluded.n",
            params![raw_before_ms],
        )
        .map_err(err)?;
        let folded = tx
            .execute(
                "DELETE FROM telemetry WHERE ts < ?1",
                params![raw_before_ms],
            )
            .map_err(err)?;
        let dropped = tx
            .execute(
                "DELETE FROM telemetry_hourly WHERE hour * 1000 < ?1",
                params![keep_before_ms],
            )
            .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok((folded, dropped))
    }
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("records always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use ferry_protocol::report::Phase;

    #[test]
    fn round_trip_and_sequences_never_go_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        let mut d = Device::new("dev-1");
        d.labels.insert("group".into(), "beta".into());
        let sent = SentDesired {
            sequence: 5,
            apps: [("sensor".to_string(), "1.0.0".to_string())].into(),
            rollout: None,
            at: Utc::now(),
            envelope: "{}".into(),
        };
        let ev = StoredEvent {
            device: "dev-1".into(),
            sequence: 5,
            rollout: None,
            phase: Phase::Committed,
            app: None,
            reason: None,
            logs: None,
            waiting: Some(ferry_protocol::report::Waiting::Lock),
            download: Some(ferry_protocol::report::DownloadStats {
                fetched_bytes: 7,
                ..Default::default()
            }),
            ts: Utc::now(),
        };
        s.commit(&Changes {
            devices: vec![&d],
            sequences: vec![("dev-1", 5)],
            desired: vec![("dev-1", &sent)],
            events: vec![ev.clone()],
            rollout_seq: Some(3),
            ..Default::default()
        })
        .unwrap();
        s.commit(&Changes {
            sequences: vec![("dev-1", 2)],
            ..Default::default()
        })
        .unwrap();
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        let snap = s.load().unwrap();
        assert_eq!(snap.devices["dev-1"], d);
        assert_eq!(snap.sequences["dev-1"], 5);
        assert_eq!(snap.desired["dev-1"], sent);
        assert_eq!(snap.rollout_seq, 3);
        assert_eq!(s.recent_events("dev-1", 10).unwrap(), vec![ev]);
    }

    /// Sequences above `i64::MAX` were stored negative and made the controller refuse to start
    /// (issue 9); they keep their value now, and the counter still never goes back.
    #[test]
    fn sequences_keep_every_u64_value_and_never_go_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        let big = i64::MAX as u64 + 5;
        let seqs = |v: Vec<(&'static str, u64)>| Changes {
            sequences: v,
            ..Default::default()
        };
        s.commit(&seqs(vec![("a", big), ("b", u64::MAX), ("c", 256)]))
            .unwrap();
        // Lower values (255 < 256 is a memcmp question for BLOBs) never win.
        s.commit(&seqs(vec![("a", 7), ("b", 1), ("c", 255)]))
            .unwrap();
        s.commit(&seqs(vec![("c", 65_536)])).unwrap();
        drop(s);
        let snap = Store::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(snap.sequences["a"], big);
        assert_eq!(snap.sequences["b"], u64::MAX);
        assert_eq!(snap.sequences["c"], 65_536);
    }

    /// A database written by an older controller: INTEGER rows, one of them the two's
    /// complement of a value above `i64::MAX`.
    #[test]
    fn sequences_written_as_integers_by_older_versions_load_and_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Connection::open(dir.path().join("ferry.db")).unwrap();
            c.execute_batch(
                "CREATE TABLE sequences (device TEXT PRIMARY KEY, last INTEGER NOT NULL);
                 INSERT INTO sequences VALUES ('old', 41), ('wrapped', -2);",
            )
            .unwrap();
        }
        let mut s = Store::open(dir.path()).unwrap();
        let snap = s.load().unwrap();
        assert_eq!(snap.sequences["old"], 41);
        assert_eq!(snap.sequences["wrapped"], u64::MAX - 1);
        s.commit(&Changes {
            sequences: vec![("old", 42), ("wrapped", u64::MAX)],
            ..Default::default()
        })
        .unwrap();
        let snap = s.load().unwrap();
        assert_eq!(snap.sequences["old"], 42);
        assert_eq!(snap.sequences["wrapped"], u64::MAX);
        // Anything else is reported as corrupt, with the device.
        s.conn
            .execute("INSERT INTO sequences VALUES ('bad', 'x')", [])
            .unwrap();
        let e = s.load().unwrap_err().to_string();
        assert!(e.contains("corrupt sequence record \"bad\""), "{e}");
    }

    #[test]
    fn events_are_pruned_by_age_and_count() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        let mk = |i: i64| StoredEvent {
            device: "d".into(),
            sequence: i as u64,
            rollout: None,
            phase: Phase::Received,
            app: None,
            reason: None,
            logs: None,
            waiting: None,
            download: None,
            ts: chrono::DateTime::from_timestamp(1_000_000 + i, 0).unwrap(),
        };
        s.commit(&Changes {
            events: (0..10).map(mk).collect(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.prune_events(1_000_002, 5).unwrap(), 2 + 3);
        let left: Vec<u64> = s
            .recent_events("d", 100)
            .unwrap()
            .iter()
            .map(|e| e.sequence)
            .collect();
        assert_eq!(left, vec![9, 8, 7, 6, 5]);
    }

    #[test]
    fn corrupt_records_are_reported_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.conn
            .execute("INSERT INTO devices (id, data) VALUES ('x', 'nope')", [])
            .unwrap();
        let e = s.load().unwrap_err().to_string();
        assert!(e.contains("corrupt device record \"x\""), "{e}");
    }

    #[test]
    fn telemetry_is_stored_once_and_downsampled_hourly() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        let h = 3_600_000i64;
        let base = 1_000 * h;
        let r = |ts: i64, v: f64| ("d".to_string(), "temperature_c".to_string(), ts, v);
        let rows = vec![
            r(base, 20.0),
            r(base + 60_000, 22.0),
            r(base + h, 30.0),
            r(base + 2 * h, 40.0),
        ];
        s.commit(&Changes {
            telemetry: rows.clone(),
            ..Default::default()
        })
        .unwrap();
        // the same batch again (re-sent after a lost PUBACK): stored once
        s.commit(&Changes {
            telemetry: rows,
            ..Default::default()
        })
        .unwrap();
        let all = s.telemetry("d", 0, None).unwrap();
        assert_eq!(all["temperature_c"].len(), 4);
        // fold everything before base+2h into hours
        assert_eq!(s.downsample(base + 2 * h, 0).unwrap(), (3, 0));
        let all = s.telemetry("d", 0, Some("temperature_c")).unwrap();
        let pts = &all["temperature_c"];
        assert_eq!(pts.len(), 3);
        assert_eq!(
            (pts[0].ts, pts[0].value, pts[0].min, pts[0].max),
            (base, 21.0, Some(20.0), Some(22.0))
        );
        assert_eq!((pts[1].ts, pts[1].value), (base + h, 30.0));
        assert_eq!(
            (pts[2].ts, pts[2].value, pts[2].min),
            (base + 2 * h, 40.0, None)
        );
        // a late raw sample in an already-folded hour is merged by weight
        s.commit(&Changes {
            telemetry: vec![r(base + 120_000, 24.0)],
            ..Default::default()
        })
        .unwrap();
        s.downsample(base + 2 * h, 0).unwrap();
        let pts = &s.telemetry("d", 0, None).unwrap()["temperature_c"];
        assert_eq!((pts[0].value, pts[0].max), (22.0, Some(24.0)));
        // retention drops old hours
        assert_eq!(s.downsample(base + 2 * h, base + h).unwrap(), (0, 1));
        assert!(s
            .telemetry("d", 0, Some("humidity_pct"))
            .unwrap()
            .is_empty());
    }
}
