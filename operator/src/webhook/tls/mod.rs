//! The webhook's serving certificate: a small self-signed CA kept in the Secret
//! `portcullis-webhook-ca` in the operator's namespace ([`ca`]), a serving leaf each
//! replica issues itself, hot-swapped behind an [`ArcSwap`] that rustls reads on every
//! handshake (so rotation drops no admission), and the CA bundle patched into the
//! webhook configurations ([`rotation`]).
//!
//! TLS 1.3 only: the API server (Go ≥ 1.13) is the only client.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::WebhookError;

pub mod ca;
pub mod rotation;

pub use ca::{ServingLeaf, WebhookCa};
pub use rotation::WebhookCertificates;

/// Secret holding the webhook CA.
pub const CA_SECRET: &str = "portcullis-webhook-ca";

/// Where the serving certificate comes from and how long things live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookTlsSettings {
    /// The operator's namespace (holds the CA Secret).
    pub namespace: String,
    /// The Service in front of the webhook: SANs `<service>.<ns>.svc[.cluster.local]`.
    pub service: String,
    /// More SANs (DNS names or IP addresses such as `127.0.0.1` for tests).
    pub extra_sans: Vec<String>,
    /// Name of the CA Secret.
    pub ca_secret: String,
    /// CA lifetime (10 years).
    pub ca_lifetime: Duration,
    /// Replace the CA when less than this is left (1 year).
    pub ca_renew_before: Duration,
    /// Serving leaf lifetime (30 days).
    pub leaf_lifetime: Duration,
    /// Replace the leaf when less than this is left (10 days).
    pub leaf_renew_before: Duration,
    /// How often to re-check the CA Secret and re-patch the bundles (1 hour).
    pub check_interval: Duration,
    /// The MutatingWebhookConfiguration to patch.
    pub mutating_configuration: String,
    /// The ValidatingWebhookConfiguration to patch.
    pub validating_configuration: String,
}

impl WebhookTlsSettings {
    /// Defaults for the Service `service` in `namespace`.
    pub fn new(namespace: impl Into<String>, service: impl Into<String>) -> Self {
        const DAY: u64 = 86_400;
        Self {
            namespace: namespace.into(),
            service: service.into(),
            extra_sans: Vec::new(),
            ca_secret: CA_SECRET.into(),
            ca_lifetime: Duration::from_secs(3650 * DAY),
            ca_renew_before: Duration::from_secs(365 * DAY),
            leaf_lifetime: Duration::from_secs(30 * DAY),
            leaf_renew_before: Duration::from_secs(10 * DAY),
            check_interval: Duration::from_secs(3600),
            mutating_configuration: super::config::MUTATING_CONFIGURATION.into(),
            validating_configuration: super::config::VALIDATING_CONFIGURATION.into(),
        }
    }

    /// Every SAN of the serving leaf.
    pub fn sans(&self) -> Vec<String> {
        let mut sans = vec![
            format!("{}.{}.svc", self.service, self.namespace),
            format!("{}.{}.svc.cluster.local", self.service, self.namespace),
        ];
        for extra in &self.extra_sans {
            if !sans.contains(extra) {
                sans.push(extra.clone());
            }
        }
        sans
    }
}

/// The leaf being served; swapped atomically, read lock-free on every handshake.
#[derive(Debug)]
pub struct ServingCertificate {
    current: ArcSwap<ServingLeaf>,
}

impl ServingCertificate {
    /// Serves `leaf`.
    pub fn new(leaf: ServingLeaf) -> Self {
        Self {
            current: ArcSwap::from_pointee(leaf),
        }
    }

    /// The leaf served now.
    pub fn current(&self) -> Arc<ServingLeaf> {
        self.current.load_full()
    }

    /// Serves `leaf` from the next handshake on; connections already open keep theirs.
    pub fn swap(&self, leaf: ServingLeaf) {
        self.current.store(Arc::new(leaf));
    }
}

impl ResolvesServerCert for ServingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().certified_key())
    }
}

/// A TLS 1.3 server configuration (ALPN h2, http/1.1) that serves whatever leaf
/// `certificate` holds at handshake time.
pub fn server_config(
    certificate: Arc<ServingCertificate>,
) -> Result<Arc<ServerConfig>, WebhookError> {
    let provider = portcullis_tls::provider();
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| WebhookError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(certificate);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn sans_cover_the_service_and_extras_once() {
        let mut settings = WebhookTlsSettings::new("portcullis-system", "portcullis-webhook");
        settings.extra_sans = vec![
            "127.0.0.1".into(),
            "portcullis-webhook.portcullis-system.svc".into(),
        ];
        assert_eq!(
            settings.sans(),
            [
                "portcullis-webhook.portcullis-system.svc",
                "portcullis-webhook.portcullis-system.svc.cluster.local",
                "127.0.0.1"
            ]
        );
    }

    #[test]
    fn ca_renewal_keeps_the_previous_ca_in_the_bundle_until_it_expires() {
        let day = Duration::from_secs(86_400);
        let t0 = jiff::Timestamp::from_second(1_800_000_000).unwrap();
        let ca = WebhookCa::generate(t0, 10 * day).unwrap();
        assert!(!ca.needs_renewal(t0, 2 * day));
        let t8 = t0 + jiff::SignedDuration::from_hours(8 * 24 + 1);
        assert!(ca.needs_renewal(t8, 2 * day));
        let next = ca.renewed(t8, 10 * day).unwrap();
        assert_eq!(next.bundle_pem(t8).matches("BEGIN CERTIFICATE").count(), 2);
        let t11 = t0 + jiff::SignedDuration::from_hours(11 * 24);
        assert_eq!(next.bundle_pem(t11).matches("BEGIN CERTIFICATE").count(), 1);

        // Round trip through the Secret's data.
        let kek = crate::envelope::Kek::generate();
        let data = next.to_secret_data(CA_SECRET, &kek).unwrap();
        let (back, at_rest) = WebhookCa::from_secret_data(&data, CA_SECRET, &kek).unwrap();
        assert_eq!(at_rest, ca::KeyAtRest::Wrapped);
        assert_eq!(back.bundle_pem(t8), next.bundle_pem(t8));
        assert_eq!(back.not_after().as_second(), next.not_after().as_second());

        let leaf = next
            .issue_leaf(&["127.0.0.1".into(), "a.b.svc".into()], t8, 30 * day)
            .unwrap();
        assert!(leaf.issued_by(&next));
        assert!(!leaf.issued_by(&ca));
        assert!(
            leaf.not_after() <= next.not_after(),
            "a leaf never outlives its CA"
        );
    }

    #[test]
    fn a_corrupt_secret_is_reported() {
        let kek = crate::envelope::Kek::generate();
        let mut data = WebhookCa::generate(jiff::Timestamp::now(), Duration::from_secs(3600))
            .unwrap()
            .to_secret_data(CA_SECRET, &kek)
            .unwrap();
        data.insert(
            ca::CA_KEY_KEY.into(),
            k8s_openapi::ByteString(b"not a key".to_vec()),
        );
        assert!(matches!(
            WebhookCa::from_secret_data(&data, CA_SECRET, &kek),
            Err(WebhookError::CorruptCaSecret(_))
        ));
    }

    #[test]
    fn the_ca_key_is_stored_wrapped_and_bound_to_its_secret_and_kek() {
        let kek = crate::envelope::Kek::generate();
        let ca = WebhookCa::generate(jiff::Timestamp::now(), Duration::from_secs(3600)).unwrap();
        let data = ca.to_secret_data(CA_SECRET, &kek).unwrap();
        for (key, value) in &data {
            assert!(
                !String::from_utf8_lossy(&value.0).contains("PRIVATE KEY"),
                "{key} holds a PEM private key"
            );
        }
        assert!(!data.contains_key(ca::LEGACY_CA_KEY_KEY));
        // Another KEK, or the data moved to another Secret: refused, not misread.
        let other = crate::envelope::Kek::generate();
        for (secret, kek) in [(CA_SECRET, &other), ("elsewhere", &kek)] {
            let refused = WebhookCa::from_secret_data(&data, secret, kek).unwrap_err();
            assert!(
                refused.to_string().contains("cannot be unwrapped"),
                "{refused}"
            );
        }
    }

    #[test]
    fn a_legacy_pem_key_is_read_and_reported_for_rewrapping() {
        let kek = crate::envelope::Kek::generate();
        let certified = rcgen::generate_simple_self_signed(vec!["legacy".into()]).unwrap();
        let legacy = std::collections::BTreeMap::from([
            (
                ca::CA_CERT_KEY.to_owned(),
                k8s_openapi::ByteString(certified.cert.pem().into_bytes()),
            ),
            (
                ca::LEGACY_CA_KEY_KEY.to_owned(),
                k8s_openapi::ByteString(certified.signing_key.serialize_pem().into_bytes()),
            ),
        ]);
        let (ca, at_rest) = WebhookCa::from_secret_data(&legacy, CA_SECRET, &kek).unwrap();
        assert_eq!(at_rest, ca::KeyAtRest::LegacyPem);
        let rewrapped = ca.to_secret_data(CA_SECRET, &kek).unwrap();
        let (back, at_rest) = WebhookCa::from_secret_data(&rewrapped, CA_SECRET, &kek).unwrap();
        assert_eq!(at_rest, ca::KeyAtRest::Wrapped);
        assert_eq!(back.cert_pem(), certified.cert.pem());
    }
}
