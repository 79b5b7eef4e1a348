//! The Tenant controller's NetworkPolicy step: one `portcullis-inbound` NetworkPolicy in
//! each bound namespace, selecting the pods that run the proxy (label
//! `portcullis.dev/injected`) and admitting the ingress the Tenant's `networkPolicy`
//! mode allows. Owned by the Tenant (garbage-collected with it), labelled with the
//! tenant's name (so edits and deletions wake the controller), deleted when the
//! namespace is released or the mode is `Unmanaged`.
//!
//! Pods without the label are never selected: opted-out and host-network pods, and pods
//! injected before the label existed, keep whatever ingress they had.

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta, OwnerReference,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use portcullis_api::injection::{PROXY_ADMIN_PORT, PROXY_INBOUND_PORT};
use portcullis_crds::annotations::{FIELD_MANAGER, INJECTED_LABEL};
use portcullis_crds::tenant::{NetworkPolicyMode, TENANT_LABEL};

use crate::context::Context;
use crate::error::Result;

/// Name of the NetworkPolicy the operator keeps in each tenant namespace.
pub const NETWORK_POLICY: &str = "portcullis-inbound";

/// The NetworkPolicy for `mode` in `namespace`, or `None` when the operator keeps none.
pub fn manifest(
    mode: NetworkPolicyMode,
    namespace: &str,
    tenant: &str,
    owner: &OwnerReference,
) -> Option<NetworkPolicy> {
    let tcp = |port: Option<u16>| NetworkPolicyPort {
        protocol: Some("TCP".into()),
        port: port.map(|p| IntOrString::Int(i32::from(p))),
        end_port: None,
    };
    let ports = match mode {
        // A port-less entry matches every port of the protocol.
        NetworkPolicyMode::ProxiedTcp => vec![tcp(None)],
        NetworkPolicyMode::ProxyPortOnly => {
            vec![tcp(Some(PROXY_INBOUND_PORT)), tcp(Some(PROXY_ADMIN_PORT))]
        }
        NetworkPolicyMode::Unmanaged => return None,
    };
    Some(NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(NETWORK_POLICY.into()),
            namespace: Some(namespace.into()),
            labels: Some([(TENANT_LABEL.to_owned(), tenant.to_owned())].into()),
            owner_references: Some(vec![owner.clone()]),
            ..ObjectMeta::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: INJECTED_LABEL.into(),
                    operator: "Exists".into(),
                    values: None,
                }]),
                match_labels: None,
            }),
            policy_types: Some(vec!["Ingress".into()]),
            // No `from`: any source, on these ports only.
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: None,
                ports: Some(ports),
            }]),
            egress: None,
        }),
    })
}

/// Applies (or, for `Unmanaged`, removes) the tenant's NetworkPolicy in `namespace`;
/// a policy someone edited is put back. Nothing is sent when `cache` holds the policy
/// as it would be applied (or, to remove, holds none); without a cache, always.
pub async fn ensure(
    ctx: &Context,
    mode: NetworkPolicyMode,
    namespace: &str,
    tenant: &str,
    owner: &OwnerReference,
    cache: Option<&Store<NetworkPolicy>>,
) -> Result<()> {
    let cached = cache.map(|c| c.get(&ObjectRef::new(NETWORK_POLICY).within(namespace)));
    let Some(policy) = manifest(mode, namespace, tenant, owner) else {
        if matches!(cached, Some(None)) {
            return Ok(());
        }
        return remove(ctx, namespace, &owner.uid).await;
    };
    if let Some(Some(current)) = &cached
        && super::applied::holds(&policy, current.as_ref())
    {
        return Ok(());
    }
    let api: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), namespace);
    api.patch(
        NETWORK_POLICY,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&policy),
    )
    .await?;
    Ok(())
}

/// Deletes the NetworkPolicy in `namespace` if the tenant with `owner_uid` owns it; one
/// someone else created under that name is left alone.
pub async fn remove(ctx: &Context, namespace: &str, owner_uid: &str) -> Result<()> {
    let api: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), namespace);
    let policy = api.get_opt(NETWORK_POLICY).await?;
    super::delete_if_owned(&api, policy, owner_uid).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "portcullis.dev/v1alpha1".into(),
            kind: "Tenant".into(),
            name: "acme".into(),
            uid: "u-1".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    fn ports(mode: NetworkPolicyMode) -> serde_json::Value {
        let policy = manifest(mode, "acme-prod", "acme", &owner()).unwrap();
        serde_json::to_value(policy).unwrap()["spec"]["ingress"].clone()
    }

    #[test]
    fn proxied_tcp_admits_every_tcp_port_and_nothing_else() {
        assert_eq!(
            ports(NetworkPolicyMode::ProxiedTcp),
            serde_json::json!([{"ports": [{"protocol": "TCP"}]}])
        );
    }

    #[test]
    fn proxy_port_only_admits_the_inbound_and_admin_ports() {
        assert_eq!(
            ports(NetworkPolicyMode::ProxyPortOnly),
            serde_json::json!([{"ports": [
                {"protocol": "TCP", "port": 4143},
                {"protocol": "TCP", "port": 4191}
            ]}])
        );
    }

    #[test]
    fn only_injected_pods_are_selected_and_the_tenant_owns_the_policy() {
        let policy =
            manifest(NetworkPolicyMode::ProxiedTcp, "acme-prod", "acme", &owner()).unwrap();
        let value = serde_json::to_value(&policy).unwrap();
        assert_eq!(value["kind"], "NetworkPolicy");
        assert_eq!(value["metadata"]["namespace"], "acme-prod");
        assert_eq!(value["metadata"]["labels"][TENANT_LABEL], "acme");
        assert_eq!(value["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(
            value["spec"]["podSelector"],
            serde_json::json!({"matchExpressions": [
                {"key": "portcullis.dev/injected", "operator": "Exists"}
            ]})
        );
        assert_eq!(value["spec"]["policyTypes"], serde_json::json!(["Ingress"]));
    }

    #[test]
    fn unmanaged_keeps_no_policy() {
        assert!(manifest(NetworkPolicyMode::Unmanaged, "acme-prod", "acme", &owner()).is_none());
    }
}
