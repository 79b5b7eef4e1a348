//! Which mTLS peers reach the app (issue 15): only workloads of the callee's own trust
//! domain and tenant, others only when the Tenant or the pod names them, never a
//! certificate whose pod is gone, and never an unmapped route unless configured. The
//! app learns the caller's tenant in its own header; `X-Portcullis-Tenant` stays the
//! callee's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use portcullis_crds::{AllowedPeer, RevokedCertificate};
use portcullis_sidecar::{config::ProxyConfig, run::proxy};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use support::{Harness, Identity, Options, TestClient, client};

const PURGE: &str = "/internal/admin/purge";

async fn purge(client: &TestClient) -> support::Reply {
    client
        .send(client::request("DELETE", PURGE, &[], ""))
        .await
        .unwrap()
}

fn assert_refused(reply: &support::Reply, status: u16, reason: &str) {
    assert_eq!(
        (reply.status, reply.reason().as_str()),
        (status, reason),
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
}

fn error_of(reply: &support::Reply) -> String {
    reply.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_peer_of_another_tenant_cannot_call_an_admin_route() {
    let h = Harness::start(Options::default()).await;
    let globex = "spiffe://test.local/ns/globex-prod/sa/api";
    let peer = h.client(Identity::Certificate(h.ca.workload(globex, Some("globex"))));
    let denied = purge(&peer).await;
    assert_refused(&denied, 403, "peer_tenant_not_allowed");
    let error = error_of(&denied);
    assert!(
        error.contains("globex") && error.contains("spec.allowedPeers"),
        "{error}"
    );
    assert_eq!(h.denials("peer_tenant_not_allowed", 403), 1.0);

    // A certificate that names no tenant is no member of this one either.
    let tenantless = h.client(Identity::Certificate(
        h.ca.workload("spiffe://test.local/ns/acme/sa/batch", None),
    ));
    assert_eq!(purge(&tenantless).await.reason(), "peer_tenant_not_allowed");
}

#[tokio::test]
async fn a_peer_of_another_trust_domain_cannot_call_an_admin_route() {
    let h = Harness::start(Options::default()).await;
    // Same CA, same namespace and tenant names, foreign trust domain.
    let foreign = "spiffe://evil.example/ns/acme/sa/proxy";
    let peer = h.client(Identity::Certificate(h.ca.workload(foreign, Some("acme"))));
    let denied = purge(&peer).await;
    assert_refused(&denied, 403, "peer_trust_domain_not_allowed");
    let error = error_of(&denied);
    assert!(
        error.contains("evil.example") && error.contains("test.local"),
        "{error}"
    );
}

#[tokio::test]
async fn a_tenant_uri_alone_is_no_workload_identity() {
    let h = Harness::start(Options::default()).await;
    let peer = h.client(Identity::Certificate(
        h.ca.with_uris(&["spiffe://test.local/tenant/acme".to_owned()]),
    ));
    let denied = purge(&peer).await;
    assert_refused(&denied, 401, "no_workload_identity");
}

#[tokio::test]
async fn peers_cannot_call_unmapped_admin_routes_by_default() {
    let h = Harness::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    h.ca.write_server_files(dir.path());
    // A proxy.yaml that says nothing about peers: the defaults decide.
    let text = format!(
        "inbound: {{listen: \"127.0.0.1:0\"}}
admin: {{listen: \"127.0.0.1:0\"}}
upstream: {{appPort: {app}}}
tls: {{certificate: {d}/server.pem, privateKey: {d}/server-key.pem, trustBundle: {d}/ca.pem}}
policy: {{file: {policy}}}
",
        app = h.echo.port(),
        d = dir.path().display(),
        policy = h.policy_path().display(),
    );
    let config = ProxyConfig::parse(&text, "proxy.yaml").unwrap();
    let running = proxy::start_default(config).await.unwrap();
    let same_tenant = h.ca.client("spiffe://test.local/ns/acme/sa/caller");
    let peer = TestClient::new(
        running.inbound_addr,
        &h.ca,
        Identity::Certificate(same_tenant),
    );
    support::wait_until(|| running.policy.load().is_some()).await;
    let denied = purge(&peer).await;
    assert_refused(&denied, 403, "no_scope_for_route");
    assert!(
        error_of(&denied).contains("spec.scopes"),
        "{}",
        error_of(&denied)
    );
    // Mapped routes stay open to the tenant's own workloads.
    assert_eq!(peer.get("/v1/events/1", &[]).await.status, 200);
    running.shutdown_token().cancel();
}

#[tokio::test]
async fn allowed_peers_of_the_tenant_get_in_and_the_app_learns_their_tenant() {
    let mut h = Harness::start(Options::default()).await;
    let globex = "spiffe://test.local/ns/globex-prod/sa/api";
    let peer = h.client(Identity::Certificate(h.ca.workload(globex, Some("globex"))));
    h.update_policy(|b| b.allowed_peers = vec![AllowedPeer::tenant("globex")])
        .await;
    let ok = peer
        .get("/v1/events/1", &[("x-portcullis-peer-tenant", "acme")])
        .await;
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    assert_eq!(
        ok.echoed_header("x-portcullis-principal").as_deref(),
        Some(globex)
    );
    assert_eq!(
        ok.echoed_header("x-portcullis-tenant").as_deref(),
        Some("acme")
    );
    assert_eq!(
        ok.echoed_header("x-portcullis-peer-tenant").as_deref(),
        Some("globex")
    );
    // By SPIFFE ID: only that workload.
    h.update_policy(|b| b.allowed_peers = vec![AllowedPeer::spiffe_id(globex)])
        .await;
    assert_eq!(peer.get("/v1/events/1", &[]).await.status, 200);
    let sibling = h.client(Identity::Certificate(h.ca.workload(
        "spiffe://test.local/ns/globex-prod/sa/other",
        Some("globex"),
    )));
    assert_eq!(
        sibling.get("/v1/events/1", &[]).await.reason(),
        "peer_tenant_not_allowed"
    );
    // The tenant's own workloads are told their own tenant.
    let own = h.client(Identity::Certificate(
        h.ca.client("spiffe://test.local/ns/acme/sa/caller"),
    ));
    let ok = own.get("/v1/events/1", &[]).await;
    assert_eq!(
        ok.echoed_header("x-portcullis-peer-tenant").as_deref(),
        Some("acme")
    );
}

#[tokio::test]
async fn a_certificate_of_a_deleted_pod_is_refused() {
    let mut h = Harness::start(Options::default()).await;
    let id = "spiffe://test.local/ns/acme/sa/caller";
    let issued = h.ca.client(id);
    let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
    let serial = portcullis_sidecar::tls::peer::leaf_facts(&der)
        .unwrap()
        .serial;
    let peer = h.client(Identity::Certificate(issued));
    assert_eq!(peer.get("/v1/events/1", &[]).await.status, 200);
    h.update_policy(|b| {
        b.revoked_certificates = vec![RevokedCertificate {
            serial: serial.clone(),
            spiffe_id: id.into(),
            not_after: jiff::Timestamp::now() + jiff::SignedDuration::from_hours(96),
        }]
    })
    .await;
    let denied = peer.get("/v1/events/1", &[]).await;
    assert_refused(&denied, 403, "peer_certificate_revoked");
    assert!(error_of(&denied).contains(&serial));
    // Another certificate of the same workload (the new pod's) is fine.
    let renewed = h.client(Identity::Certificate(h.ca.client(id)));
    assert_eq!(renewed.get("/v1/events/1", &[]).await.status, 200);
}
