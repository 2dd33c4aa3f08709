//! Engine behaviour against the in-memory runtime: ordering of swap steps per strategy,
//! rollback, failures that change nothing, and recovery from every journaled state.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use ferry_protocol::desired::embed_release;
use ferry_protocol::release::{ContainerSpec, HealthSpec};
use ferry_protocol::{
    Desired, HealthCheck, Phase, PrivateKey, Release, Strategy, Trust, TrustedKeys,
};
use tokio::sync::watch;

use super::*;
use crate::download::{DownloadError, Fetched, ImageSource, ImageWant, Progress};
use crate::outbox::MemoryOutbox;
use crate::runtime::fake::{Behaviour, FakeRuntime};
use crate::runtime::{ImageInfo, RestartPolicy};
use crate::update::lock;
use crate::update::window::Window;

use ferry_registry::RegistryError;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

const DEV: &str = "dev-001";
const PLATFORM: &str = "linux/arm64";

/// The images an update needs, brought into the fake engine by its `pull` (the real source's
/// store, loopback registry and checks are tested in `crate::download`). Attempts can be
/// scripted to fail, and made to take time.
struct FakeSource {
    rt: Arc<FakeRuntime>,
    /// Outcomes of the next attempts, front first; then success.
    script: Mutex<VecDeque<DownloadError>>,
    /// Each attempt takes this long (a download in progress).
    slow: Mutex<Option<Duration>>,
    /// This many attempts fetch some bytes and then fail transiently (a link cut mid-download).
    progress_then_fail: Mutex<usize>,
    attempts: AtomicUsize,
    releases: AtomicUsize,
    agent_fetches: AtomicUsize,
}

impl FakeSource {
    fn fail_next(&self, e: DownloadError) {
        self.script.lock().unwrap().push_back(e);
    }
}

fn transient(what: &str) -> DownloadError {
    DownloadError::Registry(RegistryError::Transport {
        registry: "127.0.0.1:5055".into(),
        repo: "ferry/sensor".into(),
        reference: "sha256:x".into(),
        message: what.into(),
    })
}

impl ImageSource for FakeSource {
    async fn fetch(
        &self,
        wants: &[ImageWant],
        progress: &Arc<Progress>,
        _cancel: &Arc<AtomicBool>,
    ) -> Result<Vec<Fetched>, DownloadError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        progress.start(1000 * wants.len() as u64, 0, 0);
        let slow = *self.slow.lock().unwrap();
        if let Some(d) = slow {
            tokio::time::sleep(d).await;
        }
        let scripted = self.script.lock().unwrap().pop_front();
        if let Some(e) = scripted {
            return Err(e);
        }
        {
            let mut n = self.progress_then_fail.lock().unwrap();
            if *n > 0 {
                *n -= 1;
                progress.blobs.fetched.fetch_add(100, Ordering::SeqCst);
                return Err(transient("connection reset after 100 bytes"));
            }
        }
        let mut out = Vec::new();
        for w in wants {
            let r = format!("{}@{}", w.repo, w.digest);
            self.rt
                .pull(&r, PLATFORM, None, &|_| {})
                .await
                .map_err(|e| DownloadError::Import {
                    image: r.clone(),
                    detail: e.to_string(),
                })?;
            let id = self.rt.image_inspect(&r).await.unwrap().unwrap().id;
            progress.blobs.have.fetch_add(1000, Ordering::SeqCst);
            progress.blobs.fetched.fetch_add(1000, Ordering::SeqCst);
            out.push(Fetched {
                app: w.app.clone(),
                image_id: id,
            });
        }
        Ok(out)
    }

    async fn fetch_agent(
        &self,
        want: &ImageWant,
        dir: &crate::selfupdate::layout::AgentDir,
        version: &semver::Version,
        _progress: &Arc<Progress>,
        _cancel: &Arc<AtomicBool>,
    ) -> Result<(), DownloadError> {
        use std::io::Write;
        self.agent_fetches.fetch_add(1, Ordering::SeqCst);
        let scripted = self.script.lock().unwrap().pop_front();
        if let Some(e) = scripted {
            return Err(e);
        }
        dir.install(version, &want.digest, |f| {
            f.write_all(format!("\x7fELF agent {version}").as_bytes())
        })
        .map(|_| ())
        .map_err(|e| DownloadError::store(dir.root(), e))
    }

    async fn release(&self) {
        self.releases.fetch_add(1, Ordering::SeqCst);
    }
}

type Eng = Engine<FakeRuntime, FakeSource, MemoryOutbox>;

struct Fx {
    rt: Arc<FakeRuntime>,
    src: Arc<FakeSource>,
    out: Arc<MemoryOutbox>,
    dir: tempfile::TempDir,
    rk: PrivateKey,
    ck: PrivateKey,
    stop: watch::Receiver<bool>,
    _stop_tx: watch::Sender<bool>,
}

fn digest(app: &str, version: &str) -> String {
    use sha2::Digest;
    format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(format!("{app}{version}")))
    )
}

fn release(app: &str, version: &str) -> Release {
    Release {
        app: app.into(),
        version: version.parse().unwrap(),
        image: "127.0.0.1:5055/ferry/sensor".into(),
        platforms: [(PLATFORM.to_string(), digest(app, version))].into(),
        container: ContainerSpec::default(),
        health: HealthSpec {
            check: Some(HealthCheck::Exec(vec!["true".into()])),
            grace_s: Some(1),
            interval_s: Some(1),
            timeout_s: Some(1),
            successes: Some(2),
            max_failures: Some(2),
            deadline_s: Some(30),
        },
        created_at: Utc::now(),
    }
}

fn reference(app: &str, version: &str) -> String {
    format!("127.0.0.1:5055/ferry/sensor@{}", digest(app, version))
}

/// The fake engine's image id of a sample image.
fn image_id(app: &str, version: &str) -> String {
    format!("sha256:id-{app}-{version}")
}

impl Fx {
    fn new() -> Fx {
        let (tx, rx) = watch::channel(false);
        let rt = Arc::new(FakeRuntime::new());
        for app in ["sensor", "other"] {
            for v in ["1.0.0", "2.0.0", "3.0.0"] {
                rt.add_registry_image(
                    &reference(app, v),
                    ImageInfo {
                        id: image_id(app, v),
                        repo_digests: vec![reference(app, v)],
                        os: "linux".into(),
                        architecture: "arm64".into(),
                        variant: None,
                        size: 1000,
                        layers: vec![],
                    },
                );
            }
        }
        for app in ["sensor", "other"] {
            rt.set_image_behaviour(
                &reference(app, "3.0.0"),
                Behaviour {
                    healthy: false,
                    logs: vec!["sensor: calibration table missing".into()],
                    ..Default::default()
                },
            );
        }
        Fx {
            src: Arc::new(FakeSource {
                rt: rt.clone(),
                script: Mutex::new(VecDeque::new()),
                slow: Mutex::new(None),
                progress_then_fail: Mutex::new(0),
                attempts: AtomicUsize::new(0),
                releases: AtomicUsize::new(0),
                agent_fetches: AtomicUsize::new(0),
            }),
            rt,
            out: Arc::new(MemoryOutbox::default()),
            dir: tempfile::tempdir().unwrap(),
            rk: PrivateKey::from_seed([1; 32]).unwrap(),
            ck: PrivateKey::from_seed([2; 32]).unwrap(),
            stop: rx,
            _stop_tx: tx,
        }
    }

    fn config(&self) -> EngineConfig {
        EngineConfig {
            device: DEV.into(),
            platform: PLATFORM.into(),
            labels: BTreeMap::new(),
            clock_skew: chrono::Duration::seconds(300),
            stop_grace: Duration::from_secs(3),
            health: HealthDefaults::default(),
            progress_every: Duration::from_millis(0),
            log_lines: 10,
            drain_gate: Duration::from_secs(5),
            rollback_retry: Duration::from_millis(10),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            windows: Vec::new(),
            lock_root: None,
            max_lock: Duration::from_secs(3600),
            lock_poll: Duration::from_secs(1),
            agent_version: "0.1.0".parse().unwrap(),
            agent_exe: PathBuf::from("/usr/bin/ferry-agent"),
            agent_dir: crate::selfupdate::layout::AgentDir::new(self.dir.path()),
        }
    }

    fn engine(&self) -> Eng {
        self.engine_with(self.config())
    }

    fn engine_with(&self, cfg: EngineConfig) -> Eng {
        let trust = Trust {
            release: TrustedKeys::new([self.rk.public().clone()]),
            release_threshold: 1,
            controller: TrustedKeys::new([self.ck.public().clone()]),
        };
        Engine::new(
            cfg,
            self.rt.clone(),
            self.src.clone(),
            self.out.clone(),
            trust,
            Policy::default(),
            JournalStore::new(self.dir.path()),
        )
        .unwrap()
    }

    fn notice(&self, seq: u64, strategy: Strategy, apps: &[(&str, &str)]) -> Vec<u8> {
        self.notice_by(&self.ck, seq, strategy, apps)
    }

    /// A notice signed by controller key `ck`.
    fn notice_by(
        &self,
        ck: &PrivateKey,
        seq: u64,
        strategy: Strategy,
        apps: &[(&str, &str)],
    ) -> Vec<u8> {
        Desired {
            settings: Default::default(),
            force: false,
            device: DEV.into(),
            sequence: seq,
            issued_at: Utc::now(),
            expires_at: Utc::now() + chrono::Duration::days(1),
            apps: apps
                .iter()
                .map(|(a, v)| {
                    (
                        a.to_string(),
                        embed_release(&release(a, v).sign(&[&self.rk]).to_json()).unwrap(),
                    )
                })
                .collect(),
            strategy,
            allow_downgrade: false,
            rollout: Some("r-1".into()),
        }
        .sign(&[ck])
        .to_json()
        .into_bytes()
    }

    fn running(&self) -> Vec<String> {
        let mut v = self.rt.running_names();
        v.sort();
        v
    }

    fn last_event(&self) -> ferry_protocol::Event {
        self.out.events.lock().unwrap().last().cloned().unwrap()
    }
}

fn name(app: &str, seq: u64) -> String {
    crate::update::plan::container_name(DEV, app, seq)
}

async fn committed_v1(fx: &Fx, e: &mut Eng) {
    e.handle_notice(
        &fx.notice(1, Strategy::StopFirst, &[("sensor", "1.0.0")]),
        &fx.stop,
    )
    .await
    .unwrap();
    assert_eq!(fx.running(), vec![name("sensor", 1)]);
    fx.rt.clear_calls();
    fx.out.events.lock().unwrap().clear();
}

#[tokio::test(start_paused = true)]
async fn first_install_reports_every_phase_and_commits() {
    let fx = Fx::new();
    let mut e = fx.engine();
    e.handle_notice(
        &fx.notice(1, Strategy::StopFirst, &[("sensor", "1.0.0")]),
        &fx.stop,
    )
    .await
    .unwrap();
    let phases = fx.out.phases();
    let expect = [
        Phase::Received,
        Phase::Verified,
        Phase::Downloading,
        Phase::Downloaded,
        Phase::Switching,
        Phase::HealthChecking,
        Phase::Committed,
    ];
    let mut it = phases.iter();
    for want in expect {
        assert!(
            it.any(|p| *p == want),
            "missing {want:?} in order: {phases:?}"
        );
    }
    let j = e.journal();
    assert_eq!(j.committed["sensor"].release.version.to_string(), "1.0.0");
    assert!(j.txn.is_none());
    assert_eq!(j.last_sequence, 1);
    assert_eq!(j.last_result.as_ref().unwrap().phase, Phase::Committed);
    let c = fx.rt.container(&name("sensor", 1)).unwrap();
    assert_eq!(c.config.labels[crate::runtime::labels::DEVICE], DEV);
    // Created from exactly the image the download verified.
    assert_eq!(c.config.image, image_id("sensor", "1.0.0"));
    assert_eq!(
        e.journal().committed["sensor"].image_id.as_deref(),
        Some(image_id("sensor", "1.0.0").as_str())
    );
    assert_eq!(c.restart_policy, RestartPolicy::UnlessStopped);
    // The retained state reflects the committed set.
    let st = fx.out.states.lock().unwrap().last().cloned().unwrap();
    assert_eq!(st.apps["sensor"].version, "1.0.0");
    assert_eq!(st.sequence, 1);
}

#[tokio::test(start_paused = true)]
async fn stop_first_stops_old_before_starting_new_and_prunes_after_commit() {
    let fx = Fx::new();
    let mut e = fx.engine();
    committed_v1(&fx, &mut e).await;
    e.handle_notice(
        &fx.notice(2, Strategy::StopFirst, &[("sensor", "2.0.0")]),
        &fx.stop,
    )
    .await
    .unwrap();
    let calls = fx.rt.calls();
    let pos = |needle: &str| {
        calls
            .iter()
            .position(|c| c.contains(needle))
            .unwrap_or_else(|| panic!("{needle} not in {calls:?}"))
    };
    let old = name("sensor", 1);
    let new = name("sensor", 2);
    assert!(pos(&format!("create {new}")) < pos(&format!("stop {old}")));
    assert!(pos(&format!("set_restart_policy {old}")) < pos(&format!("stop {old}")));
    assert!(pos(&format!("stop {old}")) < pos(&format!("start {new}")));
    assert!(pos(&format!("start {new}")) < pos(&format!("remove {old}")));
    assert_eq!(fx.running(), vec![new]);
    assert!(
        fx.rt.container(&old).is_none(),
        "old container pruned after commit"
    );
    assert!(!fx
        .rt
        .local_images()
        .iter()
        .any(|i| i.id == image_id("sensor", "1.0.0")));
    assert_eq!(
        e.journal().committed["sensor"].release.version.to_string(),
        "2.0.0"
    );
    // Every state report that says "committed" already lists the new set.
    for st in fx.out.states.lock().unwrap().iter() {
        if st
            .update
            .as_ref()
            .is_some_and(|u| u.phase == Phase::Committed && u.sequence == 2)
        {
            assert_eq!(st.apps["sensor"].version, "2.0.0", "{st:?}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn start_first_keeps_old_running_until_new_is_healthy() {
    let fx = Fx::new();
    let mut e = fx.engine();
    committed_v1(&fx, &mut e).await;
    e.handle_notice(
        &fx.notice(2, Strategy::StartFirst, &[("sensor", "2.0.0")]),
        &fx.stop,
    )
    .await
    .unwrap();
    let calls = fx.rt.calls();
    let old = name("sensor", 1);
    let new = name("sensor", 2);
    let pos =
        |pred: &dyn Fn(&str) -> bool| calls.iter().position(|c| pred(c)).unwrap_or(usize::MAX);
    let stop_old = pos(&|c| c == format!("stop {old}"));
    assert!(stop_old < usize::MAX, "{calls:?}");
    assert!(
        pos(&|c| c == format!("start {new}")) < stop_old,
        "{calls:?}"
    );
    assert!(
        pos(&|c| c.starts_with("exec") && c.contains(&new)) < stop_old,
        "gate before stop: {calls:?}"
    );
    assert_eq!(fx.running(), vec![new]);
}

#[tokio::test(start_paused = true)]
async fn unhealthy_release_rolls_back_with_reason_and_logs() {
    for strategy in [Strategy::StopFirst, Strategy::StartFirst] {
        let fx = Fx::new();
        let mut e = fx.engine();
        committed_v1(&fx, &mut e).await;
        e.handle_notice(&fx.notice(2, strategy, &[("sensor", "3.0.0")]), &fx.stop)
            .await
            .unwrap();
        let ev = fx.last_event();
        assert_eq!(ev.phase, Phase::RolledBack, "{strategy}");
        assert!(ev.reason.as_deref().unwrap().contains("sensor"), "{ev:?}");
        assert!(
            ev.logs
                .as_ref()
                .unwrap()
                .iter()
                .any(|l| l.contains("calibration")),
            "{ev:?}"
        );
        assert_eq!(fx.running(), vec![name("sensor", 1)], "{strategy}");
        let old = fx.rt.container(&name("sensor", 1)).unwrap();
        assert_eq!(
            old.restart_policy,
            RestartPolicy::UnlessStopped,
            "restart policy restored"
        );
        assert!(
            fx.rt.container(&name("sensor", 2)).is_none(),
            "failed container removed"
        );
        assert!(
            !fx.rt
                .local_images()
                .iter()
                .any(|i| i.repo_digests.contains(&reference("sensor", "3.0.0"))),
            "failed image removed"
        );
        let j = e.journal();
        assert_eq!(j.committed["sensor"].release.version.to_string(), "1.0.0");
        assert_eq!(j.last_result.as_ref().unwrap().phase, Phase::RolledBack);
        assert_eq!(j.last_sequence, 2, "the sequence stays consumed");
    }
}

#[tokio::test(start_paused = true)]
async fn one_bad_app_rolls_back_the_whole_set() {
    let fx = Fx::new();
    let mut e = fx.engine();
    committed_v1(&fx, &mut e).await;
    e.handle_notice(
        &fx.notice(
            2,
            Strategy::StopFirst,
            &[("sensor", "2.0.0"), ("other", "3.0.0")],
        ),
        &fx.stop,
    )
    .await
    .unwrap();
    assert_eq!(fx.last_event().phase, Phase::RolledBack);
    assert_eq!(fx.running(), vec![name("sensor", 1)]);
    assert!(fx.rt.container(&name("sensor", 2)).is_none());
    assert!(fx.rt.container(&name("other", 2)).is_none());
}

#[tokio::test(start_paused = true)]
async fn crash_loop_and_exit_count_as_unhealthy() {
    for b in [
        Behaviour {
            crash_loop: true,
            ..Default::default()
        },
        Behaviour {
            exits_after_start: true,
            ..Default::default()
        },
    ] {
        let fx = Fx::new();
        fx.rt
            .set_image_behaviour(&reference("sensor", "2.0.0"), b.clone());
        let mut e = fx.engine();
        committed_v1(&fx, &mut e).await;
        e.handle_notice(
            &fx.notice(2, Strategy::StopFirst, &[("sensor", "2.0.0")]),
            &fx.stop,
        )
        .await
        .unwrap();
        assert_eq!(fx.last_event().phase, Phase::RolledBack, "{b:?}");
        assert_eq!(fx.running(), vec![name("sensor", 1)]);
    }
}

#[tokio::test(start_paused = true)]
async fn rejected_notice_changes_nothing_and_duplicates_are_silent() {
    let fx = Fx::new();
    let mut e = fx.engine();
    committed_v1(&fx, &mut e).await;
    let before = std::fs::read(fx.dir.path().join("journal.json")).unwrap();
    // Replay of sequence 1 with other content: equivocation.
    e.handle_notice(
        &fx.notice(1, Strategy::StopFirst, &[("sensor", "2.0.0")]),
        &fx.stop,
    )
    .await
    .unwrap();
    let ev = fx.last_event();
    assert_eq!(ev.phase, Phase::Rejected);
    assert!(ev.reason.unwrap().contains("equivocation"));
    assert_eq!(
        std::fs::read(fx.dir.path().join("journal.json")).unwrap(),
        before
    );
    assert_eq!(
        fx.rt
            .calls()
            .iter()
            .filter(|c| !c.starts_with("inspect"))
            .count(),
        0
    );
    // The state report carries the rejection.
    let st = fx.out.states.lock().unwrap().last().cloned().unwrap();
    assert_eq!(st.update.unwrap().phase, Phase::Rejected);
}

#[tokio::test(start_paused = true)]
async fn identical_retained_notice_is_a_no_op() {
    let fx = Fx::new();
    let mut e = fx.engine();
    let raw = fx.notice(1, Strategy::StopFirst, &[("sensor", "1.0.0")]);
    e.handle_notice(&raw, &fx.stop).await.unwrap();
    fx.out.events.lock().unwrap().clear();
    fx.rt.clear_calls();
    e.handle_notice(&raw, &fx.stop).await.unwrap();
    assert!(fx.out.events.lock().unwrap().is_empty());
    assert!(fx.rt.calls().is_empty());
}

#[tokio::test(start_paused = true)]
async fn reconcile_revives_committed_and_removes_only_own_leftovers() {
    let fx = Fx::new();
    let mut e = fx.engine();
    committed_v1(&fx, &mut e).await;
    // A leftover of ours, a container of another device, and one Ferry never made.
    let mut leftover = swap::container_config(&e.placement(), 9, &e.journal().committed["sensor"]);
    leftover.name = "ferry-dev-001-sensor-s9".into();
    fx.rt.create(&leftover).await.unwrap();
    let mut other_dev = leftover.clone();
    other_dev.name = "ferry-dev-002-sensor-s1".into();
    other_dev
        .labels
        .insert(crate::runtime::labels::DEVICE.into(), "dev-002".into());
    fx.rt.create(&other_dev).await.unwrap();
    let mut foreign = leftover.clone();
    foreign.name = "somebody-elses".into();
    foreign.labels.clear();
    fx.rt.create(&foreign).await.unwrap();
    // The committed container was stopped behind our back.
    fx.rt
        .stop(&name("sensor", 1), Duration::from_secs(1))
        .await
        .unwrap();
    e.reconcile().await;
    assert_eq!(fx.running(), vec![name("sensor", 1)]);
    assert!(fx.rt.container("ferry-dev-001-sensor-s9").is_none());
    assert!(fx.rt.container("ferry-dev-002-sensor-s1").is_some());
    assert!(fx.rt.container("somebody-elses").is_some());
}

#[tokio::test(start_paused = true)]
async fn shutdown_during_download_leaves_a_resumable_journal() {
    let fx = Fx::new();
    let (tx, rx) = watch::channel(true); // already stopping
    let mut e = fx.engine();
    let r = e
        .handle_notice(
            &fx.notice(1, Strategy::StopFirst, &[("sensor", "1.0.0")]),
            &rx,
        )
        .await;
    drop(tx);
    assert!(
        matches!(r, Err(EngineError::Interrupted(State::Downloading))),
        "{r:?}"
    );
    assert_eq!(e.journal().txn.as_ref().unwrap().state, State::Downloading);
    assert!(fx.running().is_empty());
    let mut e = fx.engine();
    e.recover(&fx.stop).await.unwrap();
    assert_eq!(fx.running(), vec![name("sensor", 1)]);
}

#[tokio::test(start_paused = true)]
async fn a_failing_create_rolls_back_and_keeps_the_old_set() {
    let fx = Fx::new();
    let mut e = fx.engine();
    committed_v1(&fx, &mut e).await;
    fx.rt.fail_next("create", "no space left on device");
    e.handle_notice(
        &fx.notice(2, Strategy::StopFirst, &[("sensor", "2.0.0")]),
        &fx.stop,
    )
    .await
    .unwrap();
    let ev = fx.last_event();
    assert_eq!(ev.phase, Phase::RolledBack);
    assert!(ev.reason.unwrap().contains("no space left"));
    assert_eq!(fx.running(), vec![name("sensor", 1)]);
    assert_eq!(fx.rt.call_count("stop"), 0, "nothing that runs was touched");
}

#[tokio::test(start_paused = true)]
async fn retire_stops_first_when_the_engine_refuses_the_policy_change() {
    let fx = Fx::new();
    let mut e = fx.engine();
    committed_v1(&fx, &mut e).await;
    let old = name("sensor", 1);
    // dockerd refuses updates of a crash-looping container between two restarts.
    fx.rt.fail_next(
        "set_restart_policy",
        "runc did not terminate successfully: container not running",
    );
    swap::retire(&*fx.rt, &old, Duration::from_secs(1))
        .await
        .unwrap();
    let c = fx.rt.container(&old).unwrap();
    assert_ne!(c.status, "running");
    assert_eq!(
        c.restart_policy,
        RestartPolicy::No,
        "policy cleared after the stop"
    );
}

#[tokio::test(start_paused = true)]
async fn health_changes_after_the_commit_republish_the_state_once() {
    let fx = Fx::new();
    let mut e = fx.engine();
    committed_v1(&fx, &mut e).await;
    let states = || fx.out.states.lock().unwrap().clone();
    let n = states().len();
    assert_eq!(states().last().unwrap().apps["sensor"].health, "healthy");
    // nothing changed: nothing published
    assert!(!e.watch_health().await);
    assert_eq!(states().len(), n);
    // the app is stopped after its commit (`docker stop`): the controller must see it
    let id = fx.rt.inspect(&name("sensor", 1)).await.unwrap().unwrap().id;
    fx.rt.stop(&id, Duration::from_secs(1)).await.unwrap();
    assert!(e.watch_health().await);
    assert_eq!(states().len(), n + 1);
    assert_eq!(states().last().unwrap().apps["sensor"].health, "stopped");
    // once
    assert!(!e.watch_health().await);
    assert_eq!(states().len(), n + 1);
}

mod agent;
mod download;
mod hold;
mod recovery;
mod trust;
