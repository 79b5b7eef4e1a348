//! The webhook's own small CA and the serving leaves it signs (rcgen, ECDSA P-256).
//! Pure: no I/O; the time comes from the caller.
//!
//! At rest (the Secret `portcullis-webhook-ca`) the CA's private key is wrapped by the
//! KEK like the workload CA's (see `ca::persist`): PKCS#8 DER under AES-256-GCM, bound
//! (AAD) to the Secret, the data key and the certificate's fingerprint. Secrets written
//! before that hold it as PEM under `ca.key`; they are read once ([`KeyAtRest::LegacyPem`])
//! and written back wrapped.

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

use crate::ca::certs::CaCertificate;
use crate::ca::persist::key_aad;
use crate::envelope::Kek;
use crate::webhook::WebhookError;

/// How the CA key was stored in the Secret read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyAtRest {
    /// Wrapped by the KEK: nothing to do.
    Wrapped,
    /// Plain PEM (written before wrapping): to be written back wrapped.
    LegacyPem,
}

/// Secret data key of the current CA certificate (PEM).
pub const CA_CERT_KEY: &str = "ca.crt";
/// Secret data key of the current CA private key (PKCS#8 DER wrapped by the KEK).
pub const CA_KEY_KEY: &str = "ca.key.wrapped";
/// Where Secrets written before KEK wrapping hold the key, as PKCS#8 PEM.
pub const LEGACY_CA_KEY_KEY: &str = "ca.key";
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

    /// Reads the CA from the data of the Secret `secret`, unwrapping its key with `kek`
    /// (or reading a legacy PEM key, reported as [`KeyAtRest::LegacyPem`]).
    pub fn from_secret_data(
        data: &BTreeMap<String, ByteString>,
        secret: &str,
        kek: &Kek,
    ) -> Result<(Self, KeyAtRest), WebhookError> {
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
        let (key_pair, at_rest) = match data.get(CA_KEY_KEY) {
            Some(wrapped) => {
                let pkcs8 = kek
                    .unwrap(&wrapped.0, &aad(secret, &cert_pem)?)
                    .map_err(|e| {
                        WebhookError::CorruptCaSecret(format!(
                            "{CA_KEY_KEY} cannot be unwrapped with the loaded KEK: {e}"
                        ))
                    })?;
                let key = KeyPair::from_pkcs8_der_and_sign_algo(
                    &PrivatePkcs8KeyDer::from(pkcs8),
                    &PKCS_ECDSA_P256_SHA256,
                )
                .map_err(|e| WebhookError::CorruptCaSecret(format!("{CA_KEY_KEY}: {e}")))?;
                (key, KeyAtRest::Wrapped)
            }
            None => {
                let pem = text(LEGACY_CA_KEY_KEY)?
                    .ok_or_else(|| WebhookError::CorruptCaSecret(format!("no {CA_KEY_KEY}")))?;
                let key = KeyPair::from_pem(&pem).map_err(|e| {
                    WebhookError::CorruptCaSecret(format!("{LEGACY_CA_KEY_KEY}: {e}"))
                })?;
                (key, KeyAtRest::LegacyPem)
            }
        };
        let not_after = not_after(&cert_pem)?;
        let previous = match text(PREVIOUS_CA_CERT_KEY)? {
            Some(pem) if !pem.is_empty() => Some((pem.clone(), not_after_or_epoch(&pem))),
            _ => None,
        };
        let ca = Self {
            cert_pem,
            key_pem: key_pair.serialize_pem(),
            not_after,
            previous,
        };
        Ok((ca, at_rest))
    }

    /// The data of the Secret `secret`: certificates as PEM, the key wrapped by `kek`.
    pub fn to_secret_data(
        &self,
        secret: &str,
        kek: &Kek,
    ) -> Result<BTreeMap<String, ByteString>, WebhookError> {
        let key = KeyPair::from_pem(&self.key_pem).map_err(certificate_error("CA key"))?;
        let wrapped = kek
            .wrap(&key.serialize_der(), &aad(secret, &self.cert_pem)?)
            .map_err(|e| WebhookError::Certificate(format!("wrapping the CA key: {e}")))?;
        let mut data = BTreeMap::from([
            (
                CA_CERT_KEY.to_owned(),
                ByteString(self.cert_pem.clone().into_bytes()),
            ),
            (CA_KEY_KEY.to_owned(), ByteString(wrapped)),
        ]);
        if let Some((pem, _)) = &self.previous {
            data.insert(
                PREVIOUS_CA_CERT_KEY.to_owned(),
                ByteString(pem.clone().into_bytes()),
            );
        }
        Ok(data)
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
        let provider = portcullis_tls::provider();
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

/// The wrapped key's AAD: the workload CA's binding (Secret, data key, certificate
/// fingerprint), so a key cannot be moved to another Secret, entry or certificate.
fn aad(secret: &str, cert_pem: &str) -> Result<Vec<u8>, WebhookError> {
    let cert = CaCertificate::from_pem(cert_pem)
        .map_err(|e| WebhookError::CorruptCaSecret(format!("{CA_CERT_KEY}: {e}")))?;
    Ok(key_aad(secret, CA_KEY_KEY, &cert))
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
