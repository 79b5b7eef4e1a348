//! Time-compressed rotation: two sidecar identities (server and client) renew from an
//! in-process identity service every ~2 s while a mutual-TLS 1.3 server and client keep
//! requests flowing, on fresh connections and on one keep-alive connection that lives
//! through every rotation, including one root rotation. No request may fail, and every
//! peer certificate seen in a handshake must have been valid at that moment and chain
//! to a root the CA had published.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jiff::Timestamp;
use portcullis_operator::ca::{
    CaSettings, CaState, CertificateAuthority, IdentityMetrics, IdentityService,
    IdentityServiceConfig, StaticAuthenticator, run_rotation,
};
use portcullis_sidecar::control::identity::{
    CertificateStore, IdentityClient, IdentityEndpoint, RenewalSettings, Renewer, SystemClock,
    TrustDomain, WorkloadId,
};
use portcullis_sidecar::tls::peer::peer_identity;
use portcullis_sidecar::tls::{ClientAuth, CredentialStore, TlsSettings};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use x509_parser::prelude::{FromDer, X509Certificate};

/// How long requests flow: leaf lifetime 4 s, root rotation at 7 s, old root droppable
/// at ~11 s.
const RUN_FOR: Duration = Duration::from_secs(12);

#[derive(Debug, Clone)]
struct Observation {
    side: &'static str,
    at: Timestamp,
    chain: Vec<CertificateDer<'static>>,
}

type Log = Arc<Mutex<Vec<Observation>>>;

fn der_of(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

fn observe(log: &Log, side: &'static str, certs: Option<&[CertificateDer<'_>]>) {
    let chain = certs
        .unwrap_or_default()
        .iter()
        .map(|c| c.clone().into_owned())
        .collect();
    log.lock().unwrap().push(Observation {
        side,
        at: Timestamp::now(),
        chain,
    });
}

async fn start_sidecar(
    id: &WorkloadId,
    token: &str,
    identity_port: u16,
    bootstrap: Vec<CertificateDer<'static>>,
    dir: &tempfile::TempDir,
    shutdown: &CancellationToken,
) -> CertificateStore {
    let token_path = dir.path().join(token);
    std::fs::write(&token_path, token).unwrap();
    let endpoint = IdentityEndpoint::parse(&format!("https://127.0.0.1:{identity_port}"))
        .unwrap()
        .with_server_name("identity.test")
        .unwrap();
    let client = IdentityClient::new(endpoint, token_path).with_timeout(Duration::from_secs(2));
    let store = CertificateStore::new();
    let settings = RenewalSettings {
        rotation_period: Duration::from_secs(2),
        jitter: 0.05,
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_millis(400),
    };
    let renewer = Renewer::new(
        client,
        store.clone(),
        id.clone(),
        bootstrap,
        Arc::new(SystemClock),
        settings,
    );
    tokio::spawn(renewer.run(shutdown.clone()));
    store
}

/// The TLS configs a sidecar builds from `store` (which must hold credentials).
fn tls_of(store: &CertificateStore, client_auth: ClientAuth) -> CredentialStore {
    let trust_domain = store.load().unwrap().workload().trust_domain().clone();
    let credentials = CredentialStore::new(TlsSettings {
        client_auth,
        client_trust_domain: Some(trust_domain.clone()),
        peer_trust_domain: Some(trust_domain),
        serving: None,
    })
    .unwrap();
    store.feed(&credentials).unwrap();
    credentials
}

async fn serve_mtls(
    store: CertificateStore,
    log: Log,
    shutdown: CancellationToken,
) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let configs = tls_of(&store, ClientAuth::Required).server_configs();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted.unwrap(),
            };
            let (acceptor, log) = (TlsAcceptor::from(configs.current()), log.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                observe(
                    &log,
                    "server saw client",
                    tls.get_ref().1.peer_certificates(),
                );
                let peer = peer_identity(tls.get_ref().1.peer_certificates())
                    .map(|p| p.workload.to_string());
                let handler = service_fn(move |_req| {
                    let peer = peer.clone().unwrap_or_default();
                    async move {
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(peer))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), handler)
                    .await;
            });
        }
    });
    addr
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(
    store: &CredentialStore,
    addr: std::net::SocketAddr,
    log: &Log,
) -> Result<Sender, String> {
    let config = store.peer_client()().map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = TlsConnector::from(config)
        .connect(ServerName::try_from("server.mesh.invalid").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    observe(
        log,
        "client saw server",
        tls.get_ref().1.peer_certificates(),
    );
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn get(sender: &mut Sender, expect_peer: &str) -> Result<(), String> {
    sender
        .ready()
        .await
        .map_err(|e| format!("connection: {e}"))?;
    let request = hyper::Request::get("/")
        .header("host", "server")
        .body(Empty::new())
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if status != 200 || body != expect_peer.as_bytes() {
        return Err(format!("status {status}, body {body:?}"));
    }
    Ok(())
}

fn check_observation(
    obs: &Observation,
    known_roots: &[CertificateDer<'static>],
) -> Result<[Vec<u8>; 2], String> {
    let at = x509_parser::time::ASN1Time::from_timestamp(obs.at.as_second()).unwrap();
    let [leaf, intermediate] = obs.chain.as_slice() else {
        return Err(format!(
            "{}: chain of {} certificates",
            obs.side,
            obs.chain.len()
        ));
    };
    let (_, leaf) = X509Certificate::from_der(leaf).map_err(|e| e.to_string())?;
    let (_, intermediate) = X509Certificate::from_der(intermediate).map_err(|e| e.to_string())?;
    for (what, cert) in [("leaf", &leaf), ("intermediate", &intermediate)] {
        if !cert.validity().is_valid_at(at) {
            return Err(format!(
                "{}: {what} not valid at {} ({:?})",
                obs.side,
                obs.at,
                cert.validity()
            ));
        }
    }
    leaf.verify_signature(Some(intermediate.public_key()))
        .map_err(|e| format!("{}: leaf signature: {e}", obs.side))?;
    let root = known_roots
        .iter()
        .find(|root| {
            let (_, root) = X509Certificate::from_der(root).unwrap();
            root.subject() == intermediate.issuer()
                && intermediate
                    .verify_signature(Some(root.public_key()))
                    .is_ok()
                && root.validity().is_valid_at(at)
        })
        .ok_or_else(|| format!("{}: intermediate chains to no published root", obs.side))?;
    Ok([leaf.raw_serial().to_vec(), root.to_vec()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_flow_through_leaf_and_root_rotations() {
    let trust_domain = TrustDomain::new("mesh.test").unwrap();
    let settings = CaSettings {
        leaf_rotation_period: Duration::from_secs(2),
        leaf_grace: Duration::from_secs(2),
        intermediate_rotation_period: Duration::from_secs(3),
        root_rotation_period: Duration::from_secs(7),
        ..CaSettings::new(trust_domain.clone())
    };
    let ca = Arc::new(CertificateAuthority::new(
        settings.clone(),
        CaState::generate(&settings, Timestamp::now()).unwrap(),
        Arc::new(SystemClock),
    ));
    let started = tokio::time::Instant::now();
    let first_root = ca.with_state(|s| s.active_root().fingerprint().to_string());
    let shutdown = CancellationToken::new();
    tokio::spawn(run_rotation(
        ca.clone(),
        None,
        Duration::from_millis(100),
        shutdown.clone(),
    ));

    // Every root ever published, sampled faster than anything can come and go.
    let published: Arc<Mutex<BTreeSet<Vec<u8>>>> = Arc::default();
    {
        let (ca, published, shutdown) = (ca.clone(), published.clone(), shutdown.clone());
        tokio::spawn(async move {
            while !shutdown.is_cancelled() {
                published.lock().unwrap().extend(
                    der_of(&ca.trust_bundle_pem())
                        .into_iter()
                        .map(|c| c.to_vec()),
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }

    let lookups = StaticAuthenticator::new()
        .with_workload("server-token", "mesh", "server", "server-0", "acme")
        .with_workload("client-token", "mesh", "client", "client-0", "acme");
    let service = Arc::new(IdentityService::new(
        ca.clone(),
        Arc::new(lookups),
        IdentityMetrics::default(),
    ));
    let config = IdentityServiceConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        server_names: vec!["identity.test".into()],
        ..IdentityServiceConfig::default()
    };
    let bound = service.bind(config).await.unwrap();
    let identity_port = bound.local_addr().port();
    tokio::spawn(bound.serve(shutdown.clone()));

    let dir = tempfile::tempdir().unwrap();
    let bootstrap = der_of(&ca.trust_bundle_pem()); // the mounted trust-bundle ConfigMap
    let server_id = WorkloadId::new(trust_domain.clone(), "mesh", "server").unwrap();
    let client_id = WorkloadId::new(trust_domain.clone(), "mesh", "client").unwrap();
    let server_store = start_sidecar(
        &server_id,
        "server-token",
        identity_port,
        bootstrap.clone(),
        &dir,
        &shutdown,
    )
    .await;
    let client_store = start_sidecar(
        &client_id,
        "client-token",
        identity_port,
        bootstrap,
        &dir,
        &shutdown,
    )
    .await;
    tokio::time::timeout(Duration::from_secs(3), async {
        while !(server_store.is_ready() && client_store.is_ready()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("both sidecars obtain certificates");

    let log: Log = Arc::default();
    let addr = serve_mtls(server_store.clone(), log.clone(), shutdown.clone()).await;
    let client_tls = tls_of(&client_store, ClientAuth::Optional);
    let deadline = started + RUN_FOR;
    let expect_peer = client_id.to_string();

    // One keep-alive connection for the whole run.
    let long_lived = {
        let (store, log, expect) = (client_tls.clone(), log.clone(), expect_peer.clone());
        tokio::spawn(async move {
            let (mut ok, mut failures) = (0u32, Vec::new());
            let mut sender = match connect(&store, addr, &log).await {
                Ok(s) => s,
                Err(e) => return (0, vec![format!("long-lived connect: {e}")]),
            };
            while tokio::time::Instant::now() < deadline {
                match get(&mut sender, &expect).await {
                    Ok(()) => ok += 1,
                    Err(e) => failures.push(format!("long-lived: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            (ok, failures)
        })
    };
    // New connections, one request each, two in parallel.
    let fresh: Vec<_> = (0..2)
        .map(|_| {
            let (store, log, expect) = (client_tls.clone(), log.clone(), expect_peer.clone());
            tokio::spawn(async move {
                let (mut ok, mut failures) = (0u32, Vec::new());
                while tokio::time::Instant::now() < deadline {
                    let result = match connect(&store, addr, &log).await {
                        Ok(mut sender) => get(&mut sender, &expect).await,
                        Err(e) => Err(e),
                    };
                    match result {
                        Ok(()) => ok += 1,
                        Err(e) => failures.push(format!("fresh at {}: {e}", Timestamp::now())),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (ok, failures)
            })
        })
        .collect();

    let (long_ok, mut failures) = tokio::time::timeout(Duration::from_secs(15), long_lived)
        .await
        .unwrap()
        .unwrap();
    let mut fresh_ok = 0;
    for task in fresh {
        let (ok, f) = tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .unwrap()
            .unwrap();
        fresh_ok += ok;
        failures.extend(f);
    }
    shutdown.cancel();

    assert!(
        failures.is_empty(),
        "{} failed requests: {:#?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(
        long_ok > 100,
        "long-lived connection served only {long_ok} requests"
    );
    assert!(
        fresh_ok > 100,
        "only {fresh_ok} requests on fresh connections"
    );

    let known_roots: Vec<CertificateDer<'static>> = published
        .lock()
        .unwrap()
        .iter()
        .map(|r| CertificateDer::from(r.clone()))
        .collect();
    let observations = log.lock().unwrap().clone();
    let mut serials = std::collections::BTreeMap::<&str, BTreeSet<Vec<u8>>>::new();
    let mut roots_used = BTreeSet::new();
    for obs in &observations {
        let [serial, root] = check_observation(obs, &known_roots).unwrap_or_else(|e| panic!("{e}"));
        serials.entry(obs.side).or_default().insert(serial);
        roots_used.insert(root);
    }
    for (side, seen) in &serials {
        assert!(
            seen.len() >= 4,
            "{side}: only {} distinct leaves over {RUN_FOR:?}",
            seen.len()
        );
    }
    assert_eq!(serials.len(), 2, "both sides observed");
    assert!(
        roots_used.len() >= 2,
        "no handshake used a certificate under the rotated root"
    );

    // The root rotated, and the old root left the bundle once its leaves had expired.
    let (active, bundle) = ca.with_state(|s| {
        (
            s.active_root().fingerprint().to_string(),
            s.trust_bundle()
                .iter()
                .map(|c| c.fingerprint().to_string())
                .collect::<Vec<_>>(),
        )
    });
    assert_ne!(active, first_root);
    assert!(
        !bundle.contains(&first_root),
        "the first root is still in the bundle after all its leaves expired"
    );
    eprintln!(
        "rotation test: {} handshakes observed, {long_ok} keep-alive + {fresh_ok} fresh requests, leaves seen {:?}, roots used {}",
        observations.len(),
        serials
            .iter()
            .map(|(k, v)| (k.to_string(), v.len()))
            .collect::<Vec<_>>(),
        roots_used.len()
    );
}
