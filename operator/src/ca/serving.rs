//! The CA's own TLS serving certificates — the identity service's and the policy
//! server's: signed by the issuing intermediate for the operator's Service names,
//! re-issued at half-life and after every CA rotation, and swapped without a restart
//! (rustls asks the resolver on every handshake).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use jiff::Timestamp;
use portcullis_api::clock;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use super::CaError;
use super::authority::CertificateAuthority;

/// The names a serving certificate of the operator carries: `<service>.<namespace>.svc`,
/// `<service>.<namespace>.svc.<cluster domain>`, then `extra` (DNS names or IP addresses,
/// e.g. the bridge IP the local-cluster tests reach the operator on), without repeats.
pub fn service_names(
    service: &str,
    namespace: &str,
    cluster_domain: &str,
    extra: &[String],
) -> Vec<String> {
    let mut names = vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.{cluster_domain}"),
    ];
    for name in extra {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    names
}

/// A serving certificate from the CA, hot-swapped behind an [`ArcSwap`].
pub struct CaServingCertificate {
    current: ArcSwap<(Arc<CertifiedKey>, Timestamp)>,
    names: Vec<String>,
}

impl std::fmt::Debug for CaServingCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaServingCertificate")
            .field("names", &self.names)
            .field("refresh_at", &self.refresh_at())
            .finish_non_exhaustive()
    }
}

impl CaServingCertificate {
    /// Issues the first certificate for `names`.
    pub fn new(ca: &CertificateAuthority, names: &[String]) -> Result<Self, CaError> {
        let first = Self::issue(ca, names)?;
        Ok(Self {
            current: ArcSwap::from_pointee(first),
            names: names.to_vec(),
        })
    }

    /// A certificate and the time to replace it (half its lifetime).
    fn issue(
        ca: &CertificateAuthority,
        names: &[String],
    ) -> Result<(Arc<CertifiedKey>, Timestamp), CaError> {
        let cert = ca.issue_server_certificate(names)?;
        let key = portcullis_tls::provider()
            .key_provider
            .load_private_key(cert.key.into())
            .map_err(|e| CaError::Tls(e.to_string()))?;
        let half = clock::until(cert.not_before, cert.not_after) / 2;
        Ok((
            Arc::new(CertifiedKey::new(cert.chain, key)),
            clock::add(cert.not_before, half),
        ))
    }

    /// The names in the certificate.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Issues and serves a new certificate now.
    pub fn refresh(&self, ca: &CertificateAuthority) -> Result<(), CaError> {
        self.current.store(Arc::new(Self::issue(ca, &self.names)?));
        Ok(())
    }

    /// When the current certificate is due for replacement.
    pub fn refresh_at(&self) -> Timestamp {
        self.current.load().1
    }

    /// The chain served now (leaf first).
    pub fn chain(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        self.current.load().0.cert.clone()
    }

    /// Re-issues at half-life and after every CA rotation until `shutdown`;
    /// `after_change` runs after each rotation of the CA (before the re-issue), e.g. to
    /// follow the trust bundle or update metrics.
    pub async fn keep_fresh(
        self: Arc<Self>,
        ca: Arc<CertificateAuthority>,
        after_change: impl Fn() + Send + 'static,
        shutdown: CancellationToken,
    ) {
        let mut changes = ca.subscribe();
        loop {
            let wait =
                clock::until(ca.clock().now(), self.refresh_at()).max(Duration::from_millis(10));
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    after_change();
                }
                () = tokio::time::sleep(wait) => {}
            }
            if let Err(e) = self.refresh(&ca) {
                tracing::error!(error = %e, names = ?self.names, "re-issuing a serving certificate failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

impl ResolvesServerCert for CaServingCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cover_the_service_then_extras_once() {
        let names = service_names(
            "portcullis-operator",
            "portcullis-system",
            "cluster.local",
            &[
                "10.1.0.1".into(),
                "portcullis-operator.portcullis-system.svc".into(),
            ],
        );
        assert_eq!(
            names,
            [
                "portcullis-operator.portcullis-system.svc",
                "portcullis-operator.portcullis-system.svc.cluster.local",
                "10.1.0.1"
            ]
        );
        // A cluster with its own domain gets its own fully qualified name.
        assert_eq!(
            service_names("portcullis-audit", "ops", "corp.example", &[])[1],
            "portcullis-audit.ops.svc.corp.example"
        );
    }
}
