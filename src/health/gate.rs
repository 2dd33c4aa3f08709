//! The health gate's decision logic (protocol §3, after Marathon), pure: no I/O and no clock.
//!
//! The driver ([`crate::health::watch`]) feeds a [`Gate`] observations stamped with the time
//! elapsed since the container started; the gate answers with a [`Verdict`]. Rules:
//!
//! - probe results before `grace` are ignored, passes and failures alike;
//! - `successes` consecutive passes at or after `grace` = healthy;
//! - `max_failures` consecutive failures at or after `grace` = unhealthy;
//! - a container exit, a restart (crash loop) or the container vanishing = unhealthy, at any time;
//! - without a check: running until `grace + successes * interval` with none of the above =
//!   healthy;
//! - still pending at `deadline` = unhealthy. An observation stamped exactly `deadline` is still
//!   taken into account; one stamped later is not (the deadline came first);
//! - the first decided verdict is final.
//!
//! [`Observation::Tick`] and [`Observation::ProbeNoResult`] do not break a streak of passes or
//! failures. Time never goes backwards: an observation stamped earlier than one already seen is
//! treated as happening at the latest time seen.

use std::fmt;
use std::time::Duration;

use super::params::{fmt_secs, HealthParams};

/// Something the driver saw, at a given time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observation {
    /// The configured check passed.
    ProbePassed,
    /// The configured check failed, with a short reason ("GET /healthz: 503").
    ProbeFailed(String),
    /// A probe ran but had no result yet (the image's own HEALTHCHECK still `starting`). Counts as
    /// neither pass nor failure — like [`Observation::Tick`] — but moves the probe schedule on.
    ProbeNoResult,
    /// The container is no longer running; `code` is its exit code when known.
    ContainerExited { code: Option<i64> },
    /// The container's restart count rose by `count` since the gate started (crash loop).
    /// `count: 0` means no restart and is treated as a [`Observation::Tick`].
    Restarted { count: u64 },
    /// The container no longer exists.
    ContainerGone,
    /// Nothing new: just time passing (the container is running, no probe result).
    Tick,
}

/// The gate's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Verdict {
    #[default]
    Pending,
    Healthy,
    /// With a short, human-readable reason (goes into the `rolled_back` event).
    Unhealthy(String),
}

impl Verdict {
    pub fn is_decided(&self) -> bool {
        !matches!(self, Verdict::Pending)
    }

    pub fn is_healthy(&self) -> bool {
        matches!(self, Verdict::Healthy)
    }

    /// The reason of an unhealthy verdict.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Verdict::Unhealthy(r) => Some(r),
            _ => None,
        }
    }

    /// `pending`, `healthy` or `unhealthy`: for logs and state reports.
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Pending => "pending",
            Verdict::Healthy => "healthy",
            Verdict::Unhealthy(_) => "unhealthy",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Unhealthy(r) => write!(f, "unhealthy: {r}"),
            v => f.write_str(v.as_str()),
        }
    }
}

/// One container's health gate. See the module doc for the rules.
#[derive(Clone, Debug)]
pub struct Gate {
    params: HealthParams,
    verdict: Verdict,
    /// Latest time seen.
    now: Duration,
    decided_at: Option<Duration>,
    /// Consecutive post-grace passes / failures.
    passes: u32,
    failures: u32,
    /// When the next probe is due (only meaningful with a check).
    next_probe: Duration,
    last_failure: Option<String>,
}

impl Gate {
    /// A gate at time zero (the container just started). Degenerate params (zero interval,
    /// timeout, deadline or counts) are clamped to 1 ms / 1 so the gate always progresses.
    pub fn new(params: HealthParams) -> Gate {
        let params = params.normalized_with(Duration::from_millis(1));
        Gate {
            next_probe: params.grace,
            params,
            verdict: Verdict::Pending,
            now: Duration::ZERO,
            decided_at: None,
            passes: 0,
            failures: 0,
            last_failure: None,
        }
    }

    pub fn params(&self) -> &HealthParams {
        &self.params
    }

    /// The current verdict (sticky once decided).
    pub fn verdict(&self) -> &Verdict {
        &self.verdict
    }

    /// When the verdict was reached (time since the container started).
    pub fn decided_at(&self) -> Option<Duration> {
        self.decided_at
    }

    /// Current streak of post-grace passes.
    pub fn consecutive_passes(&self) -> u32 {
        self.passes
    }

    /// Current streak of post-grace failures.
    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    /// The reason of the latest failed probe, if any (also before grace).
    pub fn last_failure(&self) -> Option<&str> {
        self.last_failure.as_deref()
    }

    /// When the driver should run the next probe: `None` when the gate has no check or is
    /// decided. The first is due at `grace`; each probe result (or [`Observation::ProbeNoResult`])
    /// observed at or after the due time schedules the next one `interval` later — or right away
    /// when the probe itself took longer than that.
    pub fn next_probe_at(&self) -> Option<Duration> {
        if self.verdict.is_decided() || self.params.check.is_none() {
            None
        } else {
            Some(self.next_probe)
        }
    }

    /// When time alone will decide the gate if nothing else happens: the check-less gate's
    /// `stable_after` (or the deadline, whichever is first), else the deadline. `None` once
    /// decided.
    pub fn decides_by(&self) -> Option<Duration> {
        if self.verdict.is_decided() {
            None
        } else if self.params.check.is_none() {
            Some(self.params.stable_after().min(self.params.deadline))
        } else {
            Some(self.params.deadline)
        }
    }

    /// When the driver must next feed the gate: the earlier of [`Gate::next_probe_at`] and
    /// [`Gate::decides_by`]. `None` once decided.
    pub fn wake_at(&self) -> Option<Duration> {
        match (self.next_probe_at(), self.decides_by()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Feed one observation made `at` (time since the container started); returns the verdict.
    pub fn observe(&mut self, at: Duration, obs: Observation) -> Verdict {
        if self.verdict.is_decided() {
            return self.verdict.clone();
        }
        let at = at.max(self.now);
        self.now = at;
        if at > self.params.deadline {
            return self.decide(at, self.deadline_verdict());
        }

        let verdict = match obs {
            Observation::ContainerExited { code: Some(code) } => {
                Verdict::Unhealthy(format!("container exited with code {code}"))
            }
            Observation::ContainerExited { code: None } => {
                Verdict::Unhealthy("container exited".into())
            }
            Observation::Restarted { count } if count > 0 => Verdict::Unhealthy(format!(
                "container restarted {count} time{} (crash loop)",
                if count == 1 { "" } else { "s" }
            )),
            Observation::ContainerGone => Verdict::Unhealthy("container no longer exists".into()),
            Observation::ProbePassed => {
                self.advance_schedule(at);
                self.probe_passed(at)
            }
            Observation::ProbeFailed(reason) => {
                self.advance_schedule(at);
                self.probe_failed(at, reason)
            }
            Observation::ProbeNoResult => {
                self.advance_schedule(at);
                Verdict::Pending
            }
            Observation::Restarted { .. } | Observation::Tick => Verdict::Pending,
        };
        if verdict.is_decided() {
            return self.decide(at, verdict);
        }

        if self.params.check.is_none() && at >= self.params.stable_after() {
            return self.decide(at, Verdict::Healthy);
        }
        if at >= self.params.deadline {
            return self.decide(at, self.deadline_verdict());
        }
        Verdict::Pending
    }

    fn probe_passed(&mut self, at: Duration) -> Verdict {
        if self.params.check.is_none() || at < self.params.grace {
            return Verdict::Pending;
        }
        self.failures = 0;
        self.passes += 1;
        if self.passes >= self.params.successes {
            Verdict::Healthy
        } else {
            Verdict::Pending
        }
    }

    fn probe_failed(&mut self, at: Duration, reason: String) -> Verdict {
        if self.params.check.is_none() {
            return Verdict::Pending;
        }
        self.last_failure = Some(reason);
        if at < self.params.grace {
            return Verdict::Pending;
        }
        self.passes = 0;
        self.failures += 1;
        if self.failures >= self.params.max_failures {
            let n = self.params.max_failures;
            let last = self.last_failure.as_deref().unwrap_or_default();
            if n == 1 {
                Verdict::Unhealthy(format!("health check failed: {last}"))
            } else {
                Verdict::Unhealthy(format!(
                    "health check failed {n} consecutive times, last: {last}"
                ))
            }
        } else {
            Verdict::Pending
        }
    }

    fn advance_schedule(&mut self, at: Duration) {
        if self.params.check.is_some() && at >= self.next_probe {
            self.next_probe = self.next_probe.saturating_add(self.params.interval).max(at);
        }
    }

    fn deadline_verdict(&self) -> Verdict {
        let base = format!("no verdict within {}", fmt_secs(self.params.deadline));
        Verdict::Unhealthy(match &self.last_failure {
            Some(last) => format!("{base} (last failure: {last})"),
            None => base,
        })
    }

    fn decide(&mut self, at: Duration, verdict: Verdict) -> Verdict {
        self.verdict = verdict.clone();
        self.decided_at = Some(at);
        verdict
    }
}

#[cfg(test)]
#[path = "gate_tests.rs"]
mod tests;
