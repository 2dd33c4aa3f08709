//! Sensor readers over Linux sysfs (hwmon, IIO, thermal zones).
//!
//! Devices are looked up by name at every sample, because they can re-enumerate (`hwmon2`
//! becomes `hwmon3` after a driver reload). A reading that cannot be had — the device or file
//! vanished, the read failed (DHT11s answer `EIO` now and then), the content is not a number, or
//! the value is physically impossible — is a [`Missing`] with the reason, never a number.
//!
//! Units (kernel ABI): hwmon `temp*_input` is m°C, `humidity*_input` m%RH; thermal `temp` is m°C;
//! IIO processed `in_*_input` is in milli-units, and raw channels give
//! `(raw + offset) × scale` in milli-units.

use std::path::{Path, PathBuf};

use super::config::{SensorConfig, SensorKind};

/// Why a configured sensor gave no reading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing(pub String);

/// What a reading measures, for its plausible range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Quantity {
    Temperature,
    Humidity,
    Other,
}

impl Quantity {
    fn of_attribute(attr: &str) -> Quantity {
        if attr.starts_with("temp") || attr.starts_with("in_temp") {
            Quantity::Temperature
        } else if attr.starts_with("humidity") || attr.starts_with("in_humidityrelative") {
            Quantity::Humidity
        } else {
            Quantity::Other
        }
    }

    /// Plausible range, in units (°C, %RH). Wider than any sensor's datasheet; outside of it the
    /// value is garbage (a bus error read back as 0xFFFF, an unconnected pin).
    fn range(self) -> (f64, f64) {
        match self {
            Quantity::Temperature => (-100.0, 200.0),
            Quantity::Humidity => (0.0, 100.0),
            Quantity::Other => (-1e9, 1e9),
        }
    }
}

/// Read one configured sensor under the sysfs root `root`, in units (°C, %RH), rounded to the
/// kernel's milli-unit resolution.
pub fn read_sensor(root: &Path, s: &SensorConfig) -> Result<f64, Missing> {
    let (value, quantity) = match s.kind {
        SensorKind::Http => {
            return Err(Missing("not a sysfs sensor".into()));
        }
        SensorKind::Hwmon => {
            let device = s.device.as_deref().unwrap_or_default();
            let input = s.input.as_deref().unwrap_or_default();
            let dir = find_by_name(&root.join("class/hwmon"), "hwmon", "name", device)
                .ok_or_else(|| Missing(format!("no hwmon device named {device:?}")))?;
            // Some drivers keep their attributes under `device/`.
            let mut path = dir.join(input);
            if !path.exists() && dir.join("device").join(input).exists() {
                path = dir.join("device").join(input);
            }
            (read_number(&path)? / 1000.0, Quantity::of_attribute(input))
        }
        SensorKind::Iio => {
            let device = s.device.as_deref().unwrap_or_default();
            let channel = s.channel.as_deref().unwrap_or_default();
            let dir = find_by_name(&root.join("bus/iio/devices"), "iio:device", "name", device)
                .ok_or_else(|| Missing(format!("no iio device named {device:?}")))?;
            (read_iio(&dir, channel)?, Quantity::of_attribute(channel))
        }
        SensorKind::Thermal => {
            let zone = s.zone.as_deref().unwrap_or_default();
            let base = root.join("class/thermal");
            let dir = if zone.starts_with("thermal_zone") && base.join(zone).is_dir() {
                Some(base.join(zone))
            } else {
                find_by_name(&base, "thermal_zone", "type", zone)
            }
            .ok_or_else(|| Missing(format!("no thermal zone {zone:?}")))?;
            (
                read_number(&dir.join("temp"))? / 1000.0,
                Quantity::Temperature,
            )
        }
    };
    let (lo, hi) = quantity.range();
    if !value.is_finite() || value < lo || value > hi {
        return Err(Missing(format!(
            "implausible value {value} (outside {lo}..={hi})"
        )));
    }
    Ok(round_milli(value))
}

/// `(raw + offset) × scale` in milli-units, or the processed `_input` when the driver has one.
fn read_iio(dir: &Path, channel: &str) -> Result<f64, Missing> {
    let input = dir.join(format!("{channel}_input"));
    if input.exists() {
        return Ok(read_number(&input)? / 1000.0);
    }
    let raw_path = dir.join(format!("{channel}_raw"));
    if !raw_path.exists() {
        return Err(Missing(format!(
            "{} has neither {channel}_input nor {channel}_raw",
            dir.display()
        )));
    }
    let raw = read_number(&raw_path)?;
    let optional = |suffix: &str, default: f64| {
        let p = dir.join(format!("{channel}_{suffix}"));
        if p.exists() {
            read_number(&p)
        } else {
            Ok(default)
        }
    };
    let scale = optional("scale", 1.0)?;
    let offset = optional("offset", 0.0)?;
    Ok((raw + offset) * scale / 1000.0)
}

/// The first (in name order) directory `base/<prefix>*` whose `attr` file holds `wanted`.
fn find_by_name(base: &Path, prefix: &str, attr: &str, wanted: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(base)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs.into_iter().find(|d| {
        std::fs::read_to_string(d.join(attr))
            .map(|s| s.trim() == wanted)
            .unwrap_or(false)
    })
}

fn read_number(path: &Path) -> Result<f64, Missing> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Missing(format!("{} vanished", path.display()))
        } else {
            Missing(format!("read {}: {e}", path.display()))
        }
    })?;
    let t = text.trim();
    t.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| {
            let shown: String = t.chars().take(32).collect();
            Missing(format!("{}: not a number: {shown:?}", path.display()))
        })
}

fn round_milli(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::fs;

    /// A fake sysfs laid out like the kernel's.
    pub(crate) struct FakeSysfs {
        pub dir: tempfile::TempDir,
    }

    impl FakeSysfs {
        pub fn new() -> FakeSysfs {
            FakeSysfs {
                dir: tempfile::tempdir().unwrap(),
            }
        }
        pub fn root(&self) -> &Path {
            self.dir.path()
        }
        pub fn write(&self, rel: &str, content: &str) {
            let p = self.root().join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, content).unwrap();
        }
        pub fn hwmon(&self, n: u32, name: &str, attrs: &[(&str, &str)]) {
            self.write(&format!("class/hwmon/hwmon{n}/name"), &format!("{name}\n"));
            for (a, v) in attrs {
                self.write(&format!("class/hwmon/hwmon{n}/{a}"), &format!("{v}\n"));
            }
        }
        pub fn iio(&self, n: u32, name: &str, attrs: &[(&str, &str)]) {
            self.write(
                &format!("bus/iio/devices/iio:device{n}/name"),
                &format!("{name}\n"),
            );
            for (a, v) in attrs {
                self.write(
                    &format!("bus/iio/devices/iio:device{n}/{a}"),
                    &format!("{v}\n"),
                );
            }
        }
        pub fn thermal(&self, n: u32, kind: &str, temp: &str) {
            self.write(
                &format!("class/thermal/thermal_zone{n}/type"),
                &format!("{kind}\n"),
            );
            self.write(
                &format!("class/thermal/thermal_zone{n}/temp"),
                &format!("{temp}\n"),
            );
        }
    }

    pub(crate) fn hwmon(name: &str, device: &str, input: &str) -> SensorConfig {
        SensorConfig {
            name: name.into(),
            kind: SensorKind::Hwmon,
            device: Some(device.into()),
            input: Some(input.into()),
            channel: None,
            zone: None,
            url: None,
            field: None,
        }
    }
    fn iio(name: &str, device: &str, channel: &str) -> SensorConfig {
        SensorConfig {
            name: name.into(),
            kind: SensorKind::Iio,
            device: Some(device.into()),
            input: None,
            channel: Some(channel.into()),
            zone: None,
            url: None,
            field: None,
        }
    }
    fn thermal(name: &str, zone: &str) -> SensorConfig {
        SensorConfig {
            name: name.into(),
            kind: SensorKind::Thermal,
            device: None,
            input: None,
            channel: None,
            zone: Some(zone.into()),
            url: None,
            field: None,
        }
    }

    fn missing(r: Result<f64, Missing>) -> String {
        match r {
            Err(Missing(m)) => m,
            Ok(v) => panic!("expected missing, got {v}"),
        }
    }

    #[test]
    fn hwmon_by_name_in_milli_units() {
        let fs = FakeSysfs::new();
        fs.hwmon(0, "cpu_thermal", &[("temp1_input", "51000")]);
        fs.hwmon(
            3,
            "sht4x",
            &[("temp1_input", "23250"), ("humidity1_input", "41500")],
        );
        let t = read_sensor(fs.root(), &hwmon("temperature_c", "sht4x", "temp1_input"));
        assert_eq!(t, Ok(23.25));
        let h = read_sensor(
            fs.root(),
            &hwmon("humidity_pct", "sht4x", "humidity1_input"),
        );
        assert_eq!(h, Ok(41.5));
        // Attributes under device/ (older drivers) are found too.
        fs.hwmon(5, "hdc2010", &[]);
        fs.write("class/hwmon/hwmon5/device/temp1_input", "-1500\n");
        assert_eq!(
            read_sensor(fs.root(), &hwmon("t", "hdc2010", "temp1_input")),
            Ok(-1.5)
        );
    }

    #[test]
    fn hwmon_re_enumeration_is_followed() {
        let fs = FakeSysfs::new();
        fs.hwmon(2, "sht4x", &[("temp1_input", "20000")]);
        let s = hwmon("temperature_c", "sht4x", "temp1_input");
        assert_eq!(read_sensor(fs.root(), &s), Ok(20.0));
        fs::remove_dir_all(fs.root().join("class/hwmon/hwmon2")).unwrap();
        assert!(missing(read_sensor(fs.root(), &s)).contains("no hwmon device named \"sht4x\""));
        fs.hwmon(7, "sht4x", &[("temp1_input", "21000")]);
        assert_eq!(read_sensor(fs.root(), &s), Ok(21.0));
    }

    #[test]
    fn iio_processed_and_raw_forms() {
        let fs = FakeSysfs::new();
        fs.iio(
            0,
            "dht11",
            &[
                ("in_temp_input", "22000"),
                ("in_humidityrelative_input", "45000"),
            ],
        );
        fs.iio(
            1,
            "hdc100x",
            &[
                ("in_temp_raw", "26000"),
                ("in_temp_scale", "2.517700195"),
                ("in_temp_offset", "-15887.515151"),
                ("in_humidityrelative_raw", "30000"),
                ("in_humidityrelative_scale", "1.525878906"),
            ],
        );
        assert_eq!(
            read_sensor(fs.root(), &iio("t", "dht11", "in_temp")),
            Ok(22.0)
        );
        assert_eq!(
            read_sensor(fs.root(), &iio("h", "dht11", "in_humidityrelative")),
            Ok(45.0)
        );
        // (26000 - 15887.515151) × 2.517700195 / 1000 = 25.460 °C
        let t = read_sensor(fs.root(), &iio("t", "hdc100x", "in_temp")).unwrap();
        assert!((t - 25.46).abs() < 0.001, "{t}");
        // 30000 × 1.525878906 / 1000 = 45.776 %RH
        let h = read_sensor(fs.root(), &iio("h", "hdc100x", "in_humidityrelative")).unwrap();
        assert_eq!(h, 45.776);
        // No _scale: raw + offset, milli-units.
        fs.iio(
            2,
            "plain",
            &[("in_temp_raw", "21000"), ("in_temp_offset", "500")],
        );
        assert_eq!(
            read_sensor(fs.root(), &iio("t", "plain", "in_temp")),
            Ok(21.5)
        );
        fs.iio(3, "nothing", &[]);
        assert!(
            missing(read_sensor(fs.root(), &iio("t", "nothing", "in_temp")))
                .contains("neither in_temp_input nor in_temp_raw")
        );
    }

    #[test]
    fn thermal_by_type_or_zone_name() {
        let fs = FakeSysfs::new();
        fs.thermal(0, "cpu-thermal", "48312");
        fs.thermal(1, "gpu-thermal", "45000");
        assert_eq!(
            read_sensor(fs.root(), &thermal("c", "cpu-thermal")),
            Ok(48.312)
        );
        assert_eq!(
            read_sensor(fs.root(), &thermal("c", "thermal_zone1")),
            Ok(45.0)
        );
        assert!(missing(read_sensor(fs.root(), &thermal("c", "soc"))).contains("no thermal zone"));
    }

    #[test]
    fn broken_sensors_are_missing_with_a_reason() {
        let fs = FakeSysfs::new();
        fs.hwmon(
            0,
            "broken",
            &[
                ("temp1_input", "garbage"),
                ("temp2_input", ""),
                ("temp3_input", "655350"),
                ("humidity1_input", "-3000"),
                ("humidity2_input", "150000"),
                ("temp4_input", "NaN"),
            ],
        );
        let r = |input: &str| missing(read_sensor(fs.root(), &hwmon("x", "broken", input)));
        assert!(r("temp1_input").contains("not a number: \"garbage\""));
        assert!(r("temp2_input").contains("not a number"));
        assert!(r("temp3_input").contains("implausible value 655.35"));
        assert!(r("humidity1_input").contains("implausible value -3"));
        assert!(r("humidity2_input").contains("implausible"));
        assert!(r("temp4_input").contains("not a number"));
        assert!(r("temp9_input").contains("vanished"));
        // A read error (here: the attribute is a directory, EISDIR) is reported as such.
        fs::create_dir_all(fs.root().join("class/hwmon/hwmon0/temp5_input")).unwrap();
        assert!(
            r("temp5_input").starts_with("read "),
            "{}",
            r("temp5_input")
        );
        // IIO raw with a garbage scale.
        fs.iio(0, "dht11", &[("in_temp_raw", "22"), ("in_temp_scale", "x")]);
        assert!(
            missing(read_sensor(fs.root(), &iio("t", "dht11", "in_temp"))).contains("not a number")
        );
        // No sysfs at all.
        let none = Path::new("/nonexistent/sysfs");
        assert!(
            missing(read_sensor(none, &thermal("c", "cpu-thermal"))).contains("no thermal zone")
        );
    }
}
