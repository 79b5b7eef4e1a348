//! TLS for the proxy: one credentials store ([`creds`]) fed by the PEM files of a
//! standalone proxy ([`files`]) or by the identity renewer of an injected pod
//! ([`crate::control::identity`]), which builds whole inbound ([`server`]) and outbound
//! ([`client`]) rustls configs on every change, with one client-certificate verifier
//! ([`verify`]). TLS 1.3 only: an older ClientHello gets a `protocol_version` alert, or
//! `handshake_failure` when it lacks `signature_algorithms` (rustls checks that first;
//! OpenSSL clients below TLS 1.2 omit it).
//!
//! Who the peer of a handshake is: [`peer`]. The bring-your-own certificate shown to
//! clients outside the mesh: [`serving_certificate`].

use std::sync::Arc;

use rustls::{ClientConfig, pki_types::CertificateDer};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

pub mod client;
pub mod creds;
pub mod files;
pub mod peer;
pub mod server;
pub mod serving_certificate;
pub mod verify;

pub use creds::{CredentialStore, Feed, ServerConfigs, TlsCredentials, TlsSettings};
pub use portcullis_tls::provider;
pub use server::{ClientAuth, PEER_SERVER_NAME, is_peer_server_name};

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

/// Certificates as concatenated PEM blocks (public material only).
pub use portcullis_tls::pem_chain;

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
