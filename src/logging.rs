//! Log set-up for the agent: `tracing` to stderr (journald picks it up), text or JSON.
//! Filtering uses `Targets` (`info`, `info,ferry_agent::update=debug`), which needs no regex
//! engine: that keeps the armv7 binary small.

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub fn parse_filter(spec: &str) -> Targets {
    spec.parse::<Targets>()
        .unwrap_or_else(|_| Targets::new().with_default(LevelFilter::INFO))
}

/// Colours only on a terminal: under systemd stderr is the journal, where escape codes would be
/// stored as text. `NO_COLOR` (any value) turns them off everywhere.
pub fn use_ansi(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none()
}

pub fn init(format: &str, level: &str) {
    use std::io::IsTerminal;
    let ansi = use_ansi(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_string());
    let filter = parse_filter(&spec);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = if format == "json" {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(use_ansi(true, None));
        assert!(!use_ansi(false, None), "the journal gets plain text");
        assert!(!use_ansi(true, Some(OsStr::new("1"))));
        assert!(!use_ansi(true, Some(OsStr::new(""))));
    }

    #[test]
    fn filters_parse() {
        assert_eq!(
            parse_filter("debug").default_level(),
            Some(LevelFilter::DEBUG)
        );
        let t = parse_filter("warn,ferry_agent::update=trace");
        assert!(t.would_enable("ferry_agent::update::engine", &tracing::Level::TRACE));
        assert!(!t.would_enable("rumqttc", &tracing::Level::INFO));
        assert_eq!(
            parse_filter("=nonsense=").default_level(),
            Some(LevelFilter::INFO)
        );
    }
}
