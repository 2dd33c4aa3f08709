//! What the engine reports: an event per phase, and the retained state (the committed set as
//! the runtime runs it, and the update in progress with what it waits for).

use std::collections::BTreeMap;

use chrono::Utc;
use ferry_protocol::report::{AppState, Event, StateReport, UpdateStatus};
use ferry_protocol::Phase;

use crate::download::ImageSource;
use crate::outbox::Outbox;
use crate::runtime::ContainerRuntime;
use crate::update::engine::Engine;

impl<R: ContainerRuntime, S: ImageSource, O: Outbox> Engine<R, S, O> {
    pub(super) fn event(&self, phase: Phase, f: impl FnOnce(&mut Event)) {
        let (seq, rollout) = match &self.journal.txn {
            Some(t) => (t.sequence, t.rollout.clone()),
            None => (self.journal.last_sequence, None),
        };
        let mut e = Event::new(&self.cfg.device, seq, rollout, phase);
        f(&mut e);
        tracing::info!(device = %self.cfg.device, sequence = e.sequence, phase = %phase, app = ?e.app, reason = ?e.reason, waiting = ?e.waiting, "update event");
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
                sequence: t.sequence,
                rollout: t.rollout.clone(),
                phase: t.state.phase().unwrap_or(Phase::Verified),
                error: t.error.clone(),
                at: Utc::now(),
                waiting: self.hold.as_ref().map(|(w, _)| *w),
                reason: self.hold.as_ref().map(|(_, r)| r.clone()),
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
            trust: Some(self.trust_status()),
            device: self.cfg.device.clone(),
            agent_version: crate::version().to_string(),
            platform: self.cfg.platform.clone(),
            sequence: self.journal.last_sequence,
            apps,
            update,
            ts: Utc::now(),
            labels: self.cfg.labels.clone(),
        };
        self.out.state(&s);
    }
}
