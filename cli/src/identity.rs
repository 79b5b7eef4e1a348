//! `kubectl portcullis identity inspect POD`: injection, SPIFFE ID and, when asked with
//! `--admin-url`, the certificate the proxy holds.

use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{Api, ResourceExt};
use portcullis_api::spiffe::{SpiffeIdError, TenantId, TrustDomain, WorkloadId};
use portcullis_crds::tenant::TENANT_LABEL;
use serde::Serialize;

use crate::Outcome;
use crate::cert::{CertSummary, Expiry, parse_pem_bundle};
use crate::cli::{IdentityInspectArgs, OutputFormat};
use crate::cluster::Cluster;
use crate::error::CliError;
use crate::output::{render_fields, short_duration, timestamp, write_structured};

/// The injector's contract: its annotation, the proxy container, and the admin path of
/// the certificate chain.
pub use portcullis_api::injection::{
    ADMIN_IDENTITY_PATH as IDENTITY_PATH, INJECTED_ANNOTATION, PROXY_CONTAINER,
};
/// Leaves this close to expiry are flagged: they should have been renewed (72 h period,
/// 24 h grace).
pub const LEAF_EXPIRY_WARNING: SignedDuration = SignedDuration::from_hours(12);

const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// How the proxy runs in the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ProxyMode {
    /// An init container with `restartPolicy: Always` (Kubernetes 1.29+).
    NativeSidecar,
    /// A regular container.
    Container,
}

/// The certificate as fetched from the proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateView {
    /// The leaf.
    #[serde(flatten)]
    pub leaf: CertSummary,
    /// `23h left`, `expired 2h ago`.
    pub time_left: String,
    /// Certificates in the served chain.
    pub chain_length: usize,
    /// Whether the leaf's URI SANs include the pod's SPIFFE ID.
    pub matches_spiffe_id: bool,
}

/// What `identity inspect` tells.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityReport {
    /// Pod name.
    pub pod: String,
    /// Namespace.
    pub namespace: String,
    /// ServiceAccount.
    pub service_account: String,
    /// Whether Portcullis injected the pod.
    pub injected: bool,
    /// The injector version from the annotation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub injector_version: Option<String>,
    /// How the proxy runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_mode: Option<ProxyMode>,
    /// Whether the proxy container reports ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_ready: Option<bool>,
    /// `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
    pub spiffe_id: String,
    /// `spiffe://<trust-domain>/tenant/<tenant>` when the namespace belongs to a tenant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// Pod IP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    /// The certificate, when fetched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateView>,
    /// Problems found.
    pub findings: Vec<String>,
}

/// `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`, built by the type the proxy and the
/// operator use, so the CLI cannot print an ID they would not issue.
pub fn spiffe_id(
    trust_domain: &str,
    namespace: &str,
    service_account: &str,
) -> Result<WorkloadId, SpiffeIdError> {
    WorkloadId::new(TrustDomain::new(trust_domain)?, namespace, service_account)
}

/// `spiffe://<trust-domain>/tenant/<tenant>`.
pub fn tenant_id(trust_domain: &str, tenant: &str) -> Result<TenantId, SpiffeIdError> {
    TenantId::new(TrustDomain::new(trust_domain)?, tenant)
}

/// The report from the pod alone (and its namespace's tenant label).
pub fn inspect_pod(pod: &Pod, trust_domain: &str, tenant: Option<&str>) -> IdentityReport {
    let namespace = pod.namespace().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let service_account = spec
        .service_account_name
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_owned());
    let native = spec
        .init_containers
        .iter()
        .flatten()
        .any(|c| c.name == PROXY_CONTAINER);
    let regular = spec.containers.iter().any(|c| c.name == PROXY_CONTAINER);
    let proxy_mode = match (native, regular) {
        (true, _) => Some(ProxyMode::NativeSidecar),
        (false, true) => Some(ProxyMode::Container),
        (false, false) => None,
    };
    let injector_version = pod.annotations().get(INJECTED_ANNOTATION).cloned();
    let status = pod.status.clone().unwrap_or_default();
    let proxy_ready = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .find(|s| s.name == PROXY_CONTAINER)
        .map(|s| s.ready);
    let mut findings = Vec::new();
    match (&injector_version, proxy_mode) {
        (Some(_), None) => findings.push(format!(
            "annotated {INJECTED_ANNOTATION} but has no {PROXY_CONTAINER} container: the pod spec was changed after injection"
        )),
        (None, Some(_)) => findings.push(format!(
            "has a {PROXY_CONTAINER} container that Portcullis did not inject"
        )),
        _ => {}
    }
    if proxy_ready == Some(false) {
        findings.push(format!(
            "the proxy is not ready: kubectl logs -n {namespace} {} -c {PROXY_CONTAINER}",
            pod.name_any()
        ));
    }
    // The API server only admits valid names and `inspect` checks the trust domain, so
    // a failure here means a caller passed names no workload can have: say so.
    let spiffe_id = match spiffe_id(trust_domain, &namespace, &service_account) {
        Ok(id) => id.to_string(),
        Err(e) => {
            findings.push(format!("no SPIFFE ID: {e}"));
            String::new()
        }
    };
    let tenant_id = tenant.and_then(|t| match tenant_id(trust_domain, t) {
        Ok(id) => Some(id.to_string()),
        Err(e) => {
            findings.push(format!("no tenant ID: {e}"));
            None
        }
    });
    IdentityReport {
        pod: pod.name_any(),
        spiffe_id,
        tenant_id,
        namespace,
        service_account,
        injected: injector_version.is_some() && proxy_mode.is_some(),
        injector_version,
        proxy_mode,
        proxy_ready,
        pod_ip: status.pod_ip.filter(|ip| !ip.is_empty()),
        certificate: None,
        findings,
    }
}

impl IdentityReport {
    /// Adds the certificate chain served by the proxy, judged at `now`.
    pub fn attach_certificate(&mut self, mut chain: Vec<CertSummary>, now: Timestamp) {
        if chain.is_empty() {
            return;
        }
        let chain_length = chain.len();
        let leaf = chain.swap_remove(0);
        let expiry = leaf.expiry(now, LEAF_EXPIRY_WARNING);
        let time_left = match expiry {
            Expiry::NotYetValid { starts_in } => {
                format!("not valid for another {}", short_duration(starts_in))
            }
            Expiry::Valid { left } | Expiry::Expiring { left } => {
                format!("{} left", short_duration(left))
            }
            Expiry::Expired { ago } => format!("expired {} ago", short_duration(ago)),
        };
        match expiry {
            Expiry::Expired { .. } => self.findings.push(
                "the certificate has expired: the proxy cannot renew it; check the operator (kubectl portcullis check) and the proxy logs".to_owned(),
            ),
            Expiry::Expiring { .. } => self.findings.push(
                "the certificate is about to expire: renewal is overdue; check the proxy logs".to_owned(),
            ),
            Expiry::NotYetValid { .. } => self
                .findings
                .push("the certificate is not valid yet: check the clocks of node and operator".to_owned()),
            Expiry::Valid { .. } => {}
        }
        let matches_spiffe_id = leaf.uri_sans.contains(&self.spiffe_id);
        if !matches_spiffe_id {
            self.findings.push(format!(
                "the certificate does not name {} (it names {}): pass the operator's --trust-domain with --trust-domain",
                self.spiffe_id,
                if leaf.uri_sans.is_empty() {
                    "no URI".to_owned()
                } else {
                    leaf.uri_sans.join(", ")
                }
            ));
        }
        self.certificate = Some(CertificateView {
            leaf,
            time_left,
            chain_length,
            matches_spiffe_id,
        });
    }

    /// The `kubectl describe`-style block.
    pub fn render(&self) -> String {
        let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
        let injected = if self.injected {
            format!(
                "yes ({}, injector {})",
                match self.proxy_mode {
                    Some(ProxyMode::NativeSidecar) => "native sidecar",
                    _ => "container",
                },
                self.injector_version.as_deref().unwrap_or("?")
            )
        } else {
            "no".to_owned()
        };
        let mut fields = vec![
            ("Pod", format!("{}/{}", self.namespace, self.pod)),
            ("Service account", self.service_account.clone()),
            ("Injected", injected),
            (
                "Proxy ready",
                or_dash(
                    self.proxy_ready
                        .map(|r| if r { "yes" } else { "no" }.to_owned()),
                ),
            ),
            ("SPIFFE ID", self.spiffe_id.clone()),
            ("Tenant ID", or_dash(self.tenant_id.clone())),
            ("Pod IP", or_dash(self.pod_ip.clone())),
        ];
        match &self.certificate {
            Some(cert) => {
                fields.push(("Subject", cert.leaf.subject.clone()));
                fields.push(("URI SANs", cert.leaf.uri_sans.join(", ")));
                fields.push(("Issuer", cert.leaf.issuer.clone()));
                fields.push(("Not before", timestamp(cert.leaf.not_before)));
                fields.push(("Not after", timestamp(cert.leaf.not_after)));
                fields.push(("Time left", cert.time_left.clone()));
                fields.push(("Chain", format!("{} certificate(s)", cert.chain_length)));
            }
            None if self.injected => fields.push((
                "Certificate",
                format!(
                    "not fetched; to read it: kubectl port-forward -n {} pod/{} 4191, then add --admin-url http://127.0.0.1:4191",
                    self.namespace, self.pod
                ),
            )),
            None => fields.push(("Certificate", "none (no proxy)".to_owned())),
        }
        let mut text = render_fields(&fields);
        for finding in &self.findings {
            text.push_str(&format!("! {finding}\n"));
        }
        text
    }
}

/// `GET <admin-url>/identity`: the PEM chain the proxy serves with.
pub async fn fetch_identity_pem(admin_url: &str) -> Result<Vec<u8>, CliError> {
    let base = admin_url.trim_end_matches('/');
    let url = if base.ends_with(IDENTITY_PATH) {
        base.to_owned()
    } else {
        format!("{base}{IDENTITY_PATH}")
    };
    let uri: http::Uri = url.parse().map_err(|e| {
        CliError::AdminEndpoint(format!(
            "--admin-url {admin_url:?} is not a URL ({e}); write it like http://127.0.0.1:4191"
        ))
    })?;
    if uri.scheme_str() != Some("http") {
        return Err(CliError::AdminEndpoint(format!(
            "--admin-url {admin_url:?}: the proxy admin port speaks plain http; write it like http://127.0.0.1:4191"
        )));
    }
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let unreachable = |e: String| {
        CliError::AdminEndpoint(format!(
            "cannot read {url}: {e}; is the port forwarded (kubectl port-forward pod/POD 4191)?"
        ))
    };
    let response = tokio::time::timeout(FETCH_TIMEOUT, client.get(uri))
        .await
        .map_err(|_| unreachable(format!("no answer within {}s", FETCH_TIMEOUT.as_secs())))?
        .map_err(|e| unreachable(e.to_string()))?;
    let status = response.status();
    let body = tokio::time::timeout(FETCH_TIMEOUT, response.into_body().collect())
        .await
        .map_err(|_| unreachable("the body did not arrive in time".to_owned()))?
        .map_err(|e| unreachable(e.to_string()))?
        .to_bytes();
    if !status.is_success() {
        let snippet: String = String::from_utf8_lossy(&body).chars().take(200).collect();
        return Err(CliError::AdminEndpoint(format!(
            "{url} answered {status}: {}; a proxy without an identity yet answers 503 (check its logs)",
            snippet.trim()
        )));
    }
    Ok(body.to_vec())
}

/// `identity inspect`.
pub async fn inspect(
    cluster: &Cluster,
    args: &IdentityInspectArgs,
    out: &mut dyn Write,
    _err: &mut dyn Write,
) -> Result<Outcome, CliError> {
    if TrustDomain::new(args.trust_domain.as_str()).is_err() {
        return Err(CliError::Certificate(format!(
            "--trust-domain {:?} is not a trust domain; write it like cluster.local",
            args.trust_domain
        )));
    }
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let pod = pods.get(&args.pod).await.map_err(|e| {
        CliError::from_kube(e, || {
            (
                format!("pod {}/{}", cluster.namespace, args.pod),
                format!("list pods with kubectl get pods -n {}", cluster.namespace),
            )
        })
    })?;
    // The tenant label is informative only: a user who may not read namespaces still
    // gets the rest.
    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
    let tenant = namespaces
        .get_opt(&cluster.namespace)
        .await
        .ok()
        .flatten()
        .and_then(|ns| ns.labels().get(TENANT_LABEL).cloned());
    let mut report = inspect_pod(&pod, &args.trust_domain, tenant.as_deref());
    if let Some(url) = &args.admin_url {
        let pem = fetch_identity_pem(url).await?;
        report.attach_certificate(parse_pem_bundle(&pem)?, Timestamp::now());
    }
    match args.output.format {
        OutputFormat::Table => out.write_all(report.render().as_bytes())?,
        format => write_structured(format, &report, out)?,
    }
    Ok(if report.findings.is_empty() {
        Outcome::Clean
    } else {
        Outcome::Findings
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    fn injected_pod() -> Pod {
        pod(serde_json::json!({
            "metadata": {"name": "api-0", "namespace": "acme-prod",
                         "annotations": {"portcullis.dev/injected": "0.1.0"}},
            "spec": {
                "serviceAccountName": "api",
                "initContainers": [{"name": "portcullis-init"}, {"name": "portcullis-proxy", "restartPolicy": "Always"}],
                "containers": [{"name": "app"}]
            },
            "status": {"podIP": "10.1.2.3",
                       "initContainerStatuses": [{"name": "portcullis-proxy", "ready": true, "restartCount": 0, "image": "p", "imageID": ""}]}
        }))
    }

    fn leaf_pem(uri: &str, not_after: (i32, u8, u8)) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(uri).unwrap(),
        )];
        params.not_before = rcgen::date_time_ymd(2026, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn injected_native_sidecar_pod() {
        let report = inspect_pod(&injected_pod(), "cluster.local", Some("acme"));
        assert!(report.injected);
        assert_eq!(report.proxy_mode, Some(ProxyMode::NativeSidecar));
        assert_eq!(
            report.spiffe_id,
            "spiffe://cluster.local/ns/acme-prod/sa/api"
        );
        assert_eq!(
            report.tenant_id.as_deref(),
            Some("spiffe://cluster.local/tenant/acme")
        );
        assert_eq!(report.proxy_ready, Some(true));
        assert!(report.findings.is_empty());
        let text = report.render();
        assert!(
            text.contains("Injected:         yes (native sidecar, injector 0.1.0)\n"),
            "{text}"
        );
        assert!(text.contains("--admin-url http://127.0.0.1:4191"), "{text}");
    }

    #[test]
    fn plain_pod_uses_the_default_service_account() {
        let report = inspect_pod(
            &pod(
                serde_json::json!({"metadata": {"name": "web", "namespace": "shop"}, "spec": {"containers": [{"name": "app"}]}}),
            ),
            "example.org",
            None,
        );
        assert!(!report.injected);
        assert_eq!(report.spiffe_id, "spiffe://example.org/ns/shop/sa/default");
        assert!(
            report
                .render()
                .contains("Certificate:      none (no proxy)")
        );
    }

    #[test]
    fn certificate_is_judged_against_the_spiffe_id_and_the_clock() {
        let now = Timestamp::from_second(1_767_312_000).unwrap(); // 2026-01-02T00:00:00Z
        let mut report = inspect_pod(&injected_pod(), "cluster.local", None);
        let pem = leaf_pem("spiffe://cluster.local/ns/acme-prod/sa/api", (2026, 1, 3));
        report.attach_certificate(parse_pem_bundle(pem.as_bytes()).unwrap(), now);
        let cert = report.certificate.clone().unwrap();
        assert!(cert.matches_spiffe_id);
        assert_eq!(cert.time_left, "24h left");
        assert!(report.findings.is_empty(), "{:?}", report.findings);
        assert!(report.render().contains("Time left:        24h left\n"));

        let mut wrong = inspect_pod(&injected_pod(), "cluster.local", None);
        let pem = leaf_pem("spiffe://other.domain/ns/acme-prod/sa/api", (2026, 1, 1));
        wrong.attach_certificate(parse_pem_bundle(pem.as_bytes()).unwrap(), now);
        assert_eq!(wrong.findings.len(), 2, "{:?}", wrong.findings);
        assert_eq!(wrong.certificate.unwrap().time_left, "expired 24h ago");
    }

    #[tokio::test]
    async fn fetches_the_pem_from_the_admin_endpoint() {
        let pem = leaf_pem("spiffe://cluster.local/ns/a/sa/b", (2030, 1, 1));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body = pem.clone();
        let server = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 1024];
            let n = conn.read(&mut request).await.unwrap();
            let head = String::from_utf8_lossy(&request[..n]).into_owned();
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/x-pem-file\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            conn.write_all(response.as_bytes()).await.unwrap();
            head
        });
        let fetched = fetch_identity_pem(&format!("http://{addr}/"))
            .await
            .unwrap();
        assert_eq!(fetched, pem.as_bytes());
        assert!(server.await.unwrap().starts_with("GET /identity HTTP/1.1"));
        assert!(fetch_identity_pem("https://127.0.0.1:4191").await.is_err());
        assert!(fetch_identity_pem("not a url").await.is_err());
    }
}
