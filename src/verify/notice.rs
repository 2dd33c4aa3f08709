//! Where a desired-state notice is verified (protocol §6, rules 1–5 and 7). Pure: the clock, the
//! journal's memory and the trust store are passed in, so every rule is unit-tested directly.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
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
    let reject = |reason: String| Rejection {
        reason,
        sequence: Some(d.sequence),
        rollout: d.rollout.clone(),
    };
    // §6.2
    if d.device != ctx.device {
        return Err(reject(format!(
            "notice is for device {:?}, this is {:?}",
            d.device, ctx.device
        )));
    }
    // §6.3
    let sha = hex::encode(notice.raw_sha256);
    if d.sequence == ctx.last_sequence && ctx.last_sequence > 0 {
        if ctx.last_notice_sha256 == Some(sha.as_str()) {
            return Ok(Decision::Duplicate);
        }
        return Err(reject(format!(
            "sequence {} was already used by a different notice (equivocation)",
            d.sequence
        )));
    }
    if d.sequence <= ctx.last_sequence {
        return Err(reject(format!(
            "sequence {} is not newer than the last accepted {} (replay)",
            d.sequence, ctx.last_sequence
        )));
    }
    // §6.4: a clock behind the newest trusted time is treated as that time.
    let now = match ctx.trusted_time {
        Some(t) if t > ctx.now => t,
        _ => ctx.now,
    };
    if d.issued_at > now + ctx.clock_skew {
        return Err(reject(format!(
            "issued_at {} lies in the future (now {}, allowed skew {} s)",
            d.issued_at.to_rfc3339(),
            now.to_rfc3339(),
            ctx.clock_skew.num_seconds()
        )));
    }
    if d.expires_at + ctx.clock_skew < now {
        return Err(reject(format!(
            "notice expired at {} (now {}, allowed skew {} s)",
            d.expires_at.to_rfc3339(),
            now.to_rfc3339(),
            ctx.clock_skew.num_seconds()
        )));
    }
    for (app, vr) in &notice.releases {
        let r = &vr.release;
        // §6.5
        if let Some(cur) = ctx.committed.get(app) {
            if r.version < *cur && !d.allow_downgrade {
                return Err(reject(format!(
                    "{app} {} is older than the committed {cur}; a downgrade needs allow_downgrade",
                    r.version
                )));
            }
        }
        // §3: the release must name an image for this platform.
        if !r.platforms.contains_key(ctx.platform) {
            return Err(reject(format!(
                "{app} {} has no image for this device's platform {} (it has: {})",
                r.version,
                ctx.platform,
                r.platforms.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        // §6.7
        ctx.policy.check(r).map_err(reject)?;
    }
    Ok(Decision::Accept(Box::new(notice)))
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

    #[test]
    fn rejects_other_device() {
        let f = fx();
        let mut d = desired(&f, 1, &release("1.0.0"));
        d.device = "dev-002".into();
        assert!(reason(check(&raw(&f, &d), &ctx(&f))).contains("dev-002"));
    }

    #[test]
    fn sequence_rules() {
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

    #[test]
    fn time_rules() {
        let f = fx();
        let mut d = desired(&f, 1, &release("1.0.0"));
        d.issued_at = now() + Duration::seconds(301);
        d.expires_at = now() + Duration::days(1);
        assert!(reason(check(&raw(&f, &d), &ctx(&f))).contains("future"));
        d.issued_at = now() + Duration::seconds(299);
        assert!(check(&raw(&f, &d), &ctx(&f)).is_ok(), "within skew");
        let mut d = desired(&f, 1, &release("1.0.0"));
        d.issued_at = now() - Duration::days(2);
        d.expires_at = now() - Duration::seconds(301);
        assert!(reason(check(&raw(&f, &d), &ctx(&f))).contains("expired"));
        d.expires_at = now() - Duration::seconds(299);
        assert!(check(&raw(&f, &d), &ctx(&f)).is_ok(), "within skew");
    }

    #[test]
    fn clock_set_back_cannot_revive_an_expired_notice() {
        let f = fx();
        let mut d = desired(&f, 1, &release("1.0.0"));
        d.issued_at = now() - Duration::days(10);
        d.expires_at = now() - Duration::days(5);
        let mut c = ctx(&f);
        c.now = now() - Duration::days(7); // the clock was set back
        assert!(
            check(&raw(&f, &d), &c).is_ok(),
            "without memory the old clock accepts it"
        );
        c.trusted_time = Some(now());
        assert!(reason(check(&raw(&f, &d), &c)).contains("expired"));
    }

    #[test]
    fn downgrade_needs_permission() {
        let f = fx();
        let mut c = ctx(&f);
        c.committed
            .insert("sensor".into(), "2.0.0".parse().unwrap());
        let d = desired(&f, 1, &release("1.0.0"));
        assert!(reason(check(&raw(&f, &d), &c)).contains("allow_downgrade"));
        let mut d = desired(&f, 1, &release("1.0.0"));
        d.allow_downgrade = true;
        assert!(check(&raw(&f, &d), &c).is_ok());
        let d = desired(&f, 1, &release("2.0.0"));
        assert!(
            check(&raw(&f, &d), &c).is_ok(),
            "same version is not a downgrade"
        );
    }

    #[test]
    fn platform_must_be_present() {
        let f = fx();
        let mut c = ctx(&f);
        c.platform = "linux/arm/v7";
        let d = desired(&f, 1, &release("1.0.0"));
        assert!(reason(check(&raw(&f, &d), &c)).contains("linux/arm/v7"));
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
