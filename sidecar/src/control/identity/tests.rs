//! Store, TLS glue and renew-loop tests against a throwaway CA.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use jiff::Timestamp;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};
use tokio_util::sync::CancellationToken;

use rustls::sign::SingleCertAndKey;

use super::test_util::TestCa;
use super::*;
use crate::tls::{self, ClientAuth, CredentialStore, TlsSettings};

fn td() -> TrustDomain {
    TrustDomain::new("td").unwrap()
}

fn workload(sa: &str) -> WorkloadId {
    WorkloadId::new(td(), "ns1", sa).unwrap()
}

fn credentials(ca: &TestCa, id: &WorkloadId, lifetime: Duration) -> Credentials {
    let key = WorkloadKey::generate().unwrap();
    // Whole seconds, as in certificates, so interval arithmetic is exact.
    let now = Timestamp::from_second(Timestamp::now().as_second()).unwrap();
    let issued = ca.sign(&key.csr_pem(id).unwrap(), Some("acme"), now, lifetime);
    Credentials::from_issued(&key, id, &issued, now).unwrap()
}

fn store_with(ca: &TestCa, id: &WorkloadId) -> CertificateStore {
    let store = CertificateStore::new();
    store.swap(credentials(ca, id, Duration::from_secs(3600)));
    store
}

#[test]
fn credentials_from_a_matching_answer() {
    let ca = TestCa::new("a");
    let id = workload("api");
    let creds = credentials(&ca, &id, Duration::from_secs(3600));
    assert_eq!(creds.workload(), &id);
    assert_eq!(creds.tenant().map(|t| t.tenant()), Some("acme"));
    assert_eq!(creds.certified_key().cert.len(), 2, "leaf + intermediate");
    assert_eq!(creds.trust_bundle().len(), 1);
    let lifetime = creds
        .not_after()
        .duration_since(creds.not_before())
        .as_secs();
    assert_eq!(lifetime, 3600 + 60);
}

#[test]
fn credentials_refuse_a_leaf_for_another_identity() {
    let ca = TestCa::new("a");
    let key = WorkloadKey::generate().unwrap();
    let issued = ca.sign(
        &key.csr_pem(&workload("other")).unwrap(),
        None,
        Timestamp::now(),
        Duration::from_secs(60),
    );
    let err =
        Credentials::from_issued(&key, &workload("api"), &issued, Timestamp::now()).unwrap_err();
    assert!(
        matches!(&err, IdentityError::InvalidResponse(m) if m.contains("expected spiffe://td/ns/ns1/sa/api")),
        "{err}"
    );
}

#[test]
fn credentials_refuse_a_leaf_for_another_key() {
    let ca = TestCa::new("a");
    let id = workload("api");
    let (ours, theirs) = (
        WorkloadKey::generate().unwrap(),
        WorkloadKey::generate().unwrap(),
    );
    let issued = ca.sign(
        &theirs.csr_pem(&id).unwrap(),
        None,
        Timestamp::now(),
        Duration::from_secs(60),
    );
    let err = Credentials::from_issued(&ours, &id, &issued, Timestamp::now()).unwrap_err();
    assert!(
        matches!(&err, IdentityError::InvalidResponse(m) if m.contains("not for our key")),
        "{err}"
    );
}

#[test]
fn credentials_refuse_a_chain_outside_the_bundle() {
    let (ca, other) = (TestCa::new("a"), TestCa::new("b"));
    let id = workload("api");
    let key = WorkloadKey::generate().unwrap();
    let mut issued = ca.sign(
        &key.csr_pem(&id).unwrap(),
        None,
        Timestamp::now(),
        Duration::from_secs(60),
    );
    issued.trust_bundle = other.root_pem.clone();
    let err = Credentials::from_issued(&key, &id, &issued, Timestamp::now()).unwrap_err();
    assert!(
        matches!(&err, IdentityError::InvalidResponse(m) if m.contains("does not verify")),
        "{err}"
    );
    issued.trust_bundle = "not pem".into();
    assert!(Credentials::from_issued(&key, &id, &issued, Timestamp::now()).is_err());
}

/// A TLS credentials store fed by `store`, as the proxy wires one.
fn tls_of(store: &CertificateStore, client_auth: ClientAuth) -> CredentialStore {
    let tls = CredentialStore::new(TlsSettings {
        client_auth,
        client_trust_domain: Some(td()),
        peer_trust_domain: Some(td()),
        serving: None,
    })
    .unwrap();
    store.feed(&tls).unwrap();
    tls
}

/// The peer client config of `store`'s credentials.
fn client_config(store: &CertificateStore) -> Result<ClientConfig, crate::tls::TlsError> {
    let config = tls_of(store, ClientAuth::Optional).peer_client()()?;
    Ok((*config).clone())
}

async fn handshake(
    server: &CredentialStore,
    client_config: ClientConfig,
) -> Result<
    (
        server::TlsStream<DuplexStream>,
        client::TlsStream<DuplexStream>,
    ),
    String,
> {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(server.server_configs().current());
    let connector = TlsConnector::from(Arc::new(client_config));
    let name = ServerName::try_from("peer.invalid").unwrap();
    let (s, c) = tokio::join!(acceptor.accept(a), connector.connect(name, b));
    match (s, c) {
        (Ok(s), Ok(c)) => Ok((s, c)),
        (s, c) => Err(format!("server: {:?} / client: {:?}", s.err(), c.err())),
    }
}

fn serial(certs: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> Vec<u8> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(&certs.unwrap()[0]).unwrap();
    cert.raw_serial().to_vec()
}

#[tokio::test]
async fn mutual_tls_identifies_both_sides_and_survives_a_swap() {
    let ca = TestCa::new("a");
    let server_store = store_with(&ca, &workload("server"));
    let client_store = store_with(&ca, &workload("client"));
    let server_tls = tls_of(&server_store, ClientAuth::Required);

    let (mut s, mut c) = handshake(&server_tls, client_config(&client_store).unwrap())
        .await
        .unwrap();
    let seen_by_server = tls::peer::peer_identity(s.get_ref().1.peer_certificates()).unwrap();
    assert_eq!(seen_by_server.workload, workload("client"));
    assert_eq!(seen_by_server.tenant.unwrap().tenant(), "acme");
    let seen_by_client = tls::peer::peer_identity(c.get_ref().1.peer_certificates()).unwrap();
    assert_eq!(seen_by_client.workload, workload("server"));
    assert_eq!(
        c.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let first_serial = serial(c.get_ref().1.peer_certificates());

    // Rotate the server's certificate: the open connection keeps working...
    server_store.swap(credentials(
        &ca,
        &workload("server"),
        Duration::from_secs(3600),
    ));
    c.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");

    // ...and a new handshake presents the new certificate.
    let (_s2, c2) = handshake(&server_tls, client_config(&client_store).unwrap())
        .await
        .unwrap();
    assert_ne!(serial(c2.get_ref().1.peer_certificates()), first_serial);
}

#[tokio::test]
async fn clients_outside_the_bundle_or_without_certificates_are_refused() {
    let (ca, other) = (TestCa::new("a"), TestCa::new("b"));
    let server_store = store_with(&ca, &workload("server"));

    // A client from another CA: each side refuses the other.
    let stranger = store_with(&other, &workload("client"));
    assert!(
        handshake(
            &tls_of(&server_store, ClientAuth::Required),
            client_config(&stranger).unwrap()
        )
        .await
        .is_err()
    );

    // A client that trusts us but has no certificate.
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(server_store.load().unwrap().trust_bundle().iter().cloned());
    let anonymous = ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(server_store.load().unwrap().server_verifier())
        .with_no_client_auth();
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(
        tls_of(&server_store, ClientAuth::Required)
            .server_configs()
            .current(),
    );
    let name = ServerName::try_from("peer.invalid").unwrap();
    let (s, _c) = tokio::join!(
        acceptor.accept(a),
        TlsConnector::from(Arc::new(anonymous)).connect(name, b)
    );
    let err = s.unwrap_err().to_string();
    assert!(
        err.contains("peer sent no certificates") || err.contains("NoCertificatesPresented"),
        "{err}"
    );
}

#[tokio::test]
async fn tls12_clients_get_a_protocol_version_alert() {
    let ca = TestCa::new("a");
    let server_store = store_with(&ca, &workload("server"));
    let client_store = store_with(&ca, &workload("client"));
    let tls12 = ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(client_store.load().unwrap().server_verifier())
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(
            client_store.load().unwrap().certified_key().clone(),
        )));
    let err = handshake(&tls_of(&server_store, ClientAuth::Required), tls12)
        .await
        .unwrap_err();
    assert!(err.contains("ProtocolVersion"), "{err}");
}

#[tokio::test]
async fn an_empty_store_refuses_handshakes() {
    let ca = TestCa::new("a");
    let empty = CertificateStore::new();
    let client_store = store_with(&ca, &workload("client"));
    assert!(!empty.is_ready());
    assert!(
        handshake(
            &tls_of(&empty, ClientAuth::Required),
            client_config(&client_store).unwrap()
        )
        .await
        .is_err()
    );
}

#[test]
fn renewal_time_applies_bounded_jitter() {
    let ca = TestCa::new("a");
    let creds = credentials(&ca, &workload("api"), Duration::from_secs(1000));
    let received = creds.not_before() + jiff::SignedDuration::from_secs(60);
    let settings = RenewalSettings {
        rotation_period: Duration::from_secs(999),
        ..RenewalSettings::default()
    };
    // The CA asked for renewal at half the lifetime (500 s).
    let at = |sample| {
        renewal_time(received, &creds, &settings, sample)
            .duration_since(received)
            .as_secs()
    };
    assert_eq!(at(0.0), 500);
    assert_eq!(at(-1.0), 475);
    assert_eq!(at(1.0), 525);
    // Never later than 90 % of the remaining validity, even with huge jitter.
    let wild = RenewalSettings {
        jitter: 0.5,
        ..settings
    };
    let late = renewal_time(received, &creds, &wild, 1.0)
        .duration_since(received)
        .as_secs();
    assert_eq!(late, 750);
    let capped = renewal_time(
        received,
        &creds,
        &RenewalSettings {
            jitter: 5.0,
            ..settings
        },
        1.0,
    );
    assert!(capped.duration_since(received).as_secs() <= 900);
}

/// A certificate source failing as scripted, then signing with a test CA.
struct ScriptedSource {
    ca: TestCa,
    clock: Arc<dyn Clock>,
    failures: Mutex<VecDeque<IdentityError>>,
    calls: Mutex<Vec<Timestamp>>,
}

impl IssueCertificate for ScriptedSource {
    fn issue<'a>(
        &'a self,
        csr: &'a str,
        _roots: &'a RootCertStore,
    ) -> BoxFuture<'a, Result<IssueResponse, IdentityError>> {
        Box::pin(async move {
            let now = self.clock.now();
            self.calls.lock().unwrap().push(now);
            if let Some(err) = self.failures.lock().unwrap().pop_front() {
                return Err(err);
            }
            Ok(self.ca.sign(csr, None, now, Duration::from_secs(100)))
        })
    }
}

#[tokio::test(start_paused = true)]
async fn renewer_backs_off_then_renews_on_schedule() {
    let clock: Arc<dyn Clock> = Arc::new(TokioClock::new());
    let refused = || IdentityError::Refused {
        status: 503,
        reason: Some(RefusalReason::Unavailable),
        message: "x".into(),
    };
    let source = Arc::new(ScriptedSource {
        ca: TestCa::new("a"),
        clock: clock.clone(),
        failures: Mutex::new(VecDeque::from([refused(), refused(), refused()])),
        calls: Mutex::new(Vec::new()),
    });
    struct Shared(Arc<ScriptedSource>);
    impl IssueCertificate for Shared {
        fn issue<'a>(
            &'a self,
            csr: &'a str,
            roots: &'a RootCertStore,
        ) -> BoxFuture<'a, Result<IssueResponse, IdentityError>> {
            self.0.issue(csr, roots)
        }
    }
    let store = CertificateStore::new();
    let settings = RenewalSettings {
        rotation_period: Duration::from_secs(50),
        jitter: 0.05,
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(3),
    };
    let renewer = Renewer::new(
        Shared(source.clone()),
        store.clone(),
        workload("api"),
        Vec::new(),
        clock.clone(),
        settings,
    );
    let shutdown = CancellationToken::new();
    let start = clock.now();
    let task = tokio::spawn(renewer.run(shutdown.clone()));
    let mut changes = store.subscribe();

    changes.changed().await.unwrap();
    let first = store.load().unwrap();
    changes.changed().await.unwrap();
    let second = store.load().unwrap();
    shutdown.cancel();
    task.await.unwrap();

    let offsets: Vec<i64> = source
        .calls
        .lock()
        .unwrap()
        .iter()
        .map(|t| t.duration_since(start).as_secs())
        .collect();
    // Failures at 0, 1, 3 (backoff 1 s, 2 s), success at 6 (backoff capped at 3 s).
    assert_eq!(&offsets[..4], &[0, 1, 3, 6]);
    // The CA asked for renewal after 50 s; jitter keeps it within ±5 %.
    let renewed_after = offsets[4] - offsets[3];
    assert!(
        (47..=53).contains(&renewed_after),
        "renewed after {renewed_after}s"
    );
    assert_ne!(
        first.certified_key().cert[0],
        second.certified_key().cert[0]
    );
}

/// Signs with a test CA and says its names came from `revision`.
struct NamingSource {
    ca: TestCa,
    clock: Arc<dyn Clock>,
    revision: Arc<Mutex<String>>,
    calls: Arc<Mutex<Vec<Timestamp>>>,
}

impl IssueCertificate for NamingSource {
    fn issue<'a>(
        &'a self,
        csr: &'a str,
        _roots: &'a RootCertStore,
    ) -> BoxFuture<'a, Result<IssueResponse, IdentityError>> {
        Box::pin(async move {
            let now = self.clock.now();
            self.calls.lock().unwrap().push(now);
            let mut issued = self.ca.sign(csr, None, now, Duration::from_secs(2000));
            issued.names_revision = Some(self.revision.lock().unwrap().clone());
            Ok(issued)
        })
    }
}

#[tokio::test(start_paused = true)]
async fn renewer_renews_early_when_the_services_selecting_the_pod_change() {
    let clock: Arc<dyn Clock> = Arc::new(TokioClock::new());
    let revision = Arc::new(Mutex::new("r1".to_owned()));
    let calls = Arc::new(Mutex::new(Vec::new()));
    let store = CertificateStore::new();
    let (wanted, trigger) = tokio::sync::watch::channel(None);
    let renewer = Renewer::new(
        NamingSource {
            ca: TestCa::new("a"),
            clock: clock.clone(),
            revision: revision.clone(),
            calls: calls.clone(),
        },
        store.clone(),
        workload("api"),
        Vec::new(),
        clock.clone(),
        RenewalSettings {
            rotation_period: Duration::from_secs(1000),
            ..RenewalSettings::default()
        },
    )
    .with_names_trigger(trigger);
    let shutdown = CancellationToken::new();
    let start = clock.now();
    let task = tokio::spawn(renewer.run(shutdown.clone()));
    let offsets = || -> Vec<i64> {
        calls
            .lock()
            .unwrap()
            .iter()
            .map(|t| t.duration_since(start).as_secs())
            .collect()
    };

    tokio::time::sleep(Duration::from_secs(1)).await;
    // The bundle agrees with the certificate: nothing to do.
    wanted.send_replace(Some("r1".into()));
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(offsets(), [0]);

    // A Service was added: the bundle moves on, the certificate follows within seconds.
    *revision.lock().unwrap() = "r2".into();
    wanted.send_replace(Some("r2".into()));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after_change = offsets();
    assert_eq!(after_change.len(), 2, "{after_change:?}");
    assert!((31..=33).contains(&after_change[1]), "{after_change:?}");
    assert_eq!(
        store.load().unwrap().names_revision(),
        Some("r2"),
        "the new certificate's names"
    );

    // While the identity service still sees the old Services, renewals back off.
    wanted.send_replace(Some("r3".into()));
    tokio::time::sleep(Duration::from_secs(100)).await;
    let chasing = offsets();
    let gaps: Vec<i64> = chasing.windows(2).skip(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(
        gaps,
        [20, 40],
        "renewals chasing a revision the service does not see yet: {chasing:?}"
    );
    shutdown.cancel();
    task.await.unwrap();
}
