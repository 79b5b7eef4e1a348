//! The certificate store: the workload's current credentials behind one atomic pointer.
//!
//! The renew loop swaps in a complete new [`Credentials`] (key, chain, trust roots) at
//! once; the store is the identity feed of the TLS credentials store
//! ([`crate::tls::creds`]), which builds whole TLS configs from each generation, so a
//! handshake never sees a new certificate with old roots or the reverse.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use jiff::Timestamp;
use rustls::RootCertStore;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use super::IdentityError;
use super::csr::WorkloadKey;
use crate::tls::creds::{CredentialStore, Feed, TlsCredentials};
use crate::tls::server::ClientAuth;
use crate::tls::verify::{ClientVerifier, PeerServerVerifier};
use crate::tls::{self, TlsError};
use portcullis_api::identity::IssueResponse;
use portcullis_api::spiffe::{TenantId, WorkloadId};

/// Everything one certificate generation consists of.
pub struct Credentials {
    workload: WorkloadId,
    tenant: Option<TenantId>,
    certified_key: Arc<CertifiedKey>,
    // The same key rustls signs handshakes with, kept in PKCS#8 form so the audit writer
    // can sign checkpoints with the workload identity. Never printed (see Debug).
    workload_key: PrivatePkcs8KeyDer<'static>,
    roots: Arc<RootCertStore>,
    trust_bundle: Vec<CertificateDer<'static>>,
    not_before: Timestamp,
    not_after: Timestamp,
    renew_after: Timestamp,
    names_revision: Option<String>,
}

impl Credentials {
    /// Assembles credentials from our key and the identity service's answer, refusing
    /// an answer that does not fit: a leaf for another identity or key, or a chain that
    /// does not verify against the bundle that came with it.
    pub fn from_issued(
        key: &WorkloadKey,
        expected: &WorkloadId,
        issued: &IssueResponse,
        now: Timestamp,
    ) -> Result<Self, IdentityError> {
        let leaf = parse_pem_certs(&issued.certificate, "certificate")?;
        let chain = parse_pem_certs(&issued.chain, "chain")?;
        let trust_bundle = parse_pem_certs(&issued.trust_bundle, "trustBundle")?;
        let [leaf] = <[CertificateDer<'static>; 1]>::try_from(leaf).map_err(|_| {
            IdentityError::InvalidResponse("certificate must hold exactly one certificate".into())
        })?;

        let facts = tls::peer::leaf_facts(&leaf)
            .map_err(|e| IdentityError::InvalidResponse(format!("leaf certificate: {e}")))?;
        if facts.workload.as_ref() != Some(expected) {
            return Err(IdentityError::InvalidResponse(format!(
                "leaf certificate is for {:?}, expected {expected}",
                facts.workload.map(|w| w.to_string())
            )));
        }

        let roots = Arc::new(root_store(&trust_bundle)?);
        let provider = tls::provider();
        let parsed = ParsedCertificate::try_from(&leaf)
            .map_err(|e| IdentityError::InvalidResponse(format!("leaf certificate: {e}")))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &chain,
            unix_time(now),
            provider.signature_verification_algorithms.all,
        )
        .map_err(|e| {
            IdentityError::InvalidResponse(format!(
                "chain does not verify against the trust bundle: {e}"
            ))
        })?;

        let workload_key = match key.private_key_der() {
            PrivateKeyDer::Pkcs8(der) => der,
            _ => {
                return Err(IdentityError::KeyGeneration(
                    "workload key is not PKCS#8".into(),
                ));
            }
        };
        let signing_key = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(workload_key.clone_key()))
            .map_err(|e| IdentityError::KeyGeneration(e.to_string()))?;
        let mut cert_chain = vec![leaf];
        cert_chain.extend(chain);
        let certified_key = CertifiedKey::new(cert_chain, signing_key);
        certified_key.keys_match().map_err(|_| {
            IdentityError::InvalidResponse("leaf certificate is not for our key".into())
        })?;

        // Refuse a bundle that cannot verify client certificates before it is in force.
        ClientVerifier::new(
            Some(roots.clone()),
            Some(expected.trust_domain().clone()),
            ClientAuth::Optional,
        )
        .map_err(|e| IdentityError::InvalidResponse(format!("trust bundle: {e}")))?;

        Ok(Self {
            workload: expected.clone(),
            tenant: facts.tenant,
            certified_key: Arc::new(certified_key),
            workload_key,
            roots,
            trust_bundle,
            not_before: facts.not_before,
            not_after: facts.not_after,
            renew_after: issued.renew_after,
            names_revision: issued.names_revision.clone(),
        })
    }

    /// The revision of the namespace's Service selectors the certificate's DNS names
    /// were decided from (`None`: an identity service that does not say).
    pub fn names_revision(&self) -> Option<&str> {
        self.names_revision.as_deref()
    }

    /// Our SPIFFE workload ID.
    pub fn workload(&self) -> &WorkloadId {
        &self.workload
    }

    /// Our tenant, from the leaf's tenant URI SAN.
    pub fn tenant(&self) -> Option<&TenantId> {
        self.tenant.as_ref()
    }

    /// Leaf + intermediate and our signing key, for rustls.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified_key
    }

    /// The workload's private key (PKCS#8 DER, ECDSA P-256): the key of the leaf
    /// certificate, for signing audit checkpoints with the workload identity. Handle as
    /// a secret: never log it.
    pub fn workload_key_pkcs8(&self) -> &[u8] {
        self.workload_key.secret_pkcs8_der()
    }

    /// The leaf certificate (DER).
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.certified_key.cert[0]
    }

    /// The certificate chain (leaf first) as PEM: public material only.
    pub fn chain_pem(&self) -> String {
        crate::tls::pem_chain(&self.certified_key.cert)
    }

    /// The trusted roots.
    pub fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }

    /// The trusted roots as DER certificates.
    pub fn trust_bundle(&self) -> &[CertificateDer<'static>] {
        &self.trust_bundle
    }

    /// The leaf's notBefore.
    pub fn not_before(&self) -> Timestamp {
        self.not_before
    }

    /// The leaf's notAfter.
    pub fn not_after(&self) -> Timestamp {
        self.not_after
    }

    /// When the identity service asked us to renew (before jitter).
    pub fn renew_after(&self) -> Timestamp {
        self.renew_after
    }

    /// A peer-server verifier for this trust bundle and our trust domain.
    pub fn server_verifier(&self) -> Arc<dyn ServerCertVerifier> {
        Arc::new(PeerServerVerifier::new(
            self.roots.clone(),
            self.workload.trust_domain().clone(),
        ))
    }

    /// What the TLS credentials store builds its configs from.
    pub fn tls(&self) -> TlsCredentials {
        TlsCredentials {
            certified_key: self.certified_key.clone(),
            roots: self.roots.clone(),
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("workload", &self.workload.to_string())
            .field("tenant", &self.tenant.as_ref().map(ToString::to_string))
            .field("roots", &self.trust_bundle.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("renew_after", &self.renew_after)
            .finish_non_exhaustive()
    }
}

/// The current credentials, swapped atomically; cheap to clone and share.
#[derive(Clone)]
pub struct CertificateStore {
    current: Arc<ArcSwapOption<Credentials>>,
    generation: Arc<watch::Sender<u64>>,
    feed: Feed,
}

impl CertificateStore {
    /// An empty store: handshakes fail until the first credentials arrive.
    pub fn new() -> Self {
        Self {
            current: Arc::new(ArcSwapOption::empty()),
            generation: Arc::new(watch::Sender::new(0)),
            feed: Feed::default(),
        }
    }

    /// The current credentials, if any. Lock-free.
    pub fn load(&self) -> Option<Arc<Credentials>> {
        self.current.load_full()
    }

    /// Whether credentials were ever installed.
    pub fn is_ready(&self) -> bool {
        self.current.load().is_some()
    }

    /// Installs new credentials; handshakes from now on use them, open connections keep
    /// theirs.
    pub fn swap(&self, credentials: Credentials) {
        let installed = self.feed.swap(|| {
            let tls = credentials.tls();
            self.current.store(Some(Arc::new(credentials)));
            tls
        });
        // `from_issued` checked the bundle, so the configs build; keep serving if not.
        if let Err(e) = installed {
            tracing::warn!(error = %e, "TLS configs for the new certificate could not be built");
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// Installs the current credentials in `store`, and every later generation.
    pub fn feed(&self, store: &CredentialStore) -> Result<(), TlsError> {
        self.feed.attach(store, || self.load().map(|c| c.tls()))
    }

    /// A receiver that changes on every swap (the value counts swaps).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

impl Default for CertificateStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for CertificateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateStore")
            .field("current", &self.load())
            .finish()
    }
}

pub use portcullis_tls::roots::{parse_pem_certs, root_store, unix_time};
