//! `device_id = "auto"`: one image for every box, the id taken from the hardware (zero-touch
//! provisioning, issue 9). The sources, in order, the first usable one wins:
//!
//! 1. the devicetree serial number, `/proc/device-tree/serial-number` (then
//!    `/sys/firmware/devicetree/base/serial-number`): what ARM boards' boot loaders fill in
//!    (a Raspberry Pi's SoC serial, a MiFi's board serial);
//! 2. the DMI product serial, `/sys/class/dmi/id/product_serial` (x86 and SBSA ARM servers),
//!    unless it is one of the placeholders firmware ships ("To Be Filled By O.E.M.", "Default
//!    string", all zeros, ...);
//! 3. `/etc/machine-id` (systemd's, generated at first boot: unique per installation, so a box
//!    re-flashed from scratch comes back as a new device).
//!
//! The value becomes a device id (`[A-Za-z0-9][A-Za-z0-9._-]{0,127}`): surrounding whitespace and
//! NULs dropped, any other character outside the alphabet replaced by `-`, an optional prefix
//! (`[identity] device_id_prefix`, e.g. `"mifi-"`) put in front. The paths are looked up under
//! `[identity] hardware_root` (default `/`), e.g. for an agent in a container with the host's
//! `/proc`, `/sys` and `/etc` mounted elsewhere.

use std::path::Path;

/// Where the id came from (logged at start).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    DeviceTree,
    Dmi,
    MachineId,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::DeviceTree => "devicetree serial-number",
            Source::Dmi => "DMI product_serial",
            Source::MachineId => "/etc/machine-id",
        }
    }
}

const DEVICETREE: [&str; 2] = [
    "proc/device-tree/serial-number",
    "sys/firmware/devicetree/base/serial-number",
];
const DMI: &str = "sys/class/dmi/id/product_serial";
const MACHINE_ID: &str = "etc/machine-id";

/// Serials that firmware ships unset (compared case-insensitively, after trimming).
const PLACEHOLDERS: &[&str] = &[
    "",
    "none",
    "n/a",
    "na",
    "null",
    "default string",
    "to be filled by o.e.m.",
    "to be filled by oem",
    "system serial number",
    "serial number",
    "not specified",
    "not applicable",
    "not available",
    "unknown",
    "0123456789",
    "123456789",
];

fn placeholder(s: &str) -> bool {
    let l = s.to_ascii_lowercase();
    PLACEHOLDERS.contains(&l.as_str()) || s.bytes().all(|b| b == b'0' || b == b'f' || b == b'F')
}

/// The usable part of a raw serial, or `None`.
fn clean(raw: &[u8]) -> Option<String> {
    let s = String::from_utf8_lossy(raw);
    let s = s.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    if placeholder(s) {
        return None;
    }
    let mapped: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mapped = mapped.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    (!mapped.is_empty()).then(|| mapped.to_string())
}

/// The device id for `device_id = "auto"`, and where it came from.
pub fn resolve(root: &Path, prefix: &str) -> Result<(String, Source), String> {
    let read = |rel: &str| std::fs::read(root.join(rel)).ok();
    let found = DEVICETREE
        .iter()
        .find_map(|p| read(p).and_then(|r| clean(&r)))
        .map(|v| (v, Source::DeviceTree))
        .or_else(|| read(DMI).and_then(|r| clean(&r)).map(|v| (v, Source::Dmi)))
        .or_else(|| {
            read(MACHINE_ID)
                .and_then(|r| clean(&r))
                .map(|v| (v, Source::MachineId))
        });
    let Some((value, source)) = found else {
        return Err(format!(
            "no hardware id under {}: no devicetree serial-number, no usable DMI product_serial, \
             no /etc/machine-id; set device_id explicitly",
            root.display()
        ));
    };
    let id = format!("{prefix}{value}");
    let id: String = id.chars().take(128).collect();
    ferry_protocol::names::check_device_id(&id)
        .map_err(|e| format!("the id derived from the {}: {e}", source.as_str()))?;
    Ok((id, source))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tree(files: &[(&str, &[u8])]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (p, v) in files {
            let f = d.path().join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, v).unwrap();
        }
        d
    }

    const MID: &[u8] = b"0f3c9a1e5b7d4c2a8e6f1b3d5c7a9e21\n";

    #[test]
    fn the_sources_are_taken_in_order() {
        let all = tree(&[
            ("proc/device-tree/serial-number", b"10000000a1b2c3d4\0"),
            ("sys/class/dmi/id/product_serial", b"PF2ABCDE\n"),
            ("etc/machine-id", MID),
        ]);
        assert_eq!(
            resolve(all.path(), "").unwrap(),
            ("10000000a1b2c3d4".into(), Source::DeviceTree)
        );
        let base = tree(&[
            (
                "sys/firmware/devicetree/base/serial-number",
                b"RK3568-0042\0",
            ),
            ("etc/machine-id", MID),
        ]);
        assert_eq!(resolve(base.path(), "").unwrap().0, "RK3568-0042");
        let dmi = tree(&[
            ("sys/class/dmi/id/product_serial", b"PF2ABCDE\n"),
            ("etc/machine-id", MID),
        ]);
        assert_eq!(
            resolve(dmi.path(), "box-").unwrap(),
            ("box-PF2ABCDE".into(), Source::Dmi)
        );
        let mid = tree(&[("etc/machine-id", MID)]);
        assert_eq!(
            resolve(mid.path(), "").unwrap(),
            ("0f3c9a1e5b7d4c2a8e6f1b3d5c7a9e21".into(), Source::MachineId)
        );
    }

    #[test]
    fn placeholders_fall_through_to_the_next_source() {
        for junk in [
            &b"To Be Filled By O.E.M.\n"[..],
            b"Default string",
            b"0000000000000000\0",
            b"\0",
            b"   ",
            b"System Serial Number",
        ] {
            let t = tree(&[
                ("proc/device-tree/serial-number", junk),
                ("sys/class/dmi/id/product_serial", junk),
                ("etc/machine-id", MID),
            ]);
            assert_eq!(
                resolve(t.path(), "").unwrap().1,
                Source::MachineId,
                "{junk:?}"
            );
        }
    }

    #[test]
    fn odd_characters_are_mapped_and_nothing_found_is_an_error() {
        let t = tree(&[("sys/class/dmi/id/product_serial", b"  SN: 12/34 \xff\n")]);
        assert_eq!(resolve(t.path(), "").unwrap().0, "SN--12-34--");
        let e = resolve(tree(&[]).path(), "").unwrap_err();
        assert!(e.contains("set device_id explicitly"), "{e}");
        // A prefix that makes the id invalid is reported with the source.
        let e = resolve(tree(&[("etc/machine-id", MID)]).path(), "a/").unwrap_err();
        assert!(e.contains("/etc/machine-id"), "{e}");
    }

    proptest! {
        /// Whatever the firmware holds, the result is a valid device id or an error, never a
        /// panic, and it is stable (the same bytes give the same id).
        #[test]
        fn any_serial_gives_a_valid_id_or_an_error(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            let t = tree(&[("proc/device-tree/serial-number", &raw)]);
            if let Ok((id, _)) = resolve(t.path(), "") {
                prop_assert!(ferry_protocol::names::check_device_id(&id).is_ok());
                prop_assert_eq!(resolve(t.path(), "").unwrap().0, id);
            }
        }
    }
}
