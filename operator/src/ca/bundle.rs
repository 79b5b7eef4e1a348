//! Publishing the trust bundle as ConfigMap `portcullis-trust-bundle` in tenant
//! namespaces, by server-side apply.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::{Api, Client};

/// Name of the trust-bundle ConfigMap (contract).
pub const TRUST_BUNDLE_CONFIGMAP: &str = "portcullis-trust-bundle";
/// Data key holding the PEM roots (contract).
pub use portcullis_api::injection::env::TRUST_BUNDLE_KEY;
/// The operator's server-side apply field manager (one name for every object it applies).
pub use portcullis_crds::annotations::FIELD_MANAGER;

/// Namespaces the bundle could not be written to.
#[derive(Debug, thiserror::Error)]
#[error("trust bundle not published to {}", failures.iter().map(|(ns, e)| format!("{ns} ({e})")).collect::<Vec<_>>().join(", "))]
pub struct PublishError {
    /// Namespace and error, for each failure.
    pub failures: Vec<(String, kube::Error)>,
}

/// The ConfigMap applied in `namespace`.
pub fn trust_bundle_configmap(namespace: &str, bundle_pem: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(TRUST_BUNDLE_CONFIGMAP.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".into(),
                FIELD_MANAGER.into(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            TRUST_BUNDLE_KEY.into(),
            bundle_pem.into(),
        )])),
        ..ConfigMap::default()
    }
}

/// Applies the bundle in every namespace; tries them all and reports those that failed.
pub async fn publish_trust_bundle(
    client: Client,
    namespaces: &[String],
    bundle_pem: &str,
) -> Result<(), PublishError> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut failures = Vec::new();
    for namespace in namespaces {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        // k8s-openapi serialises apiVersion and kind, as server-side apply requires.
        let configmap = trust_bundle_configmap(namespace, bundle_pem);
        if let Err(e) = api
            .patch(TRUST_BUNDLE_CONFIGMAP, &params, &Patch::Apply(&configmap))
            .await
        {
            failures.push((namespace.clone(), e));
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(PublishError { failures })
    }
}
