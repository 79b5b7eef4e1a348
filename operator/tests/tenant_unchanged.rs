//! The Tenant reconciler with the controller's caches (fixtures/ scripts the API server):
//! what the caches hold as it would apply it (the namespace label, the built-in Roles,
//! the NetworkPolicy) is not sent again, and a second reconcile of a Tenant whose
//! status is current writes nothing at all. With 1000 Tenants, those unchanged applies
//! of every reconcile were most of the API server's work.

mod fixtures;

use std::sync::Arc;

use fixtures::{NS, TENANT, tenant, testing_context, with_status};
use http::StatusCode;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Resource;
use kube::runtime::reflector;
use kube::runtime::watcher::Event;
use portcullis_crds::role::BUILTIN_ROLES;
use portcullis_crds::{Role, Tenant, TenantStatus, tenant::NetworkPolicyMode};
use portcullis_operator::controller::tenant::{FINALIZER, builtin_role_manifest, reconcile_with};
use portcullis_operator::controller::tenant_network;
use portcullis_operator::controller::tenant_watches::TenantCaches;
use serde_json::json;

const TENANT_PATH: &str = "/apis/portcullis.dev/v1alpha1/tenants/acme";
const DEK_PATH: &str = "/api/v1/namespaces/portcullis-system/secrets";

/// Caches holding `acme-prod` labelled for acme, its built-in Roles and NetworkPolicy
/// exactly as the reconciler would apply them.
fn caches_as_applied(acme: &Tenant) -> TenantCaches {
    let owner = acme
        .controller_owner_ref(&())
        .unwrap_or_else(|| panic!("the tenant has a uid"));
    let (namespaces, mut ns_writer) = reflector::store();
    let namespace: Namespace = serde_json::from_value(json!({
        "metadata": {"name": NS, "resourceVersion": "7",
                     "labels": {"portcullis.dev/tenant": TENANT}}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    ns_writer.apply_watcher_event(&Event::Apply(namespace));
    let (builtin_roles, mut role_writer) = reflector::store();
    for name in BUILTIN_ROLES {
        let manifest = builtin_role_manifest(name, NS, TENANT, &owner)
            .unwrap_or_else(|| panic!("{name} is built in"));
        let mut role: Role = serde_json::from_value(manifest).unwrap_or_else(|e| panic!("{e}"));
        role.metadata.uid = Some(format!("{name}-uid"));
        role_writer.apply_watcher_event(&Event::Apply(role));
    }
    let (network_policies, mut policy_writer) = reflector::store();
    let policy: NetworkPolicy =
        tenant_network::manifest(NetworkPolicyMode::ProxiedTcp, NS, TENANT, &owner)
            .unwrap_or_else(|| panic!("ProxiedTcp keeps a policy"));
    policy_writer.apply_watcher_event(&Event::Apply(policy));
    TenantCaches {
        namespaces,
        builtin_roles,
        network_policies,
    }
}

#[tokio::test]
async fn what_the_caches_hold_as_applied_is_not_sent_and_an_unchanged_status_is_not_written() {
    let (ctx, mut api, _writers) = testing_context();
    let mut acme: Tenant = tenant();
    acme.metadata.finalizers = Some(vec![FINALIZER.into()]);
    acme.metadata.generation = Some(1);
    let caches = caches_as_applied(&acme);

    // First reconcile: only the DEK is new; the status is written once.
    let object = acme.clone();
    let script = tokio::spawn(async move {
        api.expect_not_found("GET", &format!("{DEK_PATH}/portcullis-dek-{TENANT}"))
            .await;
        let dek = api.expect_echo("POST", DEK_PATH, StatusCode::CREATED).await;
        api.expect_event("kube-system").await;
        api.expect(
            "GET",
            &format!("/api/v1/namespaces/{NS}/pods"),
            StatusCode::OK,
            |_| json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}),
        )
        .await;
        let status = api
            .expect(
                "PATCH",
                &format!("{TENANT_PATH}/status"),
                StatusCode::OK,
                |s| with_status(&object, s),
            )
            .await;
        api.expect_nothing_more().await;
        (api, dek, status)
    });
    reconcile_with(Arc::new(acme.clone()), ctx.clone(), Some(caches.clone()))
        .await
        .unwrap_or_else(|e| panic!("reconcile failed: {e}"));
    let (mut api, dek, status) = script.await.unwrap_or_else(|e| panic!("{e}"));
    let written: TenantStatus = serde_json::from_value(status.body["status"].clone())
        .unwrap_or_else(|e| panic!("status: {e}"));
    let ready = written.conditions.iter().find(|c| c.type_ == "Ready");
    assert_eq!(
        ready.map(|c| (c.status.as_str(), c.reason.as_str())),
        Some(("True", "Bound")),
        "{written:?}"
    );
    assert_eq!(written.namespaces, [NS]);
    assert_eq!(written.roles, 5, "the built-in Roles are counted");

    // Second reconcile, the status as written: reads only, writes nothing.
    acme.status = Some(written);
    let script = tokio::spawn(async move {
        api.expect(
            "GET",
            &format!("{DEK_PATH}/portcullis-dek-{TENANT}"),
            StatusCode::OK,
            |_| dek.body.clone(),
        )
        .await;
        api.expect(
            "GET",
            &format!("/api/v1/namespaces/{NS}/pods"),
            StatusCode::OK,
            |_| json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}),
        )
        .await;
        api.expect_nothing_more().await;
    });
    reconcile_with(Arc::new(acme), ctx, Some(caches))
        .await
        .unwrap_or_else(|e| panic!("second reconcile failed: {e}"));
    script.await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn a_builtin_role_missing_from_the_cache_is_applied_again() {
    let (ctx, mut api, _writers) = testing_context();
    let mut acme: Tenant = tenant();
    acme.metadata.finalizers = Some(vec![FINALIZER.into()]);
    let mut caches = caches_as_applied(&acme);
    // The cache saw `viewer` deleted: a store without it.
    let (builtin_roles, mut writer) = reflector::store();
    for role in caches.builtin_roles.state() {
        if role.metadata.name.as_deref() != Some("viewer") {
            writer.apply_watcher_event(&Event::Apply(role.as_ref().clone()));
        }
    }
    caches.builtin_roles = builtin_roles;
    let script = tokio::spawn(async move {
        let put_back = api
            .expect_echo(
                "PATCH",
                &format!("/apis/portcullis.dev/v1alpha1/namespaces/{NS}/roles/viewer"),
                StatusCode::OK,
            )
            .await;
        // The DEK read fails: the rest of the reconcile is not what this test is about.
        api.expect(
            "GET",
            &format!("{DEK_PATH}/portcullis-dek-{TENANT}"),
            StatusCode::SERVICE_UNAVAILABLE,
            |_| {
                json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                       "reason": "ServiceUnavailable", "code": 503, "message": "etcd is busy"})
            },
        )
        .await;
        api.expect_nothing_more().await;
        put_back
    });
    let error = reconcile_with(Arc::new(acme), ctx, Some(caches))
        .await
        .err()
        .unwrap_or_else(|| panic!("the reconcile should have failed on the DEK read"));
    let put_back = script.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(put_back.content_type, "application/apply-patch+yaml");
    assert_eq!(put_back.body["metadata"]["name"], "viewer");
    assert_eq!(error.api_code(), Some(503), "{error}");
}
