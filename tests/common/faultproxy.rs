//! A fault-injecting TCP proxy in front of an HTTP/1.1 upstream (the sample registry): what a
//! box's 3G link does to its downloads, switchable at runtime from the test thread.
//!
//! ```ignore
//! let proxy = FaultProxy::registry();              // 127.0.0.1:<free port> -> FERRY_REGISTRY
//! let image = proxy.repo(infra::BULK_REPO);        // "127.0.0.1:<port>/ferry/bulk"
//! proxy.throttle(Some(256 * 1024));                // one 256 KiB/s link for all connections
//! proxy.cut_after(Some(300 * 1024));               // every connection dies after 300 KiB down
//! // ... run the update ...
//! assert!(proxy.bytes_down() <= blobs.compressed_size() * 11 / 10);
//! ```
//!
//! Faults (each off by default; all can be combined):
//! - [`FaultProxy::throttle`]: upstream→client bytes per second, ONE token bucket shared by every
//!   connection (one link), burst 16 KiB, handed out in pieces of 1/50 s worth of bytes.
//! - [`FaultProxy::cut_after`]: a connection is closed both ways once it has carried that many
//!   bytes to the client (per connection, headers included; the last piece is trimmed so that
//!   exactly that many arrive). Applies to open connections too.
//! - [`FaultProxy::stall`]: nothing is forwarded, either way, on any connection, old or new
//!   (new ones are still accepted); forwarding resumes when it is switched off.
//! - [`FaultProxy::dark`]: the listener is closed (connects are refused) and every open
//!   connection is shut down; switched off, it listens on the same port again.
//! - [`FaultProxy::corrupt`]: the next `times` 200/206 responses with a body to GET requests
//!   whose path contains `path_contains` get one byte in every 4 KiB of their BODY inverted
//!   (body offsets 100, 4196, ...: the gzip header stays intact); headers and length unchanged.
//!
//! Observation: [`FaultProxy::bytes_down`] (what was written to clients, headers included; the
//! client-facing sockets have a small send buffer, so this is within 64 KiB of what arrived),
//! `bytes_up`, `connections` (accepted), `cuts`, `corrupted` (responses), `requests` (every
//! request parsed on the client side: method, path, `Range`, `User-Agent`), `reset_counters`.
//!
//! Requests are parsed on their way up (HTTP/1.1, keep-alive and pipelining, bodies by
//! `Content-Length`; a chunked request body makes the rest of that connection opaque: forwarded,
//! not recorded) and responses framed on their way down (`Content-Length`, chunked, to the close;
//! no body for HEAD, 1xx, 204, 304) so that each response is matched with its request.
//! Dropping the proxy closes the listener and every connection and joins every thread.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{infra, ports};

/// Token bucket depth of [`FaultProxy::throttle`].
pub const BURST: u64 = 16 * 1024;
/// Body offsets (mod 4096) [`FaultProxy::corrupt`] inverts.
pub const CORRUPT_OFFSET: u64 = 100;
const CORRUPT_EVERY: u64 = 4096;
const BUF: usize = 16 * 1024;
const POLL: Duration = Duration::from_millis(5);
const MAX_HEAD: usize = 64 * 1024;
const NO_CUT: u64 = u64::MAX;

/// Which responses [`FaultProxy::corrupt`] damages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorruptRule {
    /// A substring of the request path, e.g. a blob digest.
    pub path_contains: String,
    /// How many responses (the rule then stays, with `times` 0, until replaced).
    pub times: usize,
}

/// A request as the client sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    /// The request target as sent (`/v2/ferry/bulk/blobs/sha256:...`).
    pub path: String,
    /// The `Range` header's value.
    pub range: Option<String>,
    pub user_agent: Option<String>,
}

/// See the module docs.
pub struct FaultProxy {
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    upstream: String,
    port: u16,
    stop: AtomicBool,
    stalled: AtomicBool,
    cut_after: AtomicU64,
    bucket: Mutex<Bucket>,
    corrupt: Mutex<Option<CorruptRule>>,
    corrupted: AtomicUsize,
    bytes_down: AtomicU64,
    bytes_up: AtomicU64,
    connections: AtomicU64,
    cuts: AtomicU64,
    requests: Mutex<Vec<RequestRecord>>,
    /// The listener and the live connections under one lock: a connection is accepted and
    /// registered in one step, so `dark(true)` shuts down every connection accepted before it.
    net: Mutex<Net>,
}

struct Net {
    /// `None` while dark (and after drop).
    listener: Option<TcpListener>,
    conns: Vec<Arc<Conn>>,
    threads: Vec<JoinHandle<()>>,
}

struct Bucket {
    rate: Option<u64>,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn refill(&mut self, rate: u64) {
        let now = Instant::now();
        let earned = now.duration_since(self.last).as_secs_f64() * rate as f64;
        self.tokens = (self.tokens + earned).min(BURST as f64);
        self.last = now;
    }
}

struct Conn {
    client: TcpStream,
    upstream: Mutex<Option<TcpStream>>,
    closed: AtomicBool,
    /// Requests forwarded whose responses have not begun: (method, path).
    pending: Mutex<VecDeque<(String, String)>>,
    /// Bytes delivered to the client on this connection.
    down: AtomicU64,
}

impl Conn {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.client.shutdown(Shutdown::Both);
        if let Some(up) = lock(&self.upstream).as_ref() {
            let _ = up.shutdown(Shutdown::Both);
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn bind(port: u16) -> std::io::Result<TcpListener> {
    let l = TcpListener::bind(("127.0.0.1", port))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

impl FaultProxy {
    /// A proxy to `upstream` (`host:port`) on a free port of 127.0.0.1 (below the ephemeral
    /// range, see [`ports::free_port`], so that it can be bound again after [`Self::dark`]).
    pub fn start(upstream: &str) -> FaultProxy {
        let (port, listener) = (0..50)
            .find_map(|_| {
                let port = ports::free_port();
                bind(port).ok().map(|l| (port, l))
            })
            .expect("no free port for the fault proxy");
        let shared = Arc::new(Shared {
            upstream: upstream.to_string(),
            port,
            stop: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            cut_after: AtomicU64::new(NO_CUT),
            bucket: Mutex::new(Bucket {
                rate: None,
                tokens: 0.0,
                last: Instant::now(),
            }),
            corrupt: Mutex::new(None),
            corrupted: AtomicUsize::new(0),
            bytes_down: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            cuts: AtomicU64::new(0),
            requests: Mutex::new(Vec::new()),
            net: Mutex::new(Net {
                listener: Some(listener),
                conns: Vec::new(),
                threads: Vec::new(),
            }),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("faultproxy-{port}"))
                .spawn(move || accept_loop(shared))
                .expect("spawn the fault proxy")
        };
        FaultProxy {
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// A proxy to the sample registry ([`infra::registry`]).
    pub fn registry() -> FaultProxy {
        FaultProxy::start(&infra::registry())
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.shared.port))
    }

    pub fn port(&self) -> u16 {
        self.shared.port
    }

    /// `127.0.0.1:<port>/<path>`: a repository (`ferry/bulk`) as seen through the proxy.
    pub fn repo(&self, path: &str) -> String {
        format!("{}/{}", self.addr(), path.trim_start_matches('/'))
    }

    /// Limit the bytes per second to clients, all connections together (`None`: unlimited).
    pub fn throttle(&self, bytes_per_s: Option<u64>) {
        assert_ne!(bytes_per_s, Some(0), "throttle(Some(0)): use stall(true)");
        let mut b = lock(&self.shared.bucket);
        if b.rate.is_none() {
            b.tokens = 0.0;
            b.last = Instant::now();
        } else if let Some(old) = b.rate {
            b.refill(old);
        }
        b.rate = bytes_per_s;
    }

    /// Close every connection once it has delivered `bytes` to its client (`None`: never).
    pub fn cut_after(&self, bytes: Option<u64>) {
        assert_ne!(bytes, Some(0), "cut_after(Some(0)): use dark(true)");
        self.shared
            .cut_after
            .store(bytes.unwrap_or(NO_CUT), Ordering::SeqCst);
    }

    /// Stop (or resume) forwarding in both directions on every connection, old and new.
    pub fn stall(&self, on: bool) {
        self.shared.stalled.store(on, Ordering::SeqCst);
    }

    /// Refuse connections and drop the open ones (`true`), or listen again on the same port.
    pub fn dark(&self, on: bool) {
        let mut net = lock(&self.shared.net);
        if on {
            net.listener = None;
            for c in &net.conns {
                c.close();
            }
        } else if net.listener.is_none() {
            let deadline = Instant::now() + Duration::from_secs(10);
            net.listener = Some(loop {
                match bind(self.shared.port) {
                    Ok(l) => break l,
                    Err(e) if Instant::now() < deadline => {
                        eprintln!("fault proxy: re-binding port {}: {e}", self.shared.port);
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => panic!("fault proxy: cannot listen on {} again: {e}", self.addr()),
                }
            });
        }
    }

    /// Corrupt the bodies of the next matching responses (see the module docs); `None` clears.
    pub fn corrupt(&self, rule: Option<CorruptRule>) {
        *lock(&self.shared.corrupt) = rule;
    }

    /// Responses corrupted so far.
    pub fn corrupted(&self) -> usize {
        self.shared.corrupted.load(Ordering::SeqCst)
    }

    /// Bytes written to clients since the start or [`Self::reset_counters`], headers included.
    pub fn bytes_down(&self) -> u64 {
        self.shared.bytes_down.load(Ordering::SeqCst)
    }

    /// Bytes forwarded from clients to the upstream.
    pub fn bytes_up(&self) -> u64 {
        self.shared.bytes_up.load(Ordering::SeqCst)
    }

    /// Connections accepted.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Connections closed by [`Self::cut_after`].
    pub fn cuts(&self) -> u64 {
        self.shared.cuts.load(Ordering::SeqCst)
    }

    /// Every request parsed on the client side, in order of arrival.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.requests).clone()
    }

    /// Zero `bytes_down`, `bytes_up`, `connections`, `cuts`, `corrupted` and forget the
    /// requests (per-connection byte counts for `cut_after` stay).
    pub fn reset_counters(&self) {
        let s = &self.shared;
        s.bytes_down.store(0, Ordering::SeqCst);
        s.bytes_up.store(0, Ordering::SeqCst);
        s.connections.store(0, Ordering::SeqCst);
        s.cuts.store(0, Ordering::SeqCst);
        s.corrupted.store(0, Ordering::SeqCst);
        lock(&s.requests).clear();
    }

    /// What the proxy saw, for assertion messages.
    pub fn describe(&self) -> String {
        let reqs = self.requests();
        let mut out = format!(
            "fault proxy {} -> {}: {} connection(s), {} cut, {} bytes down, {} up, {} corrupted, {} request(s)",
            self.addr(),
            self.shared.upstream,
            self.connections(),
            self.cuts(),
            self.bytes_down(),
            self.bytes_up(),
            self.corrupted(),
            reqs.len()
        );
        for r in reqs.iter().rev().take(40).rev() {
            out.push_str(&format!(
                "\n  {} {}{}{}",
                r.method,
                r.path,
                r.range
                    .as_deref()
                    .map(|v| format!(" range={v}"))
                    .unwrap_or_default(),
                r.user_agent
                    .as_deref()
                    .map(|v| format!(" ua={v}"))
                    .unwrap_or_default()
            ));
        }
        out
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let threads = {
            let mut net = lock(&self.shared.net);
            net.listener = None;
            for c in &net.conns {
                c.close();
            }
            std::mem::take(&mut net.threads)
        };
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for t in threads {
            let _ = t.join();
        }
    }
}

/// What the proxy has written to a client is "on the link" only once the client's side took it:
/// a small send buffer (instead of loopback's autotuned megabytes) keeps `bytes_down` within
/// 64 KiB of what the client received, as on a real link where unsent bytes stay at the sender.
fn small_send_buffer(stream: &TcpStream) {
    use std::os::unix::io::AsRawFd;
    let size: libc::c_int = SEND_BUFFER;
    // SAFETY: setsockopt on a socket this function borrows, with a c_int option value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// The client-facing send buffer (the kernel doubles it for bookkeeping).
const SEND_BUFFER: libc::c_int = 32 * 1024;

fn accept_loop(shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        let accepted = {
            let mut net = lock(&shared.net);
            match net.listener.as_ref().map(|l| l.accept()) {
                Some(Ok((stream, _))) => {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_nodelay(true);
                    small_send_buffer(&stream);
                    let conn = Arc::new(Conn {
                        client: stream,
                        upstream: Mutex::new(None),
                        closed: AtomicBool::new(false),
                        pending: Mutex::new(VecDeque::new()),
                        down: AtomicU64::new(0),
                    });
                    shared.connections.fetch_add(1, Ordering::SeqCst);
                    net.conns.push(conn.clone());
                    net.threads.retain(|t| !t.is_finished());
                    let sh = shared.clone();
                    match std::thread::Builder::new()
                        .name("faultproxy-conn".into())
                        .spawn(move || serve(sh, conn))
                    {
                        Ok(t) => net.threads.push(t),
                        Err(e) => eprintln!("fault proxy: cannot spawn a connection thread: {e}"),
                    }
                    true
                }
                // WouldBlock, or e.g. EMFILE: try again shortly. None: dark.
                Some(Err(_)) | None => false,
            }
        };
        if !accepted {
            std::thread::sleep(POLL);
        }
    }
}

fn connect(upstream: &str) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in upstream.to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(ErrorKind::NotFound, "no address")))
}

fn serve(sh: Arc<Shared>, conn: Arc<Conn>) {
    relay(&sh, &conn);
    conn.close();
    lock(&sh.net).conns.retain(|c| !Arc::ptr_eq(c, &conn));
}

fn relay(sh: &Arc<Shared>, conn: &Arc<Conn>) {
    let Ok(up) = connect(&sh.upstream) else {
        return;
    };
    let _ = up.set_nodelay(true);
    let (Ok(up_read), Ok(up_write), Ok(client_read), Ok(client_write)) = (
        up.try_clone(),
        up.try_clone(),
        conn.client.try_clone(),
        conn.client.try_clone(),
    ) else {
        return;
    };
    *lock(&conn.upstream) = Some(up);
    if conn.is_closed() {
        return; // dark or dropped while connecting
    }
    let down = {
        let (sh, conn) = (sh.clone(), conn.clone());
        std::thread::Builder::new()
            .name("faultproxy-down".into())
            .spawn(move || downstream(&sh, &conn, up_read, client_write))
    };
    let Ok(down) = down else {
        return;
    };
    upstream(sh, conn, client_read, up_write);
    let _ = down.join();
}

/// Waits while the proxy is stalled; false when the connection is gone meanwhile.
fn wait_while_stalled(sh: &Shared, conn: &Conn) -> bool {
    while sh.stalled.load(Ordering::SeqCst) {
        if conn.is_closed() || sh.stop.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(POLL);
    }
    !conn.is_closed()
}

/// Client → upstream: parse the requests, forward the bytes.
fn upstream(sh: &Shared, conn: &Conn, mut from: TcpStream, mut to: TcpStream) {
    let mut parser = RequestParser::default();
    let mut buf = vec![0u8; BUF];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => {
                // The client is done sending; let the response finish.
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                conn.close();
                return;
            }
        };
        if !wait_while_stalled(sh, conn) {
            return;
        }
        for r in parser.feed(&buf[..n]) {
            lock(&conn.pending).push_back((r.method.clone(), r.path.clone()));
            lock(&sh.requests).push(r);
        }
        // Counted before the write, as downstream: the answer may be back before we run again.
        sh.bytes_up.fetch_add(n as u64, Ordering::SeqCst);
        if to.write_all(&buf[..n]).is_err() {
            sh.bytes_up.fetch_sub(n as u64, Ordering::SeqCst);
            conn.close();
            return;
        }
    }
}

/// Takes `n` tokens from the link's bucket, waiting as long as the rate requires; false when
/// the connection is gone meanwhile.
fn take_tokens(sh: &Shared, conn: &Conn, n: usize) -> bool {
    {
        let mut b = lock(&sh.bucket);
        let Some(rate) = b.rate else {
            return true;
        };
        b.refill(rate);
        b.tokens -= n as f64;
    }
    loop {
        if conn.is_closed() || sh.stop.load(Ordering::SeqCst) {
            return false;
        }
        let wait = {
            let mut b = lock(&sh.bucket);
            let Some(rate) = b.rate else {
                return true;
            };
            b.refill(rate);
            if b.tokens >= 0.0 {
                return true;
            }
            -b.tokens / rate as f64
        };
        std::thread::sleep(Duration::from_secs_f64(wait.min(0.02)));
    }
}

/// Upstream → client: frame the responses (corrupting where asked), deliver the bytes in
/// pieces under the stall, cut and throttle rules.
fn downstream(sh: &Shared, conn: &Conn, mut from: TcpStream, mut to: TcpStream) {
    let mut framer = ResponseFramer::default();
    let mut buf = vec![0u8; BUF];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                conn.close();
                return;
            }
        };
        let mut off = 0;
        while off < n {
            if !wait_while_stalled(sh, conn) {
                return;
            }
            let cut = sh.cut_after.load(Ordering::SeqCst);
            let sent = conn.down.load(Ordering::SeqCst);
            if sent >= cut {
                sh.cuts.fetch_add(1, Ordering::SeqCst);
                conn.close();
                return;
            }
            let mut piece = (n - off) as u64;
            piece = piece.min(cut - sent);
            let rate = lock(&sh.bucket).rate;
            if let Some(rate) = rate {
                piece = piece.min((rate / 50).clamp(512, BUF as u64));
            }
            let piece = piece as usize;
            if !take_tokens(sh, conn, piece) {
                return;
            }
            let bytes = &mut buf[off..off + piece];
            framer.process(bytes, sh, conn);
            // Counted before the write: once `write_all` returns, the client may have read
            // these bytes and looked at the counters before this thread runs again.
            sh.bytes_down.fetch_add(piece as u64, Ordering::SeqCst);
            let sent = conn.down.fetch_add(piece as u64, Ordering::SeqCst) + piece as u64;
            if to.write_all(bytes).is_err() {
                sh.bytes_down.fetch_sub(piece as u64, Ordering::SeqCst);
                conn.close();
                return;
            }
            off += piece;
            // The rule read before the write, not again now: once `write_all` returned, the
            // client may have read these bytes and set a new rule for later connections; a
            // fresh load here would cut (and count) a connection that already delivered
            // everything under the old rule.
            if sent >= cut {
                sh.cuts.fetch_add(1, Ordering::SeqCst);
                conn.close();
                return;
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Header fields, names lower-cased.
type Headers = Vec<(String, String)>;

/// Parsed header block: the first line's words and the headers.
fn parse_head(head: &[u8]) -> Option<(Vec<String>, Headers)> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let first: Vec<String> = lines
        .next()?
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if first.len() < 2 {
        return None;
    }
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect();
    Some((first, headers))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Accumulates a header block; returns how many bytes of `data` completed it (the block is then
/// in `buf`), or `None` when `data` was all taken and the block is still open.
fn take_head(buf: &mut Vec<u8>, data: &[u8]) -> Option<usize> {
    let mut data = data;
    let mut skipped = 0;
    if buf.is_empty() {
        // Stray CRLFs between messages.
        while let [b'\r' | b'\n', rest @ ..] = data {
            data = rest;
            skipped += 1;
        }
        if data.is_empty() {
            return None;
        }
    }
    let start = buf.len().saturating_sub(3);
    buf.extend_from_slice(data);
    let end = start + find(&buf[start..], b"\r\n\r\n")? + 4;
    let extra = buf.len() - end;
    buf.truncate(end);
    Some(skipped + data.len() - extra)
}

#[derive(Default)]
enum ReqState {
    #[default]
    Head,
    Body(u64),
    Opaque,
}

#[derive(Default)]
struct RequestParser {
    state: ReqState,
    head: Vec<u8>,
}

impl RequestParser {
    fn feed(&mut self, mut data: &[u8]) -> Vec<RequestRecord> {
        let mut out = Vec::new();
        while !data.is_empty() {
            match self.state {
                ReqState::Opaque => break,
                ReqState::Body(left) => {
                    let k = (left.min(data.len() as u64)) as usize;
                    data = &data[k..];
                    let left = left - k as u64;
                    self.state = if left == 0 {
                        ReqState::Head
                    } else {
                        ReqState::Body(left)
                    };
                }
                ReqState::Head => {
                    let Some(used) = take_head(&mut self.head, data) else {
                        if self.head.len() > MAX_HEAD {
                            self.state = ReqState::Opaque;
                        }
                        break;
                    };
                    data = &data[used..];
                    let head = std::mem::take(&mut self.head);
                    let Some((first, headers)) = parse_head(&head) else {
                        self.state = ReqState::Opaque;
                        break;
                    };
                    out.push(RequestRecord {
                        method: first[0].clone(),
                        path: first[1].clone(),
                        range: header(&headers, "range").map(str::to_string),
                        user_agent: header(&headers, "user-agent").map(str::to_string),
                    });
                    let length = header(&headers, "content-length").and_then(|v| v.parse().ok());
                    self.state = if header(&headers, "transfer-encoding").is_some() {
                        ReqState::Opaque
                    } else {
                        match length {
                            Some(n) if n > 0 => ReqState::Body(n),
                            _ => ReqState::Head,
                        }
                    };
                }
            }
        }
        out
    }
}

#[derive(Default)]
enum RespState {
    #[default]
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd(u8),
    Trailers,
    UntilClose,
    Opaque,
}

/// How the body of the current response is treated.
#[derive(Default)]
enum Damage {
    #[default]
    None,
    /// Corrupt it if the rule still wants this path once the first byte to invert arrives.
    Candidate(String),
    Claimed,
}

#[derive(Default)]
struct ResponseFramer {
    state: RespState,
    head: Vec<u8>,
    line: Vec<u8>,
    damage: Damage,
    body_off: u64,
}

impl ResponseFramer {
    /// Follows the responses through `data` (the next bytes to the client) and inverts the bytes
    /// to corrupt in place.
    fn process(&mut self, data: &mut [u8], sh: &Shared, conn: &Conn) {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                RespState::Opaque => return,
                RespState::UntilClose => {
                    self.body(&mut data[i..], sh);
                    return;
                }
                RespState::Body(left) => {
                    let k = left.min((data.len() - i) as u64) as usize;
                    self.body(&mut data[i..i + k], sh);
                    i += k;
                    self.state = if left == k as u64 {
                        RespState::Head
                    } else {
                        RespState::Body(left - k as u64)
                    };
                }
                RespState::ChunkData(left) => {
                    let k = left.min((data.len() - i) as u64) as usize;
                    self.body(&mut data[i..i + k], sh);
                    i += k;
                    self.state = if left == k as u64 {
                        RespState::ChunkEnd(2)
                    } else {
                        RespState::ChunkData(left - k as u64)
                    };
                }
                RespState::ChunkEnd(left) => {
                    i += 1;
                    self.state = if left == 1 {
                        RespState::ChunkSize
                    } else {
                        RespState::ChunkEnd(left - 1)
                    };
                }
                RespState::ChunkSize | RespState::Trailers => {
                    let b = data[i];
                    i += 1;
                    if b != b'\n' {
                        self.line.push(b);
                        if self.line.len() > 4096 {
                            self.state = RespState::Opaque;
                        }
                        continue;
                    }
                    let line = String::from_utf8_lossy(&self.line).trim().to_string();
                    self.line.clear();
                    if matches!(self.state, RespState::Trailers) {
                        if line.is_empty() {
                            self.state = RespState::Head;
                        }
                        continue;
                    }
                    let size = line.split(';').next().unwrap_or("").trim();
                    self.state = match u64::from_str_radix(size, 16) {
                        Ok(0) => RespState::Trailers,
                        Ok(n) => RespState::ChunkData(n),
                        Err(_) => RespState::Opaque,
                    };
                }
                RespState::Head => {
                    let Some(used) = take_head(&mut self.head, &data[i..]) else {
                        if self.head.len() > MAX_HEAD {
                            self.state = RespState::Opaque;
                        }
                        return;
                    };
                    i += used;
                    let head = std::mem::take(&mut self.head);
                    self.begin(&head, sh, conn);
                }
            }
        }
    }

    /// A response's header block is complete: how its body is framed, whether to damage it.
    fn begin(&mut self, head: &[u8], sh: &Shared, conn: &Conn) {
        self.damage = Damage::None;
        self.body_off = 0;
        let Some((first, headers)) = parse_head(head) else {
            self.state = RespState::Opaque;
            return;
        };
        let status: u16 = first[1].parse().unwrap_or(0);
        if status == 101 {
            self.state = RespState::Opaque;
            return;
        }
        if (100..200).contains(&status) {
            self.state = RespState::Head; // an interim response; the request's is still to come
            return;
        }
        let (method, path) = lock(&conn.pending)
            .pop_front()
            .unwrap_or_else(|| ("GET".to_string(), String::new()));
        let chunked = header(&headers, "transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let length: Option<u64> = header(&headers, "content-length").and_then(|v| v.parse().ok());
        self.state = if method == "HEAD" || status == 204 || status == 304 {
            RespState::Head
        } else if chunked {
            RespState::ChunkSize
        } else {
            match length {
                Some(0) => RespState::Head,
                Some(n) => RespState::Body(n),
                None => RespState::UntilClose,
            }
        };
        if method == "GET"
            && (status == 200 || status == 206)
            && !matches!(self.state, RespState::Head)
            && lock(&sh.corrupt)
                .as_ref()
                .is_some_and(|r| r.times > 0 && path.contains(&r.path_contains))
        {
            self.damage = Damage::Candidate(path);
        }
    }

    /// Body bytes at `self.body_off`.
    fn body(&mut self, bytes: &mut [u8], sh: &Shared) {
        let start = self.body_off;
        self.body_off += bytes.len() as u64;
        if matches!(self.damage, Damage::None) {
            return;
        }
        let first = if start % CORRUPT_EVERY <= CORRUPT_OFFSET {
            start - start % CORRUPT_EVERY + CORRUPT_OFFSET
        } else {
            start - start % CORRUPT_EVERY + CORRUPT_EVERY + CORRUPT_OFFSET
        };
        let mut at = first;
        while at < self.body_off {
            if let Damage::Candidate(path) = &self.damage {
                let mut rule = lock(&sh.corrupt);
                match rule.as_mut() {
                    Some(r) if r.times > 0 && path.contains(&r.path_contains) => {
                        r.times -= 1;
                        sh.corrupted.fetch_add(1, Ordering::SeqCst);
                        self.damage = Damage::Claimed;
                    }
                    _ => {
                        self.damage = Damage::None;
                        return;
                    }
                }
            }
            bytes[(at - start) as usize] ^= 0xff;
            at += CORRUPT_EVERY;
        }
    }
}
