//! The update lock an app may hold (after balena's `/tmp/balena/updates.lock`): the agent binds a
//! directory of its own into every app container at [`CONTAINER_DIR`]; while the file
//! [`LOCK_FILE`] exists in it (`touch /run/ferry/updates.lock` … `rm /run/ferry/updates.lock`),
//! the switch of a downloaded update waits. A notice signed with `force` ignores the lock.
//! On the host the directory is `<state_dir>/locks/<app>`.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Where apps see their lock directory.
pub const CONTAINER_DIR: &str = "/run/ferry";
/// The lock: present = held.
pub const LOCK_FILE: &str = "updates.lock";

pub fn app_dir(root: &Path, app: &str) -> PathBuf {
    root.join(app)
}

/// Create the app's lock directory (writable by the app's user, whoever it is).
pub fn prepare(root: &Path, app: &str) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let d = app_dir(root, app);
    std::fs::create_dir_all(&d)?;
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777))?;
    Ok(d)
}

/// The apps among `apps` that hold their lock, with when they took it (the file's mtime).
pub fn held<'a>(
    root: &Path,
    apps: impl IntoIterator<Item = &'a String>,
) -> Vec<(String, SystemTime)> {
    apps.into_iter()
        .filter_map(|a| {
            let m = std::fs::symlink_metadata(app_dir(root, a).join(LOCK_FILE)).ok()?;
            Some((
                a.clone(),
                m.modified().unwrap_or_else(|_| SystemTime::now()),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_is_a_file_in_the_apps_dir() {
        let d = tempfile::tempdir().unwrap();
        let apps = vec!["a".to_string(), "b".to_string()];
        assert!(held(d.path(), &apps).is_empty());
        let dir = prepare(d.path(), "a").unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o777
        );
        std::fs::write(dir.join(LOCK_FILE), b"").unwrap();
        let h = held(d.path(), &apps);
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].0, "a");
        std::fs::remove_file(dir.join(LOCK_FILE)).unwrap();
        assert!(held(d.path(), &apps).is_empty());
    }
}
