//! One probe of each kind of `health.check` against a container (protocol §3).
//!
//! - `http`: a plain HTTP/1.1 `GET` (Host header, `Connection: close`) over a tokio
//!   `TcpStream`; a 2xx status line within the timeout passes. Only the status line is read.
//! - `tcp`: a connect within the timeout passes.
//! - `exec`: the runtime's exec exits 0 within the timeout.
//! - `docker`: the image's own HEALTHCHECK as the engine reports it: `healthy` passes,
//!   `unhealthy` fails, `starting` is no result yet, no HEALTHCHECK at all fails.
//!
//! http and tcp reach the container from the host ([`resolve_addr`]): on the host network at
//! 127.0.0.1:port; through a published host port at 127.0.0.1:host_port; else at the
//! container's own (bridge) IP address.
//!
//! Every failure carries a short reason ("GET /healthz: 503",
//! "connect 172.17.0.3:8080: connection refused", "GET /healthz: timed out after 2 s").

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::gate::Observation;
use super::params::fmt_secs;
use crate::runtime::{ContainerInfo, ContainerRuntime, RuntimeError};
use ferry_protocol::release::HealthCheck;

/// The result of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    Pass,
    /// With a short reason.
    Fail(String),
    /// No result yet (the image's HEALTHCHECK is still `starting`, or the engine could not be
    /// asked): neither pass nor failure.
    NoResult,
}

impl ProbeOutcome {
    pub fn is_pass(&self) -> bool {
        matches!(self, ProbeOutcome::Pass)
    }
}

impl From<ProbeOutcome> for Observation {
    fn from(o: ProbeOutcome) -> Observation {
        match o {
            ProbeOutcome::Pass => Observation::ProbePassed,
            ProbeOutcome::Fail(reason) => Observation::ProbeFailed(reason),
            ProbeOutcome::NoResult => Observation::ProbeNoResult,
        }
    }
}

/// Longest status line read before giving up on a response.
const MAX_STATUS_LINE: usize = 1024;

/// Run `check` once against the container described by `info` (a fresh inspect: the docker
/// check reads its health status, http and tcp its addresses), bounded by `timeout`.
pub async fn probe<R: ContainerRuntime>(
    rt: &R,
    info: &ContainerInfo,
    check: &HealthCheck,
    timeout: Duration,
) -> ProbeOutcome {
    match check {
        HealthCheck::Http { port, path } => match resolve_addr(info, *port) {
            Ok(addr) => http(addr, path, timeout).await,
            Err(reason) => ProbeOutcome::Fail(reason),
        },
        HealthCheck::Tcp { port } => match resolve_addr(info, *port) {
            Ok(addr) => tcp(addr, timeout).await,
            Err(reason) => ProbeOutcome::Fail(reason),
        },
        HealthCheck::Exec(argv) => exec(rt, &info.id, argv, timeout).await,
        HealthCheck::Docker {} => docker(info),
    }
}

/// Where the agent (on the host) reaches container port `port`: the host network →
/// 127.0.0.1:port; a published host port → 127.0.0.1:host_port; else the container's IP:port.
/// `Err(reason)` when none applies.
pub fn resolve_addr(info: &ContainerInfo, port: u16) -> Result<SocketAddr, String> {
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    if info.network_mode == "host" {
        return Ok(SocketAddr::new(localhost, port));
    }
    if let Some(&host_port) = info.host_ports.get(&port) {
        return Ok(SocketAddr::new(localhost, host_port));
    }
    match info.ip_address.as_deref().map(str::trim) {
        Some(ip) if !ip.is_empty() => ip
            .parse::<IpAddr>()
            .map(|ip| SocketAddr::new(ip, port))
            .map_err(|_| format!("port {port}: container IP address {ip:?} is not an IP address")),
        _ => Err(format!(
            "port {port}: unreachable from the host \
             (network mode {}, port not published, no container IP address)",
            if info.network_mode.is_empty() {
                "unknown"
            } else {
                &info.network_mode
            }
        )),
    }
}

/// `GET path` on `addr` (Host: `addr`), `Connection: close`; pass on a 2xx status line within
/// `timeout` (connect, send and the status line together).
pub async fn http(addr: SocketAddr, path: &str, timeout: Duration) -> ProbeOutcome {
    let what = format!("GET {path}");
    match tokio::time::timeout(timeout, http_status(addr, path)).await {
        Err(_) => ProbeOutcome::Fail(format!("{what}: timed out after {}", fmt_secs(timeout))),
        Ok(Err(HttpError::Connect(e))) => {
            ProbeOutcome::Fail(format!("connect {addr}: {}", io_reason(&e)))
        }
        Ok(Err(HttpError::Io(e))) => ProbeOutcome::Fail(format!("{what}: {}", io_reason(&e))),
        Ok(Err(HttpError::Protocol(detail))) => ProbeOutcome::Fail(format!("{what}: {detail}")),
        Ok(Ok(status)) if (200..300).contains(&status) => ProbeOutcome::Pass,
        Ok(Ok(status)) => ProbeOutcome::Fail(format!("{what}: {status}")),
    }
}

enum HttpError {
    Connect(io::Error),
    Io(io::Error),
    Protocol(String),
}

async fn http_status(addr: SocketAddr, path: &str) -> Result<u16, HttpError> {
    let mut stream = TcpStream::connect(addr).await.map_err(HttpError::Connect)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: ferry-agent/{}\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(HttpError::Io)?;
    let mut line = Vec::with_capacity(128);
    let mut buf = [0u8; 256];
    loop {
        let n = stream.read(&mut buf).await.map_err(HttpError::Io)?;
        if n == 0 {
            if line.is_empty() {
                return Err(HttpError::Protocol(
                    "connection closed before a response".into(),
                ));
            }
            break;
        }
        line.extend_from_slice(&buf[..n]);
        if let Some(end) = line.iter().position(|b| *b == b'\n') {
            line.truncate(end);
            break;
        }
        if line.len() > MAX_STATUS_LINE {
            return Err(HttpError::Protocol("status line too long".into()));
        }
    }
    parse_status_line(&line).ok_or_else(|| {
        let shown: String = String::from_utf8_lossy(&line)
            .trim_end()
            .chars()
            .take(60)
            .collect();
        HttpError::Protocol(format!("not an HTTP response: {shown:?}"))
    })
}

/// `HTTP/1.x SSS[ reason]` → SSS.
fn parse_status_line(line: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let mut parts = line.splitn(3, ' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    code.parse().ok()
}

/// Pass when a TCP connection to `addr` is established within `timeout`.
pub async fn tcp(addr: SocketAddr, timeout: Duration) -> ProbeOutcome {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => ProbeOutcome::Pass,
        Ok(Err(e)) => ProbeOutcome::Fail(format!("connect {addr}: {}", io_reason(&e))),
        Err(_) => ProbeOutcome::Fail(format!(
            "connect {addr}: timed out after {}",
            fmt_secs(timeout)
        )),
    }
}

/// Run `argv` in the container; pass on exit 0 within `timeout`. An unreachable engine is no
/// result (the app is not to blame); any other engine error is a failure.
pub async fn exec<R: ContainerRuntime>(
    rt: &R,
    container: &str,
    argv: &[String],
    timeout: Duration,
) -> ProbeOutcome {
    let what = format!("exec {}", shorten(&argv.join(" "), 60));
    match tokio::time::timeout(timeout, rt.exec(container, argv, timeout)).await {
        Ok(Ok(0)) => ProbeOutcome::Pass,
        Ok(Ok(code)) => ProbeOutcome::Fail(format!("{what}: exit code {code}")),
        Ok(Err(RuntimeError::Timeout { .. })) | Err(_) => {
            ProbeOutcome::Fail(format!("{what}: timed out after {}", fmt_secs(timeout)))
        }
        Ok(Err(RuntimeError::Unreachable { .. })) => ProbeOutcome::NoResult,
        Ok(Err(e)) => ProbeOutcome::Fail(format!("{what}: {e}")),
    }
}

/// The image's own HEALTHCHECK, from a fresh inspect.
pub fn docker(info: &ContainerInfo) -> ProbeOutcome {
    match info.state.health.as_deref() {
        Some("healthy") => ProbeOutcome::Pass,
        Some("starting") => ProbeOutcome::NoResult,
        Some("unhealthy") => ProbeOutcome::Fail("docker HEALTHCHECK: unhealthy".into()),
        Some(s) if !s.is_empty() && s != "none" => {
            ProbeOutcome::Fail(format!("docker HEALTHCHECK: unexpected status {s:?}"))
        }
        _ => ProbeOutcome::Fail(
            "the image has no HEALTHCHECK (health check \"docker\" needs one)".into(),
        ),
    }
}

/// "connection refused", "connection reset", ... without the "(os error N)" suffix.
fn io_reason(e: &io::Error) -> String {
    use io::ErrorKind as K;
    let known = match e.kind() {
        K::ConnectionRefused => "connection refused",
        K::ConnectionReset => "connection reset",
        K::ConnectionAborted => "connection aborted",
        K::NotConnected => "not connected",
        K::AddrNotAvailable => "address not available",
        K::TimedOut => "timed out",
        K::BrokenPipe => "broken pipe",
        K::UnexpectedEof => "connection closed",
        K::HostUnreachable => "host unreachable",
        K::NetworkUnreachable => "network unreachable",
        _ => "",
    };
    if !known.is_empty() {
        return known.to_string();
    }
    let s = e.to_string();
    let s = match s.find(" (os error") {
        Some(i) => &s[..i],
        None => &s,
    };
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_lowercase().chain(c).collect(),
        None => "I/O error".to_string(),
    }
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::fake::{Behaviour, FakeRuntime};
    use crate::runtime::{ContainerConfig, ContainerState, ImageInfo};
    use std::collections::BTreeMap;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    const T: Duration = Duration::from_millis(300);

    /// Serve one connection: read the request head, send it back through `seen`, reply `reply`
    /// after `delay`.
    async fn server(
        reply: &'static str,
        delay: Duration,
    ) -> (SocketAddr, oneshot::Receiver<String>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut r = tokio::io::BufReader::new(s);
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).await.unwrap() == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            let _ = tx.send(head);
            tokio::time::sleep(delay).await;
            let _ = r.get_mut().write_all(reply.as_bytes()).await;
            let _ = r.get_mut().shutdown().await;
        });
        (addr, rx)
    }

    /// A local port with nothing listening.
    async fn closed_port() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        addr
    }

    #[tokio::test]
    async fn http_200_passes_and_sends_a_proper_request() {
        let (addr, seen) = server(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            Duration::ZERO,
        )
        .await;
        assert_eq!(http(addr, "/healthz", T).await, ProbeOutcome::Pass);
        let head = seen.await.unwrap();
        assert!(head.starts_with("GET /healthz HTTP/1.1\r\n"), "{head}");
        assert!(head.contains(&format!("Host: {addr}\r\n")), "{head}");
        assert!(head.contains("Connection: close\r\n"), "{head}");
    }

    #[tokio::test]
    async fn http_any_2xx_passes_without_reading_the_body() {
        // 204 with no headers at all and a server that never closes: only the status line counts
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (hold_tx, hold_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            s.write_all(b"HTTP/1.0 204 No Content\r\n").await.unwrap();
            let _ = hold_rx.await;
        });
        assert_eq!(http(addr, "/", T).await, ProbeOutcome::Pass);
        drop(hold_tx);
    }

    #[tokio::test]
    async fn http_503_fails_with_the_status() {
        let (addr, _) = server("HTTP/1.1 503 Service Unavailable\r\n\r\n", Duration::ZERO).await;
        assert_eq!(
            http(addr, "/healthz", T).await,
            ProbeOutcome::Fail("GET /healthz: 503".into())
        );
    }

    #[tokio::test]
    async fn http_redirect_is_not_a_pass() {
        let (addr, _) = server(
            "HTTP/1.1 301 Moved Permanently\r\nLocation: /x\r\n\r\n",
            Duration::ZERO,
        )
        .await;
        assert_eq!(
            http(addr, "/", T).await,
            ProbeOutcome::Fail("GET /: 301".into())
        );
    }

    #[tokio::test]
    async fn http_slow_server_times_out() {
        let (addr, _) = server("HTTP/1.1 200 OK\r\n\r\n", Duration::from_secs(5)).await;
        let started = std::time::Instant::now();
        assert_eq!(
            http(addr, "/healthz", Duration::from_millis(200)).await,
            ProbeOutcome::Fail("GET /healthz: timed out after 0.2 s".into())
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn http_refused_port() {
        let addr = closed_port().await;
        assert_eq!(
            http(addr, "/healthz", T).await,
            ProbeOutcome::Fail(format!("connect {addr}: connection refused"))
        );
    }

    #[tokio::test]
    async fn http_garbage_and_empty_replies() {
        let (addr, _) = server("SSH-2.0-OpenSSH_9.6\r\n", Duration::ZERO).await;
        assert_eq!(
            http(addr, "/", T).await,
            ProbeOutcome::Fail("GET /: not an HTTP response: \"SSH-2.0-OpenSSH_9.6\"".into())
        );
        let (addr, _) = server("", Duration::ZERO).await;
        assert_eq!(
            http(addr, "/", T).await,
            ProbeOutcome::Fail("GET /: connection closed before a response".into())
        );
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503"), Some(503));
        assert_eq!(parse_status_line(b"HTTP/1.1 204 "), Some(204));
        assert_eq!(parse_status_line(b"HTTP/2 200"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 20 OK"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 abc OK"), None);
        assert_eq!(parse_status_line(b""), None);
        assert_eq!(parse_status_line(&[0xff, 0xfe]), None);
    }

    #[tokio::test]
    async fn tcp_connect_passes_and_refused_fails() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        assert_eq!(tcp(addr, T).await, ProbeOutcome::Pass);
        drop(l);
        assert_eq!(
            tcp(addr, T).await,
            ProbeOutcome::Fail(format!("connect {addr}: connection refused"))
        );
    }

    #[tokio::test]
    async fn tcp_timeout() {
        // A non-routable address (TEST-NET-1): connect hangs (or fails fast where there is no
        // route at all); either way it is a failure naming the address.
        let addr: SocketAddr = "192.0.2.1:9".parse().unwrap();
        match tcp(addr, Duration::from_millis(200)).await {
            ProbeOutcome::Fail(r) => assert!(r.starts_with("connect 192.0.2.1:9: "), "{r}"),
            other => panic!("{other:?}"),
        }
    }

    fn info(network_mode: &str, ip: Option<&str>, ports: &[(u16, u16)]) -> ContainerInfo {
        ContainerInfo {
            id: "c1".into(),
            network_mode: network_mode.into(),
            ip_address: ip.map(String::from),
            host_ports: ports.iter().copied().collect::<BTreeMap<_, _>>(),
            ..Default::default()
        }
    }

    #[test]
    fn address_resolution() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        // host network wins
        assert_eq!(
            resolve_addr(&info("host", Some("10.0.0.2"), &[(8080, 18080)]), 8080),
            Ok(a("127.0.0.1:8080"))
        );
        // then a published port
        assert_eq!(
            resolve_addr(&info("bridge", Some("172.17.0.3"), &[(8080, 18080)]), 8080),
            Ok(a("127.0.0.1:18080"))
        );
        // then the container IP
        assert_eq!(
            resolve_addr(&info("bridge", Some("172.17.0.3"), &[(9090, 19090)]), 8080),
            Ok(a("172.17.0.3:8080"))
        );
        assert_eq!(
            resolve_addr(&info("bridge", Some("fd00::3"), &[]), 8080),
            Ok(a("[fd00::3]:8080"))
        );
        // nothing
        let err = resolve_addr(&info("none", None, &[]), 8080).unwrap_err();
        assert!(
            err.starts_with("port 8080: unreachable from the host"),
            "{err}"
        );
        assert!(err.contains("network mode none"), "{err}");
        assert!(resolve_addr(&info("bridge", Some(""), &[]), 80).is_err());
        let err = resolve_addr(&info("bridge", Some("nonsense"), &[]), 80).unwrap_err();
        assert!(err.contains("not an IP address"), "{err}");
    }

    #[tokio::test]
    async fn probe_dispatches_http_and_tcp_through_resolution() {
        let (addr, _) = server("HTTP/1.1 200 OK\r\n\r\n", Duration::ZERO).await;
        let rt = FakeRuntime::new();
        let i = info("host", None, &[]);
        let check = HealthCheck::Http {
            port: addr.port(),
            path: "/ready".into(),
        };
        assert_eq!(probe(&rt, &i, &check, T).await, ProbeOutcome::Pass);
        // published: container port 1 → the listener's port
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let i = info("bridge", None, &[(1, l.local_addr().unwrap().port())]);
        let check = HealthCheck::Tcp { port: 1 };
        assert_eq!(probe(&rt, &i, &check, T).await, ProbeOutcome::Pass);
        let i = info("none", None, &[]);
        assert!(matches!(
            probe(&rt, &i, &check, T).await,
            ProbeOutcome::Fail(r) if r.contains("unreachable from the host")
        ));
    }

    fn with_health(h: Option<&str>) -> ContainerInfo {
        ContainerInfo {
            state: ContainerState {
                status: "running".into(),
                running: true,
                health: h.map(String::from),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn docker_health_status() {
        assert_eq!(docker(&with_health(Some("healthy"))), ProbeOutcome::Pass);
        assert_eq!(
            docker(&with_health(Some("starting"))),
            ProbeOutcome::NoResult
        );
        assert_eq!(
            docker(&with_health(Some("unhealthy"))),
            ProbeOutcome::Fail("docker HEALTHCHECK: unhealthy".into())
        );
        for none in [None, Some(""), Some("none")] {
            match docker(&with_health(none)) {
                ProbeOutcome::Fail(r) => assert!(r.contains("no HEALTHCHECK"), "{r}"),
                o => panic!("{o:?}"),
            }
        }
        assert!(matches!(
            docker(&with_health(Some("weird"))),
            ProbeOutcome::Fail(r) if r.contains("unexpected status")
        ));
    }

    const IMG: &str = "reg/app@sha256:1";

    async fn fake_running(b: Behaviour) -> (FakeRuntime, String) {
        let rt = FakeRuntime::new();
        rt.add_local_image(IMG, ImageInfo::default());
        rt.set_image_behaviour(IMG, b);
        let id = rt
            .create(&ContainerConfig {
                name: "app".into(),
                image: IMG.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        rt.start(&id).await.unwrap();
        (rt, id)
    }

    #[tokio::test]
    async fn exec_exit_codes_and_errors() {
        let argv = vec!["/bin/check".to_string(), "--quick".to_string()];
        let (rt, id) = fake_running(Behaviour::default()).await;
        assert_eq!(exec(&rt, &id, &argv, T).await, ProbeOutcome::Pass);
        assert_eq!(
            rt.calls().last().unwrap(),
            &format!("exec {id} /bin/check --quick")
        );

        let (rt, id) = fake_running(Behaviour {
            healthy: false,
            ..Default::default()
        })
        .await;
        assert_eq!(
            exec(&rt, &id, &argv, T).await,
            ProbeOutcome::Fail("exec /bin/check --quick: exit code 1".into())
        );

        rt.fail_next("exec", "boom");
        assert!(matches!(
            exec(&rt, &id, &argv, T).await,
            ProbeOutcome::Fail(r)
                if r.starts_with("exec /bin/check --quick: ") && r.contains("boom")
        ));

        rt.set_unreachable(true);
        assert_eq!(exec(&rt, &id, &argv, T).await, ProbeOutcome::NoResult);
    }

    /// A runtime whose exec never finishes: the probe's own timeout must bound it.
    struct HangingExec;

    impl ContainerRuntime for HangingExec {
        async fn info(&self) -> Result<crate::runtime::RuntimeInfo, RuntimeError> {
            unimplemented!()
        }
        async fn list(&self, _: &[(&str, &str)]) -> Result<Vec<ContainerInfo>, RuntimeError> {
            unimplemented!()
        }
        async fn inspect(&self, _: &str) -> Result<Option<ContainerInfo>, RuntimeError> {
            unimplemented!()
        }
        async fn create(&self, _: &ContainerConfig) -> Result<String, RuntimeError> {
            unimplemented!()
        }
        async fn start(&self, _: &str) -> Result<(), RuntimeError> {
            unimplemented!()
        }
        async fn stop(&self, _: &str, _: Duration) -> Result<(), RuntimeError> {
            unimplemented!()
        }
        async fn remove(&self, _: &str) -> Result<(), RuntimeError> {
            unimplemented!()
        }
        async fn set_restart_policy(
            &self,
            _: &str,
            _: crate::runtime::RestartPolicy,
        ) -> Result<(), RuntimeError> {
            unimplemented!()
        }
        async fn exec(&self, _: &str, _: &[String], _: Duration) -> Result<i64, RuntimeError> {
            std::future::pending().await
        }
        async fn logs_tail(&self, _: &str, _: usize) -> Result<Vec<String>, RuntimeError> {
            unimplemented!()
        }
        async fn pull(
            &self,
            _: &str,
            _: &str,
            _: Option<crate::runtime::RegistryAuth>,
            _: &(dyn Fn(crate::runtime::PullProgress) + Send + Sync),
        ) -> Result<(), RuntimeError> {
            unimplemented!()
        }
        async fn list_images(&self) -> Result<Vec<ImageInfo>, RuntimeError> {
            unimplemented!()
        }
        async fn image_inspect(&self, _: &str) -> Result<Option<ImageInfo>, RuntimeError> {
            unimplemented!()
        }
        async fn remove_image(&self, _: &str) -> Result<(), RuntimeError> {
            unimplemented!()
        }
    }

    #[tokio::test]
    async fn exec_is_bounded_by_the_timeout() {
        assert_eq!(
            exec(
                &HangingExec,
                "c",
                &["sleep".into()],
                Duration::from_millis(50)
            )
            .await,
            ProbeOutcome::Fail("exec sleep: timed out after 0.05 s".into())
        );
    }

    #[test]
    fn io_reasons_are_short() {
        assert_eq!(
            io_reason(&io::Error::from(io::ErrorKind::ConnectionRefused)),
            "connection refused"
        );
        assert_eq!(
            io_reason(&io::Error::from_raw_os_error(libc::EACCES)),
            "permission denied"
        );
        assert_eq!(io_reason(&io::Error::other("Weird thing")), "weird thing");
        assert_eq!(shorten("abcdef", 4), "abc…");
        assert_eq!(shorten("abc", 4), "abc");
    }

    #[test]
    fn outcomes_map_to_observations() {
        assert_eq!(
            Observation::from(ProbeOutcome::Pass),
            Observation::ProbePassed
        );
        assert_eq!(
            Observation::from(ProbeOutcome::Fail("x".into())),
            Observation::ProbeFailed("x".into())
        );
        assert_eq!(
            Observation::from(ProbeOutcome::NoResult),
            Observation::ProbeNoResult
        );
        assert!(ProbeOutcome::Pass.is_pass());
    }
}
