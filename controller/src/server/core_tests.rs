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

#[test]
fn a_rollout_goes_wave_by_wave_and_survives_a_restart() {
    for mut x in T::each() {
        x.fleet(4, "beta");
        x.push("1.0.0");
        x.push("2.0.0");
        let v = x.start("2.0.0", "2,100%", None);
        assert_eq!((v.id.as_str(), v.targets.clone()), ("r-1", vec![2, 4]));
        // wave 1: two devices, sequence = reported 1 + 1
        let n = x.notices();
        assert_eq!(
            n,
            vec![
                ("dev-0".into(), 2, "2.0.0".into(), false),
                ("dev-1".into(), 2, "2.0.0".into(), false)
            ]
        );
        // the controller "crashes" here and comes back: nothing is sent twice, nothing skipped.
        // (Device records are written lazily; on subscribing again the broker re-delivers every
        // device's retained `online` and `state`, which is what rebuilds them.)
        let mut x = x.reopen();
        for i in 0..4 {
            let d = format!("dev-{i}");
            x.core.ingest(
                Inbound::Online {
                    device: d.clone(),
                    online: true,
                },
                t(2),
            );
            x.core.ingest(state(&d, "1.0.0", 1, None, "beta"), t(2));
        }
        x.core.advance(true, t(2));
        assert!(x.notices().is_empty(), "no device is notified twice");
        for d in ["dev-0", "dev-1"] {
            x.core.ingest(event(d, 2, Phase::Committed, None), t(3));
            x.core.ingest(
                state(d, "2.0.0", 2, Some((2, Phase::Committed)), "beta"),
                t(3),
            );
        }
        x.core.advance(false, t(3));
        assert!(x.notices().is_empty(), "soaking");
        x.core.advance(true, t(14));
        let n = x.notices();
        assert_eq!(
            n.iter().map(|n| n.0.as_str()).collect::<Vec<_>>(),
            ["dev-2", "dev-3"]
        );
        for d in ["dev-2", "dev-3"] {
            x.core.ingest(event(d, 2, Phase::Committed, None), t(15));
        }
        x.core.advance(true, t(30));
        x.flush();
        let v = x.core.rollout("r-1", true).unwrap();
        assert_eq!((v.state.as_str(), v.summary.succeeded), ("completed", 4));
        assert_eq!(v.devices.as_ref().map(|d| d.len()), Some(4));
        let lean = x.core.rollout("r-1", false).unwrap();
        assert!(lean.devices.is_none(), "devices=false leaves the list out");
        assert_eq!(lean.summary, v.summary);
        // the device record knows what it ran before
        x.core
            .ingest(state("dev-0", "2.0.0", 2, None, "beta"), t(31));
        assert_eq!(
            x.core.device("dev-0").unwrap().device.previous["sensor"],
            "1.0.0"
        );
        // and a (graceful: device records are written lazily, the stop writes them) restart keeps
        // the completed rollout, the sequences and what each device ran before
        x.core.flush_all().unwrap();
        let mut x = x.reopen();
        assert_eq!(x.core.rollouts()[0].state, "completed");
        let r = x
            .core
            .rollback(&rollback_req("id in (dev-0)"), t(40))
            .unwrap();
        assert_eq!(r.devices[0].sequence, Some(3));
        assert_eq!(x.notices(), vec![("dev-0".into(), 3, "1.0.0".into(), true)]);
    }
}

#[test]
fn a_failed_wave_pauses_or_reverts() {
    for revert in [false, true] {
        for mut x in T::each() {
            x.fleet(4, "beta");
            x.push("1.0.0");
            x.push("3.0.0");
            let of = revert.then_some(crate::rollout::waves::OnFailure::Revert);
            x.start("3.0.0", "2,100%", of);
            assert_eq!(x.notices().len(), 2);
            x.core
                .ingest(event("dev-0", 2, Phase::Committed, None), t(2));
            x.core.ingest(
                event(
                    "dev-1",
                    2,
                    Phase::RolledBack,
                    Some("health gate: exec failed 3 times"),
                ),
                t(2),
            );
            x.core.advance(false, t(2));
            let n = x.notices();
            let v = x.core.rollout("r-1", true).unwrap();
            assert_eq!(
                v.summary.failures[0].0,
                "rolled_back: health gate: exec failed 3 times"
            );
            if revert {
                assert_eq!(v.state, "reverted");
                assert_eq!(
                    n,
                    vec![
                        ("dev-0".into(), 3, "1.0.0".into(), true),
                        ("dev-1".into(), 3, "1.0.0".into(), true)
                    ]
                );
            } else {
                assert_eq!(v.state, "paused");
                assert!(n.is_empty(), "wave 2 never starts: {n:?}");
            }
            x.core.advance(true, t(100));
            assert!(x.notices().is_empty());
        }
    }
}

#[test]
fn bad_api_input_changes_nothing() {
    for mut x in T::each() {
        x.fleet(2, "beta");
        x.push("2.0.0");
        let base = StartRollout {
            app: "sensor".into(),
            version: "2.0.0".into(),
            select: "group=beta".into(),
            waves: "1,100%".into(),
            soak: "10s".into(),
            max_failures: "1".into(),
            device_timeout: None,
            strategy: None,
            on_failure: None,
            force: false,
        };
        let cases = [
            (
                StartRollout {
                    version: "9.9.9".into(),
                    ..base.clone()
                },
                422,
                "not in the catalogue",
            ),
            (
                StartRollout {
                    select: "group=gamma".into(),
                    ..base.clone()
                },
                422,
                "matches no device",
            ),
            (
                StartRollout {
                    waves: "50%,10%".into(),
                    ..base.clone()
                },
                400,
                "waves",
            ),
            (
                StartRollout {
                    soak: "soon".into(),
                    ..base.clone()
                },
                400,
                "soak",
            ),
            (
                StartRollout {
                    max_failures: "-1".into(),
                    ..base.clone()
                },
                400,
                "max_failures",
            ),
            (
                StartRollout {
                    select: "group==".into(),
                    ..base.clone()
                },
                400,
                "select",
            ),
        ];
        for (req, status, needle) in cases {
            let e = x.core.start_rollout(&req, t(1)).unwrap_err();
            assert_eq!(e.status, status, "{e}");
            assert!(e.message.contains(needle), "{} lacks {needle}", e.message);
        }
        assert!(x.flush().is_empty());
        assert!(x.core.rollouts().is_empty());
        // a forged release is refused
        let other = PrivateKey::from_seed([9; 32]).unwrap();
        let e = x
            .core
            .push_release(release_env(&other, "4.0.0").as_bytes(), t(1))
            .unwrap_err();
        assert_eq!(e.status, 422);
        assert!(x.core.releases().iter().all(|r| r.version != "4.0.0"));
        // one active rollout per app
        x.core.start_rollout(&base, t(1)).unwrap();
        assert_eq!(x.core.start_rollout(&base, t(1)).unwrap_err().status, 409);
        // a release with different content under the same version is refused
        let e = x
            .core
            .push_release(release_env(&x.ck, "2.0.0").as_bytes(), t(1));
        assert!(e.is_err());
    }
}

#[test]
fn offline_devices_catch_up_and_late_joiners_are_included() {
    for mut x in T::each() {
        x.fleet(2, "beta");
        x.core.ingest(
            Inbound::Online {
                device: "dev-1".into(),
                online: false,
            },
            t(0),
        );
        x.push("1.0.0");
        x.push("2.0.0");
        x.start("2.0.0", "100%", None);
        assert_eq!(
            x.notices().iter().map(|n| n.0.clone()).collect::<Vec<_>>(),
            ["dev-0"]
        );
        // dev-1 comes back; a new device appears with the right label
        x.core.ingest(
            Inbound::Online {
                device: "dev-1".into(),
                online: true,
            },
            t(5),
        );
        x.core.ingest(
            Inbound::Online {
                device: "new-9".into(),
                online: true,
            },
            t(5),
        );
        x.core
            .ingest(state("new-9", "1.0.0", 0, None, "beta"), t(5));
        x.core.advance(false, t(5));
        let mut got: Vec<String> = x.notices().into_iter().map(|n| n.0).collect();
        got.sort();
        assert_eq!(got, ["dev-1", "new-9"]);
    }
}

fn sample(dev: &str, s: i64, temp: f64, humidity: Option<f64>) -> Telemetry {
    let mut sensors = BTreeMap::from([("temperature_c".to_string(), temp)]);
    if let Some(h) = humidity {
        sensors.insert("humidity_pct".into(), h);
    }
    Telemetry {
        device: dev.into(),
        ts: t(s),
        sensors,
        system: ferry_protocol::report::SystemMetrics {
            cpu_pct: 12.5,
            mem_used_bytes: 100,
            mem_total_bytes: 400,
            disk_free_bytes: 1000,
            uptime_s: 60,
            extra: BTreeMap::from([("load1".to_string(), serde_json::json!(0.25))]),
        },
        missing: BTreeMap::new(),
        dropped: None,
    }
}

#[test]
fn telemetry_is_ingested_in_order_and_queryable() {
    for mut x in T::each() {
        x.fleet(1, "beta");
        // a batch flushed after an outage, then a live sample; the batch again (lost PUBACK)
        let batch = vec![
            sample("dev-0", 10, 20.0, None),
            sample("dev-0", 20, 21.0, None),
        ];
        x.core.ingest(
            Inbound::Telemetry {
                device: "dev-0".into(),
                samples: batch.clone(),
            },
            t(30),
        );
        x.core.ingest(
            Inbound::Telemetry {
                device: "dev-0".into(),
                samples: vec![sample("dev-0", 30, 22.0, Some(41.5))],
            },
            t(30),
        );
        x.core.ingest(
            Inbound::Telemetry {
                device: "dev-0".into(),
                samples: batch,
            },
            t(31),
        );
        x.flush();
        let latest = x.core.devices(None).unwrap()[0].telemetry.clone().unwrap();
        assert_eq!(latest.ts, t(30));
        assert_eq!(latest.values["humidity_pct"], 41.5);
        assert_eq!(latest.values["load1"], 0.25);
        let now = t(40);
        let s = x
            .core
            .telemetry("dev-0", Duration::from_secs(3600), None, now)
            .unwrap();
        let temps: Vec<f64> = s.series["temperature_c"].iter().map(|p| p.value).collect();
        assert_eq!(temps, [20.0, 21.0, 22.0]);
        assert_eq!(s.series["humidity_pct"].len(), 1);
        let only = x
            .core
            .telemetry("dev-0", Duration::from_secs(25), Some("temperature_c"), now)
            .unwrap();
        assert_eq!(only.series.keys().collect::<Vec<_>>(), ["temperature_c"]);
        assert_eq!(only.series["temperature_c"].len(), 2);
        assert_eq!(
            x.core
                .telemetry("nope", Duration::from_secs(1), None, now)
                .unwrap_err()
                .status,
            404
        );
        // survives a (graceful) restart: the stop writes what was written lazily
        x.core.flush_all().unwrap();
        let x = x.reopen();
        assert_eq!(
            x.core.devices(None).unwrap()[0]
                .telemetry
                .as_ref()
                .unwrap()
                .ts,
            t(30)
        );
    }
}

#[test]
fn revert_needs_the_running_releases_catalogued_and_reconnects_republish() {
    for mut x in T::each() {
        x.fleet(2, "beta");
        x.push("3.0.0");
        let req = StartRollout {
            app: "sensor".into(),
            version: "3.0.0".into(),
            select: "group=beta".into(),
            waves: "1,100%".into(),
            soak: "10s".into(),
            max_failures: "0".into(),
            device_timeout: None,
            strategy: None,
            on_failure: Some(crate::rollout::waves::OnFailure::Revert),
            force: false,
        };
        let e = x.core.start_rollout(&req, t(1)).unwrap_err();
        assert_eq!(e.status, 422);
        assert!(
            e.message.contains("sensor 1.0.0 (on dev-0, dev-1)"),
            "{}",
            e.message
        );
        assert!(x.core.rollouts().is_empty());
        x.push("1.0.0");
        x.core.start_rollout(&req, t(1)).unwrap();
        let sent = x.notices();
        assert_eq!(sent.len(), 1);
        // the broker comes back without its retained messages: the unacknowledged notice is
        // published again, byte-identical; an acknowledged one is not
        x.core.ingest(Inbound::Connected, t(2));
        let again = x.flush();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].topic, "ferry/v1/devices/dev-0/desired");
        x.core.ingest(
            state("dev-0", "3.0.0", 2, Some((2, Phase::Committed)), "beta"),
            t(3),
        );
        x.core.ingest(Inbound::Connected, t(4));
        assert!(x.flush().is_empty());
    }
}

#[test]
fn after_a_restart_a_device_is_notified_only_once_its_current_state_arrived() {
    for mut x in T::each() {
        x.fleet(2, "beta");
        x.push("1.0.0");
        x.push("2.0.0");
        x.core.flush_all().unwrap();
        // While the controller is down, dev-0 gets sequence 5 from someone else (`ferryctl
        // publish`): the stored record still says 1.
        let mut x = x.reopen();
        // The broker re-delivers the retained messages; `online` may come before `state`.
        for d in ["dev-0", "dev-1"] {
            x.core.ingest(
                Inbound::Online {
                    device: d.into(),
                    online: true,
                },
                t(2),
            );
        }
        let v = x.start("2.0.0", "100%", None);
        assert_eq!(v.summary.devices, 2);
        x.core.advance(true, t(2));
        assert!(
            x.notices().is_empty(),
            "no notice is built on a record older than the device's retained state"
        );
        x.core
            .ingest(state("dev-0", "1.0.0", 5, None, "beta"), t(3));
        x.core.advance(false, t(3));
        assert_eq!(
            x.notices(),
            vec![("dev-0".into(), 6, "2.0.0".into(), false)],
            "the sequence follows the state that just arrived"
        );
        x.core
            .ingest(state("dev-1", "1.0.0", 1, None, "beta"), t(4));
        x.core.advance(false, t(4));
        assert_eq!(
            x.notices(),
            vec![("dev-1".into(), 2, "2.0.0".into(), false)]
        );
        // A device that is offline (its will said 0) is not used because its state arrived.
        let mut x = x.reopen();
        x.core.ingest(
            Inbound::Online {
                device: "dev-0".into(),
                online: false,
            },
            t(5),
        );
        x.core.ingest(
            state("dev-0", "2.0.0", 6, Some((6, Phase::Committed)), "beta"),
            t(5),
        );
        let r = x.core.rollout("r-1", true).unwrap();
        let e = &r.devices.as_ref().unwrap()["dev-0"];
        assert!(!e.online, "a retained state is not a sign of life");
        assert!(
            matches!(e.status, DeviceStatus::Committed { sequence: 6, .. }),
            "but its result counts: {:?}",
            e.status
        );
        // its `online = 1` when it comes back: now it soaks
        x.core.ingest(
            Inbound::Online {
                device: "dev-0".into(),
                online: true,
            },
            t(6),
        );
        let r = x.core.rollout("r-1", true).unwrap();
        assert!(r.devices.as_ref().unwrap()["dev-0"].online);
    }
}

/// Device timeout 60 s: a device retrying its download (events) stays in its wave past it, a
/// device held by its maintenance window (the retained state's update) stays for hours, one
/// that goes silent while online times out; superseded fails with the agent's reason.
#[test]
fn progress_and_holds_reach_the_rollout_from_events_and_states() {
    for mut x in T::each() {
        x.fleet(3, "beta");
        x.push("1.0.0");
        x.push("2.0.0");
        let req = StartRollout {
            app: "sensor".into(),
            version: "2.0.0".into(),
            select: "group=beta".into(),
            waves: "100%".into(),
            soak: "10s".into(),
            max_failures: "2".into(),
            device_timeout: Some("60s".into()),
            strategy: None,
            on_failure: None,
            force: false,
        };
        x.core.start_rollout(&req, t(0)).unwrap();
        assert_eq!(x.notices().len(), 3, "sequence 2 for each");
        let dark = "registry 127.0.0.1:5055: connection refused; retrying in 60 s";
        let window = "maintenance window 02:00-04:00 opens in 3 h";
        let retry = || waiting_event("dev-0", 2, Phase::Downloading, Waiting::Retrying, dark);
        // dev-2: one progress report, then silence while online
        x.core
            .ingest(event("dev-2", 2, Phase::Downloading, None), t(10));
        // dev-1: everything downloaded, the switch waits for its window (retained state only)
        let held = state("dev-1", "1.0.0", 2, Some((2, Phase::Downloaded)), "beta");
        x.core
            .ingest(waiting_state(held, Waiting::Window, window), t(20));
        // dev-0: the registry is dark, it reports each retry (events)
        x.core.ingest(retry(), t(30));
        x.core.advance(true, t(69));
        let v = x.core.rollout("r-1", true).unwrap();
        let status = |v: &RolloutView, d: &str| v.devices.as_ref().unwrap()[d].status.clone();
        assert!(matches!(status(&v, "dev-2"), DeviceStatus::Notified { .. }));
        x.core.advance(true, t(70));
        let v = x.core.rollout("r-1", true).unwrap();
        assert_eq!(
            status(&v, "dev-2"),
            DeviceStatus::Failed {
                reason: "no progress reported within 60s online".into()
            }
        );
        // ... for ten minutes
        for s in (80..600).step_by(50) {
            x.core.ingest(retry(), t(s));
            x.core.advance(true, t(s + 49));
        }
        x.core.advance(true, t(630));
        let v = x.core.rollout("r-1", true).unwrap();
        assert!(matches!(status(&v, "dev-0"), DeviceStatus::Notified { .. }));
        assert!(
            matches!(status(&v, "dev-1"), DeviceStatus::Notified { wait: Some(ref w), .. } if w.holds()),
            "{:?}",
            status(&v, "dev-1")
        );
        assert_eq!(v.state, "running");
        let s = &v.summary;
        assert_eq!((s.retrying, s.held_window, s.held_lock), (1, 1, 0));
        assert_eq!((s.waves[0].retrying, s.waves[0].held_window), (1, 1));
        assert_eq!(
            s.waiting
                .iter()
                .map(|g| (g.waiting, g.reason.as_deref().unwrap(), g.devices.clone()))
                .collect::<Vec<_>>(),
            [
                (Waiting::Retrying, dark, vec!["dev-0".to_string()]),
                (Waiting::Window, window, vec!["dev-1".to_string()])
            ]
        );
        // the inventory shows the update in progress and what it waits for
        assert!(x.flush().is_empty(), "nothing to publish");
        let d1 = x.core.device("dev-1").unwrap().device;
        assert_eq!(
            d1.update.as_ref().unwrap().describe(),
            format!("downloaded (seq 2), waiting: window ({window})")
        );
        let d0 = x.core.device("dev-0").unwrap();
        assert_eq!(
            d0.device.update.as_ref().unwrap().waiting,
            Some(Waiting::Retrying)
        );
        let e = &d0.events[0];
        assert_eq!(
            (e.waiting, e.reason.as_deref()),
            (Some(Waiting::Retrying), Some(dark))
        );
        assert_eq!(e.download.unwrap().resumes, 2);
        // hours later, dev-1 still waits; dev-0 went silent after its last retry (580) and times out
        x.core.advance(true, t(20_000));
        let v = x.core.rollout("r-1", true).unwrap();
        assert!(matches!(status(&v, "dev-0"), DeviceStatus::Failed { .. }));
        assert!(matches!(status(&v, "dev-1"), DeviceStatus::Notified { .. }));
        // a graceful restart keeps the hold (and the retained state brings it again anyway)
        x.core.flush_all().unwrap();
        let mut x = x.reopen();
        let v = x.core.rollout("r-1", true).unwrap();
        assert!(
            matches!(status(&v, "dev-1"), DeviceStatus::Notified { wait: Some(ref w), .. } if w.kind == Waiting::Window)
        );
        // a newer notice took over on the device: superseded, with the agent's reason
        x.core.ingest(
            event(
                "dev-1",
                2,
                Phase::Superseded,
                Some("sequence 3 arrived before the switch"),
            ),
            t(20_001),
        );
        x.core.advance(false, t(20_001));
        let v = x.core.rollout("r-1", true).unwrap();
        assert_eq!(
            status(&v, "dev-1"),
            DeviceStatus::Failed {
                reason: "superseded: sequence 3 arrived before the switch".into()
            }
        );
        assert!(x.core.device("dev-1").unwrap().device.update.is_none());
        assert_eq!(v.state, "paused", "3 failures > max 2");
    }
}

/// `force` on a rollout reaches every notice it signs, its reverts too, and `rollback
/// --force`'s; without it the notice has no `force` at all.
#[test]
fn force_reaches_the_signed_notices() {
    let forced = |v: &[(ferry_protocol::desired::VerifiedNotice, String)]| {
        v.iter()
            .map(|(n, _)| (n.desired.device.clone(), n.desired.force))
            .collect::<Vec<_>>()
    };
    for mut x in T::each() {
        x.fleet(2, "beta");
        x.push("1.0.0");
        x.push("2.0.0");
        let req = StartRollout {
            app: "sensor".into(),
            version: "2.0.0".into(),
            select: "group=beta".into(),
            waves: "1,100%".into(),
            soak: "10s".into(),
            max_failures: "0".into(),
            device_timeout: None,
            strategy: None,
            on_failure: Some(crate::rollout::waves::OnFailure::Revert),
            force: true,
        };
        let v = x.core.start_rollout(&req, t(1)).unwrap();
        assert!(v.force);
        let sent = x.verified();
        assert_eq!(forced(&sent), [("dev-0".to_string(), true)]);
        // persisted with the rollout: after a restart, the next wave's notices are forced too
        x.core.flush_all().unwrap();
        let mut x = x.reopen();
        assert!(x.core.rollout("r-1", false).unwrap().force);
        for d in ["dev-0", "dev-1"] {
            x.core.ingest(
                Inbound::Online {
                    device: d.into(),
                    online: true,
                },
                t(2),
            );
            x.core.ingest(state(d, "1.0.0", 1, None, "beta"), t(2));
        }
        x.core
            .ingest(event("dev-0", 2, Phase::Committed, None), t(3));
        x.core.advance(true, t(14));
        assert_eq!(forced(&x.verified()), [("dev-1".to_string(), true)]);
        // dev-1 fails: the revert notices (back to 1.0.0) are forced as well
        x.core
            .ingest(event("dev-1", 2, Phase::Failed, Some("disk full")), t(15));
        x.core.advance(false, t(15));
        let reverts = x.verified();
        assert_eq!(
            forced(&reverts),
            [("dev-0".to_string(), true), ("dev-1".to_string(), true)]
        );
        assert!(reverts.iter().all(|(n, _)| n.desired.allow_downgrade));
        // rollback: forced only when asked
        let mut rb = rollback_req("id in (dev-0)");
        x.core
            .ingest(state("dev-0", "2.0.0", 3, None, "beta"), t(16));
        x.core.rollback(&rb, t(17)).unwrap();
        let plain = x.verified();
        assert_eq!(forced(&plain), [("dev-0".to_string(), false)]);
        assert!(!plain[0].1.contains("force"), "no force field at all");
        rb.force = true;
        x.core.rollback(&rb, t(18)).unwrap();
        assert_eq!(forced(&x.verified()), [("dev-0".to_string(), true)]);
    }
}

/// Rollout records written before `force` existed load, unforced.
#[test]
fn rollout_records_without_force_load() {
    for mut x in T::each() {
        x.fleet(1, "beta");
        x.push("2.0.0");
        x.start("2.0.0", "100%", None);
        x.core.flush_all().unwrap();
        let rec = &x.core.rollouts["r-1"];
        let mut old = serde_json::to_value(rec).unwrap();
        assert_eq!(old["force"], false);
        old.as_object_mut().unwrap().remove("force");
        let back: RolloutRecord = serde_json::from_value(old).unwrap();
        assert_eq!(&back, rec);
    }
}

#[test]
fn next_sequence_believes_a_report_only_within_the_lead() {
    assert_eq!(next_sequence(0, 0), Some(1));
    assert_eq!(next_sequence(5, 3), Some(6), "behind: our own");
    assert_eq!(
        next_sequence(5, 9),
        Some(10),
        "ahead (publish from elsewhere)"
    );
    assert_eq!(
        next_sequence(5, 5 + MAX_SEQUENCE_LEAD),
        Some(6 + MAX_SEQUENCE_LEAD)
    );
    assert_eq!(
        next_sequence(5, 6 + MAX_SEQUENCE_LEAD),
        Some(6),
        "too far: forged"
    );
    assert_eq!(next_sequence(5, u64::MAX - 1), Some(6));
    assert_eq!(next_sequence(u64::MAX - 3, u64::MAX - 1), Some(u64::MAX));
    assert_eq!(next_sequence(u64::MAX, 0), None, "exhausted");
}

/// Issue 9: a forged state claiming sequence 2^64−2 made the controller sign 2^64−1, after which
/// the box could never accept another notice.
#[test]
fn a_reported_sequence_near_the_end_does_not_steer_the_next_notice() {
    for mut x in T::each() {
        x.fleet(1, "beta");
        x.push("1.0.0");
        x.push("2.0.0");
        x.core
            .ingest(state("dev-0", "1.0.0", u64::MAX - 1, None, "beta"), t(1));
        x.start("2.0.0", "100%", None);
        let n = x.notices();
        assert_eq!(n, vec![("dev-0".into(), 2, "2.0.0".into(), false)]);
        assert_eq!(
            x.core.device("dev-0").unwrap().device.sequence,
            1,
            "not believed"
        );
        assert_eq!(x.core.metrics.disbelieved_sequences.get(), 1);
    }
}

/// Issue 9: a sequence above i64::MAX was stored negative and the controller then refused to
/// start. Stored and reloaded, it is the next notice's base.
#[test]
fn a_sequence_above_i64_max_survives_a_restart() {
    for mut x in T::each() {
        x.fleet(1, "beta");
        x.push("1.0.0");
        x.push("2.0.0");
        let big = i64::MAX as u64 + 10;
        x.core
            .ingest(state("dev-0", "1.0.0", big, None, "beta"), t(1));
        x.core.sequences.insert("dev-0".into(), big - 1);
        x.core.dirty.sequences.insert("dev-0".into());
        x.core.flush_all().unwrap();
        let mut x = x.reopen();
        assert_eq!(x.core.sequences["dev-0"], big - 1);
        x.core.ingest(
            Inbound::Online {
                device: "dev-0".into(),
                online: true,
            },
            t(2),
        );
        x.core
            .ingest(state("dev-0", "1.0.0", big, None, "beta"), t(2));
        x.start("2.0.0", "100%", None);
        let n = x.notices();
        assert_eq!(n, vec![("dev-0".into(), big + 1, "2.0.0".into(), false)]);
        let x = x.reopen();
        assert_eq!(x.core.sequences["dev-0"], big + 1);
    }
}

#[test]
fn the_fleet_pages_in_id_order_with_the_selector_and_a_total() {
    let mut x = T::new(false);
    x.fleet(25, "beta");
    for i in 0..5 {
        x.core
            .ingest(state(&format!("x-{i}"), "1.0.0", 1, None, "alpha"), t(0));
    }
    x.flush();
    let mut want: Vec<String> = (0..25).map(|i| format!("dev-{i}")).collect();
    want.sort();
    let (mut seen, mut after, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let p = x
            .core
            .device_page(Some("group=beta"), 10, after.as_deref())
            .unwrap();
        pages += 1;
        assert_eq!(p.total, 25);
        assert!(p.devices.len() <= 10);
        seen.extend(p.devices.iter().map(|d| d.id.clone()));
        match p.next {
            Some(n) => {
                assert_eq!(Some(&n), seen.last());
                after = Some(n);
            }
            None => break,
        }
    }
    assert_eq!((seen, pages), (want, 3));
    // Without a selector: every device; a cursor between ids starts after it.
    let p = x.core.device_page(None, 1000, Some("dev-9z")).unwrap();
    assert_eq!(p.total, 30);
    let ids: Vec<&str> = p.devices.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["x-0", "x-1", "x-2", "x-3", "x-4"]);
    assert_eq!(p.next, None);
    for (sel, limit) in [(None, 0), (None, 1001), (Some("group=="), 10)] {
        let e = x.core.device_page(sel, limit, None).unwrap_err();
        assert_eq!(e.status, 400, "{sel:?} {limit}: {}", e.message);
    }
}
