//! Errors of the protocol layer. Every variant says what was wrong in words an operator can act on;
//! the agent publishes `to_string()` as the `reason` of a `rejected` event.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum KeyError {
    #[error("{0}")]
    Parse(String),
    #[error("cannot read key file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {path}: {source}")]
    InFile {
        path: String,
        #[source]
        source: Box<KeyError>,
    },
}

/// Why an envelope was not accepted (protocol §2), in verification order.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("{what} envelope is {size} bytes, larger than the {max}-byte limit")]
    TooLarge {
        what: &'static str,
        size: usize,
        max: usize,
    },
    #[error("malformed {what} envelope: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("wrong payloadType {got:?}: expected {expected:?}")]
    WrongPayloadType { expected: String, got: String },
    #[error("{what} envelope: {field} is not valid base64")]
    BadBase64 {
        what: &'static str,
        field: &'static str,
    },
    #[error("{what} envelope has no signatures")]
    NoSignatures { what: &'static str },
    #[error(
        "{what} envelope: {valid} valid signature(s) by distinct trusted {role} key(s), {required} required{detail}"
    )]
    ThresholdNotMet {
        what: &'static str,
        role: String,
        valid: usize,
        required: usize,
        detail: String,
    },
}

/// A body that verified but whose content is not acceptable as a record of its kind.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("invalid {what}: {field}: {detail}")]
    Invalid {
        what: &'static str,
        field: String,
        detail: String,
    },
}

/// Any failure to accept a signed desired-state notice, including its embedded releases.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NoticeError {
    #[error("desired-state notice: {0}")]
    Desired(#[source] EnvelopeError),
    #[error("desired-state notice: {0}")]
    DesiredBody(#[source] RecordError),
    #[error("release for app {app:?}: {source}")]
    Release {
        app: String,
        #[source]
        source: EnvelopeError,
    },
    #[error("release for app {app:?}: {source}")]
    ReleaseBody {
        app: String,
        #[source]
        source: RecordError,
    },
    #[error("app key {key:?} does not match the signed release's app {app:?}")]
    AppMismatch { key: String, app: String },
    #[error("settings for app {app:?}, which the notice does not name")]
    SettingsForAbsentApp { app: String },
    #[error("app {app:?}: {source}")]
    Settings {
        app: String,
        #[source]
        source: crate::settings::SettingsError,
    },
}
