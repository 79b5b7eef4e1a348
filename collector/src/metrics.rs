//! Collector metrics: what arrived, what was stored, what was refused and why.

use portcullis_api::audit_ship::ShipRefusalReason;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::collector::Ingested;

/// `outcome` label of a batch.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `stored`, `refused`, `unauthenticated`, `key_pending` (the tenant's key is
    /// not at hand yet) or `store_failed`.
    pub outcome: String,
}

/// `reason` label of a refusal.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// A [`ShipRefusalReason`] name.
    pub reason: String,
}

/// `tenant` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabel {
    /// The tenant whose log it is.
    pub tenant: String,
}

/// The ingest metrics; cheap to clone (shared handles).
#[derive(Debug, Clone, Default)]
pub struct IngestMetrics {
    batches: Family<OutcomeLabel, Counter>,
    tenant_records: Family<TenantLabel, Counter>,
    refusals: Family<ReasonLabel, Counter>,
    records: Counter,
    duplicates: Counter,
}

impl IngestMetrics {
    /// Creates the metrics and registers them in `registry`:
    /// `portcullis_audit_batches_total{outcome}`,
    /// `portcullis_audit_refusals_total{reason}`,
    /// `portcullis_audit_entries_stored_total`,
    /// `portcullis_audit_entries_duplicate_total` and
    /// `portcullis_audit_records_total{tenant}` (request records stored).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "portcullis_audit_batches",
            "Shipped batches, by outcome",
            metrics.batches.clone(),
        );
        registry.register(
            "portcullis_audit_refusals",
            "Batches refused on arrival, by reason (a gap, fork or altered record)",
            metrics.refusals.clone(),
        );
        registry.register(
            "portcullis_audit_entries_stored",
            "Chain entries made durable",
            metrics.records.clone(),
        );
        registry.register(
            "portcullis_audit_records",
            "Request records stored, by tenant",
            metrics.tenant_records.clone(),
        );
        registry.register(
            "portcullis_audit_entries_duplicate",
            "Chain entries received again after they were durable (resends)",
            metrics.duplicates.clone(),
        );
        metrics
    }

    /// Counts a batch with `outcome`.
    pub fn batch(&self, outcome: &str) {
        self.batches
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Counts a stored batch of `tenant`.
    pub fn stored(&self, tenant: &str, ingested: &Ingested) {
        self.batch("stored");
        self.records.inc_by(ingested.ack.stored);
        self.duplicates.inc_by(ingested.ack.duplicates);
        self.tenant_records
            .get_or_create(&TenantLabel {
                tenant: tenant.to_owned(),
            })
            .inc_by(ingested.records);
    }

    /// Counts a refused batch.
    pub fn refused(&self, reason: ShipRefusalReason) {
        self.batch("refused");
        self.refusals
            .get_or_create(&ReasonLabel {
                reason: format!("{reason:?}"),
            })
            .inc();
    }
}
