//! The per-device desired-state sequence counter (protocol §6.3: a device accepts only a greater
//! sequence than the last it accepted, and a consumed sequence is never retried).
//!
//! One file per device, `<state-dir>/<device>.seq`, holding the last sequence handed out as
//! decimal text. Allocation happens under an exclusive `flock` on `<device>.lock` (held across
//! processes and threads), and the new value is durable (temp file, fsync, rename, fsync of the
//! directory) BEFORE the caller publishes anything: a sequence is never handed out twice, even
//! when the publish that was to use it fails.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use ferry_protocol::names::check_device_id;

#[derive(Debug, thiserror::Error)]
pub enum SequenceError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("sequence file {path} is corrupt ({content:?}); fix or remove it by hand (it must never go backwards)")]
    Corrupt { path: String, content: String },
    #[error("--sequence {requested} is not ahead of the stored sequence {stored} for device {device}; sequences are never reused")]
    NotAhead {
        device: String,
        requested: u64,
        stored: u64,
    },
    #[error("the sequence of device {0} is exhausted")]
    Exhausted(String),
    #[error("{0}")]
    BadDevice(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SequenceError + '_ {
    move |source| SequenceError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The default state directory: `$FERRY_STATE_DIR`, else `$HOME/.local/state/ferryctl`.
pub fn default_state_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("FERRY_STATE_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".local/state/ferryctl"))
}

/// The sequence counters under one state directory.
#[derive(Clone, Debug)]
pub struct SequenceStore {
    dir: PathBuf,
}

/// An exclusive flock, released when dropped (the file is closed).
struct Lock {
    _file: File,
}

impl SequenceStore {
    /// Open (creating with mode 0700 if needed) the state directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<SequenceStore, SequenceError> {
        let dir = dir.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir))?;
        Ok(SequenceStore { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, device: &str, ext: &str) -> Result<PathBuf, SequenceError> {
        // Device ids are `[A-Za-z0-9][A-Za-z0-9._-]*`: safe as file names, never `..`.
        check_device_id(device).map_err(SequenceError::BadDevice)?;
        Ok(self.dir.join(format!("{device}.{ext}")))
    }

    fn lock(&self, device: &str) -> Result<Lock, SequenceError> {
        let path = self.path(device, "lock")?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        loop {
            // SAFETY: flock on a file descriptor we own and keep open for the lock's lifetime.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(Lock { _file: file });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(io_err(&path)(e));
            }
        }
    }

    fn read(&self, device: &str) -> Result<u64, SequenceError> {
        let path = self.path(device, "seq")?;
        match fs::read_to_string(&path) {
            Ok(text) => text
                .trim()
                .parse::<u64>()
                .map_err(|_| SequenceError::Corrupt {
                    path: path.display().to_string(),
                    content: text.chars().take(40).collect(),
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn write(&self, device: &str, value: u64) -> Result<(), SequenceError> {
        let path = self.path(device, "seq")?;
        let tmp = self.path(device, "seq.tmp")?;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all(format!("{value}\n").as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(io_err(&tmp))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        crate::sync_dir(&self.dir).map_err(io_err(&self.dir))
    }

    /// The last sequence handed out for `device` (0 when none).
    pub fn current(&self, device: &str) -> Result<u64, SequenceError> {
        let _lock = self.lock(device)?;
        self.read(device)
    }

    /// Hand out the next sequence for `device` (stored + 1), or `requested` when given (which
    /// must be greater than the stored one). The value is durable when this returns.
    pub fn allocate(&self, device: &str, requested: Option<u64>) -> Result<u64, SequenceError> {
        let _lock = self.lock(device)?;
        let stored = self.read(device)?;
        let next = match requested {
            Some(n) if n <= stored => {
                return Err(SequenceError::NotAhead {
                    device: device.to_string(),
                    requested: n,
                    stored,
                })
            }
            Some(n) => n,
            None => stored
                .checked_add(1)
                .ok_or_else(|| SequenceError::Exhausted(device.to_string()))?,
        };
        self.write(device, next)?;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn monotonic_and_persisted_across_instances() {
        let d = tempfile::tempdir().unwrap();
        let s = SequenceStore::open(d.path().join("state")).unwrap();
        assert_eq!(s.current("dev-001").unwrap(), 0);
        assert_eq!(s.allocate("dev-001", None).unwrap(), 1);
        assert_eq!(s.allocate("dev-001", None).unwrap(), 2);
        // Devices are independent.
        assert_eq!(s.allocate("dev-002", None).unwrap(), 1);
        // A new instance (a new ferryctl process) continues where the last one stopped.
        let s2 = SequenceStore::open(d.path().join("state")).unwrap();
        assert_eq!(s2.current("dev-001").unwrap(), 2);
        assert_eq!(s2.allocate("dev-001", None).unwrap(), 3);
        assert_eq!(
            fs::read_to_string(d.path().join("state/dev-001.seq")).unwrap(),
            "3\n"
        );
        let mode = fs::metadata(d.path().join("state"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(!d.path().join("state/dev-001.seq.tmp").exists());
    }

    #[test]
    fn explicit_sequence_must_be_ahead() {
        let d = tempfile::tempdir().unwrap();
        let s = SequenceStore::open(d.path()).unwrap();
        assert_eq!(s.allocate("d", None).unwrap(), 1);
        assert_eq!(s.allocate("d", Some(100)).unwrap(), 100);
        assert_eq!(s.allocate("d", None).unwrap(), 101);
        for n in [101, 50, 0] {
            let e = s.allocate("d", Some(n)).unwrap_err();
            assert!(
                matches!(e, SequenceError::NotAhead { stored: 101, .. }),
                "{e}"
            );
        }
        assert_eq!(
            s.current("d").unwrap(),
            101,
            "a refused jump changes nothing"
        );
        assert_eq!(s.allocate("d", Some(u64::MAX)).unwrap(), u64::MAX);
        assert!(matches!(
            s.allocate("d", None),
            Err(SequenceError::Exhausted(_))
        ));
    }

    #[test]
    fn concurrent_allocations_never_collide() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().to_path_buf();
        const PER_THREAD: usize = 40;
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    // Each thread has its own store instance, like two ferryctl processes.
                    let s = SequenceStore::open(dir).unwrap();
                    (0..PER_THREAD)
                        .map(|_| s.allocate("dev-001", None).unwrap())
                        .collect::<Vec<u64>>()
                })
            })
            .collect();
        let mut all: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        all.sort_unstable();
        let want: Vec<u64> = (1..=(2 * PER_THREAD) as u64).collect();
        assert_eq!(all, want, "every sequence handed out exactly once");
        assert_eq!(
            SequenceStore::open(&dir)
                .unwrap()
                .current("dev-001")
                .unwrap(),
            (2 * PER_THREAD) as u64
        );
    }

    #[test]
    fn corrupt_file_is_an_error_not_a_reset() {
        let d = tempfile::tempdir().unwrap();
        let s = SequenceStore::open(d.path()).unwrap();
        fs::write(d.path().join("dev.seq"), "garbage").unwrap();
        assert!(matches!(
            s.allocate("dev", None),
            Err(SequenceError::Corrupt { .. })
        ));
        assert_eq!(
            fs::read_to_string(d.path().join("dev.seq")).unwrap(),
            "garbage"
        );
    }

    #[test]
    fn bad_device_ids_refused() {
        let d = tempfile::tempdir().unwrap();
        let s = SequenceStore::open(d.path()).unwrap();
        for dev in ["../x", "a/b", "", ".hidden"] {
            assert!(
                matches!(s.allocate(dev, None), Err(SequenceError::BadDevice(_))),
                "{dev}"
            );
        }
    }
}
