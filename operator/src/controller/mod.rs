//! The three controllers and their wiring: what each watches and which objects a change
//! of another kind re-queues. Each runs until `shutdown` and then finishes the
//! reconciles in flight.

pub mod apikey;
pub mod frame;
pub mod key_lifecycle;
pub mod key_secrets;
pub mod role;
pub mod serving_certificates;
pub mod tenant;
pub mod tenant_changes;
pub mod tenant_dek;
pub mod tenant_network;
pub mod tenant_secrets;
pub mod unprotected;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role as RbacRole, RoleBinding};
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

/// Tenants for a namespace event: those that name it, select namespaces, or label it.
fn tenants_for_namespace(
    tenants: &kube::runtime::reflector::Store<Tenant>,
    ns: &Namespace,
) -> Vec<ObjectRef<Tenant>> {
    let name = ns.name_any();
    let label = ns.labels().get(TENANT_LABEL).cloned();
    tenants
        .state()
        .iter()
        .filter(|t| {
            t.spec.namespaces.contains(&name)
                || t.spec.namespace_selector.is_some()
                || label.as_deref() == t.metadata.name.as_deref()
        })
        .map(|t| ObjectRef::from_obj(t.as_ref()))
        .collect()
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
    let controller = Controller::new(
        Api::<Tenant>::all(client.clone()),
        watcher::Config::default(),
    )
    .with_config(config);
    let tenants = controller.store();
    let (by_key, by_role, by_pod) = (ctx.stores.clone(), ctx.stores.clone(), ctx.stores.clone());
    let injects = ctx.settings.inject.clone();
    controller
        .watches(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
            move |ns| tenants_for_namespace(&tenants, &ns),
        )
        .watches(
            Api::<ApiKey>::all(client.clone()),
            watcher::Config::default(),
            move |key| tenant_of(&by_key, key.namespace()),
        )
        // Built-in Roles (re-created when deleted) and the counts in the status.
        .watches(
            Api::<Role>::all(client.clone()),
            watcher::Config::default(),
            move |role| tenant_of(&by_role, role.namespace()),
        )
        // Its NetworkPolicies, put back when edited or deleted.
        .watches(
            Api::<NetworkPolicy>::all(client.clone()),
            watcher::Config::default().labels(TENANT_LABEL),
            |policy| {
                let tenant = policy.labels().get(TENANT_LABEL)?;
                Some(ObjectRef::<Tenant>::new(tenant))
            },
        )
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
        .run(tenant::reconcile, frame::error_policy, ctx)
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
    let owned = watcher::Config::default().labels(crate::rbac::ROLE_LABEL);
    let controller = Controller::new(Api::<Role>::all(client.clone()), watcher::Config::default())
        .with_config(Config::default().debounce(CACHE_CATCH_UP));
    let roles = controller.store();
    let siblings = roles.clone();
    let role_tenants = TenantChanges::default();
    controller
        .owns(Api::<RbacRole>::all(client.clone()), owned.clone())
        .owns(Api::<RoleBinding>::all(client.clone()), owned)
        // A parent's change can change every Role of its namespace.
        .watches(
            Api::<Role>::all(client.clone()),
            watcher::Config::default(),
            move |changed| {
                let ns = changed.namespace();
                siblings
                    .state()
                    .iter()
                    .filter(|r| r.namespace() == ns && r.name_any() != changed.name_any())
                    .map(|r| ObjectRef::from_obj(r.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
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
        .run(role::reconcile, frame::error_policy, ctx)
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
