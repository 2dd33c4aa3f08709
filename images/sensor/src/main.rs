//! Ferry sample app: a tiny HTTP/1.1 sensor service (std + libc only).
//!
//! One source, three releases; the behaviour is chosen by `SENSOR_VERSION`, which each image bakes
//! in with `ENV`:
//!
//! * `1.x` — `GET /healthz` → 200 `ok`; `GET /` → `{"app":"sensor","version":"1.0.0","temperature_c":21.5}`
//!   with the temperature read from `SENSOR_TEMP_PATH` (default `/sensors/temp1_input`, hwmon
//!   format: an integer in millidegrees Celsius).
//! * `2.x` — as 1.x plus `"humidity_pct"` read from `SENSOR_HUMIDITY_PATH` (default
//!   `/sensors/humidity1_input`, milli-percent relative humidity).
//! * `3.x` — the deliberately broken release: it logs that its calibration table is missing at start
//!   and every few seconds, keeps running, and answers `/healthz` (and `/`) with 503, so the
//!   container health check — not a crash — is what fails.
//!
//! A sensor file that is missing or does not hold a plausible integer gives `null` for that field
//! and a log line; the service never makes a number up.
//!
//! It listens on `0.0.0.0:$PORT` (default 8080) with `SO_REUSEADDR` and `SO_REUSEPORT`, so two
//! versions on the host network can share the port during a zero-downtime swap. It is meant to run
//! as PID 1: SIGTERM/SIGINT stop accepting, let in-flight requests finish, and exit 0 within ~1 s.
//! Every response is sent with `Connection: close`.
//!
//! Health checks and SO_REUSEPORT: while two versions share a port on the host network, the kernel
//! spreads connections over both, so a probe of `127.0.0.1:$PORT` from the new container may be
//! answered by the old process (a broken 3.x could look healthy). When `SENSOR_HEALTH_PORT_FILE`
//! is set (the image sets it), the service also listens on a private ephemeral port on 127.0.0.1
//! and writes that port number to the file — inside the container's own filesystem — and the
//! image's HEALTHCHECK probes that port, which only this process answers.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const DEFAULT_VERSION: &str = "1.0.0";
const DEFAULT_PORT: u16 = 8080;
const DEFAULT_TEMP_PATH: &str = "/sensors/temp1_input";
const DEFAULT_HUMIDITY_PATH: &str = "/sensors/humidity1_input";
const CALIBRATION_PATH: &str = "/etc/sensor/calibration.json";
/// Largest request head (request line + headers) accepted.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Read/write timeout on every connection.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown waits for in-flight connections before exiting anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(900);
/// How often the broken release repeats its error.
const BROKEN_LOG_INTERVAL: Duration = Duration::from_secs(5);
const LISTEN_BACKLOG: libc::c_int = 128;

// ------------------------------------------------------------------------------------ config

/// What a release does, from the major component of `SENSOR_VERSION`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// 1.x: temperature only.
    V1,
    /// 2.x: temperature and humidity.
    V2,
    /// 3.x: deliberately broken (health check fails, process keeps running).
    Broken,
}

impl Behaviour {
    fn from_version(version: &str) -> Result<Behaviour, String> {
        let v = version.trim();
        let v = v.strip_prefix('v').unwrap_or(v);
        let major = v.split(['.', '-', '+']).next().unwrap_or("");
        match major.parse::<u64>() {
            Ok(1) => Ok(Behaviour::V1),
            Ok(2) => Ok(Behaviour::V2),
            Ok(3) => Ok(Behaviour::Broken),
            Ok(m) => Err(format!(
                "unsupported SENSOR_VERSION {version:?}: major {m}, this build knows 1.x, 2.x and 3.x"
            )),
            Err(_) => Err(format!("invalid SENSOR_VERSION {version:?} (expected e.g. 1.0.0)")),
        }
    }
}

#[derive(Debug, Clone)]
struct Config {
    version: String,
    behaviour: Behaviour,
    port: u16,
    temp_path: PathBuf,
    humidity_path: PathBuf,
    /// Where to publish the private health-check port, if anywhere.
    health_port_file: Option<PathBuf>,
}

impl Config {
    /// Builds the configuration from a variable lookup (the process environment in `main`).
    /// Empty variables count as unset.
    fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, String> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let version = get("SENSOR_VERSION").unwrap_or_else(|| DEFAULT_VERSION.to_string());
        let version = version.trim().to_string();
        let behaviour = Behaviour::from_version(&version)?;
        let port = match get("PORT") {
            None => DEFAULT_PORT,
            Some(p) => p
                .trim()
                .parse::<u16>()
                .map_err(|_| format!("invalid PORT {p:?} (expected 0-65535)"))?,
        };
        let temp_path = get("SENSOR_TEMP_PATH").unwrap_or_else(|| DEFAULT_TEMP_PATH.into());
        let humidity_path =
            get("SENSOR_HUMIDITY_PATH").unwrap_or_else(|| DEFAULT_HUMIDITY_PATH.into());
        Ok(Config {
            version,
            behaviour,
            port,
            temp_path: PathBuf::from(temp_path),
            humidity_path: PathBuf::from(humidity_path),
            health_port_file: get("SENSOR_HEALTH_PORT_FILE").map(PathBuf::from),
        })
    }
}

// ----------------------------------------------------------------------------------- sensors

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SensorKind {
    /// hwmon `temp*_input`: millidegrees Celsius.
    Temperature,
    /// hwmon `humidity*_input`: milli-percent relative humidity.
    Humidity,
}

impl SensorKind {
    fn name(self) -> &'static str {
        match self {
            SensorKind::Temperature => "temperature",
            SensorKind::Humidity => "humidity",
        }
    }

    /// Values outside this range are not physical readings but garbage.
    fn valid_range(self) -> std::ops::RangeInclusive<i64> {
        match self {
            // absolute zero .. 1000 °C
            SensorKind::Temperature => -273_150..=1_000_000,
            SensorKind::Humidity => 0..=100_000,
        }
    }
}

/// Parses sysfs/hwmon text: one optionally signed decimal integer, surrounding whitespace allowed.
fn parse_milli(text: &str) -> Result<i64, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty".to_string());
    }
    let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("not an integer: {:?}", truncate(t, 32)));
    }
    t.parse::<i64>()
        .map_err(|e| format!("not an integer: {:?} ({e})", truncate(t, 32)))
}

/// Reads one sensor file and checks the value is plausible for its kind.
fn read_sensor(path: &Path, kind: SensorKind) -> Result<i64, String> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(256).read_to_string(&mut text))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let milli = parse_milli(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if !kind.valid_range().contains(&milli) {
        return Err(format!(
            "{}: {milli} is out of range for {}",
            path.display(),
            kind.name()
        ));
    }
    Ok(milli)
}

/// Formats a milli-unit integer as an exact JSON decimal: 21500 → `21.5`, 21000 → `21.0`.
fn format_milli(milli: i64) -> String {
    let sign = if milli < 0 { "-" } else { "" };
    let abs = milli.unsigned_abs();
    let whole = abs / 1000;
    let frac = format!("{:03}", abs % 1000);
    let frac = frac.trim_end_matches('0');
    let frac = if frac.is_empty() { "0" } else { frac };
    format!("{sign}{whole}.{frac}")
}

/// A reading as a JSON value; failures are logged and become `null`.
fn reading_json(path: &Path, kind: SensorKind) -> String {
    match read_sensor(path, kind) {
        Ok(milli) => format_milli(milli),
        Err(e) => {
            eprintln!("sensor: {} unavailable: {e}; reporting null", kind.name());
            "null".to_string()
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn broken_message() -> String {
    format!("calibration table {CALIBRATION_PATH} missing; refusing to serve readings")
}

// -------------------------------------------------------------------------------------- HTTP

#[derive(Debug, Clone, PartialEq, Eq)]
struct Request {
    method: String,
    /// Path without query string or fragment.
    path: String,
}

/// Why a request could not be served; maps to a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HttpError {
    BadRequest,
    HeadTooLarge,
    VersionNotSupported,
}

impl HttpError {
    fn status(self) -> u16 {
        match self {
            HttpError::BadRequest => 400,
            HttpError::HeadTooLarge => 431,
            HttpError::VersionNotSupported => 505,
        }
    }
}

/// Index just past the blank line ending the request head (`\r\n\r\n`, or a bare `\n\n`).
fn find_head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Parses a request head (request line and headers). Headers are accepted but not needed:
/// every response closes the connection, and bodies are not read.
fn parse_request_head(head: &[u8]) -> Result<Request, HttpError> {
    let text = std::str::from_utf8(head).map_err(|_| HttpError::BadRequest)?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().ok_or(HttpError::BadRequest)?;
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) if !m.is_empty() && !t.is_empty() => (m, t, v),
        _ => return Err(HttpError::BadRequest),
    };
    if !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(HttpError::BadRequest);
    }
    if !version.starts_with("HTTP/") {
        return Err(HttpError::BadRequest);
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HttpError::VersionNotSupported);
    }
    for line in lines {
        if line.is_empty() {
            break;
        }
        match line.split_once(':') {
            Some((name, _)) if !name.is_empty() && !name.contains([' ', '\t']) => {}
            _ => return Err(HttpError::BadRequest),
        }
    }
    let path = target.split(['?', '#']).next().unwrap_or("");
    if !path.starts_with('/') {
        return Err(HttpError::BadRequest);
    }
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Response {
    status: u16,
    content_type: &'static str,
    extra_headers: Vec<(&'static str, String)>,
    body: String,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            extra_headers: Vec::new(),
            body: body.into(),
        }
    }

    fn json(status: u16, body: String) -> Response {
        Response {
            status,
            content_type: "application/json",
            extra_headers: Vec::new(),
            body,
        }
    }

    fn error(err: HttpError) -> Response {
        let status = err.status();
        Response::text(status, format!("{}\n", reason(status)))
    }

    /// Serialises the response; `head_only` (HEAD requests) keeps Content-Length but drops the body.
    fn to_bytes(&self, version: &str, head_only: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\nX-Sensor-Version: {}\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len(),
            version,
        );
        for (name, value) in &self.extra_headers {
            out.push_str(name);
            out.push_str(": ");
            out.push_str(value);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        if !head_only {
            out.push_str(&self.body);
        }
        out.into_bytes()
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// The application: maps a parsed request to a response.
fn route(cfg: &Config, req: &Request) -> Response {
    if req.method != "GET" && req.method != "HEAD" {
        let mut r = Response::text(405, "method not allowed\n");
        r.extra_headers.push(("Allow", "GET, HEAD".to_string()));
        return r;
    }
    match req.path.as_str() {
        "/healthz" => match cfg.behaviour {
            Behaviour::V1 | Behaviour::V2 => Response::text(200, "ok"),
            Behaviour::Broken => Response::text(503, format!("{}\n", broken_message())),
        },
        "/" => Response::json(
            if cfg.behaviour == Behaviour::Broken {
                503
            } else {
                200
            },
            readings_body(cfg),
        ),
        _ => Response::text(404, "not found\n"),
    }
}

fn readings_body(cfg: &Config) -> String {
    let mut body = format!(
        "{{\"app\":\"sensor\",\"version\":{}",
        json_string(&cfg.version)
    );
    match cfg.behaviour {
        Behaviour::V1 => {
            let t = reading_json(&cfg.temp_path, SensorKind::Temperature);
            body.push_str(&format!(",\"temperature_c\":{t}"));
        }
        Behaviour::V2 => {
            let t = reading_json(&cfg.temp_path, SensorKind::Temperature);
            let h = reading_json(&cfg.humidity_path, SensorKind::Humidity);
            body.push_str(&format!(",\"temperature_c\":{t},\"humidity_pct\":{h}"));
        }
        Behaviour::Broken => {
            body.push_str(&format!(",\"error\":{}", json_string(&broken_message())));
        }
    }
    body.push('}');
    body
}

enum ReadHead {
    Head(Vec<u8>),
    /// The peer closed or timed out before sending anything: nothing to answer.
    Nothing,
    Error(HttpError),
    TimedOut,
}

fn read_request_head(stream: &mut impl Read) -> ReadHead {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => {
                return if buf.is_empty() {
                    ReadHead::Nothing
                } else {
                    ReadHead::Error(HttpError::BadRequest)
                }
            }
            Ok(n) => {
                // Only the newly read bytes (plus 3 of overlap) can complete the terminator.
                let from = buf.len().saturating_sub(3);
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = find_head_end(&buf[from..]) {
                    buf.truncate(from + end);
                    return ReadHead::Head(buf);
                }
                if buf.len() > MAX_REQUEST_HEAD {
                    return ReadHead::Error(HttpError::HeadTooLarge);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                return if buf.is_empty() {
                    ReadHead::Nothing
                } else {
                    ReadHead::TimedOut
                }
            }
            Err(_) => return ReadHead::Nothing,
        }
    }
}

/// Serves one connection: one request, one response, then close.
fn handle_connection(mut stream: TcpStream, cfg: &Config) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_nodelay(true);
    let (response, head_only) = match read_request_head(&mut stream) {
        ReadHead::Nothing => return,
        ReadHead::TimedOut => (Response::text(408, "request timeout\n"), false),
        ReadHead::Error(e) => (Response::error(e), false),
        ReadHead::Head(head) => match parse_request_head(&head) {
            Ok(req) => (route(cfg, &req), req.method == "HEAD"),
            Err(e) => (Response::error(e), false),
        },
    };
    let _ = stream.write_all(&response.to_bytes(&cfg.version, head_only));
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Write);
}

// ------------------------------------------------------------------------------ socket setup

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Creates a listening IPv4 TCP socket with SO_REUSEADDR and SO_REUSEPORT set before bind, so a
/// second process (the next version during a swap) can bind the same port.
fn make_listener(addr: Ipv4Addr, port: u16) -> io::Result<TcpListener> {
    // SAFETY: plain socket syscalls on a descriptor this function owns; on error it is closed.
    unsafe {
        let fd = cvt(libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        ))?;
        let setup = || -> io::Result<()> {
            let one: libc::c_int = 1;
            for opt in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
                cvt(libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    &one as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                ))?;
            }
            let mut sa: libc::sockaddr_in = std::mem::zeroed();
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_port = port.to_be();
            sa.sin_addr = libc::in_addr {
                s_addr: u32::from(addr).to_be(),
            };
            cvt(libc::bind(
                fd,
                &sa as *const libc::sockaddr_in as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ))?;
            cvt(libc::listen(fd, LISTEN_BACKLOG))?;
            Ok(())
        };
        match setup() {
            Ok(()) => Ok(TcpListener::from_raw_fd(fd)),
            Err(e) => {
                libc::close(fd);
                Err(e)
            }
        }
    }
}

// ---------------------------------------------------------------------------------- signals

extern "C" fn noop_handler(_: libc::c_int) {}

/// Blocks SIGTERM and SIGINT in this thread (and every thread spawned later) and installs a
/// no-op handler. As PID 1 a signal with the default disposition would be dropped by the kernel;
/// blocked signals stay pending and are collected with `sigwait` in a dedicated thread.
fn block_shutdown_signals() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset/sigaction calls on locals; called once, before any thread is spawned.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        for sig in [libc::SIGTERM, libc::SIGINT] {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = noop_handler as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            cvt(libc::sigaction(sig, &sa, std::ptr::null_mut()))?;
        }
        Ok(set)
    }
}

fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "signal",
    }
}

/// Waits for SIGTERM/SIGINT; the first one writes its number to `notify_fd` (waking the accept
/// loop), a second one exits at once.
fn spawn_signal_thread(set: libc::sigset_t, notify_fd: RawFd) -> io::Result<()> {
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut first = true;
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is a valid, initialised sigset; `sig` is a local out-parameter.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                if first {
                    first = false;
                    let byte = sig as u8;
                    // SAFETY: writing one byte from a local to a pipe this process owns.
                    unsafe { libc::write(notify_fd, &byte as *const u8 as *const libc::c_void, 1) };
                } else {
                    eprintln!("sensor: second {}; exiting immediately", signal_name(sig));
                    std::process::exit(0);
                }
            }
        })
        .map(|_| ())
}

// ------------------------------------------------------------------------------------ server

/// Counts connections being served, so shutdown can wait for them.
#[derive(Default)]
struct InFlight {
    count: Mutex<usize>,
    idle: Condvar,
}

struct InFlightGuard(Arc<InFlight>);

impl InFlight {
    fn begin(self: &Arc<Self>) -> InFlightGuard {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        InFlightGuard(Arc::clone(self))
    }

    /// Waits until no connection is in flight; returns how many still are at the deadline.
    fn wait_idle(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut n = self.count.lock().unwrap_or_else(|e| e.into_inner());
        while *n > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            n = match self.idle.wait_timeout(n, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        *n
    }

    fn current(&self) -> usize {
        *self.count.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut n = self.0.count.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.0.idle.notify_all();
        }
    }
}

fn spawn_connection(stream: TcpStream, cfg: &Arc<Config>, inflight: &Arc<InFlight>) {
    let guard = inflight.begin();
    let cfg = Arc::clone(cfg);
    let spawned = thread::Builder::new().name("conn".into()).spawn(move || {
        let _guard = guard;
        handle_connection(stream, &cfg);
    });
    if let Err(e) = spawned {
        eprintln!("sensor: cannot spawn connection thread: {e}");
    }
}

/// Accepts every connection currently queued on the (non-blocking) listener.
fn accept_ready(listener: &TcpListener, cfg: &Arc<Config>, inflight: &Arc<InFlight>) {
    loop {
        match listener.accept() {
            Ok((stream, _peer)) => spawn_connection(stream, cfg, inflight),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(e) => {
                // e.g. EMFILE: back off instead of spinning on a listener that stays readable.
                eprintln!("sensor: accept failed: {e}");
                thread::sleep(Duration::from_millis(50));
                return;
            }
        }
    }
}

/// Opens the private health-check listener on 127.0.0.1 (ephemeral port, no SO_REUSEPORT) and
/// publishes its port in `path` (written atomically).
fn open_health_listener(path: &Path) -> io::Result<TcpListener> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let port = listener.local_addr()?.port();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{port}\n"))?;
    std::fs::rename(&tmp, path)?;
    Ok(listener)
}

fn run(cfg: Config) -> io::Result<()> {
    let sigset = block_shutdown_signals()?;
    let mut pipe_fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the two-element array.
    cvt(unsafe { libc::pipe2(pipe_fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    let (notify_r, notify_w) = (pipe_fds[0], pipe_fds[1]);

    let listener = make_listener(Ipv4Addr::UNSPECIFIED, cfg.port).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on 0.0.0.0:{}: {e}", cfg.port),
        )
    })?;
    listener.set_nonblocking(true)?;
    let port = listener.local_addr()?.port();
    let mut listeners = vec![listener];
    if let Some(path) = &cfg.health_port_file {
        match open_health_listener(path) {
            Ok(h) => {
                h.set_nonblocking(true)?;
                eprintln!(
                    "sensor: private health port 127.0.0.1:{} (published in {})",
                    h.local_addr()?.port(),
                    path.display()
                );
                listeners.push(h);
            }
            // The main port still answers /healthz; only the probe's precision is lost.
            Err(e) => eprintln!(
                "sensor: warning: no private health port ({}: {e})",
                path.display()
            ),
        }
    }
    spawn_signal_thread(sigset, notify_w)?;

    let cfg = Arc::new(cfg);
    eprintln!(
        "sensor: version {} ({}) listening on 0.0.0.0:{} (pid {})",
        cfg.version,
        match cfg.behaviour {
            Behaviour::V1 => "temperature",
            Behaviour::V2 => "temperature+humidity",
            Behaviour::Broken => "broken release",
        },
        port,
        std::process::id()
    );
    if cfg.behaviour == Behaviour::Broken {
        eprintln!("sensor: ERROR: {}", broken_message());
        thread::Builder::new()
            .name("broken".into())
            .spawn(|| loop {
                thread::sleep(BROKEN_LOG_INTERVAL);
                eprintln!("sensor: ERROR: {}", broken_message());
            })?;
    }

    let inflight = Arc::new(InFlight::default());
    // pollfd 0 is the shutdown pipe, then one per listener.
    let mut fds: Vec<libc::pollfd> = std::iter::once(notify_r)
        .chain(listeners.iter().map(|l| l.as_raw_fd()))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        for f in fds.iter_mut() {
            f.revents = 0;
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[0].revents != 0 {
            break;
        }
        for (pfd, l) in fds[1..].iter().zip(&listeners) {
            if pfd.revents != 0 {
                accept_ready(l, &cfg, &inflight);
            }
        }
    }

    let mut sig = 0u8;
    // SAFETY: reading one byte into a local from our own pipe.
    unsafe { libc::read(notify_r, &mut sig as *mut u8 as *mut libc::c_void, 1) };
    // Serve what the kernel already queued for us, then stop accepting.
    for l in &listeners {
        accept_ready(l, &cfg, &inflight);
    }
    drop(listeners);
    if let Some(path) = &cfg.health_port_file {
        let _ = std::fs::remove_file(path);
    }
    eprintln!(
        "sensor: {} received; stopped accepting, finishing {} in-flight connection(s)",
        signal_name(libc::c_int::from(sig)),
        inflight.current()
    );
    let left = inflight.wait_idle(DRAIN_TIMEOUT);
    if left > 0 {
        eprintln!(
            "sensor: {left} connection(s) still open after {DRAIN_TIMEOUT:?}; exiting anyway"
        );
    }
    eprintln!("sensor: version {} stopped", cfg.version);
    Ok(())
}

fn main() {
    let cfg = match Config::from_lookup(|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sensor: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(cfg) {
        eprintln!("sensor: fatal: {e}");
        std::process::exit(1);
    }
    std::process::exit(0);
}

// ------------------------------------------------------------------------------------- tests

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "ferry-sensor-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }

        fn write(&self, name: &str, contents: &str) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, contents).unwrap();
            p
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn cfg(version: &str, dir: &TempDir) -> Config {
        let mut env = HashMap::new();
        env.insert("SENSOR_VERSION", version.to_string());
        env.insert(
            "SENSOR_TEMP_PATH",
            dir.0.join("temp1_input").display().to_string(),
        );
        env.insert(
            "SENSOR_HUMIDITY_PATH",
            dir.0.join("humidity1_input").display().to_string(),
        );
        Config::from_lookup(|k| env.get(k).cloned()).unwrap()
    }

    fn get(path: &str) -> Request {
        Request {
            method: "GET".into(),
            path: path.into(),
        }
    }

    #[test]
    fn behaviour_from_version() {
        assert_eq!(Behaviour::from_version("1.0.0"), Ok(Behaviour::V1));
        assert_eq!(Behaviour::from_version("1"), Ok(Behaviour::V1));
        assert_eq!(Behaviour::from_version("v2.3.4"), Ok(Behaviour::V2));
        assert_eq!(Behaviour::from_version("2.0.0-rc.1"), Ok(Behaviour::V2));
        assert_eq!(Behaviour::from_version("3.0.0"), Ok(Behaviour::Broken));
        assert!(Behaviour::from_version("4.0.0").is_err());
        assert!(Behaviour::from_version("0.9.0").is_err());
        assert!(Behaviour::from_version("latest").is_err());
        assert!(Behaviour::from_version("").is_err());
    }

    #[test]
    fn config_defaults_and_overrides() {
        let c = Config::from_lookup(|_| None).unwrap();
        assert_eq!(c.version, "1.0.0");
        assert_eq!(c.behaviour, Behaviour::V1);
        assert_eq!(c.port, 8080);
        assert_eq!(c.temp_path, PathBuf::from("/sensors/temp1_input"));
        assert_eq!(c.humidity_path, PathBuf::from("/sensors/humidity1_input"));

        let c = Config::from_lookup(|k| match k {
            "SENSOR_VERSION" => Some("2.0.0".into()),
            "PORT" => Some("9090".into()),
            "SENSOR_TEMP_PATH" => Some("".into()), // empty = unset
            _ => None,
        })
        .unwrap();
        assert_eq!(c.behaviour, Behaviour::V2);
        assert_eq!(c.port, 9090);
        assert_eq!(c.temp_path, PathBuf::from("/sensors/temp1_input"));

        assert!(Config::from_lookup(|k| (k == "PORT").then(|| "70000".into())).is_err());
        assert!(Config::from_lookup(|k| (k == "SENSOR_VERSION").then(|| "9".into())).is_err());
    }

    #[test]
    fn parse_milli_accepts_hwmon_text() {
        assert_eq!(parse_milli("21500\n"), Ok(21500));
        assert_eq!(parse_milli("  -5000 "), Ok(-5000));
        assert_eq!(parse_milli("+42"), Ok(42));
        assert_eq!(parse_milli("0"), Ok(0));
    }

    #[test]
    fn parse_milli_rejects_garbage() {
        for bad in [
            "",
            "\n",
            "abc",
            "21.5",
            "21500x",
            "-",
            "1 2",
            "99999999999999999999999",
        ] {
            assert!(parse_milli(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn format_milli_is_exact() {
        assert_eq!(format_milli(21500), "21.5");
        assert_eq!(format_milli(21000), "21.0");
        assert_eq!(format_milli(21234), "21.234");
        assert_eq!(format_milli(21050), "21.05");
        assert_eq!(format_milli(-500), "-0.5");
        assert_eq!(format_milli(1), "0.001");
        assert_eq!(format_milli(0), "0.0");
        assert_eq!(format_milli(-273_150), "-273.15");
    }

    #[test]
    fn read_sensor_checks_file_and_range() {
        let d = TempDir::new();
        let t = d.write("t", "21500\n");
        assert_eq!(read_sensor(&t, SensorKind::Temperature), Ok(21500));
        let missing = d.0.join("nope");
        assert!(read_sensor(&missing, SensorKind::Temperature).is_err());
        let garbage = d.write("g", "hello");
        assert!(read_sensor(&garbage, SensorKind::Temperature).is_err());
        let too_cold = d.write("c", "-300000");
        assert!(read_sensor(&too_cold, SensorKind::Temperature).is_err());
        let h = d.write("h", "45200");
        assert_eq!(read_sensor(&h, SensorKind::Humidity), Ok(45200));
        let wet = d.write("w", "150000");
        assert!(read_sensor(&wet, SensorKind::Humidity).is_err());
        let neg = d.write("n", "-1");
        assert!(read_sensor(&neg, SensorKind::Humidity).is_err());
    }

    #[test]
    fn parse_request_line_and_headers() {
        let r =
            parse_request_head(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
        assert_eq!(r, get("/healthz"));
        let r = parse_request_head(b"HEAD /?a=b#frag HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(r.method, "HEAD");
        assert_eq!(r.path, "/");
        // bare LF line endings are tolerated
        let r = parse_request_head(b"GET /x HTTP/1.1\nHost: y\n\n").unwrap();
        assert_eq!(r.path, "/x");
    }

    #[test]
    fn parse_request_rejects_malformed() {
        use HttpError::*;
        let cases: &[(&[u8], HttpError)] = &[
            (b"\r\n\r\n", BadRequest),
            (b"GET /\r\n\r\n", BadRequest),
            (b"GET / HTTP/1.1 extra\r\n\r\n", BadRequest),
            (b"get / HTTP/1.1\r\n\r\n", BadRequest),
            (b"GET  / HTTP/1.1\r\n\r\n", BadRequest),
            (b"GET healthz HTTP/1.1\r\n\r\n", BadRequest),
            (b"GET / FTP/1.0\r\n\r\n", BadRequest),
            (b"GET / HTTP/2.0\r\n\r\n", VersionNotSupported),
            (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", BadRequest),
            (b"GET / HTTP/1.1\r\nBad Name: v\r\n\r\n", BadRequest),
            (b"GET / HTTP/1.1\r\n\xff\xfe: v\r\n\r\n", BadRequest),
        ];
        for (raw, want) in cases {
            assert_eq!(
                parse_request_head(raw),
                Err(*want),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn head_end_detection() {
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
    }

    #[test]
    fn read_head_in_pieces_and_limits() {
        struct Trickle(Vec<u8>, usize);
        impl Read for Trickle {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                let n = (self.0.len() - self.1).min(3).min(out.len());
                out[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
                self.1 += n;
                Ok(n)
            }
        }
        let mut t = Trickle(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nleftover".to_vec(), 0);
        match read_request_head(&mut t) {
            ReadHead::Head(h) => assert_eq!(h, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            _ => panic!("expected a head"),
        }
        let mut empty = Trickle(Vec::new(), 0);
        assert!(matches!(read_request_head(&mut empty), ReadHead::Nothing));
        let mut cut = Trickle(b"GET / HTTP/1.1\r\n".to_vec(), 0);
        assert!(matches!(
            read_request_head(&mut cut),
            ReadHead::Error(HttpError::BadRequest)
        ));
        let mut huge = Vec::from(&b"GET / HTTP/1.1\r\n"[..]);
        huge.extend(std::iter::repeat_n(b'a', MAX_REQUEST_HEAD + 10));
        let mut huge = Trickle(huge, 0);
        assert!(matches!(
            read_request_head(&mut huge),
            ReadHead::Error(HttpError::HeadTooLarge)
        ));
    }

    #[test]
    fn response_bytes() {
        let r = Response::text(200, "ok");
        let s = String::from_utf8(r.to_bytes("1.0.0", false)).unwrap();
        assert!(s.starts_with("HTTP/1.1 200 OK\r\n"), "{s}");
        assert!(s.contains("\r\nContent-Length: 2\r\n"));
        assert!(s.contains("\r\nConnection: close\r\n"));
        assert!(s.contains("\r\nX-Sensor-Version: 1.0.0\r\n"));
        assert!(s.ends_with("\r\n\r\nok"));
        let head = String::from_utf8(r.to_bytes("1.0.0", true)).unwrap();
        assert!(head.contains("Content-Length: 2\r\n"));
        assert!(head.ends_with("\r\n\r\n"));
        let e = String::from_utf8(Response::error(HttpError::HeadTooLarge).to_bytes("x", false))
            .unwrap();
        assert!(e.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
    }

    #[test]
    fn v1_routes() {
        let d = TempDir::new();
        let c = cfg("1.0.0", &d);
        let h = route(&c, &get("/healthz"));
        assert_eq!((h.status, h.body.as_str()), (200, "ok"));

        d.write("temp1_input", "21500\n");
        d.write("humidity1_input", "45000\n");
        let r = route(&c, &get("/"));
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type, "application/json");
        assert_eq!(
            r.body,
            r#"{"app":"sensor","version":"1.0.0","temperature_c":21.5}"#
        );
        assert_eq!(route(&c, &get("/nope")).status, 404);
        let post = Request {
            method: "POST".into(),
            path: "/".into(),
        };
        let r = route(&c, &post);
        assert_eq!(r.status, 405);
        assert_eq!(r.extra_headers, vec![("Allow", "GET, HEAD".to_string())]);
    }

    #[test]
    fn v1_missing_or_garbage_sensor_is_null() {
        let d = TempDir::new();
        let c = cfg("1.2.0", &d);
        let r = route(&c, &get("/"));
        assert_eq!(
            r.body,
            r#"{"app":"sensor","version":"1.2.0","temperature_c":null}"#
        );
        d.write("temp1_input", "garbage");
        let r = route(&c, &get("/"));
        assert_eq!(r.status, 200);
        assert!(r.body.ends_with(r#""temperature_c":null}"#), "{}", r.body);
    }

    #[test]
    fn v2_adds_humidity() {
        let d = TempDir::new();
        let c = cfg("2.0.0", &d);
        d.write("temp1_input", "-1250");
        d.write("humidity1_input", "45200\n");
        let r = route(&c, &get("/"));
        assert_eq!(
            r.body,
            r#"{"app":"sensor","version":"2.0.0","temperature_c":-1.25,"humidity_pct":45.2}"#
        );
        std::fs::remove_file(d.0.join("humidity1_input")).unwrap();
        let r = route(&c, &get("/"));
        assert_eq!(
            r.body,
            r#"{"app":"sensor","version":"2.0.0","temperature_c":-1.25,"humidity_pct":null}"#
        );
        assert_eq!(route(&c, &get("/healthz")).status, 200);
    }

    #[test]
    fn v3_is_unhealthy() {
        let d = TempDir::new();
        d.write("temp1_input", "21500");
        let c = cfg("3.0.0", &d);
        let h = route(&c, &get("/healthz"));
        assert_eq!(h.status, 503);
        assert!(h.body.contains("calibration table"), "{}", h.body);
        let r = route(&c, &get("/"));
        assert_eq!(r.status, 503);
        assert!(!r.body.contains("temperature_c"), "{}", r.body);
        assert!(r
            .body
            .starts_with(r#"{"app":"sensor","version":"3.0.0","error":"#));
    }

    #[test]
    fn json_escaping() {
        assert_eq!(json_string("1.0.0"), "\"1.0.0\"");
        assert_eq!(json_string("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
    }

    fn roundtrip(listener: &TcpListener, cfg: &Config, raw: &[u8]) -> String {
        let addr = listener.local_addr().unwrap();
        let raw = raw.to_vec();
        let client = thread::spawn(move || {
            let mut s = TcpStream::connect(("127.0.0.1", addr.port())).unwrap();
            s.write_all(&raw).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        });
        let (stream, _) = listener.accept().unwrap();
        handle_connection(stream, cfg);
        client.join().unwrap()
    }

    #[test]
    fn serves_over_a_real_socket() {
        let d = TempDir::new();
        d.write("temp1_input", "19000");
        let c = cfg("1.0.0", &d);
        let l = make_listener(Ipv4Addr::LOCALHOST, 0).unwrap();
        let out = roundtrip(&l, &c, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nok"), "{out}");
        let out = roundtrip(&l, &c, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(out.ends_with(r#""temperature_c":19.0}"#), "{out}");
        let out = roundtrip(&l, &c, b"HEAD / HTTP/1.1\r\n\r\n");
        assert!(out.ends_with("\r\n\r\n"), "{out}");
        let out = roundtrip(&l, &c, b"BLAH\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
    }

    #[test]
    fn two_listeners_share_a_port() {
        let a = make_listener(Ipv4Addr::LOCALHOST, 0).unwrap();
        let port = a.local_addr().unwrap().port();
        let b = make_listener(Ipv4Addr::LOCALHOST, port).expect("SO_REUSEPORT lets a second bind");
        assert_eq!(b.local_addr().unwrap().port(), port);
        drop(a);
        // the survivor still accepts
        let _c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        b.accept().unwrap();
    }

    #[test]
    fn health_listener_publishes_its_port() {
        let d = TempDir::new();
        let path = d.0.join("run/sensor/health-port");
        let l = open_health_listener(&path).unwrap();
        let port: u16 = std::fs::read_to_string(&path)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(l.local_addr().unwrap().port(), port);
        assert!(l.local_addr().unwrap().ip().is_loopback());
        let c = cfg("1.0.0", &d);
        let out = roundtrip(&l, &c, b"GET /healthz HTTP/1.1\r\n\r\n");
        assert!(out.ends_with("\r\n\r\nok"), "{out}");
    }

    #[test]
    fn in_flight_tracking() {
        let f = Arc::new(InFlight::default());
        assert_eq!(f.wait_idle(Duration::from_millis(1)), 0);
        let g = f.begin();
        assert_eq!(f.current(), 1);
        assert_eq!(f.wait_idle(Duration::from_millis(20)), 1);
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(30));
            drop(g);
        });
        assert_eq!(f.wait_idle(Duration::from_secs(5)), 0);
        t.join().unwrap();
    }
}
