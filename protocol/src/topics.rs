//! MQTT topic names (protocol §5). Prefix configurable, default `ferry`.

use crate::names::check_device_id;

pub const DEFAULT_PREFIX: &str = "ferry";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Desired,
    State,
    Events,
    Telemetry,
    Online,
    /// A device's enrolment request (v2, retained): its key, signed by that key.
    Enroll,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Desired => "desired",
            Kind::State => "state",
            Kind::Events => "events",
            Kind::Telemetry => "telemetry",
            Kind::Online => "online",
            Kind::Enroll => "enroll",
        }
    }

    /// The signed-report stream of this topic (every kind but `desired`).
    pub fn stream(self) -> Option<crate::device_report::Stream> {
        use crate::device_report::Stream;
        Some(match self {
            Kind::Desired => return None,
            Kind::State => Stream::State,
            Kind::Events => Stream::Events,
            Kind::Telemetry => Stream::Telemetry,
            Kind::Online => Stream::Online,
            Kind::Enroll => Stream::Enroll,
        })
    }

    fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "desired" => Kind::Desired,
            "state" => Kind::State,
            "events" => Kind::Events,
            "telemetry" => Kind::Telemetry,
            "online" => Kind::Online,
            "enroll" => Kind::Enroll,
            _ => return None,
        })
    }
}

/// The topics of one device.
#[derive(Clone, Debug)]
pub struct DeviceTopics {
    prefix: String,
    device: String,
}

impl DeviceTopics {
    pub fn new(prefix: &str, device: &str) -> Result<Self, String> {
        check_prefix(prefix)?;
        check_device_id(device)?;
        Ok(DeviceTopics {
            prefix: prefix.to_string(),
            device: device.to_string(),
        })
    }

    pub fn topic(&self, kind: Kind) -> String {
        format!(
            "{}/v1/devices/{}/{}",
            self.prefix,
            self.device,
            kind.as_str()
        )
    }

    pub fn desired(&self) -> String {
        self.topic(Kind::Desired)
    }
    pub fn state(&self) -> String {
        self.topic(Kind::State)
    }
    pub fn events(&self) -> String {
        self.topic(Kind::Events)
    }
    pub fn telemetry(&self) -> String {
        self.topic(Kind::Telemetry)
    }
    pub fn online(&self) -> String {
        self.topic(Kind::Online)
    }
    pub fn enroll(&self) -> String {
        self.topic(Kind::Enroll)
    }
    /// This device's own trust record (protocol §10, retained).
    pub fn trust(&self) -> String {
        format!("{}/v1/devices/{}/trust", self.prefix, self.device)
    }
    /// The fleet-wide trust record (protocol §10, retained).
    pub fn fleet_trust(&self) -> String {
        fleet_trust(&self.prefix)
    }
    /// The controller's heartbeat (protocol §10a, retained).
    pub fn heartbeat(&self) -> String {
        heartbeat(&self.prefix)
    }
}

/// The controller's heartbeat topic (protocol §10a, retained).
pub fn heartbeat(prefix: &str) -> String {
    format!("{prefix}/v1/heartbeat")
}

/// The fleet-wide trust record's topic.
pub fn fleet_trust(prefix: &str) -> String {
    format!("{prefix}/v1/trust")
}

/// A subscription filter matching one kind of topic for every device.
pub fn all_devices(prefix: &str, kind: Kind) -> String {
    format!("{prefix}/v1/devices/+/{}", kind.as_str())
}

/// Split a topic into (device, kind), if it is one of ours under `prefix`.
pub fn parse(prefix: &str, topic: &str) -> Option<(String, Kind)> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix("/v1/devices/")?;
    let (device, kind) = rest.split_once('/')?;
    check_device_id(device).ok()?;
    Some((device.to_string(), Kind::parse(kind)?))
}

pub fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty()
        || prefix.contains(['+', '#', '\0'])
        || prefix.starts_with('/')
        || prefix.ends_with('/')
    {
        return Err(format!("{prefix:?} is not a usable topic prefix"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let t = DeviceTopics::new("ferry", "dev-001").unwrap();
        assert_eq!(t.desired(), "ferry/v1/devices/dev-001/desired");
        assert_eq!(t.online(), "ferry/v1/devices/dev-001/online");
        assert_eq!(t.trust(), "ferry/v1/devices/dev-001/trust");
        assert_eq!(t.fleet_trust(), "ferry/v1/trust");
        assert_eq!(parse("ferry", &t.trust()), None, "not a report");
        assert_eq!(
            all_devices("ferry", Kind::State),
            "ferry/v1/devices/+/state"
        );
        assert_eq!(
            parse("ferry", "ferry/v1/devices/dev-001/events"),
            Some(("dev-001".into(), Kind::Events))
        );
        assert_eq!(parse("ferry", "ferry/v1/devices/dev-001/other"), None);
        assert_eq!(parse("ferry", "other/v1/devices/dev-001/state"), None);
        assert!(DeviceTopics::new("ferry", "a/b").is_err());
        assert!(DeviceTopics::new("fe#rry", "a").is_err());
    }
}
