//! **Where a blob is resumed.** One blob, fetched into the content store from wherever an earlier
//! attempt (a dropped connection, a killed agent, a power cut) left it: `Range: bytes=<durable>-`,
//! the body streamed through SHA-256 onto the partial file, fsynced at intervals, the digest
//! checked over the whole blob before it counts. Blocking: run it on a blocking thread.
//!
//! - `206` from the right offset: resumed (counted). `200` to a ranged request: the registry
//!   ignored the range, the blob starts over from byte 0 (counted as a restart). `416`: the
//!   partial is longer than the registry's blob, start over.
//! - A connection that breaks or stalls (no byte for `stall` seconds) ends the attempt with a
//!   transient error after the bytes received so far were made durable.
//! - Wrong bytes: the partial is deleted and the blob fetched once more from zero; wrong again
//!   fails the update naming the blob. More bytes than the manifest declares: permanent.
//! - A full disk: the partial is deleted, permanent ([`DownloadError::NoSpace`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry_registry::{RegistryClient, RegistryError};
use sha2::{Digest, Sha256};

use crate::download::error::DownloadError;
use crate::download::rate::RateLimiter;
use crate::download::store::{Partial, Store};

/// How blobs are fetched (from `[download]`).
#[derive(Debug)]
pub struct BlobSettings {
    /// No byte for this long: drop the connection and resume.
    pub stall: Duration,
    /// fsync the partial file after this many new bytes...
    pub sync_bytes: u64,
    /// ...or this much time, whichever comes first.
    pub sync_interval: Duration,
    pub rate: RateLimiter,
}

/// Counters shared by the blobs of one update (read by the progress reporter while they run).
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes of the blobs still to fetch that are on disk (progress).
    pub have: AtomicU64,
    /// Bytes received from the registry (every attempt).
    pub fetched: AtomicU64,
    pub resumes: AtomicU64,
    pub restarts: AtomicU64,
}

/// One blob to fetch.
pub struct BlobJob<'a> {
    pub client: &'a RegistryClient,
    pub store: &'a Store,
    /// Repository (`host/path`) to fetch from.
    pub repo: &'a str,
    /// The image it belongs to, for messages (`repo@manifest-digest`).
    pub image: &'a str,
    pub digest: &'a str,
    /// Size the (verified) manifest declares.
    pub size: u64,
    pub settings: &'a BlobSettings,
    pub counters: &'a Counters,
    pub cancel: &'a AtomicBool,
}

const CHUNK: usize = 64 * 1024;

impl BlobJob<'_> {
    fn store_err(&self, e: std::io::Error) -> DownloadError {
        DownloadError::store(self.store.root(), e)
    }

    /// Fetch the blob into the store (complete and verified) unless it is there already.
    pub fn run(&self) -> Result<(), DownloadError> {
        if self.store.has(self.digest) {
            return Ok(());
        }
        let mut mismatches = 0;
        loop {
            let mut part = self
                .store
                .open_partial(self.digest)
                .map_err(|e| self.store_err(e))?;
            if part.len() > self.size {
                part.reset().map_err(|e| self.store_err(e))?;
            }
            let mut hasher = part.hash_prefix().map_err(|e| self.store_err(e))?;
            if part.len() < self.size {
                self.stream(&mut part, &mut hasher)?;
            }
            let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
            if actual == self.digest {
                part.complete().map_err(|e| self.store_err(e))?;
                tracing::debug!(
                    blob = self.digest,
                    size = self.size,
                    "blob complete and verified"
                );
                return Ok(());
            }
            let had = part.len();
            part.discard().map_err(|e| self.store_err(e))?;
            self.counters.have.fetch_sub(
                had.min(self.counters.have.load(Ordering::Relaxed)),
                Ordering::Relaxed,
            );
            mismatches += 1;
            if mismatches >= 2 {
                return Err(DownloadError::DigestMismatch {
                    image: self.image.to_string(),
                    digest: self.digest.to_string(),
                    actual,
                });
            }
            tracing::warn!(image = self.image, blob = self.digest, %actual, "blob bytes do not match its digest; deleted, fetching it once more from zero");
        }
    }

    /// Receive the rest of the blob onto `part`. Returns once `part` holds `size` bytes.
    fn stream(&self, part: &mut Partial, hasher: &mut Sha256) -> Result<(), DownloadError> {
        let offset = part.len();
        let opened = self.open(offset);
        let mut s = match opened {
            Err(DownloadError::Registry(RegistryError::Status { status: 416, .. }))
                if offset > 0 =>
            {
                // The registry's blob is shorter than what we hold: whatever we have is wrong.
                tracing::warn!(
                    blob = self.digest,
                    offset,
                    "range not satisfiable; starting the blob over"
                );
                self.restart(part, hasher)?;
                self.open(0)?
            }
            other => other?,
        };
        if s.status == 200 && offset > 0 {
            tracing::warn!(
                blob = self.digest,
                offset,
                "the registry answered a ranged request with 200; starting the blob over"
            );
            self.restart(part, hasher)?;
        } else if s.status == 206 {
            self.counters.resumes.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                blob = self.digest,
                offset,
                size = self.size,
                "resuming a blob"
            );
        }
        let rate = &self.settings.rate;
        let mut buf = vec![0u8; rate.chunk(CHUNK)];
        let mut last_sync = Instant::now();
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                part.sync().map_err(|e| self.store_err(e))?;
                return Err(DownloadError::Cancelled);
            }
            let n = match s.read(&mut buf) {
                Ok(n) => n,
                Err(e) => {
                    part.sync().map_err(|e| self.store_err(e))?;
                    return Err(e.into());
                }
            };
            if n == 0 {
                break;
            }
            rate.take(n);
            self.counters.fetched.fetch_add(n as u64, Ordering::Relaxed);
            if part.len() + n as u64 > self.size {
                let _ = part.reset();
                return Err(DownloadError::Oversized {
                    image: self.image.to_string(),
                    digest: self.digest.to_string(),
                    size: self.size,
                });
            }
            if let Err(e) = part.append(&buf[..n]) {
                let err = self.store_err(e);
                let _ = part.reset();
                return Err(err);
            }
            hasher.update(&buf[..n]);
            self.counters.have.fetch_add(n as u64, Ordering::Relaxed);
            if part.len() - part.durable() >= self.settings.sync_bytes
                || last_sync.elapsed() >= self.settings.sync_interval
            {
                part.sync().map_err(|e| self.store_err(e))?;
                last_sync = Instant::now();
            }
        }
        part.sync().map_err(|e| self.store_err(e))?;
        if part.len() < self.size {
            return Err(DownloadError::Registry(RegistryError::Transport {
                registry: String::new(),
                repo: self.repo.to_string(),
                reference: self.digest.to_string(),
                message: format!(
                    "the connection ended after {} of {} bytes",
                    part.len(),
                    self.size
                ),
            }));
        }
        Ok(())
    }

    fn open(&self, offset: u64) -> Result<ferry_registry::BlobStream, DownloadError> {
        Ok(self.client.open_blob(
            self.repo,
            self.digest,
            offset,
            self.settings.stall,
            self.settings.rate.chunk(CHUNK),
        )?)
    }

    fn restart(&self, part: &mut Partial, hasher: &mut Sha256) -> Result<(), DownloadError> {
        let had = part.len();
        part.reset().map_err(|e| self.store_err(e))?;
        *hasher = Sha256::new();
        self.counters.restarts.fetch_add(1, Ordering::Relaxed);
        self.counters.have.fetch_sub(
            had.min(self.counters.have.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_registry::testserver::{Response, TestServer};
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    fn data(n: usize) -> Arc<Vec<u8>> {
        // Incompressible-ish, deterministic.
        let mut x: u32 = 12345;
        Arc::new(
            (0..n)
                .map(|_| {
                    x = x.wrapping_mul(1664525).wrapping_add(1013904223);
                    (x >> 24) as u8
                })
                .collect(),
        )
    }

    fn digest_of(b: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(b)))
    }

    fn settings() -> BlobSettings {
        BlobSettings {
            stall: Duration::from_millis(500),
            sync_bytes: 4096,
            sync_interval: Duration::from_secs(1),
            rate: RateLimiter::new(0),
        }
    }

    /// A registry serving one blob; each response carries at most `cut` body bytes (the rest of
    /// the announced length never comes: a link that drops), honours `Range` unless told not to,
    /// and can serve wrong bytes the first `corrupt` times.
    struct Served {
        srv: TestServer,
        requests: Arc<AtomicUsize>,
    }

    fn serve(body: Arc<Vec<u8>>, cut: usize, honour_range: bool, corrupt: usize) -> Served {
        let requests = Arc::new(AtomicUsize::new(0));
        let corrupt = Arc::new(AtomicUsize::new(corrupt));
        let r2 = requests.clone();
        let srv = TestServer::start(move |req| {
            r2.fetch_add(1, Ordering::SeqCst);
            let from = req
                .header("range")
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|r| r.parse::<usize>().ok())
                .filter(|_| honour_range)
                .unwrap_or(0);
            let mut part = body[from..].to_vec();
            if corrupt.load(Ordering::SeqCst) > 0 {
                corrupt.fetch_sub(1, Ordering::SeqCst);
                for b in part.iter_mut().step_by(97) {
                    *b ^= 0xff;
                }
            }
            let announced = part.len();
            part.truncate(cut);
            let resp = if from > 0 {
                Response::new(206).header(
                    "Content-Range",
                    &format!("bytes {from}-{}/{}", body.len() - 1, body.len()),
                )
            } else {
                Response::new(200)
            };
            resp.header("Content-Length", &announced.to_string())
                .body(part)
        });
        Served { srv, requests }
    }

    struct Env {
        _dir: tempfile::TempDir,
        store: Store,
        client: RegistryClient,
        settings: BlobSettings,
        counters: Counters,
        cancel: AtomicBool,
    }

    fn env() -> Env {
        let dir = tempfile::tempdir().unwrap();
        Env {
            store: Store::open(dir.path()).unwrap(),
            _dir: dir,
            client: RegistryClient::new(vec![], vec![]),
            settings: settings(),
            counters: Counters::default(),
            cancel: AtomicBool::new(false),
        }
    }

    fn job<'a>(e: &'a Env, repo: &'a str, digest: &'a str, size: u64) -> BlobJob<'a> {
        BlobJob {
            client: &e.client,
            store: &e.store,
            repo,
            image: "test/image@sha256:m",
            digest,
            size,
            settings: &e.settings,
            counters: &e.counters,
            cancel: &e.cancel,
        }
    }

    /// Run attempts until done, like the engine's retry loop (without the backoff).
    fn until_done(j: &BlobJob) -> usize {
        for attempt in 1..1000 {
            match j.run() {
                Ok(()) => return attempt,
                Err(e) if e.is_transient() => continue,
                Err(e) => panic!("permanent: {e}"),
            }
        }
        panic!("never finished")
    }

    #[test]
    fn a_link_cut_every_few_kib_resumes_without_fetching_anything_twice() {
        let body = data(200_000);
        let d = digest_of(&body);
        let s = serve(body.clone(), 16_384, true, 0);
        let e = env();
        let repo = format!("{}/x/y", s.srv.host());
        let attempts = until_done(&job(&e, &repo, &d, body.len() as u64));
        assert!(attempts >= 12, "{attempts}");
        assert!(e.store.has(&d));
        assert_eq!(e.store.read(&d, 1 << 20).unwrap(), *body);
        // Every byte crossed the wire once.
        assert_eq!(e.counters.fetched.load(Ordering::SeqCst), body.len() as u64);
        assert_eq!(
            e.counters.resumes.load(Ordering::SeqCst),
            attempts as u64 - 1
        );
        assert_eq!(e.counters.restarts.load(Ordering::SeqCst), 0);
        // Done means done: no request for a stored blob.
        let before = s.requests.load(Ordering::SeqCst);
        job(&e, &repo, &d, body.len() as u64).run().unwrap();
        assert_eq!(s.requests.load(Ordering::SeqCst), before);
    }

    #[test]
    fn a_registry_ignoring_range_restarts_the_blob_and_counts_it() {
        let body = data(50_000);
        let d = digest_of(&body);
        let e = env();
        // Leave a partial behind, as a previous attempt would have.
        {
            let mut p = e.store.open_partial(&d).unwrap();
            p.append(&body[..20_000]).unwrap();
            p.sync().unwrap();
        }
        let s = serve(body.clone(), usize::MAX, false, 0);
        let repo = format!("{}/x/y", s.srv.host());
        job(&e, &repo, &d, body.len() as u64).run().unwrap();
        assert_eq!(e.counters.restarts.load(Ordering::SeqCst), 1);
        assert_eq!(e.counters.resumes.load(Ordering::SeqCst), 0);
        assert_eq!(e.store.read(&d, 1 << 20).unwrap(), *body);
    }

    #[test]
    fn wrong_bytes_are_fetched_once_more_then_refused() {
        let body = data(30_000);
        let d = digest_of(&body);
        // Wrong once: fetched again from zero, then fine.
        let e = env();
        let s = serve(body.clone(), usize::MAX, true, 1);
        let repo = format!("{}/x/y", s.srv.host());
        job(&e, &repo, &d, body.len() as u64).run().unwrap();
        assert_eq!(s.requests.load(Ordering::SeqCst), 2);
        assert!(e.store.has(&d));
        // Wrong twice: the update fails naming the blob, nothing is left behind.
        let e = env();
        let s = serve(body.clone(), usize::MAX, true, 2);
        let repo = format!("{}/x/y", s.srv.host());
        let err = job(&e, &repo, &d, body.len() as u64).run().unwrap_err();
        assert!(matches!(err, DownloadError::DigestMismatch { .. }), "{err}");
        assert!(err.to_string().contains(&d), "{err}");
        assert!(!err.is_transient());
        assert!(e.store.list().is_empty(), "{:?}", e.store.list());
    }

    #[test]
    fn more_bytes_than_declared_are_refused() {
        let body = data(10_000);
        let d = digest_of(&body);
        let e = env();
        let s = serve(body.clone(), usize::MAX, true, 0);
        let repo = format!("{}/x/y", s.srv.host());
        let err = job(&e, &repo, &d, 5_000).run().unwrap_err();
        assert!(matches!(err, DownloadError::Oversized { .. }), "{err}");
        assert!(!err.is_transient());
    }

    #[test]
    fn a_stalled_connection_is_dropped_and_the_blob_resumed() {
        let body = data(40_000);
        let d = digest_of(&body);
        let b2 = body.clone();
        let calls = Arc::new(AtomicUsize::new(0));
        let c2 = calls.clone();
        // First answer: 10,000 bytes, then silence for 5 s. Later answers: the rest.
        let srv = TestServer::start(move |req| {
            let from = req
                .header("range")
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|r| r.parse::<usize>().ok())
                .unwrap_or(0);
            if c2.fetch_add(1, Ordering::SeqCst) == 0 {
                Response::new(200)
                    .header("Content-Length", &b2.len().to_string())
                    .body(b2[..10_000].to_vec())
                    .stall_after_body(Duration::from_secs(5))
            } else {
                Response::new(206)
                    .header(
                        "Content-Range",
                        &format!("bytes {from}-{}/{}", b2.len() - 1, b2.len()),
                    )
                    .body(b2[from..].to_vec())
            }
        });
        let e = env();
        let repo = format!("{}/x/y", srv.host());
        let j = job(&e, &repo, &d, body.len() as u64);
        let t0 = Instant::now();
        let err = j.run().unwrap_err();
        assert!(
            err.is_transient() && err.to_string().contains("stalled"),
            "{err}"
        );
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
        assert_eq!(e.store.have(&d), 10_000);
        j.run().unwrap();
        assert_eq!(e.counters.fetched.load(Ordering::SeqCst), 40_000);
        assert_eq!(e.counters.resumes.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_dark_registry_is_transient() {
        // A port nobody listens on.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let e = env();
        let repo = format!("127.0.0.1:{port}/x/y");
        let d = digest_of(b"x");
        let err = job(&e, &repo, &d, 1).run().unwrap_err();
        assert!(err.is_transient(), "{err}");
    }

    #[test]
    fn cancel_keeps_what_arrived() {
        let body = data(100_000);
        let d = digest_of(&body);
        let s = serve(body.clone(), usize::MAX, true, 0);
        let e = env();
        e.cancel.store(true, Ordering::SeqCst);
        let repo = format!("{}/x/y", s.srv.host());
        let err = job(&e, &repo, &d, body.len() as u64).run().unwrap_err();
        assert!(matches!(err, DownloadError::Cancelled), "{err}");
        assert!(!e.store.has(&d));
    }
}
