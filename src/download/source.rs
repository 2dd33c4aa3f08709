//! The real [`ImageSource`]: the agent's own resumable download into its content store, then a
//! local load into the engine, then the checks of protocol §6.6.
//!
//! One attempt ([`ImageSource::fetch`]) over the images of an update, in this order:
//! 1. each image's manifest by its signed digest (hash checked; stored) and its config blob (an
//!    image manifest, for this device's platform, or the update fails at once);
//! 2. the store keeps the blobs of these images and drops the rest (a superseded update's
//!    blobs in common stay, the others go);
//! 3. the layers the engine lacks: a layer is skipped when the engine already holds its chain
//!    (the stack of layers up to it, from the config's diff ids), so layers shared with what
//!    runs are never fetched; room (download + extraction estimate + margin) and the store cap
//!    are checked for all of them, then before each blob;
//! 4. the blobs, one at a time by default (`[download] parallel`), resumed from what is stored;
//! 5. each image loaded into the engine from the loopback registry ([`LocalRegistry`]); a layer
//!    the engine asks for that was predicted present is fetched and the load repeated;
//! 6. the engine's image must be the signed manifest (its repo digest) and this platform, or it
//!    is removed and the update fails;
//! 7. once every image of the update is in the engine, the store drops their blobs: the store's
//!    peak is the layers of one release that the engine lacked, never a copy of what runs.
//!
//! Any step may end the attempt with a transient error (the engine retries with backoff; the
//! next attempt starts where this one stopped) or a permanent one (the update fails).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ferry_registry::{ImageConfig, Manifest, ManifestKind, RegistryClient, Repository};
use sha2::{Digest, Sha256};

use crate::download::blob::{BlobJob, BlobSettings};
use crate::download::disk;
use crate::download::error::DownloadError;
use crate::download::serve::LocalRegistry;
use crate::download::store::Store;
use crate::download::{Fetched, ImageSource, ImageWant, Progress};
use crate::runtime::{ContainerRuntime, RuntimeError};

/// Largest config blob accepted.
const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;
/// How many times one import may come back asking for layers that were predicted present.
const MAX_IMPORT_ROUNDS: usize = 3;

/// Limits of the store (from `[download]` and `[update]`).
#[derive(Clone, Debug)]
pub struct StoreLimits {
    /// The store's size cap (complete + partial), bytes.
    pub cap: u64,
    /// Free space kept beyond what an update needs, on each file system.
    pub margin: u64,
    /// Extraction estimate: this many times a layer's compressed size in the engine's data root.
    pub extraction_factor: u64,
    /// Blobs fetched at the same time.
    pub parallel: usize,
}

pub struct StoreSource<R> {
    rt: Arc<R>,
    client: RegistryClient,
    store: Arc<Store>,
    local: LocalRegistry,
    blob: Arc<BlobSettings>,
    limits: StoreLimits,
    platform: String,
    /// The engine's data root (free space for extraction), when known.
    engine_root: Option<PathBuf>,
    /// Manifest digests whose bytes were wrong once (fetched once more, then refused).
    manifest_mismatches: Mutex<BTreeSet<String>>,
}

/// What one image is made of, from its verified manifest and config.
#[derive(Clone, Debug)]
struct Meta {
    want: ImageWant,
    manifest: Manifest,
    config_digest: String,
    config: ImageConfig,
    layers: Vec<(String, u64)>,
}

impl Meta {
    fn image(&self) -> String {
        format!("{}@{}", self.want.repo, self.want.digest)
    }

    fn blobs(&self) -> BTreeSet<String> {
        let mut b: BTreeSet<String> = self.layers.iter().map(|(d, _)| d.clone()).collect();
        b.insert(self.config_digest.clone());
        b
    }
}

/// The chain ids of a layer stack (as the engine names its layers): `chain[0] = diff[0]`,
/// `chain[n] = sha256(chain[n-1] + " " + diff[n])`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{prev} {d}").as_bytes()))
            ),
        };
        out.push(next);
    }
    out
}

/// How many of `diff_ids`, from the bottom, the engine holds (as chains in `have`).
pub fn layers_present(diff_ids: &[String], have: &BTreeSet<String>) -> usize {
    chain_ids(diff_ids)
        .iter()
        .take_while(|c| have.contains(*c))
        .count()
}

fn runtime_err(image: &str, e: RuntimeError) -> DownloadError {
    match e {
        RuntimeError::Unreachable { .. } => DownloadError::EngineUnreachable(e.to_string()),
        e => {
            let detail = e.to_string();
            if detail.contains("no space left on device") {
                DownloadError::NoSpace {
                    what: format!("loading {image}"),
                    path: "the engine's data root".into(),
                    free: 0,
                    need: 0,
                }
            } else {
                DownloadError::Import {
                    image: image.to_string(),
                    detail,
                }
            }
        }
    }
}

impl<R: ContainerRuntime> StoreSource<R> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rt: Arc<R>,
        client: RegistryClient,
        store: Arc<Store>,
        local: LocalRegistry,
        blob: BlobSettings,
        limits: StoreLimits,
        platform: String,
        engine_root: Option<PathBuf>,
    ) -> Self {
        StoreSource {
            rt,
            client,
            store,
            local,
            blob: Arc::new(blob),
            limits,
            platform,
            engine_root,
            manifest_mismatches: Mutex::new(BTreeSet::new()),
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn local(&self) -> &LocalRegistry {
        &self.local
    }

    async fn blocking<T: Send + 'static>(
        f: impl FnOnce() -> Result<T, DownloadError> + Send + 'static,
    ) -> Result<T, DownloadError> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| DownloadError::Import {
                image: "(agent)".into(),
                detail: format!("download task failed: {e}"),
            })?
    }

    /// Step 1 for one image: manifest and config, from the store or the registry.
    async fn meta(
        &self,
        want: &ImageWant,
        progress: &Arc<Progress>,
        cancel: &Arc<AtomicBool>,
    ) -> Result<Meta, DownloadError> {
        let image = format!("{}@{}", want.repo, want.digest);
        let manifest = {
            let (store, client, w) = (self.store.clone(), self.client.clone(), want.clone());
            let stored = {
                let (store, d) = (store.clone(), w.digest.clone());
                Self::blocking(move || {
                    Ok(store
                        .read(&d, ferry_registry::MAX_MANIFEST_BYTES)
                        .ok()
                        .and_then(|b| Manifest::from_stored(&d, b).ok()))
                })
                .await?
            };
            match stored {
                Some(m) => m,
                None => {
                    let fetched = Self::blocking(move || {
                        let m = client.fetch_manifest_by_digest(&w.repo, &w.digest)?;
                        store
                            .put(&w.digest, &m.bytes)
                            .map_err(|e| DownloadError::store(store.root(), e))?;
                        Ok(m)
                    })
                    .await;
                    match fetched {
                        Ok(m) => {
                            progress
                                .blobs
                                .fetched
                                .fetch_add(m.bytes.len() as u64, Ordering::Relaxed);
                            m
                        }
                        Err(DownloadError::Registry(
                            ferry_registry::RegistryError::DigestMismatch { actual, .. },
                        )) => {
                            let first = self
                                .manifest_mismatches
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(want.digest.clone());
                            if !first {
                                return Err(DownloadError::DigestMismatch {
                                    image: image.clone(),
                                    digest: want.digest.clone(),
                                    actual,
                                });
                            }
                            tracing::warn!(%image, %actual, "manifest bytes do not match the signed digest; fetching it once more");
                            return Err(DownloadError::Registry(
                                ferry_registry::RegistryError::Transport {
                                    registry: String::new(),
                                    repo: want.repo.clone(),
                                    reference: want.digest.clone(),
                                    message: format!("manifest bytes hashed to {actual}"),
                                },
                            ));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        };
        let (config_digest, config_size, layers) =
            match &manifest.kind {
                ManifestKind::Image {
                    config_digest,
                    config_size,
                    layers,
                } => (config_digest.clone(), *config_size, layers.clone()),
                ManifestKind::Index { .. } => return Err(DownloadError::NotRunnable {
                    image,
                    detail:
                        "a multi-platform index; a release must name each platform's image manifest"
                            .into(),
                }),
            };
        if config_size > MAX_CONFIG_BYTES {
            return Err(DownloadError::NotRunnable {
                image,
                detail: format!(
                    "its config is {config_size} bytes; at most {MAX_CONFIG_BYTES} are accepted"
                ),
            });
        }
        self.fetch_blobs(
            &image,
            &want.repo,
            &[(config_digest.clone(), config_size)],
            progress,
            cancel,
        )
        .await?;
        let config = {
            let (store, d) = (self.store.clone(), config_digest.clone());
            let bytes = Self::blocking(move || {
                store
                    .read(&d, MAX_CONFIG_BYTES)
                    .map_err(|e| DownloadError::store(store.root(), e))
            })
            .await?;
            ferry_registry::image_config(&bytes).map_err(|detail| DownloadError::NotRunnable {
                image: image.clone(),
                detail: format!("config {config_digest}: {detail}"),
            })?
        };
        if config.platform != self.platform {
            return Err(DownloadError::WrongPlatform {
                image,
                got: config.platform,
                want: self.platform.clone(),
            });
        }
        if config.diff_ids.len() != layers.len() {
            return Err(DownloadError::NotRunnable {
                image,
                detail: format!(
                    "the manifest lists {} layers, its config {} diff ids",
                    layers.len(),
                    config.diff_ids.len()
                ),
            });
        }
        Ok(Meta {
            want: want.clone(),
            manifest,
            config_digest,
            config,
            layers,
        })
    }

    /// Every layer chain the engine holds.
    async fn engine_chains(&self) -> Result<BTreeSet<String>, DownloadError> {
        let images = self
            .rt
            .list_images()
            .await
            .map_err(|e| runtime_err("(image list)", e))?;
        Ok(images.iter().flat_map(|i| chain_ids(&i.layers)).collect())
    }

    /// Room for `bytes` more in the store (cap) and on disk (with extraction and margin).
    fn check_room(&self, what: &str, download: u64, extraction: u64) -> Result<(), DownloadError> {
        let used = self.store.usage();
        if used.saturating_add(download) > self.limits.cap {
            return Err(DownloadError::StoreCap {
                what: what.to_string(),
                cap: self.limits.cap,
                used,
                need: download,
            });
        }
        if let Some((path, free, need)) = disk::shortfall(
            self.store.root(),
            self.engine_root.as_deref(),
            download,
            extraction,
            self.limits.margin,
        ) {
            return Err(DownloadError::NoSpace {
                what: what.to_string(),
                path,
                free,
                need,
            });
        }
        Ok(())
    }

    /// Fetch `blobs` of one image into the store (skipping complete ones), `parallel` at a time.
    async fn fetch_blobs(
        &self,
        image: &str,
        repo: &str,
        blobs: &[(String, u64)],
        progress: &Arc<Progress>,
        cancel: &Arc<AtomicBool>,
    ) -> Result<(), DownloadError> {
        let todo: Vec<(String, u64)> = blobs
            .iter()
            .filter(|(d, _)| !self.store.has(d))
            .cloned()
            .collect();
        for batch in todo.chunks(self.limits.parallel.max(1)) {
            let mut tasks = Vec::new();
            for (digest, size) in batch {
                if cancel.load(Ordering::Relaxed) {
                    return Err(DownloadError::Cancelled);
                }
                let have = self.store.have(digest);
                let rest = size.saturating_sub(have);
                self.check_room(
                    &format!("blob {digest} of {image}"),
                    rest,
                    size.saturating_mul(self.limits.extraction_factor),
                )?;
                let (client, store, settings, counters, cancel) = (
                    self.client.clone(),
                    self.store.clone(),
                    self.blob.clone(),
                    progress.clone(),
                    cancel.clone(),
                );
                let (repo, image, digest, size) =
                    (repo.to_string(), image.to_string(), digest.clone(), *size);
                tasks.push(tokio::task::spawn_blocking(move || {
                    BlobJob {
                        client: &client,
                        store: &store,
                        repo: &repo,
                        image: &image,
                        digest: &digest,
                        size,
                        settings: &settings,
                        counters: &counters.blobs,
                        cancel: &cancel,
                    }
                    .run()
                }));
            }
            let mut first_err = None;
            for t in tasks {
                let r = t.await.map_err(|e| DownloadError::Import {
                    image: image.to_string(),
                    detail: format!("download task failed: {e}"),
                })?;
                if let Err(e) = r {
                    // A permanent error wins over a transient one.
                    if first_err
                        .as_ref()
                        .is_none_or(|f: &DownloadError| f.is_transient())
                    {
                        first_err = Some(e);
                    }
                }
            }
            if let Some(e) = first_err {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Step 5 and 6 for one image: load it into the engine from the loopback registry and check
    /// what the engine holds afterwards.
    async fn import(
        &self,
        m: &Meta,
        progress: &Arc<Progress>,
        cancel: &Arc<AtomicBool>,
    ) -> Result<Fetched, DownloadError> {
        let image = m.image();
        let path = Repository::parse(&m.want.repo)?.path;
        let local_ref = self.local.reference(&path, &m.want.digest);
        for round in 1..=MAX_IMPORT_ROUNDS {
            let _offer = self
                .local
                .offer(&path, &m.want.digest, &m.manifest.media_type, m.blobs());
            self.local.take_misses();
            tracing::info!(%image, local = %local_ref, round, "loading the image into the engine");
            let pulled = self
                .rt
                .pull(&local_ref, &self.platform, None, &|_| {})
                .await;
            let misses = self.local.take_misses();
            match pulled {
                Ok(()) => break,
                Err(e) if !misses.is_empty() && round < MAX_IMPORT_ROUNDS => {
                    tracing::info!(%image, missing = ?misses, error = %e, "the engine lacks layers it was thought to have; fetching them");
                    let blobs: Vec<(String, u64)> = m
                        .layers
                        .iter()
                        .filter(|(d, _)| misses.contains(d))
                        .cloned()
                        .collect();
                    progress.add_total(blobs.iter().fold(0u64, |t, (_, s)| t.saturating_add(*s)));
                    self.fetch_blobs(&image, &m.want.repo, &blobs, progress, cancel)
                        .await?;
                }
                Err(e) => return Err(runtime_err(&image, e)),
            }
        }
        self.verify(m).await
    }

    /// The engine's image must be the signed manifest for this platform; otherwise it goes.
    async fn verify(&self, m: &Meta) -> Result<Fetched, DownloadError> {
        let image = m.image();
        let id = m.config_digest.clone();
        let info = self
            .rt
            .image_inspect(&id)
            .await
            .map_err(|e| runtime_err(&image, e))?
            .ok_or_else(|| DownloadError::Import {
                image: image.clone(),
                detail: format!("{id} is not present after the load"),
            })?;
        let digest_ok = info
            .repo_digests
            .iter()
            .any(|d| d.rsplit_once('@').map(|(_, d)| d) == Some(m.want.digest.as_str()));
        let (os, arch, variant) = crate::platform::split(&self.platform);
        let platform_ok = info.os == os
            && info.architecture == arch
            && (variant.is_none() || info.variant.as_deref() == variant);
        if !digest_ok || !platform_ok {
            let detail = if !digest_ok {
                format!(
                    "the engine's image {id} carries the digests {:?}, not the signed {}",
                    info.repo_digests, m.want.digest
                )
            } else {
                format!(
                    "the engine's image is {}/{}{} but this device is {}",
                    info.os,
                    info.architecture,
                    info.variant
                        .as_deref()
                        .map(|v| format!("/{v}"))
                        .unwrap_or_default(),
                    self.platform
                )
            };
            let _ = self.rt.remove_image(&id).await;
            return Err(DownloadError::Verify { image, detail });
        }
        Ok(Fetched {
            app: m.want.app.clone(),
            image_id: id,
        })
    }
}

impl<R: ContainerRuntime> ImageSource for StoreSource<R> {
    async fn fetch(
        &self,
        wants: &[ImageWant],
        progress: &Arc<Progress>,
        cancel: &Arc<AtomicBool>,
    ) -> Result<Vec<Fetched>, DownloadError> {
        // 1. manifests and configs
        let mut metas = Vec::with_capacity(wants.len());
        for w in wants {
            metas.push(self.meta(w, progress, cancel).await?);
        }
        // 2. keep what these images need, drop the rest
        let keep: BTreeSet<String> = metas
            .iter()
            .flat_map(|m| {
                let mut b = m.blobs();
                b.insert(m.want.digest.clone());
                b
            })
            .collect();
        {
            let store = self.store.clone();
            Self::blocking(move || Ok(store.retain(&keep))).await?;
        }
        // 3. the layers the engine lacks
        let chains = self.engine_chains().await?;
        let mut need: BTreeMap<String, u64> = BTreeMap::new();
        let mut per_image: Vec<Vec<(String, u64)>> = Vec::new();
        let mut skipped = 0u64;
        for m in &metas {
            let present = layers_present(&m.config.diff_ids, &chains);
            skipped += present as u64;
            let missing: Vec<(String, u64)> = m.layers[present..].to_vec();
            for (d, s) in &missing {
                need.insert(d.clone(), *s);
            }
            per_image.push(missing);
        }
        // Saturating: sizes are the manifests' (input); a saturated total fails the room check.
        let total = need.values().fold(0u64, |t, s| t.saturating_add(*s));
        let have = need
            .keys()
            .fold(0u64, |t, d| t.saturating_add(self.store.have(d)));
        progress.start(total, have, skipped);
        let what = if wants.len() == 1 {
            metas[0].image()
        } else {
            format!("{} images", wants.len())
        };
        self.check_room(
            &what,
            total.saturating_sub(have),
            total.saturating_mul(self.limits.extraction_factor),
        )?;
        // 4. fetch
        for (m, missing) in metas.iter().zip(&per_image) {
            self.fetch_blobs(&m.image(), &m.want.repo, missing, progress, cancel)
                .await?;
        }
        // 5-6. load and check
        let mut out = Vec::with_capacity(metas.len());
        for m in &metas {
            if cancel.load(Ordering::Relaxed) {
                return Err(DownloadError::Cancelled);
            }
            out.push(self.import(m, progress, cancel).await?);
        }
        // 7. the engine has them all: the store keeps nothing of them.
        self.manifest_mismatches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let store = self.store.clone();
        Self::blocking(move || Ok(store.retain(&BTreeSet::new()))).await?;
        Ok(out)
    }

    async fn fetch_agent(
        &self,
        want: &ImageWant,
        dir: &crate::selfupdate::layout::AgentDir,
        version: &semver::Version,
        progress: &Arc<Progress>,
        cancel: &Arc<AtomicBool>,
    ) -> Result<(), DownloadError> {
        use crate::selfupdate::extract::{extract_binary, ExtractError};
        // The largest agent binary accepted (the armv7 one is under 4 MB).
        const MAX_AGENT_BYTES: u64 = 64 * 1024 * 1024;
        let m = self.meta(want, progress, cancel).await?;
        let image = m.image();
        let [(layer, size)] = m.layers.as_slice() else {
            return Err(DownloadError::NotRunnable {
                image,
                detail: format!(
                    "an agent image holds one layer with /ferry-agent; this one has {}",
                    m.layers.len()
                ),
            });
        };
        progress.start(*size, self.store.have(layer), 0);
        self.check_room(&format!("agent image {image}"), *size, MAX_AGENT_BYTES)?;
        self.fetch_blobs(
            &image,
            &want.repo,
            &[(layer.clone(), *size)],
            progress,
            cancel,
        )
        .await?;
        let (store, dir, version, layer, digest, image) = (
            self.store.clone(),
            dir.clone(),
            version.clone(),
            layer.clone(),
            want.digest.clone(),
            image.clone(),
        );
        Self::blocking(move || {
            let path = store
                .blob_path(&layer)
                .map_err(|e| DownloadError::store(store.root(), e))?;
            let blob =
                std::fs::File::open(&path).map_err(|e| DownloadError::store(store.root(), e))?;
            let mut failed: Option<ExtractError> = None;
            let installed = dir.install(&version, &digest, |out| {
                let mut w = std::io::BufWriter::new(out);
                match extract_binary(blob, &mut w, MAX_AGENT_BYTES) {
                    Ok(_) => std::io::Write::flush(&mut w),
                    Err(ExtractError::Io(e)) => Err(e),
                    Err(e) => {
                        failed = Some(e);
                        Err(std::io::Error::other("not an agent image"))
                    }
                }
            });
            match (installed, failed) {
                (Ok(p), _) => {
                    tracing::info!(%version, path = %p.display(), "agent binary installed");
                    Ok(())
                }
                (Err(_), Some(e)) => Err(DownloadError::NotRunnable {
                    image,
                    detail: e.to_string(),
                }),
                (Err(e), None) => Err(DownloadError::store(dir.root(), e)),
            }
        })
        .await
    }

    async fn release(&self) {
        let store = self.store.clone();
        let _ = Self::blocking(move || Ok(store.retain(&BTreeSet::new()))).await;
        self.manifest_mismatches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

#[cfg(test)]
#[path = "source_tests.rs"]
mod tests;
