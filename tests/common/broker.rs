//! A real mosquitto broker per test, on a free port of 127.0.0.1, killed on drop.
//!
//! ```ignore
//! mod common;
//! let broker = common::broker::Broker::start();
//! broker.publish("ferry/v1/devices/d/desired", b"...", true);
//! assert_eq!(broker.retained("ferry/v1/devices/d/online"), Some(b"1".to_vec()));
//! ```
//!
//! Needs `mosquitto` (looked up as `/usr/sbin/mosquitto`, then on PATH) and, for the client
//! helpers, `mosquitto_pub` / `mosquitto_sub` (package `mosquitto-clients`).

use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// A running (or stopped, see [`Broker::stop`]) mosquitto.
pub struct Broker {
    port: u16,
    dir: tempfile::TempDir,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

pub use super::ports::free_port;

fn mosquitto_bin() -> PathBuf {
    let sbin = Path::new("/usr/sbin/mosquitto");
    if sbin.exists() {
        sbin.to_path_buf()
    } else {
        PathBuf::from("mosquitto")
    }
}

impl Broker {
    /// Anonymous broker without persistence.
    pub fn start() -> Broker {
        Broker::start_with("")
    }

    /// Like [`Broker::start`], with `extra` appended to the configuration (more listeners, TLS
    /// settings for them, `password_file`, `acl_file`, ...).
    pub fn start_with(extra: &str) -> Broker {
        Broker::start_conf(|port| {
            format!("listener {port} 127.0.0.1\nallow_anonymous true\n{extra}\n")
        })
    }

    /// A broker configured by `conf(port)` alone (plus this harness's log and persistence
    /// lines), with no anonymous listener of the harness: e.g. a shipped configuration with its
    /// port and paths replaced. [`Broker::port`] is the port given to `conf`.
    pub fn start_conf(conf: impl Fn(u16) -> String) -> Broker {
        // Another test may take the port between the check and mosquitto's bind: try again
        // on a new port then.
        for attempt in 1.. {
            match Broker::try_start_conf(&conf) {
                Ok(broker) => return broker,
                Err(e) if attempt < 5 => eprintln!("retrying mosquitto on another port: {e}"),
                Err(e) => panic!("{e}"),
            }
        }
        unreachable!()
    }

    fn try_start_conf(conf_of: &dyn Fn(u16) -> String) -> Result<Broker, String> {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        let log = dir.path().join("mosquitto.log");
        // mosquitto started as root drops to user `mosquitto`, which could not write the log in
        // our private temp dir.
        let user = if unsafe { libc::geteuid() } == 0 {
            "user root\n"
        } else {
            ""
        };
        let text = format!(
            "{user}persistence false\n\
             log_dest file {log}\n\
             log_type all\n\
             log_timestamp_format %Y-%m-%dT%H:%M:%S\n\
             {conf}\n",
            log = log.display(),
            conf = conf_of(port),
        );
        fs::write(&conf, text).expect("write mosquitto.conf");
        let mut broker = Broker {
            port,
            dir,
            conf,
            log,
            child: None,
        };
        broker.try_spawn()?;
        Ok(broker)
    }

    fn spawn(&mut self) {
        if let Err(e) = self.try_spawn() {
            panic!("{e}");
        }
    }

    /// Start mosquitto and wait for it; `Err` when it exits (e.g. its port is taken).
    fn try_spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "broker already running");
        let log_len_before = fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto (apt-get install -y mosquitto)");
        self.child = Some(child);

        // Ready once the log says so: probing the port would add connections to the log.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = fs::read(&self.log).unwrap_or_default();
            let new = String::from_utf8_lossy(&log[(log_len_before as usize).min(log.len())..])
                .into_owned();
            if new.contains(" running") {
                break;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!(
                    "mosquitto exited with {status} on port {}:\n{new}",
                    self.port
                ));
            }
            assert!(
                Instant::now() < deadline,
                "mosquitto did not start on port {}:\n{new}",
                self.port
            );
            sleep(Duration::from_millis(20));
        }
        // Belt and braces: the listener accepts (this one connection is logged, and harmless).
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "port {} not accepting",
                self.port
            );
            sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The temp dir holding the configuration and log; files put here live as long as the broker.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Stop with SIGTERM (SIGKILL after 5 s). The port stays reserved for [`Broker::restart`].
    pub fn stop(&mut self) {
        self.signal_and_wait(libc::SIGTERM);
    }

    /// Stop abruptly with SIGKILL.
    pub fn kill(&mut self) {
        self.signal_and_wait(libc::SIGKILL);
    }

    fn signal_and_wait(&mut self, signal: libc::c_int) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        unsafe {
            libc::kill(child.id() as libc::pid_t, signal);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            sleep(Duration::from_millis(10));
        }
    }

    /// Freeze the broker (SIGSTOP): connections stay open, nothing is read or acknowledged.
    /// [`Broker::kill`] and drop still work on a frozen broker.
    pub fn freeze(&self) {
        if let Some(child) = &self.child {
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGSTOP);
            }
        }
    }

    /// Undo [`Broker::freeze`] (SIGCONT).
    pub fn thaw(&self) {
        if let Some(child) = &self.child {
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGCONT);
            }
        }
    }

    /// Start again with the same configuration on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The broker's log so far (all runs).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// How many log lines contain `needle`.
    pub fn count_in_log(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Wait until a log line contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// Publish with `mosquitto_pub` at QoS 1 (payload from a file: binary-safe, any size).
    pub fn publish(&self, topic: &str, payload: &[u8], retain: bool) {
        let mut file = tempfile::NamedTempFile::new_in(self.dir()).unwrap();
        file.write_all(payload).unwrap();
        let mut cmd = Command::new("mosquitto_pub");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q", "1"])
            .args(["-i", &format!("test-pub-{}", fastrand::u32(..))])
            .args(["-t", topic, "-f"])
            .arg(file.path());
        if retain {
            cmd.arg("-r");
        }
        let out = cmd.output().expect("run mosquitto_pub");
        assert!(
            out.status.success(),
            "mosquitto_pub failed: {}",
            describe(&out)
        );
    }

    /// Clear a retained message.
    pub fn clear_retained(&self, topic: &str) {
        let out = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q", "1"])
            .args(["-t", topic, "-r", "-n"])
            .output()
            .expect("run mosquitto_pub");
        assert!(
            out.status.success(),
            "mosquitto_pub -n failed: {}",
            describe(&out)
        );
    }

    /// The retained message of `topic` (as a fresh subscriber sees it), or `None` after ~1 s.
    pub fn retained(&self, topic: &str) -> Option<Vec<u8>> {
        let out = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-i", &format!("test-sub-{}", fastrand::u32(..))])
            .args(["-t", topic, "-C", "1", "-W", "1", "-N", "-F", "%r%p"])
            .output()
            .expect("run mosquitto_sub");
        if !out.status.success() {
            return None; // 27: timed out, nothing retained
        }
        // "%r" is 1 for a retained message; a live message arriving in that second has 0.
        match out.stdout.split_first() {
            Some((b'1', payload)) => Some(payload.to_vec()),
            _ => None,
        }
    }

    /// Poll [`Broker::retained`] until it equals `want`; returns the last value seen.
    pub fn wait_retained(&self, topic: &str, want: &[u8], timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.retained(topic);
            if got.as_deref() == Some(want) || Instant::now() > deadline {
                return got;
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// Start a `mosquitto_sub` that collects `count` messages of `topic` (one payload per line).
    /// Waits until the broker has registered the subscription.
    pub fn subscribe(&self, topic: &str, count: usize) -> Subscriber {
        let id = format!("test-sub-{}", fastrand::u32(..));
        let child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q", "1"])
            .args(["-i", &id, "-t", topic, "-C", &count.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run mosquitto_sub");
        assert!(
            self.wait_for_log(&format!("{id} 1 {topic}"), Duration::from_secs(5)),
            "subscription of {id} to {topic} not seen in the broker log"
        );
        Subscriber { child: Some(child) }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A background `mosquitto_sub`.
pub struct Subscriber {
    child: Option<Child>,
}

impl Subscriber {
    /// Wait for the subscriber to have received its messages; returns their payloads.
    pub fn wait(mut self, timeout: Duration) -> Vec<String> {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + timeout;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn describe(out: &Output) -> String {
    format!(
        "{}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
