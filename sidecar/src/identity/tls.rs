//! rustls glue: certificate resolvers and verifiers that read the [`CertificateStore`]
//! on every handshake, and TLS 1.3-only configs built from them.
//!
//! Peers are identified by SPIFFE URI SANs, not DNS names, so the server-side check a
//! client makes is "chains to our trust bundle, serverAuth, carries a workload ID in our
//! trust domain" rather than a hostname match.

use std::fmt;
use std::sync::{Arc, OnceLock};

use jiff::Timestamp;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, RootCertStore,
    ServerConfig, SignatureScheme,
};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::IdentityError;
use super::store::CertificateStore;
use portcullis_api::spiffe::{SpiffeId, TenantId, TrustDomain, WorkloadId};

/// The one crypto provider of the workspace (ring).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// What a workload leaf certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafFacts {
    /// The workload SPIFFE ID among the URI SANs (none when there are several: a
    /// certificate naming two workloads names none reliably).
    pub workload: Option<WorkloadId>,
    /// The tenant SPIFFE ID among the URI SANs (none when there are several).
    pub tenant: Option<TenantId>,
    /// The serial number as [`portcullis_crds::peers::serial_hex`] writes it.
    pub serial: String,
    /// notBefore.
    pub not_before: Timestamp,
    /// notAfter.
    pub not_after: Timestamp,
}

fn only_one<T>(mut items: Vec<T>) -> Option<T> {
    if items.len() == 1 { items.pop() } else { None }
}

/// Reads identity and validity from a certificate (no chain verification).
pub fn leaf_facts(cert: &CertificateDer<'_>) -> Result<LeafFacts, IdentityError> {
    let (_, x509) = X509Certificate::from_der(cert)
        .map_err(|e| IdentityError::InvalidResponse(format!("certificate: {e}")))?;
    let mut workloads = Vec::new();
    let mut tenants = Vec::new();
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                match uri.parse::<SpiffeId>() {
                    Ok(SpiffeId::Workload(id)) => workloads.push(id),
                    Ok(SpiffeId::Tenant(id)) => tenants.push(id),
                    Err(_) => {}
                }
            }
        }
    }
    let workload = only_one(workloads);
    let tenant = only_one(tenants);
    let ts = |t: x509_parser::time::ASN1Time| {
        Timestamp::from_second(t.timestamp())
            .map_err(|e| IdentityError::InvalidResponse(format!("certificate validity: {e}")))
    };
    Ok(LeafFacts {
        workload,
        tenant,
        serial: portcullis_crds::peers::serial_hex(x509.raw_serial()),
        not_before: ts(x509.validity().not_before)?,
        not_after: ts(x509.validity().not_after)?,
    })
}

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

fn require_workload_in(cert: &CertificateDer<'_>, trust_domain: &TrustDomain) -> Result<(), Error> {
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
fn tls12_refused() -> Result<HandshakeSignatureValid, Error> {
    Err(Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

/// Checks a TLS 1.3 handshake signature with the workspace provider's algorithms.
fn verify_tls13(
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
            provider: provider(),
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
