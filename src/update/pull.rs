//! Pulling one app's image for this platform, by digest only, with the checks of protocol §6.6:
//! the manifest the registry serves must hash to the signed digest, there must be room for it,
//! and the local image must be that digest and platform afterwards.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::runtime::{ContainerRuntime, PullProgress, RegistryAuth};

/// What the registry says about an image manifest, after its bytes were checked against the
/// digest that was asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ManifestFacts {
    /// Sum of the compressed layer sizes plus the config blob.
    pub download_bytes: u64,
}

/// Access to the registry's manifests (the real one wraps `ferry-registry`; tests use a fake).
pub trait ManifestSource: Send + Sync + 'static {
    /// Fetch `repo@digest`, verify that the bytes hash to `digest` and that it is an image
    /// manifest (not an index). `Err` is a sentence for the `failed` event.
    fn image_manifest(
        &self,
        repo: &str,
        digest: &str,
    ) -> impl Future<Output = Result<ManifestFacts, String>> + Send;
    /// Credentials for the engine's own pull, if configured for this repository's registry.
    fn auth_for(&self, repo: &str) -> Option<RegistryAuth>;
}

/// Free bytes under a path (the engine's data root). `None` when it cannot be measured.
pub fn free_bytes(path: &str) -> Option<u64> {
    let c = std::ffi::CString::new(path).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return None;
        }
        #[allow(clippy::unnecessary_cast)]
        Some(s.f_bavail as u64 * s.f_frsize as u64)
    }
}

/// Free bytes of the file system holding `path`, measured at its nearest existing ancestor
/// (the agent may not see the engine's data root itself, e.g. when it runs confined).
pub fn free_bytes_near(path: &str) -> Option<u64> {
    let mut p = std::path::Path::new(path);
    loop {
        if let Some(b) = free_bytes(&p.to_string_lossy()) {
            return Some(b);
        }
        p = p.parent()?;
    }
}

pub struct PullRequest<'a> {
    pub app: &'a str,
    pub repo: &'a str,
    pub digest: &'a str,
    pub platform: &'a str,
    /// Extra free bytes required beyond the download size (extraction, logs).
    pub margin_bytes: u64,
    /// `Some(free)` when measured.
    pub free_bytes: Option<u64>,
}

/// Pull and verify. `progress` is called at most once per `every`.
pub async fn pull_verified<R: ContainerRuntime, M: ManifestSource>(
    rt: &R,
    registry: &M,
    req: &PullRequest<'_>,
    every: Duration,
    progress: &(dyn Fn(PullProgress) + Send + Sync),
) -> Result<(), String> {
    let reference = format!("{}@{}", req.repo, req.digest);
    let facts = registry.image_manifest(req.repo, req.digest).await?;
    // Twice the compressed size: the download and its extraction, plus the margin.
    let need = facts
        .download_bytes
        .saturating_mul(2)
        .saturating_add(req.margin_bytes);
    if let Some(free) = req.free_bytes {
        if free < need {
            return Err(format!(
                "not enough disk space for {}: {} free, {} needed ({} to download, x2 to extract, + {} margin)",
                req.app,
                human(free),
                human(need),
                human(facts.download_bytes),
                human(req.margin_bytes)
            ));
        }
    } else {
        tracing::warn!(
            app = req.app,
            "cannot measure free space under the engine's data root; pulling anyway"
        );
    }
    let last = Mutex::new(None::<Instant>);
    // Docker's per-layer sum once it knows it; the registry's figure until then.
    let seen_total = Mutex::new(facts.download_bytes);
    let rate_limited = |p: PullProgress| {
        let total = {
            let mut t = seen_total.lock().unwrap_or_else(|e| e.into_inner());
            if p.total > 0 {
                *t = p.total;
            }
            *t
        };
        let mut l = last.lock().unwrap_or_else(|e| e.into_inner());
        if l.is_none_or(|t| t.elapsed() >= every) {
            *l = Some(Instant::now());
            progress(PullProgress {
                bytes: p.bytes.min(total),
                total,
            });
        }
    };
    rt.pull(
        &reference,
        req.platform,
        registry.auth_for(req.repo),
        &rate_limited,
    )
    .await
    .map_err(|e| format!("pull {reference}: {e}"))?;
    let img = rt
        .image_inspect(&reference)
        .await
        .map_err(|e| format!("inspect {reference}: {e}"))?
        .ok_or_else(|| format!("{reference} is not present after the pull"))?;
    let digest_ok = img
        .repo_digests
        .iter()
        .any(|d| d.rsplit_once('@').map(|(_, d)| d) == Some(req.digest));
    let (os, arch, variant) = crate::platform::split(req.platform);
    let platform_ok = img.os == os
        && img.architecture == arch
        && (variant.is_none() || img.variant.as_deref() == variant);
    if !digest_ok || !platform_ok {
        let why = if !digest_ok {
            format!(
                "the local image's digests {:?} do not include the signed {}",
                img.repo_digests, req.digest
            )
        } else {
            format!(
                "the local image is {}/{}{} but this device is {}",
                img.os,
                img.architecture,
                img.variant
                    .as_deref()
                    .map(|v| format!("/{v}"))
                    .unwrap_or_default(),
                req.platform
            )
        };
        let _ = rt.remove_image(&reference).await;
        return Err(format!("{reference}: {why}; image removed"));
    }
    let total = *seen_total.lock().unwrap_or_else(|e| e.into_inner());
    progress(PullProgress {
        bytes: total,
        total,
    });
    Ok(())
}

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
    fn free_bytes_of_root_is_measured() {
        assert!(free_bytes("/").unwrap() > 0);
        assert_eq!(free_bytes("/nonexistent/path/x"), None);
        assert_eq!(free_bytes_near("/nonexistent/path/x"), free_bytes("/"));
    }
}
