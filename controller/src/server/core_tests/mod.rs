//! The core driven directly, on each store (SQLite in a temp dir, a fresh PostgreSQL database), device messages as the agent
//! sends them, notices checked with the protocol's own verification.

use super::*;
use crate::rollout::waves::DeviceStatus;
use ferry_protocol::desired::{verify_notice, Trust};
use ferry_protocol::release::Release;
use ferry_protocol::report::{AppState, DownloadStats, UpdateStatus, Waiting};

const ARM64: &str = "linux/arm64";

struct T {
    dir: tempfile::TempDir,
    /// The PostgreSQL database of this run (None: SQLite in `dir`).
    pg: Option<crate::server::store::testdb::TestDb>,
    core: Core,
    ck: PrivateKey,
    rk: PrivateKey,
}

fn open_store(
    dir: &tempfile::TempDir,
    pg: Option<&crate::server::store::testdb::TestDb>,
) -> Box<dyn Store> {
    match pg {
        None => Box::new(crate::server::store::SqliteStore::open(dir.path()).unwrap()),
        Some(db) => Box::new(crate::server::store::PgStore::connect(&db.url, None).unwrap()),
    }
}

fn params(ck: &PrivateKey, rk: &PrivateKey) -> CoreParams {
    CoreParams {
        key: PrivateKey::from_pem(&ck.to_pem()).unwrap(),
        release_keys: TrustedKeys::new([rk.public().clone()]),
        release_threshold: 1,
        rollout: RolloutSection::default(),
        prefix: "ferry".into(),
        metrics: Arc::new(Metrics::default()),
        enroll_tokens: vec![],
    }
}

fn t(s: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
}

fn release_env(rk: &PrivateKey, version: &str) -> String {
    Release {
        app: "sensor".into(),
        version: version.parse().unwrap(),
        image: "127.0.0.1:5055/ferry/sensor".into(),
        platforms: BTreeMap::from([(ARM64.to_string(), format!("sha256:{}", "a".repeat(64)))]),
        container: Default::default(),
        health: Default::default(),
        created_at: t(0),
    }
    .sign(&[rk])
    .to_json()
}

fn state(dev: &str, version: &str, seq: u64, update: Option<(u64, Phase)>, group: &str) -> Inbound {
    Inbound::State(Box::new(StateReport {
        trust: None,
        device: dev.into(),
        agent_version: "0.1.0".into(),
        platform: ARM64.into(),
        sequence: seq,
        apps: BTreeMap::from([(
            "sensor".to_string(),
            AppState {
                version: version.into(),
                digest: "sha256:00".into(),
                container: "c".into(),
                health: "healthy".into(),
            },
        )]),
        update: update.map(|(sequence, phase)| UpdateStatus {
            waiting: None,
            reason: None,
            sequence,
            rollout: None,
            phase,
            error: None,
            at: t(0),
        }),
        ts: t(0),
        labels: BTreeMap::from([("group".to_string(), group.to_string())]),
    }))
}

fn rollback_req(select: &str) -> crate::api::RollbackRequest {
    crate::api::RollbackRequest {
        select: select.into(),
        app: "sensor".into(),
        force: false,
    }
}

/// A state whose update waits (`state` with `update: Some(..)`).
fn waiting_state(state: Inbound, w: Waiting, reason: &str) -> Inbound {
    let Inbound::State(mut s) = state else {
        unreachable!()
    };
    let u = s.update.as_mut().expect("an update");
    u.waiting = Some(w);
    u.reason = Some(reason.into());
    Inbound::State(s)
}

fn waiting_event(dev: &str, seq: u64, phase: Phase, w: Waiting, reason: &str) -> Inbound {
    let mut e = Event::new(dev, seq, Some("r-1".into()), phase);
    e.waiting = Some(w);
    e.reason = Some(reason.into());
    e.download = Some(DownloadStats {
        fetched_bytes: 3_000_000,
        skipped_blobs: 1,
        retries: 4,
        resumes: 2,
        restarts: 0,
    });
    Inbound::Event(Box::new(e))
}

fn event(dev: &str, seq: u64, phase: Phase, reason: Option<&str>) -> Inbound {
    let mut e = Event::new(dev, seq, Some("r-1".into()), phase);
    e.reason = reason.map(str::to_string);
    Inbound::Event(Box::new(e))
}

impl T {
    /// The same test on each store: SQLite, then a fresh PostgreSQL database.
    fn each() -> impl Iterator<Item = T> {
        [false, true].into_iter().map(T::new)
    }

    fn new(postgres: bool) -> T {
        let dir = tempfile::tempdir().unwrap();
        let pg = postgres.then(crate::server::store::testdb::TestDb::create);
        let ck = PrivateKey::from_seed([1; 32]).unwrap();
        let rk = PrivateKey::from_seed([2; 32]).unwrap();
        let core = Core::new(open_store(&dir, pg.as_ref()), params(&ck, &rk)).unwrap();
        T {
            dir,
            pg,
            core,
            ck,
            rk,
        }
    }

    fn reopen(self) -> T {
        let T {
            dir,
            pg,
            core,
            ck,
            rk,
        } = self;
        drop(core);
        let core = Core::new(open_store(&dir, pg.as_ref()), params(&ck, &rk)).unwrap();
        T {
            dir,
            pg,
            core,
            ck,
            rk,
        }
    }

    fn fleet(&mut self, n: usize, group: &str) {
        for i in 0..n {
            let d = format!("dev-{i}");
            self.core.ingest(
                Inbound::Online {
                    device: d.clone(),
                    online: true,
                },
                t(0),
            );
            self.core.ingest(state(&d, "1.0.0", 1, None, group), t(0));
        }
        self.flush();
    }

    fn flush(&mut self) -> Vec<Outgoing> {
        self.core.flush().unwrap()
    }

    /// Notices in the outbox, verified like a device: (device, sequence, sensor version, allow_downgrade).
    fn notices(&mut self) -> Vec<(String, u64, String, bool)> {
        self.verified()
            .into_iter()
            .map(|(v, _)| {
                (
                    v.desired.device.clone(),
                    v.desired.sequence,
                    v.releases["sensor"].release.version.to_string(),
                    v.desired.allow_downgrade,
                )
            })
            .collect()
    }

    /// Notices in the outbox, verified like a device, with their envelopes.
    fn verified(&mut self) -> Vec<(ferry_protocol::desired::VerifiedNotice, String)> {
        let trust = Trust {
            release: TrustedKeys::new([self.rk.public().clone()]),
            release_threshold: 1,
            controller: TrustedKeys::new([self.ck.public().clone()]),
        };
        self.flush()
            .into_iter()
            .map(|o| {
                let v = verify_notice(o.payload.as_bytes(), &trust).unwrap();
                assert_eq!(
                    o.topic,
                    format!("ferry/v1/devices/{}/desired", v.desired.device)
                );
                (v, o.payload)
            })
            .collect()
    }

    fn push(&mut self, version: &str) {
        let env = release_env(&self.rk, version);
        self.core.push_release(env.as_bytes(), t(0)).unwrap();
    }

    fn start(
        &mut self,
        version: &str,
        waves: &str,
        on_failure: Option<crate::rollout::waves::OnFailure>,
    ) -> RolloutView {
        let req = StartRollout {
            settings: Default::default(),
            app: "sensor".into(),
            version: version.into(),
            select: "group=beta".into(),
            waves: waves.into(),
            soak: "10s".into(),
            max_failures: "0".into(),
            device_timeout: None,
            strategy: None,
            on_failure,
            force: false,
        };
        self.core.start_rollout(&req, t(1)).unwrap()
    }
}

mod fleet_pages;
mod restarts;
mod rollouts;
mod sequences;
mod settings;
mod telemetry;
