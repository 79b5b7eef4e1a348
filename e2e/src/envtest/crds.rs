//! Installing the project's CustomResourceDefinitions (crds/*.yaml) into an envtest.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};

use super::{EnvTest, FIELD_MANAGER, HarnessError};

/// How long one CRD may take to become Established.
const ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(30);

/// The directory holding the generated CRD YAML files (`<workspace>/crds`).
pub fn crd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("crds")
}

impl EnvTest {
    /// Applies every CRD in [`crd_dir`] and waits until each is Established.
    /// Returns the CRD names in file order.
    pub async fn install_crds(&self) -> Result<Vec<String>, HarnessError> {
        self.install_crds_from(&crd_dir()).await
    }

    /// Applies every CustomResourceDefinition in the `*.yaml` / `*.yml` files of `dir`
    /// (sorted by file name; multi-document files allowed) with server-side apply, then
    /// waits until each one's `Established` condition is True.
    ///
    /// Idempotent, so tests sharing one instance may all call it. The documents are
    /// sent as written (not through the k8s-openapi types), so the server alone judges
    /// fields that 1.20 does not know.
    pub async fn install_crds_from(&self, dir: &Path) -> Result<Vec<String>, HarnessError> {
        let manifests = read_crd_manifests(dir)?;
        let api: Api<CustomResourceDefinition> = Api::all(self.client()?);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let mut names = Vec::with_capacity(manifests.len());
        for (path, name, doc) in &manifests {
            api.patch(name, &params, &Patch::Apply(doc))
                .await
                .map_err(|source| HarnessError::CrdApply {
                    path: path.clone(),
                    name: name.clone(),
                    source,
                })?;
            names.push(name.clone());
        }
        for name in &names {
            let established = await_condition(api.clone(), name, conditions::is_crd_established());
            match tokio::time::timeout(ESTABLISHED_TIMEOUT, established).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    return Err(HarnessError::CrdNotEstablished {
                        name: name.clone(),
                        reason: e.to_string(),
                    });
                }
                Err(_) => {
                    return Err(HarnessError::CrdNotEstablished {
                        name: name.clone(),
                        reason: format!("not Established within {ESTABLISHED_TIMEOUT:?}"),
                    });
                }
            }
        }
        Ok(names)
    }
}

/// (file, CRD name, document) for every CRD document under `dir`.
fn read_crd_manifests(
    dir: &Path,
) -> Result<Vec<(PathBuf, String, serde_json::Value)>, HarnessError> {
    let entries = std::fs::read_dir(dir).map_err(|source| HarnessError::Io {
        context: format!("reading CRD directory {}", dir.display()),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|ext| ext == "yaml" || ext == "yml")
        })
        .collect();
    files.sort();

    let mut manifests = Vec::new();
    for path in files {
        let manifest_error = |message: String| HarnessError::CrdManifest {
            path: path.clone(),
            message,
        };
        let text = std::fs::read_to_string(&path).map_err(|source| HarnessError::Io {
            context: format!("reading {}", path.display()),
            source,
        })?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let doc: serde_json::Value = serde::Deserialize::deserialize(document)
                .map_err(|e| manifest_error(e.to_string()))?;
            if doc.is_null() {
                continue; // an empty document, e.g. after a trailing `---`
            }
            let kind = doc.get("kind").and_then(|k| k.as_str());
            if kind != Some("CustomResourceDefinition") {
                return Err(manifest_error(format!(
                    "expected kind CustomResourceDefinition, found {kind:?}"
                )));
            }
            let name = doc
                .pointer("/metadata/name")
                .and_then(|n| n.as_str())
                .ok_or_else(|| manifest_error("metadata.name is missing".to_owned()))?
                .to_owned();
            manifests.push((path.clone(), name, doc));
        }
    }
    Ok(manifests)
}
