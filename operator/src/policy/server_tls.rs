//! mTLS for the policy server: the server certificate comes from the CA's intermediate
//! (the operator's Service names plus extra SANs), client certificates are required
//! and must chain to the CA's trust bundle — both followed across CA rotations without
//! a restart — and [`client_tenant`] reads the tenant a verified client certificate
//! names, which is the only tenant it may read ([`is_audit_collector`] tells the one
//! client that may read more).

use std::sync::Arc;

use arc_swap::ArcSwap;
use portcullis_api::spiffe::{SpiffeId, TrustDomain};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{DistinguishedName, RootCertStore, ServerConfig};
use tokio_util::sync::CancellationToken;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::ca::{CaError, CaServingCertificate, CertificateAuthority};

/// Verifies client certificates against the CA's current trust bundle; rebuilt (one
/// atomic swap) after every CA rotation, so handshakes in flight keep the old roots.
pub struct TrustBundleVerifier {
    current: ArcSwap<Arc<dyn ClientCertVerifier>>,
    // Handshake signatures do not depend on the roots: the server speaks TLS 1.3 only.
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for TrustBundleVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundleVerifier")
            .finish_non_exhaustive()
    }
}

fn verifier_for(ca: &CertificateAuthority) -> Result<Arc<dyn ClientCertVerifier>, CaError> {
    let roots: Vec<CertificateDer<'static>> = ca.with_state(|state| {
        state
            .trust_bundle()
            .iter()
            .map(|c| c.der().clone())
            .collect()
    });
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(roots);
    if added == 0 {
        return Err(CaError::Tls("the trust bundle holds no usable root".into()));
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(store), portcullis_tls::provider())
        .build()
        .map_err(|e| CaError::Tls(e.to_string()))
}

impl TrustBundleVerifier {
    /// A verifier for `ca`'s trust bundle now.
    pub fn new(ca: &CertificateAuthority) -> Result<Self, CaError> {
        Ok(Self {
            current: ArcSwap::from_pointee(verifier_for(ca)?),
            provider: portcullis_tls::provider(),
        })
    }

    /// Follows `ca`'s trust bundle now.
    pub fn rebuild(&self, ca: &CertificateAuthority) -> Result<(), CaError> {
        self.current.store(Arc::new(verifier_for(ca)?));
        Ok(())
    }
}

impl ClientCertVerifier for TrustBundleVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional; sidecars hold exactly one certificate.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current
            .load()
            .verify_client_cert(end_entity, intermediates, now)
    }

    portcullis_tls::tls13_signatures!(provider);
}

/// The policy server's TLS: a configuration to serve with, and what keeps it current.
pub struct PolicyServerTls {
    /// TLS 1.3 only, client certificate required, ALPN h2 and http/1.1.
    pub config: Arc<ServerConfig>,
    certificate: Arc<CaServingCertificate>,
    verifier: Arc<TrustBundleVerifier>,
}

impl std::fmt::Debug for PolicyServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyServerTls")
            .field("certificate", &self.certificate)
            .finish_non_exhaustive()
    }
}

impl PolicyServerTls {
    /// A server certificate for `names` from `ca`, and client verification against
    /// `ca`'s trust bundle.
    pub fn new(ca: &CertificateAuthority, names: &[String]) -> Result<Self, CaError> {
        let certificate = Arc::new(CaServingCertificate::new(ca, names)?);
        let verifier = Arc::new(TrustBundleVerifier::new(ca)?);
        let mut config = ServerConfig::builder_with_provider(portcullis_tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| CaError::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier.clone())
            .with_cert_resolver(certificate.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // A resumed session would carry a client identity proved earlier; every
        // connection must present a certificate valid now.
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Self {
            config: Arc::new(config),
            certificate,
            verifier,
        })
    }

    /// Re-issues the server certificate at half-life and follows every CA rotation
    /// (new trust bundle for client verification, new server certificate) until
    /// `shutdown`.
    pub async fn keep_fresh(self, ca: Arc<CertificateAuthority>, shutdown: CancellationToken) {
        let verifier = self.verifier.clone();
        let rebuild_from = ca.clone();
        self.certificate
            .clone()
            .keep_fresh(
                ca,
                move || {
                    if let Err(e) = verifier.rebuild(&rebuild_from) {
                        tracing::error!(error = %e, "following the new trust bundle failed; clients are checked against the previous one");
                    }
                },
                shutdown,
            )
            .await;
    }
}

/// The SPIFFE ids of trust domain `trust_domain` in the leaf's URI SANs.
fn client_ids(chain: &[CertificateDer<'_>], trust_domain: &TrustDomain) -> Vec<SpiffeId> {
    let Some(leaf) = chain.first() else {
        return Vec::new();
    };
    let Ok((_, cert)) = X509Certificate::from_der(leaf) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => uri.parse::<SpiffeId>().ok(),
            _ => None,
        })
        .filter(|id| id.trust_domain() == trust_domain)
        .collect()
}

/// The tenant a (verified) client certificate names in its
/// `spiffe://<trust domain>/tenant/<t>` URI SAN; `None` when it names none of this
/// trust domain, or more than one.
pub fn client_tenant(chain: &[CertificateDer<'_>], trust_domain: &TrustDomain) -> Option<String> {
    let mut tenants = client_ids(chain, trust_domain)
        .into_iter()
        .filter_map(|id| match id {
            SpiffeId::Tenant(id) => Some(id.tenant().to_owned()),
            SpiffeId::Workload(_) => None,
        });
    let tenant = tenants.next()?;
    tenants.next().is_none().then_some(tenant)
}

/// The namespace of the workload a (verified) client certificate names
/// (`spiffe://<trust domain>/ns/<ns>/sa/<sa>`); `None` when none, or more than one.
pub fn client_namespace(
    chain: &[CertificateDer<'_>],
    trust_domain: &TrustDomain,
) -> Option<String> {
    let mut namespaces = client_ids(chain, trust_domain)
        .into_iter()
        .filter_map(|id| match id {
            SpiffeId::Workload(id) => Some(id.namespace().to_owned()),
            SpiffeId::Tenant(_) => None,
        });
    let namespace = namespaces.next()?;
    namespaces.next().is_none().then_some(namespace)
}

/// Whether a (verified) client certificate is the audit collector's: its leaf has no
/// URI SAN at all — the CA writes URI SANs only as SPIFFE ids, into workload leaves —
/// and names `collector` among its DNS SANs. The DNS name alone proves nothing: a
/// workload leaf carries the names of the Services that select its pod.
pub fn is_audit_collector(chain: &[CertificateDer<'_>], collector: &str) -> bool {
    let Some(leaf) = chain.first() else {
        return false;
    };
    let Ok((_, cert)) = X509Certificate::from_der(leaf) else {
        return false;
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return false;
    };
    let names = &san.value.general_names;
    !names.iter().any(|name| matches!(name, GeneralName::URI(_)))
        && names.iter().any(
            |name| matches!(name, GeneralName::DNSName(dns) if dns.eq_ignore_ascii_case(collector)),
        )
}
