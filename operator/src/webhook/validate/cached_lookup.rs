//! [`ClusterLookup`] from the operator's watch caches, the way Kubernetes' own admission
//! plugins and RBAC authorizer read informers rather than the API server.
//!
//! Every Role a Tenant brings is an admission, and reading its namespace, Tenant and
//! Roles from the API server was a third of all requests while 1000 Tenants were
//! created. From the caches:
//! - a miss (a namespace or Tenant created a moment ago, a cache not yet synced) is read
//!   from the API server, so nothing new is refused for being new;
//! - a refusal is confirmed against the API server before it is sent
//!   ([`ClusterLookup::live`]), so a stale cache never refuses a valid change (a Role
//!   inheriting one applied in the same `kubectl apply`);
//! - an admission may rest on a cache a watch event behind, as an RBAC decision does: a
//!   Role taken away a moment ago can still count for the escalation check.

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::UserInfo;
use k8s_openapi::api::core::v1::Namespace;
use kube::Resource as _;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use portcullis_crds::{Role, Tenant};

use super::lookup::{ClusterLookup, KubeLookup, LookupError};
use crate::stores::Synced;

/// A watch cache and whether it has had its first list.
#[derive(Clone)]
pub struct SyncedStore<K: kube::Resource<DynamicType = ()> + Clone + 'static> {
    /// The cache.
    pub store: Store<K>,
    /// Set once it holds every object.
    pub synced: Synced,
}

impl<K: kube::Resource<DynamicType = ()> + Clone + 'static> SyncedStore<K> {
    /// The cache, when it has synced.
    fn ready(&self) -> Option<&Store<K>> {
        self.synced.is_synced().then_some(&self.store)
    }
}

/// The caches the admission webhooks read.
#[derive(Clone)]
pub struct WebhookCaches {
    /// Every Tenant.
    pub tenants: SyncedStore<Tenant>,
    /// Every Role.
    pub roles: SyncedStore<Role>,
    /// Every namespace's metadata.
    pub namespaces: SyncedStore<PartialObjectMeta<Namespace>>,
}

/// Reads from [`WebhookCaches`], falling back to (and confirming refusals with) `live`,
/// a [`KubeLookup`] outside tests.
pub struct CachedLookup<L = KubeLookup> {
    live: L,
    caches: WebhookCaches,
}

impl<L: ClusterLookup> CachedLookup<L> {
    /// Reads `caches`, and `live` on a miss.
    pub fn new(live: L, caches: WebhookCaches) -> Self {
        Self { live, caches }
    }
}

impl<L> std::fmt::Debug for CachedLookup<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedLookup").finish_non_exhaustive()
    }
}

impl<L: ClusterLookup> ClusterLookup for CachedLookup<L> {
    fn namespace_labels<'a>(
        &'a self,
        namespace: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, LookupError>> {
        let cached = self
            .caches
            .namespaces
            .ready()
            .and_then(|store| store.get(&ObjectRef::new(namespace)));
        match cached {
            Some(found) => {
                let labels = found.meta().labels.clone().unwrap_or_default();
                Box::pin(async move { Ok(Some(labels)) })
            }
            None => self.live.namespace_labels(namespace),
        }
    }

    fn roles<'a>(&'a self, namespace: &'a str) -> BoxFuture<'a, Result<Vec<Role>, LookupError>> {
        match self.caches.roles.ready() {
            Some(store) => {
                let roles: Vec<Role> = store
                    .state()
                    .iter()
                    .filter(|r| r.metadata.namespace.as_deref() == Some(namespace))
                    .map(|r| Role::clone(r))
                    .collect();
                Box::pin(async move { Ok(roles) })
            }
            None => self.live.roles(namespace),
        }
    }

    fn tenants(&self) -> BoxFuture<'_, Result<Vec<Tenant>, LookupError>> {
        match self.caches.tenants.ready() {
            Some(store) => {
                let tenants: Vec<Tenant> = store.state().iter().map(|t| Tenant::clone(t)).collect();
                Box::pin(async move { Ok(tenants) })
            }
            None => self.live.tenants(),
        }
    }

    fn tenant<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Tenant>, LookupError>> {
        let cached = self
            .caches
            .tenants
            .ready()
            .and_then(|store| store.get(&ObjectRef::new(name)));
        match cached {
            Some(tenant) => {
                let tenant = Tenant::clone(&tenant);
                Box::pin(async move { Ok(Some(tenant)) })
            }
            None => self.live.tenant(name),
        }
    }

    fn is_portcullis_admin<'a>(
        &'a self,
        user: &'a UserInfo,
    ) -> BoxFuture<'a, Result<bool, LookupError>> {
        self.live.is_portcullis_admin(user)
    }

    fn live(&self) -> Option<&dyn ClusterLookup> {
        Some(&self.live)
    }
}

#[cfg(test)]
mod tests;
