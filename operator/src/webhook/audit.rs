//! Admin audit events: one per admin change the validating webhook admits
//! (`admin.key.create | user:david@acme | 201`), handed to an [`AdminAuditSink`]. The
//! audit writer (hash chain, sinks) plugs in by implementing the trait; until then
//! [`TracingAuditSink`] logs the human line and a channel can collect them.

use std::fmt;

use jiff::Timestamp;
use tokio::sync::mpsc;

/// An admitted change to a Tenant, Role or ApiKey.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminAuditEvent {
    /// `admin.key.create`, `admin.role.update`, `admin.tenant.delete`, ...
    pub action: String,
    /// `user:<username>` as the API server authenticated the requester.
    pub principal: String,
    /// 201 for a creation, 200 for an update or deletion.
    pub status: u16,
    /// `<namespace>/<name>`, or `<name>` for a cluster-scoped Tenant.
    pub object: String,
    /// The tenant whose log the change belongs in: the Tenant itself, or the tenant
    /// owning the object's namespace; `None` when no tenant owns it.
    pub tenant: Option<String>,
    /// When the webhook admitted the change.
    pub time: Timestamp,
}

impl fmt::Display for AdminAuditEvent {
    /// The human line: `2026-03-16 14:22:01 | admin.key.create | user:david@acme | 201`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} | {} | {} | {}",
            self.time.strftime("%Y-%m-%d %H:%M:%S"),
            self.action,
            self.principal,
            self.status
        )
    }
}

/// Where admin audit events go. Called on the admission path: must not block.
pub trait AdminAuditSink: Send + Sync {
    /// Records one event.
    fn record(&self, event: AdminAuditEvent);
}

/// Logs the human line at INFO, target `portcullis::audit`.
#[derive(Clone, Copy, Debug, Default)]
pub struct TracingAuditSink;

impl AdminAuditSink for TracingAuditSink {
    fn record(&self, event: AdminAuditEvent) {
        tracing::info!(target: "portcullis::audit", object = %event.object, "{event}");
    }
}

/// Sends each event down a channel (the audit writer's input, or a test's).
impl AdminAuditSink for mpsc::UnboundedSender<AdminAuditEvent> {
    fn record(&self, event: AdminAuditEvent) {
        if self.send(event).is_err() {
            tracing::warn!("admin audit receiver is gone; event dropped");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn human_line_matches_the_design() {
        let event = AdminAuditEvent {
            action: "admin.key.create".into(),
            principal: "user:david@acme".into(),
            status: 201,
            object: "acme-prod/ingest".into(),
            tenant: Some("acme".into()),
            time: "2026-03-16T14:22:01.734Z".parse().unwrap(),
        };
        assert_eq!(
            event.to_string(),
            "2026-03-16 14:22:01 | admin.key.create | user:david@acme | 201"
        );
    }
}
