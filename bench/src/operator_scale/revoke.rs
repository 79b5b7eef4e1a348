//! Figure 4: revocation latency as a sidecar sees it. The sidecar's own policy stream
//! client (`control::policy_stream::follow`, mTLS with a workload certificate from the
//! identity service) keeps a `PolicyStore`; `KeyVerifier` checks a key's token against
//! it.
//! Measured: `spec.revoked: true` patched → the verifier refuses the token. The HTTP
//! layer of the proxy is not in the path (it answers 401 from that same refusal).

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, Patch, PatchParams};
use portcullis_crds::{ApiKey, KeyState, apikey::SECRET_TOKEN_KEY, apikey::secret_name};
use portcullis_sidecar::config::StreamSource;
use portcullis_sidecar::control::policy_stream;
use portcullis_sidecar::inbound::authn::verify::KeyVerifier;
use portcullis_sidecar::listener::deny::Reason;
use portcullis_sidecar::policy::PolicyStore;
use portcullis_sidecar::tls::ClientConfigSource;
use rustls::ClientConfig;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio_util::sync::CancellationToken;

use super::certs::{Workload, roots};
use super::cluster::Budget;

/// The address the bench's key checks come from (budgets are per client).
const CLIENT: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Longest wait for one revocation to arrive.
const PER_KEY: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub struct RevokeFigure {
    /// Keys in the followed tenant's bundle.
    pub bundle_keys: usize,
    /// patch → refused, sorted.
    pub latencies: Vec<Duration>,
    /// How long the PATCH call itself took (API server + validating webhook), sorted.
    pub patch_calls: Vec<Duration>,
    /// Refusal reasons other than `key_revoked`, or revocations never seen.
    pub anomalies: Vec<String>,
}

impl RevokeFigure {
    pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
        let i = ((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1));
        sorted.get(i).copied().unwrap_or_default()
    }
}

/// Follows `tenant`'s policy as `workload`'s sidecar would, then revokes up to `n`
/// Active keys of the workload's namespace one after the other.
pub async fn run(
    client: &kube::Client,
    workload: &Workload,
    tenant: &str,
    policy_port: u16,
    n: usize,
    budget: &Budget,
) -> anyhow::Result<RevokeFigure> {
    let store = PolicyStore::new();
    let metrics = portcullis_sidecar::metrics::Metrics::new();
    let shutdown = CancellationToken::new();
    let source = StreamSource {
        host: "127.0.0.1".into(),
        port: policy_port,
        tenant: tenant.to_owned(),
        min_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
    };
    let follower = tokio::spawn(policy_stream::follow(
        source,
        tls_source(workload)?,
        store.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let result = revoke_keys(client, workload, &store, metrics, n, budget).await;
    shutdown.cancel();
    let _ = follower.await;
    result
}

async fn revoke_keys(
    client: &kube::Client,
    workload: &Workload,
    store: &PolicyStore,
    metrics: portcullis_sidecar::metrics::Metrics,
    n: usize,
    budget: &Budget,
) -> anyhow::Result<RevokeFigure> {
    let mut changes = store.subscribe();
    let deadline = Instant::now() + PER_KEY;
    while store.load().is_none_or(|b| b.key_count() == 0) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no policy bundle with keys from the operator within {PER_KEY:?}"
        );
        let _ = tokio::time::timeout(Duration::from_millis(500), changes.changed()).await;
    }
    let mut figure = RevokeFigure {
        bundle_keys: store.load().map_or(0, |b| b.key_count()),
        ..RevokeFigure::default()
    };
    let keys: Api<ApiKey> = Api::namespaced(client.clone(), &workload.namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &workload.namespace);
    let active: Vec<String> = keys
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|k| {
            k.status
                .as_ref()
                .is_some_and(|s| s.state == KeyState::Active)
        })
        .filter_map(|k| k.metadata.name)
        .take(n)
        .collect();
    let verifier = Arc::new(KeyVerifier::new(2, Duration::from_secs(5), 1024, metrics));
    eprintln!(
        "[revoke] following tenant {} ({} keys in its bundle); revoking {} keys one by one",
        workload.namespace,
        figure.bundle_keys,
        active.len()
    );
    for name in active {
        if budget.expired() {
            break;
        }
        let token = token_of(&secrets, &name).await?;
        let bundle = store
            .load()
            .ok_or_else(|| anyhow::anyhow!("policy store emptied"))?;
        // Warm: the token verifies (and is cached) before the revocation.
        if let Err(d) = verifier
            .verify(&token, &bundle, CLIENT, Timestamp::now())
            .await
        {
            figure.anomalies.push(format!(
                "{name}: refused before revocation: {}",
                d.reason.as_str()
            ));
            continue;
        }
        changes.borrow_and_update();
        let started = Instant::now();
        let patch = serde_json::json!({"spec": {"revoked": true}});
        keys.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        figure.patch_calls.push(started.elapsed());
        let refused = loop {
            if let Some(bundle) = store.load()
                && let Err(d) = verifier
                    .verify(&token, &bundle, CLIENT, Timestamp::now())
                    .await
            {
                break Some((started.elapsed(), d.reason));
            }
            let left = PER_KEY.saturating_sub(started.elapsed());
            if left.is_zero() || tokio::time::timeout(left, changes.changed()).await.is_err() {
                break None;
            }
        };
        match refused {
            Some((took, reason)) => {
                if reason != Reason::KeyRevoked {
                    figure
                        .anomalies
                        .push(format!("{name}: refused as {}", reason.as_str()));
                }
                figure.latencies.push(took);
            }
            None => figure
                .anomalies
                .push(format!("{name}: still accepted after {PER_KEY:?}")),
        }
    }
    figure.latencies.sort();
    figure.patch_calls.sort();
    eprintln!(
        "[revoke] {} revocations: p50 {} ms, max {} ms (PATCH call p50 {} ms)",
        figure.latencies.len(),
        RevokeFigure::quantile(&figure.latencies, 0.5).as_millis(),
        figure
            .latencies
            .last()
            .copied()
            .unwrap_or_default()
            .as_millis(),
        RevokeFigure::quantile(&figure.patch_calls, 0.5).as_millis(),
    );
    Ok(figure)
}

/// The plaintext token the operator wrote into `<name>-key`.
async fn token_of(secrets: &Api<Secret>, name: &str) -> anyhow::Result<String> {
    let secret = secrets.get(&secret_name(name)).await?;
    let bytes = secret
        .data
        .and_then(|d| d.get(SECRET_TOKEN_KEY).cloned())
        .ok_or_else(|| anyhow::anyhow!("{name}: key Secret without a token"))?;
    Ok(String::from_utf8(bytes.0)?)
}

/// mTLS as the sidecar presents it to the policy server: the workload certificate and
/// its chain, trusting the published bundle.
fn tls_source(workload: &Workload) -> anyhow::Result<ClientConfigSource> {
    let chain = CertificateDer::pem_slice_iter(
        format!("{}{}", workload.issued.certificate, workload.issued.chain).as_bytes(),
    )
    .collect::<Result<Vec<_>, _>>()?;
    let config = ClientConfig::builder_with_provider(portcullis_sidecar::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(&workload.bundle_pem)?)
        .with_client_auth_cert(chain, workload.key.private_key_der())?;
    let config = Arc::new(config);
    Ok(Arc::new(move || Ok(config.clone())))
}
