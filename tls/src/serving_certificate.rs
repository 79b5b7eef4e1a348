//! The verdict on a bring-your-own serving certificate (a `kubernetes.io/tls` Secret):
//! the proxy decides with it whether to present the certificate, the operator reports
//! the same verdict on the Tenant, so the two can never disagree. A certificate that is
//! unparseable, not matched by its key, expired or not yet valid is refused.

use std::sync::Arc;

use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    sign::CertifiedKey,
};

/// The certificate chain file of a `kubernetes.io/tls` Secret.
pub const CERT_FILE: &str = "tls.crt";
/// The private key file of a `kubernetes.io/tls` Secret.
pub const KEY_FILE: &str = "tls.key";

/// Why a serving certificate was refused; `as_str` is the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// `tls.crt` or `tls.key` is not there (no Secret, or not a TLS Secret).
    Missing,
    /// A file holds no usable PEM certificate or key.
    Unparseable,
    /// The key does not belong to the leaf certificate.
    KeyMismatch,
    /// The leaf's notAfter has passed.
    Expired,
    /// The leaf's notBefore is still ahead.
    NotYetValid,
}

impl Refusal {
    /// The closed-set label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Unparseable => "unparseable",
            Self::KeyMismatch => "key_mismatch",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
        }
    }
}

/// A refusal and what exactly is wrong (paths and times, never key material).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// The reason.
    pub reason: Refusal,
    /// A sentence for the log and `/ready`.
    pub detail: String,
}

impl Refused {
    /// A refusal for `reason`, explained by `detail`.
    pub fn new(reason: Refusal, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

fn refused(reason: Refusal, detail: impl Into<String>) -> Refused {
    Refused::new(reason, detail)
}

/// A parsed certificate whose key matches, with its validity window (Unix seconds).
#[derive(Debug)]
pub struct Loaded {
    key: Arc<CertifiedKey>,
    not_before: i64,
    not_after: i64,
}

impl Loaded {
    /// The chain and signing key, ready for rustls.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.key
    }

    /// The leaf's notAfter (Unix seconds).
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// Whether the leaf is valid at `now` (Unix seconds).
    pub fn valid_at(&self, now: i64) -> Result<(), Refused> {
        if now < self.not_before {
            Err(refused(
                Refusal::NotYetValid,
                format!(
                    "the certificate is not valid before {}",
                    display_time(self.not_before)
                ),
            ))
        } else if now > self.not_after {
            Err(refused(
                Refusal::Expired,
                format!(
                    "the certificate expired at {}; renew it (cert-manager renews before expiry when the Certificate is Ready)",
                    display_time(self.not_after)
                ),
            ))
        } else {
            Ok(())
        }
    }
}

/// Unix seconds as an RFC 3339 time, or the number when it is out of range.
pub fn display_time(unix: i64) -> String {
    jiff::Timestamp::from_second(unix).map_or_else(|_| unix.to_string(), |t| t.to_string())
}

/// Parses a PEM chain and key (PKCS#8, PKCS#1 RSA or SEC1 EC) and checks that they
/// belong together; validity in time is checked separately, as it changes by itself.
pub fn parse(cert_pem: &[u8], key_pem: &[u8]) -> Result<Loaded, Refused> {
    parse_files(cert_pem, key_pem, CERT_FILE, KEY_FILE)
}

/// As [`parse`], naming the files `cert_file` and `key_file` in what it refuses.
pub fn parse_files(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_file: &str,
    key_file: &str,
) -> Result<Loaded, Refused> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| refused(Refusal::Unparseable, format!("{cert_file} is not PEM: {e}")))?;
    if chain.is_empty() {
        return Err(refused(
            Refusal::Unparseable,
            format!("{cert_file} holds no CERTIFICATE block"),
        ));
    }
    // The parser's own error could quote key bytes; say only what is wrong.
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| {
        refused(
            Refusal::Unparseable,
            format!("{key_file} holds no PKCS#8, PKCS#1 (RSA) or SEC1 (EC) PRIVATE KEY block"),
        )
    })?;
    let signing_key = crate::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|_| {
            refused(
                Refusal::Unparseable,
                format!("{key_file} is a key type this proxy cannot sign with (use RSA, ECDSA P-256/P-384 or Ed25519)"),
            )
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    let (_, leaf) = x509_parser::parse_x509_certificate(&certified.cert[0]).map_err(|_| {
        refused(
            Refusal::Unparseable,
            format!("the first certificate in {cert_file} is not X.509"),
        )
    })?;
    let not_before = leaf.validity().not_before.timestamp();
    let not_after = leaf.validity().not_after.timestamp();
    certified.keys_match().map_err(|e| {
        refused(
            Refusal::KeyMismatch,
            format!(
                "{key_file} is not the key of the first certificate in {cert_file} ({e}); the leaf must come first"
            ),
        )
    })?;
    Ok(Loaded {
        key: Arc::new(certified),
        not_before,
        not_after,
    })
}

/// The proxy's verdict on a chain and key at `now` (Unix seconds), without putting
/// anything in force: what the operator reports on its Tenant.
pub fn check(cert_pem: &[u8], key_pem: &[u8], now: i64) -> Result<(), Refused> {
    parse(cert_pem, key_pem)?.valid_at(now)
}
