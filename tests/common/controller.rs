//! The controller as a real process: [`TestController`] writes a `ferryctl serve` config (temp
//! data dir, API token, the test's controller key, the test's release key trusted, the test's
//! broker), spawns the `ferryctl` binary, learns its HTTP address from its log, and kills it on
//! drop (printing its log when the test failed). [`TestController::ctl`] runs `ferryctl --json`
//! client commands against it; the typed helpers parse their output into
//! `ferry_controller::api` types.
//!
//! ```ignore
//! let ctl = TestController::start(&broker, &keys);                 // waits for /healthz
//! ctl.push_release(&release("2.0.0").signed(&keys));               // `ferryctl release push`
//! let r = ctl.start_rollout(&["--app", "sensor", "--version", "2.0.0", "--select", "group=beta",
//!                             "--waves", "1,100%", "--soak", "3s"]);
//! let r = ctl.wait_rollout(&r.id, "completed", SLOW, |r| r.state == "completed");
//! ctl.kill(); ctl.spawn();                                         // SIGKILL, same data dir
//! let out = ctl.ctl(&["rollout", "list"]);                         // raw: code, stdout, stderr
//! ```
//!
//! The binary is `target/<profile>/ferryctl`, next to the test executable's `deps` dir; the test
//! command builds it first (`cargo build --workspace --bins`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_controller::api::{DeviceDetail, DeviceView, ReleaseView, RolloutView};
use serde::de::DeserializeOwned;

use super::broker::Broker;
use super::keys::TestKeys;

/// `target/<profile>/ferryctl`: the test executable lives in `target/<profile>/deps/`.
pub fn ferryctl_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable in target/<profile>/deps");
    let bin = dir.join("ferryctl");
    assert!(
        bin.exists(),
        "{} missing: build it first with `cargo build --workspace --bins` (scripts/test.sh does)",
        bin.display()
    );
    super::agent::warn_if_stale(
        &bin,
        &["controller/src", "protocol/src"],
        "cargo build --workspace --bins",
    );
    bin
}

/// What a `ferryctl` run printed and how it ended.
#[derive(Debug, Clone)]
pub struct CtlOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CtlOutput {
    pub fn ok(&self) -> bool {
        self.code == 0
    }

    /// stdout as one JSON document.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("ferryctl --json printed no JSON document ({e}): {self}"))
    }
}

impl std::fmt::Display for CtlOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// A `ferryctl serve` process (running or stopped) with its own config and data dir.
pub struct TestController {
    dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    pub token_file: PathBuf,
    /// The PostgreSQL database it runs on (`[store] url`); None: SQLite in `data_dir`.
    pub db: Option<std::sync::Arc<super::postgres::TestDb>>,
    log_path: PathBuf,
    child: Option<Child>,
    /// `http://127.0.0.1:PORT` of the running process.
    url: Option<String>,
}

impl TestController {
    /// Config with `[rollout] tick = "200ms"`, `device_timeout = "120s"`; spawn and wait until
    /// it serves.
    pub fn start(broker: &Broker, keys: &TestKeys) -> TestController {
        let mut c = TestController::build(broker, keys, "");
        c.spawn();
        c
    }

    /// Write the config (with `extra_rollout` lines appended to the `[rollout]` table) without
    /// spawning.
    pub fn build(broker: &Broker, keys: &TestKeys, extra_rollout: &str) -> TestController {
        TestController::build_on(broker, keys, extra_rollout, None)
    }

    /// [`TestController::build`] on a fresh PostgreSQL database.
    pub fn build_on_postgres(
        broker: &Broker,
        keys: &TestKeys,
        extra_rollout: &str,
    ) -> TestController {
        let db = std::sync::Arc::new(super::postgres::TestDb::create());
        TestController::build_on(broker, keys, extra_rollout, Some((db, String::new())))
    }

    /// A replica `id` on the PostgreSQL database `db` (`[replica]` with `replica_toml` lines).
    pub fn build_replica(
        broker: &Broker,
        keys: &TestKeys,
        db: &std::sync::Arc<super::postgres::TestDb>,
        replica_toml: &str,
    ) -> TestController {
        TestController::build_on(broker, keys, "", Some((db.clone(), replica_toml.into())))
    }

    fn build_on(
        broker: &Broker,
        keys: &TestKeys,
        extra_rollout: &str,
        db: Option<(std::sync::Arc<super::postgres::TestDb>, String)>,
    ) -> TestController {
        let dir = tempfile::Builder::new()
            .prefix("ferry-controller-")
            .tempdir()
            .expect("controller temp dir");
        let data_dir = dir.path().join("data");
        let token_file = dir.path().join("api-token");
        // Replicas of one database share their API token (one fleet, one token).
        let token = match &db {
            Some((d, _)) => format!("it-token-{}", d.name),
            None => format!(
                "it-token-{:016x}{:016x}",
                fastrand::u64(..),
                fastrand::u64(..)
            ),
        };
        std::fs::write(&token_file, format!("{token}\n")).expect("write token");
        let config_path = dir.path().join("controller.toml");
        let mut rollout = String::from("tick = \"200ms\"\ndevice_timeout = \"120s\"\n");
        rollout += extra_rollout;
        let text = format!(
            "listen = \"127.0.0.1:0\"\n\
             data_dir = {data:?}\n\
             api_token_file = {token:?}\n\
             controller_key = {key:?}\n\
             {store}\
             [mqtt]\n\
             url = {url:?}\n\
             client_id = \"it-controller-{id:08x}\"\n\
             [trust]\n\
             release_keys = [{rel:?}]\n\
             [enroll]\n\
             tokens = [{enroll:?}]\n\
             [rollout]\n\
             {rollout}",
            enroll = super::ENROLL_TOKEN,
            store = db
                .as_ref()
                .map(|(d, replica)| format!("[store]\nurl = {:?}\n[replica]\n{replica}\n", d.url))
                .unwrap_or_default(),
            data = data_dir.display().to_string(),
            token = token_file.display().to_string(),
            key = keys.controller.private_pem.display().to_string(),
            url = broker.url(),
            id = fastrand::u32(..),
            rel = keys.release.public_pem.display().to_string(),
        );
        std::fs::write(&config_path, text).expect("write controller config");
        let log_path = dir.path().join("controller.log");
        TestController {
            dir,
            config_path,
            data_dir,
            token_file,
            db: db.map(|(d, _)| d),
            log_path,
            child: None,
            url: None,
        }
    }

    /// Reach the broker at `url` instead (e.g. through a fault proxy); before [`Self::spawn`].
    pub fn set_broker_url(&self, url: &str) {
        let text = std::fs::read_to_string(&self.config_path).expect("read controller config");
        let line = text
            .lines()
            .find(|l| l.starts_with("url = ") && l.contains("mqtt://"))
            .expect("the [mqtt] url line")
            .to_string();
        let text = text.replace(&line, &format!("url = {url:?}"));
        std::fs::write(&self.config_path, text).expect("write controller config");
    }

    /// The temp dir holding config, token, data dir and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Start `ferryctl serve` (output appended to the log) and wait until `/healthz` answers.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "controller already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open controller log");
        let before = std::fs::metadata(&self.log_path)
            .map(|m| m.len())
            .unwrap_or(0) as usize;
        let child = Command::new(ferryctl_binary())
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "info,rumqttc=warn,ferry_controller=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn ferryctl serve");
        self.child = Some(child);
        self.url = None;
        // "controller serving http=127.0.0.1:PORT broker=..." in this run's part of the log.
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            let log = self.log();
            let new = &log[before.min(log.len())..];
            if let Some(addr) = new
                .lines()
                .filter(|l| l.contains("controller serving"))
                .find_map(|l| {
                    let clean = strip_ansi(l);
                    let at = clean.find("http=")? + 5;
                    Some(clean[at..].split_whitespace().next()?.to_string())
                })
            {
                break addr;
            }
            if let Some(s) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!("ferryctl serve exited with {s} during start-up:\n{new}");
            }
            assert!(
                Instant::now() < deadline,
                "ferryctl serve did not start serving within 30 s:\n{new}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        self.url = Some(format!("http://{addr}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while super::infra::http_status(&addr, "/healthz") != Ok(200) {
            assert!(
                Instant::now() < deadline,
                "{addr}/healthz never answered 200"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How the process ended, once it has (it is reaped then).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        let s = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        self.url = None;
        Some(s)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// SIGKILL and reap (a crash). No-op when not running.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.url = None;
    }

    /// SIGTERM and wait (SIGKILL and panic after 20 s).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("controller not running");
        self.url = None;
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("ferryctl serve did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://127.0.0.1:PORT` (panics when not running).
    pub fn url(&self) -> &str {
        self.url.as_deref().expect("controller not running")
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        self.url().trim_start_matches("http://")
    }

    /// The controller's output so far (all runs).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    // ----- the client ---------------------------------------------------------------------------

    /// Run `ferryctl --json ARGS` against this controller (FERRY_SERVER, FERRY_TOKEN_FILE).
    pub fn ctl(&self, args: &[&str]) -> CtlOutput {
        self.ctl_env(args, &[])
    }

    /// Like [`TestController::ctl`] with extra environment (e.g. another `FERRY_TOKEN_FILE`).
    pub fn ctl_env(&self, args: &[&str], env: &[(&str, &str)]) -> CtlOutput {
        let mut cmd = Command::new(ferryctl_binary());
        cmd.arg("--json")
            .args(args)
            .env_remove("FERRY_TOKEN")
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .env("FERRY_SERVER", self.url())
            .env("FERRY_TOKEN_FILE", &self.token_file)
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run ferryctl");
        CtlOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Run a command that must succeed; its JSON output as `T`.
    pub fn ctl_ok<T: DeserializeOwned>(&self, args: &[&str]) -> T {
        let out = self.ctl(args);
        assert!(out.ok(), "ferryctl {args:?} failed: {out}");
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("ferryctl {args:?}: unexpected JSON ({e}): {out}"))
    }

    /// `ferryctl release push` of an envelope (written to a temp file).
    pub fn push_release(&self, envelope: &str) -> ReleaseView {
        let f = tempfile::NamedTempFile::new_in(self.dir()).expect("temp file");
        std::fs::write(f.path(), envelope).expect("write envelope");
        self.ctl_ok(&["release", "push", &f.path().display().to_string()])
    }

    pub fn releases(&self) -> Vec<ReleaseView> {
        self.ctl_ok(&["release", "list"])
    }

    /// `ferryctl devices [--select S]`.
    pub fn devices(&self, select: Option<&str>) -> Vec<DeviceView> {
        match select {
            Some(s) => self.ctl_ok(&["devices", "--select", s]),
            None => self.ctl_ok(&["devices"]),
        }
    }

    /// `ferryctl device show ID`.
    pub fn device(&self, id: &str) -> DeviceDetail {
        self.ctl_ok(&["device", "show", id])
    }

    /// `ferryctl rollout start ARGS`.
    pub fn start_rollout(&self, args: &[&str]) -> RolloutView {
        let mut a = vec!["rollout", "start"];
        a.extend_from_slice(args);
        self.ctl_ok(&a)
    }

    /// `ferryctl rollout status ID` (with per-device entries). Exit code 1 means paused,
    /// reverted or aborted: the JSON is there either way.
    pub fn rollout(&self, id: &str) -> RolloutView {
        let out = self.ctl(&["rollout", "status", id]);
        assert!(
            out.code == 0 || out.code == 1,
            "ferryctl rollout status {id}: {out}"
        );
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("rollout status {id}: unexpected JSON ({e}): {out}"))
    }

    pub fn rollouts(&self) -> Vec<RolloutView> {
        self.ctl_ok(&["rollout", "list"])
    }

    /// Poll `rollout status ID` (every 250 ms) until `pred` holds; panics after `timeout` with
    /// the last status.
    pub fn wait_rollout(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&RolloutView) -> bool,
    ) -> RolloutView {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.rollout(id);
            if pred(&v) {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for rollout {id}: {what}; last status:\n{}",
                    serde_json::to_string_pretty(&v).unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Poll `ferryctl devices` until `pred` holds for the list.
    pub fn wait_devices(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[DeviceView]) -> bool,
    ) -> Vec<DeviceView> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.devices(None);
            if pred(&v) {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for the inventory: {what}; last:\n{}",
                    serde_json::to_string_pretty(&v).unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `GET path` without a token: `(status, body)`.
    pub fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.addr()).expect("connect to the controller");
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr()
        )
        .unwrap();
        let mut raw = String::new();
        let _ = s.read_to_string(&mut raw);
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP status from the controller: {raw:?}"));
        (status, body.to_string())
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ ... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Drop for TestController {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- controller log ({}) -----\n{}\n----- end of controller log -----",
                self.log_path.display(),
                self.log()
            );
        }
    }
}
