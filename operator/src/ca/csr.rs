//! CSR validation: what a workload may ask for.
//!
//! The CSR is only a proof of possession of a key and a claim of one name. The signed
//! leaf takes nothing from it but the public key: subject, SANs and extensions are all
//! computed by the CA. Still, a CSR asking for more than it may get is refused outright
//! (with a specific reason) rather than silently trimmed, so a misbehaving client shows
//! up in metrics.

use portcullis_api::identity::RefusalReason;
use portcullis_api::spiffe::WorkloadId;
use rcgen::{PKCS_ECDSA_P256_SHA256, SubjectPublicKeyInfo};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

/// Largest CSR accepted, PEM or DER (a P-256 CSR is well under 1 KiB).
const MAX_CSR_BYTES: usize = 16 * 1024;

/// Why a CSR is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// Not a parseable, correctly self-signed PKCS#10 request.
    #[error("invalid CSR: {0}")]
    Invalid(String),
    /// The CSR requests a basicConstraints extension (CA or not).
    #[error("the CSR requests basicConstraints; workload certificates are never CAs")]
    HasCaFlag,
    /// The CSR requests names beyond the workload ID.
    #[error("the CSR requests names other than the workload ID: {0:?}")]
    ExtraSans(Vec<String>),
    /// The CSR requests a different SPIFFE ID (or none).
    #[error("the CSR requests {requested:?}, but this workload is {expected}")]
    WrongIdentity {
        /// What the CSR asks for.
        requested: Option<String>,
        /// What the token proves.
        expected: String,
    },
    /// The key is not ECDSA P-256.
    #[error("unsupported key: {0}; only ECDSA P-256 keys are accepted")]
    UnsupportedKey(String),
}

impl CsrError {
    /// The refusal reason reported to the client and in metrics.
    pub fn reason(&self) -> RefusalReason {
        match self {
            Self::Invalid(_) => RefusalReason::CsrInvalid,
            Self::HasCaFlag => RefusalReason::CsrHasCaFlag,
            Self::ExtraSans(_) => RefusalReason::CsrExtraSans,
            Self::WrongIdentity { .. } => RefusalReason::CsrWrongIdentity,
            Self::UnsupportedKey(_) => RefusalReason::UnsupportedKey,
        }
    }
}

/// A CSR that passed every check: all the CA keeps of it is the public key.
#[derive(Debug, Clone)]
pub struct ValidatedCsr {
    public_key: SubjectPublicKeyInfo,
}

impl ValidatedCsr {
    /// The requester's P-256 public key.
    pub fn public_key(&self) -> &SubjectPublicKeyInfo {
        &self.public_key
    }
}

/// Validates a PEM CSR for `expected`.
pub fn validate_csr(pem: &str, expected: &WorkloadId) -> Result<ValidatedCsr, CsrError> {
    if pem.len() > MAX_CSR_BYTES {
        return Err(CsrError::Invalid(format!(
            "larger than {MAX_CSR_BYTES} bytes"
        )));
    }
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|_| CsrError::Invalid("not PEM".into()))?;
    if !matches!(
        block.label.as_str(),
        "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST"
    ) {
        return Err(CsrError::Invalid(format!(
            "PEM block is {:?}, expected CERTIFICATE REQUEST",
            block.label
        )));
    }
    validate_csr_der(&block.contents, expected)
}

/// Validates a DER CSR for `expected`.
pub fn validate_csr_der(der: &[u8], expected: &WorkloadId) -> Result<ValidatedCsr, CsrError> {
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| CsrError::Invalid(format!("not a PKCS#10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(CsrError::Invalid("trailing bytes after the request".into()));
    }

    let spki = &csr.certification_request_info.subject_pki;
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err(CsrError::UnsupportedKey(format!(
            "key algorithm {}",
            spki.algorithm.algorithm
        )));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if curve.as_ref() != Some(&OID_EC_P256) {
        return Err(CsrError::UnsupportedKey(match curve {
            Some(oid) => format!("EC curve {oid}"),
            None => "EC key without a named curve".into(),
        }));
    }
    csr.verify_signature().map_err(|_| {
        CsrError::Invalid("signature does not verify with the request's key".into())
    })?;

    let mut names = Vec::new();
    // Every extensionRequest attribute, not just the first: none may smuggle a CA flag.
    for attribute in csr.certification_request_info.iter_attributes() {
        let ParsedCriAttribute::ExtensionRequest(request) = attribute.parsed_attribute() else {
            continue;
        };
        for extension in &request.extensions {
            match extension.parsed_extension() {
                ParsedExtension::BasicConstraints(_) => return Err(CsrError::HasCaFlag),
                ParsedExtension::SubjectAlternativeName(san) => {
                    names.extend(san.general_names.iter().map(describe))
                }
                ParsedExtension::ParseError { .. } => {
                    return Err(CsrError::Invalid(format!(
                        "unparseable extension {}",
                        extension.oid
                    )));
                }
                // Anything else (key usage, EKU, ...) is ignored: the leaf never copies it.
                _ => {}
            }
        }
    }

    let expected_uri = format!("URI:{expected}");
    match names.as_slice() {
        [only] if *only == expected_uri => {}
        [] => {
            return Err(CsrError::WrongIdentity {
                requested: None,
                expected: expected.to_string(),
            });
        }
        [other] => {
            return Err(CsrError::WrongIdentity {
                requested: Some(other.clone()),
                expected: expected.to_string(),
            });
        }
        many => {
            let mut extra: Vec<String> = many
                .iter()
                .filter(|n| **n != expected_uri)
                .cloned()
                .collect();
            if extra.len() == many.len() {
                // Several names, none of them ours: still "extra", the clearest complaint.
                extra.sort();
            }
            return Err(CsrError::ExtraSans(extra));
        }
    }

    let public_key = SubjectPublicKeyInfo::from_der(spki.raw)
        .map_err(|e| CsrError::UnsupportedKey(format!("public key: {e}")))?;
    if rcgen::PublicKeyData::algorithm(&public_key) != &PKCS_ECDSA_P256_SHA256 {
        return Err(CsrError::UnsupportedKey("not an ECDSA P-256 key".into()));
    }
    Ok(ValidatedCsr { public_key })
}

fn describe(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::URI(u) => format!("URI:{u}"),
        GeneralName::DNSName(d) => format!("DNS:{d}"),
        GeneralName::RFC822Name(e) => format!("email:{e}"),
        GeneralName::IPAddress(ip) => format!("IP:{}", hex::encode(ip)),
        other => format!("{other:?}"),
    }
}
