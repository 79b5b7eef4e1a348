//! The inbound server config, and which certificate it presents.
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
    ServerConfig,
    server::{ClientHello, NoServerSessionStorage, ResolvesServerCert},
    sign::CertifiedKey,
};

use super::{
    ALPN, TlsError, creds::TlsCredentials, creds::TlsSettings, provider,
    serving_certificate::ServingCertificate, verify::ClientVerifier,
};

/// The server name a mesh peer sends: under `.invalid` (RFC 6761), so it never names a
/// real host a client outside the mesh could mean. Peers are verified by their SPIFFE
/// ID, never by this name.
pub const PEER_SERVER_NAME: &str = "peer.portcullis.invalid";

/// Whether a ClientHello's server name is the mesh peers' reserved one.
pub fn is_peer_server_name(server_name: Option<&str>) -> bool {
    server_name.is_some_and(|name| name.eq_ignore_ascii_case(PEER_SERVER_NAME))
}

/// Whether an inbound server asks for, or insists on, a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// A client certificate is required.
    Required,
    /// A client certificate is verified when offered; whether one is needed is decided
    /// per request by the inbound mode, so the caller gets a JSON 401, not an alert.
    Optional,
}

/// Presents the workload certificate of one generation to mesh peers and the serving
/// certificate, when one is in force, to everyone else.
struct InboundCertResolver {
    workload: Option<Arc<CertifiedKey>>,
    serving: Option<ServingCertificate>,
}

impl fmt::Debug for InboundCertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboundCertResolver")
            .field("workload", &self.workload.is_some())
            .field("serving", &self.serving)
            .finish()
    }
}

impl ResolvesServerCert for InboundCertResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if !is_peer_server_name(client_hello.server_name())
            && let Some(serving) = &self.serving
            && let Some(current) = serving.current(jiff::Timestamp::now().as_second())
        {
            return Some(current);
        }
        self.workload.clone()
    }
}

/// The inbound server config for `credentials` (`None`: none installed yet, so only a
/// serving certificate can be shown and offered client certificates are refused):
/// TLS 1.3 only, ALPN h2 + http/1.1, client certificates checked per `settings`.
pub fn server_config(
    credentials: Option<&TlsCredentials>,
    settings: &TlsSettings,
) -> Result<ServerConfig, TlsError> {
    let verifier = ClientVerifier::new(
        credentials.map(|c| c.roots.clone()),
        settings.client_trust_domain.clone(),
        settings.client_auth,
    )?;
    let resolver = InboundCertResolver {
        workload: credentials.map(|c| c.certified_key.clone()),
        serving: settings.serving.clone(),
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    // A resumed session would carry the peer identity of an earlier handshake; every
    // connection must prove a certificate that is valid now.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
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
