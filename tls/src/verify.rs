//! Peer verification shared by every TLS config: a workload certificate must name a
//! workload of the expected trust domain, and only TLS 1.3 signatures are accepted.
//! Peers are identified by SPIFFE URI SANs, not DNS names, so the server-side check a
//! client makes is "chains to our trust bundle, serverAuth, carries a workload ID in our
//! trust domain" rather than a hostname match.

use std::sync::Arc;

use portcullis_api::spiffe::TrustDomain;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore};

use crate::leaf::leaf_facts;

/// Refuses a certificate that names no workload of `trust_domain`.
pub fn require_workload_in(
    cert: &CertificateDer<'_>,
    trust_domain: &TrustDomain,
) -> Result<(), Error> {
    let facts =
        leaf_facts(cert).map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
    match facts.workload {
        Some(id) if id.trust_domain() == trust_domain => Ok(()),
        _ => Err(Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(NoWorkloadId)),
        ))),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("peer certificate carries no SPIFFE workload ID in our trust domain")]
struct NoWorkloadId;

/// Every config here is TLS 1.3 only: a TLS 1.2 signature means something is wrong.
pub fn tls12_refused() -> Result<HandshakeSignatureValid, Error> {
    Err(Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

/// The signature half of a rustls `ServerCertVerifier` or `ClientCertVerifier`, the
/// same for every verifier here: TLS 1.2 refused, TLS 1.3 checked with the algorithms
/// of the `CryptoProvider` in the named field. Written once as a macro because both
/// traits declare these methods separately.
#[macro_export]
macro_rules! tls13_signatures {
    ($provider:ident) => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &::rustls::pki_types::CertificateDer<'_>,
            _dss: &::rustls::DigitallySignedStruct,
        ) -> Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error> {
            $crate::verify::tls12_refused()
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &::rustls::pki_types::CertificateDer<'_>,
            dss: &::rustls::DigitallySignedStruct,
        ) -> Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error> {
            $crate::verify::verify_tls13(&self.$provider, message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<::rustls::SignatureScheme> {
            self.$provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// Checks a TLS 1.3 handshake signature with the workspace provider's algorithms.
pub fn verify_tls13(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

/// Verifies a peer proxy's server certificate against fixed roots: chain, validity,
/// serverAuth and a workload ID in our trust domain. The TLS server name is not used.
#[derive(Debug)]
pub struct PeerServerVerifier {
    roots: Arc<RootCertStore>,
    trust_domain: TrustDomain,
    provider: Arc<CryptoProvider>,
}

impl PeerServerVerifier {
    /// A verifier trusting `roots` for workloads of `trust_domain`.
    pub fn new(roots: Arc<RootCertStore>, trust_domain: TrustDomain) -> Self {
        Self {
            roots,
            trust_domain,
            provider: crate::provider(),
        }
    }
}

impl ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        require_workload_in(end_entity, &self.trust_domain)?;
        Ok(ServerCertVerified::assertion())
    }

    crate::tls13_signatures!(provider);
}
