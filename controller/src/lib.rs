//! `ferryctl`: the Ferry operator and controller CLI.
//!
//! - `keygen`: Ed25519 key pairs (PKCS#8 / SPKI PEM, openssl-compatible)
//! - `release sign | verify`: release records, image digests resolved per platform from the registry
//! - `publish`: signed desired-state notices (sequence persisted before publishing), retained QoS 1
//! - `device watch`: a device's state, events, online flag and telemetry, optionally until a phase
//!
//! Every command prints friendly lines by default and one JSON document (JSON lines for `watch`)
//! on stdout with `--json`; logs go to stderr. Exit codes: see [`exit`].

pub mod api;
pub mod client;
pub mod mqtt;
pub mod rollout;
pub mod sequence;
pub mod server;
pub mod vecmap;

pub mod cli {
    pub mod cert;
    pub mod compose;
    pub mod fleet;
    pub mod keygen;
    pub mod keys;
    pub mod publish;
    pub mod release;
    pub mod rollout;
    pub mod serve;
    pub mod telemetry;
    pub mod trust;
    pub mod watch;
}

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Process exit codes.
pub mod exit {
    pub const OK: u8 = 0;
    /// Anything that went wrong (I/O, registry, broker, ...); also `watch --until` ending in a
    /// phase other than `committed`.
    pub const FAILURE: u8 = 1;
    /// Bad command line.
    pub const USAGE: u8 = 2;
    /// A signature or record did not verify.
    pub const VERIFICATION: u8 = 3;
    /// `serve`: the configuration is wrong (EX_CONFIG; the systemd unit does not restart).
    pub const CONFIG: u8 = 78;
}

/// Errors with their own exit code; everything else exits with [`exit::FAILURE`].
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    Usage(String),
    #[error("verification failed: {0}")]
    Verification(String),
    #[error("configuration: {0}")]
    Config(String),
}

/// The exit code for an error returned by [`run`].
pub fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<Failure>() {
        Some(Failure::Usage(_)) => exit::USAGE,
        Some(Failure::Verification(_)) => exit::VERIFICATION,
        Some(Failure::Config(_)) => exit::CONFIG,
        None => exit::FAILURE,
    }
}

pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    Failure::Usage(msg.into()).into()
}

#[derive(Debug, Parser)]
#[command(
    name = "ferryctl",
    version,
    about = "Ferry operator CLI: keys, signed releases, desired-state notices, device watch",
    propagate_version = true
)]
pub struct Cli {
    /// Machine output: JSON on stdout (JSON lines for `device watch`).
    #[arg(long, global = true)]
    pub json: bool,

    /// More log output on stderr (-v info, -vv debug). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate an Ed25519 key pair: DIR/NAME.key (PKCS#8, 0600) and DIR/NAME.pub (SPKI).
    Keygen(cli::keygen::KeygenArgs),
    /// The broker's certificates: a fleet CA, device, controller and broker certificates.
    #[command(subcommand)]
    Cert(cli::cert::CertCommand),
    /// The offline root role's trust records: which keys the boxes trust, rotated.
    #[command(subcommand)]
    Trust(cli::trust::TrustCommand),
    /// Sign and verify release records.
    #[command(subcommand)]
    Release(cli::release::ReleaseCommand),
    /// Sign and publish a device's desired state (retained, QoS 1).
    Publish(cli::publish::PublishArgs),
    /// Look at one device.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Run the controller: inventory, release catalogue, rollouts, HTTP API (see API.md).
    Serve(cli::serve::ServeArgs),
    /// The fleet as the controller knows it.
    Devices(cli::fleet::DevicesArgs),
    /// Fleet rollouts in waves (through the controller).
    #[command(subcommand)]
    Rollout(cli::rollout::RolloutCommand),
    /// Send devices back to the release of an app they ran before (through the controller).
    Rollback(cli::rollout::RollbackArgs),
    /// A device's telemetry over time (through the controller).
    Telemetry(cli::telemetry::TelemetryArgs),
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Print a device's state, events, online flag and telemetry as they arrive (from the broker).
    Watch(cli::watch::WatchArgs),
    /// What the controller knows about a device: apps, health, last update, recent events.
    Show(cli::fleet::ShowArgs),
    /// Device keys, approved and pending (signed reports).
    Keys(cli::keys::KeysArgs),
    /// Install a device's public key by hand (`ferry-agent identity` prints it on the box).
    Enroll(cli::keys::EnrollArgs),
    /// Approve a device's pending enrolment request.
    Approve(cli::keys::ApproveArgs),
    /// Remove a device's keys: its reports are dropped until it is enrolled again.
    Revoke(cli::keys::RevokeArgs),
}

/// Where results go: friendly text or JSON on stdout.
#[derive(Clone, Copy, Debug)]
pub struct Output {
    pub json: bool,
}

impl Output {
    /// Print one JSON document (pretty) on stdout.
    pub fn json_doc(&self, v: &serde_json::Value) {
        println!(
            "{}",
            serde_json::to_string_pretty(v).expect("a JSON value serializes")
        );
    }

    /// Print one JSON line on stdout and flush (for streams).
    pub fn json_line(&self, v: &serde_json::Value) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
    }
}

/// Run a parsed command line; the `Ok` value is the exit code.
pub async fn run(cli: Cli) -> anyhow::Result<u8> {
    let out = Output { json: cli.json };
    match cli.command {
        Command::Keygen(a) => cli::keygen::run(a, out).map(|()| exit::OK),
        Command::Cert(c) => cli::cert::run(c, out).map(|()| exit::OK),
        Command::Trust(c) => cli::trust::run(c, out).await.map(|()| exit::OK),
        Command::Release(cli::release::ReleaseCommand::Sign(a)) => {
            cli::release::sign(a, out).await.map(|()| exit::OK)
        }
        Command::Release(cli::release::ReleaseCommand::Verify(a)) => {
            cli::release::verify(a, out).map(|()| exit::OK)
        }
        Command::Publish(a) => cli::publish::run(a, out).await.map(|()| exit::OK),
        Command::Device(DeviceCommand::Watch(a)) => cli::watch::run(a, out).await,
        Command::Device(DeviceCommand::Show(a)) => {
            cli::fleet::show(a, out).await.map(|()| exit::OK)
        }
        Command::Device(DeviceCommand::Keys(a)) => cli::keys::list(a, out).await.map(|()| exit::OK),
        Command::Device(DeviceCommand::Enroll(a)) => {
            cli::keys::enroll(a, out).await.map(|()| exit::OK)
        }
        Command::Device(DeviceCommand::Approve(a)) => {
            cli::keys::approve(a, out).await.map(|()| exit::OK)
        }
        Command::Device(DeviceCommand::Revoke(a)) => {
            cli::keys::revoke(a, out).await.map(|()| exit::OK)
        }
        Command::Serve(a) => cli::serve::run(a).await,
        Command::Devices(a) => cli::fleet::devices(a, out).await.map(|()| exit::OK),
        Command::Rollout(c) => cli::rollout::run(c, out).await,
        Command::Rollback(a) => cli::rollout::rollback(a, out).await.map(|()| exit::OK),
        Command::Telemetry(a) => cli::telemetry::run(a, out).await.map(|()| exit::OK),
        Command::Release(cli::release::ReleaseCommand::Push(a)) => {
            cli::rollout::push(a, out).await.map(|()| exit::OK)
        }
        Command::Release(cli::release::ReleaseCommand::List(a)) => {
            cli::rollout::releases(a, out).await.map(|()| exit::OK)
        }
    }
}

/// Read a file, refusing more than `max` bytes.
pub fn read_capped(path: &Path, max: usize) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut buf = Vec::new();
    f.take(max as u64 + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if buf.len() > max {
        anyhow::bail!("{} is larger than {max} bytes", path.display());
    }
    Ok(buf)
}

/// Write `data` to `path` atomically: temp file in the same directory (mode `mode`), fsync,
/// rename over `path`, fsync the directory.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    let res = (|| -> std::io::Result<()> {
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(&dir)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.with_context(|| format!("cannot write {}", path.display()))
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// fsync a directory so that renames and creations in it are durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A short human form of a digest: `sha256:0123456789ab`.
pub fn short_digest(d: &str) -> &str {
    let end = "sha256:".len() + 12;
    if d.len() > end && d.is_char_boundary(end) {
        &d[..end]
    } else {
        d
    }
}

/// A table with the crate's look.
pub fn table(header: &[&str]) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(header.iter().copied());
    t
}

#[cfg(test)]
mod cli_tests {
    /// clap's own consistency checks over every subcommand (duplicate names, bad defaults).
    #[test]
    fn command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
