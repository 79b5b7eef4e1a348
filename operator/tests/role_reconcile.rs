//! The Role reconciler against a scripted fake API server (fixtures/): every request it
//! makes, in order, and what it writes. A resolvable Role gets an RBAC Role and
//! RoleBinding it owns and a Ready status; one whose parent is missing loses its RBAC
//! objects (access never outlives validity), says why, and is retried with backoff.

mod fixtures;

use std::sync::Arc;

use fixtures::{NS, Seen, testing_context, with_status};
use http::StatusCode;
use portcullis_crds::{Role, RoleStatus, role::RoleSpec};
use portcullis_operator::controller::{frame, role};
use serde_json::{Value, json};

const RBAC: &str = "/apis/rbac.authorization.k8s.io/v1/namespaces/acme-prod";
const ROLES: &str = "/apis/portcullis.dev/v1alpha1/namespaces/acme-prod/roles";

fn custom_role(name: &str, spec: Value) -> Role {
    let spec: RoleSpec = serde_json::from_value(spec).unwrap_or_else(|e| panic!("spec: {e}"));
    let mut r = Role::new(name, spec);
    r.metadata.namespace = Some(NS.into());
    r.metadata.uid = Some(format!("{name}-uid"));
    r.metadata.generation = Some(3);
    r
}

/// What the reconciler sent, for assertions after it returned.
#[derive(Default)]
struct Transcript {
    rbac_role: Option<Seen>,
    binding: Option<Seen>,
    deleted: Vec<String>,
    status: Option<Seen>,
    event: Option<Seen>,
}

fn status_of(seen: &Option<Seen>) -> (RoleStatus, &Seen) {
    let seen = seen.as_ref().unwrap_or_else(|| panic!("no status written"));
    assert_eq!(seen.method, "PATCH");
    assert_eq!(seen.content_type, "application/apply-patch+yaml");
    assert!(
        seen.query.contains("fieldManager=portcullis-operator")
            && seen.query.contains("force=true"),
        "{}",
        seen.query
    );
    assert_eq!(
        (&seen.body["apiVersion"], &seen.body["kind"]),
        (&json!("portcullis.dev/v1alpha1"), &json!("Role"))
    );
    let status = serde_json::from_value(seen.body["status"].clone())
        .unwrap_or_else(|e| panic!("status: {e}"));
    (status, seen)
}

#[tokio::test]
async fn a_resolvable_role_gets_owned_rbac_and_a_ready_status() {
    let reader = custom_role(
        "reader",
        json!({"scopes": ["identify"], "permissions": ["keys:create", "keys:read"],
               "subjects": [{"kind": "User", "name": "alice"}]}),
    );
    let (ctx, mut api, _writers) = testing_context();
    let object = reader.clone();
    let script = tokio::spawn(async move {
        let mut t = Transcript::default();
        let role_path = format!("{RBAC}/roles/portcullis:reader");
        let binding_path = format!("{RBAC}/rolebindings/portcullis:reader");
        t.rbac_role = Some(api.expect_echo("PATCH", &role_path, StatusCode::OK).await);
        t.binding = Some(
            api.expect_echo("PATCH", &binding_path, StatusCode::OK)
                .await,
        );
        let status_path = format!("{ROLES}/reader/status");
        t.status = Some(
            api.expect("PATCH", &status_path, StatusCode::OK, |s| {
                with_status(&object, s)
            })
            .await,
        );
        t.event = Some(api.expect_event(NS).await);
        api.expect_nothing_more().await;
        t
    });
    let action = role::reconcile(Arc::new(reader), ctx.clone())
        .await
        .unwrap_or_else(|e| panic!("reconcile failed: {e}"));
    let t = script.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        format!("{action:?}").contains("requeue_after"),
        "{action:?}"
    );

    // The RBAC Role grants what the permissions name, and both objects are owned by
    // the Role (deleted with it) and written with server-side apply.
    let rbac_role = t.rbac_role.unwrap_or_else(|| panic!("no RBAC Role"));
    assert_eq!(rbac_role.content_type, "application/apply-patch+yaml");
    let rules = rbac_role.body["rules"].to_string();
    assert!(
        rules.contains("apikeys") && rules.contains("create"),
        "{rules}"
    );
    for seen in [
        &rbac_role,
        t.binding.as_ref().unwrap_or_else(|| panic!("no binding")),
    ] {
        let owner = &seen.body["metadata"]["ownerReferences"][0];
        assert_eq!(
            (&owner["kind"], &owner["uid"], &owner["controller"]),
            (&json!("Role"), &json!("reader-uid"), &json!(true)),
            "{}",
            seen.body
        );
    }
    let binding = t.binding.unwrap_or_else(|| panic!("no binding"));
    assert_eq!(binding.body["subjects"][0]["name"], "alice");
    assert_eq!(binding.body["roleRef"]["name"], "portcullis:reader");

    let (status, _) = status_of(&t.status);
    assert_eq!(status.effective_scopes, ["identify"]);
    assert_eq!(status.observed_generation, Some(3));
    let ready = &status.conditions[0];
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "Resolved")
    );
    let event = t.event.unwrap_or_else(|| panic!("no Event"));
    assert_eq!(event.body["reason"], "Resolved");
    assert_eq!(event.body["type"], "Normal");
}

#[tokio::test]
async fn a_role_whose_parent_is_missing_loses_its_rbac_and_says_why() {
    let orphan = custom_role(
        "orphan",
        json!({"inherits": ["ghost"], "scopes": ["identify"],
               "subjects": [{"kind": "User", "name": "bob"}]}),
    );
    let (ctx, mut api, _writers) = testing_context();
    let object = orphan.clone();
    let script = tokio::spawn(async move {
        let mut t = Transcript::default();
        // The parent is not in the cache: the reconciler asks the API server once.
        api.expect_not_found("GET", &format!("{ROLES}/ghost")).await;
        for path in [
            format!("{RBAC}/rolebindings/portcullis:orphan"),
            format!("{RBAC}/roles/portcullis:orphan"),
        ] {
            api.expect_not_found("DELETE", &path).await;
            t.deleted.push(path);
        }
        let status_path = format!("{ROLES}/orphan/status");
        t.status = Some(
            api.expect("PATCH", &status_path, StatusCode::OK, |s| {
                with_status(&object, s)
            })
            .await,
        );
        t.event = Some(api.expect_event(NS).await);
        api.expect_nothing_more().await;
        t
    });
    let orphan = Arc::new(orphan);
    let error = role::reconcile(orphan.clone(), ctx.clone())
        .await
        .err()
        .unwrap_or_else(|| panic!("a Role with a missing parent reconciled Ok"));
    let t = script.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(error.metric_label(), "MissingParent");
    assert!(error.to_string().contains("ghost"), "{error}");
    assert_eq!(t.deleted.len(), 2, "both RBAC objects must go");

    let (status, _) = status_of(&t.status);
    assert!(status.effective_scopes.is_empty(), "{status:?}");
    let ready = &status.conditions[0];
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "MissingParent")
    );
    assert!(ready.message.contains("ghost"), "{}", ready.message);
    let event = t.event.unwrap_or_else(|| panic!("no Event"));
    assert_eq!(event.body["type"], "Warning");

    // The shared error policy backs off, longer on the second failure in a row.
    let first = format!(
        "{:?}",
        frame::error_policy(orphan.clone(), &error, ctx.clone())
    );
    let second = format!("{:?}", frame::error_policy(orphan, &error, ctx));
    assert!(first.contains("requeue_after"), "{first}");
    assert_ne!(first, second, "no backoff between failures");
}

/// A built-in Role is created by its Tenant just before the Tenant's status lists the
/// namespace; until then resolving it would be done again once the status lists it
/// (that change wakes every Role of the namespace), so it waits and sends nothing.
#[tokio::test]
async fn a_builtin_role_waits_until_its_namespace_is_listed_by_a_tenant() {
    let (ctx, mut api, _writers) = testing_context();
    let mut viewer = custom_role("viewer", json!({"permissions": ["keys:read"]}));
    viewer.metadata.namespace = Some("acme-next".into());
    viewer.metadata.labels = Some(
        [
            ("portcullis.dev/builtin".to_owned(), "true".to_owned()),
            ("portcullis.dev/tenant".to_owned(), "acme".to_owned()),
        ]
        .into(),
    );
    let script = tokio::spawn(async move { api.expect_nothing_more().await });
    role::reconcile(Arc::new(viewer), ctx)
        .await
        .unwrap_or_else(|e| panic!("reconcile failed: {e}"));
    script.await.unwrap_or_else(|e| panic!("{e}"));
}
