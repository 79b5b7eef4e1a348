//! The webhook configuration objects as data (the Helm chart renders the same shape) and
//! the apply configuration that owns only the CA bundle.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use portcullis_operator::webhook::config::{self, WebhookConfigSettings, WebhookTarget};
use portcullis_operator::webhook::tls::rotation::bundle_patch;
use serde_json::{Value, json};

fn in_cluster() -> Value {
    let mut settings =
        WebhookConfigSettings::in_cluster("portcullis-system", "portcullis-operator");
    settings.ca_bundle = "PEM".into();
    serde_json::to_value(config::mutating(&settings)).unwrap()
}

#[test]
fn the_injector_only_sees_pods_of_opted_in_namespaces() {
    let config = in_cluster();
    assert_eq!(config["metadata"]["name"], "portcullis-injector");
    let webhooks = config["webhooks"].as_array().unwrap();
    assert_eq!(webhooks.len(), 2);
    let never_system = json!({"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                              "values": ["kube-system", "portcullis-system"]});
    assert_eq!(webhooks[0]["name"], "inject.portcullis.dev");
    assert_eq!(
        webhooks[0]["namespaceSelector"],
        json!({"matchExpressions": [
            {"key": "portcullis.dev/inject", "operator": "In", "values": ["enabled", "required"]},
            {"key": "portcullis.dev/tenant", "operator": "DoesNotExist"},
            never_system
        ]})
    );
    assert_eq!(webhooks[1]["name"], "tenant-inject.portcullis.dev");
    assert_eq!(
        webhooks[1]["namespaceSelector"],
        json!({"matchExpressions": [
            // Every tenant namespace, also one labelled inject=disabled: a Confidential or
            // Restricted Tenant requires injection whatever that label says.
            {"key": "portcullis.dev/tenant", "operator": "Exists"},
            never_system
        ]})
    );
    for webhook in webhooks {
        assert_eq!(webhook["failurePolicy"], "Fail");
        assert_eq!(webhook["sideEffects"], "None");
        assert_eq!(webhook["admissionReviewVersions"], json!(["v1"]));
        assert_eq!(webhook["timeoutSeconds"], 5);
        assert_eq!(webhook["reinvocationPolicy"], "IfNeeded");
        assert_eq!(
            webhook["rules"],
            // UPDATE and ephemeral containers too: they could swap or undo the proxy.
            json!([{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"],
                    "resources": ["pods", "pods/ephemeralcontainers"], "scope": "Namespaced"}])
        );
        assert_eq!(
            webhook["clientConfig"],
            json!({"caBundle": "UEVN", "service": {"namespace": "portcullis-system",
                   "name": "portcullis-operator", "path": "/inject", "port": 9443}})
        );
    }
}

#[test]
fn the_validator_covers_the_portcullis_resources_but_not_their_status() {
    let settings = WebhookConfigSettings {
        target: WebhookTarget::Url("https://127.0.0.1:9443/".into()),
        operator_namespace: "portcullis-system".into(),
        ca_bundle: String::new(),
    };
    let config = serde_json::to_value(config::validating(&settings)).unwrap();
    assert_eq!(config["metadata"]["name"], "portcullis-validator");
    let webhook = &config["webhooks"][0];
    assert_eq!(webhook["name"], "validate.portcullis.dev");
    assert_eq!(webhook["failurePolicy"], "Fail");
    assert_eq!(webhook["sideEffects"], "None");
    assert_eq!(webhook["timeoutSeconds"], 5);
    assert_eq!(
        webhook["clientConfig"],
        json!({"url": "https://127.0.0.1:9443/validate"})
    );
    assert_eq!(
        webhook["rules"],
        json!([
            {"apiGroups": ["portcullis.dev"], "apiVersions": ["v1alpha1"], "operations": ["CREATE", "UPDATE", "DELETE"],
             "resources": ["apikeys", "roles"], "scope": "Namespaced"},
            {"apiGroups": ["portcullis.dev"], "apiVersions": ["v1alpha1"], "operations": ["CREATE", "UPDATE", "DELETE"],
             "resources": ["tenants"], "scope": "Cluster"}
        ])
    );
    assert!(
        webhook.get("namespaceSelector").is_none(),
        "every namespace's keys and roles are validated"
    );
}

#[test]
fn the_bundle_patch_owns_only_ca_bundles() {
    let patch = bundle_patch(
        "MutatingWebhookConfiguration",
        "portcullis-injector",
        &[
            "inject.portcullis.dev".into(),
            "tenant-inject.portcullis.dev".into(),
        ],
        "PEM",
    );
    assert_eq!(
        patch,
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "portcullis-injector"},
            "webhooks": [
                {"name": "inject.portcullis.dev", "clientConfig": {"caBundle": "UEVN"}},
                {"name": "tenant-inject.portcullis.dev", "clientConfig": {"caBundle": "UEVN"}}
            ]
        })
    );
}
