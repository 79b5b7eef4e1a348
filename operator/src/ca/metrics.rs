//! Identity service metrics.

use std::sync::atomic::AtomicI64;

use portcullis_api::identity::RefusalReason;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::authority::CaExpiry;

/// `reason` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// A [`RefusalReason`] name.
    pub reason: String,
}

/// `kind` label: `root` or `intermediate`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// Which CA.
    pub kind: String,
}

/// The identity service's metrics; cheap to clone (shared handles).
#[derive(Debug, Clone, Default)]
pub struct IdentityMetrics {
    issued: Counter,
    failures: Family<ReasonLabel, Counter>,
    ca_expiry: Family<KindLabel, Gauge<i64, AtomicI64>>,
}

impl IdentityMetrics {
    /// Creates the metrics and registers them in `registry`:
    /// `portcullis_identity_certificates_issued_total`,
    /// `portcullis_identity_issuance_failures_total{reason}` and
    /// `portcullis_identity_ca_expiry_seconds{kind}` (notAfter as a Unix timestamp).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "portcullis_identity_certificates_issued",
            "Workload certificates issued",
            metrics.issued.clone(),
        );
        registry.register(
            "portcullis_identity_issuance_failures",
            "Certificate requests refused, by reason",
            metrics.failures.clone(),
        );
        registry.register(
            "portcullis_identity_ca_expiry_seconds",
            "notAfter of the signing root and intermediate, as a Unix timestamp",
            metrics.ca_expiry.clone(),
        );
        metrics
    }

    /// Counts one issued certificate.
    pub fn issued(&self) {
        self.issued.inc();
    }

    /// Counts one refusal.
    pub fn refused(&self, reason: RefusalReason) {
        self.failures
            .get_or_create(&ReasonLabel {
                reason: reason.as_str().to_string(),
            })
            .inc();
    }

    /// Records the CAs' expiry.
    pub fn set_ca_expiry(&self, expiry: CaExpiry) {
        for (kind, at) in [("root", expiry.root), ("intermediate", expiry.intermediate)] {
            self.ca_expiry
                .get_or_create(&KindLabel { kind: kind.into() })
                .set(at.as_second());
        }
    }
}
