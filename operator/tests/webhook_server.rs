//! The webhook server over real TLS on loopback: routes, limits, TLS 1.3 only, and
//! serving-certificate rotation while reviews keep flowing (none may fail).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod flood;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::Full;
use portcullis_api::clock::SystemClock;
use portcullis_crds::{Role, Tenant};
use portcullis_operator::webhook::inject::{InjectSettings, ServerVersion};
use portcullis_operator::webhook::tls::{ServingCertificate, WebhookCa, server_config};
use portcullis_operator::webhook::validate::lookup::{ClusterLookup, LookupError};
use portcullis_operator::webhook::{
    ServerLimits, TracingAuditSink, ValidatorSettings, WebhookState, serve_on,
};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

struct OneNamespace;

impl ClusterLookup for OneNamespace {
    fn namespace_labels<'a>(
        &'a self,
        _: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, LookupError>> {
        Box::pin(async {
            Ok(Some(BTreeMap::from([(
                "portcullis.dev/inject".to_owned(),
                "enabled".to_owned(),
            )])))
        })
    }
    fn roles<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Vec<Role>, LookupError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn tenants(&self) -> BoxFuture<'_, Result<Vec<Tenant>, LookupError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

struct Server {
    addr: std::net::SocketAddr,
    ca: WebhookCa,
    serving: Arc<ServingCertificate>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

const DAY: Duration = Duration::from_secs(86_400);

async fn start(limits: ServerLimits) -> Server {
    let now = jiff::Timestamp::now();
    let ca = WebhookCa::generate(now, 365 * DAY).unwrap();
    let leaf = ca
        .issue_leaf(&["127.0.0.1".into(), "localhost".into()], now, 30 * DAY)
        .unwrap();
    let serving = Arc::new(ServingCertificate::new(leaf));
    let state = Arc::new(WebhookState {
        inject: InjectSettings::new("proxy:test", "portcullis-system", "portcullis-operator"),
        server_version: ServerVersion {
            major: 1,
            minor: 20,
        },
        validator: ValidatorSettings::new("portcullis-system", "portcullis-operator"),
        lookup: Arc::new(OneNamespace),
        audit: Arc::new(TracingAuditSink),
        clock: Arc::new(SystemClock),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let tls = server_config(serving.clone()).unwrap();
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            serve_on(listener, tls, state, limits, shutdown)
                .await
                .unwrap()
        }
    });
    Server {
        addr,
        ca,
        serving,
        shutdown,
        task,
    }
}

fn client_config(
    ca_pem: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let config = ClientConfig::builder_with_provider(portcullis_tls::provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// One request on a fresh connection; the status, body and the server certificate's
/// SHA-256.
async fn post(
    server: &Server,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>, String), String> {
    post_from(server, flood::ATTACKER, method, path, body).await
}

/// [`post`] from `source`.
async fn post_from(
    server: &Server,
    source: std::net::IpAddr,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>, String), String> {
    let tcp = flood::connect_from(source, server.addr).await;
    let connector = TlsConnector::from(client_config(
        server.ca.cert_pem(),
        &[&rustls::version::TLS13],
    ));
    let tls = connector
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let fingerprint = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| hex::encode(Sha256::digest(c)))
        .unwrap_or_default();
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let (status, body) = flood::send_h1(tls, request).await?;
    Ok((status, body, fingerprint))
}

fn pod_review(uid: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "web",
            "namespace": "acme-prod",
            "operation": "CREATE",
            "userInfo": {"username": "david", "groups": ["system:authenticated"]},
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "web", "namespace": "acme-prod"},
                "spec": {"containers": [{"name": "app", "image": "a", "ports": [{"containerPort": 8080}]}]}
            },
            "dryRun": false
        }
    }))
    .unwrap()
}

fn admitted_with_patch(body: &[u8], uid: &str) -> bool {
    let review: Value = serde_json::from_slice(body).unwrap_or_default();
    review["kind"] == "AdmissionReview"
        && review["response"]["uid"] == uid
        && review["response"]["allowed"] == true
        && review["response"]["patchType"] == "JSONPatch"
}

#[tokio::test]
async fn reviews_are_answered_over_tls_13() {
    let server = start(ServerLimits::default()).await;
    let (status, body, _) = post(&server, "POST", "/inject", pod_review("u-1"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        admitted_with_patch(&body, "u-1"),
        "{}",
        String::from_utf8_lossy(&body)
    );

    // A validating review for something that is not ours is allowed untouched.
    let other = serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u-2", "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
                    "resource": {"group": "apps", "version": "v1", "resource": "deployments"},
                    "name": "x", "namespace": "n", "operation": "CREATE", "userInfo": {}, "object": {}}
    }))
    .unwrap();
    let (status, body, _) = post(&server, "POST", "/validate", other).await.unwrap();
    assert_eq!(status, 200);
    let review: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(review["response"]["allowed"], true);

    server.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), server.task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn bad_requests_get_http_errors() {
    let server = start(ServerLimits {
        max_body_bytes: 64 * 1024,
        ..ServerLimits::default()
    })
    .await;
    assert_eq!(
        post(&server, "POST", "/nope", Vec::new()).await.unwrap().0,
        404
    );
    assert_eq!(
        post(&server, "GET", "/inject", Vec::new()).await.unwrap().0,
        405
    );
    assert_eq!(
        post(&server, "POST", "/inject", b"{not json".to_vec())
            .await
            .unwrap()
            .0,
        400
    );
    let (status, body, _) = post(&server, "POST", "/inject", vec![b' '; 65 * 1024])
        .await
        .unwrap();
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    server.shutdown.cancel();
}

#[tokio::test]
async fn tls_12_clients_are_refused() {
    let server = start(ServerLimits::default()).await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let connector = TlsConnector::from(client_config(
        server.ca.cert_pem(),
        &[&rustls::version::TLS12],
    ));
    let result = connector
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await;
    assert!(
        result.is_err(),
        "a TLS 1.2-only client must not get a session"
    );
    server.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_serving_certificate_drops_no_review() {
    let server = Arc::new(start(ServerLimits::default()).await);
    let stop = CancellationToken::new();
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let fingerprints = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let mut clients = Vec::new();
    for worker in 0..4 {
        let (server, stop, ok, failures, fingerprints) = (
            server.clone(),
            stop.clone(),
            ok.clone(),
            failures.clone(),
            fingerprints.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.is_cancelled() {
                let uid = format!("w{worker}-{n}");
                n += 1;
                match post(&server, "POST", "/inject", pod_review(&uid)).await {
                    Ok((200, body, fingerprint)) if admitted_with_patch(&body, &uid) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        fingerprints.lock().unwrap().insert(fingerprint);
                    }
                    Ok((status, body, _)) => failures.lock().unwrap().push(format!(
                        "{uid}: {status} {}",
                        String::from_utf8_lossy(&body)
                    )),
                    Err(e) => failures.lock().unwrap().push(format!("{uid}: {e}")),
                }
            }
        }));
    }
    let rotations = 10;
    for _ in 0..rotations {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let leaf = server
            .ca
            .issue_leaf(&["127.0.0.1".into()], jiff::Timestamp::now(), 30 * DAY)
            .unwrap();
        server.serving.swap(leaf);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.cancel();
    for client in clients {
        client.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed reviews: {failures:?}",
        failures.len()
    );
    assert!(
        ok.load(Ordering::Relaxed) > rotations,
        "too few reviews to mean anything"
    );
    assert!(
        fingerprints.lock().unwrap().len() > 1,
        "the served certificate never changed"
    );
    server.shutdown.cancel();
}

/// Small caps and short idle time, so a test can exceed them.
fn tight_limits() -> ServerLimits {
    ServerLimits {
        connections: flood::tight_limits(),
        ..ServerLimits::default()
    }
}

/// A pod review from [`flood::BYSTANDER`]: the status and body.
async fn bystander_review(server: &Server, uid: &str) -> (u16, Vec<u8>) {
    let (status, body, _) = tokio::time::timeout(
        flood::HANG,
        post_from(server, flood::BYSTANDER, "POST", "/inject", pod_review(uid)),
    )
    .await
    .expect("the admission review hung behind other connections")
    .unwrap();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_one_source_cannot_freeze_admission() {
    let server = start(tight_limits()).await;
    let config = client_config(server.ca.cert_pem(), &[&rustls::version::TLS13]);
    // Three times the cap: silent TCP, idle TLS, HTTP/2 that only pings.
    let _flood = flood::flood(server.addr, &config, "127.0.0.1", 8).await;
    let answered = bystander_review(&server, "u-victim").await;
    assert_eq!(answered.0, 200);
    assert!(admitted_with_patch(&answered.1, "u-victim"));
    server.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_hold_more_than_its_share_of_connections() {
    let mut limits = tight_limits();
    limits.connections.max_connections = 64;
    limits.connections.max_connections_per_source = 4;
    let server = start(limits).await;
    let mut silent = Vec::new();
    for _ in 0..6 {
        silent.push(flood::connect_from(flood::ATTACKER, server.addr).await);
    }
    // The fifth and sixth are closed at once (long before the handshake timeout).
    assert!(flood::closed_by_server(&mut silent[5]).await);
    assert!(flood::closed_by_server(&mut silent[4]).await);
    let answered = bystander_review(&server, "u-2").await;
    assert_eq!(answered.0, 200);
    server.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_even_while_pinging() {
    let server = start(tight_limits()).await;
    let config = client_config(server.ca.cert_pem(), &[&rustls::version::TLS13]);
    assert!(
        flood::pinging_h2_is_closed(server.addr, &config, "127.0.0.1").await,
        "an HTTP/2 connection that only pings is never closed"
    );
    let mut idle_h1 = flood::tls_from(
        flood::ATTACKER,
        server.addr,
        &config,
        "127.0.0.1",
        b"http/1.1",
    )
    .await
    .unwrap();
    assert!(
        flood::closed_by_server(&mut idle_h1).await,
        "an idle HTTP/1.1 connection is never closed"
    );
    server.shutdown.cancel();
}
