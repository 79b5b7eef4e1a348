//! Read-only caches of Tenants, Roles and ApiKeys, kept by reflectors on every replica
//! (leader or not): the policy compiler reads them, and the controllers use them to look
//! across objects (a key's tenant and roles) without extra API calls.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::runtime::reflector::{self, Store, store::Writer};

use crate::ca::service_names::{self, ServiceSelector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use portcullis_crds::{ApiKey, Role, Tenant, role::RoleSpec};

use crate::policy::RevocationCaches;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The three caches, and those of issued certificates and pods when revocation runs.
#[derive(Clone)]
pub struct Stores {
    /// Every Tenant.
    pub tenants: Store<Tenant>,
    /// Every Role in every namespace.
    pub roles: Store<Role>,
    /// Every ApiKey in every namespace.
    pub keys: Store<ApiKey>,
    /// The issued-leaf ledgers and pod metadata, for revoking deleted pods'
    /// certificates; `None`: no revocation (tests, `policy dump`).
    pub revocations: Option<RevocationCaches>,
    /// Every Service, for the bundles' `serviceRevisions`; `None`: not listed.
    pub services: Option<Store<Service>>,
    /// Whether the Tenant cache has had its first list.
    pub tenants_synced: Synced,
    /// Whether the Role cache has had its first list.
    pub roles_synced: Synced,
}

/// Set once a reflector's store has had its first list, and read without waiting:
/// `Store::wait_until_ready` wakes only one waiter, so a second task polling it (a
/// webhook asking "may I read the cache yet?") could leave the first asleep.
#[derive(Clone, Debug, Default)]
pub struct Synced(Arc<AtomicBool>);

impl Synced {
    /// Whether the store has had its first list.
    pub fn is_synced(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    pub(crate) fn mark(&self) {
        self.0.store(true, Ordering::Release);
    }
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores")
            .field("tenants", &self.tenants.len())
            .field("roles", &self.roles.len())
            .field("keys", &self.keys.len())
            .field("revocations", &self.revocations)
            .finish()
    }
}

/// The writers behind [`Stores`], for tests that fill caches by hand.
pub struct StoreWriters {
    /// Tenants.
    pub tenants: Writer<Tenant>,
    /// Roles.
    pub roles: Writer<Role>,
    /// ApiKeys.
    pub keys: Writer<ApiKey>,
}

pub(crate) fn reflect<K>(
    api: Api<K>,
    writer: Writer<K>,
    changed: Arc<Notify>,
    shutdown: CancellationToken,
) -> JoinHandle<()>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    reflect_events(
        watcher(api, watcher::Config::default()),
        writer,
        changed,
        shutdown,
    )
}

/// Keeps `writer`'s store current from `events` (any watcher) until `shutdown`,
/// notifying `changed` on every event.
pub(crate) fn reflect_events<K, S>(
    events: S,
    writer: Writer<K>,
    changed: Arc<Notify>,
    shutdown: CancellationToken,
) -> JoinHandle<()>
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + 'static,
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    reflect_synced(events, writer, changed, Synced::default(), shutdown)
}

/// [`reflect_events`], marking `synced` once the store has had its first list.
pub(crate) fn reflect_synced<K, S>(
    events: S,
    writer: Writer<K>,
    changed: Arc<Notify>,
    synced: Synced,
    shutdown: CancellationToken,
) -> JoinHandle<()>
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + 'static,
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        let stream = reflector::reflector(writer, events.default_backoff())
            .take_until(shutdown.cancelled_owned());
        stream
            .for_each(|event| {
                match event {
                    Ok(event) => {
                        // The reflector has applied the event: after the first
                        // list's end the store holds every object.
                        if matches!(event, watcher::Event::InitDone) {
                            synced.mark();
                        }
                        changed.notify_one();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, kind = %K::kind(&()), "watch failed; retrying")
                    }
                }
                futures::future::ready(())
            })
            .await;
    })
}

impl Stores {
    /// Empty caches and their writers.
    pub fn new() -> (Self, StoreWriters) {
        let (tenants, tw) = reflector::store();
        let (roles, rw) = reflector::store();
        let (keys, kw) = reflector::store();
        (
            Self {
                tenants,
                roles,
                keys,
                revocations: None,
                services: None,
                tenants_synced: Synced::default(),
                roles_synced: Synced::default(),
            },
            StoreWriters {
                tenants: tw,
                roles: rw,
                keys: kw,
            },
        )
    }

    /// Starts the reflectors; `changed` is notified on every event.
    pub fn start(
        client: &Client,
        changed: Arc<Notify>,
        shutdown: &CancellationToken,
    ) -> (Self, Vec<JoinHandle<()>>) {
        let (stores, writers) = Self::new();
        let tasks = vec![
            reflect_synced(
                watcher(
                    Api::<Tenant>::all(client.clone()),
                    watcher::Config::default(),
                ),
                writers.tenants,
                changed.clone(),
                stores.tenants_synced.clone(),
                shutdown.clone(),
            ),
            reflect_synced(
                watcher(Api::<Role>::all(client.clone()), watcher::Config::default()),
                writers.roles,
                changed.clone(),
                stores.roles_synced.clone(),
                shutdown.clone(),
            ),
            reflect(
                Api::<ApiKey>::all(client.clone()),
                writers.keys,
                changed,
                shutdown.clone(),
            ),
        ];
        (stores, tasks)
    }

    /// Resolves once every cache has had its initial list (before that, every pod
    /// would look deleted). kube-runtime wakes only one waiter per store: call this
    /// from one task only.
    pub async fn wait_until_ready(&self) -> bool {
        self.tenants.wait_until_ready().await.is_ok()
            && self.roles.wait_until_ready().await.is_ok()
            && self.keys.wait_until_ready().await.is_ok()
            && match &self.revocations {
                Some(caches) => caches.wait_until_ready().await,
                None => true,
            }
    }

    /// Per namespace of `namespaces`, the revision of its Services' pod selectors
    /// (empty without a Service cache).
    pub fn service_revisions(&self, namespaces: &[String]) -> BTreeMap<String, String> {
        let Some(services) = &self.services else {
            return BTreeMap::new();
        };
        let state = services.state();
        namespaces
            .iter()
            .map(|namespace| {
                let selectors: Vec<ServiceSelector> = state
                    .iter()
                    .filter(|s| s.metadata.namespace.as_deref() == Some(namespace.as_str()))
                    .filter_map(|s| ServiceSelector::of(s))
                    .collect();
                (namespace.clone(), service_names::revision(&selectors))
            })
            .collect()
    }

    /// The Tenant that has bound `namespace` (its `status.namespaces` lists it).
    pub fn tenant_of_namespace(&self, namespace: &str) -> Option<Arc<Tenant>> {
        self.tenants.find(|t| {
            t.status
                .as_ref()
                .is_some_and(|s| s.namespaces.iter().any(|n| n == namespace))
        })
    }

    /// The namespaces a Tenant has bound.
    pub fn namespaces_of(tenant: &Tenant) -> Vec<String> {
        tenant
            .status
            .as_ref()
            .map(|s| s.namespaces.clone())
            .unwrap_or_default()
    }

    /// Roles of one namespace, by object name.
    pub fn roles_in(&self, namespace: &str) -> BTreeMap<String, RoleSpec> {
        self.roles
            .state()
            .iter()
            .filter(|r| r.metadata.namespace.as_deref() == Some(namespace))
            .filter_map(|r| Some((r.metadata.name.clone()?, r.spec.clone())))
            .collect()
    }

    /// Roles in any of `namespaces`.
    pub fn roles_in_any(&self, namespaces: &[String]) -> Vec<Arc<Role>> {
        self.roles.state_filter(|r| {
            r.metadata
                .namespace
                .as_ref()
                .is_some_and(|ns| namespaces.contains(ns))
        })
    }

    /// Every Role and ApiKey, grouped by namespace: one pass over each cache, so work
    /// for every Tenant costs the size of the caches once, not once per Tenant.
    pub fn by_namespace(&self) -> ByNamespace {
        ByNamespace {
            keys: group_by_namespace(self.keys.state()),
            roles: group_by_namespace(self.roles.state()),
        }
    }

    /// ApiKeys in any of `namespaces`.
    pub fn keys_in_any(&self, namespaces: &[String]) -> Vec<Arc<ApiKey>> {
        self.keys.state_filter(|k| {
            k.metadata
                .namespace
                .as_ref()
                .is_some_and(|ns| namespaces.contains(ns))
        })
    }
}

/// The Roles and ApiKeys of the caches at one moment, by namespace.
#[derive(Debug, Default)]
pub struct ByNamespace {
    keys: HashMap<String, Vec<Arc<ApiKey>>>,
    roles: HashMap<String, Vec<Arc<Role>>>,
}

impl ByNamespace {
    /// ApiKeys in any of `namespaces`.
    pub fn keys_in_any(&self, namespaces: &[String]) -> Vec<Arc<ApiKey>> {
        gather(&self.keys, namespaces)
    }

    /// Roles in any of `namespaces`.
    pub fn roles_in_any(&self, namespaces: &[String]) -> Vec<Arc<Role>> {
        gather(&self.roles, namespaces)
    }
}

fn group_by_namespace<K: Resource>(objects: Vec<Arc<K>>) -> HashMap<String, Vec<Arc<K>>> {
    let mut grouped: HashMap<String, Vec<Arc<K>>> = HashMap::new();
    for object in objects {
        if let Some(ns) = object.meta().namespace.clone() {
            grouped.entry(ns).or_default().push(object);
        }
    }
    grouped
}

fn gather<K>(grouped: &HashMap<String, Vec<Arc<K>>>, namespaces: &[String]) -> Vec<Arc<K>> {
    namespaces
        .iter()
        .filter_map(|ns| grouped.get(ns))
        .flatten()
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::json;

    use super::*;

    fn key(namespace: &str, name: &str) -> Arc<ApiKey> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"role": "Developer", "scopes": ["identify"]}
            }))
            .unwrap(),
        )
    }

    fn names(keys: &[Arc<ApiKey>]) -> BTreeSet<String> {
        keys.iter()
            .map(|k| k.metadata.name.clone().unwrap())
            .collect()
    }

    #[test]
    fn grouped_keys_are_those_of_the_asked_namespaces_only() {
        let grouped = ByNamespace {
            keys: group_by_namespace(vec![
                key("a", "k1"),
                key("b", "k2"),
                key("a", "k3"),
                key("c", "k4"),
            ]),
            ..ByNamespace::default()
        };
        let asked = ["a".to_owned(), "b".to_owned(), "missing".to_owned()];
        assert_eq!(
            names(&grouped.keys_in_any(&asked)),
            BTreeSet::from(["k1".to_owned(), "k2".to_owned(), "k3".to_owned()])
        );
        assert!(grouped.keys_in_any(&[]).is_empty());
        assert!(grouped.roles_in_any(&asked).is_empty());
    }
}
