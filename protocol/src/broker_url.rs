//! The broker's URL, one way for the agent, the controller and the simulator:
//! `mqtt://HOST[:PORT]` (plain, default port 1883) or `mqtts://HOST[:PORT]` (TLS, 8883), with
//! `[v6]` literals. No credentials (they have settings of their own), no path, no query.

use std::fmt;

/// A parsed broker URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    /// Host name or IP address; an IPv6 literal keeps its brackets (`[::1]`), the form an MQTT
    /// client needs to build `host:port`.
    pub host: String,
    pub port: u16,
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

impl BrokerUrl {
    /// Parse `url`; the error says what is wrong with it, quoting it.
    pub fn parse(url: &str) -> Result<BrokerUrl, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else {
            return Err(format!(
                "{url:?} must start with mqtt:// (plaintext) or mqtts:// (TLS)"
            ));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('@') {
            return Err(format!(
                "{url:?} contains credentials; the user name and password have settings of their own"
            ));
        }
        if authority.contains(['/', '?', '#']) {
            return Err(format!(
                "{url:?} must be scheme://host[:port], without a path or query"
            ));
        }
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (addr, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{url:?}: unterminated IPv6 literal"))?;
            addr.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("{url:?}: {addr:?} is not an IPv6 address"))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("{url:?}: expected :port after the IPv6 address"))?,
                ),
            };
            (format!("[{addr}]"), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        let bracketed = host.starts_with('[');
        if host.is_empty() || (!bracketed && host.contains([':', '[', ']'])) || host.contains(' ') {
            return Err(format!("{url:?} has no usable host name"));
        }
        let port = match port {
            None => default_port,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => return Err(format!("{url:?}: {p:?} is not a port number (1-65535)")),
            },
        };
        Ok(BrokerUrl { tls, host, port })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let ok = |u: &str| BrokerUrl::parse(u).unwrap();
        assert_eq!(ok("mqtt://h").port, 1883);
        assert_eq!(ok("mqtts://h").port, 8883);
        assert!(ok("mqtts://broker.example.com/").tls);
        assert_eq!(ok("mqtt://h:1884/").port, 1884);
        assert_eq!(ok("mqtt://[::1]:1884").host, "[::1]");
        assert_eq!(ok("mqtt://[::1]").port, 1883);
        assert_eq!(ok("mqtt://10.0.0.1:2").host, "10.0.0.1");
        assert_eq!(
            ok("mqtt://127.0.0.1:1884").to_string(),
            "mqtt://127.0.0.1:1884"
        );
        assert_eq!(ok("mqtts://[::1]:1999").to_string(), "mqtts://[::1]:1999");
        for bad in [
            "tcp://h",
            "ssl://h",
            "http://h",
            "h:1883",
            "mqtt://",
            "mqtt://:1883",
            "mqtt://h:0",
            "mqtt://h:70000",
            "mqtt://h:x",
            "mqtt://u:p@h",
            "mqtt://h/path",
            "mqtt://h?x=1",
            "mqtt://[::1",
            "mqtt://[zz]:1",
            "mqtt://[::1]x",
            "mqtt://::1:1883",
        ] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad} should be rejected");
        }
        let err = BrokerUrl::parse("http://h").unwrap_err();
        assert!(err.contains("mqtt://"), "{err}");
    }
}
