//! `ferry-agent`: the device agent binary. Exit codes are chosen for systemd:
//! 0 clean stop, 78 (EX_CONFIG) configuration error — `RestartPreventExitStatus=78` keeps systemd
//! from restarting a box into the same mistake — and 1 for anything else (restart).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ferry_agent::config::AgentConfig;

const EX_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "ferry-agent",
    version,
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
}

fn main() -> ExitCode {
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
    ferry_agent::logging::init(&loaded.config.log.format, &loaded.config.log.level);
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
    match rt.block_on(async {
        ferry_agent::agent::run(loaded, ferry_agent::signals::terminated()).await
    }) {
        Ok(()) => ExitCode::SUCCESS,
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
