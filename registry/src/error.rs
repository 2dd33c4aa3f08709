//! Errors of the registry client. Every variant names the registry, the repository and the
//! reference (tag or digest) it was about, so a log line or a `failed` event is actionable alone.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum RegistryError {
    /// The caller gave something that is not a repository, tag or digest we can use.
    #[error("invalid image reference {reference:?}: {message}")]
    InvalidReference { reference: String, message: String },

    /// DNS, connect, TLS, timeout or a broken connection.
    #[error("{registry}/{repo} [{reference}]: cannot talk to the registry: {message}")]
    Transport {
        registry: String,
        repo: String,
        reference: String,
        message: String,
    },

    /// 401/403, no usable credentials, or the token endpoint refused us.
    #[error("{registry}/{repo} [{reference}]: access denied (HTTP {status}): {message}")]
    Unauthorized {
        registry: String,
        repo: String,
        reference: String,
        status: u16,
        message: String,
    },

    #[error("{registry}/{repo} [{reference}]: not found (HTTP {status}): {message}")]
    NotFound {
        registry: String,
        repo: String,
        reference: String,
        status: u16,
        message: String,
    },

    /// Any other unexpected HTTP status.
    #[error("{registry}/{repo} [{reference}]: HTTP {status}: {message}")]
    Status {
        registry: String,
        repo: String,
        reference: String,
        status: u16,
        message: String,
    },

    #[error("{registry}/{repo} [{reference}]: response is larger than the {limit}-byte limit; refusing it")]
    TooLarge {
        registry: String,
        repo: String,
        reference: String,
        limit: u64,
    },

    /// The bytes served do not hash to the digest asked for (or announced): never used.
    #[error("{registry}/{repo} [{reference}]: the registry served content with digest {actual}, expected {expected}; refusing it")]
    DigestMismatch {
        registry: String,
        repo: String,
        reference: String,
        expected: String,
        actual: String,
    },

    #[error("{registry}/{repo} [{reference}]: unsupported manifest media type {media_type:?}")]
    UnsupportedMediaType {
        registry: String,
        repo: String,
        reference: String,
        media_type: String,
    },

    /// The content parsed as none of the shapes it must have (manifest, index, config, token).
    #[error("{registry}/{repo} [{reference}]: {message}")]
    Malformed {
        registry: String,
        repo: String,
        reference: String,
        message: String,
    },
}

impl RegistryError {
    /// The HTTP status behind the error, when there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            RegistryError::Unauthorized { status, .. }
            | RegistryError::NotFound { status, .. }
            | RegistryError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether trying again later may succeed (network trouble, 429, 5xx). Digest mismatches,
    /// bad references, 4xx and malformed content are permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Transport { .. } => true,
            RegistryError::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

/// Where an error happened: filled into every variant.
#[derive(Clone, Debug)]
pub(crate) struct Ctx {
    pub registry: String,
    pub repo: String,
    pub reference: String,
}

impl Ctx {
    pub fn transport(&self, message: impl Into<String>) -> RegistryError {
        RegistryError::Transport {
            registry: self.registry.clone(),
            repo: self.repo.clone(),
            reference: self.reference.clone(),
            message: message.into(),
        }
    }
    pub fn unauthorized(&self, status: u16, message: impl Into<String>) -> RegistryError {
        RegistryError::Unauthorized {
            registry: self.registry.clone(),
            repo: self.repo.clone(),
            reference: self.reference.clone(),
            status,
            message: message.into(),
        }
    }
    pub fn not_found(&self, status: u16, message: impl Into<String>) -> RegistryError {
        RegistryError::NotFound {
            registry: self.registry.clone(),
            repo: self.repo.clone(),
            reference: self.reference.clone(),
            status,
            message: message.into(),
        }
    }
    pub fn status(&self, status: u16, message: impl Into<String>) -> RegistryError {
        RegistryError::Status {
            registry: self.registry.clone(),
            repo: self.repo.clone(),
            reference: self.reference.clone(),
            status,
            message: message.into(),
        }
    }
    pub fn too_large(&self, limit: u64) -> RegistryError {
        RegistryError::TooLarge {
            registry: self.registry.clone(),
            repo: self.repo.clone(),
            reference: self.reference.clone(),
            limit,
        }
    }
    pub fn mismatch(&self, expected: &str, actual: &str) -> RegistryError {
        RegistryError::DigestMismatch {
            registry: self.registry.clone(),
            repo: self.repo.clone(),
            reference: self.reference.clone(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        }
    }
    pub fn unsupported(&self, media_type: &str) -> RegistryError {
        RegistryError::UnsupportedMediaType {
            registry: self.registry.clone(),
            repo: self.repo.clone(),
            reference: self.reference.clone(),
            media_type: media_type.to_string(),
        }
    }
    pub fn malformed(&self, message: impl Into<String>) -> RegistryError {
        RegistryError::Malformed {
            registry: self.registry.clone(),
            repo: self.repo.clone(),
            reference: self.reference.clone(),
            message: message.into(),
        }
    }
}
