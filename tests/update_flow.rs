//! End-to-end updates through the real agent binary: MQTT (a private mosquitto per test), the
//! real dockerd, the registry with the sample images, ARM images under qemu.
//!
//! Run with `cargo test --test update_flow -- --test-threads=2`. See `tests/common/mod.rs` for
//! the harness.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::infra::{self, ARM64, ARMV7};
use common::{docker, AgentBinary, Phase, Rig, StateReport, Strategy, SLOW};

/// Bound for things that follow an event closely (pruning, a state report).
const SOON: Duration = Duration::from_secs(60);

fn timing(name: &str, t0: Instant) {
    eprintln!("TIMING {name}: {:.1} s", t0.elapsed().as_secs_f64());
}

/// Samples which containers of a device run, every ~100 ms, until dropped.
struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<BTreeSet<String>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(device: &str) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, samples, device) = (stop.clone(), samples.clone(), device.to_string());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let names: BTreeSet<String> = docker::running(&device)
                        .into_iter()
                        .map(|c| c.version().unwrap_or("?").to_string())
                        .collect();
                    samples.lock().unwrap().push(names);
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        Sampler {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    /// Stop sampling; the sets of running versions seen, in order.
    fn finish(mut self) -> Vec<BTreeSet<String>> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.samples.lock().unwrap().clone()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn sensor_version(s: &StateReport) -> Option<&str> {
    s.apps.get("sensor").map(|a| a.version.as_str())
}

/// The one running container of the device (panics listing them otherwise).
fn only_running(rig: &Rig) -> docker::Container {
    let running = rig.running();
    assert_eq!(
        running.len(),
        1,
        "exactly one container of {} should run: {:#?}",
        rig.device,
        running
    );
    running.into_iter().next().unwrap()
}

/// 1.0.0 -> 2.0.0 with `strategy`; returns the versions seen running during the update.
fn upgrade_1_to_2(name: &str, strategy: Strategy) -> Vec<BTreeSet<String>> {
    let rig = Rig::start(name);
    rig.install(1, "1.0.0");
    rig.observer.wait_online("1", SOON);
    let old = only_running(&rig);
    assert_eq!(old.version(), Some("1.0.0"));
    let r = docker::readings(&old.name, SOON);
    assert_eq!(r["version"], "1.0.0", "{r}");

    let sampler = Sampler::start(&rig.device);
    let rel = rig.release("2.0.0").signed(&rig.keys);
    let notice = rig
        .desired(2)
        .app("sensor", rel)
        .strategy(strategy)
        .signed(&rig.keys);
    rig.publish(&notice);

    let end = rig.observer.wait_terminal(2, SLOW);
    assert_eq!(
        end.phase,
        Phase::Committed,
        "{end:?}\n{}",
        rig.observer.describe_events()
    );
    assert_eq!(
        rig.observer.phases_for(2),
        vec![
            Phase::Received,
            Phase::Verified,
            Phase::Downloading,
            Phase::Downloaded,
            Phase::Switching,
            Phase::HealthChecking,
            Phase::Committed
        ],
        "{}",
        rig.observer.describe_events()
    );
    let progress: Vec<_> = rig
        .observer
        .events_for(2)
        .into_iter()
        .filter(|e| e.phase == Phase::Downloading && e.bytes.is_some())
        .collect();
    assert!(
        !progress.is_empty(),
        "no downloading event with bytes/total:\n{}",
        rig.observer.describe_events()
    );
    for e in &progress {
        let (bytes, total) = (e.bytes.unwrap(), e.total.expect("total with bytes"));
        // total: the compressed bytes of the layers the engine lacks (0 when it has them all).
        assert!(bytes <= total, "progress {bytes}/{total}");
        assert_eq!(e.app.as_deref(), Some("sensor"));
        assert!(e.download.is_some(), "{e:?}");
    }
    let last = progress.last().unwrap();
    assert_eq!(
        last.bytes, last.total,
        "the last progress event is complete"
    );
    assert_eq!(end.rollout.as_deref(), Some("r-2"));

    let want_digest = infra::digest("2.0.0", ARM64);
    let st = rig.observer.wait_state(
        |s| s.sequence == 2 && sensor_version(s) == Some("2.0.0") && s.update.is_some(),
        SOON,
    );
    assert_eq!(st.platform, ARM64);
    assert_eq!(st.apps.len(), 1, "{st:?}");
    assert_eq!(st.apps["sensor"].digest, want_digest);
    let up = st.update.as_ref().unwrap();
    assert_eq!((up.sequence, up.phase), (2, Phase::Committed), "{st:?}");

    // The previous container is pruned right after the commit.
    infra::wait_for(
        "the 1.0.0 container to be removed",
        SOON,
        || match docker::inspect(&old.name) {
            None => Ok(()),
            Some(c) => Err(format!("{} still exists ({})", c.name, c.status)),
        },
    );
    let new = only_running(&rig);
    assert_eq!(rig.containers().len(), 1, "{:#?}", rig.containers());
    assert_eq!(new.version(), Some("2.0.0"));
    assert_eq!(new.name, st.apps["sensor"].container);
    // Created from exactly the image the signed manifest names (its id; loaded by that digest).
    assert_eq!(new.image, infra::sensor_image_id("2.0.0", ARM64));
    let r = docker::readings(&new.name, SOON);
    assert_eq!(r["version"], "2.0.0", "{r}");
    assert_eq!(r["temperature_c"], 23.25, "{r}");
    assert_eq!(r["humidity_pct"], 41.5, "{r}");
    assert_eq!(rig.agent.committed_versions()["sensor"], "2.0.0");
    sampler.finish()
}

#[test]
fn stop_first_upgrade_1_to_2() {
    let t0 = Instant::now();
    let seen = upgrade_1_to_2("stop-first", Strategy::StopFirst);
    // Stop-first: the old container stops before the new one starts.
    for s in &seen {
        assert!(
            s.len() <= 1,
            "two versions ran at once under stop-first: {seen:?}"
        );
    }
    timing("stop_first_upgrade_1_to_2", t0);
}

#[test]
fn start_first_upgrade_1_to_2() {
    let t0 = Instant::now();
    let seen = upgrade_1_to_2("start-first", Strategy::StartFirst);
    // Start-first: the new container passes its gate while the old one still serves.
    let both: BTreeSet<String> = ["1.0.0".to_string(), "2.0.0".to_string()].into();
    assert!(
        seen.contains(&both),
        "1.0.0 and 2.0.0 never ran side by side under start-first: {seen:?}"
    );
    assert!(
        seen.iter().all(|s| !s.is_empty()),
        "a moment without any running sensor under start-first: {seen:?}"
    );
    timing("start_first_upgrade_1_to_2", t0);
}

#[test]
fn broken_release_rolls_back() {
    let t0 = Instant::now();
    // This test asserts that the 3.0.0 image is gone: no other agent may hold it meanwhile.
    let rig = Rig::builder("rollback").exclusive_images().start();
    rig.install(1, "2.0.0");
    let good = only_running(&rig);
    assert_eq!(good.version(), Some("2.0.0"));
    let broken_digest = infra::digest("3.0.0", ARM64);

    let rel = rig.release("3.0.0").signed(&rig.keys);
    rig.publish(&rig.desired(2).app("sensor", rel).signed(&rig.keys));
    let end = rig.observer.wait_terminal(2, SLOW);
    assert_eq!(
        end.phase,
        Phase::RolledBack,
        "{end:?}\n{}",
        rig.observer.describe_events()
    );
    let reason = end.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("sensor") && reason.contains("health check") && reason.contains("503"),
        "reason should name the failed health check: {reason:?}"
    );
    let logs = end.logs.clone().unwrap_or_default();
    assert!(
        logs.iter().any(|l| l.contains("calibration table")),
        "rolled_back logs should carry the sensor's calibration error: {logs:#?}"
    );
    let phases = rig.observer.phases_for(2);
    assert_eq!(
        &phases[phases.len() - 3..],
        &[Phase::HealthChecking, Phase::RollingBack, Phase::RolledBack],
        "{phases:?}"
    );
    assert!(
        !phases.contains(&Phase::Committed),
        "{}",
        rig.observer.describe_events()
    );

    // The 2.0.0 container runs again (the same one) and serves.
    let st = rig.observer.wait_state(
        |s| {
            s.sequence == 2
                && s.update
                    .as_ref()
                    .is_some_and(|u| u.phase == Phase::RolledBack)
        },
        SOON,
    );
    assert_eq!(sensor_version(&st), Some("2.0.0"), "{st:?}");
    assert_eq!(st.apps["sensor"].container, good.name);
    assert_eq!(st.apps["sensor"].health, "healthy", "{st:?}");
    let now = only_running(&rig);
    assert_eq!(now.name, good.name);
    assert_eq!(now.restart_policy, "unless-stopped");
    let r = docker::readings(&now.name, SOON);
    assert_eq!(r["version"], "2.0.0", "{r}");
    assert_eq!(r["humidity_pct"], 41.5, "{r}");

    // The 3.0.0 container and its image are gone.
    infra::wait_for("the 3.0.0 container and image to be removed", SOON, || {
        let c = rig.containers();
        if c.len() != 1 || c.iter().any(|c| c.version() == Some("3.0.0")) {
            return Err(format!("containers: {c:#?}"));
        }
        if docker::image_with_digest(&broken_digest) {
            return Err(format!(
                "an image loaded by {broken_digest} is still present"
            ));
        }
        Ok(())
    });
    // The journal still commits 2.0.0 and has no open transaction.
    infra::wait_for("the journal to close the transaction", SOON, || {
        let j = rig.agent.journal();
        if j["txn"].is_null() {
            Ok(())
        } else {
            Err(format!("txn still open: {}", j["txn"]))
        }
    });
    let j = rig.agent.journal();
    assert_eq!(rig.agent.committed_versions()["sensor"], "2.0.0", "{j}");
    assert_eq!(j["committed_sequence"], 1, "{j}");
    assert_eq!(j["last_sequence"], 2, "{j}");
    assert_eq!(j["last_result"]["phase"], "rolled_back", "{j}");
    timing("broken_release_rolls_back", t0);
}

/// Issue 10, against the real agent and dockerd: a rollback that cannot finish (the previous
/// container and its image were removed while the broken release was being checked) backs off,
/// reports `rollback_failed` once, still stops at once on SIGTERM, resumes after a restart, and
/// yields to a newer notice: the stuck update ends `failed` naming why, and the newer one
/// deploys its set again (the image fetched anew) and commits.
#[test]
fn a_rollback_that_cannot_finish_backs_off_stops_on_sigterm_and_yields_to_a_newer_notice() {
    let t0 = Instant::now();
    // This test removes an image the other tests of this binary use.
    let mut rig = Rig::builder("stuck-rollback").exclusive_images().start();
    rig.install(1, "2.0.0");
    let good = only_running(&rig);
    // A broken release with a long grace: time to pull the previous set's ground away.
    let mut health = common::release::fast_health();
    health.grace_s = Some(8);
    let rel = rig.release("3.0.0").health(health).signed(&rig.keys);
    rig.publish(&rig.desired(2).app("sensor", rel).signed(&rig.keys));
    rig.observer.wait_event_for(2, Phase::HealthChecking, SLOW);
    for args in [
        vec!["rm", "-f", good.name.as_str()],
        vec!["rmi", "-f", good.image_id.as_str()],
    ] {
        let out = Command::new("docker").args(&args).output().unwrap();
        assert!(out.status.success(), "docker {args:?}: {out:?}");
    }
    let failed = rig.observer.wait_event_for(2, Phase::RollbackFailed, SLOW);
    let why = failed.reason.clone().unwrap_or_default();
    assert!(why.contains("rollback step failed"), "{failed:?}");
    // Backing off: over 20 s no second report and only a handful of attempts in the log.
    std::thread::sleep(Duration::from_secs(20));
    let events = rig.observer.phases_for(2);
    assert_eq!(
        events
            .iter()
            .filter(|p| **p == Phase::RollbackFailed)
            .count(),
        1,
        "{events:?}"
    );
    let attempts = rig
        .agent
        .log()
        .matches("rollback step failed again")
        .count();
    assert!(attempts <= 6, "{attempts} retries in 20 s");
    // SIGTERM ends the retries at once (the unit's TimeoutStopSec is 180 s).
    let t_stop = Instant::now();
    rig.agent.terminate_within(Duration::from_secs(30));
    let stop_s = t_stop.elapsed().as_secs_f64();
    assert_eq!(
        rig.agent.journal()["txn"]["state"],
        "rolling_back",
        "the stuck rollback is journaled, to be resumed"
    );
    rig.agent.spawn();
    rig.observer.watch_agent(rig.agent.liveness());
    rig.agent.wait_log("resuming an interrupted update", SOON);
    // A newer notice takes over: the box deploys 2.0.0 again under the new sequence.
    let rel = rig.release("2.0.0").signed(&rig.keys);
    rig.publish(&rig.desired(3).app("sensor", rel).signed(&rig.keys));
    let end2 = rig.observer.wait_terminal(2, SLOW);
    assert_eq!(
        end2.phase,
        Phase::Failed,
        "{}",
        rig.observer.describe_events()
    );
    let reason = end2.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("rollback step failed") && reason.contains("sequence 3"),
        "{reason}"
    );
    let end3 = rig.observer.wait_terminal(3, SLOW);
    assert_eq!(
        end3.phase,
        Phase::Committed,
        "{}",
        rig.observer.describe_events()
    );
    let now = only_running(&rig);
    assert_eq!(now.version(), Some("2.0.0"));
    assert!(now.name.ends_with("-s3"), "{}", now.name);
    let r = docker::readings(&now.name, SOON);
    assert_eq!(r["version"], "2.0.0", "{r}");
    let j = rig.agent.journal();
    assert_eq!(j["committed_sequence"], 3, "{j}");
    assert!(j["txn"].is_null(), "{j}");
    eprintln!("stuck rollback: SIGTERM exit in {stop_s:.1} s, {attempts} retries in 20 s");
    timing("stuck_rollback", t0);
}

#[test]
fn two_apps_roll_back_together() {
    let t0 = Instant::now();
    let rig = Rig::start("two-apps");
    rig.install(1, "1.0.0");
    let old = only_running(&rig);

    let a = rig.release("2.0.0").signed(&rig.keys);
    let b = rig.release("3.0.0").app("sensor-b").signed(&rig.keys);
    rig.publish(
        &rig.desired(2)
            .app("sensor", a)
            .app("sensor-b", b)
            .signed(&rig.keys),
    );
    let end = rig.observer.wait_terminal(2, SLOW);
    assert_eq!(
        end.phase,
        Phase::RolledBack,
        "{end:?}\n{}",
        rig.observer.describe_events()
    );
    assert!(
        end.reason
            .as_deref()
            .is_some_and(|r| r.contains("sensor-b") && r.contains("health check")),
        "the reason names the failed app and check: {end:?}"
    );
    // Both were downloaded before anything switched: it is the health gate of the whole set
    // that failed.
    let phases = rig.observer.phases_for(2);
    let at = |p: Phase| phases.iter().position(|x| *x == p);
    assert!(
        at(Phase::Downloaded) < at(Phase::Switching) && at(Phase::Switching).is_some(),
        "{}",
        rig.observer.describe_events()
    );

    let st = rig.observer.wait_state(
        |s| {
            s.update
                .as_ref()
                .is_some_and(|u| u.sequence == 2 && u.phase == Phase::RolledBack)
        },
        SOON,
    );
    assert_eq!(st.apps.len(), 1, "{st:?}");
    assert_eq!(sensor_version(&st), Some("1.0.0"), "{st:?}");
    infra::wait_for("only the 1.0.0 sensor container to remain", SOON, || {
        let c = rig.containers();
        if c.len() == 1
            && c[0].name == old.name
            && c[0].running
            && c[0].restart_policy == "unless-stopped"
        {
            Ok(())
        } else {
            Err(format!("containers: {c:#?}"))
        }
    });
    assert!(rig.containers().iter().all(|c| c.app() != Some("sensor-b")));
    let r = docker::readings(&old.name, SOON);
    assert_eq!(r["version"], "1.0.0", "{r}");
    assert!(r.get("humidity_pct").is_none(), "{r}");
    assert_eq!(
        rig.agent.committed_versions(),
        [("sensor".to_string(), "1.0.0".to_string())].into()
    );
    timing("two_apps_roll_back_together", t0);
}

/// The cross-built agent under qemu-user: the platform is detected by the binary itself.
fn emulated_agent_upgrades(name: &str, binary: AgentBinary, platform: &str) {
    let t0 = Instant::now();
    let rig = Rig::builder(name).agent(move |b| b.binary(binary)).start();
    rig.install(1, "1.0.0");
    let st = rig.observer.last_state().unwrap();
    assert_eq!(st.platform, platform);
    assert_eq!(st.apps["sensor"].digest, infra::digest("1.0.0", platform));

    let rel = rig.release("2.0.0").signed(&rig.keys);
    rig.publish(
        &rig.desired(2)
            .app("sensor", rel)
            .stop_first()
            .signed(&rig.keys),
    );
    let end = rig.observer.wait_terminal(2, SLOW);
    assert_eq!(
        end.phase,
        Phase::Committed,
        "{end:?}\n{}",
        rig.observer.describe_events()
    );
    let want = infra::digest("2.0.0", platform);
    let st = rig.observer.wait_state(
        |s| s.sequence == 2 && sensor_version(s) == Some("2.0.0"),
        SOON,
    );
    assert_eq!(st.platform, platform, "{st:?}");
    assert_eq!(st.apps["sensor"].digest, want, "{st:?}");
    infra::wait_for("one 2.0.0 container", SOON, || {
        let c = rig.containers();
        if c.len() == 1 && c[0].running && c[0].version() == Some("2.0.0") {
            Ok(())
        } else {
            Err(format!("{c:#?}"))
        }
    });
    let c = only_running(&rig);
    assert_eq!(c.image, infra::sensor_image_id("2.0.0", platform));
    let r = docker::readings(&c.name, SOON);
    assert_eq!(r["version"], "2.0.0", "{r}");
    assert_eq!(r["humidity_pct"], 41.5, "{r}");
    timing(name, t0);
}

#[test]
fn aarch64_agent_under_qemu_upgrades() {
    emulated_agent_upgrades("qemu-aarch64", AgentBinary::qemu_aarch64(), ARM64);
}

#[test]
fn armv7_agent_under_qemu_upgrades() {
    emulated_agent_upgrades("qemu-armv7", AgentBinary::qemu_armv7(), ARMV7);
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sign `body` as a DSSE envelope of `payload_type` with `openssl pkeyutl -sign -rawin` over the
/// PAE bytes, using the PEM private key `key` (in `dir`) whose public key is `public`.
fn openssl_envelope(
    dir: &Path,
    key: &str,
    public: &ferry_protocol::PublicKey,
    payload_type: &str,
    body: &[u8],
) -> ferry_protocol::Envelope {
    use base64::Engine as _;
    let tag = fastrand::u32(..);
    let pae = format!("pae-{tag}.bin");
    let sig = format!("sig-{tag}.bin");
    std::fs::write(
        dir.join(&pae),
        ferry_protocol::dsse::pae(payload_type, body),
    )
    .unwrap();
    openssl(
        &[
            "pkeyutl", "-sign", "-rawin", "-inkey", key, "-in", &pae, "-out", &sig,
        ],
        dir,
    );
    let sig = std::fs::read(dir.join(&sig)).unwrap();
    assert_eq!(sig.len(), 64, "an Ed25519 signature");
    let b64 = base64::engine::general_purpose::STANDARD;
    ferry_protocol::Envelope {
        payload_type: payload_type.into(),
        payload: b64.encode(body),
        signatures: vec![ferry_protocol::dsse::EnvelopeSignature {
            keyid: public.id().to_string(),
            sig: b64.encode(sig),
        }],
    }
}

#[test]
fn openssl_signed_notice_is_committed() {
    let t0 = Instant::now();
    infra::require_infra();
    let keydir = tempfile::tempdir().unwrap();
    let dir = keydir.path().to_path_buf();
    for role in ["release", "controller"] {
        openssl(
            &[
                "genpkey",
                "-algorithm",
                "ed25519",
                "-out",
                &format!("{role}.key"),
            ],
            &dir,
        );
        openssl(
            &[
                "pkey",
                "-in",
                &format!("{role}.key"),
                "-pubout",
                "-out",
                &format!("{role}.pub"),
            ],
            &dir,
        );
    }
    let release_pub = ferry_protocol::PublicKey::load(&dir.join("release.pub")).unwrap();
    let controller_pub = ferry_protocol::PublicKey::load(&dir.join("controller.pub")).unwrap();
    // The openssl private keys load too, and are the same keys.
    let k = ferry_protocol::PrivateKey::load(&dir.join("release.key")).unwrap();
    assert_eq!(k.public().id(), release_pub.id());

    let (rp, cp) = (dir.join("release.pub"), dir.join("controller.pub"));
    let rig = Rig::builder("openssl")
        .agent(move |b| b.release_keys(&[&rp], 1).controller_keys(&[&cp]))
        .start();

    let release = rig.release("2.0.0").build();
    let rel_env = openssl_envelope(
        &dir,
        "release.key",
        &release_pub,
        ferry_protocol::dsse::RELEASE_PAYLOAD_TYPE,
        release.to_json().as_bytes(),
    )
    .to_json();
    let trusted = ferry_protocol::TrustedKeys::load(&[dir.join("release.pub")]).unwrap();
    let v = ferry_protocol::verify_release(rel_env.as_bytes(), &trusted, 1)
        .expect("ferry_protocol accepts the openssl-signed release");
    assert_eq!(v.release, release);
    assert_eq!(v.signers.len(), 1);

    let body = rig.desired(1).app("sensor", rel_env).build().to_json();
    let notice = openssl_envelope(
        &dir,
        "controller.key",
        &controller_pub,
        ferry_protocol::dsse::DESIRED_PAYLOAD_TYPE,
        body.as_bytes(),
    )
    .to_json();
    rig.publish(notice.as_bytes());
    let end = rig.observer.wait_terminal(1, SLOW);
    assert_eq!(
        end.phase,
        Phase::Committed,
        "{end:?}\n{}",
        rig.observer.describe_events()
    );
    let st = rig.observer.wait_state(
        |s| s.sequence == 1 && sensor_version(s) == Some("2.0.0"),
        SOON,
    );
    assert_eq!(st.apps["sensor"].digest, infra::digest("2.0.0", ARM64));
    let c = only_running(&rig);
    let r = docker::readings(&c.name, SOON);
    assert_eq!(r["version"], "2.0.0", "{r}");
    timing("openssl_signed_notice_is_committed", t0);
}
