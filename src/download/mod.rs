//! The download path: the agent's own resumable, verified content store, staged before the
//! switch. Boxes sit on 3G/4G links that drop, stall and cost per megabyte; this module makes a
//! download survive drops, agent restarts and power cuts byte for byte, on a budget the operator
//! sets, and never turns a network blip into a failed update.
//!
//! | piece | file |
//! | --- | --- |
//! | the store on disk (complete and partial blobs, durable lengths, GC) | [`store`] |
//! | one blob: `Range` resume, SHA-256, fsync, stall timeout, rate | [`blob`] |
//! | the link budget (token bucket) | [`rate`] |
//! | free space and the store cap | [`disk`] |
//! | the loopback registry dockerd loads images from | [`serve`] |
//! | one attempt over an update's images (plan, fetch, load, verify) | [`source`] |
//! | typed errors: transient (retry) or permanent (fail) | [`error`] |
//!
//! The engine drives attempts through [`ImageSource`] and retries transient errors with capped
//! exponential backoff plus jitter (`src/update/download.rs`).

pub mod blob;
pub mod disk;
pub mod error;
pub mod rate;
pub mod serve;
pub mod source;
pub mod store;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_protocol::DownloadStats;
use serde::Deserialize;

pub use blob::Counters;
pub use error::DownloadError;

/// One image an update needs: the signed manifest digest for this device's platform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageWant {
    pub app: String,
    /// Repository (`host[:port]/path`), from the release's `image`.
    pub repo: String,
    /// The image manifest digest the release names for this platform.
    pub digest: String,
}

/// An image now held by the engine, verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    pub app: String,
    /// The engine's image id (the config digest the signed manifest names): containers are
    /// created from it.
    pub image_id: String,
}

/// Progress of one update's download, shared between the attempt (which counts) and the
/// engine's reporter (which reads).
#[derive(Debug, Default)]
pub struct Progress {
    pub blobs: Counters,
    /// An attempt has planned what it fetches (totals are known).
    planned: AtomicBool,
    total: AtomicU64,
    skipped: AtomicU64,
    pub retries: AtomicU64,
}

impl Progress {
    /// An attempt planned `total` bytes of blobs, of which `have` are stored, and skipped
    /// `skipped` layers the engine holds.
    pub fn start(&self, total: u64, have: u64, skipped: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.blobs.have.store(have, Ordering::Relaxed);
        self.skipped.store(skipped, Ordering::Relaxed);
        self.planned.store(true, Ordering::Relaxed);
    }

    pub fn planned(&self) -> bool {
        self.planned.load(Ordering::Relaxed)
    }

    pub fn add_total(&self, n: u64) {
        // Saturating (sizes are input): a display counter must not wrap.
        let _ = self
            .total
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_add(n))
            });
    }

    /// (bytes on disk, bytes needed).
    pub fn bytes(&self) -> (u64, u64) {
        let total = self.total.load(Ordering::Relaxed);
        (self.blobs.have.load(Ordering::Relaxed).min(total), total)
    }

    pub fn stats(&self) -> DownloadStats {
        DownloadStats {
            fetched_bytes: self.blobs.fetched.load(Ordering::Relaxed),
            skipped_blobs: self.skipped.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            resumes: self.blobs.resumes.load(Ordering::Relaxed),
            restarts: self.blobs.restarts.load(Ordering::Relaxed),
        }
    }
}

/// Where images come from. The real one is [`source::StoreSource`]; unit tests of the engine
/// use a fake over the fake runtime.
pub trait ImageSource: Send + Sync + 'static {
    /// One attempt at bringing every image of `wants` into the engine, resuming what earlier
    /// attempts left. Transient errors are the caller's to retry; `cancel` abandons the attempt
    /// (what arrived stays stored).
    fn fetch(
        &self,
        wants: &[ImageWant],
        progress: &Arc<Progress>,
        cancel: &Arc<AtomicBool>,
    ) -> impl Future<Output = Result<Vec<Fetched>, DownloadError>> + Send;

    /// One attempt at an agent release's image (issue 13): its manifest, config (this platform)
    /// and one layer into the store, resumably like any blob; the binary taken out of the
    /// verified layer and installed into `dir` as `version` (nothing goes to the engine).
    fn fetch_agent(
        &self,
        want: &ImageWant,
        dir: &crate::selfupdate::layout::AgentDir,
        version: &semver::Version,
        progress: &Arc<Progress>,
        cancel: &Arc<AtomicBool>,
    ) -> impl Future<Output = Result<(), DownloadError>> + Send;

    /// The update these downloads were for has ended: drop every stored blob (and partial).
    fn release(&self) -> impl Future<Output = ()> + Send;
}

/// `[download]`: the link budget and the content store.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownloadConfig {
    /// The content store (default: `<state_dir>/store`).
    pub dir: Option<PathBuf>,
    /// Bytes per second for all downloads together; 0 = unlimited.
    pub max_rate: u64,
    /// Blobs fetched at the same time (parallel layers starve each other on a slow link).
    pub parallel: usize,
    /// No byte for this long on a connection: drop it, reconnect, resume.
    #[serde(
        alias = "stall_timeout_s",
        deserialize_with = "crate::config::durations::secs"
    )]
    pub stall_timeout: Duration,
    /// fsync a partial blob after this many new bytes...
    pub sync_every_bytes: u64,
    /// ...or this often, whichever comes first.
    #[serde(
        alias = "sync_every_s",
        deserialize_with = "crate::config::durations::secs"
    )]
    pub sync_every: Duration,
    /// The store's size cap (complete + partial blobs).
    pub max_store_bytes: u64,
    /// First retry delay after a transient error (then doubling, with full jitter).
    #[serde(
        alias = "retry_initial_ms",
        deserialize_with = "crate::config::durations::millis"
    )]
    pub retry_initial: Duration,
    /// Longest delay between retries.
    #[serde(
        alias = "retry_max_s",
        deserialize_with = "crate::config::durations::secs"
    )]
    pub retry_max: Duration,
    /// Extraction estimate: free space the engine needs per compressed byte of a layer.
    pub extraction_factor: u64,
    /// Loopback address of the registry the engine loads images from (port 0: any free one).
    pub local_registry: String,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        DownloadConfig {
            dir: None,
            max_rate: 0,
            parallel: 1,
            stall_timeout: Duration::from_secs(30),
            sync_every_bytes: 256 * 1024,
            sync_every: Duration::from_secs(2),
            max_store_bytes: 2 * 1024 * 1024 * 1024,
            retry_initial: Duration::from_millis(1000),
            retry_max: Duration::from_secs(60),
            extraction_factor: 2,
            local_registry: "127.0.0.1:0".into(),
        }
    }
}

impl DownloadConfig {
    pub fn dir(&self, state_dir: &Path) -> PathBuf {
        self.dir.clone().unwrap_or_else(|| state_dir.join("store"))
    }

    /// Field and reason of the first invalid value.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |f: &str, d: &str| Err((format!("download.{f}"), d.to_string()));
        if let Some(d) = &self.dir {
            if !d.is_absolute() {
                return bad("dir", "must be an absolute path");
            }
        }
        if self.parallel == 0 || self.parallel > 8 {
            return bad("parallel", "must be between 1 and 8");
        }
        if self.stall_timeout < Duration::from_secs(1) {
            return bad("stall_timeout", "must be at least 1s");
        }
        if self.sync_every_bytes < 64 * 1024 {
            return bad("sync_every_bytes", "must be at least 65536");
        }
        if self.sync_every < Duration::from_secs(1) {
            return bad("sync_every", "must be at least 1s");
        }
        if self.retry_initial < Duration::from_millis(1) || self.retry_max.is_zero() {
            return bad(
                "retry_initial",
                "retry_initial must be at least 1ms and retry_max positive",
            );
        }
        if self.max_rate != 0 && self.max_rate < 1024 {
            return bad("max_rate", "0 (unlimited) or at least 1024 bytes/s");
        }
        match self.local_registry.parse::<std::net::SocketAddr>() {
            Ok(a) if a.ip().is_loopback() => {}
            _ => {
                return bad(
                    "local_registry",
                    "must be a loopback address with a port, e.g. 127.0.0.1:0 (the engine treats only 127.0.0.0/8 as a plain-HTTP registry)",
                )
            }
        }
        Ok(())
    }
}

/// `1.5 MiB` and so on.
pub fn human(b: u64) -> String {
    const U: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(5), "5 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 * 1024 * 1024), "3.0 MiB");
    }

    #[test]
    fn config_defaults_and_checks() {
        let c = DownloadConfig::default();
        assert!(c.validate().is_ok());
        assert_eq!(
            c.dir(Path::new("/var/lib/ferry")),
            Path::new("/var/lib/ferry/store")
        );
        for (patch, field) in [
            (
                DownloadConfig {
                    parallel: 0,
                    ..c.clone()
                },
                "download.parallel",
            ),
            (
                DownloadConfig {
                    local_registry: "0.0.0.0:5000".into(),
                    ..c.clone()
                },
                "download.local_registry",
            ),
            (
                DownloadConfig {
                    dir: Some("rel".into()),
                    ..c.clone()
                },
                "download.dir",
            ),
            (
                DownloadConfig {
                    max_rate: 10,
                    ..c.clone()
                },
                "download.max_rate",
            ),
            (
                DownloadConfig {
                    stall_timeout: Duration::from_millis(500),
                    ..c.clone()
                },
                "download.stall_timeout",
            ),
            (
                DownloadConfig {
                    sync_every: Duration::ZERO,
                    ..c.clone()
                },
                "download.sync_every",
            ),
            (
                DownloadConfig {
                    retry_initial: Duration::ZERO,
                    ..c.clone()
                },
                "download.retry_initial",
            ),
            (
                DownloadConfig {
                    retry_max: Duration::ZERO,
                    ..c.clone()
                },
                "download.retry_initial",
            ),
        ] {
            assert_eq!(patch.validate().unwrap_err().0, field);
        }
    }

    #[test]
    fn progress_counts() {
        let p = Progress::default();
        p.start(100, 30, 2);
        p.blobs.have.fetch_add(20, Ordering::Relaxed);
        p.blobs.fetched.fetch_add(20, Ordering::Relaxed);
        p.retries.fetch_add(1, Ordering::Relaxed);
        assert_eq!(p.bytes(), (50, 100));
        let s = p.stats();
        assert_eq!((s.fetched_bytes, s.skipped_blobs, s.retries), (20, 2, 1));
    }
}
