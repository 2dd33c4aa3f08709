//! The controller's web page in a real headless Chromium (Debian's `chromium`), against a real
//! `ferryctl serve` (in-process) fed by a real mosquitto: devices report state and telemetry
//! over MQTT, a rollout runs, and the rendered page must show the fleet with its latest
//! readings, the rollout's waves, and a device's charts. A screenshot is kept in
//! `target/web/fleet.png` for people.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use chrono::Utc;
use ferry_controller::server::{self, config};
use ferry_protocol::keys::PrivateKey;
use ferry_protocol::release::Release;
use ferry_protocol::report::{
    AppState, Phase, StateReport, SystemMetrics, Telemetry, UpdateStatus, Waiting,
};
use support::*;

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Run headless Chromium on `url`; `extra`: `--dump-dom` or `--screenshot=...`.
fn run_chromium(bin: &PathBuf, profile: &std::path::Path, url: &str, extra: &str) -> String {
    let out = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1400,1000",
            // let the page's fetches and rendering finish before the dump
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(extra)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn state(device: &str, version: &str, group: &str, platform: &str) -> String {
    serde_json::to_string(&StateReport {
        trust: None,
        device: device.into(),
        agent_version: "0.1.0".into(),
        platform: platform.into(),
        sequence: 1,
        apps: BTreeMap::from([(
            "sensor".to_string(),
            AppState {
                version: version.into(),
                digest: format!("sha256:{}", "c".repeat(64)),
                container: format!("ferry-{device}-sensor-s1"),
                health: "healthy".into(),
            },
        )]),
        update: None,
        ts: Utc::now(),
        labels: BTreeMap::from([("group".to_string(), group.to_string())]),
    })
    .unwrap()
}

fn telemetry(device: &str, ago_s: i64, temp: f64, humidity: Option<f64>) -> Telemetry {
    let mut sensors = BTreeMap::from([("temperature_c".to_string(), temp)]);
    if let Some(h) = humidity {
        sensors.insert("humidity_pct".into(), h);
    }
    Telemetry {
        device: device.into(),
        ts: Utc::now() - chrono::Duration::seconds(ago_s),
        sensors,
        system: SystemMetrics {
            cpu_pct: 7.5,
            mem_used_bytes: 90 << 20,
            mem_total_bytes: 512 << 20,
            disk_free_bytes: 3 << 30,
            uptime_s: 3600,
            extra: Default::default(),
        },
        missing: Default::default(),
        dropped: None,
    }
}

#[test]
fn the_fleet_page_shows_devices_readings_rollouts_and_charts() {
    let Some(bin) = chromium() else {
        skip("chromium is not installed (apt-get install chromium; scripts/env-up.sh does)");
        return;
    };
    let Some(broker) = Mosquitto::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ck = PrivateKey::from_seed([7; 32]).unwrap();
    let rk = PrivateKey::from_seed([8; 32]).unwrap();
    std::fs::write(dir.path().join("controller.key"), ck.to_pem()).unwrap();
    std::fs::write(dir.path().join("release.pub"), rk.public().to_pem()).unwrap();
    let token = "web-test-token-0123456789";
    std::fs::write(dir.path().join("token"), token).unwrap();
    std::fs::write(
        dir.path().join("controller.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\napi_token_file = \"token\"\n\
             controller_key = \"controller.key\"\n[mqtt]\nurl = \"{}\"\n\
             [trust]\nrelease_keys = [\"release.pub\"]\n{}",
            broker.url(),
            enroll_section()
        ),
    )
    .unwrap();
    let loaded = config::load(&dir.path().join("controller.toml")).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(server::run(
        loaded,
        async {
            let _ = stop_rx.await;
        },
        Some(bound_tx),
    ));
    let addr = rt.block_on(bound_rx).expect("server bound").http;

    // Two devices report over MQTT; one has humidity (sensor 2.0.0).
    for (d, v, g, p) in [
        ("web-a", "2.0.0", "beta", "linux/arm64"),
        ("web-b", "1.0.0", "prod", "linux/arm/v7"),
    ] {
        broker.publish_signed(&format!("ferry/v1/devices/{d}/online"), "1", true);
        broker.publish_signed(
            &format!("ferry/v1/devices/{d}/state"),
            &state(d, v, g, p),
            true,
        );
    }
    // A release and a rollout, through the API.
    let env = Release {
        app: "sensor".into(),
        version: "3.0.0".parse().unwrap(),
        image: "127.0.0.1:5055/ferry/sensor".into(),
        platforms: BTreeMap::from([
            (
                "linux/arm64".to_string(),
                format!("sha256:{}", "a".repeat(64)),
            ),
            (
                "linux/arm/v7".to_string(),
                format!("sha256:{}", "b".repeat(64)),
            ),
        ]),
        container: Default::default(),
        health: Default::default(),
        created_at: Utc::now(),
    }
    .sign(&[&rk])
    .to_json();
    let base = format!("http://{addr}");
    let agent = ureq::Agent::new_with_defaults();
    let auth = format!("Bearer {token}");
    let post = |path: &str, body: String| {
        agent
            .post(format!("{base}/api/v1{path}"))
            .header("Authorization", &auth)
            .send(body)
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    };
    let devices = || -> serde_json::Value {
        let mut r = agent
            .get(format!("{base}/api/v1/devices"))
            .header("Authorization", &auth)
            .call()
            .unwrap();
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
    };
    let wait = |what: &str, ok: &dyn Fn(&serde_json::Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = devices();
            if ok(&v) {
                return;
            }
            if Instant::now() > deadline {
                let mut m = agent.get(format!("{base}/metrics")).call().unwrap();
                panic!("{what}: {v}\n{}", m.body_mut().read_to_string().unwrap());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // The retained states arrive once the controller has subscribed; telemetry is not
    // retained, so it is sent after that.
    wait("devices not ingested", &|v| {
        v.as_array().unwrap().len() == 2
    });
    // The fleet in pages, as a console of 100,000 devices asks for it.
    let get = |path: &str| -> (u16, serde_json::Value) {
        let mut r = agent
            .get(format!("{base}/api/v1{path}"))
            .header("Authorization", &auth)
            .config()
            .http_status_as_error(false)
            .build()
            .call()
            .unwrap();
        let status = r.status().as_u16();
        (
            status,
            serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap(),
        )
    };
    let (status, page) = get("/devices?limit=1");
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["total"], 2, "{page}");
    assert_eq!(page["devices"][0]["id"], "web-a", "{page}");
    assert_eq!(page["next"], "web-a", "{page}");
    let (_, page) = get("/devices?limit=1&after=web-a");
    assert_eq!(page["devices"][0]["id"], "web-b", "{page}");
    assert!(page["next"].is_null(), "{page}");
    let (status, e) = get("/devices?after=web-a");
    assert_eq!(status, 400, "{e}");
    let (status, e) = get("/devices?limit=5000");
    assert_eq!(status, 400, "{e}");
    let batch: Vec<Telemetry> = (0..12)
        .map(|i| {
            telemetry(
                "web-a",
                600 - i * 50,
                21.0 + i as f64 * 0.25,
                Some(40.0 + i as f64),
            )
        })
        .collect();
    broker.publish_signed(
        "ferry/v1/devices/web-a/telemetry",
        &serde_json::to_string(&batch).unwrap(),
        false,
    );
    broker.publish_signed(
        "ferry/v1/devices/web-b/telemetry",
        &serde_json::to_string(&telemetry("web-b", 5, 19.5, None)).unwrap(),
        false,
    );

    wait("telemetry not ingested", &|v| {
        v.as_array()
            .unwrap()
            .iter()
            .all(|d| !d["telemetry"].is_null())
    });
    post("/releases", env);
    post(
        "/rollouts",
        serde_json::json!({"app": "sensor", "version": "3.0.0", "select": "all",
                           "waves": "1,100%", "soak": "30s", "max_failures": "0"})
        .to_string(),
    );
    // web-a (wave 1) was sent sequence 2; it has downloaded it and waits for its maintenance
    // window (the retained state's update).
    let window = "maintenance window 02:00-04:00 opens in 3 h";
    let mut held: StateReport =
        serde_json::from_str(&state("web-a", "2.0.0", "beta", "linux/arm64")).unwrap();
    held.update = Some(UpdateStatus {
        sequence: 2,
        rollout: Some("r-1".into()),
        phase: Phase::Downloaded,
        error: None,
        at: Utc::now(),
        waiting: Some(Waiting::Window),
        reason: Some(window.into()),
    });
    broker.publish_signed(
        "ferry/v1/devices/web-a/state",
        &serde_json::to_string(&held).unwrap(),
        true,
    );
    wait("the wait not ingested", &|v| {
        v.as_array()
            .unwrap()
            .iter()
            .any(|d| d["update"]["waiting"] == "window")
    });

    let profile = tempfile::tempdir().unwrap();
    let url = format!("{base}/#token={token}&device=web-a");
    let dom = run_chromium(&bin, profile.path(), &url, "--dump-dom");

    // The fleet: both devices, platform, versions, health, online, the latest readings.
    assert!(dom.contains("data-device=\"web-a\""), "{dom}");
    assert!(dom.contains("data-device=\"web-b\""));
    assert!(dom.contains("linux/arm/v7"));
    assert!(dom.contains("sensor 2.0.0") && dom.contains("sensor 1.0.0"));
    assert!(dom.contains(">healthy<") && dom.contains(">online<"));
    assert!(
        dom.contains("<td class=\"temperature\">23.8°C</td>"),
        "latest temperature of web-a"
    );
    assert!(
        dom.contains("<td class=\"humidity\">51.0%</td>"),
        "latest humidity of web-a"
    );
    assert!(
        dom.contains("<td class=\"temperature\">19.5°C</td>"),
        "web-b's temperature"
    );
    assert!(
        dom.contains("<td class=\"humidity\">–</td>"),
        "web-b has no humidity"
    );
    // The rollout with its waves.
    assert!(dom.contains("data-rollout=\"r-1\""));
    assert!(dom.contains("data-wave=\"1\"") && dom.contains("data-wave=\"2\""));
    assert!(dom.contains("(not started)"), "wave 2 waits for wave 1");
    // What web-a waits for: in the fleet and in its wave, with the reason.
    assert!(
        dom.contains(&format!(
            "downloaded (seq 2)<span class=\"waiting\">, waiting: window ({window})</span>"
        )),
        "{dom}"
    );
    assert!(
        dom.contains("<span class=\"waiting\">1 held</span>"),
        "{dom}"
    );
    assert!(
        dom.contains(&format!("1 × waiting: window ({window}): web-a")),
        "{dom}"
    );
    // The selected device's charts, one point per sample.
    assert!(
        dom.contains("data-metric=\"temperature_c\" data-points=\"12\""),
        "{dom}"
    );
    assert!(dom.contains("data-metric=\"humidity_pct\" data-points=\"12\""));
    assert!(dom.contains("<polyline points="));
    assert!(
        dom.contains("id=\"status\">2 devices, 2 online"),
        "the page reported an error: {dom}"
    );

    // A wrong token: the page says so instead of showing data.
    let bad = run_chromium(
        &bin,
        profile.path(),
        &format!("{base}/#token=wrong-token-000000000"),
        "--dump-dom",
    );
    assert!(bad.contains("the API token was refused"), "{bad}");
    assert!(!bad.contains("data-device=\"web-a\""));

    // A screenshot for people.
    let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/web");
    std::fs::create_dir_all(&shots).unwrap();
    let png = shots.join("fleet.png");
    let _ = std::fs::remove_file(&png);
    run_chromium(
        &bin,
        profile.path(),
        &url,
        &format!("--screenshot={}", png.display()),
    );
    let bytes = std::fs::read(&png).expect("screenshot written");
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 20_000,
        "{} bytes",
        bytes.len()
    );

    let _ = stop_tx.send(());
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(15), server)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap()
    });
}
