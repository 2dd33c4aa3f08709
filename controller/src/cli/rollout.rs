//! `ferryctl rollout start|status|pause|resume|abort|list`, `ferryctl rollback` and
//! `ferryctl release push|list`: the operator's side of the controller's API.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use ferry_protocol::desired::Strategy;
use ferry_protocol::dsse::MAX_RELEASE_ENVELOPE;

use crate::api::{
    ReleaseView, RollbackRequest, RollbackResult, RolloutOp, RolloutView, StartRollout,
};
use crate::client::{blocking, query_escape, Client, ServerArgs};
use crate::rollout::waves::{OnFailure, WaveSummary};
use crate::{exit, read_capped, table, usage, Output};

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
    /// How long a notified device may go without reporting progress, online; not counted while
    /// it waits for its maintenance window or an update lock (default: the server's).
    #[arg(long, value_name = "DURATION")]
    pub device_timeout: Option<String>,
    #[arg(long, value_enum)]
    pub strategy: Option<StrategyArg>,
    /// On too many failures: pause (default), or pause and send every updated device back.
    #[arg(long, value_enum)]
    pub on_failure: Option<OnFailureArg>,
    /// Every notice of the rollout (reverts too) asks the devices to switch even while an app
    /// holds its update lock (never outside their maintenance windows).
    #[arg(long)]
    pub force: bool,
    /// A value for one of the release's settable keys (repeat it for more), over what each
    /// device was last given: a site's APN, a sensor's offset. Checked against the release's
    /// declaration by the server and by every device.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_setting)]
    pub set: Vec<(String, String)>,
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
    /// The notices ask the devices to switch even while an app holds its update lock.
    #[arg(long)]
    pub force: bool,
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
        RolloutCommand::Pause(a) => op(a, RolloutOp::Pause, out).await.map(|()| exit::OK),
        RolloutCommand::Resume(a) => op(a, RolloutOp::Resume, out).await.map(|()| exit::OK),
        RolloutCommand::Abort(a) => op(a, RolloutOp::Abort, out).await.map(|()| exit::OK),
        RolloutCommand::List(a) => list(a, out).await.map(|()| exit::OK),
    }
}

/// `KEY=VALUE` (the value may hold `=`).
fn parse_setting(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))?;
    ferry_protocol::settings::check_key(k)?;
    Ok((k.to_string(), v.to_string()))
}

fn settings_map(set: Vec<(String, String)>) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (k, v) in set {
        if out.insert(k.clone(), v).is_some() {
            return Err(usage(format!("--set {k} given twice")));
        }
    }
    Ok(out)
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
        force: a.force,
        settings: settings_map(a.set)?,
    };
    let server = a.server;
    let v: RolloutView = blocking(move || Client::new(&server)?.post("/rollouts", &req)).await?;
    if out.json {
        out.json_doc(&serde_json::to_value(&v)?);
    } else {
        println!(
            "rollout {} started: {} {} to {} device(s) matching `{}`, waves {} (targets {:?}), soak {}s{}",
            v.id,
            v.app,
            v.version,
            v.summary.devices,
            v.select,
            v.waves,
            v.targets,
            v.soak_s,
            if v.force {
                ", forced past update locks"
            } else {
                ""
            }
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

/// Waiting groups shown by `rollout status` (reasons such as "opens in 3 h 10 min" can differ
/// from device to device).
const MAX_WAIT_GROUPS: usize = 10;

/// The first five ids, `(+N)` for the rest.
fn some_ids(ids: &[String]) -> String {
    let shown: Vec<&str> = ids.iter().take(5).map(String::as_str).collect();
    let more = ids.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} (+{more})", shown.join(", "))
    } else {
        shown.join(", ")
    }
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
        "waves {}  soak {}s  max failures {} per wave  on failure: {:?}  strategy: {}{}\n",
        v.waves,
        v.soak_s,
        v.max_failures,
        v.on_failure,
        v.strategy,
        if v.force {
            "  force (update locks ignored)"
        } else {
            ""
        }
    );
    o += &format!(
        "devices {}: {} succeeded, {} soaking, {} notified, {} failed, {} pending ({} offline)\n",
        s.devices, s.succeeded, s.soaking, s.notified, s.failed, s.pending, s.pending_offline
    );
    if s.held_window + s.held_lock + s.retrying > 0 {
        o += &format!(
            "of the notified: {} held by a maintenance window, {} held by an update lock (held devices do not time out), {} retrying their download\n",
            s.held_window, s.held_lock, s.retrying
        );
    }
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
            "{mark} wave {} {} {:>4}/{:<4} ok {:<4} fail {:<4} busy {:<4} held {:<4} retrying {:<4}{}\n",
            w.index + 1,
            bar(w, 30),
            w.succeeded,
            w.devices.max(size),
            w.succeeded,
            w.failed,
            w.notified + w.soaking,
            w.held_window + w.held_lock,
            w.retrying,
            if w.started { "" } else { "  (not started)" }
        );
    }
    if !s.waiting.is_empty() {
        o += "waiting:\n";
        for g in s.waiting.iter().take(MAX_WAIT_GROUPS) {
            o += &format!(
                "  {:>4} x {}{}: {}\n",
                g.devices.len(),
                g.waiting,
                g.reason
                    .as_ref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default(),
                some_ids(&g.devices)
            );
        }
        let more = s.waiting.len().saturating_sub(MAX_WAIT_GROUPS);
        if more > 0 {
            o += &format!("  … and {more} more reason(s) (--json lists them all)\n");
        }
    }
    if !s.failures.is_empty() {
        o += "failures:\n";
        for (reason, ids) in &s.failures {
            o += &format!("  {:>4} x {reason}: {}\n", ids.len(), some_ids(ids));
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

async fn op(a: IdArgs, op: RolloutOp, out: Output) -> anyhow::Result<()> {
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
        force: a.force,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::waves::{Summary, WaitGroup};
    use ferry_protocol::report::Waiting;

    fn view(summary: Summary, force: bool) -> RolloutView {
        let at = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        RolloutView {
            settings: Default::default(),
            id: "r-3".into(),
            app: "sensor".into(),
            version: "2.0.0".into(),
            strategy: Strategy::StopFirst,
            select: "all".into(),
            waves: "1,100%".into(),
            targets: vec![1, 12],
            soak_s: 60.0,
            device_timeout_s: 600.0,
            max_failures: "0".into(),
            on_failure: OnFailure::Pause,
            force,
            state: "running".into(),
            reason: None,
            current_wave: Some(1),
            created_at: at,
            updated_at: at,
            summary,
            reverted: vec![],
            revert_failed: Default::default(),
            devices: None,
        }
    }

    #[test]
    fn status_shows_held_and_retrying_devices_with_their_reasons() {
        let window = "maintenance window 02:00-04:00 opens in 3 h";
        let ids = |n: usize| (0..n).map(|i| format!("dev-{i}")).collect::<Vec<_>>();
        let summary = Summary {
            devices: 12,
            notified: 10,
            succeeded: 1,
            held_window: 7,
            held_lock: 1,
            retrying: 2,
            waves: vec![
                WaveSummary {
                    index: 0,
                    target: 1,
                    started: true,
                    devices: 1,
                    succeeded: 1,
                    ..Default::default()
                },
                WaveSummary {
                    index: 1,
                    target: 12,
                    started: true,
                    devices: 10,
                    notified: 10,
                    held_window: 7,
                    held_lock: 1,
                    retrying: 2,
                    ..Default::default()
                },
            ],
            waiting: vec![
                WaitGroup {
                    waiting: Waiting::Window,
                    reason: Some(window.into()),
                    devices: ids(7),
                },
                WaitGroup {
                    waiting: Waiting::Retrying,
                    reason: Some("registry unreachable".into()),
                    devices: vec!["dev-8".into(), "dev-9".into()],
                },
                WaitGroup {
                    waiting: Waiting::Lock,
                    reason: None,
                    devices: vec!["dev-7".into()],
                },
            ],
            ..Default::default()
        };
        let text = render(&view(summary, true));
        assert!(text.contains("force (update locks ignored)"), "{text}");
        assert!(
            text.contains(
                "of the notified: 7 held by a maintenance window, 1 held by an update lock"
            ),
            "{text}"
        );
        assert!(text.contains("2 retrying their download"), "{text}");
        let wave2 = text.lines().find(|l| l.contains("wave 2")).unwrap();
        assert!(
            wave2.contains("held 8") && wave2.contains("retrying 2"),
            "{wave2}"
        );
        assert!(
            text.contains(&format!(
                "     7 x window ({window}): dev-0, dev-1, dev-2, dev-3, dev-4 (+2)"
            )),
            "{text}"
        );
        assert!(
            text.contains("2 x retrying (registry unreachable): dev-8, dev-9"),
            "{text}"
        );
        assert!(text.contains("1 x lock: dev-7"), "{text}");
        // nothing waits, nothing forced: no such lines
        let quiet = render(&view(Summary::default(), false));
        assert!(
            !quiet.contains("force") && !quiet.contains("waiting:"),
            "{quiet}"
        );
        assert!(!quiet.contains("of the notified"), "{quiet}");
    }

    #[test]
    fn many_waiting_reasons_are_cut_short() {
        let summary = Summary {
            waiting: (0..13)
                .map(|i| WaitGroup {
                    waiting: Waiting::Window,
                    reason: Some(format!("opens in {i} min")),
                    devices: vec![format!("dev-{i}")],
                })
                .collect(),
            ..Default::default()
        };
        let text = render(&view(summary, false));
        assert_eq!(text.matches(" x window (opens in").count(), MAX_WAIT_GROUPS);
        assert!(text.contains("… and 3 more reason(s)"), "{text}");
    }

    #[test]
    fn force_is_sent_only_when_asked() {
        let mut req = StartRollout {
            settings: Default::default(),
            app: "sensor".into(),
            version: "2.0.0".into(),
            select: "all".into(),
            waves: "100%".into(),
            soak: "1m".into(),
            max_failures: "0".into(),
            device_timeout: None,
            strategy: None,
            on_failure: None,
            force: false,
        };
        // a server that predates `force` refuses unknown fields: leave it out unless set
        let j = serde_json::to_value(&req).unwrap();
        assert!(j.get("force").is_none(), "{j}");
        assert_eq!(serde_json::from_value::<StartRollout>(j).unwrap(), req);
        req.force = true;
        let j = serde_json::to_value(&req).unwrap();
        assert_eq!(j["force"], true);
        assert!(serde_json::from_value::<StartRollout>(j).unwrap().force);
        let rb = RollbackRequest {
            select: "all".into(),
            app: "sensor".into(),
            force: false,
        };
        assert!(serde_json::to_value(&rb).unwrap().get("force").is_none());
        let rb: RollbackRequest =
            serde_json::from_str(r#"{"select": "all", "app": "sensor", "force": true}"#).unwrap();
        assert!(rb.force);
    }
}
