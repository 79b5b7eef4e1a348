//! The validating webhook's rules as pure functions, and the admission handler against a
//! fixture cluster: the exact messages a kubectl user sees, and the admin audit events.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionReview};
use portcullis_api::clock::ManualClock;
use portcullis_crds::{ApiKey, Role, Tenant};
use portcullis_operator::webhook::audit::AdminAuditEvent;
use portcullis_operator::webhook::inject::{InjectSettings, ServerVersion};
use portcullis_operator::webhook::validate::lookup::{ClusterLookup, LookupError};
use portcullis_operator::webhook::validate::{
    Catalogue, Change, NamespaceRoles, Operation, Requester, TenantClaims, ValidatorSettings,
    validate_api_key, validate_role, validate_tenant,
};
use portcullis_operator::webhook::{WebhookState, review_admin, review_pod};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const NS: &str = "acme-prod";

fn role(name: &str, spec: Value) -> Role {
    serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "Role",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec
    }))
    .unwrap()
}

fn api_key(name: &str, spec: Value) -> ApiKey {
    serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec
    }))
    .unwrap()
}

fn tenant(name: &str, spec: Value) -> Tenant {
    serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"name": name},
        "spec": spec
    }))
    .unwrap()
}

fn acme() -> Tenant {
    tenant(
        "acme",
        json!({
            "namespaces": [NS],
            "scopes": {
                "identify": [{"methods": ["POST"], "path": "/v1/identify"}],
                "events": [{"methods": ["GET", "POST"], "path": "/v1/events/*"}],
                "signals": [{"methods": ["GET"], "path": "/v1/signals*"}]
            }
        }),
    )
}

/// david: Developer. alice: data-reader (keys:create, signals). carol: Analyst via group.
/// erin: team-lead (Developer + roles:manage).
fn role_objects() -> Vec<Role> {
    vec![
        role(
            "developer",
            json!({"inherits": ["viewer"], "permissions": ["keys:create", "keys:rotate", "keys:revoke"],
                   "allScopes": true, "subjects": [{"kind": "User", "name": "david@acme"}]}),
        ),
        role(
            "data-reader",
            json!({"scopes": ["signals"], "permissions": ["keys:create"],
                   "subjects": [{"kind": "User", "name": "alice"}]}),
        ),
        role(
            "analyst",
            json!({"inherits": ["viewer"], "permissions": ["audit:read"],
                                "subjects": [{"kind": "Group", "name": "acme-analysts"}]}),
        ),
        role(
            "team-lead",
            json!({"inherits": ["Developer"], "permissions": ["roles:manage"],
                                  "subjects": [{"kind": "User", "name": "erin"}]}),
        ),
    ]
}

fn roles() -> NamespaceRoles {
    NamespaceRoles::new(NS, role_objects())
}

fn catalogue() -> Catalogue {
    Catalogue::of(&acme())
}

fn exempt() -> ValidatorSettings {
    ValidatorSettings::new("portcullis-system", "portcullis-operator")
}

fn david() -> Requester {
    Requester::new("david@acme", &["system:authenticated"])
}
fn alice() -> Requester {
    Requester::new("alice", &["system:authenticated"])
}
fn carol() -> Requester {
    Requester::new("carol", &["acme-analysts", "system:authenticated"])
}
fn erin() -> Requester {
    Requester::new("erin", &["system:authenticated"])
}
fn cluster_admin() -> Requester {
    Requester::new(
        "kubernetes-admin",
        &["system:masters", "system:authenticated"],
    )
}

fn create<'a, T>(name: &'a str, object: &'a T) -> Change<'a, T> {
    Change {
        operation: Operation::Create,
        name,
        namespace: NS,
        object: Some(object),
        old_object: None,
    }
}

fn update<'a, T>(name: &'a str, old: &'a T, new: &'a T) -> Change<'a, T> {
    Change {
        operation: Operation::Update,
        name,
        namespace: NS,
        object: Some(new),
        old_object: Some(old),
    }
}

fn delete<'a, T>(name: &'a str, old: &'a T) -> Change<'a, T> {
    Change {
        operation: Operation::Delete,
        name,
        namespace: NS,
        object: None,
        old_object: Some(old),
    }
}

fn check_key(change: &Change<'_, ApiKey>, who: &Requester) -> Result<(), (u16, String)> {
    validate_api_key(change, who, &roles(), &catalogue(), &exempt())
        .map_err(|r| (r.code, r.message))
}

fn check_role(change: &Change<'_, Role>, who: &Requester) -> Result<(), (u16, String)> {
    validate_role(change, who, &roles(), &catalogue(), &exempt()).map_err(|r| (r.code, r.message))
}

// ---------------------------------------------------------------- ApiKey

#[test]
fn api_key_field_errors_are_named() {
    let key = api_key(
        "ingest",
        json!({"role": "Developer", "scopes": ["identify"], "ipAllowlist": ["10.0.0.300/8"]}),
    );
    let (code, message) = check_key(&create("ingest", &key), &cluster_admin()).unwrap_err();
    assert_eq!(code, 422);
    assert!(
        message.starts_with("ApiKey \"ingest\" is invalid: spec.ipAllowlist[0]: "),
        "{message}"
    );
    assert!(message.contains("10.0.0.300/8"), "{message}");
}

#[test]
fn the_role_must_exist_but_built_ins_always_do() {
    let key = api_key("ingest", json!({"role": "Dev", "scopes": ["identify"]}));
    let (code, message) = check_key(&create("ingest", &key), &cluster_admin()).unwrap_err();
    assert_eq!(code, 422);
    assert_eq!(
        message,
        "ApiKey \"ingest\" names role \"Dev\", which does not exist in namespace \"acme-prod\"; use a built-in \
         role (Owner, Admin, Developer, Analyst, Viewer) or create Role \"dev\""
    );
    // A fresh namespace: no Role objects yet, the built-ins still resolve.
    let empty = NamespaceRoles::new(NS, []);
    let key = api_key("ingest", json!({"role": "Owner", "scopes": ["identify"]}));
    assert!(
        validate_api_key(
            &create("ingest", &key),
            &cluster_admin(),
            &empty,
            &catalogue(),
            &exempt()
        )
        .is_ok()
    );
}

#[test]
fn scopes_beyond_the_role_are_refused_with_the_fix() {
    // A Developer role whose object was narrowed to two scopes: the message of the design.
    let narrowed = NamespaceRoles::new(
        NS,
        [role(
            "developer",
            json!({"scopes": ["identify", "events"], "permissions": ["keys:create"]}),
        )],
    );
    let key = api_key(
        "ingest",
        json!({"role": "Developer", "scopes": ["identify", "admin"]}),
    );
    let refusal = validate_api_key(
        &create("ingest", &key),
        &cluster_admin(),
        &narrowed,
        &catalogue(),
        &exempt(),
    )
    .unwrap_err();
    assert_eq!(refusal.code, 422);
    assert_eq!(
        refusal.message,
        "ApiKey \"ingest\" asks for scope \"admin\" which role \"Developer\" does not grant; grant it in Role \
         \"developer\" or remove it from spec.scopes"
    );

    // A role that grants every scope of the tenant: the scope is not in the catalogue.
    let (_, message) = check_key(&create("ingest", &key), &cluster_admin()).unwrap_err();
    assert_eq!(
        message,
        "ApiKey \"ingest\" asks for scope \"admin\" which role \"Developer\" does not grant: tenant \"acme\" has \
         no such scope; add it to Tenant \"acme\" spec.scopes or remove it from spec.scopes"
    );

    // Every missing scope is reported.
    let key = api_key(
        "reader",
        json!({"role": "data-reader", "scopes": ["identify", "signals", "events"]}),
    );
    let (_, message) = check_key(&create("reader", &key), &cluster_admin()).unwrap_err();
    assert_eq!(
        message
            .matches("which role \"data-reader\" does not grant")
            .count(),
        2,
        "{message}"
    );
}

#[test]
fn creating_a_key_needs_keys_create_and_every_scope() {
    let key = api_key(
        "ingest",
        json!({"role": "Developer", "scopes": ["identify", "events"]}),
    );
    assert_eq!(check_key(&create("ingest", &key), &david()), Ok(()));

    let (code, message) = check_key(&create("ingest", &key), &carol()).unwrap_err();
    assert_eq!(code, 403);
    assert_eq!(
        message,
        "user \"carol\" may not create ApiKey \"ingest\": that needs permission keys:create, which none of your \
         Roles in namespace \"acme-prod\" grants (you hold: analyst); ask a tenant admin to add you (User \
         \"carol\") to the subjects of a Role with keys:create, such as Developer"
    );

    let (code, message) = check_key(&create("ingest", &key), &alice()).unwrap_err();
    assert_eq!(code, 403);
    assert_eq!(
        message,
        "user \"alice\" may not grant scopes \"identify\", \"events\" to ApiKey \"ingest\": none of your Roles \
         in namespace \"acme-prod\" grants them (you hold: data-reader); ask a tenant admin for a Role with \
         them, or remove them from spec.scopes"
    );
    let own = api_key(
        "signals",
        json!({"role": "data-reader", "scopes": ["signals"]}),
    );
    assert_eq!(check_key(&create("signals", &own), &alice()), Ok(()));

    let stranger = Requester::new("mallory", &["system:authenticated"]);
    let (_, message) = check_key(&create("ingest", &key), &stranger).unwrap_err();
    assert!(message.contains("(you hold: none)"), "{message}");
}

#[test]
fn cluster_admins_and_the_operator_are_exempt_from_escalation_checks_only() {
    let key = api_key(
        "ingest",
        json!({"role": "Developer", "scopes": ["identify"]}),
    );
    let operator = Requester::new(
        "system:serviceaccount:portcullis-system:portcullis-operator",
        &["system:serviceaccounts"],
    );
    for who in [cluster_admin(), operator] {
        assert_eq!(check_key(&create("ingest", &key), &who), Ok(()));
        let bad = api_key("ingest", json!({"role": "Developer", "scopes": ["admin"]}));
        assert_eq!(
            check_key(&create("ingest", &bad), &who).unwrap_err().0,
            422,
            "validation still applies"
        );
    }
}

#[test]
fn updates_need_the_permission_of_what_changes() {
    let key = api_key(
        "ingest",
        json!({"role": "Developer", "scopes": ["signals"]}),
    );
    let mut rotated = key.clone();
    rotated.spec.rotate = 1;
    let (_, message) = check_key(&update("ingest", &key, &rotated), &alice()).unwrap_err();
    assert!(
        message.starts_with(
            "user \"alice\" may not rotate ApiKey \"ingest\": that needs permission keys:rotate"
        ),
        "{message}"
    );
    assert_eq!(
        check_key(&update("ingest", &key, &rotated), &david()),
        Ok(())
    );

    let mut revoked = key.clone();
    revoked.spec.revoked = true;
    let (_, message) = check_key(&update("ingest", &key, &revoked), &alice()).unwrap_err();
    assert!(
        message.contains("needs permission keys:revoke"),
        "{message}"
    );
    // Un-revoking re-issues the grant.
    let (_, message) = check_key(&update("ingest", &revoked, &key), &carol()).unwrap_err();
    assert!(
        message.starts_with("user \"carol\" may not change ApiKey \"ingest\""),
        "{message}"
    );

    // Adding a scope needs only the added scope.
    let base = api_key(
        "ingest",
        json!({"role": "Developer", "scopes": ["identify"]}),
    );
    let widened = api_key(
        "ingest",
        json!({"role": "Developer", "scopes": ["identify", "signals"]}),
    );
    assert_eq!(
        check_key(&update("ingest", &base, &widened), &alice()),
        Ok(())
    );
    let widened_more = api_key(
        "ingest",
        json!({"role": "Developer", "scopes": ["identify", "events"]}),
    );
    assert!(
        check_key(&update("ingest", &base, &widened_more), &alice())
            .unwrap_err()
            .1
            .contains("scope \"events\"")
    );

    // Metadata only (labels, the operator's finalizer): nothing to check.
    let mut labelled = base.clone();
    labelled.metadata.labels = Some(BTreeMap::from([("team".into(), "x".into())]));
    assert_eq!(
        check_key(
            &update("ingest", &base, &labelled),
            &Requester::new("anyone", &[])
        ),
        Ok(())
    );
}

#[test]
fn deleting_a_key_needs_keys_revoke() {
    let key = api_key(
        "ingest",
        json!({"role": "Developer", "scopes": ["identify"]}),
    );
    let (code, message) = check_key(&delete("ingest", &key), &alice()).unwrap_err();
    assert_eq!(code, 403);
    assert!(
        message.starts_with(
            "user \"alice\" may not delete ApiKey \"ingest\": that needs permission keys:revoke"
        ),
        "{message}"
    );
    assert_eq!(check_key(&delete("ingest", &key), &david()), Ok(()));
    // The namespace controller deleting everything in a namespace being deleted.
    let gc = Requester::new(
        "system:serviceaccount:kube-system:namespace-controller",
        &[],
    );
    assert_eq!(check_key(&delete("ingest", &key), &gc), Ok(()));
}

// ---------------------------------------------------------------- Role

#[test]
fn role_inheritance_must_resolve() {
    let a = role("a", json!({"inherits": ["b"]}));
    let b = role("b", json!({"inherits": ["a"]}));
    let with_b = NamespaceRoles::new(NS, [b]);
    let refusal = validate_role(
        &create("a", &a),
        &cluster_admin(),
        &with_b,
        &catalogue(),
        &exempt(),
    )
    .unwrap_err();
    assert_eq!(refusal.code, 422);
    assert_eq!(
        refusal.message,
        "Role \"a\" would create an inheritance cycle: a -> b -> a; remove one of these from spec.inherits"
    );

    let orphan = role("data-engineer", json!({"inherits": ["ghost"]}));
    let (_, message) = check_role(&create("data-engineer", &orphan), &cluster_admin()).unwrap_err();
    assert_eq!(
        message,
        "Role \"data-engineer\" inherits from \"ghost\", which does not exist in namespace \"acme-prod\"; create \
         Role \"ghost\" or remove it from spec.inherits"
    );

    let invalid = role("x", json!({"scopes": ["Not A Scope"]}));
    let (code, message) = check_role(&create("x", &invalid), &cluster_admin()).unwrap_err();
    assert_eq!(code, 422);
    assert!(
        message.starts_with("Role \"x\" is invalid: spec.scopes[0]: "),
        "{message}"
    );
}

#[test]
fn a_role_may_only_grant_what_its_author_holds() {
    let reader = role(
        "reader",
        json!({"scopes": ["identify"], "permissions": ["keys:create"]}),
    );
    // alice lacks roles:manage.
    let (code, message) = check_role(&create("reader", &reader), &alice()).unwrap_err();
    assert_eq!(code, 403);
    assert!(
        message.starts_with(
            "user \"alice\" may not create Role \"reader\": that needs permission roles:manage"
        ),
        "{message}"
    );
    // erin (Developer + roles:manage) may grant what Developer has...
    assert_eq!(check_role(&create("reader", &reader), &erin()), Ok(()));
    // ...but not audit:read, which she does not hold.
    let auditor = role("auditor", json!({"inherits": ["Analyst"]}));
    let (code, message) = check_role(&create("auditor", &auditor), &erin()).unwrap_err();
    assert_eq!(code, 403);
    assert_eq!(
        message,
        "user \"erin\" may not create Role \"auditor\": it would grant permissions \"audit:read\", which none of \
         your Roles in namespace \"acme-prod\" grants (you hold: team-lead); a Role may only grant what its \
         author holds — remove them from the Role or ask a tenant owner to make this change"
    );
    assert_eq!(
        check_role(&create("auditor", &auditor), &cluster_admin()),
        Ok(())
    );

    let (_, message) = check_role(
        &delete("data-reader", &role("data-reader", json!({}))),
        &alice(),
    )
    .unwrap_err();
    assert!(
        message.contains("may not delete Role \"data-reader\""),
        "{message}"
    );
}

// ---------------------------------------------------------------- Tenant

#[test]
fn a_namespace_owned_by_another_tenant_is_refused_naming_it() {
    let globex = tenant("globex", json!({"namespaces": ["shared"]}));
    let claims = TenantClaims::new(&[acme(), globex]);
    let grabby = tenant("acme", json!({"namespaces": ["acme-prod", "shared"]}));
    let refusal =
        validate_tenant(&update("acme", &acme(), &grabby), &claims, &exempt()).unwrap_err();
    assert_eq!(refusal.code, 409);
    assert_eq!(
        refusal.message,
        "Tenant \"acme\" claims namespace \"shared\", which Tenant \"globex\" already owns; remove it from \
         spec.namespaces, or remove it from Tenant \"globex\" first"
    );
    // Its own namespaces are fine; so is a label naming the tenant itself.
    let mut claims = TenantClaims::new(&[acme()]);
    claims.claim("acme-staging", "acme");
    let grown = tenant("acme", json!({"namespaces": ["acme-prod", "acme-staging"]}));
    assert_eq!(
        validate_tenant(&update("acme", &acme(), &grown), &claims, &exempt()),
        Ok(())
    );
    // A namespace labelled for another tenant (bound through its selector).
    claims.claim("payments", "initech");
    let more = tenant("acme", json!({"namespaces": ["payments"]}));
    assert!(
        validate_tenant(&update("acme", &acme(), &more), &claims, &exempt())
            .unwrap_err()
            .message
            .contains("Tenant \"initech\"")
    );

    let bad = tenant("acme", json!({"namespaces": ["Bad_NS"]}));
    assert_eq!(
        validate_tenant(&create("acme", &bad), &claims, &exempt())
            .unwrap_err()
            .code,
        422
    );
}

// ---------------------------------------------------------------- the handler

#[derive(Default)]
struct FixtureCluster {
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    roles: Vec<Role>,
    tenants: Vec<Tenant>,
}

impl ClusterLookup for FixtureCluster {
    fn namespace_labels<'a>(
        &'a self,
        namespace: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, LookupError>> {
        Box::pin(async move { Ok(self.namespaces.get(namespace).cloned()) })
    }
    fn roles<'a>(&'a self, namespace: &'a str) -> BoxFuture<'a, Result<Vec<Role>, LookupError>> {
        Box::pin(async move {
            Ok(self
                .roles
                .iter()
                .filter(|r| r.metadata.namespace.as_deref() == Some(namespace))
                .cloned()
                .collect())
        })
    }
    fn tenants(&self) -> BoxFuture<'_, Result<Vec<Tenant>, LookupError>> {
        Box::pin(async move { Ok(self.tenants.clone()) })
    }
}

fn state() -> (WebhookState, mpsc::UnboundedReceiver<AdminAuditEvent>) {
    let cluster = FixtureCluster {
        namespaces: BTreeMap::from([(
            NS.to_owned(),
            BTreeMap::from([("portcullis.dev/tenant".to_owned(), "acme".to_owned())]),
        )]),
        roles: role_objects(),
        tenants: vec![acme()],
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let state = WebhookState {
        inject: InjectSettings::new("proxy:test", "portcullis-system", "portcullis-operator"),
        server_version: ServerVersion {
            major: 1,
            minor: 20,
        },
        validator: exempt(),
        lookup: Arc::new(cluster),
        audit: Arc::new(tx),
        clock: Arc::new(ManualClock::new("2026-03-16T14:22:01Z".parse().unwrap())),
    };
    (state, rx)
}

fn request(
    kind: &str,
    resource: &str,
    operation: &str,
    user: &str,
    object: Value,
    old: Value,
    dry_run: bool,
) -> AdmissionRequest<DynamicObject> {
    let group = if kind == "Pod" { "" } else { "portcullis.dev" };
    let version = if kind == "Pod" { "v1" } else { "v1alpha1" };
    let name = object["metadata"]["name"]
        .as_str()
        .or(old["metadata"]["name"].as_str())
        .unwrap_or("")
        .to_owned();
    let review: AdmissionReview<DynamicObject> = serde_json::from_value(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "7c4e0f7a-0000-4000-8000-000000000001",
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "name": name,
            "namespace": NS,
            "operation": operation,
            "userInfo": {"username": user, "groups": ["system:authenticated"]},
            "object": object,
            "oldObject": old,
            "dryRun": dry_run
        }
    }))
    .unwrap();
    review.try_into().unwrap()
}

#[tokio::test]
async fn the_refusal_message_is_what_kubectl_prints_and_admitted_changes_are_audited() {
    let (state, mut audit) = state();
    let key = serde_json::to_value(api_key(
        "ingest",
        json!({"role": "data-reader", "scopes": ["signals", "admin"]}),
    ))
    .unwrap();
    let response = review_admin(
        &state,
        &request(
            "ApiKey",
            "apikeys",
            "CREATE",
            "david@acme",
            key,
            Value::Null,
            false,
        ),
    )
    .await;
    assert!(!response.allowed);
    assert_eq!(response.result.code, 422);
    assert_eq!(response.result.reason, "Invalid");
    assert_eq!(
        response.result.message,
        "ApiKey \"ingest\" asks for scope \"admin\" which role \"data-reader\" does not grant; grant it in Role \
         \"data-reader\" or remove it from spec.scopes"
    );
    assert_eq!(response.uid, "7c4e0f7a-0000-4000-8000-000000000001");
    assert!(audit.try_recv().is_err(), "refused changes are not audited");

    let key = serde_json::to_value(api_key(
        "ingest",
        json!({"role": "Developer", "scopes": ["identify"]}),
    ))
    .unwrap();
    let response = review_admin(
        &state,
        &request(
            "ApiKey",
            "apikeys",
            "CREATE",
            "alice",
            key.clone(),
            Value::Null,
            false,
        ),
    )
    .await;
    assert_eq!(
        (
            response.allowed,
            response.result.code,
            response.result.reason.as_str()
        ),
        (false, 403, "Forbidden")
    );

    let response = review_admin(
        &state,
        &request(
            "ApiKey",
            "apikeys",
            "CREATE",
            "david@acme",
            key.clone(),
            Value::Null,
            true,
        ),
    )
    .await;
    assert!(response.allowed);
    assert!(
        audit.try_recv().is_err(),
        "dry runs change nothing and are not audited"
    );

    let response = review_admin(
        &state,
        &request(
            "ApiKey",
            "apikeys",
            "CREATE",
            "david@acme",
            key.clone(),
            Value::Null,
            false,
        ),
    )
    .await;
    assert!(response.allowed, "{response:?}");
    let event = audit.try_recv().unwrap();
    assert_eq!(
        event.to_string(),
        "2026-03-16 14:22:01 | admin.key.create | user:david@acme | 201"
    );
    assert_eq!(event.object, "acme-prod/ingest");

    let response = review_admin(
        &state,
        &request(
            "ApiKey",
            "apikeys",
            "DELETE",
            "david@acme",
            Value::Null,
            key,
            false,
        ),
    )
    .await;
    assert!(response.allowed);
    let event = audit.try_recv().unwrap();
    assert_eq!(
        (event.action.as_str(), event.status),
        ("admin.key.delete", 200)
    );

    let reader = serde_json::to_value(role("reader", json!({"scopes": ["signals"]}))).unwrap();
    let response = review_admin(
        &state,
        &request(
            "Role",
            "roles",
            "CREATE",
            "erin",
            reader,
            Value::Null,
            false,
        ),
    )
    .await;
    assert!(response.allowed, "{response:?}");
    assert_eq!(audit.try_recv().unwrap().action, "admin.role.create");
}

#[tokio::test]
async fn the_pod_handler_returns_a_json_patch() {
    let (state, _audit) = state();
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {"containers": [{"name": "app", "image": "a", "ports": [{"containerPort": 8080}]}]}
    });
    let response = review_pod(
        &state,
        &request(
            "Pod",
            "pods",
            "CREATE",
            "david@acme",
            pod,
            Value::Null,
            false,
        ),
    )
    .await;
    assert!(response.allowed);
    let review = serde_json::to_value(response.into_review()).unwrap();
    assert_eq!(review["response"]["patchType"], "JSONPatch");
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    // kube serialises the patch bytes as a JSON array of numbers, which the API server's
    // decoder accepts for a []byte field like base64 text.
    let bytes: Vec<u8> = serde_json::from_value(review["response"]["patch"].clone()).unwrap();
    let patch: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(patch[0]["path"], "/spec/initContainers");
    assert_eq!(patch[1]["value"]["name"], "portcullis-proxy");
}

#[tokio::test]
async fn a_restricted_tenant_is_admitted_with_a_warning_naming_the_kek_secret() {
    let (state, _audit) = state();
    let create = |name: &str, classification: &str| {
        let object = serde_json::to_value(tenant(
            name,
            json!({"namespaces": [format!("{name}-prod")], "dataClassification": classification}),
        ))
        .unwrap();
        request(
            "Tenant",
            "tenants",
            "CREATE",
            "system:admin",
            object,
            Value::Null,
            false,
        )
    };
    let response = review_admin(&state, &create("vault", "Restricted")).await;
    assert!(response.allowed, "{:?}", response.result);
    let warnings = response.warnings.unwrap_or_default();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("Tenant \"vault\" is Restricted")
            && warnings[0].contains("portcullis-system/portcullis-kek")
            && warnings[0].contains("hardware-backed"),
        "{warnings:?}"
    );
    for quiet in ["Public", "Internal", "Confidential"] {
        let response = review_admin(&state, &create("shop", quiet)).await;
        assert!(response.allowed, "{:?}", response.result);
        assert_eq!(response.warnings, None, "{quiet}");
    }
}

#[test]
fn with_hardware_required_a_tenant_becoming_restricted_is_refused_with_the_way_out() {
    let strict = ValidatorSettings {
        restricted_requires_hardware_kek: true,
        ..exempt()
    };
    let claims = TenantClaims::default();
    let classified = |classification: &str| {
        tenant(
            "vault",
            json!({"namespaces": ["vault-prod"], "dataClassification": classification}),
        )
    };
    let restricted = classified("Restricted");
    let refusal = validate_tenant(&create("vault", &restricted), &claims, &strict).unwrap_err();
    assert_eq!(refusal.code, 403);
    for words in [
        "\"vault\" is Restricted",
        "portcullis-system/portcullis-kek",
        "--restricted-requires-hardware-kek",
        "operator.restrictedRequiresHardwareKek",
        "--kek-provider pkcs11",
        "classify the Tenant Confidential",
    ] {
        assert!(refusal.message.contains(words), "{}", refusal.message);
    }
    let confidential = classified("Confidential");
    assert_eq!(
        validate_tenant(
            &update("vault", &confidential, &restricted),
            &claims,
            &strict
        )
        .map_err(|r| r.code),
        Err(403),
        "becoming Restricted by an update is refused too"
    );
    // A Tenant already Restricted is not locked out of other edits, and the default
    // admits it (with the warning the review adds).
    let mut grown = classified("Restricted");
    grown.spec.namespaces.push("vault-dr".into());
    assert_eq!(
        validate_tenant(&update("vault", &restricted, &grown), &claims, &strict),
        Ok(())
    );
    assert_eq!(
        validate_tenant(&create("vault", &restricted), &claims, &exempt()),
        Ok(())
    );
    assert_eq!(
        validate_tenant(&create("vault", &confidential), &claims, &strict),
        Ok(())
    );
    // With the KEK in an HSM the strict setting admits it.
    let hsm = ValidatorSettings {
        kek_custody: portcullis_operator::kek_custody::KekCustody::Pkcs11 {
            module: "/usr/lib/softhsm/libsofthsm2.so".into(),
            token: "token \"portcullis\"".into(),
            key_label: "portcullis-kek".into(),
        },
        ..strict
    };
    assert_eq!(
        validate_tenant(&create("vault", &restricted), &claims, &hsm),
        Ok(())
    );
}
