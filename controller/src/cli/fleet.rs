//! `ferryctl devices` and `ferryctl device show`: the inventory, as tables or JSON.

use chrono::{DateTime, Utc};
use clap::Args;

use crate::api::{DeviceDetail, DevicePage, DeviceView};
use crate::client::{blocking, query_escape, Client, ServerArgs};
use crate::server::model::StoredEvent;
use crate::{short_digest, table, Output};

#[derive(Debug, Args)]
pub struct DevicesArgs {
    /// Only devices matching this selector (`group=beta`, `site!=north`, `id in (a,b)`).
    #[arg(long, value_name = "SELECTOR")]
    pub select: Option<String>,
    /// One page of at most N devices (1 to 1000), in id order; `--json` gives the page (devices,
    /// total, next).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// With --limit: the page after this device id (the `next` of the previous page).
    #[arg(long, value_name = "ID", requires = "limit")]
    pub after: Option<String>,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Device id.
    #[arg(value_name = "ID")]
    pub device: String,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// `3m ago`, `2h ago`, `never`.
pub fn ago(t: Option<DateTime<Utc>>) -> String {
    let Some(t) = t else {
        return "never".into();
    };
    let s = (Utc::now() - t).num_seconds().max(0);
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

fn apps_cell(d: &DeviceView) -> String {
    if d.apps.is_empty() {
        return "-".into();
    }
    d.apps
        .iter()
        .map(|(n, a)| format!("{n} {}", a.version))
        .collect::<Vec<_>>()
        .join(", ")
}

fn labels_cell(d: &DeviceView) -> String {
    d.labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The update in progress (`downloaded (seq 5), waiting: window (…)`), else the last result.
fn update_cell(d: &DeviceView) -> String {
    match &d.update {
        Some(u) => u.describe(),
        None => result_cell(d),
    }
}

fn result_cell(d: &DeviceView) -> String {
    match &d.last_result {
        Some(r) => match &r.reason {
            Some(why) => format!("{} (seq {}): {why}", r.phase, r.sequence),
            None => format!("{} (seq {})", r.phase, r.sequence),
        },
        None => "-".into(),
    }
}

/// An event's REASON cell: what it waits for, its reason, its download counters.
fn event_reason(e: &StoredEvent) -> String {
    let mut parts = Vec::new();
    match (e.waiting, &e.reason) {
        (Some(w), Some(r)) => parts.push(format!("waiting: {w} ({r})")),
        (Some(w), None) => parts.push(format!("waiting: {w}")),
        (None, Some(r)) => parts.push(r.clone()),
        (None, None) => {}
    }
    if let Some(d) = &e.download {
        parts.push(format!(
            "[{:.1} MB fetched, {} blob(s) skipped, {} retries, {} resumes, {} restarts]",
            d.fetched_bytes as f64 / 1_000_000.0,
            d.skipped_blobs,
            d.retries,
            d.resumes,
            d.restarts
        ));
    }
    parts.join(" ")
}

pub async fn devices(a: DevicesArgs, out: Output) -> anyhow::Result<()> {
    let mut query: Vec<String> = Vec::new();
    if let Some(s) = &a.select {
        query.push(format!("select={}", query_escape(s)));
    }
    if let Some(n) = a.limit {
        query.push(format!("limit={n}"));
    }
    if let Some(after) = &a.after {
        query.push(format!("after={}", query_escape(after)));
    }
    let path = match query.is_empty() {
        true => "/devices".to_string(),
        false => format!("/devices?{}", query.join("&")),
    };
    let server = a.server.clone();
    let (list, page) = if a.limit.is_some() {
        let page: DevicePage = blocking(move || Client::new(&server)?.get(&path)).await?;
        if out.json {
            out.json_doc(&serde_json::to_value(&page)?);
            return Ok(());
        }
        (page.devices.clone(), Some(page))
    } else {
        let list: Vec<DeviceView> = blocking(move || Client::new(&server)?.get(&path)).await?;
        if out.json {
            out.json_doc(&serde_json::to_value(&list)?);
            return Ok(());
        }
        (list, None)
    };
    let mut t = table(&[
        "DEVICE",
        "PLATFORM",
        "APPS",
        "HEALTH",
        "ONLINE",
        "LAST SEEN",
        "LABELS",
        "LAST UPDATE",
    ]);
    for d in &list {
        t.add_row(vec![
            d.id.clone(),
            d.platform.clone().unwrap_or_else(|| "?".into()),
            apps_cell(d),
            d.health.clone(),
            match (d.online, d.trust.as_ref().is_some_and(|t| t.stale)) {
                (true, false) => "yes",
                (true, true) => "yes, stale",
                (false, false) => "no",
                (false, true) => "no, stale",
            }
            .into(),
            ago(d.last_seen),
            labels_cell(d),
            update_cell(d),
        ]);
    }
    println!("{t}");
    match page {
        Some(p) => println!(
            "{} of {} device(s){}",
            list.len(),
            p.total,
            p.next
                .map(|n| format!("; next page: --after {n}"))
                .unwrap_or_default()
        ),
        None => println!("{} device(s)", list.len()),
    }
    Ok(())
}

pub async fn show(a: ShowArgs, out: Output) -> anyhow::Result<()> {
    let path = format!("/devices/{}", query_escape(&a.device));
    let server = a.server.clone();
    let d: DeviceDetail = blocking(move || Client::new(&server)?.get(&path)).await?;
    if out.json {
        out.json_doc(&serde_json::to_value(&d)?);
        return Ok(());
    }
    let v = &d.device;
    println!("device       {}", v.id);
    println!("platform     {}", v.platform.as_deref().unwrap_or("?"));
    println!("agent        {}", v.agent_version.as_deref().unwrap_or("?"));
    println!("labels       {}", labels_cell(v));
    println!(
        "online       {} (last seen {})",
        if v.online { "yes" } else { "no" },
        ago(v.last_seen)
    );
    println!("health       {}", v.health);
    if let Some(t) = &v.trust {
        println!(
            "trust        version {}{}{}",
            t.version,
            t.heartbeat_at
                .map_or(String::new(), |h| format!(", heartbeat {}", ago(Some(h)))),
            if t.stale {
                ", STALE (no recent controller heartbeat: notices may be withheld)"
            } else {
                ""
            }
        );
        if let Some(e) = &t.error {
            println!("             last trust record refused: {e}");
        }
    }
    println!(
        "sequence     {} accepted, {} sent",
        v.sequence,
        d.desired_sequence.map_or("none".into(), |s| s.to_string())
    );
    println!("last update  {}", update_cell(v));
    if v.update.is_some() && v.last_result.is_some() {
        println!("last result  {}", result_cell(v));
    }
    let mut t = table(&[
        "APP",
        "VERSION",
        "DIGEST",
        "HEALTH",
        "CONTAINER",
        "PREVIOUS",
    ]);
    for (n, s) in &v.apps {
        t.add_row(vec![
            n.clone(),
            s.version.clone(),
            short_digest(&s.digest).to_string(),
            s.health.clone(),
            s.container.clone(),
            v.previous.get(n).cloned().unwrap_or_else(|| "-".into()),
        ]);
    }
    println!("{t}");
    if !d.events.is_empty() {
        let mut t = table(&["TIME", "SEQ", "ROLLOUT", "PHASE", "REASON"]);
        for e in &d.events {
            t.add_row(vec![
                e.ts.format("%Y-%m-%d %H:%M:%S").to_string(),
                e.sequence.to_string(),
                e.rollout.clone().unwrap_or_else(|| "-".into()),
                e.phase.to_string(),
                event_reason(e),
            ]);
        }
        println!("recent events (newest first):\n{t}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::model::{CurrentUpdate, LastResult};
    use ferry_protocol::report::{DownloadStats, Phase, Waiting};

    fn device(update: Option<CurrentUpdate>) -> DeviceView {
        let at = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        DeviceView {
            id: "dev-1".into(),
            platform: Some("linux/arm64".into()),
            agent_version: None,
            labels: Default::default(),
            apps: Default::default(),
            health: "healthy".into(),
            online: true,
            last_seen: Some(at),
            sequence: 4,
            phase: update.as_ref().map(|u| u.phase.to_string()),
            last_result: Some(LastResult {
                sequence: 4,
                rollout: None,
                phase: Phase::Committed,
                reason: None,
                at,
            }),
            update,
            previous: Default::default(),
            telemetry: None,
            trust: None,
        }
    }

    #[test]
    fn last_update_shows_what_an_update_in_progress_waits_for() {
        let at = chrono::DateTime::from_timestamp(1_800_000_100, 0).unwrap();
        let u = CurrentUpdate {
            sequence: 5,
            rollout: Some("r-2".into()),
            phase: Phase::Downloaded,
            waiting: Some(Waiting::Window),
            reason: Some("maintenance window 02:00-04:00 opens in 3 h".into()),
            at,
        };
        assert_eq!(
            update_cell(&device(Some(u))),
            "downloaded (seq 5), waiting: window (maintenance window 02:00-04:00 opens in 3 h)"
        );
        assert_eq!(update_cell(&device(None)), "committed (seq 4)");
    }

    #[test]
    fn event_reasons_name_the_wait_and_the_download_counters() {
        let mut e = StoredEvent {
            device: "dev-1".into(),
            sequence: 5,
            rollout: None,
            phase: Phase::Downloading,
            app: Some("sensor".into()),
            reason: Some("registry unreachable; retrying in 60 s".into()),
            logs: None,
            waiting: Some(Waiting::Retrying),
            download: Some(DownloadStats {
                fetched_bytes: 2_500_000,
                skipped_blobs: 1,
                retries: 3,
                resumes: 2,
                restarts: 0,
            }),
            ts: chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
        };
        assert_eq!(
            event_reason(&e),
            "waiting: retrying (registry unreachable; retrying in 60 s) [2.5 MB fetched, 1 blob(s) skipped, 3 retries, 2 resumes, 0 restarts]"
        );
        e.waiting = None;
        e.download = None;
        e.reason = Some("disk full".into());
        assert_eq!(event_reason(&e), "disk full");
    }
}
