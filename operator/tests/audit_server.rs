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
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use jiff::Timestamp;
use portcullis_api::audit_ship::{CONTENT_TYPE, RECORDS_PATH, ShipAck};
use portcullis_audit::verify::{TrustBundle, VerifyOptions, verify_jsonl};
use portcullis_audit::{AuditRecord, Chain, Entry, Seal};
use portcullis_operator::audit_server::{self, AuditServerSettings};
use portcullis_operator::ca::CertificateAuthority;
use portcullis_operator::ca::certs::{pem_block, pem_encode};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

#[path = "support/ca.rs"]
mod ca_support;
use ca_support::{new_ca, td, workload_identity};

const SERVICE: &str = "portcullis-audit.portcullis-system.svc";

/// Writes a fresh serving certificate for the audit Service into `dir` as a
/// `kubernetes.io/tls` Secret mount holds it; returns the leaf.
fn write_serving_files(ca: &CertificateAuthority, dir: &Path) -> CertificateDer<'static> {
    let issued = ca.issue_server_certificate(&[SERVICE.to_owned()]).unwrap();
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
    }
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
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl") && !p.ends_with("chains.jsonl"));
    let stored: String = day_files
        .map(|p| std::fs::read_to_string(p).unwrap())
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
