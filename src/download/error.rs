//! What can go wrong bringing an image onto the box, typed so the update engine can tell a blip
//! from a verdict: a transient error is retried without limit (capped backoff + jitter) and
//! reported as `downloading` with `waiting: retrying`; a permanent one fails the update at once
//! with its text as the reason. Every variant names what it was about (blob, image, path).

use ferry_registry::RegistryError;

use crate::download::human;

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The registry: transient for connection trouble, stalls, timeouts, 5xx and 429;
    /// permanent for 404 (manifest/blob unknown), 401/403, malformed answers.
    #[error("{0}")]
    Registry(#[from] RegistryError),

    /// The bytes of a blob hashed to something else twice in a row (fetched once more after the
    /// first mismatch, from zero).
    #[error(
        "blob {digest} of {image}: the registry's bytes hash to {actual} (twice); refusing them"
    )]
    DigestMismatch {
        image: String,
        digest: String,
        actual: String,
    },

    /// The registry sent more bytes than the manifest declares for a blob.
    #[error("blob {digest} of {image}: the registry sent more than the {size} bytes the manifest declares")]
    Oversized {
        image: String,
        digest: String,
        size: u64,
    },

    /// The signed digest names an index, or something that is no image for this platform.
    #[error("{image}: {detail}")]
    NotRunnable { image: String, detail: String },

    /// The image config is for another platform than this device's.
    #[error("{image} is an image for {got}, but this device is {want}")]
    WrongPlatform {
        image: String,
        got: String,
        want: String,
    },

    /// Not enough free space for a blob, its extraction estimate and the margin.
    #[error("not enough disk space for {what}: {} free under {path}, {} needed", human(*free), human(*need))]
    NoSpace {
        what: String,
        path: String,
        free: u64,
        need: u64,
    },

    /// The content store would grow past `[download] max_store_bytes`.
    #[error("the content store cap ({}) is too small for {what}: {} stored, {} more needed", human(*cap), human(*used), human(*need))]
    StoreCap {
        what: String,
        cap: u64,
        used: u64,
        need: u64,
    },

    /// A file of the content store could not be written or read.
    #[error("content store {path}: {source}")]
    Store {
        path: String,
        #[source]
        source: std::io::Error,
    },

    /// The container engine refused the staged image (its own words).
    #[error("the container engine could not load {image}: {detail}")]
    Import { image: String, detail: String },

    /// The container engine did not answer (it restarts, say): try again later.
    #[error("the container engine is unreachable: {0}")]
    EngineUnreachable(String),

    /// What the engine holds after the load is not the signed image.
    #[error("{image}: {detail}; image removed")]
    Verify { image: String, detail: String },

    /// The attempt was abandoned (a newer notice, or the agent stops). Not a failure.
    #[error("download abandoned")]
    Cancelled,
}

impl DownloadError {
    /// Whether trying again later may succeed. Only these are retried; everything else fails the
    /// update at once.
    pub fn is_transient(&self) -> bool {
        match self {
            DownloadError::Registry(e) => e.is_transient(),
            DownloadError::EngineUnreachable(_) => true,
            _ => false,
        }
    }

    /// A store I/O error, classified: a full disk is [`DownloadError::NoSpace`].
    pub fn store(path: &std::path::Path, source: std::io::Error) -> DownloadError {
        if is_disk_full(&source) {
            DownloadError::NoSpace {
                what: "the content store".into(),
                path: path.display().to_string(),
                free: crate::download::disk::free_bytes_near(path).unwrap_or(0),
                need: 0,
            }
        } else {
            DownloadError::Store {
                path: path.display().to_string(),
                source,
            }
        }
    }
}

pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == std::io::ErrorKind::StorageFull
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(status: u16) -> RegistryError {
        RegistryError::Status {
            registry: "r".into(),
            repo: "p".into(),
            reference: "sha256:x".into(),
            status,
            message: "m".into(),
        }
    }

    #[test]
    fn what_is_retried() {
        let transport = RegistryError::Transport {
            registry: "r".into(),
            repo: "p".into(),
            reference: "sha256:x".into(),
            message: "connection reset".into(),
        };
        assert!(DownloadError::from(transport).is_transient());
        assert!(DownloadError::from(reg(503)).is_transient());
        assert!(DownloadError::from(reg(429)).is_transient());
        assert!(!DownloadError::from(reg(400)).is_transient());
        let unknown = RegistryError::NotFound {
            registry: "r".into(),
            repo: "p".into(),
            reference: "sha256:x".into(),
            status: 404,
            message: "MANIFEST_UNKNOWN".into(),
        };
        assert!(!DownloadError::from(unknown).is_transient());
        assert!(DownloadError::EngineUnreachable("x".into()).is_transient());
        let full = DownloadError::store(
            std::path::Path::new("/"),
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert!(matches!(full, DownloadError::NoSpace { .. }), "{full:?}");
        assert!(!full.is_transient());
        for e in [
            DownloadError::DigestMismatch {
                image: "i".into(),
                digest: "d".into(),
                actual: "a".into(),
            },
            DownloadError::WrongPlatform {
                image: "i".into(),
                got: "linux/amd64".into(),
                want: "linux/arm64".into(),
            },
            DownloadError::StoreCap {
                what: "w".into(),
                cap: 1,
                used: 1,
                need: 1,
            },
        ] {
            assert!(!e.is_transient(), "{e}");
        }
    }

    #[test]
    fn reasons_name_the_blob_and_sizes() {
        let e = DownloadError::DigestMismatch {
            image: "r/app@sha256:m".into(),
            digest: "sha256:blob".into(),
            actual: "sha256:other".into(),
        };
        let t = e.to_string();
        assert!(
            t.contains("sha256:blob") && t.contains("r/app@sha256:m"),
            "{t}"
        );
        let e = DownloadError::NoSpace {
            what: "layer sha256:l".into(),
            path: "/var/lib/ferry".into(),
            free: 1024,
            need: 3 * 1024 * 1024,
        };
        assert_eq!(
            e.to_string(),
            "not enough disk space for layer sha256:l: 1.0 KiB free under /var/lib/ferry, 3.0 MiB needed"
        );
    }
}
