//! `portcullis-operator audit-server` in process, with certificates from the operator's
//! real CA written to files the way a mounted Secret holds them: a workload ships its
//! chain over mutual TLS, a renewed certificate on disk is served from the next
//! handshake on while the chain continues, `/metrics` counts what was stored, the log
//! is sealed with the serving key so it verifies against the trust bundle, and an
//! unusable file is named at start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use jiff::Timestamp;
use portcullis_api::audit_ship::{CONTENT_TYPE, RECORDS_PATH, ShipAck};
use portcullis_audit::verify::{TrustBundle, VerifyOptions, verify_jsonl};
use portcullis_audit::{AuditRecord, Chain, DataKey, Entry, Seal, TenantKeys};
use portcullis_collector::KeyCache;
use portcullis_operator::audit_server::{self, AuditServerSettings};
use portcullis_operator::ca::CertificateAuthority;
use portcullis_operator::ca::certs::{pem_block, pem_encode};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio_util::sync::CancellationToken;

#[path = "support/ca.rs"]
mod ca_support;
use ca_support::{new_ca, td, workload_identity};

const SERVICE: &str = "portcullis-audit.portcullis-system.svc";

/// Writes a fresh serving certificate for the audit Service into `dir` as a
/// `kubernetes.io/tls` Secret mount holds it; returns the leaf.
fn write_serving_files(ca: &CertificateAuthority, dir: &Path) -> CertificateDer<'static> {
    write_serving_files_for(ca, dir, SERVICE)
}

/// As [`write_serving_files`], for the DNS name `name`.
fn write_serving_files_for(
    ca: &CertificateAuthority,
    dir: &Path,
    name: &str,
) -> CertificateDer<'static> {
    let issued = ca
        .issue_audit_service_certificate(&[name.to_owned()])
        .unwrap();
    let chain: String = issued.chain.iter().map(|c| pem_encode(c)).collect();
    // Written beside, then renamed: kubelet swaps a Secret mount atomically too.
    for (name, text) in [
        ("tls.crt", chain),
        (
            "tls.key",
            pem_block("PRIVATE KEY", issued.key.secret_pkcs8_der()),
        ),
        ("ca.crt", ca.trust_bundle_pem()),
    ] {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
    issued.chain[0].clone()
}

fn settings(dir: &Path) -> AuditServerSettings {
    AuditServerSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("data"),
        cert_file: dir.join("tls.crt"),
        key_file: dir.join("tls.key"),
        trust_bundle_file: dir.join("ca.crt"),
        trust_domain: td(),
        retention_days: 365,
        reload_every: Duration::from_millis(100),
        sinks_every: Duration::from_millis(100),
        seal_every: Duration::from_millis(200),
        admin_writer: None,
        keys: audit_server::KeySupply::Given(shop_keys()),
    }
}

/// Tenant shop's key, the same at every call.
fn shop_keys() -> Arc<KeyCache> {
    let keys = KeyCache::new();
    keys.insert(TenantKeys::single("shop", DataKey::new(1, [3; 32])));
    Arc::new(keys)
}

struct Shipper {
    config: Arc<ClientConfig>,
    addr: SocketAddr,
}

impl Shipper {
    /// POSTs `body`; returns the status, the body, and the server's leaf.
    async fn post(&self, body: String) -> (u16, String, CertificateDer<'static>) {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(ServerName::try_from(SERVICE).unwrap(), tcp)
            .await
            .unwrap();
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(connection);
        let request = http::Request::post(RECORDS_PATH)
            .header(http::header::HOST, SERVICE)
            .header(http::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned(), leaf)
    }
}

fn lines(chain: &mut Chain, n: usize) -> String {
    let mut out = String::new();
    for i in 0..n {
        let mut record = AuditRecord::new(Timestamp::now(), "shop", "web-1", "api.events", "-");
        record.path = format!("/v1/events/{i}");
        record.status = 200;
        let record = chain.append(record).unwrap();
        out.push_str(&Entry::Record(record).to_json_line().unwrap());
        out.push('\n');
    }
    out
}

async fn metrics(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn ships_over_mtls_and_serves_a_renewed_certificate_without_a_restart() {
    let ca = new_ca();
    let dir = tempfile::tempdir().unwrap();
    let first = write_serving_files(&ca, dir.path());
    let server = audit_server::start(settings(dir.path()), audit_server::ClusterAccess::none(365))
        .await
        .unwrap();

    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(
        CertificateDer::pem_slice_iter(ca.trust_bundle_pem().as_bytes()).map(Result::unwrap),
    );
    let (chain_der, key) = workload_identity(&ca, "shop");
    let config = ClientConfig::builder_with_provider(portcullis_tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain_der, key)
        .unwrap();
    let shipper = Shipper {
        config: Arc::new(config),
        addr: server.addr,
    };
    let mut chain = Chain::new("web-1-20270115");

    let (status, body, served) = shipper.post(lines(&mut chain, 2)).await;
    assert_eq!(status, 200, "{body}");
    let ack: ShipAck = serde_json::from_str(&body).unwrap();
    assert_eq!(ack.stored, 2);
    assert_eq!(served, first);

    // The operator renews the Secret; kubelet updates the mount.
    let renewed = write_serving_files(&ca, dir.path());
    assert_ne!(renewed, first);
    let mut seen = first.clone();
    for _ in 0..100 {
        let (status, body, served) = shipper.post(String::new()).await;
        assert_eq!(status, 200, "{body}");
        seen = served;
        if seen == renewed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        seen, renewed,
        "the renewed certificate is served within 5 s"
    );

    let (status, body, _) = shipper.post(lines(&mut chain, 1)).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        metrics(server.metrics_addr)
            .await
            .contains("portcullis_audit_entries_stored_total 3")
    );
    server.stop().await;

    // The log is sealed with the operator-issued serving key, the last seal made at
    // shutdown; seals from both certificates chain to the trust bundle as the
    // collector's, and they name record 2 of the chain.
    let day_files = std::fs::read_dir(dir.path().join("data").join("shop"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"));
    let ring = shop_keys().get("shop").unwrap().ring.clone();
    let stored: String = day_files
        .map(|p| {
            let opened = portcullis_audit::segment::open_segment(&std::fs::read(p).unwrap(), &ring);
            assert_eq!(opened.error, None);
            opened.plaintext
        })
        .collect();
    let options = VerifyOptions {
        trust_bundle: Some(TrustBundle::from_pem(ca.trust_bundle_pem().as_bytes()).unwrap()),
        ..VerifyOptions::default()
    };
    let report = verify_jsonl(&stored, "collector", options).unwrap_or_else(|p| panic!("{p}"));
    assert_eq!(report.records, 3);
    assert!(report.seals >= 1, "{report:?}");
    let last: Seal = stored
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .unwrap();
    assert_eq!(
        last.heads.values().map(|h| h.seq).max(),
        Some(2),
        "{last:?}"
    );
}

/// A stand-in for the operator's policy server on `https://localhost:<port>`: mutual
/// TLS with the CA's roots (so only a client certificate with clientAuth from that CA
/// gets through), answering tenant shop's audit key `key`; counts the answers.
async fn policy_server(
    ca: &CertificateAuthority,
    key: &DataKey,
    shutdown: CancellationToken,
) -> (String, Arc<AtomicUsize>) {
    let issued = ca
        .issue_server_certificate(&["localhost".to_owned()])
        .unwrap();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(
        CertificateDer::pem_slice_iter(ca.trust_bundle_pem().as_bytes()).map(Result::unwrap),
    );
    let provider = portcullis_tls::provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            issued.chain.clone(),
            PrivateKeyDer::Pkcs8(issued.key.clone_key()),
        )
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let answer = serde_json::json!({
        "tenant": "shop",
        "activeVersion": key.version(),
        "keys": {key.version().to_string(): base64::engine::general_purpose::STANDARD.encode(key.bytes())},
    })
    .to_string();
    let answered = Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    tokio::spawn(portcullis_server::serve(
        listener,
        Some(portcullis_server::ServerTls::Fixed(Arc::new(tls))),
        move |request: http::Request<hyper::body::Incoming>| {
            let (answer, count) = (answer.clone(), count.clone());
            async move {
                if request.uri().path() == "/v1/audit-key/shop" {
                    count.fetch_add(1, Ordering::SeqCst);
                    portcullis_server::full(http::StatusCode::OK, "application/json", answer)
                } else {
                    portcullis_server::error(http::StatusCode::NOT_FOUND, "no key")
                }
            }
        },
        shutdown,
    ));
    (format!("https://localhost:{port}"), answered)
}

#[tokio::test]
async fn tenant_days_are_sealed_under_the_key_the_operator_hands_the_audit_certificate() {
    let ca = new_ca();
    let dir = tempfile::tempdir().unwrap();
    write_serving_files(&ca, dir.path());
    let key = DataKey::new(4, [9; 32]);
    let stop_policy = CancellationToken::new();
    let (url, answered) = policy_server(&ca, &key, stop_policy.clone()).await;
    let mut settings = settings(dir.path());
    settings.keys = audit_server::KeySupply::Operator(url);
    let server = audit_server::start(settings, audit_server::ClusterAccess::none(365))
        .await
        .unwrap();

    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(
        CertificateDer::pem_slice_iter(ca.trust_bundle_pem().as_bytes()).map(Result::unwrap),
    );
    let (chain_der, workload_key) = workload_identity(&ca, "shop");
    let config = ClientConfig::builder_with_provider(portcullis_tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain_der, workload_key)
        .unwrap();
    let shipper = Shipper {
        config: Arc::new(config),
        addr: server.addr,
    };
    // Until the key is at hand the batch is refused whole (503) and resent, as a
    // proxy does.
    let batch = lines(&mut Chain::new("web-1-20270115"), 3);
    let mut answer = (0, String::new());
    for _ in 0..100 {
        let (status, body, _) = shipper.post(batch.clone()).await;
        answer = (status, body);
        if status != 503 {
            break;
        }
        assert!(answer.1.contains("data-encryption key"), "{}", answer.1);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(answer.0, 200, "{}", answer.1);
    assert!(answered.load(Ordering::SeqCst) >= 1);
    server.stop().await;
    stop_policy.cancel();

    let day = std::fs::read_dir(dir.path().join("data").join("shop"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "seg"))
        .unwrap();
    let bytes = std::fs::read(day).unwrap();
    let opened = portcullis_audit::segment::open_segment(
        &bytes,
        &portcullis_audit::KeyRing::from_keys([key]),
    );
    assert_eq!((opened.error, opened.key_version), (None, Some(4)));
    assert_eq!(
        opened
            .plaintext
            .lines()
            .filter(|l| l.contains("/v1/events/"))
            .count(),
        3
    );
}

/// The plaintext of every day file of `tenant` under `data`, opened with shop's key.
fn stored_days(data: &Path, tenant: &str) -> String {
    let ring = shop_keys().get("shop").unwrap().ring.clone();
    std::fs::read_dir(data.join(tenant))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .map(|p| {
            portcullis_audit::segment::open_segment(&std::fs::read(p).unwrap(), &ring).plaintext
        })
        .collect()
}

#[tokio::test]
async fn admin_records_spooled_during_a_collector_outage_are_handed_over_at_shutdown() {
    use portcullis_api::spiffe::{TenantId, WorkloadId};
    use portcullis_operator::webhook::{
        AdminAuditEvent, AdminAuditSink, AdminIdentity, AdminShipping, ChainedAdminAudit,
    };

    let ca = new_ca();
    let dir = tempfile::tempdir().unwrap();
    write_serving_files_for(&ca, dir.path(), "localhost");

    // The collector is down: its port closes every connection.
    let down = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = down.local_addr().unwrap();
    let refused = Arc::new(AtomicUsize::new(0));
    let refusing = {
        let refused = refused.clone();
        tokio::spawn(async move {
            loop {
                if down.accept().await.is_ok() {
                    refused.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };

    let operator = WorkloadId::new(td(), "portcullis-system", "portcullis-operator").unwrap();
    let identity = AdminIdentity::new(
        ca.clone(),
        operator.clone(),
        TenantId::new(td(), "portcullis-system").unwrap(),
    )
    .unwrap();
    let mut shipping = AdminShipping::new(
        format!("https://localhost:{}", addr.port()),
        dir.path().join("spool"),
    );
    // Far longer than the test: only the close can deliver what the outage refused.
    shipping.retry = portcullis_audit::retry::RetryPolicy {
        initial: Duration::from_secs(600),
        max: Duration::from_secs(600),
    };
    let audit = ChainedAdminAudit::new("portcullis-operator-0", Arc::new(identity), Some(shipping));
    for i in 0..3 {
        audit.record(AdminAuditEvent {
            action: "admin.key.create".into(),
            principal: "user:david@shop".into(),
            status: 201,
            object: format!("shop/key-{i}"),
            tenant: Some("shop".into()),
            time: Timestamp::now(),
        });
    }
    for _ in 0..200 {
        if refused.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        refused.load(Ordering::SeqCst) > 0,
        "the shipment met the outage"
    );

    // The collector comes back on its port; the operator is then told to stop.
    refusing.abort();
    let _ = refusing.await;
    let mut settings = settings(dir.path());
    settings.listen = addr;
    settings.admin_writer = Some(operator.to_string());
    let server = audit_server::start(settings, audit_server::ClusterAccess::none(365))
        .await
        .unwrap();
    audit.close(Duration::from_secs(5)).await;
    server.stop().await;

    let stored = stored_days(&dir.path().join("data"), "shop");
    let keys: Vec<&str> = stored
        .lines()
        .filter(|l| l.contains("admin.key.create"))
        .filter_map(|l| l.split("\"path\":\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(keys, ["shop/key-0", "shop/key-1", "shop/key-2"], "{stored}");
}

#[tokio::test]
async fn an_unusable_file_is_named_at_start() {
    let ca = new_ca();
    let dir = tempfile::tempdir().unwrap();
    write_serving_files(&ca, dir.path());
    std::fs::write(dir.path().join("tls.key"), "not a key").unwrap();
    let error = audit_server::start(settings(dir.path()), audit_server::ClusterAccess::none(365))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("tls.key") && error.contains("PEM"),
        "{error}"
    );
}
