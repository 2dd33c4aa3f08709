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

pub fn init(format: &str, level: &str) {
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
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

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
