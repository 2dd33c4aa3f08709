//! Test keys: a release key and a controller key with random seeds, written as PEM files
//! (PKCS#8 private, SPKI public) in a temp dir, plus extra keys on demand.

use std::path::{Path, PathBuf};

use ferry_protocol::PrivateKey;

/// One key and its PEM files.
pub struct Key {
    pub name: String,
    pub key: PrivateKey,
    /// SPKI PEM (`-----BEGIN PUBLIC KEY-----`): what the agent's `trust` lists.
    pub public_pem: PathBuf,
    /// PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`): for openssl.
    pub private_pem: PathBuf,
}

impl Key {
    /// A key from a random seed, written as `<dir>/<name>.pub` and `<dir>/<name>.key`.
    pub fn generate(dir: &Path, name: &str) -> Key {
        let mut seed = [0u8; 32];
        for b in seed.iter_mut() {
            *b = fastrand::u8(..);
        }
        let key = PrivateKey::from_seed(seed).expect("ed25519 key from seed");
        Key::write(dir, name, key)
    }

    /// Write an existing key's PEM files.
    pub fn write(dir: &Path, name: &str, key: PrivateKey) -> Key {
        let public_pem = dir.join(format!("{name}.pub"));
        let private_pem = dir.join(format!("{name}.key"));
        std::fs::write(&public_pem, key.public().to_pem()).expect("write public key");
        std::fs::write(&private_pem, key.to_pem()).expect("write private key");
        Key {
            name: name.to_string(),
            key,
            public_pem,
            private_pem,
        }
    }

    /// The key id (hex SHA-256 of the raw public key).
    pub fn keyid(&self) -> String {
        self.key.public().id().to_string()
    }
}

/// The keys of one test: `release` (trusted for the release role) and `controller` (trusted for
/// the controller role). Extra keys ([`TestKeys::extra`]) are trusted by nobody until a test puts
/// their `public_pem` into an agent's config.
pub struct TestKeys {
    dir: tempfile::TempDir,
    pub release: Key,
    pub controller: Key,
}

impl TestKeys {
    pub fn new() -> TestKeys {
        let dir = tempfile::tempdir().expect("temp dir for keys");
        let release = Key::generate(dir.path(), "release");
        let controller = Key::generate(dir.path(), "controller");
        TestKeys {
            dir,
            release,
            controller,
        }
    }

    /// A fresh random key named `name` (e.g. "untrusted", "release2"), its PEMs in the key dir.
    pub fn extra(&self, name: &str) -> Key {
        Key::generate(self.dir.path(), name)
    }

    /// The directory holding the PEM files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for TestKeys {
    fn default() -> Self {
        TestKeys::new()
    }
}
