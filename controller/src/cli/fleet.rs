//! `ferryctl devices` and `ferryctl device show`: the inventory, as tables or JSON.

use chrono::{DateTime, Utc};
use clap::Args;

use crate::api::{DeviceDetail, DeviceView};
use crate::client::{blocking, query_escape, Client, ServerArgs};
use crate::{short_digest, table, Output};

#[derive(Debug, Args)]
pub struct DevicesArgs {
    /// Only devices matching this selector (`group=beta`, `site!=north`, `id in (a,b)`).
    #[arg(long, value_name = "SELECTOR")]
    pub select: Option<String>,
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

fn result_cell(d: &DeviceView) -> String {
    match &d.last_result {
        Some(r) => match &r.reason {
            Some(why) => format!("{} (seq {}): {why}", r.phase, r.sequence),
            None => format!("{} (seq {})", r.phase, r.sequence),
        },
        None => "-".into(),
    }
}

pub async fn devices(a: DevicesArgs, out: Output) -> anyhow::Result<()> {
    let path = match &a.select {
        Some(s) => format!("/devices?select={}", query_escape(s)),
        None => "/devices".into(),
    };
    let server = a.server.clone();
    let list: Vec<DeviceView> = blocking(move || Client::new(&server)?.get(&path)).await?;
    if out.json {
        out.json_doc(&serde_json::to_value(&list)?);
        return Ok(());
    }
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
            if d.online { "yes" } else { "no" }.into(),
            ago(d.last_seen),
            labels_cell(d),
            result_cell(d),
        ]);
    }
    println!("{t}");
    println!("{} device(s)", list.len());
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
    println!(
        "sequence     {} accepted, {} sent",
        v.sequence,
        d.desired_sequence.map_or("none".into(), |s| s.to_string())
    );
    println!("last update  {}", result_cell(v));
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
                e.reason.clone().unwrap_or_default(),
            ]);
        }
        println!("recent events (newest first):\n{t}");
    }
    Ok(())
}
