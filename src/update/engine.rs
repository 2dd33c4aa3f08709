//! The update engine: takes a notice, verifies it, and drives the transaction through the state
//! machine of [`super::state`], journaling each state before acting on it and reporting each
//! phase. Also recovers an interrupted transaction at start-up and reconciles the runtime with
//! the committed set.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use ferry_protocol::report::{AppState, Event, StateReport, UpdateStatus};
use ferry_protocol::{notice_rules, Phase, Trust};
use tokio::sync::watch;

use crate::health::{self, HealthDefaults, HealthParams};
use crate::report::Outbox;
use crate::runtime::{labels, ContainerRuntime, PullProgress};
use crate::update::journal::{Journal, JournalError, JournalStore, Txn};
use crate::update::plan::{plan, target_set, Plan};
use crate::update::pull::{free_bytes_near, pull_verified, ManifestSource, PullRequest};
use crate::update::state::{transition, Input, State};
use crate::update::swap;
use crate::verify::{self, Decision, Policy};

/// Settings of the engine, from the agent's config.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub device: String,
    pub platform: String,
    pub labels: BTreeMap<String, String>,
    pub clock_skew: chrono::Duration,
    pub stop_grace: Duration,
    pub health: HealthDefaults,
    pub disk_margin_bytes: u64,
    pub progress_every: Duration,
    pub log_lines: usize,
    /// After a shutdown request, how long a running health gate may still take before the
    /// update is rolled back so the agent can stop on a committed set.
    pub drain_gate: Duration,
    /// Pause between retries of a failed rollback step.
    pub rollback_retry: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("interrupted by shutdown in state {0:?}; the journal resumes it at the next start")]
    Interrupted(State),
    #[error("internal: {0}")]
    Internal(String),
}

pub struct Engine<R, M, O> {
    cfg: EngineConfig,
    rt: Arc<R>,
    registry: Arc<M>,
    out: Arc<O>,
    trust: Trust,
    policy: Policy,
    store: JournalStore,
    journal: Journal,
    /// The last rejection, kept in memory only (a rejected notice changes nothing on disk).
    last_rejection: Option<(String, UpdateStatus)>,
    /// App → health as last published, to publish again only on a change.
    last_health: std::sync::Mutex<Option<BTreeMap<String, String>>>,
}

struct Timing {
    received: Instant,
    pull: Duration,
    gate: Duration,
}

impl<R: ContainerRuntime, M: ManifestSource, O: Outbox> Engine<R, M, O> {
    pub fn new(
        cfg: EngineConfig,
        rt: Arc<R>,
        registry: Arc<M>,
        out: Arc<O>,
        trust: Trust,
        policy: Policy,
        store: JournalStore,
    ) -> Result<Self, EngineError> {
        let journal = store.load()?;
        Ok(Engine {
            cfg,
            rt,
            registry,
            out,
            trust,
            policy,
            store,
            journal,
            last_rejection: None,
            last_health: std::sync::Mutex::new(None),
        })
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    fn save(&self) -> Result<(), EngineError> {
        self.store.save(&self.journal)?;
        Ok(())
    }

    // ----- reporting -------------------------------------------------------------------------

    fn event(&self, phase: Phase, f: impl FnOnce(&mut Event)) {
        let (seq, rollout) = match &self.journal.txn {
            Some(t) => (t.sequence, t.rollout.clone()),
            None => (self.journal.last_sequence, None),
        };
        let mut e = Event::new(&self.cfg.device, seq, rollout, phase);
        f(&mut e);
        tracing::info!(device = %self.cfg.device, sequence = e.sequence, phase = %phase, app = ?e.app, reason = ?e.reason, "update event");
        self.out.event(&e);
    }

    /// How each committed app is doing, as the runtime says: `healthy` (running, and the
    /// image's own HEALTHCHECK, if any, is not `unhealthy`), `unhealthy` (restarting, or its
    /// HEALTHCHECK says so), `stopped`, `missing`, `unknown` (the engine did not answer).
    async fn app_health(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (app, d) in &self.journal.committed {
            let health = match self.rt.inspect(&d.container).await {
                Ok(Some(i)) if i.state.health.as_deref() == Some("unhealthy") => "unhealthy",
                Ok(Some(i)) if i.state.running && i.state.status != "restarting" => "healthy",
                Ok(Some(i)) if i.state.status == "restarting" => "unhealthy",
                Ok(Some(_)) => "stopped",
                Ok(None) => "missing",
                Err(_) => "unknown",
            };
            out.insert(app.clone(), health.to_string());
        }
        out
    }

    /// Between updates: publish the state again when an app's health changed since the last
    /// publication (a container that died or turned unhealthy after its commit). True when it
    /// published.
    pub async fn watch_health(&self) -> bool {
        if self.journal.txn.is_some() {
            return false;
        }
        let now = self.app_health().await;
        let changed = {
            let last = self.last_health.lock().expect("health lock");
            last.as_ref().is_some_and(|l| *l != now)
        };
        if changed {
            tracing::warn!(device = %self.cfg.device, health = ?now, "the running apps' health changed");
            self.publish_state().await;
        }
        changed
    }

    /// Publish the retained state: the committed set as the runtime runs it, and the update.
    pub async fn publish_state(&self) {
        let health = self.app_health().await;
        let mut apps = BTreeMap::new();
        for (app, d) in &self.journal.committed {
            apps.insert(
                app.clone(),
                AppState {
                    version: d.release.version.to_string(),
                    digest: d.digest.clone(),
                    container: d.container.clone(),
                    health: health.get(app).cloned().unwrap_or_else(|| "unknown".into()),
                },
            );
        }
        *self.last_health.lock().expect("health lock") = Some(health);
        let update = match (&self.journal.txn, &self.last_rejection) {
            (Some(t), _) => Some(UpdateStatus {
                waiting: None,
                reason: None,
                sequence: t.sequence,
                rollout: t.rollout.clone(),
                phase: t.state.phase().unwrap_or(Phase::Verified),
                error: t.error.clone(),
                at: Utc::now(),
            }),
            (None, Some((_, rej)))
                if self
                    .journal
                    .last_result
                    .as_ref()
                    .is_none_or(|r| r.at < rej.at) =>
            {
                Some(rej.clone())
            }
            (None, _) => self.journal.last_result.clone(),
        };
        let s = StateReport {
            device: self.cfg.device.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            platform: self.cfg.platform.clone(),
            sequence: self.journal.last_sequence,
            apps,
            update,
            ts: Utc::now(),
            labels: self.cfg.labels.clone(),
        };
        self.out.state(&s);
    }

    // ----- the state machine, journaled --------------------------------------------------------

    /// Apply one input to the open transaction, journal the new state, report it.
    async fn step(&mut self, input: Input) -> Result<State, EngineError> {
        let txn =
            self.journal.txn.as_mut().ok_or_else(|| {
                EngineError::Internal(format!("{input:?} with no open transaction"))
            })?;
        let from = txn.state;
        let to = transition(from, input).map_err(|e| EngineError::Internal(e.to_string()))?;
        txn.state = to;
        let (reason, logs) = match to {
            State::RolledBack | State::Failed | State::RollingBack => (
                txn.error.clone(),
                if to == State::RolledBack {
                    txn.logs.clone()
                } else {
                    None
                },
            ),
            _ => (None, None),
        };
        self.save()?;
        if to != from {
            if let Some(phase) = to.phase() {
                self.event(phase, |e| {
                    e.reason = reason;
                    e.logs = logs;
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

    /// Handle one message from the `desired` topic.
    pub async fn handle_notice(
        &mut self,
        raw: &[u8],
        stop: &watch::Receiver<bool>,
    ) -> Result<(), EngineError> {
        let received = Instant::now();
        let committed_versions = self
            .journal
            .committed
            .iter()
            .map(|(a, d)| (a.clone(), d.release.version.clone()))
            .collect();
        let ctx = verify::Context {
            device: &self.cfg.device,
            platform: &self.cfg.platform,
            trust: &self.trust,
            policy: &self.policy,
            clock_skew: self.cfg.clock_skew,
            now: Utc::now(),
            last_sequence: self.journal.last_sequence,
            last_notice_sha256: self.journal.last_notice_sha256.as_deref(),
            trusted_time: self.journal.trusted_time,
            committed: committed_versions,
        };
        let raw_sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(raw));
        let decision = verify::check(raw, &ctx);
        let notice = match decision {
            Ok(Decision::Duplicate) => {
                tracing::debug!("notice already applied (retained copy); nothing to do");
                return Ok(());
            }
            Err(rej) => {
                if self
                    .last_rejection
                    .as_ref()
                    .is_some_and(|(sha, _)| *sha == raw_sha)
                {
                    tracing::debug!(reason = %rej.reason, "same rejected notice again");
                    return Ok(());
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
                        waiting: None,
                        reason: None,
                        sequence: seq,
                        rollout: rej.rollout.clone(),
                        phase: Phase::Rejected,
                        error: Some(rej.reason.clone()),
                        at: Utc::now(),
                    },
                ));
                self.publish_state().await;
                return Ok(());
            }
            Ok(Decision::Accept(n)) => n,
        };
        let d = &notice.desired;
        let target = target_set(
            &self.cfg.device,
            &self.cfg.platform,
            &notice,
            &self.journal.committed,
        );
        // Persist the sequence (and the trusted time) before any action.
        self.journal.last_sequence = d.sequence;
        self.journal.last_notice_sha256 = Some(raw_sha);
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
            error: None,
            logs: None,
            started_at: Utc::now(),
        });
        self.last_rejection = None;
        self.event(Phase::Received, |_| {});
        self.step(Input::Accept).await?;
        let mut timing = Timing {
            received,
            pull: Duration::ZERO,
            gate: Duration::ZERO,
        };
        self.drive(stop, &mut timing).await
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
            let mut timing = Timing {
                received: Instant::now(),
                pull: Duration::ZERO,
                gate: Duration::ZERO,
            };
            self.drive(stop, &mut timing).await?;
        }
        self.reconcile().await;
        self.publish_state().await;
        Ok(())
    }

    /// Run the open transaction from its journaled state to a terminal state and close it.
    async fn drive(
        &mut self,
        stop: &watch::Receiver<bool>,
        timing: &mut Timing,
    ) -> Result<(), EngineError> {
        loop {
            let Some(txn) = &self.journal.txn else {
                return Ok(());
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
                    let r = tokio::select! {
                        biased;
                        _ = wait_stop(stop.clone()) => return Err(EngineError::Interrupted(State::Downloading)),
                        r = self.pull_all(&p) => r,
                    };
                    timing.pull = t0.elapsed();
                    match r {
                        Ok(()) => self.step(Input::PullDone).await?,
                        Err(why) => {
                            self.set_error(why, None);
                            self.step(Input::PullFailed).await?
                        }
                    };
                }
                State::Downloaded => {
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
                    let t0 = Instant::now();
                    let verdict = self.gate(&p, stop).await;
                    timing.gate = t0.elapsed();
                    match verdict {
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
                        tracing::error!(error = %why, "rollback step failed; retrying");
                        self.step(Input::RollbackFailed).await?;
                        tokio::time::sleep(self.cfg.rollback_retry).await;
                    }
                },
                State::Committed => {
                    self.commit(&p, timing).await?;
                }
                State::RolledBack | State::Failed => {
                    self.discard_pulled().await;
                    self.finish().await?;
                }
            }
        }
    }

    fn set_error(&mut self, why: String, logs: Option<Vec<String>>) {
        if let Some(t) = self.journal.txn.as_mut() {
            t.error = Some(why);
            if logs.is_some() {
                t.logs = logs;
            }
        }
    }

    // ----- phases ----------------------------------------------------------------------------

    async fn pull_all(&mut self, p: &Plan) -> Result<(), String> {
        let txn = self.journal.txn.clone().ok_or("no transaction")?;
        let root = self.rt.info().await.map(|i| i.root_dir).unwrap_or_default();
        for app in &p.start {
            let d = &txn.target[app];
            let out = self.out.clone();
            let (dev, seq, rollout) = (self.cfg.device.clone(), txn.sequence, txn.rollout.clone());
            let app_name = app.clone();
            let progress = move |pp: PullProgress| {
                let mut e = Event::new(&dev, seq, rollout.clone(), Phase::Downloading);
                e.app = Some(app_name.clone());
                e.bytes = Some(pp.bytes);
                e.total = Some(pp.total);
                out.event(&e);
            };
            let req = PullRequest {
                app,
                repo: &d.release.image,
                digest: &d.digest,
                platform: &self.cfg.platform,
                margin_bytes: self.cfg.disk_margin_bytes,
                free_bytes: if root.is_empty() {
                    None
                } else {
                    free_bytes_near(&root)
                },
            };
            // Record the pull before it happens, so an interrupted transaction cleans it up.
            if let Some(t) = self.journal.txn.as_mut() {
                t.pulled.insert(d.reference.clone());
            }
            self.save().map_err(|e| e.to_string())?;
            pull_verified(
                &*self.rt,
                &*self.registry,
                &req,
                self.cfg.progress_every,
                &progress,
            )
            .await?;
        }
        Ok(())
    }

    async fn switch(&mut self, p: &Plan) -> Result<(), String> {
        let txn = self.journal.txn.clone().ok_or("no transaction")?;
        // Create every new container first: a failure here has touched nothing that runs.
        for app in &p.start {
            let cfg = swap::container_config(
                &self.cfg.device,
                txn.sequence,
                &self.cfg.platform,
                &txn.target[app],
            );
            // The image was verified when pulled; if something removed it since (another
            // tenant of the engine pruning, an operator), fetch and verify it again.
            if let Err(first) = swap::ensure_created(&*self.rt, &cfg).await {
                let present = matches!(self.rt.image_inspect(&cfg.image).await, Ok(Some(_)));
                if present {
                    return Err(first);
                }
                tracing::warn!(image = %cfg.image, "image vanished after the pull; pulling it again");
                self.repull(&txn.target[app]).await?;
                swap::ensure_created(&*self.rt, &cfg).await?;
            }
            self.mark(|t| {
                t.created.insert(app.clone());
            })?;
        }
        if txn.strategy == ferry_protocol::Strategy::StopFirst {
            for app in &p.replace {
                let old = self.journal.committed[app].container.clone();
                self.mark(|t| {
                    t.stopped_old.insert(app.clone());
                })?;
                swap::retire(&*self.rt, &old, self.cfg.stop_grace).await?;
            }
        }
        for app in &p.start {
            let name = &txn.target[app].container;
            self.rt
                .start(name)
                .await
                .map_err(|e| format!("start {name}: {e}"))?;
        }
        Ok(())
    }

    async fn repull(&self, d: &crate::update::journal::Deployment) -> Result<(), String> {
        let req = PullRequest {
            app: &d.release.app,
            repo: &d.release.image,
            digest: &d.digest,
            platform: &self.cfg.platform,
            margin_bytes: self.cfg.disk_margin_bytes,
            free_bytes: None,
        };
        pull_verified(
            &*self.rt,
            &*self.registry,
            &req,
            self.cfg.progress_every,
            &|_| {},
        )
        .await
    }

    fn mark(&mut self, f: impl FnOnce(&mut Txn)) -> Result<(), String> {
        if let Some(t) = self.journal.txn.as_mut() {
            f(t);
        }
        self.save().map_err(|e| e.to_string())
    }

    async fn gate(&self, p: &Plan, stop: &watch::Receiver<bool>) -> Result<(), (String, String)> {
        let Some(txn) = &self.journal.txn else {
            return Ok(());
        };
        let items: Vec<(String, String, HealthParams)> = p
            .start
            .iter()
            .map(|app| {
                let d = &txn.target[app];
                (
                    app.clone(),
                    d.container.clone(),
                    HealthParams::resolve(&d.release.health, &self.cfg.health),
                )
            })
            .collect();
        if items.is_empty() {
            return Ok(());
        }
        let drain = self.cfg.drain_gate;
        let mut stop = stop.clone();
        tokio::select! {
            r = health::watch_all(&*self.rt, &items) => r,
            _ = async {
                wait_stop_ref(&mut stop).await;
                tokio::time::sleep(drain).await;
            } => Err(("agent".to_string(), format!("shutting down: no health verdict within the {} s drain time", drain.as_secs()))),
        }
    }

    async fn rollback(&mut self, p: &Plan) -> Result<(), String> {
        let txn = self.journal.txn.clone().ok_or("no transaction")?;
        for app in &p.start {
            let name = &txn.target[app].container;
            swap::discard(&*self.rt, name, self.cfg.stop_grace).await?;
        }
        let seq = self.journal.committed_sequence;
        for app in p.replace.iter().chain(p.remove.iter()).chain(p.keep.iter()) {
            if let Some(d) = self.journal.committed.get(app) {
                swap::revive(
                    &*self.rt,
                    &self.cfg.device,
                    seq,
                    &self.cfg.platform,
                    d,
                    self.cfg.stop_grace,
                )
                .await?;
            }
        }
        Ok(())
    }

    async fn commit(&mut self, p: &Plan, timing: &Timing) -> Result<(), EngineError> {
        let txn = self
            .journal
            .txn
            .clone()
            .ok_or_else(|| EngineError::Internal("commit without txn".into()))?;
        let previous = std::mem::replace(&mut self.journal.committed, txn.target.clone());
        self.journal.committed_sequence = txn.sequence;
        self.save()?;
        // Prune the previous set: containers replaced or no longer wanted, and their images.
        let still_used: BTreeSet<&str> = self
            .journal
            .committed
            .values()
            .map(|d| d.reference.as_str())
            .collect();
        for app in p.replace.iter().chain(p.remove.iter()) {
            if let Some(old) = previous.get(app) {
                if let Err(e) = swap::discard(&*self.rt, &old.container, self.cfg.stop_grace).await
                {
                    tracing::warn!(error = %e, "pruning the previous container failed; reconcile retries it");
                }
                if !still_used.contains(old.reference.as_str()) {
                    let _ = self.rt.remove_image(&old.reference).await;
                }
            }
        }
        let total = timing.received.elapsed();
        let overhead = total.saturating_sub(timing.pull + timing.gate);
        tracing::info!(
            sequence = txn.sequence,
            total_ms = total.as_millis() as u64,
            pull_ms = timing.pull.as_millis() as u64,
            gate_ms = timing.gate.as_millis() as u64,
            overhead_ms = overhead.as_millis() as u64,
            "update committed"
        );
        self.finish().await
    }

    /// Remove images pulled by a transaction that did not commit (never one the committed set uses).
    async fn discard_pulled(&mut self) {
        let Some(txn) = &self.journal.txn else { return };
        let used: BTreeSet<&str> = self
            .journal
            .committed
            .values()
            .map(|d| d.reference.as_str())
            .collect();
        for r in &txn.pulled {
            if !used.contains(r.as_str()) {
                let _ = self.rt.remove_image(r).await;
            }
        }
    }

    async fn finish(&mut self) -> Result<(), EngineError> {
        if let Some(t) = &self.journal.txn {
            self.journal.last_result = Some(UpdateStatus {
                waiting: None,
                reason: None,
                sequence: t.sequence,
                rollout: t.rollout.clone(),
                phase: t.state.phase().unwrap_or(Phase::Failed),
                error: t.error.clone(),
                at: Utc::now(),
            });
        }
        self.journal.txn = None;
        self.save()?;
        self.publish_state().await;
        Ok(())
    }

    /// Make the runtime run exactly the committed set: revive what should run, remove what
    /// carries our device label but belongs to no committed app (leftovers of an interrupted
    /// update). Containers without our label are never touched.
    pub async fn reconcile(&mut self) {
        if self.journal.txn.is_some() {
            return;
        }
        let seq = self.journal.committed_sequence;
        for d in self.journal.committed.values() {
            if let Err(e) = swap::revive(
                &*self.rt,
                &self.cfg.device,
                seq,
                &self.cfg.platform,
                d,
                self.cfg.stop_grace,
            )
            .await
            {
                tracing::error!(app = %d.release.app, error = %e, "cannot run a committed app");
            }
        }
        let mine = match self.rt.list(&[(labels::DEVICE, &self.cfg.device)]).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot list containers to reconcile");
                return;
            }
        };
        let keep: BTreeSet<&str> = self
            .journal
            .committed
            .values()
            .map(|d| d.container.as_str())
            .collect();
        let used: BTreeSet<&str> = self
            .journal
            .committed
            .values()
            .map(|d| d.reference.as_str())
            .collect();
        for c in mine {
            if c.labels.get(labels::DEVICE).map(String::as_str) != Some(self.cfg.device.as_str()) {
                continue;
            }
            if !keep.contains(c.name.as_str()) {
                tracing::info!(container = %c.name, "removing a leftover container of this device");
                if let Err(e) = swap::discard(&*self.rt, &c.name, self.cfg.stop_grace).await {
                    tracing::warn!(container = %c.name, error = %e, "cannot remove leftover");
                } else if !used.contains(c.image.as_str()) {
                    let _ = self.rt.remove_image(&c.image).await;
                }
            }
        }
    }
}

async fn wait_stop(mut stop: watch::Receiver<bool>) {
    wait_stop_ref(&mut stop).await
}

async fn wait_stop_ref(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            // Sender gone: never stops.
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
