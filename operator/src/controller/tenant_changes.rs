//! Which Tenant events the Role and ApiKey controllers act on. A Tenant's status changes
//! with every key and Role it counts; requeuing every key and Role of its namespaces on
//! each of those made issuing 10k keys cost ~7 ApiKey reconciles per key and 1000
//! Tenants ~19 Role reconciles per Tenant reconcile. What those reconcilers read from a
//! Tenant is its spec (generation), the namespaces it has bound, and whether it is
//! going away, so only a change of those requeues anything.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, PoisonError};

use kube::ResourceExt;
use portcullis_crds::Tenant;

use crate::stores::Stores;

/// What of a Tenant the dependent reconcilers read.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fingerprint {
    generation: Option<i64>,
    deleting: bool,
    finalizers: Vec<String>,
    namespaces: Vec<String>,
}

impl Fingerprint {
    fn of(tenant: &Tenant) -> Self {
        Self {
            generation: tenant.metadata.generation,
            deleting: tenant.metadata.deletion_timestamp.is_some(),
            finalizers: tenant.finalizers().to_vec(),
            namespaces: Stores::namespaces_of(tenant),
        }
    }

    /// The API server is about to forget this Tenant (or has).
    fn gone(&self) -> bool {
        self.deleting && self.finalizers.is_empty()
    }
}

/// The last fingerprint seen per Tenant, for one controller's watch.
#[derive(Debug, Default)]
pub struct TenantChanges {
    seen: Mutex<HashMap<String, Fingerprint>>,
}

impl TenantChanges {
    /// The namespaces whose objects must be looked at again after this event of
    /// `tenant`: the ones it had bound and the ones it binds now (a namespace it let go
    /// of must hear about it too). Empty when nothing they read has changed.
    pub fn namespaces_to_revisit(&self, tenant: &Tenant) -> BTreeSet<String> {
        let now = Fingerprint::of(tenant);
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let before = if now.gone() {
            seen.remove(&tenant.name_any())
        } else {
            seen.insert(tenant.name_any(), now.clone())
        };
        if before.as_ref() == Some(&now) {
            return BTreeSet::new();
        }
        before
            .into_iter()
            .flat_map(|b| b.namespaces)
            .chain(now.namespaces)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use portcullis_crds::tenant::TenantStatus;
    use serde_json::json;

    use super::*;

    fn tenant(generation: i64, namespaces: &[&str], keys: u32) -> Tenant {
        let mut t: Tenant = serde_json::from_value(json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
            "metadata": {"name": "acme", "generation": generation,
                         "finalizers": ["portcullis.dev/tenant"]},
            "spec": {"namespaces": namespaces}
        }))
        .unwrap();
        t.status = Some(TenantStatus {
            namespaces: namespaces.iter().map(|n| (*n).to_owned()).collect(),
            api_keys: keys,
            ..TenantStatus::default()
        });
        t
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn a_count_in_the_status_requeues_nothing() {
        let changes = TenantChanges::default();
        assert_eq!(
            changes.namespaces_to_revisit(&tenant(1, &["a"], 0)),
            set(&["a"])
        );
        assert!(
            changes
                .namespaces_to_revisit(&tenant(1, &["a"], 1))
                .is_empty()
        );
        assert!(
            changes
                .namespaces_to_revisit(&tenant(1, &["a"], 2))
                .is_empty()
        );
    }

    #[test]
    fn a_spec_change_requeues_its_namespaces() {
        let changes = TenantChanges::default();
        changes.namespaces_to_revisit(&tenant(1, &["a", "b"], 0));
        assert_eq!(
            changes.namespaces_to_revisit(&tenant(2, &["a", "b"], 0)),
            set(&["a", "b"])
        );
    }

    #[test]
    fn a_released_namespace_is_requeued_with_the_kept_ones() {
        let changes = TenantChanges::default();
        changes.namespaces_to_revisit(&tenant(1, &["a", "b"], 0));
        assert_eq!(
            changes.namespaces_to_revisit(&tenant(1, &["b", "c"], 0)),
            set(&["a", "b", "c"])
        );
    }

    #[test]
    fn deletion_requeues_until_the_tenant_is_gone_and_forgets_it() {
        let changes = TenantChanges::default();
        let mut t = tenant(1, &["a"], 0);
        changes.namespaces_to_revisit(&t);
        t.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::UNIX_EPOCH,
        ));
        assert_eq!(changes.namespaces_to_revisit(&t), set(&["a"]));
        t.metadata.finalizers = None;
        assert_eq!(changes.namespaces_to_revisit(&t), set(&["a"]));
        // Forgotten: a new Tenant of the same name starts afresh.
        assert_eq!(
            changes.namespaces_to_revisit(&tenant(1, &["a"], 0)),
            set(&["a"])
        );
    }
}
