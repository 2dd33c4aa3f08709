//! `ferry-sim notify`: sign and publish one desired-state notice per simulated device as fast as
//! one connection allows, the way a controller would. A baseline for the benchmark: how fast
//! notices can reach the simulated fleet on this machine at all, controller logic aside.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use chrono::{SubsecRound, Utc};
use clap::Args;
use ferry_protocol::desired::embed_release;
use ferry_protocol::topics::DeviceTopics;
use ferry_protocol::{Desired, PrivateKey, Release, Strategy};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use tracing::warn;

use crate::sim::{parse_broker, MAX_PACKET};

#[derive(Debug, Args)]
pub struct NotifyArgs {
    /// Broker URL, mqtt://HOST[:PORT].
    #[arg(long, env = "FERRY_BROKER", value_name = "URL")]
    pub broker: String,
    #[arg(long, default_value = "ferry")]
    pub prefix: String,
    /// Controller signing key (PKCS#8 PEM).
    #[arg(long, value_name = "KEY")]
    pub key: PathBuf,
    /// Signed release envelope(s): the complete app set.
    #[arg(long = "release", value_name = "FILE", required = true)]
    pub releases: Vec<PathBuf>,
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    #[arg(long, default_value = "sim-")]
    pub id_prefix: String,
    #[arg(long, default_value_t = 0)]
    pub first: usize,
    /// Sequence of every notice (default: the current unix time, so reruns are newer).
    #[arg(long)]
    pub sequence: Option<u64>,
    #[arg(long, default_value = "baseline")]
    pub rollout: String,
}

pub async fn run(a: NotifyArgs) -> anyhow::Result<()> {
    let (host, port) = parse_broker(&a.broker)?;
    let key = PrivateKey::load(&a.key)?;
    let mut apps = BTreeMap::new();
    for p in &a.releases {
        let text = std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?;
        let env: ferry_protocol::Envelope = serde_json::from_str(&text)?;
        let body = base64_decode(&env.payload)?;
        let r = Release::parse(&body)?;
        apps.insert(r.app.clone(), embed_release(&text)?);
    }
    let sequence = a
        .sequence
        .unwrap_or_else(|| Utc::now().timestamp().max(1) as u64);
    let issued_at = Utc::now().trunc_subsecs(0);
    let t0 = Instant::now();
    let mut notices = Vec::with_capacity(a.devices);
    for i in 0..a.devices {
        let id = format!("{}{:05}", a.id_prefix, a.first + i);
        let topic = DeviceTopics::new(&a.prefix, &id)
            .map_err(|e| anyhow!(e))?
            .desired();
        let d = Desired {
            settings: Default::default(),
            force: false,
            device: id,
            sequence,
            issued_at,
            expires_at: issued_at + chrono::Duration::days(1),
            apps: apps.clone(),
            strategy: Strategy::StopFirst,
            allow_downgrade: false,
            rollout: Some(a.rollout.clone()),
        };
        notices.push((topic, d.sign(&[&key]).to_json().into_bytes()));
    }
    let signed = t0.elapsed();

    let mut opts = MqttOptions::new(
        format!("ferry-sim-notify-{}", std::process::id()),
        host,
        port,
    );
    opts.set_keep_alive(Duration::from_secs(60))
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        .set_inflight(500);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let n = notices.len();
    let t1 = Instant::now();
    let sender = tokio::spawn(async move {
        for (topic, body) in notices {
            if client
                .publish(topic, QoS::AtLeastOnce, true, body)
                .await
                .is_err()
            {
                break;
            }
        }
        client
    });
    let mut acked = 0;
    while acked < n {
        match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::PubAck(_))) => acked += 1,
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "MQTT error");
                anyhow::bail!("connection lost after {acked} of {n} notices: {e}");
            }
        }
    }
    let published = t1.elapsed();
    let client = sender.await?;
    let _ = client.try_disconnect();
    println!(
        "{n} notices: signed in {} ms, published and acknowledged in {} ms ({:.0}/s)",
        signed.as_millis(),
        published.as_millis(),
        n as f64 / published.as_secs_f64().max(1e-3)
    );
    Ok(())
}

fn base64_decode(s: &str) -> anyhow::Result<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .context("release payload is not base64")
}
