//! The agent's own download over a bad link, against the real registry, dockerd and mosquitto,
//! through a fault-injecting proxy ([`FaultProxy`]) that throttles, cuts every connection after
//! N bytes, stalls, goes dark and corrupts. The image is `ferry/bulk` (the sensor app plus a
//! 6 MiB incompressible layer shared by 1.0.0 and 2.0.0, and a 512 KiB layer of each version's
//! own on top), evicted from the engine before each test under [`docker::bulk_lock`], so that
//! every test downloads for real. Bytes are counted by the proxy (what crossed the "link",
//! headers included) and compared with the compressed size of what the box lacked.
//!
//! Run with `cargo test --test download` (the tests take the bulk lock one at a time).

mod common;

use std::time::{Duration, Instant};

use common::docker::{self, BulkLock};
use common::faultproxy::{CorruptRule, FaultProxy};
use common::infra::{self, ImageBlobs, ARM64, BULK_REPO};
use common::release::ReleaseBuilder;
use common::{Event, Phase, Rig, TestController, SLOW};
use ferry_protocol::Waiting;
use toml::{Table, Value};

const SOON: Duration = Duration::from_secs(60);
/// HTTP headers and manifests on top of the blob bytes, per download.
const OVERHEAD: u64 = 64 * 1024;

fn timing(name: &str, t0: Instant) {
    eprintln!("TIMING {name}: {:.1} s", t0.elapsed().as_secs_f64());
}

/// One test: the bulk images evicted (and kept out by the lock), a proxy to the registry, a rig
/// whose agent reaches the registry only through the proxy.
struct Dl {
    rig: Rig,
    proxy: FaultProxy,
    _bulk: BulkLock,
}

/// `[download]` for the tests: short stall timeout and backoff so faults resolve in seconds.
fn download_table(extra: &[(&str, Value)]) -> Table {
    let mut d = Table::new();
    d.insert("stall_timeout".into(), "3s".into());
    d.insert("retry_initial".into(), "200ms".into());
    d.insert("retry_max".into(), "2s".into());
    for (k, v) in extra {
        d.insert((*k).into(), v.clone());
    }
    d
}

impl Dl {
    fn start(name: &str, download: &[(&str, Value)], update: &[(&str, Value)]) -> Dl {
        let bulk = docker::bulk_lock();
        docker::evict_bulk(&bulk);
        let proxy = FaultProxy::registry();
        let d = download_table(download);
        let u: Vec<(String, Value)> = update
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let rig = Rig::builder(name)
            .agent(move |b| {
                b.config(move |t| {
                    t.insert("download".into(), d.into());
                    let up = t
                        .entry("update")
                        .or_insert_with(|| Table::new().into())
                        .as_table_mut()
                        .unwrap();
                    for (k, v) in u {
                        up.insert(k, v);
                    }
                })
            })
            .start();
        Dl {
            rig,
            proxy,
            _bulk: bulk,
        }
    }

    /// Bulk `version` (the sensor app), fetched through the proxy.
    fn release(&self, version: &str) -> ReleaseBuilder {
        self.rig
            .bulk_release(version)
            .image(&self.proxy.repo(BULK_REPO))
    }

    fn publish(&self, sequence: u64, version: &str) {
        let keys = &self.rig.keys;
        let n = self
            .rig
            .desired(sequence)
            .app("sensor", self.release(version).signed(keys))
            .signed(keys);
        self.rig.publish(&n);
    }

    fn blobs(version: &str) -> ImageBlobs {
        infra::image_blobs(&infra::bulk_image(), &infra::bulk_digest(version, ARM64))
    }

    fn wait_bytes(&self, seq: u64, at_least: u64, timeout: Duration) -> Event {
        self.rig.observer.wait_event_where(
            &format!("seq {seq}: {at_least} bytes downloaded"),
            timeout,
            |e| {
                e.sequence == seq
                    && e.phase == Phase::Downloading
                    && e.bytes.unwrap_or(0) >= at_least
            },
        )
    }

    fn committed(&self, seq: u64, version: &str) -> Event {
        let end = self.rig.observer.wait_terminal(seq, SLOW);
        assert_eq!(
            end.phase,
            Phase::Committed,
            "{end:?}\n{}\n{}",
            self.rig.observer.describe_events(),
            self.proxy.describe()
        );
        self.rig.observer.wait_state(
            |s| s.apps.get("sensor").is_some_and(|a| a.version == version),
            SOON,
        );
        end
    }

    fn no_failure(&self) {
        let bad: Vec<_> = self
            .rig
            .observer
            .events()
            .into_iter()
            .filter(|e| matches!(e.phase, Phase::Failed | Phase::RolledBack))
            .collect();
        assert!(bad.is_empty(), "{bad:#?}");
    }

    /// Requests for `digest` that asked for a range (resumed).
    fn ranged(&self, digest: &str) -> Vec<String> {
        self.proxy
            .requests()
            .into_iter()
            .filter(|r| r.path.ends_with(digest))
            .filter_map(|r| r.range)
            .collect()
    }

    /// The content store holds nothing (complete or partial).
    fn store_is_empty(&self) {
        let store = self.rig.agent.state_dir().join("store");
        let mut left = Vec::new();
        for sub in ["blobs/sha256", "partial/sha256"] {
            if let Ok(rd) = std::fs::read_dir(store.join(sub)) {
                left.extend(rd.flatten().map(|e| e.path()));
            }
        }
        assert!(left.is_empty(), "the store kept {left:?}");
    }
}

fn within(bytes: u64, want: u64) -> bool {
    bytes <= want * 11 / 10 + OVERHEAD
}

/// Install through a link cut every 300 KiB: the update commits, no blob starts over (bytes on
/// the link within 1.1x of the compressed size), every blob after the first cut is resumed
/// with a Range request, and the store is empty afterwards.
#[test]
fn an_install_through_a_link_cut_every_300_kib_commits_without_refetching() {
    let t0 = Instant::now();
    let dl = Dl::start("cutlink", &[], &[]);
    dl.proxy.cut_after(Some(300 * 1024));
    dl.publish(1, "1.0.0");
    let end = dl.committed(1, "1.0.0");
    dl.no_failure();
    let size = Dl::blobs("1.0.0").compressed_size();
    let down = dl.proxy.bytes_down();
    assert!(
        within(down, size),
        "{down} bytes for {size}\n{}",
        dl.proxy.describe()
    );
    assert!(dl.proxy.cuts() >= 20, "{}", dl.proxy.describe());
    let (data, _, _) = infra::bulk_data_layer();
    assert!(dl.ranged(&data).len() >= 18, "{:?}", dl.ranged(&data));
    let done = dl
        .rig
        .observer
        .events_for(1)
        .into_iter()
        .find(|e| e.phase == Phase::Downloaded)
        .unwrap();
    let stats = done.download.expect("downloaded carries the counters");
    assert_eq!(stats.restarts, 0, "{stats:?}");
    assert!(stats.resumes >= 18, "{stats:?}");
    assert!(stats.retries >= 20, "{stats:?}");
    // Never `failed`: each cut was a retry.
    assert!(dl
        .rig
        .observer
        .events_for(1)
        .iter()
        .any(|e| e.waiting == Some(Waiting::Retrying)));
    dl.store_is_empty();
    assert_eq!(end.rollout.as_deref(), Some("r-1"));
    timing("cut link", t0);
}

/// SIGKILL twice in the middle of the download: each restart resumes from the partial files
/// (durable lengths), the update commits, and the link carried at most 1.1x the image.
#[test]
fn sigkill_twice_during_the_download_resumes_and_commits() {
    let t0 = Instant::now();
    let mut dl = Dl::start("kill2", &[], &[]);
    dl.proxy.throttle(Some(1024 * 1024));
    dl.publish(1, "1.0.0");
    dl.wait_bytes(1, 1_500_000, SOON);
    dl.rig.agent.kill();
    let after_first = dl.proxy.bytes_down();
    dl.rig.agent.spawn();
    dl.rig.observer.watch_agent(dl.rig.agent.liveness());
    dl.rig
        .observer
        .wait_event_where("progress after the restart", SOON, |e| {
            e.sequence == 1 && e.phase == Phase::Downloading && e.bytes.unwrap_or(0) >= 3_500_000
        });
    dl.rig.agent.kill();
    assert!(dl.proxy.bytes_down() > after_first);
    dl.rig.agent.spawn();
    dl.rig.observer.watch_agent(dl.rig.agent.liveness());
    dl.committed(1, "1.0.0");
    dl.no_failure();
    let size = Dl::blobs("1.0.0").compressed_size();
    let down = dl.proxy.bytes_down();
    assert!(
        within(down, size),
        "{down} bytes for {size}\n{}",
        dl.proxy.describe()
    );
    let (data, _, _) = infra::bulk_data_layer();
    let ranges = dl.ranged(&data);
    assert!(ranges.len() >= 2, "resumed after each kill: {ranges:?}");
    dl.store_is_empty();
    timing("kill twice", t0);
}

/// The registry goes dark for longer than the backoff cap in the middle of a rollout's download:
/// the agent retries (never `failed`), the controller keeps the device in its wave although the
/// device timeout is shorter than the outage, and the update commits once the registry is back.
#[test]
fn a_dark_registry_mid_download_is_waited_out_and_the_device_stays_in_its_wave() {
    let t0 = Instant::now();
    let dl = Dl::start("dark", &[], &[]);
    let ctl = TestController::start(&dl.rig.broker, &dl.rig.keys);
    dl.rig.install(1, "1.0.0");
    ctl.wait_devices("the device online", SOON, |ds| {
        ds.iter().any(|d| d.id == dl.rig.device && d.online)
    });
    dl.proxy.throttle(Some(1024 * 1024));
    ctl.push_release(&dl.release("2.0.0").signed(&dl.rig.keys));
    let r = ctl.start_rollout(&[
        "--app",
        "sensor",
        "--version",
        "2.0.0",
        "--select",
        &format!("id={}", dl.rig.device),
        "--soak",
        "2s",
        "--device-timeout",
        "6s",
    ]);
    let seq = dl
        .rig
        .observer
        .wait_event_where("the rollout's notice", SOON, |e| {
            e.phase == Phase::Received && e.sequence > 1
        })
        .sequence;
    dl.wait_bytes(seq, 1_000_000, SOON);
    dl.proxy.dark(true);
    let dark_from = Instant::now();
    // Dark for 15 s: past the backoff cap (2 s) and the device timeout (6 s).
    std::thread::sleep(Duration::from_secs(15));
    let retries = dl
        .rig
        .observer
        .events_for(seq)
        .into_iter()
        .filter(|e| e.waiting == Some(Waiting::Retrying))
        .count();
    assert!(retries >= 4, "{}", dl.rig.observer.describe_events());
    let v = ctl.rollout(&r.id);
    let json = serde_json::to_string(&v).unwrap();
    assert!(!json.contains("\"failed\":1"), "still in its wave: {json}");
    assert!(!json.contains("no progress"), "{json}");
    dl.proxy.dark(false);
    eprintln!("dark for {:?}", dark_from.elapsed());
    dl.committed(seq, "2.0.0");
    dl.no_failure();
    ctl.wait_rollout(&r.id, "completed", SLOW, |v| {
        serde_json::to_value(v).unwrap()["state"] == "completed"
    });
    timing("dark registry", t0);
}

/// A connection that stalls is dropped after `stall_timeout` and the blob resumed from
/// where it was.
#[test]
fn a_stalled_connection_is_dropped_and_the_blob_resumed() {
    let t0 = Instant::now();
    let dl = Dl::start("stall", &[], &[]);
    dl.proxy.throttle(Some(1024 * 1024));
    dl.publish(1, "1.0.0");
    dl.wait_bytes(1, 1_000_000, SOON);
    dl.proxy.stall(true);
    let ev = dl
        .rig
        .observer
        .wait_event_where("a retry after the stall", SOON, |e| {
            e.waiting == Some(Waiting::Retrying)
                && e.reason.as_deref().is_some_and(|r| r.contains("stalled"))
        });
    assert!(ev.reason.unwrap().contains("no data for 3 s"));
    dl.proxy.stall(false);
    dl.committed(1, "1.0.0");
    let (data, _, _) = infra::bulk_data_layer();
    assert!(!dl.ranged(&data).is_empty(), "resumed with a Range request");
    let size = Dl::blobs("1.0.0").compressed_size();
    assert!(within(dl.proxy.bytes_down(), size));
    timing("stall", t0);
}

/// A layer served with wrong bytes is fetched once more; wrong twice fails the update naming the
/// blob, with the box on its committed set and nothing left in the store. Wrong once: it commits.
#[test]
fn wrong_bytes_are_fetched_once_more_then_fail_naming_the_blob() {
    let t0 = Instant::now();
    let dl = Dl::start("corrupt", &[], &[]);
    dl.rig.install(1, "1.0.0");
    let before = dl.rig.running();
    let (data, _, _) = infra::bulk_data_layer();
    dl.proxy.corrupt(Some(CorruptRule {
        path_contains: data.clone(),
        times: 2,
    }));
    dl.publish(2, "2.0.0");
    let end = dl.rig.observer.wait_terminal(2, SLOW);
    assert_eq!(
        end.phase,
        Phase::Failed,
        "{}",
        dl.rig.observer.describe_events()
    );
    let reason = end.reason.unwrap();
    assert!(
        reason.contains(&data) && reason.contains("twice"),
        "{reason}"
    );
    assert_eq!(dl.proxy.corrupted(), 2);
    assert_eq!(dl.rig.running().len(), 1);
    assert_eq!(dl.rig.running()[0].name, before[0].name);
    assert_eq!(dl.rig.agent.committed_versions()["sensor"], "1.0.0");
    dl.store_is_empty();
    // Once only: fetched again and committed.
    dl.proxy.corrupt(Some(CorruptRule {
        path_contains: data,
        times: 1,
    }));
    dl.publish(3, "2.0.0");
    dl.committed(3, "2.0.0");
    assert_eq!(dl.proxy.corrupted(), 3);
    timing("corrupt", t0);
}

/// An update that shares layers with what runs fetches only the layers the box lacks.
#[test]
fn an_update_fetches_only_the_layers_the_box_lacks() {
    let t0 = Instant::now();
    let dl = Dl::start("shared", &[], &[]);
    dl.publish(1, "1.0.0");
    dl.committed(1, "1.0.0");
    dl.proxy.reset_counters();
    dl.publish(2, "2.0.0");
    dl.committed(2, "2.0.0");
    let lacks = Dl::blobs("2.0.0").bytes_not_in(&Dl::blobs("1.0.0"));
    let down = dl.proxy.bytes_down();
    assert!(
        down <= lacks * 105 / 100 + 16 * 1024,
        "{down} bytes on the link for {lacks} bytes of new layers\n{}",
        dl.proxy.describe()
    );
    let (data, _, _) = infra::bulk_data_layer();
    assert!(
        !dl.proxy.requests().iter().any(|r| r.path.ends_with(&data)),
        "the shared data layer was requested again"
    );
    let done = dl
        .rig
        .observer
        .events_for(2)
        .into_iter()
        .find(|e| e.phase == Phase::Downloaded)
        .unwrap();
    assert!(done.download.unwrap().skipped_blobs >= 3, "{done:?}");
    timing("shared layers", t0);
}

/// A newer notice during a download takes over at once: the first update ends `superseded`
/// (never switched), the second commits, and the blobs both need are not fetched twice.
#[test]
fn a_newer_notice_during_a_download_takes_over_at_once() {
    let t0 = Instant::now();
    let dl = Dl::start("takeover", &[], &[]);
    dl.proxy.throttle(Some(1024 * 1024));
    dl.publish(1, "1.0.0");
    dl.wait_bytes(1, 2_000_000, SOON);
    let published = Instant::now();
    dl.publish(2, "2.0.0");
    let sup = dl.rig.observer.wait_event_for(1, Phase::Superseded, SOON);
    let took = published.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(sup.reason.unwrap().contains("sequence 2"));
    assert!(!dl.rig.observer.phases_for(1).contains(&Phase::Switching));
    dl.proxy.throttle(None);
    dl.committed(2, "2.0.0");
    // 1.0.0's own top layer was (partly) fetched, then dropped; the rest once.
    let b1 = Dl::blobs("1.0.0");
    let b2 = Dl::blobs("2.0.0");
    let want = b2.compressed_size() + b1.bytes_not_in(&b2);
    let down = dl.proxy.bytes_down();
    assert!(
        within(down, want),
        "{down} for {want}\n{}",
        dl.proxy.describe()
    );
    timing("take-over", t0);
}

/// The store cap and a full disk fail the update cleanly: nothing that runs touched, no
/// partial file left.
#[test]
fn the_store_cap_and_a_full_disk_fail_cleanly() {
    let t0 = Instant::now();
    // A small file system of its own for the store: a tmpfs of 8 MiB.
    let mnt = tempfile::tempdir().unwrap();
    let m = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .unwrap();
    assert!(m.success(), "mount tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(mnt.path().to_path_buf());
    let store = mnt.path().join("store");
    let dl = Dl::start(
        "disk",
        &[
            ("dir", Value::String(store.display().to_string())),
            ("max_store_bytes", Value::Integer(2 * 1024 * 1024)),
        ],
        &[("disk_margin_mb", Value::Integer(0))],
    );
    dl.rig.install(1, "1.0.0");
    let before = dl.rig.running();
    // 1. The cap (2 MiB) is below the 6 MiB data layer: refused before any layer is fetched.
    dl.proxy.reset_counters();
    dl.publish(2, "2.0.0");
    let end = dl.rig.observer.wait_terminal(2, SLOW);
    assert_eq!(end.phase, Phase::Failed);
    assert!(
        end.reason.as_deref().unwrap().contains("content store cap"),
        "{end:?}"
    );
    let (data, _, _) = infra::bulk_data_layer();
    assert!(!dl.proxy.requests().iter().any(|r| r.path.ends_with(&data)));
    // 2. Past the cap, the disk fills up while the layer arrives: refused, partial removed.
    let mut t = dl.rig.agent.config();
    t["download"]
        .as_table_mut()
        .unwrap()
        .insert("max_store_bytes".into(), Value::Integer(1 << 30));
    let mut dl = dl;
    dl.rig.agent.kill();
    dl.rig.agent.write_config(&t);
    dl.rig.agent.spawn();
    dl.rig.observer.watch_agent(dl.rig.agent.liveness());
    dl.proxy.throttle(Some(1024 * 1024));
    dl.publish(3, "2.0.0");
    dl.wait_bytes(3, 1_000_000, SOON);
    // Something else on the box takes the rest of the space.
    let filler = mnt.path().join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .output();
    let end = dl.rig.observer.wait_terminal(3, SLOW);
    assert_eq!(
        end.phase,
        Phase::Failed,
        "{}",
        dl.rig.observer.describe_events()
    );
    assert!(
        end.reason
            .as_deref()
            .unwrap()
            .contains("not enough disk space"),
        "{end:?}"
    );
    dl.store_is_empty();
    assert!(
        std::fs::read_dir(store.join("partial/sha256"))
            .unwrap()
            .next()
            .is_none(),
        "partial files removed"
    );
    // 3. Not enough room from the start: refused before fetching (the filler stays).
    dl.proxy.reset_counters();
    dl.publish(4, "2.0.0");
    let end = dl.rig.observer.wait_terminal(4, SLOW);
    assert_eq!(end.phase, Phase::Failed);
    assert!(end
        .reason
        .as_deref()
        .unwrap()
        .contains("not enough disk space"));
    assert!(!dl.proxy.requests().iter().any(|r| r.path.ends_with(&data)));
    // Through all of it the box ran its committed set.
    assert_eq!(dl.rig.running().len(), 1);
    assert_eq!(dl.rig.running()[0].name, before[0].name);
    let _ = std::fs::remove_file(&filler);
    timing("cap and disk", t0);
}

/// `[download] max_rate` holds: the link carries the bytes at the cap (within 10%).
#[test]
fn the_rate_cap_holds() {
    let t0 = Instant::now();
    let rate: u64 = 768 * 1024;
    let dl = Dl::start("rate", &[("max_rate", Value::Integer(rate as i64))], &[]);
    dl.publish(1, "1.0.0");
    // Sample the link while the data layer arrives.
    let mut samples: Vec<(Instant, u64)> = Vec::new();
    let deadline = Instant::now() + SLOW;
    while Instant::now() < deadline {
        samples.push((Instant::now(), dl.proxy.bytes_down()));
        if dl
            .rig
            .observer
            .events_for(1)
            .iter()
            .any(|e| e.phase == Phase::Downloaded)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    dl.committed(1, "1.0.0");
    // The steady part: from 1 MiB to 5 MiB on the link.
    let at = |b: u64| samples.iter().find(|(_, n)| *n >= b).copied().unwrap();
    let (a, b) = (at(1 << 20), at(5 << 20));
    let measured = (b.1 - a.1) as f64 / b.0.duration_since(a.0).as_secs_f64();
    eprintln!("rate cap {rate} B/s, measured {measured:.0} B/s");
    assert!(
        (measured / rate as f64 - 1.0).abs() <= 0.10,
        "measured {measured:.0} B/s against a cap of {rate}"
    );
    timing("rate cap", t0);
}

fn window_starting_in(d: chrono::Duration) -> String {
    let start = chrono::Local::now().time() + d;
    let end = start + chrono::Duration::minutes(30);
    format!("{}-{}", start.format("%H:%M:%S"), end.format("%H:%M:%S"))
}

/// The switch waits for a maintenance window that opens seconds later; then for an app's update
/// lock (taken inside the container at /run/ferry/updates.lock) until it is released; a notice
/// with `force` ignores the lock.
#[test]
fn the_switch_waits_for_its_window_and_the_apps_lock_and_force_ignores_the_lock() {
    let t0 = Instant::now();
    // A window opening 25 s from now (it stays open for 30 minutes).
    let window = window_starting_in(chrono::Duration::seconds(25));
    let dl = Dl::start(
        "window",
        &[],
        &[("windows", Value::Array(vec![Value::String(window.clone())]))],
    );
    let published = Instant::now();
    dl.publish(1, "1.0.0");
    let w = dl
        .rig
        .observer
        .wait_event_where("waiting for the window", SLOW, |e| {
            e.phase == Phase::Downloaded && e.waiting == Some(Waiting::Window)
        });
    assert!(w.reason.unwrap().contains(&window));
    let st = dl.rig.observer.wait_state(
        |s| {
            s.update
                .as_ref()
                .is_some_and(|u| u.waiting == Some(Waiting::Window))
        },
        SOON,
    );
    assert!(st.apps.is_empty());
    assert!(
        dl.rig.running().is_empty(),
        "nothing switched before the window"
    );
    dl.committed(1, "1.0.0");
    assert!(
        published.elapsed() >= Duration::from_secs(20),
        "{:?}",
        published.elapsed()
    );
    // The app takes its update lock: the next update waits until it lets go.
    let app = dl.rig.running()[0].name.clone();
    let exec = |args: &[&str]| {
        let mut a = vec!["exec", app.as_str()];
        a.extend_from_slice(args);
        let out = std::process::Command::new("docker")
            .args(&a)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "docker {a:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    exec(&["touch", "/run/ferry/updates.lock"]);
    dl.publish(2, "2.0.0");
    let l = dl
        .rig
        .observer
        .wait_event_where("waiting for the lock", SLOW, |e| {
            e.sequence == 2 && e.waiting == Some(Waiting::Lock)
        });
    assert!(l.reason.unwrap().contains("sensor holds its update lock"));
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(dl.rig.running()[0].name, app, "still the old container");
    assert!(!dl.rig.observer.phases_for(2).contains(&Phase::Switching));
    exec(&["rm", "/run/ferry/updates.lock"]);
    dl.committed(2, "2.0.0");
    // Locked again; a forced notice switches anyway.
    let app = dl.rig.running()[0].name.clone();
    let out = std::process::Command::new("docker")
        .args(["exec", &app, "touch", "/run/ferry/updates.lock"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let keys = &dl.rig.keys;
    let n = dl
        .rig
        .desired(3)
        .app("sensor", dl.release("1.0.0").signed(keys))
        .allow_downgrade(true)
        .force(true)
        .signed(keys);
    dl.rig.publish(&n);
    dl.committed(3, "1.0.0");
    assert!(!dl
        .rig
        .observer
        .events_for(3)
        .iter()
        .any(|e| e.waiting == Some(Waiting::Lock)));
    timing("window and lock", t0);
}
