//! Admin audit records in the same tamper-evident form as request records: every admin
//! change the validating webhook admits becomes an [`AuditRecord`] in a SHA-256 hash
//! chain, written as JSON lines on stdout (for the cluster's log collector) with signed
//! checkpoints, so `kubectl portcullis audit verify` checks admin and request trails
//! alike.
//!
//! The checkpoint key is generated per operator process; its public key travels in each
//! checkpoint. Admin changes are already admitted when the record is made, so a record
//! that cannot be queued is counted and logged loudly, never silently lost.

use std::sync::Arc;

use portcullis_audit::{
    Accepted, AuditRecord, AuditWriter, Chain, CheckpointSigner, Decision, FailureMode,
    SignerIdentity, WriterConfig, sink::stdout::StdoutSink,
};

use super::audit::{AdminAuditEvent, AdminAuditSink};

/// Why the admin audit chain could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminAuditError {
    /// The checkpoint key could not be made.
    #[error("generating the admin audit checkpoint key: {0}")]
    Key(#[from] rcgen::Error),
    /// The audit writer refused the key.
    #[error("starting the admin audit writer: {0}")]
    Writer(#[from] portcullis_audit::Error),
}

/// Writes admin audit events into a hash chain on stdout.
pub struct ChainedAdminAudit {
    writer: AuditWriter,
    pod: String,
}

impl ChainedAdminAudit {
    /// Starts the chain for this operator replica (`pod` names it in every record).
    /// Must run inside a tokio runtime.
    pub fn start(pod: &str) -> Result<Self, AdminAuditError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let signer = CheckpointSigner::from_pkcs8(&key.serialize_der(), SignerIdentity::default())?;
        let mut config = WriterConfig::new(Chain::new_id(pod, jiff::Timestamp::now()));
        config.failure_mode = FailureMode::FailOpen;
        let writer = AuditWriter::start(config, signer, vec![Arc::new(StdoutSink::new())]);
        Ok(Self {
            writer,
            pod: pod.to_owned(),
        })
    }

    /// The record an event becomes: the object's `namespace/name` as its path.
    fn to_record(&self, event: &AdminAuditEvent) -> AuditRecord {
        let mut record = AuditRecord::new(
            event.time,
            "",
            self.pod.clone(),
            event.action.clone(),
            event.principal.clone(),
        );
        record.path = event.object.clone();
        record.status = event.status;
        record.decision = Decision::Allow;
        record
    }
}

impl AdminAuditSink for ChainedAdminAudit {
    fn record(&self, event: AdminAuditEvent) {
        tracing::info!(target: "portcullis::audit", object = %event.object, "{event}");
        match self.writer.try_submit(self.to_record(&event)) {
            Ok(Accepted::Queued) => {}
            Ok(Accepted::Dropped) | Err(_) => tracing::error!(
                object = %event.object,
                action = %event.action,
                "admin audit record could not be written; the change was admitted"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_become_chained_records_with_the_object_as_path() {
        let audit = ChainedAdminAudit::start("operator-0").unwrap();
        let event = AdminAuditEvent {
            action: "admin.key.create".into(),
            principal: "user:david@acme".into(),
            status: 201,
            object: "acme-prod/ingest".into(),
            time: "2026-03-16T14:22:01Z".parse().unwrap(),
        };
        let record = audit.to_record(&event);
        assert_eq!(record.action, "admin.key.create");
        assert_eq!(record.principal, "user:david@acme");
        assert_eq!(record.status, 201);
        assert_eq!(record.path, "acme-prod/ingest");
        assert_eq!(record.pod, "operator-0");
        audit.record(event);
        let stats = audit.writer.stats();
        assert_eq!(stats.submitted, 1, "{stats:?}");
        assert_eq!(stats.dropped, 0, "{stats:?}");
    }
}
