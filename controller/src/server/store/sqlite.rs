//! The SQLite store: `ferry.db` in the data directory (bundled SQLite), WAL journal,
//! `synchronous = FULL` so a committed transaction survives a crash or power loss. The schema
//! version is SQLite's `user_version`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

use super::{
    decode, json, sequence_from_bytes, Changes, Point, Snapshot, Store, StoreError, SCHEMA_VERSION,
};
use crate::server::model::{ReleaseEntry, StoredEvent};

/// Migration N (1-based) takes the schema from version N-1 to N. The first is the baseline:
/// `IF NOT EXISTS` everywhere, so a database of a controller from before versioning (version 0,
/// the same tables) is adopted as it is.
const MIGRATIONS: &[&str] = &[SCHEMA_V1, SCHEMA_V2];

/// 2: the leader lease of PostgreSQL's replicas; nothing for SQLite (one server).
const SCHEMA_V2: &str = "SELECT 1;";

const SCHEMA_V1: &str = "
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

pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
}

impl SqliteStore {
    /// Open (creating) `DIR/ferry.db`.
    pub fn open(dir: &Path) -> Result<SqliteStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|cause| StoreError::Dir {
            path: dir.display().to_string(),
            cause,
        })?;
        SqliteStore::open_file(&dir.join("ferry.db"))
    }

    /// Open (creating) the database file `path`, and bring its schema to [`SCHEMA_VERSION`].
    pub fn open_file(path: &Path) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|cause| StoreError::Dir {
                path: dir.display().to_string(),
                cause,
            })?;
        }
        let conn = Connection::open(path).map_err(|cause| StoreError::Sqlite {
            path: path.display().to_string(),
            cause,
        })?;
        let mut s = SqliteStore {
            conn,
            path: path.to_path_buf(),
        };
        s.conn
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| s.err(e))?;
        s.conn
            .pragma_update(None, "synchronous", "FULL")
            .map_err(|e| s.err(e))?;
        s.conn
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|e| s.err(e))?;
        s.migrate()?;
        Ok(s)
    }

    /// The schema version the database is at (`user_version`).
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
            .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
            .map_err(|e| self.err(e))
    }

    /// Apply the migrations the database lacks, each in its own transaction with its version;
    /// refuse a database from a newer controller (it is not touched).
    fn migrate(&mut self) -> Result<(), StoreError> {
        debug_assert_eq!(MIGRATIONS.len(), SCHEMA_VERSION as usize);
        let path = self.path.display().to_string();
        let err = |cause| StoreError::Sqlite {
            path: path.clone(),
            cause,
        };
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        let found = tx
            .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
            .map_err(err)?;
        let found = u32::try_from(found).unwrap_or(u32::MAX);
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                db: path.clone(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            tx.execute_batch(m).map_err(err)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)
                .map_err(err)?;
            tracing::info!(db = %path, version = i + 1, "database schema migrated");
        }
        tx.commit().map_err(err)
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

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        what: &'static str,
        key: &str,
        data: &str,
    ) -> Result<T, StoreError> {
        decode(&self.path.display().to_string(), what, key, data)
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
                ValueRef::Blob(b) => sequence_from_bytes(b),
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
}

impl Store for SqliteStore {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn load(&self) -> Result<Snapshot, StoreError> {
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
        for (id, data) in
            self.rows("SELECT device, json_remove(data, '$.envelope') FROM desired")?
        {
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

    fn notices(&self, devices: &[String]) -> Result<BTreeMap<String, String>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT json_extract(data, '$.envelope') FROM desired WHERE device = ?1",
            )
            .map_err(|e| self.err(e))?;
        let mut out = BTreeMap::new();
        for d in devices {
            let envelope = st
                .query_row(params![d], |r| r.get::<_, Option<String>>(0))
                .optional()
                .map_err(|e| self.err(e))?
                .flatten();
            if let Some(envelope) = envelope {
                out.insert(d.clone(), envelope);
            }
        }
        Ok(out)
    }

    /// Write all changes in one transaction (durable when this returns).
    fn commit(&mut self, c: &Changes<'_>) -> Result<(), StoreError> {
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
    fn recent_events(&self, device: &str, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
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
    fn prune_events(&mut self, before: i64, keep: usize) -> Result<usize, StoreError> {
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
    /// A device's telemetry since `since_ms` (unix ms), per metric, oldest first: hourly
    /// averages (with min/max) for downsampled periods, then raw samples.
    fn telemetry(
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
    fn downsample(
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The database of a controller from before schema versions (user_version 0, the same
    /// tables, with records): adopted as version 1, nothing lost.
    #[test]
    fn a_database_from_before_schema_versions_is_adopted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Connection::open(dir.path().join("ferry.db")).unwrap();
            c.execute_batch(SCHEMA_V1).unwrap();
            let d = crate::server::model::Device::new("old-1");
            c.execute(
                "INSERT INTO devices (id, data) VALUES ('old-1', ?1)",
                params![json(&d)],
            )
            .unwrap();
        }
        let s = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        assert!(s.load().unwrap().devices.contains_key("old-1"));
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
        let mut s = SqliteStore::open(dir.path()).unwrap();
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
    fn corrupt_records_are_reported_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path()).unwrap();
        s.conn
            .execute("INSERT INTO devices (id, data) VALUES ('x', 'nope')", [])
            .unwrap();
        let e = s.load().unwrap_err().to_string();
        assert!(e.contains("corrupt device record \"x\""), "{e}");
    }
}
