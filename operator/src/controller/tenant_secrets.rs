//! The Tenant controller's Secret-access step: one `portcullis-operator-secrets`
//! RoleBinding in each bound namespace, binding the chart's unbound
//! `<release>-tenant-secrets` ClusterRole to the operator's own ServiceAccount. The
//! operator thereby reads and writes ApiKey Secrets only in namespaces a Tenant holds,
//! plus its own namespace (the chart's Role); nowhere else. Owned by the Tenant
//! (garbage-collected with it), deleted when the namespace is released.
//!
//! Without [`SecretsBinding`] (an operator run with credentials of its own, e.g. outside
//! the cluster) no binding is written.

use std::time::Duration;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use portcullis_crds::annotations::FIELD_MANAGER;
use portcullis_crds::tenant::TENANT_LABEL;

use crate::context::{Context, SecretsBinding};
use crate::error::Result;

/// Name of the RoleBinding the operator keeps in each tenant namespace.
pub const SECRETS_BINDING: &str = "portcullis-operator-secrets";

/// The RoleBinding granting `binding`'s ServiceAccount (in `operator_namespace`) the
/// tenant-secrets ClusterRole in `namespace`.
pub fn manifest(
    binding: &SecretsBinding,
    operator_namespace: &str,
    namespace: &str,
    tenant: &str,
    owner: &OwnerReference,
) -> RoleBinding {
    RoleBinding {
        metadata: ObjectMeta {
            name: Some(SECRETS_BINDING.into()),
            namespace: Some(namespace.into()),
            labels: Some([(TENANT_LABEL.to_owned(), tenant.to_owned())].into()),
            owner_references: Some(vec![owner.clone()]),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: binding.cluster_role.clone(),
        },
        subjects: Some(vec![Subject {
            api_group: None,
            kind: "ServiceAccount".into(),
            name: binding.service_account.clone(),
            namespace: Some(operator_namespace.into()),
        }]),
    }
}

/// Applies the RoleBinding in `namespace` (when the operator knows its ServiceAccount
/// and the ClusterRole). Always sent: an unchanged apply writes nothing, and a binding
/// someone edited is put back.
pub async fn ensure(
    ctx: &Context,
    namespace: &str,
    tenant: &str,
    owner: &OwnerReference,
) -> Result<()> {
    let Some(binding) = &ctx.settings.secrets_binding else {
        return Ok(());
    };
    let manifest = manifest(binding, &ctx.settings.namespace, namespace, tenant, owner);
    let api: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), namespace);
    api.patch(
        SECRETS_BINDING,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&manifest),
    )
    .await?;
    Ok(())
}

/// How long a new binding may take to reach the API server's authorizer cache.
const TAKE_EFFECT_WITHIN: Duration = Duration::from_secs(5);
const TAKE_EFFECT_POLL: Duration = Duration::from_millis(100);

/// Waits (at most [`TAKE_EFFECT_WITHIN`]) until the operator may list Secrets in a
/// newly bound `namespace`, so that nothing reads the namespace's Secrets before the
/// binding takes effect: the status lists the namespace only after this. Asks with a
/// SelfSubjectAccessReview (every authenticated user may).
pub async fn await_effect(ctx: &Context, namespace: &str) -> Result<()> {
    if ctx.settings.secrets_binding.is_none() {
        return Ok(());
    }
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.into()),
                resource: Some("secrets".into()),
                verb: Some("list".into()),
                ..ResourceAttributes::default()
            }),
            non_resource_attributes: None,
        },
        ..SelfSubjectAccessReview::default()
    };
    let api: Api<SelfSubjectAccessReview> = Api::all(ctx.client.clone());
    let deadline = tokio::time::Instant::now() + TAKE_EFFECT_WITHIN;
    loop {
        let reviewed = api.create(&PostParams::default(), &review).await?;
        if reviewed.status.is_some_and(|s| s.allowed) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                %namespace,
                "RoleBinding {SECRETS_BINDING} not in effect yet; ApiKey Secrets there may be \
                 refused until it is (check the chart's tenant-secrets ClusterRole)"
            );
            return Ok(());
        }
        tokio::time::sleep(TAKE_EFFECT_POLL).await;
    }
}

/// Deletes the RoleBinding in `namespace` if the tenant with `owner_uid` owns it; one
/// someone else created under that name is left alone. Looked up by list (the operator
/// holds list, not get, on RoleBindings).
pub async fn remove(ctx: &Context, namespace: &str, owner_uid: &str) -> Result<()> {
    if ctx.settings.secrets_binding.is_none() {
        return Ok(());
    }
    let api: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), namespace);
    let named = ListParams::default().fields(&format!("metadata.name={SECRETS_BINDING}"));
    let binding = api.list(&named).await?.items.into_iter().next();
    super::delete_if_owned(&api, binding, owner_uid).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_only_the_tenant_secrets_role_to_the_operator_account_and_the_tenant_owns_it() {
        let owner = OwnerReference {
            api_version: "portcullis.dev/v1alpha1".into(),
            kind: "Tenant".into(),
            name: "acme".into(),
            uid: "u-1".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        let binding = SecretsBinding {
            cluster_role: "portcullis-operator-tenant-secrets".into(),
            service_account: "portcullis-operator".into(),
        };
        let value = serde_json::to_value(manifest(
            &binding,
            "portcullis-system",
            "acme-prod",
            "acme",
            &owner,
        ))
        .unwrap();
        assert_eq!(value["metadata"]["namespace"], "acme-prod");
        assert_eq!(value["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(
            value["roleRef"],
            serde_json::json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                               "name": "portcullis-operator-tenant-secrets"})
        );
        assert_eq!(
            value["subjects"],
            serde_json::json!([{"kind": "ServiceAccount", "name": "portcullis-operator",
                                "namespace": "portcullis-system"}])
        );
    }
}
