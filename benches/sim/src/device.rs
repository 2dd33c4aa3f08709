//! One simulated device, pure: notice verification as the agent does it (protocol §6 rules 1–5
//! and the platform check of §3, the rules being `ferry_protocol::notice_rules`, the agent's own)
//! and the update state machine with the reports each phase produces. No I/O and no clock: the
//! caller passes `now` and publishes the returned reports.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use std::collections::HashMap;
use std::sync::Mutex;

use ferry_protocol::dsse::{self, Expect};
use ferry_protocol::notice_rules::{trusted_time_after, DeviceState, Verdict};
use ferry_protocol::report::{AppState, Event, Phase, StateReport, UpdateStatus};
use ferry_protocol::{check_notice, Desired, NoticeError, Release, RuleViolation, Trust};
use sha2::{Digest, Sha256};

/// An app as the device runs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppVersion {
    pub version: semver::Version,
    pub digest: String,
}

/// A fake but well-formed manifest digest, stable for (app, version, platform).
pub fn fake_digest(app: &str, version: &str, platform: &str) -> String {
    let h = Sha256::digest(format!("{app}:{version}:{platform}").as_bytes());
    format!("sha256:{}", hex::encode(h))
}

/// Something the device publishes.
#[derive(Clone, Debug, PartialEq)]
pub enum Report {
    State(Box<StateReport>),
    Event(Box<Event>),
}

impl Report {
    pub fn phase(&self) -> Option<Phase> {
        match self {
            Report::Event(e) => Some(e.phase),
            Report::State(s) => s.update.as_ref().map(|u| u.phase),
        }
    }
}

/// How an accepted update will end (decided by the simulator's failure rate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Commit,
    RollBack,
}

/// Why a notice was refused. `sequence` / `rollout` are only known once the signature verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// As the agent publishes it.
    pub reason: String,
    /// `reason` without the clock, which differs per device and per second: rejections are
    /// counted by it.
    pub key: String,
    pub sequence: u64,
    pub rollout: Option<String>,
}

/// The statistics key of a rule violation: its text, except for the time rules whose text holds
/// the device's clock.
fn rejection_key(e: &RuleViolation) -> String {
    match e {
        RuleViolation::IssuedInFuture { issued_at: t, .. }
        | RuleViolation::Expired { expires_at: t, .. } => {
            format!("{}: {}", e.rule(), t.to_rfc3339())
        }
        _ => e.to_string(),
    }
}

/// What a verified, accepted notice asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    pub sequence: u64,
    pub rollout: Option<String>,
    /// The complete set of apps to run afterwards.
    pub target: BTreeMap<String, AppVersion>,
    pub outcome: Outcome,
    /// The phase last entered; `None` before `Received`.
    pub phase: Option<Phase>,
}

#[derive(Debug)]
pub enum Check {
    Accept(Update),
    /// The notice already accepted, byte for byte (a retained copy seen again).
    Duplicate,
    /// The same rejected notice again: nothing new to report.
    SameRejection,
    Reject(Rejection),
}

/// The phase after `phase` for an update ending in `outcome`; `None` once terminal.
/// `None` as input is the start (before `Received`).
pub fn next_phase(phase: Option<Phase>, outcome: Outcome) -> Option<Phase> {
    Some(match phase {
        None => Phase::Received,
        Some(Phase::Received) => Phase::Verified,
        Some(Phase::Verified) => Phase::Downloading,
        Some(Phase::Downloading) => Phase::Downloaded,
        Some(Phase::Downloaded) => Phase::Switching,
        Some(Phase::Switching) => Phase::HealthChecking,
        Some(Phase::HealthChecking) => match outcome {
            Outcome::Commit => Phase::Committed,
            Outcome::RollBack => Phase::RollingBack,
        },
        // The simulator's rollbacks never fail; a failed step would retry into `rolled_back`.
        Some(Phase::RollingBack | Phase::RollbackFailed) => Phase::RolledBack,
        Some(
            Phase::Committed
            | Phase::RolledBack
            | Phase::Failed
            | Phase::Rejected
            | Phase::Superseded,
        ) => return None,
    })
}

/// Which configured wait comes before entering `phase`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    Pull,
    Health,
}

pub fn wait_before(phase: Phase) -> Option<Wait> {
    match phase {
        Phase::Downloaded => Some(Wait::Pull),
        Phase::Committed | Phase::RollingBack => Some(Wait::Health),
        _ => None,
    }
}

pub const SIMULATED_FAILURE: &str =
    "health check failed 3 consecutive times, last: GET /healthz: 503 (simulated failure)";

/// Verification settings shared by all devices.
pub struct Verifier {
    pub trust: Trust,
    pub clock_skew: Duration,
    /// Release envelopes already verified, by the SHA-256 of their bytes: the same bytes verify
    /// the same way, so each distinct release is checked once per process instead of once per
    /// simulated device (which would spend the benchmark machine's CPU on the simulator).
    releases: Mutex<HashMap<[u8; 32], Release>>,
}

impl Verifier {
    pub fn new(trust: Trust, clock_skew: Duration) -> Verifier {
        Verifier {
            trust,
            clock_skew,
            releases: Mutex::new(HashMap::new()),
        }
    }

    /// [`ferry_protocol::verify_notice`], in the same order and with the same errors, with
    /// already verified release envelopes taken from the cache. The controller's signature is
    /// always checked.
    pub fn verify_notice(&self, raw: &[u8]) -> Result<(Desired, Vec<Release>), NoticeError> {
        let v = dsse::verify(raw, Expect::desired(), &self.trust.controller)
            .map_err(NoticeError::Desired)?;
        let desired = Desired::parse(&v.body).map_err(NoticeError::DesiredBody)?;
        let mut releases = Vec::with_capacity(desired.apps.len());
        for (app, env) in &desired.apps {
            let bytes = env.get().as_bytes();
            let key: [u8; 32] = Sha256::digest(bytes).into();
            let cached = self.lock().get(&key).cloned();
            let release = match cached {
                Some(r) => r,
                None => {
                    let rv = dsse::verify(
                        bytes,
                        Expect::release(self.trust.release_threshold),
                        &self.trust.release,
                    )
                    .map_err(|source| NoticeError::Release {
                        app: app.clone(),
                        source,
                    })?;
                    let r =
                        Release::parse(&rv.body).map_err(|source| NoticeError::ReleaseBody {
                            app: app.clone(),
                            source,
                        })?;
                    let mut cache = self.lock();
                    if cache.len() >= 256 {
                        cache.clear();
                    }
                    cache.insert(key, r.clone());
                    r
                }
            };
            if &release.app != app {
                return Err(NoticeError::AppMismatch {
                    key: app.clone(),
                    app: release.app,
                });
            }
            releases.push(release);
        }
        Ok((desired, releases))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Release>> {
        self.releases.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Clone, Debug)]
pub struct Device {
    pub id: String,
    pub platform: String,
    pub agent_version: String,
    pub labels: BTreeMap<String, String>,
    /// The committed set.
    pub apps: BTreeMap<String, AppVersion>,
    /// The last accepted sequence (a real agent fsyncs it before acting).
    pub last_sequence: u64,
    last_sha256: Option<[u8; 32]>,
    last_rejected_sha256: Option<[u8; 32]>,
    /// The newest `issued_at` accepted.
    trusted_time: Option<DateTime<Utc>>,
    /// The current or last update, as reported in the state's `update`.
    status: Option<UpdateStatus>,
}

impl Device {
    pub fn new(
        id: String,
        platform: String,
        agent_version: String,
        labels: BTreeMap<String, String>,
        apps: BTreeMap<String, AppVersion>,
    ) -> Device {
        Device {
            id,
            platform,
            agent_version,
            labels,
            apps,
            last_sequence: 0,
            last_sha256: None,
            last_rejected_sha256: None,
            trusted_time: None,
            status: None,
        }
    }

    /// The retained state report as of now.
    pub fn state(&self, now: DateTime<Utc>) -> StateReport {
        StateReport {
            trust: None,
            device: self.id.clone(),
            agent_version: self.agent_version.clone(),
            platform: self.platform.clone(),
            sequence: self.last_sequence,
            apps: self
                .apps
                .iter()
                .map(|(name, a)| {
                    (
                        name.clone(),
                        AppState {
                            version: a.version.to_string(),
                            digest: a.digest.clone(),
                            container: format!("ferry-{}-{name}", self.id),
                            health: "healthy".into(),
                        },
                    )
                })
                .collect(),
            update: self.status.clone(),
            ts: now,
            labels: self.labels.clone(),
        }
    }

    /// Verify a raw message from the `desired` topic like the agent does. On acceptance the
    /// sequence, the notice's hash and the trusted time are recorded before anything else.
    pub fn check(
        &mut self,
        raw: &[u8],
        v: &Verifier,
        now: DateTime<Utc>,
        outcome: Outcome,
    ) -> Check {
        let sha: [u8; 32] = Sha256::digest(raw).into();
        let result = self.verify(raw, &sha, v, now, outcome);
        match result {
            Ok(Some(u)) => {
                self.last_sequence = u.sequence;
                self.last_sha256 = Some(sha);
                self.last_rejected_sha256 = None;
                Check::Accept(u)
            }
            Ok(None) => Check::Duplicate,
            Err(_) if self.last_rejected_sha256 == Some(sha) => Check::SameRejection,
            Err(r) => {
                self.last_rejected_sha256 = Some(sha);
                Check::Reject(r)
            }
        }
    }

    fn verify(
        &mut self,
        raw: &[u8],
        sha: &[u8; 32],
        v: &Verifier,
        now: DateTime<Utc>,
        outcome: Outcome,
    ) -> Result<Option<Update>, Rejection> {
        // §6.1 / §2: signatures (controller, then each release with its threshold) before
        // any field is trusted.
        let (desired, releases) = v.verify_notice(raw).map_err(|e| {
            let reason = e.to_string();
            Rejection {
                key: reason.clone(),
                reason,
                sequence: 0,
                rollout: None,
            }
        })?;
        let d = &desired;
        // §6.2–§6.5 and the platform (§3): the agent's rules. The simulator has no local policy.
        let committed = |app: &str| self.apps.get(app).map(|a| &a.version);
        let state = DeviceState {
            device: &self.id,
            platform: &self.platform,
            last_sequence: self.last_sequence,
            last_notice_sha256: self.last_sha256,
            trusted_time: self.trusted_time,
            now,
            clock_skew: v.clock_skew,
            committed: &committed,
            local_policy: None,
        };
        // The simulator remembers envelope hashes only (it never re-serializes a notice).
        let hashes = ferry_protocol::NoticeHashes {
            payload: *sha,
            envelope: *sha,
        };
        match check_notice(d, &hashes, &releases, &state) {
            Ok(Verdict::Accept) => {}
            Ok(Verdict::Duplicate) => return Ok(None),
            Err(e) => {
                return Err(Rejection {
                    key: rejection_key(&e),
                    reason: e.to_string(),
                    sequence: d.sequence,
                    rollout: d.rollout.clone(),
                })
            }
        }
        // Every release has an image for this platform: the rules checked it.
        let target = releases
            .iter()
            .filter_map(|r| {
                let digest = r.platforms.get(&self.platform)?;
                Some((
                    r.app.clone(),
                    AppVersion {
                        version: r.version.clone(),
                        digest: digest.clone(),
                    },
                ))
            })
            .collect();
        self.trusted_time = Some(trusted_time_after(self.trusted_time, d));
        Ok(Some(Update {
            sequence: d.sequence,
            rollout: d.rollout.clone(),
            target,
            outcome,
            phase: None,
        }))
    }

    /// What the agent publishes for a rejected notice: `received` and `rejected` events, then
    /// its state with the rejection as the last update result.
    pub fn reject(&mut self, r: &Rejection, now: DateTime<Utc>) -> Vec<Report> {
        let mk = |phase| {
            let mut e = Event::new(&self.id, r.sequence, r.rollout.clone(), phase);
            e.ts = now;
            e
        };
        let received = mk(Phase::Received);
        let mut rejected = mk(Phase::Rejected);
        rejected.reason = Some(r.reason.clone());
        self.status = Some(UpdateStatus {
            waiting: None,
            reason: None,
            sequence: r.sequence,
            rollout: r.rollout.clone(),
            phase: Phase::Rejected,
            error: Some(r.reason.clone()),
            at: now,
        });
        vec![
            Report::Event(Box::new(received)),
            Report::Event(Box::new(rejected)),
            Report::State(Box::new(self.state(now))),
        ]
    }

    /// Move `u` to its next phase; returns that phase and the reports for it (an event, and the
    /// retained state after every transition but `received`, as the agent does), or `None` when
    /// the update had already ended. Entering `committed` installs the target set.
    pub fn advance(&mut self, u: &mut Update, now: DateTime<Utc>) -> Option<(Phase, Vec<Report>)> {
        let phase = next_phase(u.phase, u.outcome)?;
        u.phase = Some(phase);
        let mut e = Event::new(&self.id, u.sequence, u.rollout.clone(), phase);
        e.ts = now;
        let mut error = None;
        match phase {
            Phase::Downloading | Phase::Downloaded => {
                e.app = u.target.keys().next().cloned();
            }
            Phase::Committed => {
                self.apps = u.target.clone();
            }
            Phase::RollingBack | Phase::RolledBack => {
                let app = u.target.keys().next().cloned().unwrap_or_default();
                let reason = format!("{app}: {SIMULATED_FAILURE}");
                e.app = Some(app.clone());
                e.reason = Some(reason.clone());
                if phase == Phase::RolledBack {
                    e.logs = Some(vec![
                        format!("{app}: listening on 0.0.0.0:8080"),
                        format!("{app}: ERROR: simulated failure, refusing to serve readings"),
                    ]);
                }
                error = Some(reason);
            }
            _ => {}
        }
        let mut out = vec![Report::Event(Box::new(e))];
        if phase != Phase::Received {
            self.status = Some(UpdateStatus {
                waiting: None,
                reason: None,
                sequence: u.sequence,
                rollout: u.rollout.clone(),
                phase,
                error,
                at: now,
            });
            out.push(Report::State(Box::new(self.state(now))));
        }
        Some((phase, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::desired::embed_release;
    use ferry_protocol::release::{ContainerSpec, HealthSpec};
    use ferry_protocol::{verify_notice, PrivateKey, Strategy, TrustedKeys};

    struct Fx {
        rk: PrivateKey,
        ck: PrivateKey,
        v: Verifier,
    }

    fn fx() -> Fx {
        let rk = PrivateKey::from_seed([1; 32]).unwrap();
        let ck = PrivateKey::from_seed([2; 32]).unwrap();
        let v = Verifier::new(
            Trust {
                release: TrustedKeys::new([rk.public().clone()]),
                release_threshold: 1,
                controller: TrustedKeys::new([ck.public().clone()]),
            },
            Duration::seconds(300),
        );
        Fx { rk, ck, v }
    }

    fn now() -> DateTime<Utc> {
        "2026-11-22T10:00:00Z".parse().unwrap()
    }

    fn release(version: &str) -> Release {
        Release {
            app: "sensor".into(),
            version: version.parse().unwrap(),
            image: "127.0.0.1:5055/ferry/sensor".into(),
            platforms: [(
                "linux/arm64".to_string(),
                fake_digest("sensor", version, "linux/arm64"),
            )]
            .into(),
            container: ContainerSpec::default(),
            health: HealthSpec::default(),
            created_at: now(),
        }
    }

    fn desired(f: &Fx, device: &str, seq: u64, version: &str) -> Desired {
        Desired {
            settings: Default::default(),
            force: false,
            device: device.into(),
            sequence: seq,
            issued_at: now(),
            expires_at: now() + Duration::days(7),
            apps: [(
                "sensor".to_string(),
                embed_release(&release(version).sign(&[&f.rk]).to_json()).unwrap(),
            )]
            .into(),
            strategy: Strategy::StopFirst,
            allow_downgrade: false,
            rollout: Some("r-7".into()),
        }
    }

    fn device() -> Device {
        Device::new(
            "sim-00001".into(),
            "linux/arm64".into(),
            "0.1.0".into(),
            [("fleet".to_string(), "sim".to_string())].into(),
            [(
                "sensor".to_string(),
                AppVersion {
                    version: semver::Version::new(1, 0, 0),
                    digest: fake_digest("sensor", "1.0.0", "linux/arm64"),
                },
            )]
            .into(),
        )
    }

    fn signed(f: &Fx, d: &Desired) -> Vec<u8> {
        d.sign(&[&f.ck]).to_json().into_bytes()
    }

    fn run(dev: &mut Device, mut u: Update) -> Vec<Report> {
        let mut all = Vec::new();
        while let Some((_, r)) = dev.advance(&mut u, now()) {
            all.extend(r);
        }
        all
    }

    fn event_phases(r: &[Report]) -> Vec<Phase> {
        r.iter()
            .filter_map(|r| match r {
                Report::Event(e) => Some(e.phase),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn phases_in_order_and_waits() {
        let mut p = None;
        let mut seen = Vec::new();
        while let Some(n) = next_phase(p, Outcome::Commit) {
            seen.push(n);
            p = Some(n);
        }
        assert_eq!(
            seen,
            [
                Phase::Received,
                Phase::Verified,
                Phase::Downloading,
                Phase::Downloaded,
                Phase::Switching,
                Phase::HealthChecking,
                Phase::Committed
            ]
        );
        assert_eq!(
            next_phase(Some(Phase::HealthChecking), Outcome::RollBack),
            Some(Phase::RollingBack)
        );
        assert_eq!(
            next_phase(Some(Phase::RollingBack), Outcome::RollBack),
            Some(Phase::RolledBack)
        );
        for t in [
            Phase::Committed,
            Phase::RolledBack,
            Phase::Failed,
            Phase::Rejected,
        ] {
            assert_eq!(next_phase(Some(t), Outcome::Commit), None);
        }
        assert_eq!(wait_before(Phase::Downloaded), Some(Wait::Pull));
        assert_eq!(wait_before(Phase::Committed), Some(Wait::Health));
        assert_eq!(wait_before(Phase::RollingBack), Some(Wait::Health));
        assert_eq!(wait_before(Phase::Switching), None);
    }

    #[test]
    fn happy_path_commits_and_reports_every_phase() {
        let f = fx();
        let mut dev = device();
        let raw = signed(&f, &desired(&f, "sim-00001", 5, "2.0.0"));
        let Check::Accept(u) = dev.check(&raw, &f.v, now(), Outcome::Commit) else {
            panic!("not accepted")
        };
        assert_eq!(dev.last_sequence, 5);
        assert_eq!(u.rollout.as_deref(), Some("r-7"));
        let reports = run(&mut dev, u);
        assert_eq!(
            event_phases(&reports),
            [
                Phase::Received,
                Phase::Verified,
                Phase::Downloading,
                Phase::Downloaded,
                Phase::Switching,
                Phase::HealthChecking,
                Phase::Committed
            ]
        );
        // A state after every transition but `received`; the last one shows the new version.
        let states: Vec<&StateReport> = reports
            .iter()
            .filter_map(|r| match r {
                Report::State(s) => Some(&**s),
                _ => None,
            })
            .collect();
        assert_eq!(states.len(), 6);
        let last = states.last().unwrap();
        assert_eq!(last.apps["sensor"].version, "2.0.0");
        assert_eq!(last.sequence, 5);
        assert_eq!(last.labels["fleet"], "sim");
        let upd = last.update.as_ref().unwrap();
        assert_eq!(
            (upd.phase, upd.rollout.as_deref()),
            (Phase::Committed, Some("r-7"))
        );
        // Every event carries the rollout id and sequence of the notice.
        for r in &reports {
            if let Report::Event(e) = r {
                assert_eq!((e.sequence, e.rollout.as_deref()), (5, Some("r-7")));
            }
        }
        // Reports serialize as the protocol's JSON.
        let j = serde_json::to_value(match &reports[0] {
            Report::Event(e) => e,
            _ => unreachable!(),
        })
        .unwrap();
        assert_eq!(j["phase"], "received");
    }

    #[test]
    fn failure_rolls_back_with_reason_and_logs_keeping_the_old_version() {
        let f = fx();
        let mut dev = device();
        let raw = signed(&f, &desired(&f, "sim-00001", 1, "2.0.0"));
        let Check::Accept(u) = dev.check(&raw, &f.v, now(), Outcome::RollBack) else {
            panic!("not accepted")
        };
        let reports = run(&mut dev, u);
        let phases = event_phases(&reports);
        assert_eq!(
            &phases[phases.len() - 2..],
            [Phase::RollingBack, Phase::RolledBack]
        );
        let Some(Report::Event(rb)) = reports
            .iter()
            .rev()
            .find(|r| r.phase() == Some(Phase::RolledBack) && matches!(r, Report::Event(_)))
        else {
            panic!()
        };
        assert!(rb.reason.as_deref().unwrap().contains("simulated"));
        assert!(!rb.logs.as_ref().unwrap().is_empty());
        assert_eq!(dev.apps["sensor"].version, semver::Version::new(1, 0, 0));
        let Report::State(s) = reports.last().unwrap() else {
            panic!()
        };
        assert_eq!(s.update.as_ref().unwrap().phase, Phase::RolledBack);
        assert!(s.update.as_ref().unwrap().error.is_some());
    }

    #[test]
    fn forged_notice_is_rejected_and_changes_nothing() {
        let f = fx();
        let mut dev = device();
        // Signed with the release key instead of the controller's.
        let raw = desired(&f, "sim-00001", 3, "2.0.0")
            .sign(&[&f.rk])
            .to_json()
            .into_bytes();
        let Check::Reject(r) = dev.check(&raw, &f.v, now(), Outcome::Commit) else {
            panic!("forgery accepted")
        };
        assert!(r.reason.contains("signature"), "{}", r.reason);
        assert_eq!(
            (r.sequence, r.rollout.clone()),
            (0, None),
            "unverified fields are not echoed"
        );
        assert_eq!(dev.last_sequence, 0);
        let reports = dev.reject(&r, now());
        assert_eq!(event_phases(&reports), [Phase::Received, Phase::Rejected]);
        let Report::State(s) = &reports[2] else {
            panic!()
        };
        assert_eq!(s.update.as_ref().unwrap().phase, Phase::Rejected);
        assert_eq!(s.apps["sensor"].version, "1.0.0");
        // The same forged bytes again: nothing new to report.
        assert!(matches!(
            dev.check(&raw, &f.v, now(), Outcome::Commit),
            Check::SameRejection
        ));

        // A release signed by an untrusted key inside a genuine controller envelope.
        let other = PrivateKey::from_seed([9; 32]).unwrap();
        let mut d = desired(&f, "sim-00001", 3, "2.0.0");
        d.apps.insert(
            "sensor".into(),
            embed_release(&release("2.0.0").sign(&[&other]).to_json()).unwrap(),
        );
        assert!(matches!(
            dev.check(&signed(&f, &d), &f.v, now(), Outcome::Commit),
            Check::Reject(_)
        ));
    }

    #[test]
    fn cached_verification_agrees_with_the_protocol_crate() {
        let f = fx();
        let other = PrivateKey::from_seed([9; 32]).unwrap();
        let good = signed(&f, &desired(&f, "sim-00001", 5, "2.0.0"));
        let mut d = desired(&f, "sim-00001", 6, "2.0.0");
        d.apps.insert(
            "sensor".into(),
            embed_release(&release("2.0.0").sign(&[&other]).to_json()).unwrap(),
        );
        let forged_release = signed(&f, &d);
        let mut d = desired(&f, "sim-00001", 7, "2.0.0");
        d.apps.insert(
            "other".into(),
            embed_release(&release("2.0.0").sign(&[&f.rk]).to_json()).unwrap(),
        );
        let mismatch = signed(&f, &d);
        let forged_notice = desired(&f, "sim-00001", 8, "2.0.0")
            .sign(&[&f.rk])
            .to_json()
            .into_bytes();
        // Twice each: the second time the release comes from the cache.
        for _ in 0..2 {
            for raw in [&good, &forged_release, &mismatch, &forged_notice] {
                let ours = f.v.verify_notice(raw).map(|(d, r)| (d.sequence, r));
                let theirs = verify_notice(raw, &f.v.trust).map(|n| {
                    (
                        n.desired.sequence,
                        n.releases
                            .into_values()
                            .map(|v| v.release)
                            .collect::<Vec<_>>(),
                    )
                });
                assert_eq!(ours, theirs);
            }
        }
        assert!(f.v.verify_notice(&good).is_ok());
        assert!(f.v.verify_notice(&forged_release).is_err());
    }

    #[test]
    fn replay_equivocation_duplicate_and_wrong_device() {
        let f = fx();
        let mut dev = device();
        let n5 = signed(&f, &desired(&f, "sim-00001", 5, "2.0.0"));
        assert!(matches!(
            dev.check(&n5, &f.v, now(), Outcome::Commit),
            Check::Accept(_)
        ));
        // The retained copy again: a no-op.
        assert!(matches!(
            dev.check(&n5, &f.v, now(), Outcome::Commit),
            Check::Duplicate
        ));
        // An older genuine notice: replay.
        let n4 = signed(&f, &desired(&f, "sim-00001", 4, "2.0.0"));
        let Check::Reject(r) = dev.check(&n4, &f.v, now(), Outcome::Commit) else {
            panic!()
        };
        assert!(r.reason.contains("replay"), "{}", r.reason);
        assert_eq!((r.sequence, r.rollout.as_deref()), (4, Some("r-7")));
        // Same sequence, other bytes: equivocation.
        let other5 = signed(&f, &desired(&f, "sim-00001", 5, "2.1.0"));
        let Check::Reject(r) = dev.check(&other5, &f.v, now(), Outcome::Commit) else {
            panic!()
        };
        assert!(r.reason.contains("equivocation"), "{}", r.reason);
        // Someone else's notice.
        let theirs = signed(&f, &desired(&f, "sim-00002", 9, "2.0.0"));
        let Check::Reject(r) = dev.check(&theirs, &f.v, now(), Outcome::Commit) else {
            panic!()
        };
        assert!(r.reason.contains("sim-00002"), "{}", r.reason);
        assert_eq!(dev.last_sequence, 5);
    }

    #[test]
    fn downgrade_expiry_and_platform() {
        let f = fx();
        let mut dev = device();
        let Check::Reject(r) = dev.check(
            &signed(&f, &desired(&f, "sim-00001", 1, "0.9.0")),
            &f.v,
            now(),
            Outcome::Commit,
        ) else {
            panic!()
        };
        assert!(r.reason.contains("downgrade"), "{}", r.reason);
        let mut d = desired(&f, "sim-00001", 2, "0.9.0");
        d.allow_downgrade = true;
        assert!(matches!(
            dev.check(&signed(&f, &d), &f.v, now(), Outcome::Commit),
            Check::Accept(_)
        ));
        // Expired long ago.
        let mut d = desired(&f, "sim-00001", 3, "2.0.0");
        d.issued_at = now() - Duration::days(30);
        d.expires_at = now() - Duration::days(20);
        let Check::Reject(r) = dev.check(&signed(&f, &d), &f.v, now(), Outcome::Commit) else {
            panic!()
        };
        assert!(r.reason.contains("expired"), "{}", r.reason);
        assert_eq!(
            r.key, "notice expired: 2026-11-02T10:00:00+00:00",
            "counted without the clock"
        );
        // No image for this platform.
        let mut dev = device();
        dev.platform = "linux/arm/v7".into();
        let Check::Reject(r) = dev.check(
            &signed(&f, &desired(&f, "sim-00001", 1, "2.0.0")),
            &f.v,
            now(),
            Outcome::Commit,
        ) else {
            panic!()
        };
        assert!(r.reason.contains("platform"), "{}", r.reason);
    }
}
