//! The identity service over real TLS 1.3 on loopback, with scripted lookups.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use portcullis_api::clock::SystemClock;
use portcullis_api::identity::{IDENTITY_AUDIENCE, RefusalReason};
use portcullis_sidecar::control::identity::{
    Credentials, IdentityClient, IdentityEndpoint, IdentityError, IssueCertificate, WorkloadKey,
};
use prometheus_client::registry::Registry;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::ca::authenticator::{
    EXTRA_POD_NAME, EXTRA_POD_UID, PodFacts, StaticAuthenticator, TokenReviewOutcome,
};
use crate::ca::authority::{CaState, CertificateAuthority};
use crate::ca::identity_service::{IdentityService, IdentityServiceConfig};
use crate::ca::metrics::IdentityMetrics;

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

    /// POSTs `body` (or sends `method` to `path`) and returns status and JSON.
    async fn raw(&self, method: &str, path: &str, body: Vec<u8>) -> (u16, Value) {
        let config = ClientConfig::builder_with_provider(portcullis_tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(self.roots())
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("identity.test").unwrap(), tcp)
            .await
            .unwrap();
        assert_eq!(
            tls.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "identity.test")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn post(&self, csr: &str, token: &str) -> (u16, Value) {
        self.raw(
            "POST",
            "/v1/certificate",
            serde_json::to_vec(&json!({"csr": csr, "token": token})).unwrap(),
        )
        .await
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

fn lookups() -> StaticAuthenticator {
    let unbound = TokenReviewOutcome {
        authenticated: true,
        audiences: vec![IDENTITY_AUDIENCE.into()],
        username: "system:serviceaccount:acme-prod:api".into(),
        ..TokenReviewOutcome::default()
    };
    let mut other_audience = unbound.clone();
    other_audience.audiences = vec!["https://kubernetes.default.svc".into()];
    other_audience.extra = [
        (EXTRA_POD_NAME, "api-0"),
        (EXTRA_POD_UID, "uid-acme-prod-api-0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
    .collect();
    StaticAuthenticator::new()
        .with_workload("tok-good", "acme-prod", "api", "api-0", "acme")
        .with_workload("tok-gone", "ns-gone", "sa", "p", "acme")
        .without_pod("ns-gone", "p")
        .with_workload("tok-replaced", "ns-r", "sa", "p", "acme")
        .with_pod(
            "ns-r",
            "p",
            PodFacts {
                uid: "another".into(),
                service_account: "sa".into(),
                labels: Default::default(),
            },
        )
        .with_workload("tok-wrongsa", "ns-w", "sa", "p", "acme")
        .with_pod(
            "ns-w",
            "p",
            PodFacts {
                uid: "uid-ns-w-p".into(),
                service_account: "admin".into(),
                labels: Default::default(),
            },
        )
        .with_workload("tok-notenant", "ns-n", "sa", "p", "acme")
        .without_tenant("ns-n")
        .with_token("tok-unbound", unbound)
        .with_token("tok-aud", other_audience)
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

/// The DNS SANs of a PEM leaf.
fn dns_sans(pem: &str) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let der = der_of(pem).remove(0);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn the_certificate_names_exactly_the_services_that_select_the_pod() {
    let lookups = lookups()
        .with_pod_labels("acme-prod", "api-0", &[("app", "api"), ("track", "stable")])
        .with_service("acme-prod", "api", &[("app", "api")])
        .with_service(
            "acme-prod",
            "api-stable",
            &[("app", "api"), ("track", "stable")],
        )
        .with_service(
            "acme-prod",
            "api-canary",
            &[("app", "api"), ("track", "canary")],
        )
        .with_service("acme-prod", "web", &[("app", "web")]);
    let running = start(lookups).await;
    let id = workload("acme-prod", "api");
    let key = WorkloadKey::generate().unwrap();
    let (status, body) = running.post(&key.csr_pem(&id).unwrap(), "tok-good").await;
    assert_eq!(status, 200, "{body}");
    let expected = [
        "api.acme-prod.svc",
        "api.acme-prod.svc.cluster.local",
        "api-stable.acme-prod.svc",
        "api-stable.acme-prod.svc.cluster.local",
    ];
    assert_eq!(dns_sans(body["certificate"].as_str().unwrap()), expected);
    assert_eq!(body["dnsNames"], json!(expected));
    assert_eq!(body["namesRevision"].as_str().map(str::len), Some(16));

    // A pod no Service selects gets no DNS name, only its SPIFFE IDs.
    let running = start(lookups_without_services()).await;
    let (status, body) = running.post(&key.csr_pem(&id).unwrap(), "tok-good").await;
    assert_eq!(status, 200, "{body}");
    assert!(dns_sans(body["certificate"].as_str().unwrap()).is_empty());
}

fn lookups_without_services() -> StaticAuthenticator {
    lookups()
        .with_pod_labels("acme-prod", "api-0", &[("app", "api")])
        .with_service("acme-prod", "web", &[("app", "web")])
}

#[tokio::test]
async fn each_refusal_has_its_status_reason_and_metric() {
    let running = start(lookups()).await;
    let key = p256();
    let me = workload("acme-prod", "api");
    let csr_of = |ns: &str, sa: &str| good_csr(&key, &workload(ns, sa));
    let me_uri = me.to_string();
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let cases: Vec<(String, &str, u16, &str)> = vec![
        (
            csr_of("acme-prod", "api"),
            "tok-unknown",
            401,
            "TokenInvalid",
        ),
        (csr_of("acme-prod", "api"), "tok-aud", 401, "WrongAudience"),
        (
            csr_of("acme-prod", "api"),
            "tok-unbound",
            403,
            "TokenNotBoundToPod",
        ),
        (csr_of("ns-gone", "sa"), "tok-gone", 403, "PodNotFound"),
        (csr_of("ns-r", "sa"), "tok-replaced", 403, "PodMismatch"),
        (
            csr_of("ns-w", "sa"),
            "tok-wrongsa",
            403,
            "ServiceAccountMismatch",
        ),
        (csr_of("ns-n", "sa"), "tok-notenant", 403, "NoTenant"),
        ("not a csr".into(), "tok-good", 400, "CsrInvalid"),
        (
            csr_with(
                &key,
                vec![uri(&me_uri)],
                rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained),
            ),
            "tok-good",
            400,
            "CsrHasCaFlag",
        ),
        (
            csr_with(
                &key,
                vec![
                    uri(&me_uri),
                    rcgen::SanType::DnsName("x.example".try_into().unwrap()),
                ],
                rcgen::IsCa::NoCa,
            ),
            "tok-good",
            400,
            "CsrExtraSans",
        ),
        (
            csr_of("acme-prod", "admin"),
            "tok-good",
            400,
            "CsrWrongIdentity",
        ),
        (good_csr(&p384, &me), "tok-good", 400, "UnsupportedKey"),
    ];
    for (csr, token, status, reason) in &cases {
        let (got_status, body) = running.post(csr, token).await;
        assert_eq!(
            (got_status, body["reason"].as_str().unwrap_or_default()),
            (*status, *reason),
            "{body}"
        );
        assert!(!body["error"].as_str().unwrap_or_default().is_empty());
        assert!(
            !body.to_string().contains(token),
            "the token must not be echoed: {body}"
        );
    }

    let (status, body) = running
        .raw("POST", "/v1/certificate", b"{not json".to_vec())
        .await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (400, Some("MalformedRequest"))
    );
    let (status, _) = running.raw("GET", "/v1/certificate", Vec::new()).await;
    assert_eq!(status, 405);
    let (status, body) = running.raw("POST", "/v2/anything", Vec::new()).await;
    assert_eq!((status, body["reason"].as_str()), (404, Some("NotFound")));

    let metrics = running.metrics_text();
    for (_, _, _, reason) in &cases {
        let line = format!("portcullis_identity_issuance_failures_total{{reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&line), "missing {line} in\n{metrics}");
    }
    assert!(
        metrics
            .contains("portcullis_identity_issuance_failures_total{reason=\"MalformedRequest\"} 1")
    );
    assert!(!metrics.contains("portcullis_identity_certificates_issued_total 1"));
    let root_expiry = running.ca.expiry().root.as_second();
    assert!(
        metrics.contains(&format!(
            "portcullis_identity_ca_expiry_seconds{{kind=\"root\"}} {root_expiry}"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("portcullis_identity_ca_expiry_seconds{kind=\"intermediate\"}"));
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

#[tokio::test]
async fn tls12_clients_are_refused() {
    let running = start(lookups()).await;
    let config = ClientConfig::builder_with_provider(portcullis_tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(running.roots())
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(running.addr).await.unwrap();
    let err = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("identity.test").unwrap(), tcp)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ProtocolVersion"), "{err}");
}
