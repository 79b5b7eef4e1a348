//! The identity service against a real API server: real ServiceAccounts, real Pod
//! objects, real projected tokens from the TokenRequest API (bound to the Pod through
//! `boundObjectRef`), reviewed by the real TokenReview API through `KubeAuthenticator`.
//!
//! Skips (prints why, passes) when `KUBEBUILDER_ASSETS` is not set.
//!
//! Not covered here, by necessity:
//! - an *expired* token: the API server's minimum `expirationSeconds` is 600, so a test
//!   would have to wait ten minutes; expiry is the API server's check (TokenReview says
//!   "not authenticated"), which the unauthenticated-token case exercises.
//! - a token whose ServiceAccount differs from the Pod's: the API server refuses to mint
//!   one (asserted below), so `ServiceAccountMismatch` is defence in depth, covered by
//!   the scripted unit tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use anyhow::{Context, Result};
use jiff::Timestamp;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, PodSpec, ServiceAccount};
use kube::Client;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use portcullis_e2e::envtest;
use portcullis_operator::ca::{
    CaSettings, CaState, CertificateAuthority, IdentityMetrics, IdentityService, KubeAuthenticator,
};
use portcullis_sidecar::control::identity::{
    Credentials, IDENTITY_AUDIENCE, IssueRequest, RefusalReason, SystemClock, TrustDomain,
    WorkloadId, WorkloadKey,
};

fn trust_domain() -> TrustDomain {
    TrustDomain::new("cluster.test").unwrap()
}

fn service(client: Client) -> IdentityService {
    let settings = CaSettings::new(trust_domain());
    let ca = CertificateAuthority::new(
        settings.clone(),
        CaState::generate(&settings, Timestamp::now()).unwrap(),
        Arc::new(SystemClock),
    );
    IdentityService::new(
        Arc::new(ca),
        Arc::new(KubeAuthenticator::new(client)),
        IdentityMetrics::default(),
    )
}

/// A namespace (labelled with `tenant` when given), ServiceAccount `api` and Pod `api-0`.
async fn workload_namespace(
    env: &envtest::EnvTest,
    prefix: &str,
    tenant: Option<&str>,
) -> Result<(Client, String)> {
    let client = env.client()?;
    let ns = env.create_namespace(prefix).await?;
    if let Some(tenant) = tenant {
        let patch = serde_json::json!({"metadata": {"labels": {"portcullis.dev/tenant": tenant}}});
        Api::<Namespace>::all(client.clone())
            .patch(&ns, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    for sa in ["api", "other"] {
        let account = ServiceAccount {
            metadata: named(sa),
            ..ServiceAccount::default()
        };
        Api::<ServiceAccount>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &account)
            .await?;
    }
    create_pod(&client, &ns, "api-0", "api").await?;
    Ok((client, ns))
}

fn named(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        ..ObjectMeta::default()
    }
}

async fn create_pod(client: &Client, ns: &str, name: &str, service_account: &str) -> Result<Pod> {
    let pod = Pod {
        metadata: named(name),
        spec: Some(PodSpec {
            service_account_name: Some(service_account.into()),
            // No token Secret needed: envtest runs no token controller for old-style secrets.
            automount_service_account_token: Some(false),
            containers: vec![Container {
                name: "app".into(),
                image: Some("app:latest".into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    Ok(Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await?)
}

async fn pod_uid(client: &Client, ns: &str, name: &str) -> Result<String> {
    let pod = Api::<Pod>::namespaced(client.clone(), ns).get(name).await?;
    pod.metadata.uid.context("pod without uid")
}

/// A projected token for `sa` with `audience`, bound to `pod` when given.
async fn token(
    client: &Client,
    ns: &str,
    sa: &str,
    audience: &str,
    pod: Option<&str>,
) -> Result<String> {
    let bound_object_ref = match pod {
        Some(name) => Some(BoundObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(name.into()),
            uid: Some(pod_uid(client, ns, name).await?),
        }),
        None => None,
    };
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.into()],
            expiration_seconds: Some(600),
            bound_object_ref,
        },
        ..TokenRequest::default()
    };
    let response = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(sa, &PostParams::default(), &request)
        .await?;
    Ok(response
        .status
        .context("TokenRequest without status")?
        .token)
}

fn csr_for(ns: &str, sa: &str) -> (WorkloadKey, WorkloadId, String) {
    let key = WorkloadKey::generate().unwrap();
    let id = WorkloadId::new(trust_domain(), ns, sa).unwrap();
    let csr = key.csr_pem(&id).unwrap();
    (key, id, csr)
}

async fn refusal(service: &IdentityService, csr: String, token: String) -> RefusalReason {
    let refusal = service
        .handle(&IssueRequest { csr, token })
        .await
        .expect_err("must be refused");
    eprintln!("refused: {refusal}");
    refusal.reason
}

#[tokio::test]
async fn a_bound_token_of_a_real_pod_gets_a_certificate() -> Result<()> {
    let Some(env) = envtest::shared().await? else {
        return Ok(());
    };
    let (client, ns) = workload_namespace(env, "identity-ok", Some("acme")).await?;
    let service = service(client.clone());
    let token = token(&client, &ns, "api", IDENTITY_AUDIENCE, Some("api-0")).await?;
    let (key, id, csr) = csr_for(&ns, "api");
    let issued = service.handle(&IssueRequest { csr, token }).await?;
    let credentials = Credentials::from_issued(&key, &id, &issued, Timestamp::now())?;
    assert_eq!(credentials.workload(), &id);
    assert_eq!(credentials.tenant().map(|t| t.tenant()), Some("acme"));
    Ok(())
}

async fn create_service(client: &Client, ns: &str, name: &str, app: &str) -> Result<()> {
    let service: k8s_openapi::api::core::v1::Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"selector": {"app": app}, "ports": [{"port": 8080}]}
    }))?;
    Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &service)
        .await?;
    Ok(())
}

#[tokio::test]
async fn the_certificate_names_the_services_selecting_the_pod_as_the_api_says() -> Result<()> {
    let Some(env) = envtest::shared().await? else {
        return Ok(());
    };
    let (client, ns) = workload_namespace(env, "identity-names", Some("acme")).await?;
    let labels = serde_json::json!({"metadata": {"labels": {"app": "api"}}});
    Api::<Pod>::namespaced(client.clone(), &ns)
        .patch("api-0", &PatchParams::default(), &Patch::Merge(&labels))
        .await?;
    create_service(&client, &ns, "api", "api").await?;
    create_service(&client, &ns, "web", "web").await?;
    let service = service(client.clone());
    let issue = || async {
        let token = token(&client, &ns, "api", IDENTITY_AUDIENCE, Some("api-0")).await?;
        let (_, _, csr) = csr_for(&ns, "api");
        anyhow::Ok(service.handle(&IssueRequest { csr, token }).await?)
    };

    // Only the Service that selects the pod; "web" selects other pods.
    let first = issue().await?;
    assert_eq!(
        first.dns_names,
        [
            format!("api.{ns}.svc"),
            format!("api.{ns}.svc.cluster.local")
        ]
    );

    // A second Service selecting the pod: the next certificate names both, and the
    // revision the proxy compares with the policy bundle changed.
    create_service(&client, &ns, "api-internal", "api").await?;
    let second = issue().await?;
    assert_eq!(
        second.dns_names,
        [
            format!("api.{ns}.svc"),
            format!("api.{ns}.svc.cluster.local"),
            format!("api-internal.{ns}.svc"),
            format!("api-internal.{ns}.svc.cluster.local"),
        ]
    );
    assert!(first.names_revision.is_some());
    assert_ne!(first.names_revision, second.names_revision);
    Ok(())
}

#[tokio::test]
async fn tokens_for_another_audience_unbound_or_forged_are_refused() -> Result<()> {
    let Some(env) = envtest::shared().await? else {
        return Ok(());
    };
    let (client, ns) = workload_namespace(env, "identity-tokens", Some("acme")).await?;
    let service = service(client.clone());

    let other_audience = token(
        &client,
        &ns,
        "api",
        "https://kubernetes.default.svc",
        Some("api-0"),
    )
    .await?;
    assert_eq!(
        refusal(&service, csr_for(&ns, "api").2, other_audience).await,
        RefusalReason::WrongAudience
    );

    let unbound = token(&client, &ns, "api", IDENTITY_AUDIENCE, None).await?;
    assert_eq!(
        refusal(&service, csr_for(&ns, "api").2, unbound).await,
        RefusalReason::TokenNotBoundToPod
    );

    let good = token(&client, &ns, "api", IDENTITY_AUDIENCE, Some("api-0")).await?;
    // Change one signature character well away from the end: the last base64url
    // character of a signature carries padding bits a lenient decoder ignores.
    let mut forged = good.clone().into_bytes();
    let at = forged.len() - 20;
    forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged)?;
    assert_eq!(
        refusal(&service, csr_for(&ns, "api").2, forged).await,
        RefusalReason::TokenInvalid
    );

    // A valid token does not buy another ServiceAccount's identity.
    assert_eq!(
        refusal(&service, csr_for(&ns, "other").2, good).await,
        RefusalReason::CsrWrongIdentity
    );
    Ok(())
}

#[tokio::test]
async fn tokens_of_deleted_or_replaced_pods_are_refused() -> Result<()> {
    let Some(env) = envtest::shared().await? else {
        return Ok(());
    };
    let (client, ns) = workload_namespace(env, "identity-pods", Some("acme")).await?;
    let service = service(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let force = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };

    let token_of_deleted = token(&client, &ns, "api", IDENTITY_AUDIENCE, Some("api-0")).await?;
    pods.delete("api-0", &force).await?;
    wait_gone(&pods, "api-0").await?;
    // The API server itself rejects a token whose bound pod is gone (TokenInvalid);
    // had it not, the pod lookup would (PodNotFound).
    let reason = refusal(&service, csr_for(&ns, "api").2, token_of_deleted.clone()).await;
    assert!(
        matches!(
            reason,
            RefusalReason::TokenInvalid | RefusalReason::PodNotFound
        ),
        "{reason}"
    );

    // Same name, new pod: the old token is bound to the old UID.
    create_pod(&client, &ns, "api-0", "api").await?;
    let reason = refusal(&service, csr_for(&ns, "api").2, token_of_deleted).await;
    assert!(
        matches!(
            reason,
            RefusalReason::TokenInvalid | RefusalReason::PodMismatch
        ),
        "{reason}"
    );

    // The replacement runs as another ServiceAccount: a token for `api` cannot even be
    // minted bound to it.
    pods.delete("api-0", &force).await?;
    wait_gone(&pods, "api-0").await?;
    create_pod(&client, &ns, "api-0", "other").await?;
    let minted = token(&client, &ns, "api", IDENTITY_AUDIENCE, Some("api-0")).await;
    assert!(
        minted.is_err(),
        "the API server minted a token for api bound to a pod running as other"
    );
    Ok(())
}

#[tokio::test]
async fn a_namespace_without_a_tenant_is_refused() -> Result<()> {
    let Some(env) = envtest::shared().await? else {
        return Ok(());
    };
    let (client, ns) = workload_namespace(env, "identity-notenant", None).await?;
    let service = service(client.clone());
    let token = token(&client, &ns, "api", IDENTITY_AUDIENCE, Some("api-0")).await?;
    assert_eq!(
        refusal(&service, csr_for(&ns, "api").2, token).await,
        RefusalReason::NoTenant
    );
    Ok(())
}

async fn wait_gone(pods: &Api<Pod>, name: &str) -> Result<()> {
    for _ in 0..100 {
        if pods.get_opt(name).await?.is_none() {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    anyhow::bail!("pod {name} was not deleted")
}

/// Issue 15 item 12: a leaf outlived its pod by up to rotation period + grace (96 h).
/// Now every leaf is recorded against its pod, and once the pod is deleted its serial
/// is in the tenant's policy bundle (which the proxies refuse) until it expires.
#[tokio::test]
async fn a_deleted_pods_certificate_is_published_as_revoked() -> Result<()> {
    use kube::runtime::watcher;
    use portcullis_operator::ca::KubeLeafLedger;
    use portcullis_operator::metrics::Metrics;
    use portcullis_operator::policy::{PolicyHub, RevocationCaches, compile_all};
    use portcullis_operator::stores::Stores;
    use rustls::pki_types::{CertificateDer, pem::PemObject};

    let Some(env) = envtest::shared().await? else {
        return Ok(());
    };
    let tenant = "revoke-test";
    let (client, ns) = workload_namespace(env, "identity-revoke", Some(tenant)).await?;
    let operator_ns = env.create_namespace("identity-ledger").await?;
    let service = service(client.clone())
        .with_ledger(Arc::new(KubeLeafLedger::new(client.clone(), &operator_ns)));
    let token = token(&client, &ns, "api", IDENTITY_AUDIENCE, Some("api-0")).await?;
    let issued = service
        .handle(&IssueRequest {
            csr: csr_for(&ns, "api").2,
            token,
        })
        .await?;
    let der = CertificateDer::from_pem_slice(issued.certificate.as_bytes())?;
    let serial = portcullis_sidecar::tls::peer::leaf_facts(&der)?.serial;

    // The compiler's view: a Tenant in the caches, the ledger and pod caches live.
    let (mut stores, mut writers) = Stores::new();
    let tenant_object: portcullis_crds::Tenant = serde_json::from_value(serde_json::json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"name": tenant}, "spec": {}
    }))?;
    writers
        .tenants
        .apply_watcher_event(&watcher::Event::Apply(tenant_object));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let (caches, _tasks) = RevocationCaches::start(
        &client,
        &operator_ns,
        Arc::new(tokio::sync::Notify::new()),
        &shutdown,
    );
    assert!(caches.wait_until_ready().await);
    stores.revocations = Some(caches.clone());
    let hub = PolicyHub::default();
    let metrics = Metrics::default();
    let revoked = |now: Timestamp| {
        compile_all(&stores, &hub, &metrics, now);
        hub.current(tenant)
            .map(|b| b.revoked_certificates.clone())
            .unwrap_or_default()
    };

    // Until the ledger entry is cached and the pod still lives, nothing is revoked.
    let mut recorded = false;
    for _ in 0..200 {
        if caches.ledger(tenant).contains_key(&serial) {
            recorded = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(recorded, "the issued leaf {serial} is not in the ledger");
    let later = Timestamp::now() + jiff::SignedDuration::from_secs(60);
    assert!(
        revoked(later).is_empty(),
        "a live pod's certificate was revoked"
    );

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let force = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    pods.delete("api-0", &force).await?;
    wait_gone(&pods, "api-0").await?;
    // Bounded: 30 s of 100 ms polls; the leaf is revoked once it is SETTLE old.
    let mut listed = Vec::new();
    for _ in 0..300 {
        listed = revoked(Timestamp::now());
        if !listed.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        listed.iter().map(|r| r.serial.as_str()).collect::<Vec<_>>(),
        [serial.as_str()],
        "the deleted pod's certificate must be listed as revoked"
    );
    assert_eq!(listed[0].not_after, issued.expires_at);
    assert_eq!(
        listed[0].spiffe_id,
        format!("spiffe://cluster.test/ns/{ns}/sa/api")
    );
    // Once the leaf has expired it needs no revocation.
    let expired = issued.expires_at + jiff::SignedDuration::from_secs(1);
    assert!(revoked(expired).is_empty());
    Ok(())
}
