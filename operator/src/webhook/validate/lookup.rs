//! What the webhooks read: namespace labels, a namespace's Roles, the Tenants, and
//! whether a user is a cluster admin (SubjectAccessReview). A trait so the admission
//! handlers run against fixtures in tests; [`KubeLookup`] reads the API server (a GET
//! or LIST per question), and [`CachedLookup`](super::cached_lookup::CachedLookup) the
//! operator's watch caches in front of it. A namespace's Tenant is found by name from
//! its label; only namespaces not yet labelled fall back to every Tenant.

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::UserInfo;
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview};
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::ListParams;
use portcullis_crds::tenant::TENANT_LABEL;
use portcullis_crds::{Role, Tenant};

use super::{Catalogue, NamespaceRoles, TenantClaims};

/// A read from the API server failed.
#[derive(Debug, thiserror::Error)]
#[error("reading {what}: {source}")]
pub struct LookupError {
    /// What was being read.
    pub what: String,
    /// The API error.
    #[source]
    pub source: kube::Error,
}

/// Reads the cluster state the webhooks decide on.
pub trait ClusterLookup: Send + Sync {
    /// The labels of `namespace`; `None` when it does not exist.
    fn namespace_labels<'a>(
        &'a self,
        namespace: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, LookupError>>;
    /// The Role objects in `namespace`.
    fn roles<'a>(&'a self, namespace: &'a str) -> BoxFuture<'a, Result<Vec<Role>, LookupError>>;
    /// Every Tenant.
    fn tenants(&self) -> BoxFuture<'_, Result<Vec<Tenant>, LookupError>>;
    /// The Tenant called `name`; `None` when it does not exist. Default: searched in
    /// [`tenants`](Self::tenants).
    fn tenant<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Tenant>, LookupError>> {
        Box::pin(async move {
            Ok(self
                .tenants()
                .await?
                .into_iter()
                .find(|t| t.metadata.name.as_deref() == Some(name)))
        })
    }
    /// Whether the API server's authorizer lets `user` do anything (`*`) to every
    /// resource (`*`) of `portcullis.dev`, cluster-wide — a cluster admin however
    /// bound (e.g. kubeadm's `kubeadm:cluster-admins` group). Asked only when the
    /// escalation check would refuse. Default: no one.
    fn is_portcullis_admin<'a>(
        &'a self,
        user: &'a UserInfo,
    ) -> BoxFuture<'a, Result<bool, LookupError>> {
        let _ = user;
        Box::pin(async { Ok(false) })
    }
    /// The same questions answered by the API server itself, to confirm a refusal this
    /// lookup's answers led to; `None` when this lookup already reads there.
    fn live(&self) -> Option<&dyn ClusterLookup> {
        None
    }
}

/// [`ClusterLookup`] over a kube client.
#[derive(Clone)]
pub struct KubeLookup {
    client: kube::Client,
}

impl KubeLookup {
    /// Reads through `client`.
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }
}

impl std::fmt::Debug for KubeLookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeLookup").finish_non_exhaustive()
    }
}

fn failed(what: impl Into<String>) -> impl FnOnce(kube::Error) -> LookupError {
    let what = what.into();
    move |source| LookupError { what, source }
}

impl ClusterLookup for KubeLookup {
    fn namespace_labels<'a>(
        &'a self,
        namespace: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, LookupError>> {
        Box::pin(async move {
            let api: Api<Namespace> = Api::all(self.client.clone());
            let found = api
                .get_opt(namespace)
                .await
                .map_err(failed(format!("namespace {namespace}")))?;
            Ok(found.map(|ns| ns.metadata.labels.unwrap_or_default()))
        })
    }

    fn roles<'a>(&'a self, namespace: &'a str) -> BoxFuture<'a, Result<Vec<Role>, LookupError>> {
        Box::pin(async move {
            let api: Api<Role> = Api::namespaced(self.client.clone(), namespace);
            let list = api
                .list(&ListParams::default())
                .await
                .map_err(failed(format!("roles.portcullis.dev in {namespace}")))?;
            Ok(list.items)
        })
    }

    fn tenants(&self) -> BoxFuture<'_, Result<Vec<Tenant>, LookupError>> {
        Box::pin(async move {
            let api: Api<Tenant> = Api::all(self.client.clone());
            let list = api
                .list(&ListParams::default())
                .await
                .map_err(failed("tenants"))?;
            Ok(list.items)
        })
    }

    fn tenant<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Tenant>, LookupError>> {
        Box::pin(async move {
            let api: Api<Tenant> = Api::all(self.client.clone());
            api.get_opt(name)
                .await
                .map_err(failed(format!("tenant {name}")))
        })
    }

    fn is_portcullis_admin<'a>(
        &'a self,
        user: &'a UserInfo,
    ) -> BoxFuture<'a, Result<bool, LookupError>> {
        Box::pin(async move {
            crate::access_review::allowed(&self.client, &portcullis_admin_review(user))
                .await
                .map_err(failed("a SubjectAccessReview"))
        })
    }
}

/// The SubjectAccessReview asking whether `user` may `*` `*` in group `portcullis.dev`
/// cluster-wide.
pub fn portcullis_admin_review(user: &UserInfo) -> SubjectAccessReview {
    crate::access_review::review(
        user,
        ResourceAttributes {
            group: Some(portcullis_crds::GROUP.into()),
            resource: Some("*".into()),
            verb: Some("*".into()),
            ..ResourceAttributes::default()
        },
    )
}

/// The Roles of `namespace` (built-ins included).
pub async fn namespace_roles(
    lookup: &dyn ClusterLookup,
    namespace: &str,
) -> Result<NamespaceRoles, LookupError> {
    Ok(NamespaceRoles::new(
        namespace,
        lookup.roles(namespace).await?,
    ))
}

/// The scope catalogue of the tenant owning `namespace`: by the namespace's tenant
/// label, else by a Tenant listing it.
pub async fn catalogue(
    lookup: &dyn ClusterLookup,
    namespace: &str,
) -> Result<Catalogue, LookupError> {
    let labels = lookup
        .namespace_labels(namespace)
        .await?
        .unwrap_or_default();
    if let Some(name) = labels.get(TENANT_LABEL)
        && let Some(tenant) = lookup.tenant(name).await?
    {
        return Ok(Catalogue::of(&tenant));
    }
    let tenants = lookup.tenants().await?;
    Ok(tenants
        .iter()
        .find(|t| t.spec.namespaces.iter().any(|n| n == namespace))
        .map(Catalogue::of)
        .unwrap_or_default())
}

/// Every tenant's claims plus the tenant labels of `namespaces`.
pub async fn tenant_claims(
    lookup: &dyn ClusterLookup,
    namespaces: &[String],
) -> Result<TenantClaims, LookupError> {
    let tenants = lookup.tenants().await?;
    let mut claims = TenantClaims::new(&tenants);
    for namespace in namespaces {
        if let Some(labels) = lookup.namespace_labels(namespace).await?
            && let Some(owner) = labels.get(TENANT_LABEL)
        {
            claims.claim(namespace, owner);
        }
    }
    Ok(claims)
}
