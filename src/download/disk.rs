//! Free space, measured where the bytes will go: the content store's file system and the
//! container engine's data root (often the same file system on a box).

use std::path::Path;

/// Free bytes (for an unprivileged writer) of the file system holding `path`, and its device id.
/// `None` when it cannot be measured.
pub fn fs_free(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs/stat write into zeroed structs we own; the path is NUL-terminated.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return None;
        }
        let mut st: libc::stat = std::mem::zeroed();
        if libc::stat(c.as_ptr(), &mut st) != 0 {
            return None;
        }
        #[allow(clippy::unnecessary_cast)]
        Some((s.f_bavail as u64 * s.f_frsize as u64, st.st_dev as u64))
    }
}

/// [`fs_free`] at the nearest existing ancestor of `path` (the agent may not see the engine's
/// data root itself, e.g. when it runs confined).
pub fn fs_free_near(path: &Path) -> Option<(u64, u64)> {
    let mut p = path;
    loop {
        if let Some(r) = fs_free(p) {
            return Some(r);
        }
        p = p.parent()?;
    }
}

/// Free bytes at `path` or its nearest existing ancestor.
pub fn free_bytes_near(path: &Path) -> Option<u64> {
    fs_free_near(path).map(|(free, _)| free)
}

/// What must fit before a blob is fetched: its remaining bytes in the store, its extraction
/// estimate in the engine's data root, and the margin on each file system. Returns the first
/// shortfall as (path, free, need).
pub fn shortfall(
    store: &Path,
    engine_root: Option<&Path>,
    download: u64,
    extraction: u64,
    margin: u64,
) -> Option<(String, u64, u64)> {
    let store_fs = fs_free_near(store);
    let engine_fs = engine_root.and_then(fs_free_near);
    match (store_fs, engine_fs) {
        (Some((free, dev)), Some((_, edev))) if dev == edev => {
            let need = download.saturating_add(extraction).saturating_add(margin);
            (free < need).then(|| (store.display().to_string(), free, need))
        }
        (s, e) => {
            if let Some((free, _)) = s {
                let need = download.saturating_add(margin);
                if free < need {
                    return Some((store.display().to_string(), free, need));
                }
            }
            if let (Some((free, _)), Some(root)) = (e, engine_root) {
                let need = extraction.saturating_add(margin);
                if free < need {
                    return Some((root.display().to_string(), free, need));
                }
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_and_compares() {
        let (free, _) = fs_free(Path::new("/")).unwrap();
        assert!(free > 0);
        assert_eq!(fs_free(Path::new("/nonexistent/x")), None);
        assert_eq!(
            free_bytes_near(Path::new("/nonexistent/path/x")).map(|f| f > 0),
            Some(true)
        );
        let d = tempfile::tempdir().unwrap();
        // Same file system for both: the needs add up.
        assert_eq!(shortfall(d.path(), Some(d.path()), 1, 1, 1), None);
        let (path, have, need) =
            shortfall(d.path(), Some(d.path()), u64::MAX / 2, u64::MAX / 2, 10).unwrap();
        assert_eq!(path, d.path().display().to_string());
        assert!(have < need);
        assert_eq!(need, u64::MAX);
    }
}
