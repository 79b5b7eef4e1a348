//! The workload's private key and its certificate signing request.
//!
//! The key is generated in-process and never leaves it: only the CSR (public key plus
//! the requested SPIFFE ID) is sent to the identity service.

use std::fmt;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::IdentityError;
use portcullis_api::spiffe::WorkloadId;

/// A freshly generated ECDSA P-256 key pair for one certificate.
pub struct WorkloadKey {
    key: KeyPair,
}

impl WorkloadKey {
    /// Generates a new P-256 key.
    pub fn generate() -> Result<Self, IdentityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IdentityError::KeyGeneration(e.to_string()))?;
        Ok(Self { key })
    }

    /// A PEM CSR asking for exactly `id` as a URI SAN, and nothing else.
    pub fn csr_pem(&self, id: &WorkloadId) -> Result<String, IdentityError> {
        let uri = id
            .to_string()
            .try_into()
            .map_err(|e: rcgen::Error| IdentityError::Csr(e.to_string()))?;
        let mut params = CertificateParams::default();
        // The CA computes the subject and all extensions itself; the CSR only carries the
        // key and the one name the workload claims.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
        params
            .serialize_request(&self.key)
            .and_then(|csr| csr.pem())
            .map_err(|e| IdentityError::Csr(e.to_string()))
    }

    /// The private key in PKCS#8 DER form, for rustls.
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }

    /// The SubjectPublicKeyInfo DER of the public key.
    pub fn public_key_der(&self) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(&self.key)
    }
}

impl fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WorkloadKey(P-256, <private>)")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use portcullis_api::spiffe::TrustDomain;
    use x509_parser::prelude::*;

    #[test]
    fn csr_carries_only_the_workload_id() {
        let key = WorkloadKey::generate().unwrap();
        let id = WorkloadId::new(TrustDomain::new("td").unwrap(), "ns1", "sa1").unwrap();
        let pem = key.csr_pem(&id).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let (_, csr) = X509CertificationRequest::from_der(&pem.contents).unwrap();
        csr.verify_signature().unwrap();
        let exts: Vec<_> = csr.requested_extensions().unwrap().collect();
        assert_eq!(exts.len(), 1);
        let ParsedExtension::SubjectAlternativeName(san) = exts[0] else {
            panic!("expected a SAN extension, got {:?}", exts[0]);
        };
        assert_eq!(
            san.general_names,
            vec![GeneralName::URI("spiffe://td/ns/ns1/sa/sa1")]
        );
        assert_eq!(
            csr.certification_request_info.subject_pki.raw,
            key.public_key_der()
        );
    }

    #[test]
    fn debug_does_not_print_the_key() {
        let key = WorkloadKey::generate().unwrap();
        let der = key.private_key_der();
        let printed = format!("{key:?}");
        assert!(!printed.contains("BEGIN"));
        assert!(printed.len() < 40, "{printed}");
        assert!(!der.secret_der().is_empty());
    }
}
