//! The PostgreSQL store (`[store] url = "postgres://…"`). One connection, owned by a thread of
//! its own: the core is synchronous and runs on the async runtime's thread, where the blocking
//! `postgres` client must not run its own runtime; each call hands a closure to that thread and
//! waits for its answer, as a SQLite call waits for the disk. A lost connection is opened again
//! at the next call (the failed call's transaction was rolled back by the server).
//!
//! A commit is one transaction of one statement per table, rows passed as arrays (`UNNEST`):
//! its cost does not grow with round trips. The schema version is in `ferry_schema`; migrations
//! run under an advisory lock, so replicas starting together migrate once.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc;

use postgres::{Client, NoTls, Transaction};

use super::{
    decode, json, sequence_from_bytes, Changes, Point, Snapshot, Store, StoreError, SCHEMA_VERSION,
};
use crate::server::model::StoredEvent;

/// Migration N (1-based) takes the schema from version N-1 to N (the same changes as SQLite's).
const MIGRATIONS: &[&str] = &[SCHEMA_V1, SCHEMA_V2];

pub(super) const SCHEMA_V1: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE devices (id TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE device_keys (device TEXT NOT NULL, status TEXT NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (device, status));
CREATE TABLE releases (app TEXT NOT NULL, version TEXT NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (app, version));
CREATE TABLE rollouts (id TEXT PRIMARY KEY, seq BIGINT NOT NULL, data TEXT NOT NULL);
CREATE TABLE sequences (device TEXT PRIMARY KEY, last BYTEA NOT NULL);
CREATE TABLE desired (device TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE events (id BIGSERIAL PRIMARY KEY, device TEXT NOT NULL, ts BIGINT NOT NULL,
    data TEXT NOT NULL);
CREATE INDEX events_by_device ON events (device, id);
CREATE INDEX events_by_ts ON events (ts);
CREATE TABLE telemetry (device TEXT NOT NULL, metric TEXT NOT NULL, ts BIGINT NOT NULL,
    value DOUBLE PRECISION NOT NULL, PRIMARY KEY (device, metric, ts));
CREATE TABLE telemetry_hourly (device TEXT NOT NULL, metric TEXT NOT NULL, hour BIGINT NOT NULL,
    avg DOUBLE PRECISION NOT NULL, min DOUBLE PRECISION NOT NULL, max DOUBLE PRECISION NOT NULL,
    n BIGINT NOT NULL, PRIMARY KEY (device, metric, hour));
";

/// 2: the leader lease of the replicas (one row; `server/lease.rs`).
const SCHEMA_V2: &str = "
CREATE TABLE ferry_leader (id INTEGER PRIMARY KEY CHECK (id = 1), holder TEXT, url TEXT,
    token BIGINT NOT NULL, expires_at TIMESTAMPTZ NOT NULL);
INSERT INTO ferry_leader (id, holder, url, token, expires_at) VALUES (1, NULL, NULL, 0, '-infinity');
";

/// The advisory lock key the migrations hold ("ferry" in ASCII).
const MIGRATION_LOCK: i64 = 0x0066_6572_7279;

type Job = Box<dyn FnOnce(&mut Conn) + Send>;

/// The connection as the database thread holds it.
struct Conn {
    url: String,
    tls: Tls,
    setup: String,
    client: Option<Client>,
}

#[derive(Clone)]
enum Tls {
    Plain,
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl Conn {
    fn client(&mut self) -> Result<&mut Client, postgres::Error> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = None;
            let mut c = match &self.tls {
                Tls::Plain => Client::connect(&self.url, NoTls)?,
                Tls::Rustls(t) => Client::connect(&self.url, t.clone())?,
            };
            if !self.setup.is_empty() {
                c.batch_execute(&self.setup)?;
            }
            self.client = Some(c);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }
}

/// A PostgreSQL connection on a thread of its own; [`PgThread::call`] runs a closure there in a
/// transaction and waits for it. Used by the store and by the leader lease (`server/lease.rs`),
/// each with its own connection.
pub struct PgThread {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    db: String,
}

impl PgThread {
    /// Start the thread for `url` (connecting at the first call). `setup`: SQL run on every new
    /// connection (session settings).
    pub fn start(url: &str, ca: Option<&Path>, setup: &str) -> Result<PgThread, StoreError> {
        let db = super::redact(url);
        let config: postgres::Config = url.parse().map_err(|cause| StoreError::Postgres {
            db: db.clone(),
            cause,
        })?;
        let tls = match config.get_ssl_mode() {
            postgres::config::SslMode::Disable => Tls::Plain,
            _ => Tls::Rustls(rustls_connector(&db, ca)?),
        };
        let (tx, rx) = mpsc::channel::<Job>();
        let mut conn = Conn {
            url: url.to_string(),
            tls,
            setup: setup.to_string(),
            client: None,
        };
        let thread = std::thread::Builder::new()
            .name("ferry-postgres".into())
            .spawn(move || {
                for job in rx {
                    job(&mut conn);
                }
            })
            .map_err(StoreError::Thread)?;
        Ok(PgThread {
            jobs: Some(tx),
            thread: Some(thread),
            db,
        })
    }

    /// The database, for logs (no password).
    pub fn db(&self) -> &str {
        &self.db
    }

    /// Run `f` on the database thread, in a transaction, and wait for it.
    pub fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let db = self.db.clone();
        let (rtx, rrx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |conn: &mut Conn| {
            let pg = |cause| StoreError::Postgres {
                db: db.clone(),
                cause,
            };
            let r = (|| {
                let client = conn.client().map_err(pg)?;
                let mut tx = client.transaction().map_err(pg)?;
                let out = f(&mut tx)?;
                tx.commit().map_err(pg)?;
                Ok(out)
            })();
            let _ = rtx.send(r);
        });
        self.jobs
            .as_ref()
            .expect("open until dropped")
            .send(job)
            .expect("the database thread runs until it is dropped");
        rrx.recv()
            .expect("the database thread answers every call")
            .map_err(|e| with_db(e, &self.db))
    }
}

impl Drop for PgThread {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Who may write: the leader lease's holder and token (`server/lease.rs`). Every commit checks
/// it inside its transaction, holding the lease row (`FOR SHARE`) until it commits: a replica
/// whose lease was taken over writes nothing, and a take-over waits for a commit under way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub holder: String,
    pub token: i64,
}

pub struct PgStore {
    conn: PgThread,
    fence: Option<Fence>,
}

impl PgStore {
    /// Connect to `url` and bring its schema to [`SCHEMA_VERSION`]. `ca`: PEM roots for TLS
    /// (`sslmode=require` or `prefer`; default: the system's roots).
    pub fn connect(url: &str, ca: Option<&Path>) -> Result<PgStore, StoreError> {
        // A transaction left open by a client that went away must not hold its locks (the
        // lease row among them) for long.
        let conn = PgThread::start(
            url,
            ca,
            "SET idle_in_transaction_session_timeout = '5s'; SET application_name = 'ferryctl-store'",
        )?;
        conn.call(migrate)?;
        Ok(PgStore { conn, fence: None })
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        self.conn.call(|tx| {
            let v: Option<i32> = tx
                .query_one("SELECT max(version) FROM ferry_schema", &[])
                .map_err(pg_err)?
                .get(0);
            Ok(v.unwrap_or(0) as u32)
        })
    }

    fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.conn.call(f)
    }
}

/// Errors made on the database thread carry no database name; [`PgStore::call`] adds it.
fn pg_err(cause: postgres::Error) -> StoreError {
    StoreError::Postgres {
        db: String::new(),
        cause,
    }
}

fn with_db(e: StoreError, db: &str) -> StoreError {
    match e {
        StoreError::Postgres { db: d, cause } if d.is_empty() => StoreError::Postgres {
            db: db.to_string(),
            cause,
        },
        StoreError::Corrupt {
            path,
            what,
            key,
            detail,
        } if path.is_empty() => StoreError::Corrupt {
            path: db.to_string(),
            what,
            key,
            detail,
        },
        StoreError::SchemaTooNew {
            db: d,
            found,
            supported,
        } if d.is_empty() => StoreError::SchemaTooNew {
            db: db.to_string(),
            found,
            supported,
        },
        StoreError::Fenced {
            db: d,
            holder,
            token,
        } if d.is_empty() => StoreError::Fenced {
            db: db.to_string(),
            holder,
            token,
        },
        other => other,
    }
}

fn rustls_connector(
    db: &str,
    ca: Option<&Path>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    let tls_err = |detail: String| StoreError::Tls {
        db: db.to_string(),
        detail,
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| tls_err(format!("cannot read the CA file {}: {e}", path.display())))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| tls_err(format!("CA file {}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| tls_err(format!("CA file {}: {e}", path.display())))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Bring the schema to [`SCHEMA_VERSION`] under the migration lock; refuse a newer one.
fn migrate(tx: &mut Transaction<'_>) -> Result<(), StoreError> {
    debug_assert_eq!(MIGRATIONS.len(), SCHEMA_VERSION as usize);
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(pg_err)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS ferry_schema (version INTEGER NOT NULL)")
        .map_err(pg_err)?;
    let found: Option<i32> = tx
        .query_one("SELECT max(version) FROM ferry_schema", &[])
        .map_err(pg_err)?
        .get(0);
    let found = found.unwrap_or(0).max(0) as u32;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            db: String::new(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.batch_execute(m).map_err(pg_err)?;
        let v = i as i32 + 1;
        tx.execute("INSERT INTO ferry_schema (version) VALUES ($1)", &[&v])
            .map_err(pg_err)?;
        tracing::info!(version = v, "database schema migrated (PostgreSQL)");
    }
    Ok(())
}

fn rows(tx: &mut Transaction<'_>, sql: &str) -> Result<Vec<(String, String)>, StoreError> {
    Ok(tx
        .query(sql, &[])
        .map_err(pg_err)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// [`Changes`] as owned columns, ready for `UNNEST`; later entries for one key win (the
/// highest, for a sequence), as in SQLite's one-row-at-a-time writes.
#[derive(Default)]
struct Batch {
    devices: (Vec<String>, Vec<String>),
    releases: (Vec<String>, Vec<String>, Vec<String>),
    rollouts: (Vec<String>, Vec<i64>, Vec<String>),
    sequences: (Vec<String>, Vec<Vec<u8>>),
    desired: (Vec<String>, Vec<String>),
    events: (Vec<String>, Vec<i64>, Vec<String>),
    telemetry: (Vec<String>, Vec<String>, Vec<i64>, Vec<f64>),
    keys_put: (Vec<String>, Vec<String>, Vec<String>),
    keys_delete: (Vec<String>, Vec<String>),
    rollout_seq: Option<String>,
}

impl Batch {
    fn of(c: &Changes<'_>) -> Batch {
        let mut b = Batch::default();
        let devices: BTreeMap<&str, String> =
            c.devices.iter().map(|d| (d.id.as_str(), json(d))).collect();
        for (id, data) in devices {
            b.devices.0.push(id.to_string());
            b.devices.1.push(data);
        }
        let releases: BTreeMap<(&str, &str), String> = c
            .releases
            .iter()
            .map(|r| ((r.app.as_str(), r.version.as_str()), json(r)))
            .collect();
        for ((app, version), data) in releases {
            b.releases.0.push(app.to_string());
            b.releases.1.push(version.to_string());
            b.releases.2.push(data);
        }
        let rollouts: BTreeMap<&str, (i64, String)> = c
            .rollouts
            .iter()
            .map(|(r, seq)| (r.id.as_str(), (*seq as i64, json(r))))
            .collect();
        for (id, (seq, data)) in rollouts {
            b.rollouts.0.push(id.to_string());
            b.rollouts.1.push(seq);
            b.rollouts.2.push(data);
        }
        let mut seqs: BTreeMap<&str, u64> = BTreeMap::new();
        for (d, n) in &c.sequences {
            let e = seqs.entry(d).or_insert(*n);
            *e = (*e).max(*n);
        }
        for (d, n) in seqs {
            b.sequences.0.push(d.to_string());
            b.sequences.1.push(n.to_be_bytes().to_vec());
        }
        let desired: BTreeMap<&str, String> =
            c.desired.iter().map(|(d, s)| (*d, json(s))).collect();
        for (d, data) in desired {
            b.desired.0.push(d.to_string());
            b.desired.1.push(data);
        }
        for e in &c.events {
            b.events.0.push(e.device.clone());
            b.events.1.push(e.ts.timestamp());
            b.events.2.push(json(e));
        }
        for (d, m, ts, v) in &c.telemetry {
            b.telemetry.0.push(d.clone());
            b.telemetry.1.push(m.clone());
            b.telemetry.2.push(*ts);
            b.telemetry.3.push(*v);
        }
        let keys: BTreeMap<(&str, &str), String> = c
            .keys
            .put
            .iter()
            .map(|k| ((k.device.as_str(), k.status.as_str()), json(k)))
            .collect();
        for ((d, st), data) in keys {
            b.keys_put.0.push(d.to_string());
            b.keys_put.1.push(st.to_string());
            b.keys_put.2.push(data);
        }
        for (d, st) in &c.keys.delete {
            b.keys_delete.0.push(d.clone());
            b.keys_delete.1.push(st.as_str().to_string());
        }
        b.rollout_seq = c.rollout_seq.map(|n| n.to_string());
        b
    }

    fn write(&self, tx: &mut Transaction<'_>) -> Result<(), postgres::Error> {
        if !self.devices.0.is_empty() {
            tx.execute(
                "INSERT INTO devices (id, data) SELECT * FROM UNNEST($1::text[], $2::text[]) \
                 ON CONFLICT (id) DO UPDATE SET data = excluded.data",
                &[&self.devices.0, &self.devices.1],
            )?;
        }
        if !self.releases.0.is_empty() {
            tx.execute(
                "INSERT INTO releases (app, version, data) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[]) \
                 ON CONFLICT (app, version) DO UPDATE SET data = excluded.data",
                &[&self.releases.0, &self.releases.1, &self.releases.2],
            )?;
        }
        if !self.rollouts.0.is_empty() {
            tx.execute(
                "INSERT INTO rollouts (id, seq, data) \
                 SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[]) \
                 ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, data = excluded.data",
                &[&self.rollouts.0, &self.rollouts.1, &self.rollouts.2],
            )?;
        }
        if !self.sequences.0.is_empty() {
            // A counter never goes backwards (bytea compares bytewise: big-endian orders).
            tx.execute(
                "INSERT INTO sequences (device, last) SELECT * FROM UNNEST($1::text[], $2::bytea[]) \
                 ON CONFLICT (device) DO UPDATE SET last = GREATEST(sequences.last, excluded.last)",
                &[&self.sequences.0, &self.sequences.1],
            )?;
        }
        if !self.desired.0.is_empty() {
            tx.execute(
                "INSERT INTO desired (device, data) SELECT * FROM UNNEST($1::text[], $2::text[]) \
                 ON CONFLICT (device) DO UPDATE SET data = excluded.data",
                &[&self.desired.0, &self.desired.1],
            )?;
        }
        if !self.events.0.is_empty() {
            // Ids in the order given: a device's events read back newest first.
            tx.execute(
                "INSERT INTO events (device, ts, data) SELECT d, t, x FROM \
                 UNNEST($1::text[], $2::bigint[], $3::text[]) WITH ORDINALITY AS u(d, t, x, o) \
                 ORDER BY o",
                &[&self.events.0, &self.events.1, &self.events.2],
            )?;
        }
        if !self.telemetry.0.is_empty() {
            // A batch re-sent after a lost PUBACK carries the same timestamps: stored once.
            tx.execute(
                "INSERT INTO telemetry (device, metric, ts, value) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::float8[]) \
                 ON CONFLICT DO NOTHING",
                &[
                    &self.telemetry.0,
                    &self.telemetry.1,
                    &self.telemetry.2,
                    &self.telemetry.3,
                ],
            )?;
        }
        if !self.keys_put.0.is_empty() {
            tx.execute(
                "INSERT INTO device_keys (device, status, data) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[]) \
                 ON CONFLICT (device, status) DO UPDATE SET data = excluded.data",
                &[&self.keys_put.0, &self.keys_put.1, &self.keys_put.2],
            )?;
        }
        if !self.keys_delete.0.is_empty() {
            tx.execute(
                "DELETE FROM device_keys WHERE (device, status) IN \
                 (SELECT * FROM UNNEST($1::text[], $2::text[]))",
                &[&self.keys_delete.0, &self.keys_delete.1],
            )?;
        }
        if let Some(n) = &self.rollout_seq {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('rollout_seq', $1) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[n],
            )?;
        }
        Ok(())
    }
}

impl Store for PgStore {
    fn describe(&self) -> String {
        self.conn.db().to_string()
    }

    fn set_fence(&mut self, fence: Option<Fence>) {
        self.fence = fence;
    }

    fn load(&self) -> Result<Snapshot, StoreError> {
        self.call(|tx| {
            let mut s = Snapshot::default();
            for (id, data) in rows(tx, "SELECT id, data FROM devices")? {
                s.devices
                    .insert(id.clone(), decode("", "device", &id, &data)?);
            }
            for (key, data) in rows(tx, "SELECT app || ' ' || version, data FROM releases")? {
                let r: crate::server::model::ReleaseEntry = decode("", "release", &key, &data)?;
                s.releases.insert((r.app.clone(), r.version.clone()), r);
            }
            for (id, data) in rows(tx, "SELECT id, data FROM rollouts ORDER BY seq")? {
                s.rollouts
                    .insert(id.clone(), decode("", "rollout", &id, &data)?);
            }
            for r in tx
                .query("SELECT device, last FROM sequences", &[])
                .map_err(pg_err)?
            {
                let device: String = r.get(0);
                let raw: Vec<u8> = r.get(1);
                let last = sequence_from_bytes(&raw).ok_or_else(|| StoreError::Corrupt {
                    path: String::new(),
                    what: "sequence",
                    key: device.clone(),
                    detail: format!("{raw:?}"),
                })?;
                s.sequences.insert(device, last);
            }
            for (id, data) in rows(tx, "SELECT device || ' ' || status, data FROM device_keys")? {
                s.device_keys.push(decode("", "device key", &id, &data)?);
            }
            for (id, data) in rows(
                tx,
                "SELECT device, (data::jsonb - 'envelope')::text FROM desired",
            )? {
                s.desired
                    .insert(id.clone(), decode("", "desired", &id, &data)?);
            }
            s.rollout_seq = tx
                .query_opt("SELECT value FROM meta WHERE key = 'rollout_seq'", &[])
                .map_err(pg_err)?
                .and_then(|r| r.get::<_, String>(0).parse().ok())
                .unwrap_or(0);
            Ok(s)
        })
    }

    fn notices(&self, devices: &[String]) -> Result<BTreeMap<String, String>, StoreError> {
        let devices = devices.to_vec();
        self.call(move |tx| {
            let mut out = BTreeMap::new();
            for r in tx
                .query(
                    "SELECT device, data::jsonb ->> 'envelope' FROM desired WHERE device = ANY($1)",
                    &[&devices],
                )
                .map_err(pg_err)?
            {
                if let Some(envelope) = r.get::<_, Option<String>>(1) {
                    out.insert(r.get(0), envelope);
                }
            }
            Ok(out)
        })
    }

    fn commit(&mut self, c: &Changes<'_>) -> Result<(), StoreError> {
        if c.is_empty() {
            return Ok(());
        }
        let batch = Batch::of(c);
        let fence = self.fence.clone();
        self.call(move |tx| {
            if let Some(f) = &fence {
                let held = tx
                    .query_opt(
                        "SELECT 1 FROM ferry_leader WHERE id = 1 AND holder = $1 AND token = $2 \
                         AND expires_at > clock_timestamp() FOR SHARE",
                        &[&f.holder, &f.token],
                    )
                    .map_err(pg_err)?;
                if held.is_none() {
                    return Err(StoreError::Fenced {
                        db: String::new(),
                        holder: f.holder.clone(),
                        token: f.token,
                    });
                }
            }
            batch.write(tx).map_err(pg_err)
        })
    }

    fn recent_events(&self, device: &str, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let device = device.to_string();
        self.call(move |tx| {
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            tx.query(
                "SELECT data FROM events WHERE device = $1 ORDER BY id DESC LIMIT $2",
                &[&device, &limit],
            )
            .map_err(pg_err)?
            .iter()
            .map(|r| decode("", "event", &device, r.get::<_, &str>(0)))
            .collect()
        })
    }

    fn prune_events(&mut self, before: i64, keep: usize) -> Result<usize, StoreError> {
        self.call(move |tx| {
            let keep = i64::try_from(keep).unwrap_or(i64::MAX);
            let mut n = tx
                .execute("DELETE FROM events WHERE ts < $1", &[&before])
                .map_err(pg_err)?;
            n += tx
                .execute(
                    "DELETE FROM events WHERE id IN (SELECT id FROM (SELECT id, ROW_NUMBER() OVER \
                     (PARTITION BY device ORDER BY id DESC) AS rn FROM events) AS ranked \
                     WHERE rn > $1)",
                    &[&keep],
                )
                .map_err(pg_err)?;
            Ok(n as usize)
        })
    }

    fn telemetry(
        &self,
        device: &str,
        since_ms: i64,
        metric: Option<&str>,
    ) -> Result<BTreeMap<String, Vec<Point>>, StoreError> {
        let device = device.to_string();
        let metric = metric.map(str::to_string);
        self.call(move |tx| {
            let mut out: BTreeMap<String, Vec<Point>> = BTreeMap::new();
            for r in tx
                .query(
                    "SELECT metric, hour * 1000, avg, min, max FROM telemetry_hourly \
                     WHERE device = $1 AND hour * 1000 >= $2::bigint - 3600000 \
                     AND ($3::text IS NULL OR metric = $3) ORDER BY metric, hour",
                    &[&device, &since_ms, &metric],
                )
                .map_err(pg_err)?
            {
                out.entry(r.get(0)).or_default().push(Point {
                    ts: r.get(1),
                    value: r.get(2),
                    min: Some(r.get(3)),
                    max: Some(r.get(4)),
                });
            }
            for r in tx
                .query(
                    "SELECT metric, ts, value FROM telemetry WHERE device = $1 AND ts >= $2 \
                     AND ($3::text IS NULL OR metric = $3) ORDER BY metric, ts",
                    &[&device, &since_ms, &metric],
                )
                .map_err(pg_err)?
            {
                out.entry(r.get(0)).or_default().push(Point {
                    ts: r.get(1),
                    value: r.get(2),
                    min: None,
                    max: None,
                });
            }
            Ok(out)
        })
    }

    fn downsample(
        &mut self,
        raw_before_ms: i64,
        keep_before_ms: i64,
    ) -> Result<(usize, usize), StoreError> {
        self.call(move |tx| {
            // Fold into existing hours by weighted average.
            tx.execute(
                "INSERT INTO telemetry_hourly AS h (device, metric, hour, avg, min, max, n) \
                 SELECT device, metric, (ts / 3600000) * 3600, avg(value), min(value), max(value), \
                 count(*) FROM telemetry WHERE ts < $1 GROUP BY device, metric, ts / 3600000 \
                 ON CONFLICT (device, metric, hour) DO UPDATE SET \
                 avg = (h.avg * h.n + excluded.avg * excluded.n) / (h.n + excluded.n), \
                 min = LEAST(h.min, excluded.min), max = GREATEST(h.max, excluded.max), \
                 n = h.n + excluded.n",
                &[&raw_before_ms],
            )
            .map_err(pg_err)?;
            let folded = tx
                .execute("DELETE FROM telemetry WHERE ts < $1", &[&raw_before_ms])
                .map_err(pg_err)?;
            let dropped = tx
                .execute(
                    "DELETE FROM telemetry_hourly WHERE hour * 1000 < $1",
                    &[&keep_before_ms],
                )
                .map_err(pg_err)?;
            Ok((folded as usize, dropped as usize))
        })
    }
}
