//! Trust roots and certificate lists from PEM, and the time conversion rustls needs.

use jiff::Timestamp;
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, UnixTime};

use crate::InvalidCertificate;

/// Parses every certificate in a PEM string; an empty string is an error.
pub fn parse_pem_certs(
    pem: &str,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, InvalidCertificate> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| InvalidCertificate(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(InvalidCertificate(format!("{what}: no certificate")));
    }
    Ok(certs)
}

/// A rustls root store holding exactly `bundle`.
pub fn root_store(bundle: &[CertificateDer<'static>]) -> Result<RootCertStore, InvalidCertificate> {
    let mut roots = RootCertStore::empty();
    for cert in bundle {
        roots
            .add(cert.clone())
            .map_err(|e| InvalidCertificate(format!("trust bundle: {e}")))?;
    }
    Ok(roots)
}

/// A jiff timestamp as rustls time.
pub fn unix_time(ts: Timestamp) -> UnixTime {
    UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(ts.as_second()).unwrap_or(0),
    ))
}
