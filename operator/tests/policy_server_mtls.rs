//! The policy server over mTLS on loopback, as the operator runs it: a client
//! certificate from the CA is required, and a workload may read only the tenant its
//! certificate names (anything else: 403 with a JSON body) — except the audit
//! collector, which reads every tenant's audit keys and nothing else.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod flood;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use jiff::Timestamp;
use portcullis_api::clock::SystemClock;
use portcullis_api::spiffe::{TenantId, TrustDomain, WorkloadId};
use portcullis_crds::PolicyBundle;
use portcullis_operator::ca::audit_secret::{audit_service_names, collector_name};
use portcullis_operator::ca::{CaSettings, CaState, CertificateAuthority, validate_csr};
use portcullis_operator::policy::PolicyHub;
use portcullis_operator::policy::app_exit::AppExits;
use portcullis_operator::policy::server::{Access, PolicyApi, serve_api_with};
use portcullis_operator::policy::server_tls::{PolicyServerTls, client_tenant};
use portcullis_server::ConnectionLimits;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

fn new_ca() -> Arc<CertificateAuthority> {
    let settings = CaSettings::new(td());
    let state = CaState::generate(&settings, Timestamp::now()).unwrap();
    Arc::new(CertificateAuthority::new(
        settings,
        state,
        Arc::new(SystemClock),
    ))
}

/// A CSR for `workload` as a proxy sends it: an empty subject and exactly one URI SAN,
/// the workload's SPIFFE ID.
fn csr_pem(key: &KeyPair, workload: &WorkloadId) -> String {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(workload.to_string().try_into().unwrap())];
    params.serialize_request(key).unwrap().pem().unwrap()
}

/// The operator's namespace and the audit Service in it.
const OPERATOR_NAMESPACE: &str = "portcullis-system";
const AUDIT_SERVICE: &str = "portcullis-audit";

/// The collector's name as the operator configures it from `--audit-service`.
fn audit_collector() -> String {
    collector_name(AUDIT_SERVICE, OPERATOR_NAMESPACE)
}

/// A workload certificate (leaf + intermediate) and its key, for `tenant`.
fn workload_identity(
    ca: &CertificateAuthority,
    tenant: &str,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    named_workload_identity(ca, &format!("{tenant}-prod"), tenant, &[])
}

/// A workload certificate of `tenant` in `namespace` whose pod Services select under
/// `dns_names` (the identity service adds their names as DNS SANs).
fn named_workload_identity(
    ca: &CertificateAuthority,
    namespace: &str,
    tenant: &str,
    dns_names: &[String],
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let workload = WorkloadId::new(td(), namespace, "web").unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = validate_csr(&csr_pem(&key, &workload), &workload).unwrap();
    let issued = ca
        .issue_named(
            &csr,
            &workload,
            &TenantId::new(td(), tenant).unwrap(),
            dns_names,
        )
        .unwrap();
    let chain = CertificateDer::pem_slice_iter(
        format!("{}{}", issued.certificate, issued.chain).as_bytes(),
    )
    .collect::<Result<Vec<_>, _>>()
    .unwrap();
    (chain, PrivatePkcs8KeyDer::from(key.serialize_der()).into())
}

/// The audit service's certificate, issued as `ca::audit_secret` issues it into the
/// `<service>-tls` Secret the collector mounts.
fn audit_service_identity(
    ca: &CertificateAuthority,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let issued = ca
        .issue_audit_service_certificate(&audit_service_names(
            AUDIT_SERVICE,
            OPERATOR_NAMESPACE,
            "cluster.local",
        ))
        .unwrap();
    (issued.chain, issued.key.into())
}

/// A Job pod whose app container exited 0 while its proxy still runs.
fn finished_job_pod(namespace: &str, name: &str) -> k8s_openapi::api::core::v1::Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "report"}, {"name": "portcullis-proxy"}],
        },
        "status": {"containerStatuses": [
            {"name": "report", "image": "", "imageID": "", "ready": false,
             "restartCount": 0, "state": {"terminated": {"exitCode": 0}}},
            {"name": "portcullis-proxy", "image": "", "imageID": "", "ready": true,
             "restartCount": 0, "state": {"running": {}}},
        ]},
    }))
    .unwrap()
}

fn roots(ca: &CertificateAuthority) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.trust_bundle_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    roots
}

fn client_config(
    ca: &CertificateAuthority,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(portcullis_tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(ca));
    Arc::new(match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    })
}

struct Server {
    addr: std::net::SocketAddr,
    hub: Arc<PolicyHub>,
    ca: Arc<CertificateAuthority>,
    shutdown: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start() -> Server {
    start_with(ConnectionLimits::default()).await
}

async fn start_with(limits: ConnectionLimits) -> Server {
    start_serving(limits, Some(audit_collector())).await
}

/// A server whose audit collector is `audit_collector` (`None`: there is none).
async fn start_serving(limits: ConnectionLimits, audit_collector: Option<String>) -> Server {
    let ca = new_ca();
    let tls =
        PolicyServerTls::new(&ca, &["127.0.0.1".to_owned(), "policy.test".to_owned()]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hub = Arc::new(PolicyHub::default());
    let shutdown = CancellationToken::new();
    let api = PolicyApi {
        hub: hub.clone(),
        access: Access::TenantCertificate(td()),
        audit_keys: None,
        audit_collector,
        app_exits: Some(AppExits::fixed([finished_job_pod("acme-prod", "report")])),
    };
    let config = tls.config.clone();
    tokio::spawn(tls.keep_fresh(ca.clone(), shutdown.clone()));
    tokio::spawn(serve_api_with(
        listener,
        api,
        Some(config),
        limits,
        shutdown.clone(),
    ));
    for tenant in ["acme", "globex"] {
        hub.publish(
            PolicyBundle {
                tenant: tenant.into(),
                ..PolicyBundle::default()
            },
            Vec::new(),
            Timestamp::now(),
        );
    }
    Server {
        addr,
        hub,
        ca,
        shutdown,
    }
}

/// GET `path`; the status and, for a watch, the first line (else the whole body).
async fn get(
    server: &Server,
    config: Arc<ClientConfig>,
    path: &str,
) -> Result<(u16, Vec<u8>), String> {
    let tcp = TcpStream::connect(server.addr)
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("http handshake: {e}"))?;
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header("host", "127.0.0.1")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
        .await
        .map_err(|_| "no response".to_owned())?
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while let Ok(Some(frame)) = tokio::time::timeout(Duration::from_secs(5), body.frame()).await {
        if let Ok(data) = frame.map_err(|e| e.to_string())?.into_data() {
            bytes.extend_from_slice(&data);
        }
        if path.ends_with("/watch") && bytes.contains(&b'\n') {
            break;
        }
    }
    Ok((status, bytes))
}

#[tokio::test]
async fn a_workload_watches_its_own_tenant() {
    let server = start().await;
    let config = client_config(&server.ca, Some(workload_identity(&server.ca, "acme")));
    let (status, body) = get(&server, config.clone(), "/v1/policy/acme/watch")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let line = body.split(|b| *b == b'\n').next().unwrap();
    let bundle: PolicyBundle = serde_json::from_slice(line).unwrap();
    assert_eq!(bundle.tenant, "acme");
    assert_eq!(
        Some(bundle.version),
        server.hub.current("acme").map(|b| b.version)
    );

    let (status, body) = get(&server, config, "/debug/policy").await.unwrap();
    assert_eq!(status, 200);
    let summary: Value = serde_json::from_slice(&body).unwrap();
    assert!(summary.get("acme").is_some(), "{summary}");
    assert!(
        summary.get("globex").is_none(),
        "another tenant's summary leaked: {summary}"
    );
}

#[tokio::test]
async fn another_tenant_is_forbidden_with_a_json_reason() {
    let server = start().await;
    let config = client_config(&server.ca, Some(workload_identity(&server.ca, "acme")));
    for path in [
        "/v1/policy/globex/watch",
        "/v1/policy/globex",
        "/v1/audit-key/globex",
    ] {
        let (status, body) = get(&server, config.clone(), path).await.unwrap();
        assert_eq!(status, 403, "{path}");
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["reason"], "WrongTenant", "{path}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("\"globex\""),
            "{body}"
        );
    }
    // Its own tenant's audit key: not served by this server (no DEK source), not refused.
    let (status, _) = get(&server, config, "/v1/audit-key/acme").await.unwrap();
    assert_eq!(status, 404);
}

/// The status and JSON `reason` of `GET path` with `config`.
async fn status_and_reason(
    server: &Server,
    config: &Arc<ClientConfig>,
    path: &str,
) -> (u16, Value) {
    let (status, body) = get(server, config.clone(), path).await.unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, body["reason"].clone())
}

#[tokio::test]
async fn the_audit_collector_reads_every_tenants_audit_keys() {
    let server = start().await;
    let collector = client_config(&server.ca, Some(audit_service_identity(&server.ca)));
    // 404 NotServed: authorized, and this server has no DEK source.
    for tenant in ["acme", "globex"] {
        let path = format!("/v1/audit-key/{tenant}");
        assert_eq!(
            status_and_reason(&server, &collector, &path).await,
            (404, "NotServed".into()),
            "{path}"
        );
    }
    // A workload still reads only its own tenant's keys.
    let acme = client_config(&server.ca, Some(workload_identity(&server.ca, "acme")));
    assert_eq!(
        status_and_reason(&server, &acme, "/v1/audit-key/globex").await,
        (403, "WrongTenant".into())
    );
    assert_eq!(
        status_and_reason(&server, &acme, "/v1/audit-key/acme").await,
        (404, "NotServed".into())
    );
}

#[tokio::test]
async fn a_workload_behind_a_service_named_like_the_collector_is_no_collector() {
    let server = start().await;
    // A workload of acme in the operator's namespace, selected by a Service with the
    // audit Service's name: its leaf carries the collector's DNS names and its SPIFFE ids.
    let names = audit_service_names(AUDIT_SERVICE, OPERATOR_NAMESPACE, "cluster.local");
    assert!(names.contains(&audit_collector()));
    let impostor = client_config(
        &server.ca,
        Some(named_workload_identity(
            &server.ca,
            OPERATOR_NAMESPACE,
            "acme",
            &names,
        )),
    );
    assert_eq!(
        status_and_reason(&server, &impostor, "/v1/audit-key/globex").await,
        (403, "WrongTenant".into())
    );
    assert_eq!(
        status_and_reason(&server, &impostor, "/v1/audit-key/acme").await,
        (404, "NotServed".into())
    );
}

#[tokio::test]
async fn the_audit_collector_reads_no_policy() {
    let server = start().await;
    let collector = client_config(&server.ca, Some(audit_service_identity(&server.ca)));
    for path in [
        "/v1/policy/acme",
        "/v1/policy/acme/watch",
        "/v1/app-exit/acme/acme-prod/report",
    ] {
        assert_eq!(
            status_and_reason(&server, &collector, path).await,
            (403, "NoTenant".into()),
            "{path}"
        );
    }
    let (status, body) = get(&server, collector, "/debug/policy").await.unwrap();
    assert_eq!(status, 200);
    let summary: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(summary, serde_json::json!({}), "{summary}");
}

#[tokio::test]
async fn without_a_configured_collector_the_audit_certificate_reads_no_audit_key() {
    let server = start_serving(ConnectionLimits::default(), None).await;
    let collector = client_config(&server.ca, Some(audit_service_identity(&server.ca)));
    assert_eq!(
        status_and_reason(&server, &collector, "/v1/audit-key/acme").await,
        (403, "NoTenant".into())
    );
}

#[tokio::test]
async fn a_job_proxy_learns_its_app_exited_and_only_about_its_own_namespace() {
    let server = start().await;
    let config = client_config(&server.ca, Some(workload_identity(&server.ca, "acme")));
    let (status, body) = get(
        &server,
        config.clone(),
        "/v1/app-exit/acme/acme-prod/report",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["appsExited"], true, "{answer}");

    for (path, reason) in [
        ("/v1/app-exit/acme/acme-staging/report", "WrongNamespace"),
        ("/v1/app-exit/globex/globex-prod/report", "WrongTenant"),
    ] {
        let (status, body) = get(&server, config.clone(), path).await.unwrap();
        assert_eq!(status, 403, "{path}");
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["reason"], reason, "{path}: {body}");
    }
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_in_the_handshake() {
    let server = start().await;
    let result = get(
        &server,
        client_config(&server.ca, None),
        "/v1/policy/acme/watch",
    )
    .await;
    assert!(
        result.is_err(),
        "answered without a client certificate: {result:?}"
    );
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_in_the_handshake() {
    let server = start().await;
    let stranger = new_ca();
    let mut config =
        (*client_config(&server.ca, Some(workload_identity(&stranger, "acme")))).clone();
    config.alpn_protocols.clear();
    let result = get(&server, Arc::new(config), "/v1/policy/acme/watch").await;
    assert!(
        result.is_err(),
        "answered a certificate of another CA: {result:?}"
    );
}

#[test]
fn the_tenant_comes_from_the_tenant_uri_san_of_the_trust_domain() {
    let ca = new_ca();
    let (chain, _) = workload_identity(&ca, "acme");
    assert_eq!(client_tenant(&chain, &td()).as_deref(), Some("acme"));
    assert_eq!(
        client_tenant(&chain, &TrustDomain::new("other.domain").unwrap()),
        None
    );
    assert_eq!(client_tenant(&[], &td()), None);
}

/// `GET /v1/policy/acme` from [`flood::BYSTANDER`] as a workload of acme.
async fn bystander_reads_policy(server: &Server) -> u16 {
    let config = client_config(&server.ca, Some(workload_identity(&server.ca, "acme")));
    let request = http::Request::get("/v1/policy/acme")
        .header("host", "127.0.0.1")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    tokio::time::timeout(
        flood::HANG,
        flood::request_from(flood::BYSTANDER, server.addr, &config, "127.0.0.1", request),
    )
    .await
    .expect("the policy server hung behind idle connections")
    .unwrap()
    .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_lock_sidecars_out_of_policy() {
    let server = start_with(flood::tight_limits()).await;
    let attacker = client_config(&server.ca, Some(workload_identity(&server.ca, "globex")));
    let _flood = flood::flood(server.addr, &attacker, "127.0.0.1", 8).await;
    assert_eq!(bystander_reads_policy(&server).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_policy_connections_are_closed_even_while_pinging() {
    let server = start_with(flood::tight_limits()).await;
    let config = client_config(&server.ca, Some(workload_identity(&server.ca, "acme")));
    assert!(
        flood::pinging_h2_is_closed(server.addr, &config, "127.0.0.1").await,
        "an HTTP/2 connection that only pings is never closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_watch_is_not_idle() {
    let server = start_with(flood::tight_limits()).await;
    let config = client_config(&server.ca, Some(workload_identity(&server.ca, "acme")));
    // Two bundles over one watch, the second long after the idle timeout.
    let tls = flood::tls_from(
        flood::ATTACKER,
        server.addr,
        &config,
        "127.0.0.1",
        b"http/1.1",
    )
    .await
    .unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    let response = sender
        .send_request(
            http::Request::get("/v1/policy/acme/watch")
                .header("host", "127.0.0.1")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    // Past the idle timeout (300 ms) with the watch open: still delivered.
    tokio::time::sleep(Duration::from_millis(900)).await;
    server.hub.publish(
        PolicyBundle {
            tenant: "acme".into(),
            classification: portcullis_crds::DataClassification::Restricted,
            ..PolicyBundle::default()
        },
        Vec::new(),
        Timestamp::now(),
    );
    let second = tokio::time::timeout(flood::HANG, body.frame())
        .await
        .expect("the watch was cut")
        .unwrap()
        .unwrap();
    assert!(second.is_data(), "the watch ended instead of delivering");
}
