//! Broker connection helper: `mqtt://` and `mqtts://` URLs, credentials from flags or the
//! environment, rustls with the ring provider for TLS, and a publish that waits for the PUBACK.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Outgoing,
    Packet, QoS, TlsConfiguration, Transport,
};
use tracing::debug;

/// Large enough for a full desired-state envelope (≤ 256 KiB) and telemetry batches.
pub const MAX_PACKET: usize = 1024 * 1024;

#[derive(Debug, Clone, Args)]
pub struct MqttArgs {
    /// Broker URL: mqtt://HOST[:PORT] (default port 1883) or mqtts://HOST[:PORT] (8883).
    #[arg(long, env = "FERRY_BROKER", value_name = "URL")]
    pub broker: String,
    /// Broker user name.
    #[arg(long, env = "FERRY_MQTT_USER", value_name = "USER")]
    pub mqtt_user: Option<String>,
    /// Broker password.
    #[arg(
        long,
        env = "FERRY_MQTT_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD"
    )]
    pub mqtt_password: Option<String>,
    /// CA certificate(s) (PEM) for mqtts://; default: the system's roots.
    #[arg(long, value_name = "PEM")]
    pub mqtt_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a broker that requires one (`ferryctl cert issue`); needs
    /// --mqtt-key and --mqtt-ca. A broker that takes the certificate's identity as the client id
    /// allows one connection per certificate.
    #[arg(long, value_name = "PEM", requires = "mqtt_key")]
    pub mqtt_cert: Option<PathBuf>,
    /// The private key (PEM) of --mqtt-cert.
    #[arg(long, value_name = "PEM", requires = "mqtt_cert")]
    pub mqtt_key: Option<PathBuf>,
    /// Seconds to wait for the broker to accept the connection (and a PUBACK).
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub mqtt_timeout: u64,
}

pub use ferry_protocol::BrokerUrl;

/// [`BrokerUrl::parse`] (`mqtt://HOST[:PORT]`, `mqtts://HOST[:PORT]`, `[v6]` hosts; the agent and
/// the simulator parse it the same way). Credentials do not go in the URL: use
/// `--mqtt-user/--mqtt-password`.
pub fn parse_broker_url(s: &str) -> anyhow::Result<BrokerUrl> {
    BrokerUrl::parse(s).map_err(|e| anyhow!("broker URL: {e}"))
}

/// A client id unique enough for concurrent ferryctl runs: `ferryctl-<role>-<8 hex>`.
pub fn client_id(role: &str) -> String {
    let mut b = [0u8; 4];
    if getrandom::fill(&mut b).is_err() {
        b = std::process::id().to_le_bytes();
    }
    format!("ferryctl-{role}-{}", hex::encode(b))
}

/// MQTT options for `args` (TLS set up when the URL is mqtts://).
pub fn options(args: &MqttArgs, role: &str) -> anyhow::Result<(MqttOptions, BrokerUrl)> {
    let url = parse_broker_url(&args.broker)?;
    let mut o = MqttOptions::new(client_id(role), url.host.clone(), url.port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET);
    match (&args.mqtt_user, &args.mqtt_password) {
        (Some(u), p) => {
            o.set_credentials(u.clone(), p.clone().unwrap_or_default());
        }
        (None, Some(_)) => bail!("--mqtt-password given without --mqtt-user"),
        (None, None) => {}
    }
    if url.tls {
        o.set_transport(Transport::tls_with_config(tls_config(args)?));
    }
    Ok((o, url))
}

/// MQTT 5 options for `args`, for the connection that reads every device's messages. MQTT 5
/// because of its Maximum Packet Size: the client announces [`MAX_PACKET`] in its CONNECT and the
/// broker must not send it anything larger (it drops such a message for this client, MQTT 5
/// §3.1.2.11.4). On MQTT 3.1.1 one retained message over the limit on any device topic made the
/// client fail the connection on every delivery and reconnect in a loop, deaf to the fleet.
pub fn options_v5(
    args: &MqttArgs,
    role: &str,
) -> anyhow::Result<(rumqttc::v5::MqttOptions, BrokerUrl)> {
    let url = parse_broker_url(&args.broker)?;
    let mut o = rumqttc::v5::MqttOptions::new(client_id(role), url.host.clone(), url.port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_clean_start(true)
        .set_max_packet_size(Some(MAX_PACKET as u32));
    match (&args.mqtt_user, &args.mqtt_password) {
        (Some(u), p) => {
            o.set_credentials(u.clone(), p.clone().unwrap_or_default());
        }
        (None, Some(_)) => bail!("--mqtt-password given without --mqtt-user"),
        (None, None) => {}
    }
    if url.tls {
        o.set_transport(Transport::tls_with_config(tls_config(args)?));
    }
    Ok((o, url))
}

fn tls_config(args: &MqttArgs) -> anyhow::Result<TlsConfiguration> {
    // rumqttc is built without a crypto provider: use ring (no C toolchain surprises).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let read = |what: &str, path: &PathBuf| {
        std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))
    };
    let client_auth = match (&args.mqtt_cert, &args.mqtt_key) {
        (Some(cert), Some(key)) => {
            Some((read("client certificate", cert)?, read("client key", key)?))
        }
        (None, None) => None,
        _ => bail!("a client certificate needs both its certificate and its key"),
    };
    Ok(match &args.mqtt_ca {
        Some(path) => TlsConfiguration::Simple {
            ca: read("CA file", path)?,
            alpn: None,
            client_auth,
        },
        None if client_auth.is_some() => {
            bail!("a client certificate needs the CA of the broker's certificate (--mqtt-ca, [mqtt] ca)")
        }
        None => TlsConfiguration::default(),
    })
}

/// Describe an MQTT 5 connection error for an operator.
pub fn describe_v5(e: &rumqttc::v5::ConnectionError) -> String {
    match e {
        rumqttc::v5::ConnectionError::ConnectionRefused(code) => {
            format!("the broker refused the connection: {code:?}")
        }
        other => other.to_string(),
    }
}

/// Describe a connection error for an operator.
pub fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => {
            let why = match code {
                ConnectReturnCode::BadUserNamePassword => "bad user name or password",
                ConnectReturnCode::NotAuthorized => "not authorized",
                ConnectReturnCode::BadClientId => "client id rejected",
                ConnectReturnCode::ServiceUnavailable => "service unavailable",
                ConnectReturnCode::RefusedProtocolVersion => "protocol version refused",
                ConnectReturnCode::Success => "success?",
            };
            format!("the broker refused the connection: {why}")
        }
        other => other.to_string(),
    }
}

/// Connect and wait for the CONNACK.
pub async fn connect(args: &MqttArgs, role: &str) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let (opts, url) = options(args, role)?;
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let wait = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(ev) => debug!(?ev, "mqtt"),
                Err(e) => return Err(anyhow!("cannot connect to {url}: {}", describe(&e))),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(args.mqtt_timeout), wait)
        .await
        .map_err(|_| {
            anyhow!(
                "cannot connect to {url}: no answer within {}s",
                args.mqtt_timeout
            )
        })??;
    Ok((client, eventloop))
}

/// Publish `payload` retained at QoS 1, wait for the broker's PUBACK, then disconnect.
pub async fn publish_retained(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    topic: &str,
    payload: Vec<u8>,
    timeout: Duration,
) -> anyhow::Result<()> {
    client
        .publish(topic, QoS::AtLeastOnce, true, payload)
        .await
        .context("cannot queue the publish")?;
    let wait = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                Ok(ev) => debug!(?ev, "mqtt"),
                Err(e) => {
                    return Err(anyhow!(
                        "connection lost before the PUBACK: {}",
                        describe(&e)
                    ))
                }
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| anyhow!("no PUBACK within {}s", timeout.as_secs()))??;
    // A clean DISCONNECT; best effort.
    if client.disconnect().await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_are_the_protocol_crate_s() {
        let u = parse_broker_url("mqtt://[::1]:1999").unwrap();
        // Bracketed, as rumqttc needs it to build host:port.
        assert_eq!((u.host.as_str(), u.port), ("[::1]", 1999));
        let e = parse_broker_url("mqtt://u:p@h").unwrap_err().to_string();
        assert!(e.contains("credentials"), "{e}");
    }

    #[test]
    fn client_ids_differ() {
        assert_ne!(client_id("x"), client_id("x"));
        assert!(client_id("publish").starts_with("ferryctl-publish-"));
    }
}
