//! Minimal systemd notification client (`sd_notify(3)`), without libsystemd.
//!
//! When systemd starts the agent with `Type=notify` (and `WatchdogSec=`), it passes the socket in
//! `NOTIFY_SOCKET`: a file system path, or an abstract socket name written with a leading `@`.
//! Each message is one datagram of `KEY=VALUE` lines. With `NOTIFY_SOCKET` unset (run by hand, in
//! tests, under another supervisor) every function here is a successful no-op.
//!
//! ```no_run
//! # fn main() -> std::io::Result<()> {
//! ferry_agent::sdnotify::status("connecting to broker")?;
//! ferry_agent::sdnotify::ready()?;
//! if let Some(every) = ferry_agent::sdnotify::watchdog_interval() {
//!     // call sdnotify::watchdog() every `every` from a task that proves the agent is alive
//! #   let _ = every;
//! }
//! # Ok(())
//! # }
//! ```

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

/// Where notifications go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotifySocket {
    /// A socket file.
    Path(PathBuf),
    /// A Linux abstract socket (`@name` in `NOTIFY_SOCKET`), stored without the `@`.
    Abstract(Vec<u8>),
}

impl NotifySocket {
    /// Interpret a `NOTIFY_SOCKET` value: `/path`, or `@name` for an abstract socket. Anything
    /// else (empty, relative) is not a socket systemd would hand out, and gives `None`.
    pub fn parse(value: &OsStr) -> Option<NotifySocket> {
        let bytes = value.as_bytes();
        match bytes.first() {
            Some(b'/') => Some(NotifySocket::Path(PathBuf::from(value))),
            Some(b'@') if bytes.len() > 1 => Some(NotifySocket::Abstract(bytes[1..].to_vec())),
            _ => None,
        }
    }

    /// From the `NOTIFY_SOCKET` environment variable.
    pub fn from_env() -> Option<NotifySocket> {
        std::env::var_os("NOTIFY_SOCKET").and_then(|v| NotifySocket::parse(&v))
    }

    /// Send one datagram.
    pub fn send(&self, message: &str) -> io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        let sent = match self {
            NotifySocket::Path(path) => socket.send_to(message.as_bytes(), path)?,
            NotifySocket::Abstract(name) => send_abstract(&socket, name, message.as_bytes())?,
        };
        if sent != message.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sd_notify: sent {sent} of {} bytes", message.len()),
            ));
        }
        Ok(())
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn send_abstract(socket: &UnixDatagram, name: &[u8], message: &[u8]) -> io::Result<usize> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    socket.send_to_addr(message, &addr)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn send_abstract(_: &UnixDatagram, _: &[u8], _: &[u8]) -> io::Result<usize> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract unix sockets exist only on Linux",
    ))
}

/// Send `message` to `NOTIFY_SOCKET`; a no-op when it is unset.
pub fn notify(message: &str) -> io::Result<()> {
    match NotifySocket::from_env() {
        Some(socket) => socket.send(message),
        None => Ok(()),
    }
}

/// `READY=1`: start-up is complete (for `Type=notify`).
pub fn ready() -> io::Result<()> {
    notify("READY=1")
}

/// `WATCHDOG=1`: keep-alive ping for `WatchdogSec=`.
pub fn watchdog() -> io::Result<()> {
    notify("WATCHDOG=1")
}

/// `STOPPING=1`: shutdown has begun.
pub fn stopping() -> io::Result<()> {
    notify("STOPPING=1")
}

/// `STATUS=...`: a one-line status shown by `systemctl status`.
pub fn status(text: &str) -> io::Result<()> {
    notify(&status_message(text))
}

/// `STATUS=` message; line breaks would start a new assignment, so they become spaces.
pub fn status_message(text: &str) -> String {
    format!("STATUS={}", text.replace(['\n', '\r'], " "))
}

/// How often to send [`watchdog`]: half of `WATCHDOG_USEC`, as `sd_watchdog_enabled(3)`
/// recommends. `None` when the watchdog is off, or when `WATCHDOG_PID` names another process
/// (the variables were inherited from a parent and are not meant for us).
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_from(
        std::env::var_os("WATCHDOG_USEC").as_deref(),
        std::env::var_os("WATCHDOG_PID").as_deref(),
        std::process::id(),
    )
}

/// [`watchdog_interval`] on given values, for tests.
pub fn watchdog_interval_from(
    usec: Option<&OsStr>,
    pid: Option<&OsStr>,
    own_pid: u32,
) -> Option<Duration> {
    let usec: u64 = usec?.to_str()?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(pid) = pid {
        let pid: u32 = pid.to_str()?.trim().parse().ok()?;
        if pid != own_pid {
            return None;
        }
    }
    // Never zero: a zero period would panic `tokio::time::interval`.
    Some(Duration::from_micros((usec / 2).max(1)))
}

/// The raw `NOTIFY_SOCKET` value, for diagnostics.
pub fn socket_env() -> Option<OsString> {
    std::env::var_os("NOTIFY_SOCKET")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn parse_socket_values() {
        assert_eq!(
            NotifySocket::parse(OsStr::new("/run/systemd/notify")),
            Some(NotifySocket::Path("/run/systemd/notify".into()))
        );
        assert_eq!(
            NotifySocket::parse(OsStr::new("@ferry/notify")),
            Some(NotifySocket::Abstract(b"ferry/notify".to_vec()))
        );
        assert_eq!(NotifySocket::parse(OsStr::new("")), None);
        assert_eq!(NotifySocket::parse(OsStr::new("@")), None);
        assert_eq!(NotifySocket::parse(OsStr::new("relative/sock")), None);
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let target = NotifySocket::parse(path.as_os_str()).unwrap();

        target.send("READY=1").unwrap();
        assert_eq!(recv(&server), "READY=1");
        target.send("WATCHDOG=1").unwrap();
        assert_eq!(recv(&server), "WATCHDOG=1");
        target.send("STOPPING=1").unwrap();
        assert_eq!(recv(&server), "STOPPING=1");
        target
            .send(&status_message("updating sensor\nto 1.2.3"))
            .unwrap();
        assert_eq!(recv(&server), "STATUS=updating sensor to 1.2.3");
    }

    #[test]
    fn missing_socket_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let target = NotifySocket::Path(dir.path().join("absent.sock"));
        assert!(target.send("READY=1").is_err());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!(
            "ferry-sdnotify-test-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        );
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        let target = NotifySocket::parse(OsStr::new(&format!("@{name}"))).unwrap();
        target.send("READY=1").unwrap();
        assert_eq!(recv(&server), "READY=1");
        target.send("WATCHDOG=1").unwrap();
        assert_eq!(recv(&server), "WATCHDOG=1");
    }

    #[test]
    fn unset_socket_is_a_no_op() {
        // The test harness is not started by systemd.
        if socket_env().is_none() {
            ready().unwrap();
            watchdog().unwrap();
            stopping().unwrap();
            status("idle").unwrap();
        }
    }

    #[test]
    fn watchdog_interval_rules() {
        let s = |v: &str| Some(OsString::from(v));
        let f = |usec: Option<OsString>, pid: Option<OsString>| {
            watchdog_interval_from(usec.as_deref(), pid.as_deref(), 4242)
        };
        assert_eq!(f(None, None), None);
        assert_eq!(f(s("30000000"), None), Some(Duration::from_secs(15)));
        assert_eq!(f(s("30000000"), s("4242")), Some(Duration::from_secs(15)));
        assert_eq!(f(s("30000000"), s("1")), None, "meant for another process");
        assert_eq!(f(s("0"), None), None);
        assert_eq!(f(s("abc"), None), None);
        assert_eq!(f(s("30000000"), s("x")), None);
        assert_eq!(f(s("1"), None), Some(Duration::from_micros(1)));
    }
}
