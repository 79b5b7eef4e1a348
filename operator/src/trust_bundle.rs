//! Keeps ConfigMap `portcullis-trust-bundle` (key `ca-bundle.crt`) current in every
//! namespace a Tenant has bound: after every CA rotation, whenever a Tenant's bound
//! namespaces change (from the Tenant cache), and every [`RESYNC`] to repair a deleted
//! or edited ConfigMap. Runs on the leader only.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use kube::runtime::reflector::Store;
use portcullis_crds::Tenant;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::ca::{CertificateAuthority, publish_trust_bundle};
use crate::stores::Stores;

/// Every namespace's ConfigMap is re-applied this often.
pub const RESYNC: Duration = Duration::from_secs(600);
/// A failed namespace is retried after this long.
const RETRY: Duration = Duration::from_secs(5);

/// The namespaces every Tenant has bound (`status.namespaces`).
pub fn bound_namespaces(tenants: &[Arc<Tenant>]) -> BTreeSet<String> {
    tenants
        .iter()
        .flat_map(|t| Stores::namespaces_of(t))
        .collect()
}

/// Publishes the trust bundle into tenant namespaces.
#[derive(Clone)]
pub struct TrustBundlePublisher {
    client: Client,
    ca: Arc<CertificateAuthority>,
    tenants: Store<Tenant>,
    tenants_changed: Arc<Notify>,
}

impl std::fmt::Debug for TrustBundlePublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundlePublisher")
            .finish_non_exhaustive()
    }
}

impl TrustBundlePublisher {
    /// Publishes `ca`'s bundle into the namespaces of the Tenants in `tenants`;
    /// `tenants_changed` is notified on every change of the cache.
    pub fn new(
        client: Client,
        ca: Arc<CertificateAuthority>,
        tenants: Store<Tenant>,
        tenants_changed: Arc<Notify>,
    ) -> Self {
        Self {
            client,
            ca,
            tenants,
            tenants_changed,
        }
    }

    /// Publishes until `shutdown` (the end of this replica's leadership term).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut rotations = self.ca.subscribe();
        // What each namespace holds, as far as this term knows: a new term re-applies all.
        let mut published: BTreeMap<String, String> = BTreeMap::new();
        let mut next_resync = tokio::time::Instant::now() + RESYNC;
        loop {
            let bundle = self.ca.trust_bundle_pem();
            let wanted = bound_namespaces(&self.tenants.state());
            published.retain(|ns, _| wanted.contains(ns));
            let due: Vec<String> = wanted
                .iter()
                .filter(|ns| published.get(*ns) != Some(&bundle))
                .cloned()
                .collect();
            let mut failed = false;
            if !due.is_empty() {
                let result = publish_trust_bundle(self.client.clone(), &due, &bundle).await;
                let failures: BTreeSet<String> = match result {
                    Ok(()) => BTreeSet::new(),
                    Err(e) => {
                        tracing::warn!(error = %e, "trust bundle not published everywhere; retrying");
                        e.failures.into_iter().map(|(ns, _)| ns).collect()
                    }
                };
                failed = !failures.is_empty();
                for ns in due.into_iter().filter(|ns| !failures.contains(ns)) {
                    tracing::info!(namespace = %ns, "trust bundle published");
                    published.insert(ns, bundle.clone());
                }
            }
            let wait = if failed {
                RETRY
            } else {
                next_resync.saturating_duration_since(tokio::time::Instant::now())
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = rotations.changed() => if changed.is_err() { return },
                () = self.tenants_changed.notified() => {}
                () = tokio::time::sleep(wait) => {
                    if tokio::time::Instant::now() >= next_resync {
                        published.clear();
                        next_resync = tokio::time::Instant::now() + RESYNC;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str, namespaces: Option<&[&str]>) -> Arc<Tenant> {
        let mut object = serde_json::json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
            "metadata": {"name": name}, "spec": {"namespaces": []}
        });
        if let Some(namespaces) = namespaces {
            object["status"] = serde_json::json!({"namespaces": namespaces});
        }
        Arc::new(serde_json::from_value(object).unwrap_or_else(|e| panic!("{e}")))
    }

    #[test]
    fn bound_namespaces_come_from_every_tenant_status_once() {
        let tenants = vec![
            tenant("a", Some(&["a", "b"])),
            tenant("b", Some(&["b", "c"])),
            tenant("c", None),
        ];
        assert_eq!(
            bound_namespaces(&tenants).into_iter().collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
    }
}
