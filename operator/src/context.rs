//! What every reconciler gets: the client, metrics, diagnostics, the event recorder,
//! the caches, the KEK, the clock and the settings. Nothing global.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::RwLock;

use crate::clock::Clock;
use crate::envelope::Kek;
use crate::error::Error;
use crate::kek_custody::KekCustody;
use crate::metrics::{Kind, Metrics};
use crate::stores::Stores;
use crate::webhook::inject::InjectSettings;

/// Reporter name on Events.
pub const CONTROLLER_NAME: &str = "portcullis-operator";
/// Where Events about cluster-scoped objects (Tenants) are written.
pub const EVENT_NAMESPACE_FOR_CLUSTER_OBJECTS: &str = "kube-system";

/// Settings the reconcilers need.
#[derive(Clone, Debug)]
pub struct ReconcileSettings {
    /// The operator's namespace (KEK, DEK Secrets, Lease).
    pub namespace: String,
    /// How long a rotated key's previous token stays valid.
    pub key_rotation_overlap: Duration,
    /// bcrypt cost of new token hashes.
    pub hash_cost: u32,
    /// First retry delay after a failed reconcile (doubles per failure).
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Periodic resync of healthy objects.
    pub resync: Duration,
    /// What the injector adds: a pod counts as protected only when it carries exactly
    /// this (the webhook's own settings when this replica serves the webhooks).
    pub inject: InjectSettings,
    /// What the operator binds in each tenant namespace to reach its ApiKey Secrets;
    /// `None`: nothing (its credentials reach them already).
    pub secrets_binding: Option<SecretsBinding>,
    /// Where the KEK is kept (a Restricted Tenant's `KeyCustody` condition).
    pub kek_custody: KekCustody,
}

/// The chart's tenant-secrets ClusterRole and the ServiceAccount (in the operator's
/// namespace) it is bound to in each tenant namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretsBinding {
    /// The ClusterRole granting ApiKey Secret access (bound per namespace, never
    /// cluster-wide).
    pub cluster_role: String,
    /// The operator's ServiceAccount.
    pub service_account: String,
}

impl ReconcileSettings {
    /// Defaults for the operator namespace `namespace`.
    pub fn new(namespace: impl Into<String>) -> Self {
        let namespace = namespace.into();
        Self {
            inject: InjectSettings::new(
                crate::run::PROXY_IMAGE,
                &namespace,
                crate::run::SERVICE_NAME,
            ),
            key_rotation_overlap: Duration::from_secs(3_600),
            hash_cost: portcullis_crds::token::HASH_COST,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            resync: Duration::from_secs(3_600),
            secrets_binding: None,
            kek_custody: KekCustody::Secret {
                namespace: namespace.clone(),
                name: crate::envelope::KEK_SECRET_NAME.to_owned(),
            },
            namespace,
        }
    }
}

/// What the HTTP server shows about the controllers.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Diagnostics {
    /// When a reconcile last finished.
    pub last_reconcile: Option<Timestamp>,
    /// Whether this replica currently leads.
    pub leading: bool,
}

/// Shared by every reconcile of every kind.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Served on `/debug/diagnostics`.
    pub diagnostics: Arc<RwLock<Diagnostics>>,
    /// Publishes Events.
    pub recorder: Recorder,
    /// Cached Tenants, Roles and ApiKeys.
    pub stores: Stores,
    /// Wraps DEKs.
    pub kek: Arc<Kek>,
    /// The one time source.
    pub clock: Clock,
    /// Settings.
    pub settings: ReconcileSettings,
    instance: Option<String>,
    failures: Mutex<HashMap<String, u32>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .field("stores", &self.stores)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context; `instance` names this replica on Events.
    pub fn new(
        client: Client,
        stores: Stores,
        kek: Arc<Kek>,
        metrics: Arc<Metrics>,
        settings: ReconcileSettings,
        clock: Clock,
        instance: Option<String>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: CONTROLLER_NAME.into(),
                instance: instance.clone(),
            },
        );
        Self {
            client,
            metrics,
            diagnostics: Arc::new(RwLock::new(Diagnostics {
                last_reconcile: None,
                leading: false,
            })),
            recorder,
            stores,
            kek,
            clock,
            settings,
            instance,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes an Event; a failure is logged, never fatal to the reconcile.
    ///
    /// Events about cluster-scoped objects (Tenants) go to `kube-system`: kube-runtime's
    /// Recorder writes them to `default`, which API servers before 1.20.12/1.21.6/1.22.3
    /// refuse (kube-rs/kube#870), while `kube-system` is accepted since 1.19.
    pub async fn event(
        &self,
        regarding: &ObjectReference,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        let type_ = if warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        let result = if regarding.namespace.is_none() {
            self.cluster_scoped_event(regarding, type_, reason, note)
                .await
        } else {
            let event = Event {
                type_,
                reason: reason.to_owned(),
                note: Some(note),
                action: reason.to_owned(),
                secondary: None,
            };
            self.recorder.publish(&event, regarding).await
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, reason, "could not publish event");
        }
    }

    async fn cluster_scoped_event(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
    ) -> Result<(), kube::Error> {
        publish_cluster_scoped_event(
            &self.client,
            self.instance.as_deref().unwrap_or(CONTROLLER_NAME),
            regarding,
            type_,
            reason,
            note,
            self.clock.now(),
        )
        .await
    }

    /// Records a successful reconcile: clears the object's backoff.
    pub async fn succeeded(&self, object: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(object);
        self.diagnostics.write().await.last_reconcile = Some(self.clock.now());
    }

    /// The error policy shared by every kind: count the failure under its variant name
    /// and retry with exponential backoff per object.
    pub fn error_policy(&self, kind: Kind, object: &str, error: &Error) -> Action {
        self.metrics.failure(kind, error);
        let attempt = {
            let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            let n = failures.entry(object.to_owned()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        };
        let delay = backoff(
            self.settings.backoff_base,
            self.settings.backoff_max,
            attempt,
        );
        if error.is_rejection() {
            tracing::info!(kind = kind.as_str(), object, error = %error, retry_in = ?delay, "object rejected");
        } else {
            tracing::warn!(kind = kind.as_str(), object, error = %error, retry_in = ?delay, "reconcile failed");
        }
        Action::requeue(delay)
    }
}

/// `base * 2^(attempt-1)`, capped at `max`.
pub fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
    base.saturating_mul(factor).min(max)
}

/// Publishes an Event about a cluster-scoped object (a Tenant) in
/// [`EVENT_NAMESPACE_FOR_CLUSTER_OBJECTS`], written directly because kube-runtime's
/// Recorder puts such Events in `default`, which API servers before
/// 1.20.12/1.21.6/1.22.3 refuse (kube-rs/kube#870).
pub async fn publish_cluster_scoped_event(
    client: &Client,
    instance: &str,
    regarding: &ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
    now: jiff::Timestamp,
) -> Result<(), kube::Error> {
    use k8s_openapi::api::events::v1::Event as K8sEvent;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let event = K8sEvent {
        metadata: kube::api::ObjectMeta {
            name: Some(format!(
                "{}.{:x}",
                regarding.name.as_deref().unwrap_or(CONTROLLER_NAME),
                now.as_nanosecond()
            )),
            namespace: Some(EVENT_NAMESPACE_FOR_CLUSTER_OBJECTS.to_owned()),
            ..kube::api::ObjectMeta::default()
        },
        action: Some(reason.to_owned()),
        reason: Some(reason.to_owned()),
        note: Some(note),
        event_time: Some(MicroTime(now)),
        regarding: Some(regarding.clone()),
        reporting_controller: Some(CONTROLLER_NAME.to_owned()),
        reporting_instance: Some(instance.to_owned()),
        type_: Some(
            if type_ == EventType::Warning {
                "Warning"
            } else {
                "Normal"
            }
            .to_owned(),
        ),
        ..K8sEvent::default()
    };
    kube::Api::<K8sEvent>::namespaced(client.clone(), EVENT_NAMESPACE_FOR_CLUSTER_OBJECTS)
        .create(&kube::api::PostParams::default(), &event)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(300);
        assert_eq!(backoff(base, max, 1), Duration::from_secs(1));
        assert_eq!(backoff(base, max, 2), Duration::from_secs(2));
        assert_eq!(backoff(base, max, 5), Duration::from_secs(16));
        assert_eq!(backoff(base, max, 9), Duration::from_secs(256));
        assert_eq!(backoff(base, max, 10), max);
        assert_eq!(backoff(base, max, u32::MAX), max);
    }
}
