//! Where a bind's paths are checked against what is really on disk (issue 10).
//!
//! The local policy (`policy.rs`) compares text: `/var/lib/ferry-apps/a/data` lies within the
//! allowed prefix `/var/lib/ferry-apps`. But Docker follows symlinks in a bind's source, and the
//! directories below the prefix belong to the apps: an earlier release can plant
//! `/var/lib/ferry-apps/a/data -> /etc`, and a later release that binds that path would get the
//! host's `/etc`. So every component of the source below the prefix is looked at with `lstat`,
//! component by component from the prefix down, and a symlink (or a non-directory in the middle)
//! refuses the bind. The prefix itself and what lies above it are the operator's configuration
//! and are trusted as configured.
//!
//! The check runs twice: when a notice is verified (a refused bind is a `rejected` notice, nothing
//! started) and right before the container is created, where missing directories are created
//! one component at a time (`mkdir`, which never follows a symlink in its last component), as
//! Docker's own `Binds` would have done. What remains is the window between this check and
//! dockerd's mount (an app racing to swap a directory for a symlink); closing it needs the engine
//! to mount from a file descriptor, which Docker does not offer.

use std::io::ErrorKind;
use std::path::PathBuf;

use crate::verify::policy::path_within;

/// The directories from just below `prefix` down to `host`, in order. `None` when `host` does
/// not lie within `prefix` (text rules of [`path_within`]).
fn below(host: &str, prefix: &str) -> Option<Vec<PathBuf>> {
    if !path_within(host, prefix) {
        return None;
    }
    let comps = |s: &str| -> Vec<String> {
        s.split('/')
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect()
    };
    let (h, p) = (comps(host), comps(prefix));
    Some(
        (p.len() + 1..=h.len())
            .map(|n| PathBuf::from(format!("/{}", h[..n].join("/"))))
            .collect(),
    )
}

/// Check the source `host` of a bind allowed by `prefix`: no component below the prefix is a
/// symlink, and every one but the last is a directory. Missing components are fine (created at
/// the switch by [`prepare_source`]). `Err` is the reason, for people.
pub fn check_source(host: &str, prefix: &str) -> Result<(), String> {
    walk(host, prefix, false)
}

/// [`check_source`], creating missing directories on the way (mode 0755, as Docker would).
pub fn prepare_source(host: &str, prefix: &str) -> Result<(), String> {
    walk(host, prefix, true)
}

fn walk(host: &str, prefix: &str, create: bool) -> Result<(), String> {
    let dirs =
        below(host, prefix).ok_or_else(|| format!("bind source {host} is not within {prefix}"))?;
    let n = dirs.len();
    for (i, path) in dirs.iter().enumerate() {
        let last = i + 1 == n;
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if !create {
                    return Ok(());
                }
                match std::fs::create_dir(path) {
                    Ok(()) => {}
                    // Created meanwhile by someone else: look at what it is.
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
                }
                std::fs::symlink_metadata(path)
                    .map_err(|e| format!("cannot inspect {}: {e}", path.display()))?
            }
            Err(e) => return Err(format!("cannot inspect {}: {e}", path.display())),
        };
        if meta.file_type().is_symlink() {
            let to = std::fs::read_link(path)
                .map(|t| format!(" (-> {})", t.display()))
                .unwrap_or_default();
            return Err(format!(
                "bind source {host}: {} is a symlink{to}; binds never follow symlinks below {prefix}",
                path.display()
            ));
        }
        if !last && !meta.is_dir() {
            return Err(format!(
                "bind source {host}: {} is not a directory",
                path.display()
            ));
        }
    }
    Ok(())
}

/// A bind's container path: absolute, no `.` or `..` component, not `/`, and no `:` or `,`
/// (which would smuggle mount options such as `:rshared` into a bind string).
pub fn check_container_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("container path {p:?} is not absolute"));
    }
    if let Some(c) = p.chars().find(|c| matches!(c, ':' | ',')) {
        return Err(format!(
            "container path {p:?} contains {c:?} (it would carry mount options)"
        ));
    }
    if p.chars().any(char::is_control) {
        return Err(format!("container path {p:?} contains a control character"));
    }
    let comps: Vec<&str> = p.split('/').filter(|c| !c.is_empty()).collect();
    if comps.is_empty() {
        return Err("container path \"/\" would cover the whole container".into());
    }
    if comps.iter().any(|c| *c == "." || *c == "..") {
        return Err(format!("container path {p:?} has a . or .. component"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn s(p: &std::path::Path) -> String {
        p.display().to_string()
    }

    #[test]
    fn a_symlink_below_the_prefix_is_refused_at_any_depth() {
        let t = tempfile::tempdir().unwrap();
        let prefix = t.path().join("apps");
        std::fs::create_dir_all(prefix.join("a/real")).unwrap();
        symlink("/etc", prefix.join("a/data")).unwrap();
        symlink(prefix.join("a/real"), prefix.join("b")).unwrap();
        let p = s(&prefix);
        let e = check_source(&s(&prefix.join("a/data")), &p).unwrap_err();
        assert!(e.contains("is a symlink (-> /etc)"), "{e}");
        let e = check_source(&s(&prefix.join("a/data/passwd")), &p).unwrap_err();
        assert!(e.contains("a/data is a symlink"), "{e}");
        // Even to a directory inside the prefix.
        let e = check_source(&s(&prefix.join("b/x")), &p).unwrap_err();
        assert!(e.contains("is a symlink"), "{e}");
        assert!(prepare_source(&s(&prefix.join("a/data/x")), &p).is_err());
        assert!(!std::path::Path::new("/etc/x").exists());
        // Real directories pass; a missing rest is fine.
        check_source(&s(&prefix.join("a/real")), &p).unwrap();
        check_source(&s(&prefix.join("a/real/not/yet")), &p).unwrap();
        check_source(&p, &p).unwrap();
    }

    #[test]
    fn a_file_in_the_middle_is_refused_a_file_at_the_end_is_bound() {
        let t = tempfile::tempdir().unwrap();
        let prefix = t.path().join("apps");
        std::fs::create_dir_all(prefix.join("a")).unwrap();
        std::fs::write(prefix.join("a/cfg"), "x").unwrap();
        let p = s(&prefix);
        check_source(&s(&prefix.join("a/cfg")), &p).unwrap();
        let e = check_source(&s(&prefix.join("a/cfg/x")), &p).unwrap_err();
        assert!(e.contains("not a directory"), "{e}");
    }

    #[test]
    fn prepare_creates_missing_directories_one_by_one() {
        let t = tempfile::tempdir().unwrap();
        let prefix = t.path().join("apps");
        std::fs::create_dir(&prefix).unwrap();
        let deep = prefix.join("dev-1/sensors/hwmon0");
        prepare_source(&s(&deep), &s(&prefix)).unwrap();
        assert!(deep.is_dir());
        prepare_source(&s(&deep), &s(&prefix)).unwrap();
    }

    #[test]
    fn the_prefix_itself_may_be_a_symlink_the_operator_made() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("real")).unwrap();
        symlink(t.path().join("real"), t.path().join("apps")).unwrap();
        let prefix = s(&t.path().join("apps"));
        prepare_source(&format!("{prefix}/a"), &prefix).unwrap();
        assert!(t.path().join("real/a").is_dir());
    }

    #[test]
    fn outside_the_prefix_is_an_error() {
        assert!(check_source("/etc", "/var/lib/ferry-apps").is_err());
        assert!(check_source("/var/lib/ferry-apps/../etc", "/var/lib/ferry-apps").is_err());
    }

    #[test]
    fn container_paths() {
        for ok in ["/data", "/var/lib/x/", "/a b"] {
            check_container_path(ok).unwrap();
        }
        for bad in [
            "data",
            "/data:rshared",
            "/data,readonly",
            "/",
            "//",
            "/a/../etc",
            "/a/./b",
            "/a\nb",
            "",
        ] {
            assert!(check_container_path(bad).is_err(), "{bad:?}");
        }
    }
}
