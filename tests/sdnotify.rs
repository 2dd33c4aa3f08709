//! The agent speaks systemd's notify protocol on a real notify socket: READY=1 once connected to
//! the broker, WATCHDOG=1 pings from its main loop at half the watchdog interval, STOPPING=1 on
//! SIGTERM. And a configuration error exits with 78 (EX_CONFIG), which the unit's
//! RestartPreventExitStatus keeps systemd from restarting into.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn recv_until(sock: &UnixDatagram, want: &str, timeout: Duration) -> Vec<String> {
    let t0 = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < timeout {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let hit = msg.lines().any(|l| l == want);
            seen.push(msg);
            if hit {
                return seen;
            }
        }
    }
    panic!("no {want} within {timeout:?}; got {seen:?}");
}

#[test]
fn ready_watchdog_and_stopping_on_a_real_notify_socket() {
    infra::require_infra();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let rig = Rig::builder("sdnotify")
        .agent(move |b| {
            b.env("NOTIFY_SOCKET", path.to_str().unwrap())
                .env("WATCHDOG_USEC", "1000000")
        })
        .start();
    let before_ready = Instant::now();
    recv_until(&sock, "READY=1", Duration::from_secs(30));
    rig.observer.wait_online("1", Duration::from_secs(10));
    // Half the 1 s watchdog interval: several pings in two seconds.
    let t0 = Instant::now();
    let mut pings = 0;
    let mut buf = [0u8; 4096];
    while t0.elapsed() < Duration::from_secs(2) {
        if let Ok(n) = sock.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "WATCHDOG=1")
            {
                pings += 1;
            }
        }
    }
    assert!(
        pings >= 3,
        "only {pings} watchdog pings in 2 s (interval 1 s)"
    );
    assert!(before_ready.elapsed() < Duration::from_secs(60));
    let mut rig = rig;
    let pid = rig.agent.pid().unwrap();
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    recv_until(&sock, "STOPPING=1", Duration::from_secs(10));
    let st = rig.agent.wait_exit(Duration::from_secs(30));
    assert_eq!(st.code(), Some(0), "clean stop exits 0");
}

#[test]
fn configuration_errors_exit_78_and_check_config_explains() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, "device_id = \"dev-1\"\nunknown_key = 1\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-agent"))
        .args(["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown_key"));
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-agent"))
        .args(["check-config", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-agent"))
        .args(["check-config", "--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config"));
    // A good one passes.
    let keys = TestKeys::new();
    let t = format!(
        "device_id = \"dev-1\"\n[trust]\nrelease_keys = [\"{}\"]\ncontroller_keys = [\"{}\"]\n",
        keys.release.public_pem.display(),
        keys.controller.public_pem.display()
    );
    std::fs::write(&cfg, t).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-agent"))
        .args(["check-config", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
