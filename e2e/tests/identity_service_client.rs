//! The proxy's real identity client against the operator's identity service, over
//! real TLS 1.3 on loopback, with scripted lookups: a certificate is issued and fits
//! the proxy's credentials, and refusals and a foreign CA surface as the client's
//! errors. (The service alone, over raw HTTP, is tested in the operator's unit tests,
//! `operator/src/ca/tests/service.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use jiff::Timestamp;
use portcullis_operator::ca::{
    CaSettings, CaState, CertificateAuthority, IdentityMetrics, IdentityService,
    IdentityServiceConfig, StaticAuthenticator,
};
use portcullis_sidecar::control::identity::{
    Credentials, IdentityClient, IdentityEndpoint, IdentityError, IssueCertificate, RefusalReason,
    SystemClock, TenantId, TrustDomain, WorkloadId, WorkloadKey,
};
use prometheus_client::registry::Registry;
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;

fn td() -> TrustDomain {
    TrustDomain::new("td").unwrap()
}

fn settings() -> CaSettings {
    CaSettings::new(td())
}

fn workload(ns: &str, sa: &str) -> WorkloadId {
    WorkloadId::new(td(), ns, sa).unwrap()
}

fn tenant(name: &str) -> TenantId {
    TenantId::new(td(), name).unwrap()
}

fn der_of(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// Verifies `leaf` + `chain` as a client certificate against `bundle` at `at`, the way
/// a sidecar's inbound side does (rustls WebPkiClientVerifier).
fn verify_client_chain(
    leaf: &str,
    chain: &str,
    bundle: &str,
    at: Timestamp,
) -> Result<(), rustls::Error> {
    use rustls::server::WebPkiClientVerifier;
    let mut roots = RootCertStore::empty();
    for root in der_of(bundle) {
        roots.add(root).unwrap();
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        portcullis_sidecar::tls::provider(),
    )
    .build()
    .unwrap();
    let at = rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        at.as_second() as u64,
    ));
    verifier
        .verify_client_cert(&der_of(leaf)[0], &der_of(chain), at)
        .map(|_| ())
}

struct Running {
    addr: SocketAddr,
    ca: Arc<CertificateAuthority>,
    registry: Registry,
    shutdown: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Running {
    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(der_of(&self.ca.trust_bundle_pem()));
        roots
    }

    fn metrics_text(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).unwrap();
        out
    }

    fn client(&self, token: &str, dir: &tempfile::TempDir) -> IdentityClient {
        let path = dir.path().join(format!("token-{token}"));
        std::fs::write(&path, format!("{token}\n")).unwrap();
        let endpoint = IdentityEndpoint::parse(&format!("https://127.0.0.1:{}", self.addr.port()))
            .unwrap()
            .with_server_name("identity.test")
            .unwrap();
        IdentityClient::new(endpoint, path)
    }
}

async fn start(lookups: StaticAuthenticator) -> Running {
    let s = settings();
    let ca = Arc::new(CertificateAuthority::new(
        s.clone(),
        CaState::generate(&s, Timestamp::now()).unwrap(),
        Arc::new(SystemClock),
    ));
    let mut registry = Registry::default();
    let metrics = IdentityMetrics::register(&mut registry);
    let service = Arc::new(IdentityService::new(ca.clone(), Arc::new(lookups), metrics));
    let config = IdentityServiceConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        server_names: vec!["identity.test".into()],
        ..IdentityServiceConfig::default()
    };
    let bound = service.bind(config).await.unwrap();
    let addr = bound.local_addr();
    let shutdown = CancellationToken::new();
    tokio::spawn(bound.serve(shutdown.clone()));
    Running {
        addr,
        ca,
        registry,
        shutdown,
    }
}

/// `tok-good`: acme-prod/api in pod api-0 of tenant acme; `tok-notenant`: a namespace
/// that belongs to no tenant.
fn lookups() -> StaticAuthenticator {
    StaticAuthenticator::new()
        .with_workload("tok-good", "acme-prod", "api", "api-0", "acme")
        .with_workload("tok-notenant", "ns-n", "sa", "p", "acme")
        .without_tenant("ns-n")
}

#[tokio::test]
async fn issues_to_a_real_client_over_tls13() {
    let running = start(lookups()).await;
    let dir = tempfile::tempdir().unwrap();
    let id = workload("acme-prod", "api");
    let key = WorkloadKey::generate().unwrap();
    let issued = running
        .client("tok-good", &dir)
        .issue(&key.csr_pem(&id).unwrap(), &running.roots())
        .await
        .unwrap();
    let credentials = Credentials::from_issued(&key, &id, &issued, Timestamp::now()).unwrap();
    assert_eq!(credentials.workload(), &id);
    assert_eq!(credentials.tenant(), Some(&tenant("acme")));
    let lifetime = issued.expires_at.duration_since(Timestamp::now()).as_secs();
    assert!(
        (96 * 3600 - 60..=96 * 3600).contains(&lifetime),
        "{lifetime}"
    );
    verify_client_chain(
        &issued.certificate,
        &issued.chain,
        &issued.trust_bundle,
        Timestamp::now(),
    )
    .unwrap();
    assert!(
        running
            .metrics_text()
            .contains("portcullis_identity_certificates_issued_total 1")
    );
}

#[tokio::test]
async fn the_real_client_reports_refusals_with_their_reason() {
    let running = start(lookups()).await;
    let dir = tempfile::tempdir().unwrap();
    let id = workload("ns-n", "sa");
    let key = WorkloadKey::generate().unwrap();
    let err = running
        .client("tok-notenant", &dir)
        .issue(&key.csr_pem(&id).unwrap(), &running.roots())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            IdentityError::Refused {
                status: 403,
                reason: Some(RefusalReason::NoTenant),
                ..
            }
        ),
        "{err}"
    );
    // Trusting another CA, the client refuses the service's certificate.
    let stranger = CaState::generate(&settings(), Timestamp::now()).unwrap();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(der_of(&stranger.trust_bundle_pem()));
    let err = running
        .client("tok-good", &dir)
        .issue(&key.csr_pem(&workload("acme-prod", "api")).unwrap(), &roots)
        .await
        .unwrap_err();
    assert!(matches!(err, IdentityError::Tls(_)), "{err}");
}
