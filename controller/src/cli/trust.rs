//! `ferryctl trust init | rotate | sign | show | publish`: the offline root role's trust records
//! (protocol §10). `init` and `rotate` write an unsigned (or partly signed) record; each root
//! key holder adds a signature with `sign` on their own machine; `show` says whose signatures
//! count and whether the record follows the previous one; `publish` puts it on the broker,
//! retained, fleet-wide or for one device.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use chrono::{SubsecRound, Utc};
use clap::{Args, Subcommand};
use ferry_protocol::dsse::{self, Expect};
use ferry_protocol::error::EnvelopeError;
use ferry_protocol::topics::{check_prefix, fleet_trust, DeviceTopics, DEFAULT_PREFIX};
use ferry_protocol::trust_record::{
    self, RoleKeys, TrustRecord, TrustSet, MAX_TRUST_ENVELOPE, TRUST_PAYLOAD_TYPE,
};
use ferry_protocol::{Envelope, PrivateKey, PublicKey, Role, TrustedKeys};

use crate::mqtt::{self, MqttArgs};
use crate::{read_capped, usage, write_atomic, Output};

#[derive(Debug, Subcommand)]
pub enum TrustCommand {
    /// Write trust record version 1 (the first root): its keys, thresholds and expiry.
    Init(InitArgs),
    /// Write the next version of a record: keys replaced where given, kept where not.
    Rotate(RotateArgs),
    /// Add signatures (root keys, PKCS#8) to a record, in place.
    Sign(SignArgs),
    /// What a record holds, whose signatures count, and whether it follows --previous.
    Show(ShowArgs),
    /// Publish a signed record retained (fleet-wide, or to one device with --device).
    Publish(PublishTrustArgs),
}

#[derive(Debug, Args)]
pub struct KeyArgs {
    /// Root public keys (SPKI PEM).
    #[arg(long = "root", value_name = "PUB", num_args = 1..)]
    pub root: Vec<PathBuf>,
    #[arg(long, value_name = "N")]
    pub root_threshold: Option<usize>,
    /// Release public keys (SPKI PEM).
    #[arg(long = "release", value_name = "PUB", num_args = 1..)]
    pub release: Vec<PathBuf>,
    #[arg(long, value_name = "N")]
    pub release_threshold: Option<usize>,
    /// Controller public keys (SPKI PEM).
    #[arg(long = "controller", value_name = "PUB", num_args = 1..)]
    pub controller: Vec<PathBuf>,
    /// Days until the record expires (boxes refuse notices after that until a newer record).
    #[arg(long, default_value_t = 365, value_name = "DAYS")]
    pub expires_days: u32,
    /// Sign with these root private keys right away (each holder may also `trust sign` later).
    #[arg(long = "sign", value_name = "KEY", num_args = 1..)]
    pub sign: Vec<PathBuf>,
    /// Where to write the record.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub keys: KeyArgs,
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    /// The record the boxes hold now.
    #[arg(long, value_name = "FILE")]
    pub from: PathBuf,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// Set the boxes' accepted-sequence floor to N (recovery from a frozen sequence). Needs
    /// an entirely new controller key set (--controller).
    #[arg(long, value_name = "N")]
    pub sequence_floor: Option<u64>,
    /// Only these devices take the record.
    #[arg(long = "device", value_name = "ID", num_args = 1..)]
    pub devices: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SignArgs {
    /// The record (rewritten in place).
    pub file: PathBuf,
    /// Root private keys (PKCS#8 PEM).
    #[arg(long = "key", value_name = "KEY", num_args = 1.., required = true)]
    pub keys: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    pub file: PathBuf,
    /// The record the boxes hold now: check that FILE follows it.
    #[arg(long, value_name = "FILE")]
    pub previous: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PublishTrustArgs {
    pub file: PathBuf,
    /// Publish to this device's trust topic instead of the fleet-wide one.
    #[arg(long, value_name = "ID")]
    pub device: Option<String>,
    /// Topic prefix.
    #[arg(long, default_value = DEFAULT_PREFIX)]
    pub prefix: String,
    #[command(flatten)]
    pub mqtt: MqttArgs,
}

pub async fn run(cmd: TrustCommand, out: Output) -> anyhow::Result<()> {
    match cmd {
        TrustCommand::Init(a) => init(a, out),
        TrustCommand::Rotate(a) => rotate(a, out),
        TrustCommand::Sign(a) => sign(a, out),
        TrustCommand::Show(a) => show(a, out),
        TrustCommand::Publish(a) => publish(a, out).await,
    }
}

fn pems(paths: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    paths
        .iter()
        .map(|p| {
            PublicKey::load(p)
                .map(|k| k.to_pem())
                .map_err(|e| usage(e.to_string()))
        })
        .collect()
}

fn private_keys(paths: &[PathBuf]) -> anyhow::Result<Vec<PrivateKey>> {
    paths
        .iter()
        .map(|p| PrivateKey::load(p).map_err(|e| usage(e.to_string())))
        .collect()
}

fn expiry(days: u32) -> anyhow::Result<chrono::DateTime<Utc>> {
    if days == 0 {
        return Err(usage("--expires-days must be 1 or more"));
    }
    Ok(Utc::now().trunc_subsecs(0) + chrono::Duration::days(i64::from(days)))
}

/// Check the record, sign it with `sign`, write it to `out`.
fn write(
    record: &TrustRecord,
    sign: &[PathBuf],
    out_path: &Path,
    out: Output,
) -> anyhow::Result<()> {
    TrustRecord::parse(record.to_json().as_bytes()).map_err(|e| usage(e.to_string()))?;
    let keys = private_keys(sign)?;
    let refs: Vec<&PrivateKey> = keys.iter().collect();
    let env = record.sign(&refs);
    write_atomic(out_path, env.to_json_pretty().as_bytes(), 0o644)?;
    report(out_path, &env, None, out)
}

fn init(a: InitArgs, out: Output) -> anyhow::Result<()> {
    let k = &a.keys;
    for (flag, v) in [
        ("--root", &k.root),
        ("--release", &k.release),
        ("--controller", &k.controller),
    ] {
        if v.is_empty() {
            return Err(usage(format!("trust init needs {flag}")));
        }
    }
    let record = TrustRecord {
        version: 1,
        expires_at: expiry(k.expires_days)?,
        root: RoleKeys {
            keys: pems(&k.root)?,
            threshold: k.root_threshold.unwrap_or(1),
        },
        release: RoleKeys {
            keys: pems(&k.release)?,
            threshold: k.release_threshold.unwrap_or(1),
        },
        controller: pems(&k.controller)?,
        sequence_floor: None,
        devices: None,
    };
    write(&record, &k.sign, &k.out, out)
}

fn read_record(path: &Path) -> anyhow::Result<(Envelope, TrustRecord)> {
    let raw = read_capped(path, MAX_TRUST_ENVELOPE)?;
    let env: Envelope = serde_json::from_slice(&raw)
        .with_context(|| format!("{} is not a trust envelope", path.display()))?;
    if env.payload_type != TRUST_PAYLOAD_TYPE {
        bail!(
            "{}: payloadType {:?} is not a trust record",
            path.display(),
            env.payload_type
        );
    }
    let body = env
        .decoded_payload("trust")
        .with_context(|| path.display().to_string())?;
    let record = TrustRecord::parse(&body).with_context(|| path.display().to_string())?;
    Ok((env, record))
}

fn rotate(a: RotateArgs, out: Output) -> anyhow::Result<()> {
    let (_, prev) = read_record(&a.from)?;
    let k = &a.keys;
    let replace = |paths: &Vec<PathBuf>, old: &Vec<String>| -> anyhow::Result<Vec<String>> {
        if paths.is_empty() {
            Ok(old.clone())
        } else {
            pems(paths)
        }
    };
    let root_keys = replace(&k.root, &prev.root.keys)?;
    let release_keys = replace(&k.release, &prev.release.keys)?;
    let record = TrustRecord {
        version: prev
            .version
            .checked_add(1)
            .ok_or_else(|| anyhow!("version {} cannot grow", prev.version))?,
        expires_at: expiry(k.expires_days)?,
        root: RoleKeys {
            threshold: k
                .root_threshold
                .unwrap_or(prev.root.threshold.min(root_keys.len())),
            keys: root_keys,
        },
        release: RoleKeys {
            threshold: k
                .release_threshold
                .unwrap_or(prev.release.threshold.min(release_keys.len())),
            keys: release_keys,
        },
        controller: replace(&k.controller, &prev.controller)?,
        sequence_floor: a.sequence_floor,
        devices: (!a.devices.is_empty()).then(|| a.devices.clone()),
    };
    if record.sequence_floor.is_some()
        && record
            .controller
            .iter()
            .any(|c| prev.controller.contains(c))
    {
        return Err(usage(
            "--sequence-floor needs an entirely new controller key set (--controller with no key of the previous record)",
        ));
    }
    write(&record, &k.sign, &k.out, out)
}

fn sign(a: SignArgs, out: Output) -> anyhow::Result<()> {
    let (env, _) = read_record(&a.file)?;
    let keys = private_keys(&a.keys)?;
    let refs: Vec<&PrivateKey> = keys.iter().collect();
    let env = trust_record::add_signatures(&env, &refs)?;
    write_atomic(&a.file, env.to_json_pretty().as_bytes(), 0o644)?;
    report(&a.file, &env, None, out)
}

fn show(a: ShowArgs, out: Output) -> anyhow::Result<()> {
    let (env, _) = read_record(&a.file)?;
    let previous = match &a.previous {
        Some(p) => Some(read_record(p)?.1),
        None => None,
    };
    report(&a.file, &env, previous.as_ref(), out)
}

/// Distinct valid signatures by `keys` (any count; the threshold is judged by the caller).
fn valid_signatures(raw: &[u8], keys: &TrustedKeys) -> usize {
    let expect = Expect {
        what: "trust",
        max_len: MAX_TRUST_ENVELOPE,
        payload_type: TRUST_PAYLOAD_TYPE,
        role: Role::Root,
        threshold: usize::MAX,
    };
    match dsse::verify(raw, expect, keys) {
        Ok(v) => v.signers.len(),
        Err(EnvelopeError::ThresholdNotMet { valid, .. }) => valid,
        Err(_) => 0,
    }
}

fn report(
    path: &Path,
    env: &Envelope,
    previous: Option<&TrustRecord>,
    out: Output,
) -> anyhow::Result<()> {
    let raw = env.to_json();
    let body = env.decoded_payload("trust")?;
    let record = TrustRecord::parse(&body)?;
    let set: TrustSet = record.keys()?;
    let own = valid_signatures(raw.as_bytes(), &set.root);
    let prev = previous
        .map(|p| -> anyhow::Result<_> {
            let ps = p.keys()?;
            Ok((
                p.version,
                valid_signatures(raw.as_bytes(), &ps.root),
                p.root.threshold,
            ))
        })
        .transpose()?;
    let ready =
        own >= set.root_threshold && prev.is_none_or(|(v, n, t)| n >= t && record.version > v);
    if out.json {
        out.json_doc(&serde_json::json!({
            "file": path.display().to_string(),
            "version": record.version,
            "expires_at": record.expires_at,
            "root": {"keys": set.root.ids().map(|i| i.to_string()).collect::<Vec<_>>(), "threshold": set.root_threshold, "valid_signatures": own},
            "release": {"keys": set.trust.release.ids().map(|i| i.to_string()).collect::<Vec<_>>(), "threshold": set.trust.release_threshold},
            "controller": {"keys": set.trust.controller.ids().map(|i| i.to_string()).collect::<Vec<_>>()},
            "sequence_floor": record.sequence_floor,
            "devices": record.devices,
            "previous": prev.map(|(v, n, t)| serde_json::json!({"version": v, "valid_signatures": n, "threshold": t})),
            "ready": ready,
        }));
        return Ok(());
    }
    println!(
        "{}: trust record version {}, expires {}",
        path.display(),
        record.version,
        record.expires_at.to_rfc3339()
    );
    println!(
        "  root: {} key(s), threshold {}; signed by {own} of them",
        set.root.len(),
        set.root_threshold
    );
    for id in set.root.ids() {
        println!("    {id}");
    }
    println!(
        "  release: {} key(s), threshold {}",
        set.trust.release.len(),
        set.trust.release_threshold
    );
    for id in set.trust.release.ids() {
        println!("    {id}");
    }
    println!("  controller: {} key(s)", set.trust.controller.len());
    for id in set.trust.controller.ids() {
        println!("    {id}");
    }
    if let Some(f) = record.sequence_floor {
        println!("  sets the sequence floor to {f}");
    }
    if let Some(d) = &record.devices {
        println!("  only for: {}", d.join(", "));
    }
    if let Some((v, n, t)) = prev {
        println!("  previous version {v}: signed by {n} of its root keys, {t} needed");
    }
    println!(
        "  {}",
        if ready {
            "ready to publish"
        } else {
            "NOT ready: more root signatures needed (ferryctl trust sign), or not newer than --previous"
        }
    );
    Ok(())
}

async fn publish(a: PublishTrustArgs, out: Output) -> anyhow::Result<()> {
    check_prefix(&a.prefix).map_err(usage)?;
    let (env, record) = read_record(&a.file)?;
    let raw = env.to_json();
    let set = record.keys()?;
    if valid_signatures(raw.as_bytes(), &set.root) < set.root_threshold {
        return Err(usage(format!(
            "{}: not signed by a threshold ({}) of its own root keys; boxes would refuse it",
            a.file.display(),
            set.root_threshold
        )));
    }
    let topic = match &a.device {
        Some(d) => DeviceTopics::new(&a.prefix, d).map_err(usage)?.trust(),
        None => fleet_trust(&a.prefix),
    };
    let (client, mut eventloop) = mqtt::connect(&a.mqtt, "trust").await?;
    mqtt::publish_retained(
        &client,
        &mut eventloop,
        &topic,
        raw.into_bytes(),
        Duration::from_secs(a.mqtt.mqtt_timeout),
    )
    .await
    .with_context(|| {
        format!(
            "publishing trust record version {} to {topic}",
            record.version
        )
    })?;
    if out.json {
        out.json_doc(&serde_json::json!({"topic": topic, "version": record.version}));
    } else {
        println!(
            "published trust record version {} to {topic} (retained)",
            record.version
        );
    }
    Ok(())
}
