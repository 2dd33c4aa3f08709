//! The shipped broker configuration (`examples/mosquitto/ferry.conf` + `ferry.acl`) on a real
//! mosquitto, with certificates issued by `ferryctl cert` (issue 9):
//! - a device publishes only on its own topics and reads only its own `desired`; it cannot
//!   write a `desired`, not even its own; a message over the size limit goes nowhere and the
//!   broker carries on;
//! - a client without a certificate, with one of another CA, or in plaintext is refused;
//! - a box claiming another box's client id (or the controller's) does not take its session:
//!   the client id is the certificate's identity;
//! - the real `ferryctl serve` (two connections, two certificates) and a real agent work over
//!   it: the box enrols, reports and shows online, and the broker names both by their
//!   certificates.
//!
//! The attackers are `mosquitto_pub` / `mosquitto_sub` with certificates of their own, so that
//! each refusal is the broker's.

mod common;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::controller::ferryctl_binary;
use common::{AgentBuilder, Broker, TestController, TestKeys};

const SOON: Duration = Duration::from_secs(60);

/// Certificates under one directory: the fleet CA, the broker's, the controller's pair, two
/// boxes', and a rogue CA with its own "box-a".
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki { dir };
        let d = pki.path().to_path_buf();
        let ctl = |args: &[&str]| {
            let out = Command::new(ferryctl_binary()).args(args).output().unwrap();
            assert!(
                out.status.success(),
                "ferryctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let s = |p: PathBuf| p.display().to_string();
        ctl(&["cert", "ca", "--out", &s(d.join("ca"))]);
        let issue = |name: &str, role: &str, ca: &str, extra: &[&str]| {
            let mut a = vec!["cert", "issue", name, "--role", role, "--ca", ca, "--out"];
            let out = s(d.join("certs"));
            let out = if ca.ends_with("rogue") {
                s(d.join("rogue-certs"))
            } else {
                out
            };
            a.push(&out);
            a.extend_from_slice(extra);
            ctl(&a);
        };
        let ca = s(d.join("ca"));
        issue(
            "broker",
            "broker",
            &ca,
            &["--host", "localhost", "--host", "127.0.0.1"],
        );
        issue("ferry-controller", "controller", &ca, &[]);
        issue("box-a", "device", &ca, &[]);
        issue("box-b", "device", &ca, &[]);
        ctl(&[
            "cert",
            "ca",
            "--out",
            &s(d.join("rogue")),
            "--name",
            "rogue",
        ]);
        issue("box-a", "device", &s(d.join("rogue")), &[]);
        fs::copy(d.join("ca/ca.crt"), d.join("certs/ferry-ca.crt")).unwrap();
        pki
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn ca(&self) -> PathBuf {
        self.path().join("ca/ca.crt")
    }

    fn cert(&self, name: &str) -> (PathBuf, PathBuf) {
        let d = self.path().join("certs");
        (d.join(format!("{name}.crt")), d.join(format!("{name}.key")))
    }

    /// The shipped configuration, its port, certificate and ACL paths pointed here.
    fn broker(&self) -> Broker {
        let root = env!("CARGO_MANIFEST_DIR");
        let conf = fs::read_to_string(format!("{root}/examples/mosquitto/ferry.conf")).unwrap();
        let acl = self.path().join("ferry.acl");
        fs::copy(format!("{root}/examples/mosquitto/ferry.acl"), &acl).unwrap();
        let certs = format!("{}/", self.path().join("certs").display());
        assert!(conf.contains("\nlistener 8883\n"), "{conf}");
        Broker::start_conf(|port| {
            conf.replace(
                "\nlistener 8883\n",
                &format!("\nlistener {port} 127.0.0.1\n"),
            )
            .replace("/etc/mosquitto/certs/", &certs)
            .replace("/etc/mosquitto/ferry.acl", &acl.display().to_string())
        })
    }
}

/// How a test client connects: as a certificate of the fleet CA, of the rogue CA, without one
/// (TLS), or in plaintext.
#[derive(Clone, Copy)]
enum As<'a> {
    Fleet(&'a str),
    Rogue(&'a str),
    NoCert,
    Plain,
}

fn client_args(pki: &Pki, broker: &Broker, who: As, client_id: Option<&str>) -> Vec<String> {
    let mut a = vec![
        "-h".to_string(),
        "localhost".into(),
        "-p".into(),
        broker.port().to_string(),
    ];
    let tls = |a: &mut Vec<String>| {
        a.push("--cafile".into());
        a.push(pki.ca().display().to_string());
    };
    let pair = |a: &mut Vec<String>, dir: &str, name: &str| {
        let d = pki.path().join(dir);
        a.push("--cert".into());
        a.push(d.join(format!("{name}.crt")).display().to_string());
        a.push("--key".into());
        a.push(d.join(format!("{name}.key")).display().to_string());
    };
    match who {
        As::Fleet(name) => {
            tls(&mut a);
            pair(&mut a, "certs", name);
        }
        As::Rogue(name) => {
            tls(&mut a);
            pair(&mut a, "rogue-certs", name);
        }
        As::NoCert => tls(&mut a),
        As::Plain => {}
    }
    if let Some(id) = client_id {
        a.push("-i".into());
        a.push(id.into());
    }
    a
}

/// `mosquitto_pub` a message (QoS 1); the output, whether or not the broker took it.
fn publish(
    pki: &Pki,
    broker: &Broker,
    who: As,
    id: Option<&str>,
    topic: &str,
    payload: &[u8],
    retain: bool,
) -> Output {
    let file = pki.path().join("payload");
    fs::write(&file, payload).unwrap();
    let mut c = Command::new("mosquitto_pub");
    c.args(client_args(pki, broker, who, id))
        .args(["-q", "1", "-t", topic, "-f"])
        .arg(&file);
    if retain {
        c.arg("-r");
    }
    c.output().expect("mosquitto_pub")
}

fn publish_ok(pki: &Pki, broker: &Broker, who: As, topic: &str, payload: &str, retain: bool) {
    let out = publish(pki, broker, who, None, topic, payload.as_bytes(), retain);
    assert!(
        out.status.success(),
        "mosquitto_pub {topic}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `mosquitto_sub -v` running in the background, its output in a file.
struct Sub {
    child: Child,
    out: PathBuf,
}

impl Sub {
    fn start(pki: &Pki, broker: &Broker, who: As, id: Option<&str>, topic: &str) -> Sub {
        let out = pki.path().join(format!("sub-{}.out", fastrand::u64(..)));
        let child = Command::new("mosquitto_sub")
            .args(client_args(pki, broker, who, id))
            .args(["-q", "1", "-v", "-t", topic])
            .stdout(fs::File::create(&out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub");
        Sub { child, out }
    }

    fn lines(&self) -> Vec<String> {
        let mut s = String::new();
        fs::File::open(&self.out)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        s.lines().map(String::from).collect()
    }

    /// Wait for a line; every line received by then.
    fn wait_for(&self, line: &str) -> Vec<String> {
        self.wait_within(line, SOON)
            .unwrap_or_else(|got| panic!("no {line:?} within {SOON:?}; got {}", short(&got)))
    }

    fn wait_within(&self, line: &str, within: Duration) -> Result<Vec<String>, Vec<String>> {
        let deadline = Instant::now() + within;
        loop {
            let lines = self.lines();
            if lines.iter().any(|l| l == line) {
                return Ok(lines);
            }
            if Instant::now() > deadline {
                return Err(lines);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `mosquitto_sub` connection: what it received within `secs` (retained messages at once).
fn receive(pki: &Pki, broker: &Broker, who: As, topic: &str, secs: u32) -> Output {
    Command::new("mosquitto_sub")
        .args(client_args(pki, broker, who, None))
        .args(["-q", "1", "-v", "-t", topic, "-W", &secs.to_string()])
        .output()
        .expect("mosquitto_sub")
}

/// Lines for a message, each cut to 100 characters (a 2 MiB payload must not fill the log).
fn short(lines: &[String]) -> String {
    let cut: Vec<String> = lines
        .iter()
        .map(|l| l.chars().take(100).collect())
        .collect();
    format!("{cut:?}")
}

fn text(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(String::from)
        .collect()
}

fn require_mosquitto() -> bool {
    let ok = ["mosquitto", "mosquitto_pub", "mosquitto_sub"]
        .iter()
        .all(|b| Command::new(b).arg("--help").output().is_ok());
    if !ok {
        assert!(
            std::env::var_os("FERRY_REQUIRE_INFRA").is_none(),
            "mosquitto and mosquitto-clients are required (FERRY_REQUIRE_INFRA)"
        );
        eprintln!("SKIPPED: mosquitto / mosquitto-clients not installed");
    }
    ok
}

#[test]
fn the_shipped_broker_confines_every_client_to_its_own_topics() {
    if !require_mosquitto() {
        return;
    }
    let pki = Pki::new();
    let broker = pki.broker();
    let dev = |d: &str, kind: &str| format!("ferry/v1/devices/{d}/{kind}");

    // The controller's view of every device; box-a's barrier messages on its own events stream
    // mark how far the broker has got (one client's publishes are delivered in order).
    let fleet = Sub::start(
        &pki,
        &broker,
        As::Fleet("ferry-controller"),
        None,
        "ferry/v1/devices/#",
    );
    let mut barrier = 0;
    // Published again until it arrives: the first only once the subscription is in place.
    let mut barrier_from = |who: &str| {
        let deadline = Instant::now() + SOON;
        loop {
            barrier += 1;
            let p = format!("barrier-{barrier}");
            publish_ok(
                &pki,
                &broker,
                As::Fleet(who),
                &dev(who, "events"),
                &p,
                false,
            );
            let line = format!("{} {p}", dev(who, "events"));
            match fleet.wait_within(&line, Duration::from_secs(2)) {
                Ok(seen) => return seen,
                Err(seen) if Instant::now() > deadline => {
                    panic!("no barrier within {SOON:?}; got {}", short(&seen))
                }
                Err(_) => {}
            }
        }
    };
    barrier_from("box-a");

    // Its own topics: carried.
    publish_ok(
        &pki,
        &broker,
        As::Fleet("box-a"),
        &dev("box-a", "state"),
        "a-own",
        true,
    );
    // Another box's topic, and a desired (its own included): dropped by the broker.
    publish_ok(
        &pki,
        &broker,
        As::Fleet("box-a"),
        &dev("box-b", "state"),
        "forged-b",
        true,
    );
    publish_ok(
        &pki,
        &broker,
        As::Fleet("box-a"),
        &dev("box-b", "online"),
        "0",
        true,
    );
    publish_ok(
        &pki,
        &broker,
        As::Fleet("box-a"),
        &dev("box-a", "desired"),
        "self-notice",
        true,
    );
    publish_ok(
        &pki,
        &broker,
        As::Fleet("box-a"),
        "ferry/v1/other",
        "x",
        false,
    );
    // Over the size limit on its own topic: refused (the publisher may be disconnected for it).
    let big = vec![b'x'; 2 * 1024 * 1024];
    let _ = publish(
        &pki,
        &broker,
        As::Fleet("box-a"),
        None,
        &dev("box-a", "telemetry"),
        &big,
        false,
    );
    let seen = barrier_from("box-a");
    assert!(
        seen.contains(&format!("{} a-own", dev("box-a", "state"))),
        "{seen:?}"
    );
    for l in &seen {
        assert!(
            !l.contains("forged-b")
                && !l.contains("self-notice")
                && !l.starts_with(&dev("box-b", "online"))
                && !l.starts_with("ferry/v1/other")
                && !l.starts_with(&dev("box-a", "telemetry")),
            "the broker let through {}; all seen: {}",
            short(std::slice::from_ref(l)),
            short(&seen)
        );
    }
    // Nothing retained from the forgeries either (a new controller connection would see it).
    drop(fleet);
    let retained = text(&receive(
        &pki,
        &broker,
        As::Fleet("ferry-controller"),
        "ferry/v1/#",
        2,
    ));
    assert_eq!(retained, [format!("{} a-own", dev("box-a", "state"))]);

    // Desired states: the controller's notice connection writes them; a box reads only its own.
    for d in ["box-a", "box-b"] {
        publish_ok(
            &pki,
            &broker,
            As::Fleet("ferry-controller-notices"),
            &dev(d, "desired"),
            &format!("notice-for-{d}"),
            true,
        );
    }
    let got = text(&receive(
        &pki,
        &broker,
        As::Fleet("box-a"),
        "ferry/v1/devices/+/desired",
        2,
    ));
    assert_eq!(
        got,
        [format!("{} notice-for-box-a", dev("box-a", "desired"))]
    );
    let got = text(&receive(
        &pki,
        &broker,
        As::Fleet("box-a"),
        "ferry/v1/devices/box-b/#",
        2,
    ));
    assert!(got.is_empty(), "box-a read box-b's topics: {got:?}");

    // Trust records and the heartbeat: the controller's connections write them, fleet-wide and
    // per box; a box
    // reads the fleet's and its own, and cannot write either (its forgeries would replace the
    // retained records).
    for topic in [
        "ferry/v1/trust".to_string(),
        "ferry/v1/heartbeat".to_string(),
        dev("box-a", "trust"),
        dev("box-b", "trust"),
    ] {
        publish_ok(
            &pki,
            &broker,
            As::Fleet("ferry-controller-notices"),
            &topic,
            "record",
            true,
        );
        publish_ok(&pki, &broker, As::Fleet("box-a"), &topic, "forged", true);
    }
    let mut got = text(&receive(&pki, &broker, As::Fleet("box-a"), "ferry/v1/#", 2));
    got.retain(|l| l.contains("trust") || l.contains("heartbeat"));
    got.sort();
    assert_eq!(
        got,
        [
            format!("{} record", dev("box-a", "trust")),
            "ferry/v1/heartbeat record".to_string(),
            "ferry/v1/trust record".to_string()
        ]
    );

    // Unknown clients are refused: no certificate, another CA's certificate (even with a
    // fleet device's name), plaintext.
    for (who, label) in [
        (As::NoCert, "no certificate"),
        (As::Rogue("box-a"), "another CA's certificate"),
        (As::Plain, "plaintext"),
    ] {
        let out = receive(&pki, &broker, who, "ferry/v1/#", 2);
        assert!(
            !out.status.success() && text(&out).is_empty(),
            "{label}: connected and read {:?}",
            text(&out)
        );
        let out = publish(
            &pki,
            &broker,
            who,
            None,
            &dev("box-a", "state"),
            b"intruder",
            true,
        );
        assert!(!out.status.success(), "{label}: the publish was accepted");
    }
    let retained = text(&receive(
        &pki,
        &broker,
        As::Fleet("ferry-controller"),
        &dev("box-a", "state"),
        2,
    ));
    assert_eq!(retained, [format!("{} a-own", dev("box-a", "state"))]);

    // A stolen client id takes no session: box-a is connected; box-b claims box-a's client id
    // (and then the controller's); box-a stays connected and keeps receiving.
    let mut a = Sub::start(
        &pki,
        &broker,
        As::Fleet("box-a"),
        Some("box-a"),
        &dev("box-a", "desired"),
    );
    a.wait_for(&format!("{} notice-for-box-a", dev("box-a", "desired")));
    let log_before = broker.log().len();
    for stolen in ["box-a", "ferry-controller"] {
        let out = publish(
            &pki,
            &broker,
            As::Fleet("box-b"),
            Some(stolen),
            &dev("box-b", "state"),
            b"b-own",
            true,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    publish_ok(
        &pki,
        &broker,
        As::Fleet("ferry-controller-notices"),
        &dev("box-a", "desired"),
        "notice-2",
        true,
    );
    a.wait_for(&format!("{} notice-2", dev("box-a", "desired")));
    assert!(a.running());
    let log = broker.log();
    let log = &log[log_before..];
    assert!(
        !log.contains("already connected, closing old connection"),
        "a session was taken over:\n{log}"
    );
    assert!(
        log.contains(" as box-b "),
        "box-b connects as itself:\n{log}"
    );
}

#[test]
fn controller_and_agent_work_over_the_shipped_broker() {
    if !require_mosquitto() {
        return;
    }
    let pki = Pki::new();
    let broker = pki.broker();
    let url = format!("mqtts://localhost:{}", broker.port());
    let keys = TestKeys::new();

    // The controller: two connections, each with its own certificate.
    let mut controller = TestController::build(&broker, &keys, "");
    let (cert, key) = pki.cert("ferry-controller");
    let (ncert, nkey) = pki.cert("ferry-controller-notices");
    let config = fs::read_to_string(&controller.config_path).unwrap();
    let config = config.replace(
        &format!("url = {:?}\n", broker.url()),
        &format!(
            "url = {url:?}\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n\
             notices_cert = {ncert:?}\nnotices_key = {nkey:?}\n",
            ca = pki.ca(),
        ),
    );
    assert!(config.contains("notices_cert"), "{config}");
    fs::write(&controller.config_path, config).unwrap();
    controller.spawn();

    // The box: its device certificate.
    let (dcert, dkey) = pki.cert("box-a");
    let ca = pki.ca();
    let _agent = AgentBuilder::new("box-a", &broker, &keys)
        .config(|t| {
            let m = t["mqtt"].as_table_mut().unwrap();
            m.insert("url".into(), url.clone().into());
            m.insert("ca_file".into(), ca.display().to_string().into());
            m.insert("cert_file".into(), dcert.display().to_string().into());
            m.insert("key_file".into(), dkey.display().to_string().into());
        })
        .start();
    // A second box from the same image: `device_id = "auto"` (its devicetree serial, with the
    // fleet's prefix), enrolled by the image's fleet token; its certificate names that id.
    let hw = pki.path().join("hw");
    fs::create_dir_all(hw.join("proc/device-tree")).unwrap();
    fs::write(hw.join("proc/device-tree/serial-number"), b"c0ffee42\0").unwrap();
    let out = Command::new(ferryctl_binary())
        .args(["cert", "issue", "box-c0ffee42", "--role", "device", "--ca"])
        .arg(pki.path().join("ca"))
        .arg("--out")
        .arg(pki.path().join("certs"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (acert, akey) = pki.cert("box-c0ffee42");
    let auto = AgentBuilder::new("auto", &broker, &keys)
        .config(|t| {
            t.insert("device_id".into(), "auto".into());
            let m = t["mqtt"].as_table_mut().unwrap();
            m.insert("url".into(), url.clone().into());
            m.insert("ca_file".into(), ca.display().to_string().into());
            m.insert("cert_file".into(), acert.display().to_string().into());
            m.insert("key_file".into(), akey.display().to_string().into());
            let mut id = toml::Table::new();
            id.insert("enroll_token".into(), common::ENROLL_TOKEN.into());
            id.insert("device_id_prefix".into(), "box-".into());
            id.insert("hardware_root".into(), hw.display().to_string().into());
            t.insert("identity".into(), id.into());
        })
        .start();
    let devices = controller.wait_devices(
        "box-a and box-c0ffee42 enrolled, reporting, online",
        SOON,
        |v| {
            ["box-a", "box-c0ffee42"]
                .iter()
                .all(|id| v.iter().any(|d| d.id == *id && d.online))
        },
    );
    assert_eq!(devices.len(), 2, "{devices:?}");
    assert!(
        auto.log().contains("device id derived from the hardware"),
        "{}",
        auto.log()
    );
    let log = broker.log();
    for who in [
        "ferry-controller",
        "ferry-controller-notices",
        "box-a",
        "box-c0ffee42",
    ] {
        assert!(
            log.contains(&format!(" as {who} ")),
            "{who} is not named by its certificate:\n{log}"
        );
    }
    assert!(
        !log.contains("already connected, closing old connection"),
        "a session was taken over:\n{log}"
    );
}
