//! The duration keys of the agent's config ([`super::durations`]): the humantime form and the
//! older integer form of every key, the errors that name them, the defaults.

use std::time::Duration;

use super::durations::{DurationKey, Unit, KEYS};
use super::example_tests::{uncommented, EXAMPLE};
use super::tests::minimal;
use super::*;

const fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A duration field of the config, by its key's path.
fn get(c: &AgentConfig, path: &str) -> Duration {
    match path {
        "clock_skew" => c.clock_skew,
        "trust.max_heartbeat_age" => c.trust.max_heartbeat_age,
        "mqtt.keepalive" => c.mqtt.keepalive,
        "mqtt.backoff_initial" => c.mqtt.backoff_initial,
        "mqtt.backoff_max" => c.mqtt.backoff_max,
        "mqtt.connect_timeout" => c.mqtt.connect_timeout,
        "health.grace" => c.health.grace,
        "health.interval" => c.health.interval,
        "health.timeout" => c.health.timeout,
        "health.deadline" => c.health.deadline,
        "update.stop_timeout" => c.update.stop_timeout,
        "update.progress_interval" => c.update.progress_interval,
        "update.health_watch" => c.update.health_watch,
        "update.drain_gate" => c.update.drain_gate,
        "update.max_lock_hold" => c.update.max_lock_hold,
        "update.agent_confirm_timeout" => c.update.agent_confirm_timeout,
        "download.stall_timeout" => c.download.stall_timeout,
        "download.sync_every" => c.download.sync_every,
        "download.retry_initial" => c.download.retry_initial,
        "download.retry_max" => c.download.retry_max,
        "telemetry.sample" => c.telemetry.sample,
        "telemetry.max_interval" => c.telemetry.max_interval,
        other => panic!("no field for {other}: add it to get()"),
    }
}

/// Per key: the old form's integer, the new form's string, the duration both mean (not the
/// default, so that the test sees the key taking effect).
const SAME: &[(&str, i64, &str, Duration)] = &[
    ("clock_skew", 7, "7s", s(7)),
    ("trust.max_heartbeat_age", 90, "1m 30s", s(90)),
    ("mqtt.keepalive", 120, "2m", s(120)),
    ("mqtt.backoff_initial", 1500, "1s 500ms", ms(1500)),
    ("mqtt.backoff_max", 60, "1m", s(60)),
    ("mqtt.connect_timeout", 10, "10s", s(10)),
    ("health.grace", 0, "0s", s(0)),
    ("health.interval", 3, "3s", s(3)),
    ("health.timeout", 1, "1s", s(1)),
    ("health.deadline", 600, "10m", s(600)),
    ("update.stop_timeout", 3, "3s", s(3)),
    ("update.progress_interval", 250, "250ms", ms(250)),
    ("update.health_watch", 0, "0s", s(0)),
    ("update.drain_gate", 45, "45s", s(45)),
    ("update.max_lock_hold", 7200, "2h", s(7200)),
    ("update.agent_confirm_timeout", 300, "5m", s(300)),
    ("download.stall_timeout", 3, "3s", s(3)),
    ("download.sync_every", 5, "5s", s(5)),
    ("download.retry_initial", 200, "200ms", ms(200)),
    ("download.retry_max", 2, "2s", s(2)),
    ("telemetry.sample", 30, "30s", s(30)),
    ("telemetry.max_interval", 3600, "1h", s(3600)),
];

/// The defaults, as they were with the integer keys.
const DEFAULTS: &[(&str, Duration)] = &[
    ("clock_skew", s(300)),
    ("trust.max_heartbeat_age", s(3600)),
    ("mqtt.keepalive", s(300)),
    ("mqtt.backoff_initial", ms(500)),
    ("mqtt.backoff_max", s(300)),
    ("mqtt.connect_timeout", s(30)),
    ("health.grace", s(5)),
    ("health.interval", s(2)),
    ("health.timeout", s(2)),
    ("health.deadline", s(120)),
    ("update.stop_timeout", s(10)),
    ("update.progress_interval", ms(1000)),
    ("update.health_watch", s(10)),
    ("update.drain_gate", s(30)),
    ("update.max_lock_hold", s(3600)),
    ("update.agent_confirm_timeout", s(120)),
    ("download.stall_timeout", s(30)),
    ("download.sync_every", s(2)),
    ("download.retry_initial", ms(1000)),
    ("download.retry_max", s(60)),
    ("telemetry.sample", s(60)),
    ("telemetry.max_interval", s(1800)),
];

fn key(path: &str) -> &'static DurationKey {
    KEYS.iter()
        .find(|k| k.path() == path)
        .unwrap_or_else(|| panic!("{path} is not in KEYS"))
}

/// The minimal config with these keys set, each in its table.
fn with(dir: &Path, keys: &[(&DurationKey, &str, toml::Value)]) -> String {
    let mut t: toml::Table = toml::from_str(&minimal(dir)).unwrap();
    for (k, name, value) in keys {
        let table = if k.table.is_empty() {
            &mut t
        } else {
            t.entry(k.table)
                .or_insert_with(|| toml::Table::new().into())
                .as_table_mut()
                .unwrap()
        };
        table.insert(name.to_string(), value.clone());
    }
    toml::to_string(&t).unwrap()
}

fn load(text: &str) -> Result<Loaded, ConfigError> {
    AgentConfig::from_toml(text, Path::new("agent.toml"))
}

/// The key an error names and its detail, for a config error of the key checks or validation.
fn invalid(text: &str) -> (String, String) {
    match load(text) {
        Err(ConfigError::Invalid { field, detail, .. }) => (field, detail),
        Err(e) => panic!("expected an invalid value, got {e}\n{text}"),
        Ok(_) => panic!("expected an error\n{text}"),
    }
}

fn sorted(v: impl Iterator<Item = String>) -> Vec<String> {
    let mut v: Vec<String> = v.collect();
    v.sort();
    v.dedup();
    v
}

#[test]
fn every_key_is_tabled_once() {
    let keys = sorted(KEYS.iter().map(|k| k.path()));
    assert_eq!(keys.len(), 22);
    assert_eq!(keys.len(), KEYS.len());
    assert_eq!(keys, sorted(SAME.iter().map(|r| r.0.to_string())), "SAME");
    assert_eq!(
        keys,
        sorted(DEFAULTS.iter().map(|r| r.0.to_string())),
        "DEFAULTS"
    );
    assert_eq!(sorted(KEYS.iter().map(|k| k.old_path())).len(), KEYS.len());
    for k in KEYS {
        let suffix = match k.unit {
            Unit::Secs => "_s",
            Unit::Millis => "_ms",
        };
        assert!(k.old.ends_with(suffix), "{}", k.old_path());
        assert!(
            !k.key.ends_with("_s") && !k.key.ends_with("_ms"),
            "{}",
            k.path()
        );
    }
}

#[test]
fn defaults_are_unchanged() {
    let d = tempfile::tempdir().unwrap();
    let c = load(&minimal(d.path())).unwrap().config;
    for (path, want) in DEFAULTS {
        assert_eq!(get(&c, path), *want, "{path}");
    }
    // The Default impls agree with a config that leaves the tables out.
    assert_eq!(c.update.stop_timeout, UpdateConfig::default().stop_timeout);
    assert_eq!(c.mqtt, crate::mqtt::MqttConfig::default());
    assert_eq!(c.health, HealthDefaults::default());
    assert_eq!(c.download, DownloadConfig::default());
    assert_eq!(c.telemetry, TelemetryConfig::default());
}

#[test]
fn the_old_form_parses_to_the_same_duration_as_the_new() {
    let d = tempfile::tempdir().unwrap();
    let defaults = load(&minimal(d.path())).unwrap().config;
    for &(path, old, new, want) in SAME {
        let k = key(path);
        assert_ne!(
            get(&defaults, path),
            want,
            "{path}: pick a value that is not the default"
        );
        let by_old = with(d.path(), &[(k, k.old, old.into())]);
        let by_new = with(d.path(), &[(k, k.key, new.into())]);
        let c = load(&by_old)
            .unwrap_or_else(|e| panic!("{e}\n{by_old}"))
            .config;
        assert_eq!(get(&c, path), want, "{}", k.old_path());
        let c = load(&by_new)
            .unwrap_or_else(|e| panic!("{e}\n{by_new}"))
            .config;
        assert_eq!(get(&c, path), want, "{path}");
    }
    // All at once, in either form: a whole conffile of an earlier version, and its rewrite.
    let all = |old: bool| {
        let rows: Vec<_> = SAME
            .iter()
            .map(|&(path, o, n, _)| {
                let k = key(path);
                if old {
                    (k, k.old, toml::Value::from(o))
                } else {
                    (k, k.key, toml::Value::from(n))
                }
            })
            .collect();
        load(&with(d.path(), &rows)).unwrap().config
    };
    let (old, new) = (all(true), all(false));
    for &(path, _, _, want) in SAME {
        assert_eq!((get(&old, path), get(&new, path)), (want, want), "{path}");
    }
}

#[test]
fn both_names_of_one_setting_are_an_error_naming_both() {
    let d = tempfile::tempdir().unwrap();
    for &(path, old, new, _) in SAME {
        let k = key(path);
        let text = with(d.path(), &[(k, k.key, new.into()), (k, k.old, old.into())]);
        let e = load(&text).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{path}: ")) && e.contains(&k.old_path()) && e.contains("only one"),
            "{e}"
        );
    }
    // The same value in both forms is still two settings.
    let e = load(&format!(
        "{}[update]\nstop_timeout = \"10s\"\nstop_timeout_s = 10\n",
        minimal(d.path())
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("update.stop_timeout:") && e.contains("update.stop_timeout_s"),
        "{e}"
    );
}

#[test]
fn a_bad_string_is_an_error_naming_the_key_and_the_fault() {
    let d = tempfile::tempdir().unwrap();
    for k in KEYS {
        let text = with(d.path(), &[(k, k.key, "ten seconds".into())]);
        let (field, detail) = invalid(&text);
        assert_eq!(field, k.path());
        assert!(
            detail.contains("\"ten seconds\" is not a duration") && detail.contains("\"10s\""),
            "{detail}"
        );
        let shown = load(&text).unwrap_err().to_string();
        assert!(shown.contains(&format!("{}: ", k.path())), "{shown}");
    }
    let k = key("update.stop_timeout");
    for (value, want) in [
        ("10", "time unit needed"),
        ("", "empty"),
        ("10parsecs", "unknown time unit \"parsecs\""),
        ("-5s", "not a duration"),
    ] {
        let (field, detail) = invalid(&with(d.path(), &[(k, k.key, value.into())]));
        assert_eq!(field, "update.stop_timeout");
        assert!(detail.contains(want), "{value:?}: {detail}");
    }
}

#[test]
fn each_name_takes_only_its_own_form() {
    let d = tempfile::tempdir().unwrap();
    // A number under the new name: the string it should be, with the old key's unit.
    let k = key("update.stop_timeout");
    let (field, detail) = invalid(&with(d.path(), &[(k, k.key, 10.into())]));
    assert_eq!(field, "update.stop_timeout");
    assert!(
        detail.contains("\"10s\"") && detail.contains("update.stop_timeout_s"),
        "{detail}"
    );
    let k = key("update.progress_interval");
    let (_, detail) = invalid(&with(d.path(), &[(k, k.key, 250.into())]));
    assert!(detail.contains("\"250ms\""), "{detail}");
    let (_, detail) = invalid(&with(d.path(), &[(k, k.key, true.into())]));
    assert!(detail.contains("found a boolean"), "{detail}");
    // A string or a negative number under the old name.
    for value in [toml::Value::from("10s"), (-1).into(), 1.5.into()] {
        let k = key("update.stop_timeout");
        let (field, detail) = invalid(&with(d.path(), &[(k, k.old, value.clone())]));
        assert_eq!(field, "update.stop_timeout_s", "{value}");
        assert!(
            detail.contains("whole number of seconds from 0 to 4294967295")
                && detail.contains("update.stop_timeout = \"10s\""),
            "{detail}"
        );
    }
}

#[test]
fn the_old_ranges_hold_for_both_forms() {
    let d = tempfile::tempdir().unwrap();
    // The keys that were u32 seconds: at most u32::MAX seconds either way.
    let k = key("update.max_lock_hold");
    let max = u32::MAX as i64;
    let c = load(&with(d.path(), &[(k, k.old, max.into())]))
        .unwrap()
        .config;
    assert_eq!(c.update.max_lock_hold, s(u32::MAX as u64));
    let (field, _) = invalid(&with(d.path(), &[(k, k.old, (max + 1).into())]));
    assert_eq!(field, "update.max_lock_s");
    let (field, detail) = invalid(&with(d.path(), &[(k, k.key, "200years".into())]));
    assert_eq!(field, "update.max_lock_hold");
    assert!(
        detail.contains("largest allowed, 4294967295 seconds"),
        "{detail}"
    );
    // u64 keys take what TOML can hold.
    let k = key("trust.max_heartbeat_age");
    let c = load(&with(d.path(), &[(k, k.old, i64::MAX.into())]))
        .unwrap()
        .config;
    assert_eq!(c.trust.max_heartbeat_age, s(i64::MAX as u64));
}

#[test]
fn sub_second_precision() {
    let d = tempfile::tempdir().unwrap();
    for (path, text, want) in [
        ("update.progress_interval", "1ms", ms(1)),
        ("update.progress_interval", "1s 250ms", ms(1250)),
        ("mqtt.backoff_initial", "20ms", ms(20)),
        ("download.retry_initial", "1500ms", ms(1500)),
        // Keys that were whole seconds take fractions now where the value is used as a duration.
        ("update.stop_timeout", "1500ms", ms(1500)),
        ("update.drain_gate", "2s 500ms", ms(2500)),
        ("health.grace", "500ms", ms(500)),
        ("download.stall_timeout", "1s 500ms", ms(1500)),
    ] {
        let k = key(path);
        let c = load(&with(d.path(), &[(k, k.key, text.into())]))
            .unwrap_or_else(|e| panic!("{path} = {text:?}: {e}"))
            .config;
        assert_eq!(get(&c, path), want, "{path} = {text:?}");
    }
    let k = key("update.progress_interval");
    let c = load(&with(d.path(), &[(k, k.old, 1.into())]))
        .unwrap()
        .config;
    assert_eq!(c.update.progress_interval, ms(1));
    // MQTT counts these in whole seconds.
    for path in ["mqtt.keepalive", "mqtt.connect_timeout"] {
        let k = key(path);
        let e = load(&with(d.path(), &[(k, k.key, "1500ms".into())]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(k.key) && e.contains("whole number of seconds"),
            "{e}"
        );
    }
}

#[test]
fn validation_is_the_same_in_either_form() {
    let d = tempfile::tempdir().unwrap();
    // (key, old value, new value, what the error names): zero and the other limits stay refused.
    for (path, old, new, field) in [
        ("telemetry.sample", 0, "0s", "telemetry.sample"),
        ("telemetry.sample", 86_401, "1day 1s", "telemetry.sample"),
        (
            "telemetry.max_interval",
            59,
            "59s",
            "telemetry.max_interval",
        ),
        ("download.stall_timeout", 0, "0s", "download.stall_timeout"),
        ("download.sync_every", 0, "0s", "download.sync_every"),
        ("download.retry_initial", 0, "0s", "download.retry_initial"),
        ("download.retry_max", 0, "0s", "download.retry_initial"),
        ("mqtt.keepalive", 0, "0s", "keepalive"),
        ("mqtt.keepalive", 65_536, "65536s", "keepalive"),
        ("mqtt.backoff_initial", 0, "0s", "backoff_initial"),
        ("mqtt.backoff_max", 0, "0s", "backoff_max"),
        ("mqtt.connect_timeout", 0, "0s", "connect_timeout"),
        ("mqtt.connect_timeout", 3601, "1h 1s", "connect_timeout"),
    ] {
        let k = key(path);
        for text in [
            with(d.path(), &[(k, k.old, old.into())]),
            with(d.path(), &[(k, k.key, new.into())]),
        ] {
            let e = load(&text).unwrap_err().to_string();
            assert!(e.contains(field), "{path}: {e}");
        }
    }
    // A backoff cap below its start, in mixed forms.
    let (i, m) = (key("mqtt.backoff_initial"), key("mqtt.backoff_max"));
    let e = load(&with(
        d.path(),
        &[(i, i.old, 5000.into()), (m, m.key, "1s".into())],
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("backoff_max") && e.contains("below backoff_initial"),
        "{e}"
    );
    // Zero stays allowed where it was (it turns the check off, or means none).
    for path in [
        "clock_skew",
        "trust.max_heartbeat_age",
        "update.health_watch",
        "update.stop_timeout",
        "health.grace",
    ] {
        let k = key(path);
        for text in [
            with(d.path(), &[(k, k.old, 0.into())]),
            with(d.path(), &[(k, k.key, "0s".into())]),
        ] {
            let c = load(&text).unwrap_or_else(|e| panic!("{path}: {e}")).config;
            assert_eq!(get(&c, path), Duration::ZERO, "{path}");
        }
    }
}

/// `examples/agent.toml` (the shipped conffile) shows every duration under its new name, at its
/// default, and no old name.
#[test]
fn the_example_shows_every_duration_key_at_its_default() {
    let all = uncommented(EXAMPLE);
    let tree: std::collections::BTreeMap<String, durations::Probe> = toml::from_str(&all).unwrap();
    durations::check(&tree).unwrap();
    let c: AgentConfig = toml::from_str(&all).unwrap();
    for k in KEYS {
        assert!(
            EXAMPLE.contains(&format!("# {} = \"", k.key)),
            "examples/agent.toml lacks {}",
            k.path()
        );
        assert!(
            !EXAMPLE.contains(&format!("{} = ", k.old)),
            "examples/agent.toml still shows {}",
            k.old_path()
        );
        let default = DEFAULTS.iter().find(|r| r.0 == k.path()).unwrap().1;
        assert_eq!(
            get(&c, &k.path()),
            default,
            "examples/agent.toml: {}",
            k.path()
        );
    }
}

#[test]
fn lenient_on_its_own_strict_when_loaded() {
    // A table deserialized by itself (as unit tests of one section do) takes either form under
    // either name; `from_toml` holds each name to its own form.
    let t: TelemetryConfig = toml::from_str("sample = 30\nmax_interval_s = \"1h\"").unwrap();
    assert_eq!((t.sample, t.max_interval), (s(30), s(3600)));
    let e = toml::from_str::<TelemetryConfig>("sample = \"soon\"").unwrap_err();
    assert!(e.to_string().contains("\"soon\" is not a duration"), "{e}");
    let e = toml::from_str::<TelemetryConfig>("sample = -1").unwrap_err();
    assert!(e.to_string().contains("-1"), "{e}");
}
