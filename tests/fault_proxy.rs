//! The fault-injecting proxy of the test harness (`tests/common/faultproxy.rs`) checked against
//! a small HTTP/1.1 server of this file's own (keep-alive, `Content-Length` and chunked bodies,
//! `Range: bytes=N-` answered with 206): the rate it holds, where it cuts, that a stall holds
//! both ways and resumes, that dark refuses and comes back on the same port, that corruption
//! hits exactly the bodies asked for, what it records, and that dropping it closes everything.
//! Only the last test needs the test infrastructure (the sample registry); the whole file runs in
//! about 5 s.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::faultproxy::{CorruptRule, FaultProxy, CORRUPT_OFFSET};

const BODY_LEN: usize = 2 * 1024 * 1024;
const CHUNKED_LEN: usize = 100_000;
const UA: &str = "fault-proxy-test/1";

/// The upstream's blob: 2 MiB of deterministic pseudo-random bytes.
fn blob() -> &'static [u8] {
    static BLOB: OnceLock<Vec<u8>> = OnceLock::new();
    BLOB.get_or_init(|| {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..BODY_LEN)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    })
}

// ----- the upstream ------------------------------------------------------------------------------

/// `GET|HEAD /blob/<any>`: the blob (200, or 206 from `Range: bytes=N-`); `/chunked/<any>`: its
/// first 100,000 bytes, chunked; anything else 404. Keep-alive; one thread per connection.
struct Upstream {
    addr: String,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the upstream");
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    std::thread::spawn(move || {
                        let _ = serve_http(conn);
                    });
                }
            }
        });
        Upstream { addr, stop }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr); // wakes the accept loop
    }
}

fn serve_http(stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
        let (method, path) = (words[0].as_str(), words[1].as_str());
        let mut range = None;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            if h.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.trim().eq_ignore_ascii_case("range") {
                    range = Some(v.trim().to_string());
                }
            }
        }
        let with_body = method == "GET";
        if path.starts_with("/blob/") {
            let from = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|n| *n < BODY_LEN);
            let head = match from {
                Some(n) => format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Type: application/octet-stream\r\n\
                     Content-Range: bytes {n}-{}/{BODY_LEN}\r\nContent-Length: {}\r\n\r\n",
                    BODY_LEN - 1,
                    BODY_LEN - n
                ),
                None => format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                     Content-Length: {BODY_LEN}\r\n\r\n"
                ),
            };
            out.write_all(head.as_bytes())?;
            if with_body {
                out.write_all(&blob()[from.unwrap_or(0)..])?;
            }
        } else if path.starts_with("/chunked/") {
            out.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")?;
            if with_body {
                for chunk in blob()[..CHUNKED_LEN].chunks(7000) {
                    out.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())?;
                    out.write_all(chunk)?;
                    out.write_all(b"\r\n")?;
                }
                out.write_all(b"0\r\n\r\n")?;
            }
        } else {
            out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found")?;
        }
        out.flush()?;
    }
}

// ----- a client ----------------------------------------------------------------------------------

#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Bytes of the status line and headers.
    head_len: usize,
    /// The whole body arrived.
    complete: bool,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn request_text(method: &str, path: &str, extra: &[(&str, &str)]) -> String {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: upstream\r\nUser-Agent: {UA}\r\n");
    for (k, v) in extra {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r
}

/// Reads one response (to a `method` request). An early end of the stream gives a response
/// with `complete` false; a read timeout is an error.
fn read_response(r: &mut impl BufRead, method: &str) -> std::io::Result<Response> {
    let mut head_len = 0;
    let mut line = String::new();
    head_len += r.read_line(&mut line)?;
    if line.is_empty() {
        return Err(ErrorKind::UnexpectedEof.into());
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        let n = r.read_line(&mut h)?;
        head_len += n;
        if n == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut resp = Response {
        status,
        headers,
        body: Vec::new(),
        head_len,
        complete: true,
    };
    if method == "HEAD" {
        return Ok(resp);
    }
    if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim(), 16).map_err(|_| ErrorKind::InvalidData)?;
            if n == 0 {
                let mut end = String::new();
                r.read_line(&mut end)?;
                return Ok(resp);
            }
            let mut data = vec![0u8; n + 2];
            r.read_exact(&mut data)?;
            resp.body.extend_from_slice(&data[..n]);
        }
    }
    let len: usize = resp
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .expect("a Content-Length");
    r.take(len as u64).read_to_end(&mut resp.body)?;
    resp.complete = resp.body.len() == len;
    Ok(resp)
}

/// One request on a new connection through `proxy`.
fn get(proxy: &FaultProxy, path: &str, extra: &[(&str, &str)]) -> Response {
    let mut s = TcpStream::connect(proxy.addr()).expect("connect to the proxy");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request_text("GET", path, extra).as_bytes())
        .unwrap();
    read_response(&mut BufReader::new(s), "GET")
        .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", proxy.describe()))
}

/// Reads into `sink` until the first read timeout (the stream must have one), the end, or more
/// than `limit` bytes; how many bytes, and whether it timed out.
fn drain_until_quiet(s: &mut TcpStream, limit: usize, sink: &mut Vec<u8>) -> (usize, bool) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (total, false),
            Ok(n) => {
                sink.extend_from_slice(&buf[..n]);
                total += n;
                if total > limit {
                    return (total, false);
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return (total, true)
            }
            Err(_) => return (total, false),
        }
    }
}

// ----- the tests ---------------------------------------------------------------------------------

#[test]
fn throttle_holds_one_rate_for_all_connections() {
    const RATE: u64 = 200 * 1024;
    let upstream = Upstream::start();
    let proxy = Arc::new(FaultProxy::start(&upstream.addr));
    proxy.throttle(Some(RATE));
    let received: Vec<Arc<AtomicU64>> = (0..2).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let clients: Vec<_> = received
        .iter()
        .enumerate()
        .map(|(i, got)| {
            let (proxy, got) = (proxy.clone(), got.clone());
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(proxy.addr()).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(request_text("GET", &format!("/blob/{i}"), &[]).as_bytes())
                    .unwrap();
                let mut all = Vec::new();
                let mut buf = vec![0u8; 8192];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => panic!("client {i}: the body ended early"),
                        Ok(n) => {
                            all.extend_from_slice(&buf[..n]);
                            got.fetch_add(n as u64, Ordering::SeqCst);
                            let head = all.windows(4).position(|w| w == b"\r\n\r\n");
                            if head.is_some_and(|h| all.len() >= h + 4 + BODY_LEN) {
                                break;
                            }
                        }
                        Err(e) => panic!("client {i}: {e}"),
                    }
                }
                all
            })
        })
        .collect();
    // Past the connects and the first burst, then three seconds of steady state.
    std::thread::sleep(Duration::from_millis(500));
    let (b0, t0) = (proxy.bytes_down(), Instant::now());
    let c0: Vec<u64> = received.iter().map(|r| r.load(Ordering::SeqCst)).collect();
    std::thread::sleep(Duration::from_secs(3));
    let (b1, t1) = (proxy.bytes_down(), Instant::now());
    let c1: Vec<u64> = received.iter().map(|r| r.load(Ordering::SeqCst)).collect();
    let rate = (b1 - b0) as f64 / (t1 - t0).as_secs_f64();
    eprintln!(
        "throttled to {RATE} B/s: {rate:.0} B/s through the proxy; per client {:?} bytes",
        c1.iter().zip(&c0).map(|(a, b)| a - b).collect::<Vec<_>>()
    );
    assert!(
        (rate - RATE as f64).abs() <= RATE as f64 * 0.1,
        "rate {rate:.0} B/s is not within 10% of {RATE}\n{}",
        proxy.describe()
    );
    let client_rate =
        (c1.iter().sum::<u64>() - c0.iter().sum::<u64>()) as f64 / (t1 - t0).as_secs_f64();
    assert!(
        (client_rate - RATE as f64).abs() <= RATE as f64 * 0.15,
        "the clients received {client_rate:.0} B/s, throttled to {RATE}"
    );
    for (i, (a, b)) in c1.iter().zip(&c0).enumerate() {
        assert!(
            a - b > RATE / 4,
            "client {i} got only {} bytes in 3 s: the link is not shared",
            a - b
        );
    }
    // Unthrottled, the rest (about 3.4 MiB) arrives at once.
    let t = Instant::now();
    proxy.throttle(None);
    for c in clients {
        let all = c.join().unwrap();
        assert!(all.ends_with(blob()), "a body arrived damaged");
    }
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "unthrottled, the rest took {:?}",
        t.elapsed()
    );
}

#[test]
fn cut_after_closes_every_connection_after_n_bytes_and_ranges_resume() {
    const CUT: u64 = 300_000;
    let upstream = Upstream::start();
    let proxy = FaultProxy::start(&upstream.addr);
    proxy.cut_after(Some(CUT));

    let first = get(&proxy, "/blob/a", &[]);
    assert_eq!(first.status, 200);
    assert!(!first.complete, "the body should have been cut");
    assert_eq!((first.head_len + first.body.len()) as u64, CUT);
    assert_eq!(proxy.bytes_down(), CUT);
    assert_eq!((proxy.connections(), proxy.cuts()), (1, 1));

    // Resume with ranges until the body is complete: each connection carries CUT bytes.
    let mut carried_total = CUT;
    let mut body = first.body;
    let mut attempts = 1;
    while body.len() < BODY_LEN {
        let range = format!("bytes={}-", body.len());
        let r = get(&proxy, "/blob/a", &[("Range", &range)]);
        attempts += 1;
        assert_eq!(r.status, 206, "{range}");
        let carried = (r.head_len + r.body.len()) as u64;
        carried_total += carried;
        if r.complete {
            assert!(carried <= CUT);
        } else {
            assert_eq!(carried, CUT, "{range}: not cut at {CUT}");
        }
        body.extend_from_slice(&r.body);
        assert!(attempts < 20, "no progress\n{}", proxy.describe());
    }
    assert!(body == blob(), "the resumed body differs from the original");
    assert_eq!(proxy.connections(), attempts);
    assert_eq!(proxy.cuts(), attempts - 1, "{}", proxy.describe());
    assert_eq!(
        proxy.bytes_down(),
        carried_total,
        "bytes down, against what the client received"
    );

    // What the proxy recorded: every request, with its Range and User-Agent.
    let reqs = proxy.requests();
    assert_eq!(reqs.len() as u64, attempts);
    assert_eq!(reqs[0].method, "GET");
    assert_eq!(reqs[0].path, "/blob/a");
    assert_eq!(reqs[0].range, None);
    assert_eq!(reqs[0].user_agent.as_deref(), Some(UA));
    assert_eq!(
        reqs[1].range,
        Some(format!("bytes={}-", CUT as usize - first.head_len))
    );
    assert!(reqs[1..].iter().all(|r| r.range.is_some()));

    // Switched off at runtime; counters reset.
    proxy.cut_after(None);
    proxy.reset_counters();
    let whole = get(&proxy, "/blob/a", &[]);
    assert!(whole.complete && whole.body == blob());
    assert_eq!(proxy.cuts(), 0);
    assert_eq!(proxy.connections(), 1);
    assert_eq!(proxy.requests().len(), 1);
    assert_eq!(proxy.bytes_down(), (whole.head_len + BODY_LEN) as u64);
}

#[test]
fn stall_holds_old_and_new_connections_both_ways_then_resumes() {
    let upstream = Upstream::start();
    let proxy = FaultProxy::start(&upstream.addr);
    // Throttled so that the proxy cannot run ahead of the client into the socket buffers.
    proxy.throttle(Some(1024 * 1024));

    // A connection in the middle of a body.
    let mut old = TcpStream::connect(proxy.addr()).unwrap();
    old.write_all(request_text("GET", "/blob/old", &[]).as_bytes())
        .unwrap();
    let mut got = vec![0u8; 100_000];
    old.read_exact(&mut got).unwrap();
    proxy.stall(true);
    old.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let (drained, quiet) = drain_until_quiet(&mut old, 256 * 1024, &mut got);
    assert!(
        quiet && drained <= 64 * 1024,
        "stalled, the old connection still delivered {drained} bytes (timed out: {quiet})"
    );
    // And it stays quiet.
    let (more, quiet) = drain_until_quiet(&mut old, 0, &mut got);
    assert!(quiet && more == 0, "stalled, {more} more bytes arrived");

    // A new connection is accepted, but its request goes nowhere.
    let mut new = TcpStream::connect(proxy.addr()).expect("stalled, connects are accepted");
    new.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    new.write_all(request_text("GET", "/chunked/new", &[]).as_bytes())
        .unwrap();
    let (n, quiet) = drain_until_quiet(&mut new, 0, &mut Vec::new());
    assert!(quiet && n == 0, "stalled, a new connection got {n} bytes");
    assert!(
        !proxy.requests().iter().any(|r| r.path == "/chunked/new"),
        "stalled, the new request went upstream: {}",
        proxy.describe()
    );

    // Both continue where they were.
    proxy.stall(false);
    proxy.throttle(None);
    new.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = read_response(&mut BufReader::new(new), "GET").unwrap();
    assert!(r.status == 200 && r.body == blob()[..CHUNKED_LEN]);
    old.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let missing = head_end + BODY_LEN - got.len();
    let mut rest = Vec::new();
    old.take(missing as u64).read_to_end(&mut rest).unwrap();
    got.extend_from_slice(&rest);
    assert!(
        got.ends_with(blob()),
        "the stalled body did not resume intact"
    );
}

#[test]
fn dark_refuses_and_drops_then_listens_on_the_same_port() {
    let upstream = Upstream::start();
    let proxy = FaultProxy::start(&upstream.addr);
    let port = proxy.port();
    assert!(get(&proxy, "/blob/a", &[]).complete);

    // One connection in the middle of a body (throttled, so it is still going).
    proxy.throttle(Some(512 * 1024));
    let mut open = TcpStream::connect(proxy.addr()).unwrap();
    open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    open.write_all(request_text("GET", "/blob/open", &[]).as_bytes())
        .unwrap();
    let mut some = vec![0u8; 50_000];
    open.read_exact(&mut some).unwrap();

    proxy.dark(true);
    let err = TcpStream::connect(proxy.addr()).expect_err("dark, a connect must be refused");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    let t = Instant::now();
    let mut rest = Vec::new();
    let _ = open.read_to_end(&mut rest); // EOF (or a reset) once dropped
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "dark, the open connection was not dropped ({:?})",
        t.elapsed()
    );
    assert!(
        some.len() + rest.len() < 200_000 + BODY_LEN / 2,
        "the open connection delivered its body although the proxy went dark"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        TcpStream::connect(proxy.addr())
            .expect_err("still dark")
            .kind(),
        ErrorKind::ConnectionRefused
    );

    proxy.dark(false);
    proxy.throttle(None);
    assert_eq!(proxy.port(), port);
    let r = get(&proxy, "/blob/again", &[]);
    assert!(
        r.complete && r.body == blob(),
        "after dark, port {port} serves again"
    );
}

#[test]
fn corrupt_damages_only_the_matching_bodies_and_only_times_times() {
    let upstream = Upstream::start();
    let proxy = FaultProxy::start(&upstream.addr);
    proxy.corrupt(Some(CorruptRule {
        path_contains: "/blob/b".into(),
        times: 2,
    }));
    // Everything pipelined on one keep-alive connection, in one write.
    type Req<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>);
    let requests: Vec<Req> = vec![
        ("GET", "/chunked/b", vec![]),
        ("HEAD", "/blob/b", vec![]),
        ("GET", "/blob/a", vec![]),
        ("GET", "/blob/b", vec![]),
        ("GET", "/blob/b", vec![("Range", "bytes=1048576-")]),
        ("GET", "/blob/b", vec![]),
        ("GET", "/nothing/blob/b", vec![]),
    ];
    let mut s = TcpStream::connect(proxy.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let all: String = requests
        .iter()
        .map(|(m, p, h)| request_text(m, p, h))
        .collect();
    s.write_all(all.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut read = |method: &str| read_response(&mut r, method).unwrap();

    let chunked = read("GET");
    assert!(
        chunked.body == blob()[..CHUNKED_LEN],
        "a body of another path was touched"
    );
    let head = read("HEAD");
    assert_eq!(head.header("content-length"), Some("2097152"));
    let a = read("GET");
    assert!(a.complete && a.body == blob(), "/blob/a was touched");

    let count_diff = |x: &[u8], y: &[u8]| x.iter().zip(y).filter(|(p, q)| p != q).count();
    let b1 = read("GET");
    assert_eq!(b1.header("content-length"), Some("2097152"));
    assert!(b1.complete, "a corrupted body keeps its length");
    assert_eq!(
        count_diff(&b1.body, blob()),
        BODY_LEN / 4096,
        "one byte in every 4 KiB"
    );
    assert_ne!(
        b1.body[CORRUPT_OFFSET as usize],
        blob()[CORRUPT_OFFSET as usize]
    );
    assert_eq!(
        b1.body[..CORRUPT_OFFSET as usize],
        blob()[..CORRUPT_OFFSET as usize]
    );
    let b2 = read("GET");
    assert_eq!(b2.status, 206);
    assert!(b2.complete);
    assert_eq!(count_diff(&b2.body, &blob()[1048576..]), 1048576 / 4096);
    let b3 = read("GET");
    assert!(
        b3.complete && b3.body == blob(),
        "corrupted more than `times` times"
    );
    let nothing = read("GET");
    assert_eq!(nothing.status, 404);
    assert_eq!(proxy.corrupted(), 2);

    // A chunked body is corrupted in its data (not its framing), and the connection goes on.
    proxy.corrupt(Some(CorruptRule {
        path_contains: "/chunked/".into(),
        times: 1,
    }));
    let mut s = r.into_inner();
    s.write_all(
        [
            request_text("GET", "/chunked/c", &[]),
            request_text("GET", "/blob/a", &[]),
        ]
        .concat()
        .as_bytes(),
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let c = read_response(&mut r, "GET").unwrap();
    assert_eq!(c.body.len(), CHUNKED_LEN);
    assert_eq!(
        count_diff(&c.body, &blob()[..CHUNKED_LEN]),
        (0..CHUNKED_LEN as u64)
            .filter(|o| o % 4096 == CORRUPT_OFFSET)
            .count()
    );
    let a = read_response(&mut r, "GET").unwrap();
    assert!(a.complete && a.body == blob());
    assert_eq!(proxy.corrupted(), 3);
    let paths: Vec<String> = proxy
        .requests()
        .iter()
        .map(|q| format!("{} {}", q.method, q.path))
        .collect();
    assert_eq!(paths.len(), requests.len() + 2, "{paths:?}");
    assert_eq!(paths[1], "HEAD /blob/b");
}

#[test]
fn drop_closes_the_listener_and_every_connection() {
    let upstream = Upstream::start();
    let proxy = FaultProxy::start(&upstream.addr);
    let addr = proxy.addr();
    proxy.stall(true);
    let mut held = TcpStream::connect(addr).unwrap();
    held.write_all(request_text("GET", "/blob/held", &[]).as_bytes())
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    drop(proxy);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "dropping a stalled proxy took {:?}",
        t.elapsed()
    );
    held.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 64];
    match held.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("{n} bytes from a dropped proxy"),
        Err(e) => assert!(
            !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "the connection outlived the proxy"
        ),
    }
    assert_eq!(
        TcpStream::connect(addr).expect_err("no listener").kind(),
        ErrorKind::ConnectionRefused
    );
}

/// Against the real sample registry (the one place this file needs the test infrastructure):
/// the download-test images as the harness reads them, through the proxy; a corrupted layer
/// refused by ferry-registry's digest check and fetched intact the next time; the 6 MiB data
/// layer fetched through a link cut every 300 KiB by resuming with `Range`, byte for byte.
#[test]
fn the_sample_registry_through_the_proxy() {
    use common::infra::{self, bulk_digest, image_blobs, ARM64};
    use sha2::{Digest, Sha256};

    infra::require_infra();
    let proxy = FaultProxy::registry();
    let repo = proxy.repo(infra::BULK_REPO);
    assert_eq!(repo, format!("127.0.0.1:{}/ferry/bulk", proxy.port()));
    let old = image_blobs(&repo, &bulk_digest("1.0.0", ARM64));
    let new = image_blobs(&repo, &bulk_digest("2.0.0", ARM64));
    assert_eq!(
        new,
        image_blobs(&infra::bulk_image(), &bulk_digest("2.0.0", ARM64))
    );
    assert_eq!(new.layers.len(), 5, "{new:?}");
    assert_eq!(
        old.layers[..4],
        new.layers[..4],
        "1.0.0 and 2.0.0 share all but the top layer"
    );
    assert_ne!(old.layers[4].0, new.layers[4].0);
    let data = new.layers[2].clone();
    assert!(data.1 >= 6 * 1024 * 1024, "data layer {data:?}");
    assert_eq!(new.bytes_not_in(&old), new.config.1 + new.layers[4].1);
    assert_eq!(
        new.shared_with(&old),
        new.layers[..4].to_vec(),
        "shared: the four lower layers"
    );
    assert_eq!(
        new.compressed_size(),
        new.config.1 + new.layers.iter().map(|l| l.1).sum::<u64>()
    );

    // A corrupted top layer is refused once, then fetched intact.
    let top = new.layers[4].clone();
    proxy.reset_counters();
    proxy.corrupt(Some(CorruptRule {
        path_contains: top.0.clone(),
        times: 1,
    }));
    let client = ferry_registry::RegistryClient::new(vec![], vec![]);
    let err = client
        .fetch_blob(&repo, &top.0, 1 << 20)
        .expect_err("the corrupted layer must be refused");
    assert!(
        matches!(err, ferry_registry::RegistryError::DigestMismatch { .. }),
        "{err}"
    );
    let blob = client.fetch_blob(&repo, &top.0, 1 << 20).unwrap();
    assert_eq!(blob.len() as u64, top.1);
    assert_eq!(proxy.corrupted(), 1);
    let reqs = proxy.requests();
    assert_eq!(reqs.len(), 2, "{}", proxy.describe());
    assert!(reqs.iter().all(|r| r.method == "GET"
        && r.path == format!("/v2/ferry/bulk/blobs/{}", top.0)
        && r.user_agent
            .as_deref()
            .is_some_and(|ua| ua.starts_with("ferry-registry/"))));

    // The data layer through a link that drops every 300 KiB, resumed with Range.
    const CUT: u64 = 300 * 1024;
    proxy.corrupt(None);
    proxy.reset_counters();
    proxy.cut_after(Some(CUT));
    let path = format!("/v2/ferry/bulk/blobs/{}", data.0);
    let mut body = Vec::new();
    let mut carried = 0;
    while (body.len() as u64) < data.1 {
        let range = format!("bytes={}-", body.len());
        let r = get(&proxy, &path, &[("Range", &range)]);
        assert_eq!(r.status, 206, "{range}: {:?}", r.headers);
        carried += (r.head_len + r.body.len()) as u64;
        body.extend_from_slice(&r.body);
        assert!(proxy.connections() < 40, "{}", proxy.describe());
    }
    assert_eq!(format!("sha256:{:x}", Sha256::digest(&body)), data.0);
    assert_eq!(proxy.bytes_down(), carried);
    assert_eq!(proxy.cuts() + 1, proxy.connections());
    assert!(proxy.connections() >= data.1 / CUT);
    eprintln!(
        "data layer {} ({} bytes) in {} connections, {} bytes carried",
        data.0,
        data.1,
        proxy.connections(),
        carried
    );
}
