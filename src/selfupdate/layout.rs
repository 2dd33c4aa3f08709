//! **Where the agent's own binaries live on the box**, under `state_dir/agent/`:
//!
//! ```text
//! agent/0.1.1/ferry-agent     an installed version (written to a temp file, fsynced, renamed)
//! agent/current -> 0.1.1      the version to run (a symlink, replaced by one rename)
//! agent/previous -> 0.1.0     the one before it (absent: the packaged /usr/bin/ferry-agent)
//! agent/trial.json            set while `current` is on trial: {version, from, attempts, sequence}
//! agent/fallback.json         written when the launcher went back, for the next report
//! ```
//!
//! dpkg owns `/usr/bin/ferry-agent`; nothing here ever touches it. Every change is one
//! `rename(2)` of a symlink or a file followed by an fsync of the directory, so a power cut leaves
//! either the old or the new state, never none.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;
use crate::selfupdate::extract::BINARY_NAME;

/// An agent version on trial: started by the launcher at most `MAX_TRIAL_STARTS` times before
/// the box goes back on its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    pub version: semver::Version,
    /// The version it replaces (the packaged binary's, when `previous` is absent).
    pub from: semver::Version,
    /// Starts of `version` so far (counted by the launcher before each exec).
    pub attempts: u32,
    /// The notice that asked for it.
    pub sequence: u64,
}

/// Why the launcher went back to the previous agent (reported by it once it runs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fallback {
    pub version: semver::Version,
    pub back_to: semver::Version,
    pub sequence: u64,
    pub reason: String,
}

#[derive(Clone, Debug)]
pub struct AgentDir {
    root: PathBuf,
}

impl AgentDir {
    pub fn new(state_dir: &Path) -> AgentDir {
        AgentDir {
            root: state_dir.join("agent"),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether `exe` is one of the versions installed here (not the packaged binary).
    pub fn holds(&self, exe: &Path) -> bool {
        let root = fs::canonicalize(&self.root).unwrap_or_else(|_| self.root.clone());
        let exe = fs::canonicalize(exe).unwrap_or_else(|_| exe.to_path_buf());
        exe.starts_with(root)
    }

    /// Where version `v`'s binary is (installed or not).
    pub fn binary(&self, v: &semver::Version) -> PathBuf {
        self.root.join(v.to_string()).join(BINARY_NAME)
    }

    /// Install a verified binary as version `v` from image manifest `digest` (atomically;
    /// executable), written by `write`. The digest is kept beside it: [`AgentDir::staged`].
    pub fn install(
        &self,
        v: &semver::Version,
        digest: &str,
        write: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> io::Result<PathBuf> {
        let dir = self.root.join(v.to_string());
        fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(".{BINARY_NAME}.tmp"));
        let done = (|| {
            let mut f = File::create(&tmp)?;
            write(&mut f)?;
            f.set_permissions(fs::Permissions::from_mode(0o755))?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, dir.join(BINARY_NAME))
        })();
        if let Err(e) = done {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        write_atomic(&dir.join("digest"), digest.as_bytes())?;
        sync_dir(&dir)?;
        sync_dir(&self.root)?;
        Ok(self.binary(v))
    }

    /// Version `v` from manifest `digest` is installed (binary and digest record both there).
    pub fn staged(&self, v: &semver::Version, digest: &str) -> bool {
        let dir = self.root.join(v.to_string());
        dir.join(BINARY_NAME).is_file()
            && fs::read_to_string(dir.join("digest")).is_ok_and(|d| d == digest)
    }

    fn link(&self, name: &str) -> Option<semver::Version> {
        let target = fs::read_link(self.root.join(name)).ok()?;
        target.to_str()?.parse().ok()
    }

    /// The version `current` points to, if any.
    pub fn current(&self) -> Option<semver::Version> {
        self.link("current")
    }

    pub fn previous(&self) -> Option<semver::Version> {
        self.link("previous")
    }

    /// Point `name` at version `v` (or remove it) with one rename.
    fn set_link(&self, name: &str, v: Option<&semver::Version>) -> io::Result<()> {
        let path = self.root.join(name);
        match v {
            Some(v) => {
                let tmp = self.root.join(format!(".{name}.tmp"));
                let _ = fs::remove_file(&tmp);
                std::os::unix::fs::symlink(v.to_string(), &tmp)?;
                fs::rename(&tmp, &path)?;
            }
            None => match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            },
        }
        sync_dir(&self.root)
    }

    /// Make `v` current, on trial, the running one (`from`) kept as `previous`. Order: the trial
    /// record first, then `previous`, then `current` (the switch itself is the last rename): a
    /// power cut before it leaves the old agent current with a stale trial (ignored: its version
    /// is not current).
    pub fn switch_to(
        &self,
        v: &semver::Version,
        from: &semver::Version,
        sequence: u64,
        from_is_installed: bool,
    ) -> io::Result<()> {
        fs::create_dir_all(&self.root)?;
        self.write_trial(&Trial {
            version: v.clone(),
            from: from.clone(),
            attempts: 0,
            sequence,
        })?;
        self.set_link("previous", from_is_installed.then_some(from))?;
        self.set_link("current", Some(v))
    }

    /// Go back: `previous` becomes `current` (or, without one, the packaged binary runs).
    pub fn fall_back(&self, f: &Fallback) -> io::Result<()> {
        write_atomic(
            &self.root.join("fallback.json"),
            &serde_json::to_vec(f).expect("serializes"),
        )?;
        let prev = self.previous();
        self.set_link("current", prev.as_ref())?;
        self.set_link("previous", None)?;
        self.clear_trial()
    }

    pub fn trial(&self) -> Option<Trial> {
        let raw = fs::read(self.root.join("trial.json")).ok()?;
        serde_json::from_slice(&raw).ok()
    }

    pub fn write_trial(&self, t: &Trial) -> io::Result<()> {
        write_atomic(
            &self.root.join("trial.json"),
            &serde_json::to_vec(t).expect("serializes"),
        )
    }

    pub fn clear_trial(&self) -> io::Result<()> {
        remove(&self.root.join("trial.json"))?;
        sync_dir(&self.root)
    }

    /// The launcher's last fallback, until [`AgentDir::clear_fallback`].
    pub fn fallback(&self) -> Option<Fallback> {
        serde_json::from_slice(&fs::read(self.root.join("fallback.json")).ok()?).ok()
    }

    pub fn clear_fallback(&self) {
        let _ = remove(&self.root.join("fallback.json"));
    }

    /// The fallback to report, taken (removed) once read.
    pub fn take_fallback(&self) -> Option<Fallback> {
        let f = self.fallback();
        self.clear_fallback();
        f
    }

    /// The packaged binary is newer than (or the same as) `current`: dpkg's install wins, the
    /// state dir's versions are forgotten.
    pub fn forget(&self) -> io::Result<()> {
        self.set_link("current", None)?;
        self.set_link("previous", None)?;
        self.clear_trial()
    }

    /// Remove installed versions other than `current` and `previous`.
    pub fn prune(&self) {
        let keep: Vec<String> = [self.current(), self.previous()]
            .into_iter()
            .flatten()
            .map(|v| v.to_string())
            .collect();
        let Ok(rd) = fs::read_dir(&self.root) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let is_version = name.parse::<semver::Version>().is_ok();
            if is_version && !keep.contains(&name) && e.path().is_dir() {
                if let Err(err) = fs::remove_dir_all(e.path()) {
                    tracing::warn!(version = %name, error = %err, "cannot remove an old agent version");
                }
            }
        }
    }
}

fn remove(p: &Path) -> io::Result<()> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn sync_dir(d: &Path) -> io::Result<()> {
    File::open(d)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn v(s: &str) -> semver::Version {
        s.parse().unwrap()
    }

    #[test]
    fn install_switch_fall_back_and_prune() {
        let d = tempfile::tempdir().unwrap();
        let a = AgentDir::new(d.path());
        assert_eq!(a.current(), None);
        let p = a
            .install(&v("0.1.1"), "sha256:1", |f| f.write_all(b"\x7fELF one"))
            .unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"\x7fELF one");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert!(a.staged(&v("0.1.1"), "sha256:1"));
        assert!(!a.staged(&v("0.1.1"), "sha256:other"));
        // From the packaged 0.1.0 (not installed here): no `previous`.
        a.switch_to(&v("0.1.1"), &v("0.1.0"), 7, false).unwrap();
        assert_eq!(a.current(), Some(v("0.1.1")));
        assert_eq!(a.previous(), None);
        assert_eq!(a.trial().unwrap().sequence, 7);
        // Committed, then 0.1.2 on trial over the installed 0.1.1.
        a.clear_trial().unwrap();
        a.install(&v("0.1.2"), "sha256:2", |f| f.write_all(b"\x7fELF two"))
            .unwrap();
        a.switch_to(&v("0.1.2"), &v("0.1.1"), 8, true).unwrap();
        assert_eq!(
            (a.current(), a.previous()),
            (Some(v("0.1.2")), Some(v("0.1.1")))
        );
        // It fails: back to 0.1.1, the reason kept for one report.
        let fb = Fallback {
            version: v("0.1.2"),
            back_to: v("0.1.1"),
            sequence: 8,
            reason: "did not confirm".into(),
        };
        a.fall_back(&fb).unwrap();
        assert_eq!((a.current(), a.previous()), (Some(v("0.1.1")), None));
        assert_eq!(a.trial(), None);
        assert_eq!(a.take_fallback(), Some(fb));
        assert_eq!(a.take_fallback(), None);
        a.prune();
        assert!(a.binary(&v("0.1.1")).exists());
        assert!(!a.binary(&v("0.1.2")).exists());
        // And without a previous: back to the packaged binary.
        a.switch_to(&v("0.1.3"), &v("0.1.1"), 9, false).unwrap();
        a.fall_back(&Fallback {
            version: v("0.1.3"),
            back_to: v("0.1.0"),
            sequence: 9,
            reason: "x".into(),
        })
        .unwrap();
        assert_eq!(a.current(), None);
    }

    #[test]
    fn a_failed_install_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let a = AgentDir::new(d.path());
        let r = a.install(&v("0.2.0"), "sha256:3", |_| {
            Err(io::Error::other("disk full"))
        });
        assert!(r.is_err());
        let left: Vec<_> = fs::read_dir(a.root().join("0.2.0"))
            .unwrap()
            .flatten()
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
