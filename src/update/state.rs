//! The update as an explicit state machine (after Bottlerocket's updater): one enum of states,
//! one enum of inputs, one pure transition function. The engine does the I/O around it and
//! journals every state before acting on it.

use ferry_protocol::Phase;
use serde::{Deserialize, Serialize};

/// Where an update transaction stands. `Idle` means no transaction is open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Idle,
    /// Accepted and journaled (the sequence is consumed); nothing pulled yet.
    Verified,
    Downloading,
    Downloaded,
    /// Containers are being swapped; the journal records each step taken.
    Switching,
    HealthChecking,
    RollingBack,
    /// The apps passed their gate and the notice changes the agent: the new binary is made
    /// current (on trial) and the agent restarts into it.
    AgentSwitching,
    /// The new agent runs on trial: committed once it has reached the broker and reported.
    AgentTrial,
    Committed,
    RolledBack,
    Failed,
    /// A newer verified notice took over before the switch: nothing that runs was touched.
    Superseded,
}

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    /// A notice passed every check.
    Accept,
    StartPull,
    PullDone,
    /// A permanent download error (digest mismatch twice, manifest unknown, wrong platform,
    /// not enough disk, store cap): nothing was changed. Transient errors never get here: they
    /// are retried inside `Downloading`.
    PullFailed,
    /// A newer notice passed every check while this update had not switched yet.
    Supersede,
    StartSwitch,
    SwitchDone,
    /// A switch step failed: restore the previous set.
    SwitchFailed,
    Healthy,
    Unhealthy,
    RollbackDone,
    /// A rollback step failed; it is retried (the box must end on a set, never none).
    RollbackFailed,
    /// A newer verified notice arrived while a rollback keeps failing: this update ends `failed`
    /// and the newer one starts from the committed set (which it replaces or restores itself).
    Yield,
    /// The apps are healthy and the agent changes too: switch it.
    SwitchAgent,
    /// The new agent binary started (after the restart).
    AgentStarted,
    /// The new agent reached the broker and published its state.
    AgentConfirmed,
    /// The new agent did not come up: the launcher went back to the previous one (or the switch
    /// could not be made); the apps are rolled back with it.
    AgentFailed,
    /// The agent restarted with this state in its journal.
    Recover,
    /// A terminal state has been reported; the transaction is closed.
    Finish,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("no transition from {from:?} on {input:?}")]
pub struct InvalidTransition {
    pub from: State,
    pub input: Input,
}

/// The one transition function.
pub fn transition(from: State, input: Input) -> Result<State, InvalidTransition> {
    use Input as I;
    use State as S;
    let to = match (from, input) {
        (S::Idle, I::Accept) => S::Verified,
        (S::Verified, I::StartPull) => S::Downloading,
        (S::Verified | S::Downloading, I::PullFailed) => S::Failed,
        (S::Verified | S::Downloading | S::Downloaded, I::Supersede) => S::Superseded,
        (S::Downloading, I::PullDone) => S::Downloaded,
        (S::Downloaded, I::StartSwitch) => S::Switching,
        (S::Switching, I::SwitchDone) => S::HealthChecking,
        (S::Switching, I::SwitchFailed) => S::RollingBack,
        (S::HealthChecking, I::Healthy) => S::Committed,
        (S::HealthChecking, I::SwitchAgent) => S::AgentSwitching,
        (S::AgentSwitching, I::AgentStarted) => S::AgentTrial,
        (S::AgentTrial, I::AgentConfirmed) => S::Committed,
        (S::AgentSwitching | S::AgentTrial, I::AgentFailed) => S::RollingBack,
        (S::HealthChecking, I::Unhealthy) => S::RollingBack,
        (S::RollingBack, I::RollbackDone) => S::RolledBack,
        (S::RollingBack, I::RollbackFailed) => S::RollingBack,
        (S::RollingBack, I::Yield) => S::Failed,
        // After a restart: work not yet visible to the running set is redone from the pull;
        // a switch cut short is undone; a health gate is run again on what runs; a rollback
        // is finished.
        (S::Verified | S::Downloading | S::Downloaded, I::Recover) => S::Verified,
        (S::Switching, I::Recover) => S::RollingBack,
        (S::HealthChecking, I::Recover) => S::HealthChecking,
        (S::RollingBack, I::Recover) => S::RollingBack,
        // Which binary came back decides (the engine sends AgentStarted or AgentFailed).
        (S::AgentSwitching, I::Recover) => S::AgentSwitching,
        (S::AgentTrial, I::Recover) => S::AgentTrial,
        (S::Committed | S::RolledBack | S::Failed | S::Superseded, I::Recover) => from,
        (S::Committed | S::RolledBack | S::Failed | S::Superseded, I::Finish) => S::Idle,
        (S::Idle, I::Recover) => S::Idle,
        _ => return Err(InvalidTransition { from, input }),
    };
    Ok(to)
}

impl State {
    /// The protocol phase reported for this state (`Idle` has none).
    pub fn phase(self) -> Option<Phase> {
        Some(match self {
            State::Idle => return None,
            State::Verified => Phase::Verified,
            State::Downloading => Phase::Downloading,
            State::Downloaded => Phase::Downloaded,
            State::Switching => Phase::Switching,
            State::HealthChecking => Phase::HealthChecking,
            State::RollingBack => Phase::RollingBack,
            State::AgentSwitching => Phase::Switching,
            State::AgentTrial => Phase::HealthChecking,
            State::Committed => Phase::Committed,
            State::RolledBack => Phase::RolledBack,
            State::Failed => Phase::Failed,
            State::Superseded => Phase::Superseded,
        })
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            State::Committed | State::RolledBack | State::Failed | State::Superseded
        )
    }

    /// Nothing that runs has been touched yet: a newer notice may take this update over.
    pub fn may_be_superseded(self) -> bool {
        matches!(
            self,
            State::Verified | State::Downloading | State::Downloaded
        )
    }

    /// True when the running set may differ from the committed set (a shutdown must not stop
    /// here without finishing or undoing the swap).
    pub fn touches_running_set(self) -> bool {
        matches!(
            self,
            State::Switching
                | State::HealthChecking
                | State::RollingBack
                | State::AgentSwitching
                | State::AgentTrial
        )
    }

    pub const ALL: [State; 13] = [
        State::Idle,
        State::Verified,
        State::Downloading,
        State::Downloaded,
        State::Switching,
        State::HealthChecking,
        State::RollingBack,
        State::AgentSwitching,
        State::AgentTrial,
        State::Committed,
        State::RolledBack,
        State::Failed,
        State::Superseded,
    ];
}

impl Input {
    pub const ALL: [Input; 19] = [
        Input::Accept,
        Input::StartPull,
        Input::PullDone,
        Input::PullFailed,
        Input::Supersede,
        Input::StartSwitch,
        Input::SwitchDone,
        Input::SwitchFailed,
        Input::Healthy,
        Input::Unhealthy,
        Input::RollbackDone,
        Input::RollbackFailed,
        Input::Yield,
        Input::SwitchAgent,
        Input::AgentStarted,
        Input::AgentConfirmed,
        Input::AgentFailed,
        Input::Recover,
        Input::Finish,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use Input as I;
    use State as S;

    fn run(inputs: &[Input]) -> Result<State, InvalidTransition> {
        inputs.iter().try_fold(S::Idle, |s, i| transition(s, *i))
    }

    #[test]
    fn happy_path() {
        assert_eq!(
            run(&[
                I::Accept,
                I::StartPull,
                I::PullDone,
                I::StartSwitch,
                I::SwitchDone,
                I::Healthy
            ]),
            Ok(S::Committed)
        );
    }

    #[test]
    fn unhealthy_rolls_back() {
        assert_eq!(
            run(&[
                I::Accept,
                I::StartPull,
                I::PullDone,
                I::StartSwitch,
                I::SwitchDone,
                I::Unhealthy,
                I::RollbackDone
            ]),
            Ok(S::RolledBack)
        );
    }

    #[test]
    fn switch_failure_rolls_back() {
        assert_eq!(
            run(&[
                I::Accept,
                I::StartPull,
                I::PullDone,
                I::StartSwitch,
                I::SwitchFailed
            ]),
            Ok(S::RollingBack)
        );
    }

    #[test]
    fn pull_failure_fails_without_switch() {
        assert_eq!(
            run(&[I::Accept, I::StartPull, I::PullFailed]),
            Ok(S::Failed)
        );
        assert_eq!(run(&[I::Accept, I::PullFailed]), Ok(S::Failed));
    }

    #[test]
    fn rollback_retries_until_done() {
        assert_eq!(
            transition(S::RollingBack, I::RollbackFailed),
            Ok(S::RollingBack)
        );
        assert_eq!(
            transition(S::RollingBack, I::RollbackDone),
            Ok(S::RolledBack)
        );
    }

    #[test]
    fn the_agent_switches_after_the_gate_and_commits_only_once_confirmed() {
        assert_eq!(
            run(&[
                I::Accept,
                I::StartPull,
                I::PullDone,
                I::StartSwitch,
                I::SwitchDone,
                I::SwitchAgent,
                I::Recover,
                I::AgentStarted,
                I::Recover,
                I::AgentConfirmed
            ]),
            Ok(S::Committed)
        );
        for s in [S::AgentSwitching, S::AgentTrial] {
            assert_eq!(transition(s, I::AgentFailed), Ok(S::RollingBack));
            assert!(s.touches_running_set());
            assert!(transition(s, I::Healthy).is_err());
        }
        // No agent switch without the apps' gate, no commit without the new agent's word.
        assert!(transition(S::Switching, I::SwitchAgent).is_err());
        assert!(transition(S::AgentSwitching, I::AgentConfirmed).is_err());
    }

    #[test]
    fn only_a_failing_rollback_yields_to_a_newer_notice() {
        assert_eq!(transition(S::RollingBack, I::Yield), Ok(S::Failed));
        for s in S::ALL.into_iter().filter(|s| *s != S::RollingBack) {
            assert!(transition(s, I::Yield).is_err(), "{s:?}");
        }
    }

    #[test]
    fn a_newer_notice_supersedes_only_before_the_switch() {
        for s in [S::Verified, S::Downloading, S::Downloaded] {
            assert_eq!(transition(s, I::Supersede), Ok(S::Superseded));
            assert!(s.may_be_superseded());
        }
        for s in [
            S::Idle,
            S::Switching,
            S::HealthChecking,
            S::RollingBack,
            S::Committed,
            S::RolledBack,
            S::Failed,
            S::Superseded,
        ] {
            assert!(transition(s, I::Supersede).is_err(), "{s:?}");
            assert!(!s.may_be_superseded());
        }
        assert_eq!(transition(S::Superseded, I::Recover), Ok(S::Superseded));
        assert_eq!(S::Superseded.phase(), Some(Phase::Superseded));
    }

    #[test]
    fn terminal_states_finish_to_idle() {
        for s in [S::Committed, S::RolledBack, S::Failed, S::Superseded] {
            assert_eq!(transition(s, I::Finish), Ok(S::Idle));
            assert!(s.is_terminal());
        }
    }

    #[test]
    fn recovery_after_restart() {
        assert_eq!(transition(S::Verified, I::Recover), Ok(S::Verified));
        assert_eq!(transition(S::Downloading, I::Recover), Ok(S::Verified));
        assert_eq!(transition(S::Downloaded, I::Recover), Ok(S::Verified));
        assert_eq!(transition(S::Switching, I::Recover), Ok(S::RollingBack));
        assert_eq!(
            transition(S::HealthChecking, I::Recover),
            Ok(S::HealthChecking)
        );
        assert_eq!(transition(S::RollingBack, I::Recover), Ok(S::RollingBack));
        assert_eq!(transition(S::Idle, I::Recover), Ok(S::Idle));
    }

    #[test]
    fn invalid_transitions_are_errors() {
        // No commit without a health gate, no switch without a pull, no accept mid-update.
        assert!(transition(S::Switching, I::Healthy).is_err());
        assert!(transition(S::Verified, I::StartSwitch).is_err());
        assert!(transition(S::Downloading, I::Accept).is_err());
        assert!(transition(S::Idle, I::Finish).is_err());
        assert!(transition(S::Committed, I::Unhealthy).is_err());
    }

    #[test]
    fn every_pair_is_defined_or_rejected() {
        // Exhaustive: the function is total (never panics) and every state but Idle has a phase.
        for s in S::ALL {
            for i in I::ALL {
                let _ = transition(s, i);
            }
            assert_eq!(s.phase().is_none(), s == S::Idle);
        }
    }

    fn any_input() -> impl Strategy<Value = Input> {
        proptest::sample::select(I::ALL.to_vec())
    }

    proptest! {
        /// Superseded is entered only from a state that has not touched the running set.
        #[test]
        fn superseded_never_follows_a_switch(inputs in proptest::collection::vec(any_input(), 0..40)) {
            let mut s = S::Idle;
            let mut switched = false;
            for i in inputs {
                if let Ok(n) = transition(s, i) {
                    if n == S::Switching {
                        switched = true;
                    }
                    if n == S::Superseded && s != S::Superseded {
                        prop_assert!(!switched);
                        prop_assert!(!s.touches_running_set());
                    }
                    if n == S::Idle {
                        switched = false;
                    }
                    s = n;
                }
            }
        }

        /// Whatever happens, Committed is only ever entered from HealthChecking on Healthy, and
        /// the running set is never left mid-swap by a transition to a terminal state without a
        /// health verdict or a finished rollback.
        #[test]
        fn committed_only_after_health_gate(inputs in proptest::collection::vec(any_input(), 0..40)) {
            let mut s = S::Idle;
            for i in inputs {
                if let Ok(n) = transition(s, i) {
                    if n == S::Committed && s != S::Committed {
                        prop_assert_eq!((s, i), (S::HealthChecking, I::Healthy));
                    }
                    if n == S::RolledBack && s != S::RolledBack {
                        prop_assert_eq!((s, i), (S::RollingBack, I::RollbackDone));
                    }
                    if s.touches_running_set() && i != I::Yield {
                        // From a state that touched the running set, Failed and Idle are
                        // unreachable in one step: only Committed or a rollback ends it. The
                        // one exception: a stuck rollback yields to a newer notice, whose own
                        // transaction then starts from the committed set.
                        prop_assert!(n != S::Failed && n != S::Idle);
                    }
                    s = n;
                }
            }
        }

        /// Recovery is idempotent: recovering twice equals recovering once.
        #[test]
        fn recover_is_idempotent(idx in 0usize..11) {
            let s = S::ALL[idx];
            if let Ok(once) = transition(s, I::Recover) {
                prop_assert_eq!(transition(once, I::Recover), Ok(once));
            }
        }
    }
}
