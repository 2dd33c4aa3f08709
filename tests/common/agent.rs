//! The agent as a real process: [`TestAgent`] writes a config TOML, spawns the `ferry-agent`
//! binary (native, or a cross-built one under qemu-user), captures its output in a log file that
//! is printed when the test fails, and on drop kills it and removes every container labelled with
//! its device.
//!
//! ```ignore
//! let agent = AgentBuilder::new(&device, &broker, &keys).start();          // linux/arm64, native
//! let agent = AgentBuilder::new(&device, &broker, &keys)
//!     .binary(AgentBinary::qemu_aarch64()).start();                        // platform detected
//! let agent = AgentBuilder::new(&device, &broker, &keys)
//!     .config(|t| { t["update"]["stop_timeout"] = "3s".into(); }).start();
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use toml::{Table, Value};

use super::broker::Broker;
use super::docker;
use super::infra;
use super::keys::TestKeys;

pub const AARCH64: &str = "aarch64-unknown-linux-gnu";
pub const ARMV7: &str = "armv7-unknown-linux-gnueabihf";

/// Which binary runs the agent, and how.
#[derive(Clone, Debug)]
pub struct AgentBinary {
    pub path: PathBuf,
    /// argv prefix, e.g. `["qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu"]`.
    pub wrapper: Vec<String>,
}

impl AgentBinary {
    /// This package's binary, built for the host by cargo for the test.
    pub fn native() -> AgentBinary {
        AgentBinary {
            path: PathBuf::from(env!("CARGO_BIN_EXE_ferry-agent")),
            wrapper: Vec::new(),
        }
    }

    /// `target/<triple>/release/ferry-agent` (built with `cargo build --release -p ferry-agent
    /// --target <triple>` when missing) run under `qemu-aarch64-static` / `qemu-arm-static`.
    pub fn cross(triple: &str) -> AgentBinary {
        let (qemu, sysroot) = match triple {
            AARCH64 => ("qemu-aarch64-static", "/usr/aarch64-linux-gnu"),
            ARMV7 => ("qemu-arm-static", "/usr/arm-linux-gnueabihf"),
            other => panic!("no qemu wrapper known for {other}"),
        };
        AgentBinary {
            path: cross_binary(triple),
            wrapper: vec![qemu.into(), "-L".into(), sysroot.into()],
        }
    }

    pub fn qemu_aarch64() -> AgentBinary {
        AgentBinary::cross(AARCH64)
    }

    pub fn qemu_armv7() -> AgentBinary {
        AgentBinary::cross(ARMV7)
    }

    fn command(&self) -> Command {
        match self.wrapper.split_first() {
            None => Command::new(&self.path),
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(&self.path);
                c
            }
        }
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| infra::root().join("target"))
}

/// The cross-built release agent for `triple`; built once if missing. The test command builds
/// it beforehand. A build from inside a test uses its own target dir, because the running
/// `cargo test` may hold the lock of the main one.
pub fn cross_binary(triple: &str) -> PathBuf {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let main = target_dir()
        .join(triple)
        .join("release")
        .join("ferry-agent");
    if main.exists() {
        warn_if_stale(
            &main,
            &["src", "protocol/src", "registry/src"],
            "cargo build --release -p ferry-agent --target <triple>",
        );
        return main;
    }
    let own = target_dir().join("it-cross");
    let bin = own.join(triple).join("release").join("ferry-agent");
    eprintln!(
        "{} missing: cargo build --release -p ferry-agent --target {triple} (into {})",
        main.display(),
        own.display()
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(infra::root())
        .env("CARGO_TARGET_DIR", &own)
        .args([
            "build",
            "--release",
            "-p",
            "ferry-agent",
            "--target",
            triple,
        ])
        .output()
        .expect("run cargo build");
    assert!(
        out.status.success(),
        "cargo build --target {triple} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(bin.exists(), "{} not built", bin.display());
    bin
}

/// Newest modification time of the files under `dir`.
fn newest_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        let t = if p.is_dir() {
            newest_mtime(&p)
        } else {
            e.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(t);
    }
    newest
}

/// A prebuilt binary is used as it is (the test command builds it fresh); say so when the
/// sources under `dirs` (relative to the workspace root) changed after it was built.
pub fn warn_if_stale(bin: &Path, dirs: &[&str], rebuild: &str) {
    let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok();
    let src = dirs
        .iter()
        .filter_map(|d| newest_mtime(&infra::root().join(d)))
        .max();
    if let (Some(built), Some(src)) = (built, src) {
        if src > built {
            eprintln!(
                "warning: {} is older than {}; rebuild it with `{rebuild}`",
                bin.display(),
                dirs.join(", ")
            );
        }
    }
}

/// Shared view of whether an agent process is expected to run: set on spawn, cleared when the
/// test stops it (kill, terminate) or sees it exit. [`super::observer::Observer::watch_agent`]
/// uses it to fail a wait early when the agent died on its own instead of waiting out the timeout.
#[derive(Clone, Default)]
pub struct Liveness(Arc<Mutex<Option<u32>>>);

impl Liveness {
    fn set(&self, pid: Option<u32>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = pid;
    }

    /// `Some(pid)` when the process should run but has exited (a zombie or gone).
    pub fn died(&self) -> Option<u32> {
        let pid = (*self.0.lock().unwrap_or_else(|e| e.into_inner()))?;
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => Some(pid),
            // "pid (comm) S ...": the state follows the last ')'.
            Ok(stat) => match stat.rsplit_once(')').map(|(_, r)| r.trim_start()) {
                Some(r) if r.starts_with('Z') || r.starts_with('X') => Some(pid),
                _ => None,
            },
        }
    }
}

/// Builds the config and starts a [`TestAgent`].
pub struct AgentBuilder {
    device: String,
    config: Table,
    binary: AgentBinary,
    env: Vec<(String, String)>,
}

impl AgentBuilder {
    /// Defaults: platform `linux/arm64` (the host is x86_64, the images are ARM-only), a temp
    /// state dir, the broker's URL, the test keys trusted for their roles, bind prefix
    /// `/var/lib/ferry-apps/<device>` with its `sensors` dir shared, log level debug for Ferry's
    /// crates, `update.stop_timeout = "5s"`, `update.progress_interval = "200ms"`.
    pub fn new(device: &str, broker: &Broker, keys: &TestKeys) -> AgentBuilder {
        let mut config = Table::new();
        config.insert("device_id".into(), device.into());
        config.insert("platform".into(), infra::ARM64.into());
        let mut mqtt = Table::new();
        mqtt.insert("url".into(), broker.url().into());
        mqtt.insert("keepalive".into(), "30s".into());
        mqtt.insert("backoff_initial".into(), "200ms".into());
        mqtt.insert("backoff_max".into(), "2s".into());
        config.insert("mqtt".into(), mqtt.into());
        let mut trust = Table::new();
        trust.insert(
            "release_keys".into(),
            vec![keys.release.public_pem.display().to_string()].into(),
        );
        trust.insert(
            "controller_keys".into(),
            vec![keys.controller.public_pem.display().to_string()].into(),
        );
        config.insert("trust".into(), trust.into());
        // Many test devices share this host: each gets its own bind prefix, under which each
        // app has its own directory (the default confinement), and its sensor directory is the
        // one every app of the device may bind.
        let mut policy = Table::new();
        policy.insert(
            "allowed_bind_prefixes".into(),
            vec![super::sensors::device_root(device)].into(),
        );
        policy.insert(
            "shared_bind_dirs".into(),
            vec![super::sensors::sensors_path(device)].into(),
        );
        config.insert("policy".into(), policy.into());
        let mut update = Table::new();
        update.insert("stop_timeout".into(), "5s".into());
        update.insert("progress_interval".into(), "200ms".into());
        config.insert("update".into(), update.into());
        let mut log = Table::new();
        log.insert(
            "level".into(),
            "info,ferry_agent=debug,ferry_protocol=debug,ferry_registry=debug".into(),
        );
        config.insert("log".into(), log.into());
        AgentBuilder {
            device: device.to_string(),
            config,
            binary: AgentBinary::native(),
            env: Vec::new(),
        }
    }

    /// Edit the config table (any key of `src/config.rs`).
    pub fn config(mut self, f: impl FnOnce(&mut Table)) -> Self {
        f(&mut self.config);
        self
    }

    /// Set `platform` (None: leave it out, the binary detects its own).
    pub fn platform(self, p: Option<&str>) -> Self {
        self.config(|t| match p {
            Some(p) => {
                t.insert("platform".into(), p.into());
            }
            None => {
                t.remove("platform");
            }
        })
    }

    /// Run another binary; a cross-built one gets no `platform` (it detects it itself).
    pub fn binary(mut self, b: AgentBinary) -> Self {
        let cross = !b.wrapper.is_empty();
        self.binary = b;
        if cross {
            self.platform(None)
        } else {
            self
        }
    }

    /// Trust these release public keys (SPKI PEM files) instead, with `threshold`.
    pub fn release_keys(self, pems: &[&Path], threshold: usize) -> Self {
        let list: Vec<String> = pems.iter().map(|p| p.display().to_string()).collect();
        self.config(|t| {
            let trust = t["trust"].as_table_mut().unwrap();
            trust.insert("release_keys".into(), list.into());
            trust.insert("release_threshold".into(), Value::Integer(threshold as i64));
        })
    }

    /// Trust these controller public keys instead.
    pub fn controller_keys(self, pems: &[&Path]) -> Self {
        let list: Vec<String> = pems.iter().map(|p| p.display().to_string()).collect();
        self.config(|t| {
            t["trust"]
                .as_table_mut()
                .unwrap()
                .insert("controller_keys".into(), list.into());
        })
    }

    /// An environment variable for the agent process (e.g. `RUST_LOG`).
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Write the config (state dir in a fresh temp dir) and spawn the agent.
    pub fn start(self) -> TestAgent {
        let mut agent = self.build();
        agent.spawn();
        agent
    }

    /// Write the config (state dir in a fresh temp dir) but do not spawn the agent yet: call
    /// [`TestAgent::spawn`] (e.g. after publishing a retained notice, or seeding the state dir).
    pub fn build(self) -> TestAgent {
        let claim = docker::shared_images();
        let dir = tempfile::Builder::new()
            .prefix(&format!("ferry-{}-", self.device))
            .tempdir()
            .expect("agent temp dir");
        let mut config = self.config;
        if !config.contains_key("state_dir") {
            config.insert(
                "state_dir".into(),
                dir.path().join("state").display().to_string().into(),
            );
        }
        let state_dir = PathBuf::from(config["state_dir"].as_str().unwrap());
        // Enrols with the tests' fleet token (a test controller admits it at once).
        if !config.contains_key("identity") {
            let mut t = toml::Table::new();
            t.insert("enroll_token".into(), super::ENROLL_TOKEN.into());
            config.insert("identity".into(), t.into());
        }
        let config_path = dir.path().join("agent.toml");
        let log_path = dir.path().join("agent.log");
        let agent = TestAgent {
            device: self.device,
            dir,
            config_path,
            log_path,
            state_dir,
            binary: self.binary,
            env: self.env,
            child: None,
            live: Liveness::default(),
            started_at: Instant::now(),
            _claim: claim,
        };
        agent.write_config(&config);
        agent
    }
}

/// A running (or stopped) agent process. See the module docs.
pub struct TestAgent {
    pub device: String,
    dir: tempfile::TempDir,
    config_path: PathBuf,
    log_path: PathBuf,
    state_dir: PathBuf,
    binary: AgentBinary,
    env: Vec<(String, String)>,
    child: Option<Child>,
    live: Liveness,
    started_at: Instant,
    _claim: docker::SharedImages,
}

impl TestAgent {
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The temp dir holding config, log and (by default) the state dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn binary(&self) -> &AgentBinary {
        &self.binary
    }

    /// The config as last written.
    pub fn config(&self) -> Table {
        let text = std::fs::read_to_string(&self.config_path).expect("read agent config");
        toml::from_str(&text).expect("agent config parses")
    }

    /// Rewrite the config (takes effect at the next [`TestAgent::restart`] / [`TestAgent::spawn`]).
    pub fn write_config(&self, t: &Table) {
        std::fs::write(
            &self.config_path,
            toml::to_string(t).expect("config to TOML"),
        )
        .expect("write agent config");
    }

    /// Edit the config file in place.
    pub fn edit_config(&self, f: impl FnOnce(&mut Table)) {
        let mut t = self.config();
        f(&mut t);
        self.write_config(&t);
    }

    /// Start the process (stdout and stderr appended to the log file). Panics if it runs.
    pub fn spawn(&mut self) {
        assert!(!self.is_running(), "agent {} already running", self.device);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open agent log");
        let mut cmd = self.binary.command();
        cmd.arg("--config")
            .arg(&self.config_path)
            .arg("run")
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "spawn agent {:?} {}: {e}",
                self.binary.wrapper,
                self.binary.path.display()
            )
        });
        self.started_at = Instant::now();
        self.live.set(Some(child.id()));
        self.child = Some(child);
    }

    /// Whether the process is expected to run (for [`super::observer::Observer::watch_agent`]).
    pub fn liveness(&self) -> Liveness {
        self.live.clone()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_exit_status().is_none()
    }

    /// The exit status once it has exited (`None` while it runs or if never started).
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        let s = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        if s.is_some() {
            self.live.set(None);
        }
        s
    }

    /// Wait for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_exit_status() {
                self.child = None;
                return s;
            }
            assert!(self.child.is_some(), "agent {} is not running", self.device);
            assert!(
                Instant::now() < deadline,
                "agent {} still running after {timeout:?}",
                self.device
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&mut self, sig: libc::c_int) {
        if let Some(c) = &self.child {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as libc::pid_t, sig);
            }
        }
    }

    /// SIGKILL and reap (a power cut, as far as the agent can tell). No-op when not running.
    pub fn kill(&mut self) {
        self.live.set(None);
        if self.child.is_none() {
            return;
        }
        self.signal(libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit (up to `timeout`, then SIGKILL and panic).
    pub fn terminate_within(&mut self, timeout: Duration) -> ExitStatus {
        assert!(self.child.is_some(), "agent {} not running", self.device);
        self.live.set(None);
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_exit_status() {
                self.child = None;
                return s;
            }
            if Instant::now() > deadline {
                self.kill();
                panic!(
                    "agent {} did not stop within {timeout:?} of SIGTERM",
                    self.device
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait (up to 90 s: a running health gate may drain first).
    pub fn terminate(&mut self) -> ExitStatus {
        self.terminate_within(Duration::from_secs(90))
    }

    /// Stop (SIGTERM) if running, then start again with the (possibly edited) config.
    pub fn restart(&mut self) {
        if self.is_running() {
            self.terminate();
        } else {
            self.child = None;
        }
        self.spawn();
    }

    /// Since the last spawn.
    pub fn uptime(&self) -> Duration {
        self.started_at.elapsed()
    }

    /// The agent's output so far (all runs).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Wait until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "agent log never contained {needle:?} within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `state_dir/journal.json` parsed (`Value::Null` when there is none yet).
    pub fn journal(&self) -> serde_json::Value {
        match std::fs::read(self.state_dir.join("journal.json")) {
            Ok(b) => serde_json::from_slice(&b).expect("journal.json is JSON"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Value::Null,
            Err(e) => panic!("read journal: {e}"),
        }
    }

    /// The journal's committed set: app -> version.
    pub fn committed_versions(&self) -> std::collections::BTreeMap<String, String> {
        self.journal()
            .get("committed")
            .and_then(|c| c.as_object())
            .map(|m| {
                m.iter()
                    .map(|(app, d)| {
                        (
                            app.clone(),
                            d.pointer("/release/version")
                                .and_then(|v| v.as_str())
                                .unwrap_or("")
                                .to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- agent log of {} ({}) -----\n{}\n----- end of agent log -----",
                self.device,
                self.log_path.display(),
                self.log()
            );
        }
        docker::remove_device_containers(&self.device);
    }
}
