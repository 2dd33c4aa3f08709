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
//! - [`signing`]: each device's key and counter; every report is signed (protocol v2)
//! - [`verify_bench`]: `ferry-sim verify-bench`, signed reports verified per second on one core

pub mod delay;
pub mod device;
pub mod notify;
pub mod release;
pub mod signing;
pub mod sim;
pub mod stats;
pub mod verify_bench;
