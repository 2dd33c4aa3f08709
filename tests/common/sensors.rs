//! A per-device sensor directory, laid out like hwmon: `/var/lib/ferry-apps/<device>/sensors`
//! with `temp1_input` (m°C) and `humidity1_input` (m%RH). A test agent's policy has
//! `/var/lib/ferry-apps/<device>` as its bind prefix (each app confined to `<prefix>/<app>`) and
//! this directory as the one its apps share. Removed on drop, with the whole device root.

use std::path::{Path, PathBuf};

pub const APPS_ROOT: &str = "/var/lib/ferry-apps";
/// Where the sample app reads its files inside the container.
pub const CONTAINER_DIR: &str = "/sensors";
/// Default readings: 23.25 °C and 41.5 %RH.
pub const TEMP_MILLI_C: i64 = 23_250;
pub const HUMIDITY_MILLI_PCT: i64 = 41_500;

/// The device's bind prefix: `/var/lib/ferry-apps/<device>`.
pub fn device_root(device: &str) -> String {
    format!("{APPS_ROOT}/{device}")
}

/// The device's shared sensor directory.
pub fn sensors_path(device: &str) -> String {
    format!("{}/sensors", device_root(device))
}

pub struct SensorDir {
    device_dir: PathBuf,
    path: PathBuf,
}

impl SensorDir {
    pub fn new(device: &str) -> SensorDir {
        let device_dir = PathBuf::from(device_root(device));
        let path = PathBuf::from(sensors_path(device));
        let _ = std::fs::remove_dir_all(&device_dir);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("create {}: {e} (tests run as root)", path.display()));
        let s = SensorDir { device_dir, path };
        s.set_temp(TEMP_MILLI_C);
        s.set_humidity(HUMIDITY_MILLI_PCT);
        s
    }

    /// The host directory (bind it to [`CONTAINER_DIR`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn host_path(&self) -> String {
        self.path.display().to_string()
    }

    /// Write `temp1_input` (millidegrees Celsius).
    pub fn set_temp(&self, milli_c: i64) {
        std::fs::write(self.path.join("temp1_input"), format!("{milli_c}\n")).unwrap();
    }

    /// Write `humidity1_input` (milli-percent relative humidity).
    pub fn set_humidity(&self, milli_pct: i64) {
        std::fs::write(self.path.join("humidity1_input"), format!("{milli_pct}\n")).unwrap();
    }
}

impl Drop for SensorDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.device_dir);
    }
}
