//! The identity service (8443) under connection floods: idle and half-open connections
//! from one source neither lock other workloads out nor stay open forever.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod flood;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use jiff::Timestamp;
use portcullis_api::clock::SystemClock;
use portcullis_api::spiffe::TrustDomain;
use portcullis_operator::ca::{
    CaSettings, CaState, CertificateAuthority, IdentityMetrics, IdentityService,
    IdentityServiceConfig, StaticAuthenticator,
};
use portcullis_server::ConnectionLimits;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const NAME: &str = "identity.test";

struct Server {
    addr: std::net::SocketAddr,
    client: Arc<ClientConfig>,
    shutdown: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(limits: ConnectionLimits) -> Server {
    let settings = CaSettings::new(TrustDomain::new("cluster.local").unwrap());
    let state = CaState::generate(&settings, Timestamp::now()).unwrap();
    let ca = Arc::new(CertificateAuthority::new(
        settings,
        state,
        Arc::new(SystemClock),
    ));
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.trust_bundle_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let client = Arc::new(
        ClientConfig::builder_with_provider(portcullis_tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let service = Arc::new(IdentityService::new(
        ca,
        Arc::new(StaticAuthenticator::new()),
        IdentityMetrics::default(),
    ));
    let bound = service
        .bind(IdentityServiceConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            server_names: vec![NAME.into()],
            limits,
            ..IdentityServiceConfig::default()
        })
        .await
        .unwrap();
    let addr = bound.local_addr();
    let shutdown = CancellationToken::new();
    tokio::spawn(bound.serve(shutdown.clone()));
    Server {
        addr,
        client,
        shutdown,
    }
}

/// A certificate request from [`flood::BYSTANDER`] (a malformed one: any answer shows
/// the service is reachable); the status and the refusal reason.
async fn bystander_asks(server: &Server) -> (u16, Value) {
    let request = http::Request::post("/v1/certificate")
        .header("host", NAME)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let (status, body) = tokio::time::timeout(
        flood::HANG,
        flood::request_from(flood::BYSTANDER, server.addr, &server.client, NAME, request),
    )
    .await
    .expect("the identity service hung behind idle connections")
    .unwrap();
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_lock_workloads_out_of_identity() {
    let server = start(flood::tight_limits()).await;
    let _flood = flood::flood(server.addr, &server.client, NAME, 8).await;
    let (status, body) = bystander_asks(&server).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["reason"], "MalformedRequest");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_identity_connections_are_closed_even_while_pinging() {
    let server = start(flood::tight_limits()).await;
    assert!(
        flood::pinging_h2_is_closed(server.addr, &server.client, NAME).await,
        "an HTTP/2 connection that only pings is never closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_hold_more_than_its_share_of_identity_connections() {
    let server = start(ConnectionLimits {
        max_connections: 64,
        max_connections_per_source: 4,
        ..flood::tight_limits()
    })
    .await;
    let mut silent = Vec::new();
    for _ in 0..6 {
        silent.push(flood::connect_from(flood::ATTACKER, server.addr).await);
    }
    assert!(
        flood::closed_by_server(&mut silent[5]).await,
        "a fifth connection from one source is held (handshake timeout 60 s)"
    );
    assert_eq!(bystander_asks(&server).await.0, 400);
}
