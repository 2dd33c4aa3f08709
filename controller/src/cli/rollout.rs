//! `ferryctl rollout start|status|pause|resume|abort|list`, `ferryctl rollback` and
//! `ferryctl release push|list`: the operator's side of the controller's API.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use ferry_protocol::desired::Strategy;
use ferry_protocol::dsse::MAX_RELEASE_ENVELOPE;

use crate::api::{ReleaseView, RollbackRequest, RollbackResult, RolloutView, StartRollout};
use crate::client::{blocking, query_escape, Client, ServerArgs};
use crate::rollout::waves::{OnFailure, WaveSummary};
use crate::{exit, read_capped, table, Output};

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Roll a catalogued release out to the devices a selector matches, in waves.
    Start(StartArgs),
    /// A rollout's progress per wave, per state, failures grouped by reason.
    Status(StatusArgs),
    /// Stop notifying devices (results keep being recorded) until `resume`.
    Pause(IdArgs),
    /// Continue a paused rollout; the current wave's failures so far are acknowledged.
    Resume(IdArgs),
    /// End a rollout for good; devices keep what they run.
    Abort(IdArgs),
    /// Every rollout, newest last.
    List(ListArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum StrategyArg {
    StopFirst,
    StartFirst,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OnFailureArg {
    Pause,
    Revert,
}

#[derive(Debug, Args)]
#[command(disable_version_flag = true)]
pub struct StartArgs {
    #[arg(long)]
    pub app: String,
    #[arg(long)]
    pub version: String,
    /// Which devices: `group=beta`, `group=beta,site!=north`, `id in (a,b)`, `all`.
    #[arg(long, value_name = "SELECTOR")]
    pub select: String,
    /// Cumulative wave targets: counts or percentages, the last one 100%.
    #[arg(long, default_value = "1,10%,50%,100%")]
    pub waves: String,
    /// How long a device must stay healthy after committing to count as succeeded.
    #[arg(long, default_value = "60s")]
    pub soak: String,
    /// Failures tolerated per wave, a count (`1`) or a share of the wave (`5%`); one more
    /// pauses the rollout. The default 0: the first failure stops it (a canary wave protects
    /// the fleet).
    #[arg(long, default_value = "0")]
    pub max_failures: String,
    /// How long a notified device may take to report a result (default: the server's).
    #[arg(long, value_name = "DURATION")]
    pub device_timeout: Option<String>,
    #[arg(long, value_enum)]
    pub strategy: Option<StrategyArg>,
    /// On too many failures: pause (default), or pause and send every updated device back.
    #[arg(long, value_enum)]
    pub on_failure: Option<OnFailureArg>,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[arg(value_name = "ID")]
    pub id: String,
    /// Redraw every second until the rollout ends (JSON lines with --json).
    #[arg(long)]
    pub watch: bool,
    /// With --watch: how often to poll.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct IdArgs {
    #[arg(value_name = "ID")]
    pub id: String,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// Which devices.
    #[arg(long, value_name = "SELECTOR")]
    pub select: String,
    #[arg(long)]
    pub app: String,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// A signed release envelope (from `ferryctl release sign`).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    #[command(flatten)]
    pub server: ServerArgs,
}

pub async fn run(cmd: RolloutCommand, out: Output) -> anyhow::Result<u8> {
    match cmd {
        RolloutCommand::Start(a) => start(a, out).await.map(|()| exit::OK),
        RolloutCommand::Status(a) => status(a, out).await,
        RolloutCommand::Pause(a) => op(a, "pause", out).await.map(|()| exit::OK),
        RolloutCommand::Resume(a) => op(a, "resume", out).await.map(|()| exit::OK),
        RolloutCommand::Abort(a) => op(a, "abort", out).await.map(|()| exit::OK),
        RolloutCommand::List(a) => list(a, out).await.map(|()| exit::OK),
    }
}

async fn start(a: StartArgs, out: Output) -> anyhow::Result<()> {
    let req = StartRollout {
        app: a.app,
        version: a.version,
        select: a.select,
        waves: a.waves,
        soak: a.soak,
        max_failures: a.max_failures,
        device_timeout: a.device_timeout,
        strategy: a.strategy.map(|s| match s {
            StrategyArg::StopFirst => Strategy::StopFirst,
            StrategyArg::StartFirst => Strategy::StartFirst,
        }),
        on_failure: a.on_failure.map(|o| match o {
            OnFailureArg::Pause => OnFailure::Pause,
            OnFailureArg::Revert => OnFailure::Revert,
        }),
    };
    let server = a.server;
    let v: RolloutView = blocking(move || Client::new(&server)?.post("/rollouts", &req)).await?;
    if out.json {
        out.json_doc(&serde_json::to_value(&v)?);
    } else {
        println!(
            "rollout {} started: {} {} to {} device(s) matching `{}`, waves {} (targets {:?}), soak {}s",
            v.id, v.app, v.version, v.summary.devices, v.select, v.waves, v.targets, v.soak_s
        );
        println!("follow it with: ferryctl rollout status {} --watch", v.id);
    }
    Ok(())
}

fn bar(w: &WaveSummary, width: usize) -> String {
    let size = w.devices.max(1);
    let ok = w.succeeded * width / size;
    let bad = w.failed * width / size;
    let busy = (w.notified + w.soaking) * width / size;
    let rest = width.saturating_sub(ok + bad + busy);
    format!(
        "[{}{}{}{}]",
        "#".repeat(ok),
        "x".repeat(bad),
        "~".repeat(busy),
        ".".repeat(rest)
    )
}

/// The status as text lines (also used by `--watch`).
pub fn render(v: &RolloutView) -> String {
    let s = &v.summary;
    let mut o = format!(
        "rollout {}  {} {} -> `{}`  state: {}{}\n",
        v.id,
        v.app,
        v.version,
        v.select,
        v.state,
        v.reason
            .as_ref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    o += &format!(
        "waves {}  soak {}s  max failures {} per wave  on failure: {:?}  strategy: {}\n",
        v.waves, v.soak_s, v.max_failures, v.on_failure, v.strategy
    );
    o += &format!(
        "devices {}: {} succeeded, {} soaking, {} notified, {} failed, {} pending ({} offline)\n",
        s.devices, s.succeeded, s.soaking, s.notified, s.failed, s.pending, s.pending_offline
    );
    let mut prev = 0;
    for w in &s.waves {
        let size = w.target.saturating_sub(prev);
        prev = w.target;
        let mark = if Some(w.index) == v.current_wave && v.state == "running" {
            ">"
        } else {
            " "
        };
        o += &format!(
            "{mark} wave {} {} {:>4}/{:<4} ok {:<4} fail {:<4} busy {:<4}{}\n",
            w.index + 1,
            bar(w, 30),
            w.succeeded,
            w.devices.max(size),
            w.succeeded,
            w.failed,
            w.notified + w.soaking,
            if w.started { "" } else { "  (not started)" }
        );
    }
    if !s.failures.is_empty() {
        o += "failures:\n";
        for (reason, ids) in &s.failures {
            let shown: Vec<&str> = ids.iter().take(5).map(String::as_str).collect();
            let more = ids.len().saturating_sub(shown.len());
            o += &format!(
                "  {:>4} x {reason}: {}{}\n",
                ids.len(),
                shown.join(", "),
                if more > 0 {
                    format!(" (+{more})")
                } else {
                    String::new()
                }
            );
        }
    }
    if !v.reverted.is_empty() {
        o += &format!(
            "sent back to their previous release: {}\n",
            v.reverted.join(", ")
        );
    }
    o
}

/// The per-device list only for `--json` (the text shows counts; a 10,000-device list every
/// second would cost the controller for nothing).
async fn fetch(server: &ServerArgs, id: &str, with_devices: bool) -> anyhow::Result<RolloutView> {
    let server = server.clone();
    let mut path = format!("/rollouts/{}", query_escape(id));
    if !with_devices {
        path.push_str("?devices=false");
    }
    blocking(move || Client::new(&server)?.get(&path)).await
}

/// Exit code: 0 while running or completed, 1 when the rollout paused, reverted or was aborted.
async fn status(a: StatusArgs, out: Output) -> anyhow::Result<u8> {
    let code = |v: &RolloutView| match v.state.as_str() {
        "running" | "completed" => exit::OK,
        _ => exit::FAILURE,
    };
    if !a.watch {
        let v = fetch(&a.server, &a.id, out.json).await?;
        if out.json {
            out.json_doc(&serde_json::to_value(&v)?);
        } else {
            print!("{}", render(&v));
        }
        return Ok(code(&v));
    }
    let tty = !out.json && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut last = String::new();
    loop {
        let v = fetch(&a.server, &a.id, out.json).await?;
        if out.json {
            out.json_line(&serde_json::to_value(&v)?);
        } else {
            let text = render(&v);
            if text != last {
                if tty {
                    print!("\x1b[2J\x1b[H");
                }
                print!("{text}");
                if !tty {
                    println!();
                }
                last = text;
            }
        }
        if v.state != "running" {
            return Ok(code(&v));
        }
        tokio::time::sleep(a.interval).await;
    }
}

async fn op(a: IdArgs, op: &'static str, out: Output) -> anyhow::Result<()> {
    let server = a.server.clone();
    let path = format!("/rollouts/{}/{op}", query_escape(&a.id));
    let v: RolloutView =
        blocking(move || Client::new(&server)?.post(&path, &serde_json::json!({}))).await?;
    if out.json {
        out.json_doc(&serde_json::to_value(&v)?);
    } else {
        println!("rollout {}: {}", v.id, v.state);
    }
    Ok(())
}

async fn list(a: ListArgs, out: Output) -> anyhow::Result<()> {
    let server = a.server.clone();
    let all: Vec<RolloutView> = blocking(move || Client::new(&server)?.get("/rollouts")).await?;
    if out.json {
        out.json_doc(&serde_json::to_value(&all)?);
        return Ok(());
    }
    let mut t = table(&[
        "ID", "APP", "VERSION", "SELECT", "WAVES", "STATE", "DEVICES", "OK", "FAILED", "CREATED",
    ]);
    for v in &all {
        t.add_row(vec![
            v.id.clone(),
            v.app.clone(),
            v.version.clone(),
            v.select.clone(),
            v.waves.clone(),
            v.state.clone(),
            v.summary.devices.to_string(),
            v.summary.succeeded.to_string(),
            v.summary.failed.to_string(),
            v.created_at.format("%Y-%m-%d %H:%M").to_string(),
        ]);
    }
    println!("{t}");
    Ok(())
}

pub async fn rollback(a: RollbackArgs, out: Output) -> anyhow::Result<()> {
    let req = RollbackRequest {
        select: a.select,
        app: a.app,
    };
    let server = a.server;
    let r: RollbackResult = blocking(move || Client::new(&server)?.post("/rollback", &req)).await?;
    if out.json {
        out.json_doc(&serde_json::to_value(&r)?);
        return Ok(());
    }
    let mut t = table(&["DEVICE", "FROM", "TO", "RESULT"]);
    for i in &r.devices {
        t.add_row(vec![
            i.device.clone(),
            i.from.clone().unwrap_or_else(|| "-".into()),
            i.to.clone().unwrap_or_else(|| "-".into()),
            match (&i.sequence, &i.skipped) {
                (Some(s), _) => format!("sent (sequence {s})"),
                (None, Some(why)) => format!("skipped: {why}"),
                (None, None) => "-".into(),
            },
        ]);
    }
    println!("{t}");
    Ok(())
}

pub async fn push(a: PushArgs, out: Output) -> anyhow::Result<()> {
    let body = read_capped(&a.file, MAX_RELEASE_ENVELOPE)?;
    let server = a.server;
    let r: ReleaseView =
        blocking(move || Client::new(&server)?.post_bytes("/releases", &body)).await?;
    if out.json {
        out.json_doc(&serde_json::to_value(&r)?);
    } else {
        println!(
            "release {} {} catalogued ({} platform(s): {}), signed by {}",
            r.app,
            r.version,
            r.images.len(),
            r.images.keys().cloned().collect::<Vec<_>>().join(", "),
            r.signers.join(", ")
        );
    }
    Ok(())
}

pub async fn releases(a: ListArgs, out: Output) -> anyhow::Result<()> {
    let server = a.server;
    let all: Vec<ReleaseView> = blocking(move || Client::new(&server)?.get("/releases")).await?;
    if out.json {
        out.json_doc(&serde_json::to_value(&all)?);
        return Ok(());
    }
    let mut t = table(&["APP", "VERSION", "PLATFORMS", "SIGNERS", "PUSHED"]);
    for r in &all {
        t.add_row(vec![
            r.app.clone(),
            r.version.clone(),
            r.images.keys().cloned().collect::<Vec<_>>().join(", "),
            r.signers.join(", "),
            r.pushed_at.format("%Y-%m-%d %H:%M").to_string(),
        ]);
    }
    println!("{t}");
    Ok(())
}
