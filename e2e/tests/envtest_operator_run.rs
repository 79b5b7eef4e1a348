//! The whole operator (`run::start`, as `portcullis-operator run` starts it) against a
//! real API server (envtest 1.20), the way a sidecar meets it:
//!
//! CA Secrets created; the trust-bundle ConfigMap published into a tenant namespace;
//! the webhook configurations applied with `clientConfig.url` and a `caBundle`; a pod in
//! the tenant namespace injected by the API server calling the webhook, with the
//! identity and policy URLs from the settings; a real projected token bound to that pod
//! gets a workload certificate from the identity service over TLS; that certificate
//! opens the policy watch of its own tenant (first line a bundle), is refused (403) for
//! another tenant, and fetches the tenant's audit key (with the sidecar's own client).
//! Also: a kubeadm-style cluster admin (not `system:masters`) passes the escalation
//! check, and Tenant Events are accepted.
//!
//! Skips (prints why, passes) when `KUBEBUILDER_ASSETS` is not set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use portcullis_e2e::wait::eventually;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use portcullis_crds::{ApiKey, PolicyBundle, Tenant};
use portcullis_e2e::envtest::{self, EnvTest};
use portcullis_operator::run::{self, OperatorSettings, RunningOperator, WebhookRunSettings};
use portcullis_sidecar::config::env::OperatorEndpoint;
use portcullis_sidecar::control::identity::{
    IDENTITY_AUDIENCE, IdentityClient, IdentityEndpoint, IssueCertificate, IssueResponse,
    TrustDomain, WorkloadId, WorkloadKey,
};
use portcullis_sidecar::tls::ClientConfigSource;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::{Value, json};

const OPERATOR_NS: &str = "portcullis-system";
const WAIT: Duration = Duration::from_secs(45);

/// What the local-cluster tier sets too: loopback ports (0: any free one), the
/// loopback address in every serving certificate, the webhooks called by URL, and the
/// URLs the injector writes into pods (port 0: the one bound).
fn settings() -> OperatorSettings {
    let mut s = OperatorSettings::new(OPERATOR_NS, "run-test");
    let loopback = |port| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    s.metrics_addr = loopback(0);
    s.policy_addr = loopback(0);
    s.identity_addr = loopback(0);
    s.extra_sans = vec!["127.0.0.1".into()];
    let mut webhooks = WebhookRunSettings::new(OPERATOR_NS, &s.service_name);
    webhooks.addr = loopback(0);
    webhooks.url = Some("https://127.0.0.1:0".into());
    webhooks.inject.identity_url = "https://127.0.0.1:0".into();
    webhooks.inject.policy_url = "https://127.0.0.1:0".into();
    webhooks.inject.proxy_image = "portcullis-proxy:envtest".into();
    s.webhooks = Some(webhooks);
    s.reconcile.hash_cost = 4;
    s.reconcile.backoff_base = Duration::from_millis(200);
    s.reconcile.backoff_max = Duration::from_secs(3);
    s.lease.lease_duration = Duration::from_secs(4);
    s.lease.renew_deadline = Duration::from_secs(3);
    s.lease.retry_period = Duration::from_millis(300);
    s
}

async fn create_ok<K>(api: &Api<K>, object: Value) -> Result<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(object)?;
    Ok(api.create(&PostParams::default(), &object).await?)
}

fn webhook_urls(
    configs: impl IntoIterator<Item = (String, WebhookClientConfig)>,
) -> Vec<(String, String, bool)> {
    configs
        .into_iter()
        .map(|(name, c)| {
            let bundle = c
                .ca_bundle
                .is_some_and(|b| String::from_utf8_lossy(&b.0).contains("BEGIN CERTIFICATE"));
            (name, c.url.unwrap_or_default(), bundle)
        })
        .collect()
}

fn env_of(pod: &Pod, container: &str) -> BTreeMap<String, String> {
    let spec = pod.spec.clone().unwrap_or_default();
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .filter(|c| c.name == container)
        .flat_map(|c| c.env.iter().flatten())
        .filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v)))
        .collect()
}

fn roots(bundle_pem: &str) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    ensure!(!roots.is_empty(), "empty trust bundle");
    Ok(roots)
}

fn host_port(url: &str) -> Result<(String, u16)> {
    let uri: http::Uri = url.parse()?;
    Ok((
        uri.host().context("no host")?.to_owned(),
        uri.port_u16().context("no port")?,
    ))
}

/// mTLS as the sidecar does it: the workload certificate and chain, the trust bundle.
fn workload_tls(
    issued: &IssueResponse,
    key: &WorkloadKey,
    bundle_pem: &str,
) -> Result<Arc<ClientConfig>> {
    let chain = CertificateDer::pem_slice_iter(
        format!("{}{}", issued.certificate, issued.chain).as_bytes(),
    )
    .collect::<Result<Vec<_>, _>>()?;
    let config = ClientConfig::builder_with_provider(portcullis_sidecar::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(bundle_pem)?)
        .with_client_auth_cert(chain, key.private_key_der())?;
    Ok(Arc::new(config))
}

/// GET `path` on the policy server: the status and the body up to its first line.
async fn first_line(
    policy_url: &str,
    tls: Arc<ClientConfig>,
    path: &str,
) -> Result<(u16, Vec<u8>)> {
    let (host, port) = host_port(policy_url)?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from(host.clone())?, tcp)
        .await
        .context("TLS handshake with the policy server")?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(connection);
    let request = http::Request::get(path)
        .header("host", format!("{host}:{port}"))
        .body(Empty::<Bytes>::new())?;
    let response = tokio::time::timeout(WAIT, sender.send_request(request)).await??;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while !bytes.contains(&b'\n') {
        match tokio::time::timeout(WAIT, body.frame()).await? {
            Some(frame) => {
                if let Ok(data) = frame?.into_data() {
                    bytes.extend_from_slice(&data);
                }
            }
            None => break,
        }
    }
    driver.abort();
    Ok((status, bytes))
}

struct Running {
    operator: Option<RunningOperator>,
}

impl Running {
    fn get(&self) -> &RunningOperator {
        self.operator.as_ref().unwrap()
    }
}

#[tokio::test]
async fn the_whole_operator_serves_a_workload_end_to_end() -> Result<()> {
    let Some(env) = envtest::shared().await? else {
        return Ok(());
    };
    env.install_crds().await?;
    let admin = env.client()?;
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    if namespaces.get_opt(OPERATOR_NS).await?.is_none() {
        create_ok(&namespaces, json!({"metadata": {"name": OPERATOR_NS}})).await?;
    }
    let operator = run::start(env.client()?, settings()).await?;
    let running = Running {
        operator: Some(operator),
    };
    let result = scenario(env, &admin, running.get()).await;
    if let Some(operator) = running.operator {
        operator.stop().await;
    }
    result
}

async fn scenario(env: &EnvTest, admin: &Client, operator: &RunningOperator) -> Result<()> {
    eventually("the replica to lead", WAIT, || async {
        Ok(operator.is_leader().then_some(()))
    })
    .await?;

    // The CA, in its Secrets.
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), OPERATOR_NS);
    for name in [
        "portcullis-ca-root",
        "portcullis-ca-intermediate",
        "portcullis-kek",
        "portcullis-webhook-ca",
    ] {
        ensure!(
            secrets.get_opt(name).await?.is_some(),
            "Secret {OPERATOR_NS}/{name} missing"
        );
    }

    // The webhook configurations: by URL, with the caBundle.
    let webhook_port = operator.webhook_addr.context("webhooks not served")?.port();
    let mutating = Api::<MutatingWebhookConfiguration>::all(admin.clone())
        .get("portcullis-injector")
        .await?;
    let validating = Api::<ValidatingWebhookConfiguration>::all(admin.clone())
        .get("portcullis-validator")
        .await?;
    let hooks = webhook_urls(
        mutating
            .webhooks
            .into_iter()
            .flatten()
            .map(|w| (w.name, w.client_config))
            .chain(
                validating
                    .webhooks
                    .into_iter()
                    .flatten()
                    .map(|w| (w.name, w.client_config)),
            ),
    );
    let inject_url = format!("https://127.0.0.1:{webhook_port}/inject");
    let validate_url = format!("https://127.0.0.1:{webhook_port}/validate");
    ensure!(
        hooks
            == vec![
                ("inject.portcullis.dev".to_owned(), inject_url.clone(), true),
                ("tenant-inject.portcullis.dev".to_owned(), inject_url, true),
                ("validate.portcullis.dev".to_owned(), validate_url, true),
            ],
        "webhook configurations: {hooks:?}"
    );

    // A Tenant; its namespace gets the label and the trust bundle.
    let tenant_ns = env.create_namespace("run-acme").await?;
    let tenant = format!("acme-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let tenants: Api<Tenant> = Api::all(admin.clone());
    create_ok(
        &tenants,
        json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant", "metadata": {"name": tenant},
            "spec": {"namespaces": [tenant_ns], "dataClassification": "Confidential",
                     "scopes": {"identify": [{"methods": ["POST"], "path": "/v1/identify"}]}}
        }),
    )
    .await?;
    eventually("the tenant label on its namespace", WAIT, || async {
        let ns = namespaces_api(admin).get(&tenant_ns).await?;
        Ok((ns.labels().get("portcullis.dev/tenant") == Some(&tenant)).then_some(()))
    })
    .await?;
    let bundle_pem = eventually("the trust-bundle ConfigMap", WAIT, || async {
        let cm = Api::<ConfigMap>::namespaced(admin.clone(), &tenant_ns)
            .get_opt("portcullis-trust-bundle")
            .await?;
        Ok(cm
            .and_then(|cm| cm.data)
            .and_then(|d| d.get("ca-bundle.crt").cloned()))
    })
    .await?;
    ensure!(
        bundle_pem == operator.ca.trust_bundle_pem(),
        "the ConfigMap holds another bundle"
    );

    // A pod in the tenant namespace: the API server calls the injector.
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), &tenant_ns);
    create_ok(&accounts, json!({"metadata": {"name": "web"}})).await?;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &tenant_ns);
    let pod = create_ok(
        &pods,
        json!({
            "metadata": {"name": "web-0"},
            "spec": {"serviceAccountName": "web", "automountServiceAccountToken": false,
                     "containers": [{"name": "app", "image": "app:1", "ports": [{"containerPort": 8080}]}]}
        }),
    )
    .await?;
    let proxy_env = env_of(&pod, "portcullis-proxy");
    let identity_url = format!("https://127.0.0.1:{}", operator.identity_addr.port());
    let policy_url = format!("https://127.0.0.1:{}", operator.policy_addr.port());
    ensure!(
        proxy_env.get("PORTCULLIS_IDENTITY_URL") == Some(&identity_url)
            && proxy_env.get("PORTCULLIS_POLICY_URL") == Some(&policy_url),
        "pod not injected with the operator's URLs: {proxy_env:?}"
    );
    ensure!(
        !proxy_env.contains_key("PORTCULLIS_TRUST_DOMAIN"),
        "cluster.local needs no variable"
    );

    // A projected token bound to that pod gets a certificate from the identity service.
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![IDENTITY_AUDIENCE.into()],
            expiration_seconds: Some(600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some("web-0".into()),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..TokenRequest::default()
    };
    let token = accounts
        .create_token_request("web", &PostParams::default(), &request)
        .await?
        .status
        .context("TokenRequest without status")?
        .token;
    let dir = tempfile::tempdir()?;
    let token_path = dir.path().join("token");
    std::fs::write(&token_path, token)?;
    let workload = WorkloadId::new(
        TrustDomain::new("cluster.local")?,
        tenant_ns.as_str(),
        "web",
    )?;
    let key = WorkloadKey::generate()?;
    let client = IdentityClient::new(
        IdentityEndpoint::parse(&proxy_env["PORTCULLIS_IDENTITY_URL"])?,
        &token_path,
    );
    let issued = client
        .issue(&key.csr_pem(&workload)?, &roots(&bundle_pem)?)
        .await
        .context("the identity service refused the pod's token")?;
    ensure!(issued.certificate.contains("BEGIN CERTIFICATE"));

    // That certificate opens its own tenant's policy watch, and no other tenant's.
    let tls = workload_tls(&issued, &key, &bundle_pem)?;
    let (status, line) = first_line(
        &policy_url,
        tls.clone(),
        &format!("/v1/policy/{tenant}/watch"),
    )
    .await?;
    ensure!(
        status == 200,
        "own tenant's watch: HTTP {status}: {}",
        String::from_utf8_lossy(&line)
    );
    let bundle: PolicyBundle =
        serde_json::from_slice(line.split(|b| *b == b'\n').next().unwrap_or_default())
            .context("the first line is not a PolicyBundle")?;
    ensure!(
        bundle.tenant == tenant && bundle.version > 0,
        "bundle {bundle:?}"
    );
    let (status, body) = first_line(&policy_url, tls.clone(), "/v1/policy/globex/watch").await?;
    let body: Value = serde_json::from_slice(&body).unwrap_or_default();
    ensure!(
        status == 403 && body["reason"] == "WrongTenant",
        "another tenant: HTTP {status} {body}"
    );

    // The audit key, through the sidecar's own client.
    let (host, port) = host_port(&policy_url)?;
    let endpoint = OperatorEndpoint { host, port };
    let source: ClientConfigSource = {
        let tls = tls.clone();
        Arc::new(move || Ok(tls.clone()))
    };
    let keys = eventually("the tenant's audit key", WAIT, || async {
        match portcullis_sidecar::control::audit_key::fetch(&endpoint, &source, &tenant).await {
            Ok(keys) => Ok(Some(keys)),
            Err(e) => bail!("{e}"),
        }
    })
    .await?;
    ensure!(
        keys.tenant == tenant && keys.active.version() >= 1,
        "keys {keys:?}"
    );
    ensure!(
        keys.retention_days == Some(2555),
        "Confidential retention: {:?}",
        keys.retention_days
    );
    let refused = portcullis_sidecar::control::audit_key::fetch(&endpoint, &source, "globex").await;
    ensure!(
        matches!(
            refused,
            Err(portcullis_sidecar::control::audit_key::KeyError::Refused { status: 403, .. })
        ),
        "another tenant's audit key: {refused:?}"
    );

    // A kubeadm cluster admin (group kubeadm:cluster-admins bound to cluster-admin, not
    // system:masters) creates an ApiKey: the escalation check asks the authorizer.
    create_ok(
        &Api::<ClusterRoleBinding>::all(admin.clone()),
        json!({
            "metadata": {"name": format!("kubeadm-cluster-admins-{tenant}")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "kubeadm:cluster-admins"}]
        }),
    )
    .await?;
    let kubeadm_admin = env.client_for_user("kubernetes-admin", &["kubeadm:cluster-admins"])?;
    let key_object = json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey",
        "metadata": {"name": "ingest", "namespace": tenant_ns},
        "spec": {"role": "Developer", "scopes": ["identify"]}
    });
    eventually(
        "the kubeadm admin's ApiKey to be admitted",
        WAIT,
        || async {
            // RBAC caches the new binding within moments.
            match create_ok(
                &Api::<ApiKey>::namespaced(kubeadm_admin.clone(), &tenant_ns),
                key_object.clone(),
            )
            .await
            {
                Ok(_) => Ok(Some(())),
                Err(e) => bail!("{e:#}"),
            }
        },
    )
    .await?;
    let stranger = env.client_for_user("mallory", &["kubeadm:cluster-admins-not"])?;
    let refused = create_ok(&Api::<ApiKey>::namespaced(stranger, &tenant_ns), key_object).await;
    ensure!(refused.is_err(), "a stranger created an ApiKey");

    // Events about the cluster-scoped Tenant are accepted by the 1.20 API server.
    eventually("an Event about the Tenant", WAIT, || async {
        let events = Api::<Event>::all(admin.clone())
            .list(&ListParams::default())
            .await?;
        Ok(events.items.into_iter().find(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(tenant.as_str())
        }))
    })
    .await?;
    Ok(())
}

fn namespaces_api(client: &Client) -> Api<Namespace> {
    Api::all(client.clone())
}
