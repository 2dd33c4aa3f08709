//! Telemetry (issue 4) against a real mosquitto and the real agent binary: store-and-forward
//! across a broker outage, across an agent restart while offline, and buffer overflow.
//!
//! The outage is made by a TCP proxy between the agent and the broker that the test cuts and
//! restores; the test's own subscriber talks to the broker directly, so it stays subscribed and
//! sees everything the broker accepts. Every sample the agent decides to report is logged by it
//! (`telemetry sample published` / `telemetry sample buffered`), which gives the exact count of
//! what must arrive.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::agent::{AgentBinary, AgentBuilder, TestAgent};
use common::broker::Broker;
use common::infra;
use common::keys::TestKeys;
use ferry_protocol::report::{Telemetry, TelemetryMessage};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use toml::{Table, Value};

/// A TCP proxy to the broker that can be cut (open connections reset, new ones closed at once).
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    /// While set, bytes are read and thrown away (a link that silently stopped delivering).
    hold: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let hold = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (u, c, h) = (up.clone(), conns.clone(), hold.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !u.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                {
                    let mut c = c.lock().unwrap();
                    c.push(client.try_clone().unwrap());
                    c.push(server.try_clone().unwrap());
                }
                pipe(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    h.clone(),
                );
                pipe(server, client, h.clone());
            }
        });
        Proxy {
            port,
            up,
            hold,
            conns,
        }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.hold.store(false, Ordering::SeqCst);
        self.up.store(true, Ordering::SeqCst);
    }

    fn hold(&self) {
        self.hold.store(true, Ordering::SeqCst);
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, hold: Arc<AtomicBool>) {
    thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) if hold.load(Ordering::SeqCst) => {}
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    });
}

/// The device's telemetry messages as received by a subscriber of its own.
struct Watcher {
    payloads: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Watcher {
    fn start(broker: &Broker, device: &str) -> Watcher {
        let topic = format!("ferry/v1/devices/{device}/telemetry");
        let mut opts = MqttOptions::new(
            format!("it-telemetry-{}", fastrand::u32(..)),
            "127.0.0.1",
            broker.port(),
        );
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut conn) = Client::new(opts, 16);
        let payloads: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let subscribed = Arc::new(AtomicBool::new(false));
        let (m, s) = (payloads.clone(), subscribed.clone());
        thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.try_subscribe(topic.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => s.store(true, Ordering::SeqCst),
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        m.lock().unwrap().push(common::report_body(&p.payload));
                    }
                    Ok(_) => {}
                    Err(_) => thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !subscribed.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "watcher: no SUBACK");
            thread::sleep(Duration::from_millis(10));
        }
        Watcher { payloads }
    }

    fn payloads(&self) -> Vec<Vec<u8>> {
        self.payloads.lock().unwrap().clone()
    }

    fn messages(&self) -> Vec<TelemetryMessage> {
        self.payloads()
            .iter()
            .map(|p| {
                serde_json::from_slice(p)
                    .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(p)))
            })
            .collect()
    }

    /// Every sample received, in arrival order.
    fn samples(&self) -> Vec<Telemetry> {
        self.messages()
            .into_iter()
            .flat_map(|m| match m {
                TelemetryMessage::One(t) => vec![*t],
                TelemetryMessage::Batch(v) => v,
            })
            .collect()
    }

    fn batches(&self) -> Vec<Vec<Telemetry>> {
        self.messages()
            .into_iter()
            .filter_map(|m| match m {
                TelemetryMessage::Batch(v) => Some(v),
                _ => None,
            })
            .collect()
    }

    fn wait_samples(&self, n: usize, timeout: Duration, agent: &TestAgent) -> Vec<Telemetry> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.samples();
            if s.len() >= n {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{} telemetry samples after {timeout:?}, want {n}\n{}",
                s.len(),
                agent.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A fake sysfs with one hwmon temperature/humidity sensor.
fn fake_sysfs() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let hw = d.path().join("class/hwmon/hwmon0");
    std::fs::create_dir_all(&hw).unwrap();
    std::fs::write(hw.join("name"), "sht4x\n").unwrap();
    std::fs::write(hw.join("temp1_input"), "21500\n").unwrap();
    std::fs::write(hw.join("humidity1_input"), "40000\n").unwrap();
    d
}

/// An agent that reports a sample every second (heartbeat = sample period), via `proxy`.
fn agent(
    name: &str,
    broker: &Broker,
    proxy: &Proxy,
    sysfs: &std::path::Path,
    buffer_max_bytes: i64,
) -> (TestAgent, TestKeys) {
    infra::require_infra();
    let device = infra::device_id(name);
    let keys = TestKeys::new();
    let url = proxy.url();
    let root = sysfs.display().to_string();
    let agent = AgentBuilder::new(&device, broker, &keys)
        .binary(agent_binary())
        .config(move |t| {
            t["mqtt"]
                .as_table_mut()
                .unwrap()
                .insert("url".into(), url.into());
            let mut tel = Table::new();
            tel.insert("sysfs_root".into(), root.into());
            tel.insert("sample".into(), "1s".into());
            tel.insert("max_interval".into(), "1s".into());
            tel.insert("batch_max".into(), Value::Integer(4));
            tel.insert("buffer_max_bytes".into(), Value::Integer(buffer_max_bytes));
            let sensors: Vec<Value> = [
                ("temperature_c", "temp1_input"),
                ("humidity_pct", "humidity1_input"),
            ]
            .iter()
            .map(|(name, input)| {
                let mut s = Table::new();
                s.insert("name".into(), (*name).into());
                s.insert("kind".into(), "hwmon".into());
                s.insert("device".into(), "sht4x".into());
                s.insert("input".into(), (*input).into());
                Value::Table(s)
            })
            .collect();
            tel.insert("sensor".into(), Value::Array(sensors));
            t.insert("telemetry".into(), Value::Table(tel));
        })
        .start();
    (agent, keys)
}

/// This package's binary; `FERRY_TEST_AGENT_BIN` runs another build of it (useful when a
/// shared target directory may be rebuilt from another branch while the tests run).
fn agent_binary() -> AgentBinary {
    match std::env::var_os("FERRY_TEST_AGENT_BIN") {
        Some(path) => AgentBinary {
            path: path.into(),
            wrapper: Vec::new(),
        },
        None => AgentBinary::native(),
    }
}

/// How many samples the agent decided to report (published live or buffered), from its log.
fn reported(agent: &TestAgent) -> usize {
    let log = agent.log();
    log.matches("telemetry sample published").count()
        + log.matches("telemetry sample buffered").count()
}

/// Check what arrived against what the agent reported (`taken` samples, `dropped` of them
/// dropped from a full buffer): everything arrived, in order; nothing that went through the
/// buffer arrived twice. Returns the samples without the tolerated duplicate: a sample published
/// live in the very moment the connection was cut may be re-sent by the link (QoS 1 is
/// at-least-once) and arrive twice, as a single message, never as part of a batch.
fn check_delivery(watcher: &Watcher, taken: usize, dropped: u64, log: &str) -> Vec<Telemetry> {
    let mut unique: Vec<Telemetry> = Vec::new();
    let mut live_repeats = 0;
    for m in watcher.messages() {
        let (batch, items) = match m {
            TelemetryMessage::One(t) => (false, vec![*t]),
            TelemetryMessage::Batch(v) => (true, v),
        };
        for t in items {
            if let Some(last) = unique.last() {
                if *last == t && !batch {
                    live_repeats += 1;
                    continue;
                }
                assert!(
                    last.ts < t.ts,
                    "out of order or duplicated: {} then {} (batch: {batch})\n{log}",
                    last.ts,
                    t.ts
                );
            }
            unique.push(t);
        }
    }
    assert!(live_repeats <= 1, "{live_repeats} samples arrived twice");
    assert_eq!(
        unique.len() as u64 + dropped,
        taken as u64,
        "arrived + dropped != taken\n{log}"
    );
    unique
}

/// How many times the agent emptied its buffer (its first sample may be buffered before the
/// first connection, so one flush can happen at start-up).
fn flushes(agent: &TestAgent) -> usize {
    agent.log().matches("telemetry buffer flushed").count()
}

/// Wait until everything the agent reported has arrived (the buffer is empty on its side).
fn settle(agent: &TestAgent, watcher: &Watcher, flushes_before: usize) -> Vec<Telemetry> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let want = reported(agent);
        let got = watcher.samples();
        let flushed = flushes(agent) > flushes_before;
        if flushed && got.len() >= want {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{} samples arrived, the agent reported {want}\n{}",
            got.len(),
            agent.log()
        );
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn broker_outage_every_sample_arrives_in_order_once() {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port());
    let sysfs = fake_sysfs();
    let (mut agent, _keys) = agent("tel-outage", &broker, &proxy, sysfs.path(), 1 << 20);
    let watcher = Watcher::start(&broker, &agent.device);

    watcher.wait_samples(3, Duration::from_secs(90), &agent);
    proxy.cut();
    let cut_at = Instant::now();
    agent.wait_log("telemetry sample buffered", Duration::from_secs(60));
    thread::sleep(Duration::from_secs(6).saturating_sub(cut_at.elapsed()));
    let before = watcher.samples().len();
    let flushes_before = flushes(&agent);
    proxy.restore();

    settle(&agent, &watcher, flushes_before);
    agent.terminate();
    thread::sleep(Duration::from_millis(500));
    let samples = check_delivery(&watcher, reported(&agent), 0, &agent.log());
    // The outage's samples came as batches (JSON arrays) of at most batch_max.
    let batches = watcher.batches();
    let batched: usize = batches.iter().map(Vec::len).sum();
    assert!(batched >= 5, "only {batched} samples came in batches");
    assert!(batches.iter().all(|b| !b.is_empty() && b.len() <= 4));
    assert!(samples.len() > before);
    assert!(samples
        .iter()
        .all(|s| s.sensors["humidity_pct"] == 40.0 && s.dropped.is_none()));
}

#[test]
fn agent_restarted_while_offline_still_delivers_its_buffer() {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port());
    let sysfs = fake_sysfs();
    let (mut agent, _keys) = agent("tel-restart", &broker, &proxy, sysfs.path(), 1 << 20);
    let watcher = Watcher::start(&broker, &agent.device);

    watcher.wait_samples(2, Duration::from_secs(90), &agent);
    let buffered_before = agent.log().matches("telemetry sample buffered").count();
    proxy.cut();
    thread::sleep(Duration::from_secs(4));
    agent.terminate();
    let buffered_first_run =
        agent.log().matches("telemetry sample buffered").count() - buffered_before;
    assert!(buffered_first_run >= 2, "{}", agent.log());
    let buffer = agent.state_dir().join("telemetry/buffer.jsonl");
    let on_disk = std::fs::read_to_string(&buffer).unwrap().lines().count();
    assert_eq!(on_disk, buffered_first_run);

    // Timestamps have whole seconds: let the next run's first one fall in a new second.
    thread::sleep(Duration::from_millis(1100));
    agent.spawn();
    agent.wait_log(
        "telemetry buffered before the restart",
        Duration::from_secs(20),
    );
    thread::sleep(Duration::from_secs(3));
    let flushes_before = flushes(&agent);
    proxy.restore();

    settle(&agent, &watcher, flushes_before);
    agent.terminate();
    thread::sleep(Duration::from_millis(500));
    check_delivery(&watcher, reported(&agent), 0, &agent.log());
    assert_eq!(std::fs::read_to_string(&buffer).unwrap(), "");
}

#[test]
fn overflow_drops_the_oldest_and_reports_how_many() {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port());
    let sysfs = fake_sysfs();
    // The minimum cap holds about ten samples; the outage produces more.
    let (mut agent, _keys) = agent("tel-overflow", &broker, &proxy, sysfs.path(), 4096);
    let watcher = Watcher::start(&broker, &agent.device);

    watcher.wait_samples(2, Duration::from_secs(90), &agent);
    proxy.cut();
    agent.wait_log("telemetry buffer full", Duration::from_secs(60));
    thread::sleep(Duration::from_secs(2));
    let flushes = flushes(&agent);
    proxy.restore();

    let deadline = Instant::now() + Duration::from_secs(60);
    while self::flushes(&agent) == flushes {
        assert!(Instant::now() < deadline, "{}", agent.log());
        thread::sleep(Duration::from_millis(200));
    }
    agent.terminate();
    thread::sleep(Duration::from_millis(500));
    let samples = watcher.samples();
    let dropped: u64 = samples.iter().filter_map(|s| s.dropped).sum();
    assert!(
        dropped >= 1,
        "no drop count reported: {:?}\n{}",
        watcher
            .payloads()
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect::<Vec<_>>(),
        agent.log()
    );
    // Nothing is unaccounted for: what arrived plus what was reported dropped is what was taken.
    check_delivery(&watcher, reported(&agent), dropped, &agent.log());
    // The count rides on the first sample of the flush after the outage: the oldest survivor.
    let batch = watcher
        .batches()
        .into_iter()
        .find(|b| b.iter().any(|t| t.dropped.is_some()))
        .unwrap();
    assert_eq!(batch[0].dropped, Some(dropped));
    let state = agent.state_dir().join("telemetry/buffer.jsonl");
    assert_eq!(std::fs::read_to_string(state).unwrap(), "");
}

/// The link's confirmed publish (what the buffer flush relies on): it resolves `true` on the
/// broker's acknowledgement; when the connection dies first it resolves `false` and, unlike an
/// ordinary publish, is not re-sent by the link (the buffer still holds it and sends it again).
#[tokio::test]
async fn confirmed_publish_resolves_on_ack_and_is_not_carried_over() {
    use ferry_agent::mqtt::{MqttConfig, MqttLink};
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port());
    let device = "tel-confirm";
    let watcher = Watcher::start(&broker, device);
    let cfg = MqttConfig {
        url: proxy.url(),
        keepalive: Duration::from_secs(30),
        backoff_initial: Duration::from_millis(200),
        backoff_max: Duration::from_secs(1),
        ..MqttConfig::default()
    };
    let topics = ferry_protocol::topics::DeviceTopics::new("ferry", device).unwrap();
    let topic = topics.telemetry();
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (link, _inbound) = MqttLink::start(&cfg, device, topics, stop_rx).unwrap();
    let wait = Duration::from_secs(10);
    let connected = |want: bool| {
        let mut rx = link.connected();
        async move {
            tokio::time::timeout(wait, rx.wait_for(|c| *c == want))
                .await
                .expect("link state")
                .unwrap();
        }
    };
    connected(true).await;

    let one = link
        .publish_confirmed(topic.clone(), b"one".to_vec())
        .unwrap();
    assert!(tokio::time::timeout(wait, one.acked()).await.unwrap());

    // Nothing reaches the broker any more, and the link does not know yet.
    proxy.hold();
    let two = link
        .publish_confirmed(topic.clone(), b"two".to_vec())
        .unwrap();
    link.publish(topic.clone(), b"three".to_vec(), false, QoS::AtLeastOnce)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut();
    assert!(!tokio::time::timeout(wait, two.acked()).await.unwrap());
    connected(false).await;
    proxy.restore();
    connected(true).await;
    let deadline = Instant::now() + wait;
    while watcher.payloads().len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(watcher.payloads(), vec![b"one".to_vec(), b"three".to_vec()]);

    // And confirmations work on the new connection.
    let four = link.publish_confirmed(topic, b"four".to_vec()).unwrap();
    assert!(tokio::time::timeout(wait, four.acked()).await.unwrap());
    link.shutdown().await;
}

/// End to end: the agent reports what the running app serves (`kind = "http"` on the app's own
/// endpoint). Sample app 1.0 serves temperature only, so `humidity_pct` is reported missing with
/// the reason; after the signed update to 2.0, which serves humidity, it shows up in telemetry.
#[test]
fn humidity_shows_up_in_telemetry_after_the_update_to_2_0() {
    use common::release::fast_health;
    use common::{Phase, Rig, SLOW};
    use ferry_protocol::release::HealthSpec;
    use ferry_protocol::HealthCheck;

    let port = common::broker::free_port();
    let url = format!("http://127.0.0.1:{port}/");
    let rig = Rig::builder("tel-e2e")
        .agent(move |b| {
            b.binary(agent_binary()).config(move |t| {
                t["policy"]
                    .as_table_mut()
                    .unwrap()
                    .insert("allow_host_network".into(), Value::Boolean(true));
                let mut tel = Table::new();
                tel.insert("sample".into(), "1s".into());
                tel.insert("max_interval".into(), "30s".into());
                let sensors: Vec<Value> = ["temperature_c", "humidity_pct"]
                    .iter()
                    .map(|field| {
                        let mut s = Table::new();
                        s.insert("name".into(), (*field).into());
                        s.insert("kind".into(), "http".into());
                        s.insert("url".into(), url.clone().into());
                        s.insert("field".into(), (*field).into());
                        Value::Table(s)
                    })
                    .collect();
                tel.insert("sensor".into(), Value::Array(sensors));
                t.insert("telemetry".into(), Value::Table(tel));
            })
        })
        .start();
    let watcher = Watcher::start(&rig.broker, &rig.device);
    // Host networking on a port of its own; the image's HEALTHCHECK judges the process.
    let _ = fast_health;
    let health = HealthSpec {
        check: Some(HealthCheck::Docker {}),
        grace_s: Some(0),
        interval_s: Some(1),
        timeout_s: Some(2),
        successes: Some(1),
        max_failures: Some(3),
        deadline_s: Some(120),
    };
    let install = |seq: u64, version: &str| {
        let rel = rig
            .release(version)
            .env("PORT", &port.to_string())
            .health(health.clone())
            .edit(|r| r.container.network_mode = Some("host".into()))
            .signed(&rig.keys);
        rig.publish(&rig.desired(seq).app("sensor", rel).signed(&rig.keys));
        let ev = rig.observer.wait_terminal(seq, SLOW);
        assert_eq!(
            ev.phase,
            Phase::Committed,
            "{version}: {}",
            rig.observer.describe_events()
        );
    };
    let wait_sample = |what: &str, pred: &dyn Fn(&Telemetry) -> bool| -> Telemetry {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(t) = watcher.samples().into_iter().find(|t| pred(t)) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "no telemetry sample {what}: {:?}\n{}",
                watcher.samples().last(),
                rig.agent.log()
            );
            thread::sleep(Duration::from_millis(200));
        }
    };

    install(1, "1.0.0");
    let v1 = wait_sample("from 1.0 (temperature, no humidity)", &|t| {
        t.sensors.get("temperature_c") == Some(&23.25)
            && t.missing
                .get("humidity_pct")
                .is_some_and(|r| r.contains("serves no \"humidity_pct\""))
    });
    assert!(!v1.sensors.contains_key("humidity_pct"));
    let before_update = watcher.samples().len();

    install(2, "2.0.0");
    let v2 = wait_sample("with humidity from 2.0", &|t| {
        t.sensors.get("humidity_pct") == Some(&41.5)
    });
    assert_eq!(v2.sensors["temperature_c"], 23.25);
    assert!(v2.missing.is_empty(), "{:?}", v2.missing);
    // Humidity was never reported while 1.0 ran.
    assert!(watcher.samples()[..before_update]
        .iter()
        .all(|t| !t.sensors.contains_key("humidity_pct")));
}
