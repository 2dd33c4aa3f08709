//! `ferryctl release sign` and `ferryctl release verify`.
//!
//! A release spec (TOML) names the app, its version, the image as `REPO:TAG` (or `REPO@sha256:..`)
//! and how it runs. Signing resolves every platform's IMAGE manifest digest from the registry
//! (never the index digest), builds a [`Release`], validates it and writes the DSSE envelope.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use chrono::{DateTime, SubsecRound, Utc};
use clap::{Args, Subcommand};
use ferry_protocol::dsse::MAX_RELEASE_ENVELOPE;
use ferry_protocol::names::{check_app_name, check_platform};
use ferry_protocol::release::{ContainerSpec, HealthSpec};
use ferry_protocol::{verify_release, HealthCheck, PrivateKey, PublicKey, Release, TrustedKeys};
use ferry_registry::{Credential, ImageReference, RegistryClient};
use serde::Deserialize;

use crate::{read_capped, short_digest, table, usage, write_atomic, Failure, Output};

#[derive(Debug, Subcommand)]
pub enum ReleaseCommand {
    /// Resolve per-platform image digests and sign a release record.
    Sign(SignArgs),
    /// Verify a signed release against trusted release keys.
    Verify(VerifyArgs),
    /// Upload a signed release to the controller's catalogue (it verifies it first).
    Push(super::rollout::PushArgs),
    /// The controller's release catalogue.
    List(super::rollout::ListArgs),
}

#[derive(Debug, Args)]
#[command(disable_version_flag = true)]
pub struct SignArgs {
    /// Release signing key (PKCS#8 PEM); repeat for several signatures (thresholds).
    #[arg(long = "key", required = true, value_name = "KEY")]
    pub keys: Vec<PathBuf>,
    /// The release spec (TOML).
    #[arg(
        long,
        value_name = "TOML",
        required_unless_present = "compose",
        conflicts_with = "compose"
    )]
    pub spec: Option<PathBuf>,
    /// A Compose file instead of a spec: each service (or the one --service names) becomes a
    /// release of the app of its name (see `cli/compose`).
    #[arg(long, value_name = "YAML")]
    pub compose: Option<PathBuf>,
    /// With --compose: only this service.
    #[arg(long, value_name = "NAME")]
    pub service: Option<String>,
    /// With --compose: the release's version (default: the image's tag, if it is a semantic
    /// version).
    #[arg(long = "version", value_name = "SEMVER")]
    pub release_version: Option<semver::Version>,
    /// With --compose: host directories bind mounts may come from (the boxes'
    /// `policy.allowed_bind_prefixes`); repeatable.
    #[arg(
        long = "allowed-bind-prefix",
        value_name = "DIR",
        default_value = "/var/lib/ferry-apps"
    )]
    pub bind_prefixes: Vec<String>,
    /// Where to write the signed release envelope (JSON). With --compose and several services, a
    /// directory that gets APP-VERSION.json for each.
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Registry user name (for the image's registry).
    #[arg(long, env = "FERRY_REGISTRY_USER", value_name = "USER")]
    pub registry_user: Option<String>,
    /// Registry password.
    #[arg(
        long,
        env = "FERRY_REGISTRY_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD"
    )]
    pub registry_password: Option<String>,
    /// A registry (HOST or HOST:PORT) to reach over plain HTTP; localhost/127.0.0.0/8 always are.
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub insecure_registries: Vec<String>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Trusted release public key (SPKI PEM); repeatable.
    #[arg(long = "trust", required = true, value_name = "PUB")]
    pub trust: Vec<PathBuf>,
    /// How many distinct trusted keys must have signed.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub threshold: usize,
    /// The release envelope to verify.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// The release spec file. Unknown keys are errors, at every level.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseSpec {
    pub app: String,
    pub version: semver::Version,
    /// `REPO:TAG` or `REPO@sha256:...`
    pub image: String,
    /// Restrict to these platforms (default: every platform the image provides).
    #[serde(default)]
    pub platforms: Option<Vec<String>>,
    #[serde(default)]
    pub container: ContainerSpec,
    #[serde(default)]
    pub health: HealthSpec,
}

impl ReleaseSpec {
    pub fn parse(text: &str) -> anyhow::Result<ReleaseSpec> {
        let spec: ReleaseSpec = toml::from_str(text).map_err(|e| anyhow!("{e}"))?;
        spec.check()?;
        Ok(spec)
    }

    /// The checks a spec passes before anything is resolved or signed.
    pub fn check(&self) -> anyhow::Result<()> {
        let spec = self;
        check_app_name(&spec.app).map_err(|e| anyhow!("app: {e}"))?;
        let r = spec.image_ref()?;
        if r.reference().is_none() {
            bail!(
                "image {:?} needs a tag or digest (REPO:TAG or REPO@sha256:...)",
                spec.image
            );
        }
        if let Some(ps) = &spec.platforms {
            if ps.is_empty() {
                bail!("platforms: empty list (leave it out to take every platform)");
            }
            for (i, p) in ps.iter().enumerate() {
                check_platform(p).map_err(|e| anyhow!("platforms: {e}"))?;
                if ps[..i].contains(p) {
                    bail!("platforms: {p} listed twice");
                }
            }
        }
        Ok(())
    }

    pub fn load(path: &Path) -> anyhow::Result<ReleaseSpec> {
        let text = String::from_utf8(read_capped(path, 1024 * 1024)?)
            .with_context(|| format!("{} is not UTF-8", path.display()))?;
        Self::parse(&text).with_context(|| format!("release spec {}", path.display()))
    }

    pub fn image_ref(&self) -> anyhow::Result<ImageReference> {
        ImageReference::parse(&self.image).map_err(|e| anyhow!("image: {e}"))
    }

    /// The release for `resolved` (platform → image manifest digest), restricted to the spec's
    /// platforms, validated.
    pub fn build(
        &self,
        resolved: &BTreeMap<String, String>,
        created_at: DateTime<Utc>,
    ) -> anyhow::Result<Release> {
        let platforms: BTreeMap<String, String> = match &self.platforms {
            None => resolved.clone(),
            Some(want) => {
                let missing: Vec<&str> = want
                    .iter()
                    .filter(|p| !resolved.contains_key(*p))
                    .map(String::as_str)
                    .collect();
                if !missing.is_empty() {
                    bail!(
                        "image {} has no {} (it provides: {})",
                        self.image,
                        missing.join(", "),
                        resolved.keys().cloned().collect::<Vec<_>>().join(", ")
                    );
                }
                want.iter()
                    .map(|p| (p.clone(), resolved[p].clone()))
                    .collect()
            }
        };
        let release = Release {
            app: self.app.clone(),
            version: self.version.clone(),
            image: self.image_ref()?.repository.full(),
            platforms,
            container: self.container.clone(),
            health: self.health.clone(),
            created_at,
        };
        release.validate().context("the release is not valid")?;
        Ok(release)
    }
}

/// Load keys, dropping repeats of the same key.
fn load_keys(paths: &[PathBuf]) -> anyhow::Result<Vec<PrivateKey>> {
    let mut keys: Vec<PrivateKey> = Vec::new();
    for p in paths {
        let k = PrivateKey::load(p)?;
        if keys.iter().any(|have| have.public() == k.public()) {
            tracing::warn!(key = %p.display(), "the same key was given twice; signing once");
            continue;
        }
        keys.push(k);
    }
    Ok(keys)
}

pub async fn sign(args: SignArgs, out: Output) -> anyhow::Result<()> {
    if args.compose.is_none() && (args.service.is_some() || args.release_version.is_some()) {
        return Err(usage("--service and --version go with --compose"));
    }
    let keys = load_keys(&args.keys)?;
    let jobs: Vec<(ReleaseSpec, PathBuf)> = match (&args.spec, &args.compose) {
        (Some(spec), None) => vec![(ReleaseSpec::load(spec)?, args.out.clone())],
        (None, Some(file)) => {
            let apps = super::compose::load(
                file,
                &super::compose::ComposeOptions {
                    service: args.service.clone(),
                    version: args.release_version.clone(),
                    bind_prefixes: args.bind_prefixes.clone(),
                },
            )?;
            for a in &apps {
                a.spec
                    .check()
                    .with_context(|| format!("compose service {}", a.service))?;
            }
            if apps.len() == 1 && !args.out.is_dir() {
                apps.into_iter()
                    .map(|a| (a.spec, args.out.clone()))
                    .collect()
            } else {
                std::fs::create_dir_all(&args.out)
                    .with_context(|| format!("cannot create {}", args.out.display()))?;
                apps.into_iter()
                    .map(|a| {
                        let file = args
                            .out
                            .join(format!("{}-{}.json", a.spec.app, a.spec.version));
                        (a.spec, file)
                    })
                    .collect()
            }
        }
        _ => return Err(usage("give --spec or --compose")),
    };
    let mut docs = Vec::new();
    for (spec, path) in &jobs {
        docs.push(sign_one(&args, &keys, spec, path, out).await?);
    }
    if out.json {
        if args.compose.is_some() {
            out.json_doc(&serde_json::json!({ "releases": docs }));
        } else if let Some(d) = docs.pop() {
            out.json_doc(&d);
        }
    }
    Ok(())
}

/// Resolve, sign, self-check and write one release; its summary for `--json`.
async fn sign_one(
    args: &SignArgs,
    keys: &[PrivateKey],
    spec: &ReleaseSpec,
    path: &Path,
    out: Output,
) -> anyhow::Result<serde_json::Value> {
    let image = spec.image_ref()?;
    let creds = match (&args.registry_user, &args.registry_password) {
        (Some(u), Some(p)) => vec![Credential {
            registry: image.repository.registry.clone(),
            username: u.clone(),
            password: p.clone(),
        }],
        (None, None) => vec![],
        _ => return Err(usage("--registry-user and --registry-password go together")),
    };
    let client = RegistryClient::new(creds, args.insecure_registries.clone());
    let repo = image.repository.full();
    let reference = image
        .reference()
        .expect("checked when parsing the spec")
        .to_string();
    tracing::info!(%repo, %reference, "resolving platforms");
    let resolved = {
        let (repo, reference) = (repo.clone(), reference.clone());
        tokio::task::spawn_blocking(move || client.platform_digests(&repo, &reference))
            .await
            .context("registry task")?
            .with_context(|| format!("cannot resolve {}", spec.image))?
    };
    let release = spec.build(&resolved, Utc::now().trunc_subsecs(0))?;
    let key_refs: Vec<&PrivateKey> = keys.iter().collect();
    let envelope = release.sign(&key_refs);
    let mut text = envelope.to_json_pretty();
    text.push('\n');
    if text.len() > MAX_RELEASE_ENVELOPE {
        bail!(
            "the signed release is {} bytes, over the protocol's {MAX_RELEASE_ENVELOPE}-byte limit",
            text.len()
        );
    }
    // Self-check before anything is written: what we produce must verify.
    let trusted = TrustedKeys::new(keys.iter().map(|k| k.public().clone()));
    verify_release(text.as_bytes(), &trusted, keys.len())
        .map_err(|e| anyhow!("internal error: the signed release does not verify: {e}"))?;
    write_atomic(path, text.as_bytes(), 0o644)?;

    let keyids: Vec<String> = keys.iter().map(|k| k.public().id().to_string()).collect();
    if !out.json {
        println!(
            "signed {} {} -> {}",
            release.app,
            release.version,
            path.display()
        );
        print_release(&release);
        for k in &keyids {
            println!("signed by  {k}");
        }
    }
    Ok(serde_json::json!({
        "app": release.app,
        "version": release.version.to_string(),
        "image": release.image,
        "source": spec.image,
        "platforms": release.platforms,
        "created_at": release.created_at,
        "keyids": keyids,
        "out": path,
    }))
}

fn check_summary(h: &HealthSpec) -> String {
    let check = match &h.check {
        None => "running (no check)".to_string(),
        Some(HealthCheck::Http { port, path }) => format!("http :{port}{path}"),
        Some(HealthCheck::Tcp { port }) => format!("tcp :{port}"),
        Some(HealthCheck::Exec(argv)) => format!("exec {}", argv.join(" ")),
        Some(HealthCheck::Docker {}) => "docker HEALTHCHECK".to_string(),
    };
    let mut parts = vec![check];
    for (name, v) in [
        ("grace", h.grace_s),
        ("interval", h.interval_s),
        ("timeout", h.timeout_s),
        ("deadline", h.deadline_s),
    ] {
        if let Some(v) = v {
            parts.push(format!("{name} {v}s"));
        }
    }
    if let Some(v) = h.successes {
        parts.push(format!("successes {v}"));
    }
    if let Some(v) = h.max_failures {
        parts.push(format!("max failures {v}"));
    }
    parts.join(", ")
}

fn container_summary(c: &ContainerSpec) -> String {
    let mut parts = Vec::new();
    if let Some(cmd) = &c.cmd {
        parts.push(format!("cmd {}", cmd.join(" ")));
    }
    for p in &c.ports {
        parts.push(format!(
            "port {}->{}/{}",
            p.host,
            p.container,
            serde_json::to_value(p.proto)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        ));
    }
    for b in &c.binds {
        parts.push(format!(
            "bind {}:{}{}",
            b.host,
            b.container,
            if b.read_only { ":ro" } else { "" }
        ));
    }
    for d in &c.devices {
        parts.push(format!("device {d}"));
    }
    if !c.env.is_empty() {
        parts.push(format!(
            "env {}",
            c.env.keys().cloned().collect::<Vec<_>>().join(",")
        ));
    }
    if c.privileged {
        parts.push("PRIVILEGED".into());
    }
    if let Some(n) = &c.network_mode {
        parts.push(format!("network {n}"));
    }
    if parts.is_empty() {
        "defaults".into()
    } else {
        parts.join("; ")
    }
}

fn print_release(r: &Release) {
    println!("app        {}", r.app);
    println!("version    {}", r.version);
    println!("image      {}", r.image);
    println!("created    {}", r.created_at.to_rfc3339());
    println!("container  {}", container_summary(&r.container));
    println!("health     {}", check_summary(&r.health));
    let mut t = table(&["platform", "image manifest digest"]);
    for (p, d) in &r.platforms {
        t.add_row(vec![p.as_str(), d.as_str()]);
    }
    println!("{t}");
}

pub fn verify(args: VerifyArgs, out: Output) -> anyhow::Result<()> {
    if args.threshold == 0 {
        return Err(usage("--threshold must be at least 1"));
    }
    let mut trusted_keys: Vec<(PathBuf, PublicKey)> = Vec::new();
    for p in &args.trust {
        trusted_keys.push((p.clone(), PublicKey::load(p)?));
    }
    let trusted = TrustedKeys::new(trusted_keys.iter().map(|(_, k)| k.clone()));
    if args.threshold > trusted.len() {
        return Err(usage(format!(
            "--threshold {} but only {} distinct trusted key(s) given",
            args.threshold,
            trusted.len()
        )));
    }
    // Reading one byte over the cap is enough for the verifier to say "too large".
    let raw = {
        use std::io::Read;
        let f = std::fs::File::open(&args.file)
            .with_context(|| format!("cannot open {}", args.file.display()))?;
        let mut buf = Vec::new();
        f.take(MAX_RELEASE_ENVELOPE as u64 + 1)
            .read_to_end(&mut buf)
            .with_context(|| format!("cannot read {}", args.file.display()))?;
        buf
    };
    let v = verify_release(&raw, &trusted, args.threshold).map_err(|e| {
        anyhow::Error::new(Failure::Verification(format!(
            "{}: {e}",
            args.file.display()
        )))
    })?;
    let name_of = |id: &str| {
        trusted_keys
            .iter()
            .find(|(_, k)| k.id().as_str() == id)
            .map(|(p, _)| p.display().to_string())
            .unwrap_or_default()
    };
    let r = &v.release;
    if out.json {
        let signers: Vec<_> = v
            .signers
            .iter()
            .map(|id| serde_json::json!({"keyid": id, "key": name_of(id)}))
            .collect();
        out.json_doc(&serde_json::json!({
            "ok": true,
            "app": r.app,
            "version": r.version.to_string(),
            "image": r.image,
            "platforms": r.platforms,
            "created_at": r.created_at,
            "container": r.container,
            "health": r.health,
            "signers": signers,
            "threshold": args.threshold,
        }));
    } else {
        println!(
            "OK: {} signature(s) by trusted release keys (threshold {})",
            v.signers.len(),
            args.threshold
        );
        print_release(r);
        for id in &v.signers {
            println!("signed by  {id}  ({})", name_of(id));
        }
        for (p, d) in &r.platforms {
            tracing::debug!("{p}: {}@{}", r.image, short_digest(d));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::release::Proto;

    const FULL: &str = r#"
app = "sensor"
version = "2.0.0"
image = "127.0.0.1:5055/ferry/sensor:2.0.0"
platforms = ["linux/arm64", "linux/arm/v7"]

[container]
cmd = ["/bin/sensor", "--port", "8080"]
env = { LOG = "info", MODE = "demo" }
ports = [{ host = 8080, container = 8080, proto = "tcp" }, { host = 5353, container = 53, proto = "udp" }]
binds = [{ host = "/var/lib/ferry-apps/sensor", container = "/data" }]
devices = ["/dev/i2c-1"]
privileged = false
network_mode = "bridge"

[health]
check = { http = { port = 8080, path = "/healthz" } }
grace_s = 5
interval_s = 2
timeout_s = 2
successes = 3
max_failures = 3
deadline_s = 120
"#;

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn full_spec_parses() {
        let s = ReleaseSpec::parse(FULL).unwrap();
        assert_eq!(s.app, "sensor");
        assert_eq!(s.version, semver::Version::new(2, 0, 0));
        assert_eq!(s.container.ports.len(), 2);
        assert_eq!(s.container.ports[1].proto, Proto::Udp);
        assert_eq!(s.container.env["MODE"], "demo");
        assert!(!s.container.binds[0].read_only);
        assert_eq!(
            s.health.check,
            Some(HealthCheck::Http {
                port: 8080,
                path: "/healthz".into()
            })
        );
        assert_eq!(s.health.deadline_s, Some(120));
        let r = s.image_ref().unwrap();
        assert_eq!(r.repository.full(), "127.0.0.1:5055/ferry/sensor");
        assert_eq!(r.tag.as_deref(), Some("2.0.0"));
    }

    #[test]
    fn every_check_kind_parses_from_toml() {
        let base = "app = \"a\"\nversion = \"1.0.0\"\nimage = \"r:5000/a:1\"\n[health]\n";
        for (check, want) in [
            (
                "check = { tcp = { port = 9 } }",
                HealthCheck::Tcp { port: 9 },
            ),
            (
                "check = { exec = [\"/bin/true\", \"x\"] }",
                HealthCheck::Exec(vec!["/bin/true".into(), "x".into()]),
            ),
            ("check = { docker = {} }", HealthCheck::Docker {}),
        ] {
            let s = ReleaseSpec::parse(&format!("{base}{check}\n")).unwrap();
            assert_eq!(s.health.check, Some(want), "{check}");
        }
        let s = ReleaseSpec::parse(base).unwrap();
        assert_eq!(s.health, HealthSpec::default());
        assert_eq!(s.container, ContainerSpec::default());
    }

    #[test]
    fn unknown_keys_rejected_at_every_level() {
        let cases = [
            (
                "top level",
                FULL.replace("app = ", "colour = \"red\"\napp = "),
            ),
            (
                "container",
                FULL.replace(
                    "privileged = false",
                    "privileged = false\ncap_add = [\"ALL\"]",
                ),
            ),
            (
                "health",
                FULL.replace("grace_s = 5", "grace_s = 5\nretries = 2"),
            ),
            (
                "health check kind",
                FULL.replace("{ http = {", "{ grpc = {"),
            ),
            (
                "http check field",
                FULL.replace("path = \"/healthz\"", "path = \"/healthz\", host = \"x\""),
            ),
            (
                "port field",
                FULL.replace("proto = \"tcp\" }", "proto = \"tcp\", ip = \"0.0.0.0\" }"),
            ),
        ];
        for (what, text) in cases {
            assert_ne!(text, FULL, "{what}: replacement did not apply");
            let e = format!("{:#}", ReleaseSpec::parse(&text).unwrap_err());
            assert!(
                e.contains("unknown") || e.contains("unexpected"),
                "{what}: {e}"
            );
        }
    }

    #[test]
    fn bad_specs_rejected() {
        for (what, text) in [
            ("no tag", FULL.replace(":2.0.0\"", "\"")),
            ("bad version", FULL.replace("\"2.0.0\"", "\"2.0\"")),
            ("bad app", FULL.replace("\"sensor\"", "\"Sensor\"")),
            ("bad platform", FULL.replace("\"linux/arm64\"", "\"arm64\"")),
            (
                "dup platform",
                FULL.replace("\"linux/arm/v7\"", "\"linux/arm64\""),
            ),
            (
                "empty platforms",
                FULL.replace(
                    "platforms = [\"linux/arm64\", \"linux/arm/v7\"]",
                    "platforms = []",
                ),
            ),
            ("missing image", FULL.replace("image = ", "#image = ")),
            (
                "wrong type",
                FULL.replace("privileged = false", "privileged = \"no\""),
            ),
        ] {
            assert!(ReleaseSpec::parse(&text).is_err(), "{what} accepted");
        }
    }

    #[test]
    fn build_restricts_platforms_and_strips_tag() {
        let s = ReleaseSpec::parse(FULL).unwrap();
        let resolved: BTreeMap<String, String> = [
            ("linux/arm64".to_string(), digest('a')),
            ("linux/arm/v7".to_string(), digest('b')),
            ("linux/amd64".to_string(), digest('c')),
        ]
        .into();
        let now = Utc::now().trunc_subsecs(0);
        let r = s.build(&resolved, now).unwrap();
        assert_eq!(r.image, "127.0.0.1:5055/ferry/sensor");
        assert_eq!(r.platforms.len(), 2);
        assert_eq!(r.platforms["linux/arm/v7"], digest('b'));
        assert_eq!(r.created_at, now);
        // Missing platform: a clear error listing what exists.
        let only_arm64: BTreeMap<String, String> =
            [("linux/arm64".to_string(), digest('a'))].into();
        let e = s.build(&only_arm64, now).unwrap_err();
        assert!(e.to_string().contains("linux/arm/v7"), "{e}");
        // No restriction: everything resolved.
        let mut all = s.clone();
        all.platforms = None;
        assert_eq!(all.build(&resolved, now).unwrap().platforms.len(), 3);
        // Protocol validation applies (e.g. a relative bind).
        let mut bad = s.clone();
        bad.container.binds[0].host = "relative".into();
        assert!(bad.build(&resolved, now).is_err());
    }
}
