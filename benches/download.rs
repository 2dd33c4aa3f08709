//! Download benchmarks (issue 8), measured side by side in one run on the same two releases
//! (`ferry/bulk` 1.0.0 → 2.0.0, linux/arm64: the sensor app on a 6 MiB incompressible data layer
//! both versions share, plus a 512 KiB layer of each version's own) through the same
//! fault-injecting proxy (`tests/common/faultproxy.rs`) in front of the sample registry, against
//! the real dockerd, registry and mosquitto, with the RELEASE agent binary:
//!
//! 1. bytes on the wire (the proxy's `bytes_down`, headers included) per install and per update,
//!    Ferry vs `docker pull` of the same digest through the same proxy; goal: Ferry ≤ 1.05× the
//!    compressed size of what the engine lacks (config + layers whose chain it does not hold);
//! 2. time to install and to update on a FLAKY link (1 MiB/s, every connection cut after
//!    512 KiB), Ferry vs `docker pull` retried by a shell loop until it succeeds (capped);
//! 3. on a CLEAN link (no throttle, no cuts), Ferry's download time vs `docker pull`'s (goal
//!    ≤ 1.1×), and as an extra, once, on a SLOW clean link (the flaky link's 1 MiB/s, no cuts);
//! 4. the agent's RSS during a 50 MiB download at a 5 MiB/s `[download] max_rate` (goal
//!    ≤ 12 MB), sampled from `/proc/<pid>/status` every 100 ms;
//!
//! plus the peak disk use of the agent's content store during each Ferry install and update.
//!
//! Ferry's download time is its `received` event → its `downloaded` event (the agent's event
//! timestamps; it includes loading the image into dockerd from the agent's loopback registry);
//! docker's is the start → end of `docker pull` (download + extraction). Before each measurement
//! the engine is made to lack the layers being measured: every image holding one of their layer
//! chains is removed by id (`docker rmi -f`); for an update, 1.0.0 is installed first.
//!
//! Run: `benches/download.sh` (environment, images, release agent, then
//! `cargo bench --bench download`). Results: stdout and `target/bench-download.json`.
//! Knobs: `FERRY_BENCH_ROUNDS` (clean-link rounds, default 3), `FERRY_BENCH_PEER_CAP_S` (how
//! long the docker retry loop may run on the flaky link, default 300).
//! The machine is shared and noisy: compare the rows of one run with each other.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::faultproxy::FaultProxy;
use common::infra::{self, ImageBlobs, ARM64, BULK_REPO};
use common::*;
use ferry_protocol::release::HealthSpec;
use ferry_protocol::DownloadStats;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const FLAKY_RATE: u64 = 1024 * 1024;
const FLAKY_CUT: u64 = 512 * 1024;
const BIG_REPO: &str = "ferry/bench-big";
const BIG_TAG: &str = "50m";
const BIG_BYTES: usize = 50 * 1024 * 1024;
const BIG_RATE: u64 = 5 * 1024 * 1024;
const BUSYBOX_ARM64: &str = "/var/cache/ferry/busybox/arm64/bin/busybox";
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    Clean,
    Flaky,
    /// An extra beyond the issue's two: the flaky link's rate without its cuts (how the clean
    /// link's fixed costs weigh once the bytes take time).
    Slow,
}

impl Link {
    fn name(self) -> &'static str {
        match self {
            Link::Clean => "clean",
            Link::Flaky => "flaky",
            Link::Slow => "slow",
        }
    }

    fn apply(self, proxy: &FaultProxy) {
        match self {
            Link::Clean => {
                proxy.throttle(None);
                proxy.cut_after(None);
            }
            Link::Flaky => {
                proxy.throttle(Some(FLAKY_RATE));
                proxy.cut_after(Some(FLAKY_CUT));
            }
            Link::Slow => {
                proxy.throttle(Some(FLAKY_RATE));
                proxy.cut_after(None);
            }
        }
    }
}

// ----- the engine: which layer chains it holds, removing images ----------------------------------

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run docker {args:?}: {e}"))
}

/// The chain ids of a layer stack, as the engine names its layers.
fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{prev} {d}").as_bytes()))
            ),
        };
        out.push(next);
    }
    out
}

/// Every image of the engine (intermediate ones included): id → its layer chains.
fn engine_images() -> BTreeMap<String, Vec<String>> {
    let out = docker(&["image", "ls", "-aq", "--no-trunc"]);
    let ids: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    let ids: Vec<String> = ids.into_iter().collect();
    let mut images = BTreeMap::new();
    for chunk in ids.chunks(100) {
        let mut args = vec![
            "image",
            "inspect",
            "--format",
            "{{.Id}} {{range .RootFS.Layers}}{{.}},{{end}}",
        ];
        args.extend(chunk.iter().map(String::as_str));
        // Images can vanish between the two calls (other tests prune theirs): take what answers.
        let out = docker(&args);
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let mut f = line.split_whitespace();
            let (Some(id), diffs) = (f.next(), f.next().unwrap_or("")) else {
                continue;
            };
            let diffs: Vec<String> = diffs
                .split(',')
                .filter(|d| !d.is_empty())
                .map(str::to_string)
                .collect();
            images.insert(id.to_string(), chain_ids(&diffs));
        }
    }
    images
}

fn engine_chains() -> BTreeSet<String> {
    engine_images().into_values().flatten().collect()
}

/// Image id → the names of the containers (any state) created from it.
fn images_in_use() -> BTreeMap<String, Vec<String>> {
    let out = docker(&["ps", "-aq", "--no-trunc"]);
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if ids.is_empty() {
        return used;
    }
    let mut args = vec!["container", "inspect", "--format", "{{.Image}} {{.Name}}"];
    args.extend(ids.iter().map(String::as_str));
    let out = docker(&args);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some((image, name)) = line.split_once(' ') {
            used.entry(image.to_string())
                .or_default()
                .push(name.trim_start_matches('/').to_string());
        }
    }
    used
}

/// How long [`evict`] waits for other people's containers (a demo, another test) to let go of
/// an image it has to remove: `FERRY_BENCH_WAIT_S`, default 900.
fn evict_wait() -> Duration {
    Duration::from_secs(
        std::env::var("FERRY_BENCH_WAIT_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(900),
    )
}

/// Remove (by id, `docker rmi -f`) every image that holds one of `chains`, children first, until
/// none does (a few passes: removing an image also prunes its untagged parents). An image a
/// container uses (someone else's: this bench removes its own device's app first) is never
/// removed: the bench waits for it to go, up to [`evict_wait`]. Returns the images still holding
/// the chains after that.
fn evict(chains: &BTreeSet<String>) -> Vec<String> {
    let holders = || -> Vec<(usize, String)> {
        let mut h: Vec<(usize, String)> = engine_images()
            .into_iter()
            .filter(|(_, c)| c.iter().any(|x| chains.contains(x)))
            .map(|(id, c)| (c.len(), id))
            .collect();
        h.sort_by(|a, b| b.cmp(a));
        h
    };
    let deadline = Instant::now() + evict_wait();
    let mut said: Option<Instant> = None;
    let mut passes = 0;
    loop {
        let h = holders();
        if h.is_empty() {
            return Vec::new();
        }
        let used = images_in_use();
        let busy: Vec<String> = h
            .iter()
            .filter_map(|(_, id)| used.get(id))
            .flatten()
            .cloned()
            .collect();
        if !busy.is_empty() {
            if Instant::now() > deadline {
                return h.into_iter().map(|(_, id)| id).collect();
            }
            if said.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                eprintln!(
                    "  waiting for other containers to let go of the measured layers: {busy:?}"
                );
                said = Some(Instant::now());
            }
            std::thread::sleep(Duration::from_secs(5));
            continue;
        }
        passes += 1;
        if passes > 6 {
            return h.into_iter().map(|(_, id)| id).collect();
        }
        let mut args = vec!["rmi", "-f"];
        args.extend(h.iter().map(|(_, id)| id.as_str()));
        let _ = docker(&args);
    }
}

// ----- the two releases -----------------------------------------------------------------------

/// One image as the registry serves it, with its layer chains.
struct Target {
    version: String,
    digest: String,
    blobs: ImageBlobs,
    chains: Vec<String>,
}

impl Target {
    fn load(repo: &str, version: &str, digest: &str) -> Target {
        let blobs = infra::image_blobs(repo, digest);
        let client = ferry_registry::RegistryClient::new(vec![], vec![]);
        let config = client
            .fetch_blob(repo, &blobs.config.0, 4 * 1024 * 1024)
            .unwrap_or_else(|e| panic!("config of {repo}@{digest}: {e}"));
        let config = ferry_registry::image_config(&config)
            .unwrap_or_else(|e| panic!("config of {repo}@{digest}: {e}"));
        assert_eq!(config.platform, ARM64, "{repo}@{digest}");
        assert_eq!(config.diff_ids.len(), blobs.layers.len());
        Target {
            version: version.to_string(),
            digest: digest.to_string(),
            chains: chain_ids(&config.diff_ids),
            blobs,
        }
    }

    fn image_id(&self) -> &str {
        &self.blobs.config.0
    }

    /// What the engine lacks of this image now: (config + layers whose chain it does not hold,
    /// in bytes; layers it holds).
    fn lacking(&self) -> (u64, usize) {
        let have = engine_chains();
        let present = self.chains.iter().take_while(|c| have.contains(*c)).count();
        let layers: u64 = self.blobs.layers[present..].iter().map(|(_, s)| s).sum();
        let config = if infra_image_present(self.image_id()) {
            0
        } else {
            self.blobs.config.1
        };
        (layers + config, present)
    }
}

/// Images other than `own` that hold one of `chains`: a measurement is disturbed when another
/// user of the engine (a demo, a test) brought the measured layers in meanwhile.
fn foreign_holders(chains: &BTreeSet<String>, own: &str) -> Vec<String> {
    engine_images()
        .into_iter()
        .filter(|(id, c)| id != own && c.iter().any(|x| chains.contains(x)))
        .map(|(id, _)| id)
        .collect()
}

fn infra_image_present(id: &str) -> bool {
    docker(&["image", "inspect", id]).status.success()
}

// ----- samplers -----------------------------------------------------------------------------------

/// Samples something every 100 ms on a thread of its own until stopped.
struct Sampler<T: Send + 'static> {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(SystemTime, T)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<T: Send + Clone + 'static> Sampler<T> {
    fn start(mut f: impl FnMut() -> Option<T> + Send + 'static) -> Sampler<T> {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s2, v2) = (stop.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                if let Some(v) = f() {
                    v2.lock().unwrap().push((SystemTime::now(), v));
                }
                std::thread::sleep(SAMPLE_EVERY.saturating_sub(t0.elapsed()));
            }
        });
        Sampler {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<(SystemTime, T)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.samples.lock().unwrap().clone()
    }
}

/// (apparent bytes, allocated bytes) of the files under `dir`.
fn dir_usage(dir: &Path) -> (u64, u64) {
    let mut out = (0, 0);
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(m) = e.metadata() else { continue };
        if m.is_dir() {
            let (a, b) = dir_usage(&e.path());
            out.0 += a;
            out.1 += b;
        } else {
            out.0 += m.len();
            out.1 += m.blocks() * 512;
        }
    }
    out
}

/// (VmRSS, VmHWM) in KiB.
fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

// ----- Ferry ----------------------------------------------------------------------------------

#[derive(Clone, Debug, Default)]
struct Wire {
    bytes_down: u64,
    bytes_up: u64,
    connections: u64,
    cuts: u64,
    requests: usize,
}

impl Wire {
    fn of(proxy: &FaultProxy) -> Wire {
        Wire {
            bytes_down: proxy.bytes_down(),
            bytes_up: proxy.bytes_up(),
            connections: proxy.connections(),
            cuts: proxy.cuts(),
            requests: proxy.requests().len(),
        }
    }

    fn json(&self) -> Value {
        json!({"bytes_down": self.bytes_down, "bytes_up": self.bytes_up, "connections": self.connections,
               "cuts": self.cuts, "requests": self.requests})
    }
}

#[derive(Clone, Debug)]
struct FerryRun {
    what: String,
    link: Link,
    /// Bytes the engine lacked before (config + layers), and layers it held.
    lacked: u64,
    held_layers: usize,
    outcome: String,
    wire: Wire,
    /// received → downloaded.
    download: Option<Duration>,
    /// received → committed.
    total: Option<Duration>,
    stats: Option<DownloadStats>,
    retry_events: usize,
    /// received → the agent's first "loading the image into the engine" (its log): the fetch
    /// into the content store; the rest of `download` is dockerd loading from the agent.
    fetch: Option<Duration>,
    /// Sum of the pauses before retries (the agent's `delay_ms`).
    pauses: Duration,
    /// Peak of the content store: (apparent, allocated) bytes.
    store_peak: (u64, u64),
    /// Other images that came to hold the measured layers during the measurement.
    disturbed: Vec<String>,
}

impl FerryRun {
    fn ratio(&self) -> f64 {
        self.wire.bytes_down as f64 / self.lacked.max(1) as f64
    }

    /// The image loaded into dockerd from the agent's loopback registry (+ checks, store GC).
    fn load(&self) -> Option<Duration> {
        Some(self.download?.saturating_sub(self.fetch?))
    }

    fn json(&self) -> Value {
        json!({
            "what": self.what, "link": self.link.name(), "lacked_bytes": self.lacked,
            "held_layers": self.held_layers, "outcome": self.outcome, "wire": self.wire.json(),
            "wire_over_lacked": self.ratio(),
            "download_ms": self.download.map(|d| d.as_millis() as u64),
            "received_to_committed_ms": self.total.map(|d| d.as_millis() as u64),
            "download_stats": self.stats.as_ref().map(|s| json!({
                "fetched_bytes": s.fetched_bytes, "skipped_blobs": s.skipped_blobs,
                "retries": s.retries, "resumes": s.resumes, "restarts": s.restarts})),
            "retry_events": self.retry_events,
            "fetch_ms": self.fetch.map(|d| d.as_millis() as u64),
            "load_ms": self.load().map(|d| d.as_millis() as u64),
            "retry_pauses_ms": self.pauses.as_millis() as u64,
            "disturbed_by_images": self.disturbed,
            "store_peak_bytes": self.store_peak.0, "store_peak_allocated_bytes": self.store_peak.1,
        })
    }
}

fn span(a: &Event, b: &Event) -> Duration {
    (b.ts - a.ts).to_std().unwrap_or_default()
}

/// The timestamp at the start of an agent log line.
fn log_ts(line: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let ts = line.split_whitespace().next()?;
    chrono::DateTime::parse_from_rfc3339(ts)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// `key=<digits>` in a log line.
fn log_num(line: &str, key: &str) -> Option<u64> {
    let i = line.find(key)? + key.len();
    line[i..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

struct Bench {
    rig: Rig,
    proxy: FaultProxy,
    seq: u64,
}

impl Bench {
    fn notice(&self, seq: u64, version: Option<&str>) -> Vec<u8> {
        let mut d = self.rig.desired(seq).allow_downgrade(true);
        if let Some(v) = version {
            let rel = self
                .rig
                .bulk_release(v)
                .image(&self.proxy.repo(BULK_REPO))
                .signed(&self.rig.keys);
            d = d.app("sensor", rel);
        }
        d.signed(&self.rig.keys)
    }

    /// Publish the next notice (`None`: no apps) and wait for its end; the terminal event.
    fn publish(&mut self, version: Option<&str>, timeout: Duration) -> Event {
        self.seq += 1;
        self.rig.publish(&self.notice(self.seq, version));
        self.rig.observer.wait_terminal(self.seq, timeout)
    }

    /// Bring the device to `version` (or nothing) over a clean link, unmeasured.
    fn settle(&mut self, version: Option<&str>) {
        Link::Clean.apply(&self.proxy);
        let ev = self.publish(version, SLOW);
        assert_eq!(
            ev.phase,
            Phase::Committed,
            "setting up {version:?}: {ev:?}\n{}",
            self.rig.observer.describe_events()
        );
        if version.is_none() {
            // The old containers go right after the commit is reported.
            infra::wait_for("the device's containers to go", SLOW, || {
                match self.rig.containers().len() {
                    0 => Ok(()),
                    n => Err(format!("{n} left")),
                }
            });
        }
    }

    /// One measured update to `target` over `link`.
    fn measure(&mut self, what: &str, target: &Target, link: Link) -> FerryRun {
        let (lacked, held_layers) = target.lacking();
        let log_from = self.rig.agent.log().len();
        let store = self.rig.agent.state_dir().join("store");
        let sampler = Sampler::start(move || Some(dir_usage(&store)));
        self.proxy.reset_counters();
        link.apply(&self.proxy);
        let timeout = if link == Link::Flaky {
            Duration::from_secs(900)
        } else {
            SLOW
        };
        let end = self.publish(Some(&target.version), timeout);
        Link::Clean.apply(&self.proxy);
        let wire = Wire::of(&self.proxy);
        let samples = sampler.finish();
        let log = self.rig.agent.log();
        let log = log.get(log_from..).unwrap_or_default();
        let load_start = log
            .lines()
            .find(|l| l.contains("loading the image into the engine"))
            .and_then(log_ts);
        let pauses = Duration::from_millis(
            log.lines()
                .filter(|l| l.contains("download interrupted"))
                .filter_map(|l| log_num(l, "delay_ms="))
                .sum(),
        );
        let events = self.rig.observer.events_for(self.seq);
        let find = |p: Phase| events.iter().find(|e| e.phase == p);
        let received = find(Phase::Received);
        let downloaded = find(Phase::Downloaded);
        let committed = find(Phase::Committed);
        let store_peak = samples
            .iter()
            .fold((0, 0), |acc, (_, (a, b))| (acc.0.max(*a), acc.1.max(*b)));
        let outcome = match end.phase {
            Phase::Committed => "committed".to_string(),
            p => format!("{p}: {}", end.reason.clone().unwrap_or_default()),
        };
        if end.phase != Phase::Committed {
            eprintln!(
                "FERRY {what} over the {} link ended {outcome}\n{}\n{}",
                link.name(),
                self.rig.observer.describe_events(),
                self.proxy.describe()
            );
        }
        let run = FerryRun {
            what: what.to_string(),
            link,
            lacked,
            held_layers,
            outcome,
            wire,
            download: received.zip(downloaded).map(|(a, b)| span(a, b)),
            total: received.zip(committed).map(|(a, b)| span(a, b)),
            stats: downloaded.and_then(|e| e.download),
            retry_events: events
                .iter()
                .filter(|e| e.phase == Phase::Downloading && e.waiting.is_some())
                .count(),
            fetch: received
                .zip(load_start)
                .and_then(|(a, t)| (t - a.ts).to_std().ok()),
            pauses,
            store_peak,
            disturbed: Vec::new(),
        };
        eprintln!(
            "  ferry {what} ({}): {} bytes down for {} lacked ({:.3}x), download {:?}, {}, store peak {} B",
            link.name(),
            run.wire.bytes_down,
            run.lacked,
            run.ratio(),
            run.download,
            run.outcome,
            run.store_peak.1
        );
        run
    }
}

// ----- docker pull ------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct DockerRun {
    what: String,
    link: Link,
    lacked: u64,
    held_layers: usize,
    succeeded: bool,
    attempts: u64,
    wire: Wire,
    time: Duration,
    /// Layers the last attempt found present ("Already exists").
    already: usize,
    /// dockerd's own retries ("Retrying in N seconds"), all attempts.
    internal_retries: usize,
    tail: String,
    /// Other images that came to hold the measured layers during the measurement.
    disturbed: Vec<String>,
}

impl DockerRun {
    fn ratio(&self) -> f64 {
        self.wire.bytes_down as f64 / self.lacked.max(1) as f64
    }

    fn json(&self) -> Value {
        json!({
            "what": self.what, "link": self.link.name(), "lacked_bytes": self.lacked,
            "held_layers": self.held_layers, "succeeded": self.succeeded, "attempts": self.attempts,
            "wire": self.wire.json(), "wire_over_lacked": self.ratio(),
            "time_ms": self.time.as_millis() as u64, "already_exists_layers": self.already,
            "dockerd_internal_retries": self.internal_retries,
            "disturbed_by_images": self.disturbed,
        })
    }
}

/// dockerd's own retries in `docker pull` output: each is a countdown of lines
/// `<layer>: Retrying in N seconds`, one per second.
fn dockerd_retries(text: &str) -> usize {
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    let mut n = 0;
    for l in text.lines() {
        let Some((layer, rest)) = l.split_once(": Retrying in ") else {
            continue;
        };
        let Some(secs) = rest.split_whitespace().next().and_then(|v| v.parse().ok()) else {
            continue;
        };
        if last.get(layer).is_none_or(|prev| secs >= *prev) {
            n += 1;
        }
        last.insert(layer.to_string(), secs);
    }
    n
}

/// `docker pull` of `target` through the proxy; on the flaky link a shell loop retries it until
/// it succeeds or `cap` has passed.
fn docker_pull(
    proxy: &FaultProxy,
    what: &str,
    target: &Target,
    link: Link,
    cap: Duration,
) -> DockerRun {
    let (lacked, held_layers) = target.lacking();
    let reference = format!("{}@{}", proxy.repo(BULK_REPO), target.digest);
    let script = r#"
n=0
end=$((SECONDS + CAP))
until n=$((n + 1)); echo "ferry-bench: attempt $n"; timeout $((end - SECONDS > 1 ? end - SECONDS : 1)) docker pull --platform linux/arm64 "$REF"; do
    if [ "$SECONDS" -ge "$end" ]; then echo "ferry-bench: gave up after $n attempts"; exit 1; fi
    if [ "$LOOP" != 1 ]; then exit 1; fi
done
echo "ferry-bench: done after $n attempts"
"#;
    proxy.reset_counters();
    link.apply(proxy);
    let t0 = Instant::now();
    let out = Command::new("bash")
        .args(["-c", script])
        .env("REF", &reference)
        .env("CAP", cap.as_secs().to_string())
        .env("LOOP", if link == Link::Flaky { "1" } else { "0" })
        .output()
        .expect("run bash");
    let time = t0.elapsed();
    Link::Clean.apply(proxy);
    let wire = Wire::of(proxy);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let attempts = text
        .lines()
        .filter(|l| l.starts_with("ferry-bench: attempt "))
        .count() as u64;
    let last = text
        .rsplit("ferry-bench: attempt ")
        .next()
        .unwrap_or_default();
    let run = DockerRun {
        what: what.to_string(),
        link,
        lacked,
        held_layers,
        succeeded: out.status.success(),
        attempts,
        wire,
        time,
        already: last
            .lines()
            .filter(|l| l.contains("Already exists"))
            .count(),
        internal_retries: dockerd_retries(&text),
        tail: text
            .lines()
            .rev()
            .take(6)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join(" | "),
        disturbed: Vec::new(),
    };
    eprintln!(
        "  docker {what} ({}): {} bytes down for {} lacked ({:.3}x), {:.1} s, {} attempt(s), {}",
        link.name(),
        run.wire.bytes_down,
        run.lacked,
        run.ratio(),
        run.time.as_secs_f64(),
        run.attempts,
        if run.succeeded {
            "ok".to_string()
        } else {
            format!("FAILED: {}", run.tail)
        }
    );
    run
}

// ----- the 50 MiB image ---------------------------------------------------------------------------

/// Build and push `<registry>/ferry/bench-big:50m`: FROM scratch, one layer holding a static
/// arm64 busybox (so that it runs) and 50 MiB of incompressible bytes from a fixed seed (fixed
/// mtimes: the same layer on every run). Returns its manifest digest.
fn build_big_image() -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut data = vec![0u8; BIG_BYTES];
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    let when = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    for (name, bytes) in [
        ("big.bin", data),
        (
            "busybox",
            std::fs::read(BUSYBOX_ARM64)
                .unwrap_or_else(|e| panic!("{BUSYBOX_ARM64}: {e} (scripts/env-up.sh)")),
        ),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(when).unwrap();
        if name == "busybox" {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM scratch\nCOPY busybox big.bin /\nCMD [\"/busybox\", \"sleep\", \"86400\"]\n",
    )
    .unwrap();
    let tag = format!("{}/{BIG_REPO}:{BIG_TAG}", infra::registry());
    let out = Command::new("docker")
        .args(["build", "--platform", ARM64, "-t", &tag])
        .arg(dir.path())
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .expect("docker build");
    assert!(
        out.status.success(),
        "docker build {tag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let arch = docker(&["image", "inspect", "-f", "{{.Os}}/{{.Architecture}}", &tag]);
    assert_eq!(
        String::from_utf8_lossy(&arch.stdout).trim(),
        ARM64,
        "{tag} is not built for {ARM64}"
    );
    let out = docker(&["push", &tag]);
    assert!(
        out.status.success(),
        "docker push {tag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "digest:")
        .nth(1)
        .unwrap_or_else(|| panic!("no digest in the output of docker push {tag}: {text}"))
        .to_string()
}

struct RssRun {
    outcome: String,
    lacked: u64,
    wire: Wire,
    download: Option<Duration>,
    /// Peak VmRSS over the whole update (KiB), the median while downloading, VmHWM at the end,
    /// VmRSS before the notice.
    peak_kib: u64,
    steady_kib: u64,
    hwm_kib: u64,
    idle_kib: u64,
    samples: usize,
    rate: f64,
}

fn rss_run(proxy: &FaultProxy) -> RssRun {
    eprintln!("building and pushing the 50 MiB image {BIG_REPO}:{BIG_TAG}");
    let digest = build_big_image();
    let repo = format!("{}/{BIG_REPO}", infra::registry());
    let target = Target::load(&repo, "1.0.0", &digest);
    let left = evict(&target.chains.iter().cloned().collect());
    assert!(
        left.is_empty(),
        "images holding the 50 MiB layer stay: {left:?}"
    );
    let rig = Rig::builder("bench-rss")
        .agent(|b| {
            b.config(|t| {
                let mut dl = toml::Table::new();
                dl.insert("max_rate".into(), toml::Value::Integer(BIG_RATE as i64));
                t.insert("download".into(), dl.into());
                t["log"]
                    .as_table_mut()
                    .unwrap()
                    .insert("level".into(), "info".into());
            })
        })
        .start();
    rig.observer.wait_online("1", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    let pid = rig.agent.pid().expect("agent pid");
    let (lacked, _) = target.lacking();
    let idle_kib = rss_kib(pid).map(|r| r.0).unwrap_or(0);
    let rel = release("1.0.0")
        .app("big")
        .image(&proxy.repo(BIG_REPO))
        .platforms([(ARM64.to_string(), digest.clone())].into())
        .cmd(&["/busybox", "sleep", "86400"])
        .health(HealthSpec {
            check: None,
            grace_s: Some(1),
            interval_s: Some(1),
            successes: Some(1),
            ..Default::default()
        })
        .signed(&rig.keys);
    let notice = rig.desired(1).app("big", rel).signed(&rig.keys);
    proxy.reset_counters();
    Link::Clean.apply(proxy);
    let sampler = Sampler::start(move || rss_kib(pid));
    rig.publish(&notice);
    let end = rig.observer.wait_terminal(1, Duration::from_secs(300));
    let samples = sampler.finish();
    let wire = Wire::of(proxy);
    let events = rig.observer.events_for(1);
    let find = |p: Phase| events.iter().find(|e| e.phase == p).cloned();
    let received = find(Phase::Received);
    let downloaded = find(Phase::Downloaded);
    let first_bytes = events
        .iter()
        .find(|e| e.phase == Phase::Downloading && e.bytes.unwrap_or(0) > 0)
        .cloned();
    let mut during: Vec<u64> = match (&first_bytes, &downloaded) {
        (Some(a), Some(b)) => {
            let (a, b): (SystemTime, SystemTime) = (a.ts.into(), b.ts.into());
            samples
                .iter()
                .filter(|(t, _)| *t >= a && *t <= b)
                .map(|(_, r)| r.0)
                .collect()
        }
        _ => Vec::new(),
    };
    during.sort();
    let download = received
        .as_ref()
        .zip(downloaded.as_ref())
        .map(|(a, b)| span(a, b));
    let outcome = match end.phase {
        Phase::Committed => "committed".to_string(),
        p => format!("{p}: {}", end.reason.clone().unwrap_or_default()),
    };
    // The fetch rate: from the first progress event with bytes to the first with all of them
    // (events come every 200 ms).
    let all_bytes = events
        .iter()
        .find(|e| e.phase == Phase::Downloading && e.total.unwrap_or(0) > 0 && e.bytes == e.total);
    let rate = match (&first_bytes, all_bytes) {
        (Some(a), Some(b)) => {
            let n = b.bytes.unwrap_or(0).saturating_sub(a.bytes.unwrap_or(0));
            n as f64 / span(a, b).as_secs_f64().max(0.001)
        }
        _ => 0.0,
    };
    let run = RssRun {
        outcome,
        lacked,
        wire,
        download,
        peak_kib: samples.iter().map(|(_, r)| r.0).max().unwrap_or(0),
        steady_kib: during.get(during.len() / 2).copied().unwrap_or(0),
        hwm_kib: samples.last().map(|(_, r)| r.1).unwrap_or(0),
        idle_kib,
        samples: samples.len(),
        rate,
    };
    if end.phase != Phase::Committed {
        eprintln!(
            "the 50 MiB update ended {}\n{}",
            run.outcome,
            rig.observer.describe_events()
        );
    }
    // The device's containers go with the rig; the image goes too.
    drop(rig);
    evict(&target.chains.iter().cloned().collect());
    run
}

// ----- report -------------------------------------------------------------------------------------

fn median(mut v: Vec<Duration>) -> Option<Duration> {
    v.sort();
    v.get(v.len() / 2).copied()
}

fn secs(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.2} s", d.as_secs_f64()))
        .unwrap_or_else(|| "–".into())
}

/// A table cell's note when other images came to hold the measured layers meanwhile.
fn mark(disturbed: &[String]) -> String {
    if disturbed.is_empty() {
        String::new()
    } else {
        " ⚠ disturbed".to_string()
    }
}

fn mb(b: u64) -> String {
    format!("{:.2} MB", b as f64 / 1e6)
}

fn load1() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("download: benchmark");
        return;
    }
    let rounds: usize = std::env::var("FERRY_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let cap = Duration::from_secs(
        std::env::var("FERRY_BENCH_PEER_CAP_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300),
    );
    infra::require_infra();
    let started = chrono::Utc::now();
    let load_start = load1();
    let agent_bin = AgentBinary::native().path;
    eprintln!(
        "agent binary {} (the bench profile = release settings)",
        agent_bin.display()
    );

    let repo = infra::bulk_image();
    let v1 = Target::load(&repo, "1.0.0", &infra::bulk_digest("1.0.0", ARM64));
    let v2 = Target::load(&repo, "2.0.0", &infra::bulk_digest("2.0.0", ARM64));
    // The layers measured: those above the bottom the bulk image shares with the sample sensor
    // image (busybox and its links: other images of this machine use them, and so do other
    // tests' running containers). Both peers skip what the engine holds; `lacking()` says what.
    let sensor = infra::image_blobs(&infra::sensor_image(), &infra::digest("1.0.0", ARM64));
    let base = v1
        .blobs
        .layers
        .iter()
        .zip(&sensor.layers)
        .take_while(|(a, b)| a.0 == b.0)
        .count();
    let install_chains: BTreeSet<String> = v1.chains[base..]
        .iter()
        .chain(&v2.chains[base..])
        .cloned()
        .collect();
    let v1_chains: BTreeSet<String> = v1.chains.iter().cloned().collect();
    let update_chains: BTreeSet<String> = v2
        .chains
        .iter()
        .filter(|c| !v1_chains.contains(*c))
        .cloned()
        .collect();
    eprintln!(
        "ferry/bulk 1.0.0 {} ({} bytes compressed), 2.0.0 {} ({} bytes; {} not in 1.0.0); {} base layer(s) shared with ferry/sensor",
        v1.digest,
        v1.blobs.compressed_size(),
        v2.digest,
        v2.blobs.compressed_size(),
        v2.blobs.bytes_not_in(&v1.blobs),
        base
    );

    let proxy = FaultProxy::registry();
    let rig = Rig::builder("bench-dl")
        .agent(|b| {
            b.config(|t| {
                t["log"]
                    .as_table_mut()
                    .unwrap()
                    .insert("level".into(), "info".into());
            })
        })
        .start();
    let mut b = Bench { rig, proxy, seq: 0 };
    let mut ferry: Vec<FerryRun> = Vec::new();
    let mut peer: Vec<DockerRun> = Vec::new();
    let mut held: Vec<String> = Vec::new();

    let evict_note = |chains: &BTreeSet<String>, what: &str, held: &mut Vec<String>| {
        let left = evict(chains);
        if !left.is_empty() {
            let note = format!("{what}: images still holding measured layers: {left:?}");
            eprintln!("  WARNING {note}");
            held.push(note);
        }
    };

    let ferry_pair = |b: &mut Bench, link: Link, held: &mut Vec<String>| -> Vec<FerryRun> {
        let mut out = Vec::new();
        b.settle(None);
        evict_note(&install_chains, "ferry install", held);
        let mut install = b.measure("install 1.0.0", &v1, link);
        install.disturbed = foreign_holders(&install_chains, v1.image_id());
        if install.outcome != "committed" {
            b.settle(Some("1.0.0"));
        }
        out.push(install);
        evict_note(&update_chains, "ferry update", held);
        let mut update = b.measure("update 1.0.0 → 2.0.0", &v2, link);
        update.disturbed = foreign_holders(&update_chains, v2.image_id());
        out.push(update);
        out
    };
    let docker_pair = |b: &mut Bench, link: Link, held: &mut Vec<String>| -> Vec<DockerRun> {
        let mut out = Vec::new();
        // The agent's app goes, so that its image can go too.
        b.settle(None);
        evict_note(&install_chains, "docker install", held);
        let mut install = docker_pull(&b.proxy, "install 1.0.0", &v1, link, cap);
        install.disturbed = foreign_holders(&install_chains, v1.image_id());
        out.push(install);
        if !out[0].succeeded {
            let r = docker(&[
                "pull",
                "--platform",
                ARM64,
                &infra::bulk_reference("1.0.0", ARM64),
            ]);
            assert!(r.status.success(), "docker pull 1.0.0 (set-up)");
        }
        evict_note(&update_chains, "docker update", held);
        let mut update = docker_pull(&b.proxy, "update 1.0.0 → 2.0.0", &v2, link, cap);
        update.disturbed = foreign_holders(&update_chains, v2.image_id());
        out.push(update);
        evict_note(&install_chains, "docker cleanup", held);
        out
    };

    for round in 0..rounds {
        eprintln!("clean link, round {}/{rounds}", round + 1);
        if round % 2 == 0 {
            ferry.extend(ferry_pair(&mut b, Link::Clean, &mut held));
            peer.extend(docker_pair(&mut b, Link::Clean, &mut held));
        } else {
            peer.extend(docker_pair(&mut b, Link::Clean, &mut held));
            ferry.extend(ferry_pair(&mut b, Link::Clean, &mut held));
        }
    }
    eprintln!(
        "flaky link: {} B/s, connections cut after {} bytes",
        FLAKY_RATE, FLAKY_CUT
    );
    ferry.extend(ferry_pair(&mut b, Link::Flaky, &mut held));
    peer.extend(docker_pair(&mut b, Link::Flaky, &mut held));
    eprintln!("slow link (extra): {FLAKY_RATE} B/s, no cuts");
    ferry.extend(ferry_pair(&mut b, Link::Slow, &mut held));
    peer.extend(docker_pair(&mut b, Link::Slow, &mut held));
    b.settle(None);
    let agent_log = b.rig.agent.log();
    let Bench { rig, proxy, .. } = b;
    drop(rig);

    eprintln!("agent RSS during a 50 MiB download");
    let rss = rss_run(&proxy);
    let load_end = load1();

    // ----- the table -----
    let pick = |v: &[FerryRun], what: &str, link: Link| -> Vec<FerryRun> {
        v.iter()
            .filter(|r| r.what.starts_with(what) && r.link == link)
            .cloned()
            .collect()
    };
    let pickd = |v: &[DockerRun], what: &str, link: Link| -> Vec<DockerRun> {
        v.iter()
            .filter(|r| r.what.starts_with(what) && r.link == link)
            .cloned()
            .collect()
    };
    let mut rows: Vec<String> = Vec::new();
    for (what, label) in [
        ("install", "install 1.0.0"),
        ("update", "update 1.0.0 → 2.0.0"),
    ] {
        let f = pick(&ferry, what, Link::Clean);
        let d = pickd(&peer, what, Link::Clean);
        let fr: Vec<String> = f
            .iter()
            .map(|r| format!("{:.3}{}", r.ratio(), mark(&r.disturbed)))
            .collect();
        let dr: Vec<String> = d
            .iter()
            .map(|r| format!("{:.3}{}", r.ratio(), mark(&r.disturbed)))
            .collect();
        rows.push(format!(
            "| bytes on the wire, {label}, clean link (engine lacked {}) | Ferry {} = **{}×** (rounds {}) | docker pull {} = {}× (rounds {}) | Ferry ≤ 1.05× |",
            mb(f.first().map(|r| r.lacked).unwrap_or(0)),
            mb(f.first().map(|r| r.wire.bytes_down).unwrap_or(0)),
            fr.first().cloned().unwrap_or_default(),
            fr.join(", "),
            mb(d.first().map(|r| r.wire.bytes_down).unwrap_or(0)),
            dr.first().cloned().unwrap_or_default(),
            dr.join(", "),
        ));
    }
    for (what, label) in [
        ("install", "install 1.0.0"),
        ("update", "update 1.0.0 → 2.0.0"),
    ] {
        let f = pick(&ferry, what, Link::Flaky);
        let d = pickd(&peer, what, Link::Flaky);
        let fcell = f
            .first()
            .map(|r| {
                let s = r.stats.unwrap_or_default();
                format!(
                    "Ferry {} ({}; of it {} pausing before retries, {} loading into dockerd; {} bytes = {:.3}×, {} cuts, {} retries, {} resumes, {} restarts)",
                    secs(r.download),
                    r.outcome,
                    secs(Some(r.pauses)),
                    secs(r.load()),
                    r.wire.bytes_down,
                    r.ratio(),
                    r.wire.cuts,
                    s.retries,
                    s.resumes,
                    s.restarts
                ) + &mark(&r.disturbed)
            })
            .unwrap_or_default();
        let dcell = d
            .first()
            .map(|r| {
                format!(
                    "docker pull loop {} ({} after {} attempt(s); {} bytes = {:.3}×, {} cuts, {} dockerd retries)",
                    secs(Some(r.time)),
                    if r.succeeded { "succeeded" } else { "gave up at the cap" },
                    r.attempts,
                    r.wire.bytes_down,
                    r.ratio(),
                    r.wire.cuts,
                    r.internal_retries
                ) + &mark(&r.disturbed)
            })
            .unwrap_or_default();
        rows.push(format!(
            "| {label}, flaky link (1 MiB/s, cut every 512 KiB) | {fcell} | {dcell} | Ferry commits |"
        ));
    }
    for (what, label, link) in [
        ("install", "install 1.0.0", Link::Clean),
        ("update", "update 1.0.0 → 2.0.0", Link::Clean),
        ("install", "install 1.0.0", Link::Slow),
        ("update", "update 1.0.0 → 2.0.0", Link::Slow),
    ] {
        let f = pick(&ferry, what, link);
        let d = pickd(&peer, what, link);
        let (link_label, goal) = match link {
            Link::Slow => (
                "slow clean link (extra: 1 MiB/s, no cuts; 1 round)".to_string(),
                "",
            ),
            _ => (format!("clean link (median of {rounds})"), " (goal ≤ 1.1×)"),
        };
        let fm = median(f.iter().filter_map(|r| r.download).collect());
        let dm = median(d.iter().filter(|r| r.succeeded).map(|r| r.time).collect());
        let ratio = match (fm, dm) {
            (Some(a), Some(b)) => format!("{:.2}×", a.as_secs_f64() / b.as_secs_f64()),
            _ => "–".into(),
        };
        let fl: Vec<String> = f
            .iter()
            .map(|r| {
                format!(
                    "{} = fetch {} + load {}{}",
                    secs(r.download).replace(" s", ""),
                    secs(r.fetch).replace(" s", ""),
                    secs(r.load()).replace(" s", ""),
                    mark(&r.disturbed)
                )
            })
            .collect();
        let dl: Vec<String> = d
            .iter()
            .map(|r| format!("{:.2}{}", r.time.as_secs_f64(), mark(&r.disturbed)))
            .collect();
        rows.push(format!(
            "| download time, {label}, {link_label} | Ferry {} (rounds: {}) | docker pull {} ({}) | Ferry/docker **{ratio}**{goal} |",
            secs(fm),
            fl.join(", "),
            secs(dm),
            dl.join(", ")
        ));
    }
    rows.push(format!(
        "| agent RSS, 50 MiB download at {} MiB/s (x86_64 release) | peak **{:.1} MiB**, steady {:.1} MiB (median while downloading), VmHWM {:.1} MiB, idle before {:.1} MiB | received → downloaded {}, fetched at {:.2} MiB/s, {}, {} bytes on the wire for {} lacked, {} samples | ≤ 12 MB |",
        BIG_RATE / (1024 * 1024),
        rss.peak_kib as f64 / 1024.0,
        rss.steady_kib as f64 / 1024.0,
        rss.hwm_kib as f64 / 1024.0,
        rss.idle_kib as f64 / 1024.0,
        secs(rss.download),
        rss.rate / (1024.0 * 1024.0),
        rss.outcome,
        rss.wire.bytes_down,
        rss.lacked,
        rss.samples
    ));
    let peak = |what: &str| -> String {
        let v: Vec<String> = ferry
            .iter()
            .filter(|r| r.what.starts_with(what))
            .map(|r| format!("{} ({})", mb(r.store_peak.1), r.link.name()))
            .collect();
        v.join(", ")
    };
    rows.push(format!(
        "| content store peak disk use (allocated), per Ferry run | install: {} | update: {} | ≤ the layers the engine lacks |",
        peak("install"),
        peak("update")
    ));
    println!("\n| measure | Ferry | peer / detail | goal |\n| --- | --- | --- | --- |");
    for r in &rows {
        println!("{r}");
    }
    for r in &ferry {
        if !r.disturbed.is_empty() {
            held.push(format!(
                "ferry {} ({}) disturbed: other images came to hold its layers: {:?}",
                r.what,
                r.link.name(),
                r.disturbed
            ));
        }
    }
    for r in &peer {
        if !r.disturbed.is_empty() {
            held.push(format!(
                "docker {} ({}) disturbed: other images came to hold its layers: {:?}",
                r.what,
                r.link.name(),
                r.disturbed
            ));
        }
    }
    if !held.is_empty() {
        println!("\nwarnings:");
        for h in &held {
            println!("  {h}");
        }
    }
    println!(
        "\nload average {load_start} at the start, {load_end} at the end; agent {}",
        agent_bin.display()
    );
    let misses: Vec<&str> = agent_log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    let json = json!({
        "started": started.to_rfc3339(),
        "finished": chrono::Utc::now().to_rfc3339(),
        "load1": {"start": load_start, "end": load_end},
        "agent_binary": agent_bin.display().to_string(),
        "images": {
            "bulk_1_0_0": {"digest": v1.digest, "compressed_bytes": v1.blobs.compressed_size()},
            "bulk_2_0_0": {"digest": v2.digest, "compressed_bytes": v2.blobs.compressed_size(),
                           "bytes_not_in_1_0_0": v2.blobs.bytes_not_in(&v1.blobs)},
            "base_layers_shared_with_sensor": base,
        },
        "flaky_link": {"rate_bytes_per_s": FLAKY_RATE, "cut_after_bytes": FLAKY_CUT},
        "peer_cap_s": cap.as_secs(),
        "ferry": ferry.iter().map(FerryRun::json).collect::<Vec<_>>(),
        "docker_pull": peer.iter().map(DockerRun::json).collect::<Vec<_>>(),
        "rss_50mib": {
            "outcome": rss.outcome, "lacked_bytes": rss.lacked, "max_rate": BIG_RATE, "peak_rss_kib": rss.peak_kib,
            "steady_rss_kib": rss.steady_kib, "vmhwm_kib": rss.hwm_kib, "idle_rss_kib": rss.idle_kib,
            "download_ms": rss.download.map(|d| d.as_millis() as u64), "samples": rss.samples,
            "measured_rate_bytes_per_s": rss.rate, "wire": rss.wire.json(),
        },
        "warnings": held,
        "agent_warnings": misses.len(),
        "table": rows,
    });
    let _ = std::fs::create_dir_all("target");
    std::fs::write(
        "target/bench-download.json",
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    let log_copy = PathBuf::from("target/bench-download-agent.log");
    let _ = std::fs::write(&log_copy, agent_log);
    eprintln!(
        "wrote target/bench-download.json and {}",
        log_copy.display()
    );
}
