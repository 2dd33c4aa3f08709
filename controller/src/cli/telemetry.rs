//! `ferryctl telemetry ID [--since 1h] [--metric humidity_pct]`: a device's readings over time,
//! one row per sample time, one column per metric (or `--json`).

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Args;

use crate::api::TelemetrySeries;
use crate::client::{blocking, query_escape, Client, ServerArgs};
use crate::{table, Output};

#[derive(Debug, Args)]
pub struct TelemetryArgs {
    /// Device id.
    #[arg(value_name = "ID")]
    pub device: String,
    /// How far back.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub since: Duration,
    /// Only this metric (`temperature_c`, `humidity_pct`, `cpu_pct`, `mem_used_bytes`, ...).
    #[arg(long)]
    pub metric: Option<String>,
    #[command(flatten)]
    pub server: ServerArgs,
}

fn cell(metric: &str, v: f64) -> String {
    if metric.ends_with("_bytes") {
        format!("{:.1} MiB", v / (1024.0 * 1024.0))
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

pub async fn run(a: TelemetryArgs, out: Output) -> anyhow::Result<()> {
    let mut path = format!(
        "/devices/{}/telemetry?since={}s",
        query_escape(&a.device),
        a.since.as_secs().max(1)
    );
    if let Some(m) = &a.metric {
        path += &format!("&metric={}", query_escape(m));
    }
    let server = a.server.clone();
    let s: TelemetrySeries = blocking(move || Client::new(&server)?.get(&path)).await?;
    if out.json {
        out.json_doc(&serde_json::to_value(&s)?);
        return Ok(());
    }
    if s.series.is_empty() {
        println!(
            "no telemetry from {} in the last {}",
            s.device,
            humantime::format_duration(a.since)
        );
        return Ok(());
    }
    // time → metric → value
    let mut rows: BTreeMap<i64, BTreeMap<&str, f64>> = BTreeMap::new();
    for (m, pts) in &s.series {
        for p in pts {
            rows.entry(p.ts).or_default().insert(m, p.value);
        }
    }
    let metrics: Vec<&str> = s.series.keys().map(String::as_str).collect();
    let mut header = vec!["TIME (UTC)"];
    header.extend(metrics.iter().copied());
    let mut t = table(&header);
    for (ts, vals) in &rows {
        let time = chrono::DateTime::from_timestamp_millis(*ts)
            .map(|d| d.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_else(|| ts.to_string());
        let mut row = vec![time];
        for m in &metrics {
            row.push(
                vals.get(m)
                    .map(|v| cell(m, *v))
                    .unwrap_or_else(|| "-".into()),
            );
        }
        t.add_row(row);
    }
    println!("{t}");
    println!("{} sample time(s) from {}", rows.len(), s.device);
    Ok(())
}
