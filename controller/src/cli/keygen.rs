//! `ferryctl keygen --out DIR --name NAME [--force]`: an Ed25519 key pair from 32 bytes of OS
//! randomness, as `DIR/NAME.key` (PKCS#8 PEM, mode 0600) and `DIR/NAME.pub` (SPKI PEM), exactly
//! the formats `openssl genpkey -algorithm ed25519` / `openssl pkey -pubout` write.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use ferry_protocol::PrivateKey;

use crate::{usage, write_atomic, Output};

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Directory to write the key pair into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Base name of the files: NAME.key and NAME.pub.
    #[arg(long, value_name = "NAME")]
    pub name: String,
    /// Replace existing files.
    #[arg(long)]
    pub force: bool,
}

/// What keygen wrote.
#[derive(Debug, Clone)]
pub struct KeyFiles {
    pub private: PathBuf,
    pub public: PathBuf,
    pub keyid: String,
}

pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "key name {name:?}: use letters, digits, '.', '_' and '-' (not starting with '.')"
        ))
    }
}

/// Generate and write a key pair. Refuses to overwrite either file unless `force`.
pub fn generate(dir: &Path, name: &str, force: bool) -> anyhow::Result<KeyFiles> {
    check_name(name).map_err(usage)?;
    let private = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    if !force {
        for p in [&private, &public] {
            if p.symlink_metadata().is_ok() {
                bail!(
                    "{} already exists; refusing to overwrite a key (use --force to replace it)",
                    p.display()
                );
            }
        }
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;

    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no OS randomness: {e}"))?;
    let key = PrivateKey::from_seed(seed).context("cannot make a key from the seed")?;
    seed.fill(0);
    let keyid = key.public().id().to_string();
    let key_pem = key.to_pem();
    let pub_pem = key.public().to_pem();

    if force {
        write_atomic(&private, key_pem.as_bytes(), 0o600)?;
        write_atomic(&public, pub_pem.as_bytes(), 0o644)?;
    } else {
        write_new(&private, key_pem.as_bytes(), 0o600)?;
        if let Err(e) = write_new(&public, pub_pem.as_bytes(), 0o644) {
            let _ = fs::remove_file(&private);
            return Err(e);
        }
        crate::sync_dir(dir).with_context(|| format!("cannot sync {}", dir.display()))?;
    }
    // The umask may have cleared bits of 0644 (fine) but must not leave the key readable by
    // others: set the private key's mode explicitly.
    fs::set_permissions(&private, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot chmod {}", private.display()))?;
    Ok(KeyFiles {
        private,
        public,
        keyid,
    })
}

/// Create `path` exclusively (O_EXCL) with `mode`, write, fsync.
fn write_new(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

pub fn run(args: KeygenArgs, out: Output) -> anyhow::Result<()> {
    let files = generate(&args.out, &args.name, args.force)?;
    if out.json {
        out.json_doc(&serde_json::json!({
            "name": args.name,
            "keyid": files.keyid,
            "private_key": files.private,
            "public_key": files.public,
        }));
    } else {
        println!("keyid        {}", files.keyid);
        println!(
            "private key  {} (keep it secret; mode 0600)",
            files.private.display()
        );
        println!("public key   {}", files.public.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::PublicKey;

    #[test]
    fn writes_pair_with_modes_and_refuses_overwrite() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("keys");
        let f = generate(&dir, "release", false).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&f.private), 0o600);
        assert_eq!(mode(&f.public) & 0o600, 0o600);
        assert_eq!(mode(&f.public) & 0o022, 0);
        let k = PrivateKey::load(&f.private).unwrap();
        let p = PublicKey::load(&f.public).unwrap();
        assert_eq!(k.public(), &p);
        assert_eq!(p.id().to_string(), f.keyid);
        assert_eq!(f.keyid.len(), 64);

        let e = generate(&dir, "release", false).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        assert_eq!(
            PrivateKey::load(&f.private).unwrap().public(),
            &p,
            "untouched"
        );
        // Only the .pub left over also blocks.
        fs::remove_file(&f.private).unwrap();
        assert!(generate(&dir, "release", false).is_err());

        let g = generate(&dir, "release", true).unwrap();
        assert_ne!(g.keyid, f.keyid, "a fresh key");
        assert_eq!(mode(&g.private), 0o600);
        assert_eq!(
            PublicKey::load(&g.public).unwrap().id().to_string(),
            g.keyid
        );
        // No temp files left behind.
        let names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn openssl_derives_the_same_public_key() {
        let d = tempfile::tempdir().unwrap();
        let f = generate(d.path(), "ctl", false).unwrap();
        let out = match std::process::Command::new("openssl")
            .args(["pkey", "-in"])
            .arg(&f.private)
            .arg("-pubout")
            .output()
        {
            Ok(o) => o,
            Err(e) => {
                eprintln!("SKIPPED: openssl not runnable: {e}");
                return;
            }
        };
        assert!(
            out.status.success(),
            "openssl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            fs::read_to_string(&f.public).unwrap()
        );
    }

    #[test]
    fn names_checked() {
        assert!(check_name("release-2024.a_b").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        let d = tempfile::tempdir().unwrap();
        let e = generate(d.path(), "../escape", false).unwrap_err();
        assert_eq!(crate::exit_code(&e), crate::exit::USAGE);
    }
}
