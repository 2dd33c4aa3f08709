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

use std::collections::BTreeMap;

use serde::de::{
    self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Unexpected, Visitor,
};

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

/// What [`check`] sees of a config: strings, integers and tables, the rest only by its type.
/// (Not `toml::Table`: a tree of every TOML type would cost the armv7 agent tens of KB for a
/// check that reads two of them.)
#[derive(Debug, PartialEq)]
pub enum Probe {
    String(String),
    Integer(i64),
    Table(BTreeMap<String, Probe>),
    /// `a boolean`, `an array`, ...
    Other(&'static str),
}

impl Probe {
    fn as_table(&self) -> Option<&BTreeMap<String, Probe>> {
        match self {
            Probe::Table(t) => Some(t),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Probe {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Probe, D::Error> {
        d.deserialize_any(ProbeVisitor)
    }
}

struct ProbeVisitor;

impl<'de> Visitor<'de> for ProbeVisitor {
    type Value = Probe;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a TOML value")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Probe, E> {
        Ok(Probe::String(v.to_string()))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Probe, E> {
        Ok(Probe::Integer(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Probe, E> {
        Ok(i64::try_from(v).map_or(Probe::Other("an integer"), Probe::Integer))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Probe, E> {
        Ok(Probe::Other("a boolean"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Probe, E> {
        Ok(Probe::Other("a float"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Probe, A::Error> {
        while a.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Probe::Other("an array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Probe, A::Error> {
        let mut t = BTreeMap::new();
        while let Some((k, v)) = a.next_entry::<String, Probe>()? {
            t.insert(k, v);
        }
        // A datetime comes as a one-entry map with toml's private key.
        if t.len() == 1 && t.keys().next().is_some_and(|k| k.starts_with("$__toml")) {
            return Ok(Probe::Other("a datetime"));
        }
        Ok(Probe::Table(t))
    }
}

/// Check the duration keys of a whole config tree; `Err((key, reason))`. Tables that are
/// missing or not tables are left to the deserializer.
pub fn check(root: &BTreeMap<String, Probe>) -> Result<(), (String, String)> {
    for k in KEYS {
        let table = if k.table.is_empty() {
            Some(root)
        } else {
            root.get(k.table).and_then(Probe::as_table)
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
fn new_value(k: &DurationKey, v: &Probe) -> Result<Duration, String> {
    let s = match v {
        Probe::String(s) => s,
        Probe::Integer(n) => {
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
fn old_value(k: &DurationKey, v: &Probe) -> Result<Duration, String> {
    match v {
        Probe::Integer(n) if u64::try_from(*n).is_ok_and(|n| n <= k.max) => {
            Ok(k.unit.duration(*n as u64))
        }
        other => {
            let found = match other {
                Probe::Integer(n) => n.to_string(),
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
fn a(v: &Probe) -> String {
    match v {
        Probe::String(_) => "a string",
        Probe::Integer(_) => "an integer",
        Probe::Table(_) => "a table",
        Probe::Other(t) => t,
    }
    .to_string()
}

/// A humantime duration: `"10s"`, `"250ms"`, `"1h 30m"`, `"2d"`.
pub fn parse(s: &str) -> Result<Duration, String> {
    parse_terms(s).map_err(|e| {
        format!("{s:?} is not a duration ({e}); write e.g. \"10s\", \"250ms\" or \"1h 30m\"")
    })
}

/// The humantime grammar the config needs, without the crate (the armv7 agent has a size
/// budget): terms `<digits><unit>`, optionally separated by spaces, summed.
fn parse_terms(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("value was empty".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return Err(format!("expected a number at {rest:?}"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| "number is too large".to_string())?;
        rest = rest[digits..].trim_start();
        let unit_len = rest.len()
            - rest
                .trim_start_matches(|c: char| c.is_ascii_alphabetic())
                .len();
        let unit = &rest[..unit_len];
        rest = rest[unit_len..].trim_start();
        let term = match unit {
            "" => return Err("time unit needed, for example 10s or 250ms".into()),
            "ns" | "nsec" => Duration::from_nanos(n),
            "us" | "usec" => Duration::from_micros(n),
            "ms" | "msec" | "millis" => Duration::from_millis(n),
            "s" | "sec" | "secs" | "second" | "seconds" => Duration::from_secs(n),
            "m" | "min" | "mins" | "minute" | "minutes" => mul(n, 60)?,
            "h" | "hr" | "hrs" | "hour" | "hours" => mul(n, 3600)?,
            "d" | "day" | "days" => mul(n, 86_400)?,
            "w" | "week" | "weeks" => mul(n, 7 * 86_400)?,
            // humantime's: a month of 30.44 days, a year of 365.25.
            "M" | "month" | "months" => mul(n, 2_630_016)?,
            "y" | "year" | "years" => mul(n, 31_557_600)?,
            other => return Err(format!("unknown time unit {other:?}")),
        };
        total = total
            .checked_add(term)
            .ok_or_else(|| "number is too large".to_string())?;
    }
    Ok(total)
}

fn mul(n: u64, secs: u64) -> Result<Duration, String> {
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| "number is too large".to_string())
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
    if d.is_zero() {
        return "0s".into();
    }
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    let parts = [
        (
            secs / 86_400,
            if secs / 86_400 == 1 { "day" } else { "days" },
        ),
        (secs / 3600 % 24, "h"),
        (secs / 60 % 60, "m"),
        (secs % 60, "s"),
        (u64::from(nanos / 1_000_000), "ms"),
        (u64::from(nanos / 1_000 % 1_000), "us"),
        (u64::from(nanos % 1_000), "ns"),
    ];
    parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, u)| format!("{n}{u}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grammar_reads_terms_and_show_writes_them_back() {
        for (text, want) in [
            ("10s", Duration::from_secs(10)),
            ("250ms", Duration::from_millis(250)),
            ("1h 30m", Duration::from_secs(5400)),
            ("1h30m", Duration::from_secs(5400)),
            ("2d", Duration::from_secs(2 * 86_400)),
            ("1day", Duration::from_secs(86_400)),
            ("3 seconds", Duration::from_secs(3)),
            ("1w", Duration::from_secs(7 * 86_400)),
            ("1s 500ms", Duration::from_millis(1500)),
        ] {
            assert_eq!(parse(text), Ok(want), "{text}");
        }
        for (text, why) in [
            ("", "empty"),
            ("10", "time unit needed"),
            ("10parsecs", "unknown time unit \"parsecs\""),
            ("-5s", "expected a number"),
            ("ten seconds", "expected a number"),
            ("99999999999999999999s", "too large"),
            ("9999999999999999999w", "too large"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(why), "{text:?}: {e}");
        }
        for (d, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(5400), "1h 30m"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_secs(86_400), "1day"),
            (Duration::from_secs(2 * 86_400 + 1), "2days 1s"),
        ] {
            assert_eq!(show(d), text);
            assert_eq!(parse(&show(d)), Ok(d), "{text} reads back");
        }
    }
}
