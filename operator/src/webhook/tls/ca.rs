//! The webhook's own small CA and the serving leaves it signs (rcgen, ECDSA P-256).
//! Pure: no I/O; the time comes from the caller.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use std::collections::BTreeMap;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::webhook::WebhookError;

/// Secret data key of the current CA certificate (PEM).
pub const CA_CERT_KEY: &str = "ca.crt";
/// Secret data key of the current CA private key (PKCS#8 PEM).
pub const CA_KEY_KEY: &str = "ca.key";
/// Secret data key of the previous CA certificate, trusted until it expires.
pub const PREVIOUS_CA_CERT_KEY: &str = "previous-ca.crt";

/// How far certificates are backdated, for clocks slightly behind ours.
const BACKDATE: Duration = Duration::from_secs(300);

fn certificate_error(what: &str) -> impl FnOnce(rcgen::Error) -> WebhookError + '_ {
    move |e| WebhookError::Certificate(format!("{what}: {e}"))
}

/// Sets notBefore/notAfter (rcgen takes `time` types; built from the epoch so this
/// crate needs no `time` dependency).
fn set_validity(params: &mut CertificateParams, from: Timestamp, until: Timestamp) {
    let since_epoch =
        |ts: Timestamp| Duration::from_secs(u64::try_from(ts.as_second()).unwrap_or(0));
    params.not_before = rcgen::date_time_ymd(1970, 1, 1) + since_epoch(from);
    params.not_after = rcgen::date_time_ymd(1970, 1, 1) + since_epoch(until);
}

fn plus(ts: Timestamp, by: Duration) -> Timestamp {
    jiff::SignedDuration::try_from(by)
        .ok()
        .and_then(|d| ts.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

fn minus(ts: Timestamp, by: Duration) -> Timestamp {
    jiff::SignedDuration::try_from(by)
        .ok()
        .and_then(|d| ts.checked_sub(d).ok())
        .unwrap_or(Timestamp::MIN)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// notAfter of a PEM certificate.
fn not_after(pem: &str) -> Result<Timestamp, WebhookError> {
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| WebhookError::CorruptCaSecret(format!("certificate PEM: {e}")))?;
    let (_, cert) = X509Certificate::from_der(&der)
        .map_err(|e| WebhookError::CorruptCaSecret(format!("certificate: {e}")))?;
    Timestamp::from_second(cert.validity().not_after.timestamp())
        .map_err(|e| WebhookError::CorruptCaSecret(format!("certificate validity: {e}")))
}

/// The webhook CA: its certificate and key, and the previous certificate while it is
/// still trusted (leaves it signed may still be served by other replicas).
#[derive(Clone)]
pub struct WebhookCa {
    cert_pem: String,
    key_pem: String,
    not_after: Timestamp,
    previous: Option<(String, Timestamp)>,
}

impl std::fmt::Debug for WebhookCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookCa")
            .field("not_after", &self.not_after)
            .field("previous_not_after", &self.previous.as_ref().map(|p| p.1))
            .finish_non_exhaustive()
    }
}

impl WebhookCa {
    /// A new CA valid from `now` for `lifetime`.
    pub fn generate(now: Timestamp, lifetime: Duration) -> Result<Self, WebhookError> {
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(certificate_error("CA key"))?;
        let serial = random_serial();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Portcullis");
        params.distinguished_name.push(
            DnType::CommonName,
            format!(
                "Portcullis webhook CA {}",
                hex::encode(&serial.to_bytes()[..4])
            ),
        );
        params.serial_number = Some(serial);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let not_after = plus(now, lifetime);
        set_validity(&mut params, minus(now, BACKDATE), not_after);
        let cert = params
            .self_signed(&key)
            .map_err(certificate_error("CA certificate"))?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after,
            previous: None,
        })
    }

    /// A new CA replacing this one; this one stays trusted until it expires.
    pub fn renewed(&self, now: Timestamp, lifetime: Duration) -> Result<Self, WebhookError> {
        let mut next = Self::generate(now, lifetime)?;
        next.previous = Some((self.cert_pem.clone(), self.not_after));
        Ok(next)
    }

    /// Reads the CA from the Secret's data.
    pub fn from_secret_data(data: &BTreeMap<String, ByteString>) -> Result<Self, WebhookError> {
        let text = |key: &str| -> Result<Option<String>, WebhookError> {
            data.get(key)
                .map(|b| {
                    String::from_utf8(b.0.clone()).map_err(|_| {
                        WebhookError::CorruptCaSecret(format!("{key} is not UTF-8 PEM"))
                    })
                })
                .transpose()
        };
        let cert_pem = text(CA_CERT_KEY)?
            .ok_or_else(|| WebhookError::CorruptCaSecret(format!("no {CA_CERT_KEY}")))?;
        let key_pem = text(CA_KEY_KEY)?
            .ok_or_else(|| WebhookError::CorruptCaSecret(format!("no {CA_KEY_KEY}")))?;
        KeyPair::from_pem(&key_pem)
            .map_err(|e| WebhookError::CorruptCaSecret(format!("{CA_KEY_KEY}: {e}")))?;
        let not_after = not_after(&cert_pem)?;
        let previous = match text(PREVIOUS_CA_CERT_KEY)? {
            Some(pem) if !pem.is_empty() => Some((pem.clone(), not_after_or_epoch(&pem))),
            _ => None,
        };
        Ok(Self {
            cert_pem,
            key_pem,
            not_after,
            previous,
        })
    }

    /// The Secret's data.
    pub fn to_secret_data(&self) -> BTreeMap<String, ByteString> {
        let mut data = BTreeMap::from([
            (
                CA_CERT_KEY.to_owned(),
                ByteString(self.cert_pem.clone().into_bytes()),
            ),
            (
                CA_KEY_KEY.to_owned(),
                ByteString(self.key_pem.clone().into_bytes()),
            ),
        ]);
        if let Some((pem, _)) = &self.previous {
            data.insert(
                PREVIOUS_CA_CERT_KEY.to_owned(),
                ByteString(pem.clone().into_bytes()),
            );
        }
        data
    }

    /// The current CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// When the current CA expires.
    pub fn not_after(&self) -> Timestamp {
        self.not_after
    }

    /// Whether the CA should be replaced: less than `renew_before` left at `now`.
    pub fn needs_renewal(&self, now: Timestamp, renew_before: Duration) -> bool {
        now >= minus(self.not_after, renew_before)
    }

    /// What the API server must trust: the current CA, plus the previous one until it
    /// expires.
    pub fn bundle_pem(&self, now: Timestamp) -> String {
        let mut bundle = self.cert_pem.clone();
        if let Some((pem, until)) = &self.previous
            && *until > now
        {
            bundle.push_str(pem);
        }
        bundle
    }

    /// A serving leaf for `sans` (DNS names or IP addresses), valid for `lifetime`.
    pub fn issue_leaf(
        &self,
        sans: &[String],
        now: Timestamp,
        lifetime: Duration,
    ) -> Result<ServingLeaf, WebhookError> {
        let ca_key = KeyPair::from_pem(&self.key_pem).map_err(certificate_error("CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, ca_key)
            .map_err(certificate_error("CA certificate"))?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(certificate_error("serving key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Portcullis");
        params
            .distinguished_name
            .push(DnType::CommonName, "portcullis-webhook");
        params.serial_number = Some(random_serial());
        params.subject_alt_names = sans
            .iter()
            .map(|san| match san.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => san
                    .clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(certificate_error("DNS SAN")),
            })
            .collect::<Result<_, _>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        // Never outlive the CA: a leaf past its issuer's expiry would fail verification.
        let not_after = plus(now, lifetime).min(self.not_after);
        set_validity(&mut params, minus(now, BACKDATE), not_after);
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(certificate_error("serving certificate"))?;
        let provider = portcullis_sidecar::identity::tls::provider();
        let signing_key = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.serialize_der(),
            )))
            .map_err(|e| WebhookError::Certificate(format!("loading the serving key: {e}")))?;
        let der = cert.der().clone();
        Ok(ServingLeaf {
            certified: Arc::new(CertifiedKey::new(vec![der.clone()], signing_key)),
            der,
            not_after,
            issuer_pem: self.cert_pem.clone(),
        })
    }
}

fn not_after_or_epoch(pem: &str) -> Timestamp {
    not_after(pem).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// A serving certificate and its key, ready for rustls.
#[derive(Clone)]
pub struct ServingLeaf {
    certified: Arc<CertifiedKey>,
    der: CertificateDer<'static>,
    not_after: Timestamp,
    issuer_pem: String,
}

impl std::fmt::Debug for ServingLeaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingLeaf")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl ServingLeaf {
    /// What rustls serves.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }

    /// The certificate (DER).
    pub fn der(&self) -> &CertificateDer<'static> {
        &self.der
    }

    /// When it expires.
    pub fn not_after(&self) -> Timestamp {
        self.not_after
    }

    /// Whether it should be replaced: less than `renew_before` left at `now`.
    pub fn needs_renewal(&self, now: Timestamp, renew_before: Duration) -> bool {
        now >= minus(self.not_after, renew_before)
    }

    /// Whether `ca` signed it.
    pub fn issued_by(&self, ca: &WebhookCa) -> bool {
        self.issuer_pem == ca.cert_pem
    }
}
