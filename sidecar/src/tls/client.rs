//! The outbound client configs, built for one generation of credentials: TLS 1.3 only,
//! presenting the generation's certificate. The operator is checked by host name
//! against the roots; a peer proxy by its SPIFFE workload ID in our trust domain.

use std::sync::Arc;

use portcullis_api::spiffe::TrustDomain;
use rustls::{
    ClientConfig, ConfigBuilder, RootCertStore, WantsVerifier, sign::CertifiedKey,
    sign::SingleCertAndKey,
};

use super::{TlsError, provider, verify::PeerServerVerifier};

fn tls13() -> Result<ConfigBuilder<ClientConfig, WantsVerifier>, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?)
}

/// A client config for the operator's endpoints: presents `certificate`, checks the
/// server's name and chain against `roots`.
pub fn operator_config(
    certificate: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
) -> Result<ClientConfig, TlsError> {
    Ok(tls13()?
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certificate))))
}

/// A client config for proxy-to-proxy traffic: presents `certificate`, accepts a peer
/// that chains to `roots` and holds a workload ID of `trust_domain` (not a host name),
/// no session resumption (every connection proves a certificate valid now).
pub fn peer_config(
    certificate: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    trust_domain: TrustDomain,
) -> Result<ClientConfig, TlsError> {
    let mut config = tls13()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PeerServerVerifier::new(roots, trust_domain)))
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certificate)));
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}
