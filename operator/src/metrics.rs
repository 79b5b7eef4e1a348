//! Prometheus metrics served on `/metrics`: reconciles and failures by kind, reconcile
//! duration, API keys by state, leadership and policy publishing.

use std::sync::Arc;
use std::time::Instant;

use portcullis_crds::KeyState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::error::Error;

/// The kinds the operator reconciles, as metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `Tenant`
    Tenant,
    /// `Role`
    Role,
    /// `ApiKey`
    ApiKey,
}

impl Kind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tenant => "Tenant",
            Self::Role => "Role",
            Self::ApiKey => "ApiKey",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    kind: &'static str,
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// Every metric the operator exports, registered in one [`Registry`].
pub struct Metrics {
    registry: Arc<Registry>,
    /// The identity service's certificates issued, refusals and CA expiry.
    pub identity: crate::ca::IdentityMetrics,
    /// The KMS plugin's health and key id (kms KEK provider only).
    pub kms: crate::envelope::kms::health::KmsMetrics,
    /// The KEK's age and rotation progress.
    pub kek: crate::kek_rotation::KekMetrics,
    reconciles: Family<KindLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    duration: Family<KindLabels, Histogram>,
    api_keys: Family<StateLabels, Gauge>,
    leader: Gauge,
    policy_publishes: Counter,
    unprotected_pods: Family<TenantLabels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        // The identity metrics carry their own `portcullis_identity_` names; the
        // controllers' live under `portcullis_operator_`. One registry, one encoding.
        let mut root = Registry::default();
        let identity = crate::ca::IdentityMetrics::register(&mut root);
        let registry = root.sub_registry_with_prefix("portcullis_operator");
        let kms = crate::envelope::kms::health::KmsMetrics::register(registry);
        let kek = crate::kek_rotation::KekMetrics::register(registry);
        let reconciles = Family::<KindLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let duration = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 12))
        });
        let api_keys = Family::<StateLabels, Gauge>::default();
        let leader = Gauge::default();
        let policy_publishes = Counter::default();
        let unprotected_pods = Family::<TenantLabels, Gauge>::default();
        registry.register(
            "unprotected_pods",
            "Pods of a tenant's namespaces running without the proxy",
            unprotected_pods.clone(),
        );
        registry.register("reconciles", "Reconciliations by kind", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Failed reconciliations by kind and error variant",
            failures.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "Time spent in one reconciliation",
            Unit::Seconds,
            duration.clone(),
        );
        registry.register("api_keys", "API keys by state", api_keys.clone());
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        registry.register(
            "policy_publishes",
            "Policy bundle versions published to sidecars",
            policy_publishes.clone(),
        );
        Self {
            registry: Arc::new(root),
            identity,
            kms,
            kek,
            reconciles,
            failures,
            duration,
            api_keys,
            leader,
            policy_publishes,
            unprotected_pods,
        }
    }
}

/// Measures one reconciliation; records its duration when dropped.
#[must_use]
pub struct ReconcileMeasurer {
    start: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileMeasurer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

impl Metrics {
    /// Counts a reconciliation and starts timing it.
    pub fn reconcile(&self, kind: Kind) -> ReconcileMeasurer {
        let labels = KindLabels {
            kind: kind.as_str(),
        };
        self.reconciles.get_or_create(&labels).inc();
        ReconcileMeasurer {
            start: Instant::now(),
            histogram: self.duration.get_or_create_owned(&labels),
        }
    }

    /// Counts a failed reconciliation under the error's variant name.
    pub fn failure(&self, kind: Kind, error: &Error) {
        self.failures
            .get_or_create(&FailureLabels {
                kind: kind.as_str(),
                error: error.metric_label(),
            })
            .inc();
    }

    /// Sets the API-key gauge from counts by state (states not given become 0).
    pub fn set_api_keys(&self, counts: impl IntoIterator<Item = (KeyState, i64)>) {
        let mut all: Vec<(KeyState, i64)> = [
            KeyState::Pending,
            KeyState::Active,
            KeyState::Expired,
            KeyState::Revoked,
            KeyState::Invalid,
        ]
        .into_iter()
        .map(|s| (s, 0))
        .collect();
        for (state, n) in counts {
            if let Some(slot) = all.iter_mut().find(|(s, _)| *s == state) {
                slot.1 += n;
            }
        }
        for (state, n) in all {
            self.api_keys
                .get_or_create(&StateLabels {
                    state: state.as_str(),
                })
                .set(n);
        }
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// Pods of `tenant`'s namespaces that run without the proxy.
    pub fn set_unprotected_pods(&self, tenant: &str, count: usize) {
        self.unprotected_pods
            .get_or_create(&TenantLabels {
                tenant: tenant.to_owned(),
            })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Counts a published policy version.
    pub fn policy_published(&self) {
        self.policy_publishes.inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_labelled_by_kind_and_variant() {
        let metrics = Metrics::default();
        drop(metrics.reconcile(Kind::ApiKey));
        metrics.failure(
            Kind::ApiKey,
            &Error::ScopeNotInRole {
                scope: "events".into(),
                role: "viewer".into(),
            },
        );
        metrics.set_api_keys([(KeyState::Active, 2)]);
        metrics.set_leader(true);
        metrics.identity.issued();
        let text = metrics.encode();
        assert!(
            text.contains("portcullis_identity_certificates_issued_total 1"),
            "identity metrics are exported beside the controllers': {text}"
        );
        assert!(
            text.contains(r#"portcullis_operator_reconciles_total{kind="ApiKey"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"portcullis_operator_reconcile_failures_total{kind="ApiKey",error="ScopeNotInRole"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"portcullis_operator_api_keys{state="Active"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"portcullis_operator_api_keys{state="Revoked"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(
                "portcullis_operator_reconcile_duration_seconds_count{kind=\"ApiKey\"} 1"
            )
        );
        assert!(text.contains("portcullis_operator_leader 1"));
    }
}
