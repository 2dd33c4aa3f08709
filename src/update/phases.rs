//! **Where a container is swapped**, as the engine's phases: the switch (new containers created
//! first, then the old ones retired per strategy), the health gate, the rollback to the committed
//! set, the commit and its pruning, and the reconcile of the runtime with the committed set at
//! start-up (or after a rollback that could not finish). The container steps themselves are in
//! [`super::swap`].

use std::collections::BTreeSet;

use chrono::Utc;
use ferry_protocol::report::UpdateStatus;
use ferry_protocol::Phase;

use tokio::sync::watch;

use crate::download::ImageSource;
use crate::health::{self, HealthParams};
use crate::outbox::Outbox;
use crate::runtime::{labels, ContainerRuntime};
use crate::shutdown::StopFlag;
use crate::update::engine::{Engine, EngineError, Timing};
use crate::update::journal::Txn;
use crate::update::plan::Plan;
use crate::update::swap;

impl<R: ContainerRuntime, S: ImageSource, O: Outbox> Engine<R, S, O> {
    pub(super) async fn switch(&mut self, p: &Plan) -> Result<(), String> {
        let txn = self.journal.txn.clone().ok_or("no transaction")?;
        // Create every new container first: a failure here has touched nothing that runs.
        for app in &p.start {
            let cfg = swap::container_config(&self.placement(), txn.sequence, &txn.target[app]);
            // The image was verified when it was loaded; if something removed it since (another
            // tenant of the engine pruning, an operator), fetch and verify it again.
            if let Err(first) = swap::ensure_created(&*self.rt, &self.placement(), app, &cfg).await
            {
                let present = matches!(self.rt.image_inspect(&cfg.image).await, Ok(Some(_)));
                if present {
                    return Err(first);
                }
                tracing::warn!(image = %cfg.image, "image vanished after the download; loading it again");
                let image_id = self.refetch(&txn.target[app]).await?;
                let mut d = txn.target[app].clone();
                d.image_id = Some(image_id);
                let cfg = swap::container_config(&self.placement(), txn.sequence, &d);
                swap::ensure_created(&*self.rt, &self.placement(), app, &cfg).await?;
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

    pub(super) fn mark(&mut self, f: impl FnOnce(&mut Txn)) -> Result<(), String> {
        if let Some(t) = self.journal.txn.as_mut() {
            f(t);
        }
        self.save().map_err(|e| e.to_string())
    }

    pub(super) async fn gate(
        &self,
        p: &Plan,
        stop: &watch::Receiver<bool>,
    ) -> Result<(), (String, String)> {
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
                stop.stopped().await;
                tokio::time::sleep(drain).await;
            } => Err(("agent".to_string(), format!("shutting down: no health verdict within the {} s drain time", drain.as_secs()))),
        }
    }

    pub(super) async fn rollback(&mut self, p: &Plan) -> Result<(), String> {
        let txn = self.journal.txn.clone().ok_or("no transaction")?;
        for app in &p.start {
            let name = &txn.target[app].container;
            swap::discard(&*self.rt, name, self.cfg.stop_grace).await?;
        }
        let seq = self.journal.committed_sequence;
        for app in p.replace.iter().chain(p.remove.iter()).chain(p.keep.iter()) {
            if let Some(d) = self.journal.committed.get(app) {
                swap::revive(&*self.rt, &self.placement(), seq, d, self.cfg.stop_grace).await?;
            }
        }
        Ok(())
    }

    pub(super) async fn commit(&mut self, p: &Plan, timing: &Timing) -> Result<(), EngineError> {
        let txn = self
            .journal
            .txn
            .clone()
            .ok_or_else(|| EngineError::Internal("commit without txn".into()))?;
        let previous = std::mem::replace(&mut self.journal.committed, txn.target.clone());
        self.journal.committed_sequence = txn.sequence;
        self.save()?;
        // Prune the previous set: containers replaced or no longer wanted, and their images.
        let still_used: BTreeSet<&str> =
            self.journal.committed.values().map(|d| d.image()).collect();
        for app in p.replace.iter().chain(p.remove.iter()) {
            if let Some(old) = previous.get(app) {
                if let Err(e) = swap::discard(&*self.rt, &old.container, self.cfg.stop_grace).await
                {
                    tracing::warn!(error = %e, "pruning the previous container failed; reconcile retries it");
                }
                if !still_used.contains(old.image()) {
                    let _ = self.rt.remove_image(old.image()).await;
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

    /// Remove images brought in by a transaction that did not commit (never one the committed
    /// set uses, nor one whose manifest digest is in `keep`).
    pub(super) async fn discard_pulled(&mut self, keep: &BTreeSet<String>) {
        let Some(txn) = &self.journal.txn else { return };
        let used: BTreeSet<&str> = self.journal.committed.values().map(|d| d.image()).collect();
        let kept: BTreeSet<&str> = txn
            .target
            .values()
            .filter(|d| keep.contains(&d.digest))
            .map(|d| d.image())
            .collect();
        for r in &txn.pulled {
            if !used.contains(r.as_str()) && !kept.contains(r.as_str()) {
                let _ = self.rt.remove_image(r).await;
            }
        }
    }

    /// Record the open transaction's outcome as the last result and close it (not journaled).
    pub(super) fn close_txn(&mut self) {
        if let Some(t) = &self.journal.txn {
            self.journal.last_result = Some(UpdateStatus {
                sequence: t.sequence,
                rollout: t.rollout.clone(),
                phase: t.state.phase().unwrap_or(Phase::Failed),
                error: t.error.clone(),
                at: Utc::now(),
                waiting: None,
                reason: None,
            });
        }
        self.journal.txn = None;
        self.hold = None;
    }

    pub(super) async fn finish(&mut self) -> Result<(), EngineError> {
        let had_agent = self.journal.txn.as_ref().is_some_and(|t| t.agent.is_some());
        self.close_txn();
        self.save()?;
        // Nothing stored is needed any more: the engine holds what runs.
        self.source.release().await;
        if had_agent {
            // A staged version that did not become current goes.
            self.cfg.agent_dir.prune();
        }
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
            if let Err(e) =
                swap::revive(&*self.rt, &self.placement(), seq, d, self.cfg.stop_grace).await
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
        let used: BTreeSet<&str> = self.journal.committed.values().map(|d| d.image()).collect();
        for c in mine {
            if c.labels.get(labels::DEVICE).map(String::as_str) != Some(self.cfg.device.as_str()) {
                continue;
            }
            if !keep.contains(c.name.as_str()) {
                tracing::info!(container = %c.name, "removing a leftover container of this device");
                if let Err(e) = swap::discard(&*self.rt, &c.name, self.cfg.stop_grace).await {
                    tracing::warn!(container = %c.name, error = %e, "cannot remove leftover");
                } else if !used.contains(c.image.as_str()) && !used.contains(c.image_id.as_str()) {
                    let _ = self.rt.remove_image(&c.image).await;
                }
            }
        }
    }
}
