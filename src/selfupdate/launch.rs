//! **Which agent binary runs**, decided first thing at every start, before the config's daemon
//! work begins. systemd always starts the packaged `/usr/bin/ferry-agent`; it is the launcher:
//!
//! - no `current` in `state_dir/agent`: it runs itself;
//! - `current` is older than or the same as the packaged binary: `dpkg -i` of a newer package
//!   won; the state dir's versions are forgotten and it runs itself;
//! - `current` is on trial (`trial.json`) and was started [`MAX_TRIAL_STARTS`] times without
//!   confirming (it crashed, hung until the systemd watchdog killed it, or did not reach the
//!   broker in time): the box goes back to `previous` on its own, with the reason kept in
//!   `fallback.json` for the report;
//! - otherwise it counts the start (for a version on trial) and `exec`s `current` with the same
//!   arguments: the same PID, so systemd's `Type=notify` and watchdog follow it.
//!
//! The decision reads and writes only the state dir; it needs no network.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

use crate::selfupdate::layout::{AgentDir, Fallback};

/// Starts of a version on trial before the box goes back to the previous one.
pub const MAX_TRIAL_STARTS: u32 = 3;

#[derive(Debug, PartialEq, Eq)]
pub enum Launch {
    /// This binary is the one to run.
    RunSelf,
    /// Replace this process by that binary.
    Exec(PathBuf),
}

/// Decide which binary runs (see the module docs). `own` is this binary's version, `own_exe`
/// its path (`/proc/self/exe`).
pub fn decide(dir: &AgentDir, own: &semver::Version, own_exe: &Path) -> io::Result<Launch> {
    let installed = dir.holds(own_exe);
    // At most: a fallback, then the decision on what it left.
    for _ in 0..3 {
        let Some(cur) = dir.current() else {
            return Ok(Launch::RunSelf);
        };
        let path = dir.binary(&cur);
        if same_file(own_exe, &path) {
            return Ok(Launch::RunSelf);
        }
        if !installed && *own >= cur {
            tracing::info!(packaged = %own, current = %cur, "the packaged agent is as new as the installed one or newer (dpkg won): running it");
            dir.forget()?;
            return Ok(Launch::RunSelf);
        }
        let trial = dir.trial().filter(|t| t.version == cur);
        let back_to = dir.previous().unwrap_or_else(|| {
            if installed {
                trial
                    .as_ref()
                    .map_or_else(|| own.clone(), |t| t.from.clone())
            } else {
                own.clone()
            }
        });
        let missing = !is_executable(&path);
        match &trial {
            Some(t) if t.attempts >= MAX_TRIAL_STARTS || missing => {
                let reason = if missing {
                    format!("agent {cur} is not installed ({} missing)", path.display())
                } else {
                    format!(
                        "agent {cur} was started {} times without confirming (it exited, hung or did \
                         not reach the broker in time); back to {back_to}",
                        t.attempts
                    )
                };
                tracing::error!(version = %cur, back_to = %back_to, %reason, "going back to the previous agent");
                dir.fall_back(&Fallback {
                    version: cur.clone(),
                    back_to,
                    sequence: t.sequence,
                    reason,
                })?;
                continue;
            }
            Some(t) => {
                let mut t = t.clone();
                t.attempts += 1;
                dir.write_trial(&t)?;
                tracing::info!(version = %cur, attempt = t.attempts, max = MAX_TRIAL_STARTS, "starting the agent on trial");
            }
            None if missing => {
                // A committed version vanished (an operator, a disk error): run what is here.
                tracing::error!(version = %cur, "the current agent binary is missing; running this one");
                dir.fall_back(&Fallback {
                    version: cur.clone(),
                    back_to,
                    sequence: 0,
                    reason: format!("agent {cur}'s binary is missing"),
                })?;
                continue;
            }
            None => {}
        }
        return Ok(Launch::Exec(path));
    }
    Ok(Launch::RunSelf)
}

/// Replace this process by `path` with the same arguments. Returns only on failure.
pub fn exec(path: &Path) -> io::Error {
    use std::os::unix::process::CommandExt;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    std::process::Command::new(path).args(args).exec()
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn v(s: &str) -> semver::Version {
        s.parse().unwrap()
    }

    struct Box_ {
        _d: tempfile::TempDir,
        dir: AgentDir,
        packaged: PathBuf,
    }

    fn a_box() -> Box_ {
        let d = tempfile::tempdir().unwrap();
        let packaged = d.path().join("usr-bin-ferry-agent");
        std::fs::write(&packaged, b"\x7fELF packaged").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&packaged, std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir = AgentDir::new(&d.path().join("state"));
        Box_ {
            dir,
            packaged,
            _d: d,
        }
    }

    fn install(b: &Box_, ver: &str) -> PathBuf {
        b.dir
            .install(&v(ver), "sha256:x", |f| {
                f.write_all(format!("\x7fELF {ver}").as_bytes())
            })
            .unwrap()
    }

    #[test]
    fn nothing_installed_runs_the_packaged_binary() {
        let b = a_box();
        assert_eq!(
            decide(&b.dir, &v("0.1.0"), &b.packaged).unwrap(),
            Launch::RunSelf
        );
    }

    #[test]
    fn a_newer_installed_version_is_started_counted_and_falls_back_after_the_bound() {
        let b = a_box();
        let p = install(&b, "0.1.1");
        b.dir.switch_to(&v("0.1.1"), &v("0.1.0"), 5, false).unwrap();
        for n in 1..=MAX_TRIAL_STARTS {
            assert_eq!(
                decide(&b.dir, &v("0.1.0"), &b.packaged).unwrap(),
                Launch::Exec(p.clone())
            );
            assert_eq!(b.dir.trial().unwrap().attempts, n);
            // The exec'd binary runs itself.
            assert_eq!(decide(&b.dir, &v("0.1.1"), &p).unwrap(), Launch::RunSelf);
        }
        // One start too many: back to the packaged binary, with the reason for the report.
        assert_eq!(
            decide(&b.dir, &v("0.1.0"), &b.packaged).unwrap(),
            Launch::RunSelf
        );
        assert_eq!(b.dir.current(), None);
        let fb = b.dir.take_fallback().unwrap();
        assert_eq!(
            (fb.version, fb.back_to, fb.sequence),
            (v("0.1.1"), v("0.1.0"), 5)
        );
        assert!(fb.reason.contains("3 times"), "{}", fb.reason);
    }

    #[test]
    fn a_committed_version_is_not_counted() {
        let b = a_box();
        let p = install(&b, "0.1.1");
        b.dir.switch_to(&v("0.1.1"), &v("0.1.0"), 5, false).unwrap();
        b.dir.clear_trial().unwrap();
        for _ in 0..10 {
            assert_eq!(
                decide(&b.dir, &v("0.1.0"), &b.packaged).unwrap(),
                Launch::Exec(p.clone())
            );
        }
    }

    #[test]
    fn a_failing_trial_goes_back_to_the_previous_installed_version() {
        let b = a_box();
        let p1 = install(&b, "0.1.1");
        install(&b, "0.1.2");
        b.dir.switch_to(&v("0.1.2"), &v("0.1.1"), 9, true).unwrap();
        let mut t = b.dir.trial().unwrap();
        t.attempts = MAX_TRIAL_STARTS;
        b.dir.write_trial(&t).unwrap();
        assert_eq!(
            decide(&b.dir, &v("0.1.0"), &b.packaged).unwrap(),
            Launch::Exec(p1)
        );
        assert_eq!(b.dir.current(), Some(v("0.1.1")));
        assert_eq!(b.dir.take_fallback().unwrap().back_to, v("0.1.1"));
    }

    #[test]
    fn a_newer_package_wins_over_the_installed_versions() {
        let b = a_box();
        install(&b, "0.1.1");
        b.dir.switch_to(&v("0.1.1"), &v("0.1.0"), 5, false).unwrap();
        b.dir.clear_trial().unwrap();
        // dpkg -i installed 0.2.0 at /usr/bin.
        assert_eq!(
            decide(&b.dir, &v("0.2.0"), &b.packaged).unwrap(),
            Launch::RunSelf
        );
        assert_eq!(b.dir.current(), None);
    }

    #[test]
    fn a_missing_binary_on_trial_falls_back_at_once() {
        let b = a_box();
        let p = install(&b, "0.1.1");
        b.dir.switch_to(&v("0.1.1"), &v("0.1.0"), 5, false).unwrap();
        std::fs::remove_file(&p).unwrap();
        assert_eq!(
            decide(&b.dir, &v("0.1.0"), &b.packaged).unwrap(),
            Launch::RunSelf
        );
        assert!(b
            .dir
            .take_fallback()
            .unwrap()
            .reason
            .contains("not installed"));
    }

    /// A power cut at each durable step of a self-update, from the extraction to the commit:
    /// whatever the state dir holds afterwards, the launcher starts a complete, executable
    /// binary, the old one before the `current` rename and the new one (counted) after it. Both
    /// from the packaged binary and from an installed version (`previous` comes into play).
    #[test]
    fn a_power_cut_at_any_step_leaves_one_of_the_two_binaries_to_run() {
        for from_installed in [false, true] {
            let (old, new) = if from_installed {
                ("0.1.1", "0.1.2")
            } else {
                ("0.1.0", "0.1.1")
            };
            // Each step as the install, the switch, the first start and the commit make it,
            // in their order (layout.rs): the state after a cut is a prefix of these.
            type Step = Box<dyn Fn(&Box_)>;
            let steps: Vec<(&str, Step)> = vec![
                (
                    "half the binary extracted (the temp file)",
                    Box::new(move |b: &Box_| {
                        let d = b.dir.root().join(new);
                        std::fs::create_dir_all(&d).unwrap();
                        std::fs::write(d.join(".ferry-agent.tmp"), b"\x7fEL").unwrap();
                    }),
                ),
                (
                    "the binary renamed, no digest yet",
                    Box::new(move |b: &Box_| {
                        let d = b.dir.root().join(new);
                        std::fs::rename(d.join(".ferry-agent.tmp"), b.dir.binary(&v(new))).unwrap();
                    }),
                ),
                (
                    "installed (binary and digest)",
                    Box::new(move |b: &Box_| {
                        install(b, new);
                    }),
                ),
                (
                    "the trial record",
                    Box::new(move |b: &Box_| {
                        b.dir
                            .write_trial(&crate::selfupdate::layout::Trial {
                                version: v(new),
                                from: v(old),
                                attempts: 0,
                                sequence: 7,
                            })
                            .unwrap();
                    }),
                ),
                (
                    "previous and current switched",
                    Box::new(move |b: &Box_| {
                        b.dir
                            .switch_to(&v(new), &v(old), 7, from_installed)
                            .unwrap();
                    }),
                ),
                (
                    "the new agent confirmed",
                    Box::new(move |b: &Box_| {
                        b.dir.clear_trial().unwrap();
                    }),
                ),
            ];
            for cut in 0..=steps.len() {
                let b = a_box();
                let old_exe = if from_installed {
                    let p = install(&b, old);
                    b.dir.switch_to(&v(old), &v("0.1.0"), 3, false).unwrap();
                    b.dir.clear_trial().unwrap();
                    p
                } else {
                    b.packaged.clone()
                };
                for (_, step) in &steps[..cut] {
                    step(&b);
                }
                let after = if cut == 0 {
                    "nothing"
                } else {
                    steps[cut - 1].0
                };
                let ctx = format!("from {old}, power cut after: {after}");
                let switched = cut >= 5;
                let runs = match decide(&b.dir, &v("0.1.0"), &b.packaged).unwrap() {
                    Launch::RunSelf => b.packaged.clone(),
                    Launch::Exec(p) => p,
                };
                assert!(is_executable(&runs), "{ctx}: {}", runs.display());
                let bytes = std::fs::read(&runs).unwrap();
                assert!(bytes.starts_with(b"\x7fELF"), "{ctx}: a whole binary");
                let expected = if switched {
                    b.dir.binary(&v(new))
                } else {
                    old_exe.clone()
                };
                assert_eq!(runs, expected, "{ctx}");
                // On trial: this start was counted; committed: not.
                let trial = b.dir.trial().filter(|t| t.version == v(new));
                match cut {
                    5 => assert_eq!(trial.map(|t| t.attempts), Some(1), "{ctx}"),
                    6 => assert!(trial.is_none(), "{ctx}"),
                    _ => {}
                }
                assert!(b.dir.fallback().is_none(), "{ctx}: nothing to go back from");
            }
        }
    }
}
