//! rustls glue: certificate resolvers and verifiers that read the [`CertificateStore`]
//! on every handshake, and TLS 1.3-only configs built from them.
//!
//! Peers are identified by SPIFFE URI SANs, not DNS names, so the server-side check a
//! client makes is "chains to our trust bundle, serverAuth, carries a workload ID in our
//! trust domain" rather than a hostname match.

use std::fmt;
use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, Error, ServerConfig, SignatureScheme,
};

use super::IdentityError;
use super::store::CertificateStore;
use portcullis_api::spiffe::{TenantId, WorkloadId};

pub use portcullis_tls::leaf::{LeafFacts, leaf_facts};
pub use portcullis_tls::provider;
pub use portcullis_tls::verify::PeerServerVerifier;
use portcullis_tls::verify::{require_workload_in, tls12_refused, verify_tls13};

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

/// Presents the store's current certificate, as a server and as a client.
#[derive(Debug, Clone)]
pub struct StoreCertResolver {
    store: CertificateStore,
}

impl StoreCertResolver {
    /// A resolver reading `store`.
    pub fn new(store: CertificateStore) -> Self {
        Self { store }
    }
}

impl ResolvesServerCert for StoreCertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store.load().map(|c| c.certified_key().clone())
    }
}

impl ResolvesClientCert for StoreCertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.store.load().map(|c| c.certified_key().clone())
    }

    fn has_certs(&self) -> bool {
        self.store.is_ready()
    }
}

/// Whether an inbound server asks for, or insists on, a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// A client certificate is required.
    Required,
    /// A client certificate is verified when offered.
    Optional,
}

/// Verifies client certificates against the store's current trust bundle: chain,
/// validity, clientAuth and a workload ID in our trust domain.
pub struct StoreClientCertVerifier {
    store: CertificateStore,
    mode: ClientAuth,
    provider: Arc<CryptoProvider>,
}

impl StoreClientCertVerifier {
    /// A verifier reading `store`.
    pub fn new(store: CertificateStore, mode: ClientAuth) -> Self {
        Self {
            store,
            mode,
            provider: provider(),
        }
    }
}

impl fmt::Debug for StoreClientCertVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreClientCertVerifier")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for StoreClientCertVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mode == ClientAuth::Required
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The roots change under us; an empty hint list means "send what you have".
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let credentials = self
            .store
            .load()
            .ok_or_else(|| Error::General("no trust bundle yet".into()))?;
        let verified =
            credentials
                .client_verifier()
                .verify_client_cert(end_entity, intermediates, now)?;
        require_workload_in(end_entity, credentials.workload().trust_domain())?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies peer servers against the store's current trust bundle.
pub struct StoreServerCertVerifier {
    store: CertificateStore,
    provider: Arc<CryptoProvider>,
}

impl StoreServerCertVerifier {
    /// A verifier reading `store`.
    pub fn new(store: CertificateStore) -> Self {
        Self {
            store,
            provider: provider(),
        }
    }
}

impl fmt::Debug for StoreServerCertVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoreServerCertVerifier")
    }
}

impl ServerCertVerifier for StoreServerCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let credentials = self
            .store
            .load()
            .ok_or_else(|| Error::General("no trust bundle yet".into()))?;
        credentials.server_verifier().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS 1.3-only server config presenting the store's certificate and verifying
/// client certificates against its trust bundle. ALPN: h2, http/1.1.
pub fn server_config(
    store: &CertificateStore,
    client_auth: ClientAuth,
) -> Result<ServerConfig, IdentityError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdentityError::Tls(e.to_string()))?
        .with_client_cert_verifier(Arc::new(StoreClientCertVerifier::new(
            store.clone(),
            client_auth,
        )))
        .with_cert_resolver(Arc::new(StoreCertResolver::new(store.clone())));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // A resumed session skips certificate verification; peer identity must always come
    // from a certificate that is valid now.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A TLS 1.3-only client config presenting the store's certificate and verifying peer
/// servers against its trust bundle.
pub fn client_config(store: &CertificateStore) -> Result<ClientConfig, IdentityError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdentityError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(StoreServerCertVerifier::new(store.clone())))
        .with_client_cert_resolver(Arc::new(StoreCertResolver::new(store.clone())));
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}
