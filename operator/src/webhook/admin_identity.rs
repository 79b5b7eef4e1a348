//! The operator's own workload certificate, from its own CA: it signs the checkpoints of
//! the admin audit chains (so `audit verify` checks them against the trust bundle like a
//! pod's) and is the client certificate the chains are shipped to the audit collector
//! with. Issued in process (no CSR travels), renewed well before it expires.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use jiff::Timestamp;
use portcullis_api::spiffe::{TenantId, WorkloadId};
use portcullis_audit::{CheckpointSigner, SignerIdentity};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::ca::{CertificateAuthority, validate_csr};

/// A leaf older than this is replaced at the next use: far inside the CA's rotation
/// period plus grace, so a checkpoint is never signed by an expired certificate.
pub const RENEW_AFTER: Duration = Duration::from_secs(12 * 3600);

/// Why the operator has no certificate of its own.
#[derive(Debug, thiserror::Error)]
#[error("the operator's own audit certificate: {0}")]
pub struct AdminIdentityError(String);

#[derive(Clone)]
struct Issued {
    at: Timestamp,
    chain: Vec<CertificateDer<'static>>,
}

/// The operator's workload identity (`spiffe://<td>/ns/<namespace>/sa/<account>`).
pub struct AdminIdentity {
    ca: Arc<CertificateAuthority>,
    workload: WorkloadId,
    tenant: TenantId,
    key: KeyPair,
    issued: Mutex<Option<Issued>>,
}

impl std::fmt::Debug for AdminIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminIdentity")
            .field("workload", &self.workload.to_string())
            .finish_non_exhaustive()
    }
}

impl AdminIdentity {
    /// The identity `workload` (of `tenant`, the operator's namespace) with a fresh
    /// P-256 key, its first certificate issued by `ca` now.
    pub fn new(
        ca: Arc<CertificateAuthority>,
        workload: WorkloadId,
        tenant: TenantId,
    ) -> Result<Self, AdminIdentityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| AdminIdentityError(e.to_string()))?;
        let identity = Self {
            ca,
            workload,
            tenant,
            key,
            issued: Mutex::new(None),
        };
        identity.current()?;
        Ok(identity)
    }

    /// The workload id, as the collector names an admin writer.
    pub fn workload(&self) -> &WorkloadId {
        &self.workload
    }

    /// The certificate in force, issuing a new one when it is older than
    /// [`RENEW_AFTER`] (or the CA rotated the intermediate that signed it).
    fn current(&self) -> Result<Issued, AdminIdentityError> {
        let mut issued = self.issued.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Timestamp::now();
        if let Some(current) = issued.as_ref()
            && now.duration_since(current.at).unsigned_abs() < RENEW_AFTER
        {
            return Ok(current.clone());
        }
        let fresh = self.issue(now)?;
        *issued = Some(fresh.clone());
        Ok(fresh)
    }

    fn issue(&self, now: Timestamp) -> Result<Issued, AdminIdentityError> {
        let fail = |e: &dyn std::fmt::Display| AdminIdentityError(e.to_string());
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = self
            .workload
            .to_string()
            .try_into()
            .map_err(|e: rcgen::Error| fail(&e))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params
            .serialize_request(&self.key)
            .and_then(|csr| csr.pem())
            .map_err(|e| fail(&e))?;
        let csr = validate_csr(&csr, &self.workload).map_err(|e| fail(&e))?;
        let answer = self
            .ca
            .issue(&csr, &self.workload, &self.tenant)
            .map_err(|e| fail(&e))?;
        let chain = CertificateDer::pem_slice_iter(
            format!("{}{}", answer.certificate, answer.chain).as_bytes(),
        )
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(&e))?;
        Ok(Issued { at: now, chain })
    }

    /// When the certificate in force was issued: a signer made before is stale.
    pub fn issued_at(&self) -> Result<Timestamp, AdminIdentityError> {
        Ok(self.current()?.at)
    }

    /// A checkpoint signer for the certificate in force.
    pub fn signer(&self) -> Result<CheckpointSigner, AdminIdentityError> {
        let issued = self.current()?;
        let mut chain = issued.chain.iter().map(|c| c.to_vec());
        let identity = SignerIdentity {
            spiffe_id: Some(self.workload.to_string()),
            certificate_der: chain.next(),
            intermediates_der: chain.collect(),
        };
        CheckpointSigner::from_pkcs8(&self.key.serialize_der(), identity)
            .map_err(|e| AdminIdentityError(e.to_string()))
    }

    /// A TLS 1.3 client config presenting the certificate in force and trusting the
    /// CA's roots (the collector's serving certificate comes from the same CA).
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, AdminIdentityError> {
        let fail = |e: &dyn std::fmt::Display| AdminIdentityError(e.to_string());
        let issued = self.current()?;
        let roots = portcullis_tls::parse_pem_certs(&self.ca.trust_bundle_pem(), "trust bundle")
            .map_err(|e| fail(&e))?;
        let roots = portcullis_tls::root_store(&roots).map_err(|e| fail(&e))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()));
        let mut config = rustls::ClientConfig::builder_with_provider(portcullis_tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| fail(&e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(issued.chain, key)
            .map_err(|e| fail(&e))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}
