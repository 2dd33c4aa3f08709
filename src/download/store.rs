//! The agent's content store: blobs by digest, complete or partial, on the box's own disk.
//!
//! ```text
//! <dir>/blobs/sha256/<hex>              complete and verified (renamed into place, dir fsynced)
//! <dir>/partial/sha256/<hex>            a blob being received, appended to
//! <dir>/partial/sha256/<hex>.durable    how many of its bytes were fsynced (atomic rewrite)
//! ```
//!
//! **Where a blob is resumed**: [`Store::open_partial`] opens a partial file under an exclusive
//! `flock` (one writer per blob, even across a detached attempt that has not noticed it was
//! abandoned yet) and cuts it back to its durable length: bytes written after the last
//! [`Partial::sync`] may not have survived a power cut (or may be garbage on file systems that
//! grow a file before its data lands), so they are fetched again. The digest is checked over the
//! whole file when it completes; a blob whose bytes were wrong is deleted, never used.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::fsutil::write_atomic;

/// The hex part of a `sha256:<64 hex>` digest, or `None` for anything else (which the store
/// never turns into a path).
pub fn digest_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(hex)
}

fn bad_digest(digest: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("not a sha256 digest: {digest:?}"),
    )
}

/// One stored blob, as [`Store::list`] sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub digest: String,
    /// Bytes on disk (for a partial: its durable length).
    pub bytes: u64,
    pub complete: bool,
}

#[derive(Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Open (creating) the store under `root`; temp files of interrupted atomic writes are removed.
    pub fn open(root: &Path) -> io::Result<Store> {
        let s = Store {
            root: root.to_path_buf(),
        };
        for d in [s.blobs_dir(), s.partial_dir()] {
            fs::create_dir_all(&d)?;
        }
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = fs::set_permissions(root, fs::Permissions::from_mode(0o700));
        }
        for d in [s.blobs_dir(), s.partial_dir()] {
            for e in fs::read_dir(&d)?.flatten() {
                if e.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(s)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }

    fn partial_dir(&self) -> PathBuf {
        self.root.join("partial/sha256")
    }

    /// Where a complete blob lives (it may not exist).
    pub fn blob_path(&self, digest: &str) -> io::Result<PathBuf> {
        let hex = digest_hex(digest).ok_or_else(|| bad_digest(digest))?;
        Ok(self.blobs_dir().join(hex))
    }

    fn partial_paths(&self, digest: &str) -> io::Result<(PathBuf, PathBuf)> {
        let hex = digest_hex(digest).ok_or_else(|| bad_digest(digest))?;
        let d = self.partial_dir();
        Ok((d.join(hex), d.join(format!("{hex}.durable"))))
    }

    /// True when the complete blob is stored.
    pub fn has(&self, digest: &str) -> bool {
        self.blob_path(digest).is_ok_and(|p| p.is_file())
    }

    /// Size of a complete blob, if stored.
    pub fn size(&self, digest: &str) -> Option<u64> {
        fs::metadata(self.blob_path(digest).ok()?)
            .ok()
            .map(|m| m.len())
    }

    /// A complete blob's bytes (small blobs: manifests, configs), at most `limit`.
    pub fn read(&self, digest: &str, limit: u64) -> io::Result<Vec<u8>> {
        let mut f = File::open(self.blob_path(digest)?)?;
        let len = f.metadata()?.len();
        if len > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{digest} is {len} bytes, over the {limit}-byte limit"),
            ));
        }
        let mut out = Vec::with_capacity(len as usize);
        f.read_to_end(&mut out)?;
        Ok(out)
    }

    /// Store small, already verified bytes as a complete blob (atomically).
    pub fn put(&self, digest: &str, bytes: &[u8]) -> io::Result<()> {
        write_atomic(&self.blob_path(digest)?, bytes)
    }

    /// Open the partial file of `digest` for appending, under an exclusive lock (waits while
    /// another writer holds it), cut back to its durable length.
    pub fn open_partial(&self, digest: &str) -> io::Result<Partial> {
        let (path, durable_path) = self.partial_paths(digest)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        // SAFETY: flock on a descriptor we own; blocking until the other writer lets go.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let on_disk = file.metadata()?.len();
        let recorded = fs::read_to_string(&durable_path)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let durable = recorded.min(on_disk);
        if on_disk != durable {
            tracing::debug!(%digest, on_disk, durable, "cutting a partial blob back to its durable length");
            file.set_len(durable)?;
        }
        let mut file = file;
        file.seek(SeekFrom::Start(durable))?;
        Ok(Partial {
            digest: digest.to_string(),
            file,
            path,
            durable_path,
            final_path: self.blob_path(digest)?,
            len: durable,
            durable,
        })
    }

    /// Every blob in the store, complete and partial.
    pub fn list(&self) -> Vec<Entry> {
        let mut out = Vec::new();
        for (dir, complete) in [(self.blobs_dir(), true), (self.partial_dir(), false)] {
            let Ok(rd) = fs::read_dir(&dir) else { continue };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.contains('.') {
                    continue;
                }
                let digest = format!("sha256:{name}");
                if digest_hex(&digest).is_none() {
                    continue;
                }
                let bytes = e.metadata().map(|m| m.len()).unwrap_or(0);
                out.push(Entry {
                    digest,
                    bytes,
                    complete,
                });
            }
        }
        out.sort_by(|a, b| a.digest.cmp(&b.digest).then(b.complete.cmp(&a.complete)));
        out
    }

    /// Bytes the store holds (complete + partial).
    pub fn usage(&self) -> u64 {
        self.list().iter().map(|e| e.bytes).sum()
    }

    /// Bytes of `digest` already here: its full size when complete, else its partial's length.
    pub fn have(&self, digest: &str) -> u64 {
        if let Some(n) = self.size(digest) {
            return n;
        }
        self.partial_paths(digest)
            .ok()
            .and_then(|(p, _)| fs::metadata(p).ok())
            .map_or(0, |m| m.len())
    }

    /// Delete a blob, complete and partial.
    pub fn remove(&self, digest: &str) -> io::Result<()> {
        let (p, d) = self.partial_paths(digest)?;
        let d_tmp = crate::fsutil::temp_path(&d)?;
        for f in [self.blob_path(digest)?, p, d, d_tmp] {
            match fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Delete every blob not in `keep`; returns (blobs removed, bytes freed).
    pub fn retain(&self, keep: &BTreeSet<String>) -> (usize, u64) {
        let mut removed = (0, 0);
        for e in self.list() {
            if keep.contains(&e.digest) {
                continue;
            }
            match self.remove(&e.digest) {
                Ok(()) => {
                    removed.0 += 1;
                    removed.1 += e.bytes;
                }
                Err(err) => {
                    tracing::warn!(digest = %e.digest, error = %err, "cannot remove a stored blob")
                }
            }
        }
        // Temp files of an interrupted durable-length write (a power cut mid-write) whose blob
        // is not kept: nothing else would ever delete them.
        if let Ok(rd) = fs::read_dir(self.partial_dir()) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let Some(hex) = name
                    .strip_prefix('.')
                    .and_then(|n| n.strip_suffix(".durable.tmp"))
                else {
                    continue;
                };
                if !keep.contains(&format!("sha256:{hex}")) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        if removed.0 > 0 {
            tracing::info!(
                blobs = removed.0,
                bytes = removed.1,
                "content store: removed blobs no update needs"
            );
        }
        removed
    }
}

/// A blob being received: an append-only file whose first [`Partial::durable`] bytes are on disk
/// for sure. Dropping it releases the lock; what was synced stays for the next attempt.
#[derive(Debug)]
pub struct Partial {
    digest: String,
    file: File,
    path: PathBuf,
    durable_path: PathBuf,
    final_path: PathBuf,
    len: u64,
    durable: u64,
}

impl Partial {
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Bytes written so far (synced or not).
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes known to be on disk.
    pub fn durable(&self) -> u64 {
        self.durable
    }

    pub fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file.write_all(buf)?;
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Make what was written durable: fsync the data, then record its length.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.durable == self.len {
            return Ok(());
        }
        self.file.sync_data()?;
        write_atomic(&self.durable_path, self.len.to_string().as_bytes())?;
        self.durable = self.len;
        Ok(())
    }

    /// Start the blob over from byte 0 (the registry ignored the range, or the bytes were wrong).
    pub fn reset(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        let _ = fs::remove_file(&self.durable_path);
        self.len = 0;
        self.durable = 0;
        Ok(())
    }

    /// SHA-256 of what is in the file now (after a restart, to continue hashing from there).
    pub fn hash_prefix(&mut self) -> io::Result<Sha256> {
        let mut h = Sha256::new();
        self.file.seek(SeekFrom::Start(0))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = self.len;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = self.file.read(&mut buf[..want])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "partial blob shorter than recorded",
                ));
            }
            h.update(&buf[..n]);
            left -= n as u64;
        }
        self.file.seek(SeekFrom::Start(self.len))?;
        Ok(h)
    }

    /// The blob is complete and its digest checked by the caller: move it into `blobs/`.
    pub fn complete(self) -> io::Result<()> {
        self.file.sync_all()?;
        fs::rename(&self.path, &self.final_path)?;
        if let Some(dir) = self.final_path.parent() {
            File::open(dir)?.sync_all()?;
        }
        let _ = fs::remove_file(&self.durable_path);
        Ok(())
    }

    /// Throw the partial away (wrong bytes, or a failure that must leave nothing behind).
    pub fn discard(self) -> io::Result<()> {
        for p in [&self.path, &self.durable_path] {
            match fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn digests_become_paths_only_when_well_formed() {
        assert!(digest_hex(&d('a')).is_some());
        for bad in [
            "sha256:../../etc/passwd",
            "sha512:aa",
            "sha256:ABCDEF",
            "",
            &format!("sha256:{}", "g".repeat(64)),
        ] {
            assert!(digest_hex(bad).is_none(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert!(s.open_partial("sha256:../x").is_err());
        assert!(s.put("sha256:../x", b"x").is_err());
    }

    #[test]
    fn a_partial_resumes_from_its_durable_length_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let mut p = s.open_partial(&d('a')).unwrap();
        p.append(b"hello ").unwrap();
        p.sync().unwrap();
        // Written but never synced: as after a power cut, it does not count.
        p.append(b"wor").unwrap();
        assert_eq!((p.len(), p.durable()), (9, 6));
        drop(p);
        let mut p = s.open_partial(&d('a')).unwrap();
        assert_eq!((p.len(), p.durable()), (6, 6));
        let h = p.hash_prefix().unwrap();
        assert_eq!(
            h.finalize().as_slice(),
            Sha256::digest(b"hello ").as_slice()
        );
        p.append(b"world").unwrap();
        p.sync().unwrap();
        assert_eq!(s.have(&d('a')), 11);
        p.complete().unwrap();
        assert!(s.has(&d('a')));
        assert_eq!(s.read(&d('a'), 100).unwrap(), b"hello world");
        assert!(s.read(&d('a'), 5).is_err());
        assert_eq!(
            s.list(),
            vec![Entry {
                digest: d('a'),
                bytes: 11,
                complete: true
            }]
        );
    }

    #[test]
    fn a_partial_without_a_record_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let (path, _) = s.partial_paths(&d('b')).unwrap();
        fs::write(&path, b"garbage of unknown durability").unwrap();
        let p = s.open_partial(&d('b')).unwrap();
        assert_eq!(p.len(), 0);
        assert_eq!(fs::metadata(&path).unwrap().len(), 0);
    }

    #[test]
    fn reset_discard_and_retain() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let mut p = s.open_partial(&d('c')).unwrap();
        p.append(b"abc").unwrap();
        p.sync().unwrap();
        p.reset().unwrap();
        assert_eq!((p.len(), p.durable()), (0, 0));
        p.append(b"xy").unwrap();
        p.sync().unwrap();
        drop(p);
        s.put(&d('e'), b"kept").unwrap();
        s.put(&d('f'), b"gone").unwrap();
        assert_eq!(s.usage(), 2 + 4 + 4);
        let keep: BTreeSet<String> = [d('e')].into();
        assert_eq!(s.retain(&keep), (2, 6));
        assert_eq!(s.list().len(), 1);
        assert!(s.has(&d('e')));
        let p = s.open_partial(&d('1')).unwrap();
        p.discard().unwrap();
        assert_eq!(s.list().len(), 1);
    }

    #[test]
    fn retain_sweeps_temp_files_a_full_disk_left() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let mut p = s.open_partial(&d('3')).unwrap();
        p.append(b"abc").unwrap();
        drop(p);
        // As a durable-length write cut by ENOSPC or a power cut leaves them.
        let (_, durable) = s.partial_paths(&d('3')).unwrap();
        let (_, orphan) = s.partial_paths(&d('4')).unwrap();
        for f in [&durable, &orphan] {
            fs::write(crate::fsutil::temp_path(f).unwrap(), b"1").unwrap();
        }
        s.retain(&BTreeSet::new());
        let left: Vec<_> = fs::read_dir(s.partial_dir()).unwrap().flatten().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn one_writer_per_blob() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(Store::open(dir.path()).unwrap());
        let p = s.open_partial(&d('2')).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = s.clone();
        let t = std::thread::spawn(move || {
            let p2 = s2.open_partial(&d('2')).unwrap();
            tx.send(p2.len()).unwrap();
        });
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(200))
            .is_err());
        drop(p);
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap(),
            0
        );
        t.join().unwrap();
    }
}
