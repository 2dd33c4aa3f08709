//! `ferryctl serve --config FILE`: run the controller until SIGTERM/SIGINT.

use std::path::PathBuf;

use clap::Args;
use tracing::info;

use crate::server::{self, config};
use crate::{exit, Failure};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The controller's configuration (TOML).
    #[arg(
        long,
        default_value = "/etc/ferry/controller.toml",
        value_name = "FILE"
    )]
    pub config: PathBuf,
    /// Check the configuration (and everything it points at), then exit.
    #[arg(long)]
    pub check: bool,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<u8> {
    let loaded = config::load(&args.config).map_err(|e| Failure::Config(e.to_string()))?;
    if args.check {
        println!("{}: ok", args.config.display());
        return Ok(exit::OK);
    }
    info!(config = %args.config.display(), "starting the controller");
    let shutdown = async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: draining"),
            _ = int.recv() => info!("SIGINT: draining"),
        }
    };
    server::run(loaded, shutdown, None)
        .await
        .map_err(|e| match e {
            server::ServeError::Config(c) => Failure::Config(c.to_string()).into(),
            server::ServeError::Store(s) if s.is_config() => Failure::Config(s.to_string()).into(),
            server::ServeError::Bind { .. } => Failure::Config(e.to_string()).into(),
            other => anyhow::Error::new(other),
        })?;
    Ok(exit::OK)
}
