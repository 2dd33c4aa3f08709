//! `ferry-sim make-release`: a signed release envelope for simulated devices, without a
//! registry (`ferryctl release sign` resolves digests from one; simulated devices pull nothing).

use std::path::PathBuf;

use anyhow::{bail, Context};
use chrono::{SubsecRound, Utc};
use clap::Args;
use ferry_protocol::release::{ContainerSpec, HealthSpec};
use ferry_protocol::{PrivateKey, Release};

use crate::device::fake_digest;

#[derive(Debug, Args)]
pub struct MakeReleaseArgs {
    /// Release signing key(s) (PKCS#8 PEM); one signature each.
    #[arg(long = "key", value_name = "KEY", required = true)]
    pub keys: Vec<PathBuf>,
    #[arg(long, default_value = "sensor")]
    pub app: String,
    #[arg(long)]
    pub version: semver::Version,
    /// Image repository (no tag); default 127.0.0.1:5055/ferry/APP.
    #[arg(long)]
    pub image: Option<String>,
    /// PLATFORM or PLATFORM=sha256:DIGEST (repeatable); without a digest, a stable fake one.
    #[arg(long = "platform", value_name = "PLATFORM[=DIGEST]", default_values = ["linux/arm64", "linux/arm/v7"])]
    pub platforms: Vec<String>,
    /// Where to write the envelope (default: stdout).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

pub fn build(args: &MakeReleaseArgs) -> anyhow::Result<String> {
    let keys = args
        .keys
        .iter()
        .map(|p| PrivateKey::load(p).with_context(|| format!("release key {}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let version = args.version.to_string();
    let mut platforms = std::collections::BTreeMap::new();
    for p in &args.platforms {
        let (name, digest) = match p.split_once('=') {
            Some((n, d)) => (n.to_string(), d.to_string()),
            None => (p.clone(), fake_digest(&args.app, &version, p)),
        };
        if platforms.insert(name.clone(), digest).is_some() {
            bail!("--platform {name} given twice");
        }
    }
    let release = Release {
        app: args.app.clone(),
        version: args.version.clone(),
        image: args
            .image
            .clone()
            .unwrap_or_else(|| format!("127.0.0.1:5055/ferry/{}", args.app)),
        platforms,
        container: ContainerSpec::default(),
        health: HealthSpec::default(),
        created_at: Utc::now().trunc_subsecs(0),
    };
    release.validate()?;
    let refs: Vec<&PrivateKey> = keys.iter().collect();
    Ok(release.sign(&refs).to_json_pretty())
}

pub fn run(args: MakeReleaseArgs) -> anyhow::Result<()> {
    let text = build(&args)?;
    match &args.out {
        Some(p) => {
            std::fs::write(p, text + "\n").with_context(|| format!("write {}", p.display()))?
        }
        None => println!("{text}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::{verify_release, TrustedKeys};

    #[test]
    fn signed_release_verifies() {
        let dir = std::env::temp_dir().join(format!("ferry-sim-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = PrivateKey::from_seed([4; 32]).unwrap();
        let key = dir.join("release.key");
        std::fs::write(&key, k.to_pem()).unwrap();
        let args = MakeReleaseArgs {
            keys: vec![key],
            app: "sensor".into(),
            version: "2.0.0".parse().unwrap(),
            image: None,
            platforms: vec![
                "linux/arm64".into(),
                format!("linux/arm/v7=sha256:{}", "b".repeat(64)),
            ],
            out: None,
        };
        let text = build(&args).unwrap();
        let v =
            verify_release(text.as_bytes(), &TrustedKeys::new([k.public().clone()]), 1).unwrap();
        assert_eq!(v.release.version.to_string(), "2.0.0");
        assert_eq!(
            v.release.platforms["linux/arm64"],
            fake_digest("sensor", "2.0.0", "linux/arm64")
        );
        assert_eq!(
            v.release.platforms["linux/arm/v7"],
            format!("sha256:{}", "b".repeat(64))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
