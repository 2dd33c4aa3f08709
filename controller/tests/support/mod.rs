//! Shared by the controller's integration tests: infrastructure checks (tests skip loudly
//! unless FERRY_REQUIRE_INFRA=1, then they fail) and a private mosquitto per test.
#![allow(dead_code)]

pub mod cdp;

use std::io::Write;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `FERRY_REGISTRY_ADDR` (as in scripts/env-up.sh), default 127.0.0.1:5055.
pub fn registry() -> String {
    std::env::var("FERRY_REGISTRY_ADDR")
        .ok()
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| "127.0.0.1:5055".to_string())
}

/// The sensor repository; the test signs `REPO:1.0.0`.
pub fn repo() -> String {
    format!("{}/ferry/sensor", registry())
}

pub fn infra_required() -> bool {
    std::env::var_os("FERRY_REQUIRE_INFRA").is_some_and(|v| !v.is_empty() && v != "0")
}

pub fn skip(why: &str) {
    if infra_required() {
        panic!("FERRY_REQUIRE_INFRA is set but {why}");
    }
    // Straight to the stderr handle: libtest captures eprintln! of passing tests, and a skip
    // must be seen.
    let bar = "!".repeat(80);
    let _ = writeln!(
        std::io::stderr(),
        "\n{bar}\n!! SKIPPED: {}\n!! run scripts/env-up.sh && images/build.sh {}, or set FERRY_REQUIRE_INFRA=1\n!! to make this a failure.\n{bar}",
        why,
        registry()
    );
}

#[path = "../../../tests/common/registry_probe.rs"]
mod registry_probe;

/// Does `GET /v2/` on the test registry answer with an HTTP status line?
pub fn registry_answers() -> bool {
    registry_probe::registry_answers(&registry())
}

pub fn have(binary: &str) -> bool {
    Command::new(binary)
        .arg("-h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

#[path = "../../../tests/common/ports.rs"]
mod ports;
pub use ports::free_port;

/// A mosquitto on a free port of 127.0.0.1, killed on drop.
pub struct Mosquitto {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn start() -> Option<Mosquitto> {
        Mosquitto::start_with("")
    }

    /// With more configuration lines; the broker logs to `mosquitto.log` in its directory
    /// ([`Mosquitto::log`]).
    pub fn start_with(extra: &str) -> Option<Mosquitto> {
        if !have("mosquitto") || !have("mosquitto_sub") || !have("mosquitto_pub") {
            skip("mosquitto / mosquitto_sub / mosquitto_pub are not installed");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..5 {
            let port = free_port();
            let conf = dir.path().join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!(
                    "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                     log_dest stdout\nlog_type all\nconnection_messages true\n{extra}\n"
                ),
            )
            .unwrap();
            // Its log on stdout, into a file of ours (as root, mosquitto drops to its own user
            // before it would open a log file in this directory).
            let log = std::fs::File::create(dir.path().join("mosquitto.log")).unwrap();
            let mut child = Command::new("mosquitto")
                .arg("-c")
                .arg(&conf)
                .stdout(log)
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn mosquitto");
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // port taken meanwhile: try another
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Some(Mosquitto {
                        child,
                        port,
                        _dir: dir,
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("mosquitto did not start");
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// What the broker logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Publish a payload of any size (from a file: binary-safe).
    pub fn publish_bytes(&self, topic: &str, payload: &[u8], retain: bool) {
        let file = self
            ._dir
            .path()
            .join(format!("payload-{}", fastrand_suffix()));
        std::fs::write(&file, payload).unwrap();
        let mut c = Command::new("mosquitto_pub");
        c.args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-t", topic, "-q", "1", "-f"])
            .arg(&file);
        if retain {
            c.arg("-r");
        }
        let out = c.output().expect("mosquitto_pub");
        assert!(
            out.status.success(),
            "mosquitto_pub: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::remove_file(&file);
    }

    /// The retained message on `topic` (exact bytes).
    pub fn retained(&self, topic: &str) -> Vec<u8> {
        let out = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-t", topic, "-C", "1", "-N", "-W", "10"])
            .output()
            .expect("mosquitto_sub");
        assert!(
            out.status.success(),
            "mosquitto_sub: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    pub fn publish(&self, topic: &str, payload: &str, retain: bool) {
        let mut c = Command::new("mosquitto_pub");
        c.args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-t", topic, "-q", "1", "-m", payload]);
        if retain {
            c.arg("-r");
        }
        let st = c.status().expect("mosquitto_pub");
        assert!(st.success());
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fastrand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The fleet enrolment token the tests' controllers admit (`[enroll] tokens`).
pub const ENROLL_TOKEN: &str = "it-fleet-enrolment-token-0123456789";

/// The `[enroll]` table for a test controller's config.
pub fn enroll_section() -> String {
    format!("[enroll]\ntokens = [{ENROLL_TOKEN:?}]\n")
}

/// A device's key in the tests: derived from its id (stable across a test's controllers).
pub fn device_key(device: &str) -> ferry_protocol::keys::PrivateKey {
    use sha2::Digest;
    let seed: [u8; 32] = sha2::Sha256::digest(format!("it-device-key\0{device}").as_bytes()).into();
    ferry_protocol::keys::PrivateKey::from_seed(seed).unwrap()
}

/// One counter for every signed test report of this process: always rising.
fn next_counter() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1 << 32);
    N.fetch_add(1, Ordering::SeqCst)
}

/// `payload` (the v1 body: JSON, or `1` / `0` for `online`) as the device's agent publishes
/// it on `topic` (`<prefix>/v1/devices/<id>/<kind>`): signed by [`device_key`].
pub fn sign_report(topic: &str, payload: &str) -> Vec<u8> {
    use ferry_protocol::device_report::{self, Stream};
    let mut parts = topic.rsplitn(3, '/');
    let (kind, device) = (parts.next().unwrap(), parts.next().unwrap());
    let stream = match kind {
        "state" => Stream::State,
        "events" => Stream::Events,
        "telemetry" => Stream::Telemetry,
        "online" => Stream::Online,
        other => panic!("no report stream {other}"),
    };
    let body = match (stream, payload) {
        (Stream::Online, "1") => serde_json::json!({"online": true}),
        (Stream::Online, "0") => serde_json::json!({"online": false}),
        _ => serde_json::from_str(payload).unwrap_or_else(|e| panic!("{e}: {payload}")),
    };
    device_report::sign(&device_key(device), device, stream, next_counter(), body)
}

/// The device's enrolment request, with the proof of [`ENROLL_TOKEN`].
pub fn enroll_request(device: &str) -> Vec<u8> {
    use ferry_protocol::device_report::{self, EnrollBody, Stream};
    let k = device_key(device);
    let body = EnrollBody {
        public_key: k.public().to_pem(),
        token_proof: Some(device_report::token_proof(
            ENROLL_TOKEN,
            device,
            k.public().id(),
        )),
        agent_version: Some("it".into()),
    };
    device_report::sign(
        &k,
        device,
        Stream::Enroll,
        next_counter(),
        serde_json::to_value(body).unwrap(),
    )
}

impl Mosquitto {
    /// Publish as the device's agent would: its enrolment request first (retained, once per
    /// device and broker), then `payload` signed (see [`sign_report`]).
    pub fn publish_signed(&self, topic: &str, payload: &str, retain: bool) {
        let device = topic.rsplit('/').nth(1).unwrap().to_string();
        let prefix = topic.split("/v1/devices/").next().unwrap();
        let marker = self._dir.path().join(format!("enrolled-{device}"));
        if !marker.exists() {
            self.publish_bytes(
                &format!("{prefix}/v1/devices/{device}/enroll"),
                &enroll_request(&device),
                true,
            );
            std::fs::write(&marker, b"").unwrap();
        }
        self.publish_bytes(topic, &sign_report(topic, payload), retain);
    }
}
