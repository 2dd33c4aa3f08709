//! `ferry-agent`: the device agent binary. Exit codes are chosen for systemd:
//! 0 clean stop, 78 (EX_CONFIG) configuration error — `RestartPreventExitStatus=78` keeps systemd
//! from restarting a box into the same mistake — 75 when a self-update could not `exec` the new
//! version (restart at once), and 1 for anything else (restart).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ferry_agent::config::AgentConfig;

const EX_CONFIG: u8 = 78;
/// The package's version, or the one a test build asked for (see `ferry_agent::set_version`).
const VERSION: &str = match option_env!("FERRY_AGENT_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};
/// A deliberate fault of a test build (`FERRY_AGENT_BREAK`, scripts/build-agent-next.sh); unset in
/// every real build. `hang`: once the launcher has let it run, the agent says READY=1 and then
/// does nothing, never pinging the watchdog: a deadlocked agent, as systemd sees one.
const BREAK: Option<&str> = option_env!("FERRY_AGENT_BREAK");
/// The agent switched to a new version of itself but could not `exec` it: systemd restarts it
/// (75 = EX_TEMPFAIL), and the launcher then starts the new version.
const EX_RESTART: u8 = 75;

/// Run the launcher's decision (`ferry_agent::selfupdate::launch`): `exec` another installed
/// version of the agent when it is the one to run; return to run this binary otherwise.
fn launch_or_continue(state_dir: &std::path::Path) {
    use ferry_agent::selfupdate::{launch, layout::AgentDir};
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    match launch::decide(&AgentDir::new(state_dir), &ferry_agent::semver(), &exe) {
        Ok(launch::Launch::RunSelf) => {}
        Ok(launch::Launch::Exec(path)) => {
            tracing::info!(binary = %path.display(), "starting the installed agent");
            let err = launch::exec(&path);
            tracing::error!(binary = %path.display(), error = %err, "cannot start the installed agent; running this one");
        }
        Err(e) => tracing::error!(error = %e, "cannot read the installed agents; running this one"),
    }
}

#[derive(Parser)]
#[command(
    name = "ferry-agent",
    version = VERSION,
    about = "Ferry device agent: signed, transactional container updates"
)]
struct Cli {
    /// Path of the agent's TOML config.
    #[arg(
        long,
        short,
        global = true,
        default_value = "/etc/ferry/agent.toml",
        env = "FERRY_AGENT_CONFIG"
    )]
    config: PathBuf,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent (the default).
    Run,
    /// Validate a config (and load its keys) and exit.
    CheckConfig,
    /// Print the device key's id and public key (SPKI PEM), generating the key if there is none:
    /// what `ferryctl device enroll DEVICE --key FILE` takes.
    Identity,
    /// The box's trust record (protocol §10).
    #[command(subcommand)]
    Trust(TrustCmd),
}

#[derive(Subcommand)]
enum TrustCmd {
    /// Check a trust record against the box's current trust and hand it to the agent, which
    /// takes it within seconds (or at its next start): the way in without the network.
    Install { file: PathBuf },
    /// Print the trust the box holds: version, expiry, keys.
    Show,
}

fn main() -> ExitCode {
    if VERSION.parse::<semver::Version>().is_err() {
        eprintln!("ferry-agent: built with version {VERSION:?}, which is not semver");
        return ExitCode::from(EX_CONFIG);
    }
    ferry_agent::set_version(VERSION);
    let cli = Cli::parse();
    let loaded = match AgentConfig::load(&cli.config) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ferry-agent: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    if matches!(cli.cmd, Some(Cmd::CheckConfig)) {
        println!(
            "{}: ok (device {}, platform {}, {} release key(s), threshold {}, {} controller key(s))",
            cli.config.display(),
            loaded.config.device_id,
            loaded.platform,
            loaded.trust.release.len(),
            loaded.trust.release_threshold,
            loaded.trust.controller.len()
        );
        return ExitCode::SUCCESS;
    }
    if matches!(cli.cmd, Some(Cmd::Identity)) {
        let c = &loaded.config;
        return match ferry_agent::identity::load_or_create_key(&c.identity.key_path(&c.state_dir)) {
            Ok(k) => {
                println!("# device {} key {}", c.device_id, k.public().id());
                print!("{}", k.public().to_pem());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ferry-agent: {e}");
                ExitCode::from(EX_CONFIG)
            }
        };
    }
    if let Some(Cmd::Trust(t)) = &cli.cmd {
        return trust_cmd(t, &loaded);
    }
    ferry_agent::logging::init(&loaded.config.log.format, &loaded.config.log.level);
    // The launcher: which binary runs (an installed newer version, or a fallback).
    launch_or_continue(&loaded.config.state_dir);
    if let Some(fault) = BREAK.filter(|f| !f.is_empty()) {
        return broken_build(fault);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The signal handlers are installed inside the runtime, before anything else runs.
    let loaded_state_dir = loaded.config.state_dir.clone();
    match rt.block_on(async {
        ferry_agent::agent::run(loaded, ferry_agent::signals::terminated()).await
    }) {
        Ok(ferry_agent::agent::Stopped::Shutdown) => ExitCode::SUCCESS,
        Ok(ferry_agent::agent::Stopped::Restart) => {
            drop(rt);
            // Into the binary the launcher picks (the new version, on trial).
            launch_or_continue(&loaded_state_dir);
            let err = std::env::current_exe()
                .map(|exe| ferry_agent::selfupdate::launch::exec(&exe))
                .unwrap_or_else(|e| e);
            tracing::error!(error = %err, "cannot restart the agent; exiting for systemd to start it");
            ExitCode::from(EX_RESTART)
        }
        Err(e @ ferry_agent::agent::AgentError::Identity(_)) => {
            tracing::error!(error = %e, "ferry-agent cannot start: fix its identity (a config error)");
            ExitCode::from(EX_CONFIG)
        }
        Err(e) => {
            tracing::error!(error = %e, "ferry-agent failed");
            ExitCode::FAILURE
        }
    }
}

/// The test build's fault ([`BREAK`]).
fn broken_build(fault: &str) -> ExitCode {
    tracing::error!(
        fault,
        "this agent was built broken on purpose (FERRY_AGENT_BREAK), for tests"
    );
    match fault {
        "hang" => {
            let _ = ferry_agent::sdnotify::ready();
            loop {
                std::thread::park();
            }
        }
        _ => ExitCode::FAILURE,
    }
}

fn trust_cmd(cmd: &TrustCmd, loaded: &ferry_agent::config::Loaded) -> ExitCode {
    use ferry_agent::verify::trust::TrustStore;
    use ferry_protocol::trust_record::{check_next, TrustOutcome};
    let store = TrustStore::new(&loaded.config.state_dir);
    let current = store.load(loaded.trust_set());
    match cmd {
        TrustCmd::Show => {
            let s = &current.set;
            println!(
                "trust version {} ({}), expires {}",
                s.version,
                if s.version == 0 {
                    "the config's keys"
                } else {
                    "a stored trust record"
                },
                s.expires_at.map_or("never".into(), |e| e.to_rfc3339())
            );
            for (role, keys, t) in [
                ("root", &s.root, s.root_threshold),
                ("release", &s.trust.release, s.trust.release_threshold),
                ("controller", &s.trust.controller, 1),
            ] {
                println!("{role}: {} key(s), threshold {t}", keys.len());
                for id in keys.ids() {
                    println!("  {id}");
                }
            }
            ExitCode::SUCCESS
        }
        TrustCmd::Install { file } => {
            let raw = match std::fs::read(file) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("ferry-agent: cannot read {}: {e}", file.display());
                    return ExitCode::FAILURE;
                }
            };
            let outcome = check_next(
                &raw,
                &current.set,
                current.body_sha256.as_deref(),
                &loaded.config.device_id,
                chrono::Utc::now(),
            );
            match outcome {
                Ok(TrustOutcome::Same) => {
                    println!(
                        "the box holds this trust record already (version {})",
                        current.set.version
                    );
                    ExitCode::SUCCESS
                }
                Ok(TrustOutcome::NotForThisDevice) => {
                    eprintln!(
                        "ferry-agent: this trust record lists other devices, not {}",
                        loaded.config.device_id
                    );
                    ExitCode::FAILURE
                }
                Ok(TrustOutcome::Accept(a)) => match store.put_pending(&raw) {
                    Ok(()) => {
                        println!(
                            "trust record version {} checked (from version {}); the agent takes it within seconds, or at its next start",
                            a.set.version, current.set.version
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("ferry-agent: {e}");
                        ExitCode::FAILURE
                    }
                },
                Err(e) => {
                    eprintln!("ferry-agent: refused: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
