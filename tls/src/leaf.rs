//! What a workload leaf certificate says about its holder, read without chain
//! verification: the operator records it when it issues, the proxy when it installs or
//! meets a peer.

use jiff::Timestamp;
use portcullis_api::spiffe::{SpiffeId, TenantId, WorkloadId};
use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::InvalidCertificate;

/// What a workload leaf certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafFacts {
    /// The workload SPIFFE ID among the URI SANs (none when there are several: a
    /// certificate naming two workloads names none reliably).
    pub workload: Option<WorkloadId>,
    /// The tenant SPIFFE ID among the URI SANs (none when there are several).
    pub tenant: Option<TenantId>,
    /// The serial number as [`serial_hex`] writes it.
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
pub fn leaf_facts(cert: &CertificateDer<'_>) -> Result<LeafFacts, InvalidCertificate> {
    let (_, x509) = X509Certificate::from_der(cert)
        .map_err(|e| InvalidCertificate(format!("certificate: {e}")))?;
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
            .map_err(|e| InvalidCertificate(format!("certificate validity: {e}")))
    };
    Ok(LeafFacts {
        workload,
        tenant,
        serial: serial_hex(x509.raw_serial()),
        not_before: ts(x509.validity().not_before)?,
        not_after: ts(x509.validity().not_after)?,
    })
}

/// A certificate serial as the policy bundle's revoked certificates list it: lowercase
/// hex of the DER integer's bytes without leading zero bytes.
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    let mut text = String::with_capacity((raw.len() - start) * 2);
    for byte in &raw[start..] {
        text.push_str(&format!("{byte:02x}"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_hex_without_leading_zeros() {
        assert_eq!(serial_hex(&[0x00, 0x8a, 0x01]), "8a01");
        assert_eq!(serial_hex(&[0x7f]), "7f");
    }
}
