//! Figure 3: workload certificates for N pods from the identity service, as sidecars
//! ask for them: a projected token bound to the pod (TokenRequest) and a CSR, over TLS
//! with `IdentityClient`. Pods are API objects only (envtest has no kubelet); the
//! mutating webhook injects them.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use portcullis_sidecar::control::identity::{
    IDENTITY_AUDIENCE, IdentityClient, IdentityEndpoint, IssueCertificate, IssueResponse,
    TrustDomain, WorkloadId, WorkloadKey,
};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::json;

use super::cluster::{Budget, Operator, create_one};

/// The ServiceAccount of every benchmark pod.
pub const SERVICE_ACCOUNT: &str = "opbench";

#[derive(Debug, Default)]
pub struct CertsFigure {
    pub pods: usize,
    pub concurrency: usize,
    pub pods_created: Duration,
    pub tokens: Duration,
    /// The issue calls only (keys and CSRs made beforehand).
    pub issue_wall: Duration,
    pub issued: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// Operator CPU seconds during the issue calls.
    pub operator_cpu: f64,
}

/// A pod's certificate, key and trust bundle: what its sidecar would hold.
pub struct Workload {
    pub namespace: String,
    pub key: WorkloadKey,
    pub issued: IssueResponse,
    pub bundle_pem: String,
}

/// One pod ready to ask: its namespace, token file and CSR.
struct Asker {
    namespace: String,
    token_path: std::path::PathBuf,
    key: WorkloadKey,
    csr: String,
}

/// The trust bundle the operator publishes into a tenant namespace.
pub async fn trust_bundle(client: &kube::Client, namespace: &str) -> anyhow::Result<String> {
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get("portcullis-trust-bundle")
        .await?
        .data
        .and_then(|d| d.get("ca-bundle.crt").cloned())
        .ok_or_else(|| anyhow::anyhow!("{namespace}: trust bundle ConfigMap without ca-bundle.crt"))
}

pub fn roots(bundle_pem: &str) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    anyhow::ensure!(!roots.is_empty(), "empty trust bundle");
    Ok(roots)
}

/// Creates `n` pods over `namespaces`, gets each a bound token, then asks the identity
/// service for every certificate, `concurrency` at a time. Returns the figure and the
/// first pod's workload (for the revocation figure).
pub async fn run(
    client: &kube::Client,
    operator: &Operator,
    namespaces: &[String],
    n: usize,
    concurrency: usize,
    dir: &Path,
    budget: &Budget,
) -> anyhow::Result<(CertsFigure, Option<Workload>)> {
    let mut figure = CertsFigure {
        pods: n,
        concurrency,
        ..CertsFigure::default()
    };
    for ns in namespaces {
        let account: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": SERVICE_ACCOUNT}}))?;
        create_one(&Api::namespaced(client.clone(), ns), &account).await?;
    }
    let bundle_pem = trust_bundle(client, &namespaces[0]).await?;
    let roots = roots(&bundle_pem)?;

    eprintln!("[certs] creating {n} pods (each admitted through the injector webhook)");
    let started = Instant::now();
    let pods: Vec<(String, Pod)> = stream::iter(0..n)
        .map(|i| {
            let ns = namespaces[i % namespaces.len()].clone();
            async move {
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": format!("pod-{i:04}")},
                    "spec": {"serviceAccountName": SERVICE_ACCOUNT,
                             "automountServiceAccountToken": false,
                             "containers": [{"name": "app", "image": "app:1"}]}
                }))?;
                let created = create_one(&Api::namespaced(client.clone(), &ns), &pod).await?;
                anyhow::Ok((ns, created))
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    figure.pods_created = started.elapsed();
    budget.check("the pods' tokens")?;

    eprintln!(
        "[certs] {n} pods created in {:.1} s; requesting bound tokens",
        figure.pods_created.as_secs_f64()
    );
    let started = Instant::now();
    let askers: Vec<Asker> = stream::iter(pods.into_iter().enumerate())
        .map(|(i, (ns, pod))| async move { asker(client, dir, i, ns, &pod).await })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    figure.tokens = started.elapsed();
    budget.check("the certificates")?;

    eprintln!(
        "[certs] {n} tokens in {:.1} s; issuing {n} certificates, {concurrency} at a time",
        figure.tokens.as_secs_f64()
    );
    let endpoint = IdentityEndpoint::parse(&operator.identity_url())?;
    let cpu_before = operator.cpu_seconds();
    let started = Instant::now();
    let results: Vec<(Asker, Duration, anyhow::Result<IssueResponse>)> = stream::iter(askers)
        .map(|asker| {
            let (endpoint, roots) = (endpoint.clone(), &roots);
            async move {
                let client = IdentityClient::new(endpoint, &asker.token_path);
                let t = Instant::now();
                let result = client.issue(&asker.csr, roots).await;
                (asker, t.elapsed(), result.map_err(anyhow::Error::from))
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    figure.issue_wall = started.elapsed();
    figure.operator_cpu = operator.cpu_seconds() - cpu_before;

    let mut latencies = Vec::with_capacity(n);
    let mut workload = None;
    for (asker, took, result) in results {
        match result {
            Ok(issued) => {
                figure.issued += 1;
                latencies.push(took);
                if workload.is_none() && asker.namespace == namespaces[0] {
                    workload = Some(Workload {
                        namespace: asker.namespace,
                        key: asker.key,
                        issued,
                        bundle_pem: bundle_pem.clone(),
                    });
                }
            }
            Err(e) => {
                figure.errors += 1;
                figure.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    latencies.sort();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    (figure.p50, figure.p99) = (at(0.50), at(0.99));
    figure.max = latencies.last().copied().unwrap_or_default();
    eprintln!(
        "[certs] {} issued, {} errors in {:.2} s ({:.0}/s); latency p50 {} ms p99 {} ms",
        figure.issued,
        figure.errors,
        figure.issue_wall.as_secs_f64(),
        figure.issued as f64 / figure.issue_wall.as_secs_f64(),
        figure.p50.as_millis(),
        figure.p99.as_millis()
    );
    Ok((figure, workload))
}

/// A token bound to `pod` (as the kubelet's projected volume holds), written to a file,
/// and a fresh key with its CSR for the pod's SPIFFE ID.
async fn asker(
    client: &kube::Client,
    dir: &Path,
    i: usize,
    namespace: String,
    pod: &Pod,
) -> anyhow::Result<Asker> {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![IDENTITY_AUDIENCE.into()],
            expiration_seconds: Some(3600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..TokenRequest::default()
    };
    let token = Api::<ServiceAccount>::namespaced(client.clone(), &namespace)
        .create_token_request(SERVICE_ACCOUNT, &PostParams::default(), &request)
        .await?
        .status
        .ok_or_else(|| anyhow::anyhow!("TokenRequest without status"))?
        .token;
    let token_path = dir.join(format!("token-{i:04}"));
    tokio::fs::write(&token_path, token).await?;
    let id = WorkloadId::new(
        TrustDomain::new("cluster.local")?,
        namespace.as_str(),
        SERVICE_ACCOUNT,
    )?;
    let key = WorkloadKey::generate()?;
    let csr = key.csr_pem(&id)?;
    Ok(Asker {
        namespace,
        token_path,
        key,
        csr,
    })
}
