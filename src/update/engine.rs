//! The update engine: takes a notice, verifies it, and drives the transaction through the state
//! machine of [`super::state`], journaling each state before acting on it and reporting each
//! phase. Also recovers an interrupted transaction at start-up and reconciles the runtime with
//! the committed set.
//!
//! The phases live beside it: the download ([`super::download`]: resumable, retried while the
//! link is down, taken over by a newer notice), the wait for a maintenance window or an app's
//! update lock ([`super::hold`]), the switch, health gate, rollback, commit and reconcile
//! ([`super::phases`]), and what is reported ([`super::status`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use ferry_protocol::report::{Event, UpdateStatus};
use ferry_protocol::{notice_rules, DownloadStats, Phase, Trust, VerifiedNotice, Waiting};
use tokio::sync::watch;

use crate::shutdown::StopFlag;

use crate::backoff::Backoff;
use crate::download::ImageSource;
use crate::health::HealthDefaults;
use crate::outbox::Outbox;
use crate::runtime::ContainerRuntime;
use crate::update::download::DownloadEnd;
use crate::update::inbox::NoticeSlot;
use crate::update::journal::{Deployment, Journal, JournalError, JournalStore, Txn};
use crate::update::plan::{plan, target_set};
use crate::update::state::{transition, Input, State};
use crate::update::swap::{self, Placement};
use crate::update::window::Window;
use crate::verify::{self, Decision, Policy, Rejection};

/// Settings of the engine, from the agent's config.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub device: String,
    pub platform: String,
    pub labels: BTreeMap<String, String>,
    pub clock_skew: chrono::Duration,
    pub stop_grace: Duration,
    pub health: HealthDefaults,
    pub progress_every: Duration,
    pub log_lines: usize,
    /// After a shutdown request, how long a running health gate may still take before the
    /// update is rolled back so the agent can stop on a committed set.
    pub drain_gate: Duration,
    /// Pause between retries of a failed rollback step.
    pub rollback_retry: Duration,
    /// Backoff between download attempts after a transient error: first delay, cap.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Local maintenance windows for the switch (empty: any time).
    pub windows: Vec<Window>,
    /// Host directory of the apps' update-lock directories (`None`: no locks).
    pub lock_root: Option<PathBuf>,
    /// A lock held longer than this is reported (once per update).
    pub max_lock: Duration,
    /// How often a held lock is looked at again.
    pub lock_poll: Duration,
    /// This agent's version ([`crate::version`]), its binary, and where installed versions of
    /// itself live (`state_dir/agent`).
    pub agent_version: semver::Version,
    pub agent_exe: PathBuf,
    pub agent_dir: crate::selfupdate::layout::AgentDir,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("interrupted by shutdown in state {0:?}; the journal resumes it at the next start")]
    Interrupted(State),
    #[error("internal: {0}")]
    Internal(String),
    /// The agent switched to another version of itself: stop and start it (its transaction
    /// stays open in the journal, in `AgentSwitching`).
    #[error("restart into agent {0}")]
    Restart(semver::Version),
}

/// The longest pause between retries of a failing rollback step.
pub const ROLLBACK_RETRY_MAX: Duration = Duration::from_secs(300);

/// Health gates a transaction may start: one, and two more after agent crashes during it. A
/// release whose gate keeps killing the agent (or the box) is then taken as unhealthy and
/// rolled back instead of being gated again at every start.
pub const MAX_GATE_RUNS: u32 = 3;

/// A notice that passed every check, ready to start a transaction.
#[derive(Debug)]
pub struct Accepted {
    pub notice: Box<VerifiedNotice>,
}

/// What verifying a notice gave.
pub(super) enum Verdict {
    Duplicate,
    Rejected { raw_sha: String, rej: Rejection },
    Accepted(Accepted),
}

pub struct Engine<R, S, O> {
    pub(super) cfg: EngineConfig,
    pub(super) rt: Arc<R>,
    pub(super) source: Arc<S>,
    pub(super) out: Arc<O>,
    /// The keys the box trusts: its config's, or the stored trust record's (protocol §10).
    pub(super) trust: crate::verify::trust::Current,
    /// Where trust records are kept; none in unit tests that do not ask for one.
    pub(super) trust_store: Option<crate::verify::trust::TrustStore>,
    /// The last trust record refused (its SHA-256 and the reason), reported in the state.
    pub(super) trust_error: Option<(String, String)>,
    /// The last notice refused, tried again once a new trust record is taken.
    pub(super) last_rejected_notice: Option<Vec<u8>>,
    /// `issued_at` of the newest valid controller heartbeat (protocol §10a).
    pub(super) heartbeat_at: Option<chrono::DateTime<Utc>>,
    /// Older than this, the box is `stale` (zero: never).
    pub(super) max_heartbeat_age: chrono::Duration,
    /// Whether the last state published said `stale`.
    pub(super) stale_reported: std::sync::atomic::AtomicBool,
    policy: Policy,
    pub(super) store: JournalStore,
    pub(super) journal: Journal,
    /// The last rejection, kept in memory only (a rejected notice changes nothing on disk).
    pub(super) last_rejection: Option<(String, UpdateStatus)>,
    /// App → health as last published, to publish again only on a change.
    pub(super) last_health: std::sync::Mutex<Option<BTreeMap<String, String>>>,
    /// Why the open update does not move on right now (retrying, window, lock), with a reason.
    pub(super) hold: Option<(Waiting, String)>,
    /// Counters of the open update's download, for its `downloaded` event.
    pub(super) download_stats: Option<DownloadStats>,
    /// Notices that arrive while an update runs (see [`NoticeSlot`]).
    pub(super) inbox: Arc<NoticeSlot>,
}

pub(super) struct Timing {
    pub(super) received: Instant,
    pub(super) pull: Duration,
    pub(super) gate: Duration,
}

impl Timing {
    pub(super) fn now() -> Timing {
        Timing {
            received: Instant::now(),
            pull: Duration::ZERO,
            gate: Duration::ZERO,
        }
    }
}

impl<R: ContainerRuntime, S: ImageSource, O: Outbox> Engine<R, S, O> {
    pub fn new(
        cfg: EngineConfig,
        rt: Arc<R>,
        source: Arc<S>,
        out: Arc<O>,
        trust: Trust,
        policy: Policy,
        store: JournalStore,
    ) -> Result<Self, EngineError> {
        let journal = store.load()?;
        Ok(Engine {
            cfg,
            rt,
            source,
            out,
            trust: crate::verify::trust::Current {
                set: ferry_protocol::trust_record::TrustSet::from_config(
                    trust,
                    ferry_protocol::TrustedKeys::default(),
                    1,
                ),
                body_sha256: None,
                sequence_floor: None,
            },
            trust_store: None,
            trust_error: None,
            last_rejected_notice: None,
            heartbeat_at: None,
            max_heartbeat_age: chrono::Duration::zero(),
            stale_reported: std::sync::atomic::AtomicBool::new(false),
            policy,
            store,
            journal,
            last_rejection: None,
            last_health: std::sync::Mutex::new(None),
            hold: None,
            download_stats: None,
            inbox: Arc::new(NoticeSlot::default()),
        })
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Where the agent's main loop puts notices (the engine takes a newer one over a download).
    pub fn inbox(&self) -> Arc<NoticeSlot> {
        self.inbox.clone()
    }

    pub(super) fn save(&self) -> Result<(), EngineError> {
        self.store.save(&self.journal)?;
        Ok(())
    }

    pub(super) fn placement(&self) -> Placement<'_> {
        Placement {
            device: &self.cfg.device,
            platform: &self.cfg.platform,
            lock_root: self.cfg.lock_root.as_deref(),
            bind_prefixes: &self.policy.allowed_bind_prefixes,
            port_address: self.policy.host_port_address,
            policy: &self.policy,
        }
    }

    // ----- the state machine, journaled --------------------------------------------------------

    /// Apply one input to the open transaction, journal the new state, report it.
    pub(super) async fn step(&mut self, input: Input) -> Result<State, EngineError> {
        let txn =
            self.journal.txn.as_mut().ok_or_else(|| {
                EngineError::Internal(format!("{input:?} with no open transaction"))
            })?;
        let from = txn.state;
        let to = transition(from, input).map_err(|e| EngineError::Internal(e.to_string()))?;
        txn.state = to;
        let (reason, logs) = match to {
            State::RolledBack | State::Failed | State::RollingBack | State::Superseded => (
                txn.error.clone(),
                if to == State::RolledBack {
                    txn.logs.clone()
                } else {
                    None
                },
            ),
            _ => (None, None),
        };
        self.hold = None;
        self.save()?;
        if to != from {
            if let Some(phase) = to.phase() {
                let stats = (to == State::Downloaded)
                    .then_some(self.download_stats)
                    .flatten();
                self.event(phase, |e| {
                    e.reason = reason;
                    e.logs = logs;
                    e.download = stats;
                });
            }
            // Committed is reported by `commit()` once the journal holds the new set.
            if to != State::Committed {
                self.publish_state().await;
            }
        }
        Ok(to)
    }

    // ----- entry points ----------------------------------------------------------------------

    /// Verify a notice against what the device remembers (pure but for the clock).
    pub(super) fn verify(&self, raw: &[u8]) -> Verdict {
        let committed_versions = self
            .journal
            .committed
            .iter()
            .map(|(a, d)| (a.clone(), d.release.version.clone()))
            // The agent's own "committed" version is the one running: a lower one in a notice
            // is a downgrade like any other.
            .chain(std::iter::once((
                ferry_protocol::release::AGENT_APP.to_string(),
                self.cfg.agent_version.clone(),
            )))
            .collect();
        let ctx = verify::Context {
            device: &self.cfg.device,
            platform: &self.cfg.platform,
            trust: &self.trust.set.trust,
            policy: &self.policy,
            clock_skew: self.cfg.clock_skew,
            now: Utc::now(),
            last_sequence: self.journal.last_sequence,
            last_notice_sha256: self.journal.last_notice_sha256.as_deref(),
            trusted_time: self.journal.trusted_time,
            committed: committed_versions,
        };
        let raw_sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(raw));
        if let Some(expired) = self.trust.set.expired(ctx.now) {
            return Verdict::Rejected {
                raw_sha,
                rej: Rejection {
                    reason: format!(
                        "the box's trust record (version {}) expired at {expired}; notices are \
                         refused until a newer trust record arrives",
                        self.trust.set.version
                    ),
                    sequence: None,
                    rollout: None,
                },
            };
        }
        match verify::check(raw, &ctx) {
            Ok(Decision::Duplicate) => Verdict::Duplicate,
            Err(rej) => Verdict::Rejected { raw_sha, rej },
            Ok(Decision::Accept(notice)) => Verdict::Accepted(Accepted { notice }),
        }
    }

    /// Verify a notice that arrived; report a rejection. `Some` when it is to be applied.
    pub(super) async fn consider(&mut self, raw: &[u8]) -> Option<Accepted> {
        match self.verify(raw) {
            Verdict::Duplicate => {
                tracing::debug!("notice already applied (retained copy); nothing to do");
                None
            }
            Verdict::Rejected { raw_sha, rej } => {
                self.last_rejected_notice = Some(raw.to_vec());
                self.reject(raw_sha, rej).await;
                None
            }
            Verdict::Accepted(a) => Some(a),
        }
    }

    async fn reject(&mut self, raw_sha: String, rej: Rejection) {
        if self
            .last_rejection
            .as_ref()
            .is_some_and(|(sha, _)| *sha == raw_sha)
        {
            tracing::debug!(reason = %rej.reason, "same rejected notice again");
            return;
        }
        tracing::warn!(device = %self.cfg.device, sequence = ?rej.sequence, reason = %rej.reason, "notice rejected");
        let seq = rej.sequence.unwrap_or(0);
        let mk = |phase| {
            let mut e = Event::new(&self.cfg.device, seq, rej.rollout.clone(), phase);
            e.reason = (phase == Phase::Rejected).then(|| rej.reason.clone());
            e
        };
        self.out.event(&mk(Phase::Received));
        self.out.event(&mk(Phase::Rejected));
        self.last_rejection = Some((
            raw_sha,
            UpdateStatus {
                sequence: seq,
                rollout: rej.rollout.clone(),
                phase: Phase::Rejected,
                error: Some(rej.reason.clone()),
                at: Utc::now(),
                waiting: None,
                reason: None,
            },
        ));
        self.publish_state().await;
    }

    /// Handle one message from the `desired` topic.
    pub async fn handle_notice(
        &mut self,
        raw: &[u8],
        stop: &watch::Receiver<bool>,
    ) -> Result<(), EngineError> {
        let received = Instant::now();
        let Some(accepted) = self.consider(raw).await else {
            return Ok(());
        };
        let mut timing = Timing {
            received,
            ..Timing::now()
        };
        self.run(accepted, stop, &mut timing).await
    }

    /// Open a transaction for `accepted` and drive it; a newer notice that takes it over is
    /// run next, and so on.
    async fn run(
        &mut self,
        accepted: Accepted,
        stop: &watch::Receiver<bool>,
        timing: &mut Timing,
    ) -> Result<(), EngineError> {
        let mut next = Some(accepted);
        while let Some(a) = next.take() {
            self.begin(a).await?;
            next = self.drive(stop, timing).await?;
            *timing = Timing::now();
        }
        Ok(())
    }

    /// Journal the accepted sequence (before any action) and the new transaction.
    async fn begin(&mut self, a: Accepted) -> Result<(), EngineError> {
        let notice = a.notice;
        let d = &notice.desired;
        let mut target = target_set(
            &self.cfg.device,
            &self.cfg.platform,
            &notice,
            &self.journal.committed,
        );
        self.redeploy_missing(d.sequence, &mut target).await;
        let agent = self.agent_step_of(&notice);
        self.journal.last_sequence = d.sequence;
        // The payload's hash: a re-serialized copy of this notice is then a duplicate.
        self.journal.last_notice_sha256 = Some(hex::encode(notice.payload_sha256));
        self.journal.trusted_time = Some(notice_rules::trusted_time_after(
            self.journal.trusted_time,
            d,
        ));
        self.journal.txn = Some(Txn {
            sequence: d.sequence,
            rollout: d.rollout.clone(),
            strategy: d.strategy,
            state: State::Idle,
            target,
            created: BTreeSet::new(),
            stopped_old: BTreeSet::new(),
            pulled: BTreeSet::new(),
            force: d.force,
            gate_runs: 0,
            agent,
            error: None,
            logs: None,
            started_at: Utc::now(),
        });
        self.last_rejection = None;
        self.download_stats = None;
        self.hold = None;
        self.event(Phase::Received, |_| {});
        self.step(Input::Accept).await?;
        Ok(())
    }

    /// An unchanged app keeps its committed container, unless that container is gone (removed
    /// behind our back, or a rollback that could not bring it back): then it gets a new one like
    /// a changed app, image fetched again if need be, and goes through the health gate.
    async fn redeploy_missing(&self, sequence: u64, target: &mut BTreeMap<String, Deployment>) {
        for (app, t) in target.iter_mut() {
            let kept = self
                .journal
                .committed
                .get(app)
                .is_some_and(|c| c.container == t.container);
            if kept && matches!(self.rt.inspect(&t.container).await, Ok(None)) {
                tracing::warn!(app = %app, container = %t.container, "the committed container of an unchanged app is gone; deploying it again");
                t.container = crate::update::plan::container_name(&self.cfg.device, app, sequence);
                t.image_id = None;
            }
        }
    }

    /// At start-up: finish or undo a transaction the journal says was open, then make the runtime
    /// run exactly the committed set.
    pub async fn recover(&mut self, stop: &watch::Receiver<bool>) -> Result<(), EngineError> {
        if let Some(t) = &self.journal.txn {
            tracing::warn!(sequence = t.sequence, state = ?t.state, "resuming an interrupted update");
            if t.state == State::Switching {
                if let Some(t) = self.journal.txn.as_mut() {
                    t.error = Some("the agent restarted during the switch".into());
                }
            }
            self.step(Input::Recover).await?;
            let mut timing = Timing::now();
            if let Some(next) = self.drive(stop, &mut timing).await? {
                self.run(next, stop, &mut timing).await?;
            }
        } else {
            // No update is open: nothing stored is needed (leftovers of a crash after a commit).
            self.source.release().await;
        }
        self.reconcile().await;
        self.publish_state().await;
        Ok(())
    }

    /// Run the open transaction from its journaled state to a terminal state and close it.
    /// Returns the notice that took it over, if one did.
    pub(super) async fn drive(
        &mut self,
        stop: &watch::Receiver<bool>,
        timing: &mut Timing,
    ) -> Result<Option<Accepted>, EngineError> {
        // A failing rollback step is retried with a capped backoff, reported once, and never
        // re-journaled (the state stays RollingBack): no tight loop, no flash wear.
        let mut rollback_backoff: Option<Backoff> = None;
        loop {
            let Some(txn) = &self.journal.txn else {
                return Ok(None);
            };
            let state = txn.state;
            let p = plan(&self.journal.committed, &txn.target);
            match state {
                State::Idle => {
                    return Err(EngineError::Internal("open transaction in Idle".into()))
                }
                State::Verified => {
                    self.step(Input::StartPull).await?;
                }
                State::Downloading => {
                    let t0 = Instant::now();
                    let end = self.download(&p, stop).await?;
                    timing.pull = t0.elapsed();
                    match end {
                        DownloadEnd::Done(fetched) => {
                            if let Some(t) = self.journal.txn.as_mut() {
                                for f in fetched {
                                    if let Some(d) = t.target.get_mut(&f.app) {
                                        d.image_id = Some(f.image_id.clone());
                                    }
                                    t.pulled.insert(f.image_id);
                                }
                            }
                            self.step(Input::PullDone).await?;
                        }
                        DownloadEnd::Failed(e) => {
                            self.set_error(e.to_string(), None);
                            self.step(Input::PullFailed).await?;
                        }
                        DownloadEnd::Superseded(next) => {
                            self.supersede(&next).await?;
                            return Ok(Some(next));
                        }
                    }
                }
                State::Downloaded => {
                    if let Some(next) = self.wait_to_switch(&p, stop).await? {
                        self.supersede(&next).await?;
                        return Ok(Some(next));
                    }
                    self.step(Input::StartSwitch).await?;
                }
                State::Switching => match self.switch(&p).await {
                    Ok(()) => {
                        self.step(Input::SwitchDone).await?;
                    }
                    Err(why) => {
                        self.set_error(why, None);
                        self.step(Input::SwitchFailed).await?;
                    }
                },
                State::HealthChecking => {
                    let runs = self.journal.txn.as_ref().map_or(0, |t| t.gate_runs);
                    if runs >= MAX_GATE_RUNS {
                        self.set_error(
                            format!(
                                "the health gate was started {runs} times without a verdict (the agent \
                                 stopped during each, e.g. killed or a power cut): taken as unhealthy"
                            ),
                            None,
                        );
                        self.step(Input::Unhealthy).await?;
                        continue;
                    }
                    self.mark(|t| t.gate_runs += 1)
                        .map_err(EngineError::Internal)?;
                    let t0 = Instant::now();
                    let verdict = self.gate(&p, stop).await;
                    timing.gate = t0.elapsed();
                    match verdict {
                        Ok(()) if txn_has_agent(&self.journal) => {
                            self.step(Input::SwitchAgent).await?;
                        }
                        Ok(()) => {
                            self.step(Input::Healthy).await?;
                        }
                        Err((app, reason)) => {
                            let logs =
                                match self.journal.txn.as_ref().and_then(|t| t.target.get(&app)) {
                                    Some(d) => {
                                        swap::last_logs(&*self.rt, &d.container, self.cfg.log_lines)
                                            .await
                                    }
                                    None => None,
                                };
                            self.set_error(format!("{app}: {reason}"), logs);
                            self.step(Input::Unhealthy).await?;
                        }
                    }
                }
                State::RollingBack => match self.rollback(&p).await {
                    Ok(()) => {
                        self.step(Input::RollbackDone).await?;
                    }
                    Err(why) => {
                        let first = rollback_backoff.is_none();
                        let delay = rollback_backoff
                            .get_or_insert_with(|| {
                                Backoff::new(self.cfg.rollback_retry, ROLLBACK_RETRY_MAX)
                            })
                            .next_jittered();
                        if first {
                            tracing::error!(error = %why, retry_in = ?delay,
                                "rollback step failed; retrying with backoff (further failures at debug)");
                            self.event(Phase::RollbackFailed, |e| {
                                e.reason = Some(format!("rollback step failed: {why}"))
                            });
                        } else {
                            tracing::debug!(error = %why, retry_in = ?delay, "rollback step failed again");
                        }
                        let mut stop = stop.clone();
                        let inbox = self.inbox.clone();
                        let sleep = tokio::time::sleep(delay);
                        tokio::pin!(sleep);
                        loop {
                            tokio::select! {
                                biased;
                                // The journal holds RollingBack: the next start resumes it.
                                _ = stop.stopped() => {
                                    return Err(EngineError::Interrupted(State::RollingBack));
                                }
                                raw = inbox.next() => {
                                    if let Some(next) = self.consider(&raw).await {
                                        self.yield_to(&next, &why).await?;
                                        return Ok(Some(next));
                                    }
                                }
                                _ = &mut sleep => break,
                            }
                        }
                    }
                },
                State::AgentSwitching => self.agent_switching().await?,
                State::AgentTrial => {
                    if self.agent_trial().await? {
                        // Committed by `confirm_agent` once the new agent has reported.
                        return Ok(None);
                    }
                }
                State::Committed => {
                    self.commit(&p, timing).await?;
                }
                State::RolledBack | State::Failed | State::Superseded => {
                    self.discard_pulled(&BTreeSet::new()).await;
                    self.finish().await?;
                }
            }
        }
    }

    /// A newer notice takes the open (not yet switched) transaction over: it ends `superseded`;
    /// images it brought into the engine that the newer one names too are kept.
    async fn supersede(&mut self, next: &Accepted) -> Result<(), EngineError> {
        let seq = next.notice.desired.sequence;
        tracing::info!(
            sequence = self.journal.txn.as_ref().map(|t| t.sequence),
            by = seq,
            "a newer notice takes over the update"
        );
        self.set_error(
            format!("superseded by the notice with sequence {seq}"),
            None,
        );
        self.step(Input::Supersede).await?;
        let keep = self.images_named_by(next);
        self.discard_pulled(&keep).await;
        // The store keeps its blobs: the newer download keeps those it shares and drops the rest.
        self.close_txn();
        self.save()?;
        Ok(())
    }

    /// The manifest digests `next` names for this platform (images worth keeping for it).
    fn images_named_by(&self, next: &Accepted) -> BTreeSet<String> {
        next.notice
            .releases
            .values()
            .filter_map(|vr| vr.release.platforms.get(&self.cfg.platform).cloned())
            .collect()
    }

    /// A newer notice arrived while the rollback keeps failing: waiting for it would keep the
    /// box on a broken set for as long as the engine refuses, and the newer notice is what the
    /// fleet wants now. This update ends `failed`; leftovers are cleared and the committed set
    /// revived as far as the engine lets us, then the newer one starts from the committed set.
    async fn yield_to(&mut self, next: &Accepted, why: &str) -> Result<(), EngineError> {
        let seq = next.notice.desired.sequence;
        tracing::warn!(
            sequence = self.journal.txn.as_ref().map(|t| t.sequence),
            by = seq,
            error = %why,
            "the rollback keeps failing; a newer notice takes over from the committed set"
        );
        self.set_error(
            format!(
                "rollback step failed: {why}; the notice with sequence {seq} takes over from the \
                 last committed set"
            ),
            None,
        );
        self.step(Input::Yield).await?;
        let keep = self.images_named_by(next);
        self.discard_pulled(&keep).await;
        self.finish().await?;
        self.reconcile().await;
        Ok(())
    }

    pub(super) fn set_error(&mut self, why: String, logs: Option<Vec<String>>) {
        if let Some(t) = self.journal.txn.as_mut() {
            t.error = Some(why);
            if logs.is_some() {
                t.logs = logs;
            }
        }
    }
}

fn txn_has_agent(j: &Journal) -> bool {
    j.txn.as_ref().is_some_and(|t| t.agent.is_some())
}

#[cfg(test)]
#[path = "engine_tests/mod.rs"]
mod tests;
