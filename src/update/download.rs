//! The `downloading` phase as the engine drives it: attempts of the [`ImageSource`] until every
//! image of the update is in the engine, with progress reported at most once per
//! `progress_every`.
//!
//! - A **transient** error (connection refused, cut or stalled, timeout, HTTP 5xx/429, the
//!   engine unreachable) is retried without limit after a capped exponential backoff with full
//!   jitter (the MQTT link's policy); an attempt that made progress resets it and resumes at
//!   once (after a quarter of the first delay at most). Each retry is reported as a
//!   `downloading` event with `waiting: retrying` and the reason: never `failed`.
//! - A **permanent** error fails the update at once with its reason.
//! - A **newer verified notice** takes the update over at once (the attempt is abandoned; the
//!   blobs both need stay stored).
//! - A **shutdown** leaves the journal in `downloading`; the next start resumes from the store.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_protocol::{Phase, Waiting};
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::download::{DownloadError, Fetched, ImageSource, ImageWant, Progress};
use crate::outbox::Outbox;
use crate::runtime::ContainerRuntime;
use crate::shutdown::StopFlag;
use crate::update::engine::{Accepted, Engine, EngineError};
use crate::update::journal::Deployment;
use crate::update::plan::Plan;
use crate::update::state::State;
use crate::update::window::human_wait;

/// How the `downloading` phase ended.
pub(super) enum DownloadEnd {
    Done(Vec<Fetched>),
    Failed(DownloadError),
    Superseded(Accepted),
}

fn want(app: &str, d: &Deployment) -> ImageWant {
    ImageWant {
        app: app.to_string(),
        repo: d.release.image.clone(),
        digest: d.digest.clone(),
    }
}

/// The pause before resuming after an attempt that made progress: up to a quarter of the first
/// backoff delay, at random (a fleet whose connections dropped together does not come back in
/// one instant).
fn after_progress(initial: Duration) -> Duration {
    initial.mul_f64(fastrand::f64() / 4.0)
}

/// Last progress reported: when, and what.
type Reported = Option<(Instant, (u64, u64))>;

impl<R: ContainerRuntime, S: ImageSource, O: Outbox> Engine<R, S, O> {
    fn progress_event(
        &self,
        progress: &Progress,
        app: Option<&str>,
        last: &mut Reported,
        force: bool,
    ) {
        if !progress.planned() {
            return;
        }
        let now = progress.bytes();
        let due = match last {
            None => true,
            Some((at, was)) => *was != now && at.elapsed() >= self.cfg.progress_every,
        };
        if !(force || due) {
            return;
        }
        *last = Some((Instant::now(), now));
        let stats = progress.stats();
        self.event(Phase::Downloading, |e| {
            e.app = app.map(str::to_string);
            e.bytes = Some(now.0);
            e.total = Some(now.1);
            e.download = Some(stats);
        });
    }

    /// Drive attempts until the images of `p` are in the engine, a permanent error, a newer
    /// notice, or a shutdown.
    pub(super) async fn download(
        &mut self,
        p: &Plan,
        stop: &watch::Receiver<bool>,
    ) -> Result<DownloadEnd, EngineError> {
        let Some(txn) = &self.journal.txn else {
            return Ok(DownloadEnd::Done(Vec::new()));
        };
        let wants: Vec<ImageWant> = p.start.iter().map(|a| want(a, &txn.target[a])).collect();
        // The agent's own binary, when the update changes it and it is not staged yet.
        let agent = txn
            .agent
            .as_ref()
            .filter(|a| !self.cfg.agent_dir.staged(&a.version, &a.digest))
            .map(|a| {
                (
                    ImageWant {
                        app: ferry_protocol::release::AGENT_APP.to_string(),
                        repo: a.repo.clone(),
                        digest: a.digest.clone(),
                    },
                    a.version.clone(),
                )
            });
        if wants.is_empty() && agent.is_none() {
            return Ok(DownloadEnd::Done(Vec::new()));
        }
        let progress = Arc::new(Progress::default());
        let mut backoff = Backoff::new(self.cfg.retry_initial, self.cfg.retry_max);
        let inbox = self.inbox.clone();
        let mut last: Reported = None;
        // Progress events name the app when the update downloads one.
        let app = (wants.len() == 1).then(|| wants[0].app.clone());
        let app = app.as_deref();
        loop {
            let cancel = Arc::new(AtomicBool::new(false));
            let fetched_before = progress.blobs.fetched.load(Ordering::Relaxed);
            let attempt = {
                let (s, w, p, c) = (
                    self.source.clone(),
                    wants.clone(),
                    progress.clone(),
                    cancel.clone(),
                );
                let (agent, dir) = (agent.clone(), self.cfg.agent_dir.clone());
                async move {
                    // The agent first: staged (on disk, verified) it is never fetched again,
                    // whatever happens to the images' attempt.
                    if let Some((aw, version)) = &agent {
                        if !dir.staged(version, &aw.digest) {
                            s.fetch_agent(aw, &dir, version, &p, &c).await?;
                        }
                    }
                    if w.is_empty() {
                        return Ok(Vec::new());
                    }
                    s.fetch(&w, &p, &c).await
                }
            };
            tokio::pin!(attempt);
            let mut tick =
                tokio::time::interval(self.cfg.progress_every.max(Duration::from_millis(100)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let result = loop {
                tokio::select! {
                    biased;
                    _ = stop.clone().into_stopped() => {
                        cancel.store(true, Ordering::Relaxed);
                        return Err(EngineError::Interrupted(State::Downloading));
                    }
                    raw = inbox.next() => {
                        if let Some(next) = self.consider(&raw).await {
                            cancel.store(true, Ordering::Relaxed);
                            self.download_stats = Some(progress.stats());
                            return Ok(DownloadEnd::Superseded(next));
                        }
                    }
                    r = &mut attempt => break r,
                    _ = tick.tick() => self.progress_event(&progress, app, &mut last, false),
                }
            };
            match result {
                Ok(fetched) => {
                    self.progress_event(&progress, app, &mut last, true);
                    self.download_stats = Some(progress.stats());
                    return Ok(DownloadEnd::Done(fetched));
                }
                Err(e) if e.is_transient() || matches!(e, DownloadError::Cancelled) => {
                    progress.retries.fetch_add(1, Ordering::Relaxed);
                    // An attempt that made progress (a link that drops now and then) resumes
                    // at once, after a little jitter; one that did not backs off.
                    let delay = if progress.blobs.fetched.load(Ordering::Relaxed) > fetched_before {
                        backoff.reset();
                        after_progress(self.cfg.retry_initial)
                    } else {
                        backoff.next_jittered()
                    };
                    let reason = format!("retrying in {}: {e}", human_wait(delay));
                    tracing::warn!(error = %e, delay_ms = delay.as_millis() as u64, "download interrupted; it resumes after a pause");
                    self.hold = Some((Waiting::Retrying, reason.clone()));
                    let (bytes, total) = progress.bytes();
                    let stats = progress.stats();
                    self.event(Phase::Downloading, |ev| {
                        ev.app = app.map(str::to_string);
                        ev.bytes = Some(bytes);
                        ev.total = Some(total);
                        ev.waiting = Some(Waiting::Retrying);
                        ev.reason = Some(reason);
                        ev.download = Some(stats);
                    });
                    self.publish_state().await;
                    let pause = tokio::time::sleep(delay);
                    tokio::pin!(pause);
                    loop {
                        tokio::select! {
                            biased;
                            _ = stop.clone().into_stopped() => {
                                return Err(EngineError::Interrupted(State::Downloading));
                            }
                            raw = inbox.next() => {
                                if let Some(next) = self.consider(&raw).await {
                                    self.download_stats = Some(progress.stats());
                                    return Ok(DownloadEnd::Superseded(next));
                                }
                            }
                            _ = &mut pause => break,
                        }
                    }
                    self.hold = None;
                }
                Err(e) => {
                    tracing::error!(error = %e, "download failed");
                    self.download_stats = Some(progress.stats());
                    return Ok(DownloadEnd::Failed(e));
                }
            }
        }
    }

    /// Bring one deployment's image into the engine again (it vanished between the download
    /// and the switch): one attempt; its image id.
    pub(super) async fn refetch(&self, d: &Deployment) -> Result<String, String> {
        let progress = Arc::new(Progress::default());
        let cancel = Arc::new(AtomicBool::new(false));
        let w = want(&d.release.app, d);
        self.source
            .fetch(std::slice::from_ref(&w), &progress, &cancel)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .next()
            .map(|f| f.image_id)
            .ok_or_else(|| format!("{}@{} was not loaded", w.repo, w.digest))
    }
}
