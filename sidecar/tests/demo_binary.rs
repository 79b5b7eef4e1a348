//! Runs the `portcullis-proxy demo` binary and uses what it prints (DESIGN.md §5).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use support::{Identity, TestClient, ca::Issued, demo_process::DemoProcess};

fn client_for(demo: &DemoProcess, identity: Identity) -> TestClient {
    let ca_pem = std::fs::read_to_string(demo.path("ca")).unwrap();
    let ca = support::ca::TestCa::new("unused");
    let mut client = TestClient::new(
        format!("127.0.0.1:{}", demo.inbound_port).parse().unwrap(),
        &ca,
        identity.clone(),
    );
    // Trust the demo's CA, not the placeholder one.
    client = client.with_ca(&ca_pem, &identity);
    client
}

#[tokio::test]
async fn demo_prints_the_contract_lines_and_its_keys_work() {
    let mut demo = DemoProcess::spawn();
    let names: Vec<&str> = demo
        .lines
        .iter()
        .map(|l| l.split(':').next().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "ca",
            "client-cert",
            "client-key",
            "key identify",
            "key events",
            "key signals",
            "ready"
        ]
    );
    for file in ["ca", "client-cert", "client-key"] {
        assert!(demo.path(file).exists(), "{file} file exists");
        assert!(demo.path(file).starts_with(demo.dir.path()));
    }
    let key = |scope: &str| demo.values[&format!("key {scope}")].clone();
    let anonymous = client_for(&demo, Identity::Anonymous);
    assert_eq!(
        anonymous
            .post("/v1/identify", &[("x-api-key", &key("identify"))], "{}")
            .await
            .status,
        200
    );
    let bearer = format!("Bearer {}", key("events"));
    assert_eq!(
        anonymous
            .get("/v1/events/42", &[("authorization", &bearer)])
            .await
            .status,
        200
    );
    assert_eq!(
        anonymous
            .post("/v1/events/42", &[("authorization", &bearer)], "e")
            .await
            .status,
        200
    );
    let signals = anonymous
        .get("/v1/signals", &[("x-api-key", &key("signals"))])
        .await;
    assert_eq!(signals.status, 200);
    assert_eq!(
        signals.echoed_header("x-portcullis-tenant").as_deref(),
        Some("demo")
    );
    let wrong = anonymous
        .get("/v1/events/42", &[("x-api-key", &key("identify"))])
        .await;
    assert_eq!(
        (wrong.status, wrong.reason().as_str()),
        (403, "missing_scope")
    );

    let issued = Issued {
        cert_pem: std::fs::read_to_string(demo.path("client-cert")).unwrap(),
        key_pem: std::fs::read_to_string(demo.path("client-key")).unwrap(),
    };
    assert!(CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes()).count() >= 1);
    assert!(PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).is_ok());
    let peer = client_for(&demo, Identity::Certificate(issued));
    let ok = peer.get("/v1/anything", &[]).await;
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.echoed_header("x-portcullis-principal").as_deref(),
        Some("spiffe://demo.local/ns/demo/sa/client")
    );

    let admin = support::admin_get(
        format!("127.0.0.1:{}", demo.admin_port).parse().unwrap(),
        "/ready",
    )
    .await;
    assert!(admin.starts_with("HTTP/1.1 200"), "{admin}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let status = demo.terminate();
    assert!(status.success(), "demo exits cleanly on SIGTERM: {status}");

    // With --dir the demo keeps a verifiable audit trail next to its certificates.
    let audit = demo.dir.path().join("audit.jsonl");
    let report = portcullis_audit::files::verify_path(
        &audit,
        None,
        portcullis_audit::VerifyOptions::default(),
        |_| {},
    )
    .unwrap()
    .unwrap();
    assert_eq!(report.records, 6, "one record per request");
    assert!(report.checkpoints >= 1, "a final signed checkpoint");
    let text = std::fs::read_to_string(&audit).unwrap();
    for scope in ["identify", "events", "signals"] {
        assert!(
            !text.contains(&demo.values[&format!("key {scope}")]),
            "no key in the audit trail"
        );
    }
}
