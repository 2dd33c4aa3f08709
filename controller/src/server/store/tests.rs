//! The store's contract, on both backends: every test runs against SQLite (a temp dir) and a
//! fresh PostgreSQL database (`testdb`).

use chrono::Utc;
use ferry_protocol::report::Phase;

use super::testdb::TestDb;
use super::*;
use crate::server::model::{Device, SentDesired, StoredEvent};

/// One backend's database, opened as often as a test likes.
enum Db {
    Sqlite(tempfile::TempDir),
    Postgres(TestDb),
}

impl Db {
    fn each() -> [Db; 2] {
        [
            Db::Sqlite(tempfile::tempdir().unwrap()),
            Db::Postgres(TestDb::create()),
        ]
    }

    fn name(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    fn try_open(&self) -> Result<Box<dyn Store>, StoreError> {
        match self {
            Db::Sqlite(d) => Ok(Box::new(SqliteStore::open(d.path())?)),
            Db::Postgres(t) => Ok(Box::new(PgStore::connect(&t.url, None)?)),
        }
    }

    fn open(&self) -> Box<dyn Store> {
        self.try_open()
            .unwrap_or_else(|e| panic!("{}: {e}", self.name()))
    }

    /// Set the stored schema version by hand (as a newer controller would have left it).
    fn set_schema_version(&self, v: u32) {
        match self {
            Db::Sqlite(d) => rusqlite::Connection::open(d.path().join("ferry.db"))
                .unwrap()
                .pragma_update(None, "user_version", v)
                .unwrap(),
            Db::Postgres(t) => t.execute(&format!("INSERT INTO ferry_schema VALUES ({v})")),
        }
    }
}

macro_rules! on_each_store {
    ($($name:ident),* $(,)?) => {
        mod each {
            $(
                #[test]
                fn $name() {
                    for db in super::Db::each() {
                        eprintln!("store: {}", db.name());
                        super::$name(&db);
                    }
                }
            )*
        }
    };
}

on_each_store!(
    round_trip_and_sequences_never_go_back,
    sequences_keep_every_u64_value_and_never_go_back,
    events_are_pruned_by_age_and_count,
    telemetry_is_stored_once_and_downsampled_hourly,
    migrations_bring_an_empty_database_to_the_schema_version,
    a_newer_schema_is_refused_and_left_untouched,
    one_commit_with_a_key_twice_keeps_the_last_and_the_highest_sequence,
);

fn round_trip_and_sequences_never_go_back(db: &Db) {
    let mut s = db.open();
    let mut d = Device::new("dev-1");
    d.labels.insert("group".into(), "beta".into());
    let sent = SentDesired {
        settings: Default::default(),
        sequence: 5,
        apps: [("sensor".to_string(), "1.0.0".to_string())].into(),
        rollout: None,
        at: Utc::now(),
        // Read back byte for byte: quotes, a backslash, non-ASCII, a newline.
        envelope: "{\"payload\": \"eyJ9\", \"k\": \"a\\\\b é\"}\n".into(),
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
    let s = db.open();
    let snap = s.load().unwrap();
    assert_eq!(snap.devices["dev-1"], d);
    assert_eq!(snap.sequences["dev-1"], 5);
    // The notice comes back without its envelope, which is read on its own.
    assert_eq!(
        snap.desired["dev-1"],
        SentDesired {
            envelope: String::new(),
            ..sent.clone()
        }
    );
    assert_eq!(
        s.notices(&["dev-1".into(), "dev-2".into()]).unwrap(),
        [("dev-1".to_string(), sent.envelope.clone())].into()
    );
    assert_eq!(snap.rollout_seq, 3);
    assert_eq!(s.recent_events("dev-1", 10).unwrap(), vec![ev]);
}

/// Sequences above `i64::MAX` were stored negative and made the controller refuse to start
/// (issue 9); they keep their value now, and the counter still never goes back.
fn sequences_keep_every_u64_value_and_never_go_back(db: &Db) {
    let mut s = db.open();
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
    let snap = db.open().load().unwrap();
    assert_eq!(snap.sequences["a"], big);
    assert_eq!(snap.sequences["b"], u64::MAX);
    assert_eq!(snap.sequences["c"], 65_536);
}

fn events_are_pruned_by_age_and_count(db: &Db) {
    let mut s = db.open();
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

fn telemetry_is_stored_once_and_downsampled_hourly(db: &Db) {
    let mut s = db.open();
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

fn migrations_bring_an_empty_database_to_the_schema_version(db: &Db) {
    let s = db.open();
    drop(s);
    // Opening again is a no-op (nothing to migrate), whatever was written.
    let mut s = db.open();
    let d = Device::new("dev-1");
    s.commit(&Changes {
        devices: vec![&d],
        ..Default::default()
    })
    .unwrap();
    drop(s);
    assert_eq!(db.open().load().unwrap().devices["dev-1"], d);
    let v = match db {
        Db::Sqlite(d) => SqliteStore::open(d.path()).unwrap().schema_version(),
        Db::Postgres(t) => PgStore::connect(&t.url, None).unwrap().schema_version(),
    };
    assert_eq!(v.unwrap(), SCHEMA_VERSION);
}

/// A database a newer controller migrated: this one refuses it (exit 78 in `ferryctl serve`)
/// and writes nothing.
fn a_newer_schema_is_refused_and_left_untouched(db: &Db) {
    let mut s = db.open();
    let d = Device::new("dev-1");
    s.commit(&Changes {
        devices: vec![&d],
        ..Default::default()
    })
    .unwrap();
    drop(s);
    db.set_schema_version(SCHEMA_VERSION + 1);
    let e = db.try_open().err().expect("refused");
    assert!(e.is_config(), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("schema version {}", SCHEMA_VERSION + 1)) && msg.contains("newer"),
        "{msg}"
    );
    db.set_schema_version(SCHEMA_VERSION);
    match db {
        // SQLite's user_version is one number: set back, the data is there.
        Db::Sqlite(_) => assert_eq!(db.open().load().unwrap().devices["dev-1"], d),
        // PostgreSQL keeps the highest version row: still refused, nothing written.
        Db::Postgres(_) => assert!(db.try_open().is_err()),
    }
}

fn one_commit_with_a_key_twice_keeps_the_last_and_the_highest_sequence(db: &Db) {
    let mut s = db.open();
    let a = Device::new("dev-1");
    let mut b = Device::new("dev-1");
    b.labels.insert("site".into(), "b".into());
    let ev = |seq: u64| StoredEvent {
        device: "dev-1".into(),
        sequence: seq,
        rollout: None,
        phase: Phase::Received,
        app: None,
        reason: None,
        logs: None,
        waiting: None,
        download: None,
        ts: Utc::now(),
    };
    s.commit(&Changes {
        devices: vec![&a, &b],
        sequences: vec![("dev-1", 9), ("dev-1", 4)],
        events: (1..=5).map(ev).collect(),
        telemetry: vec![
            ("dev-1".into(), "cpu_pct".into(), 1_000, 1.0),
            ("dev-1".into(), "cpu_pct".into(), 1_000, 1.0),
        ],
        ..Default::default()
    })
    .unwrap();
    let snap = s.load().unwrap();
    assert_eq!(snap.devices["dev-1"], b);
    assert_eq!(snap.sequences["dev-1"], 9);
    // Newest first, in the order they were given.
    let seqs: Vec<u64> = s
        .recent_events("dev-1", 10)
        .unwrap()
        .iter()
        .map(|e| e.sequence)
        .collect();
    assert_eq!(seqs, vec![5, 4, 3, 2, 1]);
    assert_eq!(s.telemetry("dev-1", 0, None).unwrap()["cpu_pct"].len(), 1);
}

/// A PostgreSQL database a controller of schema 1 wrote (before the leader lease): migrated to
/// the current schema, its records kept.
#[test]
fn postgres_migrates_a_database_of_the_previous_schema() {
    let db = TestDb::create();
    let d = Device::new("old-1");
    db.execute(&format!(
        "CREATE TABLE ferry_schema (version INTEGER NOT NULL); {} \
         INSERT INTO ferry_schema VALUES (1); INSERT INTO devices VALUES ('old-1', '{}');",
        super::postgres::SCHEMA_V1,
        json(&d)
    ));
    let s = PgStore::connect(&db.url, None).unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(s.load().unwrap().devices["old-1"], d);
}

#[test]
fn store_urls_parse_and_a_password_file_goes_into_the_url_encoded() {
    let base = Path::new("/etc/ferry");
    assert_eq!(
        StoreUrl::parse("sqlite:ferry.db", base).unwrap(),
        StoreUrl::Sqlite(PathBuf::from("/etc/ferry/ferry.db"))
    );
    assert!(StoreUrl::parse("mysql://x@y/z", base).is_err());
    let pg = StoreUrl::parse(
        "postgres://ferry@db.example:5432/fleet?sslmode=require",
        base,
    )
    .unwrap();
    let with = pg.with_password("p@ss:w/rd %1").unwrap();
    assert_eq!(
        with,
        StoreUrl::Postgres(
            "postgres://ferry:p%40ss%3Aw%2Frd%20%251@db.example:5432/fleet?sslmode=require".into()
        )
    );
    let StoreUrl::Postgres(u) = &with else {
        unreachable!()
    };
    let parsed: ::postgres::Config = u.parse().unwrap();
    assert_eq!(parsed.get_password(), Some(&b"p@ss:w/rd %1"[..]));
    assert_eq!(parsed.get_user(), Some("ferry"));
    assert!(!with.describe().contains("p%40ss"), "{}", with.describe());
    // No user, a password already, or SQLite: refused, and the message hides the secret.
    let e = StoreUrl::parse("postgres://db.example/fleet", base)
        .unwrap()
        .with_password("x")
        .unwrap_err();
    assert!(e.contains("needs a user"), "{e}");
    let e = StoreUrl::parse("postgres://ferry:old@db.example/fleet", base)
        .unwrap()
        .with_password("x")
        .unwrap_err();
    assert!(
        e.contains("has a password already") && !e.contains("old"),
        "{e}"
    );
    assert!(StoreUrl::Sqlite(PathBuf::from("/x"))
        .with_password("x")
        .is_err());
}
