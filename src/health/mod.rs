//! Health gates: is a freshly started container healthy enough to commit an update?
//! (protocol §3, after Marathon).
//!
//! - [`params`]: [`HealthParams`], resolved from a release's [`HealthSpec`] and the agent's
//!   `[health]` config table ([`HealthDefaults`]).
//! - [`gate`]: the pure decision logic — [`Gate`] is fed [`Observation`]s stamped with the time
//!   since the container started and answers a [`Verdict`]. No I/O, no clock.
//! - [`mod@probe`]: one `http` / `tcp` / `exec` / `docker` probe against a container.
//! - [`run`]: the driver — [`watch()`] one container, or [`watch_all`] the containers of an update
//!   concurrently, failing fast on the first unhealthy one.
//!
//! Semantics: probes start after `grace` and run every `interval`, each bounded by `timeout`;
//! `successes` consecutive passes = healthy; `max_failures` consecutive failures after `grace`,
//! a container exit, a restart (crash loop) or no verdict by `deadline` = unhealthy. Without a
//! check, running for `grace + successes * interval` with no restart = healthy.

pub mod gate;
pub mod params;
pub mod probe;
pub mod run;

pub use ferry_protocol::release::{HealthCheck, HealthSpec};
pub use gate::{Gate, Observation, Verdict};
pub use params::{HealthDefaults, HealthParams};
pub use probe::{probe, resolve_addr, ProbeOutcome};
pub use run::{watch, watch_all};
