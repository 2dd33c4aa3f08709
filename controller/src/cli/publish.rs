//! `ferryctl publish`: sign a device's complete desired state and publish it retained, QoS 1.
//!
//! Order of operations: validate everything local (arguments, keys, release envelopes, size) →
//! allocate the sequence (durable before anything leaves the machine; never reused, even when
//! the publish then fails) → sign → connect → publish → wait for the PUBACK.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chrono::{SubsecRound, Utc};
use clap::{Args, ValueEnum};
use ferry_protocol::desired::embed_release;
use ferry_protocol::dsse::{
    self, Expect, MAX_DESIRED_ENVELOPE, MAX_RELEASE_ENVELOPE, RELEASE_PAYLOAD_TYPE,
};
use ferry_protocol::names::check_device_id;
use ferry_protocol::topics::{check_prefix, DeviceTopics, DEFAULT_PREFIX};
use ferry_protocol::{
    verify_notice, verify_release, Desired, Envelope, PrivateKey, Release, Strategy, Trust,
    TrustedKeys,
};
use sha2::{Digest, Sha256};

use crate::mqtt::{self, MqttArgs};
use crate::sequence::{default_state_dir, SequenceError, SequenceStore};
use crate::{read_capped, short_digest, table, usage, Failure, Output};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StrategyArg {
    /// Old stops, new starts (needed when they share host ports).
    StopFirst,
    /// New starts and passes health before old stops.
    StartFirst,
}

impl From<StrategyArg> for Strategy {
    fn from(s: StrategyArg) -> Strategy {
        match s {
            StrategyArg::StopFirst => Strategy::StopFirst,
            StrategyArg::StartFirst => Strategy::StartFirst,
        }
    }
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Controller signing key (PKCS#8 PEM).
    #[arg(long, value_name = "KEY")]
    pub key: PathBuf,
    /// Target device id.
    #[arg(long, value_name = "ID")]
    pub device: String,
    /// Signed release envelope(s): the COMPLETE set of apps the device must run.
    #[arg(long = "release", value_name = "FILE", num_args = 1..)]
    pub releases: Vec<PathBuf>,
    /// Publish an empty app set (the device stops and removes every app).
    #[arg(long, conflicts_with = "releases")]
    pub empty: bool,
    #[arg(long, value_enum, default_value = "stop-first")]
    pub strategy: StrategyArg,
    /// Allow releases older than what the device has committed.
    #[arg(long)]
    pub allow_downgrade: bool,
    /// Ask the device to switch even while an app holds its update lock (never outside its
    /// maintenance windows).
    #[arg(long)]
    pub force: bool,
    /// How long the notice stays valid (e.g. 30m, 12h, 7d).
    #[arg(long, default_value = "7d", value_parser = parse_expires, value_name = "DURATION")]
    pub expires: Duration,
    /// Rollout id echoed in the device's reports.
    #[arg(long, value_name = "ID")]
    pub rollout: Option<String>,
    /// Where sequence counters live (default $FERRY_STATE_DIR or ~/.local/state/ferryctl).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Topic prefix.
    #[arg(long, default_value = DEFAULT_PREFIX)]
    pub prefix: String,
    /// Jump the sequence to N (must be greater than the stored one).
    #[arg(long, value_name = "N")]
    pub sequence: Option<u64>,
    /// Verify each release against these release public keys before publishing (repeatable).
    #[arg(long = "trust-release", value_name = "PUB")]
    pub trust_release: Vec<PathBuf>,
    /// Release signatures required when verifying with --trust-release.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub release_threshold: usize,
    #[command(flatten)]
    pub mqtt: MqttArgs,
}

/// `--expires`: a humantime duration (`90s`, `30m`, `12h`, `7d`, `1w 2d`), 1 minute to 10 years.
pub fn parse_expires(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration like 30m, 12h or 7d: {e}"))?;
    if d < Duration::from_secs(60) {
        return Err(format!("{s:?}: a notice must live at least 1 minute"));
    }
    if d > Duration::from_secs(3650 * 86400) {
        return Err(format!("{s:?}: more than 10 years"));
    }
    Ok(d)
}

/// One release to embed.
#[derive(Debug)]
pub struct LoadedRelease {
    pub path: PathBuf,
    pub release: Release,
    pub envelope: String,
    pub verified_by: Vec<String>,
}

/// Read a release envelope; verify it when `trusted` is given, otherwise only check that it is
/// a well-formed release envelope and read its (unverified) body to learn the app name.
pub fn load_release(
    path: &Path,
    trusted: Option<(&TrustedKeys, usize)>,
) -> anyhow::Result<LoadedRelease> {
    let raw = read_capped(path, MAX_RELEASE_ENVELOPE)?;
    let text =
        String::from_utf8(raw).with_context(|| format!("{} is not UTF-8", path.display()))?;
    let (release, verified_by) = match trusted {
        Some((keys, threshold)) => {
            let v = verify_release(text.as_bytes(), keys, threshold).map_err(|e| {
                anyhow::Error::new(Failure::Verification(format!("{}: {e}", path.display())))
            })?;
            (v.release, v.signers)
        }
        None => {
            let env: Envelope = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a DSSE envelope", path.display()))?;
            if env.payload_type != RELEASE_PAYLOAD_TYPE {
                bail!(
                    "{}: payloadType {:?} is not a release ({RELEASE_PAYLOAD_TYPE})",
                    path.display(),
                    env.payload_type
                );
            }
            if env.signatures.is_empty() {
                bail!("{}: the release is not signed", path.display());
            }
            let body = STANDARD
                .decode(env.payload.as_bytes())
                .map_err(|_| anyhow!("{}: payload is not base64", path.display()))?;
            let r = Release::parse(&body).with_context(|| format!("{}", path.display()))?;
            (r, vec![])
        }
    };
    Ok(LoadedRelease {
        path: path.to_path_buf(),
        release,
        envelope: text,
        verified_by,
    })
}

fn check_rollout(r: &str) -> Result<(), String> {
    if r.is_empty() || r.len() > 128 || r.chars().any(char::is_control) {
        return Err(format!("--rollout {r:?}: 1 to 128 printable characters"));
    }
    Ok(())
}

pub async fn run(args: PublishArgs, out: Output) -> anyhow::Result<()> {
    // ---- everything local first: nothing is consumed if any of this fails
    check_device_id(&args.device).map_err(usage)?;
    check_prefix(&args.prefix).map_err(usage)?;
    if let Some(r) = &args.rollout {
        check_rollout(r).map_err(usage)?;
    }
    if args.releases.is_empty() && !args.empty {
        return Err(usage(
            "no --release given: pass the complete app set, or --empty to make the device run nothing",
        ));
    }
    if args.release_threshold == 0 {
        return Err(usage("--release-threshold must be at least 1"));
    }
    mqtt::parse_broker_url(&args.mqtt.broker).map_err(|e| usage(e.to_string()))?;
    let topics = DeviceTopics::new(&args.prefix, &args.device).map_err(usage)?;
    let key = PrivateKey::load(&args.key)?;
    let release_trust = if args.trust_release.is_empty() {
        None
    } else {
        Some(TrustedKeys::load(&args.trust_release)?)
    };

    let mut loaded: BTreeMap<String, LoadedRelease> = BTreeMap::new();
    for path in &args.releases {
        let l = load_release(
            path,
            release_trust.as_ref().map(|t| (t, args.release_threshold)),
        )?;
        if let Some(prev) = loaded.get(&l.release.app) {
            return Err(usage(format!(
                "two releases for app {:?}: {} and {}",
                l.release.app,
                prev.path.display(),
                path.display()
            )));
        }
        loaded.insert(l.release.app.clone(), l);
    }
    if release_trust.is_none() && !loaded.is_empty() {
        tracing::info!(
            "releases not verified here (no --trust-release); the device will verify them"
        );
    }
    let mut apps = BTreeMap::new();
    for (app, l) in &loaded {
        apps.insert(
            app.clone(),
            embed_release(&l.envelope)
                .with_context(|| format!("cannot embed {}", l.path.display()))?,
        );
    }
    let issued_at = Utc::now().trunc_subsecs(0);
    let expires_at =
        issued_at + chrono::Duration::from_std(args.expires).map_err(|e| usage(e.to_string()))?;
    let mut desired = Desired {
        settings: Default::default(),
        force: args.force,
        device: args.device.clone(),
        sequence: u64::MAX, // the widest number: for the size check below
        issued_at,
        expires_at,
        apps,
        strategy: args.strategy.into(),
        allow_downgrade: args.allow_downgrade,
        rollout: args.rollout.clone(),
    };
    let probe = desired.sign(&[&key]).to_json();
    if probe.len() > MAX_DESIRED_ENVELOPE {
        bail!(
            "the notice would be {} bytes, over the protocol's {MAX_DESIRED_ENVELOPE}-byte limit",
            probe.len()
        );
    }

    // ---- the sequence: durable before publishing, never reused
    let state_dir = match &args.state_dir {
        Some(d) => d.clone(),
        None => default_state_dir()
            .ok_or_else(|| usage("no --state-dir, FERRY_STATE_DIR or HOME to keep sequences in"))?,
    };
    let store = SequenceStore::open(&state_dir)?;
    let sequence = store
        .allocate(&args.device, args.sequence)
        .map_err(|e| match e {
            SequenceError::NotAhead { .. } => usage(e.to_string()),
            other => anyhow::Error::new(other),
        })?;
    desired.sequence = sequence;
    let raw = desired.sign(&[&key]).to_json();

    // Self-check: the notice verifies under our controller key (and, when release keys were
    // given, as a whole, exactly like a device would).
    match &release_trust {
        Some(rt) => {
            let trust = Trust {
                release: rt.clone(),
                release_threshold: args.release_threshold,
                controller: TrustedKeys::new([key.public().clone()]),
            };
            verify_notice(raw.as_bytes(), &trust)
                .map_err(|e| anyhow!("internal error: the notice does not verify: {e}"))?;
        }
        None => {
            let v = dsse::verify(
                raw.as_bytes(),
                Expect::desired(),
                &TrustedKeys::new([key.public().clone()]),
            )
            .map_err(|e| anyhow!("internal error: the notice does not verify: {e}"))?;
            Desired::parse(&v.body)
                .map_err(|e| anyhow!("internal error: the notice does not parse: {e}"))?;
        }
    }

    // ---- publish
    let topic = topics.desired();
    let timeout = Duration::from_secs(args.mqtt.mqtt_timeout);
    let result = async {
        let (client, mut eventloop) = mqtt::connect(&args.mqtt, "publish").await?;
        mqtt::publish_retained(
            &client,
            &mut eventloop,
            &topic,
            raw.clone().into_bytes(),
            timeout,
        )
        .await
    }
    .await;
    if let Err(e) = result {
        return Err(e.context(format!(
            "publishing sequence {sequence} to {topic} failed (sequence {sequence} is consumed; the next publish uses a new one)"
        )));
    }

    let sha = hex::encode(Sha256::digest(raw.as_bytes()));
    if out.json {
        let apps: BTreeMap<&String, serde_json::Value> = loaded
            .iter()
            .map(|(app, l)| {
                (
                    app,
                    serde_json::json!({
                        "version": l.release.version.to_string(),
                        "image": l.release.image,
                        "platforms": l.release.platforms,
                        "file": l.path,
                        "verified_by": l.verified_by,
                    }),
                )
            })
            .collect();
        out.json_doc(&serde_json::json!({
            "ok": true,
            "device": args.device,
            "sequence": sequence,
            "topic": topic,
            "issued_at": issued_at,
            "expires_at": expires_at,
            "strategy": desired.strategy,
            "allow_downgrade": desired.allow_downgrade,
            "force": desired.force,
            "rollout": desired.rollout,
            "apps": apps,
            "keyid": key.public().id().to_string(),
            "sha256": sha,
            "bytes": raw.len(),
        }));
    } else {
        println!("published sequence {sequence} to {topic}");
        println!(
            "strategy {}, expires {}{}{}{}",
            desired.strategy,
            expires_at.to_rfc3339(),
            if desired.allow_downgrade {
                ", downgrade allowed"
            } else {
                ""
            },
            if desired.force {
                ", forced past update locks"
            } else {
                ""
            },
            desired
                .rollout
                .as_deref()
                .map(|r| format!(", rollout {r}"))
                .unwrap_or_default()
        );
        if loaded.is_empty() {
            println!("apps: none (the device will run nothing)");
        } else {
            let mut t = table(&["app", "version", "platforms"]);
            for (app, l) in &loaded {
                let platforms: Vec<String> = l
                    .release
                    .platforms
                    .iter()
                    .map(|(p, d)| format!("{p} {}", short_digest(d)))
                    .collect();
                t.add_row(vec![
                    app.clone(),
                    l.release.version.to_string(),
                    platforms.join("\n"),
                ]);
            }
            println!("{t}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_parsing() {
        assert_eq!(parse_expires("7d").unwrap(), Duration::from_secs(7 * 86400));
        assert_eq!(
            parse_expires("12h").unwrap(),
            Duration::from_secs(12 * 3600)
        );
        assert_eq!(parse_expires("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(
            parse_expires("1w 2d").unwrap(),
            Duration::from_secs(9 * 86400)
        );
        assert_eq!(parse_expires(" 90s ").unwrap(), Duration::from_secs(90));
        for bad in ["", "7", "soon", "-1d", "30s", "0d", "20000d"] {
            assert!(parse_expires(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rollout_ids() {
        assert!(check_rollout("r-12").is_ok());
        assert!(check_rollout("").is_err());
        assert!(check_rollout("a\nb").is_err());
        assert!(check_rollout(&"x".repeat(129)).is_err());
    }

    #[test]
    fn release_files_checked() {
        use ferry_protocol::release::{ContainerSpec, HealthSpec};
        let d = tempfile::tempdir().unwrap();
        let rk = PrivateKey::from_seed([1; 32]).unwrap();
        let other = PrivateKey::from_seed([2; 32]).unwrap();
        let r = Release {
            app: "sensor".into(),
            version: semver::Version::new(1, 0, 0),
            image: "127.0.0.1:5055/ferry/sensor".into(),
            platforms: [(
                "linux/arm64".to_string(),
                format!("sha256:{}", "a".repeat(64)),
            )]
            .into(),
            container: ContainerSpec::default(),
            health: HealthSpec::default(),
            created_at: Utc::now().trunc_subsecs(0),
        };
        let path = d.path().join("r.json");
        std::fs::write(&path, r.sign(&[&rk]).to_json_pretty()).unwrap();
        // Unverified: app learned from the body.
        let l = load_release(&path, None).unwrap();
        assert_eq!(l.release, r);
        assert!(l.verified_by.is_empty());
        // Verified with the right key.
        let t = TrustedKeys::new([rk.public().clone()]);
        let l = load_release(&path, Some((&t, 1))).unwrap();
        assert_eq!(l.verified_by, vec![rk.public().id().to_string()]);
        // Wrong key: a verification failure (exit 3).
        let t = TrustedKeys::new([other.public().clone()]);
        let e = load_release(&path, Some((&t, 1))).unwrap_err();
        assert_eq!(crate::exit_code(&e), crate::exit::VERIFICATION);
        // A desired-state envelope is not a release.
        let not = d.path().join("n.json");
        std::fs::write(
            &not,
            Envelope::sign(dsse::DESIRED_PAYLOAD_TYPE, b"{}", &[&rk]).to_json(),
        )
        .unwrap();
        assert!(load_release(&not, None).is_err());
        std::fs::write(&not, "not json").unwrap();
        assert!(load_release(&not, None).is_err());
    }
}
