//! Which certificate the inbound listener presents.
//!
//! In TLS 1.3 the server picks its certificate from the ClientHello, before it knows
//! whether the client will send a certificate, so the choice is made by SNI: mesh peers
//! (this proxy's outbound client) always send [`PEER_SERVER_NAME`] and get the workload
//! certificate; any other server name, or none, gets the bring-your-own serving
//! certificate when one is in force and valid, else the workload certificate.
//!
//! The choice decides only what the client is shown: client certificates are verified
//! the same way whichever certificate was presented, so a client that sends the
//! reserved name gains nothing but the workload certificate (public material).

use std::{fmt, sync::Arc};

use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use crate::{identity::StoreCertResolver, serving_certificate::ServingCertificate};

/// The server name a mesh peer sends: under `.invalid` (RFC 6761), so it never names a
/// real host a client outside the mesh could mean. Peers are verified by their SPIFFE
/// ID, never by this name.
pub const PEER_SERVER_NAME: &str = "peer.portcullis.invalid";

/// Whether a ClientHello's server name is the mesh peers' reserved one.
pub fn is_peer_server_name(server_name: Option<&str>) -> bool {
    server_name.is_some_and(|name| name.eq_ignore_ascii_case(PEER_SERVER_NAME))
}

/// Presents the workload certificate to mesh peers and the serving certificate, when
/// one is in force, to everyone else.
pub struct InboundCertResolver {
    workload: StoreCertResolver,
    serving: ServingCertificate,
}

impl InboundCertResolver {
    /// A resolver choosing between `workload` and `serving`.
    pub fn new(workload: StoreCertResolver, serving: ServingCertificate) -> Self {
        Self { workload, serving }
    }
}

impl fmt::Debug for InboundCertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboundCertResolver")
            .field("serving", &self.serving)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for InboundCertResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if !is_peer_server_name(client_hello.server_name())
            && let Some(serving) = self.serving.current(jiff::Timestamp::now().as_second())
        {
            return Some(serving);
        }
        ResolvesServerCert::resolve(&self.workload, client_hello)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_reserved_name_marks_a_peer() {
        assert!(is_peer_server_name(Some(PEER_SERVER_NAME)));
        assert!(is_peer_server_name(Some("PEER.Portcullis.invalid")));
        assert!(!is_peer_server_name(None));
        assert!(!is_peer_server_name(Some("web.shop.svc")));
        assert!(!is_peer_server_name(Some("x.peer.portcullis.invalid")));
    }
}
