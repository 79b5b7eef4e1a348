//! What every controller shares, written once (the shape of kube-rs's controller-rs):
//! the reconcile wrapper (a span naming the object, the duration metric, forgetting the
//! object's failures once it succeeds), the error policy (count, back off per object)
//! and the status write (server-side apply of the whole status, skipped when unchanged).

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;

use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt as _};
use portcullis_crds::{ApiKey, Role, Tenant, annotations::FIELD_MANAGER};
use serde::Serialize;
use tracing::Instrument as _;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::metrics::Kind;

/// A kind the operator reconciles.
pub trait Reconciled: Resource<DynamicType = ()> + Clone + Debug + Send + Sync + 'static {
    /// Its label in metrics.
    const KIND: Kind;
}

impl Reconciled for Tenant {
    const KIND: Kind = Kind::Tenant;
}

impl Reconciled for Role {
    const KIND: Kind = Kind::Role;
}

impl Reconciled for ApiKey {
    const KIND: Kind = Kind::ApiKey;
}

/// `Kind/namespace/name` (or `Kind/name`): how logs, spans and the per-object failure
/// count name an object.
pub fn object_key<K: Reconciled>(object: &K) -> String {
    match object.namespace() {
        Some(namespace) => format!("{}/{namespace}/{}", K::kind(&()), object.name_any()),
        None => format!("{}/{}", K::kind(&()), object.name_any()),
    }
}

/// Runs one reconcile of `object` inside a span naming it, timed under its kind, and
/// clears its failure count when it succeeds.
pub async fn reconcile<K, F, Fut>(object: Arc<K>, ctx: Arc<Context>, run: F) -> Result<Action>
where
    K: Reconciled,
    F: FnOnce(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action>>,
{
    let key = object_key(object.as_ref());
    let span = tracing::info_span!("reconcile", object = %key);
    async move {
        let _timer = ctx.metrics.reconcile(K::KIND);
        let result = run(object, ctx.clone()).await;
        if result.is_ok() {
            ctx.succeeded(&key).await;
        }
        result
    }
    .instrument(span)
    .await
}

/// The error policy of every kind: count the failure under its variant name and retry
/// with exponential backoff per object.
pub fn error_policy<K: Reconciled>(object: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = object_key(object.as_ref());
    let _span = tracing::info_span!("reconcile", object = %key).entered();
    ctx.error_policy(K::KIND, &key, error)
}

/// Writes `status` as the object's whole status with server-side apply (the operator
/// owns every status field), unless it equals `current`.
pub async fn apply_status<K, S>(
    api: &Api<K>,
    name: &str,
    current: Option<&S>,
    status: &S,
) -> Result<()>
where
    K: Reconciled + serde::de::DeserializeOwned,
    S: Serialize + PartialEq,
{
    if current == Some(status) {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_keys_name_the_kind_and_the_namespace_when_there_is_one() {
        let tenant: Tenant = serde_json::from_value(serde_json::json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
            "metadata": {"name": "acme"}, "spec": {"namespaces": []}
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(object_key(&tenant), "Tenant/acme");
        let key: ApiKey = serde_json::from_value(serde_json::json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": "ingest", "namespace": "shop"},
            "spec": {"role": "Developer", "scopes": ["identify"]}
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(object_key(&key), "ApiKey/shop/ingest");
    }
}
