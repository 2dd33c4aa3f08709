//! Fuzzing what is *signed* (issue 10: no signed input may wedge a box). Flipping bytes of an
//! envelope only reaches the signature check; these targets mutate the signed bodies
//! themselves, sign the result with the trusted keys, and run everything behind the
//! signatures: the notice, release and trust-record parsers, the §6 rules the agent applies
//! (`check_notice`, with a local policy and the trusted-time update), and the report parsers
//! the controller applies to a signed report. Each must end in `Ok` or a clear `Err`, never a
//! panic (the agent is built with `panic = "abort"`: a panic on a retained notice is a crash
//! loop).
//!
//! The mutations put values where the parsers meet their limits: dates at and beyond the
//! calendar's ends, integers at u64/i64 edges, floats, huge and hostile strings (`:` `,` `..`
//! NUL, 64 KiB), deep nesting, long arrays, nulls, missing and unknown keys.
//!
//! proptest with a fixed budget: [`CASES`] cases per target in every `cargo test` (CI runs them
//! in `scripts/test.sh`); `PROPTEST_CASES` raises it for a longer run.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use ferry_protocol::desired::embed_release;
use ferry_protocol::device_report::{self, Stream};
use ferry_protocol::dsse::{DESIRED_PAYLOAD_TYPE, RELEASE_PAYLOAD_TYPE};
use ferry_protocol::notice_rules::{trusted_time_after, DeviceState};
use ferry_protocol::report::{Event, StateReport, TelemetryMessage};
use ferry_protocol::{check_notice, verify_notice, Envelope, PrivateKey, Trust, TrustedKeys};
use proptest::prelude::*;
use serde_json::{json, Value};

/// Cases per target in a normal test run.
const CASES: u32 = 1000;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(CASES);
    ProptestConfig {
        cases,
        // A failing case is shrunk, but not for ever.
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    }
}

fn key(n: u8) -> PrivateKey {
    PrivateKey::from_seed([n; 32]).unwrap()
}

/// Values at the edges of what the parsers take.
fn edge() -> impl Strategy<Value = Value> {
    let dates = prop::sample::select(vec![
        "+262142-12-31T23:59:59Z",
        "-262143-01-01T00:00:00Z",
        "0000-01-01T00:00:00Z",
        "9999-12-31T23:59:59.999999999Z",
        "1970-01-01T00:00:00Z",
        "2026-02-30T10:00:00Z",
        "2026-12-07T10:00:00+23:59",
        "2026-12-07T10:00:00",
        "",
    ])
    .prop_map(|s| Value::String(s.into()));
    let numbers = prop::sample::select(vec![
        json!(0),
        json!(-1),
        json!(u64::MAX),
        json!(u64::MAX - 1),
        json!(i64::MIN),
        json!(i64::MAX),
        json!(9_007_199_254_740_993u64),
        json!(1e308),
        json!(-0.0),
        json!(0.5),
        json!(65_536),
        json!(4_294_967_296u64),
    ]);
    let strings = prop::sample::select(vec![
        "".to_string(),
        "a".repeat(65_536),
        "/data:rshared".into(),
        "/data,ro".into(),
        "../../etc".into(),
        "/var/lib/ferry-apps/a/../../../etc".into(),
        "\u{0}".into(),
        "sha256:".into(),
        format!("sha256:{}", "g".repeat(64)),
        "linux/arm64".into(),
        "ｓｅｎｓｏｒ".into(),
        "1.0.0-".into(),
        "99999999999999999999.0.0".into(),
        "dev-001".into(),
    ])
    .prop_map(Value::String);
    let shapes = prop::sample::select(vec![
        Value::Null,
        json!(true),
        json!([]),
        json!({}),
        json!({"unknown": 1}),
        Value::Array(vec![json!(1); 2_000]),
        (0..200).fold(json!(0), |v, _| json!([v])),
    ]);
    prop_oneof![
        dates,
        numbers,
        strings,
        shapes,
        any::<i64>().prop_map(|n| json!(n))
    ]
}

/// One mutation: at the `pick`-th node of a walk, replace it with `with`, or remove a key, or
/// add an unknown one.
#[derive(Clone, Debug)]
enum Mutation {
    Replace(usize, Value),
    Remove(usize),
    AddUnknown(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        6 => (any::<usize>(), edge()).prop_map(|(p, v)| Mutation::Replace(p, v)),
        1 => any::<usize>().prop_map(Mutation::Remove),
        1 => any::<usize>().prop_map(Mutation::AddUnknown),
    ]
}

fn count(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(count).sum(),
        Value::Object(o) => o.values().map(count).sum(),
        _ => 0,
    }
}

/// Apply `m` to the node numbered `n` (pre-order) of `v`.
fn apply(v: &mut Value, m: &Mutation) {
    let total = count(v);
    let target = match m {
        Mutation::Replace(p, _) | Mutation::Remove(p) | Mutation::AddUnknown(p) => p % total,
    };
    let mut seen = 0;
    walk(v, target, &mut seen, m);
}

fn walk(v: &mut Value, target: usize, seen: &mut usize, m: &Mutation) -> bool {
    if *seen == target {
        match m {
            Mutation::Replace(_, with) => *v = with.clone(),
            Mutation::Remove(_) => {
                if let Value::Object(o) = v {
                    if let Some(k) = o.keys().next().cloned() {
                        o.remove(&k);
                    }
                }
            }
            Mutation::AddUnknown(_) => {
                if let Value::Object(o) = v {
                    o.insert("x-unknown".into(), json!(1));
                }
            }
        }
        return true;
    }
    *seen += 1;
    match v {
        Value::Array(a) => a.iter_mut().any(|c| walk(c, target, seen, m)),
        Value::Object(o) => o.values_mut().any(|c| walk(c, target, seen, m)),
        _ => false,
    }
}

fn release_body() -> Value {
    json!({
        "app": "sensor",
        "version": "2.0.0",
        "image": "127.0.0.1:5055/ferry/sensor",
        "platforms": {"linux/arm64": format!("sha256:{}", "a".repeat(64))},
        "container": {
            "cmd": ["/bin/sensor", "--port", "8080"],
            "env": {"A": "1"},
            "ports": [{"host": 18080, "container": 8080, "proto": "tcp"}],
            "binds": [{"host": "/var/lib/ferry-apps/sensor", "container": "/data", "read_only": true}],
            "devices": [],
            "network_mode": "bridge",
            "memory_mb": 128,
            "pids": 64
        },
        "health": {
            "check": {"http": {"port": 8080, "path": "/healthz"}},
            "grace_s": 1, "interval_s": 1, "timeout_s": 2, "successes": 2,
            "max_failures": 3, "deadline_s": 60
        },
        "created_at": "2026-12-01T10:00:00Z"
    })
}

fn desired_body(release_env: &str) -> Value {
    let embedded: Value = serde_json::from_str(release_env).unwrap();
    json!({
        "device": "dev-001",
        "sequence": 42,
        "issued_at": "2026-12-07T10:00:00Z",
        "expires_at": "2027-01-07T10:00:00Z",
        "apps": {"sensor": embedded},
        "strategy": "start-first",
        "allow_downgrade": false,
        "rollout": "r-1",
        "force": true
    })
}

/// Sign a mutated release into a mutated notice, verify it, apply the rules: never a panic.
fn notice_case(release_muts: &[Mutation], desired_muts: &[Mutation]) {
    let (rk, ck) = (key(1), key(2));
    let trust = Trust {
        release: TrustedKeys::new([rk.public().clone()]),
        release_threshold: 1,
        controller: TrustedKeys::new([ck.public().clone()]),
    };
    let mut rel = release_body();
    for m in release_muts {
        apply(&mut rel, m);
    }
    let rel_env = Envelope::sign(
        RELEASE_PAYLOAD_TYPE,
        &serde_json::to_vec(&rel).unwrap(),
        &[&rk],
    )
    .to_json();
    // The release must embed as JSON; it always does (it is an envelope we made).
    embed_release(&rel_env).unwrap();
    let mut des = desired_body(&rel_env);
    for m in desired_muts {
        apply(&mut des, m);
    }
    let raw = Envelope::sign(
        DESIRED_PAYLOAD_TYPE,
        &serde_json::to_vec(&des).unwrap(),
        &[&ck],
    )
    .to_json();
    let Ok(v) = verify_notice(raw.as_bytes(), &trust) else {
        return;
    };
    let committed_v = semver::Version::new(1, 0, 0);
    let committed = |app: &str| (app == "sensor").then_some(&committed_v);
    let policy = |r: &ferry_protocol::Release| {
        if r.container.privileged {
            Err("privileged".to_string())
        } else {
            Ok(())
        }
    };
    for (now, trusted) in [
        ("2026-12-07T10:00:00Z", None),
        ("2026-12-07T10:00:00Z", Some("9999-12-31T23:59:59Z")),
        ("1970-01-01T00:00:00Z", Some("2026-12-07T10:00:00Z")),
    ] {
        let now: DateTime<Utc> = now.parse().unwrap();
        let trusted: Option<DateTime<Utc>> = trusted.map(|t| t.parse().unwrap());
        for skew in [Duration::seconds(300), Duration::MAX, Duration::MIN] {
            let state = DeviceState {
                device: "dev-001",
                platform: "linux/arm64",
                last_sequence: 41,
                last_notice_sha256: None,
                trusted_time: trusted,
                now,
                clock_skew: skew,
                committed: &committed,
                local_policy: Some(&policy),
            };
            let releases = v
                .desired
                .apps
                .keys()
                .filter_map(|a| v.releases.get(a).map(|r| &r.release));
            if let Ok(_verdict) = check_notice(&v.desired, &v.hashes(), releases, &state) {
                let _ = trusted_time_after(trusted, &v.desired);
            }
        }
    }
}

fn report_case(stream: Stream, body: Value, muts: &[Mutation], counter: u64) {
    let k = key(3);
    let mut body = body;
    for m in muts {
        apply(&mut body, m);
    }
    let raw = device_report::sign(&k, "dev-001", stream, counter, body);
    let Ok(opened) = device_report::open(&raw, "dev-001", stream) else {
        return;
    };
    let Ok(p) = opened.verify(k.public()) else {
        return;
    };
    // What the controller does with a verified body.
    match stream {
        Stream::State => {
            let _ = serde_json::from_value::<StateReport>(p.body);
        }
        Stream::Events => {
            let _ = serde_json::from_value::<Event>(p.body);
        }
        Stream::Telemetry => {
            let _ = serde_json::from_value::<TelemetryMessage>(p.body);
        }
        _ => {
            let _ = serde_json::from_value::<device_report::OnlineBody>(p.body);
        }
    }
}

/// A trust record body (protocol §10) signed by root key 5, mutated, then judged as the next
/// record of a box at version 0 with that root, and as a stored record.
fn trust_case(muts: &[Mutation]) {
    use ferry_protocol::trust_record::{check_next, load_stored, TrustSet, TRUST_PAYLOAD_TYPE};
    let (root, rk, ck) = (key(5), key(1), key(2));
    let mut body = json!({
        "version": 1, "expires_at": "2027-12-07T10:00:00Z",
        "root": {"keys": [root.public().to_pem()], "threshold": 1},
        "release": {"keys": [rk.public().to_pem()], "threshold": 1},
        "controller": [key(6).public().to_pem()],
        "sequence_floor": 0, "devices": ["dev-001"]
    });
    for m in muts {
        apply(&mut body, m);
    }
    let raw = Envelope::sign(
        TRUST_PAYLOAD_TYPE,
        &serde_json::to_vec(&body).unwrap(),
        &[&root],
    )
    .to_json();
    let current = TrustSet::from_config(
        Trust {
            release: TrustedKeys::new([rk.public().clone()]),
            release_threshold: 1,
            controller: TrustedKeys::new([ck.public().clone()]),
        },
        TrustedKeys::new([root.public().clone()]),
        1,
    );
    let now: DateTime<Utc> = "2026-12-07T10:00:00Z".parse().unwrap();
    if let Ok(ferry_protocol::trust_record::TrustOutcome::Accept(a)) =
        check_next(raw.as_bytes(), &current, None, "dev-001", now)
    {
        // What the box then does with it: expiry and the floor.
        let _ = a.set.expired(now + Duration::days(400));
        let _ = a.record.sequence_floor.map(|f| f.saturating_add(1));
    }
    let _ = load_stored(raw.as_bytes());
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_signed_trust_record_with_any_body_is_judged_never_a_panic(
        muts in prop::collection::vec(mutation(), 0..4),
    ) {
        trust_case(&muts);
    }

    #[test]
    fn a_signed_notice_with_any_body_is_judged_never_a_panic(
        release_muts in prop::collection::vec(mutation(), 0..4),
        desired_muts in prop::collection::vec(mutation(), 0..4),
    ) {
        notice_case(&release_muts, &desired_muts);
    }

    #[test]
    fn a_signed_report_with_any_body_is_parsed_never_a_panic(
        which in 0usize..3,
        muts in prop::collection::vec(mutation(), 0..4),
        counter in any::<u64>(),
    ) {
        let (stream, body) = match which {
            0 => (Stream::State, json!({
                "device": "dev-001", "agent_version": "0.1.0", "platform": "linux/arm64",
                "sequence": 7, "ts": "2026-12-07T10:00:00Z", "labels": {"group": "beta"},
                "apps": {"sensor": {"version": "2.0.0", "digest": "sha256:aa",
                                    "container": "c", "health": "healthy"}},
                "update": {"sequence": 7, "rollout": "r-1", "phase": "committed",
                           "error": null, "at": "2026-12-07T10:00:00Z"}
            })),
            1 => (Stream::Events, json!({
                "device": "dev-001", "sequence": 7, "rollout": "r-1", "phase": "downloading",
                "app": "sensor", "bytes": 10, "total": 20, "ts": "2026-12-07T10:00:00Z",
                "download": {"fetched": 1, "skipped": 2, "retries": 3, "resumes": 4, "restarts": 5}
            })),
            _ => (Stream::Telemetry, json!([{
                "device": "dev-001", "ts": "2026-12-07T10:00:00Z",
                "sensors": {"temperature_c": 21.5}, "system": {"cpu_pct": 3.0}
            }])),
        };
        report_case(stream, body, &muts, counter);
    }
}

/// The mutations reach what they aim at: a sample of cases changes the verdict.
#[test]
fn the_mutations_reach_the_rules() {
    let mut reached = BTreeMap::new();
    let (rk, ck) = (key(1), key(2));
    let trust = Trust {
        release: TrustedKeys::new([rk.public().clone()]),
        release_threshold: 1,
        controller: TrustedKeys::new([ck.public().clone()]),
    };
    for (field, value) in [
        ("expires_at", json!("+262142-12-31T23:59:59Z")),
        ("issued_at", json!("0000-01-01T00:00:00Z")),
        ("sequence", json!(u64::MAX)),
        ("sequence", json!(-1)),
        ("device", json!("../../etc")),
    ] {
        let rel_env = Envelope::sign(
            RELEASE_PAYLOAD_TYPE,
            &serde_json::to_vec(&release_body()).unwrap(),
            &[&rk],
        )
        .to_json();
        let mut des = desired_body(&rel_env);
        des[field] = value.clone();
        let raw = Envelope::sign(
            DESIRED_PAYLOAD_TYPE,
            &serde_json::to_vec(&des).unwrap(),
            &[&ck],
        )
        .to_json();
        let outcome = match verify_notice(raw.as_bytes(), &trust) {
            Err(e) => format!("refused: {e}"),
            Ok(_) => "verified".to_string(),
        };
        reached.insert(format!("{field}={value}"), outcome);
    }
    // A date past 9999 is refused when parsed; the others parse and reach the rules.
    assert!(
        reached["expires_at=\"+262142-12-31T23:59:59Z\""].starts_with("refused"),
        "{reached:?}"
    );
    assert!(reached["sequence=-1"].starts_with("refused"), "{reached:?}");
    assert_eq!(
        reached[&format!("sequence={}", u64::MAX)],
        "verified",
        "{reached:?}"
    );
}
