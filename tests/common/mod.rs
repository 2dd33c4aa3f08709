//! Helpers shared by integration tests. Each test binary includes this with `mod common;`.
//!
//! Everything runs against the REAL infrastructure: dockerd (`/var/run/docker.sock`), the
//! registry with the sample images (`FERRY_REGISTRY`, default `127.0.0.1:5055`), a private
//! mosquitto per test, and the ARM-only sample images under qemu binfmt. A missing component
//! makes [`infra::require_infra`] panic with what to run; tests never skip.
//!
//! # The quick way: [`Rig`]
//!
//! ```ignore
//! mod common;
//! use common::*;
//!
//! #[test]
//! fn updates() {
//!     let rig = Rig::start("updates");               // infra check, broker, keys, sensors,
//!                                                    // observer, agent (platform linux/arm64)
//!     rig.install(1, "1.0.0");                       // publish seq 1 = sensor 1.0.0, wait committed
//!     let rel = rig.release("2.0.0").signed(&rig.keys);
//!     rig.publish(&rig.desired(2).app("sensor", rel).start_first().signed(&rig.keys));
//!     let ev = rig.observer.wait_terminal(2, SLOW);  // committed / rolled_back / failed / rejected /
//!                                                    // superseded
//!     assert_eq!(ev.phase, Phase::Committed, "{}", rig.observer.describe_events());
//! }
//! ```
//!
//! `Rig::builder("name").agent(|b| b.config(..)).exclusive_images().stopped().start()` customises
//! the agent (see [`agent::AgentBuilder`]), takes the engine's images exclusively (see
//! [`docker`]), or leaves the agent unspawned until `rig.agent.spawn()`.
//! Dropping a rig kills the agent, removes every container labelled with its device, stops the
//! broker and deletes the sensor dir and temp files; when the test panicked it first prints the
//! agent's log and the MQTT events it saw.
//!
//! # The pieces
//!
//! - [`broker`] (a colleague's): `Broker::start()`, `url()`, `port()`, `publish`, `retained`,
//!   `stop`/`restart`/`kill`, log helpers.
//! - [`infra`]: `require_infra()`, `registry()`, `sensor_image()` (`<registry>/ferry/sensor`),
//!   `digest(version, platform)`, `platforms(version)`, `reference(version, platform)`,
//!   `bulk_image()` (`<registry>/ferry/bulk`: 1.0.0 and 2.0.0 share a 6 MiB data layer, each has
//!   a 512 KiB layer of its own on top), `bulk_digest(version, platform)`,
//!   `bulk_platforms(version)`, `bulk_reference(version, platform)`,
//!   `image_blobs(repo, manifest_digest)` → [`infra::ImageBlobs`] (`manifest`, `config`,
//!   `layers` as (digest, size), `compressed_size()` = config + layers, `bytes_not_in(&other)`,
//!   `shared_with(&other)`), `image_id(repo, manifest_digest)` (its config digest: the engine's
//!   image id, what Ferry creates containers from), `sensor_image_id(version, platform)`,
//!   `image_diff_ids(repo, manifest_digest)` (from the config),
//!   `bulk_data_layer()` → (digest, size, diff id) of the bulk images' shared 6 MiB layer,
//!   `device_id(name)` (`it-<name>-<pid>`), `wait_for(what, timeout, || Result<T, String>)`,
//!   constants `ARM64`, `ARMV7`.
//! - [`keys`]: `TestKeys::new()` with `.release` and `.controller` ([`keys::Key`]: `.key`
//!   (`ferry_protocol::PrivateKey`), `.public_pem`, `.private_pem`, `.keyid()`), and
//!   `.extra("name")` for untrusted / additional keys.
//! - [`release`]: `release(version)` → [`release::ReleaseBuilder`] (`.app`, `.version`,
//!   `.images_of`, `.only_platform`, `.env`, `.bind`, `.sensors(&dir)`, `.health`, `.cmd`,
//!   `.edit(|r| ..)`, `.build()`, `.sign(&[&key])` / `.signed(&keys)` → envelope JSON);
//!   `release_with_image(version, image_version)`; `release_bulk(version)` (the same app from the
//!   download-test image `ferry/bulk`; `.bulk()` / `.bulk_images_of(v)` switch a builder to it;
//!   `rig.bulk_release(version)` adds the rig's sensors); `fast_health()`;
//!   `desired(device, seq)` → [`release::DesiredBuilder`] (`.app(name, envelope)`, `.strategy`,
//!   `.start_first`, `.allow_downgrade`, `.issued_at`, `.expires_at`, `.expires_in`, `.rollout`,
//!   `.build()` → `Desired`, `.envelope(&[&key])` → `Envelope`, `.sign(&[&key])` /
//!   `.signed(&keys)` → notice bytes).
//! - [`sensors`]: `SensorDir::new(device)` at `/var/lib/ferry-apps/<device>/sensors` with
//!   `temp1_input` (23250) and `humidity1_input` (41500); `set_temp`, `set_humidity`.
//! - [`agent`]: `AgentBuilder::new(device, &broker, &keys)` (`.config(|toml_table| ..)`,
//!   `.platform(Some(..)/None)`, `.binary(AgentBinary::native() | qemu_aarch64() | qemu_armv7())`,
//!   `.release_keys(&[..], threshold)`, `.controller_keys(&[..])`, `.env(k, v)`, `.start()`, or
//!   `.build()` to spawn later) →
//!   [`agent::TestAgent`]: `kill()` (SIGKILL), `terminate()` (SIGTERM + wait), `restart()`,
//!   `spawn()`, `is_running()`, `wait_exit(t)`, `journal()` (serde_json::Value),
//!   `committed_versions()`, `log()`, `wait_log(needle, t)`, `edit_config(|t| ..)`,
//!   `state_dir()`.
//! - [`observer`]: `Observer::start(&broker, device)` subscribed to `events`, `state`, `online`;
//!   `publish_desired(bytes)` (retained, QoS 1, waits for PUBACK), `clear_desired()`,
//!   `events()`, `events_for(seq)`, `phases_for(seq)`, `events_json()`, `states()`,
//!   `last_state()`, `online()`, `wait_event(phase, t)`, `wait_event_for(seq, phase, t)`,
//!   `watch_agent(agent.liveness())` (waits fail 10 s after the agent died on its own; `Rig`
//!   does it),
//!   `wait_terminal(seq, t)`, `wait_event_where(what, t, pred)`, `wait_state(pred, t)` (the
//!   LATEST state report must satisfy it), `wait_online("1", t)`,
//!   `assert_no_event(what, period, pred)`, `describe_events()`.
//! - [`docker`]: `containers(device)` / `running(device)` → [`docker::Container`] (`name`,
//!   `image`, `running`, `status`, `labels`, `ip`, `restart_policy`, `app()`, `version()`),
//!   `inspect(name)`, `http_get(container, path)` → `(status, body)` via the bridge IP on 8080,
//!   `wait_http`, `readings(container, t)` (GET / as JSON), `image_present(reference)`,
//!   `image_digests(image)` (the manifest digests it was loaded by: Ferry creates containers
//!   from image ids, `sha256:<config digest>`), `image_with_digest(digest)`, `image_layers()`,
//!   `images_with_layer(diff_id)`, `evict_layer(diff_id)`, `logs(container)`,
//!   `remove_device_containers(device)`, `exclusive_images()` / `shared_images()`, and for a
//!   download that must stay in flight `bulk_lock()` (one holder across test processes) +
//!   `evict_bulk(&lock)` (the engine loses every bulk image, so the agent fetches ~7 MiB).
//! - [`faultproxy`]: `FaultProxy::start(upstream)` / `FaultProxy::registry()`: a TCP proxy on a
//!   free 127.0.0.1 port in front of the registry that injects a bad link's faults, switchable at
//!   runtime: `throttle(Some(bytes_per_s))` (one token bucket for all connections),
//!   `cut_after(Some(bytes))` (every connection closed after that many bytes down),
//!   `stall(bool)` (nothing forwarded, either way), `dark(bool)` (connects refused, connections
//!   dropped; the same port again after), `corrupt(Some(CorruptRule { path_contains, times }))`
//!   (bytes of the next `times` matching GET response bodies inverted, length unchanged);
//!   observed through `bytes_down()`, `bytes_up()`, `connections()`, `cuts()`, `corrupted()`,
//!   `requests()` ([`faultproxy::RequestRecord`]: `method`, `path`, `range`, `user_agent`),
//!   `reset_counters()`, `describe()`; `addr()`, `port()`, `repo("ferry/bulk")` =
//!   `127.0.0.1:<port>/ferry/bulk`. Dropping it closes everything and joins its threads.
//! - [`controller`]: `TestController::start(&broker, &keys)` runs `ferryctl serve` (the binary
//!   next to the test executable; `cargo build --workspace --bins` first) with a temp config,
//!   data dir and API token, the test's controller key, the test's release key trusted, the
//!   test's broker; `.build(..)` + `.spawn()`, `kill()` (SIGKILL), `terminate()`, `log()`,
//!   `url()`, `http_get(path)` (no token). Client side: `ctl(args)` / `ctl_env(args, env)` run
//!   `ferryctl --json ARGS` → [`controller::CtlOutput`] (`code`, `stdout`, `stderr`, `json()`);
//!   typed: `push_release(envelope)`, `releases()`, `devices(select)`, `device(id)`,
//!   `start_rollout(args)`, `rollout(id)`, `rollouts()`, `wait_rollout(id, what, t, pred)`,
//!   `wait_devices(what, t, pred)` (types of `ferry_controller::api`).
//!
//! Timeouts: everything ARM runs emulated; use [`SLOW`] for whole updates.
#![allow(dead_code, unused_imports)]

/// The fleet enrolment token of the tests: agents enrol with it, test controllers admit it.
pub const ENROLL_TOKEN: &str = "it-fleet-enrolment-token-0123456789";

/// The body of a report as a v1 reader expects it: a signed (v2) report unwrapped (NOT
/// verified: tests watching the broker only read it; the controller verifies), `online`
/// bodies as `1` / `0`, anything else as it came.
pub fn report_body(payload: &[u8]) -> Vec<u8> {
    use ferry_protocol::device_report::{peek, Stream};
    match peek(payload) {
        Some(p) => match p.body.get("online").and_then(|v| v.as_bool()) {
            Some(on) if p.stream == Stream::Online => if on { b"1" } else { b"0" }.to_vec(),
            _ => serde_json::to_vec(&p.body).expect("a JSON value serializes"),
        },
        None => payload.to_vec(),
    }
}

pub mod agent;
pub mod broker;
pub mod controller;
pub mod docker;
pub mod faultproxy;
pub mod infra;
pub mod keys;
pub mod nodes;
pub mod observer;
pub mod ports;
pub mod postgres;
pub mod release;
pub mod sensors;

use std::time::Duration;

pub use agent::{AgentBinary, AgentBuilder, TestAgent};
pub use broker::Broker;
pub use controller::TestController;
pub use ferry_protocol::{Event, Phase, StateReport, Strategy};
pub use keys::TestKeys;
pub use observer::Observer;
pub use release::{desired, fast_health, release, release_bulk, release_with_image};
pub use sensors::SensorDir;

/// Generous bound for one whole update under qemu (pull, start, health gate, maybe rollback).
pub const SLOW: Duration = Duration::from_secs(180);

/// A complete test setup for one device. Fields drop in declaration order: the agent first
/// (process killed, the device's containers removed), then the observer and the broker.
pub struct Rig {
    pub agent: TestAgent,
    pub observer: Observer,
    pub broker: Broker,
    pub sensors: SensorDir,
    pub keys: TestKeys,
    pub device: String,
    _exclusive: Option<docker::ExclusiveImages>,
}

pub struct RigBuilder {
    name: String,
    agent: Vec<Box<dyn FnOnce(AgentBuilder) -> AgentBuilder>>,
    exclusive: bool,
    broker_extra: String,
    spawn: bool,
}

impl RigBuilder {
    /// Customise the agent (applied in order).
    pub fn agent(mut self, f: impl FnOnce(AgentBuilder) -> AgentBuilder + 'static) -> Self {
        self.agent.push(Box::new(f));
        self
    }

    /// Hold [`docker::exclusive_images`] for the rig's lifetime (for tests asserting that an
    /// image is gone).
    pub fn exclusive_images(mut self) -> Self {
        self.exclusive = true;
        self
    }

    /// Do not spawn the agent: the test calls `rig.agent.spawn()` itself (after publishing a
    /// retained notice, say). The observer is subscribed already.
    pub fn stopped(mut self) -> Self {
        self.spawn = false;
        self
    }

    /// Extra mosquitto configuration (see `Broker::start_with`).
    pub fn broker_config(mut self, extra: &str) -> Self {
        self.broker_extra = extra.to_string();
        self
    }

    pub fn start(self) -> Rig {
        infra::require_infra();
        let exclusive = self.exclusive.then(docker::exclusive_images);
        let device = infra::device_id(&self.name);
        // Leftovers of an earlier run of this very pid are impossible; of a crashed run with the
        // same pid, unlikely but harmless to clear.
        docker::remove_device_containers(&device);
        let broker = Broker::start_with(&self.broker_extra);
        let keys = TestKeys::new();
        let sensors = SensorDir::new(&device);
        let observer = Observer::start(&broker, &device);
        let mut b = AgentBuilder::new(&device, &broker, &keys);
        for f in self.agent {
            b = f(b);
        }
        let agent = if self.spawn { b.start() } else { b.build() };
        observer.watch_agent(agent.liveness());
        Rig {
            agent,
            observer,
            broker,
            sensors,
            keys,
            device,
            _exclusive: exclusive,
        }
    }
}

impl Rig {
    /// A rig with the default agent (native binary, platform linux/arm64).
    pub fn start(name: &str) -> Rig {
        Rig::builder(name).start()
    }

    pub fn builder(name: &str) -> RigBuilder {
        RigBuilder {
            name: name.to_string(),
            agent: Vec::new(),
            exclusive: false,
            broker_extra: String::new(),
            spawn: true,
        }
    }

    /// Sample app `sensor` at `version` with this device's sensor dir bound at `/sensors`.
    pub fn release(&self, version: &str) -> release::ReleaseBuilder {
        release(version).sensors(&self.sensors)
    }

    /// Sample app `sensor` at `version` from the download-test image `ferry/bulk`, with this
    /// device's sensor dir bound at `/sensors`.
    pub fn bulk_release(&self, version: &str) -> release::ReleaseBuilder {
        release_bulk(version).sensors(&self.sensors)
    }

    /// A notice for this device.
    pub fn desired(&self, sequence: u64) -> release::DesiredBuilder {
        desired(&self.device, sequence)
    }

    /// Publish a notice (retained, QoS 1).
    pub fn publish(&self, notice: &[u8]) {
        self.observer.publish_desired(notice);
    }

    /// Publish `sequence` = `{sensor: version}` (stop-first) and wait until it is committed and
    /// the state report shows it. For setting up the starting point of a test.
    pub fn install(&self, sequence: u64, version: &str) -> Event {
        let rel = self.release(version).signed(&self.keys);
        let notice = self.desired(sequence).app("sensor", rel).signed(&self.keys);
        self.publish(&notice);
        let ev = self.observer.wait_terminal(sequence, SLOW);
        assert_eq!(
            ev.phase,
            Phase::Committed,
            "installing sensor {version} (sequence {sequence}) did not commit: {ev:?}\n{}",
            self.observer.describe_events()
        );
        self.observer.wait_state(
            |s| {
                s.sequence == sequence && s.apps.get("sensor").is_some_and(|a| a.version == version)
            },
            Duration::from_secs(30),
        );
        ev
    }

    /// The device's containers.
    pub fn containers(&self) -> Vec<docker::Container> {
        docker::containers(&self.device)
    }

    /// The device's running containers.
    pub fn running(&self) -> Vec<docker::Container> {
        docker::running(&self.device)
    }
}
