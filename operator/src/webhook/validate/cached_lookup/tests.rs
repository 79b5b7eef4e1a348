//! The caches answer what they hold, the API server what they miss, and no refusal is
//! sent on the caches' word alone.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionReview};
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use portcullis_api::clock::SystemClock;
use serde_json::{Value, json};

use super::*;
use crate::webhook::inject::{InjectSettings, ServerVersion};
use crate::webhook::{TracingAuditSink, ValidatorSettings, WebhookState, review_admin};

const NS: &str = "acme-prod";

fn role(name: &str, spec: Value) -> Role {
    serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "Role",
        "metadata": {"name": name, "namespace": NS}, "spec": spec
    }))
    .unwrap()
}

fn tenant() -> Tenant {
    serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant", "metadata": {"name": "acme"},
        "spec": {"namespaces": [NS]}
    }))
    .unwrap()
}

fn namespace() -> PartialObjectMeta<Namespace> {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NS, "labels": {"portcullis.dev/tenant": "acme"}}
    }))
    .unwrap()
}

/// The API server: `roles` in the namespace, the same Tenant and namespace as the
/// caches, counting every question.
struct ApiServer {
    roles: Vec<Role>,
    asked: AtomicUsize,
}

impl ApiServer {
    fn asked(&self) -> usize {
        self.asked.load(Ordering::Relaxed)
    }
}

impl ClusterLookup for Arc<ApiServer> {
    fn namespace_labels<'a>(
        &'a self,
        _: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, LookupError>> {
        self.asked.fetch_add(1, Ordering::Relaxed);
        Box::pin(async { Ok(namespace().metadata.labels) })
    }
    fn roles<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Vec<Role>, LookupError>> {
        self.asked.fetch_add(1, Ordering::Relaxed);
        let roles = self.roles.clone();
        Box::pin(async move { Ok(roles) })
    }
    fn tenants(&self) -> BoxFuture<'_, Result<Vec<Tenant>, LookupError>> {
        self.asked.fetch_add(1, Ordering::Relaxed);
        Box::pin(async { Ok(vec![tenant()]) })
    }
}

fn filled<K>(objects: Vec<K>) -> SyncedStore<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let mut writer = Writer::<K>::default();
    let store = writer.as_reader();
    writer.apply_watcher_event(&watcher::Event::Init);
    for object in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(object));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    let synced = Synced::default();
    synced.mark();
    SyncedStore { store, synced }
}

/// Caches holding the Tenant, its namespace and `cached_roles`.
fn lookup(cached_roles: Vec<Role>, api: &Arc<ApiServer>) -> CachedLookup<Arc<ApiServer>> {
    CachedLookup::new(
        api.clone(),
        WebhookCaches {
            tenants: filled(vec![tenant()]),
            roles: filled(cached_roles),
            namespaces: filled(vec![namespace()]),
        },
    )
}

fn api(roles: Vec<Role>) -> Arc<ApiServer> {
    Arc::new(ApiServer {
        roles,
        asked: AtomicUsize::new(0),
    })
}

fn create_role_by_operator(object: &Role) -> AdmissionRequest<DynamicObject> {
    let review: AdmissionReview<DynamicObject> = serde_json::from_value(json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "00000000-0000-4000-8000-000000000002",
            "kind": {"group": "portcullis.dev", "version": "v1alpha1", "kind": "Role"},
            "resource": {"group": "portcullis.dev", "version": "v1alpha1", "resource": "roles"},
            "name": object.metadata.name, "namespace": NS, "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:portcullis-system:portcullis-operator",
                         "groups": ["system:serviceaccounts"]},
            "object": object, "oldObject": Value::Null, "dryRun": false
        }
    }))
    .unwrap();
    review.try_into().unwrap()
}

fn state(lookup: CachedLookup<Arc<ApiServer>>) -> WebhookState {
    WebhookState {
        inject: InjectSettings::new("proxy:test", "portcullis-system", "portcullis-operator"),
        server_version: ServerVersion {
            major: 1,
            minor: 20,
        },
        validator: ValidatorSettings::new("portcullis-system", "portcullis-operator"),
        lookup: Arc::new(lookup),
        audit: Arc::new(TracingAuditSink),
        clock: Arc::new(SystemClock),
    }
}

#[tokio::test]
async fn what_the_caches_hold_costs_no_api_request() {
    let parent = role("reader", json!({"permissions": ["audit:read"]}));
    let api = api(vec![parent.clone()]);
    let state = state(lookup(vec![parent], &api));
    let child = role("auditor", json!({"inherits": ["reader"]}));

    let response = review_admin(&state, &create_role_by_operator(&child)).await;
    assert!(response.allowed, "{:?}", response.result);
    assert_eq!(
        api.asked(),
        0,
        "namespace, Tenant and Roles came from the caches"
    );
}

#[tokio::test]
async fn a_role_inheriting_one_the_cache_has_not_seen_yet_is_admitted() {
    // `kubectl apply` of two Roles, the second inheriting the first: the webhook's watch
    // has not delivered the first yet.
    let parent = role("reader", json!({"permissions": ["audit:read"]}));
    let api = api(vec![parent]);
    let state = state(lookup(Vec::new(), &api));
    let child = role("auditor", json!({"inherits": ["reader"]}));

    let response = review_admin(&state, &create_role_by_operator(&child)).await;
    assert!(response.allowed, "{:?}", response.result);
    assert!(
        api.asked() > 0,
        "the refusal was checked with the API server"
    );
}

#[tokio::test]
async fn a_refusal_the_api_server_confirms_is_sent() {
    let api = api(Vec::new());
    let state = state(lookup(Vec::new(), &api));
    let child = role("auditor", json!({"inherits": ["reader"]}));

    let response = review_admin(&state, &create_role_by_operator(&child)).await;
    assert!(!response.allowed);
    assert!(
        response
            .result
            .message
            .contains("inherits from \"reader\", which does not exist"),
        "{}",
        response.result.message
    );
    assert!(api.asked() > 0);
}

#[tokio::test]
async fn misses_and_unsynced_caches_are_read_from_the_api_server() {
    let api = api(Vec::new());
    let cached = lookup(Vec::new(), &api);
    assert!(cached.tenant("other").await.unwrap().is_none());
    assert!(cached.namespace_labels("new-ns").await.unwrap().is_some());
    assert_eq!(api.asked(), 2, "one Tenant and one namespace missed");

    let mut unsynced = lookup(Vec::new(), &api);
    unsynced.caches.tenants.synced = Synced::default();
    unsynced.tenants().await.unwrap();
    assert_eq!(api.asked(), 3, "a cache without its first list is not read");
}
