//! The audit service's serving certificate, kept in a `kubernetes.io/tls` Secret that
//! `portcullis-operator audit-server` mounts. Issued by the workload CA for the audit
//! Service's names, so proxies verify the collector with the trust bundle they already
//! hold; `ca.crt` is that trust bundle, so the collector verifies the workloads that
//! ship to it. Re-issued at half-life, after every CA rotation, and whenever the Secret
//! does not hold what it should. Run by the leader.
//!
//! The certificate is also the collector's client certificate towards the policy
//! server (serverAuth + clientAuth): with it the collector reads every tenant's audit
//! keys, as [`collector_name`] and no SPIFFE id (see `policy::server`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use portcullis_api::clock;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_util::sync::CancellationToken;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::authority::CertificateAuthority;
use super::bundle::FIELD_MANAGER;
use super::certs::{pem_block, pem_encode};
use super::serving::service_names;

/// How long to wait before trying again after the API server refused a write.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// How often the Secret is read back, so a deleted or edited one is restored.
const RECHECK: Duration = Duration::from_secs(60);

/// Keeps the audit service's TLS Secret current.
#[derive(Clone)]
pub struct AuditTlsSecret {
    client: kube::Client,
    ca: Arc<CertificateAuthority>,
    namespace: String,
    secret: String,
    names: Vec<String>,
}

impl std::fmt::Debug for AuditTlsSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditTlsSecret")
            .field("namespace", &self.namespace)
            .field("secret", &self.secret)
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

/// The Secret the audit service `service` mounts: `<service>-tls`.
pub fn secret_name(service: &str) -> String {
    format!("{service}-tls")
}

/// The names the audit service's certificate carries: those of the Service `service`
/// in `namespace` of a cluster whose DNS domain is `cluster_domain`.
pub fn audit_service_names(service: &str, namespace: &str, cluster_domain: &str) -> Vec<String> {
    service_names(service, namespace, cluster_domain, &[])
}

/// The DNS name by which the policy server knows the audit collector of Service
/// `service` in `namespace`: `<service>.<namespace>.svc`, the first of
/// [`audit_service_names`].
pub fn collector_name(service: &str, namespace: &str) -> String {
    format!("{service}.{namespace}.svc")
}

impl AuditTlsSecret {
    /// The Secret for the audit Service `service` in `namespace` of a cluster whose DNS
    /// domain is `cluster_domain`.
    pub fn new(
        client: kube::Client,
        ca: Arc<CertificateAuthority>,
        namespace: &str,
        service: &str,
        cluster_domain: &str,
    ) -> Self {
        Self {
            client,
            ca,
            namespace: namespace.to_owned(),
            secret: secret_name(service),
            names: audit_service_names(service, namespace, cluster_domain),
        }
    }

    /// Keeps the Secret current until `term`.
    pub async fn run(self, term: CancellationToken) {
        let mut changes = self.ca.subscribe();
        loop {
            let wait = match self.ensure().await {
                Ok(refresh_at) => clock::until(self.ca.clock().now(), refresh_at),
                Err(e) => {
                    tracing::warn!(secret = %self.secret, error = %e, "audit service certificate not written; retrying");
                    RETRY_AFTER
                }
            };
            tokio::select! {
                () = term.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(wait.clamp(Duration::from_secs(1), RECHECK)) => {}
            }
        }
    }

    /// Writes a new certificate unless the Secret holds a current one; returns when it
    /// is due for replacement.
    pub async fn ensure(&self) -> Result<Timestamp, kube::Error> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let bundle = self.ca.trust_bundle_pem();
        let now = self.ca.clock().now();
        if let Some(existing) = api.get_opt(&self.secret).await?
            && let Some(refresh_at) = still_current(&existing, &bundle, now)
        {
            return Ok(refresh_at);
        }
        let issued = match self.ca.issue_audit_service_certificate(&self.names) {
            Ok(issued) => issued,
            Err(e) => {
                // The CA cannot sign (it is being rotated or not loaded): try again soon.
                tracing::warn!(error = %e, "audit service certificate not issued");
                return Ok(clock::add(now, RETRY_AFTER));
            }
        };
        let chain: String = issued.chain.iter().map(|c| pem_encode(c)).collect();
        let key = pem_block("PRIVATE KEY", issued.key.secret_pkcs8_der());
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.secret.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".into(),
                    FIELD_MANAGER.into(),
                )])),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(BTreeMap::from([
                ("tls.crt".into(), ByteString(chain.into_bytes())),
                ("tls.key".into(), ByteString(key.into_bytes())),
                ("ca.crt".into(), ByteString(bundle.into_bytes())),
            ])),
            ..Secret::default()
        };
        api.patch(
            &self.secret,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await?;
        tracing::info!(secret = %self.secret, not_after = %issued.not_after, "audit service certificate written");
        let half = clock::until(issued.not_before, issued.not_after) / 2;
        Ok(clock::add(issued.not_before, half))
    }
}

/// When the certificate in `secret` is due for replacement, if it may stay until then:
/// its `ca.crt` is the current trust bundle, it may authenticate a client (certificates
/// written before the collector needed that are replaced at once) and it is not past
/// half its life.
pub(super) fn still_current(secret: &Secret, bundle: &str, now: Timestamp) -> Option<Timestamp> {
    let data = secret.data.as_ref()?;
    if data.get("ca.crt")?.0 != bundle.as_bytes() || !data.contains_key("tls.key") {
        return None;
    }
    let leaf = CertificateDer::pem_slice_iter(&data.get("tls.crt")?.0)
        .next()?
        .ok()?;
    if !has_client_auth(&leaf) {
        return None;
    }
    let facts = portcullis_tls::leaf_facts(&leaf).ok()?;
    let half = clock::until(facts.not_before, facts.not_after) / 2;
    let refresh_at = clock::add(facts.not_before, half);
    (refresh_at > now).then_some(refresh_at)
}

/// Whether `leaf` carries the clientAuth extended key usage.
fn has_client_auth(leaf: &CertificateDer<'_>) -> bool {
    X509Certificate::from_der(leaf).is_ok_and(
        |(_, cert)| matches!(cert.extended_key_usage(), Ok(Some(eku)) if eku.value.client_auth),
    )
}
