//! The agent's own release inside a transaction (issue 13, PROTOCOL.md §11): staged during the
//! download (the binary out of its verified image, installed next to the running one), switched
//! after the apps passed their gate (one rename of `state_dir/agent/current`, then the agent
//! restarts into it), committed only once the new binary has reached the broker and reported.
//! When it does not come up, the launcher (`crate::selfupdate::launch`) goes back on its own and
//! the previous agent rolls the apps of the transaction back with it.

use ferry_protocol::release::AGENT_APP;
use ferry_protocol::VerifiedNotice;
use tokio::sync::watch;

use crate::download::ImageSource;
use crate::outbox::Outbox;
use crate::runtime::ContainerRuntime;
use crate::update::engine::{Engine, EngineError, Timing};
use crate::update::journal::AgentStep;
use crate::update::state::{Input, State};

impl<R: ContainerRuntime, S: ImageSource, O: Outbox> Engine<R, S, O> {
    /// The agent release of `notice` for this platform, when it names another version than the
    /// one running (the notice's rules already refused a downgrade without `allow_downgrade`).
    pub(super) fn agent_step_of(&self, notice: &VerifiedNotice) -> Option<AgentStep> {
        let vr = notice.releases.get(AGENT_APP)?;
        let r = &vr.release;
        if r.version == self.cfg.agent_version {
            return None;
        }
        Some(AgentStep {
            version: r.version.clone(),
            from: self.cfg.agent_version.clone(),
            repo: r.image.clone(),
            digest: r.platforms.get(&self.cfg.platform)?.clone(),
        })
    }

    /// `AgentSwitching`, as this binary finds it: the new one (after the restart) goes on
    /// trial; the old one either switches and asks for the restart, or (the launcher went back)
    /// fails the step with the launcher's reason.
    pub(super) async fn agent_switching(&mut self) -> Result<(), EngineError> {
        let Some(step) = self.journal.txn.as_ref().and_then(|t| t.agent.clone()) else {
            return Err(EngineError::Internal(
                "agent switch without an agent step".into(),
            ));
        };
        let dir = &self.cfg.agent_dir;
        if self.cfg.agent_version == step.version {
            tracing::info!(version = %step.version, "the new agent runs; on trial until it has reported");
            self.step(Input::AgentStarted).await?;
            return Ok(());
        }
        if let Some(fb) = dir.fallback().filter(|f| f.version == step.version) {
            return self.agent_failed(fb.reason).await;
        }
        if !dir.staged(&step.version, &step.digest) {
            return self
                .agent_failed(format!(
                    "agent {} is not installed on the box",
                    step.version
                ))
                .await;
        }
        let installed = dir.holds(&self.cfg.agent_exe);
        let seq = self.journal.txn.as_ref().map_or(0, |t| t.sequence);
        if let Err(e) = dir.switch_to(&step.version, &step.from, seq, installed) {
            return self
                .agent_failed(format!("switching to agent {}: {e}", step.version))
                .await;
        }
        tracing::info!(from = %step.from, to = %step.version, "agent switched; restarting into it");
        Err(EngineError::Restart(step.version))
    }

    /// `AgentTrial`, as this binary finds it at start: still the new one (a restart during the
    /// trial, counted by the launcher): wait for the confirmation; the old one: it failed.
    pub(super) async fn agent_trial(&mut self) -> Result<bool, EngineError> {
        let Some(step) = self.journal.txn.as_ref().and_then(|t| t.agent.clone()) else {
            return Err(EngineError::Internal(
                "agent trial without an agent step".into(),
            ));
        };
        if self.cfg.agent_version == step.version {
            return Ok(true);
        }
        let reason = match self
            .cfg
            .agent_dir
            .fallback()
            .filter(|f| f.version == step.version)
        {
            Some(fb) => fb.reason,
            None => format!(
                "agent {} on trial was replaced by {} before it confirmed",
                step.version, self.cfg.agent_version
            ),
        };
        self.agent_failed(reason).await?;
        Ok(false)
    }

    async fn agent_failed(&mut self, reason: String) -> Result<(), EngineError> {
        tracing::error!(%reason, "the new agent did not come up; rolling the update back");
        self.set_error(reason, None);
        self.step(Input::AgentFailed).await?;
        // Journaled as RollingBack: the fallback's record has done its job.
        self.cfg.agent_dir.clear_fallback();
        Ok(())
    }

    /// True while the new agent waits to confirm (reach the broker and report): no other
    /// notice may start meanwhile.
    pub fn awaiting_agent_confirm(&self) -> bool {
        self.journal
            .txn
            .as_ref()
            .is_some_and(|t| t.state == State::AgentTrial)
    }

    /// The new agent reached the broker and reported: commit the transaction.
    pub async fn confirm_agent(&mut self, stop: &watch::Receiver<bool>) -> Result<(), EngineError> {
        if !self.awaiting_agent_confirm() {
            return Ok(());
        }
        self.step(Input::AgentConfirmed).await?;
        if let Err(e) = self.cfg.agent_dir.clear_trial() {
            tracing::warn!(error = %e, "cannot clear the agent's trial record");
        }
        let mut timing = Timing::now();
        self.drive(stop, &mut timing).await?;
        self.cfg.agent_dir.prune();
        tracing::info!(version = %self.cfg.agent_version, "agent update committed");
        Ok(())
    }
}
