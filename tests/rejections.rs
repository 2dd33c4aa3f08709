//! Hostile and invalid desired-state notices against the real agent (protocol §2 and §6): each one
//! must be refused with a `rejected` event whose reason names the problem, be logged, and change
//! NOTHING — the same container keeps running 1.0.0, `journal.json` is byte-identical, no container
//! is created. A byte-identical copy of the accepted notice is a silent no-op. After all of that a
//! valid notice still commits.
//!
//! The cheap cases share one rig (one device, many bad notices in sequence); every case is checked
//! on its own and failures are collected, so one broken rule does not hide the others.
//!
//! Every release committed in this binary uses the 1.0.0 sample image (versions 1.0.0, 1.0.1 and
//! 0.9.0 all point at its digest): no agent here ever prunes an image another rig of this binary
//! is about to run.
//!
//! Run with `cargo test --test rejections -- --test-threads=2`.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::infra::{self, ARM64, ARMV7};
use common::keys::Key;
use common::{desired, docker, release_with_image, Phase, Rig, SLOW};
use ferry_protocol::dsse::{DESIRED_PAYLOAD_TYPE, RELEASE_PAYLOAD_TYPE};
use ferry_protocol::Envelope;

/// Bound for a reaction to one notice (verification is immediate; MQTT round trips are local).
const QUICK: Duration = Duration::from_secs(30);
/// Bound for things that follow an event closely (a state report, the journal closing).
const SOON: Duration = Duration::from_secs(60);

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn timing(name: &str, t0: Instant) {
    eprintln!("TIMING {name}: {:.1} s", t0.elapsed().as_secs_f64());
}

/// Poll `f` until it returns `Ok`, or return its last `Err` after `timeout`.
fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Publish `notice` (sequence `seq`) and wait until it is committed with sensor `version`, the
/// state report shows it and the journal has closed the transaction.
fn commit(rig: &Rig, seq: u64, notice: &[u8], version: &str) {
    rig.publish(notice);
    let ev = rig.observer.wait_terminal(seq, SLOW);
    assert_eq!(
        ev.phase,
        Phase::Committed,
        "sequence {seq} (sensor {version}) did not commit: {ev:?}\n{}",
        rig.observer.describe_events()
    );
    rig.observer.wait_state(
        |s| s.sequence == seq && s.apps.get("sensor").is_some_and(|a| a.version == version),
        SOON,
    );
    infra::wait_for("the journal to close the transaction", SOON, || {
        let j = rig.agent.journal();
        if j["txn"].is_null() {
            Ok(())
        } else {
            Err(format!("txn still open: {}", j["txn"]))
        }
    });
}

/// What must not change when a notice is refused.
#[derive(Clone, Debug, PartialEq)]
struct Snapshot {
    journal: Vec<u8>,
    /// (id, name, running, version label) of every container of the device.
    containers: Vec<(String, String, bool, Option<String>)>,
}

fn snapshot(rig: &Rig) -> Snapshot {
    let journal = std::fs::read(rig.agent.state_dir().join("journal.json")).expect("journal.json");
    let containers = rig
        .containers()
        .into_iter()
        .map(|c| {
            let v = c.version().map(str::to_string);
            (c.id, c.name, c.running, v)
        })
        .collect();
    Snapshot {
        journal,
        containers,
    }
}

fn log_lines_with(rig: &Rig, needle: &str) -> Vec<String> {
    rig.agent
        .log()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

fn rejected_events(rig: &Rig) -> Vec<common::Event> {
    rig.observer
        .events()
        .into_iter()
        .filter(|e| e.phase == Phase::Rejected)
        .collect()
}

/// Sends bad notices to a device with a committed set and checks, case by case, that each one is
/// refused and changes nothing. Failures are collected; [`Probe::finish`] reports them all.
struct Probe<'a> {
    rig: &'a Rig,
    base: Snapshot,
    /// The sequence and container the device must keep reporting.
    sequence: u64,
    container: String,
    failures: Vec<String>,
    /// (case, reason) of every rejection seen, printed at the end.
    reasons: Vec<(String, String)>,
}

impl<'a> Probe<'a> {
    fn new(rig: &'a Rig) -> Probe<'a> {
        let base = snapshot(rig);
        assert_eq!(
            base.containers.len(),
            1,
            "one container before the bad notices: {:?}",
            base.containers
        );
        let j = rig.agent.journal();
        Probe {
            rig,
            sequence: j["last_sequence"].as_u64().expect("last_sequence"),
            container: base.containers[0].1.clone(),
            base,
            failures: Vec::new(),
            reasons: Vec::new(),
        }
    }

    /// Publish `notice`; it must be rejected with a reason containing `word`.
    fn reject(&mut self, case: &str, notice: &[u8], word: &str) {
        self.reject_as(case, notice, word, true)
    }

    /// A rejection the controller must not pin on the device's current notice (another
    /// device's notice, a replay, an equivocation): its event carries sequence 0, no rollout.
    fn reject_unattributed(&mut self, case: &str, notice: &[u8], word: &str) {
        self.reject_as(case, notice, word, false)
    }

    fn reject_as(&mut self, case: &str, notice: &[u8], word: &str, attributed: bool) {
        let t0 = Instant::now();
        let checked = self.check_rejected(notice, word).and_then(|(reason, ev)| {
            if !attributed && (ev.sequence, ev.rollout.as_deref()) != (0, None) {
                return Err(format!(
                    "the rejection is attributed: sequence {}, rollout {:?} (want 0, none)",
                    ev.sequence, ev.rollout
                ));
            }
            Ok(reason)
        });
        match checked {
            Ok(reason) => {
                eprintln!(
                    "  ok  {case} ({:.2} s): {reason}",
                    t0.elapsed().as_secs_f64()
                );
                self.reasons.push((case.to_string(), reason));
            }
            Err(e) => {
                eprintln!("  FAIL {case}: {e}");
                self.failures.push(format!("{case}: {e}"));
            }
        }
        self.check_unchanged(case);
    }

    fn check_rejected(&self, notice: &[u8], word: &str) -> Result<(String, common::Event), String> {
        let rig = self.rig;
        let n_rejected = rejected_events(rig).len();
        let n_logged = log_lines_with(rig, "notice rejected").len();
        let n_states = rig.observer.states().len();
        rig.publish(notice);

        // (a) a `rejected` event naming the problem.
        let ev = poll(QUICK, || {
            rejected_events(rig)
                .into_iter()
                .nth(n_rejected)
                .ok_or_else(|| "no new `rejected` event".to_string())
        })
        .map_err(|e| format!("{e}; events:\n{}", rig.observer.describe_events()))?;
        let reason = ev.reason.clone().unwrap_or_default();
        if !reason.to_lowercase().contains(&word.to_lowercase()) {
            return Err(format!("the reason does not mention {word:?}: {reason:?}"));
        }
        // (c) the agent's log has it.
        let line = poll(QUICK, || {
            log_lines_with(rig, "notice rejected")
                .into_iter()
                .nth(n_logged)
                .ok_or_else(|| "no new `notice rejected` line in the agent log".to_string())
        })?;
        if !line.contains(word) {
            return Err(format!("the log line does not mention {word:?}: {line}"));
        }
        // The retained state reports the rejection and still the same committed set.
        let st = poll(QUICK, || {
            let states = rig.observer.states();
            let s = states
                .get(n_states..)
                .and_then(|new| {
                    new.iter().rev().find(|s| {
                        s.update
                            .as_ref()
                            .is_some_and(|u| u.phase == Phase::Rejected)
                    })
                })
                .cloned();
            s.ok_or_else(|| "no state report with the rejection".to_string())
        })?;
        let up = st.update.as_ref().unwrap();
        if up.error.as_deref() != Some(reason.as_str()) {
            return Err(format!(
                "state report's error {:?} is not the event's reason",
                up.error
            ));
        }
        let app = st.apps.get("sensor");
        if st.sequence != self.sequence
            || st.apps.len() != 1
            || app.map(|a| (a.version.as_str(), a.container.as_str()))
                != Some(("1.0.0", self.container.as_str()))
        {
            return Err(format!(
                "the state report changed: sequence {}, apps {:?}",
                st.sequence, st.apps
            ));
        }
        Ok((reason, ev))
    }

    /// (b) nothing changed on the device. A change invalidates every later case: stop there.
    fn check_unchanged(&mut self, case: &str) {
        let now = snapshot(self.rig);
        if now.containers != self.base.containers {
            self.failures.push(format!(
                "{case}: the containers changed:\n  before {:?}\n  after  {:?}",
                self.base.containers, now.containers
            ));
        }
        if now.journal != self.base.journal {
            self.failures.push(format!(
                "{case}: journal.json changed:\n--- before\n{}\n--- after\n{}",
                String::from_utf8_lossy(&self.base.journal),
                String::from_utf8_lossy(&now.journal)
            ));
        }
        if now != self.base {
            self.finish();
        }
    }

    /// Publish an exact copy of the notice already accepted: no event, no change at all.
    fn duplicate(&mut self, case: &str, notice: &[u8]) {
        let rig = self.rig;
        let needle = "notice already applied";
        let n_logged = log_lines_with(rig, needle).len();
        let n_events = rig.observer.events().len();
        rig.publish(notice);
        // The agent says it saw it (debug level, on in the harness) ...
        if let Err(e) = poll(QUICK, || {
            (log_lines_with(rig, needle).len() > n_logged)
                .then_some(())
                .ok_or_else(|| format!("no new {needle:?} line in the agent log"))
        }) {
            self.failures.push(format!("{case}: {e}"));
        }
        // ... and reports nothing: not `received`, not `rejected`.
        std::thread::sleep(Duration::from_secs(2));
        let events = rig.observer.events();
        if events.len() != n_events {
            self.failures.push(format!(
                "{case}: a duplicate must be silent, got events {:?}",
                &events[n_events..]
            ));
        } else {
            eprintln!("  ok  {case}: no event, nothing changed");
        }
        self.check_unchanged(case);
    }

    fn finish(&self) {
        eprintln!("rejection reasons seen:");
        for (case, reason) in &self.reasons {
            eprintln!("  {case}: {reason}");
        }
        if !self.failures.is_empty() {
            panic!(
                "{} failure(s):\n- {}\nevents:\n{}",
                self.failures.len(),
                self.failures.join("\n- "),
                self.rig.observer.describe_events()
            );
        }
    }
}

/// The notice's envelope as a JSON value, for tampering.
fn envelope_json(notice: &[u8]) -> serde_json::Value {
    serde_json::from_slice(notice).expect("notice is JSON")
}

#[test]
fn bad_notices_change_nothing() {
    let t0 = Instant::now();
    let rig = Rig::start("rejections");
    let keys = &rig.keys;
    let untrusted = keys.extra("untrusted");

    // The starting point: sensor 1.0.0 committed at sequence 10.
    let good = || rig.release("1.0.0").signed(keys);
    let installed = rig.desired(10).app("sensor", good()).signed(keys);
    commit(&rig, 10, &installed, "1.0.0");
    let mut p = Probe::new(&rig);
    eprintln!(
        "baseline: container {} at sequence {}",
        p.container, p.sequence
    );

    // ----- the envelope (protocol §2): checked before anything of the body is trusted.
    let valid11 = rig.desired(11).app("sensor", good());
    {
        let mut env = valid11.envelope(&[&keys.controller.key]);
        let body = String::from_utf8(B64.decode(&env.payload).unwrap()).unwrap();
        let forged = body.replace("\"rollout\":\"r-11\"", "\"rollout\":\"r-evil\"");
        assert_ne!(forged, body, "the forgery must alter the payload");
        env.payload = B64.encode(forged);
        p.reject(
            "forged signature (payload altered after signing)",
            env.to_json().as_bytes(),
            "did not verify",
        );
    }
    p.reject(
        "notice signed by the release key (wrong role)",
        &valid11.sign(&[&keys.release.key]),
        "not trusted for the controller role",
    );
    p.reject(
        "notice signed by an untrusted key",
        &valid11.sign(&[&untrusted.key]),
        "not trusted for the controller role",
    );
    {
        let mut env = valid11.envelope(&[&keys.controller.key]);
        env.signatures.clear();
        p.reject(
            "notice without signatures",
            env.to_json().as_bytes(),
            "no signatures",
        );
    }
    {
        let body = valid11.build().to_json();
        let env = Envelope::sign(
            RELEASE_PAYLOAD_TYPE,
            body.as_bytes(),
            &[&keys.controller.key],
        );
        p.reject(
            "notice with the release payloadType",
            env.to_json().as_bytes(),
            "wrong payloadType",
        );
    }
    {
        // Valid JSON whitespace after a valid notice: only the size cap refuses it.
        let mut big = valid11.signed(keys);
        big.resize(big.len() + 257 * 1024, b' ');
        assert!(big.len() > 256 * 1024);
        p.reject(
            "oversized notice (> 256 KiB)",
            &big,
            "larger than the 262144-byte limit",
        );
    }
    {
        let good = valid11.signed(keys);
        p.reject("malformed JSON", &good[..good.len() / 2], "malformed");
    }
    {
        let mut v = envelope_json(&valid11.signed(keys));
        v["comment"] = "added in transit".into();
        p.reject(
            "envelope with an unknown field",
            v.to_string().as_bytes(),
            "unknown field",
        );
    }
    {
        let mut body: serde_json::Value = serde_json::from_str(&valid11.build().to_json()).unwrap();
        body["priority"] = 1.into();
        let env = Envelope::sign(
            DESIRED_PAYLOAD_TYPE,
            body.to_string().as_bytes(),
            &[&keys.controller.key],
        );
        p.reject(
            "signed body with an unknown field",
            env.to_json().as_bytes(),
            "unknown field",
        );
    }

    // ----- the embedded releases: the release role, not the controller's.
    p.reject(
        "release signed by the controller key (wrong role)",
        &rig.desired(12)
            .app("sensor", rig.release("1.0.0").sign(&[&keys.controller.key]))
            .signed(keys),
        "not trusted for the release role",
    );
    p.reject(
        "release signed by an untrusted key",
        &rig.desired(12)
            .app("sensor", rig.release("1.0.0").sign(&[&untrusted.key]))
            .signed(keys),
        "not trusted for the release role",
    );
    p.reject(
        "release whose app differs from its key",
        &rig.desired(12)
            .app("sensor", rig.release("1.0.0").app("other").signed(keys))
            .signed(keys),
        "does not match the signed release's app",
    );

    // ----- sequence rules (§6.3).
    p.reject_unattributed(
        "replayed sequence (lower than the last)",
        &rig.desired(9).app("sensor", good()).signed(keys),
        "replay",
    );
    p.reject_unattributed(
        "same sequence, different content (equivocation)",
        &rig.desired(10)
            .app("sensor", good())
            .rollout(Some("r-other"))
            .signed(keys),
        "equivocation",
    );

    // ----- time (§6.4), device (§6.2), platform (§3).
    let now = chrono::Utc::now();
    p.reject(
        "expired notice",
        &rig.desired(13)
            .app("sensor", good())
            .issued_at(now - chrono::Duration::hours(2))
            .expires_at(now - chrono::Duration::hours(1))
            .signed(keys),
        "expired",
    );
    p.reject(
        "issued_at in the future",
        &rig.desired(13)
            .app("sensor", good())
            .issued_at(now + chrono::Duration::hours(1))
            .expires_at(now + chrono::Duration::hours(2))
            .signed(keys),
        "in the future",
    );
    // Issue 10: `expires_at + skew` overflowed on this date and the agent (panic = abort)
    // crash-looped on the retained notice. Refused with a reason; the agent lives on (the next
    // cases are answered by the same process).
    p.reject(
        "expires_at in the year 262142",
        &rig.desired(13)
            .app("sensor", good())
            .expires_at(chrono::DateTime::<chrono::Utc>::MAX_UTC)
            .signed(keys),
        "out of range",
    );
    p.reject_unattributed(
        "notice for another device",
        &desired("it-someone-else", 13)
            .app("sensor", good())
            .signed(keys),
        "is for device \"it-someone-else\"",
    );
    p.reject(
        "release without this device's platform",
        &rig.desired(13)
            .app(
                "sensor",
                rig.release("1.0.0").only_platform(ARMV7).signed(keys),
            )
            .signed(keys),
        &format!("no image for this device's platform {ARM64}"),
    );

    // ----- local policy (§6.7) wins over signed requests.
    let policy = |edit: fn(&mut ferry_protocol::Release)| {
        rig.desired(14)
            .app("sensor", rig.release("1.0.0").edit(edit).signed(keys))
            .signed(keys)
    };
    p.reject(
        "policy: privileged",
        &policy(|r| r.container.privileged = true),
        "privileged",
    );
    p.reject(
        "policy: bind outside the allowed prefixes",
        &policy(|r| {
            r.container.binds.push(ferry_protocol::release::BindSpec {
                host: "/etc".into(),
                container: "/host-etc".into(),
                read_only: true,
            })
        }),
        "outside policy.allowed_bind_prefixes",
    );
    // Issue 10: an app binds only from its own directory under the prefix (and the shared
    // sensor directory): not another app's data, nor the whole prefix.
    for (what, host) in [
        (
            "policy: bind into another app's directory",
            format!("/var/lib/ferry-apps/{}/modem/apn", rig.device),
        ),
        (
            "policy: bind the whole prefix",
            format!("/var/lib/ferry-apps/{}", rig.device),
        ),
    ] {
        let notice = rig
            .desired(14)
            .app(
                "sensor",
                rig.release("1.0.0")
                    .bind(&host, "/data", false)
                    .signed(keys),
            )
            .signed(keys);
        p.reject(what, &notice, "outside its own directory");
    }
    p.reject(
        "policy: host network",
        &policy(|r| r.container.network_mode = Some("host".into())),
        "host networking",
    );
    p.reject(
        "policy: device node",
        &policy(|r| r.container.devices.push("/dev/i2c-1".into())),
        "not in policy.allowed_devices",
    );
    // Issue 10: policy that holds on disk and in Docker's terms.
    p.reject(
        "policy: container path carrying mount options (:rshared)",
        &policy(|r| {
            r.container.binds.push(ferry_protocol::release::BindSpec {
                host: "/var/lib/ferry-apps/it-rejections/data".into(),
                container: "/data:rshared".into(),
                read_only: false,
            })
        }),
        "carry mount options",
    );
    p.reject(
        "policy: more memory than policy.max_memory_mb",
        &policy(|r| r.container.memory_mb = Some(4096)),
        "policy.max_memory_mb",
    );
    p.reject(
        "policy: more pids than policy.max_pids",
        &policy(|r| r.container.pids = Some(1_000_000)),
        "policy.max_pids",
    );
    p.reject(
        "policy: privileged host port",
        &policy(|r| {
            r.container.ports.push(ferry_protocol::release::PortSpec {
                host: 80,
                container: 8080,
                proto: Default::default(),
            })
        }),
        "outside policy.allowed_host_ports",
    );
    {
        // An earlier release of the app planted a symlink to /etc in its own directory.
        let dir = std::path::PathBuf::from(format!("/var/lib/ferry-apps/{}/sensor", rig.device));
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join("planted");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/etc", &link).unwrap();
        let host = format!("{}/passwd-dir", link.display());
        let notice = rig
            .desired(14)
            .app(
                "sensor",
                rig.release("1.0.0")
                    .edit(|r| {
                        r.container.binds.push(ferry_protocol::release::BindSpec {
                            host,
                            container: "/host-etc".into(),
                            read_only: true,
                        })
                    })
                    .signed(keys),
            )
            .signed(keys);
        p.reject(
            "policy: bind source through a symlink below the prefix",
            &notice,
            "is a symlink (-> /etc)",
        );
        let _ = std::fs::remove_file(&link);
    }

    // ----- the retained copy of the accepted notice: a no-op.
    p.duplicate("same sequence, byte-identical (retained copy)", &installed);
    // Issue 9: the same signed payload in other envelope bytes is the same notice, not
    // equivocation (the duplicate check hashes the payload, not the envelope).
    {
        let spaced = serde_json::to_vec_pretty(&envelope_json(&installed)).unwrap();
        assert_ne!(spaced, installed);
        p.duplicate("the accepted notice re-serialized (spaces added)", &spaced);
    }

    // ----- downgrade (§6.5): 0.9.0 is older than the committed 1.0.0 (same image as 1.0.0).
    let older = || {
        release_with_image("0.9.0", "1.0.0")
            .sensors(&rig.sensors)
            .signed(keys)
    };
    p.reject(
        "downgrade without allow_downgrade",
        &rig.desired(15).app("sensor", older()).signed(keys),
        "needs allow_downgrade",
    );
    p.finish();

    // ----- not wedged: the same downgrade WITH allow_downgrade is accepted and committed.
    let old_container = p.container.clone();
    let n = rig.desired(16).app("sensor", older()).allow_downgrade(true);
    commit(&rig, 16, &n.signed(keys), "0.9.0");
    assert_eq!(
        rig.observer.phases_for(16),
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
    let j = rig.agent.journal();
    assert_eq!(j["last_sequence"], 16, "{j}");
    assert_eq!(j["committed_sequence"], 16, "{j}");
    assert_eq!(rig.agent.committed_versions()["sensor"], "0.9.0", "{j}");
    infra::wait_for("only the 0.9.0 container to remain", SOON, || {
        let c = rig.containers();
        match c.as_slice() {
            [c] if c.running && c.version() == Some("0.9.0") && c.name != old_container => Ok(()),
            _ => Err(format!("{c:#?}")),
        }
    });
    let c = &rig.running()[0];
    // The 0.9.0 record names the 1.0.0 image, which serves (1.x reports temperature only).
    let r = docker::readings(&c.name, SOON);
    assert_eq!(r["version"], "1.0.0", "{r}");
    assert_eq!(r["temperature_c"], 23.25, "{r}");
    timing("bad_notices_change_nothing", t0);
}

/// `release_threshold = 2` with two release keys: one signature, or one key signing twice, is
/// not enough; both keys are. The releases here differ only in their signatures.
#[test]
fn release_threshold_counts_distinct_keys() {
    let t0 = Instant::now();
    let keydir = tempfile::tempdir().unwrap();
    let second = Key::generate(keydir.path(), "release2");
    let pem = second.public_pem.display().to_string();
    let rig = Rig::builder("threshold")
        .agent(move |b| {
            b.config(move |t| {
                let trust = t["trust"].as_table_mut().unwrap();
                trust["release_keys"]
                    .as_array_mut()
                    .unwrap()
                    .push(pem.into());
                trust.insert("release_threshold".into(), toml::Value::Integer(2));
            })
        })
        .start();
    let keys = &rig.keys;
    let (k1, k2) = (&keys.release.key, &second.key);

    // Installing needs both keys already.
    let install = rig
        .desired(1)
        .app("sensor", rig.release("1.0.0").sign(&[k1, k2]))
        .signed(keys);
    commit(&rig, 1, &install, "1.0.0");
    let mut p = Probe::new(&rig);

    // 1.0.1: a new release record of the 1.0.0 image.
    let next = || release_with_image("1.0.1", "1.0.0").sensors(&rig.sensors);
    p.reject(
        "release signed by one of two required keys",
        &rig.desired(2)
            .app("sensor", next().sign(&[k1]))
            .signed(keys),
        "1 valid signature(s) by distinct trusted release key(s), 2 required",
    );
    p.reject(
        "release signed by the other key only",
        &rig.desired(2)
            .app("sensor", next().sign(&[k2]))
            .signed(keys),
        "2 required",
    );
    p.reject(
        "release signed twice by the same key",
        &rig.desired(2)
            .app("sensor", next().sign(&[k1, k1]))
            .signed(keys),
        "1 valid signature(s) by distinct trusted release key(s), 2 required",
    );
    p.finish();

    let both = rig
        .desired(3)
        .app("sensor", next().sign(&[k1, k2]))
        .signed(keys);
    commit(&rig, 3, &both, "1.0.1");
    assert_eq!(rig.agent.committed_versions()["sensor"], "1.0.1");
    infra::wait_for("one running 1.0.1 container", SOON, || {
        let c = rig.containers();
        match c.as_slice() {
            [c] if c.running && c.version() == Some("1.0.1") => Ok(()),
            _ => Err(format!("{c:#?}")),
        }
    });
    timing("release_threshold_counts_distinct_keys", t0);
}
