//! Certificate templates for each kind the CA makes, and the parsed form it keeps.

use std::time::Duration;

use jiff::Timestamp;
use portcullis_api::clock;
use portcullis_api::spiffe::{TenantId, TrustDomain, WorkloadId};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::CaError;

/// A certificate the CA made or loaded, with the facts it needs about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaCertificate {
    der: CertificateDer<'static>,
    pem: String,
    not_before: Timestamp,
    not_after: Timestamp,
    fingerprint: String,
}

impl CaCertificate {
    /// Parses a DER certificate.
    pub fn from_der(der: CertificateDer<'static>) -> Result<Self, CaError> {
        let (rest, cert) = X509Certificate::from_der(&der)
            .map_err(|e| CaError::Corrupt(format!("certificate: {e}")))?;
        if !rest.is_empty() {
            return Err(CaError::Corrupt("trailing bytes after certificate".into()));
        }
        let ts = |t: x509_parser::time::ASN1Time| {
            Timestamp::from_second(t.timestamp())
                .map_err(|e| CaError::Corrupt(format!("certificate validity: {e}")))
        };
        let not_before = ts(cert.validity().not_before)?;
        let not_after = ts(cert.validity().not_after)?;
        let pem = pem_encode(&der);
        let fingerprint = hex::encode(Sha256::digest(&der));
        Ok(Self {
            der,
            pem,
            not_before,
            not_after,
            fingerprint,
        })
    }

    /// Parses a single-certificate PEM.
    pub fn from_pem(pem: &str) -> Result<Self, CaError> {
        use rustls::pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| CaError::Corrupt(format!("certificate PEM: {e}")))?;
        Self::from_der(der)
    }

    /// DER bytes.
    pub fn der(&self) -> &CertificateDer<'static> {
        &self.der
    }

    /// PEM text.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// notBefore.
    pub fn not_before(&self) -> Timestamp {
        self.not_before
    }

    /// notAfter.
    pub fn not_after(&self) -> Timestamp {
        self.not_after
    }

    /// Lowercase hex SHA-256 of the DER.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

/// PEM-encodes one certificate.
pub fn pem_encode(der: &[u8]) -> String {
    pem_block("CERTIFICATE", der)
}

/// One PEM block (RFC 7468), written as everywhere else.
pub use portcullis_tls::pem_block;

/// A random positive 128-bit serial.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// Sets the validity window: `now - backdate` .. `now + lifetime`.
fn set_validity(
    params: &mut CertificateParams,
    now: Timestamp,
    backdate: Duration,
    lifetime: Duration,
) {
    let since_epoch =
        |ts: Timestamp| Duration::from_secs(u64::try_from(ts.as_second()).unwrap_or(0));
    // rcgen takes `time` types; build them from the epoch so this crate needs no `time`.
    params.not_before = rcgen::date_time_ymd(1970, 1, 1) + since_epoch(clock::sub(now, backdate));
    params.not_after = rcgen::date_time_ymd(1970, 1, 1) + since_epoch(clock::add(now, lifetime));
}

fn base(common_name: Option<String>, trust_domain: &TrustDomain) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Portcullis");
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, trust_domain.as_str());
    if let Some(cn) = common_name {
        params.distinguished_name.push(DnType::CommonName, cn);
    }
    params.serial_number = Some(random_serial());
    params
}

fn ca_params(kind: &str, trust_domain: &TrustDomain, path_len: u8) -> CertificateParams {
    let serial = random_serial();
    // The serial in the name keeps successive CAs' subjects distinct for path building.
    let cn = format!(
        "Portcullis {kind} CA {}",
        hex::encode(&serial.to_bytes()[..4])
    );
    let mut params = base(Some(cn), trust_domain);
    params.serial_number = Some(serial);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// A root: CA, pathlen 1, keyCertSign + cRLSign.
pub fn root_params(
    trust_domain: &TrustDomain,
    now: Timestamp,
    backdate: Duration,
    lifetime: Duration,
) -> CertificateParams {
    let mut params = ca_params("Root", trust_domain, 1);
    set_validity(&mut params, now, backdate, lifetime);
    params
}

/// An issuing intermediate: CA, pathlen 0, keyCertSign + cRLSign.
pub fn intermediate_params(
    trust_domain: &TrustDomain,
    now: Timestamp,
    backdate: Duration,
    lifetime: Duration,
) -> CertificateParams {
    let mut params = ca_params("Intermediate", trust_domain, 0);
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, now, backdate, lifetime);
    params
}

/// A workload leaf: not a CA, digitalSignature, serverAuth + clientAuth, and exactly the
/// workload and tenant SPIFFE IDs as URI SANs.
pub fn leaf_params(
    workload: &WorkloadId,
    tenant: &TenantId,
    dns_names: &[String],
    now: Timestamp,
    backdate: Duration,
    lifetime: Duration,
) -> Result<CertificateParams, CaError> {
    let uri = |s: String| {
        s.try_into()
            .map(SanType::URI)
            .map_err(|e: rcgen::Error| CaError::Signing(format!("URI SAN: {e}")))
    };
    let mut params = base(None, workload.trust_domain());
    params.subject_alt_names = vec![uri(workload.to_string())?, uri(tenant.to_string())?];
    for name in dns_names {
        let name = name
            .clone()
            .try_into()
            .map_err(|e: rcgen::Error| CaError::Signing(format!("DNS SAN {name:?}: {e}")))?;
        params.subject_alt_names.push(SanType::DnsName(name));
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, now, backdate, lifetime);
    Ok(params)
}

/// A TLS server certificate for the CA's own endpoints: DNS SANs, serverAuth.
pub fn server_params(
    trust_domain: &TrustDomain,
    dns_names: &[String],
    now: Timestamp,
    backdate: Duration,
    lifetime: Duration,
) -> Result<CertificateParams, CaError> {
    let mut params = base(dns_names.first().cloned(), trust_domain);
    params.subject_alt_names = dns_names
        .iter()
        .map(|name| match name.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => name
                .clone()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|e: rcgen::Error| CaError::Signing(format!("DNS SAN {name:?}: {e}"))),
        })
        .collect::<Result<_, _>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, now, backdate, lifetime);
    Ok(params)
}

/// The audit service's certificate: [`server_params`] plus clientAuth. The collector
/// presents the same certificate to the policy server to fetch tenant DEKs; the
/// operator's own serving certificates stay serverAuth only, so none of them can pass
/// as a client.
pub fn audit_service_params(
    trust_domain: &TrustDomain,
    dns_names: &[String],
    now: Timestamp,
    backdate: Duration,
    lifetime: Duration,
) -> Result<CertificateParams, CaError> {
    let mut params = server_params(trust_domain, dns_names, now, backdate, lifetime)?;
    params
        .extended_key_usages
        .push(ExtendedKeyUsagePurpose::ClientAuth);
    Ok(params)
}
