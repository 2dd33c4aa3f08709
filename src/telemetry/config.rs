//! The `[telemetry]` table of the agent's configuration.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::durations::show;

/// Keys of the `system` object that are not sensor names. A sensor may not use one of them.
pub const SYSTEM_KEYS: [&str; 7] = [
    "cpu_pct",
    "mem_used_bytes",
    "mem_total_bytes",
    "disk_free_bytes",
    "docker_disk_free_bytes",
    "uptime_s",
    "load1",
];

/// Deadband of a configured sensor that has no entry in `[telemetry.deadband]`.
pub const DEFAULT_SENSOR_DEADBAND: f64 = 0.5;

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Sample and report at all.
    pub enabled: bool,
    /// Where sysfs is mounted; tests point it at a temp tree laid out like the kernel's.
    pub sysfs_root: PathBuf,
    /// Take a sample this often.
    #[serde(
        alias = "sample_s",
        deserialize_with = "crate::config::durations::secs"
    )]
    pub sample: Duration,
    /// Publish at least this often, even when nothing moved: the heartbeat.
    #[serde(
        alias = "max_interval_s",
        deserialize_with = "crate::config::durations::secs"
    )]
    pub max_interval: Duration,
    /// Per-metric deadbands, merged over [`default_deadbands`]. A metric without one (uptime_s,
    /// mem_total_bytes) never triggers a publish by itself.
    pub deadband: BTreeMap<String, f64>,
    /// Cap of the on-disk store-and-forward buffer, in bytes.
    pub buffer_max_bytes: u64,
    /// At most this many samples per message when the buffer is flushed.
    pub batch_max: usize,
    #[serde(rename = "sensor")]
    pub sensors: Vec<SensorConfig>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            enabled: true,
            sysfs_root: PathBuf::from("/sys"),
            sample: Duration::from_secs(60),
            max_interval: Duration::from_secs(1800),
            deadband: BTreeMap::new(),
            buffer_max_bytes: 1024 * 1024,
            batch_max: 50,
            sensors: Vec::new(),
        }
    }
}

/// Defaults chosen so that a steady box stays quiet: ordinary jitter of an idle system (a few
/// percent CPU, page cache coming and going, logs growing) does not count as a change.
pub fn default_deadbands() -> BTreeMap<String, f64> {
    const MIB: f64 = 1024.0 * 1024.0;
    [
        ("temperature_c", 0.5),
        ("humidity_pct", 2.0),
        ("cpu_temp_c", 3.0),
        ("cpu_pct", 25.0),
        ("load1", 1.0),
        ("mem_used_bytes", 64.0 * MIB),
        ("disk_free_bytes", 256.0 * MIB),
        ("docker_disk_free_bytes", 256.0 * MIB),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SensorKind {
    Hwmon,
    Iio,
    Thermal,
    /// A number from a JSON object an app serves over plain HTTP on the box.
    Http,
}

/// One `[[telemetry.sensor]]`: where a named reading comes from.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorConfig {
    /// The reading's key in `sensors` (`temperature_c`, `humidity_pct`, `cpu_temp_c`).
    pub name: String,
    pub kind: SensorKind,
    /// hwmon: the content of `hwmon*/name`; iio: the content of `iio:device*/name`.
    #[serde(default)]
    pub device: Option<String>,
    /// hwmon: the attribute, e.g. `temp1_input`, `humidity1_input`.
    #[serde(default)]
    pub input: Option<String>,
    /// iio: the channel, e.g. `in_temp`, `in_humidityrelative` (`_input`, or `_raw` × `_scale`
    /// + `_offset`).
    #[serde(default)]
    pub channel: Option<String>,
    /// thermal: the zone's `type` (`cpu-thermal`) or its directory name (`thermal_zone0`).
    #[serde(default)]
    pub zone: Option<String>,
    /// http: the URL to GET, e.g. `http://127.0.0.1:8080/`.
    #[serde(default)]
    pub url: Option<String>,
    /// http: the key of the number in the JSON object served, e.g. `humidity_pct`.
    #[serde(default)]
    pub field: Option<String>,
}

impl TelemetryConfig {
    /// The deadbands in force: the defaults, overridden by the configured ones.
    pub fn effective_deadbands(&self) -> BTreeMap<String, f64> {
        let mut d = default_deadbands();
        for s in &self.sensors {
            d.entry(s.name.clone()).or_insert(DEFAULT_SENSOR_DEADBAND);
        }
        d.extend(self.deadband.iter().map(|(k, v)| (k.clone(), *v)));
        d
    }

    /// Check the values; `Err((field, reason))`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |f: &str, r: String| Err((format!("telemetry.{f}"), r));
        const DAY: Duration = Duration::from_secs(86_400);
        if !(Duration::from_secs(1)..=DAY).contains(&self.sample) {
            return bad(
                "sample",
                format!("{} is out of range 1s-1day", show(self.sample)),
            );
        }
        if self.max_interval < self.sample || self.max_interval > 7 * DAY {
            return bad(
                "max_interval",
                format!(
                    "{} must be between sample ({}) and 7days",
                    show(self.max_interval),
                    show(self.sample)
                ),
            );
        }
        if self.buffer_max_bytes < 4096 {
            return bad(
                "buffer_max_bytes",
                format!("{} is below the minimum of 4096", self.buffer_max_bytes),
            );
        }
        if !(1..=1000).contains(&self.batch_max) {
            return bad(
                "batch_max",
                format!("{} is out of range 1-1000", self.batch_max),
            );
        }
        for (k, v) in &self.deadband {
            if !v.is_finite() || *v < 0.0 {
                return bad(
                    "deadband",
                    format!("{k} = {v}: must be a finite number >= 0"),
                );
            }
        }
        let mut names = BTreeSet::new();
        for s in &self.sensors {
            let n = &s.name;
            if n.is_empty()
                || n.len() > 64
                || !n
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return bad("sensor.name", format!("{n:?}: use 1-64 of [a-z0-9_]"));
            }
            if SYSTEM_KEYS.contains(&n.as_str()) {
                return bad("sensor.name", format!("{n:?} is a system metric's name"));
            }
            if !names.insert(n.clone()) {
                return bad("sensor.name", format!("{n:?} is configured twice"));
            }
            let need = |field: &str, v: &Option<String>| match v {
                Some(x) if !x.is_empty() && !x.contains('/') && x != ".." => Ok(()),
                _ => Err((
                    format!("telemetry.sensor.{field}"),
                    format!(
                        "{n}: {:?} sensors need {field} (a file or device name, no /)",
                        s.kind
                    ),
                )),
            };
            let unused = |field: &str, v: &Option<String>| match v {
                None => Ok(()),
                Some(_) => Err((
                    format!("telemetry.sensor.{field}"),
                    format!("{n}: {field} does not apply to {:?} sensors", s.kind),
                )),
            };
            if s.kind != SensorKind::Http {
                unused("url", &s.url)?;
                unused("field", &s.field)?;
            }
            match s.kind {
                SensorKind::Http => {
                    match &s.url {
                        Some(u) if u.starts_with("http://") && u.len() > 7 => {}
                        _ => {
                            return bad(
                                "sensor.url",
                                format!("{n}: http sensors need url = \"http://host:port/path\""),
                            )
                        }
                    }
                    match &s.field {
                        Some(f) if !f.is_empty() => {}
                        _ => return bad("sensor.field", format!("{n}: http sensors need field")),
                    }
                    unused("device", &s.device)?;
                    unused("input", &s.input)?;
                    unused("channel", &s.channel)?;
                    unused("zone", &s.zone)?;
                }
                SensorKind::Hwmon => {
                    need("device", &s.device)?;
                    need("input", &s.input)?;
                    unused("channel", &s.channel)?;
                    unused("zone", &s.zone)?;
                }
                SensorKind::Iio => {
                    need("device", &s.device)?;
                    need("channel", &s.channel)?;
                    unused("input", &s.input)?;
                    unused("zone", &s.zone)?;
                }
                SensorKind::Thermal => {
                    need("zone", &s.zone)?;
                    unused("device", &s.device)?;
                    unused("input", &s.input)?;
                    unused("channel", &s.channel)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<TelemetryConfig, toml::de::Error> {
        toml::from_str(t)
    }

    #[test]
    fn empty_table_gives_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c, TelemetryConfig::default());
        c.validate().unwrap();
        assert!(c.enabled);
        assert_eq!(c.sample, Duration::from_secs(60));
        assert_eq!(c.max_interval, Duration::from_secs(1800));
        assert_eq!(c.effective_deadbands()["temperature_c"], 0.5);
        assert!(!c.effective_deadbands().contains_key("uptime_s"));
    }

    #[test]
    fn sensors_and_deadbands_parse() {
        let c = parse(
            r#"
            sample = "10s"
            [deadband]
            temperature_c = 0.2
            soil_c = 1.5
            [[sensor]]
            name = "temperature_c"
            kind = "hwmon"
            device = "sht4x"
            input = "temp1_input"
            [[sensor]]
            name = "humidity_pct"
            kind = "iio"
            device = "dht11"
            channel = "in_humidityrelative"
            [[sensor]]
            name = "cpu_temp_c"
            kind = "thermal"
            zone = "cpu-thermal"
            [[sensor]]
            name = "board_c"
            kind = "thermal"
            zone = "thermal_zone1"
            [[sensor]]
            name = "app_humidity_pct"
            kind = "http"
            url = "http://127.0.0.1:8080/"
            field = "humidity_pct"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        let d = c.effective_deadbands();
        assert_eq!(d["temperature_c"], 0.2);
        assert_eq!(d["soil_c"], 1.5);
        assert_eq!(d["board_c"], DEFAULT_SENSOR_DEADBAND);
        assert_eq!(c.sensors[1].kind, SensorKind::Iio);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = parse("sampel_s = 3").unwrap_err().to_string();
        assert!(e.contains("sampel_s"), "{e}");
        let e = parse("[[sensor]]\nname=\"a\"\nkind=\"hwmon\"\npin=4\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("pin"), "{e}");
        let e = parse("[[sensor]]\nname=\"a\"\nkind=\"gpio\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("gpio"), "{e}");
    }

    #[test]
    fn bad_values_are_explained() {
        for (text, field) in [
            ("sample = \"0s\"", "telemetry.sample"),
            ("sample = \"2d\"", "telemetry.sample"),
            // The older keys: the same rules.
            ("sample_s = 0", "telemetry.sample"),
            (
                "sample = \"1m\"\nmax_interval = \"30s\"",
                "telemetry.max_interval",
            ),
            ("sample_s = 60\nmax_interval_s = 30", "telemetry.max_interval"),
            ("max_interval = \"8days\"", "telemetry.max_interval"),
            ("buffer_max_bytes = 100", "telemetry.buffer_max_bytes"),
            ("batch_max = 0", "telemetry.batch_max"),
            ("[deadband]\ncpu_pct = -1.0", "telemetry.deadband"),
            (
                "[[sensor]]\nname = \"cpu_pct\"\nkind = \"thermal\"\nzone = \"z\"",
                "telemetry.sensor.name",
            ),
            (
                "[[sensor]]\nname = \"Temp\"\nkind = \"thermal\"\nzone = \"z\"",
                "telemetry.sensor.name",
            ),
            (
                "[[sensor]]\nname = \"t\"\nkind = \"thermal\"\nzone = \"z\"\n[[sensor]]\nname = \"t\"\nkind = \"thermal\"\nzone = \"y\"",
                "telemetry.sensor.name",
            ),
            (
                "[[sensor]]\nname = \"t\"\nkind = \"hwmon\"\ndevice = \"sht4x\"",
                "telemetry.sensor.input",
            ),
            (
                "[[sensor]]\nname = \"t\"\nkind = \"hwmon\"\ndevice = \"x\"\ninput = \"../../etc/passwd\"",
                "telemetry.sensor.input",
            ),
            (
                "[[sensor]]\nname = \"t\"\nkind = \"iio\"\ndevice = \"x\"",
                "telemetry.sensor.channel",
            ),
            (
                "[[sensor]]\nname = \"t\"\nkind = \"thermal\"\nzone = \"z\"\ndevice = \"x\"",
                "telemetry.sensor.device",
            ),
            (
                "[[sensor]]\nname = \"h\"\nkind = \"http\"\nfield = \"h\"",
                "telemetry.sensor.url",
            ),
            (
                "[[sensor]]\nname = \"h\"\nkind = \"http\"\nurl = \"https://x/\"\nfield = \"h\"",
                "telemetry.sensor.url",
            ),
            (
                "[[sensor]]\nname = \"h\"\nkind = \"http\"\nurl = \"http://127.0.0.1:8080/\"",
                "telemetry.sensor.field",
            ),
            (
                "[[sensor]]\nname = \"t\"\nkind = \"thermal\"\nzone = \"z\"\nfield = \"x\"",
                "telemetry.sensor.field",
            ),
        ] {
            let c = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            let (f, r) = c.validate().unwrap_err();
            assert_eq!(f, field, "{text}: {r}");
        }
    }
}
