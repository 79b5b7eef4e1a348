//! Who a TLS peer is: its SPIFFE workload ID and tenant, read from the leaf of a
//! completed handshake. The configs themselves are built by the rest of [`crate::tls`].

use rustls::pki_types::CertificateDer;

use portcullis_api::spiffe::{TenantId, WorkloadId};

pub use portcullis_tls::leaf::{LeafFacts, leaf_facts};

/// The verified identity of a TLS peer, read from its end-entity certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The peer workload.
    pub workload: WorkloadId,
    /// The peer's tenant, when its certificate names one in the workload's trust domain.
    pub tenant: Option<TenantId>,
    /// The certificate's serial (lowercase hex), for revocation.
    pub serial: String,
}

/// The peer's identity from the certificates of a completed handshake
/// (`conn.peer_certificates()`); `None` when there is no workload ID: a tenant URI
/// alone names no workload and is never an identity.
pub fn peer_identity(peer_certificates: Option<&[CertificateDer<'_>]>) -> Option<PeerIdentity> {
    let leaf = peer_certificates?.first()?;
    let facts = leaf_facts(leaf).ok()?;
    let workload = facts.workload?;
    let tenant = facts
        .tenant
        .filter(|t| t.trust_domain() == workload.trust_domain());
    Some(PeerIdentity {
        workload,
        tenant,
        serial: facts.serial,
    })
}
