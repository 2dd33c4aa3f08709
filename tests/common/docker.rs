//! Looking at what the agent did in the real engine, through the `docker` CLI: a device's
//! containers, what the app in one of them serves (via its bridge IP — the test runs on the host),
//! images, logs; and cleaning up.
//!
//! Images are shared by every agent on the engine: an agent that prunes an image can take it away
//! from another test's agent. Tests that assert an image's ABSENCE take [`exclusive_images`]
//! first; every [`super::agent::TestAgent`] holds a shared claim ([`shared_images`]) for its
//! lifetime, so an exclusive test waits until no other agent of this test binary runs.
//!
//! The engine holds the sample sensor layers (images/build.sh builds them here), so an agent's
//! download of a sensor image transfers little. A test that needs a download in flight removes
//! the `ferry/bulk` images ([`evict_bulk`], under [`bulk_lock`], held across test processes) so
//! that the agent must fetch their 6 MiB data layer.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const DEVICE_LABEL: &str = "io.ferry.device";

/// One container, as `docker inspect` shows it.
#[derive(Clone, Debug)]
pub struct Container {
    pub id: String,
    /// Without the leading `/`.
    pub name: String,
    /// What it was created from: for Ferry's containers the image id (`sha256:<config digest>`;
    /// [`image_digests`] gives the manifest digests it was loaded by).
    pub image: String,
    /// The local image id.
    pub image_id: String,
    pub running: bool,
    /// created, running, restarting, exited, ...
    pub status: String,
    pub labels: BTreeMap<String, String>,
    /// Bridge IP, if any.
    pub ip: Option<String>,
    pub restart_policy: String,
    pub restart_count: u64,
}

impl Container {
    pub fn label(&self, k: &str) -> Option<&str> {
        self.labels.get(k).map(String::as_str)
    }
    /// `io.ferry.app`.
    pub fn app(&self) -> Option<&str> {
        self.label("io.ferry.app")
    }
    /// `io.ferry.version`.
    pub fn version(&self) -> Option<&str> {
        self.label("io.ferry.version")
    }
}

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run docker {args:?}: {e}"))
}

fn parse_container(v: &Value) -> Container {
    let s = |p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let labels = v
        .pointer("/Config/Labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default();
    let mut ip = Some(s("/NetworkSettings/IPAddress")).filter(|i| !i.is_empty());
    if ip.is_none() {
        if let Some(nets) = v
            .pointer("/NetworkSettings/Networks")
            .and_then(Value::as_object)
        {
            ip = nets
                .values()
                .filter_map(|n| n.get("IPAddress").and_then(Value::as_str))
                .find(|i| !i.is_empty())
                .map(str::to_string);
        }
    }
    Container {
        id: s("/Id"),
        name: s("/Name").trim_start_matches('/').to_string(),
        image: s("/Config/Image"),
        image_id: s("/Image"),
        running: v
            .pointer("/State/Running")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        status: s("/State/Status"),
        labels,
        ip,
        restart_policy: s("/HostConfig/RestartPolicy/Name"),
        restart_count: v
            .pointer("/RestartCount")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    }
}

/// `docker inspect` of one container; `None` when it does not exist.
pub fn inspect(name_or_id: &str) -> Option<Container> {
    let out = docker(&["container", "inspect", name_or_id]);
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v.as_array().and_then(|a| a.first()).map(parse_container)
}

/// Every container (running or not) labelled `io.ferry.device=<device>`, sorted by name.
pub fn containers(device: &str) -> Vec<Container> {
    let out = docker(&[
        "ps",
        "-aq",
        "--no-trunc",
        "--filter",
        &format!("label={DEVICE_LABEL}={device}"),
    ]);
    assert!(
        out.status.success(),
        "docker ps: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut v: Vec<Container> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|id| inspect(id.trim()))
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// The running containers of `device`.
pub fn running(device: &str) -> Vec<Container> {
    containers(device)
        .into_iter()
        .filter(|c| c.running)
        .collect()
}

/// Force-remove every container labelled with `device` (never anything else).
pub fn remove_device_containers(device: &str) {
    let out = docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label={DEVICE_LABEL}={device}"),
    ]);
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if ids.is_empty() {
        return;
    }
    let mut args = vec!["rm", "-f", "-v"];
    args.extend(ids.iter().map(String::as_str));
    let _ = docker(&args);
}

/// Is `reference` (`repo@sha256:...`, a tag or an id) present in the engine?
pub fn image_present(reference: &str) -> bool {
    docker(&["image", "inspect", reference]).status.success()
}

/// The manifest digests (`sha256:...`) an image was loaded by (the digest part of its
/// `RepoDigests`); empty when the image is missing.
pub fn image_digests(image: &str) -> Vec<String> {
    let out = docker(&[
        "image",
        "inspect",
        "-f",
        "{{range .RepoDigests}}{{println .}}{{end}}",
        image,
    ]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.rsplit_once('@').map(|(_, d)| d.to_string()))
        .collect()
}

/// Whether the engine holds an image loaded by manifest `digest` (under any name).
pub fn image_with_digest(digest: &str) -> bool {
    let out = docker(&["image", "ls", "--digests", "--format", "{{.Digest}}"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == digest)
}

/// Every local image (intermediate ones included): id -> its layers' diff ids, bottom first.
pub fn image_layers() -> BTreeMap<String, Vec<String>> {
    let out = docker(&["image", "ls", "-aq", "--no-trunc"]);
    let mut ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    ids.sort();
    ids.dedup();
    if ids.is_empty() {
        return BTreeMap::new();
    }
    let mut args = vec![
        "image",
        "inspect",
        "-f",
        "{{.Id}}{{range .RootFS.Layers}} {{.}}{{end}}",
    ];
    args.extend(ids.iter().map(String::as_str));
    // An image removed meanwhile fails the inspect of that one only; the others still print.
    let out = docker(&args);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let id = f.next()?.to_string();
            Some((id, f.map(str::to_string).collect()))
        })
        .collect()
}

/// The images (ids) that hold the layer `diff_id`.
pub fn images_with_layer(diff_id: &str) -> Vec<String> {
    image_layers()
        .into_iter()
        .filter(|(_, layers)| layers.iter().any(|l| l == diff_id))
        .map(|(id, _)| id)
        .collect()
}

/// Make the engine lack the layer `diff_id` (and so every layer above it in any image): every
/// image holding it is removed (`docker rmi -f`, by id: all its names). Returns the ids removed.
/// Panics when one cannot go (a container of it exists: the layer would stay).
pub fn evict_layer(diff_id: &str) -> Vec<String> {
    let ids = images_with_layer(diff_id);
    for id in &ids {
        let users = docker(&["ps", "-aq", "--filter", &format!("ancestor={id}")]);
        let users = String::from_utf8_lossy(&users.stdout).trim().to_string();
        assert!(
            users.is_empty(),
            "cannot evict layer {diff_id}: image {id} is used by container(s) {users}"
        );
    }
    // A build's intermediate image cannot go before its children: remove in rounds, children
    // first as they come (an intermediate parent is removed with its last child anyway).
    let mut left = ids.clone();
    while !left.is_empty() {
        let mut refused = Vec::new();
        let mut errors = Vec::new();
        for id in &left {
            let out = docker(&["rmi", "-f", id]);
            let err = String::from_utf8_lossy(&out.stderr).to_string();
            if out.status.success() || err.contains("No such image") {
                continue;
            }
            if err.contains("dependent child images") {
                refused.push(id.clone());
            } else {
                errors.push(format!("docker rmi -f {id}: {}", err.trim()));
            }
        }
        assert!(errors.is_empty(), "{}", errors.join("\n"));
        assert!(
            refused.len() < left.len(),
            "images {refused:?} keep dependent child images"
        );
        left = refused;
    }
    let held = images_with_layer(diff_id);
    assert!(
        held.is_empty(),
        "layer {diff_id} is still held by {held:?} after removing {ids:?}"
    );
    ids
}

/// The `ferry/bulk` images in the engine belong to the holder of this lock: one holder at a time
/// across every test process on the machine (an `flock` on a file in the temp dir) and every
/// thread. Take it before removing them ([`evict_bulk`]) and hold it while the test relies on
/// their absence (a download that must fetch the data layer). Released on drop.
pub struct BulkLock {
    _file: std::fs::File,
}

/// Wait for [`BulkLock`].
pub fn bulk_lock() -> BulkLock {
    use std::os::unix::io::AsRawFd;
    let path = std::env::temp_dir().join("ferry-test-bulk-images.lock");
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    loop {
        // SAFETY: flock(2) on a descriptor this function owns.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if r == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::Interrupted,
            "flock {}: {e}",
            path.display()
        );
    }
    BulkLock { _file: file }
}

/// With the [`BulkLock`]: remove every image holding the bulk data layer (every bulk image, of
/// any version, platform or earlier build), so that the next download of a bulk image fetches
/// its data layer (6 MiB) and the layers above it: long enough to act while it is in flight.
/// Returns the ids removed.
pub fn evict_bulk(_lock: &BulkLock) -> Vec<String> {
    let (_, _, diff_id) = super::infra::bulk_data_layer();
    evict_layer(&diff_id)
}

/// The container's log (stdout and stderr), or an error text.
pub fn logs(name: &str) -> String {
    let out = docker(&["logs", "--tail", "200", name]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `GET path` on the container's bridge IP, port 8080: `(status, body)`.
pub fn http_get(container: &str, path: &str) -> Result<(u16, String), String> {
    http_get_port(container, 8080, path)
}

/// `GET path` on the container's bridge IP and `port`.
pub fn http_get_port(container: &str, port: u16, path: &str) -> Result<(u16, String), String> {
    let c = inspect(container).ok_or_else(|| format!("no container {container}"))?;
    if !c.running {
        return Err(format!("{container} is {}", c.status));
    }
    let ip =
        c.ip.ok_or_else(|| format!("{container} has no bridge IP"))?;
    let addr: SocketAddr = format!("{ip}:{port}")
        .parse()
        .map_err(|e| format!("{ip}:{port}: {e}"))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write {addr}: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("read {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP response from {addr}: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line from {addr}: {head:?}"))?;
    Ok((status, body.to_string()))
}

/// Poll [`http_get`] until the container answers (any status), for at most `timeout`.
pub fn wait_http(container: &str, path: &str, timeout: Duration) -> (u16, String) {
    let deadline = Instant::now() + timeout;
    loop {
        match http_get(container, path) {
            Ok(r) => return r,
            Err(e) if Instant::now() > deadline => {
                panic!("{container} did not answer GET {path} within {timeout:?}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// `GET /` of the sample app parsed as JSON (waits up to `timeout` for an answer).
pub fn readings(container: &str, timeout: Duration) -> Value {
    let (status, body) = wait_http(container, "/", timeout);
    assert_eq!(status, 200, "GET / on {container}: {status} {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET / on {container}: {e}: {body}"))
}

// ----- image claims -----------------------------------------------------------------------------

struct Claims {
    state: Mutex<ClaimState>,
    cv: Condvar,
}

#[derive(Default)]
struct ClaimState {
    shared: usize,
    exclusive: bool,
    waiting_exclusive: usize,
}

static CLAIMS: Claims = Claims {
    state: Mutex::new(ClaimState {
        shared: 0,
        exclusive: false,
        waiting_exclusive: 0,
    }),
    cv: Condvar::new(),
};

thread_local! {
    static MY_SHARED: Cell<usize> = const { Cell::new(0) };
    static MY_EXCLUSIVE: Cell<bool> = const { Cell::new(false) };
}

/// A shared claim on the engine's images (see the module docs). Cheap; nests.
pub struct SharedImages {
    counted: bool,
}

/// The only claim on the engine's images in this test binary while it lives.
pub struct ExclusiveImages {
    _private: (),
}

/// Take a shared claim. Within a thread holding [`exclusive_images`], or already holding a shared
/// claim, it never blocks.
pub fn shared_images() -> SharedImages {
    if MY_EXCLUSIVE.with(Cell::get) {
        return SharedImages { counted: false };
    }
    let mut s = CLAIMS.state.lock().unwrap_or_else(|e| e.into_inner());
    if MY_SHARED.with(Cell::get) == 0 {
        while s.exclusive || s.waiting_exclusive > 0 {
            s = CLAIMS.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
    s.shared += 1;
    MY_SHARED.with(|c| c.set(c.get() + 1));
    SharedImages { counted: true }
}

/// Wait until no other agent of this test binary runs, and keep it so until dropped. Take it
/// before starting the test's own agent.
pub fn exclusive_images() -> ExclusiveImages {
    assert_eq!(
        MY_SHARED.with(Cell::get),
        0,
        "take exclusive_images() before starting an agent"
    );
    let mut s = CLAIMS.state.lock().unwrap_or_else(|e| e.into_inner());
    s.waiting_exclusive += 1;
    while s.exclusive || s.shared > 0 {
        s = CLAIMS.cv.wait(s).unwrap_or_else(|e| e.into_inner());
    }
    s.waiting_exclusive -= 1;
    s.exclusive = true;
    MY_EXCLUSIVE.with(|c| c.set(true));
    ExclusiveImages { _private: () }
}

impl Drop for SharedImages {
    fn drop(&mut self) {
        if !self.counted {
            return;
        }
        let mut s = CLAIMS.state.lock().unwrap_or_else(|e| e.into_inner());
        s.shared -= 1;
        MY_SHARED.with(|c| c.set(c.get().saturating_sub(1)));
        CLAIMS.cv.notify_all();
    }
}

impl Drop for ExclusiveImages {
    fn drop(&mut self) {
        let mut s = CLAIMS.state.lock().unwrap_or_else(|e| e.into_inner());
        s.exclusive = false;
        MY_EXCLUSIVE.with(|c| c.set(false));
        CLAIMS.cv.notify_all();
    }
}
