//! The audit seam: one [`RequestOutcome`] per request, allowed or denied, handed to an
//! [`AuditHook`]. The default hook writes the human line of DESIGN.md §6 through
//! tracing; the tamper-evident audit writer plugs in here. When the tenant's data
//! classification makes audit fail closed, room for the record is reserved before the
//! request is forwarded ([`AuditHook::reserve`]): a hook that cannot promise the record
//! stops the request before it reaches the app (503 `audit_unavailable`), and the
//! reserved room is filled once the answer is known.
//!
//! [`trail::AuditTrail`] is the tamper-evident hook (portcullis-audit's writer);
//! [`sinks`] builds it from `proxy.yaml`, [`cluster`] in an injected pod with the
//! tenant's data key from [`crate::control::audit_key`].

pub mod cluster;
pub mod sinks;
pub mod trail;

use std::{net::IpAddr, time::Duration};

/// Whether the request was let through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Forwarded to the app.
    Allow,
    /// Refused by the proxy.
    Deny,
}

impl Decision {
    /// `allow` or `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// What happened to one request. Holds no secrets: the principal is masked and the
/// path carries no query string.
#[derive(Clone, Debug)]
pub struct RequestOutcome {
    /// When the request arrived.
    pub timestamp: jiff::Timestamp,
    /// The tenant (empty before any policy is loaded).
    pub tenant: String,
    /// `key:ak_***xyz`, `spiffe://...` or `anonymous`.
    pub principal: String,
    /// `api.<scope>`, or `api.unmapped` when the route maps to no scope.
    pub action: String,
    /// The client address (after trusted `X-Forwarded-For`).
    pub client_ip: IpAddr,
    /// HTTP method.
    pub method: String,
    /// Path, without the query string.
    pub path: String,
    /// Status returned (the app's, or the proxy's on denial).
    pub status: u16,
    /// Time to the response head.
    pub latency: Duration,
    /// Request body size when declared by `Content-Length`.
    pub bytes_in: u64,
    /// Response body size when declared by `Content-Length`.
    pub bytes_out: u64,
    /// Allow or deny.
    pub decision: Decision,
    /// The reason (`allowed` or a denial reason).
    pub reason: &'static str,
}

/// Whether the audit trail takes records, and if not why: the `/ready` answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditReadiness {
    /// Running.
    Ready,
    /// Waiting for the certificate and the first policy.
    Starting,
    /// A fail-closed tenant's pod without the tenant's data key: requests are refused
    /// until the operator hands it out.
    WaitingForDataKey,
    /// Shut down (draining).
    ShutDown,
}

impl AuditReadiness {
    /// The snake_case reason for `/ready`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Starting => "starting",
            Self::WaitingForDataKey => "waiting_for_data_key",
            Self::ShutDown => "shut_down",
        }
    }
}

/// The hook refused to record.
#[derive(Debug, thiserror::Error)]
#[error("audit record refused: {0}")]
pub struct AuditRefused(pub String);

/// Room for one request's record, held from before the request is forwarded until it
/// is recorded ([`AuditHook::reserve`]). Dropping it unused gives the room back.
#[derive(Debug, Default)]
pub struct Reservation {
    slot: Option<portcullis_audit::RecordSlot>,
}

impl Reservation {
    /// A reservation backed by room in an audit writer's queue.
    pub fn in_writer(slot: portcullis_audit::RecordSlot) -> Self {
        Self { slot: Some(slot) }
    }

    /// The writer's slot, when there is one.
    pub fn into_slot(self) -> Option<portcullis_audit::RecordSlot> {
        self.slot
    }
}

/// Receives one record per request.
pub trait AuditHook: Send + Sync + 'static {
    /// Records one outcome. Must not block for long: it runs on the request path.
    fn record(&self, event: RequestOutcome) -> Result<(), AuditRefused>;

    /// Whether records can be written now; when false and audit fails closed, requests
    /// are refused before reaching the app.
    fn available(&self) -> bool {
        true
    }

    /// For fail-closed tenants, before forwarding: makes sure the request's record can
    /// be written, holding room for it. Refused: the request must not reach the app.
    /// The default has no room to hold and only asks [`AuditHook::available`].
    fn reserve(&self) -> Result<Reservation, AuditRefused> {
        if self.available() {
            Ok(Reservation::default())
        } else {
            Err(AuditRefused("the audit log is unavailable".into()))
        }
    }

    /// Records an outcome in the room `reserved` for it.
    fn record_reserved(
        &self,
        reserved: Reservation,
        event: RequestOutcome,
    ) -> Result<(), AuditRefused> {
        drop(reserved);
        self.record(event)
    }
}

/// Writes `2026-03-16 14:22:01 | api.identify | key:ak_***7f2 | 200 | 12ms` lines at
/// info level on target `portcullis::audit`.
#[derive(Clone, Copy, Debug, Default)]
pub struct TracingAudit;

impl AuditHook for TracingAudit {
    fn record(&self, event: RequestOutcome) -> Result<(), AuditRefused> {
        let when = event.timestamp.strftime("%Y-%m-%d %H:%M:%S");
        tracing::info!(
            target: "portcullis::audit",
            tenant = %event.tenant,
            client_ip = %event.client_ip,
            method = %event.method,
            path = %event.path,
            decision = event.decision.as_str(),
            reason = event.reason,
            "{when} | {} | {} | {} | {}ms",
            event.action,
            event.principal,
            event.status,
            event.latency.as_millis(),
        );
        Ok(())
    }
}
