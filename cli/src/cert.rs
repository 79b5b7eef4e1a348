//! Reading certificates (PEM) and judging how long they have left.

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;
use x509_parser::extensions::GeneralName;

use crate::error::CliError;

/// What a person wants to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertSummary {
    /// Subject DN.
    pub subject: String,
    /// Issuer DN.
    pub issuer: String,
    /// URI SANs (SPIFFE IDs).
    pub uri_sans: Vec<String>,
    /// DNS SANs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns_sans: Vec<String>,
    /// Start of validity.
    pub not_before: Timestamp,
    /// End of validity.
    pub not_after: Timestamp,
    /// Whether it is a CA certificate.
    pub is_ca: bool,
}

/// Every certificate in a PEM bundle, in order. Non-certificate blocks are skipped.
pub fn parse_pem_bundle(pem: &[u8]) -> Result<Vec<CertSummary>, CliError> {
    let mut certs = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem) {
        let block = block.map_err(|e| CliError::Certificate(format!("not a PEM document: {e}")))?;
        if block.label != "CERTIFICATE" {
            continue;
        }
        let cert = block
            .parse_x509()
            .map_err(|e| CliError::Certificate(format!("not an X.509 certificate: {e}")))?;
        certs.push(summarize(&cert)?);
    }
    if certs.is_empty() {
        return Err(CliError::Certificate(
            "no PEM certificate found (expected -----BEGIN CERTIFICATE-----)".to_owned(),
        ));
    }
    Ok(certs)
}

fn summarize(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<CertSummary, CliError> {
    let time = |t: x509_parser::time::ASN1Time| {
        Timestamp::from_second(t.timestamp())
            .map_err(|e| CliError::Certificate(format!("certificate validity out of range: {e}")))
    };
    let (mut uri_sans, mut dns_sans) = (Vec::new(), Vec::new());
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) => uri_sans.push((*uri).to_owned()),
                GeneralName::DNSName(dns) => dns_sans.push((*dns).to_owned()),
                _ => {}
            }
        }
    }
    Ok(CertSummary {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        uri_sans,
        dns_sans,
        not_before: time(cert.validity().not_before)?,
        not_after: time(cert.validity().not_after)?,
        is_ca: cert.is_ca(),
    })
}

/// Where a certificate is in its validity window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// `now` is before notBefore.
    NotYetValid {
        /// Until it becomes valid.
        starts_in: SignedDuration,
    },
    /// Valid with more than the warning window left.
    Valid {
        /// Time left.
        left: SignedDuration,
    },
    /// Valid, but expires within the warning window.
    Expiring {
        /// Time left.
        left: SignedDuration,
    },
    /// Past notAfter.
    Expired {
        /// How long ago.
        ago: SignedDuration,
    },
}

/// Judges a validity window at `now`; `warn_within` is how early expiry is flagged.
pub fn classify(
    not_before: Timestamp,
    not_after: Timestamp,
    now: Timestamp,
    warn_within: SignedDuration,
) -> Expiry {
    if now < not_before {
        return Expiry::NotYetValid {
            starts_in: not_before.duration_since(now),
        };
    }
    let left = not_after.duration_since(now);
    if left <= SignedDuration::ZERO {
        Expiry::Expired { ago: -left }
    } else if left <= warn_within {
        Expiry::Expiring { left }
    } else {
        Expiry::Valid { left }
    }
}

impl CertSummary {
    /// [`classify`] for this certificate.
    pub fn expiry(&self, now: Timestamp, warn_within: SignedDuration) -> Expiry {
        classify(self.not_before, self.not_after, now, warn_within)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    const DAY: i64 = 86_400;

    #[test]
    fn classification_at_fixed_times() {
        let (start, end) = (at(1_000 * DAY), at(1_100 * DAY));
        let warn = SignedDuration::from_hours(30 * 24);
        assert_eq!(
            classify(start, end, at(999 * DAY), warn),
            Expiry::NotYetValid {
                starts_in: SignedDuration::from_hours(24)
            }
        );
        assert_eq!(
            classify(start, end, at(1_010 * DAY), warn),
            Expiry::Valid {
                left: SignedDuration::from_hours(90 * 24)
            }
        );
        assert_eq!(
            classify(start, end, at(1_090 * DAY), warn),
            Expiry::Expiring {
                left: SignedDuration::from_hours(10 * 24)
            }
        );
        // Exactly at the warning edge counts as expiring; exactly at notAfter as expired.
        assert!(matches!(
            classify(start, end, at(1_070 * DAY), warn),
            Expiry::Expiring { .. }
        ));
        assert_eq!(
            classify(start, end, at(1_100 * DAY), warn),
            Expiry::Expired {
                ago: SignedDuration::ZERO
            }
        );
        assert_eq!(
            classify(start, end, at(1_102 * DAY), warn),
            Expiry::Expired {
                ago: SignedDuration::from_hours(48)
            }
        );
    }

    #[test]
    fn reads_sans_and_validity_from_pem() {
        let key = rcgen::KeyPair::generate().ok();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).ok();
        let (Some(key), Some(params)) = (key, params.as_mut()) else {
            panic!("rcgen setup failed");
        };
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from("spiffe://cluster.local/ns/acme/sa/api")
                .unwrap_or_else(|_| panic!("ia5")),
        )];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "api");
        params.not_before = rcgen::date_time_ymd(2026, 1, 1);
        params.not_after = rcgen::date_time_ymd(2026, 1, 4);
        let Ok(cert) = params.self_signed(&key) else {
            panic!("self-signed");
        };
        let pem = format!("{}{}", cert.pem(), cert.pem());
        let Ok(certs) = parse_pem_bundle(pem.as_bytes()) else {
            panic!("parse failed");
        };
        assert_eq!(certs.len(), 2);
        assert_eq!(certs[0].uri_sans, ["spiffe://cluster.local/ns/acme/sa/api"]);
        assert_eq!(certs[0].subject, "CN=api");
        assert_eq!(timestamp_of(&certs[0].not_after), "2026-01-04T00:00:00Z");
    }

    fn timestamp_of(t: &Timestamp) -> String {
        crate::output::timestamp(*t)
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse_pem_bundle(b"hello").is_err());
        assert!(
            parse_pem_bundle(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
                .is_err()
        );
    }
}
