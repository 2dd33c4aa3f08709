//! Health-gate parameters: what the release asks for (`health` in protocol §3), with the
//! agent's configured defaults (`[health]` in the agent config) filling the gaps.

use std::time::Duration;

use ferry_protocol::release::{HealthCheck, HealthSpec};
use serde::Deserialize;

use crate::config::durations;

/// The agent's `[health]` config table: the values used for every number a release leaves out.
/// A release gives whole seconds (`grace_s`, ...); here they are durations, and the older form
/// (`grace_s = 5`) still parses.
///
/// ```toml
/// [health]
/// grace = "5s"
/// interval = "2s"
/// timeout = "2s"
/// successes = 3
/// max_failures = 3
/// deadline = "2m"
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthDefaults {
    #[serde(alias = "grace_s", deserialize_with = "durations::secs")]
    pub grace: Duration,
    #[serde(alias = "interval_s", deserialize_with = "durations::secs")]
    pub interval: Duration,
    #[serde(alias = "timeout_s", deserialize_with = "durations::secs")]
    pub timeout: Duration,
    pub successes: u32,
    pub max_failures: u32,
    #[serde(alias = "deadline_s", deserialize_with = "durations::secs")]
    pub deadline: Duration,
}

impl Default for HealthDefaults {
    fn default() -> Self {
        HealthDefaults {
            grace: Duration::from_secs(5),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(2),
            successes: 3,
            max_failures: 3,
            deadline: Duration::from_secs(120),
        }
    }
}

impl HealthDefaults {
    /// Same rule as a release's `health` (protocol §3): everything but `grace` must be
    /// positive. Call it when loading the config; [`HealthParams::resolve`] clamps zeros to the
    /// smallest sane value anyway so a gate can never spin.
    pub fn validate(&self) -> Result<(), String> {
        let zero: Vec<&str> = [
            ("interval", self.interval.is_zero()),
            ("timeout", self.timeout.is_zero()),
            ("successes", self.successes == 0),
            ("max_failures", self.max_failures == 0),
            ("deadline", self.deadline.is_zero()),
        ]
        .iter()
        .filter(|(_, zero)| *zero)
        .map(|(k, _)| *k)
        .collect();
        if zero.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "health.{} must be positive",
                zero.join(", health.")
            ))
        }
    }
}

/// The resolved settings of one health gate.
///
/// With `check: None` the gate is "running for `grace + successes * interval` with no restart"
/// (see [`HealthParams::stable_after`]); the same fields express it, nothing else is needed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthParams {
    pub check: Option<HealthCheck>,
    /// Probe results before this (time since the container started) are ignored.
    pub grace: Duration,
    /// Time between probes (and between container inspections).
    pub interval: Duration,
    /// Bound on one probe.
    pub timeout: Duration,
    /// Consecutive passes after `grace` that make the container healthy.
    pub successes: u32,
    /// Consecutive failures after `grace` that make it unhealthy.
    pub max_failures: u32,
    /// No verdict by then (since the container started) = unhealthy.
    pub deadline: Duration,
}

impl Default for HealthParams {
    /// The check-less gate with the built-in defaults.
    fn default() -> Self {
        HealthParams::resolve(&HealthSpec::default(), &HealthDefaults::default())
    }
}

impl HealthParams {
    /// Take every number the release gives, the configured default for the others.
    /// Zeros (rejected by release validation and [`HealthDefaults::validate`], but possible in a
    /// hand-built spec) are clamped: durations other than `grace` to 1 s, counts to 1.
    pub fn resolve(spec: &HealthSpec, defaults: &HealthDefaults) -> HealthParams {
        let secs = |v: Option<u32>, d: Duration| v.map_or(d, |s| Duration::from_secs(u64::from(s)));
        HealthParams {
            check: spec.check.clone(),
            grace: secs(spec.grace_s, defaults.grace),
            interval: secs(spec.interval_s, defaults.interval),
            timeout: secs(spec.timeout_s, defaults.timeout),
            successes: spec.successes.unwrap_or(defaults.successes),
            max_failures: spec.max_failures.unwrap_or(defaults.max_failures),
            deadline: secs(spec.deadline_s, defaults.deadline),
        }
        .normalized_with(Duration::from_secs(1))
    }

    /// Clamp degenerate values (zero interval, timeout, deadline or counts) so that the gate
    /// always makes progress. Used by [`crate::health::Gate::new`] with a 1 ms floor, so hand-built
    /// params in tests can use sub-second durations.
    pub(crate) fn normalized_with(mut self, min: Duration) -> HealthParams {
        self.interval = self.interval.max(min);
        self.timeout = self.timeout.max(min);
        self.deadline = self.deadline.max(min);
        self.successes = self.successes.max(1);
        self.max_failures = self.max_failures.max(1);
        self
    }

    /// For the check-less gate: running this long with no restart = healthy
    /// (`grace + successes * interval`).
    pub fn stable_after(&self) -> Duration {
        self.grace.saturating_add(
            self.interval
                .checked_mul(self.successes)
                .unwrap_or(Duration::MAX),
        )
    }

    /// The earliest time a healthy verdict is possible: `stable_after()` without a check;
    /// with one, the `successes`-th probe on schedule (`grace + (successes - 1) * interval`).
    /// When this is later than `deadline` the gate can only fail.
    pub fn earliest_healthy(&self) -> Duration {
        match self.check {
            None => self.stable_after(),
            Some(_) => self.grace.saturating_add(
                self.interval
                    .checked_mul(self.successes.saturating_sub(1))
                    .unwrap_or(Duration::MAX),
            ),
        }
    }
}

/// `2 s`, `120 s`, `0.25 s`: durations in reasons and logs.
pub(crate) fn fmt_secs(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{} s", d.as_secs())
    } else {
        let s = format!("{:.3}", d.as_secs_f64());
        let s = s.trim_end_matches('0').trim_end_matches('.');
        format!("{s} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let d = HealthDefaults::default();
        assert_eq!(
            (
                d.grace,
                d.interval,
                d.timeout,
                d.successes,
                d.max_failures,
                d.deadline
            ),
            (s(5), s(2), s(2), 3, 3, s(120))
        );
        assert!(d.validate().is_ok());
    }

    #[test]
    fn defaults_deserialize_partially_and_strictly() {
        let d: HealthDefaults =
            toml::from_str("grace = \"10s\"\ndeadline = \"5m\"\ntimeout = \"1500ms\"").unwrap();
        assert_eq!(d.grace, s(10));
        assert_eq!(d.deadline, s(300));
        assert_eq!(d.timeout, Duration::from_millis(1500));
        assert_eq!(d.interval, s(2));
        assert_eq!(d.successes, 3);
        // The older keys, whole seconds.
        let old: HealthDefaults = toml::from_str("grace_s = 10\ndeadline_s = 300").unwrap();
        assert_eq!(old, HealthDefaults { timeout: s(2), ..d });
        let empty: HealthDefaults = toml::from_str("").unwrap();
        assert_eq!(empty, HealthDefaults::default());
        let err = toml::from_str::<HealthDefaults>("grace_ms = 10").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn validate_names_every_zero_field() {
        let d = HealthDefaults {
            interval: s(0),
            deadline: s(0),
            ..HealthDefaults::default()
        };
        assert_eq!(
            d.validate().unwrap_err(),
            "health.interval, health.deadline must be positive"
        );
        let g = HealthDefaults {
            grace: s(0),
            ..HealthDefaults::default()
        };
        assert!(g.validate().is_ok(), "a zero grace is fine");
    }

    #[test]
    fn release_values_win_over_defaults() {
        let spec = HealthSpec {
            check: Some(HealthCheck::Tcp { port: 80 }),
            grace_s: Some(30),
            interval_s: None,
            timeout_s: Some(1),
            successes: Some(1),
            max_failures: None,
            deadline_s: Some(600),
        };
        let p = HealthParams::resolve(&spec, &HealthDefaults::default());
        assert_eq!(
            p,
            HealthParams {
                check: Some(HealthCheck::Tcp { port: 80 }),
                grace: s(30),
                interval: s(2),
                timeout: s(1),
                successes: 1,
                max_failures: 3,
                deadline: s(600),
            }
        );
    }

    #[test]
    fn empty_spec_takes_defaults_and_is_checkless() {
        let p = HealthParams::resolve(&HealthSpec::default(), &HealthDefaults::default());
        assert_eq!(p.check, None);
        assert_eq!(p.grace, s(5));
        assert_eq!(p.interval, s(2));
        assert_eq!(p.timeout, s(2));
        assert_eq!((p.successes, p.max_failures), (3, 3));
        assert_eq!(p.deadline, s(120));
        assert_eq!(p.stable_after(), s(11));
        assert_eq!(p.earliest_healthy(), s(11));
        assert_eq!(p, HealthParams::default());
    }

    #[test]
    fn zeros_are_clamped() {
        let d = HealthDefaults {
            grace: s(0),
            interval: s(0),
            timeout: s(0),
            successes: 0,
            max_failures: 0,
            deadline: s(0),
        };
        let p = HealthParams::resolve(&HealthSpec::default(), &d);
        assert_eq!(p.grace, s(0));
        assert_eq!((p.interval, p.timeout, p.deadline), (s(1), s(1), s(1)));
        assert_eq!((p.successes, p.max_failures), (1, 1));
    }

    #[test]
    fn earliest_healthy_with_a_check() {
        let p = HealthParams {
            check: Some(HealthCheck::Docker {}),
            ..HealthParams::default()
        };
        // probes at 5, 7, 9: the third pass at 9
        assert_eq!(p.earliest_healthy(), s(9));
        let huge = HealthParams {
            interval: Duration::MAX,
            ..HealthParams::default()
        };
        assert_eq!(huge.stable_after(), Duration::MAX);
    }

    #[test]
    fn seconds_format() {
        assert_eq!(fmt_secs(s(120)), "120 s");
        assert_eq!(fmt_secs(s(0)), "0 s");
        assert_eq!(fmt_secs(Duration::from_millis(250)), "0.25 s");
        assert_eq!(fmt_secs(Duration::from_millis(1500)), "1.5 s");
    }
}
