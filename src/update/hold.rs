//! **The moment of the switch.** Every app of the desired set is downloaded and verified
//! (`downloaded`); before anything is stopped, the switch waits for
//! - a local maintenance window (`[update] windows`, the box's local time), when any is set;
//! - the update locks of the apps the switch would stop (see [`crate::update::lock`]), unless
//!   the notice carries `force` (which never overrides the window or the local policy).
//!
//! While waiting the engine reports `downloaded` with `waiting: window | lock` and the reason
//! (an event when what it waits for changes; the retained state all along), a lock held longer
//! than `[update] max_lock_hold` is reported once, and a newer verified notice takes over at once.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use ferry_protocol::{Phase, Waiting};
use tokio::sync::watch;

use crate::download::ImageSource;
use crate::outbox::Outbox;
use crate::runtime::ContainerRuntime;
use crate::shutdown::StopFlag;
use crate::update::engine::{Accepted, Engine, EngineError};
use crate::update::lock;
use crate::update::plan::Plan;
use crate::update::state::State;
use crate::update::window::{self, human_wait};

/// Longest sleep before the window is looked at again (the clock may be set meanwhile).
const WINDOW_RECHECK: Duration = Duration::from_secs(60);

fn local_hhmmss(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Local>::from(t)
        .format("%H:%M:%S")
        .to_string()
}

impl<R: ContainerRuntime, S: ImageSource, O: Outbox> Engine<R, S, O> {
    /// Wait until the switch may start. `Some` when a newer notice took the update over.
    pub(super) async fn wait_to_switch(
        &mut self,
        p: &Plan,
        stop: &watch::Receiver<bool>,
    ) -> Result<Option<Accepted>, EngineError> {
        let force = self.journal.txn.as_ref().is_some_and(|t| t.force);
        // The apps whose running container the switch stops: their locks count.
        let stopping: BTreeSet<String> = p.replace.iter().chain(&p.remove).cloned().collect();
        let inbox = self.inbox.clone();
        let mut reported: Option<(Waiting, String)> = None;
        let mut long_lock_reported = false;
        loop {
            let now = chrono::Local::now().time();
            let held = match (&self.cfg.lock_root, force) {
                (Some(root), false) => lock::held(root, &stopping),
                _ => Vec::new(),
            };
            let (hold, key, pause) = match (window::wait_for(&self.cfg.windows, now), held.first())
            {
                (None, None) => {
                    if self.hold.take().is_some() {
                        tracing::info!("the switch may start");
                    }
                    return Ok(None);
                }
                (Some((d, w)), _) => (
                    (
                        Waiting::Window,
                        format!(
                            "maintenance window {w} (local time) opens in {}",
                            human_wait(d)
                        ),
                    ),
                    w.to_string(),
                    d.min(WINDOW_RECHECK),
                ),
                (None, Some((app, since))) => {
                    let held_for = since.elapsed().unwrap_or_default();
                    let mut reason = format!(
                        "{app} holds its update lock ({}/{}) since {}",
                        lock::CONTAINER_DIR,
                        lock::LOCK_FILE,
                        local_hhmmss(*since)
                    );
                    if held_for > self.cfg.max_lock && !long_lock_reported {
                        long_lock_reported = true;
                        reason.push_str(&format!(
                            "; held for more than max_lock_hold ({})",
                            crate::health::params::fmt_secs(self.cfg.max_lock)
                        ));
                        tracing::warn!(app = %app, held_s = held_for.as_secs(), "an update lock is held past max_lock_hold");
                        // Reported now even though what we wait for did not change.
                        reported = None;
                    }
                    ((Waiting::Lock, reason), app.clone(), self.cfg.lock_poll)
                }
            };
            self.hold = Some(hold.clone());
            let changed = reported
                .as_ref()
                .is_none_or(|(w, k)| *w != hold.0 || *k != key);
            if changed {
                reported = Some((hold.0, key));
                tracing::info!(waiting = %hold.0, reason = %hold.1, "the switch waits");
                self.event(Phase::Downloaded, |e| {
                    e.waiting = Some(hold.0);
                    e.reason = Some(hold.1.clone());
                });
                self.publish_state().await;
            }
            let sleep = tokio::time::sleep(pause);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    biased;
                    _ = stop.clone().into_stopped() => {
                        return Err(EngineError::Interrupted(State::Downloaded));
                    }
                    raw = inbox.next() => {
                        if let Some(next) = self.consider(&raw).await {
                            return Ok(Some(next));
                        }
                    }
                    _ = &mut sleep => break,
                }
            }
        }
    }
}
