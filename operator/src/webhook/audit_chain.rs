//! Admin audit records in the same tamper-evident form as request records: every admin
//! change the validating webhook admits becomes an [`AuditRecord`] in a SHA-256 hash
//! chain, written as JSON lines on stdout (for the cluster's log collector) with signed
//! checkpoints, so `kubectl portcullis audit verify` checks admin and request trails
//! alike.
//!
//! One chain per tenant (the tenant owning the changed object's namespace, or the
//! Tenant itself), plus one for changes no tenant owns. With an audit collector, each
//! tenant's chain is also shipped to it through a bounded spool, so the tenant's log
//! holds its admin changes beside its requests. Checkpoints are signed with the
//! operator's own workload certificate ([`AdminIdentity`]).
//!
//! Admin changes are already admitted when the record is made, so a record that cannot
//! be queued is counted and logged loudly, never silently lost.
//!
//! The spool sits on the operator pod's scratch space, which a replaced pod loses, so
//! [`ChainedAdminAudit::close`] (run on shutdown) gives every chain a bounded time to
//! hand what it holds to the collector, and names what is still undelivered.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use jiff::Timestamp;
use portcullis_audit::sink::Sink;
use portcullis_audit::sink::collector::AuditCollector;
use portcullis_audit::sink::spool::Spool;
use portcullis_audit::sink::spooled::SpooledSink;
use portcullis_audit::{
    Accepted, AuditRecord, AuditWriter, Chain, Decision, FailureMode, WriterConfig,
    retry::RetryPolicy, sink::stdout::StdoutSink,
};

use super::admin_identity::{AdminIdentity, AdminIdentityError};
use super::audit::{AdminAuditEvent, AdminAuditSink};

/// Room each tenant's admin chain may take in the spool while the collector is away.
const SPOOL_BYTES: u64 = 4 << 20;

/// How long one shipment may take before it is retried.
const SHIP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the admin audit chain could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminAuditError {
    /// The operator's own certificate could not be issued.
    #[error(transparent)]
    Identity(#[from] AdminIdentityError),
    /// The audit writer refused the key.
    #[error("starting the admin audit writer: {0}")]
    Writer(#[from] portcullis_audit::Error),
}

/// Where tenants' admin chains are shipped.
#[derive(Clone, Debug)]
pub struct AdminShipping {
    /// The collector (`https://…`).
    pub collector_url: String,
    /// Spools live under here, one directory per tenant.
    pub spool_dir: PathBuf,
    /// How a refused shipment is retried while running (closing retries at once).
    pub retry: RetryPolicy,
}

impl AdminShipping {
    /// Shipping to `collector_url`, spooled under `spool_dir`, retried with the default
    /// backoff.
    pub fn new(collector_url: String, spool_dir: PathBuf) -> Self {
        Self {
            collector_url,
            spool_dir,
            retry: RetryPolicy::default(),
        }
    }
}

struct TenantChain {
    writer: AuditWriter,
    /// When the certificate its signer carries was issued.
    signed_with: Timestamp,
    /// The spooled shipment to the collector, when there is one.
    shipment: Option<Arc<dyn Sink>>,
}

/// Writes admin audit events into per-tenant hash chains.
pub struct ChainedAdminAudit {
    pod: String,
    identity: Arc<AdminIdentity>,
    shipping: Option<AdminShipping>,
    chains: Mutex<HashMap<String, TenantChain>>,
}

impl std::fmt::Debug for ChainedAdminAudit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainedAdminAudit")
            .field("pod", &self.pod)
            .field("shipping", &self.shipping)
            .finish_non_exhaustive()
    }
}

impl ChainedAdminAudit {
    /// Admin chains of this operator replica (`pod` names it in every record), signed by
    /// `identity`, shipped when `shipping` says where.
    pub fn new(pod: &str, identity: Arc<AdminIdentity>, shipping: Option<AdminShipping>) -> Self {
        Self {
            pod: pod.to_owned(),
            identity,
            shipping,
            chains: Mutex::new(HashMap::new()),
        }
    }

    /// The record an event becomes: the object's `namespace/name` as its path.
    fn to_record(&self, event: &AdminAuditEvent) -> AuditRecord {
        let mut record = AuditRecord::new(
            event.time,
            event.tenant.as_deref().unwrap_or_default(),
            self.pod.clone(),
            event.action.clone(),
            event.principal.clone(),
        );
        record.path = event.object.clone();
        record.status = event.status;
        record.decision = Decision::Allow;
        record
    }

    /// The spooled shipment of `tenant`'s chain to the collector, when there is one and
    /// the change has a tenant.
    fn shipment(&self, tenant: &str) -> Result<Option<Arc<dyn Sink>>, AdminAuditError> {
        let Some(shipping) = self.shipping.as_ref().filter(|_| !tenant.is_empty()) else {
            return Ok(None);
        };
        let identity = self.identity.clone();
        let collector = AuditCollector::new(
            &shipping.collector_url,
            Arc::new(move || identity.client_config().map_err(|e| e.to_string())),
            SHIP_TIMEOUT,
        )?;
        let spool = Spool::open(shipping.spool_dir.join(tenant), SPOOL_BYTES)?;
        Ok(Some(Arc::new(SpooledSink::start(
            spool,
            collector,
            shipping.retry,
        ))))
    }

    fn start_chain(&self, tenant: &str) -> Result<TenantChain, AdminAuditError> {
        let signed_with = self.identity.issued_at()?;
        let name = if tenant.is_empty() {
            format!("{}-admin", self.pod)
        } else {
            format!("{}-admin-{tenant}", self.pod)
        };
        let mut config = WriterConfig::new(Chain::new_id(&name, Timestamp::now()));
        config.failure_mode = FailureMode::FailOpen;
        let shipment = self.shipment(tenant)?;
        let mut sinks: Vec<Arc<dyn Sink>> = vec![Arc::new(StdoutSink::new())];
        sinks.extend(shipment.clone());
        let writer = AuditWriter::start(config, self.identity.signer()?, sinks);
        Ok(TenantChain {
            writer,
            signed_with,
            shipment,
        })
    }

    /// Queues `record` on its tenant's chain, starting the chain or renewing its signer
    /// as needed.
    fn submit(&self, record: AuditRecord) -> Result<Accepted, AdminAuditError> {
        let mut chains = self.chains.lock().unwrap_or_else(PoisonError::into_inner);
        let tenant = record.tenant.clone();
        let chain = match chains.entry(tenant) {
            std::collections::hash_map::Entry::Occupied(found) => found.into_mut(),
            std::collections::hash_map::Entry::Vacant(empty) => {
                let chain = self.start_chain(empty.key())?;
                empty.insert(chain)
            }
        };
        let issued = self.identity.issued_at()?;
        if issued != chain.signed_with {
            chain.writer.replace_signer(self.identity.signer()?);
            chain.signed_with = issued;
        }
        Ok(chain.writer.try_submit(record).unwrap_or(Accepted::Dropped))
    }

    /// Stops every chain, giving each `drain` to write its last checkpoint and hand its
    /// spool to the collector; logs each tenant whose records are still undelivered,
    /// since the spool does not outlive the pod. A change admitted after this starts a
    /// new chain.
    pub async fn close(&self, drain: Duration) {
        let chains =
            std::mem::take(&mut *self.chains.lock().unwrap_or_else(PoisonError::into_inner));
        let closing = chains.into_iter().map(|(tenant, chain)| async move {
            chain.writer.shutdown(drain).await;
            (tenant, chain.shipment.map(|s| s.stats()))
        });
        for (tenant, shipped) in futures::future::join_all(closing).await {
            match shipped {
                Some(stats) if stats.spool_batches > 0 => tracing::error!(
                    tenant,
                    batches = stats.spool_batches,
                    "admin audit records not yet acknowledged by the collector at shutdown; \
                     they are on stdout, but the spool holding them goes with this pod"
                ),
                Some(stats) => tracing::info!(
                    tenant,
                    batches = stats.delivered_batches,
                    "admin audit chain handed to the collector"
                ),
                None => {}
            }
        }
    }

    /// The chains started so far, by tenant (`""`: changes no tenant owns).
    pub fn tenants(&self) -> Vec<String> {
        let chains = self.chains.lock().unwrap_or_else(PoisonError::into_inner);
        let mut tenants: Vec<String> = chains.keys().cloned().collect();
        tenants.sort();
        tenants
    }
}

impl AdminAuditSink for ChainedAdminAudit {
    fn record(&self, event: AdminAuditEvent) {
        tracing::info!(target: "portcullis::audit", object = %event.object, "{event}");
        match self.submit(self.to_record(&event)) {
            Ok(Accepted::Queued) => {}
            Ok(Accepted::Dropped) => tracing::error!(
                object = %event.object,
                action = %event.action,
                "admin audit record could not be queued; the change was admitted"
            ),
            Err(e) => tracing::error!(
                object = %event.object,
                action = %event.action,
                error = %e,
                "admin audit record could not be written; the change was admitted"
            ),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::ca::{CaSettings, CaState, CertificateAuthority};
    use portcullis_api::clock::SystemClock;
    use portcullis_api::spiffe::{TenantId, TrustDomain, WorkloadId};

    fn identity() -> Arc<AdminIdentity> {
        let td = TrustDomain::new("cluster.local").unwrap();
        let settings = CaSettings::new(td.clone());
        let state = CaState::generate(&settings, Timestamp::now()).unwrap();
        let ca = Arc::new(CertificateAuthority::new(
            settings,
            state,
            Arc::new(SystemClock),
        ));
        Arc::new(
            AdminIdentity::new(
                ca,
                WorkloadId::new(td.clone(), "portcullis-system", "portcullis-operator").unwrap(),
                TenantId::new(td, "portcullis-system").unwrap(),
            )
            .unwrap(),
        )
    }

    fn event(tenant: Option<&str>, object: &str) -> AdminAuditEvent {
        AdminAuditEvent {
            action: "admin.key.create".into(),
            principal: "user:david@acme".into(),
            status: 201,
            object: object.into(),
            tenant: tenant.map(str::to_owned),
            time: "2026-03-16T14:22:01Z".parse().unwrap(),
        }
    }

    #[tokio::test]
    async fn events_become_records_on_their_tenants_chain() {
        let audit = ChainedAdminAudit::new("operator-0", identity(), None);
        let record = audit.to_record(&event(Some("acme"), "acme-prod/ingest"));
        assert_eq!(record.action, "admin.key.create");
        assert_eq!(record.principal, "user:david@acme");
        assert_eq!(record.status, 201);
        assert_eq!(record.path, "acme-prod/ingest");
        assert_eq!(record.pod, "operator-0");
        assert_eq!(record.tenant, "acme");

        audit.record(event(Some("acme"), "acme-prod/ingest"));
        audit.record(event(Some("globex"), "globex/web"));
        audit.record(event(Some("acme"), "acme-prod/batch"));
        audit.record(event(None, "unbound/key"));
        assert_eq!(audit.tenants(), ["", "acme", "globex"]);
        let chains = audit.chains.lock().unwrap();
        let acme = chains["acme"].writer.stats();
        assert_eq!((acme.submitted, acme.dropped), (2, 0), "{acme:?}");
    }
}
