//! Syntax of the names the protocol carries: app names, device ids, image repositories, digests,
//! platforms. Each check returns a sentence saying what is wrong.

/// `[a-z0-9][a-z0-9-]{0,62}`
/// A date in a signed record: within RFC 3339's years 0000–9999. chrono also parses years up to
/// ±262143 (`+262142-12-31T23:59:59Z`), where adding a clock skew overflows; such a date is
/// refused with this reason instead.
pub fn check_date(d: &chrono::DateTime<chrono::Utc>) -> Result<(), String> {
    use chrono::Datelike;
    let year = d.year();
    if (0..=9999).contains(&year) {
        Ok(())
    } else {
        Err(format!(
            "{} is out of range: the year {year} is outside RFC 3339's 0000-9999",
            d.to_rfc3339()
        ))
    }
}

pub fn check_app_name(s: &str) -> Result<(), String> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not an app name ([a-z0-9][a-z0-9-]{{0,62}})"
        ))
    }
}

/// `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`
pub fn check_device_id(s: &str) -> Result<(), String> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a device id ([A-Za-z0-9][A-Za-z0-9._-]{{0,127}})"
        ))
    }
}

/// `sha256:` followed by 64 lowercase hex digits.
pub fn check_digest(s: &str) -> Result<(), String> {
    match s.strip_prefix("sha256:") {
        Some(h)
            if h.len() == 64
                && h.bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "{s:?} is not a sha256 digest (sha256:<64 lowercase hex>)"
        )),
    }
}

/// `os/arch` or `os/arch/variant`, lowercase.
pub fn check_platform(s: &str) -> Result<(), String> {
    let parts: Vec<&str> = s.split('/').collect();
    let ok = (2..=3).contains(&parts.len())
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{s:?} is not a platform (os/arch[/variant])"))
    }
}

/// An image repository without tag or digest: `[host[:port]/]path/components`.
pub fn check_repository(s: &str) -> Result<(), String> {
    let err = |why: &str| Err(format!("{s:?} is not an image repository: {why}"));
    if s.is_empty() || s.len() > 255 {
        return err("empty or too long");
    }
    if s.contains('@') {
        return err("it carries a digest; give the repository only");
    }
    let (host, path) = split_repository(s);
    if let Some(h) = host {
        let (name, port) = match h.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (h, None),
        };
        if name.is_empty()
            || !name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-')
        {
            return err("bad registry host");
        }
        if let Some(p) = port {
            if p.parse::<u16>().is_err() {
                return err("bad registry port");
            }
        }
    }
    if path.contains(':') {
        return err("it carries a tag; give the repository only");
    }
    for comp in path.split('/') {
        let ok = !comp.is_empty()
            && comp.bytes().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
            })
            && comp.as_bytes()[0].is_ascii_alphanumeric()
            && comp.as_bytes()[comp.len() - 1].is_ascii_alphanumeric();
        if !ok {
            return err("bad path component");
        }
    }
    Ok(())
}

/// Split `host[:port]/path` into its registry host (when the first component looks like one:
/// it has a `.` or `:`, or is `localhost`) and the path.
pub fn split_repository(s: &str) -> (Option<&str>, &str) {
    match s.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (Some(first), rest)
        }
        _ => (None, s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_names() {
        assert!(check_app_name("sensor").is_ok());
        assert!(check_app_name("0a-b").is_ok());
        assert!(check_app_name(&"a".repeat(63)).is_ok());
        assert!(check_app_name(&"a".repeat(64)).is_err());
        assert!(check_app_name("-a").is_err());
        assert!(check_app_name("Sensor").is_err());
        assert!(check_app_name("").is_err());
        assert!(check_app_name("a_b").is_err());
    }

    #[test]
    fn device_ids() {
        assert!(check_device_id("dev-001").is_ok());
        assert!(check_device_id("A.b_c-1").is_ok());
        assert!(check_device_id(".a").is_err());
        assert!(check_device_id("a/b").is_err());
        assert!(check_device_id("a+b").is_err());
        assert!(check_device_id(&"a".repeat(129)).is_err());
    }

    #[test]
    fn digests() {
        assert!(check_digest(&format!("sha256:{}", "a".repeat(64))).is_ok());
        assert!(check_digest(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(check_digest(&format!("sha512:{}", "a".repeat(64))).is_err());
        assert!(check_digest("sha256:abc").is_err());
    }

    #[test]
    fn repositories() {
        assert!(check_repository("registry.example.com:5000/ferry/sensor").is_ok());
        assert!(check_repository("127.0.0.1:5055/ferry/sensor").is_ok());
        assert!(check_repository("localhost/sensor").is_ok());
        assert!(check_repository("ferry/sensor").is_ok());
        assert!(check_repository("ferry/sensor:1.0").is_err());
        assert!(check_repository("r:5000/ferry/sensor:1.0").is_err());
        assert!(check_repository("r:5000/ferry/sensor@sha256:aa").is_err());
        assert!(check_repository("r:x/ferry").is_err());
        assert!(check_repository("Ferry/Sensor").is_err());
        assert_eq!(
            split_repository("127.0.0.1:5055/ferry/sensor"),
            (Some("127.0.0.1:5055"), "ferry/sensor")
        );
        assert_eq!(split_repository("ferry/sensor"), (None, "ferry/sensor"));
    }

    #[test]
    fn platforms() {
        assert!(check_platform("linux/arm64").is_ok());
        assert!(check_platform("linux/arm/v7").is_ok());
        assert!(check_platform("linux").is_err());
        assert!(check_platform("linux//v7").is_err());
    }
}
