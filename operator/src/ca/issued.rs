//! The ledger of issued workload certificates: for every leaf the identity service signs,
//! its serial, the pod it was issued to (UID) and its notAfter, kept per tenant in the
//! ConfigMap `portcullis-leaves-<tenant>` in the operator's namespace. The policy
//! compiler compares it with the pods that exist and publishes the leaves of deleted
//! pods as revoked until they expire ([`crate::policy::revocations`]), so a certificate
//! dies with its pod instead of living out its rotation period + grace.
//!
//! A ConfigMap rather than memory so every replica (the compiler runs on all of them)
//! sees the same ledger and a restart loses nothing; entries are added with a JSON
//! merge patch (no read-modify-write race between replicas), and expired ones are
//! dropped in the same patch.

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde::{Deserialize, Serialize};

use super::authenticator::LookupError;

/// Prefix of each tenant's ledger ConfigMap.
pub const LEDGER_PREFIX: &str = "portcullis-leaves-";
/// Label on every ledger ConfigMap (value `true`), for the compiler's watch.
pub const LEDGER_LABEL: &str = "portcullis.dev/issued-leaves";

/// One issued leaf.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedLeaf {
    /// The pod's UID.
    pub pod_uid: String,
    /// `namespace/name` of the pod.
    pub pod: String,
    /// The leaf's workload SPIFFE ID.
    pub spiffe_id: String,
    /// When it was signed.
    pub issued_at: Timestamp,
    /// When it expires.
    pub not_after: Timestamp,
}

/// The ledger ConfigMap's name for `tenant`.
pub fn ledger_name(tenant: &str) -> String {
    format!("{LEDGER_PREFIX}{tenant}")
}

/// The leaves of one ledger ConfigMap, by serial (unreadable entries are skipped).
pub fn leaves_of(config_map: &ConfigMap) -> BTreeMap<String, IssuedLeaf> {
    config_map
        .data
        .iter()
        .flatten()
        .filter_map(|(serial, value)| Some((serial.clone(), serde_json::from_str(value).ok()?)))
        .collect()
}

/// Where issued leaves are recorded.
pub trait LeafLedger: Send + Sync {
    /// Records `leaf` (serial `serial`) for `tenant`; the certificate must not be handed
    /// out when this fails.
    fn record<'a>(
        &'a self,
        tenant: &'a str,
        serial: &'a str,
        leaf: &'a IssuedLeaf,
    ) -> BoxFuture<'a, Result<(), LookupError>>;
}

/// The ledger in ConfigMaps of the operator's namespace.
#[derive(Clone)]
pub struct KubeLeafLedger {
    api: Api<ConfigMap>,
}

impl std::fmt::Debug for KubeLeafLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeLeafLedger")
    }
}

impl KubeLeafLedger {
    /// A ledger in `namespace` (the operator's).
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
        }
    }

    async fn record_leaf(
        &self,
        tenant: &str,
        serial: &str,
        leaf: &IssuedLeaf,
    ) -> Result<(), LookupError> {
        let name = ledger_name(tenant);
        let failed = |e: kube::Error| LookupError(format!("ConfigMap {name}: {e}"));
        let value =
            serde_json::to_string(leaf).map_err(|e| LookupError(format!("ledger entry: {e}")))?;
        let mut data = serde_json::Map::new();
        // Expired leaves need no revocation any more: drop them while we are here.
        if let Some(existing) = self.api.get_opt(&name).await.map_err(failed)? {
            for (old, entry) in leaves_of(&existing) {
                if entry.not_after <= leaf.issued_at {
                    data.insert(old, serde_json::Value::Null);
                }
            }
        } else {
            let created = ConfigMap {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.clone()),
                    labels: Some(BTreeMap::from([(
                        LEDGER_LABEL.to_owned(),
                        "true".to_owned(),
                    )])),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([(serial.to_owned(), value.clone())])),
                ..Default::default()
            };
            match self.api.create(&PostParams::default(), &created).await {
                Ok(_) => return Ok(()),
                // Another replica created it first: add our entry below.
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                Err(e) => return Err(failed(e)),
            }
        }
        data.insert(serial.to_owned(), serde_json::Value::String(value));
        let patch = serde_json::json!({ "data": data });
        self.api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(failed)?;
        Ok(())
    }
}

impl LeafLedger for KubeLeafLedger {
    fn record<'a>(
        &'a self,
        tenant: &'a str,
        serial: &'a str,
        leaf: &'a IssuedLeaf,
    ) -> BoxFuture<'a, Result<(), LookupError>> {
        Box::pin(self.record_leaf(tenant, serial, leaf))
    }
}
