//! ferry-agent library.

static VERSION: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// Set this agent's version, once, first thing in `main`: the package's, unless the binary was
/// built with `FERRY_AGENT_VERSION` (how the self-update tests build a newer agent from the same
/// source by relinking only the binary).
pub fn set_version(v: &'static str) {
    let _ = VERSION.set(v);
}

/// This agent's version (the package's until [`set_version`]).
pub fn version() -> &'static str {
    VERSION.get().copied().unwrap_or(env!("CARGO_PKG_VERSION"))
}

/// [`version`], parsed (`main` refuses a binary whose version is not semver).
pub fn semver() -> semver::Version {
    version().parse().unwrap_or_else(|_| {
        env!("CARGO_PKG_VERSION")
            .parse()
            .expect("the package version is semver")
    })
}

pub mod agent;
pub mod backoff;
pub mod config;
pub mod download;
pub mod fsutil;
pub mod hardware_id;
pub mod health;
pub mod identity;
pub mod logging;
pub mod mqtt;
pub mod outbox;
pub mod platform;
pub mod runtime;
pub mod sdnotify;
pub mod selfupdate;
pub mod shutdown;
pub mod signals;
pub mod telemetry;
pub mod update;
pub mod verify;

#[cfg(test)]
mod version_tests {
    #[test]
    fn the_version_is_semver() {
        assert_eq!(super::semver().to_string(), super::version());
    }
}
