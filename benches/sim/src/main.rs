//! `ferry-sim`: simulated Ferry devices for the controller's scale benchmark.
//!
//! ```text
//! ferry-sim run --broker mqtt://127.0.0.1:1883 --devices 10000 --per-connection 500 \
//!     --controller-key controller.pub --release-key release.pub --labels fleet=sim \
//!     --pull-delay 1s..3s --health-delay 2s --failure-rate 0.01 --stats stats.json
//! ferry-sim make-release --key release.key --app sensor --version 2.0.0 --out sensor-2.0.0.json
//! ferry-sim verify-bench --n 100000 [--json]
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand};
use ferry_protocol::{Trust, TrustedKeys};
use ferry_sim::delay::Delay;
use ferry_sim::device::Verifier;
use ferry_sim::notify::{self, NotifyArgs};
use ferry_sim::release::{self, MakeReleaseArgs};
use ferry_sim::signing::boot_now;
use ferry_sim::sim::{parse_broker, Sim, SimConfig};
use ferry_sim::stats::{write_atomic, Recorder, StatsFile};
use ferry_sim::verify_bench::{self, VerifyBenchArgs};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "ferry-sim",
    version,
    about = "Simulated Ferry devices speaking the real protocol over MQTT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run N simulated devices until SIGINT/SIGTERM, --duration or --until-notified.
    Run(Box<RunArgs>),
    /// Write a signed release envelope with (by default fake) per-platform digests.
    MakeRelease(MakeReleaseArgs),
    /// Sign and publish one notice per simulated device over one connection, as fast as it
    /// goes (a baseline for notice delivery without a controller).
    Notify(NotifyArgs),
    /// Sign N state reports like the simulated devices, then measure how many per second
    /// one thread opens and verifies (the controller's cost per signed report).
    VerifyBench(VerifyBenchArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Broker URL, mqtt://HOST[:PORT].
    #[arg(long, env = "FERRY_BROKER", value_name = "URL")]
    broker: String,
    #[arg(long, default_value = "ferry")]
    prefix: String,
    /// Number of simulated devices.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Device ids are PREFIX + a 5-digit index starting at --first.
    #[arg(long, default_value = "sim-")]
    id_prefix: String,
    #[arg(long, default_value_t = 0)]
    first: usize,
    /// Devices sharing one MQTT connection.
    #[arg(long, default_value_t = 500)]
    per_connection: usize,
    /// Unacknowledged QoS 1 publishes per connection.
    #[arg(long, default_value_t = 200)]
    inflight: u16,
    /// Trusted controller public key(s) (SPKI PEM).
    #[arg(long = "controller-key", value_name = "PUB", required = true)]
    controller_keys: Vec<PathBuf>,
    /// Trusted release public key(s) (SPKI PEM).
    #[arg(long = "release-key", value_name = "PUB", required = true)]
    release_keys: Vec<PathBuf>,
    #[arg(long, default_value_t = 1)]
    release_threshold: usize,
    /// Allowed clock skew for issued_at / expires_at, in seconds.
    #[arg(long, default_value_t = 300)]
    clock_skew_s: i64,
    /// Device labels, k=v (comma-separated and/or repeated).
    #[arg(long = "labels", value_name = "K=V[,K=V...]")]
    labels: Vec<String>,
    #[arg(long, default_value = "linux/arm64")]
    platform: String,
    #[arg(long, default_value = concat!("ferry-sim-", env!("CARGO_PKG_VERSION")))]
    agent_version: String,
    /// The fleet's enrolment token: every enrolment request carries a proof of it (a controller
    /// with this token in `[enroll] tokens` admits the devices at once).
    #[arg(
        long,
        env = "FERRY_ENROLL_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    enroll_token: Option<String>,
    /// Committed apps at start, APP=VERSION (repeatable).
    #[arg(long = "app", value_name = "APP=VERSION", default_values = ["sensor=1.0.0"])]
    apps: Vec<String>,
    /// Wait before `downloaded`: a duration (2s) or a range (1s..3s).
    #[arg(long, default_value = "0", value_parser = Delay::parse)]
    pull_delay: Delay,
    /// Wait before `committed` / `rolling_back`: a duration or a range.
    #[arg(long, default_value = "0", value_parser = Delay::parse)]
    health_delay: Delay,
    /// Probability that an update fails its health gate and rolls back.
    #[arg(long, default_value_t = 0.0)]
    failure_rate: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Stats file (JSON), rewritten every --stats-interval and at exit.
    #[arg(long, value_name = "FILE")]
    stats: Option<PathBuf>,
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    stats_interval: Duration,
    /// Include one record per device in the stats written at exit (not in the periodic ones).
    #[arg(long)]
    per_device: bool,
    /// Stop after this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Stop once N notices arrived and every update they started has ended.
    #[arg(long, value_name = "N")]
    until_notified: Option<u64>,
    /// After start-up, every device publishes K extra state reports as fast as possible.
    #[arg(long, value_name = "K", default_value_t = 0)]
    blast: u32,
    /// Blast on each SIGUSR1 instead of once after start-up.
    #[arg(long)]
    blast_on_signal: bool,
    /// After its blast, each device publishes `online` = `0` (a marker for the controller side:
    /// all devices offline there = every blast message processed).
    #[arg(long)]
    blast_then_offline: bool,
    /// Threads verifying notices and running updates (one more thread does the MQTT I/O).
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

fn parse_kv(list: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for item in list.iter().flat_map(|s| s.split(',')) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| anyhow!("{item:?} is not KEY=VALUE"))?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,rumqttc=warn")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let result = match cli.command {
        Command::MakeRelease(a) => release::run(a),
        Command::Run(a) => run(*a),
        Command::VerifyBench(a) => verify_bench::run(a),
        Command::Notify(a) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("tokio runtime")
            .and_then(|rt| rt.block_on(notify::run(a))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-sim: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(a: RunArgs) -> anyhow::Result<()> {
    if a.devices == 0 || a.per_connection == 0 {
        bail!("--devices and --per-connection must be at least 1");
    }
    if !(0.0..=1.0).contains(&a.failure_rate) {
        bail!("--failure-rate is a probability, 0 to 1");
    }
    let (host, port) = parse_broker(&a.broker)?;
    let apps = parse_kv(&a.apps)?
        .into_iter()
        .map(|(k, v)| {
            let v = v
                .parse::<semver::Version>()
                .with_context(|| format!("--app {k}={v}"))?;
            Ok((k, v))
        })
        .collect::<anyhow::Result<_>>()?;
    let verifier = Verifier::new(
        Trust {
            release: TrustedKeys::load(&a.release_keys)?,
            release_threshold: a.release_threshold.max(1),
            controller: TrustedKeys::load(&a.controller_keys)?,
        },
        chrono::Duration::seconds(a.clock_skew_s),
    );
    let cfg = SimConfig {
        host,
        port,
        prefix: a.prefix.clone(),
        devices: a.devices,
        first: a.first,
        id_prefix: a.id_prefix.clone(),
        per_connection: a.per_connection,
        platform: a.platform.clone(),
        agent_version: a.agent_version.clone(),
        labels: parse_kv(&a.labels)?,
        apps,
        failure_rate: a.failure_rate,
        pull_delay: a.pull_delay,
        health_delay: a.health_delay,
        seed: a.seed,
        inflight: a.inflight.max(1),
        boot: boot_now(),
        enroll_token: a.enroll_token.clone().filter(|t| !t.is_empty()),
    };
    // One thread reads and writes the sockets, `--threads` verify notices and run updates.
    let io = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sim-io")
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let work = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.threads.max(1))
        .thread_name("sim-work")
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let result = io.block_on(simulate(a, cfg, verifier, work.handle().clone()));
    work.shutdown_background();
    result
}

async fn simulate(
    a: RunArgs,
    cfg: SimConfig,
    verifier: Verifier,
    work: tokio::runtime::Handle,
) -> anyhow::Result<()> {
    let ids = (0..cfg.devices).map(|i| cfg.device_id(i)).collect();
    let rec = Arc::new(Recorder::new(ids, cfg.connections()));
    info!(
        devices = cfg.devices,
        connections = cfg.connections(),
        pull_delay = %cfg.pull_delay,
        health_delay = %cfg.health_delay,
        failure_rate = cfg.failure_rate,
        boot = cfg.boot,
        enroll_token = cfg.enroll_token.is_some(),
        "starting"
    );
    let sim = Sim::start(
        cfg,
        verifier,
        rec.clone(),
        &tokio::runtime::Handle::current(),
        &work,
    )?;
    let started = Instant::now();
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigusr1 = signal(SignalKind::user_defined1())?;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut last_write = Instant::now();
    let mut blasted = false;
    let mut was_ready = false;
    let write = |s: &StatsFile| {
        if let Some(p) = &a.stats {
            if let Err(e) = write_atomic(p, s) {
                warn!(file = %p.display(), error = %e, "cannot write the stats");
            }
        }
    };
    let why = loop {
        tokio::select! {
            _ = sigint.recv() => break "SIGINT",
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigusr1.recv() => {
                if a.blast == 0 {
                    warn!("SIGUSR1 but --blast is 0: nothing to do");
                } else {
                    sim.blast(a.blast, a.blast_then_offline);
                }
            }
            _ = tick.tick() => {
                if !was_ready && sim.is_ready() {
                    was_ready = true;
                    rec.ready();
                    info!(after_ms = started.elapsed().as_millis() as u64, "all devices announced and subscribed");
                }
                if was_ready && a.blast > 0 && !a.blast_on_signal && !blasted {
                    blasted = true;
                    sim.blast(a.blast, a.blast_then_offline);
                }
                if a.duration.is_some_and(|d| started.elapsed() >= d) {
                    break "--duration";
                }
                if let Some(n) = a.until_notified {
                    if rec.counters.notices_received.load(Relaxed) >= n && sim.is_idle() {
                        break "--until-notified";
                    }
                }
                if last_write.elapsed() >= a.stats_interval {
                    last_write = Instant::now();
                    write(&rec.snapshot(false));
                }
            }
        }
    };
    info!(reason = why, "stopping");
    // Give queued publishes a moment to be acknowledged.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let c = &rec.counters;
        if c.acked.load(Relaxed) >= c.published.load(Relaxed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sim.stop();
    let s = rec.snapshot(a.per_device);
    write(&s);
    print_summary(&s, why);
    Ok(())
}

fn print_summary(s: &StatsFile, why: &str) {
    println!(
        "ferry-sim: {} devices over {} connections, stopped by {why}",
        s.devices, s.connections
    );
    if let Some(r) = s.ready_unix_ms {
        println!("  ready after {} ms", r.saturating_sub(s.started_unix_ms));
    }
    println!(
        "  notices: {} received, {} accepted, {} duplicates, {} rejected{}",
        s.notices.received,
        s.notices.accepted,
        s.notices.duplicates,
        s.notices.rejected,
        s.notices
            .per_s
            .map(|r| format!(", {r:.0}/s"))
            .unwrap_or_default()
    );
    for (id, r) in &s.rollouts {
        let window = match (r.first_notice_unix_ms, r.last_notice_unix_ms) {
            (Some(a), Some(b)) => format!(", notices over {} ms", b - a),
            _ => String::new(),
        };
        println!(
            "  rollout {id}: {} notices{window}, {} committed, {} rolled back, {} rejected{}",
            r.notices,
            r.committed,
            r.rolled_back,
            r.rejected,
            r.notice_to_commit_ms
                .map(|p| format!(", notice→commit p50 {} ms p99 {} ms", p.p50, p.p99))
                .unwrap_or_default()
        );
    }
    println!(
        "  reports (signed): {} published ({} state, {} events, {} online, {} enroll), {} acknowledged",
        s.reports.published,
        s.reports.state,
        s.reports.events,
        s.reports.online,
        s.reports.enroll,
        s.reports.acked
    );
    for b in &s.blasts {
        println!(
            "  blast: {} messages ({} per device){}",
            b.messages,
            b.per_device,
            b.per_s
                .map(|r| format!(", {r:.0}/s to the broker"))
                .unwrap_or_default()
        );
    }
    let e = &s.errors;
    if e.publish_errors + e.connection_errors + e.suback_failures > 0 || !e.rejections.is_empty() {
        println!(
            "  errors: {} publish, {} connection, {} refused subscriptions; rejections: {:?}",
            e.publish_errors, e.connection_errors, e.suback_failures, e.rejections
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse() {
        let m = parse_kv(&["fleet=sim,site=north".into(), "group=beta".into()]).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m["site"], "north");
        assert!(parse_kv(&["nokey".into()]).is_err());
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let c = Cli::try_parse_from([
            "ferry-sim",
            "run",
            "--broker",
            "mqtt://127.0.0.1:1",
            "--controller-key",
            "c.pub",
            "--release-key",
            "r.pub",
            "--pull-delay",
            "1s..2s",
        ])
        .unwrap();
        let Command::Run(r) = c.command else { panic!() };
        assert_eq!(r.pull_delay.max, Duration::from_secs(2));
        assert_eq!(r.apps, ["sensor=1.0.0"]);
        assert_eq!(r.enroll_token, None);
        let c = Cli::try_parse_from([
            "ferry-sim",
            "run",
            "--broker",
            "mqtt://127.0.0.1:1",
            "--controller-key",
            "c.pub",
            "--release-key",
            "r.pub",
            "--enroll-token",
            "tok",
        ])
        .unwrap();
        let Command::Run(r) = c.command else { panic!() };
        assert_eq!(r.enroll_token.as_deref(), Some("tok"));
        let c = Cli::try_parse_from(["ferry-sim", "verify-bench", "--n", "500", "--json"]).unwrap();
        let Command::VerifyBench(v) = c.command else {
            panic!()
        };
        assert_eq!((v.n, v.devices, v.json), (500, 1000, true));
    }
}
