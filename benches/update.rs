//! Update benchmarks, measured side by side in one run on the same two sample images (sensor
//! 1.0.0 → 2.0.0, arm64 under qemu), against the real dockerd, registry and mosquitto:
//!
//! - service downtime during an update: a probe requests the app every 10 ms; the longest
//!   failed window for Ferry `stop-first`, Ferry `start-first`, and `docker-compose up -d`
//!   recreating the same service (the peer);
//! - rollback time: from the agent's unhealthy verdict (the `rolling_back` event's timestamp) to
//!   the old version answering again;
//! - agent overhead: notice received → committed, minus pull time and health-gate time (the agent
//!   logs each part);
//! - footprint: stripped armv7 binary size and the agent's idle RSS after updates.
//!
//! Run: `cargo bench --bench update` (after `scripts/env-up.sh` and `images/build.sh`), or
//! `benches/run.sh`, which does both. Results: stdout and `target/bench-update.json`.
//! Machines are shared and noisy: compare the rows of one run with each other.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use ferry_protocol::release::HealthSpec;
use ferry_protocol::HealthCheck;

const PORT: u16 = 18931;
const PROBE_EVERY: Duration = Duration::from_millis(10);

#[derive(Clone, Debug)]
struct Sample {
    at: SystemTime,
    version: Option<String>,
}

/// Requests `GET /` every 10 ms on 127.0.0.1:PORT, records which version answered (None = failed).
struct Probe {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn get_version(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    if !buf.starts_with("HTTP/1.1 200") && !buf.starts_with("HTTP/1.0 200") {
        return None;
    }
    let i = buf.find("\"version\":\"")? + 11;
    Some(buf[i..].split('"').next()?.to_string())
}

impl Probe {
    fn start() -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s2, v2) = (stop.clone(), samples.clone());
        let addr: SocketAddr = ([127, 0, 0, 1], PORT).into();
        let thread = std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let version = get_version(addr);
                v2.lock().unwrap().push(Sample {
                    at: SystemTime::now(),
                    version,
                });
                std::thread::sleep(PROBE_EVERY.saturating_sub(t0.elapsed()));
            }
        });
        Probe {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.samples.lock().unwrap().clone()
    }
}

/// (longest failed window, failed requests, total requests)
fn downtime(samples: &[Sample]) -> (Duration, usize, usize) {
    let mut longest = Duration::ZERO;
    let mut start: Option<SystemTime> = None;
    let mut last_ok: Option<SystemTime> = None;
    let mut failed = 0;
    for s in samples {
        match (&s.version, start) {
            (None, None) => {
                failed += 1;
                start = Some(last_ok.unwrap_or(s.at));
            }
            (None, Some(_)) => failed += 1,
            (Some(_), Some(st)) => {
                longest = longest.max(s.at.duration_since(st).unwrap_or_default());
                start = None;
                last_ok = Some(s.at);
            }
            (Some(_), None) => last_ok = Some(s.at),
        }
    }
    (longest, failed, samples.len())
}

fn wait_answering(version: &str, timeout: Duration) {
    let addr: SocketAddr = ([127, 0, 0, 1], PORT).into();
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if get_version(addr).as_deref() == Some(version) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{version} never answered on port {PORT}");
}

fn health() -> HealthSpec {
    // The image's own HEALTHCHECK probes its private health port, so it judges the right
    // process even while two versions share the host port (start-first).
    HealthSpec {
        check: Some(HealthCheck::Docker {}),
        grace_s: Some(0),
        interval_s: Some(1),
        timeout_s: Some(2),
        successes: Some(1),
        max_failures: Some(3),
        deadline_s: Some(120),
    }
}

fn notice(rig: &Rig, seq: u64, version: &str, start_first: bool) -> Vec<u8> {
    let rel = rig
        .release(version)
        .env("PORT", &PORT.to_string())
        .health(health())
        .edit(|r| r.container.network_mode = Some("host".into()))
        .signed(&rig.keys);
    let mut d = rig.desired(seq).app("sensor", rel).allow_downgrade(true);
    if start_first {
        d = d.start_first();
    }
    d.signed(&rig.keys)
}

fn ferry_update(
    rig: &Rig,
    seq: &mut u64,
    from: &str,
    to: &str,
    start_first: bool,
) -> (Duration, usize, usize) {
    *seq += 1;
    rig.publish(&notice(rig, *seq, from, false));
    assert_eq!(
        rig.observer.wait_terminal(*seq, SLOW).phase,
        Phase::Committed
    );
    wait_answering(from, Duration::from_secs(60));
    let probe = Probe::start();
    std::thread::sleep(Duration::from_millis(500));
    *seq += 1;
    rig.publish(&notice(rig, *seq, to, start_first));
    let ev = rig.observer.wait_terminal(*seq, SLOW);
    assert_eq!(
        ev.phase,
        Phase::Committed,
        "{}",
        rig.observer.describe_events()
    );
    wait_answering(to, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    downtime(&probe.finish())
}

fn compose_update(device: &str, from: &str, to: &str) -> (Duration, usize, usize) {
    let dir = tempfile::tempdir().unwrap();
    let sensors = format!("/var/lib/ferry-apps/{device}/sensors");
    let write = |version: &str| {
        let reference = infra::reference(version, infra::ARM64);
        let yml = format!(
            "version: \"2.4\"\nservices:\n  sensor:\n    image: {reference}\n    platform: linux/arm64\n    network_mode: host\n    environment:\n      PORT: \"{PORT}\"\n    volumes:\n      - {sensors}:/sensors:ro\n    restart: unless-stopped\n"
        );
        std::fs::write(dir.path().join("docker-compose.yml"), yml).unwrap();
        let ok = Command::new("docker")
            .args(["pull", "--platform", "linux/arm64", &reference])
            .output()
            .unwrap()
            .status
            .success();
        assert!(ok, "docker pull {reference}");
    };
    let up = || {
        let out = Command::new("docker-compose")
            .args(["-p", "ferrybench", "up", "-d"])
            .current_dir(dir.path())
            .output()
            .expect("docker-compose (Debian package docker-compose)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    write(from);
    up();
    wait_answering(from, Duration::from_secs(60));
    write(to);
    let probe = Probe::start();
    std::thread::sleep(Duration::from_millis(500));
    up();
    wait_answering(to, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    let r = downtime(&probe.finish());
    let _ = Command::new("docker-compose")
        .args(["-p", "ferrybench", "down"])
        .current_dir(dir.path())
        .output();
    r
}

fn rollback_time(rig: &Rig, seq: &mut u64) -> Duration {
    let probe = Probe::start();
    *seq += 1;
    rig.publish(&notice(rig, *seq, "3.0.0", false));
    let rb = rig.observer.wait_event_for(*seq, Phase::RollingBack, SLOW);
    let done = rig.observer.wait_terminal(*seq, SLOW);
    assert_eq!(done.phase, Phase::RolledBack);
    wait_answering("2.0.0", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(200));
    let samples = probe.finish();
    let verdict: SystemTime = rb.ts.into();
    let back = samples
        .iter()
        .find(|s| s.at > verdict && s.version.as_deref() == Some("2.0.0"))
        .expect("2.0.0 answered after the rollback")
        .at;
    back.duration_since(verdict).unwrap_or_default()
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn overheads(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("update committed"))
        .filter_map(|l| {
            let i = l.find("overhead_ms=")? + 12;
            l[i..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("update: benchmark");
        return;
    }
    let rounds: usize = std::env::var("FERRY_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let rig = Rig::builder("bench")
        .agent(|b| {
            b.config(|t| {
                let policy = t
                    .entry("policy")
                    .or_insert(toml::Value::Table(Default::default()));
                policy
                    .as_table_mut()
                    .unwrap()
                    .insert("allow_host_network".into(), toml::Value::Boolean(true));
                let log = t
                    .entry("log")
                    .or_insert(toml::Value::Table(Default::default()));
                log.as_table_mut()
                    .unwrap()
                    .insert("level".into(), toml::Value::String("info".into()));
            })
        })
        .start();
    let mut seq = 0u64;
    let mut rows = Vec::new();
    let mut stop_first = Vec::new();
    let mut start_first = Vec::new();
    let mut compose = Vec::new();
    for round in 0..rounds {
        eprintln!("round {}/{rounds}: ferry stop-first", round + 1);
        stop_first.push(ferry_update(&rig, &mut seq, "1.0.0", "2.0.0", false));
        eprintln!("round {}/{rounds}: ferry start-first", round + 1);
        start_first.push(ferry_update(&rig, &mut seq, "1.0.0", "2.0.0", true));
        // Free the port for the peer, then give it back.
        seq += 1;
        rig.publish(&rig.desired(seq).signed(&rig.keys));
        assert_eq!(
            rig.observer.wait_terminal(seq, SLOW).phase,
            Phase::Committed
        );
        eprintln!("round {}/{rounds}: docker-compose up -d", round + 1);
        compose.push(compose_update(&rig.device, "1.0.0", "2.0.0"));
    }
    // Rollbacks from 2.0.0 (stop-first: the old container has to come back).
    seq += 1;
    rig.publish(&notice(&rig, seq, "2.0.0", false));
    assert_eq!(
        rig.observer.wait_terminal(seq, SLOW).phase,
        Phase::Committed
    );
    let mut rollbacks = Vec::new();
    for round in 0..rounds {
        eprintln!("round {}/{rounds}: rollback", round + 1);
        rollbacks.push(rollback_time(&rig, &mut seq));
    }
    std::thread::sleep(Duration::from_secs(3));
    let rss = rig.agent.pid().map(rss_kib).unwrap_or(0);
    let over = overheads(&rig.agent.log());
    let armv7 = common::agent::cross_binary("armv7-unknown-linux-gnueabihf");
    let armv7_size = std::fs::metadata(&armv7).map(|m| m.len()).unwrap_or(0);

    let worst = |v: &[(Duration, usize, usize)]| v.iter().map(|r| r.0).max().unwrap_or_default();
    let failed = |v: &[(Duration, usize, usize)]| v.iter().map(|r| r.1).sum::<usize>();
    let total = |v: &[(Duration, usize, usize)]| v.iter().map(|r| r.2).sum::<usize>();
    for (name, v) in [
        ("ferry stop-first", &stop_first),
        ("ferry start-first", &start_first),
        ("docker-compose up -d", &compose),
    ] {
        let windows: Vec<String> = v.iter().map(|r| format!("{}", ms(r.0))).collect();
        rows.push(format!(
            "| downtime, {name} | longest failed window {} ms (rounds: {}) | {}/{} requests failed |",
            ms(worst(v)),
            windows.join(", "),
            failed(v),
            total(v)
        ));
    }
    let rb: Vec<String> = rollbacks.iter().map(|d| ms(*d).to_string()).collect();
    rows.push(format!(
        "| rollback time (unhealthy verdict → old version answering) | median {} ms | rounds: {} |",
        median(rollbacks.iter().map(|d| ms(*d) as u64).collect()),
        rb.join(", ")
    ));
    rows.push(format!(
        "| agent overhead (received → committed − pull − gate) | median {} ms | samples: {:?} |",
        median(over.clone()),
        over
    ));
    rows.push(format!(
        "| armv7 binary (stripped, release) | {:.2} MB | {} |",
        armv7_size as f64 / 1e6,
        armv7.display()
    ));
    rows.push(format!(
        "| agent idle RSS after {} updates (x86_64 release build) | {:.1} MB | |",
        seq,
        rss as f64 / 1024.0
    ));
    println!("\n| measure | result | detail |\n| --- | --- | --- |");
    for r in &rows {
        println!("{r}");
    }
    let json = serde_json::json!({
        "downtime_ms": {
            "ferry_stop_first": stop_first.iter().map(|r| ms(r.0) as u64).collect::<Vec<_>>(),
            "ferry_start_first": start_first.iter().map(|r| ms(r.0) as u64).collect::<Vec<_>>(),
            "docker_compose": compose.iter().map(|r| ms(r.0) as u64).collect::<Vec<_>>(),
        },
        "failed_requests": {
            "ferry_stop_first": failed(&stop_first), "ferry_start_first": failed(&start_first), "docker_compose": failed(&compose),
        },
        "rollback_ms": rollbacks.iter().map(|d| ms(*d) as u64).collect::<Vec<_>>(),
        "overhead_ms": over,
        "armv7_binary_bytes": armv7_size,
        "idle_rss_kib": rss,
    });
    let _ = std::fs::create_dir_all("target");
    std::fs::write(
        "target/bench-update.json",
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
}
