//! Cluster admins who are not in `system:masters` (kubeadm's `kubeadm:cluster-admins`,
//! bound to `cluster-admin`) are exempt from the escalation check when the API server's
//! authorizer (SubjectAccessReview) says they may `*` `*` in `portcullis.dev`; nobody
//! else is, the authorizer is asked only when the check would refuse, and an
//! authorizer that cannot be reached makes the webhook answer 503, not a wrong verdict.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::UserInfo;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionReview};
use portcullis_api::clock::SystemClock;
use portcullis_crds::{Role, Tenant};
use portcullis_operator::webhook::inject::{InjectSettings, ServerVersion};
use portcullis_operator::webhook::validate::lookup::{
    ClusterLookup, LookupError, portcullis_admin_review,
};
use portcullis_operator::webhook::{ValidatorSettings, WebhookState, review_admin};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const NS: &str = "acme-prod";

/// A tenant namespace with no Role subjects; `admins` are the users the authorizer
/// calls cluster admins; `broken` makes the authorizer unreachable.
struct Cluster {
    admins: Vec<String>,
    broken: bool,
    asked: AtomicUsize,
}

impl ClusterLookup for Cluster {
    fn namespace_labels<'a>(
        &'a self,
        _: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, LookupError>> {
        Box::pin(async {
            Ok(Some(BTreeMap::from([(
                "portcullis.dev/tenant".to_owned(),
                "acme".to_owned(),
            )])))
        })
    }
    fn roles<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Vec<Role>, LookupError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn tenants(&self) -> BoxFuture<'_, Result<Vec<Tenant>, LookupError>> {
        Box::pin(async {
            Ok(vec![serde_json::from_value(json!({
                "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant", "metadata": {"name": "acme"},
                "spec": {"namespaces": [NS], "scopes": {"identify": [{"methods": ["POST"], "path": "/v1/identify"}]}}
            }))
            .unwrap()])
        })
    }
    fn is_portcullis_admin<'a>(
        &'a self,
        user: &'a UserInfo,
    ) -> BoxFuture<'a, Result<bool, LookupError>> {
        self.asked.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            if self.broken {
                return Err(LookupError {
                    what: "a SubjectAccessReview".into(),
                    source: kube::Error::Service("connection refused".into()),
                });
            }
            Ok(user
                .username
                .as_ref()
                .is_some_and(|u| self.admins.contains(u)))
        })
    }
}

fn state(
    cluster: Arc<Cluster>,
) -> (
    WebhookState,
    mpsc::UnboundedReceiver<portcullis_operator::webhook::AdminAuditEvent>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let state = WebhookState {
        inject: InjectSettings::new("proxy:test", "portcullis-system", "portcullis-operator"),
        server_version: ServerVersion {
            major: 1,
            minor: 20,
        },
        validator: ValidatorSettings::new("portcullis-system", "portcullis-operator"),
        lookup: cluster,
        audit: Arc::new(tx),
        clock: Arc::new(SystemClock),
    };
    (state, rx)
}

fn create_key(user: &str, groups: &[&str], dry_run: bool) -> AdmissionRequest<DynamicObject> {
    let key = json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey",
        "metadata": {"name": "ingest", "namespace": NS},
        "spec": {"role": "Developer", "scopes": ["identify"]}
    });
    let review: AdmissionReview<DynamicObject> = serde_json::from_value(json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "00000000-0000-4000-8000-000000000001",
            "kind": {"group": "portcullis.dev", "version": "v1alpha1", "kind": "ApiKey"},
            "resource": {"group": "portcullis.dev", "version": "v1alpha1", "resource": "apikeys"},
            "name": "ingest", "namespace": NS, "operation": "CREATE",
            "userInfo": {"username": user, "groups": groups, "extra": {"scopes.example/x": ["y"]}},
            "object": key, "oldObject": Value::Null, "dryRun": dry_run
        }
    }))
    .unwrap();
    review.try_into().unwrap()
}

fn cluster(admins: &[&str], broken: bool) -> Arc<Cluster> {
    Arc::new(Cluster {
        admins: admins.iter().map(|a| (*a).to_owned()).collect(),
        broken,
        asked: AtomicUsize::new(0),
    })
}

#[tokio::test]
async fn a_kubeadm_cluster_admin_is_exempt_and_audited_but_not_on_dry_runs() {
    let cluster = cluster(&["kubernetes-admin"], false);
    let (state, mut audit) = state(cluster.clone());
    let admin = &["kubeadm:cluster-admins", "system:authenticated"];

    let response = review_admin(&state, &create_key("kubernetes-admin", admin, true)).await;
    assert!(response.allowed, "{:?}", response.result);
    assert!(
        audit.try_recv().is_err(),
        "a dry run is not an admin change"
    );

    let response = review_admin(&state, &create_key("kubernetes-admin", admin, false)).await;
    assert!(response.allowed, "{:?}", response.result);
    let event = audit.try_recv().unwrap();
    assert_eq!(
        (event.action.as_str(), event.principal.as_str()),
        ("admin.key.create", "user:kubernetes-admin")
    );
    assert_eq!(cluster.asked.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn anyone_else_is_still_refused_with_403() {
    let cluster = cluster(&["kubernetes-admin"], false);
    let (state, mut audit) = state(cluster.clone());
    let response = review_admin(
        &state,
        &create_key("mallory", &["kubeadm:cluster-admins-not"], false),
    )
    .await;
    assert_eq!((response.allowed, response.result.code), (false, 403));
    assert!(audit.try_recv().is_err());
}

#[tokio::test]
async fn system_masters_needs_no_access_review() {
    let cluster = cluster(&[], false);
    let (state, _audit) = state(cluster.clone());
    let response = review_admin(&state, &create_key("root", &["system:masters"], false)).await;
    assert!(response.allowed, "{:?}", response.result);
    assert_eq!(cluster.asked.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn an_unreachable_authorizer_is_a_503_not_a_verdict() {
    let (state, _audit) = state(cluster(&["kubernetes-admin"], true));
    let response = review_admin(
        &state,
        &create_key("kubernetes-admin", &["kubeadm:cluster-admins"], false),
    )
    .await;
    assert_eq!((response.allowed, response.result.code), (false, 503));
}

#[test]
fn the_access_review_asks_for_everything_in_the_group_cluster_wide_as_the_user() {
    let user = UserInfo {
        username: Some("kubernetes-admin".into()),
        groups: Some(vec!["kubeadm:cluster-admins".into()]),
        uid: Some("u-1".into()),
        extra: Some(BTreeMap::from([("k".to_owned(), vec!["v".to_owned()])])),
    };
    let review = serde_json::to_value(portcullis_admin_review(&user)).unwrap();
    assert_eq!(
        review["spec"],
        json!({
            "user": "kubernetes-admin", "groups": ["kubeadm:cluster-admins"], "uid": "u-1", "extra": {"k": ["v"]},
            "resourceAttributes": {"group": "portcullis.dev", "resource": "*", "verb": "*"}
        })
    );
}
