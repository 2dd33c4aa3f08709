//! The orchestration of one attempt against a test registry (real HTTP, `ferry-registry`) and
//! the fake engine: what is fetched, what is skipped, the cap, the platform, what the store keeps.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_registry::testserver::{Response, TestServer};

use super::*;
use crate::download::rate::RateLimiter;
use crate::runtime::fake::FakeRuntime;
use crate::runtime::ImageInfo;

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn noise(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(1664525).wrapping_add(1013904223);
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn chain_ids_follow_the_engine() {
    let a = format!("sha256:{}", "a".repeat(64));
    let b = format!("sha256:{}", "b".repeat(64));
    let c = chain_ids(&[a.clone(), b.clone()]);
    assert_eq!(c[0], a);
    let expect = format!(
        "sha256:{}",
        hex::encode(Sha256::digest(format!("{a} {b}").as_bytes()))
    );
    assert_eq!(c[1], expect);
    // The same diff on top of another base is another chain.
    assert_ne!(chain_ids(&[b.clone(), b.clone()])[1], c[1]);
    let have: BTreeSet<String> = [c[0].clone()].into();
    assert_eq!(layers_present(&[a.clone(), b.clone()], &have), 1);
    assert_eq!(layers_present(&[b.clone(), a.clone()], &have), 0);
    let have: BTreeSet<String> = c.iter().cloned().collect();
    assert_eq!(layers_present(&[a, b], &have), 2);
}

/// An image in a test registry: manifest, config and two layers; counts requests per path.
struct Image {
    srv: TestServer,
    hits: Arc<Mutex<BTreeMap<String, usize>>>,
    manifest: String,
    config: String,
    layers: Vec<(String, u64)>,
    diff_ids: Vec<String>,
}

fn image(arch: &str) -> Image {
    let l1 = noise(20_000, 1);
    let l2 = noise(30_000, 2);
    let diff_ids = vec![sha(b"diff-1"), sha(b"diff-2")];
    let config = serde_json::json!({
        "os": "linux", "architecture": arch,
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    })
    .to_string()
    .into_bytes();
    let layers = vec![(sha(&l1), l1.len() as u64), (sha(&l2), l2.len() as u64)];
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": ferry_registry::DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": sha(&config), "size": config.len()},
        "layers": layers.iter().map(|(d, s)| serde_json::json!({
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": d, "size": s
        })).collect::<Vec<_>>()
    })
    .to_string()
    .into_bytes();
    let mut blobs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    blobs.insert(sha(&config), config.clone());
    blobs.insert(sha(&l1), l1);
    blobs.insert(sha(&l2), l2);
    let md = sha(&manifest);
    let hits: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let h2 = hits.clone();
    let md2 = md.clone();
    let srv = TestServer::start(move |req| {
        let d = req.path.rsplit('/').next().unwrap_or("").to_string();
        *h2.lock().unwrap().entry(d.clone()).or_default() += 1;
        if req.path.contains("/manifests/") && d == md2 {
            return Response::new(200)
                .header("Content-Type", ferry_registry::DOCKER_MANIFEST)
                .body(manifest.clone());
        }
        match blobs.get(&d) {
            Some(b) if req.path.contains("/blobs/") => Response::new(200).body(b.clone()),
            _ => Response::new(404),
        }
    });
    Image {
        srv,
        hits,
        manifest: md,
        config: sha(&config),
        layers,
        diff_ids,
    }
}

struct Rig {
    img: Image,
    rt: Arc<FakeRuntime>,
    src: StoreSource<FakeRuntime>,
    _dir: tempfile::TempDir,
    want: ImageWant,
}

async fn rig(img: Image, cap: u64, engine_arch: &str) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("store")).unwrap());
    let local = LocalRegistry::start("127.0.0.1:0", store.clone())
        .await
        .unwrap();
    let rt = Arc::new(FakeRuntime::new());
    // What the fake engine "loads" from the loopback registry.
    rt.add_registry_image(
        &local.reference("x/y", &img.manifest),
        ImageInfo {
            id: img.config.clone(),
            repo_digests: vec![],
            os: "linux".into(),
            architecture: engine_arch.into(),
            variant: None,
            size: 50_000,
            layers: img.diff_ids.clone(),
        },
    );
    let src = StoreSource::new(
        rt.clone(),
        RegistryClient::new(vec![], vec![]),
        store,
        local,
        BlobSettings {
            stall: Duration::from_secs(5),
            sync_bytes: 65536,
            sync_interval: Duration::from_secs(1),
            rate: RateLimiter::new(0),
        },
        StoreLimits {
            cap,
            margin: 0,
            extraction_factor: 2,
            parallel: 1,
        },
        "linux/arm64".into(),
        None,
    );
    let want = ImageWant {
        app: "app".into(),
        repo: format!("{}/x/y", img.srv.host()),
        digest: img.manifest.clone(),
    };
    Rig {
        img,
        rt,
        src,
        _dir: dir,
        want,
    }
}

async fn attempt(r: &Rig) -> (Result<Vec<Fetched>, DownloadError>, Arc<Progress>) {
    let p = Arc::new(Progress::default());
    let c = Arc::new(AtomicBool::new(false));
    (r.src.fetch(std::slice::from_ref(&r.want), &p, &c).await, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_loads_verifies_and_leaves_nothing_stored() {
    let r = rig(image("arm64"), 1 << 30, "arm64").await;
    let (res, p) = attempt(&r).await;
    let f = res.unwrap();
    assert_eq!(
        f,
        vec![Fetched {
            app: "app".into(),
            image_id: r.img.config.clone()
        }]
    );
    assert_eq!(p.bytes(), (50_000, 50_000));
    let hits = r.img.hits.lock().unwrap().clone();
    for (d, _) in &r.img.layers {
        assert_eq!(hits.get(d), Some(&1), "{hits:?}");
    }
    assert!(
        r.src.store().list().is_empty(),
        "{:?}",
        r.src.store().list()
    );
    // The engine holds it, by id, with the signed manifest digest.
    let info = r.rt.image_inspect(&r.img.config).await.unwrap().unwrap();
    assert!(info
        .repo_digests
        .iter()
        .any(|d| d.ends_with(&r.img.manifest)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_the_engine_holds_are_not_fetched() {
    let r = rig(image("arm64"), 1 << 30, "arm64").await;
    // Another image of the engine holds the bottom layer (as its chain).
    r.rt.add_local_image(
        "other@sha256:0",
        ImageInfo {
            id: "sha256:other".into(),
            layers: vec![r.img.diff_ids[0].clone()],
            ..Default::default()
        },
    );
    let (res, p) = attempt(&r).await;
    res.unwrap();
    let hits = r.img.hits.lock().unwrap().clone();
    assert_eq!(hits.get(&r.img.layers[0].0), None, "{hits:?}");
    assert_eq!(hits.get(&r.img.layers[1].0), Some(&1));
    assert_eq!(p.stats().skipped_blobs, 1);
    assert_eq!(p.bytes().1, 30_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_cap_fails_before_any_layer_is_fetched() {
    let r = rig(image("arm64"), 10_000, "arm64").await;
    let (res, _) = attempt(&r).await;
    let e = res.unwrap_err();
    assert!(matches!(e, DownloadError::StoreCap { .. }), "{e}");
    assert!(!e.is_transient());
    let hits = r.img.hits.lock().unwrap().clone();
    assert!(
        r.img.layers.iter().all(|(d, _)| !hits.contains_key(d)),
        "{hits:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_of_another_platform_fails_before_its_layers() {
    let r = rig(image("amd64"), 1 << 30, "amd64").await;
    let (res, _) = attempt(&r).await;
    let e = res.unwrap_err();
    assert!(matches!(e, DownloadError::WrongPlatform { .. }), "{e}");
    assert!(e.to_string().contains("this device is linux/arm64"), "{e}");
    let hits = r.img.hits.lock().unwrap().clone();
    assert!(
        r.img.layers.iter().all(|(d, _)| !hits.contains_key(d)),
        "{hits:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_load_of_the_wrong_platform_is_refused() {
    // The config says arm64 but the engine ends up with an amd64 image under that id.
    let r = rig(image("arm64"), 1 << 30, "amd64").await;
    let (res, _) = attempt(&r).await;
    let e = res.unwrap_err();
    assert!(!e.is_transient(), "{e}");
    assert!(r.rt.image_inspect(&r.img.config).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dark_registry_is_transient_and_a_partial_survives_it() {
    let r = rig(image("arm64"), 1 << 30, "arm64").await;
    // The manifest and config arrived earlier; half of the first layer too.
    let client = RegistryClient::new(vec![], vec![]);
    let m = client
        .fetch_manifest_by_digest(&r.want.repo, &r.want.digest)
        .unwrap();
    r.src.store().put(&r.want.digest, &m.bytes).unwrap();
    let cfg = client
        .fetch_blob(&r.want.repo, &r.img.config, 1 << 20)
        .unwrap();
    r.src.store().put(&r.img.config, &cfg).unwrap();
    let l1 = noise(20_000, 1);
    {
        let mut part = r.src.store().open_partial(&r.img.layers[0].0).unwrap();
        part.append(&l1[..10_000]).unwrap();
        part.sync().unwrap();
    }
    // The registry goes dark: nothing answers on its port.
    let dark = ImageWant {
        repo: "127.0.0.1:9/x/y".into(),
        ..r.want.clone()
    };
    let p = Arc::new(Progress::default());
    let c = Arc::new(AtomicBool::new(false));
    let e = r.src.fetch(&[dark], &p, &c).await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert_eq!(r.src.store().have(&r.img.layers[0].0), 10_000);
    // Back: resumed (the registry here ignores Range, so the blob restarts, counted).
    let (res, p) = attempt(&r).await;
    res.unwrap();
    assert_eq!(p.stats().restarts, 1);
}
