//! The webhook configurations, built as data — the operator applies them and the Helm
//! chart renders the same shape (keep them in step).
//!
//! MutatingWebhookConfiguration `portcullis-injector`, two webhooks on pod CREATE and
//! UPDATE and `pods/ephemeralcontainers` UPDATE (an update may swap a container's image,
//! an ephemeral container could undo the redirect: the injector refuses both for its
//! own containers), both `failurePolicy: Fail` (a pod that must carry the proxy is
//! never created without it), `reinvocationPolicy: IfNeeded`, and namespace selectors
//! that only match opted-in namespaces (a label selector cannot say "A or B", hence two
//! webhooks that never match the same namespace):
//!
//! - `inject.portcullis.dev`: `portcullis.dev/inject In (enabled, required)` and no
//!   `portcullis.dev/tenant` label;
//! - `tenant-inject.portcullis.dev`: `portcullis.dev/tenant` exists — every tenant
//!   namespace, also one labelled `portcullis.dev/inject=disabled`, because a
//!   Confidential or Restricted Tenant requires injection whatever that label says (the
//!   injector reads the Tenant and decides).
//!
//! Both also carry `kubernetes.io/metadata.name NotIn (kube-system, <operator ns>)`, so
//! the operator can always start even when its webhook is down (the label is set by API
//! servers ≥ 1.21; the injector refuses those namespaces itself on older ones).
//!
//! ValidatingWebhookConfiguration `portcullis-validator`: `validate.portcullis.dev` on
//! CREATE, UPDATE and DELETE of `portcullis.dev/v1alpha1` apikeys, roles and tenants
//! (not their status), `failurePolicy: Fail`.
//!
//! All webhooks: `sideEffects: None`, `admissionReviewVersions: [v1]`,
//! `timeoutSeconds: 5`, `matchPolicy: Equivalent`.

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference,
    ValidatingWebhook, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::api::ObjectMeta;
use portcullis_api::injection::WEBHOOK_PORT;
use portcullis_crds::annotations::INJECT;
use portcullis_crds::tenant::TENANT_LABEL;

/// Name of the MutatingWebhookConfiguration.
pub const MUTATING_CONFIGURATION: &str = "portcullis-injector";
/// Name of the ValidatingWebhookConfiguration.
pub const VALIDATING_CONFIGURATION: &str = "portcullis-validator";
/// The injection webhook for namespaces labelled `portcullis.dev/inject`.
pub const INJECT_WEBHOOK: &str = "inject.portcullis.dev";
/// The injection webhook for tenant namespaces.
pub const TENANT_INJECT_WEBHOOK: &str = "tenant-inject.portcullis.dev";
/// The validating webhook.
pub const VALIDATE_WEBHOOK: &str = "validate.portcullis.dev";
/// Path of the mutating webhook.
pub const INJECT_PATH: &str = "/inject";
/// Path of the validating webhook.
pub const VALIDATE_PATH: &str = "/validate";
/// The label the API server sets on every namespace (1.21+).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// How the API server reaches the webhook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WebhookTarget {
    /// Through a Service (in-cluster): `<name>.<namespace>.svc:<port>`.
    Service {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// Its port (9443).
        port: u16,
    },
    /// A base URL such as `https://127.0.0.1:9443` (envtest, out-of-cluster runs).
    Url(String),
}

/// What varies between installations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookConfigSettings {
    /// Where the API server sends reviews.
    pub target: WebhookTarget,
    /// The operator's namespace, never injected.
    pub operator_namespace: String,
    /// PEM CA bundle (empty: patched in later by the operator).
    pub ca_bundle: String,
}

impl WebhookConfigSettings {
    /// In-cluster defaults: Service `service` in `namespace` on port 9443.
    pub fn in_cluster(namespace: &str, service: &str) -> Self {
        Self {
            target: WebhookTarget::Service {
                namespace: namespace.into(),
                name: service.into(),
                port: WEBHOOK_PORT,
            },
            operator_namespace: namespace.into(),
            ca_bundle: String::new(),
        }
    }

    fn client_config(&self, path: &str) -> WebhookClientConfig {
        let ca_bundle =
            (!self.ca_bundle.is_empty()).then(|| ByteString(self.ca_bundle.clone().into_bytes()));
        match &self.target {
            WebhookTarget::Service {
                namespace,
                name,
                port,
            } => WebhookClientConfig {
                ca_bundle,
                service: Some(ServiceReference {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    path: Some(path.into()),
                    port: Some(i32::from(*port)),
                }),
                url: None,
            },
            WebhookTarget::Url(base) => WebhookClientConfig {
                ca_bundle,
                service: None,
                url: Some(format!("{}{path}", base.trim_end_matches('/'))),
            },
        }
    }

    fn never_system(&self) -> LabelSelectorRequirement {
        let mut excluded = vec!["kube-system".to_owned()];
        if self.operator_namespace != "kube-system" {
            excluded.push(self.operator_namespace.clone());
        }
        requirement(
            NAMESPACE_NAME_LABEL,
            "NotIn",
            &excluded.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    }
}

fn requirement(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
    LabelSelectorRequirement {
        key: key.into(),
        operator: operator.into(),
        values: (!values.is_empty()).then(|| values.iter().map(|v| (*v).to_owned()).collect()),
    }
}

fn rule(
    api_groups: &[&str],
    resources: &[&str],
    operations: &[&str],
    scope: &str,
) -> RuleWithOperations {
    let strings = |items: &[&str]| Some(items.iter().map(|s| (*s).to_owned()).collect());
    RuleWithOperations {
        api_groups: strings(api_groups),
        api_versions: strings(if api_groups == [""] {
            &["v1"]
        } else {
            &["v1alpha1"]
        }),
        operations: strings(operations),
        resources: strings(resources),
        scope: Some(scope.into()),
    }
}

fn mutating_webhook(
    name: &str,
    settings: &WebhookConfigSettings,
    selector: Vec<LabelSelectorRequirement>,
) -> MutatingWebhook {
    MutatingWebhook {
        name: name.into(),
        admission_review_versions: vec!["v1".into()],
        client_config: settings.client_config(INJECT_PATH),
        failure_policy: Some("Fail".into()),
        match_policy: Some("Equivalent".into()),
        namespace_selector: Some(LabelSelector {
            match_expressions: Some(selector),
            match_labels: None,
        }),
        reinvocation_policy: Some("IfNeeded".into()),
        rules: Some(vec![rule(
            &[""],
            &["pods", "pods/ephemeralcontainers"],
            &["CREATE", "UPDATE"],
            "Namespaced",
        )]),
        side_effects: "None".into(),
        timeout_seconds: Some(5),
        ..MutatingWebhook::default()
    }
}

/// `portcullis-injector`.
pub fn mutating(settings: &WebhookConfigSettings) -> MutatingWebhookConfiguration {
    let opted_in = vec![
        requirement(INJECT, "In", &["enabled", "required"]),
        requirement(TENANT_LABEL, "DoesNotExist", &[]),
        settings.never_system(),
    ];
    let tenant = vec![
        requirement(TENANT_LABEL, "Exists", &[]),
        settings.never_system(),
    ];
    MutatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(MUTATING_CONFIGURATION.into()),
            ..ObjectMeta::default()
        },
        webhooks: Some(vec![
            mutating_webhook(INJECT_WEBHOOK, settings, opted_in),
            mutating_webhook(TENANT_INJECT_WEBHOOK, settings, tenant),
        ]),
    }
}

/// `portcullis-validator`.
pub fn validating(settings: &WebhookConfigSettings) -> ValidatingWebhookConfiguration {
    ValidatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(VALIDATING_CONFIGURATION.into()),
            ..ObjectMeta::default()
        },
        webhooks: Some(vec![ValidatingWebhook {
            name: VALIDATE_WEBHOOK.into(),
            admission_review_versions: vec!["v1".into()],
            client_config: settings.client_config(VALIDATE_PATH),
            failure_policy: Some("Fail".into()),
            match_policy: Some("Equivalent".into()),
            rules: Some(vec![
                rule(
                    &[portcullis_crds::GROUP],
                    &["apikeys", "roles"],
                    &["CREATE", "UPDATE", "DELETE"],
                    "Namespaced",
                ),
                rule(
                    &[portcullis_crds::GROUP],
                    &["tenants"],
                    &["CREATE", "UPDATE", "DELETE"],
                    "Cluster",
                ),
            ]),
            side_effects: "None".into(),
            timeout_seconds: Some(5),
            ..ValidatingWebhook::default()
        }]),
    }
}
