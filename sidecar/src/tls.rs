//! TLS configuration for the inbound listener and the policy stream client.
//!
//! Configs are built from a certificate resolver, a client-certificate verifier and
//! trust roots, so they can be fed from PEM files ([`crate::certs`], standalone and
//! demo) or from the workload identity store, and both swap certificates without a
//! restart. TLS 1.3 only: an older ClientHello gets a `protocol_version` alert, or
//! `handshake_failure` when it lacks `signature_algorithms` (rustls checks that first;
//! OpenSSL clients below TLS 1.2 omit it).

use std::sync::{Arc, OnceLock};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    client::ResolvesClientCert,
    crypto::CryptoProvider,
    pki_types::CertificateDer,
    server::{
        NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier,
        danger::ClientCertVerifier,
    },
};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// ALPN protocols offered inbound, in preference order.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the protocol set (cannot happen with the ring provider).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The trust bundle cannot verify client certificates.
    #[error("trust bundle cannot verify client certificates: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// No workload certificate has been issued yet.
    #[error("no workload certificate yet")]
    NoIdentity,
}

/// Builds the current client config on demand (roots and certificate may change).
pub type ClientConfigSource = Arc<dyn Fn() -> Result<Arc<ClientConfig>, TlsError> + Send + Sync>;

/// The one crypto provider of the workspace (ring).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The inbound server config: TLS 1.3 only, ALPN h2 + http/1.1, the certificate from
/// `resolver`, client certificates checked by `verifier`.
pub fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    verifier: Arc<dyn ClientCertVerifier>,
) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    // A resumed session would carry the peer identity of an earlier handshake; every
    // connection must prove a certificate that is valid now.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A verifier that checks a client certificate against `roots` when one is offered and
/// lets the handshake proceed without one: whether a certificate is required is decided
/// per request by the inbound mode, so the caller gets a JSON 401 instead of an alert.
pub fn optional_client_verifier(
    roots: Arc<RootCertStore>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    Ok(
        WebPkiClientVerifier::builder_with_provider(roots, provider())
            .allow_unauthenticated()
            .build()?,
    )
}

/// A TLS 1.3 client config presenting `certificate` and trusting `roots` (for the
/// operator's policy endpoint).
pub fn client_config(
    certificate: Arc<dyn ResolvesClientCert>,
    roots: Arc<RootCertStore>,
) -> Result<ClientConfig, TlsError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_cert_resolver(certificate);
    Ok(config)
}

/// A TLS 1.3 client config for proxy-to-proxy traffic: presents `certificate`, checks
/// the peer with `verifier` (a workload of our trust domain, not a host name), no
/// session resumption (every connection proves a certificate valid now).
pub fn peer_client_config(
    certificate: Arc<dyn ResolvesClientCert>,
    verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
) -> Result<ClientConfig, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(certificate);
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// Certificates as concatenated PEM blocks (public material only).
pub fn pem_chain(certificates: &[CertificateDer<'_>]) -> String {
    use base64::Engine as _;
    let mut pem = String::new();
    for cert in certificates {
        let encoded = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        // 64 ASCII characters per line, as RFC 7468 asks.
        for line in encoded.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    pem
}

/// The peer's SPIFFE ID: the first `spiffe://` URI SAN of its leaf certificate that
/// names a workload (a `spiffe://<td>/tenant/<t>` SAN is the tenant, not the workload).
pub fn peer_spiffe_id(peer_certificates: Option<&[CertificateDer<'_>]>) -> Option<String> {
    let leaf = peer_certificates?.first()?;
    let (_, cert) = X509Certificate::from_der(leaf).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
            _ => None,
        })
        .collect();
    let is_tenant = |uri: &&str| {
        uri["spiffe://".len()..]
            .split_once('/')
            .is_some_and(|(_, p)| p.starts_with("tenant/"))
    };
    uris.iter()
        .find(|uri| !is_tenant(uri))
        .or_else(|| uris.first())
        .map(|uri| (*uri).to_owned())
}

/// A closed-set label for a failed inbound handshake.
pub fn handshake_failure_reason(error: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error, PeerIncompatible};
    let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return match error.kind() {
            std::io::ErrorKind::TimedOut => "timeout",
            std::io::ErrorKind::InvalidData => "not_tls",
            _ => "io",
        };
    };
    match tls {
        Error::InvalidMessage(_) => "not_tls",
        Error::PeerIncompatible(
            PeerIncompatible::SupportedVersionsExtensionRequired
            | PeerIncompatible::Tls12NotOffered
            | PeerIncompatible::Tls12NotOfferedOrEnabled,
        ) => "protocol_version",
        Error::PeerIncompatible(_) => "incompatible",
        Error::NoApplicationProtocol => "no_alpn",
        Error::NoCertificatesPresented => "no_certificate",
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "expired_certificate",
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_ca",
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::AlertReceived(_) => "alert_received",
        Error::General(_) => "no_certificate_loaded",
        _ => "other",
    }
}
