//! Ferry device simulator: N simulated agents multiplexed over a few MQTT connections, speaking
//! the real protocol (verify every notice like an agent, report events and retained state), for
//! the controller's scale benchmark (`benches/scale.sh`).
//!
//! - [`device`]: one device, pure: notice verification and the update state machine
//! - [`sim`]: the MQTT side: connections, per-device tasks, blasts
//! - [`stats`]: what is recorded and written to `--stats`
//! - [`delay`]: `--pull-delay` / `--health-delay` values
//! - [`release`]: `ferry-sim make-release`
//! - [`notify`]: `ferry-sim notify`, a controller-less baseline for notice delivery

pub mod delay;
pub mod device;
pub mod notify;
pub mod release;
pub mod sim;
pub mod stats;
