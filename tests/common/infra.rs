//! The shared test infrastructure: dockerd, the sample-image registry, mosquitto, qemu.
//!
//! - [`registry`]: `FERRY_REGISTRY` or `127.0.0.1:5055`.
//! - [`digest`] / [`platforms`]: the per-platform manifest digests of the sample images, read from
//!   the file named by `FERRY_IMAGES_FILE` (lines `sensor <version> <platform> <digest>`, as
//!   printed by `images/build.sh`), or else by running `images/build.sh <registry>` once per test
//!   binary. Never hard-code digests: they change whenever the images are rebuilt.
//! - [`bulk_image`] / [`bulk_digest`] / [`bulk_platforms`] / [`bulk_reference`]: the same for the
//!   download-test image `ferry/bulk` (1.0.0, 2.0.0: the sensor app of that version on top of a
//!   6 MiB incompressible data layer both versions share, plus a 512 KiB layer of each version's
//!   own; lines `bulk <version> <platform> <digest>`). [`app_digest`] / [`app_platforms`] for
//!   either by name.
//! - [`image_blobs`]: the manifest, config and layers (digest, size) of an image as the registry
//!   serves them ([`ImageBlobs::compressed_size`]: config + layers, what a download of the whole
//!   image carries; [`ImageBlobs::bytes_not_in`]: what an update from another image must fetch).
//! - [`require_infra`]: panics with a clear message when a component is missing. Tests never skip.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// The sample image's repository, without the registry.
pub const SENSOR_REPO: &str = "ferry/sensor";
/// The download-test image's repository, without the registry (see `images/bulk/Dockerfile`).
pub const BULK_REPO: &str = "ferry/bulk";
/// The platforms the sample images are built for.
pub const ARM64: &str = "linux/arm64";
pub const ARMV7: &str = "linux/arm/v7";

/// The workspace root (the agent package's manifest dir).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `host:port` of the registry holding the sample images.
pub fn registry() -> String {
    std::env::var("FERRY_REGISTRY")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "127.0.0.1:5055".to_string())
}

/// `<registry>/ferry/sensor`: the `image` of the sample releases.
pub fn sensor_image() -> String {
    format!("{}/{SENSOR_REPO}", registry())
}

/// `<registry>/ferry/bulk`: the image of the download-test releases.
pub fn bulk_image() -> String {
    format!("{}/{BULK_REPO}", registry())
}

/// The per-platform digests of every sample image (index digests are left out).
pub struct Images {
    /// `(version, platform) -> digest` of the `sensor` images.
    pub digests: BTreeMap<(String, String), String>,
    /// `(app, version, platform) -> digest` of every image (`sensor`, `bulk`).
    pub apps: BTreeMap<(String, String, String), String>,
    /// Where they were read from (for messages).
    pub source: String,
}

impl Images {
    fn from_text(text: &str, source: String) -> Images {
        Images {
            digests: parse_images(text),
            apps: parse_app_images(text),
            source,
        }
    }
}

/// Parse the output of `images/build.sh`: the `sensor` images' `(version, platform) -> digest`.
pub fn parse_images(text: &str) -> BTreeMap<(String, String), String> {
    parse_app_images(text)
        .into_iter()
        .filter(|((app, _, _), _)| app == "sensor")
        .map(|((_, v, p), d)| ((v, p), d))
        .collect()
}

/// Parse the output of `images/build.sh`: every image's `(app, version, platform) -> digest`
/// (lines `<app> <version> <platform> <digest>`; `index` lines are left out).
pub fn parse_app_images(text: &str) -> BTreeMap<(String, String, String), String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() == 4
            && matches!(f[0], "sensor" | "bulk")
            && f[2] != "index"
            && f[3].starts_with("sha256:")
        {
            out.insert(
                (f[0].to_string(), f[1].to_string(), f[2].to_string()),
                f[3].to_string(),
            );
        }
    }
    out
}

/// The sample-image digests (loaded once per test binary).
pub fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        if let Some(file) = std::env::var_os("FERRY_IMAGES_FILE").filter(|f| !f.is_empty()) {
            let path = PathBuf::from(&file);
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let images = Images::from_text(&text, path.display().to_string());
                    assert!(
                        !images.digests.is_empty(),
                        "FERRY_IMAGES_FILE={} holds no `sensor <version> <platform> <digest>` line",
                        path.display()
                    );
                    if images.apps.keys().any(|(app, _, _)| app == "bulk") {
                        return images;
                    }
                    eprintln!(
                        "FERRY_IMAGES_FILE={} has no `bulk` lines (written by an older \
                         images/build.sh?); running images/build.sh instead",
                        path.display()
                    );
                }
                Err(e) => eprintln!(
                    "FERRY_IMAGES_FILE={}: {e}; running images/build.sh instead",
                    path.display()
                ),
            }
        }
        let reg = registry();
        let script = root().join("images/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg(&reg)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} {reg} failed ({}):\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let images = Images::from_text(
            &String::from_utf8_lossy(&out.stdout),
            format!("images/build.sh {reg}"),
        );
        assert!(
            !images.digests.is_empty(),
            "images/build.sh printed no digests:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        images
    })
}

/// The manifest digest of sample image `app` (`sensor`, `bulk`) `version` for `platform`.
pub fn app_digest(app: &str, version: &str, platform: &str) -> String {
    let imgs = images();
    imgs.apps
        .get(&(app.to_string(), version.to_string(), platform.to_string()))
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no sample image {app} {version} for {platform} in {} (have: {:?})",
                imgs.source,
                imgs.apps.keys().collect::<Vec<_>>()
            )
        })
}

/// `platform -> digest` of sample image `app` `version` (every platform it was built for).
pub fn app_platforms(app: &str, version: &str) -> BTreeMap<String, String> {
    let p: BTreeMap<String, String> = images()
        .apps
        .iter()
        .filter(|((a, v, _), _)| a == app && v == version)
        .map(|((_, _, p), d)| (p.clone(), d.clone()))
        .collect();
    assert!(
        !p.is_empty(),
        "no sample image {app} {version} in {}",
        images().source
    );
    p
}

/// The manifest digest of download-test image `bulk` `version` for `platform`.
pub fn bulk_digest(version: &str, platform: &str) -> String {
    app_digest("bulk", version, platform)
}

/// `platform -> digest` of download-test image `bulk` `version`.
pub fn bulk_platforms(version: &str) -> BTreeMap<String, String> {
    app_platforms("bulk", version)
}

/// `<registry>/ferry/bulk@<digest>` of download-test image `version` for `platform`.
pub fn bulk_reference(version: &str, platform: &str) -> String {
    format!("{}@{}", bulk_image(), bulk_digest(version, platform))
}

/// What an image manifest names: `(digest, size)` of its config and of each layer (bottom
/// first), and of the manifest itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageBlobs {
    pub manifest: (String, u64),
    pub config: (String, u64),
    pub layers: Vec<(String, u64)>,
}

impl ImageBlobs {
    /// Config + layers: the blob bytes a download of the whole image carries (the manifest not
    /// counted).
    pub fn compressed_size(&self) -> u64 {
        self.config.1 + self.layers.iter().map(|(_, s)| s).sum::<u64>()
    }

    /// The blobs (config first, then the layers).
    pub fn blobs(&self) -> Vec<(String, u64)> {
        std::iter::once(self.config.clone())
            .chain(self.layers.iter().cloned())
            .collect()
    }

    /// Bytes of this image's blobs (config + layers) that `other` does not have: what an update
    /// from `other` to this image must fetch.
    pub fn bytes_not_in(&self, other: &ImageBlobs) -> u64 {
        let have: std::collections::BTreeSet<&str> =
            other.blobs_ref().map(|(d, _)| d.as_str()).collect();
        self.blobs_ref()
            .filter(|(d, _)| !have.contains(d.as_str()))
            .map(|(_, s)| *s)
            .sum()
    }

    /// The blobs this image shares with `other` (digest, size).
    pub fn shared_with(&self, other: &ImageBlobs) -> Vec<(String, u64)> {
        let have: std::collections::BTreeSet<&str> =
            other.blobs_ref().map(|(d, _)| d.as_str()).collect();
        self.blobs_ref()
            .filter(|(d, _)| have.contains(d.as_str()))
            .cloned()
            .collect()
    }

    fn blobs_ref(&self) -> impl Iterator<Item = &(String, u64)> {
        std::iter::once(&self.config).chain(self.layers.iter())
    }
}

/// The config and layers of image manifest `manifest_digest` in `repo` (`host:port/path`, e.g.
/// [`bulk_image`]), read from the registry (digest-checked by `ferry_registry`).
pub fn image_blobs(repo: &str, manifest_digest: &str) -> ImageBlobs {
    let client = ferry_registry::RegistryClient::new(vec![], vec![]);
    let m = client
        .fetch_manifest_by_digest(repo, manifest_digest)
        .unwrap_or_else(|e| panic!("manifest {repo}@{manifest_digest}: {e}"));
    match m.kind {
        ferry_registry::ManifestKind::Image {
            config_digest,
            config_size,
            layers,
        } => ImageBlobs {
            manifest: (m.digest, m.bytes.len() as u64),
            config: (config_digest, config_size),
            layers,
        },
        ferry_registry::ManifestKind::Index { .. } => {
            panic!("{repo}@{manifest_digest} is an index, not an image manifest")
        }
    }
}

/// The engine's id of image manifest `manifest_digest` in `repo`: the config digest the manifest
/// names (`sha256:...`). Ferry creates containers from it, so a container whose `image` equals it
/// runs exactly that manifest's image, whatever names the engine has left on it (an agent pruning
/// an image removes its names, keeping the last one only while a container uses it).
pub fn image_id(repo: &str, manifest_digest: &str) -> String {
    image_blobs(repo, manifest_digest).config.0
}

/// [`image_id`] of sample image sensor `version` for `platform`.
pub fn sensor_image_id(version: &str, platform: &str) -> String {
    image_id(&sensor_image(), &digest(version, platform))
}

/// The diff ids (SHA-256 of each uncompressed layer, bottom first: what the engine knows its
/// layers by) of image manifest `manifest_digest` in `repo`, from its config in the registry.
pub fn image_diff_ids(repo: &str, manifest_digest: &str) -> Vec<String> {
    let blobs = image_blobs(repo, manifest_digest);
    let client = ferry_registry::RegistryClient::new(vec![], vec![]);
    let bytes = client
        .fetch_blob(repo, &blobs.config.0, 4 * 1024 * 1024)
        .unwrap_or_else(|e| panic!("config {} of {repo}@{manifest_digest}: {e}", blobs.config.0));
    let config = ferry_registry::image_config(&bytes)
        .unwrap_or_else(|e| panic!("config {} of {repo}@{manifest_digest}: {e}", blobs.config.0));
    assert_eq!(
        config.diff_ids.len(),
        blobs.layers.len(),
        "{repo}@{manifest_digest}: diff ids and layers differ in number"
    );
    config.diff_ids
}

/// The 6 MiB data layer of the `ferry/bulk` images (the same blob in every version and on every
/// platform): `(blob digest, compressed size, diff id)`. The engine holds it only through bulk
/// images; without it, a download of a bulk image fetches it and every layer above it.
pub fn bulk_data_layer() -> (String, u64, String) {
    let digest = bulk_digest("1.0.0", ARM64);
    let blobs = image_blobs(&bulk_image(), &digest);
    let diff_ids = image_diff_ids(&bulk_image(), &digest);
    let (i, (d, size)) = blobs
        .layers
        .iter()
        .enumerate()
        .max_by_key(|(_, (_, size))| *size)
        .expect("bulk image has layers");
    (d.clone(), *size, diff_ids[i].clone())
}

/// The manifest digest of sample image `version` for `platform` (`linux/arm64`, `linux/arm/v7`).
pub fn digest(version: &str, platform: &str) -> String {
    let imgs = images();
    imgs.digests
        .get(&(version.to_string(), platform.to_string()))
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no sample image sensor {version} for {platform} in {} (have: {:?})",
                imgs.source,
                imgs.digests.keys().collect::<Vec<_>>()
            )
        })
}

/// `platform -> digest` of sample image `version` (every platform it was built for).
pub fn platforms(version: &str) -> BTreeMap<String, String> {
    let p: BTreeMap<String, String> = images()
        .digests
        .iter()
        .filter(|((v, _), _)| v == version)
        .map(|((_, p), d)| (p.clone(), d.clone()))
        .collect();
    assert!(
        !p.is_empty(),
        "no sample image sensor {version} in {}",
        images().source
    );
    p
}

/// `<registry>/ferry/sensor@<digest>` of sample image `version` for `platform`.
pub fn reference(version: &str, platform: &str) -> String {
    format!("{}@{}", sensor_image(), digest(version, platform))
}

fn docker_answers() -> Result<(), String> {
    let mut s = UnixStream::connect(DOCKER_SOCKET).map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    if out.starts_with("HTTP/1.") && out.contains(" 200 ") {
        Ok(())
    } else {
        Err(format!("unexpected answer {:?}", out.lines().next()))
    }
}

/// `GET http://<addr><path>` with a 5 s timeout; the status code.
pub fn http_status(addr: &str, path: &str) -> Result<u16, String> {
    let sock = addr
        .parse::<std::net::SocketAddr>()
        .or_else(|_| {
            std::net::ToSocketAddrs::to_socket_addrs(addr)
                .map_err(|e| e.to_string())
                .and_then(|mut a| a.next().ok_or_else(|| "no address".to_string()))
        })
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP status line from {addr}: {:?}", out.lines().next()))
}

fn mosquitto_present() -> Result<(), String> {
    for bin in [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto_pub",
        "/usr/bin/mosquitto_sub",
    ] {
        if !Path::new(bin).exists() {
            let name = Path::new(bin).file_name().unwrap().to_string_lossy();
            let on_path = Command::new("sh")
                .args(["-c", &format!("command -v {name}")])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if !on_path {
                return Err(format!("{bin} missing"));
            }
        }
    }
    Ok(())
}

fn qemu_present() -> Result<(), String> {
    for f in [
        "/proc/sys/fs/binfmt_misc/qemu-aarch64",
        "/proc/sys/fs/binfmt_misc/qemu-arm",
    ] {
        if !Path::new(f).exists() {
            return Err(format!("{f} not registered"));
        }
    }
    Ok(())
}

/// Check that dockerd, the registry (with the sample images), mosquitto and qemu binfmt are
/// there; panic with a message saying what is missing and how to get it. Checked once per test
/// binary. Tests never skip silently: with `FERRY_REQUIRE_INFRA=1` (the test command) or without.
pub fn require_infra() {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    let r = CHECKED.get_or_init(|| {
        let mut missing = Vec::new();
        if let Err(e) = docker_answers() {
            missing.push(format!("dockerd at {DOCKER_SOCKET}: {e}"));
        }
        let reg = registry();
        match http_status(&reg, "/v2/") {
            Ok(200) => {}
            Ok(s) => missing.push(format!("registry http://{reg}/v2/ answered {s}")),
            Err(e) => missing.push(format!("registry http://{reg}/v2/: {e}")),
        }
        if let Err(e) = mosquitto_present() {
            missing.push(format!(
                "mosquitto: {e} (apt-get install -y mosquitto mosquitto-clients)"
            ));
        }
        if let Err(e) = qemu_present() {
            missing.push(format!("qemu binfmt: {e}"));
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "test infrastructure missing (FERRY_REQUIRE_INFRA={}):\n  - {}\n\
                 Run scripts/env-up.sh (as root) and images/build.sh {reg}, or the whole test \
                 command scripts/test.sh.",
                std::env::var("FERRY_REQUIRE_INFRA").unwrap_or_default(),
                missing.join("\n  - ")
            ))
        }
    });
    if let Err(e) = r {
        panic!("{e}");
    }
    // The digests must be known too (fails loudly when the images are missing).
    let _ = images();
}

/// A unique device id for a test: `it-<name>-<pid>` (characters the protocol allows).
pub fn device_id(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("it-{clean}-{}", std::process::id())
}

/// Poll `f` every 100 ms until it returns `Some`, or panic after `timeout` with `what` and the
/// last `Err` detail.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) => {
                if std::time::Instant::now() > deadline {
                    panic!("timed out after {timeout:?} waiting for {what}: {e}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
