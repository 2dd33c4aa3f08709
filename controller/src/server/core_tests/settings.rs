//! Settings: a rollout's `--set` values travel in the signed notices, checked against the
//! release's declaration first; a device keeps its values into the next version's rollout;
//! a revert sends back the values from before.

use super::*;
use ferry_protocol::settings::{SettingDecl, SettingType};

/// `sensor VERSION` declaring APN (string, default "internet") and OFFSET (number, no
/// default unless `offset_default`).
fn release_with_settings(rk: &PrivateKey, version: &str, offset_default: Option<&str>) -> String {
    let container = ferry_protocol::release::ContainerSpec {
        settings: BTreeMap::from([
            (
                "APN".to_string(),
                SettingDecl {
                    kind: SettingType::String,
                    default: Some("internet".into()),
                    description: Some("the modem's access point".into()),
                },
            ),
            (
                "OFFSET".to_string(),
                SettingDecl {
                    kind: SettingType::Number,
                    default: offset_default.map(str::to_string),
                    description: None,
                },
            ),
        ]),
        ..Default::default()
    };
    Release {
        app: "sensor".into(),
        version: version.parse().unwrap(),
        image: "127.0.0.1:5055/ferry/sensor".into(),
        platforms: BTreeMap::from([(ARM64.to_string(), format!("sha256:{}", "a".repeat(64)))]),
        container,
        health: Default::default(),
        created_at: t(0),
    }
    .sign(&[rk])
    .to_json()
}

fn start_with(x: &mut T, version: &str, set: &[(&str, &str)]) -> Result<RolloutView, ApiError> {
    let req = StartRollout {
        app: "sensor".into(),
        version: version.into(),
        select: "group=beta".into(),
        waves: "100%".into(),
        soak: "10s".into(),
        max_failures: "0".into(),
        device_timeout: None,
        strategy: None,
        on_failure: Some(crate::rollout::waves::OnFailure::Revert),
        force: false,
        settings: set
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    x.core.start_rollout(&req, t(1))
}

/// The env each notice in the outbox gives the sensor container, by device.
fn envs(x: &mut T) -> BTreeMap<String, BTreeMap<String, String>> {
    x.verified()
        .into_iter()
        .map(|(v, _)| {
            (
                v.desired.device.clone(),
                v.releases["sensor"].release.container.env.clone(),
            )
        })
        .collect()
}

fn commit_all(x: &mut T, devices: &[&str], seq: u64, version: &str, at: i64) {
    for d in devices {
        x.core.ingest(event(d, seq, Phase::Committed, None), t(at));
        x.core.ingest(
            state(d, version, seq, Some((seq, Phase::Committed)), "beta"),
            t(at),
        );
    }
    x.core.advance(true, t(at + 15));
}

#[test]
fn settings_roll_out_are_carried_into_the_next_version_and_revert() {
    for mut x in T::each() {
        x.fleet(2, "beta");
        x.push("1.0.0");
        for (v, d) in [("2.0.0", None), ("3.0.0", Some("0"))] {
            let env = release_with_settings(&x.rk, v, d);
            x.core.push_release(env.as_bytes(), t(0)).unwrap();
        }
        // Refused before anything is sent: a key the release does not declare, a value not
        // of its type.
        let e = start_with(&mut x, "2.0.0", &[("DEBUG", "1")]).unwrap_err();
        assert_eq!(e.status, 422, "{}", e.message);
        assert!(
            e.message
                .contains("does not declare it settable (it declares APN, OFFSET)"),
            "{}",
            e.message
        );
        let e = start_with(&mut x, "2.0.0", &[("OFFSET", "warm")]).unwrap_err();
        assert_eq!(
            (e.status, e.message.as_str()),
            (400, "setting OFFSET: \"warm\" is not a number")
        );
        assert!(x.core.rollouts().is_empty());
        // OFFSET has no default in 2.0.0: the rollout gives it; APN keeps its default.
        let v = start_with(&mut x, "2.0.0", &[("OFFSET", "-1.5")]).unwrap();
        assert_eq!(v.settings["OFFSET"], "-1.5");
        let got = envs(&mut x);
        assert_eq!(got.len(), 2);
        for env in got.values() {
            assert_eq!(env["OFFSET"], "-1.5");
            assert_eq!(env["APN"], "internet");
        }
        commit_all(&mut x, &["dev-0", "dev-1"], 2, "2.0.0", 2);
        assert_eq!(x.core.rollout("r-1", false).unwrap().state, "completed");
        // A per-site value: dev-1 alone gets another APN, same version (a changed setting is
        // a new notice, as a version is).
        let mut req = StartRollout {
            app: "sensor".into(),
            version: "2.0.0".into(),
            select: "id in (dev-1)".into(),
            waves: "100%".into(),
            soak: "10s".into(),
            max_failures: "0".into(),
            device_timeout: None,
            strategy: None,
            on_failure: None,
            force: false,
            settings: BTreeMap::from([("APN".to_string(), "m2m.north".to_string())]),
        };
        x.core.start_rollout(&req, t(20)).unwrap();
        let got = envs(&mut x);
        assert_eq!(got.keys().collect::<Vec<_>>(), ["dev-1"]);
        assert_eq!(got["dev-1"]["APN"], "m2m.north");
        assert_eq!(got["dev-1"]["OFFSET"], "-1.5", "carried");
        commit_all(&mut x, &["dev-1"], 3, "2.0.0", 21);
        assert_eq!(x.core.rollout("r-2", false).unwrap().state, "completed");
        x.flush();
        // The next version carries each device's values on; the store keeps them across a
        // restart.
        let mut x = x.reopen();
        for i in 0..2 {
            let d = format!("dev-{i}");
            x.core.ingest(
                Inbound::Online {
                    device: d.clone(),
                    online: true,
                },
                t(40),
            );
        }
        x.core
            .ingest(state("dev-0", "2.0.0", 2, None, "beta"), t(40));
        x.core
            .ingest(state("dev-1", "2.0.0", 3, None, "beta"), t(40));
        x.flush();
        req.select = "group=beta".into();
        req.version = "3.0.0".into();
        req.settings.clear();
        req.on_failure = Some(crate::rollout::waves::OnFailure::Revert);
        x.core.start_rollout(&req, t(41)).unwrap();
        let got = envs(&mut x);
        assert_eq!(got["dev-0"]["APN"], "internet");
        assert_eq!(got["dev-1"]["APN"], "m2m.north");
        assert_eq!(got["dev-0"]["OFFSET"], "-1.5");
        // dev-0 fails its health gate: the revert sends 2.0.0 with the values from before.
        x.core.ingest(
            event("dev-0", 3, Phase::RolledBack, Some("health gate failed")),
            t(42),
        );
        x.core.advance(true, t(43));
        let got = envs(&mut x);
        assert_eq!(
            got["dev-1"]["APN"], "m2m.north",
            "reverted with its own values"
        );
        assert_eq!(got["dev-0"]["OFFSET"], "-1.5");
        let detail = x.core.device("dev-1").unwrap();
        assert_eq!(detail.desired_apps.unwrap()["sensor"], "2.0.0");
    }
}
