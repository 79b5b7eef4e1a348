//! The SIEM sinks the audit collector forwards a tenant's log to: the Tenant's
//! `spec.audit.sinks` (Splunk HEC and Datadog; `stdout` is the proxies' own), with
//! tokens read from Secrets in the collector's own namespace. A Tenant is
//! cluster-scoped, so its Secrets live where the platform team keeps Portcullis, the way
//! cert-manager's ClusterIssuer reads its cluster resource namespace; no tenant
//! namespace and no application pod ever holds a SIEM token. The chart lets the
//! collector read exactly the Secrets listed in `audit.collector.sinkSecrets`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use portcullis_audit::Secret as Token;
use portcullis_audit::sink::Deliver;
use portcullis_audit::sink::datadog::{Datadog, DatadogConfig};
use portcullis_audit::sink::splunk_hec::{SplunkHec, SplunkHecConfig};
use portcullis_collector::{SinkDirectory, SinkTarget};
use portcullis_crds::tenant::{DatadogSink, SecretKeyRef, SplunkHecSink};
use sha2::{Digest, Sha256};

use crate::audit_cluster::TenantSource;

/// How long one delivery to a SIEM may take.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// A Secret read this recently is not read again: every tenant naming the same token
/// Secret in one round of [`SINKS_EVERY`](crate::audit_server::SINKS_EVERY) costs one
/// GET, and each round still reads a rotated token.
const SECRET_FRESH: Duration = Duration::from_secs(5);

type SecretReads = HashMap<(String, String), (Instant, Result<Token, String>)>;

/// Reads Tenants and the Secrets they name.
#[derive(Clone)]
pub struct KubeSinks {
    client: kube::Client,
    tenants: TenantSource,
    namespace: String,
    host: String,
    roots: Option<rustls::RootCertStore>,
    secrets: Arc<Mutex<SecretReads>>,
}

impl std::fmt::Debug for KubeSinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSinks")
            .field("namespace", &self.namespace)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl KubeSinks {
    /// Tokens from Secrets in `namespace` (the collector's); records are sent as coming
    /// from `host` (the collector's pod). `https` sinks are checked against the
    /// system's CA certificates (`SSL_CERT_FILE` to use another bundle).
    pub fn new(
        client: kube::Client,
        tenants: TenantSource,
        namespace: String,
        host: String,
    ) -> Self {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::debug!(error = %e, "audit forwarding: a system CA certificate source failed");
        }
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        Self {
            client,
            tenants,
            namespace,
            host,
            roots: (added > 0).then_some(roots),
            secrets: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The token under `reference`, or what to fix; read again once [`SECRET_FRESH`]
    /// has passed.
    async fn token(&self, reference: &SecretKeyRef) -> Result<Token, String> {
        let key = (reference.name.clone(), reference.key.clone());
        {
            let reads = self.secrets.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((at, read)) = reads.get(&key)
                && at.elapsed() < SECRET_FRESH
            {
                return read.clone();
            }
        }
        let read = self.read_token(reference).await;
        self.secrets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, (Instant::now(), read.clone()));
        read
    }

    async fn read_token(&self, reference: &SecretKeyRef) -> Result<Token, String> {
        let (ns, name, key) = (&self.namespace, &reference.name, &reference.key);
        let secret = Api::<Secret>::namespaced(self.client.clone(), ns)
            .get_opt(name)
            .await
            .map_err(|e| match e {
                kube::Error::Api(status) if status.code == 403 => format!(
                    "the collector may not read Secret {ns}/{name}: add {name} to the chart's audit.collector.sinkSecrets"
                ),
                other => format!("reading Secret {ns}/{name}: {other}"),
            })?
            .ok_or_else(|| {
                format!("Secret {ns}/{name} not found: create it in {ns} with the token under key {key}")
            })?;
        let bytes = secret
            .data
            .as_ref()
            .and_then(|data| data.get(key))
            .ok_or_else(|| format!("Secret {ns}/{name} has no key {key}"))?;
        let token = std::str::from_utf8(&bytes.0)
            .map(str::trim)
            .map_err(|_| format!("Secret {ns}/{name} key {key} is not text"))?;
        if token.is_empty() {
            return Err(format!("Secret {ns}/{name} key {key} is empty"));
        }
        Ok(Token::new(token))
    }

    /// CA certificates for `url` when it is `https`.
    fn roots_for(&self, url: &str) -> Result<Option<rustls::RootCertStore>, String> {
        if !url.starts_with("https://") {
            return Ok(None);
        }
        self.roots.clone().map(Some).ok_or_else(|| {
            "the collector found no CA certificates to check an https sink with: mount a bundle and set SSL_CERT_FILE".to_owned()
        })
    }

    async fn splunk(&self, sink: &SplunkHecSink) -> SinkTarget {
        let id = sink_id(
            "splunk-hec",
            &[&sink.url, sink.index.as_deref().unwrap_or("")],
        );
        let token = self.token(&sink.token_secret_ref).await;
        let fingerprint = fingerprint(&id, token.as_ref().ok(), &[]);
        let deliver = token.and_then(|token| {
            let config = SplunkHecConfig {
                url: sink.url.clone(),
                token,
                host: self.host.clone(),
                index: sink.index.clone(),
                tls_roots: self.roots_for(&sink.url)?,
                timeout: DELIVERY_TIMEOUT,
            };
            SplunkHec::new(config)
                .map(|hec| Arc::new(hec) as Arc<dyn Deliver>)
                .map_err(|e| e.to_string())
        });
        SinkTarget {
            id,
            fingerprint,
            deliver,
        }
    }

    async fn datadog(&self, tenant: &str, sink: &DatadogSink) -> SinkTarget {
        let id = sink_id("datadog", &[&sink.url]);
        let mut tags = vec![format!("tenant:{tenant}")];
        tags.extend(sink.tags.iter().cloned());
        let tags = tags.join(",");
        let token = self.token(&sink.api_key_secret_ref).await;
        let fingerprint = fingerprint(&id, token.as_ref().ok(), &[&tags]);
        let deliver = token.and_then(|api_key| {
            let config = DatadogConfig {
                url: sink.url.clone(),
                api_key,
                service: "portcullis".into(),
                hostname: self.host.clone(),
                tags,
                tls_roots: self.roots_for(&sink.url)?,
                timeout: DELIVERY_TIMEOUT,
            };
            Datadog::new(config)
                .map(|dd| Arc::new(dd) as Arc<dyn Deliver>)
                .map_err(|e| e.to_string())
        });
        SinkTarget {
            id,
            fingerprint,
            deliver,
        }
    }
}

/// `kind-<digest of where it sends>`: a DNS label that names the sink's cursor.
fn sink_id(kind: &str, place: &[&str]) -> String {
    let mut digest = Sha256::new();
    for part in place {
        digest.update(part.as_bytes());
        digest.update([0]);
    }
    format!("{kind}-{}", &hex::encode(digest.finalize())[..16])
}

/// A digest of everything about a sink, its token included (never shown).
fn fingerprint(id: &str, token: Option<&Token>, settings: &[&str]) -> [u8; 32] {
    let mut digest = Sha256::new();
    digest.update(id.as_bytes());
    digest.update([0]);
    if let Some(token) = token {
        digest.update(token.expose().as_bytes());
    }
    for part in settings {
        digest.update([0]);
        digest.update(part.as_bytes());
    }
    digest.finalize().into()
}

impl SinkDirectory for KubeSinks {
    async fn sinks(&self, tenant: &str) -> Result<Vec<SinkTarget>, String> {
        let Some(found) = self
            .tenants
            .get(tenant)
            .await
            .map_err(|e| format!("reading Tenant {tenant}: {e}"))?
        else {
            return Ok(Vec::new());
        };
        let mut targets: Vec<SinkTarget> = Vec::new();
        for sink in &found.spec.audit.sinks {
            let target = match (&sink.splunk_hec, &sink.datadog) {
                (Some(hec), _) => self.splunk(hec).await,
                (None, Some(dd)) => self.datadog(tenant, dd).await,
                // stdout is the proxies' own standard output.
                (None, None) => continue,
            };
            // The same destination twice would send every record twice.
            if targets.iter().all(|t| t.id != target.id) {
                targets.push(target);
            }
        }
        Ok(targets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sink_is_named_by_where_it_sends_and_its_token_only_changes_the_fingerprint() {
        let id = sink_id("splunk-hec", &["https://splunk.example:8088", "audit"]);
        assert!(id.starts_with("splunk-hec-") && id.len() == "splunk-hec-".len() + 16);
        assert!(portcullis_api::names::is_dns_subdomain(&id));
        assert_ne!(
            id,
            sink_id("splunk-hec", &["https://splunk.example:8088", "main"])
        );
        let (a, b) = (Token::new("tok-a"), Token::new("tok-b"));
        assert_ne!(
            fingerprint(&id, Some(&a), &[]),
            fingerprint(&id, Some(&b), &[])
        );
        assert_eq!(
            fingerprint(&id, Some(&a), &[]),
            fingerprint(&id, Some(&a), &[])
        );
    }
}
