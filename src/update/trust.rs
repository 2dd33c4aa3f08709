//! Where the engine takes a trust record (protocol §10): checked against the box's current
//! trust ([`ferry_protocol::trust_record::check_next`]), stored, in effect at once for every
//! notice after it; a record's `sequence_floor` resets the accepted-sequence floor.

use chrono::Utc;
use std::sync::atomic::Ordering;

use ferry_protocol::heartbeat;
use ferry_protocol::trust_record::{self, TrustOutcome, TrustSet};
use ferry_protocol::TrustStatus;

use crate::download::ImageSource;
use crate::outbox::Outbox;
use crate::runtime::ContainerRuntime;
use crate::update::engine::{Engine, EngineError};
use crate::verify::trust::{self as store, TrustStore};

impl<R: ContainerRuntime, S: ImageSource, O: Outbox> Engine<R, S, O> {
    /// Trust what `store` holds, or `config` (version 0) when it holds nothing; finish a floor
    /// reset that a crash interrupted.
    pub fn with_trust(mut self, config: TrustSet, store: TrustStore) -> Result<Self, EngineError> {
        self.trust = store.load(config);
        self.trust_store = Some(store);
        let floor = self.store.floor();
        let version = self.trust.set.version;
        match self.trust.sequence_floor {
            // Taken, stored, but its floor not applied yet.
            Some(n) if floor.trust_version < version => self.reset_floor(n, version)?,
            _ => {}
        }
        let floor = self.store.floor();
        if floor.trust_version > 0 && self.journal.last_sequence > floor.sequence {
            // The floor record was reset, the journal not yet.
            self.reset_floor(floor.sequence, floor.trust_version)?;
        }
        tracing::info!(
            version,
            expires_at = ?self.trust.set.expires_at,
            root_keys = self.trust.set.root.len(),
            release_keys = self.trust.set.trust.release.len(),
            controller_keys = self.trust.set.trust.controller.len(),
            "trust"
        );
        Ok(self)
    }

    pub fn trust_version(&self) -> u64 {
        self.trust.set.version
    }

    pub(super) fn trust_status(&self) -> TrustStatus {
        let stale = self.is_stale();
        self.stale_reported.store(stale, Ordering::Relaxed);
        TrustStatus {
            version: self.trust.set.version,
            expires_at: self.trust.set.expires_at,
            error: self.trust_error.as_ref().map(|(_, r)| r.clone()),
            heartbeat_at: self.heartbeat_at,
            stale,
        }
    }

    /// Judge heartbeats (protocol §10a): older than `age` is `stale` (zero: never).
    pub fn with_heartbeat_age(mut self, age: std::time::Duration) -> Self {
        self.max_heartbeat_age = chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX);
        self
    }

    pub fn is_stale(&self) -> bool {
        heartbeat::is_stale(self.heartbeat_at, Utc::now(), self.max_heartbeat_age)
    }

    /// A heartbeat that arrived: kept when it verifies and is newer than the one held.
    pub async fn take_heartbeat(&mut self, raw: &[u8]) {
        let now = Utc::now();
        match heartbeat::verify(
            raw,
            &self.trust.set.trust.controller,
            now,
            self.cfg.clock_skew,
        ) {
            Ok(h) if self.heartbeat_at.is_none_or(|t| h.issued_at > t) => {
                tracing::debug!(issued_at = %h.issued_at, "controller heartbeat");
                self.heartbeat_at = Some(h.issued_at);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(reason = %e, "heartbeat refused"),
        }
        self.check_stale().await;
    }

    /// Publish the state when the box became stale, or stopped being stale.
    pub async fn check_stale(&self) {
        let stale = self.is_stale();
        if stale != self.stale_reported.load(Ordering::Relaxed) {
            if stale {
                tracing::warn!(
                    heartbeat_at = ?self.heartbeat_at,
                    max_age_s = self.max_heartbeat_age.num_seconds(),
                    "no recent controller heartbeat: notices may be withheld (stale)"
                );
            } else {
                tracing::info!(heartbeat_at = ?self.heartbeat_at, "controller heartbeat recent again");
            }
            self.publish_state().await;
        }
    }

    fn reset_floor(&mut self, sequence: u64, version: u64) -> Result<(), EngineError> {
        tracing::warn!(
            from = self.journal.last_sequence,
            to = sequence,
            trust_version = version,
            "the trust record resets the accepted-sequence floor"
        );
        self.store
            .reset_floor(&mut self.journal, sequence, version)
            .map_err(EngineError::Journal)
    }

    /// A trust record that arrived (MQTT or `trust install`): take it, or say why not. Only
    /// an error of the journal (a floor reset that cannot be written) is returned.
    pub async fn take_trust(&mut self, raw: &[u8]) -> Result<(), EngineError> {
        let raw_sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(raw));
        let Some(store) = self.trust_store.clone() else {
            tracing::warn!("a trust record arrived but this engine has no trust store; ignored");
            return Ok(());
        };
        let outcome = trust_record::check_next(
            raw,
            &self.trust.set,
            self.trust.body_sha256.as_deref(),
            &self.cfg.device,
            Utc::now(),
        );
        let accepted = match outcome {
            Ok(TrustOutcome::Same) => {
                tracing::debug!(
                    version = self.trust.set.version,
                    "trust record already held"
                );
                return Ok(());
            }
            Ok(TrustOutcome::NotForThisDevice) => {
                tracing::info!("a trust record for other devices; left aside");
                return Ok(());
            }
            Ok(TrustOutcome::Accept(a)) => a,
            Err(e) => {
                if self
                    .trust_error
                    .as_ref()
                    .is_some_and(|(s, _)| *s == raw_sha)
                {
                    return Ok(());
                }
                tracing::warn!(version = self.trust.set.version, reason = %e, "trust record refused; nothing changes");
                self.trust_error = Some((raw_sha, e.to_string()));
                self.publish_state().await;
                return Ok(());
            }
        };
        if let Err(e) = store.save(raw) {
            tracing::error!(error = %e, "cannot store the trust record; keeping the current one");
            self.trust_error = Some((raw_sha, e.to_string()));
            self.publish_state().await;
            return Ok(());
        }
        let from = self.trust.set.version;
        self.trust = store::current(*accepted);
        self.trust_error = None;
        let version = self.trust.set.version;
        if let Some(n) = self.trust.sequence_floor {
            self.reset_floor(n, version)?;
        }
        tracing::info!(
            from,
            version,
            controller_keys = self.trust.set.trust.controller.len(),
            release_keys = self.trust.set.trust.release.len(),
            "trust record taken; in effect for every notice from now on"
        );
        // A notice refused under the old keys may verify now (or is refused again, quietly).
        if let Some(notice) = self.last_rejected_notice.take() {
            self.last_rejection = None;
            self.inbox.put_if_empty(notice);
        }
        self.publish_state().await;
        Ok(())
    }
}
