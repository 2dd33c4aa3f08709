//! The controller's console in a real headless Chromium (Debian's `chromium`), against a real
//! `ferryctl serve` (in-process) fed by a real mosquitto: devices report state, events and
//! telemetry over MQTT. The rendered page must show the fleet with its latest readings, the
//! rollouts' waves and a device's charts; driven over the DevTools protocol
//! (`support/cdp.rs`), real clicks and typing start, pause, resume and abort a rollout and roll
//! an app back. Screenshots are kept in `target/web/` for people.

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
    AppState, Event, Phase, StateReport, SystemMetrics, Telemetry, UpdateStatus, Waiting,
};
use support::cdp::Browser;
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

/// A real `ferryctl serve` (in-process) on a private mosquitto, with the API at hand.
struct Web {
    broker: Mosquitto,
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<Result<(), server::ServeError>>>,
    base: String,
    agent: ureq::Agent,
    release_key: PrivateKey,
    _dir: tempfile::TempDir,
}

const TOKEN: &str = "web-test-token-0123456789";

impl Web {
    fn start() -> Option<Web> {
        let broker = Mosquitto::start()?;
        let dir = tempfile::tempdir().unwrap();
        let ck = PrivateKey::from_seed([7; 32]).unwrap();
        let rk = PrivateKey::from_seed([8; 32]).unwrap();
        std::fs::write(dir.path().join("controller.key"), ck.to_pem()).unwrap();
        std::fs::write(dir.path().join("release.pub"), rk.public().to_pem()).unwrap();
        std::fs::write(dir.path().join("token"), TOKEN).unwrap();
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
        Some(Web {
            broker,
            rt,
            stop: Some(stop_tx),
            server: Some(server),
            base: format!("http://{addr}"),
            agent: ureq::Agent::new_with_defaults(),
            release_key: rk,
            _dir: dir,
        })
    }

    fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let mut r = self
            .agent
            .get(format!("{}/api/v1{path}", self.base))
            .header("Authorization", format!("Bearer {TOKEN}"))
            .config()
            .http_status_as_error(false)
            .build()
            .call()
            .unwrap();
        let status = r.status().as_u16();
        let body = r.body_mut().read_to_string().unwrap();
        (status, serde_json::from_str(&body).unwrap_or_default())
    }

    fn post(&self, path: &str, body: String) -> serde_json::Value {
        let mut r = self
            .agent
            .post(format!("{}/api/v1{path}", self.base))
            .header("Authorization", format!("Bearer {TOKEN}"))
            .send(body)
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
    }

    /// Poll `GET path` until `ok` holds (20 s).
    fn wait(
        &self,
        what: &str,
        path: &str,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, v) = self.get(path);
            if ok(&v) {
                return v;
            }
            if Instant::now() > deadline {
                let mut m = self
                    .agent
                    .get(format!("{}/metrics", self.base))
                    .call()
                    .unwrap();
                panic!("{what}: {v}\n{}", m.body_mut().read_to_string().unwrap());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Catalogue `sensor VERSION` (signed by the release key).
    fn push_release(&self, version: &str) {
        let env = Release {
            app: "sensor".into(),
            version: version.parse().unwrap(),
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
        .sign(&[&self.release_key])
        .to_json();
        self.post("/releases", env);
    }

    /// The device comes online and reports its state (retained, as agents do).
    fn report(&self, device: &str, version: &str, group: &str, platform: &str) {
        self.broker
            .publish_signed(&format!("ferry/v1/devices/{device}/online"), "1", true);
        self.broker.publish_signed(
            &format!("ferry/v1/devices/{device}/state"),
            &state(device, version, group, platform),
            true,
        );
    }

    fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let server = self.server.take().unwrap();
        self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(15), server)
                .await
                .expect("server stops")
                .unwrap()
                .unwrap()
        });
    }
}

fn shots_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/web");
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn the_fleet_page_shows_devices_readings_rollouts_and_charts() {
    let Some(bin) = chromium() else {
        skip("chromium is not installed (apt-get install chromium; scripts/env-up.sh does)");
        return;
    };
    let Some(web) = Web::start() else {
        return;
    };
    // Two devices report over MQTT; one has humidity (sensor 2.0.0).
    web.report("web-a", "2.0.0", "beta", "linux/arm64");
    web.report("web-b", "1.0.0", "prod", "linux/arm/v7");
    // The retained states arrive once the controller has subscribed; telemetry is not
    // retained, so it is sent after that.
    web.wait("devices not ingested", "/devices", |v| {
        v.as_array().unwrap().len() == 2
    });
    // The fleet in pages, as a console of 100,000 devices asks for it.
    let (status, page) = web.get("/devices?limit=1");
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["total"], 2, "{page}");
    assert_eq!(page["devices"][0]["id"], "web-a", "{page}");
    assert_eq!(page["next"], "web-a", "{page}");
    let (_, page) = web.get("/devices?limit=1&after=web-a");
    assert_eq!(page["devices"][0]["id"], "web-b", "{page}");
    assert!(page["next"].is_null(), "{page}");
    let (status, e) = web.get("/devices?after=web-a");
    assert_eq!(status, 400, "{e}");
    let (status, e) = web.get("/devices?limit=5000");
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
    web.broker.publish_signed(
        "ferry/v1/devices/web-a/telemetry",
        &serde_json::to_string(&batch).unwrap(),
        false,
    );
    web.broker.publish_signed(
        "ferry/v1/devices/web-b/telemetry",
        &serde_json::to_string(&telemetry("web-b", 5, 19.5, None)).unwrap(),
        false,
    );
    web.wait("telemetry not ingested", "/devices", |v| {
        v.as_array()
            .unwrap()
            .iter()
            .all(|d| !d["telemetry"].is_null())
    });
    web.push_release("3.0.0");
    web.post(
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
    web.broker.publish_signed(
        "ferry/v1/devices/web-a/state",
        &serde_json::to_string(&held).unwrap(),
        true,
    );
    web.wait("the wait not ingested", "/devices", |v| {
        v.as_array()
            .unwrap()
            .iter()
            .any(|d| d["update"]["waiting"] == "window")
    });

    let profile = tempfile::tempdir().unwrap();
    let base = &web.base;
    let dom = run_chromium(
        &bin,
        profile.path(),
        &format!("{base}/#token={TOKEN}"),
        "--dump-dom",
    );

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
        dom.contains("<td class=\"humidity narrow-hide\">51.0%</td>"),
        "latest humidity of web-a"
    );
    assert!(
        dom.contains("<td class=\"temperature\">19.5°C</td>"),
        "web-b's temperature"
    );
    assert!(
        dom.contains("<td class=\"humidity narrow-hide\">–</td>"),
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
    assert!(
        dom.contains("id=\"status\">2 devices · updated"),
        "the page reported an error: {dom}"
    );

    // The first page's old link (`#token=…&device=…`) opens the device's page with its
    // charts, one point per sample.
    let dom = run_chromium(
        &bin,
        profile.path(),
        &format!("{base}/#token={TOKEN}&device=web-a"),
        "--dump-dom",
    );
    assert!(
        dom.contains("data-metric=\"temperature_c\" data-points=\"12\""),
        "{dom}"
    );
    assert!(dom.contains("data-metric=\"humidity_pct\" data-points=\"12\""));
    assert!(dom.contains("<polyline points="));

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
    let png = shots_dir().join("fleet.png");
    let _ = std::fs::remove_file(&png);
    run_chromium(
        &bin,
        profile.path(),
        &format!("{base}/#token={TOKEN}"),
        &format!("--screenshot={}", png.display()),
    );
    let bytes = std::fs::read(&png).expect("screenshot written");
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 20_000,
        "{} bytes",
        bytes.len()
    );
    web.stop();
}

/// The API's reads carry ETags: the same read again is a 304 without a body, a change is a
/// 200 with a new tag. The console polls this way.
#[test]
fn api_reads_answer_304_while_nothing_changed() {
    let Some(web) = Web::start() else {
        return;
    };
    web.report("tag-a", "1.0.0", "beta", "linux/arm64");
    web.wait("device not ingested", "/devices", |v| {
        v.as_array().unwrap().len() == 1
    });
    let call = |tag: Option<&str>| {
        let mut req = web
            .agent
            .get(format!("{}/api/v1/devices?limit=10", web.base))
            .header("Authorization", format!("Bearer {TOKEN}"));
        if let Some(t) = tag {
            req = req.header("If-None-Match", t);
        }
        let mut r = req
            .config()
            .http_status_as_error(false)
            .build()
            .call()
            .unwrap();
        let etag = r
            .headers()
            .get("etag")
            .map(|v| v.to_str().unwrap().to_string());
        let cache = r
            .headers()
            .get("cache-control")
            .map(|v| v.to_str().unwrap().to_string());
        (
            r.status().as_u16(),
            etag,
            cache,
            r.body_mut().read_to_string().unwrap(),
        )
    };
    let (status, tag, cache, body) = call(None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(cache.as_deref(), Some("no-store"));
    let tag = tag.expect("an ETag");
    let (status, again, _, body) = call(Some(&tag));
    assert_eq!((status, body.as_str()), (304, ""), "nothing changed");
    assert_eq!(again.as_deref(), Some(tag.as_str()));
    let (status, _, _, _) = call(Some("\"someone-elses\""));
    assert_eq!(status, 200, "another tag gets the body");
    // A change: a new body and a new tag.
    web.report("tag-b", "1.0.0", "prod", "linux/arm64");
    web.wait("second device not ingested", "/devices", |v| {
        v.as_array().unwrap().len() == 2
    });
    let (status, newer, _, body) = call(Some(&tag));
    assert_eq!(status, 200, "{body}");
    assert_ne!(newer.as_deref(), Some(tag.as_str()));
    assert!(body.contains("tag-b"));
    // Without the token: 401, never a 304 that would confirm a tag.
    let mut r = web
        .agent
        .get(format!("{}/api/v1/devices?limit=10", web.base))
        .header("If-None-Match", newer.unwrap())
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let _ = r.body_mut().read_to_string();
    web.stop();
}

/// The console that acts, really clicked and typed in headless Chromium: a paged and searched
/// fleet, a rollout started from the form with its preview, paused, resumed and aborted, a
/// device's page (apps, labels, events with reasons and logs, charts, the notice sent and
/// the one accepted), an app rolled back from it, live updates without a reload, and a
/// layout that holds from a phone to a wide screen. Screenshots in `target/web/`.
#[test]
fn the_console_starts_pauses_aborts_and_rolls_back_by_clicking() {
    let Some(bin) = chromium() else {
        skip("chromium is not installed (apt-get install chromium; scripts/env-up.sh does)");
        return;
    };
    let Some(web) = Web::start() else {
        return;
    };
    // con-a ran sensor 1.0.0 and then 2.0.0 (so 1.0.0 is what it ran before); con-b and
    // con-c run 1.0.0.
    web.report("con-a", "1.0.0", "beta", "linux/arm64");
    web.wait("con-a on 1.0.0", "/devices", |v| {
        v.as_array().unwrap().len() == 1
    });
    web.report("con-a", "2.0.0", "beta", "linux/arm64");
    web.report("con-b", "1.0.0", "beta", "linux/arm/v7");
    web.report("con-c", "1.0.0", "prod", "linux/arm64");
    web.wait("the fleet not ingested", "/devices", |v| {
        let v = v.as_array().unwrap();
        v.len() == 3 && v[0]["previous"]["sensor"] == "1.0.0"
    });
    for v in ["1.0.0", "2.0.0", "3.0.0"] {
        web.push_release(v);
    }
    // An update con-a rolled back, with the reason and the candidate's last log lines.
    let mut ev = Event::new("con-a", 1, None, Phase::RolledBack);
    ev.app = Some("sensor".into());
    ev.reason = Some("health gate: 3 failed checks (exit 1)".into());
    ev.logs = Some(vec![
        "sensor 2.1.0 starting".into(),
        "error: /dev/i2c-1: no such device".into(),
    ]);
    web.broker.publish_signed(
        "ferry/v1/devices/con-a/events",
        &serde_json::to_string(&ev).unwrap(),
        false,
    );
    let batch: Vec<Telemetry> = (0..8)
        .map(|i| telemetry("con-a", 400 - i * 50, 20.0 + i as f64 * 0.5, Some(45.0)))
        .collect();
    web.broker.publish_signed(
        "ferry/v1/devices/con-a/telemetry",
        &serde_json::to_string(&batch).unwrap(),
        false,
    );
    web.wait("the event not stored", "/devices/con-a", |d| {
        d["events"].as_array().is_some_and(|e| !e.is_empty()) && !d["telemetry"].is_null()
    });

    let mut b = Browser::launch(&bin, 1400, 1000);
    let long = Duration::from_secs(15);
    b.goto(&format!("{}/#token={TOKEN}", web.base));
    b.wait_for(
        "the fleet's three rows",
        "document.querySelectorAll('#fleet tr.device').length === 3",
        long,
    );
    let href = b.eval("location.href");
    assert!(
        !href.as_str().unwrap().contains(TOKEN),
        "the token stays out of the address bar: {href}"
    );

    // Paging: two rows a page, then the next page, then back.
    b.type_text("#page-size", "2");
    b.wait_for(
        "two rows a page",
        "document.querySelectorAll('#fleet tr.device').length === 2 && document.getElementById('page-info').innerText === '1–2 of 3'",
        long,
    );
    b.screenshot(&shots_dir().join("console-fleet-paged.png"));
    b.click("#page-next");
    b.wait_for(
        "the second page",
        "document.getElementById('page-info').innerText === '3–3 of 3' && !!document.querySelector('#fleet tr[data-device=\"con-c\"]')",
        long,
    );
    assert_eq!(
        b.eval("document.getElementById('page-next').disabled"),
        true
    );
    b.click("#page-prev");
    b.wait_for(
        "back on the first page",
        "document.getElementById('page-info').innerText === '1–2 of 3'",
        long,
    );
    b.type_text("#page-size", "50");

    // Search by selector, and a selector the server refuses.
    b.type_text("#search", "group=beta");
    b.press_enter();
    b.wait_for(
        "the beta devices only",
        "document.querySelectorAll('#fleet tr.device').length === 2 && !document.querySelector('#fleet tr[data-device=\"con-c\"]')",
        long,
    );
    assert_eq!(b.text("#fleet-count"), "(2 matching group=beta)");
    b.type_text("#search", "group=beta,(");
    b.press_enter();
    b.wait_for(
        "the selector's error",
        "document.getElementById('fleet-error').innerText.includes('expected a label key')",
        long,
    );
    b.type_text("#search", "");
    b.press_enter();
    b.wait_for(
        "the whole fleet again",
        "document.querySelectorAll('#fleet tr.device').length === 3",
        long,
    );

    // The rollout form: a release not catalogued is refused in the preview, then the waves.
    b.click("#nav-new");
    b.wait_for(
        "the form",
        "!document.getElementById('view-new').hidden && document.querySelectorAll('#release-list option').length === 3",
        long,
    );
    b.type_text("#f-release", "sensor 9.9.9");
    b.wait_for(
        "the preview's refusal",
        "(document.getElementById('preview-error') || {}).innerText?.includes('not in the catalogue')",
        long,
    );
    b.type_text("#f-release", "sensor 3.0.0");
    b.type_text("#f-select", "group=beta");
    b.type_text("#f-waves", "1,100%");
    b.type_text("#f-soak", "30s");
    b.type_text("#f-max-failures", "0");
    b.click("input[name=on-failure][value=pause]");
    b.click("input[name=strategy][value=start-first]");
    b.wait_for(
        "the preview of two waves of one device each",
        "document.querySelector('#preview-total')?.dataset.devices === '2' && document.querySelector('#preview li[data-wave=\"2\"]')?.dataset.new === '1' && document.querySelector('#preview li[data-wave=\"2\"]')?.dataset.target === '2'",
        long,
    );
    assert!(b.text("#preview").contains("wave 1: 1 device"));
    b.screenshot(&shots_dir().join("console-rollout-form.png"));
    b.click("#start-rollout");
    b.wait_for(
        "the new rollout, running, on the fleet page",
        "location.hash === '#/' && document.querySelector('.rollout[data-rollout=\"r-1\"]')?.dataset.state === 'running'",
        long,
    );
    let (_, r) = web.get("/rollouts/r-1?devices=false");
    assert_eq!(r["select"], "group=beta", "{r}");
    assert_eq!(r["waves"], "1,100%", "{r}");
    assert_eq!(r["strategy"], "start-first", "{r}");
    assert_eq!(r["targets"], serde_json::json!([1, 2]), "{r}");

    // Pause, resume, abort (which asks first).
    b.click("button[data-op=pause][data-rollout=r-1]");
    b.wait_for(
        "paused",
        "document.querySelector('.rollout[data-rollout=\"r-1\"]')?.dataset.state === 'paused'",
        long,
    );
    assert_eq!(web.get("/rollouts/r-1?devices=false").1["state"], "paused");
    b.click("button[data-op=resume][data-rollout=r-1]");
    b.wait_for(
        "running again",
        "document.querySelector('.rollout[data-rollout=\"r-1\"]')?.dataset.state === 'running'",
        long,
    );
    assert_eq!(web.get("/rollouts/r-1?devices=false").1["state"], "running");
    b.click("button[data-op=ask-abort][data-rollout=r-1]");
    assert_eq!(
        web.get("/rollouts/r-1?devices=false").1["state"],
        "running",
        "the first click only asks"
    );
    b.click("button[data-op=abort][data-rollout=r-1]");
    b.wait_for(
        "aborted",
        "document.querySelector('.rollout[data-rollout=\"r-1\"]')?.dataset.state === 'aborted'",
        long,
    );
    let (_, r) = web.get("/rollouts/r-1?devices=false");
    assert_eq!(r["state"], "aborted", "{r}");
    assert_eq!(r["reason"], "aborted by the operator", "{r}");

    // The device page of con-a, the device wave 1 was sent to.
    let (_, a) = web.get("/devices/con-a");
    let sent = a["desired_sequence"].as_u64().expect("con-a was notified");
    b.click("#fleet tr[data-device=\"con-a\"] td.apps");
    b.wait_for(
        "con-a's page",
        "location.hash === '#/device/con-a' && document.querySelectorAll('#dev-events tr.event').length > 0 && document.querySelectorAll('#charts svg').length > 0",
        long,
    );
    let facts = b.text("#dev-facts");
    assert!(
        facts.contains("linux/arm64") && facts.contains("group=beta"),
        "{facts}"
    );
    assert!(b.text("#dev-apps").contains("Roll back to 1.0.0"));
    assert_eq!(
        b.text("#notice-sent"),
        format!("Sent: sequence {sent} — sensor 3.0.0")
    );
    assert_eq!(
        b.text("#notice-accepted"),
        "Accepted: sequence 1 — running sensor 2.0.0"
    );
    let event = b.text("#dev-events tr.event[data-phase=rolled_back]");
    assert!(
        event.contains("health gate: 3 failed checks (exit 1)"),
        "{event}"
    );
    assert!(
        !event.contains("no such device"),
        "the logs start folded: {event}"
    );
    b.click("#dev-events tr.event[data-phase=rolled_back] summary");
    b.wait_for(
        "the unfolded log lines",
        "document.querySelector('#dev-events tr.event[data-phase=rolled_back] pre')?.offsetHeight > 0",
        long,
    );
    assert!(b
        .text("#dev-events tr.event[data-phase=rolled_back] pre")
        .contains("error: /dev/i2c-1: no such device"));
    assert_eq!(
        b.eval("document.querySelector('#charts svg[data-metric=temperature_c]').dataset.points"),
        "8"
    );
    b.screenshot(&shots_dir().join("console-device.png"));

    // Roll sensor back on con-a from its page.
    b.click("#dev-apps a.rollback-link");
    b.wait_for(
        "the roll-back form, filled in",
        "!document.getElementById('view-rollback').hidden && document.getElementById('rb-app').value === 'sensor' && document.getElementById('rb-select').value === 'id in (con-a)'",
        long,
    );
    b.click("#rollback-go");
    let row = b.wait_for(
        "the roll-back's result",
        "document.querySelector('#rollback-table tr[data-device=\"con-a\"]')?.innerText",
        long,
    );
    let row = row.as_str().unwrap();
    assert!(
        row.contains("2.0.0") && row.contains("1.0.0") && row.contains("sent, sequence"),
        "{row}"
    );
    let (_, a) = web.get("/devices/con-a");
    assert_eq!(a["desired_apps"]["sensor"], "1.0.0", "{a}");
    assert!(a["desired_sequence"].as_u64().unwrap() > sent, "{a}");

    // Live: on the fleet page, polls of an unchanged fleet are 304s and redraw nothing; a
    // device's new state shows without a reload.
    b.click("#nav-fleet");
    b.wait_for(
        "the fleet page",
        "!document.getElementById('view-fleet').hidden && document.querySelectorAll('#fleet tr.device').length === 3",
        long,
    );
    let before = b.eval("JSON.stringify(window.ferryConsole)");
    let before: serde_json::Value = serde_json::from_str(before.as_str().unwrap()).unwrap();
    let nm = before["notModified"].as_u64().unwrap();
    b.wait_for(
        "polls answered 304",
        &format!("window.ferryConsole.notModified >= {}", nm + 4),
        long,
    );
    web.report("con-c", "3.0.0", "prod", "linux/arm64");
    b.wait_for(
        "con-c's new version, without a reload",
        "document.querySelector('#fleet tr[data-device=\"con-c\"] td.apps')?.innerText === 'sensor 3.0.0'",
        long,
    );
    let after = b.eval("JSON.stringify(window.ferryConsole)");
    let after: serde_json::Value = serde_json::from_str(after.as_str().unwrap()).unwrap();
    let fleet_renders = |v: &serde_json::Value| v["renders"]["fleet"].as_u64().unwrap();
    assert!(
        fleet_renders(&after) <= fleet_renders(&before) + 2,
        "unchanged polls redraw nothing: {before} → {after}"
    );

    // The layout holds from a phone to a wide screen: nothing wider than the window.
    let overflow = "document.documentElement.scrollWidth - window.innerWidth";
    for (w, h, mobile) in [(390, 844, true), (1400, 1000, false), (1920, 1080, false)] {
        b.set_viewport(w, h, mobile);
        for (hash, view) in [
            ("#/", "fleet"),
            ("#/device/con-a", "device"),
            ("#/rollouts/new", "new"),
        ] {
            b.eval(&format!("location.hash = '{hash}'"));
            b.wait_for(
                view,
                &format!("!document.getElementById('view-{view}').hidden"),
                long,
            );
            std::thread::sleep(Duration::from_millis(300));
            assert!(
                b.eval(overflow).as_i64().unwrap() <= 0,
                "{view} overflows at {w} px by {} px",
                b.eval(overflow)
            );
            if w == 390 && view != "new" {
                b.screenshot(&shots_dir().join(format!("console-phone-{view}.png")));
            }
        }
    }
    let errors = b.page_errors();
    assert!(errors.is_empty(), "the page logged errors: {errors:?}");
    drop(b);
    web.stop();
}

/// The CDP driver itself (tests/support/cdp.rs): its clicks are trusted mouse events, typing
/// replaces a field's text, Enter submits, the viewport and screenshots work, and the page's
/// uncaught errors are collected.
#[test]
fn the_browser_driver_really_clicks_and_types() {
    let Some(bin) = chromium() else {
        skip("chromium is not installed (apt-get install chromium; scripts/env-up.sh does)");
        return;
    };
    let html = r#"<!doctype html><meta charset=utf-8><title>driver</title>
<style>body { margin: 0; font: 16px sans-serif } #spacer { height: 2000px }
#cover { position: relative } #shield { position: absolute; inset: 0; background: #ccc }</style>
<form id=f><input id=q value="old text"><button type=button id=b>Press</button></form>
<p id=out></p><div id=spacer></div>
<div id=cover><button id=hidden>under</button><div id=shield></div></div>
<button id=low>low</button>
<script>
window.submits = [];
document.getElementById('b').addEventListener('click', e => {
  document.getElementById('out').textContent = e.isTrusted ? 'trusted click' : 'untrusted click';
});
document.getElementById('low').addEventListener('click', e => {
  document.getElementById('out').textContent = 'low ' + e.isTrusted;
});
document.getElementById('f').addEventListener('submit', e => {
  e.preventDefault();
  window.submits.push(document.getElementById('q').value);
});
</script>"#;
    let encoded: String = html
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let mut browser = support::cdp::Browser::launch(&bin, 800, 600);
    browser.goto(&format!("data:text/html,{encoded}"));
    assert_eq!(browser.eval("document.title"), "driver");
    assert_eq!(browser.eval("innerWidth"), 800);

    // A script's click is not trusted; the driver's is.
    browser.eval("document.getElementById('b').click()");
    assert_eq!(browser.text("#out"), "untrusted click");
    browser.click("#b");
    assert_eq!(browser.text("#out"), "trusted click");
    // Below the fold: scrolled into view first.
    browser.click("#low");
    assert_eq!(browser.text("#out"), "low true");
    assert!(browser.eval("scrollY").as_f64().unwrap() > 0.0);
    // A covered element is not clicked through (with --nocapture its expected panic shows).
    let covered =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| browser.click("#hidden")));
    assert!(covered.is_err(), "clicking a covered button must fail");
    assert_eq!(browser.text("#nothing-here"), "");

    // Typing replaces the text; Enter submits the form.
    browser.type_text("#q", "hello ferry");
    assert_eq!(
        browser.eval("document.activeElement.id + ':' + document.getElementById('q').value"),
        "q:hello ferry"
    );
    browser.press_enter();
    let submitted = browser.wait_for(
        "the form to be submitted",
        "window.submits.length && window.submits",
        Duration::from_secs(5),
    );
    assert_eq!(submitted, serde_json::json!(["hello ferry"]));
    browser.type_text("#q", "");

    // Viewport and screenshot.
    browser.set_viewport(500, 700, false);
    assert_eq!(browser.eval("innerWidth"), 500);
    assert_eq!(browser.eval("innerHeight"), 700);
    let shots = tempfile::tempdir().unwrap();
    let png = shots.path().join("a/b/driver.png");
    browser.screenshot(&png);
    let bytes = std::fs::read(&png).expect("screenshot written");
    assert!(bytes.starts_with(b"\x89PNG"), "{} bytes", bytes.len());

    // Uncaught errors and console.error are collected.
    assert!(
        browser.page_errors().is_empty(),
        "{:?}",
        browser.page_errors()
    );
    browser.eval("setTimeout(() => { throw new Error('boom') }, 0); console.error('bad', 42)");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !browser.page_errors().iter().any(|e| e.contains("boom")) {
        assert!(Instant::now() < deadline, "{:?}", browser.page_errors());
        browser.eval("new Promise(r => setTimeout(r, 50))");
    }
    let errors = browser.page_errors();
    assert!(
        errors.iter().any(|e| e.contains("Error: boom")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e == "console.error: bad 42"),
        "{errors:?}"
    );
}
