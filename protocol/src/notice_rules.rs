//! The rules a device applies to a desired-state notice once its signatures verified (protocol
//! §6: rule 2 the device id, rule 3 sequence, replay and equivocation, rule 4 expiry with clock
//! skew and the trusted-time floor, rule 5 downgrade; the platform check of §3; and the place
//! where rule 7's local policy runs). Signatures and record checks (rule 1, §2, §4) are
//! [`crate::verify_notice`]'s.
//!
//! Pure: the device's memory, its clock and its local policy are passed in, so the agent and the
//! simulator apply the very same rules and every rule is tested here. The rejection texts are
//! what the agent publishes as the `reason` of a `rejected` event.

use chrono::{DateTime, Duration, Utc};
use thiserror::Error;

use crate::desired::Desired;
use crate::release::Release;

/// The committed version of an app, if the device runs it.
pub type CommittedVersion<'a> = dyn Fn(&str) -> Option<&'a semver::Version> + 'a;

/// A device's own policy for a release: `Err` says which local rule the release breaks.
pub type LocalPolicy<'a> = dyn Fn(&Release) -> Result<(), String> + 'a;

/// What the device knows and believes when it judges a notice.
pub struct DeviceState<'a> {
    /// The device's own id (rule 2).
    pub device: &'a str,
    /// The device's platform, e.g. `linux/arm64` (§3).
    pub platform: &'a str,
    /// The last accepted sequence, 0 before the first notice (rule 3).
    pub last_sequence: u64,
    /// SHA-256 of the notice accepted at `last_sequence` (rule 3): of its signed payload, or,
    /// as journals written before payload hashes hold it, of its envelope as received.
    pub last_notice_sha256: Option<[u8; 32]>,
    /// The newest `issued_at` accepted so far: the clock is never taken to be behind it (rule 4).
    pub trusted_time: Option<DateTime<Utc>>,
    /// The device's clock.
    pub now: DateTime<Utc>,
    /// How far `issued_at` may lie ahead and `expires_at` behind the clock (rule 4).
    pub clock_skew: Duration,
    /// The committed version of an app, if the device runs it (rule 5).
    pub committed: &'a CommittedVersion<'a>,
    /// The device's own policy (rule 7), applied to each release after rule 5 and the platform
    /// check; `Err` says which local rule the release breaks and is published as is.
    pub local_policy: Option<&'a LocalPolicy<'a>>,
}

/// What identifies a verified notice for rule 3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoticeHashes {
    /// SHA-256 of the signed payload (the decoded DSSE body). Two envelopes around the same
    /// payload are the same notice: a re-serialized copy is a duplicate, never equivocation.
    pub payload: [u8; 32],
    /// SHA-256 of the envelope as received; matched too, so that a journal written before
    /// payload hashes still recognises its retained notice.
    pub envelope: [u8; 32],
}

impl NoticeHashes {
    fn matches(&self, accepted: &[u8; 32]) -> bool {
        self.payload == *accepted || self.envelope == *accepted
    }
}

/// A notice that passed every rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Act on it (after persisting its sequence, its hash and [`trusted_time_after`]).
    Accept,
    /// The notice accepted last, byte for byte (a retained copy seen again): nothing to do.
    Duplicate,
}

/// Which rule a verified notice breaks. `to_string()` is the published rejection reason.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum RuleViolation {
    /// Rule 2.
    #[error("notice is for device {notice:?}, this is {device:?}")]
    WrongDevice { notice: String, device: String },
    /// Rule 3: the accepted sequence again, with other bytes.
    #[error("sequence {sequence} was already used by a different notice (equivocation)")]
    Equivocation { sequence: u64 },
    /// Rule 3: an older sequence (or 0).
    #[error("sequence {sequence} is not newer than the last accepted {last} (replay)")]
    Replay { sequence: u64, last: u64 },
    /// Rule 4. `now` is the clock as judged: never behind the trusted time.
    #[error(
        "issued_at {} lies in the future (now {}, allowed skew {} s)",
        .issued_at.to_rfc3339(),
        .now.to_rfc3339(),
        .skew.num_seconds()
    )]
    IssuedInFuture {
        issued_at: DateTime<Utc>,
        now: DateTime<Utc>,
        skew: Duration,
    },
    /// Rule 4. `now` is the clock as judged: never behind the trusted time.
    #[error(
        "notice expired at {} (now {}, allowed skew {} s)",
        .expires_at.to_rfc3339(),
        .now.to_rfc3339(),
        .skew.num_seconds()
    )]
    Expired {
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
        skew: Duration,
    },
    /// Rule 5.
    #[error(
        "{app} {version} is older than the committed {committed}; a downgrade needs allow_downgrade"
    )]
    Downgrade {
        app: String,
        version: semver::Version,
        committed: semver::Version,
    },
    /// §3: the release names no image for this device's platform.
    #[error(
        "{app} {version} has no image for this device's platform {platform} (it has: {})",
        .available.join(", ")
    )]
    NoImageForPlatform {
        app: String,
        version: semver::Version,
        platform: String,
        available: Vec<String>,
    },
    /// Rule 7: the device's local policy refused the release; `reason` is the policy's own words.
    #[error("{reason}")]
    LocalPolicy { app: String, reason: String },
}

impl RuleViolation {
    /// The rule broken, in a few words that do not vary with the notice or the clock (for
    /// counting rejections by kind).
    pub fn rule(&self) -> &'static str {
        match self {
            RuleViolation::WrongDevice { .. } => "notice for another device",
            RuleViolation::Equivocation { .. } => "equivocation",
            RuleViolation::Replay { .. } => "replay",
            RuleViolation::IssuedInFuture { .. } => "issued_at in the future",
            RuleViolation::Expired { .. } => "notice expired",
            RuleViolation::Downgrade { .. } => "downgrade without allow_downgrade",
            RuleViolation::NoImageForPlatform { .. } => "no image for this device's platform",
            RuleViolation::LocalPolicy { .. } => "local policy",
        }
    }
}

/// Apply the rules to a notice whose signatures verified: `desired` its body, `hashes` those of
/// its payload and envelope, `releases` its verified releases in the order of
/// `desired.apps`. The rules run in the order of §6 and the first one broken is returned; the
/// per-release rules (downgrade, platform, local policy) run release by release.
pub fn check_notice<'r>(
    desired: &Desired,
    hashes: &NoticeHashes,
    releases: impl IntoIterator<Item = &'r Release>,
    device: &DeviceState<'_>,
) -> Result<Verdict, RuleViolation> {
    let d = desired;
    // Rule 2.
    if d.device != device.device {
        return Err(RuleViolation::WrongDevice {
            notice: d.device.clone(),
            device: device.device.to_string(),
        });
    }
    // Rule 3.
    if d.sequence == device.last_sequence && device.last_sequence > 0 {
        if device
            .last_notice_sha256
            .as_ref()
            .is_some_and(|a| hashes.matches(a))
        {
            return Ok(Verdict::Duplicate);
        }
        return Err(RuleViolation::Equivocation {
            sequence: d.sequence,
        });
    }
    if d.sequence <= device.last_sequence {
        return Err(RuleViolation::Replay {
            sequence: d.sequence,
            last: device.last_sequence,
        });
    }
    // Rule 4: a clock behind the newest trusted time is taken to be that time, so setting the
    // clock back cannot revive an expired notice.
    let now = match device.trusted_time {
        Some(t) if t > device.now => t,
        _ => device.now,
    };
    let skew = device.clock_skew;
    // Checked: the dates are signed input and may lie at chrono's limits (year ±262143); an
    // overflowing sum is a date beyond every clock, never a panic.
    let latest_issue = now
        .checked_add_signed(skew)
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    if d.issued_at > latest_issue {
        return Err(RuleViolation::IssuedInFuture {
            issued_at: d.issued_at,
            now,
            skew,
        });
    }
    let expiry = d
        .expires_at
        .checked_add_signed(skew)
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    if expiry < now {
        return Err(RuleViolation::Expired {
            expires_at: d.expires_at,
            now,
            skew,
        });
    }
    for r in releases {
        // Rule 5.
        if let Some(committed) = (device.committed)(&r.app) {
            if r.version < *committed && !d.allow_downgrade {
                return Err(RuleViolation::Downgrade {
                    app: r.app.clone(),
                    version: r.version.clone(),
                    committed: committed.clone(),
                });
            }
        }
        // §3: an image for this device's platform.
        if !r.platforms.contains_key(device.platform) {
            return Err(RuleViolation::NoImageForPlatform {
                app: r.app.clone(),
                version: r.version.clone(),
                platform: device.platform.to_string(),
                available: r.platforms.keys().cloned().collect(),
            });
        }
        // Rule 7.
        if let Some(policy) = device.local_policy {
            policy(r).map_err(|reason| RuleViolation::LocalPolicy {
                app: r.app.clone(),
                reason,
            })?;
        }
    }
    Ok(Verdict::Accept)
}

/// The trusted time to persist once `accepted` is accepted: the newest `issued_at` accepted
/// (rule 4), so it never moves back.
pub fn trusted_time_after(trusted: Option<DateTime<Utc>>, accepted: &Desired) -> DateTime<Utc> {
    match trusted {
        Some(t) if t >= accepted.issued_at => t,
        _ => accepted.issued_at,
    }
}

#[cfg(test)]
#[path = "notice_rules_tests.rs"]
mod tests;
