//! The Tenant reconciler against a scripted fake API server (fixtures/): its first
//! reconcile only puts its finalizer on (so namespaces it labels are released when the
//! Tenant goes), a Tenant whose spec is invalid says what is wrong, field by field, in
//! its status and an Event, and touches nothing else, and a namespace is bound only if
//! nobody changed it since it was read (Tenants are reconciled concurrently).

mod fixtures;

use std::sync::Arc;

use fixtures::{NS, TENANT, tenant, testing_context, with_status};
use http::StatusCode;
use portcullis_crds::{DataClassification, Tenant, TenantStatus};
use portcullis_operator::controller::tenant::{FINALIZER, reconcile};
use serde_json::json;

const TENANT_PATH: &str = "/apis/portcullis.dev/v1alpha1/tenants/acme";

#[tokio::test]
async fn the_first_reconcile_only_adds_the_finalizer() {
    let (ctx, mut api, _writers) = testing_context();
    let acme = tenant();
    let object = acme.clone();
    let script = tokio::spawn(async move {
        let seen = api
            .expect("PATCH", TENANT_PATH, StatusCode::OK, |_| {
                let mut with = serde_json::to_value(&object).unwrap_or_default();
                with["metadata"]["finalizers"] = json!([FINALIZER]);
                with
            })
            .await;
        api.expect_nothing_more().await;
        seen
    });
    reconcile(Arc::new(acme), ctx)
        .await
        .unwrap_or_else(|e| panic!("reconcile failed: {e}"));
    let seen = script.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        seen.body.to_string().contains(FINALIZER),
        "the patch should add {FINALIZER}: {}",
        seen.body
    );
}

/// Reconciles `acme`, whose spec is invalid, against a script expecting exactly its
/// status write and a Warning Event; returns the reconcile's error, the status write
/// and the Event.
async fn reconcile_invalid(
    acme: Tenant,
) -> (
    portcullis_operator::error::Error,
    fixtures::Seen,
    fixtures::Seen,
) {
    let (ctx, mut api, _writers) = testing_context();
    let object = acme.clone();
    let script = tokio::spawn(async move {
        let status = api
            .expect(
                "PATCH",
                &format!("{TENANT_PATH}/status"),
                StatusCode::OK,
                |s| with_status(&object, s),
            )
            .await;
        let event = api
            .expect_echo(
                "POST",
                // Events about cluster-scoped objects go to kube-system.
                "/apis/events.k8s.io/v1/namespaces/kube-system/events",
                StatusCode::CREATED,
            )
            .await;
        api.expect_nothing_more().await;
        (status, event)
    });
    let error = reconcile(Arc::new(acme), ctx)
        .await
        .err()
        .unwrap_or_else(|| panic!("an invalid Tenant reconciled Ok"));
    let (status, event) = script.await.unwrap_or_else(|e| panic!("{e}"));
    (error, status, event)
}

#[tokio::test]
async fn an_invalid_spec_is_reported_field_by_field_and_nothing_else_is_touched() {
    let mut acme: Tenant = tenant();
    acme.metadata.finalizers = Some(vec![FINALIZER.into()]);
    acme.metadata.generation = Some(4);
    acme.spec.namespaces.push("Not_A_Namespace".into());
    acme.spec.scopes.insert("events".into(), Vec::new());
    let (error, status, event) = reconcile_invalid(acme).await;
    assert_eq!(error.metric_label(), "InvalidSpec");

    assert_eq!(status.content_type, "application/apply-patch+yaml");
    assert_eq!(
        (&status.body["apiVersion"], &status.body["kind"]),
        (&json!("portcullis.dev/v1alpha1"), &json!("Tenant"))
    );
    let written: TenantStatus = serde_json::from_value(status.body["status"].clone())
        .unwrap_or_else(|e| panic!("status: {e}"));
    let ready = written
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap_or_else(|| panic!("no Ready condition: {written:?}"));
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "InvalidSpec")
    );
    for field in ["spec.namespaces[1]", "spec.scopes.events"] {
        assert!(
            ready.message.contains(field),
            "the message should name {field}: {}",
            ready.message
        );
    }
    assert_eq!(event.body["type"], "Warning");
    assert_eq!(event.body["regarding"]["name"], TENANT);
}

/// A Restricted Tenant's status says its keys are wrapped by a KEK kept in a Secret
/// (its other conditions as ever; the invalid spec keeps the scripted exchange short).
#[tokio::test]
async fn a_restricted_tenant_reports_that_its_kek_is_a_secret() {
    let mut acme: Tenant = tenant();
    acme.metadata.finalizers = Some(vec![FINALIZER.into()]);
    acme.metadata.generation = Some(2);
    acme.spec.data_classification = DataClassification::Restricted;
    acme.spec.namespaces.push("Not_A_Namespace".into());
    let (_, status, _) = reconcile_invalid(acme).await;
    let written: TenantStatus = serde_json::from_value(status.body["status"].clone())
        .unwrap_or_else(|e| panic!("status: {e}"));
    let custody = written
        .conditions
        .iter()
        .find(|c| c.type_ == "KeyCustody")
        .unwrap_or_else(|| panic!("no KeyCustody condition: {written:?}"));
    assert_eq!(
        (custody.status.as_str(), custody.reason.as_str()),
        ("False", "SoftwareKek")
    );
    assert!(
        custody.message.contains("portcullis-system/portcullis-kek"),
        "{}",
        custody.message
    );
    assert_eq!(custody.observed_generation, Some(2));
}

#[tokio::test]
async fn a_namespace_changed_since_it_was_read_is_not_bound_but_read_again() {
    let (ctx, mut api, _writers) = testing_context();
    let mut acme: Tenant = tenant();
    acme.metadata.finalizers = Some(vec![FINALIZER.into()]);
    let namespace = format!("/api/v1/namespaces/{NS}");
    let script = tokio::spawn(async move {
        api.expect("GET", &namespace, StatusCode::OK, |_| {
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": NS, "resourceVersion": "17"}})
        })
        .await;
        api.expect("GET", "/api/v1/namespaces", StatusCode::OK, |_| {
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
                   "metadata": {}, "items": []})
        })
        .await;
        // Another Tenant's reconcile labelled it in between.
        let bind = api
            .expect("PATCH", &namespace, StatusCode::CONFLICT, |_| {
                json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                       "reason": "Conflict", "code": 409,
                       "message": format!("Operation cannot be fulfilled on namespaces \"{NS}\": the object has been modified")})
            })
            .await;
        // Planned again from what the namespace is now (here the API server then fails).
        api.expect("GET", &namespace, StatusCode::SERVICE_UNAVAILABLE, |_| {
            json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                   "reason": "ServiceUnavailable", "code": 503, "message": "etcd is busy"})
        })
        .await;
        api.expect_nothing_more().await;
        bind
    });
    let error = reconcile(Arc::new(acme), ctx)
        .await
        .err()
        .unwrap_or_else(|| panic!("the reconcile should have failed"));
    let bind = script.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        bind.body["metadata"],
        json!({"labels": {"portcullis.dev/tenant": TENANT}, "resourceVersion": "17"}),
        "the label is set only on the namespace as it was read"
    );
    assert_eq!(error.api_code(), Some(503), "{error}");
}
