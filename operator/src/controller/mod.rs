//! The three controllers and their wiring: what each watches and which objects a change
//! of another kind re-queues. Each runs until `shutdown` and then finishes the
//! reconciles in flight.

pub mod apikey;
pub mod applied;
pub mod frame;
pub mod key_lifecycle;
pub mod key_secrets;
pub mod role;
pub mod role_watches;
pub mod serving_certificates;
pub mod tenant;
pub mod tenant_changes;
pub mod tenant_dek;
pub mod tenant_network;
pub mod tenant_secrets;
pub mod tenant_watches;
pub mod triggers;
pub mod unprotected;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::controller::{Config, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use portcullis_crds::{ApiKey, Role, Tenant, tenant::TENANT_LABEL};
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::stores::Stores;
use tenant_changes::TenantChanges;

/// Runs the Tenant, Role and ApiKey controllers until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    tokio::join!(
        run_tenants(ctx.clone(), shutdown.clone()),
        run_roles(ctx.clone(), shutdown.clone()),
        run_api_keys(ctx, shutdown),
    );
}

fn log_result<K: kube::Resource, E: std::fmt::Display, Q: std::fmt::Display>(
    result: Result<
        (ObjectRef<K>, kube::runtime::controller::Action),
        kube::runtime::controller::Error<E, Q>,
    >,
) -> futures::future::Ready<()> {
    match result {
        Ok((object, _)) => tracing::debug!(%object, "reconciled"),
        // The error policy has logged reconcile failures already.
        Err(kube::runtime::controller::Error::ReconcilerFailed(_, object)) => {
            tracing::debug!(%object, "reconcile failed")
        }
        Err(e) => tracing::warn!(error = %e, "controller"),
    }
    futures::future::ready(())
}

/// Tenants for a namespace event: those that name it, select namespaces, or label it;
/// not the Tenant that lists it, holds its label and reports no namespace problem (its
/// own binding: the reconcile that bound it reports it), unless it is going away.
fn tenants_for_namespace(
    tenants: &kube::runtime::reflector::Store<Tenant>,
    ns: &Namespace,
) -> Vec<ObjectRef<Tenant>> {
    let name = ns.name_any();
    let label = ns.labels().get(TENANT_LABEL).cloned();
    let deleting = ns.metadata.deletion_timestamp.is_some();
    tenants
        .state()
        .iter()
        .filter(|t| {
            let lists = t.spec.namespaces.contains(&name);
            let labelled = label.as_deref() == t.metadata.name.as_deref();
            if lists && labelled && !deleting && !reports_namespace_problem(t) {
                return t.spec.namespace_selector.is_some();
            }
            lists || labelled || t.spec.namespace_selector.is_some()
        })
        .map(|t| ObjectRef::from_obj(t.as_ref()))
        .collect()
}

/// The Tenant's Ready condition says a namespace is missing or taken.
fn reports_namespace_problem(tenant: &Tenant) -> bool {
    let conditions = tenant.status.as_ref().map(|s| s.conditions.as_slice());
    portcullis_crds::conditions::find_ready(conditions.unwrap_or_default()).is_some_and(|c| {
        c.status != "True" && ["NamespaceNotFound", "NamespaceClaimed"].contains(&c.reason.as_str())
    })
}

/// Deletes `object` if the owner with `owner_uid` owns it; one someone else created
/// under that name is left alone, and one already gone counts as deleted.
pub(crate) async fn delete_if_owned<K>(
    api: &Api<K>,
    object: Option<K>,
    owner_uid: &str,
) -> crate::error::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let Some(object) = object else {
        return Ok(());
    };
    if !object.owner_references().iter().any(|o| o.uid == owner_uid) {
        return Ok(());
    }
    match api
        .delete(&object.name_any(), &kube::api::DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if crate::error::is_api_code(&e, 404) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The Tenant named by an object's tenant label.
fn labelled_tenant<K: kube::Resource>(object: &K) -> Option<ObjectRef<Tenant>> {
    let tenant = object.labels().get(TENANT_LABEL)?;
    Some(ObjectRef::new(tenant))
}

fn tenant_of(stores: &Stores, namespace: Option<String>) -> Option<ObjectRef<Tenant>> {
    stores
        .tenant_of_namespace(&namespace?)
        .map(|t| ObjectRef::from_obj(t.as_ref()))
}

/// How many different Tenants are reconciled at once: each makes ~15 API calls, so the
/// API server's latency, not the operator's CPU, bounds a serial run (1000 Tenants took
/// ~6.5 minutes one at a time).
const TENANT_CONCURRENCY: u16 = 16;

async fn run_tenants(ctx: Arc<Context>, shutdown: CancellationToken) {
    let client = ctx.client.clone();
    // Different Tenants at once (one Tenant is never reconciled twice at a time); two
    // racing for one namespace cannot both win it: binding is a compare-and-swap on
    // the namespace's resourceVersion.
    let config = Config::default()
        .concurrency(TENANT_CONCURRENCY)
        .debounce(Duration::from_millis(300));
    let watches = tenant_watches::TenantWatches::new(&client);
    let (own, tenants) = watches.tenants;
    let caches = watches.caches;
    let controller = Controller::for_stream(own, tenants.clone()).with_config(config);
    let (by_key, by_role, by_pod) = (ctx.stores.clone(), ctx.stores.clone(), ctx.stores.clone());
    let injects = ctx.settings.inject.clone();
    controller
        .watches_stream(watches.namespaces, move |ns| {
            tenants_for_namespace(&tenants, &ns)
        })
        .watches_stream(watches.keys, move |key| tenant_of(&by_key, key.namespace()))
        // The counts in the status (built-in Roles are counted as applied).
        .watches_stream(watches.roles, move |role| {
            if role.labels().contains_key(tenant::BUILTIN_LABEL) {
                return None;
            }
            tenant_of(&by_role, role.namespace())
        })
        // Built-in Roles and NetworkPolicies, put back when edited or deleted.
        .watches_stream(watches.builtin_roles, |role| labelled_tenant(&role))
        .watches_stream(watches.network_policies, |policy| labelled_tenant(&policy))
        // Pods without a genuine proxy are reported on their Tenant; pods with it never
        // trigger a reconcile, so ordinary pod churn costs nothing here.
        .watches(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default(),
            move |pod| {
                if unprotected::exposure(&pod, &injects).is_some() {
                    tenant_of(&by_pod, pod.namespace())
                } else {
                    None
                }
            },
        )
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(
            move |tenant, ctx| tenant::reconcile_with(tenant, ctx, Some(caches.clone())),
            frame::error_policy,
            ctx,
        )
        .for_each(log_result)
        .await;
}

/// How long Role and ApiKey reconciles wait after their trigger. They read the Tenant
/// from the shared cache, a different watch than the one that triggered them; without
/// the wait a reconcile could read the Tenant as it was just before the change, and
/// [`TenantChanges`] sends no second trigger for the status updates that follow.
const CACHE_CATCH_UP: Duration = Duration::from_millis(250);

async fn run_roles(ctx: Arc<Context>, shutdown: CancellationToken) {
    let client = ctx.client.clone();
    let watches = role_watches::RoleWatches::new(&client);
    let (own, roles) = watches.roles;
    let caches = watches.caches;
    let controller = Controller::for_stream(own, roles.clone())
        .with_config(Config::default().debounce(CACHE_CATCH_UP));
    let siblings = roles.clone();
    let role_tenants = TenantChanges::default();
    controller
        .owns_stream(watches.rbac_roles)
        .owns_stream(watches.role_bindings)
        // A parent's change can change every Role of its namespace.
        .watches_stream(watches.parents, move |changed| {
            let ns = changed.namespace();
            siblings
                .state()
                .iter()
                .filter(|r| r.namespace() == ns && r.name_any() != changed.name_any())
                .map(|r| ObjectRef::from_obj(r.as_ref()))
                .collect::<Vec<_>>()
        })
        // The catalogue (for allScopes) and the binding live on the Tenant.
        .watches(
            Api::<Tenant>::all(client),
            watcher::Config::default(),
            move |tenant| {
                let namespaces = role_tenants.namespaces_to_revisit(&tenant);
                if namespaces.is_empty() {
                    return Vec::new();
                }
                roles
                    .state()
                    .iter()
                    .filter(|r| r.namespace().is_some_and(|ns| namespaces.contains(&ns)))
                    .map(|r| ObjectRef::from_obj(r.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(
            move |role, ctx| role::reconcile_with(role, ctx, Some(caches.clone())),
            frame::error_policy,
            ctx,
        )
        .for_each(log_result)
        .await;
}

/// ApiKey reconciles in flight at once. Unbounded, a cold start with 10k keys holds
/// every reconcile's requests and responses in memory together (measured 442 MiB peak);
/// the API server answers no faster past a few dozen concurrent writes anyway.
const KEY_RECONCILES_IN_FLIGHT: u16 = 32;

async fn run_api_keys(ctx: Arc<Context>, shutdown: CancellationToken) {
    let client = ctx.client.clone();
    let controller = Controller::new(
        Api::<ApiKey>::all(client.clone()),
        watcher::Config::default(),
    )
    .with_config(
        Config::default()
            .concurrency(KEY_RECONCILES_IN_FLIGHT)
            .debounce(CACHE_CATCH_UP),
    );
    let keys = controller.store();
    let by_tenant = keys.clone();
    let key_tenants = TenantChanges::default();
    controller
        // Key Secrets, watched only in bound namespaces (the operator may not read
        // Secrets elsewhere): a deleted Secret gets its key re-issued.
        .reconcile_on(key_secrets::triggers(
            client.clone(),
            ctx.stores.clone(),
            shutdown.clone(),
        ))
        // A role change can grant or withdraw a key's scopes (directly or by inheritance,
        // so every key of the namespace is looked at again).
        .watches(
            Api::<Role>::all(client.clone()),
            watcher::Config::default(),
            move |role| {
                let ns = role.namespace();
                keys.state()
                    .iter()
                    .filter(|k| k.namespace() == ns)
                    .map(|k| ObjectRef::from_obj(k.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        // The tenant binds the namespace and holds the catalogue and defaults.
        .watches(
            Api::<Tenant>::all(client),
            watcher::Config::default(),
            move |tenant| {
                let namespaces = key_tenants.namespaces_to_revisit(&tenant);
                if namespaces.is_empty() {
                    return Vec::new();
                }
                by_tenant
                    .state()
                    .iter()
                    .filter(|k| k.namespace().is_some_and(|ns| namespaces.contains(&ns)))
                    .map(|k| ObjectRef::from_obj(k.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(apikey::reconcile, frame::error_policy, ctx)
        .for_each(log_result)
        .await;
}

#[cfg(test)]
mod tests {
    use kube::runtime::watcher::Event;
    use serde_json::json;

    use super::*;

    fn tenant(name: &str, namespaces: &[&str], ready: Option<(&str, &str)>) -> Tenant {
        let conditions: Vec<serde_json::Value> = ready
            .map(|(status, reason)| {
                json!({"type": "Ready", "status": status, "reason": reason, "message": "",
                       "lastTransitionTime": "2026-01-01T00:00:00Z"})
            })
            .into_iter()
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
            "metadata": {"name": name},
            "spec": {"namespaces": namespaces},
            "status": {"conditions": conditions}
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn namespace(label: Option<&str>, deleting: bool) -> Namespace {
        serde_json::from_value(json!({"metadata": {
            "name": "shared",
            "labels": label.map(|l| json!({TENANT_LABEL: l})),
            "deletionTimestamp": deleting.then_some("2026-01-01T00:00:00Z"),
        }}))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn woken(tenants: &[Tenant], ns: &Namespace) -> Vec<String> {
        let (store, mut writer) = kube::runtime::reflector::store();
        for t in tenants {
            writer.apply_watcher_event(&Event::Apply(t.clone()));
        }
        let mut names: Vec<String> = tenants_for_namespace(&store, ns)
            .into_iter()
            .map(|r| r.name)
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_tenant_binding_its_namespace_is_not_woken_by_it_but_a_rival_is() {
        let tenants = [
            tenant("acme", &["shared"], None),
            tenant("globex", &["shared"], None),
        ];
        assert_eq!(woken(&tenants, &namespace(Some("acme"), false)), ["globex"]);
        assert_eq!(woken(&tenants, &namespace(None, false)), ["acme", "globex"]);
    }

    #[test]
    fn a_namespace_going_away_or_awaited_wakes_its_tenant() {
        let bound = [tenant("acme", &["shared"], Some(("True", "Bound")))];
        assert_eq!(woken(&bound, &namespace(Some("acme"), true)), ["acme"]);
        let waiting = [tenant(
            "acme",
            &["shared"],
            Some(("False", "NamespaceNotFound")),
        )];
        assert_eq!(woken(&waiting, &namespace(Some("acme"), false)), ["acme"]);
    }
}
