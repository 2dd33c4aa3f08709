//! Durations in the agent's config: a humantime string under a key without a unit
//! (`stop_timeout = "10s"`, `progress_interval = "250ms"`, `max_lock_hold = "1h"`) or, as in
//! configs written before those keys existed, a plain integer under the older key with the unit
//! in its name (`stop_timeout_s = 10`, `progress_interval_ms = 1000`). [`KEYS`] lists them all.
//!
//! [`check`] looks at the TOML tree before it is deserialized: each setting given once (not under
//! both names), a new key holding a string that parses as a duration, an old key holding an
//! integer within its old type's range. Every error names the key. The fields then deserialize
//! with [`secs`] or [`millis`] (`#[serde(alias = "<old key>")]` carries the old name), which take
//! either form; deserialized on its own, without [`check`], a table is that lenient.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Unexpected, Visitor};

/// The unit of an old key's integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Secs,
    Millis,
}

impl Unit {
    pub fn duration(self, n: u64) -> Duration {
        match self {
            Unit::Secs => Duration::from_secs(n),
            Unit::Millis => Duration::from_millis(n),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Unit::Secs => "seconds",
            Unit::Millis => "milliseconds",
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Unit::Secs => "s",
            Unit::Millis => "ms",
        }
    }
}

/// One duration setting.
#[derive(Debug)]
pub struct DurationKey {
    /// Its table: `""` (top level), `"update"`, `"mqtt"`, ...
    pub table: &'static str,
    /// The key, a humantime string: `stop_timeout`.
    pub key: &'static str,
    /// The older key, an integer in `unit`: `stop_timeout_s`.
    pub old: &'static str,
    pub unit: Unit,
    /// The largest value the old key's type held (`u32` or `u64`), in `unit`; also the largest
    /// duration the new key takes.
    pub max: u64,
}

impl DurationKey {
    /// `update.stop_timeout`.
    pub fn path(&self) -> String {
        qualified(self.table, self.key)
    }

    /// `update.stop_timeout_s`.
    pub fn old_path(&self) -> String {
        qualified(self.table, self.old)
    }

    pub fn max(&self) -> Duration {
        self.unit.duration(self.max)
    }
}

fn qualified(table: &str, key: &str) -> String {
    if table.is_empty() {
        key.to_string()
    } else {
        format!("{table}.{key}")
    }
}

/// A key whose older name held `u32` seconds.
const fn s32(table: &'static str, key: &'static str, old: &'static str) -> DurationKey {
    DurationKey {
        table,
        key,
        old,
        unit: Unit::Secs,
        max: u32::MAX as u64,
    }
}

/// A key whose older name held `u64` seconds.
const fn s64(table: &'static str, key: &'static str, old: &'static str) -> DurationKey {
    DurationKey {
        unit: Unit::Secs,
        max: u64::MAX,
        ..s32(table, key, old)
    }
}

/// A key whose older name held `u64` milliseconds.
const fn ms64(table: &'static str, key: &'static str, old: &'static str) -> DurationKey {
    DurationKey {
        unit: Unit::Millis,
        max: u64::MAX,
        ..s32(table, key, old)
    }
}

/// Every duration of the agent's config, with its older name.
pub const KEYS: &[DurationKey] = &[
    s32("", "clock_skew", "clock_skew_s"),
    s64("trust", "max_heartbeat_age", "max_heartbeat_age_s"),
    s64("mqtt", "keepalive", "keepalive_s"),
    ms64("mqtt", "backoff_initial", "backoff_initial_ms"),
    s64("mqtt", "backoff_max", "backoff_max_s"),
    s64("mqtt", "connect_timeout", "connect_timeout_s"),
    s32("health", "grace", "grace_s"),
    s32("health", "interval", "interval_s"),
    s32("health", "timeout", "timeout_s"),
    s32("health", "deadline", "deadline_s"),
    s32("update", "stop_timeout", "stop_timeout_s"),
    ms64("update", "progress_interval", "progress_interval_ms"),
    s32("update", "health_watch", "health_watch_s"),
    s32("update", "drain_gate", "drain_gate_s"),
    s32("update", "max_lock_hold", "max_lock_s"),
    s32("update", "agent_confirm_timeout", "agent_confirm_s"),
    s32("download", "stall_timeout", "stall_timeout_s"),
    s32("download", "sync_every", "sync_every_s"),
    ms64("download", "retry_initial", "retry_initial_ms"),
    s32("download", "retry_max", "retry_max_s"),
    s64("telemetry", "sample", "sample_s"),
    s64("telemetry", "max_interval", "max_interval_s"),
];

/// Check the duration keys of a whole config tree; `Err((key, reason))`. Tables that are
/// missing or not tables are left to the deserializer.
pub fn check(root: &toml::Table) -> Result<(), (String, String)> {
    for k in KEYS {
        let table = if k.table.is_empty() {
            Some(root)
        } else {
            root.get(k.table).and_then(toml::Value::as_table)
        };
        let Some(table) = table else { continue };
        match (table.get(k.key), table.get(k.old)) {
            (Some(_), Some(_)) => {
                return Err((
                    k.path(),
                    format!(
                        "also set as {} (its older name, a number of {}); give only one of the two",
                        k.old_path(),
                        k.unit.name()
                    ),
                ))
            }
            (Some(v), None) => {
                new_value(k, v).map_err(|d| (k.path(), d))?;
            }
            (None, Some(v)) => {
                old_value(k, v).map_err(|d| (k.old_path(), d))?;
            }
            (None, None) => {}
        }
    }
    Ok(())
}

/// The value of a new key: a humantime string, at most [`DurationKey::max()`].
fn new_value(k: &DurationKey, v: &toml::Value) -> Result<Duration, String> {
    let s = match v {
        toml::Value::String(s) => s,
        toml::Value::Integer(n) => {
            return Err(format!(
                "{n} is a number: write the duration as a string with its unit, e.g. \"{n}{}\" \
                 (the older key {} takes a plain number of {})",
                k.unit.suffix(),
                k.old_path(),
                k.unit.name()
            ))
        }
        other => {
            return Err(format!(
                "expected a duration string such as \"10s\", \"250ms\" or \"1h 30m\", found {}",
                a(other)
            ))
        }
    };
    let d = parse(s)?;
    if d > k.max() {
        return Err(format!(
            "{s:?} is more than the largest allowed, {} {}",
            k.max,
            k.unit.name()
        ));
    }
    Ok(d)
}

/// The value of an old key: an integer of its old type, in its unit.
fn old_value(k: &DurationKey, v: &toml::Value) -> Result<Duration, String> {
    match v {
        toml::Value::Integer(n) if u64::try_from(*n).is_ok_and(|n| n <= k.max) => {
            Ok(k.unit.duration(*n as u64))
        }
        other => {
            let found = match other {
                toml::Value::Integer(n) => n.to_string(),
                other => a(other),
            };
            // TOML integers stop at i64::MAX: a u64 key has no other bound.
            let range = if k.max >= i64::MAX as u64 {
                "0 or more".to_string()
            } else {
                format!("from 0 to {}", k.max)
            };
            Err(format!(
                "expected a whole number of {} {range}, found {found} (or write {} = \"10{}\")",
                k.unit.name(),
                k.path(),
                k.unit.suffix()
            ))
        }
    }
}

/// `a string`, `an array`: a TOML value's type, in a message.
fn a(v: &toml::Value) -> String {
    let t = v.type_str();
    let article = if t.starts_with(['a', 'i']) { "an" } else { "a" };
    format!("{article} {t}")
}

/// A humantime duration: `"10s"`, `"250ms"`, `"1h 30m"`, `"2d"`.
pub fn parse(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| {
        format!("{s:?} is not a duration ({e}); write e.g. \"10s\", \"250ms\" or \"1h 30m\"")
    })
}

/// `deserialize_with` of a duration whose older key counted seconds.
pub fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_any(Either(Unit::Secs))
}

/// `deserialize_with` of a duration whose older key counted milliseconds.
pub fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_any(Either(Unit::Millis))
}

/// A humantime string, or an integer in the unit of the older key.
struct Either(Unit);

impl Visitor<'_> for Either {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "a duration string such as \"10s\" (or, under the older key, a number of {})",
            self.0.name()
        )
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Duration, E> {
        parse(s).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Duration, E> {
        Ok(self.0.duration(n))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Duration, E> {
        match u64::try_from(n) {
            Ok(n) => Ok(self.0.duration(n)),
            Err(_) => Err(E::invalid_value(Unexpected::Signed(n), &self)),
        }
    }
}

/// A duration in a message: `"30s"`, `"1h 30m"`, `"250ms"`.
pub fn show(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}
