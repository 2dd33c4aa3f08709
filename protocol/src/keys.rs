//! Ed25519 keys in the formats operators already use (protocol §1).
//!
//! Private keys are PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), public keys SPKI PEM
//! (`-----BEGIN PUBLIC KEY-----`), byte-compatible with `openssl genpkey -algorithm ed25519`
//! and `openssl pkey -pubout`. A key's id is the lowercase hex SHA-256 of its 32 raw bytes.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePublicKey, KeypairBytes};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::error::KeyError;

/// `keyid`: lowercase hex SHA-256 of the raw 32-byte public key.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(String);

impl KeyId {
    pub fn of(key: &VerifyingKey) -> Self {
        KeyId(hex::encode(Sha256::digest(key.as_bytes())))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", &self.0[..16.min(self.0.len())])
    }
}

/// The two signing roles of protocol §1. A key trusted for one role is never accepted for the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Release,
    Controller,
    /// The offline role that signs trust records (protocol §10).
    Root,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Release => "release",
            Role::Controller => "controller",
            Role::Root => "root",
        })
    }
}

/// A public key, parsed from SPKI PEM and checked not to be a weak (small-order) point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    key: VerifyingKey,
    id: KeyId,
}

impl PublicKey {
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let key = VerifyingKey::from_public_key_pem(pem.trim())
            .map_err(|e| KeyError::Parse(format!("not an Ed25519 SPKI PEM public key: {e}")))?;
        Self::from_verifying_key(key)
    }

    pub fn from_verifying_key(key: VerifyingKey) -> Result<Self, KeyError> {
        if key.is_weak() {
            return Err(KeyError::Parse(
                "weak (small-order) Ed25519 public key".into(),
            ));
        }
        Ok(PublicKey {
            id: KeyId::of(&key),
            key,
        })
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|e| KeyError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        Self::from_pem(&text).map_err(|e| KeyError::InFile {
            path: path.display().to_string(),
            source: Box::new(e),
        })
    }

    pub fn id(&self) -> &KeyId {
        &self.id
    }

    pub fn verifying_key(&self) -> &VerifyingKey {
        &self.key
    }

    pub fn to_pem(&self) -> String {
        self.key
            .to_public_key_pem(LineEnding::LF)
            .expect("encoding a valid Ed25519 key cannot fail")
    }

    /// Strict Ed25519 verification (rejects non-canonical signatures and small-order components).
    pub fn verify_strict(&self, msg: &[u8], sig: &[u8]) -> bool {
        let Ok(sig) = Signature::from_slice(sig) else {
            return false;
        };
        self.key.verify_strict(msg, &sig).is_ok()
    }
}

/// A private signing key (PKCS#8 PEM).
pub struct PrivateKey {
    key: SigningKey,
    public: PublicKey,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey({:?})", self.public.id())
    }
}

impl PrivateKey {
    /// A new key from 32 bytes of OS randomness.
    pub fn from_seed(seed: [u8; 32]) -> Result<Self, KeyError> {
        let key = SigningKey::from_bytes(&seed);
        let public = PublicKey::from_verifying_key(key.verifying_key())?;
        Ok(PrivateKey { key, public })
    }

    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let key = SigningKey::from_pkcs8_pem(pem.trim())
            .map_err(|e| KeyError::Parse(format!("not an Ed25519 PKCS#8 PEM private key: {e}")))?;
        let public = PublicKey::from_verifying_key(key.verifying_key())?;
        Ok(PrivateKey { key, public })
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|e| KeyError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        Self::from_pem(&text).map_err(|e| KeyError::InFile {
            path: path.display().to_string(),
            source: Box::new(e),
        })
    }

    /// PKCS#8 v1 PEM, exactly the shape `openssl genpkey -algorithm ed25519` writes.
    pub fn to_pem(&self) -> String {
        let kp = KeypairBytes {
            secret_key: self.key.to_bytes(),
            public_key: None,
        };
        kp.to_pkcs8_pem(LineEnding::LF)
            .expect("encoding a valid Ed25519 key cannot fail")
            .to_string()
    }

    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.key.sign(msg).to_bytes()
    }
}

/// The keys a verifier trusts for one role, deduplicated by key bytes.
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<KeyId, PublicKey>,
}

impl TrustedKeys {
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> Self {
        let mut map = BTreeMap::new();
        for k in keys {
            map.insert(k.id().clone(), k);
        }
        TrustedKeys { keys: map }
    }

    pub fn load(paths: &[impl AsRef<Path>]) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        for p in paths {
            keys.push(PublicKey::load(p.as_ref())?);
        }
        Ok(Self::new(keys))
    }

    pub fn get(&self, id: &str) -> Option<&PublicKey> {
        self.keys
            .iter()
            .find(|(k, _)| k.as_str() == id)
            .map(|(_, v)| v)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn ids(&self) -> impl Iterator<Item = &KeyId> {
        self.keys.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip_and_keyid() {
        let k = PrivateKey::from_seed([7u8; 32]).unwrap();
        let pem = k.to_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let k2 = PrivateKey::from_pem(&pem).unwrap();
        assert_eq!(k.public(), k2.public());
        let pubpem = k.public().to_pem();
        assert!(pubpem.starts_with("-----BEGIN PUBLIC KEY-----"));
        let p = PublicKey::from_pem(&pubpem).unwrap();
        assert_eq!(p.id().as_str().len(), 64);
        assert_eq!(
            p.id().as_str(),
            hex::encode(Sha256::digest(p.verifying_key().as_bytes()))
        );
    }

    #[test]
    fn rejects_garbage_and_wrong_kind() {
        assert!(PublicKey::from_pem("hello").is_err());
        let k = PrivateKey::from_seed([1u8; 32]).unwrap();
        // A private key is not a public key and vice versa.
        assert!(PublicKey::from_pem(&k.to_pem()).is_err());
        assert!(PrivateKey::from_pem(&k.public().to_pem()).is_err());
    }

    #[test]
    fn trusted_keys_dedupe_by_bytes() {
        let k = PrivateKey::from_seed([3u8; 32]).unwrap();
        let t = TrustedKeys::new([k.public().clone(), k.public().clone()]);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn openssl_generated_key_parses() {
        // Produced by `openssl genpkey -algorithm ed25519` and `openssl pkey -pubout`.
        let sk = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJBWdS5EZ8KmHyBPmo0QN9WzslIsRVzwUIpAEOclzURG\n-----END PRIVATE KEY-----\n";
        let pk = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAAk6569Hyb8P67tiMomamCn0HfWlRRbZ7Sn9UgOCVcgM=\n-----END PUBLIC KEY-----\n";
        let k = PrivateKey::from_pem(sk).unwrap();
        assert_eq!(k.to_pem(), sk, "we write what openssl writes");
        assert_eq!(k.public().to_pem(), pk);
        assert_eq!(PublicKey::from_pem(pk).unwrap(), *k.public());
    }
}
