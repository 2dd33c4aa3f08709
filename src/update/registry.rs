//! The real [`ManifestSource`]: the shared `ferry-registry` client, run off the async runtime.

use ferry_registry::{Credential, ManifestKind, RegistryClient, Repository};

use crate::runtime::RegistryAuth;
use crate::update::pull::{ManifestFacts, ManifestSource};

#[derive(Clone)]
pub struct RegistrySource {
    client: RegistryClient,
    creds: Vec<Credential>,
}

impl RegistrySource {
    pub fn new(creds: Vec<Credential>, insecure: Vec<String>) -> Self {
        RegistrySource {
            client: RegistryClient::new(creds.clone(), insecure),
            creds,
        }
    }
}

impl ManifestSource for RegistrySource {
    async fn image_manifest(&self, repo: &str, digest: &str) -> Result<ManifestFacts, String> {
        let client = self.client.clone();
        let (r, d) = (repo.to_string(), digest.to_string());
        let m = tokio::task::spawn_blocking(move || client.fetch_manifest_by_digest(&r, &d))
            .await
            .map_err(|e| format!("registry task: {e}"))?
            .map_err(|e| e.to_string())?;
        match &m.kind {
            ManifestKind::Image { config_size, .. } => Ok(ManifestFacts {
                download_bytes: m.layers_total() + config_size,
            }),
            ManifestKind::Index { .. } => Err(format!(
                "{repo}@{digest} is a multi-platform index; a release must name each platform's image manifest"
            )),
        }
    }

    fn auth_for(&self, repo: &str) -> Option<RegistryAuth> {
        let host = Repository::parse(repo).ok()?.registry.clone();
        self.creds
            .iter()
            .find(|c| c.registry == host)
            .map(|c| RegistryAuth {
                username: c.username.clone(),
                password: c.password.clone(),
                server: c.registry.clone(),
            })
    }
}
