//! `run --config proxy.yaml` without Kubernetes: the `audit:` section (encrypted file
//! sink, checkpoints signed with the TLS key; shipping to an audit collector) and the
//! `outbound:` listener.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use portcullis_audit::{DataKey, Entry, KeyRing, VerifyOptions, files::verify_path};
use portcullis_sidecar::{config::ProxyConfig, run::proxy};
use support::{Harness, Identity, Options, admin_get, cluster::outbound_request, wait_until};

fn yaml(h: &Harness, dir: &std::path::Path, extra: &str) -> String {
    h.ca.write_server_files(dir);
    format!(
        "inbound: {{listen: \"127.0.0.1:0\"}}
admin: {{listen: \"127.0.0.1:0\"}}
upstream: {{appPort: {app}}}
tls: {{certificate: {d}/server.pem, privateKey: {d}/server-key.pem, trustBundle: {d}/ca.pem}}
policy: {{file: {policy}}}
{extra}",
        app = h.echo.port(),
        d = dir.display(),
        policy = h.policy_path().display(),
    )
}

#[tokio::test]
async fn the_audit_section_writes_an_encrypted_verifiable_trail() {
    let h = Harness::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("audit.key"), [9u8; 32]).unwrap();
    let text = yaml(
        &h,
        dir.path(),
        &format!(
            "audit:
  pod: edge-1
  sinks:
    - file: {{dir: {d}/audit, keyFile: {d}/audit.key, keyVersion: 4}}
",
            d = dir.path().display()
        ),
    );
    let config = ProxyConfig::parse(&text, "proxy.yaml").unwrap();
    let running = proxy::start_default(config).await.unwrap();
    let trail = running.audit.clone().unwrap();
    wait_until(|| trail.is_running()).await;
    assert!(
        admin_get(running.admin_addr, "/ready")
            .await
            .starts_with("HTTP/1.1 200")
    );
    let identity = admin_get(running.admin_addr, "/identity").await;
    assert!(
        identity.contains("-----BEGIN CERTIFICATE-----"),
        "{identity}"
    );

    let client = support::TestClient::new(running.inbound_addr, &h.ca, Identity::Anonymous);
    let key = h.token("events");
    assert_eq!(
        client
            .get("/v1/events/1", &[("x-api-key", key)])
            .await
            .status,
        200
    );
    assert_eq!(
        client
            .get("/v1/identify", &[("x-api-key", key)])
            .await
            .status,
        403
    );
    running.shutdown_token().cancel();
    tokio::time::timeout(Duration::from_secs(30), running.wait())
        .await
        .unwrap();

    let audit = dir.path().join("audit");
    let ring = KeyRing::from_keys([DataKey::new(4, [9u8; 32])]);
    let report = verify_path(&audit, Some(&ring), VerifyOptions::default(), |_| {})
        .unwrap()
        .unwrap();
    assert_eq!(report.records, 2);
    assert!(report.checkpoints >= 1);
    let mut checkpoints = Vec::new();
    let mut records = Vec::new();
    portcullis_audit::files::for_each_line(
        &portcullis_audit::files::list_inputs(&audit).unwrap()[0],
        0,
        Some(&ring),
        |line, _| match Entry::from_json_line(line).unwrap() {
            Entry::Checkpoint(c) => checkpoints.push(c),
            Entry::Record(r) => records.push(r),
        },
    )
    .unwrap();
    assert_eq!(records[0].pod, "edge-1");
    assert_eq!(
        records[0].principal,
        format!("key:{}", h.tokens["events"].masked())
    );
    assert_eq!(
        checkpoints[0].signer.spiffe_id.as_deref(),
        Some("spiffe://test.local/ns/acme/sa/proxy"),
        "signed with the TLS key, naming its certificate"
    );
}

/// An audit collector in process on 127.0.0.1 with `ca`'s localhost certificate,
/// trusting `ca`'s workloads of trust domain test.local; tenant acme's key is at hand.
async fn collector(
    ca: &support::TestCa,
    dir: &std::path::Path,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<
        std::sync::Mutex<portcullis_collector::Collector<portcullis_collector::FileStore>>,
    >,
    tokio_util::sync::CancellationToken,
) {
    use portcullis_collector::{Collector, FileStore, Ingest, IngestMetrics, KeyCache};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    use std::sync::{Arc, Mutex};

    let keys = KeyCache::new();
    keys.insert(portcullis_audit::TenantKeys::generate("acme"));
    let collector = Arc::new(Mutex::new(
        Collector::open(
            FileStore::open(dir, Arc::new(keys)).unwrap(),
            Arc::new(portcullis_api::clock::SystemClock),
        )
        .unwrap(),
    ));
    let ingest = Ingest::new(
        collector.clone(),
        portcullis_api::spiffe::TrustDomain::new("test.local").unwrap(),
        IngestMetrics::default(),
    );
    let issued = ca.server();
    let chain = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
    let tls = portcullis_collector::server_config(chain, key, ca.root_store()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(portcullis_server::serve(
        listener,
        Some(Arc::new(tls).into()),
        move |request| ingest.clone().handle(request),
        shutdown.clone(),
    ));
    (addr, collector, shutdown)
}

#[tokio::test]
async fn the_audit_section_ships_the_chain_to_a_collector_over_mtls() {
    let h = Harness::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (addr, collector, stop_collector) = collector(&h.ca, &dir.path().join("collector")).await;
    // The proxy's own certificate (workload and tenant acme) is its client certificate.
    let text = yaml(
        &h,
        dir.path(),
        &format!(
            "audit:
  pod: edge-1
  sinks:
    - collector: {{url: \"https://localhost:{port}\", caFile: {d}/ca.pem, certFile: {d}/server.pem, keyFile: {d}/server-key.pem, spoolDir: {d}/spool}}
",
            port = addr.port(),
            d = dir.path().display()
        ),
    );
    let config = ProxyConfig::parse(&text, "proxy.yaml").unwrap();
    let running = proxy::start_default(config).await.unwrap();
    let trail = running.audit.clone().unwrap();
    wait_until(|| trail.is_running()).await;
    let client = support::TestClient::new(running.inbound_addr, &h.ca, Identity::Anonymous);
    let key = h.token("events");
    for i in 0..3 {
        let path = format!("/v1/events/{i}");
        assert_eq!(client.get(&path, &[("x-api-key", key)]).await.status, 200);
    }
    running.shutdown_token().cancel();
    tokio::time::timeout(Duration::from_secs(30), running.wait())
        .await
        .unwrap();

    let lines = collector.lock().unwrap().entries("acme").unwrap();
    stop_collector.cancel();
    let paths: Vec<String> = lines
        .iter()
        .filter_map(|line| match Entry::from_json_line(line).unwrap() {
            Entry::Record(record) => Some(record.path),
            Entry::Checkpoint(_) => None,
        })
        .collect();
    assert_eq!(paths, ["/v1/events/0", "/v1/events/1", "/v1/events/2"]);
    let report = portcullis_audit::verify::verify_jsonl(
        &lines.join("\n"),
        "collector",
        VerifyOptions::default(),
    )
    .unwrap_or_else(|p| panic!("{p}"));
    assert!(
        report.checkpoints >= 1,
        "the last checkpoint was shipped too"
    );
}

#[tokio::test]
async fn an_unusable_collector_client_certificate_stops_the_start_naming_the_file() {
    let h = Harness::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.pem"), "not a certificate").unwrap();
    let text = yaml(
        &h,
        dir.path(),
        &format!(
            "audit:
  sinks:
    - collector: {{url: \"https://localhost:1\", caFile: {d}/ca.pem, certFile: {d}/bad.pem, keyFile: {d}/server-key.pem, spoolDir: {d}/spool}}
",
            d = dir.path().display()
        ),
    );
    let config = ProxyConfig::parse(&text, "proxy.yaml").unwrap();
    let error = match proxy::start_default(config).await {
        Ok(_) => panic!("the proxy started with an unusable client certificate"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("audit.sinks[0].collector") && error.contains("bad.pem"),
        "{error}"
    );
}

#[tokio::test]
async fn the_outbound_listener_reaches_a_peer_proxy_over_mtls() {
    let server = Harness::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let text = yaml(
        &server,
        dir.path(),
        "outbound: {listen: \"127.0.0.1:0\", keepPort: true}\n",
    );
    let config = ProxyConfig::parse(&text, "proxy.yaml").unwrap();
    let client = proxy::start_default(config).await.unwrap();
    let outbound = client.outbound_addr.unwrap();
    let reply = outbound_request(outbound, server.proxy.inbound_addr, "/v1/anything", &[]).await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(
        reply.echoed_header("x-portcullis-principal").as_deref(),
        Some("spiffe://test.local/ns/acme/sa/proxy")
    );
    let mismatch = outbound_request(
        outbound,
        server.proxy.inbound_addr,
        "/v1/anything",
        &[(
            "x-portcullis-expect-identity",
            "spiffe://test.local/ns/acme/sa/other",
        )],
    )
    .await;
    assert_eq!(
        (mismatch.status, mismatch.reason().as_str()),
        (502, "peer_identity_mismatch")
    );
    client.shutdown_token().cancel();
}
