//! Fleet rollouts in waves: pure, deterministic building blocks for `ferryctl rollout` and
//! `ferryctl serve` (no I/O, no clock: the caller passes `now`).
//!
//! - [`selector`]: which devices a rollout targets (`group=beta,site=north`, `id in (a,b)`,
//!   `all`), matched on device ids and labels.
//! - [`spec`] (re-exported by [`waves`]): cumulative wave targets (`1,10%,50%,100%`), their
//!   [`plan`](waves::plan) for a fleet size and the per-wave
//!   [`FailureThreshold`](waves::FailureThreshold).
//! - [`waves`]: the [`Rollout`](waves::Rollout) state machine.
//!
//! # The model
//!
//! A [`Rollout`](waves::Rollout) is plain serializable data. The caller feeds it events —
//! device reports ([`on_report`](waves::Rollout::on_report)), newly seen devices
//! ([`offer`](waves::Rollout::offer)), the passing of time ([`on_tick`](waves::Rollout::on_tick)),
//! the operator's [`resume`](waves::Rollout::resume) — and carries out the returned
//! [`Action`](waves::Action)s in order. To survive `kill -9`, persist the rollout after each call
//! and before carrying out the actions (a crash then loses at most a notification, which times
//! out; it never repeats one or a wave).
//!
//! - The fleet is the set of devices the selector matched at creation, plus devices that start
//!   matching later. Wave sizes are planned once, for the fleet at creation.
//! - Each device goes `Pending → Notified → Committed → Succeeded`, or to `Failed` from
//!   `Notified` (reported `rolled_back`, `failed`, `rejected` or `superseded`, or no progress
//!   within the device timeout) or from `Committed` (rolled back or unhealthy while soaking). A
//!   device succeeds once it has soaked for the soak time since `committed` and is online.
//! - The device timeout counts online time without progress: every report for the notice's
//!   sequence that is not a result (`received` … `rolling_back`, `downloading` while it
//!   `retrying` included) restarts it; a report that the switch waits for a maintenance
//!   `window` or an update `lock` suspends it until a report for the sequence without either.
//! - The current wave takes online pending devices in id order up to its cumulative target (the
//!   last wave takes every one). Offline devices stay pending and are taken when they come back
//!   online; their timeout does not run while they are offline (coming back online restarts it).
//!   Each device is notified at most once per rollout.
//! - A wave completes when it has at least one device, all its devices succeeded or failed, and
//!   it is filled to its target (or no pending device is online to fill it: later waves catch
//!   up, as targets are cumulative). The next wave then starts; after the last wave, which also
//!   waits for offline pending devices, the rollout is `Completed`.
//! - As soon as a wave's failures pass the threshold the rollout pauses; with
//!   [`OnFailure::Revert`](waves::OnFailure) it also reverts every device it notified and ends.
//!   While paused, reports, soaks and timeouts are still recorded, but nothing is notified and no
//!   wave starts until `resume`, which acknowledges the current wave's failures so far.

pub mod selector;
pub mod spec;
pub mod waves;
