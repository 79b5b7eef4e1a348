//! Writing PEM (RFC 7468): what the operator stores in Secrets and ConfigMaps and what
//! the proxy serves on its admin port, written one way. Reading PEM is rustls-pki-types'.

use base64::Engine as _;
use rustls::pki_types::CertificateDer;

/// One PEM block of `label`: base64 in 64-character lines.
pub fn pem_block(label: &str, der: &[u8]) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in encoded.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Certificates as concatenated PEM blocks (public material only).
pub fn pem_chain(certificates: &[CertificateDer<'_>]) -> String {
    certificates
        .iter()
        .map(|cert| pem_block("CERTIFICATE", cert.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn what_is_written_reads_back() {
        let ders: Vec<CertificateDer<'static>> = [vec![7u8; 100], vec![9u8; 3]]
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let pem = pem_chain(&ders);
        assert!(pem.lines().all(|l| l.len() <= 64), "{pem}");
        let back: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, ders);
    }
}
