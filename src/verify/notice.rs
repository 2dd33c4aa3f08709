//! Where a desired-state notice is verified (protocol §6, rules 1–5 and 7): the signatures with
//! [`verify_notice`], then the device-side rules of [`ferry_protocol::notice_rules`] (shared with
//! the simulator) with this device's local policy. Pure: the clock, the journal's memory and the
//! trust store are passed in.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use ferry_protocol::notice_rules::{self, DeviceState, RuleViolation, Verdict};
use ferry_protocol::{verify_notice, Trust, VerifiedNotice};

use crate::verify::policy::Policy;

/// What the device remembers and believes, as far as verification is concerned.
pub struct Context<'a> {
    pub device: &'a str,
    pub platform: &'a str,
    pub trust: &'a Trust,
    pub policy: &'a Policy,
    pub clock_skew: Duration,
    pub now: DateTime<Utc>,
    pub last_sequence: u64,
    /// Hex SHA-256 of the notice accepted at `last_sequence`, as the journal keeps it.
    pub last_notice_sha256: Option<&'a str>,
    pub trusted_time: Option<DateTime<Utc>>,
    /// app → committed version.
    pub committed: BTreeMap<String, semver::Version>,
}

#[derive(Debug)]
pub enum Decision {
    /// Every check passed: act on it.
    Accept(Box<VerifiedNotice>),
    /// The notice already accepted, byte for byte (a retained message seen again): nothing to do.
    Duplicate,
}

/// Why a notice was refused. `sequence` and `rollout` are only filled once the signature verified
/// (an unverified field is never trusted, not even for a report).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: String,
    pub sequence: Option<u64>,
    pub rollout: Option<String>,
}

pub fn check(raw: &[u8], ctx: &Context<'_>) -> Result<Decision, Rejection> {
    // §6.1 / §2: verify before parsing.
    let notice = verify_notice(raw, ctx.trust).map_err(|e| Rejection {
        reason: e.to_string(),
        sequence: None,
        rollout: None,
    })?;
    let d = &notice.desired;
    // The text rules, then the bind sources as they are on disk (no symlink below a prefix).
    let policy = |r: &ferry_protocol::Release| {
        ctx.policy
            .check(r)
            .and_then(|()| ctx.policy.check_on_disk(r))
    };
    let committed = |app: &str| ctx.committed.get(app);
    let device = DeviceState {
        device: ctx.device,
        platform: ctx.platform,
        last_sequence: ctx.last_sequence,
        last_notice_sha256: ctx.last_notice_sha256.and_then(|h| {
            let mut sha = [0; 32];
            hex::decode_to_slice(h, &mut sha).ok().map(|()| sha)
        }),
        trusted_time: ctx.trusted_time,
        now: ctx.now,
        clock_skew: ctx.clock_skew,
        committed: &committed,
        local_policy: Some(&policy),
    };
    let releases = notice.releases.values().map(|v| &v.release);
    // §6.2–§6.5, the platform (§3) and the local policy (§6.7).
    match notice_rules::check_notice(d, &notice.hashes(), releases, &device) {
        Ok(Verdict::Accept) => Ok(Decision::Accept(Box::new(notice))),
        Ok(Verdict::Duplicate) => Ok(Decision::Duplicate),
        Err(v) => {
            // A notice for another device, or one not newer than the accepted one, is not this
            // device's answer to its current notice: a copy of device B's notice published on
            // A's topic, or A's own replayed, must not fail A's rollout at the controller. Such a
            // rejection carries neither sequence nor rollout (reported as sequence 0).
            let attributable = !matches!(
                v,
                RuleViolation::WrongDevice { .. }
                    | RuleViolation::Replay { .. }
                    | RuleViolation::Equivocation { .. }
            );
            Err(Rejection {
                reason: v.to_string(),
                sequence: attributable.then_some(d.sequence),
                rollout: if attributable {
                    d.rollout.clone()
                } else {
                    None
                },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::desired::embed_release;
    use ferry_protocol::release::{ContainerSpec, HealthSpec};
    use ferry_protocol::{Desired, PrivateKey, Release, Strategy, TrustedKeys};

    struct Fx {
        rk: PrivateKey,
        ck: PrivateKey,
        trust: Trust,
        policy: Policy,
    }

    fn fx() -> Fx {
        let rk = PrivateKey::from_seed([1; 32]).unwrap();
        let ck = PrivateKey::from_seed([2; 32]).unwrap();
        let trust = Trust {
            release: TrustedKeys::new([rk.public().clone()]),
            release_threshold: 1,
            controller: TrustedKeys::new([ck.public().clone()]),
        };
        Fx {
            rk,
            ck,
            trust,
            policy: Policy::default(),
        }
    }

    fn now() -> DateTime<Utc> {
        "2026-11-22T10:00:00Z".parse().unwrap()
    }

    fn release(version: &str) -> Release {
        Release {
            app: "sensor".into(),
            version: version.parse().unwrap(),
            image: "127.0.0.1:5055/ferry/sensor".into(),
            platforms: [(
                "linux/arm64".to_string(),
                format!("sha256:{}", "a".repeat(64)),
            )]
            .into(),
            container: ContainerSpec::default(),
            health: HealthSpec::default(),
            created_at: now(),
        }
    }

    fn desired(f: &Fx, seq: u64, r: &Release) -> Desired {
        Desired {
            settings: Default::default(),
            force: false,
            device: "dev-001".into(),
            sequence: seq,
            issued_at: now(),
            expires_at: now() + Duration::days(30),
            apps: [(
                "sensor".to_string(),
                embed_release(&r.sign(&[&f.rk]).to_json()).unwrap(),
            )]
            .into(),
            strategy: Strategy::StopFirst,
            allow_downgrade: false,
            rollout: Some("r-1".into()),
        }
    }

    fn ctx<'a>(f: &'a Fx) -> Context<'a> {
        Context {
            device: "dev-001",
            platform: "linux/arm64",
            trust: &f.trust,
            policy: &f.policy,
            clock_skew: Duration::seconds(300),
            now: now(),
            last_sequence: 0,
            last_notice_sha256: None,
            trusted_time: None,
            committed: BTreeMap::new(),
        }
    }

    fn raw(f: &Fx, d: &Desired) -> Vec<u8> {
        d.sign(&[&f.ck]).to_json().into_bytes()
    }

    fn reason(r: Result<Decision, Rejection>) -> String {
        match r {
            Err(e) => e.reason,
            Ok(d) => panic!("accepted: {d:?}"),
        }
    }

    #[test]
    fn accepts_a_good_notice() {
        let f = fx();
        let d = desired(&f, 1, &release("1.0.0"));
        assert!(matches!(
            check(&raw(&f, &d), &ctx(&f)),
            Ok(Decision::Accept(_))
        ));
    }

    #[test]
    fn rejects_forged_and_malformed_and_oversized() {
        let f = fx();
        let d = desired(&f, 1, &release("1.0.0"));
        let mut bad = raw(&f, &d);
        let n = bad.len();
        bad[n - 10] ^= 1;
        assert!(check(&bad, &ctx(&f)).is_err());
        assert!(reason(check(b"{", &ctx(&f))).contains("malformed"));
        let big = vec![b' '; 300 * 1024];
        assert!(reason(check(&big, &ctx(&f))).contains("limit"));
    }

    /// The journal keeps the accepted notice's digest as hex.
    #[test]
    fn sequence_rules_with_the_journal_digest() {
        let f = fx();
        let d = desired(&f, 5, &release("1.0.0"));
        let r = raw(&f, &d);
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&r));
        let mut c = ctx(&f);
        c.last_sequence = 5;
        c.last_notice_sha256 = Some(&sha);
        assert!(matches!(check(&r, &c), Ok(Decision::Duplicate)));
        // Same sequence, other content.
        let mut d2 = desired(&f, 5, &release("1.0.0"));
        d2.rollout = Some("other".into());
        assert!(reason(check(&raw(&f, &d2), &c)).contains("equivocation"));
        // Older sequence.
        let d3 = desired(&f, 4, &release("1.0.0"));
        assert!(reason(check(&raw(&f, &d3), &c)).contains("replay"));
    }

    /// The rules themselves are tested in `ferry_protocol::notice_rules`; this checks that every
    /// field of the context reaches them and that their text is what gets published.
    #[test]
    fn context_reaches_the_shared_rules() {
        let f = fx();
        // The device id.
        let mut d = desired(&f, 1, &release("1.0.0"));
        d.device = "dev-002".into();
        assert_eq!(
            reason(check(&raw(&f, &d), &ctx(&f))),
            r#"notice is for device "dev-002", this is "dev-001""#
        );
        // The clock, the skew and the trusted time.
        let mut d = desired(&f, 1, &release("1.0.0"));
        d.issued_at = now() + Duration::seconds(299);
        assert!(check(&raw(&f, &d), &ctx(&f)).is_ok(), "within skew");
        let mut c = ctx(&f);
        c.clock_skew = Duration::seconds(0);
        assert_eq!(
            reason(check(&raw(&f, &d), &c)),
            "issued_at 2026-11-22T10:04:59+00:00 lies in the future \
             (now 2026-11-22T10:00:00+00:00, allowed skew 0 s)"
        );
        let mut d = desired(&f, 1, &release("1.0.0"));
        d.issued_at = now() - Duration::days(10);
        d.expires_at = now() - Duration::days(5);
        let mut c = ctx(&f);
        c.now = now() - Duration::days(7); // the clock was set back
        assert!(check(&raw(&f, &d), &c).is_ok());
        c.trusted_time = Some(now());
        assert_eq!(
            reason(check(&raw(&f, &d), &c)),
            "notice expired at 2026-11-17T10:00:00+00:00 \
             (now 2026-11-22T10:00:00+00:00, allowed skew 300 s)"
        );
        // The committed versions.
        let mut c = ctx(&f);
        c.committed
            .insert("sensor".into(), "2.0.0".parse().unwrap());
        let d = desired(&f, 1, &release("1.0.0"));
        assert_eq!(
            reason(check(&raw(&f, &d), &c)),
            "sensor 1.0.0 is older than the committed 2.0.0; a downgrade needs allow_downgrade"
        );
        let mut d = desired(&f, 1, &release("1.0.0"));
        d.allow_downgrade = true;
        assert!(check(&raw(&f, &d), &c).is_ok());
        // The platform.
        let mut c = ctx(&f);
        c.platform = "linux/arm/v7";
        let d = desired(&f, 1, &release("1.0.0"));
        assert_eq!(
            reason(check(&raw(&f, &d), &c)),
            "sensor 1.0.0 has no image for this device's platform linux/arm/v7 (it has: linux/arm64)"
        );
    }

    #[test]
    fn policy_applies_to_signed_releases() {
        let f = fx();
        let mut r = release("1.0.0");
        r.container.privileged = true;
        let d = desired(&f, 1, &r);
        let e = check(&raw(&f, &d), &ctx(&f)).unwrap_err();
        assert!(e.reason.contains("privileged"));
        assert_eq!(
            e.sequence,
            Some(1),
            "a verified notice's sequence is reported"
        );
    }

    /// The journal keeps the payload's hash: a copy of the accepted notice in other envelope
    /// bytes (spaces, key order) is the same notice, not equivocation (issue 9).
    #[test]
    fn a_reserialized_copy_of_the_accepted_notice_is_a_duplicate() {
        let f = fx();
        let d = desired(&f, 5, &release("1.0.0"));
        let r = raw(&f, &d);
        let Ok(Decision::Accept(n)) = check(&r, &ctx(&f)) else {
            panic!("not accepted")
        };
        let sha = hex::encode(n.payload_sha256);
        let mut c = ctx(&f);
        c.last_sequence = 5;
        c.last_notice_sha256 = Some(&sha);
        let v: serde_json::Value = serde_json::from_slice(&r).unwrap();
        let spaced = serde_json::to_vec_pretty(&v).unwrap();
        assert_ne!(spaced, r);
        assert!(matches!(check(&spaced, &c), Ok(Decision::Duplicate)));
        // The signature list reordered or a signature added by someone else: the same payload.
        let mut v2 = v.clone();
        v2["signatures"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"keyid": "00", "sig": "AAAA"}));
        let extra = serde_json::to_vec(&v2).unwrap();
        assert!(matches!(check(&extra, &c), Ok(Decision::Duplicate)));
    }

    /// Rejections the controller must not pin on the device's current notice carry no sequence
    /// and no rollout: another device's notice, a replay, an equivocation (issue 9).
    #[test]
    fn unattributable_rejections_carry_no_sequence() {
        let f = fx();
        let mut c = ctx(&f);
        c.last_sequence = 5;
        let sha = "ab".repeat(32);
        c.last_notice_sha256 = Some(&sha);
        let mut other = desired(&f, 6, &release("1.0.0"));
        other.device = "dev-002".into();
        for (what, d) in [
            ("another device's", other),
            ("a replayed", desired(&f, 4, &release("1.0.0"))),
            ("an equivocating", desired(&f, 5, &release("1.0.0"))),
        ] {
            let e = check(&raw(&f, &d), &c).unwrap_err();
            assert_eq!(
                (e.sequence, e.rollout.as_deref()),
                (None, None),
                "{what} notice: {e:?}"
            );
        }
        // A newer notice for this device that breaks a rule is its answer to that notice.
        let mut d = desired(&f, 6, &release("1.0.0"));
        d.expires_at = now() - Duration::days(1);
        d.issued_at = now() - Duration::days(2);
        let e = check(&raw(&f, &d), &c).unwrap_err();
        assert_eq!((e.sequence, e.rollout.as_deref()), (Some(6), Some("r-1")));
    }

    #[test]
    fn unverified_fields_never_reported() {
        let f = fx();
        let d = desired(&f, 9, &release("1.0.0"));
        let forged = d.sign(&[&f.rk]).to_json(); // signed with the release key: wrong role
        let e = check(forged.as_bytes(), &ctx(&f)).unwrap_err();
        assert_eq!(e.sequence, None);
        assert_eq!(e.rollout, None);
    }
}
